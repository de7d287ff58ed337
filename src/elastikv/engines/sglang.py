"""SGLang adapter: an unchanged SGLang 0.5.23 (``python -m sglang.launch_server``, ``sglang serve``, ``Engine``)
with an elastic KV cache.

Applied at start-up by SGLang's own plugin group ``sglang.srt.plugins`` (``engines/autopatch.py``), which SGLang
loads in every process it starts (HTTP server, detokenizer, each scheduler), when ``ELASTIKV=1``. Only the
scheduler processes hold KV memory, and each one holds all of its own: model runner, KV buffers, token allocator
and radix tree live in the same process, one per tensor-parallel rank. So every rank books and maps its own
pages, with no socket in between. What changes there:

Sizing
    ``KVCacheConfigurator._profile_available_bytes`` reports the *virtual capacity* (the device's total memory),
    never a free-memory snapshot; SGLang derives ``max_total_num_tokens`` from it (``--max-total-tokens`` can
    still lower it).
Buffers
    ``MHATokenToKVPool._create_buffers_normal`` builds every layer's K and V buffer as a view of one
    :class:`~elastikv.space.KVSpace` (per-layer layout: SGLang indexes tokens with one slot stride, so the
    block-interleaved layout does not fit). An elastikv block is one SGLang page (``--page-size`` tokens); SGLang's
    padded page 0 is the always-mapped null block. Nothing is mapped until a page is handed out. MLA
    (``MLATokenToKVPool._create_buffers``): each layer's joint latent buffer is a view of one space the same way.
Allocator
    SGLang's token and paged allocators are replaced by :class:`ElasticTokenAllocator` (a subclass of its
    ``PagedTokenToKVPoolAllocator``, page size 1 included), whose free list holds only pages secured from the
    :class:`~elastikv.allocator.BlockAllocator` (mapped and booked). ``available_size()`` is what could be
    secured within the limit, so SGLang's admission, radix-cache eviction and decode retraction work unchanged;
    a prefill is admitted only once its pages are secured (or evictable), a decode step only once its new pages
    are, so an allocation never fails after admission (SGLang treats that as fatal).
Radix cache
    Stays on. Unused cached prefixes are bounded by ``ELASTIKV_PREFIX_CACHE`` (evicted at each admission round
    and when idle), so pages really empty and go back to other models.
Sleep
    ``/release_memory_occupation`` (the router's sleep for ``engine: sglang``) ends in ``allocator.clear()``:
    every page is freed and the reserve is given back at once. SGLang's strict idle check is told about the
    tokens the limit withholds, so it still catches real leaks.

Refused at start-up, with the reason: SGLang versions other than :data:`SUPPORTED`, a moved patch target, KV
layouts other than SGLang's default ``nhd``, K and V of different shapes (DSA, fp4 MLA, hybrid SWA and Mamba
pools use other classes and are refused when the allocator finds a pool it did not build), PD disaggregation.

Every name this module patches or calls is listed in :data:`TARGETS`; :func:`apply` checks them all before
touching anything, and the contract test parses the installed SGLang's source against the same table.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from elastikv import lifecycle
from elastikv.config import Settings, format_bytes
from elastikv.engines.contract import Target, runtime_problems
from elastikv.errors import AllocationRefused, ElastikvError, UnsupportedEngine
from elastikv.instance import Instance, backend_for, open_instance
from elastikv.memory import MemoryBackend
from elastikv.space import KVGeometry, chunk_bytes_for

log = logging.getLogger("elastikv")

# SGLang moves its memory code from one 0.5.x release to the next, so versions are matched exactly.
SUPPORTED: tuple[str, ...] = ("0.5.23",)

# How long an allocation SGLang already admitted may wait for room (another instance booked the device budget
# between SGLang's check and its allocation, a race the admission hooks make rare) before it is given up.
ALLOC_WAIT_S = 60.0

_MEM = "sglang.srt.mem_cache"
TARGETS: tuple[Target, ...] = (
    # version and start-up
    Target("sglang._version", "__version_tuple__"),
    Target("sglang.srt.plugins", "load_plugins"),
    Target("sglang.srt.plugins", "GENERAL_PLUGINS_GROUP"),
    # sizing (patched)
    Target(
        f"{_MEM}.kv_cache_configurator",
        "KVCacheConfigurator._profile_available_bytes",
        ("self", "pre_model_load_memory"),
    ),
    Target(f"{_MEM}.kv_cache_configurator", "TokenToKVPoolAllocator"),  # rebound: the allocators it builds
    Target(f"{_MEM}.kv_cache_configurator", "PagedTokenToKVPoolAllocator"),
    Target(
        f"{_MEM}.kv_cache_configurator",
        "KVCacheConfigurator._build_token_to_kv_pool_allocator",
        ("self", "sizes", "token_to_kv_pool", "is_dsv4_model", "req_to_token_pool", "token_to_kv_pool_allocator"),
    ),
    Target("sglang.srt.model_executor.model_runner", "ModelRunner.alloc_memory_pool", ("self", "memory_pool_config")),
    # KV buffers (patched; the attributes read are set by __init__ before _create_buffers runs)
    Target(
        f"{_MEM}.memory_pool",
        "MHATokenToKVPool.__init__",
        ("self", "size", "page_size", "dtype", "head_num", "head_dim", "layer_num", "device", "v_head_dim"),
    ),
    Target(f"{_MEM}.memory_pool", "MHATokenToKVPool._create_buffers", ("self",)),
    Target(f"{_MEM}.memory_pool", "MHATokenToKVPool._create_buffers_normal", ("self",)),
    Target(f"{_MEM}.memory_pool", "MHATokenToKVPool._kv_buffer_shapes", ("self",)),
    Target(
        f"{_MEM}.memory_pool",
        "MLATokenToKVPool.__init__",
        ("self", "size", "page_size", "dtype", "kv_lora_rank", "qk_rope_head_dim", "layer_num", "device", "use_dsa"),
    ),
    Target(f"{_MEM}.memory_pool", "MLATokenToKVPool._create_buffers", ("self",)),
    # allocator (subclassed; every method overridden or relied on)
    Target(
        f"{_MEM}.allocator.paged",
        "PagedTokenToKVPoolAllocator.__init__",
        ("self", "size", "page_size", "dtype", "device", "kvcache", "need_sort"),
    ),
    Target(f"{_MEM}.allocator.paged", "PagedTokenToKVPoolAllocator.clear", ("self",)),
    Target(f"{_MEM}.allocator.paged", "PagedTokenToKVPoolAllocator.available_size", ("self",)),
    Target(f"{_MEM}.allocator.paged", "PagedTokenToKVPoolAllocator.merge_and_sort_free", ("self",)),
    Target(f"{_MEM}.allocator.paged", "PagedTokenToKVPoolAllocator.alloc", ("self", "need_size")),
    Target(
        f"{_MEM}.allocator.paged",
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
        f"{_MEM}.allocator.paged",
        "PagedTokenToKVPoolAllocator.alloc_decode",
        ("self", "seq_lens", "seq_lens_cpu", "last_loc"),
    ),
    Target(f"{_MEM}.allocator.paged", "PagedTokenToKVPoolAllocator.free", ("self", "free_index")),
    Target(f"{_MEM}.allocator.paged", "PagedTokenToKVPoolAllocator.free_page_ids", ("self", "page_ids")),
    Target(f"{_MEM}.allocator.paged", "PagedTokenToKVPoolAllocator._release_page_ids", ("self", "page_ids")),
    Target(f"{_MEM}.allocator.paged", "PagedTokenToKVPoolAllocator.free_group_end", ("self",)),
    Target(f"{_MEM}.allocator.paged", "get_num_new_pages"),
    Target(
        f"{_MEM}.allocator.base",
        "BaseTokenToKVPoolAllocator.create_prefill_budget",
        ("self", "tree_cache", "num_mixed_decode_tokens"),
    ),
    Target(
        f"{_MEM}.allocator.base",
        "BaseTokenToKVPoolAllocator.check_decode_capacity",
        ("self", "num_tokens", "tree_cache", "requests", "spec_algorithm"),
    ),
    Target(
        f"{_MEM}.allocator.base",
        "BaseTokenToKVPoolAllocator.evict_to_free_tokens",
        ("self", "tree_cache", "num_tokens"),
    ),
    Target(f"{_MEM}.allocator.base", "BaseTokenToKVPoolAllocator.free_group_end", ("self",)),
    # admission (subclassed)
    Target(
        f"{_MEM}.prefill_budget",
        "PrefillBudget.__init__",
        ("self", "allocator", "tree_cache", "num_mixed_decode_tokens"),
    ),
    Target(
        f"{_MEM}.prefill_budget",
        "PrefillBudget.check_prefill",
        ("self", "extend_input_len", "total_tokens", "max_new_tokens", "input_tokens", "chunk_limit"),
    ),
    Target(
        f"{_MEM}.prefill_budget",
        "PrefillBudget.can_allocate_prefill",
        ("self", "paged_input", "extend_input_len", "max_new_tokens", "chunk_limit"),
    ),
    # radix cache (called)
    Target(f"{_MEM}.base_prefix_cache", "EvictParams"),
    Target(f"{_MEM}.unified_radix_cache", "UnifiedRadixCache.evictable_size", ("self",)),
    Target(f"{_MEM}.unified_radix_cache", "UnifiedRadixCache.evict", ("self", "params")),
    Target(f"{_MEM}.unified_radix_cache", "UnifiedRadixCache.evict_for_alloc", ("self", "params")),
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


# ============================================================================================ version & targets
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


def missing_targets() -> list[str]:
    return runtime_problems(TARGETS)


# ============================================================================================ this process
@dataclass
class _Process:
    """What one SGLang scheduler process has: the backend its pages live on, the forward stream."""

    backend: MemoryBackend
    settings: Settings
    forward_stream: Any = None


_proc: _Process | None = None
_instances: list[Instance] = []


def _process(device: str | torch.device) -> _Process:
    global _proc
    if _proc is None:
        settings = Settings.from_env()
        backend = backend_for(torch.device(device), settings, holder="this SGLang scheduler")
        _proc = _Process(backend, settings)
        lifecycle.on_exit(backend.close)  # closers run newest first: the instances go before their backend
    return _proc


def _streams(proc: _Process) -> list[int] | None:
    """CUDA streams whose queued work may read a page: with SGLang's overlap scheduler a forward is already
    queued on the runner's forward stream when the host frees a request's pages."""
    if proc.backend.name != "cuda":
        return None
    streams = [0, torch.cuda.current_stream().cuda_stream]
    fwd = getattr(proc.forward_stream, "cuda_stream", None)
    if fwd:
        streams.append(int(fwd))
    return streams


# ============================================================================================ sizing & buffers
def _wrap_profile_available_bytes(original: Callable[..., int]) -> Callable[..., int]:
    def _profile_available_bytes(self: Any, pre_model_load_memory: int) -> int:
        proc = _process(self.device)
        total = proc.backend.mem_info()[1]
        log.info(
            "elastikv: SGLang's KV pool sized from the device's %s (virtual capacity), not from free memory",
            format_bytes(total),
        )
        return int(total)

    return _profile_available_bytes


def _wrap_alloc_memory_pool(original: Callable[..., Any]) -> Callable[..., Any]:
    def alloc_memory_pool(self: Any, *args: Any, **kwargs: Any) -> Any:
        _process(self.device).forward_stream = getattr(self, "forward_stream", None)
        return original(self, *args, **kwargs)

    return alloc_memory_pool


def _refuse_custom_mem_pool(pool: Any) -> None:
    if getattr(pool, "enable_custom_mem_pool", False) or getattr(pool, "custom_mem_pool", None) is not None:
        raise UnsupportedEngine(
            "elastikv cannot back SGLang's custom KV memory pool (PD disaggregation transfer); run the "
            "disaggregated engines without ELASTIKV=1"
        )


def _open_pool_space(pool: Any, geometry: KVGeometry) -> slice:
    """Open the elastic space behind one SGLang KV pool; return the rows of each buffer SGLang sees.

    SGLang wants exactly size + page_size rows (its padded page 0, then pages 1..P), but a space has whole pages
    of blocks. So SGLang's page p is block p + offset, where offset pads the front: blocks 0..offset (SGLang's
    page 0 and the padding, within the space's first page) are the always-mapped null blocks, and the
    allocator's blocks are exactly SGLang's pages 1..P."""
    ps = int(pool.page_size)
    proc = _process(pool.device)
    pages = int(pool.size) // ps
    chunk = chunk_bytes_for(geometry, "per-layer", proc.backend.granularity, proc.settings.min_chunk_bytes)
    per_page = chunk // geometry.block_bytes
    total = -(-(pages + 1) // per_page) * per_page
    offset = total - (pages + 1)
    inst = open_instance(
        geometry,
        engine="sglang",
        backend=proc.backend,
        layout="per-layer",
        num_blocks=total,
        null_blocks=offset + 1,
        settings=proc.settings,
        streams=_streams(proc),
    )
    _instances.append(inst)
    pool._elastikv_offset = offset
    pool._elastikv = inst
    return slice(offset * ps, total * ps)


def _wrap_create_buffers_normal(original: Callable[..., None]) -> Callable[..., None]:
    """MHA: every layer's K and V are views of one per-layer space (two buffers a layer)."""

    def _create_buffers_normal(self: Any) -> None:
        layout = getattr(self, "kv_cache_layout", "nhd")
        if layout != "nhd" or getattr(self, "use_hnd", False):
            raise UnsupportedEngine(
                f"elastikv supports SGLang's default KV layout 'nhd', not {layout!r}; unset SGLANG_USE_HND_KVCACHE "
                "(or the option that chose it) or run without ELASTIKV=1"
            )
        _refuse_custom_mem_pool(self)
        k_shape, v_shape = self._kv_buffer_shapes()
        if k_shape != v_shape:
            raise UnsupportedEngine(
                f"elastikv needs K and V of the same shape in SGLang's pool, got {k_shape} and {v_shape}; run this "
                "model without ELASTIKV=1"
            )
        ps, heads, dim = int(self.page_size), int(self.head_num), int(self.head_dim)
        geometry = KVGeometry.for_attention(
            num_layers=int(self.layer_num), num_kv_heads=heads, head_dim=dim, block_size=ps, dtype=self.store_dtype
        )
        rows = _open_pool_space(self, geometry)
        space = self._elastikv.space
        self.k_buffer = [space.buffer(i, 0).view(-1, heads, dim)[rows] for i in range(int(self.layer_num))]
        self.v_buffer = [space.buffer(i, 1).view(-1, heads, dim)[rows] for i in range(int(self.layer_num))]

    return _create_buffers_normal


def _wrap_mla_create_buffers(original: Callable[..., None]) -> Callable[..., None]:
    """MLA: every layer's joint latent ``[rows, 1, kv_lora_rank + qk_rope_head_dim]`` is a view of one space
    (one buffer a layer). Subclasses with other buffers (DSA's indexer cache, the unified pool) keep SGLang's own
    and are refused when the allocator is built."""

    def _create_buffers(self: Any) -> None:
        if type(self).__name__ != "MLATokenToKVPool" or getattr(self, "use_dsa", False):
            original(self)
            return
        _refuse_custom_mem_pool(self)
        ps, dim = int(self.page_size), int(self.kv_cache_dim)
        geometry = KVGeometry(int(self.layer_num), (ps, 1, dim), self.store_dtype, buffers_per_layer=1)
        rows = _open_pool_space(self, geometry)
        space = self._elastikv.space
        self.kv_buffer = [space.buffer(i, 0).view(-1, 1, dim)[rows] for i in range(int(self.layer_num))]

    return _create_buffers


def _wrap_build_allocator(original: Callable[..., Any]) -> Callable[..., Any]:
    def _build_token_to_kv_pool_allocator(self: Any, **kwargs: Any) -> Any:
        allocator = original(self, **kwargs)
        pool = kwargs.get("token_to_kv_pool")
        if getattr(pool, "_elastikv", None) is not None and not isinstance(allocator, allocator_class()):
            raise UnsupportedEngine(
                f"SGLang chose the allocator {type(allocator).__name__} (a platform or configuration elastikv does "
                "not support), which would hand out pages elastikv never mapped; run without ELASTIKV=1"
            )
        return allocator

    return _build_token_to_kv_pool_allocator


# ============================================================================================ allocator
def _pool_instance(kvcache: Any) -> Instance:
    inst: Instance | None = getattr(kvcache, "_elastikv", None)
    if inst is None:
        raise UnsupportedEngine(
            f"ELASTIKV=1, but SGLang built its KV pool as {type(kvcache).__name__}, which elastikv does not back "
            "(it backs MHATokenToKVPool and MLATokenToKVPool: standard multi-head and multi-head latent attention; "
            "not DSA, hybrid SWA, Mamba or fp4 KV); run this model without ELASTIKV=1"
        )
    return inst


def _token_allocator(size: int, dtype: Any, device: Any, kvcache: Any, need_sort: bool) -> Any:
    """What the configurator gets for ``TokenToKVPoolAllocator(...)`` (page size 1)."""
    return allocator_class()(size, 1, dtype, device, kvcache, need_sort)


@functools.cache
def allocator_class() -> Any:
    """ElasticTokenAllocator, made once SGLang is importable (this module must import without it)."""
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator, get_num_new_pages
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams
    from sglang.srt.mem_cache.prefill_budget import PrefillBudget

    return _make_classes(PagedTokenToKVPoolAllocator, get_num_new_pages, EvictParams, PrefillBudget)[0]


def _make_classes(Paged: type, get_num_new_pages: Callable[..., int], EvictParams: type, PrefillBudget: type) -> Any:
    class ElasticPrefillBudget(PrefillBudget):  # type: ignore[misc,valid-type]
        """SGLang's prefill budget, securing each admitted request's pages as it is admitted.

        SGLang admits on ``available + evictable`` and then allocates; an allocation that fails after admission
        kills the server. So a request passes only if its new pages were just secured (mapped and booked for
        this engine), or can be taken from the evictable prefix cache, which SGLang evicts before it allocates.
        """

        def __init__(self, allocator: Any, tree_cache: Any, *, num_mixed_decode_tokens: int = 0) -> None:
            super().__init__(allocator, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)
            self._promised = 0  # pages of the requests admitted so far in this round

        def _secure_for(self, tokens: int) -> bool:
            alloc = self.allocator
            pages = -(-tokens // alloc.page_size) + 1  # the partial last page of the prefix may need a page more
            want = self._promised + pages
            if alloc.secure(want) or alloc.secured_pages + self.tree_cache.evictable_size() // alloc.page_size >= want:
                self._promised = want
                return True
            return False

        def check_prefill(self, **kwargs: Any) -> tuple[bool, int | None]:
            ok, limit = super().check_prefill(**kwargs)
            if not ok or self._secure_for(int(kwargs["extend_input_len"])):
                return ok, limit
            return False, None

        def can_allocate_prefill(self, **kwargs: Any) -> bool:
            ok = super().can_allocate_prefill(**kwargs)
            return bool(ok) and self._secure_for(int(kwargs["paged_input"]))

    class ElasticTokenAllocator(Paged):  # type: ignore[misc,valid-type]
        """SGLang's paged token allocator (any page size) over elastikv's :class:`BlockAllocator`.

        Who holds which page: the BlockAllocator holds every page nobody uses (mapped or not); ``_secured`` (and
        its device copy ``free_pages``, SGLang's own free list, which its allocation kernels read from the front)
        holds pages taken from the BlockAllocator for the allocations about to happen; ``_out`` holds the pages
        handed to SGLang (requests and the radix cache) until SGLang frees them. Page 0 is SGLang's padding page,
        elastikv's null block: never handed out.

        ``available_size()``: secured pages plus what the BlockAllocator could give within the limit, never more
        than SGLang's own capacity minus what it holds. Every allocation secures exactly the pages SGLang's
        kernel will take (the count is known on the host before it runs), so a refusal surfaces before any
        device work.
        """

        def __init__(self, size: int, page_size: int, dtype: Any, device: Any, kvcache: Any, need_sort: bool) -> None:
            inst = _pool_instance(kvcache)
            if need_sort:
                raise UnsupportedEngine(
                    "elastikv does not support SGLang's PD disaggregation (its allocator keeps sorted free lists); "
                    "run the disaggregated engines without ELASTIKV=1"
                )
            if page_size != int(kvcache.page_size):
                raise UnsupportedEngine(f"SGLang's allocator page size {page_size} differs from its pool's")
            self._inst = inst
            self._alloc = inst.allocator
            self._offset = int(kvcache._elastikv_offset)  # SGLang page p is the allocator's block p + offset
            self._secured: list[int] = []
            self._out: set[int] = set()
            self._tree: Any = None
            self._waiting_since: float | None = None
            page_bytes = inst.space.geometry.group_bytes
            settings = _proc.settings if _proc is not None else Settings.from_env()
            self._prefix_tokens = settings.prefix_cache.resolve(inst.backend.mem_info()[1]) // page_bytes * page_size
            super().__init__(size, page_size, dtype, device, kvcache, need_sort)
            if self._alloc.num_blocks < self.num_pages:
                raise UnsupportedEngine(
                    f"SGLang's pool has {self.num_pages} pages but its elastic cache {self._alloc.num_blocks}"
                )
            log.info(
                "elastikv active: engine=sglang %s pid=%d name=%s page=%d tokens virtual capacity=%s (%d tokens) "
                "limit=%s prefix cache bound=%s",
                version(),
                os.getpid(),
                inst.name,
                page_size,
                format_bytes(self._alloc.capacity_bytes),
                self.num_pages * page_size,
                format_bytes(self._alloc.limit),
                format_bytes(self._prefix_tokens // page_size * page_bytes),
            )

        # -- free list ------------------------------------------------------------------------------------
        @property
        def secured_pages(self) -> int:
            return len(self._secured)

        def _publish(self) -> None:
            self.free_pages = torch.tensor(self._secured, dtype=torch.int64, device=self.device)

        def secure(self, pages: int) -> bool:
            """Hold at least ``pages`` free pages for the allocations to come; False (nothing taken) if the
            limit, the device budget or the driver refuses."""
            want = pages - len(self._secured)
            if want <= 0:
                return True
            try:
                self._secured += [b - self._offset for b in self._alloc.allocate(want)]
            except AllocationRefused:
                return False
            except ElastikvError as exc:  # never let a failing map crash the engine: refuse, keep serving
                log.error("elastikv: securing %d pages failed: %s", want, exc)
                return False
            self._publish()
            return True

        def _secure_admitted(self, pages: int) -> bool:
            """Secure pages for an allocation SGLang already admitted: evict unused prefixes if the limit is
            reached, then wait (bounded) for another instance to give memory back."""
            if self.secure(pages):
                return True
            deadline = time.monotonic() + ALLOC_WAIT_S
            warned = False
            while True:
                short = pages - len(self._secured)
                if self._tree is not None and self._tree.evictable_size() > 0:
                    self._tree.evict(EvictParams(num_tokens=short * self.page_size))
                if self.secure(pages):
                    if warned:
                        log.warning("elastikv: room found; allocation of %d pages goes ahead", pages)
                    return True
                if time.monotonic() > deadline:
                    log.error(
                        "elastikv: SGLang admitted work needing %d more KV pages, and none came free within %.0f s "
                        "(limit %s; raise it with `elastikv limit`, or lower other models' limits)",
                        short,
                        ALLOC_WAIT_S,
                        format_bytes(self._alloc.limit),
                    )
                    return False
                if not warned:
                    log.warning("elastikv: waiting for %d KV pages (device budget or limit reached)", short)
                    warned = True
                time.sleep(0.005)

        def _handed_out(self, pages: int) -> None:
            taken, self._secured = self._secured[:pages], self._secured[pages:]
            self._out.update(taken)

        # -- SGLang's allocator interface ----------------------------------------------------------------
        def available_size(self) -> int:
            pages = len(self._secured) + self._alloc.available()
            return int(min(pages, self.num_pages - len(self._out)) * self.page_size)

        def withheld_tokens(self) -> int:
            """Tokens of SGLang's capacity that are neither free for it nor held by it: the limit's doing."""
            return int((self.num_pages - len(self._out)) * self.page_size) - self.available_size()

        def merge_and_sort_free(self) -> None:
            pass  # never staged: need_sort is refused

        def alloc(self, need_size: int) -> Any:
            pages = need_size // self.page_size
            if not self._secure_admitted(pages):
                return None
            out = super().alloc(need_size)
            if out is not None:
                self._handed_out(pages)
            return out

        def alloc_extend(
            self,
            prefix_lens: Any,
            prefix_lens_cpu: Any,
            seq_lens: Any,
            seq_lens_cpu: Any,
            last_loc: Any,
            extend_num_tokens: int,
            num_new_pages: int | None = None,
        ) -> Any:
            if num_new_pages is None:
                num_new_pages = int(
                    get_num_new_pages(seq_lens=seq_lens_cpu, page_size=self.page_size, prefix_lens=prefix_lens_cpu)
                )
            if not self._secure_admitted(num_new_pages):
                return None
            out = super().alloc_extend(
                prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens, num_new_pages
            )
            if out is not None:
                self._handed_out(num_new_pages)
            return out

        def alloc_decode(self, seq_lens: Any, seq_lens_cpu: Any, last_loc: Any) -> Any:
            pages = int(get_num_new_pages(seq_lens=seq_lens_cpu, page_size=self.page_size, decode=True))
            if not self._secure_admitted(pages):
                return None
            out = super().alloc_decode(seq_lens, seq_lens_cpu, last_loc)
            if out is not None:
                self._handed_out(pages)
            return out

        def _release_page_ids(self, *page_ids: Any) -> None:
            # Every free (free, free_segment, free_page_ids, a free group's end) ends here.
            ids = [int(p) for t in page_ids for p in t.reshape(-1).tolist()]
            if not ids:
                return
            unknown = [p for p in ids if p not in self._out]
            if unknown:
                raise ElastikvError(f"SGLang freed KV pages it does not hold: {unknown[:8]}")
            self._out.difference_update(ids)
            self._give_back(ids)

        def _give_back(self, pages: list[int]) -> None:
            self._alloc.free([p + self._offset for p in pages])

        def clear(self) -> None:
            # At construction (nothing held yet), on flush_cache and on release_memory_occupation: everything
            # is free, so every page goes back and the reserve with it.
            held = list(self._out) + self._secured
            self._out = set()
            self._secured = []
            self._publish()
            self.free_group = None
            self.free_page_ids_group: list[Any] = []
            self.staged_pages: list[Any] = []
            self.num_staged_pages = 0
            if held:
                self._give_back(held)
            self._alloc.idle()

        # -- capacity hooks ------------------------------------------------------------------------------
        def create_prefill_budget(self, tree_cache: Any, *, num_mixed_decode_tokens: int = 0) -> Any:
            self._tree = tree_cache
            self.bound_prefix_cache()
            return ElasticPrefillBudget(self, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)

        def evict_to_free_tokens(self, tree_cache: Any, num_tokens: int) -> Any:
            self._tree = tree_cache
            return super().evict_to_free_tokens(tree_cache, num_tokens)

        def check_decode_capacity(
            self, *, num_tokens: int, tree_cache: Any, requests: Any = None, spec_algorithm: Any = None
        ) -> bool:
            # SGLang asks for exactly the next step's new pages (page_size tokens each). False retracts requests.
            self._tree = tree_cache
            self.evict_to_free_tokens(tree_cache, num_tokens)
            pages = -(-num_tokens // self.page_size)
            if self.secure(pages):
                return True
            short = pages - len(self._secured)
            if tree_cache is not None and tree_cache.evictable_size() > 0:
                tree_cache.evict(EvictParams(num_tokens=short * self.page_size))
            return bool(self.secure(pages))

        # -- elastic housekeeping ------------------------------------------------------------------------
        def bound_prefix_cache(self) -> None:
            """Evict unused cached prefixes beyond ``ELASTIKV_PREFIX_CACHE``, so their pages go back."""
            tree = self._tree
            if tree is None:
                return
            over = int(tree.evictable_size()) - self._prefix_tokens
            if over > 0:
                tree.evict(EvictParams(num_tokens=over))

        def on_idle(self, fully_idle: bool) -> None:
            self.bound_prefix_cache()
            if fully_idle and self._secured:
                spare, self._secured = self._secured, []
                self._publish()
                self._give_back(spare)

    return ElasticTokenAllocator, ElasticPrefillBudget


# ============================================================================================ scheduler hooks
def _wrap_on_idle(original: Callable[..., Any]) -> Callable[..., Any]:
    def on_idle(self: Any) -> Any:
        alloc = getattr(self, "token_to_kv_pool_allocator", None)
        if isinstance(alloc, allocator_class()):
            alloc._tree = getattr(self, "tree_cache", alloc._tree)
            alloc.on_idle(bool(self.is_fully_idle()))
        return original(self)

    return on_idle


def _wrap_check_full_pool(original: Callable[..., Any]) -> Callable[..., Any]:
    def _check_full_pool(self: Any, ps: Any, uncached: int = 0) -> Any:
        alloc = getattr(self, "token_to_kv_pool_allocator", None)
        if isinstance(alloc, allocator_class()):
            uncached += alloc.withheld_tokens()  # not leaked: withheld by the limit
        return original(self, ps, uncached=uncached)

    return _check_full_pool


# ============================================================================================ apply
_originals: dict[str, Any] = {}
_lock = threading.Lock()


def _patch(module: str, qualname: str, make: Callable[[Any], Any]) -> None:
    key = f"{module}.{qualname}"
    if key in _originals:
        return
    owner: Any = importlib.import_module(module)
    *path, attr = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    current = getattr(owner, attr)
    _originals[key] = current
    wrapped = make(current)
    if inspect.isfunction(wrapped) and getattr(wrapped, "__wrapped__", None) is None:
        wrapped.__wrapped__ = current  # type: ignore[attr-defined]
    setattr(owner, attr, wrapped)


def apply() -> None:
    """Patch this process's SGLang. Idempotent; refuses, with the reason, an unsupported version or an SGLang
    whose patch targets moved. Cheap in processes that never build a KV pool (HTTP server, detokenizer)."""
    with _lock:
        if _originals:
            return
        text = version()
        check_version(text)
        problems = missing_targets()
        if problems:
            raise UnsupportedEngine(
                f"SGLang {text} lacks what elastikv patches:\n  " + "\n  ".join(problems) + "\nelastikv supports "
                f"SGLang {', '.join(SUPPORTED)}; run without ELASTIKV=1 or report this."
            )
        conf = f"{_MEM}.kv_cache_configurator"
        _patch(conf, "KVCacheConfigurator._profile_available_bytes", _wrap_profile_available_bytes)
        _patch(conf, "PagedTokenToKVPoolAllocator", lambda _orig: allocator_class())
        _patch(conf, "TokenToKVPoolAllocator", lambda _orig: _token_allocator)
        _patch(conf, "KVCacheConfigurator._build_token_to_kv_pool_allocator", _wrap_build_allocator)
        _patch(f"{_MEM}.memory_pool", "MHATokenToKVPool._create_buffers_normal", _wrap_create_buffers_normal)
        _patch(f"{_MEM}.memory_pool", "MLATokenToKVPool._create_buffers", _wrap_mla_create_buffers)
        _patch("sglang.srt.model_executor.model_runner", "ModelRunner.alloc_memory_pool", _wrap_alloc_memory_pool)
        _patch("sglang.srt.managers.scheduler", "Scheduler.on_idle", _wrap_on_idle)
        _patch(
            "sglang.srt.managers.scheduler_components.invariant_checker",
            "SchedulerInvariantChecker._check_full_pool",
            _wrap_check_full_pool,
        )
        log.info("elastikv: SGLang %s patched in process %d (elastic KV cache)", text, os.getpid())


def patched() -> bool:
    return bool(_originals)


def instances() -> list[Instance]:
    """The elastic KV caches opened in this process (one per KV pool SGLang built here)."""
    return list(_instances)
