"""FreePool: the free blocks of an allocator's mapped pages, and which blocks are handed out.

Who owns what: the :class:`~elastikv.allocator.BlockAllocator` owns a pool and its lock, and decides which pages
are mapped; the pool only keeps the books of blocks within mapped pages. It is not thread-safe: every call is made
with the allocator's lock held. It never calls the driver.

Layout. Per page, a stack of its free block ids (``None`` unless the page is mapped and published). Mapped pages
are bucketed by how many blocks they have free: ``buckets[k]`` holds the pages with exactly ``k`` free (k >= 1),
oldest first; ``buckets[bpp]`` holds the empty pages, which are the allocator's reserve and what it may unmap.

Invariants (the allocator's property-based test checks them after every step, through the allocator):

1. A block is handed out at most once until it is given back; ``give`` checks every id before it changes
   anything (never allocated, already freed, a null block, out of range, twice in one call: ``InvalidBlockError``).
2. ``total`` is the number of free blocks in mapped pages, the sum of the stacks' lengths.
3. ``min_k`` is a lower bound: no bucket below it holds a page. ``take`` scans up from it and so finds the fullest
   page with room (best fit keeps live blocks packed, so that emptied pages can really be given back).
4. ``freed_epoch[p]`` is the allocator's fence epoch at which page ``p`` last became empty: a page is unmapped only
   if it has not emptied again since the fence was recorded (allocator invariant 5).
"""

from __future__ import annotations

from elastikv.errors import InvalidBlockError

# A page's states, kept by the allocator (``BlockAllocator._state``); the pool holds blocks of MAPPED pages only.
# LOST: a map rollback or an unmap failed, the memory state is unknown: never used again, its bytes stay booked.
UNMAPPED, MAPPING, MAPPED, UNMAPPING, LOST = 0, 1, 2, 3, 4

_ONES = b"\x01" * 4096


def _ones(n: int) -> bytes:
    return _ONES[:n] if n <= len(_ONES) else b"\x01" * n


class FreePool:
    def __init__(self, num_pages: int, blocks_per_page: int, null_blocks: int) -> None:
        self.bpp = blocks_per_page
        self.null = null_blocks
        self.stacks: list[list[int] | None] = [None] * num_pages
        self.freed_epoch = [0] * num_pages
        self.buckets: list[dict[int, None]] = [{} for _ in range(blocks_per_page + 1)]
        self.min_k = blocks_per_page
        self.allocated = bytearray(num_pages * blocks_per_page)
        self.total = 0

    @property
    def empty(self) -> dict[int, None]:
        """The mapped pages with every block free, longest-empty first (the reserve; what may be unmapped)."""
        return self.buckets[self.bpp]

    def take(self, n: int) -> list[int]:
        """Take ``n`` free blocks, fullest page first. The caller checked ``n <= total``."""
        buckets, stacks, allocated = self.buckets, self.stacks, self.allocated
        k = self.min_k
        while not buckets[k]:
            k += 1
        if n == 1:  # steady state: one block from the fullest page
            bucket = buckets[k]
            page = next(reversed(bucket))  # the most recently touched page of that fullness
            del bucket[page]
            stack = stacks[page]
            assert stack is not None
            block = stack.pop()
            allocated[block] = 1
            if k > 1:
                buckets[k - 1][page] = None
                self.min_k = k - 1
            else:
                self.min_k = k
            self.total -= 1
            return [block]
        out: list[int] = []
        lowest = len(buckets)
        need = n
        while need:
            while not buckets[k]:
                k += 1
            page = next(reversed(buckets[k]))
            del buckets[k][page]
            stack = stacks[page]
            assert stack is not None
            m = need if need < k else k
            out += stack[-m:]
            del stack[-m:]
            need -= m
            if k - m:
                buckets[k - m][page] = None
                if k - m < lowest:
                    lowest = k - m
        self.min_k = min(k, lowest)
        lo = min(out)
        if max(out) - lo == n - 1:  # n distinct ids spanning n values: one contiguous run (fresh pages)
            allocated[lo : lo + n] = _ones(n)
        else:
            for block in out:
                allocated[block] = 1
        self.total -= n
        return out

    def give(self, ids: list[int], epoch: int) -> None:
        """Give blocks back, all checked before any is freed (invariant 1); a page emptied now is stamped with
        ``epoch`` (invariant 4)."""
        allocated = self.allocated
        null = self.null
        try:
            for b in ids:
                if b < null or not allocated[b]:
                    raise self._bad_free(b)
        except (IndexError, TypeError):
            raise self._bad_free(next(b for b in ids if not self._is_live(b))) from None
        if len(ids) > 1 and len(set(ids)) != len(ids):
            dup = next(b for b in ids if ids.count(b) > 1)
            raise InvalidBlockError(f"free() got block {dup} twice in one call; nothing was freed")
        bpp = self.bpp
        buckets, stacks = self.buckets, self.stacks
        min_k = self.min_k
        for b in ids:
            allocated[b] = 0
            page = b // bpp
            stack = stacks[page]
            k = len(stack)  # type: ignore[arg-type]
            if k:
                del buckets[k][page]
            stack.append(b)  # type: ignore[union-attr]
            k += 1
            buckets[k][page] = None
            if k < min_k:
                min_k = k
            if k == bpp:
                self.freed_epoch[page] = epoch
        self.min_k = min_k
        self.total += len(ids)

    def _is_live(self, b: object) -> bool:
        return type(b) is int and self.null <= b < len(self.allocated) and bool(self.allocated[b])

    def _bad_free(self, b: object) -> InvalidBlockError:
        if type(b) is not int:
            why = f"{b!r} is not a block id (a whole number)"
        elif not 0 <= b < len(self.allocated):
            why = f"block {b} is outside this cache (0..{len(self.allocated) - 1})"
        elif b < self.null:
            why = f"block {b} is a null block, which is never allocated"
        else:
            why = f"block {b} is not allocated (already freed, or never handed out)"
        return InvalidBlockError(f"free(): {why}; nothing was freed")

    def add_pages(self, pages: list[int], *, handed_over: bool) -> list[int]:
        """Publish freshly mapped ``pages``. ``handed_over``: every block goes straight to the caller (a burst
        of whole pages never enters the pool) and is returned; else the blocks join the pool, lowest id first."""
        bpp = self.bpp
        out: list[int] = []
        for p in pages:
            self.freed_epoch[p] = 0
            first = p * bpp
            if handed_over:
                self.stacks[p] = []
                self.allocated[first : first + bpp] = _ones(bpp)
                out.extend(range(first, first + bpp))
            else:
                self.stacks[p] = list(range(first + bpp - 1, first - 1, -1))  # pops lowest id first
                self.buckets[bpp][p] = None
        if not handed_over:
            self.total += len(pages) * bpp  # bucket bpp is never below min_k: no hint to fix
        return out

    def pin_null_blocks(self, pages: list[int]) -> None:
        """Mark the null blocks (the first ``null`` ids, in ``pages``, just added) as held for good."""
        for b in range(self.null):
            self.allocated[b] = 1
        for p in pages:
            del self.buckets[self.bpp][p]
            stack = self.stacks[p]
            assert stack is not None
            stack[:] = [b for b in stack if b >= self.null]
            if stack:
                self.buckets[len(stack)][p] = None
                self.min_k = min(self.min_k, len(stack))
        self.total -= self.null

    def remove_empty(self, page: int) -> None:
        """Take an empty page out of the pool (it is about to be unmapped)."""
        del self.buckets[self.bpp][page]
        self.stacks[page] = None
        self.total -= self.bpp

    def clear(self) -> None:
        """Forget every page (the allocator is closing and unmaps them all)."""
        self.stacks = [None] * len(self.stacks)
        self.buckets = [{} for _ in self.buckets]
        self.total = 0

    def live_in_page(self, page: int) -> int:
        """Blocks of ``page`` handed out and not given back (null blocks included): what keeps it mapped."""
        stack = self.stacks[page]
        return 0 if stack is None else self.bpp - len(stack)
