"""One elastic KV cache of one engine process, wired end to end: backend, space, ledger row, allocator.

Engines (adapters, the embedded server, tests) call :func:`open_instance` with their cache geometry and get
the views to hand to their kernels and the allocator to take blocks from. It registers the instance in the
device's ledger under a unique name, applies the limit and reserve from the settings, logs one line saying
that elastikv is active, and gives everything back when the process ends.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from elastikv import lifecycle
from elastikv.allocator import BlockAllocator
from elastikv.budget import LedgerBudget
from elastikv.config import LayoutName, Settings, format_bytes
from elastikv.errors import ConfigError, LedgerError, LimitExceeded
from elastikv.ledger import Ledger
from elastikv.ledger_rows import DeviceSummary
from elastikv.memory import MemoryBackend, open_backend, physical_memory
from elastikv.memory.host import available_memory, pin_refusal
from elastikv.memory.usage import other_bytes, resident_bytes
from elastikv.page_plan import PagePlan
from elastikv.space import KVGeometry, KVSpace, Pages

log = logging.getLogger("elastikv")

# Engine adapters reach memory only through this module (the design's rule: space and allocator below it are the
# only users of ``memory/``); the backend type and the host's memory figures are re-exported for them.
__all__ = ["Booked", "DeviceFacts", "Holding", "Instance", "MemoryBackend", "available_memory", "backend_for", "book",
           "host_memory", "ledger_for", "open_holding", "open_instance", "other_bytes", "physical_memory",
           "pin_refusal", "resident_bytes", "weight_bytes"]  # fmt: skip


def backend_for(device: torch.device, settings: Settings, *, holder: str) -> MemoryBackend:
    """Open the backend that holds KV memory on ``device`` (CUDA device N, or the host), checking that
    ``ELASTIKV_BACKEND`` agrees. ``holder`` names the engine process in the error ("this vLLM worker")."""
    kind = "cuda" if device.type == "cuda" else "host"
    if settings.backend not in ("auto", kind):
        raise ConfigError(
            f"ELASTIKV_BACKEND={settings.backend}, but {holder} keeps its KV cache on {device}; "
            f"unset ELASTIKV_BACKEND or set it to {kind}"
        )
    index = (device.index if device.index is not None else torch.cuda.current_device()) if kind == "cuda" else 0
    return open_backend(kind, device=index, host_memory=host_memory(settings))


def host_memory(settings: Settings) -> int | None:
    """The host backend's pretend device size from ELASTIKV_HOST_MEMORY (a size, or a share of the RAM)."""
    if settings.host_memory is None:
        return None
    return settings.host_memory.resolve(physical_memory())


@dataclass(frozen=True)
class DeviceFacts:
    """The device an instance's pages live on, as the ledger needs it. ``free_bytes`` is asked when the device's
    ledger is created (it sets the default device budget)."""

    device_id: str
    label: str
    total_bytes: int
    free_bytes: Callable[[], int]

    @classmethod
    def of(cls, backend: MemoryBackend) -> DeviceFacts:
        return cls(backend.device_id, backend.device_label, backend.mem_info()[1], lambda: backend.mem_info()[0])


@dataclass
class Booked:
    """An allocator over some pages, booked in the device's ledger under ``name``. Closed at process exit."""

    name: str
    engine: str
    ledger: Ledger
    budget: LedgerBudget
    allocator: BlockAllocator
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        """Unmap everything, leave the ledger, then release what the subclass owns. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        lifecycle.forget(self.close)
        try:
            self.allocator.close()
        finally:
            self.budget.close()
            self.ledger.close()
            self._release()

    def _release(self) -> None:
        pass

    def room_blocks(self) -> int | None:
        """The most blocks this instance could ever hold (``DeviceSummary.kv_room``, in whole pages), or None when
        the ledger cannot be read now (busy, gone): callers then skip their check rather than fail on it."""
        try:
            summary = self.ledger.summary()
        except LedgerError as exc:
            log.debug("elastikv: %s: no ledger figures for the room check: %s", self.name, exc)
            return None
        return self._room_blocks(summary)

    def _room_blocks(self, summary: DeviceSummary) -> int:
        return summary.kv_room(self.name) // self.allocator.page_bytes * self.allocator.blocks_per_page

    def require_room(self, blocks: int, *, what: str, fix: str) -> None:
        """Refuse to serve (``ConfigError``) when the device budget can never give this instance ``blocks`` blocks
        of KV (``what``: "one 4096-token request"), rather than let such requests wait for ever. Called once
        the engine's weights are booked; ``fix`` names the engine's own way out (a flag to lower)."""
        summary = self.ledger.summary()
        room = self._room_blocks(summary)
        if room >= blocks:
            return
        block_bytes = self.allocator.block_bytes
        held = ", ".join(f"{h.name} {format_bytes(h.held_bytes)}" for h in summary.holdings) or "none"
        raise ConfigError(
            f"elastikv: {self.name} could never hold {what} ({format_bytes(blocks * block_bytes)} of KV): the "
            f"device budget of {summary.device_label}, {format_bytes(summary.budget_bytes)}, leaves it "
            f"{format_bytes(room * block_bytes)} after what engines hold besides KV (booked: {held}) and the other "
            f"engines' KV reserves. Raise ELASTIKV_DEVICE_BUDGET, {fix}, or keep weights out of the budget with "
            "ELASTIKV_BOOK_WEIGHTS=off"
        )

    def __enter__(self) -> Booked:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Instance(Booked):
    """One elastic KV cache whose pages are in this process: the backend, the space and its views."""

    backend: MemoryBackend = field(default=None)  # type: ignore[assignment]  # always given by open_instance
    space: KVSpace = field(default=None)  # type: ignore[assignment]
    owns_backend: bool = False  # opened by open_instance (not passed in): closed with the instance

    def _release(self) -> None:
        self.space.close()
        if self.owns_backend:
            self.backend.close()

    def __enter__(self) -> Instance:
        return self


def open_instance(
    geometry: KVGeometry,
    *,
    engine: str = "elastikv",
    name: str | None = None,
    settings: Settings | None = None,
    backend: MemoryBackend | None = None,
    layout: LayoutName | None = None,
    num_blocks: int | None = None,
    null_blocks: int = 0,
    plan: PagePlan | None = None,
    streams: Sequence[int] | None = None,
) -> Instance:
    """Open an elastic KV cache for ``geometry`` (see the module docstring). ``plan``: the page plan an engine
    sized its cache with (then ``layout``, ``num_blocks``, ``null_blocks`` and ``ELASTIKV_CHUNK`` are the plan's;
    the plan must have been made with the same settings). ``streams``: the raw CUDA stream handles whose queued
    work must finish before a page is unmapped (default: KVSpace's)."""
    settings = settings or Settings.from_env()
    owns_backend = backend is None
    if backend is None:
        backend = open_backend(settings.backend, device=settings.device, host_memory=host_memory(settings))
    try:
        return _open(
            geometry, backend, owns_backend, engine, name, settings, layout, num_blocks, null_blocks, plan, streams
        )
    except BaseException:
        if owns_backend:
            backend.close()
        raise


def _open(
    geometry: KVGeometry,
    backend: MemoryBackend,
    owns_backend: bool,
    engine: str,
    name: str | None,
    settings: Settings,
    layout: LayoutName | None,
    num_blocks: int | None,
    null_blocks: int,
    plan: PagePlan | None,
    streams: Sequence[int] | None,
) -> Instance:
    space = KVSpace(  # with a plan, KVSpace refuses sizing arguments that contradict it
        backend,
        geometry,
        layout=layout or (None if plan else settings.layout),
        num_blocks=num_blocks,
        min_chunk_bytes=None if plan else settings.min_chunk_bytes,
        null_blocks=null_blocks,
        plan=plan,
        streams=streams,
    )
    try:
        name, ledger, budget, allocator = book(
            space, DeviceFacts.of(backend), engine=engine, name=name, settings=settings
        )
    except BaseException:
        space.close()
        raise
    inst = Instance(name, engine, ledger, budget, allocator, backend=backend, space=space, owns_backend=owns_backend)
    lifecycle.on_exit(inst.close)
    log.info(
        "elastikv active: engine=%s name=%s device=%s layout=%s %s",
        engine,
        name,
        backend.device_label,
        space.layout,
        _figures(inst),
    )
    return inst


@dataclass
class Holding:
    """What one engine process holds on a device besides its KV cache (weights; ``other``: its CUDA context,
    activations, CUDA graphs, the allocator's cache; ``memory/usage.py``), booked in the device's ledger under the
    engine's name against the same budget as KV. The engine books it *before* it puts weights on the device (a
    refusal means: do not load them) and, once they are off (asleep), books only what it still holds
    (``rest``). Owned by this process; gone with it."""

    name: str
    ledger: Ledger
    backend: MemoryBackend
    weights: int = 0
    other: int = 0

    def book(self, *, weights: int, other: int = 0) -> None:
        """Book (or re-book) the holding; ``LimitExceeded`` if the device budget cannot take it (the booking is
        then as it was: the caller must not load what it asked for)."""
        self.ledger.hold(self.name, weights=weights, other=other)
        self.weights, self.other = weights, other

    def book_held(self, *, weights: int, other: int = 0) -> bool:
        """Book memory the engine already holds (loaded before elastikv could ask): a budget that cannot take it
        is logged, not raised, since refusing would not give the memory back. False then (booking unchanged)."""
        try:
            self.book(weights=weights, other=other)
        except LimitExceeded as exc:
            log.warning("elastikv: %s held by %s is over the device budget: %s", format_bytes(weights + other),
                        self.name, exc)  # fmt: skip
            return False
        return True

    def rest(self, resident: int) -> None:
        """After the weights left the device (asleep): book what the process still holds there (``resident``: its
        CUDA context, graph pools; ``memory/usage.py``) in place of weights and other, or drop the booking where
        that is unknown (0). Shrinking a booking always fits; were the ledger to refuse, the larger one stays."""
        if resident <= 0:
            self.drop()
        elif self.book_held(weights=0, other=resident):
            log.debug("elastikv: %s asleep still holds %s", self.name, format_bytes(resident))

    def drop(self) -> None:
        self.ledger.drop_holding(self.name)
        self.weights = self.other = 0

    def close(self) -> None:
        lifecycle.forget(self.close)
        try:
            self.drop()
        finally:
            self.ledger.close()
            self.backend.close()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each storage counted once (tied weights share one)."""
    seen: dict[tuple[str, int], int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def open_holding(device: torch.device, settings: Settings, *, name: str) -> Holding | None:
    """The ledger booking for an engine's non-KV memory on ``device``, or None where the settings say not to
    book it (``ELASTIKV_BOOK_WEIGHTS``: auto books on a GPU only)."""
    if settings.book_weights == "off" or (settings.book_weights == "auto" and device.type != "cuda"):
        return None
    backend = backend_for(device, settings, holder="this engine")
    try:
        ledger = ledger_for(DeviceFacts.of(backend), settings)
    except BaseException:
        backend.close()
        raise
    holding = Holding(name, ledger, backend)
    lifecycle.on_exit(holding.close)
    return holding


def _figures(inst: Booked) -> str:
    a = inst.allocator
    return f"virtual capacity={format_bytes(a.capacity_bytes)} limit={format_bytes(a.limit)}"


def ledger_for(device: DeviceFacts, settings: Settings) -> Ledger:
    """The device's ledger, opened (made if new) with the settings' directory and budget."""
    return Ledger(
        device.device_id,
        device_label=device.label,
        total_bytes=device.total_bytes,
        free_bytes=device.free_bytes,
        directory=settings.ledger_dir,
        budget=settings.device_budget,
    )


def book(
    pages: Pages, device: DeviceFacts, *, engine: str, name: str | None, settings: Settings
) -> tuple[str, Ledger, LedgerBudget, BlockAllocator]:
    """Register ``pages`` in the device's ledger and put an allocator over them, with the limit and reserve the
    settings give. Everything made is given back if a later step fails."""
    capacity = pages.num_pages * pages.page_bytes
    total = device.total_bytes
    limit = settings.limit.resolve(total)
    if limit > capacity:
        if settings.limit.fraction != 1.0:  # the default (100%) is silently the capacity
            log.warning(
                "limit %s is above the virtual capacity %s; using %s",
                settings.limit,
                format_bytes(capacity),
                format_bytes(capacity),
            )
        limit = capacity
    name = name or settings.name or f"{engine}-{os.getpid()}"
    ledger = ledger_for(device, settings)
    try:
        budget = LedgerBudget.register(
            ledger,
            name,
            engine=engine,
            limit=limit,
            capacity=capacity,
            unit=pages.page_bytes,
            max_lease_units=LedgerBudget.DEFAULT_MAX_LEASE_UNITS,
        )
    except BaseException:
        ledger.close()
        raise
    try:
        allocator = BlockAllocator(pages, budget=budget, reserve_bytes=settings.reserve.resolve(total))
    except BaseException:
        budget.close()
        ledger.close()
        raise
    return name, ledger, budget, allocator
