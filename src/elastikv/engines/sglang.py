"""SGLang adapter: the contract part (supported versions, every SGLang name the adapter relies on).

The adapter itself (SGLang's token-to-KV pool buffers over a KVSpace, its paged allocator over the
BlockAllocator, the radix cache under the memory bound, the ``sglang.srt.plugins`` start-up hook) is being
written from ``docs/notes/sglang-internals.md``; until it lands, ``ELASTIKV=1`` does nothing to SGLang, and the
router's ``engine: sglang`` starts SGLang as it is. What is here is what CI checks against every SGLang it
installs: :data:`TARGETS` (parsed from the source files, nothing imported: ``python -m elastikv.engines.contract
sglang [DIR]``) and :func:`check_version`.
"""

from __future__ import annotations

import importlib.metadata

from elastikv.engines.contract import Target
from elastikv.errors import UnsupportedEngine

# SGLang moves its memory code from one 0.5.x release to the next, so versions are matched exactly.
SUPPORTED: tuple[str, ...] = ("0.5.23",)
# Every target below was also found in 0.5.21 and 0.5.22 (their wheels, unpacked and parsed).

TARGETS: tuple[Target, ...] = (
    # version and start-up
    Target("sglang._version", "__version_tuple__"),
    Target("sglang.srt.plugins", "load_plugins"),
    Target("sglang.srt.plugins", "GENERAL_PLUGINS_GROUP"),
    Target(
        "sglang.srt.managers.scheduler",
        "run_scheduler_process",
        ("server_args", "port_args", "gpu_id", "tp_rank", "pp_rank", "dp_rank", "pipe_writer"),
    ),
    # sizing (scheduler process, every TP/PP rank)
    Target(
        "sglang.srt.mem_cache.kv_cache_configurator",
        "KVCacheConfigurator._profile_available_bytes",
        ("self", "pre_model_load_memory"),
    ),
    Target(
        "sglang.srt.mem_cache.kv_cache_configurator", "KVCacheConfigurator.configure", ("self", "pre_model_load_memory")
    ),
    Target(
        "sglang.srt.mem_cache.kv_cache_configurator",
        "KVCacheConfigurator._build_mha_kv_pool",
        ("self", "max_total_num_tokens", "mha_pool_class", "quant_method"),
    ),
    Target(
        "sglang.srt.mem_cache.kv_cache_configurator",
        "KVCacheConfigurator._build_token_to_kv_pool_allocator",
        ("self", "sizes", "token_to_kv_pool", "is_dsv4_model", "req_to_token_pool", "token_to_kv_pool_allocator"),
    ),
    Target("sglang.srt.mem_cache.kv_cache_configurator", "TokenToKVPoolAllocator"),  # imported names to rebind
    Target("sglang.srt.mem_cache.kv_cache_configurator", "PagedTokenToKVPoolAllocator"),
    Target("sglang.srt.mem_cache.kv_cache_configurator", "MHATokenToKVPool"),
    Target(
        "sglang.srt.model_executor.pool_configurator",
        "DefaultPoolConfigurator.calculate_pool_sizes",
        ("self", "available_bytes", "page_size"),
    ),
    Target("sglang.srt.model_executor.model_runner", "ModelRunner.alloc_memory_pool", ("self", "memory_pool_config")),
    Target("sglang.srt.managers.scheduler", "Scheduler.init_memory_pools", ("self",)),
    # KV buffers (same process as the allocator)
    Target(
        "sglang.srt.mem_cache.memory_pool",
        "KVCache.__init__",
        (
            "self",
            "size",
            "page_size",
            "dtype",
            "layer_num",
            "device",
            "enable_memory_saver",
            "start_layer",
            "end_layer",
        ),
    ),
    Target(
        "sglang.srt.mem_cache.memory_pool",
        "MHATokenToKVPool.__init__",
        (
            "self",
            "size",
            "page_size",
            "dtype",
            "head_num",
            "head_dim",
            "layer_num",
            "device",
            "enable_memory_saver",
            "v_head_dim",
            "start_layer",
            "end_layer",
        ),
    ),
    Target("sglang.srt.mem_cache.memory_pool", "MHATokenToKVPool._create_buffers", ("self",)),
    Target("sglang.srt.mem_cache.memory_pool", "MHATokenToKVPool._create_buffers_normal", ("self",)),
    Target("sglang.srt.mem_cache.memory_pool", "MHATokenToKVPool._kv_buffer_shapes", ("self",)),
    Target("sglang.srt.mem_cache.memory_pool", "MHATokenToKVPool._init_data_ptrs_and_strides", ("self",)),
    Target("sglang.srt.mem_cache.memory_pool", "MHATokenToKVPool._clear_buffers", ("self",)),
    Target("sglang.srt.mem_cache.memory_pool", "MHATokenToKVPool.get_kv_size_bytes", ("self",)),
    Target("sglang.srt.mem_cache.memory_pool", "MHATokenToKVPool.get_kv_buffer", ("self", "layer_id")),
    Target("sglang.srt.mem_cache.memory_pool", "MLATokenToKVPool._create_buffers", ("self",)),
    Target(
        "sglang.srt.mem_cache.memory_pool",
        "ReqToTokenPool.__init__",
        ("self", "size", "max_context_len", "device", "enable_memory_saver"),
    ),
    # allocator
    Target("sglang.srt.mem_cache.allocator", "TokenToKVPoolAllocator"),
    Target("sglang.srt.mem_cache.allocator", "PagedTokenToKVPoolAllocator"),
    Target(
        "sglang.srt.mem_cache.allocator.base",
        "BaseTokenToKVPoolAllocator.__init__",
        ("self", "size", "page_size", "dtype", "device", "kvcache", "need_sort"),
    ),
    Target("sglang.srt.mem_cache.allocator.base", "BaseTokenToKVPoolAllocator.available_size", ("self",)),
    Target(
        "sglang.srt.mem_cache.allocator.base",
        "BaseTokenToKVPoolAllocator.create_prefill_budget",
        ("self", "tree_cache", "num_mixed_decode_tokens"),
    ),
    Target(
        "sglang.srt.mem_cache.allocator.base",
        "BaseTokenToKVPoolAllocator.check_decode_capacity",
        ("self", "num_tokens", "tree_cache", "requests", "spec_algorithm"),
    ),
    Target(
        "sglang.srt.mem_cache.allocator.base",
        "BaseTokenToKVPoolAllocator.evict_to_free_tokens",
        ("self", "tree_cache", "num_tokens"),
    ),
    Target("sglang.srt.mem_cache.allocator.base", "BaseTokenToKVPoolAllocator.free_group_begin", ("self",)),
    Target("sglang.srt.mem_cache.allocator.base", "BaseTokenToKVPoolAllocator.free_group_end", ("self",)),
    Target(
        "sglang.srt.mem_cache.allocator.base",
        "BaseTokenToKVPoolAllocator.free_segment",
        ("self", "free_index", "start_pos"),
    ),
    Target("sglang.srt.mem_cache.allocator.base", "BaseTokenToKVPoolAllocator.free_full", ("self", "free_index")),
    Target("sglang.srt.mem_cache.allocator.base", "BaseTokenToKVPoolAllocator.resize", ("self", "config")),
    Target(
        "sglang.srt.mem_cache.allocator.token",
        "TokenToKVPoolAllocator.__init__",
        ("self", "size", "dtype", "device", "kvcache", "need_sort"),
    ),
    Target("sglang.srt.mem_cache.allocator.token", "TokenToKVPoolAllocator.clear", ("self",)),
    Target("sglang.srt.mem_cache.allocator.token", "TokenToKVPoolAllocator.available_size", ("self",)),
    Target("sglang.srt.mem_cache.allocator.token", "TokenToKVPoolAllocator.alloc", ("self", "need_size")),
    Target("sglang.srt.mem_cache.allocator.token", "TokenToKVPoolAllocator.free", ("self", "free_index")),
    Target("sglang.srt.mem_cache.allocator.token", "TokenToKVPoolAllocator.free_page_ids", ("self", "page_ids")),
    Target(
        "sglang.srt.mem_cache.allocator.paged",
        "PagedTokenToKVPoolAllocator.__init__",
        ("self", "size", "page_size", "dtype", "device", "kvcache", "need_sort"),
    ),
    Target("sglang.srt.mem_cache.allocator.paged", "PagedTokenToKVPoolAllocator.clear", ("self",)),
    Target("sglang.srt.mem_cache.allocator.paged", "PagedTokenToKVPoolAllocator.available_size", ("self",)),
    Target("sglang.srt.mem_cache.allocator.paged", "PagedTokenToKVPoolAllocator.merge_and_sort_free", ("self",)),
    Target("sglang.srt.mem_cache.allocator.paged", "PagedTokenToKVPoolAllocator.alloc", ("self", "need_size")),
    Target(
        "sglang.srt.mem_cache.allocator.paged",
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
        "sglang.srt.mem_cache.allocator.paged",
        "PagedTokenToKVPoolAllocator.alloc_decode",
        ("self", "seq_lens", "seq_lens_cpu", "last_loc"),
    ),
    Target("sglang.srt.mem_cache.allocator.paged", "PagedTokenToKVPoolAllocator.free", ("self", "free_index")),
    Target(
        "sglang.srt.mem_cache.allocator.paged",
        "PagedTokenToKVPoolAllocator.free_segment",
        ("self", "free_index", "start_pos"),
    ),
    Target("sglang.srt.mem_cache.allocator.paged", "PagedTokenToKVPoolAllocator.free_page_ids", ("self", "page_ids")),
    Target(
        "sglang.srt.mem_cache.allocator.paged", "PagedTokenToKVPoolAllocator._release_page_ids", ("self", "page_ids")
    ),
    Target("sglang.srt.mem_cache.allocator.paged", "PagedTokenToKVPoolAllocator.free_group_begin", ("self",)),
    Target("sglang.srt.mem_cache.allocator.paged", "PagedTokenToKVPoolAllocator.free_group_end", ("self",)),
    # admission, eviction, retraction (relied on, not patched)
    Target(
        "sglang.srt.mem_cache.prefill_budget",
        "PrefillBudget.__init__",
        ("self", "allocator", "tree_cache", "num_mixed_decode_tokens"),
    ),
    Target("sglang.srt.mem_cache.prefill_budget", "PrefillBudget._available_and_evictable", ("self",)),
    Target("sglang.srt.mem_cache.common", "_evict_until_allocatable", ("tree_cache", "allocator", "num_tokens")),
    Target("sglang.srt.mem_cache.unified_radix_cache", "UnifiedRadixCache.evictable_size", ("self",)),
    Target("sglang.srt.mem_cache.unified_radix_cache", "UnifiedRadixCache.evict_for_alloc", ("self", "params")),
    Target("sglang.srt.managers.schedule_batch", "ScheduleBatch.check_decode_mem", ("self", "selected_indices")),
    # idle invariant
    Target(
        "sglang.srt.managers.scheduler_components.invariant_checker",
        "SchedulerInvariantChecker._check_full_pool",
        ("self", "ps", "uncached"),
    ),
    Target(
        "sglang.srt.managers.scheduler_components.pool_stats_observer",
        "SchedulerPoolStatsObserver._get_token_info",
        ("self",),
    ),
    # sleep / flush
    Target("sglang.srt.managers.scheduler", "Scheduler.flush_cache", ("self", "empty_cache")),
    Target(
        "sglang.srt.managers.scheduler_components.weight_updater",
        "SchedulerWeightUpdaterManager.release_memory_occupation",
        ("self", "recv_req"),
    ),
    Target(
        "sglang.srt.managers.scheduler_components.weight_updater",
        "SchedulerWeightUpdaterManager.resume_memory_occupation",
        ("self", "recv_req"),
    ),
    Target("sglang.srt.constants", "GPU_MEMORY_TYPE_KV_CACHE"),
)


def version() -> str:
    return importlib.metadata.version("sglang")


def check_version(text: str) -> None:
    """Refuse an SGLang this adapter was not written and checked against."""
    base = text.split("+")[0]
    if base not in SUPPORTED:
        raise UnsupportedEngine(
            f"elastikv supports SGLang {', '.join(SUPPORTED)}; this is SGLang {text}. Install it "
            f"(pip install 'sglang=={SUPPORTED[-1]}') or run without ELASTIKV=1."
        )
