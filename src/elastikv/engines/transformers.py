"""transformers adapter: continuous batching's paged KV cache over elastikv (transformers 5.17).

:func:`enable` installs, in this process, three subclasses into transformers' continuous batching, without
changing its files; every model that then starts continuous batching (``generate_batch``,
``init_continuous_batching``) gets an elastic cache:

``ElasticCache`` (replaces ``PagedAttentionCache`` where ``continuous_api`` builds it)
    Built small by transformers (one block), then re-pointed at one :class:`~elastikv.space.KVSpace` of the
    device's virtual size. Layout: token-interleaved, ``[blocks * block_size, layers, 2 (K, V), heads,
    head_dim]``, so a block is one contiguous range (one chunk maps a page of every layer) and each layer's K and V
    are affine ``[slots, heads, head_dim]`` views, as transformers' kernels index them (by slot, on dim 0).
    Blocks 0 and 1 are the always-mapped null blocks, used as transformers' read trash (zeros, for padding reads)
    and write trash. ``num_pages`` is the per-batch KV read budget (``max_kv_tokens``), not the virtual size,
    so that the attention mask of the sdpa/eager paths stays small.
``ElasticBlockManager`` (the cache's ``_block_manager``)
    Block ids from the :class:`~elastikv.allocator.BlockAllocator`; a refusal is ``None`` ("not now").
``prepare_next_batch`` and ``_setup_static_tensors``, wrapped
    When nothing can be scheduled and transformers has nothing left to preempt, it would raise and fail every
    request; with an elastic cache the batch waits instead (memory held by other instances comes back). Its IO
    buffers are sized from the read budget.

Memory bound: a request whose prompt and output can never fit the limit fails alone, with the reason, when it
is submitted, instead of waiting forever. Prefix sharing (transformers' own, on for full-attention models) is
kept: blocks of cached prefixes stay mapped up to ``ELASTIKV_PREFIX_CACHE``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from elastikv.config import Settings, format_bytes
from elastikv.errors import AllocationRefused, LimitExceeded, UnsupportedEngine
from elastikv.instance import Instance, open_instance
from elastikv.space import KVGeometry

log = logging.getLogger("elastikv")

SUPPORTED: tuple[tuple[int, int], ...] = ((5, 17),)
NULL_BLOCKS = 2  # read trash (zeros) and write trash


@dataclass
class Options:
    """What :func:`enable` was given; read by every ElasticCache built afterwards in this process."""

    name: str | None = None
    settings: Settings | None = None
    max_kv_tokens: int = 16384  # KV slots one batch may read (bounds the sdpa/eager attention mask)


_options = Options()
_caches: list[Any] = []  # every ElasticCache built in this process, newest last (the engine reads its instance)
_lock = threading.Lock()
_enabled = False


def version() -> tuple[str, tuple[int, ...]]:
    import transformers

    text = str(transformers.__version__)
    parts: list[int] = []
    for p in text.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return text, tuple(parts)


def check_version(text: str, tup: tuple[int, ...]) -> None:
    if tuple(tup[:2]) not in SUPPORTED:
        supported = ", ".join(f"{a}.{b}" for a, b in SUPPORTED)
        raise UnsupportedEngine(
            f"elastikv's transformers engine supports transformers {supported}; this is {text}. "
            "Install it: pip install 'transformers>=5.17,<5.18' (5.18+ lays its paged cache out anew)."
        )


def enable(*, name: str | None = None, settings: Settings | None = None, max_kv_tokens: int = 16384) -> None:
    """Make continuous batching in this process elastic. Idempotent; the options apply to caches built later."""
    global _enabled
    text, tup = version()
    check_version(text, tup)
    with _lock:
        _options.name, _options.settings, _options.max_kv_tokens = name, settings, max_kv_tokens
        if _enabled:
            return
        from transformers.generation.continuous_batching import (
            continuous_api,
            input_outputs,
            offloading_manager,
            scheduler,
        )

        continuous_api.PagedAttentionCache = _cache_class()  # type: ignore[attr-defined]
        _wrap(continuous_api.ContinuousBatchProcessor, "prepare_next_batch", _wrap_prepare_next_batch)
        _wrap(input_outputs.ContinuousBatchingIOs, "_setup_static_tensors", _wrap_setup_static_tensors)
        _wrap(offloading_manager.OffloadingManager, "offload_requests", _wrap_offload_requests)
        _wrap(scheduler.Scheduler, "add_waiting_request", _wrap_add_waiting_request)
        _enabled = True
    log.info("elastikv: transformers %s continuous batching patched (elastic KV cache)", text)


def _wrap(owner: type, attr: str, make: Callable[[Any], Any]) -> None:
    original = getattr(owner, attr)
    wrapped = make(original)
    wrapped.__wrapped__ = original
    setattr(owner, attr, wrapped)


def _is_elastic(cache: Any) -> bool:
    return getattr(cache, "elastic", None) is not None


PATIENCE_S = 2.0  # how long running requests wait for memory held by other instances before one is preempted


def _wrap_offload_requests(original: Callable[..., int]) -> Callable[..., int]:
    def offload_requests(self: Any) -> int:
        cache: Any = getattr(self, "cache", None)
        if not _is_elastic(cache):
            return original(self)
        # Below its own limit, a cache that cannot grow is waiting for memory other instances hold: its running
        # requests keep their blocks and wait (no recompute), for up to PATIENCE_S; then transformers preempts
        # as usual, so that two instances each waiting on the other cannot wait forever. "Nothing offloaded"
        # makes transformers give up on the batch (see _wrap_prepare_next_batch: it waits instead).
        alloc = cache.elastic.allocator
        now = time.monotonic()
        if alloc.limit - alloc.stats().mapped_bytes >= alloc.page_bytes:
            if cache.starved_since is None:
                cache.starved_since = now
            if now - cache.starved_since < PATIENCE_S:
                return 0
        cache.starved_since = None
        return original(self)  # type: ignore[no-any-return]

    return offload_requests


def _wrap_add_waiting_request(original: Callable[..., None]) -> Callable[..., None]:
    def add_waiting_request(self: Any, state: Any) -> None:
        cache = self.cache
        if _is_elastic(cache) and state.max_new_tokens is not None:
            # transformers fails just this request with the error (continuous_api's new-request path)
            alloc, bs = cache.elastic.allocator, cache.block_size
            tokens = len(state.initial_tokens) + int(state.max_new_tokens)
            need = -(-tokens // bs)
            can = min(alloc.limit // (alloc.page_bytes // alloc.blocks_per_page) - NULL_BLOCKS, alloc.num_blocks)
            if need > can:
                raise LimitExceeded(
                    f"request {state.request_id} needs {need} blocks ({tokens} tokens: its prompt plus "
                    f"max_new_tokens) but the KV limit holds {can} ({format_bytes(alloc.limit)}); "
                    "raise the limit (ELASTIKV_LIMIT, elastikv limit NAME SIZE) or ask for fewer tokens",
                    requested=need,
                    available=can,
                )
        original(self, state)

    return add_waiting_request


NOTHING_SCHEDULABLE = "No requests can be scheduled and no requests can be offloaded."  # transformers 5.17


def _wrap_prepare_next_batch(original: Callable[..., bool]) -> Callable[..., bool]:
    def prepare_next_batch(self: Any) -> bool:
        try:
            ready = original(self)
            if ready and not self.scheduler.starved_requests:
                self.cache.starved_since = None  # everyone got their blocks: the next wait starts afresh
            return ready
        except RuntimeError as exc:
            # transformers fails every request here; with an elastic cache the memory is held by other
            # instances (or comes back when trimmed): wait and schedule again. Nothing was scheduled.
            if not _is_elastic(self.cache) or str(exc) != NOTHING_SCHEDULABLE:
                raise
            self.cache.waits += 1
            return False  # the loop waits 0.1 s (or for a new request) and schedules again

    return prepare_next_batch


class _BudgetView:
    """The cache as the IO buffers should size themselves: ``num_pages`` (the read budget) slots, not the
    virtual capacity."""

    def __init__(self, cache: Any) -> None:
        self._cache = cache
        self.num_blocks = cache.num_pages // cache.block_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


def _wrap_setup_static_tensors(original: Callable[..., None]) -> Callable[..., None]:
    def _setup_static_tensors(self: Any, *args: Any, **kwargs: Any) -> None:
        cache = self.cache
        if not _is_elastic(cache):
            return original(self, *args, **kwargs)
        self.cache = _BudgetView(cache)
        try:
            original(self, *args, **kwargs)
        finally:
            self.cache = cache
        return None

    return _setup_static_tensors


@functools.cache
def _cache_class() -> Any:
    """ElasticCache, made once transformers is importable (this module must import without it)."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
    from transformers.generation.continuous_batching.cache_manager import BlockManager

    return _make_classes(PagedAttentionCache, BlockManager)


def _make_classes(PagedAttentionCache: type, BlockManager: type) -> Any:
    class ElasticBlockManager(BlockManager):  # type: ignore[misc,valid-type]
        """transformers' block manager, its free blocks being elastikv's allocator.

        transformers keeps three kinds of block: in use (referenced by requests), *initialized* (free but holding
        a complete block of a cached prefix, in ``_init_block_ids``) and *uninitialized* (free, no data, in
        ``_uninit_block_ids``). Here the uninitialized ones are the allocator's (``_AllocatorQueue``): taking one
        allocates it, giving one back frees it (its page is unmapped once empty). Initialized blocks stay
        allocated, so mapped, up to ``cached_limit`` blocks; beyond that the ones whose eviction empties a page
        go first (:meth:`_bound_cache`), so memory really returns.
        """

        def __init__(self, instance: Instance, block_size: int, cached_limit: int) -> None:
            super().__init__(0, block_size, tp_on=False)
            self.alloc = instance.allocator
            self.num_blocks = instance.space.num_blocks
            self.cached_limit = cached_limit
            self._uninit_block_ids = _AllocatorQueue(self.alloc)

        def get_free_blocks(
            self, n_blocks: int, last_block_id: int | None, shareable: bool, group_id: int
        ) -> list[int] | None:
            if not self.has_enough_free_blocks(n_blocks):  # may turn cached blocks back into free ones
                return None
            if not self._uninit_block_ids.take(n_blocks):  # all or nothing, before transformers pops them
                return None
            return super().get_free_blocks(n_blocks, last_block_id, shareable, group_id)  # type: ignore[no-any-return]

        def free_blocks(self, blocks: list[int], shareable: bool) -> None:
            super().free_blocks(blocks, shareable)
            self._bound_cache()

        def _bound_cache(self) -> None:
            over = len(self._init_block_ids) - self.cached_limit
            if over <= 0:
                return
            order = self.alloc.eviction_order(self._init_block_ids)  # oldest first, page-emptying before
            for block_id in order[:over]:
                del self._init_block_ids[block_id]
                block = self._id_to_block.pop(block_id)
                self._hash_to_id.pop(block.hash, None)
                self._uninit_block_ids.append(block_id)

    class _AllocatorQueue:
        """Stands in for the block manager's deque of uninitialized blocks, over the allocator."""

        def __init__(self, alloc: Any) -> None:
            self.alloc = alloc
            self._taken: list[int] = []  # allocated by take(), popped next by transformers

        def take(self, n: int) -> bool:
            need = n - len(self._taken)
            if need > 0:
                try:
                    self._taken += self.alloc.allocate(need)
                except AllocationRefused:
                    return False
            return True

        def __len__(self) -> int:
            return len(self._taken) + int(self.alloc.available())

        def popleft(self) -> int:
            if not self._taken and not self.take(1):
                raise AllocationRefused("no block to hand out")
            return self._taken.pop(0)

        def append(self, block_id: int) -> None:
            self.alloc.free([block_id])

        def extend(self, block_ids: Any) -> None:
            ids = list(block_ids)
            if ids:
                self.alloc.free(ids)

        def clear(self) -> None:
            if self._taken:
                self.alloc.free(self._taken)
                self._taken = []

    class ElasticCache(PagedAttentionCache):  # type: ignore[misc,valid-type]
        """transformers' paged cache over an elastikv KVSpace (see the module docstring)."""

        def __init__(
            self,
            config: Any,
            continuous_batching_config: Any,
            device: Any,
            distributed_helper: Any,
            tp_plan: Any,
            dtype: torch.dtype = torch.float16,
        ) -> None:
            cb = continuous_batching_config
            if distributed_helper.tp_size > 1:
                raise UnsupportedEngine("elastikv's transformers engine runs on one device (no tensor parallelism)")
            cb.safety_margin = 0.0  # a margin of the *virtual* size would throttle every prefill
            if cb.max_batch_tokens is None:
                cb.max_batch_tokens = 256
            asked = cb.num_blocks
            cb.num_blocks = 1  # transformers builds a one-block cache; it is re-pointed below
            try:
                super().__init__(config, cb, device, distributed_helper, tp_plan, dtype)
            finally:
                cb.num_blocks = asked
            if self.num_groups != 1 or self.num_sliding_attention_groups:
                raise UnsupportedEngine(
                    "elastikv's transformers engine handles models whose layers are all full attention; "
                    "this one has sliding-window layers"
                )
            bs, heads, dim, layers = self.block_size, self.num_key_value_heads, self.head_dim, len(self.key_cache)  # type: ignore[has-type]
            geometry = KVGeometry(1, (bs, layers, 2, heads, dim), dtype, buffers_per_layer=1)
            torch_device = torch.device(device)
            for old in _caches:  # a finished session's cache (generate_batch makes one per call): give it back
                old.elastic.close()
            _caches.clear()
            settings = _options.settings or Settings.from_env()
            if torch_device.type == "cpu" and settings.backend == "auto":
                from dataclasses import replace

                settings = replace(settings, backend="host")
            self.elastic: Instance = _open_when_room(
                lambda: open_instance(
                    geometry,
                    engine="transformers",
                    name=_options.name,
                    settings=settings,
                    layout="interleaved",
                    num_blocks=asked,
                    null_blocks=NULL_BLOCKS,
                )
            )
            space = self.elastic.space
            n = space.num_blocks
            slots = space.raw.view(dtype).view(n * bs, layers, 2, heads, dim)
            self.key_cache = [slots[:, j, 0] for j in range(layers)]
            self.value_cache = [slots[:, j, 1] for j in range(layers)]
            for t in (*self.key_cache, *self.value_cache):
                torch._dynamo.mark_static_address(t)
            space.raw[: NULL_BLOCKS * space.geometry.group_bytes].zero_()  # the read trash must read zeros
            self.num_blocks = n
            self.num_pages = max(_options.max_kv_tokens, cb.max_batch_tokens)  # the per-batch read budget
            self.cache_shape = tuple(self.key_cache[0].shape)
            self.read_trash_index = 0
            self.sentinel_index = 1
            self.write_trash_index = bs  # block 1
            block_bytes = space.geometry.group_bytes
            cached = settings.prefix_cache.resolve(self.elastic.ledger.total_bytes) // block_bytes
            self._block_manager = ElasticBlockManager(self.elastic, bs, cached_limit=cached)
            self.waits = 0
            self.starved_since: float | None = None  # when running requests began to wait for memory
            _caches.append(self)

        def allocate_blocks(self, n_blocks: int, request_id: str, allocated_blocks: int) -> int | None:
            """As transformers', but a refusal after its free-count check (the device budget or the driver said
            no in between) is "not now" (None), not an error that fails every request. One layer group only
            (checked at start), so there is no partial allocation to undo."""
            if not self.will_allocation_be_successful(n_blocks, allocated_blocks):
                return None
            got = self.group_cache_managers[0].allocate_blocks(n_blocks, request_id, self._block_manager)
            return None if got is None else int(got)

    return ElasticCache


OPEN_RETRY_S = 0.25


def _open_when_room(open_: Callable[[], Instance]) -> Instance:
    """Open the cache's instance, waiting while the device budget has no room even for its null blocks (other
    instances hold it all). This runs on transformers' batching thread: requests queue meanwhile, none is lost;
    raising instead would end that thread and drop every request."""
    waited_since = None
    while True:
        try:
            inst = open_()
        except AllocationRefused as exc:
            if waited_since is None:
                waited_since = time.monotonic()
                log.warning("elastikv: waiting for memory to open the KV cache: %s", exc)
            time.sleep(OPEN_RETRY_S)
            continue
        if waited_since is not None:
            log.info("elastikv: KV cache opened after waiting %.1f s for memory", time.monotonic() - waited_since)
        return inst


def latest_instance() -> Instance | None:
    """The elastic instance of the newest cache built in this process (the embedded engine has one)."""
    return _caches[-1].elastic if _caches else None


def caches() -> tuple[Any, ...]:
    """Every elastic cache built in this process and not yet closed, newest last."""
    return tuple(_caches)


def close_caches() -> None:
    """Close every elastic cache of this process (unmap every page, leave the ledger): its engine has stopped."""
    for cache in _caches:
        cache.elastic.close()
    _caches.clear()


def patched() -> bool:
    return _enabled
