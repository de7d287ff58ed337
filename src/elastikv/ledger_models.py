"""What a device's ledger knows about whole models besides their KV rows: what each engine holds besides KV
(its ``holdings``: weights and other working memory, booked against the same budget) and the models a router
has put to sleep (its ``asleep`` notes). A part of :class:`~elastikv.ledger.Ledger` (its base class), kept apart
so that each file reads in one sitting; it writes only through the ledger's one transaction.

Who owns what: a holding belongs to the engine process that booked it (pid and start time), an asleep note to
the router that wrote it; both are reaped with their process (``Ledger._reap``).
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from elastikv.config import format_bytes
from elastikv.errors import ConfigError, LimitExceeded, NameTaken
from elastikv.ledger_rows import _ASLEEP_COLUMNS, _HOLDINGS_COLUMNS, AsleepRow, HoldingRow


class ModelNotes:
    if TYPE_CHECKING:  # provided by Ledger
        device_label: str
        _pid: int
        _start: int | None

        def _transaction(self, reap: bool = True) -> AbstractContextManager[sqlite3.Connection]: ...
        def _snapshot(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _alive(self, pid: int, start: int) -> bool: ...
        def _held(self, db: sqlite3.Connection) -> int: ...
        def _budget_bytes(self, db: sqlite3.Connection, held: int) -> int: ...

    # -- what engines hold besides KV -------------------------------------------------------------------------
    def hold(self, name: str, *, weights: int, other: int) -> None:
        """Book (or re-book) this process's holdings under ``name``: ``weights`` and ``other`` bytes of device
        memory it holds besides KV. Raises ``LimitExceeded`` (nothing written) if the device budget cannot take
        them beside what everyone else holds: the engine must not load them then."""
        if weights < 0 or other < 0:
            raise ConfigError(f"holdings of {name!r} must not be negative, got weights={weights} other={other}")
        with self._transaction() as db:
            row = db.execute("SELECT pid FROM holdings WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != self._pid:
                raise NameTaken(f"an engine named {name!r} already holds memory on {self.device_label} (pid "
                                f"{row[0]}); pick another name (--name or ELASTIKV_NAME)")  # fmt: skip
            db.execute("DELETE FROM holdings WHERE name = ? AND pid = ?", (name, self._pid))
            held = self._held(db)
            budget = self._budget_bytes(db, held)
            if held + weights + other > budget:
                raise LimitExceeded(
                    f"{name}: the device budget of {self.device_label} cannot take its weights and working memory "
                    f"({format_bytes(weights + other)}) beside the {format_bytes(held)} of {format_bytes(budget)} "
                    "held by elastikv engines; put a model to sleep or raise the budget (ELASTIKV_DEVICE_BUDGET)"
                )
            db.execute(
                f"INSERT INTO holdings ({_HOLDINGS_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (name, self._pid, self._start, weights, other, time.time()),
            )

    def drop_holding(self, name: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM holdings WHERE name = ? AND pid = ?", (name, self._pid))

    def _holding_rows(self, db: sqlite3.Connection) -> list[HoldingRow]:
        try:
            rows = [HoldingRow(*r) for r in db.execute(f"SELECT {_HOLDINGS_COLUMNS} FROM holdings ORDER BY name")]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        return [r for r in rows if self._alive(r.pid, r.start_time)]

    # -- models asleep (a router's note) ----------------------------------------------------------------------
    def mark_asleep(self, name: str, *, engine: str, level: str, last_wake: float | None) -> None:
        """Note that this process (a router) has put model ``name`` to sleep; ``elastikv status`` shows it."""
        with self._transaction() as db:
            db.execute(
                f"INSERT OR REPLACE INTO asleep ({_ASLEEP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, self._pid, self._start, engine, level, time.time(), last_wake),
            )

    def mark_awake(self, name: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM asleep WHERE name = ? AND owner_pid = ?", (name, self._pid))

    def asleep(self) -> list[AsleepRow]:
        with self._snapshot() as db:
            return self._asleep_rows(db)

    def _asleep_rows(self, db: sqlite3.Connection) -> list[AsleepRow]:
        """Models noted asleep by a live router (none in a ledger made before that table existed)."""
        try:
            rows = [AsleepRow(*r) for r in db.execute(f"SELECT {_ASLEEP_COLUMNS} FROM asleep ORDER BY name")]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        return [r for r in rows if self._alive(r.owner_pid, r.owner_start)]

    def holdings(self) -> list[HoldingRow]:
        with self._snapshot() as db:
            return self._holding_rows(db)
