"""One model's engine process as the router sees it: start, health, sleep, wake, crash and restart.

Who owns what: a ``ManagedModel`` owns the model's state and its engine's current start (an ``EngineProcess``,
``engine_process.py``: the child and the process group it leads, so an engine's own helpers, such as vLLM's
engine core and workers, go with it). States and counters: ``states.py``. Everything here runs on
the router's one asyncio loop, so a state change with no ``await`` between the check and the assignment is atomic.

States and who moves between them (``TRANSITIONS`` lists every allowed step; the ``state`` setter is the one
transition function: it checks the step and wakes whoever waits for the next one)::

    STARTING --healthy--> AWAKE --idle or admin--> DRAINING --no request in flight--> SLEEPING --> ASLEEP
    ASLEEP   --a request or admin wake--> WAKING --> AWAKE        (sleep_level "stop": STOPPED, then STARTING)
    any      --the process exits unasked--> RESTARTING --backoff, start, healthy--> AWAKE
    any      --the router stops--> STOPPED        (final: once closed, no step leaves it)

Invariants:
1. ``lock`` is held for every transition that talks to the engine (start, sleep, wake, restart), so there is one
   wake at a time per model: requests that find the model asleep queue on the lock, the first wakes it, the rest
   find it AWAKE and go straight through. No request is dropped or answered with an error because of a sleep.
2. A request is counted in ``active`` from admission to the last byte relayed. Admission happens only in AWAKE
   (checked and counted without an ``await`` in between), and sleep starts only when ``active`` is 0, so the
   engine never goes to sleep under a request.
3. While RESTARTING, requests are refused at once with ``Unavailable`` (the HTTP layer's 503 with the reason),
   never queued behind a start that may take minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from elastikv import ports
from elastikv.router.config import ModelSpec
from elastikv.router.engine_process import EngineProcess, log_tail
from elastikv.router.launch import Launch, describe, launch, level_used
from elastikv.router.states import TRANSITIONS, Counters, EngineExited, State, Unavailable

log = logging.getLogger("elastikv.router")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # an engine up this long has its backoff reset
DRAIN_TIMEOUT_S = 120.0  # an admin sleep waits this long for requests in flight
HEALTH_EVERY_S = 5.0  # an engine that is up is asked for its health this often
HEALTH_TIMEOUT_S = 10.0
HEALTH_FAILURES = 3  # checks failed in a row before the engine is killed and restarted
PORT_FIX = "stop that process, or give the model another port: in the router's config"


class ManagedModel:
    def __init__(self, spec: ModelSpec, port: int, client: httpx.AsyncClient, log_dir: Path) -> None:
        self.spec = spec
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.client = client
        self.log_path = log_dir / f"{spec.name}.log"
        self.launch: Launch = launch(spec, port)
        self._state = State.STOPPED
        self._changed = asyncio.Event()  # set (and replaced) at every transition: what waiters wait on
        self.lock = asyncio.Lock()
        self.active = 0
        self._none_active = asyncio.Event()  # set while no request is in flight: what a drain waits on
        self._none_active.set()
        self.last_used = time.monotonic()
        self.counters = Counters()
        self.last_exit: str | None = None  # why the last process ended, for status and 503s
        self._proc: EngineProcess | None = None  # the current start's process (None before the first)
        self._started_at = 0.0
        self._backoff = BACKOFF_FIRST_S
        self._restart_at = 0.0
        self._restart_task: asyncio.Task[None] | None = None
        self._sleep_task: asyncio.Task[None] | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._health_failures = 0
        self._last_health = time.monotonic()
        self._killed_because: str | None = None  # set when the router itself kills a hung engine
        self._closing = False
        self._closing_why = "is shutting down"  # for the 503 of a request that arrives while it closes
        self.sleep_level_now = ""  # the level of the last sleep ("1", "2", "stop")
        self.last_wake: float | None = None  # time.time() of the last completed wake
        # Set by the Router: note a sleep (True) or a wake (False) in the ledger, for `elastikv status`. Blocking.
        self.note_asleep: Callable[[ManagedModel, bool], None] | None = None
        # Set by the Router: hold room on the device for this model's wake or start (room.py).
        self.room_for_wake: Callable[[ManagedModel], contextlib.AbstractAsyncContextManager[None]] | None = None

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, new: State) -> None:
        """The one transition function. A step outside ``TRANSITIONS`` is a bug: logged and counted (the tests
        check the count), never raised, so that a surprise cannot leave the model between states."""
        old = self._state
        if self._closing and old is State.STOPPED:
            return  # closed for good (close() sets STOPPED last): a cancelled step unwinding later changes nothing
        if new is not old and new is not State.STOPPED and new not in TRANSITIONS[old]:
            self.counters.bad_transitions += 1
            log.error("%s: unexpected state change %s -> %s", self.spec.name, old.value, new.value)
        self._state = new
        if new is not old:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _next_change(self, changed: asyncio.Event, bound: float = 1.0) -> None:
        """Wait until the state has changed since ``changed`` was taken (at most ``bound`` seconds)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(changed.wait(), bound)

    # -- requests --------------------------------------------------------------------------------------------
    async def acquire(self) -> None:
        """Admit one request: wake or start the engine if needed. Raises ``Unavailable``."""
        arrived = time.monotonic()
        while True:
            if self.state is State.AWAKE:
                self.active += 1  # no await since the check: invariant 2
                self._none_active.clear()
                self.last_used = time.monotonic()
                return
            self.refuse_if_down()
            changed = self._changed
            await self._bring_up(arrived)
            if not self.awake:
                await self._next_change(changed)  # another task is moving it (starting, sleeping): wait for it

    @property
    def awake(self) -> bool:
        return self.state is State.AWAKE

    def release(self) -> None:
        self.active -= 1
        if not self.active:
            self._none_active.set()
        self.last_used = time.monotonic()

    def refuse_if_down(self) -> None:
        if self._closing:
            raise Unavailable(f"model {self.spec.name!r} {self._closing_why}", retry_after_s=5.0)
        if self.state is State.RESTARTING:
            raise Unavailable(f"model {self.spec.name!r} is restarting: its engine {self.last_exit or 'exited'}; "
                              f"restart {self.counters.crashes} is under way (log: {self.log_path}); retry shortly",
                              retry_after_s=max(1.0, self._restart_at - time.monotonic()))  # fmt: skip

    async def _bring_up(self, arrived: float) -> None:
        """Wake an asleep model or start a stopped one, counted as one wake; a no-op if another got there first.
        The wake is timed from ``arrived`` (when the request that found the model asleep came in) to the engine
        answering again, which is what that request waited."""
        async with self.lock:
            self.refuse_if_down()
            if self.state not in (State.ASLEEP, State.STOPPED):
                return
            room = self.room_for_wake(self) if self.room_for_wake is not None else contextlib.nullcontext()
            async with room:  # other models put to sleep first where this one would not fit (room.py)
                if self.state is State.ASLEEP:
                    await self._wake()
                elif self.state is State.STOPPED:
                    await self._start_for_wake()
                else:  # it died while room was made: the watcher's restart brings it back (and counts it)
                    self.refuse_if_down()
                    return
            self.counters.wakes += 1
            self.counters.wake_seconds.append(time.monotonic() - arrived)
            self.last_wake = time.time()
            await self._note(asleep=False)

    async def _start_for_wake(self) -> None:
        """Start a stopped engine (``sleep_level: stop``); lock held. A start that fails, however it fails
        (exits, never healthy, cannot even be spawned), is a crash: restarted with backoff, requests refused
        meanwhile. A cancelled start leaves it STOPPED for the next request."""
        try:
            await self._start_locked()
        except asyncio.CancelledError:
            if self.state is State.STARTING:
                self.state = State.STOPPED
            raise
        except Exception as exc:
            if not isinstance(exc, EngineExited):
                self.last_exit = f"could not be started ({type(exc).__name__}: {exc})"
            log.error("%s: %s", self.spec.name, exc)
            self._schedule_restart()
            raise Unavailable(
                f"{self.spec.name}: the engine failed to start again ({exc}); retrying (log: {self.log_path})"
            ) from exc

    # -- lifetime --------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine and wait until it is healthy. Raises ``EngineExited`` (with the end of its log) if it
        exits or does not become healthy: a first start that fails is a configuration to fix, not a crash to
        retry (a crash later is restarted with backoff)."""
        async with self.lock:
            try:
                await self._start_locked()
            except BaseException:
                self.state = State.STOPPED
                raise

    async def _start_locked(self) -> None:
        self.state = State.STARTING
        t0 = time.monotonic()
        try:  # a port someone else holds would answer as if it were the engine: never start onto one
            ports.check_free("127.0.0.1", self.port, what=f"model {self.spec.name!r}", fix=PORT_FIX)
        except ports.PortInUse as exc:
            raise EngineExited(str(exc)) from None
        proc = await EngineProcess.spawn(self.launch, self.log_path)
        if self._closing:  # closed while it spawned (e.g. the model removed): nothing of it may outlive close()
            await proc.terminate(self.spec.name)
            raise EngineExited(f"{self.spec.name}: the model {self._closing_why}")
        self._proc = proc
        asyncio.get_running_loop().create_task(self._watch(proc))
        try:
            await proc.wait_healthy(self.spec, self.port, self.client, self.log_path)
        except BaseException:
            await proc.terminate(self.spec.name)
            raise
        self._started_at = time.monotonic()
        self.counters.start_seconds = self._started_at - t0
        self.state = State.AWAKE
        self.last_used = time.monotonic()
        log.info("%s: ready in %.1f s (pid %d, port %d)", self.spec.name, self._started_at - t0, proc.pid, self.port)

    async def _watch(self, proc: EngineProcess) -> None:
        await proc.wait()
        if proc is not self._proc or self._closing or self.state in (State.SLEEPING, State.STOPPED):
            return  # a process we ended on purpose
        how = proc.exit_text()
        if self._killed_because:
            how, self._killed_because = f"{self._killed_because}, so the router killed it", None
        self.last_exit = how
        self.counters.crashes += 1
        if self.state is State.STARTING:
            return  # the start in progress sees it and reports it
        log.error("%s: the engine %s; restarting (log: %s)", self.spec.name, how, self.log_path)
        self._schedule_restart()

    def _schedule_restart(self) -> None:
        self.state = State.RESTARTING
        if self._started_at and time.monotonic() - self._started_at > STABLE_AFTER_S:
            self._backoff = BACKOFF_FIRST_S
        delay, self._backoff = self._backoff, min(BACKOFF_MAX_S, self._backoff * 2)
        self._restart_at = time.monotonic() + delay
        if self._restart_task is None or self._restart_task.done():
            self._restart_task = asyncio.get_running_loop().create_task(self._restart_after(delay))

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        async with self.lock:
            if self._closing or self.state is not State.RESTARTING:
                return
            try:
                await self._start_locked()
            except asyncio.CancelledError:
                self.state = State.RESTARTING  # closing: close() takes it from here
                raise
            except Exception as exc:  # exited, never healthy, or not even spawned: try again later
                log.error("%s: %s", self.spec.name, exc)
                self.state = State.RESTARTING
            else:
                self.counters.restarts += 1
                return
        self._restart_task = None
        self._schedule_restart()

    async def close(self) -> None:
        """Stop the engine for good (router shutdown)."""
        self._closing = True
        for task in (self._restart_task, self._sleep_task, self._health_task):
            if task is not None and not task.done():
                task.cancel()
        if self._proc is not None:
            await self._proc.terminate(self.spec.name)
        self.state = State.STOPPED

    async def retire(self, drain_s: float) -> bool:
        """Stop for good, the model being removed (admin): new requests refused (503 saying so), those in flight
        given ``drain_s`` s, then the engine stopped. True if they all finished (the rest end with the engine)."""
        self._closing, self._closing_why = True, "is being removed from this router"
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._none_active.wait(), drain_s)
        drained = self._none_active.is_set()
        await self.close()
        return drained

    def kill_now(self) -> None:
        """SIGKILL the engine's process group without waiting (the router is being told to stop, twice)."""
        self._closing = True
        if self._proc is not None:
            self._proc.kill()

    # -- health --------------------------------------------------------------------------------------------
    def maybe_check_health(self) -> None:
        """Called periodically: ask an awake engine for its health now and then; one that fails
        ``HEALTH_FAILURES`` checks in a row (hung, or its batching thread died) is killed, and so restarted."""
        if self.state is not State.AWAKE or time.monotonic() - self._last_health < HEALTH_EVERY_S:
            return
        if self._health_task is None or self._health_task.done():
            self._last_health = time.monotonic()
            self._health_task = asyncio.get_running_loop().create_task(self._check_health())

    async def _check_health(self) -> None:
        proc = self._proc
        try:
            r = await self.client.get(self.url + self.spec.health_path, timeout=HEALTH_TIMEOUT_S)
            problem = None if r.status_code == 200 else f"answered its health check with {r.status_code}"
        except httpx.HTTPError as exc:
            problem = f"did not answer its health check ({type(exc).__name__})"
        if problem is None or proc is not self._proc or self.state is not State.AWAKE:
            self._health_failures = 0
            return
        self._health_failures += 1
        log.warning("%s: the engine %s (%d of %d)", self.spec.name, problem, self._health_failures, HEALTH_FAILURES)
        if self._health_failures >= HEALTH_FAILURES and proc is not None and proc.alive:
            self._health_failures = 0
            self._killed_because = problem
            proc.kill()  # its exit is a crash: the watcher restarts it

    # -- sleep and wake --------------------------------------------------------------------------------------
    def idle_for(self) -> float:
        return time.monotonic() - self.last_used

    def maybe_sleep_when_idle(self) -> None:
        """Called periodically: start a sleep if the model has been idle for its ``idle`` time."""
        idle = self.spec.idle_s
        if idle is None or self.state is not State.AWAKE or self.active or self.idle_for() < idle:
            return
        if self._sleep_task is None or self._sleep_task.done():
            self._sleep_task = asyncio.get_running_loop().create_task(self._sleep_quietly())

    async def _sleep_quietly(self) -> None:
        try:
            await self.sleep(reason=f"idle {self.idle_for():.0f} s")
        except (Unavailable, EngineExited, httpx.HTTPError) as exc:
            log.warning("%s: idle sleep failed: %s", self.spec.name, exc)

    async def sleep(self, level: int | str | None = None, *, reason: str = "admin") -> dict[str, Any]:
        """Put the model to sleep once the requests in flight have finished (new ones wait, then wake it)."""
        level = self.spec.sleep_level if level is None else level
        async with self.lock:
            if self.state is not State.AWAKE:
                return {"model": self.spec.name, "state": self.state.value, "changed": False}
            if reason.startswith("idle") and (self.active or self.idle_for() < (self.spec.idle_s or 0)):
                return {"model": self.spec.name, "state": self.state.value, "changed": False}  # used meanwhile
            self.state = State.DRAINING  # new requests now queue on the lock
            try:
                try:
                    await asyncio.wait_for(self._none_active.wait(), DRAIN_TIMEOUT_S)
                except asyncio.TimeoutError:
                    raise Unavailable(
                        f"{self.spec.name}: requests still in flight after {DRAIN_TIMEOUT_S:.0f} s"
                    ) from None
            except BaseException:  # timed out, or the sleep was cancelled: it never stopped being awake
                self.state = State.AWAKE
                raise
            self.state = State.SLEEPING
            t0 = time.monotonic()
            try:
                if level == "stop" or self.launch.sleep is None:
                    level = "stop"
                    if self._proc is not None:
                        await self._proc.terminate(self.spec.name)
                    self.state = State.STOPPED
                else:
                    method, path = self.launch.sleep
                    answer = await self._call(method, path.replace("{level}", str(level)))
                    level = level_used(answer, level)  # the embedded engine may do level 1 as 2, and says so
                    self.state = State.ASLEEP
            except BaseException as exc:
                if self.state is State.SLEEPING:
                    if isinstance(exc, Exception) and self._proc is not None:  # did it die? (reaped in a moment)
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(asyncio.shield(self._proc.wait()), timeout=2.0)
                    if self._alive():
                        self.state = State.AWAKE
                        if isinstance(exc, Exception) and not isinstance(exc, Unavailable):
                            raise Unavailable(f"{self.spec.name}: going to sleep failed ({type(exc).__name__}: "
                                              f"{exc}); it stays awake") from exc  # fmt: skip
                    elif not self._closing:
                        # It died while going to sleep. The watcher took that exit for one we asked for (state
                        # SLEEPING), so it is a crash to restart here, or the model stays down for good.
                        self.last_exit = self._exit_text()
                        self.counters.crashes += 1
                        self._schedule_restart()
                        if isinstance(exc, Exception):
                            raise Unavailable(f"{self.spec.name}: the engine {self.last_exit} while going to "
                                              f"sleep; restarting it (log: {self.log_path})", 2.0) from exc  # fmt: skip
                raise
            self.sleep_level_now = str(level)
            await self._note(asleep=True)
            self.counters.sleeps += 1
            seconds = time.monotonic() - t0
            log.info("%s: asleep (level %s, %s) in %.2f s", self.spec.name, level, reason, seconds)
            return {"model": self.spec.name, "state": self.state.value, "changed": True, "seconds": seconds}

    async def wake(self) -> dict[str, Any]:
        """Wake the model now (admin); requests do this on their own."""
        t0 = time.monotonic()
        before = self.counters.wakes
        await self._bring_up(t0)
        return {
            "model": self.spec.name,
            "state": self.state.value,
            "changed": self.counters.wakes > before,
            "seconds": time.monotonic() - t0,
        }

    async def _wake(self) -> None:
        assert self.launch.wake is not None
        self.state = State.WAKING
        t0 = time.monotonic()
        try:
            await self._call(*self.launch.wake)
            if self.sleep_level_now == "2" and self.launch.reload is not None:
                method, path, body = self.launch.reload  # (vLLM) its weights back from the model's files
                await self._call(method, path, body)
        except asyncio.CancelledError:
            # The request that woke it went away: asleep as far as we know (waking an awake engine is harmless),
            # so the next request wakes it again; never left WAKING.
            self.state = State.ASLEEP if self._alive() else (State.RESTARTING if not self._closing else State.STOPPED)
            raise
        except BaseException as exc:
            if not self._alive():
                self.state = State.RESTARTING if not self._closing else State.STOPPED
                raise Unavailable(f"{self.spec.name}: the engine {self.last_exit or self._exit_text()} while waking; "
                                  f"the router restarts it (log: {self.log_path})", 2.0) from exc  # fmt: skip
            if await self._healthy():
                self.state = State.ASLEEP  # a refusal (e.g. no memory now): the next request tries again
                raise Unavailable(f"{self.spec.name}: waking failed: {exc}") from exc
            # Awake but unable to serve (its batching thread died on waking): restart it, as after a crash.
            self._killed_because = f"failed to wake ({exc})"
            self.state = State.RESTARTING  # requests are refused from now on (invariant 3); the watcher restarts it
            assert self._proc is not None
            self._proc.kill()  # the watcher sees a crash and restarts it
            raise Unavailable(f"{self.spec.name}: the engine failed to wake ({exc}); restarting it", 2.0) from exc
        seconds = time.monotonic() - t0
        self.state = State.AWAKE
        self.last_used = time.monotonic()
        log.info("%s: awake in %.2f s", self.spec.name, seconds)

    async def _healthy(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            r = await self.client.get(self.url + self.spec.health_path, timeout=HEALTH_TIMEOUT_S)
            return r.status_code == 200
        return False

    async def _note(self, *, asleep: bool) -> None:
        """Tell the ledger (through the Router) that the model sleeps or woke; a failure costs only the note."""
        if self.note_asleep is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.note_asleep, self, asleep)
        except Exception as exc:
            what = "sleep" if asleep else "wake"
            log.warning("%s: could not note the %s in the ledger: %s", self.spec.name, what, exc)

    async def _call(self, method: str, path: str, body: dict[str, str] | None = None) -> httpx.Response:
        token = self._proc.control_token if self._proc is not None else ""
        r = await self.client.request(method, self.url + path, json=body or {}, timeout=self.spec.start_timeout_s,
                                      headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        if r.status_code >= 400:
            raise Unavailable(f"{self.spec.name}: {method} {path} answered {r.status_code}: {r.text[:500]}")
        return r

    def _exit_text(self) -> str:
        """How the engine's process ended, as far as it has been reaped: for messages."""
        return self._proc.exit_text() if self._proc is not None else "exited"

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.alive

    # -- reporting -------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._alive() and self._proc is not None else None

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)

    def status(self) -> dict[str, Any]:
        s, c = self.spec, self.counters
        return {"model": s.name, "engine": s.engine, "state": self.state.value, "pid": self.pid, "port": self.port,
                "active": self.active, "idle_s": round(self.idle_for(), 1), "sleep_after_s": s.idle_s,
                "sleep_level": s.sleep_level, "pin": s.pin, "wakes": c.wakes, "last_wake": self.last_wake,
                "sleeps": c.sleeps, "restarts": c.restarts, "crashes": c.crashes, "bad_transitions": c.bad_transitions,
                "last_exit": self.last_exit, "log": str(self.log_path),
                "command": describe(self.launch.argv)}  # fmt: skip
