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

Hot path: ``allocate`` from mapped pages and ``free`` are pure bookkeeping under one lock, no driver call.
A background thread (``maintain``) keeps a reserve of free mapped blocks ahead of demand (``reserve.py``)
and unmaps surplus empty pages in batches, fenced. A request larger than the reserve maps the pages it
lacks on the caller's thread and never waits for an unmapping, except when the limit leaves no other way.

Placement: best fit into the fullest mapped page (pages are bucketed by free count), so that live blocks
stay packed and emptied pages can really be given back.
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
    InvalidBlockError,
    LimitExceeded,
    OutOfMemory,
)
from elastikv.reserve import ReservePolicy
from elastikv.space import Pages

log = logging.getLogger(__name__)

UNMAPPED, MAPPING, MAPPED, UNMAPPING, LOST = 0, 1, 2, 3, 4
_ONES = b"\x01" * 4096


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


class BlockAllocator:
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
        self.capacity_bytes = space.num_pages * space.page_bytes
        if budget is None:
            budget = LocalBudget(self.capacity_bytes if limit is None else self._clamp_limit(limit))
        self._budget = budget
        self._null = space.null_blocks
        self.num_blocks = space.num_blocks - self._null

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # callers waiting for pages in flight to land
        self._wake = threading.Event()  # wakes the maintainer before its tick (limit change, close)
        # Per page: state, free block ids (a stack; None unless mapped), epoch at which it last became empty.
        self._state = bytearray(space.num_pages)
        self._free: list[list[int] | None] = [None] * space.num_pages
        self._freed_epoch = [0] * space.num_pages
        self._unmapped = list(range(space.num_pages))  # a min-heap: map low pages first
        # _buckets[k]: mapped pages with exactly k free blocks (k >= 1), oldest first. _min_k: no bucket
        # below it is non-empty. _buckets[bpp] holds the empty pages: the reserve.
        self._buckets: list[dict[int, None]] = [{} for _ in range(bpp + 1)]
        self._min_k = bpp
        self._allocated = bytearray(space.num_blocks)
        self._free_total = 0
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
            if n <= self._free_total:
                return self._take(n)
        return self._allocate_slow(n)

    def _take(self, n: int) -> list[int]:
        """Take ``n`` free blocks, fullest page first. Caller holds the lock and checked ``_free_total``.

        ``_min_k`` is a lower bound: no bucket below it holds a page. Scanning up from it finds the fullest
        page with room; every bucket passed on the way was empty.
        """
        buckets, free_lists, allocated = self._buckets, self._free, self._allocated
        k = self._min_k
        while not buckets[k]:
            k += 1
        if n == 1:  # steady state: one block from the fullest page
            bucket = buckets[k]
            page = next(reversed(bucket))  # the most recently touched page of that fullness
            del bucket[page]
            stack = free_lists[page]
            assert stack is not None
            block = stack.pop()
            allocated[block] = 1
            if k > 1:
                buckets[k - 1][page] = None
                self._min_k = k - 1
            else:
                self._min_k = k
            self._free_total -= 1
            return [block]
        out: list[int] = []
        lowest = len(buckets)
        need = n
        while need:
            while not buckets[k]:
                k += 1
            page = next(reversed(buckets[k]))
            del buckets[k][page]
            stack = free_lists[page]
            assert stack is not None
            m = need if need < k else k
            out += stack[-m:]
            del stack[-m:]
            need -= m
            if k - m:
                buckets[k - m][page] = None
                if k - m < lowest:
                    lowest = k - m
        self._min_k = min(k, lowest)
        lo = min(out)
        if max(out) - lo == n - 1:  # n distinct ids spanning n values: one contiguous run (fresh pages)
            allocated[lo : lo + n] = _ONES[:n] if n <= len(_ONES) else b"\x01" * n
        else:
            for block in out:
                allocated[block] = 1
        self._free_total -= n
        return out

    def free(self, blocks: Iterable[int]) -> None:
        """Give blocks back. All are checked before any is freed: a bad id raises and frees nothing. After
        :meth:`close`, nothing to do."""
        ids = blocks if isinstance(blocks, list) else list(blocks)
        with self._lock:
            if self._closed:  # close() took every page back already: an engine's late free is a no-op
                return
            allocated = self._allocated
            null = self._null
            try:
                for b in ids:
                    if b < null or not allocated[b]:
                        raise self._bad_free(b, ids)
            except (IndexError, TypeError):
                raise self._bad_free(next(b for b in ids if not self._is_live(b)), ids) from None
            if len(ids) > 1 and len(set(ids)) != len(ids):
                dup = next(b for b in ids if ids.count(b) > 1)
                raise InvalidBlockError(f"free() got block {dup} twice in one call; nothing was freed")
            bpp = self.blocks_per_page
            buckets, free_lists = self._buckets, self._free
            min_k = self._min_k
            for b in ids:
                allocated[b] = 0
                page = b // bpp
                stack = free_lists[page]
                k = len(stack)  # type: ignore[arg-type]
                if k:
                    del buckets[k][page]
                stack.append(b)  # type: ignore[union-attr]
                k += 1
                buckets[k][page] = None
                if k < min_k:
                    min_k = k
                if k == bpp:
                    self._freed_epoch[page] = self._epoch
            self._min_k = min_k
            self._free_total += len(ids)

    def _is_live(self, b: object) -> bool:
        return type(b) is int and self._null <= b < len(self._allocated) and bool(self._allocated[b])

    def _bad_free(self, b: object, ids: list[int]) -> InvalidBlockError:
        if type(b) is not int:
            why = f"{b!r} is not a block id (a whole number)"
        elif not 0 <= b < len(self._allocated):
            why = f"block {b} is outside this cache (0..{len(self._allocated) - 1})"
        elif b < self._null:
            why = f"block {b} is a null block, which is never allocated"
        else:
            why = f"block {b} is not allocated (already freed, or never handed out)"
        return InvalidBlockError(f"free(): {why}; nothing was freed")

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
                if n <= self._free_total:
                    return self._take(n)
                if n > self.num_blocks:
                    raise self._refusal(
                        OutOfMemory,
                        f"a request for {n} blocks can never fit: the cache holds {self.num_blocks} "
                        f"({format_bytes(self.num_blocks * self.page_bytes // bpp)})",
                        n,
                    )
                pages_needed = math.ceil((n - self._free_total) / bpp)
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
            out: list[int] = []
            for p in mapped:
                self._state[p] = MAPPED
                self._freed_epoch[p] = 0
                first = p * bpp
                if whole:  # hand the pages over full: they never enter the free pool (a burst's common case)
                    self._free[p] = []
                    self._allocated[first : first + bpp] = _ONES[:bpp] if bpp <= len(_ONES) else b"\x01" * bpp
                    out.extend(range(first, first + bpp))
                else:
                    self._free[p] = list(range(first + bpp - 1, first - 1, -1))  # pops lowest id first
                    self._buckets[bpp][p] = None
            if not whole:
                self._free_total += len(mapped) * bpp  # bucket bpp is never below _min_k: no hint to fix
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
                return self._take(take) if take and take <= self._free_total else None
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
            for b in range(self._null):
                self._allocated[b] = 1
            for p in pages:
                del self._buckets[self.blocks_per_page][p]
                stack = self._free[p]
                assert stack is not None
                stack[:] = [b for b in stack if b >= self._null]
                if stack:
                    self._buckets[len(stack)][p] = None
                    self._min_k = min(self._min_k, len(stack))
            self._free_total -= self._null

    # ===================================================================================== maintenance
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
                if self._free_total + self._mapping * bpp >= self._target:
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
            empty = self._buckets[bpp]
            over_bytes = self._budget.booked - self._budget.limit
            surplus = min(len(empty), max(0, (self._free_total - self._target) // bpp))
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
            for p in candidates:
                if p not in empty or self._freed_epoch[p] > epoch:
                    continue  # reused, or emptied again after the fence was recorded
                keeps_target = self._free_total - bpp >= self._target
                if not keeps_target and over_bytes <= 0:
                    break
                del empty[p]
                self._free[p] = None
                self._state[p] = UNMAPPING
                self._free_total -= bpp
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
        return self._free_total + (self._mapping + mappable) * self.blocks_per_page

    def _in_use_locked(self) -> int:
        return self._mapped_pages * self.blocks_per_page - self._free_total - self._null

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
            free = self._free[page]
            if free is None:
                return 0
            return self.blocks_per_page - len(free)

    def stats(self) -> AllocatorStats:
        with self._lock:
            return AllocatorStats(
                num_blocks=self.num_blocks,
                blocks_in_use=self._in_use_locked(),
                blocks_free_mapped=self._free_total,
                blocks_available=self._available_locked(),
                pages_mapped=self._mapped_pages + self._unmapping,  # memory is held until the unmap lands
                pages_empty=len(self._buckets[self.blocks_per_page]),
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
                self._free[p] = None
            self._buckets = [{} for _ in self._buckets]
            self._free_total = 0
            self._mapped_pages = 0
            self._unmapping += len(pages)
        self.space.fence().wait()
        self._unmap_pages(pages)

    def __enter__(self) -> BlockAllocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
