"""The router's state: every model it serves, the HTTP client that reaches their engines, the idle watch.

Who owns what: the ``Router`` owns one ``ManagedModel`` per configured model (each owning its engine process),
one ``httpx.AsyncClient`` shared by all of them, and the task that puts idle models to sleep. ``start`` checks
that every configured engine port is free, brings every engine up at once and waits for all of them; if one
fails, the others are stopped and ``EngineStartFailed`` says which and why (the end of its log). ``stop`` ends
them all and leaves no instance of theirs in the ledger (a process that ended holds nothing after the next ledger
access, invariant 6: ``stop`` makes that access).

The router also notes in the ledger which of its models sleep (``Ledger.mark_asleep``), so that
``elastikv status`` lists them while they hold no memory; the notes go with the router (they carry its pid).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx

from elastikv import ports
from elastikv.config import Settings
from elastikv.errors import ElastikvError, EngineStartFailed, LedgerError
from elastikv.ledger import Ledger, read_ledgers, summaries
from elastikv.ledger_rows import DeviceSummary, ledger_files
from elastikv.router.config import ModelSpec, RouterConfig
from elastikv.router.room import Room
from elastikv.router.states import EngineExited, ModelConflict
from elastikv.router.supervisor import DRAIN_TIMEOUT_S, PORT_FIX, ManagedModel

log = logging.getLogger("elastikv.router")

WATCH_EVERY_S = 0.25
AHEAD_EVERY_S = 1.0  # how often the watch looks for room to make ahead of a wake (a ledger read when it could)


free_port = ports.free_port


class Router:
    def __init__(self, config: RouterConfig, *, log_dir: str | Path | None = None) -> None:
        self.config = config
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="elastikv-serve-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # No read timeout: a long generation may stream for minutes; connecting is what must be quick.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=5.0),
            # Idle connections are dropped before the engine's server drops them (uvicorn: after 5 s), so a request
            # never goes out on a connection the other end is closing at that moment.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0),
        )
        self.models: dict[str, ManagedModel] = {}
        self.room = Room(self.models, self.device_summary)
        for spec in config.models:
            self.models[spec.name] = self._managed(spec)
        self._watch_task: asyncio.Task[None] | None = None
        self._ahead_task: asyncio.Task[None] | None = None  # room.make_room_ahead, one at a time (room_ahead)
        self._ahead_at = 0.0  # when the watch last started it
        self._ledger_of: dict[str, Path] = {}  # the ledger file each model's instance row was last seen in
        self._changing: dict[str, ManagedModel] = {}  # models being added or removed at run time (admin)

    def _managed(self, spec: ModelSpec) -> ManagedModel:
        model = ManagedModel(spec, spec.port or free_port(), self.client, self.log_dir)
        model.note_asleep = self._note_asleep
        model.room_for_wake = self.room.for_wake
        return model

    async def start(self) -> None:
        """Start every engine and wait until all answer. Raises ``PortInUse`` before starting anything if a
        configured port is taken, ``EngineStartFailed`` (the others stopped) if an engine does not come up."""
        for m in self.models.values():
            if m.spec.port is not None:
                ports.check_free("127.0.0.1", m.port, what=f"model {m.spec.name!r}", fix=PORT_FIX)
        first = [m for m in self.models.values() if m.spec.start == "awake"]  # "lazy": at its first request
        log.info("starting %d engine(s); their logs are in %s", len(first), self.log_dir)
        results = await asyncio.gather(*(m.start() for m in first), return_exceptions=True)
        failed = [(m, r) for m, r in zip(first, results, strict=True) if isinstance(r, BaseException)]
        for m in self.models.values():  # "asleep": loaded, then put to sleep, one at a time (each makes room)
            if m.spec.start != "asleep" or failed:
                continue
            try:
                await self._start_asleep(m)
            except BaseException as problem:
                failed.append((m, problem))
        if failed:
            await asyncio.gather(*(m.close() for m in self.models.values()), return_exceptions=True)
            for _m, exc in failed:
                if not isinstance(exc, Exception):
                    raise exc  # a cancellation (Ctrl-C while starting): the engines are stopped already
            raise EngineStartFailed("\n\n".join(str(exc) for _m, exc in failed))
        await asyncio.get_running_loop().run_in_executor(None, self.ledger_rows)  # learn where each model books
        c = self.config
        log.info("serving %s on http://%s:%d/v1", ", ".join(self.models), c.host, c.port)
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_models())

    async def _start_asleep(self, m: ManagedModel) -> None:
        async with self.room.for_wake(m):
            await m.start()
        await m.sleep(reason="start: asleep")

    # -- models added and removed while serving (admin) ---------------------------------------------------------
    async def add_model(self, spec: ModelSpec) -> ManagedModel:
        """Serve ``spec`` from now on, started as its ``start`` says (awake: up and healthy before this returns;
        asleep: loaded, then asleep; lazy: at its first request). Requests see the model only once it is ready.
        Raises ``ModelConflict`` (a name served or being changed, a port taken), ``EngineStartFailed`` with the
        end of its log (nothing of it left running, nothing in the ledger), or ``Unavailable`` (no room on the
        device). Not written to the config file: a restarted router serves what its file lists."""
        if spec.name in self.models:
            raise ModelConflict(f"model {spec.name!r} is already served; remove it first (DELETE /admin/models/"
                                f"{spec.name}) to change it")  # fmt: skip
        taken = {self.config.port: "the router"} | {m.port: f"model {n!r}" for n, m in self.models.items()}
        taken |= {m.port: f"model {n!r} (being added)" for n, m in self._changing.items()}
        if spec.port is not None and spec.port in taken:
            raise ModelConflict(f"port {spec.port} is already taken by {taken[spec.port]}; give another port "
                                "or leave port out (a free one is chosen)")  # fmt: skip
        if spec.port is not None:  # held by a process outside the router: say which, before starting anything
            try:
                ports.check_free("127.0.0.1", spec.port, what=f"model {spec.name!r}", fix=PORT_FIX)
            except ports.PortInUse as exc:
                raise ModelConflict(str(exc)) from None
        model = self._managed(spec)
        while model.port in taken:  # a free port now, but one the router gave a model that is not listening yet
            model = self._managed(replace(spec, port=free_port()))
        with self._changing_one(model):
            try:
                if spec.start == "awake":
                    async with self.room.for_wake(model):
                        await model.start()
                elif spec.start == "asleep":
                    await self._start_asleep(model)
            except BaseException as exc:
                await model.close()
                await asyncio.get_running_loop().run_in_executor(None, self.ledger_rows)  # its rows read as gone
                if isinstance(exc, EngineExited):
                    raise EngineStartFailed(str(exc)) from None
                raise
            self.models[spec.name] = model
        log.info("added %s (%s, start %s)", spec.name, spec.engine, spec.start)
        return model

    async def remove_model(self, name: str, *, drain_s: float = DRAIN_TIMEOUT_S) -> dict[str, object]:
        """Stop serving ``name``: new requests are refused at once (503, then 404 once it is gone), requests in
        flight get up to ``drain_s`` to finish, then its engine is stopped and its ledger rows cleared. Raises
        ``KeyError`` for a name not served, ``ModelConflict`` while it is being added or removed."""
        model = self.models.get(name)
        if model is None:
            raise KeyError(name)
        with self._changing_one(model):
            t0 = time.monotonic()
            drained = await model.retire(drain_s)
            if model.sleep_level_now:
                with contextlib.suppress(ElastikvError, OSError):
                    await asyncio.get_running_loop().run_in_executor(None, self._note_asleep, model, False)
            del self.models[name]
            await asyncio.get_running_loop().run_in_executor(None, self.ledger_rows)  # its rows read as gone
            self._ledger_of.pop(name, None)
        seconds = time.monotonic() - t0
        log.info("removed %s in %.1f s%s", name, seconds, "" if drained else " (requests in flight were cut)")
        return {"model": name, "removed": True, "drained": drained, "seconds": round(seconds, 3)}

    @contextlib.contextmanager
    def _changing_one(self, model: ManagedModel) -> Iterator[None]:
        """One add or remove per name at a time; ``stop`` also stops a model that is still being added."""
        name = model.spec.name
        if name in self._changing:
            raise ModelConflict(f"model {name!r} is being added or removed right now; try again when that ends")
        self._changing[name] = model
        try:
            yield
        finally:
            del self._changing[name]

    async def stop(self) -> None:
        for task in (self._watch_task, self._ahead_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        changing = [m for m in self._changing.values() if m not in self.models.values()]  # being added
        await asyncio.gather(*(m.close() for m in [*self.models.values(), *changing]), return_exceptions=True)
        await self.client.aclose()
        for m in self.models.values():
            if m.sleep_level_now:
                with contextlib.suppress(ElastikvError, OSError):
                    self._note_asleep(m, False)
        left = self.ledger_rows()  # this access also clears the rows of every engine that just ended
        ours = {name: n for name, n in left.items() if name in self.models}
        if ours:
            log.warning("still in the ledger after stopping: %s", ", ".join(ours))
        log.info("stopped every engine")

    def kill_now(self) -> None:
        """SIGKILL every engine's process group at once (a second Ctrl-C): no waiting for a clean stop."""
        for m in [*self.models.values(), *self._changing.values()]:
            m.kill_now()

    async def _watch_models(self) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            for m in self.models.values():
                m.maybe_sleep_when_idle()
                m.maybe_check_health()
            self._maybe_make_room_ahead()

    def _maybe_make_room_ahead(self) -> None:
        """With ``room_ahead``: at most once a second, and one at a time, make room before a wake needs it."""
        ahead = self.config.room_ahead_s
        now = time.monotonic()
        if ahead is None or now - self._ahead_at < AHEAD_EVERY_S:
            return
        if self._ahead_task is None or self._ahead_task.done():
            self._ahead_at = now
            self._ahead_task = asyncio.get_running_loop().create_task(self.room.make_room_ahead(ahead))

    def ledger_dirs(self) -> list[str | None]:
        """The ledger directories the engines book in (their ELASTIKV_LEDGER_DIR, else the default)."""
        dirs: list[str | None] = []
        for m in list(self.models.values()):  # also called in threads, while the loop may add or remove models
            d = Settings.from_env({k: v for k, v in m.launch.env.items() if k.startswith("ELASTIKV")}).ledger_dir
            if d not in dirs:
                dirs.append(d)
        return dirs

    def ledger_rows(self) -> dict[str, int]:
        """KV bytes mapped per instance name, over every device the engines use (rows of processes that are gone
        are left out; the next write by anyone removes them). A ledger that cannot be read (busy: a process frozen
        mid-transaction; damaged) is left out of the figures."""
        mapped: dict[str, int] = {}
        for d in self.ledger_dirs():
            for path, rows in read_ledgers(d, Ledger.instances, skip_unreadable=True):
                for row in rows:
                    mapped[row.name] = mapped.get(row.name, 0) + row.mapped_bytes
                    self._ledger_of[row.name] = path
        return mapped

    def device_room(self) -> dict[str, int] | None:
        """Over every device the engines book on (blocking): the budget, what is booked (KV, weights, other) and
        the room left under the budget; None before any engine has booked. For ``/admin/status`` (a cluster
        layer routes a wake to the replica with the most room)."""
        found = [s for d in self.ledger_dirs() for s in summaries(d, skip_unreadable=True)]
        budget, held = sum(s.budget_bytes for s in found), sum(s.held_bytes for s in found)
        if not budget:
            return None
        return {"budget_bytes": budget, "held_bytes": held, "free_bytes": max(0, budget - held)}

    def device_summary(self, model: ManagedModel) -> DeviceSummary | None:
        """The ledger summary of the device ``model`` books on (blocking). Where it never booked: the one ledger
        the router's engines use, if there is exactly one; else None."""
        path = self._ledger_of.get(model.spec.name)
        if path is None:
            self.ledger_rows()
            path = self._ledger_of.get(model.spec.name)
        if path is None:
            files = [f for d in self.ledger_dirs() for f in ledger_files(d)]
            if len(files) != 1:
                return None
            path = files[0]
        try:
            ledger = Ledger.open_existing(path)
        except LedgerError:
            return None
        try:
            summary = ledger.summary()
        finally:
            ledger.close()
        for row in summary.instances:
            self._ledger_of.setdefault(row.name, path)
        for h in summary.holdings:
            self._ledger_of.setdefault(h.name, path)
        return summary

    def _note_asleep(self, model: ManagedModel, asleep: bool) -> None:
        """Note in the ledger that ``model`` sleeps (or woke), for ``elastikv status``. Blocking (SQLite): called
        in a thread. The note goes in the ledger that held the model's instance row; a model that never held
        one (an engine without elastikv) is not noted."""
        name = model.spec.name
        if name not in self._ledger_of:
            self.ledger_rows()  # where its row is (the router looked at start; a model may book later)
        path = self._ledger_of.get(name)
        if path is None:
            return
        ledger = Ledger.open_existing(path)
        try:
            if asleep:
                ledger.mark_asleep(name, engine=model.spec.engine, level=model.sleep_level_now,
                                   last_wake=model.last_wake)  # fmt: skip
            else:
                ledger.mark_awake(name)
        finally:
            ledger.close()
