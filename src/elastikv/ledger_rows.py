"""What the ledger file holds: its tables (schema 1, plus the ``asleep`` table added after it) and the rows
read from them, as plain frozen dataclasses (``elastikv status`` and the router read these; only ``ledger.py``
writes the file)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class InstanceRow:
    name: str
    pid: int
    start_time: int
    engine: str
    limit_bytes: int
    startup_limit_bytes: int
    capacity_bytes: int
    mapped_bytes: int
    in_use_bytes: int
    reserve_bytes: int
    last_activity: float
    registered: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AsleepRow:
    """A model a router has put to sleep: it holds no KV memory (its instance row left at sleep), but it is
    there, and the next request wakes it. Owned by the router process (``owner_pid``); reaped with it."""

    name: str
    owner_pid: int
    owner_start: int
    engine: str
    level: str  # "1", "2" or "stop"
    since: float  # when it fell asleep (time.time())
    last_wake: float | None  # when it last woke, if ever

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeviceSummary:
    device_id: str
    device_label: str
    total_bytes: int
    budget_bytes: int
    budget: str
    free_bytes: int | None
    instances: list[InstanceRow]
    asleep: list[AsleepRow] = field(default_factory=list)

    @property
    def mapped_bytes(self) -> int:
        return sum(r.mapped_bytes for r in self.instances)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    name TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    start_time INTEGER NOT NULL,
    engine TEXT NOT NULL,
    limit_bytes INTEGER NOT NULL,
    startup_limit_bytes INTEGER NOT NULL,
    capacity_bytes INTEGER NOT NULL,
    mapped_bytes INTEGER NOT NULL DEFAULT 0,
    in_use_bytes INTEGER NOT NULL DEFAULT 0,
    reserve_bytes INTEGER NOT NULL DEFAULT 0,
    last_activity REAL NOT NULL,
    registered REAL NOT NULL
);
"""
# Added after schema 1 without changing it: an older elastikv ignores the table; this one makes it when missing.
_ASLEEP_TABLE = """
CREATE TABLE IF NOT EXISTS asleep (
    name TEXT PRIMARY KEY,
    owner_pid INTEGER NOT NULL,
    owner_start INTEGER NOT NULL,
    engine TEXT NOT NULL,
    level TEXT NOT NULL,
    since REAL NOT NULL,
    last_wake REAL
)
"""
_ASLEEP_COLUMNS = "name, owner_pid, owner_start, engine, level, since, last_wake"
_COLUMNS = (
    "name, pid, start_time, engine, limit_bytes, startup_limit_bytes, capacity_bytes, mapped_bytes, "
    "in_use_bytes, reserve_bytes, last_activity, registered"
)
