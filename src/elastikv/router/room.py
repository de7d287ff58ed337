"""Room on the device before a model wakes: more models than the GPU holds, behind one router.

Engines book what they hold besides KV (weights, other working memory) in the device's ledger
(``ledger_models.py``), so the router can tell whether a model it must wake fits: its *footprint* (what it held
besides KV when last seen awake) against the budget less what every engine holds now. When it does not fit, the
router puts idle models to sleep first, one at a time, until it does:

- never a pinned model (``pin: true``), never one with a request in flight, never the one waking;
- lowest ``priority`` first, then the least recently used;
- if no model can be put to sleep now (all busy or pinned), wait for one (bounded by the waking model's
  ``start_timeout``), then refuse the request with ``Unavailable`` naming what holds the memory: never a wake that
  the ledger would refuse half way, never a driver out-of-memory.

With ``room_ahead`` in the config, room is also made *before* a wake needs it (``make_room_ahead``, from the
router's watch): while the asleep model that needs the most could not wake now, a model idle at least that long
is put to sleep, in the same order. A request that finds its model asleep then waits for its wake only, not for
another model's sleep first (on the H100, vLLM 8B: 0.37 s instead of 0.72 s); the price is a model put to sleep
that might have been asked for again.

Who owns what: the ``Room`` owns one lock, held from the check through the wake (or start) that follows, so two
models waking at once never both count the same free bytes; it owns the footprints it learned. It never changes a
model's state itself: it asks the model to ``sleep()`` like an admin would, so every invariant of
``supervisor.py`` holds. Idle KV that awake models keep is given back by their own allocators (idle trim), not
here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from elastikv.config import Settings, format_bytes
from elastikv.errors import ElastikvError
from elastikv.ledger_rows import DeviceSummary
from elastikv.router.states import State, Unavailable

if TYPE_CHECKING:
    from elastikv.router.supervisor import ManagedModel

log = logging.getLogger("elastikv.router")

POLL_S = 0.25  # how often a model that must wait for room looks again


class Room:
    """Makes room on the device for a model about to wake. ``summary_of(model)`` reads the ledger of the device
    the model books on (blocking: run in a thread), or None where it has never booked (nothing to check)."""

    def __init__(
        self, models: dict[str, ManagedModel], summary_of: Callable[[ManagedModel], DeviceSummary | None]
    ) -> None:
        self.models = models
        self.summary_of = summary_of
        self.lock = asyncio.Lock()
        self.footprint: dict[str, int] = {}  # bytes a model held besides KV when last seen awake
        self.idle_kv: dict[str, int] = {}  # the least KV a model was seen mapping awake with no request in flight
        self.evictions: Counter[tuple[str, str]] = Counter()  # (model put to sleep, reason) -> count

    def estimate(self, model: ManagedModel) -> int:
        """A model never seen awake: its weights as its files hold them (safetensors), else 0 (unknown)."""
        path = Path(model.spec.model) if model.spec.model else None
        if path is None or not path.is_dir():
            return 0
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))

    def kv_floor(self, model: ManagedModel, total_bytes: int) -> int:
        """The KV an engine maps as soon as it is up: its reserve of free blocks (``ELASTIKV_RESERVE``, 256 MiB
        unless set), which it keeps beside whatever its requests use, and the page of null blocks it maps at start
        (its size depends on the model, which the router does not load: learned instead, as the least the engine
        was seen mapping awake and idle). Room for a wake is its footprint plus this; without it, a fleet of engines
        that each keep a reserve fills the budget and the next start is refused."""
        if model.spec.engine == "command":
            return 0  # elastikv is not active in it
        env = {k: v for k, v in model.launch.env.items() if k == "ELASTIKV_RESERVE"}  # read as the engine reads it
        return max(Settings.from_env(env).reserve.resolve(total_bytes), self.idle_kv.get(model.spec.name, 0))

    def learn(self, summary: DeviceSummary) -> None:
        """Note each of our awake models' holdings (weights + other) as its footprint for the next wake, and the KV
        it maps while idle as its floor. An asleep engine books only what it still holds (its context: no weights),
        which says nothing of its next wake."""
        for h in summary.holdings:
            if h.name in self.models and h.weights_bytes > 0:
                self.footprint[h.name] = h.held_bytes
        for row in summary.instances:
            m = self.models.get(row.name)
            if m is not None and m.state is State.AWAKE and m.active == 0:
                # Idle, it maps its null blocks' page and its reserve, and more while freed blocks keep a cached
                # prefix (up to ELASTIKV_PREFIX_CACHE, gone with the next sleep): the least sample is the floor. One
                # taken before the reserve filled is below it, and kv_floor's max with the reserve covers that.
                seen = self.idle_kv.get(row.name)
                self.idle_kv[row.name] = row.mapped_bytes if seen is None else min(seen, row.mapped_bytes)

    def wake_need(self, model: ManagedModel, summary: DeviceSummary) -> int | None:
        """Bytes ``model``'s wake (or start) adds to what is booked: its footprint less what it holds booked
        asleep (its engine's context and graph pools), plus its KV reserve. None where there is nothing to count
        (never seen awake and no weight files: KV grows elastically)."""
        footprint = self.footprint.get(model.spec.name) or self.estimate(model)
        if footprint == 0:
            return None
        held = summary.holding_of(model.spec.name)
        resident = held.held_bytes if held is not None and held.weights_bytes == 0 else 0
        return max(0, footprint - resident) + self.kv_floor(model, summary.total_bytes)

    @contextlib.asynccontextmanager
    async def for_wake(self, model: ManagedModel) -> AsyncIterator[None]:
        """Hold the room for ``model`` from the check through its wake (the body). A model with nothing to count
        (no footprint known, no ledger yet) does not hold it: other models' wakes go on beside its own."""
        await self.lock.acquire()
        try:
            counted = await self._make_room(model)
        except BaseException:
            self.lock.release()
            raise
        if not counted:
            self.lock.release()
        try:
            yield
        finally:
            if counted:
                self.lock.release()

    async def _summary(self, model: ManagedModel) -> DeviceSummary | None:
        summary = await asyncio.get_running_loop().run_in_executor(None, self.summary_of, model)
        if summary is not None:
            self.learn(summary)
        return summary

    async def _make_room(self, model: ManagedModel) -> bool:
        """Put idle models to sleep until ``model`` fits; True if its footprint was counted (the caller then
        holds the room through the wake)."""
        deadline = time.monotonic() + model.spec.start_timeout_s
        while True:
            summary = await self._summary(model)
            need = None if summary is None else self.wake_need(model, summary)
            if summary is None or need is None:
                return False  # no ledger yet, or nothing booked besides KV: nothing to count (KV grows elastically)
            free = summary.unbooked_bytes
            if free >= need:
                return True
            victim = self.pick(exclude=model)
            if victim is None:
                if time.monotonic() >= deadline:
                    raise Unavailable(self._no_room(model, need, free, summary), retry_after_s=5.0)
                await asyncio.sleep(POLL_S)
                continue
            reason = f"room for {model.spec.name}"
            log.info("%s: put to sleep to make room for %s (needs %s, %s free of a %s budget)", victim.spec.name,
                     model.spec.name, format_bytes(need), format_bytes(max(0, free)),
                     format_bytes(summary.budget_bytes))  # fmt: skip
            self.evictions[(victim.spec.name, "room")] += 1
            try:
                await victim.sleep(reason=reason)
            except Unavailable as exc:  # it could not sleep (busy, failed): try another, or wait
                log.warning("%s: could not be put to sleep for room: %s", victim.spec.name, exc)
                await asyncio.sleep(POLL_S)

    def pick(self, *, exclude: ManagedModel | None, idle_s: float = 0.0) -> ManagedModel | None:
        """The model to put to sleep next: awake, idle (for ``idle_s`` at least), not pinned; lowest priority, then
        least recently used."""
        idle = [
            m
            for m in self.models.values()
            if m is not exclude and not m.spec.pin and m.state is State.AWAKE and m.active == 0
            and m.idle_for() >= idle_s
        ]  # fmt: skip
        return min(idle, key=lambda m: (m.spec.priority, m.last_used), default=None)

    async def make_room_ahead(self, idle_s: float) -> None:
        """Put models idle for ``idle_s`` to sleep, one at a time, until every asleep model could wake without
        waiting for room (``room_ahead``). Does nothing while a wake holds the room (it makes its own), and holds
        it while it works, so a wake that comes meanwhile waits for this sleep instead of starting one of its
        own. A sleep that fails ends the round (the watch tries again later): it never spins."""
        if self.lock.locked() or self.pick(exclude=None, idle_s=idle_s) is None:
            return  # nothing to do without reading the ledger
        async with self.lock:
            try:
                await self._sleep_ahead(idle_s)
            except ElastikvError as exc:  # an unreadable ledger, a sleep that failed: the next round tries again
                log.warning("room ahead: %s", exc)

    async def _sleep_ahead(self, idle_s: float) -> None:
        """``make_room_ahead``'s rounds; the room's lock held."""
        while (victim := self.pick(exclude=None, idle_s=idle_s)) is not None:
            waiting, most = None, 0  # the asleep model short of the most room
            for m in [m for m in self.models.values() if m.state is State.ASLEEP]:
                summary = await self._summary(m)
                need = None if summary is None else self.wake_need(m, summary)
                if summary is not None and need is not None and need > summary.unbooked_bytes and need > most:
                    waiting, most = m, need
            if waiting is None:
                return
            log.info("%s: put to sleep ahead of a wake of %s (idle %.0f s)", victim.spec.name,
                     waiting.spec.name, victim.idle_for())  # fmt: skip
            self.evictions[(victim.spec.name, "room ahead")] += 1
            await victim.sleep(reason=f"room ahead for {waiting.spec.name}")

    def _no_room(self, model: ManagedModel, need: int, free: int, summary: DeviceSummary) -> str:
        holders = sorted(((h.held_bytes, h.name) for h in summary.holdings), reverse=True)
        held = ", ".join(f"{name} {format_bytes(n)}" + (" (pinned)" if self._pinned(name) else "")
                         for n, name in holders) or "nothing booked"  # fmt: skip
        return (
            f"no room on {summary.device_label} for {model.spec.name}: it needs {format_bytes(need)}, "
            f"{format_bytes(max(0, free))} of the {format_bytes(summary.budget_bytes)} budget is free, and every "
            f"awake model is busy or pinned ({held}); retry, or raise the budget (ELASTIKV_DEVICE_BUDGET)"
        )

    def _pinned(self, name: str) -> bool:
        m = self.models.get(name)
        return m is not None and m.spec.pin
