"""One elastic KV cache of one engine process, wired end to end: backend, space, ledger row, allocator.

Engines (adapters, the embedded server, tests) call :func:`open_instance` with their cache geometry and get
the views to hand to their kernels and the allocator to take blocks from. It registers the instance in the
device's ledger under a unique name, applies the limit and reserve from the settings, logs one line saying
that elastikv is active, and gives everything back when the process ends.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from elastikv import lifecycle
from elastikv.allocator import BlockAllocator
from elastikv.config import LayoutName, Settings, format_bytes
from elastikv.ledger import Ledger, LedgerBudget
from elastikv.memory import MemoryBackend, open_backend, physical_memory
from elastikv.space import KVGeometry, KVSpace

log = logging.getLogger("elastikv")


def host_memory(settings: Settings) -> int | None:
    """The host backend's pretend device size from ELASTIKV_HOST_MEMORY (a size, or a share of the RAM)."""
    if settings.host_memory is None:
        return None
    return settings.host_memory.resolve(physical_memory())


@dataclass
class Instance:
    name: str
    engine: str
    backend: MemoryBackend
    space: KVSpace
    ledger: Ledger
    budget: LedgerBudget
    allocator: BlockAllocator
    owns_backend: bool = False  # opened by open_instance (not passed in): closed with the instance
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        """Unmap everything, leave the ledger, free the address space. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        lifecycle.forget(self.close)
        try:
            self.allocator.close()
        finally:
            self.budget.close()
            self.space.close()
            self.ledger.close()
            if self.owns_backend:
                self.backend.close()

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
) -> Instance:
    settings = settings or Settings.from_env()
    owns_backend = backend is None
    if backend is None:
        backend = open_backend(settings.backend, device=settings.device, host_memory=host_memory(settings))
    try:
        return _open(geometry, backend, owns_backend, engine, name, settings, layout, num_blocks, null_blocks)
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
) -> Instance:
    _, total = backend.mem_info()
    space = KVSpace(backend, geometry, layout=layout or settings.layout, num_blocks=num_blocks, null_blocks=null_blocks)
    capacity = space.num_pages * space.page_bytes
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
    try:
        ledger = Ledger(
            backend.device_id,
            device_label=backend.device_label,
            total_bytes=total,
            free_bytes=lambda: backend.mem_info()[0],
            directory=settings.ledger_dir,
            budget=settings.device_budget,
        )
    except BaseException:
        space.close()
        raise
    try:
        budget = ledger.register(
            name,
            engine=engine,
            limit=limit,
            capacity=capacity,
            unit=space.page_bytes,
            max_lease_units=LedgerBudget.DEFAULT_MAX_LEASE_UNITS,
        )
    except BaseException:
        ledger.close()
        space.close()
        raise
    try:
        allocator = BlockAllocator(space, budget=budget, reserve_bytes=settings.reserve.resolve(total))
    except BaseException:
        budget.close()
        ledger.close()
        space.close()
        raise
    inst = Instance(name, engine, backend, space, ledger, budget, allocator, owns_backend)
    lifecycle.on_exit(inst.close)
    log.info(
        "elastikv active: engine=%s name=%s device=%s layout=%s virtual capacity=%s limit=%s",
        engine,
        name,
        backend.device_label,
        space.layout,
        format_bytes(capacity),
        format_bytes(limit),
    )
    return inst
