"""BlockAllocator: hands out an engine's block ids and keeps exactly the pages they need mapped.

Ownership: the allocator owns every decision about *which* blocks are live and *when* a page is mapped or
unmapped; the :class:`~elastikv.space.KVSpace` does the mapping; a :class:`~elastikv.budget.Budget` books the
bytes (a local limit, or the cross-process ledger: ``budget.py``). The engine owns the blocks it was given until
it frees them.

Invariants (DESIGN.md; the property-based test checks them after every step):

1. A block is handed out at most once until it is freed; freeing a block that is not allocated (never
   allocated, already freed, a null block, out of range) raises ``InvalidBlockError`` and changes nothing.
2. Every allocated block lies in a mapped page; a page with a live block is never unmapped.
3. Mapped bytes never exceed the budget's limit: bytes are booked *before* a page is mapped, in the same
   step that checks the limit, and a page whose booking fails is never mapped.
4. A failed map (driver out of memory) rolls back every chunk of that page (``KVSpace.map_page``) and its
   booking; the allocation is refused and state is as before.
5. A page is unmapped only after a fence recorded *after* it became empty has completed, so GPU work that
   read its blocks (enqueued before they were freed) is done.

Hot path: ``allocate`` from mapped pages and ``free`` are pure bookkeeping under one lock, no driver call
(the free blocks' books: ``free_pool.py``, best fit into the fullest mapped page so that live blocks stay packed
and emptied pages can really be given back). A background thread (``maintainer.py``, this class's other half)
keeps a reserve of free mapped blocks ahead of demand (``reserve.py``) and unmaps surplus empty pages in
batches, fenced. A request larger than the reserve maps the pages it lacks on the caller's thread and never
waits for an unmapping, except when the limit leaves no other way.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from elastikv.budget import Budget, LocalBudget
from elastikv.config import format_bytes
from elastikv.errors import (
    AllocationRefused,
    BudgetUnavailable,
    ConfigError,
    ElastikvError,
    LimitExceeded,
    OutOfMemory,
)
from elastikv.free_pool import LOST, MAPPED, MAPPING, UNMAPPED, UNMAPPING, FreePool
from elastikv.maintainer import Maintainer
from elastikv.reserve import ReservePolicy
from elastikv.space import Pages

log = logging.getLogger(__name__)


class MapFailed(AllocationRefused):
    """The driver refused to map a page for a reason other than memory; the page was rolled back."""

    reason = "map_failed"


@dataclass(frozen=True)
class AllocatorStats:
    num_blocks: int
    """Blocks the engine may ever hold (virtual capacity, null blocks excluded)."""
    blocks_in_use: int
    blocks_free_mapped: int
    """Free blocks in mapped pages: allocatable with no driver call."""
    blocks_available: int
    """What ``allocate`` could give right now, mapping more pages within the limit."""
    pages_mapped: int
    """Pages holding physical memory (those being unmapped included, until the unmap lands)."""
    pages_empty: int
    page_bytes: int
    mapped_bytes: int
    limit_bytes: int
    reserve_target_blocks: int
    pages_mapped_total: int
    pages_unmapped_total: int
    pages_mapped_by_caller: int
    """Pages an ``allocate`` call had to map itself because the reserve was short."""
    refusals: int
    caller_map_seconds: float = 0.0
    """Wall time ``allocate`` calls spent booking and mapping pages themselves (the engine's thread waited)."""
    background_map_seconds: float = 0.0
    """Wall time the maintainer spent booking and mapping reserve pages (off the engine's thread)."""
    unmap_seconds: float = 0.0
    """Wall time spent unmapping pages, waiting for their fence first included."""


class BlockAllocator(Maintainer):
    """Block ids of one :class:`~elastikv.space.KVSpace` (or any :class:`~elastikv.space.Pages`), backed by
    exactly the pages they need (plus a reserve).

    ``limit`` (bytes; default: the whole virtual capacity) bounds mapped memory unless a ``budget`` is given.
    ``reserve_bytes`` is the minimum reserve of free mapped memory kept ready; the policy grows it with
    recent demand. ``background=False`` runs no thread: call :meth:`maintain` yourself (tests do).
    """

    def __init__(
        self,
        space: Pages,
        *,
        limit: int | None = None,
        budget: Budget | None = None,
        reserve_bytes: int = 256 * 1024**2,
        max_reserve_bytes: int | None = None,
        background: bool = True,
        tick: float = 0.02,
        trim_delay: float = 0.25,
    ) -> None:
        if limit is not None and budget is not None:
            raise ConfigError("give either a limit or a budget, not both (the budget holds the limit)")
        if reserve_bytes < 0:
            raise ConfigError(f"reserve_bytes must not be negative, got {reserve_bytes}")
        self.space = space
        bpp = self.blocks_per_page = space.blocks_per_page
        self.page_bytes = space.page_bytes
        self.block_bytes = space.page_bytes // bpp  # device memory one block takes, every layer and buffer
        self.capacity_bytes = space.num_pages * space.page_bytes
        if budget is None:
            budget = LocalBudget(self.capacity_bytes if limit is None else self._clamp_limit(limit))
        self._budget = budget
        self._null = space.null_blocks
        self.num_blocks = space.num_blocks - self._null

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # callers waiting for pages in flight to land
        self._wake = threading.Event()  # wakes the maintainer before its tick (limit change, close)
        self._state = bytearray(space.num_pages)  # per page: UNMAPPED, MAPPING, MAPPED, UNMAPPING or LOST
        self._pool = FreePool(space.num_pages, bpp, self._null)  # free blocks of MAPPED pages (under _lock)
        self._unmapped = list(range(space.num_pages))  # a min-heap: map low pages first
        self._mapped_pages = 0
        self._mapping = 0  # pages being mapped right now (booked, not yet usable)
        self._unmapping = 0
        self._callers_mapping = 0  # allocate() calls mapping pages on their own thread right now
        self._epoch = 1  # bumped each time a fence is recorded; see invariant 5

        min_pages = math.ceil(reserve_bytes / self.page_bytes)
        max_pages = space.num_pages // 32 if max_reserve_bytes is None else max_reserve_bytes // self.page_bytes
        self._policy = ReservePolicy(min_blocks=min_pages * bpp, max_blocks=max(min_pages, max_pages) * bpp)
        self._target = self._policy.min_blocks
        self._trim_delay = trim_delay
        self._surplus_since: float | None = None
        self._pages_mapped_total = 0
        self._pages_unmapped_total = 0
        self._pages_mapped_by_caller = 0
        self._seconds = {"caller_map": 0.0, "background_map": 0.0, "unmap": 0.0}  # driver time, see AllocatorStats
        self._refusals = 0
        self._waiters = 0  # threads in _wait(): notify only when someone listens
        self._idle = False  # set by idle(): no reserve kept until the next allocate
        self._closed = False
        self._last_sync_error = -math.inf

        self._pin_null_blocks()
        self._tick = tick
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="elastikv-maintainer", daemon=True)
            self._thread.start()

    # ===================================================================================== hot path
    def allocate(self, n: int) -> list[int]:
        """``n`` block ids, or raise an :class:`AllocationRefused` (``LimitExceeded``, ``OutOfMemory``) with
        state unchanged. Served from mapped pages with no driver call whenever the reserve covers it."""
        if type(n) is not int or n <= 0:
            raise ValueError(f"allocate(n) needs a positive whole number of blocks, got {n!r}")
        with self._lock:
            self._idle = False
            if n <= self._pool.total:
                return self._pool.take(n)
        return self._allocate_slow(n)

    def free(self, blocks: Iterable[int]) -> None:
        """Give blocks back. All are checked before any is freed: a bad id raises and frees nothing. After
        :meth:`close`, nothing to do."""
        ids = blocks if isinstance(blocks, list) else list(blocks)
        with self._lock:
            if self._closed:  # close() took every page back already: an engine's late free is a no-op
                return
            self._pool.give(ids, self._epoch)

    # ===================================================================================== growth
    def _allocate_slow(self, n: int) -> list[int]:
        """The reserve is short: map the pages this request lacks on the caller's thread, now.

        The caller does its own mapping rather than waiting for the maintainer to hand pages over: the
        driver serialises mappings anyway, and a cross-thread handoff per page would only add latency. It
        waits only when there is no unmapped page left to take while others are in flight, or when the
        limit is reached while an unmapping that would make room is under way.
        """
        bpp = self.blocks_per_page
        while True:
            with self._lock:
                self._check_open()
                if n <= self._pool.total:
                    return self._pool.take(n)
                if n > self.num_blocks:
                    raise self._refusal(
                        OutOfMemory,
                        f"a request for {n} blocks can never fit: the cache holds {self.num_blocks} "
                        f"({format_bytes(self.num_blocks * self.page_bytes // bpp)})",
                        n,
                    )
                pages_needed = math.ceil((n - self._pool.total) / bpp)
                if pages_needed > len(self._unmapped):
                    if self._mapping or self._unmapping:  # pages in flight elsewhere change the picture
                        self._wait(None, timeout=1.0)
                        continue
                    raise self._refusal(
                        OutOfMemory,
                        f"no room for {n} more blocks: {self._available_locked()} of {self.num_blocks} can be "
                        "had now; the rest of the cache is in use",
                        n,
                    )
                pages = [heapq.heappop(self._unmapped) for _ in range(pages_needed)]
                for p in pages:
                    self._state[p] = MAPPING
                self._mapping += pages_needed
                self._callers_mapping += 1
            try:
                blocks = self._map_pages(pages, by_caller=True, take=n)
            except LimitExceeded as exc:
                with self._lock:
                    if self._unmapping:  # the limit frees up as soon as the unmapping in flight lands
                        self._wait(lambda: not self._unmapping, timeout=5.0)
                        continue
                    raise self._refusal(LimitExceeded, f"{n} blocks refused: {exc}", n) from None
            except AllocationRefused as exc:
                with self._lock:
                    raise self._refusal(type(exc), str(exc), n) from exc
            if blocks is not None:
                return blocks

    def _refusal(self, kind: type[AllocationRefused], message: str, n: int) -> AllocationRefused:
        """A refusal of ``n`` blocks, counted, with what could be had instead. Caller holds the lock."""
        self._refusals += 1
        return kind(message, requested=n, available=self._available_locked())

    def _wait(self, predicate: Callable[[], bool] | None, timeout: float) -> None:
        """Wait on ``_cond`` (lock held) until ``predicate`` holds, or for the next change if it is None.
        Counted, so that notifiers skip the condition when nobody listens (the common case)."""
        self._waiters += 1
        try:
            if predicate is None:
                self._cond.wait(timeout=timeout)
            else:
                self._cond.wait_for(predicate, timeout=timeout)
        finally:
            self._waiters -= 1

    def _notify(self) -> None:
        if self._waiters:
            self._cond.notify_all()

    def _map_pages(self, pages: list[int], *, by_caller: bool, take: int = 0) -> list[int] | None:
        """Book, map and publish ``pages`` (already marked MAPPING), all or nothing: if one fails, the space
        has rolled that page back and the pages mapped before it are unmapped again (never published, so
        no GPU work can have touched them), every byte is unbooked, and the error is raised.

        With ``take``, the caller's blocks are taken in the same locked step that publishes the pages, so a
        burst pays for one lock round trip per page, not three; None if others took the blocks first.
        """
        nbytes = len(pages) * self.page_bytes
        mapped: list[int] = []
        lost: list[int] = []
        error: Exception | None = None
        t0 = time.perf_counter()
        try:
            self._budget.book(nbytes)
        except LimitExceeded as exc:
            error = exc
        except Exception as exc:  # the ledger failed (busy, row gone, I/O): a refusal, state unchanged
            error = BudgetUnavailable(f"booking {format_bytes(nbytes)} failed: {type(exc).__name__}: {exc}")
        else:
            for p in pages:
                try:
                    self.space.map_page(p)
                except Exception as exc:  # OutOfMemory or a driver error: the space rolled the page back
                    error = exc
                    break
                mapped.append(p)
            if error is not None:
                for p in mapped:
                    try:
                        self.space.unmap_page(p)
                    except Exception:
                        log.exception("rolling back page %d failed; the page is quarantined", p)
                        lost.append(p)  # stays booked: never overcommit
                self._release(nbytes - len(lost) * self.page_bytes)
                mapped = []
        bpp = self.blocks_per_page
        whole = error is None and take == len(pages) * bpp  # the request is exactly these fresh pages
        with self._lock:
            self._seconds["caller_map" if by_caller else "background_map"] += time.perf_counter() - t0
            for p in mapped:
                self._state[p] = MAPPED
            out = self._pool.add_pages(mapped, handed_over=whole)  # whole: they never enter the free pool
            self._mapped_pages += len(mapped)
            self._pages_mapped_total += len(mapped)
            if by_caller:
                self._pages_mapped_by_caller += len(mapped)
                self._callers_mapping -= 1
            if error is not None:
                for p in pages:
                    if p in lost:
                        self._state[p] = LOST
                    else:
                        self._state[p] = UNMAPPED
                        heapq.heappush(self._unmapped, p)
            self._mapping -= len(pages)
            self._notify()
            if whole:
                return out
            if error is None:
                return self._pool.take(take) if take and take <= self._pool.total else None
        if isinstance(error, AllocationRefused):
            raise error
        raise MapFailed(f"mapping a page failed: {error}") from error

    def _pin_null_blocks(self) -> None:
        """Map the pages holding the null blocks now and keep them mapped for good."""
        if not self._null:
            return
        last_page = (self._null - 1) // self.blocks_per_page
        pages = list(range(last_page + 1))
        with self._lock:
            for p in pages:
                self._unmapped.remove(p)
                self._state[p] = MAPPING
            heapq.heapify(self._unmapped)
            self._mapping += len(pages)
        try:
            self._map_pages(pages, by_caller=False)
        except AllocationRefused as exc:
            need = len(pages) * self.page_bytes
            if self._budget.limit < need:  # can never fit: a setting to change
                raise ConfigError(f"cannot map the {self._null} null block(s) the engine needs: {exc}") from exc
            # The device is full now; it may not be later (other instances give memory back): the caller may wait.
            raise type(exc)(
                f"cannot map the {self._null} null block(s) the engine needs yet: {exc}", requested=self._null
            ) from exc
        with self._lock:
            self._pool.pin_null_blocks(pages)

    # ===================================================================================== limits & facts
    def _clamp_limit(self, nbytes: int) -> int:
        if nbytes <= 0:
            raise ConfigError(f"the memory limit must be positive, got {nbytes}")
        if nbytes > self.capacity_bytes:
            log.warning(
                "limit %s is above the cache's virtual capacity %s; using %s",
                format_bytes(nbytes),
                format_bytes(self.capacity_bytes),
                format_bytes(self.capacity_bytes),
            )
            return self.capacity_bytes
        return nbytes

    def idle(self) -> None:
        """The engine has gone idle (put to sleep, cache flushed): keep no reserve and unmap every empty page
        now (fenced, as always), until the next ``allocate`` brings the reserve back."""
        with self._lock:
            self._idle = True
            self._target = 0
        self._wake.set()

    def set_limit(self, nbytes: int) -> None:
        """Change the limit now. Lowering it below what is mapped stops growth, gives the reserve back at
        once and then pages as they empty; raising it takes effect at the next allocation."""
        self._budget.set_limit(self._clamp_limit(nbytes))
        self._wake.set()  # hand the reserve back now, not at the next tick

    @property
    def limit(self) -> int:
        return self._budget.limit

    def over_limit_bytes(self) -> int:
        """How far mapped memory is above the limit (a lowered limit): what the engine should let go of, by
        freeing blocks it keeps only as a cache, so that their pages empty and are unmapped. 0 within it."""
        return max(0, self._budget.booked - self._budget.limit)

    def available(self) -> int:
        """Blocks ``allocate`` could hand out right now, mapping pages within the limit if needed."""
        with self._lock:
            return self._available_locked()

    def _available_locked(self) -> int:
        headroom_pages = max(0, self._budget.limit - self._budget.booked) // self.page_bytes
        mappable = min(len(self._unmapped), headroom_pages)
        return self._pool.total + (self._mapping + mappable) * self.blocks_per_page

    def _in_use_locked(self) -> int:
        return self._mapped_pages * self.blocks_per_page - self._pool.total - self._null

    def eviction_order(self, candidates: Iterable[int]) -> list[int]:
        """Order blocks an engine could evict (held, e.g. by a prefix cache, but unused) so that memory comes
        back soonest: first the groups that are every live block of their page (evicting them empties the
        page), smallest group first; then the others in the order given (an engine passes oldest first)."""
        ids = list(candidates)
        bpp = self.blocks_per_page
        by_page: dict[int, list[int]] = {}
        for b in ids:
            by_page.setdefault(b // bpp, []).append(b)
        whole = sorted((g for p, g in by_page.items() if self.live_in_page(p) == len(g)), key=len)
        first = [b for g in whole for b in g]
        taken = set(first)
        return first + [b for b in ids if b not in taken]

    def live_in_page(self, page: int) -> int:
        """Blocks of ``page`` handed out and not freed (null blocks included): what keeps it mapped."""
        with self._lock:
            return self._pool.live_in_page(page)

    def stats(self) -> AllocatorStats:
        with self._lock:
            return AllocatorStats(
                num_blocks=self.num_blocks,
                blocks_in_use=self._in_use_locked(),
                blocks_free_mapped=self._pool.total,
                blocks_available=self._available_locked(),
                pages_mapped=self._mapped_pages + self._unmapping,  # memory is held until the unmap lands
                pages_empty=len(self._pool.empty),
                page_bytes=self.page_bytes,
                mapped_bytes=self._budget.booked,
                limit_bytes=self._budget.limit,
                reserve_target_blocks=self._target,
                pages_mapped_total=self._pages_mapped_total,
                pages_unmapped_total=self._pages_unmapped_total,
                pages_mapped_by_caller=self._pages_mapped_by_caller,
                refusals=self._refusals,
                caller_map_seconds=self._seconds["caller_map"],
                background_map_seconds=self._seconds["background_map"],
                unmap_seconds=self._seconds["unmap"],
            )

    # ===================================================================================== lifetime
    def _check_open(self) -> None:
        if self._closed:
            raise ElastikvError("this BlockAllocator is closed")

    def close(self) -> None:
        """Stop the maintainer, wait for the device, unmap every page and return every booked byte."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._wait(lambda: not self._mapping and not self._unmapping, timeout=30.0)
            pages = [p for p in range(self.space.num_pages) if self._state[p] == MAPPED]
            for p in pages:
                self._state[p] = UNMAPPING
            self._pool.clear()
            self._mapped_pages = 0
            self._unmapping += len(pages)
        self.space.fence().wait()
        self._unmap_pages(pages)

    def __enter__(self) -> BlockAllocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
