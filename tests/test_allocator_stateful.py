"""Invariants 1-4 of DESIGN.md, checked after every step of random allocate/free/limit/maintain sequences,
with real out-of-memory from the backend mixed in (the device is filled with real chunks, then emptied), and, in
the faulty variant, failures injected at random points into the ledger (every call raises while it is "down"),
page maps and page unmaps: every fault leaves the allocator consistent and ends in a refusal or a quarantine."""

from __future__ import annotations

import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from tests.conftest import SMALL, device_filled, open_test_backend, used_bytes

from elastikv.allocator import LOST, BlockAllocator
from elastikv.budget import LedgerBudget
from elastikv.errors import AllocationRefused, DriverError, LedgerError, LimitExceeded
from elastikv.ledger import Ledger
from elastikv.space import KVSpace

NUM_PAGES = 8


class FaultySpace(KVSpace):
    """A real KVSpace whose maps and unmaps fail, before touching anything, while told to (a driver error)."""

    fail_map = False
    fail_unmap = False

    def map_page(self, page: int) -> None:
        if self.fail_map:
            raise DriverError("cuMemMap", "INJECTED", "an injected driver failure")
        super().map_page(page)

    def unmap_page(self, page: int) -> None:
        if self.fail_unmap:
            raise DriverError("cuMemUnmap", "INJECTED", "an injected driver failure")
        super().unmap_page(page)


class DownLedger:
    """The real ledger, behind a switch: while ``down``, every call raises (a ledger busy past its wait, its row
    reaped, its file gone)."""

    def __init__(self, real: Ledger) -> None:
        self.real = real
        self.down = False

    def __getattr__(self, name: str) -> object:
        attr = getattr(self.real, name)
        if not callable(attr):
            return attr

        def call(*args: object, **kwargs: object) -> object:
            if self.down:
                raise LedgerError("injected: the ledger is unavailable")
            return attr(*args, **kwargs)

        return call


def make_machine(
    kind: str, layout: str, through_ledger: bool = False, scratch: bool = False, faults: bool = False
) -> type[RuleBasedStateMachine]:
    class AllocatorMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.backend = open_test_backend(kind)
            self.space = (FaultySpace if faults else KVSpace)(
                self.backend, SMALL, layout=layout, num_blocks=NUM_PAGES * 32, null_blocks=1, scratch_backed=scratch
            )
            self.page = self.space.page_bytes
            self.ledger = None
            self.ledger_dir: str | None = None
            budget = None
            if through_ledger:  # book through a real ledger, with leases, as engine processes do
                self.ledger_dir = tempfile.mkdtemp(prefix="elastikv-test-")
                self.ledger = Ledger(
                    self.backend.device_id, total_bytes=NUM_PAGES * 4 * self.page, directory=self.ledger_dir
                )
                capacity = NUM_PAGES * self.page
                budget = LedgerBudget.register(
                    self.ledger,
                    "m",
                    engine="test",
                    limit=capacity,
                    capacity=capacity,
                    unit=self.page,
                    max_lease_units=4,
                )
                if faults:
                    self.down = DownLedger(self.ledger)
                    budget.ledger = self.down  # type: ignore[assignment]
            self.alloc = BlockAllocator(
                self.space, reserve_bytes=self.page, background=False, trim_delay=0.0, budget=budget
            )
            self.live: dict[int, list[int]] = {}  # allocation number -> its blocks
            self.next_id = 0
            self.now = 0.0
            self.filler: object | None = None
            self.baseline = used_bytes(self.backend) - self.space.mapped_bytes  # (scratch included)

        def teardown(self) -> None:
            if self.filler is not None:
                self.filler.__exit__(None, None, None)
            if faults:
                self.down.down = self.space.fail_map = self.space.fail_unmap = False  # type: ignore[attr-defined]
            lost = self.lost_pages()
            self.alloc.close()
            assert self.space.mapped_bytes == lost * self.page  # quarantined pages stay mapped, and only they
            if self.ledger is not None:
                self.ledger.close()
                shutil.rmtree(self.ledger_dir or "", ignore_errors=True)  # one per hypothesis example
            self.space.close()
            self.backend.close()

        def lost_pages(self) -> int:
            return sum(state == LOST for state in self.alloc._state)  # quarantined: an unmap failed

        @precondition(lambda self: faults)
        @rule(what=st.sampled_from(["ledger", "map", "unmap"]), on=st.booleans())
        def inject(self, what: str, on: bool) -> None:
            event(f"fault {what} {'on' if on else 'off'}")
            if what == "ledger":
                self.down.down = on
            elif what == "map":
                self.space.fail_map = on  # type: ignore[attr-defined]
            else:
                self.space.fail_unmap = on  # type: ignore[attr-defined]

        def snapshot(self) -> tuple[object, ...]:
            s = self.alloc.stats()
            pages = tuple(self.space.is_mapped(p) for p in range(self.space.num_pages))
            return (s.blocks_in_use, s.blocks_free_mapped, s.pages_mapped, s.mapped_bytes, pages)

        @rule(n=st.integers(1, 100))
        def allocate(self, n: int) -> None:
            before, lost_before = self.snapshot(), self.lost_pages()
            limit_before = self.alloc.limit
            try:
                blocks = self.alloc.allocate(n)
            except AllocationRefused as exc:
                event(f"refused: {type(exc).__name__}")
                # Invariant 4: a refusal changes nothing, maps nothing half-way, books nothing; except that
                # when the rollback's own unmap fails (injected), those pages stay mapped and booked, quarantined.
                after, lost = self.snapshot(), self.lost_pages() - lost_before
                assert after[:3] == before[:3] and after[3] == before[3] + lost * self.page, type(exc).__name__
                assert sum(after[4]) == sum(before[4]) + lost, (after[4], before[4], lost)
                return
            assert len(blocks) == n
            self.live[self.next_id] = blocks
            self.next_id += 1
            # Invariant 3: growth never takes mapped memory past the limit.
            if self.space.mapped_bytes > before[3]:
                assert self.space.mapped_bytes <= limit_before

        @precondition(lambda self: self.live)
        @rule(data=st.data())
        def free(self, data: st.DataObject) -> None:
            key = data.draw(st.sampled_from(sorted(self.live)))
            blocks = self.live.pop(key)
            self.alloc.free(blocks)

        @precondition(lambda self: self.live)
        @rule(data=st.data())
        def double_free_is_refused(self, data: st.DataObject) -> None:
            key = data.draw(st.sampled_from(sorted(self.live)))
            blocks = self.live[key]
            self.alloc.free(blocks)
            before = self.snapshot()
            try:
                self.alloc.free(blocks)
            except ValueError:
                pass
            else:
                raise AssertionError("freeing freed blocks must raise")
            assert self.snapshot() == before
            del self.live[key]

        @rule(pages=st.integers(1, NUM_PAGES + 2))
        def set_limit(self, pages: int) -> None:
            before = self.snapshot()
            try:
                self.alloc.set_limit(pages * self.page)
            except LedgerError:  # a user's request while the ledger is down: a clear error, nothing changed
                assert faults and self.snapshot() == before

        @rule(dt=st.sampled_from([0.0, 0.1, 2.0]))
        def maintain(self, dt: float) -> None:
            self.now += dt
            limit = self.alloc.limit
            before = self.space.mapped_bytes
            self.alloc.maintain(now=self.now)
            if self.space.mapped_bytes > before:
                assert self.space.mapped_bytes <= limit

        @rule(leave_pages=st.integers(0, 3))
        def fill_device(self, leave_pages: int) -> None:
            if self.filler is not None:
                self.filler.__exit__(None, None, None)
            self.filler = device_filled(self.backend, leave_pages * self.page + self.backend.granularity)
            self.filler.__enter__()

        @precondition(lambda self: self.filler is not None)
        @rule()
        def empty_device(self) -> None:
            self.filler.__exit__(None, None, None)
            self.filler = None

        @invariant()
        def blocks_are_unique_and_mapped(self) -> None:
            held = [b for blocks in self.live.values() for b in blocks]
            assert len(held) == len(set(held)), "invariant 1: a block was handed out twice"
            assert all(b >= 1 for b in held), "a null block was handed out"
            for b in held:
                assert self.space.is_mapped(self.space.page_of(b)), "invariant 2: live block in unmapped page"
            assert self.alloc.stats().blocks_in_use == len(held)

        @invariant()
        def bookkeeping_matches_the_device(self) -> None:
            s = self.alloc.stats()
            # Booked bytes are exactly the memory mapped: quarantined pages stay booked and mapped.
            assert s.mapped_bytes == self.space.mapped_bytes == (s.pages_mapped + self.lost_pages()) * self.page
            if self.ledger is not None:  # the ledger books at least what is mapped, never past the limit
                row = self.ledger.instances()[0]
                assert s.mapped_bytes <= row.mapped_bytes
                if not faults:  # (a release that failed leaves the row over, until a sync publishes the truth)
                    assert row.mapped_bytes <= max(row.limit_bytes, s.mapped_bytes)
            if kind == "host":  # the host device is ours alone: its use is exactly what is mapped
                filled = sum(c.size for c in self.filler.gen.gi_frame.f_locals["chunks"]) if self.filler else 0
                assert used_bytes(self.backend) == self.baseline + self.space.mapped_bytes + filled

    AllocatorMachine.__name__ = f"AllocatorMachine_{kind}_{layout}"
    return AllocatorMachine


_settings = settings(max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck))

TestHostInterleaved = _settings(make_machine("host", "interleaved")).TestCase
TestHostPerLayer = _settings(make_machine("host", "per-layer")).TestCase
TestHostThroughLedger = _settings(make_machine("host", "interleaved", through_ledger=True)).TestCase
TestHostScratchBacked = _settings(make_machine("host", "per-layer", scratch=True)).TestCase
TestHostFaults = _settings(make_machine("host", "per-layer", through_ledger=True, scratch=True, faults=True)).TestCase
# On a GPU, filling the device takes real driver calls over ~80 GB: fewer examples, same rules.
_gpu_settings = settings(_settings, max_examples=25)
TestCudaInterleaved = pytest.mark.gpu(_gpu_settings(make_machine("cuda", "interleaved")).TestCase)
TestCudaPerLayer = pytest.mark.gpu(_gpu_settings(make_machine("cuda", "per-layer")).TestCase)
TestCudaScratchBacked = pytest.mark.gpu(_gpu_settings(make_machine("cuda", "interleaved", scratch=True)).TestCase)


def test_limit_refusal_is_limit_exceeded() -> None:
    backend = open_test_backend("host")
    with KVSpace(backend, SMALL, num_blocks=4 * 32) as space:
        alloc = BlockAllocator(space, limit=2 * space.page_bytes, reserve_bytes=0, background=False)
        alloc.allocate(64)
        with pytest.raises(LimitExceeded) as info:
            alloc.allocate(1)
        assert info.value.requested == 1 and info.value.available == 0
        alloc.close()
    backend.close()
