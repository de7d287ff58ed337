"""Budgets: where an allocator books the bytes it maps, before it maps them (allocator invariant 3).

Two kinds, one protocol (:class:`Budget`):

- :class:`LocalBudget`: a limit for one allocator in one process (no ledger: tests, ``ELASTIKV_LEDGER=off``).
- :class:`LedgerBudget`: the device's cross-process ledger (``ledger.py``), with a lease so that a burst does not
  pay one SQLite transaction per page.

Ownership: the allocator calls ``book`` before a map and ``release`` after an unmap; the budget never calls the
allocator back. The ledger owns the rows; a ``LedgerBudget`` owns one of them (its instance's) and what it has
booked there beyond its mapped bytes (the lease).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from elastikv.config import Size, format_bytes
from elastikv.errors import ConfigError, LimitExceeded, RowMissing
from elastikv.ledger import SYNC_INTERVAL, Ledger

if TYPE_CHECKING:
    from elastikv.allocator import AllocatorStats

T = TypeVar("T")


class Budget(Protocol):
    """Where mapped bytes are booked. Implementations are thread-safe and never call the allocator back.

    ``book`` is atomic: it checks the limit (and, for the cross-process ledger, the device budget) and books
    in one step, so two callers can never both pass a check and then overshoot together. It raises
    ``LimitExceeded`` saying which bound refused. ``sync`` is called by the allocator's maintainer a few
    times a second: a shared budget publishes the instance's figures and picks up limits changed elsewhere.
    """

    @property
    def limit(self) -> int: ...

    @property
    def booked(self) -> int: ...

    def book(self, nbytes: int) -> None: ...

    def release(self, nbytes: int) -> None: ...

    def set_limit(self, nbytes: int) -> None: ...

    def sync(self, stats: AllocatorStats) -> None: ...


class LocalBudget:
    """A limit for one allocator in one process."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ConfigError(f"the memory limit must be positive, got {limit}")
        self._limit = limit
        self._booked = 0
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def booked(self) -> int:
        return self._booked

    def book(self, nbytes: int) -> None:
        with self._lock:
            if self._booked + nbytes > self._limit:
                raise LimitExceeded(
                    f"mapping {format_bytes(nbytes)} more would exceed the limit of {format_bytes(self._limit)} "
                    f"({format_bytes(self._booked)} mapped)"
                )
            self._booked += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            if nbytes > self._booked:
                raise AssertionError(f"releasing {nbytes} bytes but only {self._booked} are booked")
            self._booked -= nbytes

    def set_limit(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise ConfigError(f"the memory limit must be positive, got {nbytes}")
        with self._lock:
            self._limit = nbytes

    def sync(self, stats: AllocatorStats) -> None:
        return None


class LedgerBudget:
    """The allocator's :class:`Budget` backed by the device's ledger.

    One ledger transaction costs about as much as mapping a page (~70 us on an H100 host), so a burst that
    booked page by page would pay twice. Bookings that follow each other closely therefore take a *lease*:
    the ledger books whole pages ahead (1, 2, 4... up to ``max_lease_units``, only as far as the limit and the
    device budget allow), and the next bookings are served from it locally. Unused lease is handed back when
    the instance goes quiet (``sync``), at once past the limit, and whenever it grows beyond the lease size.
    The ledger row therefore counts booked bytes: mapped ones plus at most one lease, briefly. Physical memory
    never exceeds booked bytes, and booked bytes never exceed the limits: invariant 3 holds.
    """

    DEFAULT_MAX_LEASE_UNITS = 16
    BURST_GAP = 0.25  # seconds: bookings closer than this are one burst
    QUIET = 0.5  # seconds without a booking before unused lease goes back

    def __init__(
        self,
        ledger: Ledger,
        name: str,
        limit: int,
        *,
        unit: int = 1,
        max_lease_units: int = 0,
        engine: str = "",
        capacity: int = 0,
    ) -> None:
        self.ledger = ledger
        self.engine = engine  # engine and capacity: to put the row back if it vanishes (_rejoin)
        self.capacity = capacity
        self.max_lease_units = max_lease_units
        self.name = name
        self.unit = unit
        self._limit = limit  # cached: refreshed at every ledger booking and sync
        self._booked = 0  # what the allocator holds
        self._granted = 0  # what the ledger has booked for us: _booked plus the unused lease
        self._lease_units = 0
        self._last_book = 0.0
        self._lock = threading.Lock()
        self._last_sync = 0.0
        self._last_figures: tuple[int, int, int] | None = None
        self.transactions = 0  # ledger bookings made (for tests and benchmarks)

    @classmethod
    def register(
        cls,
        ledger: Ledger,
        name: str,
        *,
        engine: str,
        limit: int,
        capacity: int,
        unit: int = 1,
        max_lease_units: int = 0,
    ) -> LedgerBudget:
        """Add this process's row ``name`` to ``ledger`` and return the budget that books through it. ``unit`` is
        the size the allocator books in (its page); bursts may book up to ``max_lease_units`` of them ahead
        (0: book exactly)."""
        ledger.add(name, engine=engine, limit=limit, capacity=capacity)
        return cls(ledger, name, limit, unit=unit, max_lease_units=max_lease_units, engine=engine, capacity=capacity)

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def booked(self) -> int:
        return self._booked

    @property
    def granted(self) -> int:
        return self._granted

    def book(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            if self._booked + nbytes > self._limit:
                self._limit = self._with_row(lambda: self.ledger.limit_of(self.name))  # raised since we looked?
            if self._booked + nbytes > self._limit:
                raise LimitExceeded(
                    f"{self.name}: mapping {format_bytes(nbytes)} more would exceed its limit of "
                    f"{format_bytes(self._limit)} ({format_bytes(self._booked)} mapped)"
                )
            if self._booked + nbytes <= self._granted:  # served from the lease: no transaction
                self._booked += nbytes
                self._last_book = now
                return
            burst = now - self._last_book < self.BURST_GAP
            self._lease_units = min(self.max_lease_units, max(1, 2 * self._lease_units)) if burst else 0
            extra = self._lease_units * self.unit
            granted, self._limit = self._with_row(  # the need is read again after a rejoin (the lease went)
                lambda: self.ledger.book(self.name, self._booked + nbytes - self._granted, extra=extra, unit=self.unit)
            )
            self.transactions += 1
            self._granted += granted
            self._booked += nbytes
            self._last_book = now

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._booked -= nbytes
            keep = max(0, min(self._lease_units * self.unit, self._limit - self._booked))  # never above the limit
            self._give_back(self._granted - self._booked - keep)

    def _give_back(self, nbytes: int) -> None:
        """Return ``nbytes`` of unused lease to the ledger. Caller holds the lock."""
        if nbytes > 0:
            self.ledger.release(self.name, nbytes)
            self._granted -= nbytes

    def set_limit(self, nbytes: int) -> None:
        row, _ = self.ledger.set_limit(self.name, Size(nbytes=nbytes))
        with self._lock:
            self._limit = row.limit_bytes
            self._give_back(self._granted - max(self._booked, self._limit))  # no lease above a lowered limit

    def sync(self, stats: AllocatorStats) -> None:
        now = time.monotonic()
        if now - self._last_sync < SYNC_INTERVAL:
            return
        self._last_sync = now
        with self._lock:
            quiet = now - self._last_book > self.QUIET
            if quiet:
                self._lease_units = 0
            if quiet or self._granted > self._limit:
                self._give_back(self._granted - self._booked)
        reserve = stats.pages_empty * stats.page_bytes
        in_use = stats.mapped_bytes - reserve
        figures = (in_use, reserve, stats.blocks_in_use)
        active = figures != self._last_figures
        self._last_figures = figures
        with self._lock:
            self._limit = self._with_row(
                lambda: self.ledger.publish(self.name, in_use=in_use, reserve=reserve, active=active)
            )

    def _with_row(self, call: Callable[[], T]) -> T:
        """``call()``; if our row has vanished, put it back first (when what we hold fits) and call again.
        Caller holds the lock. Raises ``RowMissing`` while it does not fit: growth is refused, and as memory
        is given back the next sync tries again."""
        try:
            return call()
        except RowMissing:
            need = self._booked  # what is really mapped; the lease went with the row
            if not self.ledger.rejoin(self.name, engine=self.engine, limit=self._limit, capacity=self.capacity,
                                      booked=need):  # fmt: skip
                raise
            self._granted, self._lease_units = need, 0
            return call()

    def close(self) -> None:
        self.ledger.unregister(self.name)
