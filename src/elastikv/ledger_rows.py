"""The ledger file: where it lives (private, on tmpfs), its tables (schema 1, plus the ``asleep`` and
``holdings`` tables added after it) and the rows read from them, as plain frozen dataclasses (``elastikv status``
and the router read these; only ``ledger.py`` writes the file)."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from elastikv.errors import LedgerError


def default_dir() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
    return base / f"elastikv-{os.getuid()}"


def ledger_files(directory: str | Path | None = None) -> list[Path]:
    """The ledger files in ``directory`` (default: :func:`default_dir`), one per device."""
    d = Path(directory) if directory else default_dir()
    return sorted(d.glob("*.sqlite")) if d.is_dir() else []


def _slug(device_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", device_id)


def _check_private(path: Path, want_mode: int, what: str) -> None:
    st = path.stat()
    if st.st_uid != os.getuid():
        raise LedgerError(
            f"the ledger {what} {path} belongs to uid {st.st_uid}, not you ({os.getuid()}); "
            "set ELASTIKV_LEDGER_DIR to a directory of your own"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise LedgerError(
            f"the ledger {what} {path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run: chmod {want_mode:o} {path}"
        )


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
class HoldingRow:
    """Device memory an engine process holds besides its KV cache (its weights; its CUDA context, activations,
    CUDA graphs and the allocator's cache as ``other``), booked against the same device budget. Owned by that
    process (``pid``, ``start_time``); it books it, re-books it asleep as what it still holds (no weights, its
    context as ``other``; dropped where that cannot be measured), and it is reaped with the process."""

    name: str
    pid: int
    start_time: int
    weights_bytes: int
    other_bytes: int
    since: float

    @property
    def held_bytes(self) -> int:
        return self.weights_bytes + self.other_bytes

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
    holdings: list[HoldingRow] = field(default_factory=list)

    @property
    def mapped_bytes(self) -> int:
        return sum(r.mapped_bytes for r in self.instances)

    @property
    def held_bytes(self) -> int:
        """Everything booked against the budget: KV mapped plus weights and other memory."""
        return self.mapped_bytes + sum(h.held_bytes for h in self.holdings)

    @property
    def unbooked_bytes(self) -> int:
        """The budget less everything booked against it (negative where a lowered budget is overrun)."""
        return self.budget_bytes - self.held_bytes

    def holding_of(self, name: str) -> HoldingRow | None:
        return next((h for h in self.holdings if h.name == name), None)

    def kv_room(self, name: str) -> int:
        """The most KV instance ``name`` could ever map here: the budget less every engine's holdings (weights,
        other) and the other instances' reserves (the free KV each keeps mapped, which no pressure takes back),
        within ``name``'s own limit. What others map beyond their reserves is elastic, so not counted."""
        others = sum(r.reserve_bytes for r in self.instances if r.name != name)
        room = self.budget_bytes - sum(h.held_bytes for h in self.holdings) - others
        own = next((r.limit_bytes for r in self.instances if r.name == name), room)
        return max(0, min(room, own))


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
# Added like ``asleep``: what engines hold besides KV (weights, other). One row per name and process.
_HOLDINGS_TABLE = """
CREATE TABLE IF NOT EXISTS holdings (
    name TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    start_time INTEGER NOT NULL,
    weights_bytes INTEGER NOT NULL,
    other_bytes INTEGER NOT NULL,
    since REAL NOT NULL
)
"""
_HOLDINGS_COLUMNS = "name, pid, start_time, weights_bytes, other_bytes, since"
_ASLEEP_COLUMNS = "name, owner_pid, owner_start, engine, level, since, last_wake"
_COLUMNS = (
    "name, pid, start_time, engine, limit_bytes, startup_limit_bytes, capacity_bytes, mapped_bytes, "
    "in_use_bytes, reserve_bytes, last_activity, registered"
)
