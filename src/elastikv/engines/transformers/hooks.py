"""transformers adapter, the hooks: what :func:`install` patches in continuous batching (transformers 5.17).

``continuous_api.PagedAttentionCache`` becomes ``ElasticCache`` (``cache.py``); four methods are wrapped, each
doing nothing new unless the batch's cache is elastic:

- ``ContinuousBatchProcessor.prepare_next_batch``: when nothing can be scheduled and nothing can be preempted,
  transformers would fail every request; with an elastic cache the batch waits instead;
- ``ContinuousBatchingIOs._setup_static_tensors``: IO buffers sized from the read budget, not the virtual size;
- ``OffloadingManager.offload_requests``: running requests wait up to :data:`PATIENCE_S` for memory other
  instances hold before one is preempted;
- ``Scheduler.add_waiting_request``: a request that can never fit the limit fails alone, with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from elastikv.config import format_bytes
from elastikv.engines.transformers.cache import NULL_BLOCKS, cache_class
from elastikv.errors import LimitExceeded

PATIENCE_S = 2.0  # how long running requests wait for memory held by other instances before one is preempted
NOTHING_SCHEDULABLE = "No requests can be scheduled and no requests can be offloaded."  # transformers 5.17


def install() -> None:
    """Patch transformers' continuous batching in this process (once: :func:`~elastikv.engines.transformers.enable`
    holds the lock and remembers that it did)."""
    from transformers.generation.continuous_batching import (
        continuous_api,
        input_outputs,
        offloading_manager,
        scheduler,
    )

    continuous_api.PagedAttentionCache = cache_class()  # type: ignore[attr-defined,assignment]
    _wrap(continuous_api.ContinuousBatchProcessor, "prepare_next_batch", _wrap_prepare_next_batch)
    _wrap(input_outputs.ContinuousBatchingIOs, "_setup_static_tensors", _wrap_setup_static_tensors)
    _wrap(offloading_manager.OffloadingManager, "offload_requests", _wrap_offload_requests)
    _wrap(scheduler.Scheduler, "add_waiting_request", _wrap_add_waiting_request)


def _wrap(owner: type, attr: str, make: Callable[[Any], Any]) -> None:
    original = getattr(owner, attr)
    wrapped = make(original)
    wrapped.__wrapped__ = original
    setattr(owner, attr, wrapped)


def _is_elastic(cache: Any) -> bool:
    return getattr(cache, "elastic", None) is not None


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
            block_bytes = alloc.block_bytes
            can = min(alloc.limit // block_bytes - NULL_BLOCKS, alloc.num_blocks)
            if need > can:
                raise LimitExceeded(
                    f"request {state.request_id} needs {need} blocks ({tokens} tokens: its prompt plus "
                    f"max_new_tokens) but the KV limit holds {can} ({format_bytes(alloc.limit)}); "
                    "raise the limit (ELASTIKV_LIMIT, elastikv limit NAME SIZE) or ask for fewer tokens",
                    requested=need,
                    available=can,
                )
            # Within the limit, but more than the device budget could ever give this engine (its weights or
            # others' booked in it): it would wait for memory that never comes, so it fails now, saying why. What
            # the engine has mapped is always within that room, so the ledger is read only for a larger request.
            if need > alloc.stats().mapped_bytes // block_bytes - NULL_BLOCKS:
                room = cache.elastic.room_blocks()  # None: the ledger could not be read now; no check then
                if room is not None and need > room - NULL_BLOCKS:
                    raise LimitExceeded(
                        f"request {state.request_id} needs {need} blocks ({tokens} tokens: its prompt plus "
                        f"max_new_tokens) but the device budget can never give this engine more than "
                        f"{room - NULL_BLOCKS} ({format_bytes(room * block_bytes)} of KV: the budget less what "
                        "engines hold besides KV and the others' reserves; elastikv status shows them); raise "
                        "ELASTIKV_DEVICE_BUDGET, keep weights out of it (ELASTIKV_BOOK_WEIGHTS=off) or ask for "
                        "fewer tokens",
                        requested=need,
                        available=max(0, room - NULL_BLOCKS),
                    )
        original(self, state)

    return add_waiting_request


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
