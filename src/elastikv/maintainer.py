"""Maintainer: the background half of :class:`~elastikv.allocator.BlockAllocator` (a base class of it).

A thread wakes every ``tick`` (or at once on a limit change, ``idle`` or ``close``) and makes one pass: it updates
the reserve target from recent demand (``reserve.py``), publishes the allocator's figures to its budget (the
ledger), maps pages toward the target, and unmaps empty pages beyond it (after ``trim_delay``) or beyond a lowered
limit (at once). Unmapping is fenced (allocator invariant 5): the empty pages are chosen, a fence is recorded and
waited for, and only pages that did not empty again after it are unmapped. A failure here never stops the engine:
a failed sync is logged and retried, a failed unmap quarantines the page (LOST) with its bytes still booked.

The attributes below are the allocator's (set in its ``__init__``); they are declared here so that this half
type-checks on its own. Everything runs under the allocator's ``_lock`` except the driver calls and the fence wait.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from typing import TYPE_CHECKING

from elastikv.config import format_bytes
from elastikv.errors import AllocationRefused
from elastikv.free_pool import LOST, MAPPING, UNMAPPED, UNMAPPING, FreePool

if TYPE_CHECKING:
    from elastikv.allocator import AllocatorStats
    from elastikv.budget import Budget
    from elastikv.reserve import ReservePolicy
    from elastikv.space import Pages

log = logging.getLogger("elastikv.allocator")


class Maintainer:
    space: Pages
    page_bytes: int
    blocks_per_page: int
    _lock: threading.Lock
    _wake: threading.Event
    _tick: float
    _closed: bool
    _idle: bool
    _budget: Budget
    _policy: ReservePolicy
    _target: int
    _pool: FreePool
    _state: bytearray
    _unmapped: list[int]
    _mapping: int
    _unmapping: int
    _callers_mapping: int
    _mapped_pages: int
    _pages_unmapped_total: int
    _epoch: int
    _trim_delay: float
    _surplus_since: float | None
    _seconds: dict[str, float]
    _last_sync_error: float

    # the allocator's (its hot-path half), used here
    def _notify(self) -> None:
        raise NotImplementedError

    def _in_use_locked(self) -> int:
        raise NotImplementedError

    def stats(self) -> AllocatorStats:
        raise NotImplementedError

    def _map_pages(self, pages: list[int], *, by_caller: bool, take: int = 0) -> list[int] | None:
        raise NotImplementedError

    def _run(self) -> None:
        # The maintainer sleeps on its own event, not on _cond: _cond is notified at every page mapped, and
        # waking the maintainer that often would have it compete for the GIL with the caller it serves.
        while not self._closed:
            self._wake.wait(self._tick)
            self._wake.clear()
            if self._closed:
                return
            try:
                self.maintain()
            except Exception:  # never let the maintainer die: the engine keeps working without it
                log.exception("elastikv maintainer pass failed; retrying")
                time.sleep(self._tick)

    def maintain(self, now: float | None = None) -> None:
        """One maintenance pass: update the reserve target, map toward it, unmap surplus empty pages."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._policy.observe(now, self._in_use_locked())
            self._target = 0 if self._idle else self._policy.target_blocks()
        try:
            self._budget.sync(self.stats())  # a shared budget publishes our figures and reads live limits
        except Exception as exc:  # the ledger failed: refill and trim still run (memory still goes back)
            self._sync_failed(exc)
        self._refill()
        self._trim(now)

    def _sync_failed(self, exc: Exception) -> None:
        """Log a failed budget sync at most every 30 s (the maintainer retries every tick)."""
        now = time.monotonic()
        if now - self._last_sync_error >= 30.0:
            self._last_sync_error = now
            log.warning("elastikv: publishing to the ledger failed (%s: %s); retrying", type(exc).__name__, exc)

    def _refill(self) -> None:
        bpp = self.blocks_per_page
        while True:
            with self._lock:
                if self._closed or not self._unmapped or self._callers_mapping:
                    return  # a caller mapping for itself is served directly: don't contend for the driver
                if self._pool.total + self._mapping * bpp >= self._target:
                    return
                if self._budget.booked + self.page_bytes > self._budget.limit:
                    return
                page = heapq.heappop(self._unmapped)
                self._state[page] = MAPPING
                self._mapping += 1
            try:
                self._map_pages([page], by_caller=False)
            except AllocationRefused:
                return  # the limit or the device is full: the reserve stays as it is

    def _trim(self, now: float) -> None:
        """Unmap empty pages beyond the reserve target (after ``trim_delay``), or beyond the limit (at once)."""
        bpp = self.blocks_per_page
        with self._lock:
            empty = self._pool.empty
            over_bytes = self._budget.booked - self._budget.limit
            surplus = min(len(empty), max(0, (self._pool.total - self._target) // bpp))
            if surplus and self._surplus_since is None:
                self._surplus_since = now
            elif not surplus:
                self._surplus_since = None
            if self._surplus_since is not None and now - self._surplus_since < self._trim_delay and not self._idle:
                surplus = 0
            count = max(surplus, min(len(empty), math.ceil(over_bytes / self.page_bytes)) if over_bytes > 0 else 0)
            if not count:
                return
            candidates = list(empty)[:count]  # the longest-empty pages
            epoch = self._epoch
            self._epoch += 1
        t0 = time.perf_counter()
        fence = self.space.fence()
        fence.wait()
        with self._lock:
            self._seconds["unmap"] += time.perf_counter() - t0
            over_bytes = self._budget.booked - self._budget.limit
            chosen: list[int] = []
            empty = self._pool.empty
            for p in candidates:
                if p not in empty or self._pool.freed_epoch[p] > epoch:
                    continue  # reused, or emptied again after the fence was recorded
                keeps_target = self._pool.total - bpp >= self._target
                if not keeps_target and over_bytes <= 0:
                    break
                self._pool.remove_empty(p)
                self._state[p] = UNMAPPING
                self._mapped_pages -= 1
                over_bytes -= self.page_bytes
                chosen.append(p)
            self._unmapping += len(chosen)
            if chosen:
                self._surplus_since = None
        self._unmap_pages(chosen)

    def _unmap_pages(self, pages: list[int]) -> None:
        """Unmap ``pages`` (already UNMAPPING, fenced), handing their bytes back as they land, a group at a time:
        a large trim (gigabytes of per-layer pages take a second) frees memory for others from its first page,
        and ``stats`` shows it falling, not stepping down at the end."""
        group = max(1, min(8, len(pages) // 8))  # pages per budget release: at most ~9 ledger transactions
        for start in range(0, len(pages), group):
            batch = pages[start : start + group]
            done: list[int] = []
            t0 = time.perf_counter()
            for p in batch:
                try:
                    self.space.unmap_page(p)
                    done.append(p)
                except Exception:
                    # Memory state unknown: keep the page out of use and its bytes booked (never overcommit).
                    log.exception("unmapping page %d failed; the page is quarantined", p)
            if done:
                self._release(len(done) * self.page_bytes)
            with self._lock:
                for p in batch:
                    if p in done:
                        self._state[p] = UNMAPPED
                        heapq.heappush(self._unmapped, p)
                    else:
                        self._state[p] = LOST
                self._unmapping -= len(batch)
                self._pages_unmapped_total += len(done)
                self._seconds["unmap"] += time.perf_counter() - t0
                self._notify()

    def _release(self, nbytes: int) -> None:
        """Hand ``nbytes`` of unmapped memory back to the budget. A ledger that fails here must not stop the
        page's state from being restored: the bytes stay booked there (an overcount, never an overcommit) until
        the next sync publishes what is really mapped."""
        try:
            self._budget.release(nbytes)
        except Exception:
            log.exception("elastikv: handing %s back to the budget failed; the ledger overcounts until its next sync",
                          format_bytes(nbytes))  # fmt: skip
