"""Ledger: the cross-process book of what every elastikv instance on one device holds and may hold.

One SQLite file per device (named by the GPU's UUID, or the machine for the host backend) in a private
directory on tmpfs (``/dev/shm/elastikv-<uid>``, 0700; the file 0600). Why SQLite: real transactions
(``BEGIN IMMEDIATE`` takes the write lock before reading, so a check and a booking are one step across
processes) and crash-safe locks (POSIX locks the kernel drops when a process dies, however it dies), in the
standard library. tmpfs because nothing here must survive a reboot and fsync would only cost time.

Who owns what: each row belongs to the process whose pid and start time it carries; only that process books
and releases its bytes. Anyone may change a row's limit (the CLI does); the owner picks it up on its next
``sync`` (a few times a second) or booking. Every transaction first removes rows whose process is gone or
whose pid now belongs to another process (start time differs), so a dead instance holds nothing after the
next access by anyone.

Models asleep: a router that puts a model to sleep notes it in the ``asleep`` table (its engine's instance row
left with its KV cache), so ``elastikv status`` can list models that hold nothing but are there; the note is the
router's row (its pid and start time) and is reaped like an instance when the router is gone.

Whole models: an engine also books what it holds besides KV (its weights; ``other``: activations, CUDA graphs,
the allocator's cache) in the ``holdings`` table, against the same budget, and drops it when it sleeps. So the
budget covers what engines really hold, and a router can tell whether a model it must wake fits.

Admission (invariant 3): ``book`` checks the instance's limit and the device budget and books, in one
transaction. The device budget is the configured size or fraction (95% of the device by default), bounded
by what elastikv instances hold plus what the driver reports free, so memory taken by processes that do not
use elastikv is respected.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from elastikv.config import Size, check_name, format_bytes, parse_size
from elastikv.errors import (
    ConfigError,
    LedgerBusy,
    LedgerError,
    LimitExceeded,
    NameTaken,
    RowMissing,
    UnknownInstance,
)
from elastikv.ledger_models import ModelNotes
from elastikv.ledger_rows import (
    _ASLEEP_TABLE,
    _COLUMNS,
    _HOLDINGS_TABLE,
    _SCHEMA,
    DeviceSummary,
    InstanceRow,
    _check_private,
    _slug,
    default_dir,
    ledger_files,
)
from elastikv.procfs import holders, process_start_time

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 1
DEFAULT_BUDGET = Size(fraction=0.95)
SYNC_INTERVAL = 0.2  # seconds between an instance's stats publications / limit reads


BUSY_TIMEOUT = 10.0  # seconds a transaction waits for another process's lock before LedgerBusy


def _is_busy(exc: Exception) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and any(
        word in str(exc).lower() for word in ("database is locked", "database is busy", "database table is locked")
    )


BUSY_TRIES = 3  # SQLite answers busy at once where it will not wait: e.g. two processes making a new ledger WAL


def _busy_retried(step: Callable[[], T]) -> T:
    """``step``, tried again (after a short pause) when SQLite answers busy, up to ``BUSY_TRIES`` times: a
    lock that SQLite refuses at once, or one held by a process starved of CPU, is usually gone a moment later.
    The last busy error propagates (``LedgerBusy`` for the caller): a bounded wait, never a spin."""
    for attempt in range(1, BUSY_TRIES + 1):
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or attempt == BUSY_TRIES:
                raise
            time.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


class Ledger(ModelNotes):
    """The ledger of one device. Thread-safe; one connection per process and device."""

    def __init__(
        self,
        device_id: str,
        *,
        device_label: str = "",
        total_bytes: int,
        free_bytes: Callable[[], int] | None = None,
        directory: str | Path | None = None,
        budget: Size | None = None,
    ) -> None:
        self.device_id = device_id
        self.device_label = device_label or device_id
        self.total_bytes = total_bytes
        self._free_bytes = free_bytes
        self.directory = Path(directory) if directory else default_dir()
        self.path = self.directory / f"{_slug(device_id)}.sqlite"
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._start = process_start_time(self._pid)
        self._db = self._open()
        with self._transaction(reap=False) as db:  # the tables may not exist yet
            self._init_meta(db, budget)

    # -- opening -------------------------------------------------------------------------------------------
    @classmethod
    def open_existing(cls, path: Path) -> Ledger:
        """Open a ledger file that some instance created (for the CLI: device facts come from its meta)."""
        self = cls.__new__(cls)
        self.path = path
        self.directory = path.parent
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._start = process_start_time(self._pid)
        self._free_bytes = None
        self._db = self._open(create=False)
        meta = self._meta()
        self.device_id = meta["device_id"]
        self.device_label = meta.get("device_label", self.device_id)
        self.total_bytes = int(meta["total_bytes"])
        return self

    def _open(self, create: bool = True) -> sqlite3.Connection:
        if not self.directory.exists():
            if not create:
                raise LedgerError(f"no ledger directory at {self.directory}")
            old = os.umask(0o077)
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            finally:
                os.umask(old)
        _check_private(self.directory, 0o700, "directory")
        if self.path.exists():
            _check_private(self.path, 0o600, "file")
        elif create:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
            os.close(fd)
        else:
            raise LedgerError(f"no ledger at {self.path}")
        try:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            _busy_retried(lambda: db.execute("PRAGMA journal_mode = WAL"))
            db.execute("PRAGMA synchronous = OFF")  # tmpfs: there is no disk to be durable on
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(exc) from exc
        return db

    def _corrupt(self, exc: Exception) -> LedgerError:
        """The error for ``exc`` from SQLite: busy (another process holds the lock) or really unreadable."""
        if _is_busy(exc):
            who = ", ".join(str(p) for p in holders(self.path)) or "unknown"
            return LedgerBusy(
                f"the ledger {self.path} stayed locked ({BUSY_TRIES} tries of up to {BUSY_TIMEOUT:g} s): another "
                "elastikv process holds it "
                f"(processes with it open: {who}; a stopped one, state T in `ps`, holds it until resumed). "
                "The ledger is not damaged: do not remove it while engines run; retry, or resume or end that process"
            )
        return LedgerError(
            f"the ledger {self.path} is unreadable ({exc}); if no elastikv process is running, remove it "
            f"(rm {self.path}*) and it will be made afresh"
        )

    def _init_meta(self, db: sqlite3.Connection, budget: Size | None) -> None:
        # One statement at a time: executescript() would commit in the middle of our transaction.
        for statement in _SCHEMA.strip().split(";"):
            if statement.strip():
                db.execute(statement)
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta:
            if meta.get("schema") != str(SCHEMA_VERSION):
                raise LedgerError(
                    f"the ledger {self.path} has schema {meta.get('schema')!r}, this elastikv needs "
                    f"{SCHEMA_VERSION}; stop the other elastikv processes, then remove it"
                )
            if meta.get("device_id") != self.device_id:
                raise LedgerError(f"the ledger {self.path} belongs to device {meta.get('device_id')!r}")
        values = {
            "schema": str(SCHEMA_VERSION),
            "device_id": self.device_id,
            "device_label": self.device_label,
            "total_bytes": str(self.total_bytes),
        }
        if budget is not None:
            if meta.get("budget") not in (None, str(budget)):
                log.info("device budget of %s changed from %s to %s", self.device_label, meta.get("budget"), budget)
            values["budget"] = str(budget)
        elif "budget" not in meta:
            values["budget"] = str(DEFAULT_BUDGET)
        for key, value in values.items():
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _meta(self) -> dict[str, str]:
        try:
            with self._lock:
                return dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(exc) from exc

    # -- transactions --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self, reap: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction, dead instances reaped first. The only way this module writes."""
        with self._lock:
            db = self._db
            try:
                _busy_retried(lambda: db.execute("BEGIN IMMEDIATE"))
            except sqlite3.DatabaseError as exc:
                raise self._corrupt(exc) from exc
            try:
                db.execute(_ASLEEP_TABLE)
                db.execute(_HOLDINGS_TABLE)
                if reap:
                    self._reap(db)
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            else:
                db.execute("COMMIT")

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: a consistent view that never waits for a writer (WAL), not even one frozen in
        the middle of its transaction, so ``elastikv status`` and the router's pages keep working. Only writers
        reap: rows of dead processes can be in the view, and readers leave them out (:meth:`_alive`)."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN")  # deferred: the first SELECT takes a snapshot, not the write lock
                yield db
            except sqlite3.DatabaseError as exc:
                raise self._corrupt(exc) from exc
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")

    def _reap(self, db: sqlite3.Connection) -> None:
        try:
            rows = db.execute("SELECT name, pid, start_time FROM instances").fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(exc) from exc
        for name, pid, start in rows:
            if not self._alive(pid, start):
                db.execute("DELETE FROM instances WHERE name = ? AND pid = ?", (name, pid))
                log.info("removed instance %r of dead process %d from the ledger", name, pid)
        for name, pid, start in db.execute("SELECT name, owner_pid, owner_start FROM asleep").fetchall():
            if not self._alive(pid, start):
                db.execute("DELETE FROM asleep WHERE name = ? AND owner_pid = ?", (name, pid))
        for name, pid, start in db.execute("SELECT name, pid, start_time FROM holdings").fetchall():
            if not self._alive(pid, start):
                db.execute("DELETE FROM holdings WHERE name = ? AND pid = ?", (name, pid))

    def _alive(self, pid: int, start: int) -> bool:
        if pid == self._pid and start == self._start:
            return True
        now = process_start_time(pid)
        return not (now is None or (now != -1 and now != start))

    # -- budget --------------------------------------------------------------------------------------------
    @staticmethod
    def _held(db: sqlite3.Connection) -> int:
        """Bytes booked against the budget: KV mapped by every instance plus every engine's holdings."""
        kv = db.execute("SELECT COALESCE(SUM(mapped_bytes), 0) FROM instances").fetchone()[0]
        try:
            other = db.execute("SELECT COALESCE(SUM(weights_bytes + other_bytes), 0) FROM holdings").fetchone()[0]
        except sqlite3.OperationalError as exc:  # a reader's view of a ledger made before the table existed
            if "no such table" not in str(exc):
                raise
            other = 0
        return int(kv) + int(other)

    def _budget_bytes(self, db: sqlite3.Connection, held: int) -> int:
        spec = parse_size(db.execute("SELECT value FROM meta WHERE key = 'budget'").fetchone()[0], what="device budget")
        budget = spec.resolve(self.total_bytes)
        if self._free_bytes is not None:
            budget = min(budget, held + self._free_bytes())
        return budget

    # -- instances -----------------------------------------------------------------------------------------
    def add(self, name: str, *, engine: str, limit: int, capacity: int) -> None:
        """Add a row for this process, holding nothing yet (``budget.LedgerBudget.register`` adds one and books
        through it). Raises ``NameTaken`` while another live instance has ``name``."""
        check_name(name, "instance name")
        if limit <= 0:
            raise ConfigError(f"the memory limit of {name!r} must be positive, got {limit}")
        with self._transaction() as db:
            row = db.execute("SELECT pid FROM instances WHERE name = ?", (name,)).fetchone()
            if row is not None:
                raise NameTaken(
                    f"an instance named {name!r} is already running on {self.device_label} (pid {row[0]}); "
                    "pick another name (--name or ELASTIKV_NAME)"
                )
            self._insert(db, name, engine=engine, limit=limit, capacity=capacity, mapped=0)

    def _insert(
        self, db: sqlite3.Connection, name: str, *, engine: str, limit: int, capacity: int, mapped: int
    ) -> None:
        """This process's row for ``name`` (its limit is also its start-up limit)."""
        now = time.time()
        db.execute(
            f"INSERT INTO instances ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 0, ?, ?)",
            (name, self._pid, self._start, engine, limit, limit, capacity, mapped, now, now),
        )

    def unregister(self, name: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM instances WHERE name = ? AND pid = ?", (name, self._pid))

    def _missing(self, name: str) -> RowMissing:
        return RowMissing(
            f"instance {name!r} of pid {self._pid} is not in the ledger {self.path} (was its row deleted, or the "
            "file removed?); it joins again once what it holds fits the budget"
        )

    def rejoin(self, name: str, *, engine: str, limit: int, capacity: int, booked: int) -> bool:
        """Put this process's row back after it vanished (:class:`RowMissing`), counting the ``booked`` bytes it
        really holds, if they fit the device budget beside the others; False (nothing written) if they do not
        yet, so that the ledger never sums above the budget. Raises ``NameTaken`` if another process took the
        name meanwhile."""
        with self._transaction() as db:
            row = db.execute("SELECT pid FROM instances WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] == self._pid:
                return True
            if row is not None:
                raise NameTaken(f"{name!r} was taken by pid {row[0]} while this instance (pid {self._pid}) was out "
                                "of the ledger; it cannot grow any more: restart it under another name")  # fmt: skip
            held = self._held(db)
            if held + booked > self._budget_bytes(db, held):
                return False
            self._insert(db, name, engine=engine, limit=limit, capacity=capacity, mapped=booked)
        log.warning("instance %r is back in the ledger %s, holding %s", name, self.path, format_bytes(booked))
        return True

    def book(self, name: str, nbytes: int, *, extra: int = 0, unit: int = 1) -> tuple[int, int]:
        """Book ``nbytes`` for ``name`` if its limit and the device budget allow, plus as many whole ``unit``s
        of ``extra`` as still fit (a lease: never more than the bounds allow, never needed to succeed).
        Returns ``(bytes booked, current limit)``; raises ``LimitExceeded`` naming the bound that refused."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT mapped_bytes, limit_bytes FROM instances WHERE name = ? AND pid = ?", (name, self._pid)
            ).fetchone()
            if row is None:
                raise self._missing(name)
            mapped, limit = row
            if mapped + nbytes > limit:
                raise LimitExceeded(
                    f"{name}: mapping {format_bytes(nbytes)} more would exceed its limit of {format_bytes(limit)} "
                    f"({format_bytes(mapped)} mapped)"
                )
            held = self._held(db)
            budget = self._budget_bytes(db, held)
            if held + nbytes > budget:
                raise LimitExceeded(
                    f"{name}: the device budget of {self.device_label} is full ({format_bytes(held)} of "
                    f"{format_bytes(budget)} held by elastikv engines; {format_bytes(nbytes)} more asked)"
                )
            room = min(extra, limit - mapped - nbytes, budget - held - nbytes)
            granted = nbytes + max(0, room) // unit * unit
            db.execute(
                "UPDATE instances SET mapped_bytes = mapped_bytes + ?, last_activity = ? WHERE name = ? AND pid = ?",
                (granted, time.time(), name, self._pid),
            )
            return granted, int(limit)

    def release(self, name: str, nbytes: int) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE instances SET mapped_bytes = MAX(0, mapped_bytes - ?) WHERE name = ? AND pid = ?",
                (nbytes, name, self._pid),
            )

    def publish(self, name: str, *, in_use: int, reserve: int, active: bool) -> int:
        """Store an instance's figures; return its limit (which another process may have changed)."""
        with self._transaction() as db:
            if active:
                db.execute(
                    "UPDATE instances SET in_use_bytes = ?, reserve_bytes = ?, last_activity = ? "
                    "WHERE name = ? AND pid = ?",
                    (in_use, reserve, time.time(), name, self._pid),
                )
            else:
                db.execute(
                    "UPDATE instances SET in_use_bytes = ?, reserve_bytes = ? WHERE name = ? AND pid = ?",
                    (in_use, reserve, name, self._pid),
                )
            row = db.execute(
                "SELECT limit_bytes FROM instances WHERE name = ? AND pid = ?", (name, self._pid)
            ).fetchone()
        if row is None:
            raise self._missing(name)
        return int(row[0])

    def limit_of(self, name: str) -> int:
        with self._transaction() as db:
            row = db.execute(
                "SELECT limit_bytes FROM instances WHERE name = ? AND pid = ?", (name, self._pid)
            ).fetchone()
        if row is None:
            raise self._missing(name)
        return int(row[0])

    def set_limit(self, name: str, limit: Size | None) -> tuple[InstanceRow, str]:
        """Set ``name``'s limit (None: back to its start-up limit). Returns the row and a warning, if any."""
        warning = ""
        with self._transaction() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM instances WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise UnknownInstance(f"no running instance named {name!r} on {self.device_label}")
            inst = InstanceRow(*row)
            if limit is None:
                nbytes = inst.startup_limit_bytes
            else:
                nbytes = limit.resolve(self.total_bytes)
                if nbytes <= 0:
                    raise ConfigError(f"the limit of {name!r} must be more than zero, got {limit}")
                if nbytes > inst.capacity_bytes:
                    warning = (
                        f"{limit} is above {name}'s virtual capacity of {format_bytes(inst.capacity_bytes)}; "
                        f"its limit is {format_bytes(inst.capacity_bytes)}"
                    )
                    nbytes = inst.capacity_bytes
            db.execute("UPDATE instances SET limit_bytes = ? WHERE name = ?", (nbytes, name))
            row = db.execute(f"SELECT {_COLUMNS} FROM instances WHERE name = ?", (name,)).fetchone()
        return InstanceRow(*row), warning

    def instances(self) -> list[InstanceRow]:
        """The live instances (read without the write lock; see :meth:`_snapshot`)."""
        with self._snapshot() as db:
            return self._live_rows(db)

    def _live_rows(self, db: sqlite3.Connection) -> list[InstanceRow]:
        """Instances of live processes (a reader's view keeps dead ones until a writer reaps them)."""
        rows = [InstanceRow(*r) for r in db.execute(f"SELECT {_COLUMNS} FROM instances ORDER BY name")]
        return [r for r in rows if self._alive(r.pid, r.start_time)]

    def summary(self) -> DeviceSummary:
        """The device's rows and budget as ``elastikv status`` shows them (read without the write lock)."""
        with self._snapshot() as db:
            asleep = self._asleep_rows(db)
            rows = self._live_rows(db)
            holdings = self._holding_rows(db)
            held = sum(r.mapped_bytes for r in rows) + sum(h.held_bytes for h in holdings)
            spec = db.execute("SELECT value FROM meta WHERE key = 'budget'").fetchone()[0]
            budget = self._budget_bytes(db, held)
        free = self._free_bytes() if self._free_bytes is not None else None
        return DeviceSummary(
            self.device_id, self.device_label, self.total_bytes, budget, spec, free, rows, asleep, holdings
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def read_ledgers(
    directory: str | Path | None, read: Callable[[Ledger], T], *, skip_unreadable: bool = False
) -> list[tuple[Path, T]]:
    """``read(ledger)`` with its path, over every ledger in ``directory``, each opened and closed in turn. One that
    cannot be read (busy: a process frozen mid-transaction; damaged) raises its ``LedgerError`` (``elastikv status``
    shows it), or with ``skip_unreadable`` is logged and left out (figures that must not fail: a router's pages)."""
    out = []
    for path in ledger_files(directory):
        try:
            ledger = Ledger.open_existing(path)
            try:
                out.append((path, read(ledger)))
            finally:
                ledger.close()
        except LedgerError as exc:
            if not skip_unreadable:
                raise
            log.warning("reading the ledger %s failed (%s); its figures are left out", path, exc)
    return out


def summaries(directory: str | Path | None = None, *, skip_unreadable: bool = False) -> list[DeviceSummary]:
    """Every device's summary, from the ledgers in ``directory`` (see :func:`read_ledgers`)."""
    return [s for _, s in read_ledgers(directory, Ledger.summary, skip_unreadable=skip_unreadable)]
