"""BlockAllocator behaviour beyond the property test: placement, reserve, trimming, limits, fences, threads."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

import pytest
from tests.conftest import SMALL, used_bytes

from elastikv.allocator import BlockAllocator
from elastikv.budget import LedgerBudget
from elastikv.errors import ConfigError, InvalidBlockError, LimitExceeded, OutOfMemory
from elastikv.memory import HostBackend, MemoryBackend
from elastikv.space import KVSpace

BPP = 32  # SMALL's blocks per page


def make(backend: MemoryBackend, pages: int = 8, **kwargs: object) -> tuple[KVSpace, BlockAllocator]:
    space = KVSpace(backend, SMALL, num_blocks=pages * BPP, null_blocks=int(kwargs.pop("null_blocks", 0)))
    kwargs.setdefault("reserve_bytes", 0)
    kwargs.setdefault("background", False)
    kwargs.setdefault("trim_delay", 0.0)
    return space, BlockAllocator(space, **kwargs)  # type: ignore[arg-type]


def test_fills_the_fullest_page_first(backend: MemoryBackend) -> None:
    space, alloc = make(backend)
    a = alloc.allocate(30)  # page 0: 2 free
    b = alloc.allocate(20)  # the rest of page 0, then page 1: 14 free
    assert {space.page_of(x) for x in a} == {0}
    assert sum(space.page_of(x) == 0 for x in b) == 2
    alloc.free(a[:10])  # page 0: 10 free, page 1: 14 free
    c = alloc.allocate(5)
    assert {space.page_of(x) for x in c} == {0}, "best fit goes into the fuller page"
    alloc.close()
    space.close()


def test_bad_frees_change_nothing(backend: MemoryBackend) -> None:
    space, alloc = make(backend, null_blocks=2)
    held = alloc.allocate(10)
    before = alloc.stats()
    cases: list[tuple[list[object], str]] = [
        ([held[0], 10_000], "outside this cache"),
        ([held[0], -1], "outside this cache"),
        ([held[0], 0], "null block"),
        ([held[0], held[0]], "twice"),
        ([held[0], 200], "not allocated"),
        ([held[0], "7"], "not a block id"),
        ([held[0], 3.0], "not a block id"),
    ]
    for ids, message in cases:
        with pytest.raises(InvalidBlockError, match=message):
            alloc.free(ids)  # type: ignore[arg-type]
        assert alloc.stats() == before, ids
    alloc.free(held)
    with pytest.raises(InvalidBlockError, match="already freed"):
        alloc.free(held[:1])
    alloc.close()
    space.close()


@pytest.mark.parametrize("n", [0, -3, 2.5, "4", None, True])
def test_bad_allocation_sizes(backend: MemoryBackend, n: object) -> None:
    space, alloc = make(backend)
    with pytest.raises(ValueError, match="positive whole number"):
        alloc.allocate(n)  # type: ignore[arg-type]
    assert alloc.stats().pages_mapped == 0
    alloc.close()
    space.close()


def test_null_blocks_are_never_handed_out(backend: MemoryBackend) -> None:
    space, alloc = make(backend, null_blocks=BPP + 3)  # spans two pages
    got = alloc.allocate(alloc.num_blocks)
    assert min(got) == BPP + 3 and len(set(got)) == alloc.num_blocks == 8 * BPP - BPP - 3
    alloc.free(got)
    alloc.maintain(now=10.0)
    assert space.is_mapped(0) and space.is_mapped(1), "null pages stay mapped"
    assert alloc.stats().pages_mapped == 2
    alloc.close()
    space.close()


def test_a_request_bigger_than_the_cache_is_refused_clearly(backend: MemoryBackend) -> None:
    space, alloc = make(backend, pages=4)
    with pytest.raises(OutOfMemory, match="can never fit: the cache holds 128"):
        alloc.allocate(129)
    assert alloc.stats().pages_mapped == 0 and alloc.stats().refusals == 1
    alloc.close()
    space.close()


def test_limit_lower_raise_restore(backend: MemoryBackend) -> None:
    space, alloc = make(backend, reserve_bytes=2 * SMALL.group_bytes * BPP)
    page = space.page_bytes
    alloc.maintain(now=0.0)
    held = [alloc.allocate(BPP) for _ in range(4)]
    alloc.maintain(now=1.0)
    assert alloc.stats().pages_mapped == 6  # 4 full + a reserve of 2
    alloc.set_limit(3 * page)  # below current use
    alloc.maintain(now=1.0)
    assert alloc.stats().pages_mapped == 4, "the reserve goes back at once..."
    with pytest.raises(LimitExceeded):
        alloc.allocate(1)  # ...growth stops...
    alloc.free(held.pop())
    alloc.maintain(now=1.0)
    assert alloc.stats().pages_mapped == 3, "...then pages as they empty"
    assert space.mapped_bytes <= alloc.limit
    alloc.set_limit(10 * page)  # above the capacity: clamped
    assert alloc.limit == 8 * page
    held.append(alloc.allocate(2 * BPP))  # growth again at the next allocation
    assert alloc.stats().pages_mapped == 5
    with pytest.raises(ConfigError, match="positive"):
        alloc.set_limit(0)
    alloc.close()
    space.close()


def test_background_reserve_grows_with_demand_and_memory_returns(backend: MemoryBackend) -> None:
    """With the maintainer thread on: bursts are served from a reserve it maps ahead, and after free-all
    the device gets everything back down to the configured reserve."""
    reserve = 2 * BPP * SMALL.group_bytes
    before = used_bytes(backend)
    space, alloc = make(backend, pages=64, reserve_bytes=reserve, background=True, trim_delay=0.05, tick=0.005)
    deadline = time.monotonic() + 5
    while alloc.stats().blocks_free_mapped < 2 * BPP and time.monotonic() < deadline:
        time.sleep(0.01)
    assert alloc.stats().pages_mapped == 2, "the minimum reserve is mapped ahead of any request"
    held = []
    for _ in range(40):
        held.append(alloc.allocate(BPP))
        time.sleep(0.002)
    s = alloc.stats()
    assert s.pages_mapped_by_caller < 40, "the maintainer mapped ahead of the burst"
    assert s.background_map_seconds > 0  # its time in the driver is counted, apart from the callers'
    assert (s.caller_map_seconds > 0) == (s.pages_mapped_by_caller > 0)
    assert used_bytes(backend) - before >= 40 * space.page_bytes
    for h in held:
        alloc.free(h)
    deadline = time.monotonic() + 5
    while alloc.stats().pages_mapped > 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert alloc.stats().pages_mapped == 2
    assert used_bytes(backend) - before == 2 * space.page_bytes
    alloc.close()
    space.close()
    assert used_bytes(backend) == before


def test_idle_gives_the_reserve_back_until_the_next_allocation(backend: MemoryBackend) -> None:
    """``idle()`` (an engine put to sleep, its cache flushed) unmaps every empty page at once, reserve included;
    the next allocation brings the reserve back."""
    reserve = 2 * BPP * SMALL.group_bytes
    before = used_bytes(backend)
    space, alloc = make(backend, pages=16, reserve_bytes=reserve, trim_delay=10.0)
    alloc.maintain()
    assert alloc.stats().pages_mapped == 2  # the reserve
    held = alloc.allocate(3 * BPP)
    alloc.free(held)
    alloc.maintain()
    assert alloc.stats().pages_mapped >= 3  # surplus waits for the (long) trim delay
    alloc.idle()
    alloc.maintain()
    assert alloc.stats().pages_mapped == 0 and used_bytes(backend) == before  # at once, delay or not
    alloc.free(alloc.allocate(1))
    alloc.maintain()
    assert alloc.stats().pages_mapped == 2  # awake again: the reserve is back
    alloc.close()
    space.close()


def _rss_shmem() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem in /proc/self/status")


def test_resident_memory_follows_use() -> None:
    backend = HostBackend(total_bytes=1024**3)
    space, alloc = make(backend, pages=64)
    rss0 = _rss_shmem()
    held = alloc.allocate(40 * BPP)
    grown = 40 * space.page_bytes
    assert _rss_shmem() - rss0 >= grown * 0.95
    assert backend.allocated_bytes() == grown
    alloc.free(held)
    alloc.maintain(now=100.0)
    assert alloc.stats().pages_mapped == 0
    assert backend.allocated_bytes() == 0
    assert _rss_shmem() - rss0 < space.page_bytes
    alloc.close()
    space.close()
    backend.close()


class _Fence:
    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate

    def done(self) -> bool:
        return self.gate.is_set()

    def wait(self) -> None:
        assert self.gate.wait(10)


class AsyncHostBackend(HostBackend):
    """Host memory whose fences complete only when the test says the (pretend) device work is done: the
    asynchronous queue of a GPU, which the host backend otherwise does not have. Mapping is real."""

    def __init__(self) -> None:
        super().__init__(total_bytes=256 * 1024**2)
        self.gates: list[threading.Event] = []
        self.idle = False  # once set, the device has no work left: fences complete at once

    def record_fence(self, streams: Sequence[int] = ()) -> _Fence:  # type: ignore[override]
        self.gates.append(threading.Event())
        if self.idle:
            self.gates[-1].set()
        return _Fence(self.gates[-1])


def trim_in_background(alloc: BlockAllocator, backend: AsyncHostBackend, now: float) -> threading.Thread:
    """Start a maintenance pass in a thread; return once it has recorded its fence (and waits on it)."""
    fences = len(backend.gates)
    trimmer = threading.Thread(target=alloc.maintain, kwargs={"now": now})
    trimmer.start()
    while len(backend.gates) == fences:
        time.sleep(0.001)
    return trimmer


def test_pages_are_unmapped_only_after_their_fence() -> None:
    """Invariant 5: the fence is recorded after the page emptied, and the unmap waits for it."""
    backend = AsyncHostBackend()
    space, alloc = make(backend, pages=4)
    blocks = alloc.allocate(BPP)
    alloc.free(blocks)
    trimmer = trim_in_background(alloc, backend, now=10.0)
    time.sleep(0.05)
    assert space.is_mapped(0), "unmapped before the device finished"
    backend.gates[0].set()
    trimmer.join(5)
    assert not space.is_mapped(0)
    backend.idle = True
    alloc.close()
    space.close()


def test_a_page_emptied_again_after_the_fence_waits_for_the_next_one() -> None:
    backend = AsyncHostBackend()
    space, alloc = make(backend, pages=4)
    alloc.free(alloc.allocate(BPP))
    trimmer = trim_in_background(alloc, backend, now=10.0)
    # The engine reuses the page (new GPU work on it) and frees it again, after the fence was recorded.
    alloc.free(alloc.allocate(BPP))
    backend.gates[0].set()
    trimmer.join(5)
    assert space.is_mapped(0), "the first fence does not cover work queued after it"
    trimmer = trim_in_background(alloc, backend, now=20.0)
    backend.gates[1].set()
    trimmer.join(5)
    assert not space.is_mapped(0)
    backend.idle = True
    alloc.close()
    space.close()


def test_threads_allocating_and_freeing_keep_every_invariant(backend: MemoryBackend) -> None:
    space, alloc = make(
        backend,
        pages=16,
        reserve_bytes=space_page(backend),
        background=True,
        tick=0.002,
        trim_delay=0.0,
        limit=10 * space_page(backend),
    )
    owned: list[set[int]] = [set() for _ in range(3)]
    errors: list[BaseException] = []
    stop = time.monotonic() + 1.5

    def worker(i: int) -> None:
        import random

        rng = random.Random(i)
        mine: list[list[int]] = []
        try:
            while time.monotonic() < stop:
                if mine and rng.random() < 0.5:
                    blocks = mine.pop(rng.randrange(len(mine)))
                    owned[i].difference_update(blocks)
                    alloc.free(blocks)
                else:
                    try:
                        blocks = alloc.allocate(rng.randint(1, 40))
                    except (LimitExceeded, OutOfMemory):
                        continue
                    mine.append(blocks)
                    owned[i].update(blocks)
                    for b in blocks:
                        assert space.is_mapped(space.page_of(b))
                assert space.mapped_bytes <= alloc.limit
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not (owned[0] & owned[1]) and not (owned[1] & owned[2]) and not (owned[0] & owned[2])
    assert alloc.stats().blocks_in_use == sum(len(o) for o in owned)
    alloc.close()
    space.close()


def space_page(backend: MemoryBackend) -> int:
    return BPP * SMALL.group_bytes


def test_closed_allocator_refuses(backend: MemoryBackend) -> None:
    space, alloc = make(backend)
    alloc.allocate(3)
    alloc.close()
    assert space.mapped_pages == 0
    with pytest.raises(Exception, match="closed"):
        alloc.allocate(1)
    space.close()


def test_whole_pages_go_straight_to_a_burst_and_come_back_block_by_block(backend: MemoryBackend) -> None:
    space, alloc = make(backend)
    first = alloc.allocate(2 * BPP)  # exactly two fresh pages: handed over whole
    assert sorted(first) == list(range(2 * BPP))
    assert alloc.stats().blocks_free_mapped == 0 and alloc.stats().blocks_in_use == 2 * BPP
    alloc.free(first[:3])  # blocks of a page handed over full return to the free pool one by one
    assert alloc.stats().blocks_free_mapped == 3
    again = alloc.allocate(3)
    assert sorted(again) == sorted(first[:3])
    with pytest.raises(InvalidBlockError):
        alloc.free([first[5], first[5]])
    alloc.free(first[3:] + again)
    alloc.maintain(now=10.0)
    assert alloc.stats().pages_mapped == 0
    alloc.close()
    space.close()


def test_eviction_order_puts_page_emptying_blocks_first(backend: MemoryBackend) -> None:
    space, alloc = make(backend, reserve_bytes=0)
    try:
        first = alloc.allocate(BPP)  # page 0, full
        second = alloc.allocate(3)  # page 1: three live blocks
        assert {b // BPP for b in first} == {0} and {b // BPP for b in second} == {1}
        # An engine holds first[:5] and all of page 1 in a cache, oldest first: page 1's blocks empty their
        # page when evicted, page 0's do not (27 other blocks live there).
        order = alloc.eviction_order(first[:5] + second)
        assert order[:3] == second and order[3:] == first[:5]
        assert alloc.live_in_page(1) == 3 and alloc.live_in_page(0) == BPP and alloc.live_in_page(5) == 0
    finally:
        alloc.close()
        space.close()


def test_a_ledger_that_fails_refuses_growth_and_nothing_wedges(backend: MemoryBackend, tmp_path: object) -> None:
    """Issue 20, item 1: the ledger's rows vanish under a running instance (reaped from another pid namespace,
    deleted by hand) and another process books the whole budget, so the row cannot come back. Growth is refused
    with a typed refusal, state unchanged; a second allocate in another thread returns; trim still gives memory
    back. Once the budget has room the instance joins the ledger again (counting what it holds) and grows. Close
    is prompt and every page is unmapped."""
    import sqlite3
    from pathlib import Path

    from elastikv.config import parse_size
    from elastikv.errors import BudgetUnavailable
    from elastikv.ledger import Ledger
    from elastikv.procfs import process_start_time

    ledger = Ledger("host:test-device", device_label="test", total_bytes=1024 * 1024**2,
                    directory=Path(str(tmp_path)) / "ledger", budget=parse_size("512MiB"))  # fmt: skip
    space = KVSpace(backend, SMALL, num_blocks=8 * BPP)
    budget = LedgerBudget.register(ledger, "victim", engine="test", limit=256 * 1024**2,
                                   capacity=space.num_pages * space.page_bytes, unit=space.page_bytes)  # fmt: skip
    alloc = BlockAllocator(space, budget=budget, reserve_bytes=0, background=False, trim_delay=0.0)
    held = alloc.allocate(1)
    before = alloc.stats()
    hog = (os.getppid(), process_start_time(os.getppid()), 512 * 1024**2, time.time())
    with sqlite3.connect(ledger.path) as db:
        db.execute("DELETE FROM instances")
        db.execute("INSERT INTO instances VALUES ('hog', ?, ?, 'test', ?3, ?3, ?3, ?3, 0, 0, ?4, ?4)", hog)
    with pytest.raises(BudgetUnavailable, match="booking"):
        alloc.allocate(2 * BPP)  # needs a second page: no row to book it in, none can be made
    after = alloc.stats()
    assert (after.pages_mapped, after.blocks_in_use, after.mapped_bytes) == (
        before.pages_mapped, before.blocks_in_use, before.mapped_bytes)  # fmt: skip
    answers: list[object] = []

    def again() -> None:
        try:
            answers.append(alloc.allocate(2 * BPP))
        except Exception as exc:
            answers.append(exc)

    t = threading.Thread(target=again)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive() and isinstance(answers[0], BudgetUnavailable), answers
    alloc.free(held)
    alloc.maintain(now=0.0)  # the sync fails (no row), refill and trim still run: the empty page goes
    assert alloc.stats().pages_mapped == 0
    with sqlite3.connect(ledger.path) as db:
        db.execute("DELETE FROM instances WHERE name = 'hog'")
    grown = alloc.allocate(2 * BPP)  # room again: the row is back, counting what is mapped
    assert [(r.name, r.mapped_bytes) for r in ledger.instances()] == [("victim", alloc.stats().mapped_bytes)]
    alloc.free(grown)
    t0 = time.monotonic()
    alloc.close()
    assert time.monotonic() - t0 < 5 and space.mapped_pages == 0
    alloc.free(held)  # item 5: a late free after close is a no-op, not a TypeError
    space.close()
    ledger.close()


def test_an_undeclared_side_stream_is_waited_for_before_an_unmap(backend: MemoryBackend) -> None:
    """Issue 20, item 7: a space that was told no streams fences the whole device, so a kernel an engine queued on
    a stream of its own (transformers' async batching, a forward stream) has read the page before it is unmapped."""
    if backend.name != "cuda":
        pytest.skip("the host backend has no streams")
    import torch

    space, alloc = make(backend)
    try:
        held = alloc.allocate(2 * BPP)
        block = held[-1]  # page 1
        alloc.free(held[:-1])
        view = space.buffer(0)[block]
        view.fill_(9)
        out = torch.zeros_like(view)
        side = torch.cuda.Stream(device=view.device)  # created after the space: nothing told it about this one
        torch.cuda.synchronize(view.device)
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)  # ~0.1 s before the read
            out.copy_(view)
        alloc.free([block])
        alloc.maintain(now=0.0)
        alloc.maintain(now=60.0)  # trim: fence (the whole device), then unmap
        assert not space.is_mapped(space.page_of(block))
        assert side.query(), "the unmap returned before the side stream's kernel ran"
        assert int(out.min()) == 9 == int(out.max())
    finally:
        alloc.close()
        space.close()
