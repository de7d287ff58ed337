"""SGLang adapter: the SGLang releases it supports and every SGLang name it patches or calls.

:data:`TARGETS` is the adapter's contract with SGLang: :func:`~elastikv.engines.sglang.apply` checks it in the
running SGLang before touching anything (:func:`missing_targets`), and ``elastikv check-contract sglang [DIR]``
(``tests/test_sglang_contract.py`` in CI) parses an installed or unpacked SGLang's source against it. A name the
adapter starts to rely on is added here first.
"""

from __future__ import annotations

import importlib.metadata

from elastikv.engines.patching import Target, runtime_problems
from elastikv.errors import UnsupportedEngine

# SGLang moves its memory code from one 0.5.x release to the next, so versions are matched exactly.
SUPPORTED: tuple[str, ...] = ("0.5.23",)

MEM_CACHE = "sglang.srt.mem_cache"  # where SGLang keeps its KV memory code
TARGETS: tuple[Target, ...] = (
    # version and start-up
    Target("sglang._version", "__version_tuple__"),
    Target("sglang.srt.plugins", "load_plugins"),
    Target("sglang.srt.plugins", "GENERAL_PLUGINS_GROUP"),
    # sizing (patched)
    Target(
        f"{MEM_CACHE}.kv_cache_configurator",
        "KVCacheConfigurator._profile_available_bytes",
        ("self", "pre_model_load_memory"),
    ),
    Target(f"{MEM_CACHE}.kv_cache_configurator", "TokenToKVPoolAllocator"),  # rebound: the allocators it builds
    Target(f"{MEM_CACHE}.kv_cache_configurator", "PagedTokenToKVPoolAllocator"),
    Target(
        f"{MEM_CACHE}.kv_cache_configurator",
        "KVCacheConfigurator._build_token_to_kv_pool_allocator",
        ("self", "sizes", "token_to_kv_pool", "is_dsv4_model", "req_to_token_pool", "token_to_kv_pool_allocator"),
    ),
    Target("sglang.srt.model_executor.model_runner", "ModelRunner.alloc_memory_pool", ("self", "memory_pool_config")),
    # KV buffers (patched; the attributes read are set by __init__ before _create_buffers runs)
    Target(
        f"{MEM_CACHE}.memory_pool",
        "MHATokenToKVPool.__init__",
        ("self", "size", "page_size", "dtype", "head_num", "head_dim", "layer_num", "device", "v_head_dim"),
    ),
    Target(f"{MEM_CACHE}.memory_pool", "MHATokenToKVPool._create_buffers", ("self",)),
    Target(f"{MEM_CACHE}.memory_pool", "MHATokenToKVPool._create_buffers_normal", ("self",)),
    Target(f"{MEM_CACHE}.memory_pool", "MHATokenToKVPool._kv_buffer_shapes", ("self",)),
    Target(
        f"{MEM_CACHE}.memory_pool",
        "MLATokenToKVPool.__init__",
        ("self", "size", "page_size", "dtype", "kv_lora_rank", "qk_rope_head_dim", "layer_num", "device", "use_dsa"),
    ),
    Target(f"{MEM_CACHE}.memory_pool", "MLATokenToKVPool._create_buffers", ("self",)),
    # allocator (subclassed; every method overridden or relied on)
    Target(
        f"{MEM_CACHE}.allocator.paged",
        "PagedTokenToKVPoolAllocator.__init__",
        ("self", "size", "page_size", "dtype", "device", "kvcache", "need_sort"),
    ),
    Target(f"{MEM_CACHE}.allocator.paged", "PagedTokenToKVPoolAllocator.clear", ("self",)),
    Target(f"{MEM_CACHE}.allocator.paged", "PagedTokenToKVPoolAllocator.available_size", ("self",)),
    Target(f"{MEM_CACHE}.allocator.paged", "PagedTokenToKVPoolAllocator.merge_and_sort_free", ("self",)),
    Target(f"{MEM_CACHE}.allocator.paged", "PagedTokenToKVPoolAllocator.alloc", ("self", "need_size")),
    Target(
        f"{MEM_CACHE}.allocator.paged",
        "PagedTokenToKVPoolAllocator.alloc_extend",
        (
            "self",
            "prefix_lens",
            "prefix_lens_cpu",
            "seq_lens",
            "seq_lens_cpu",
            "last_loc",
            "extend_num_tokens",
            "num_new_pages",
        ),
    ),
    Target(
        f"{MEM_CACHE}.allocator.paged",
        "PagedTokenToKVPoolAllocator.alloc_decode",
        ("self", "seq_lens", "seq_lens_cpu", "last_loc"),
    ),
    Target(f"{MEM_CACHE}.allocator.paged", "PagedTokenToKVPoolAllocator.free", ("self", "free_index")),
    Target(f"{MEM_CACHE}.allocator.paged", "PagedTokenToKVPoolAllocator.free_page_ids", ("self", "page_ids")),
    Target(f"{MEM_CACHE}.allocator.paged", "PagedTokenToKVPoolAllocator._release_page_ids", ("self", "page_ids")),
    Target(f"{MEM_CACHE}.allocator.paged", "PagedTokenToKVPoolAllocator.free_group_end", ("self",)),
    Target(f"{MEM_CACHE}.allocator.paged", "get_num_new_pages"),
    Target(
        f"{MEM_CACHE}.allocator.base",
        "BaseTokenToKVPoolAllocator.create_prefill_budget",
        ("self", "tree_cache", "num_mixed_decode_tokens"),
    ),
    Target(
        f"{MEM_CACHE}.allocator.base",
        "BaseTokenToKVPoolAllocator.check_decode_capacity",
        ("self", "num_tokens", "tree_cache", "requests", "spec_algorithm"),
    ),
    Target(
        f"{MEM_CACHE}.allocator.base",
        "BaseTokenToKVPoolAllocator.evict_to_free_tokens",
        ("self", "tree_cache", "num_tokens"),
    ),
    Target(f"{MEM_CACHE}.allocator.base", "BaseTokenToKVPoolAllocator.free_group_end", ("self",)),
    # admission (subclassed)
    Target(
        f"{MEM_CACHE}.prefill_budget",
        "PrefillBudget.__init__",
        ("self", "allocator", "tree_cache", "num_mixed_decode_tokens"),
    ),
    Target(
        f"{MEM_CACHE}.prefill_budget",
        "PrefillBudget.check_prefill",
        ("self", "extend_input_len", "total_tokens", "max_new_tokens", "input_tokens", "chunk_limit"),
    ),
    Target(
        f"{MEM_CACHE}.prefill_budget",
        "PrefillBudget.can_allocate_prefill",
        ("self", "paged_input", "extend_input_len", "max_new_tokens", "chunk_limit"),
    ),
    # radix cache (called)
    Target(f"{MEM_CACHE}.base_prefix_cache", "EvictParams"),
    Target(f"{MEM_CACHE}.unified_radix_cache", "UnifiedRadixCache.evictable_size", ("self",)),
    Target(f"{MEM_CACHE}.unified_radix_cache", "UnifiedRadixCache.evict", ("self", "params")),
    Target(f"{MEM_CACHE}.unified_radix_cache", "UnifiedRadixCache.evict_for_alloc", ("self", "params")),
    # scheduler: idle housekeeping and the strict idle leak check (patched)
    Target("sglang.srt.managers.scheduler", "Scheduler.on_idle", ("self",)),
    Target("sglang.srt.managers.scheduler", "Scheduler.is_fully_idle", ("self",)),
    Target("sglang.srt.managers.scheduler", "Scheduler.flush_cache", ("self", "empty_cache")),
    Target(
        "sglang.srt.managers.scheduler_components.invariant_checker",
        "SchedulerInvariantChecker._check_full_pool",
        ("self", "ps", "uncached"),
    ),
    # sleep: releasing "kv_cache" flushes the cache, which clears the allocator (relied on)
    Target(
        "sglang.srt.managers.scheduler_components.weight_updater",
        "SchedulerWeightUpdaterManager.release_memory_occupation",
        ("self", "recv_req"),
    ),
)


def version() -> str:
    """The installed SGLang's version (read from its metadata: SGLang is not imported)."""
    return importlib.metadata.version("sglang")


def check_version(text: str) -> None:
    """Refuse an SGLang this adapter was not written and checked against."""
    base = text.split("+")[0]
    if base not in SUPPORTED:
        raise UnsupportedEngine(
            f"elastikv supports SGLang {', '.join(SUPPORTED)}; this is SGLang {text}. Install it "
            f"(pip install 'sglang=={SUPPORTED[-1]}') or run without ELASTIKV=1."
        )


def missing_targets() -> list[str]:
    """Every target absent from the imported SGLang or lacking a parameter the adapter passes, one line each."""
    return runtime_problems(TARGETS)
