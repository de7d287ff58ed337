"""More models than the device holds, behind one router (issue 22's fleet, on the CPU): real engine processes on
the host backend that book their weights in the ledger (``ELASTIKV_BOOK_WEIGHTS=on``), a device budget that
holds two of the four at once, and a trace that visits them in turn and comes back. The router must make room
before each wake or start (``router/room.py``): put the least recently used idle model to sleep, never the pinned
one, and answer every request; the ledger never holds more than the budget.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.test_router import wait_healthy

from elastikv import children

if TYPE_CHECKING:
    from elastikv.router.supervisor import ManagedModel

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="needs httpx: pip install -e '.[serve]'")
yaml = pytest.importorskip("yaml", reason="needs PyYAML: pip install -e '.[serve]'")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not transformers.__version__.startswith("5.17."),
        reason=f"the engine supports transformers 5.17; this is {transformers.__version__}",
    ),
]

TOKEN = "fleet-admin-token"
MODELS = ("pinned", "b", "c", "d")
MIB = 1024**2


def _weights(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _engine_env(budget: int, ledger_dir: Path) -> dict[str, str]:
    """Every engine on the host backend, booking its weights against ``budget`` in one ledger."""
    return {"ELASTIKV_BACKEND": "host", "ELASTIKV_HOST_MEMORY": "512MiB", "ELASTIKV_RESERVE": "0",
            "ELASTIKV_DEVICE_BUDGET": str(budget), "ELASTIKV_BOOK_WEIGHTS": "on",
            "ELASTIKV_LEDGER_DIR": str(ledger_dir)}  # fmt: skip


def _serve(tmp_path: Path, config: dict[str, object]) -> tuple[subprocess.Popen[bytes], Path]:
    """``elastikv serve`` on ``config`` (written as router.yaml), in its own process group; its log."""
    (tmp_path / "router.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIKV")}
    log = tmp_path / "router.log"
    command = [sys.executable, "-m", "elastikv.cli", "serve", str(tmp_path / "router.yaml"), "--log-dir",
               str(tmp_path / "logs")]  # fmt: skip
    return children.popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT), log


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_fleet_larger_than_the_budget_answers_every_request_and_never_evicts_the_pinned_model(
    tmp_path: Path,
) -> None:
    from elastikv.bench.models import make_model
    from elastikv.ledger import summaries
    from elastikv.ports import free_port

    for seed, name in enumerate(MODELS):
        make_model(tmp_path / name, size="tiny", seed=seed)
    weights = _weights(tmp_path / "b")
    # Two models' weights and a little KV each: a third does not fit until one of the others sleeps.
    budget = 2 * weights + 6 * MIB
    port = free_port()
    ledger_dir = tmp_path / "ledger"
    config = {
        "listen": f"127.0.0.1:{port}",
        "admin_token": TOKEN,
        "env": _engine_env(budget, ledger_dir),
        "models": [
            {
                "name": name,
                "model": f"./{name}",
                "idle": "never",  # only making room puts a model to sleep here
                "sleep_level": 1,
                "args": ["--dtype", "float32"],
                **({"pin": True} if name == "pinned" else {}),
                **({"start": {"c": "lazy", "d": "asleep"}[name]} if name in ("c", "d") else {}),
            }
            for name in MODELS
        ],
    }
    proc, log = _serve(tmp_path, config)
    url = f"http://127.0.0.1:{port}"
    held: list[tuple[int, int]] = []  # (held, budget) sampled from the ledger while the trace runs
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for d in summaries(ledger_dir):
                held.append((d.held_bytes, d.budget_bytes))
            time.sleep(0.05)

    try:
        wait_healthy(proc, url, log)
        states = {row["model"]: row for row in httpx.get(f"{url}/admin/status", timeout=10,
                  headers={"Authorization": f"Bearer {TOKEN}"}).json()["models"]}  # fmt: skip
        assert states["d"]["state"] == "asleep" and states["c"]["state"] == "stopped", states  # start: asleep, lazy
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # Visit every model in turn, come back to earlier ones, and keep the pinned one in use throughout.
        trace = ["pinned", "b", "c", "pinned", "d", "b", "pinned", "c", "d", "b", "pinned", "c"]
        for model in trace:
            r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "Once upon", "max_tokens": 4},
                           timeout=120)  # fmt: skip
            assert r.status_code == 200, (model, r.text, log.read_text()[-3000:])
            assert r.json()["choices"][0]["text"] is not None
        stop.set()
        sampler.join()
        status = httpx.get(f"{url}/admin/status", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
        rows = {row["model"]: row for row in status["models"]}
        assert rows["pinned"]["state"] == "awake" and rows["pinned"]["sleeps"] == 0, rows["pinned"]
        peak = max(h for h, _ in held)
        assert sum(rows[m]["sleeps"] for m in ("b", "c", "d")) >= 3, (rows, weights, budget, peak)  # room was made
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        evicted = [line for line in metrics.splitlines() if line.startswith("elastikv_router_evictions{")]
        assert evicted and all('model="pinned"' not in line for line in evicted), evicted
        assert held, "the ledger was never sampled"
        over = [(h, b) for h, b in held if h > b]
        assert not over, f"the ledger held more than the budget: {over[:5]}"
        assert max(h for h, _ in held) > weights  # weights really were booked
    finally:
        stop.set()
        _stop(proc)


def test_room_ahead_puts_an_idle_model_to_sleep_before_the_next_wake_needs_it(tmp_path: Path) -> None:
    """``room_ahead``: room for one model; ``a`` is served, then idle. Before any request for the asleep ``b``
    comes, the router puts ``a`` to sleep for it, so ``b``'s wake waits for no other model's sleep: the only
    on-demand eviction is the one at start (``b`` loaded, then put to sleep)."""
    from elastikv.bench.models import make_model
    from elastikv.ports import free_port

    for seed, name in enumerate(("a", "b")):
        make_model(tmp_path / name, size="tiny", seed=seed)
    budget = _weights(tmp_path / "a") + 6 * MIB  # one model and a little KV
    port = free_port()
    models = [{"name": n, "model": f"./{n}", "idle": "never", "args": ["--dtype", "float32"],
               **({"start": "asleep"} if n == "b" else {})} for n in ("a", "b")]  # fmt: skip
    # A 2 MiB reserve: the room a wake needs counts it (room.kv_floor; and the page of null blocks every engine maps
    # at start, once the router has seen the model awake and idle).
    env = _engine_env(budget, tmp_path / "ledger") | {"ELASTIKV_RESERVE": "2MiB"}
    config = {"listen": f"127.0.0.1:{port}", "admin_token": TOKEN, "room_ahead": "0.5s", "env": env,
              "models": models}  # fmt: skip
    proc, log = _serve(tmp_path, config)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def states() -> dict[str, str]:
        rows = httpx.get(f"{url}/admin/status", headers=auth, timeout=10).json()["models"]
        return {row["model"]: row["state"] for row in rows}

    def evictions() -> dict[str, float]:
        lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
        return {line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in lines if line.startswith("elastikv_router_evictions{")}  # fmt: skip

    try:
        wait_healthy(proc, url, log)
        assert states() == {"a": "asleep", "b": "asleep"}  # b's start put a to sleep, then b slept
        r = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "Once", "max_tokens": 2}, timeout=120)
        assert r.status_code == 200, (r.text, log.read_text()[-3000:])
        deadline = time.monotonic() + 30
        while states()["a"] != "asleep":  # idle 0.5 s, then put to sleep ahead of b's wake (the watch: each 1 s)
            assert time.monotonic() < deadline, (states(), log.read_text()[-3000:])
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/completions", json={"model": "b", "prompt": "Once", "max_tokens": 2}, timeout=120)
        assert r.status_code == 200, (r.text, log.read_text()[-3000:])
        assert states() == {"a": "asleep", "b": "awake"}  # and a stays asleep: no model asleep lacks room now
        counts = evictions()
        assert counts.get('model="a",reason="room ahead"') == 1.0, counts
        assert sum(n for k, n in counts.items() if k.endswith('reason="room"')) == 1.0, counts  # the start's only
    finally:
        _stop(proc)


def test_room_puts_the_lowest_priority_then_least_recently_used_idle_model_to_sleep_never_a_pinned_or_busy_one(
    tmp_path: Path,
) -> None:
    """The choice alone, on the router's real ``ManagedModel`` objects (no engines started: only their state
    and counters are read)."""
    import asyncio
    import dataclasses

    from elastikv.router.config import ModelSpec
    from elastikv.router.room import Room
    from elastikv.router.states import State
    from elastikv.router.supervisor import ManagedModel

    def spec(name: str, **kw: object) -> ModelSpec:
        base = ModelSpec(name=name, engine="elastikv", model=str(tmp_path), command=None, args=(), env={},
                         limit=None, idle_s=None, sleep_level=1, port=None, health_path="/health",
                         start_timeout_s=5.0)  # fmt: skip
        return dataclasses.replace(base, **kw)  # type: ignore[arg-type]

    async def run() -> None:
        async with httpx.AsyncClient() as client:
            specs = [spec("old"), spec("older-but-pinned", pin=True), spec("busy"), spec("important", priority=5),
                     spec("new"), spec("waking")]  # fmt: skip
            models = {s.name: ManagedModel(s, 40000 + i, client, tmp_path) for i, s in enumerate(specs)}
            for i, m in enumerate(models.values()):
                m.state = State.STARTING
                m.state = State.AWAKE
                m.last_used = 100.0 + i  # "old" least recently used, "new" most
            models["older-but-pinned"].last_used = 0.0
            models["important"].last_used = 1.0
            models["busy"].active = 1
            room = Room(models, lambda m: None)
            waking = models["waking"]
            assert room.pick(exclude=waking) is models["old"]
            models["old"].state = State.DRAINING  # already on its way to sleep
            assert room.pick(exclude=waking) is models["new"]
            models["new"].spec = spec("new", priority=9)
            assert room.pick(exclude=waking) is models["important"]  # priority 5 < 9, though used more recently
            models["important"].spec = spec("important", pin=True)
            models["new"].spec = spec("new", pin=True)
            assert room.pick(exclude=waking) is None  # all pinned, busy or leaving: nothing to put to sleep
            # A model whose weights are in its files gets that estimate before it was ever seen awake.
            (tmp_path / "model.safetensors").write_bytes(b"\0" * 4096)
            assert room.estimate(waking) == 4096

    asyncio.run(run())


def _keeper_and_waking(client: httpx.AsyncClient, tmp_path: Path) -> tuple[ManagedModel, ManagedModel]:
    """Two managed models for the room tests: ``keeper``, pinned and awake, and ``waking``, asleep. Each engine
    keeps a 1 MiB KV reserve mapped as soon as it is up: room for a wake is its footprint + that reserve."""
    import dataclasses

    from elastikv.router.config import ModelSpec
    from elastikv.router.states import State
    from elastikv.router.supervisor import ManagedModel

    base = ModelSpec(name="keeper", engine="elastikv", model=None, command=None, args=(),
                     env={"ELASTIKV_RESERVE": "1MiB"}, limit=None, idle_s=None, sleep_level=1, port=None,
                     health_path="/health", start_timeout_s=0.6, pin=True)  # fmt: skip
    keeper = ManagedModel(base, 40100, client, tmp_path)
    waking = ManagedModel(dataclasses.replace(base, name="waking", pin=False), 40101, client, tmp_path)
    keeper.state = State.STARTING
    keeper.state = State.AWAKE
    return keeper, waking


def test_a_wakes_kv_floor_is_what_the_model_mapped_when_last_seen_awake_and_idle(tmp_path: Path) -> None:
    """Room for a wake counts the KV an engine maps as soon as it is up: its reserve, and the page of null blocks
    it maps at start, whose size the router cannot know (it loads no model). Learned from the ledger: the least
    the model was seen mapping awake with nothing in flight (more, later, is a cached prefix kept mapped, which
    the next sleep drops); the configured reserve until then, and a busy model's mapping teaches nothing."""
    import asyncio

    from elastikv.config import Size
    from elastikv.ledger import Ledger
    from elastikv.router.room import Room

    ledger = Ledger("fleet-test", total_bytes=100 * MIB, directory=tmp_path / "ledger", budget=Size(nbytes=20 * MIB))
    ledger.add("keeper", engine="elastikv", limit=20 * MIB, capacity=20 * MIB)

    async def run() -> None:
        async with httpx.AsyncClient() as client:
            keeper, waking = _keeper_and_waking(client, tmp_path)
            room = Room({"keeper": keeper, "waking": waking}, lambda m: ledger.summary())
            assert room.kv_floor(keeper, ledger.summary().total_bytes) == MIB  # not yet seen: the reserve (1 MiB)
            ledger.book("keeper", 5 * MIB)  # a request's KV, the reserve and the null page
            keeper.active = 1
            room.learn(ledger.summary())
            assert room.kv_floor(keeper, ledger.summary().total_bytes) == MIB  # busy: nothing learned
            ledger.release("keeper", 2 * MIB)  # the request ended; 3 MiB stay mapped (reserve + null page)
            keeper.active = 0
            room.learn(ledger.summary())
            assert room.kv_floor(keeper, ledger.summary().total_bytes) == 3 * MIB
            ledger.book("keeper", 2 * MIB)  # idle again, a cached prefix kept mapped: not the floor
            room.learn(ledger.summary())
            assert room.kv_floor(keeper, ledger.summary().total_bytes) == 3 * MIB
            room.footprint["keeper"] = 4 * MIB
            assert room.wake_need(keeper, ledger.summary()) == 7 * MIB  # footprint + the learned floor

    try:
        asyncio.run(run())
    finally:
        ledger.close()


def test_no_room_is_a_clear_refusal_within_the_start_timeout_and_leaves_the_room_free(tmp_path: Path) -> None:
    """Every awake model pinned or busy: the wake waits (bounded by its start timeout), then is refused naming
    what holds the memory; the room's lock is free again for the next wake. Read from a real ledger."""
    import asyncio

    from elastikv.config import Size
    from elastikv.ledger import Ledger
    from elastikv.router.room import Room
    from elastikv.router.states import Unavailable

    ledger = Ledger("fleet-test", total_bytes=100 * MIB, directory=tmp_path / "ledger", budget=Size(nbytes=10 * MIB))
    ledger.hold("keeper", weights=8 * MIB, other=0)

    async def run() -> None:
        async with httpx.AsyncClient() as client:
            keeper, waking = _keeper_and_waking(client, tmp_path)
            room = Room({"keeper": keeper, "waking": waking}, lambda m: ledger.summary())
            room.footprint["waking"] = 4 * MIB
            t0 = time.monotonic()
            with pytest.raises(Unavailable, match=r"no room .* waking: it needs 5 MiB.*keeper 8 MiB \(pinned\)"):
                async with room.for_wake(waking):
                    pytest.fail("woke without room")
            assert 0.5 < time.monotonic() - t0 < 5.0  # waited for the start timeout, not forever
            assert not room.lock.locked()
            ledger.drop_holding("keeper")  # the memory comes free: the same wake now goes ahead
            async with room.for_wake(waking):
                assert room.lock.locked()  # held through the wake, since the footprint counted
            assert not room.lock.locked()

    try:
        asyncio.run(run())
    finally:
        ledger.close()


def test_a_starting_engine_waits_a_bounded_time_for_room_for_its_weights(tmp_path: Path) -> None:
    """Seen in a CPU fleet run: the router made room for a starting model, then the engines already awake grew
    their KV reserves under load while it loaded, and the start was refused at once: a crash, restarted with
    backoff while its requests got 503s. A starting engine now waits (bounded) for room: it books once another
    engine gives memory back, and is refused with the budget's message once the wait is over."""
    import torch

    from elastikv.config import Settings
    from elastikv.errors import LimitExceeded
    from elastikv.instance import open_holding
    from elastikv.serving.footprint import Footprint

    settings = Settings.from_env({"ELASTIKV_BACKEND": "host", "ELASTIKV_HOST_MEMORY": "64MiB",
                                  "ELASTIKV_BOOK_WEIGHTS": "on", "ELASTIKV_DEVICE_BUDGET": "16MiB",
                                  "ELASTIKV_LEDGER_DIR": str(tmp_path / "ledger")})  # fmt: skip
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights
    other = open_holding(torch.device("cpu"), settings, name="awake-one")
    assert other is not None
    other.book(weights=14 * MIB)  # the engine already awake holds nearly all the budget
    footprint = Footprint(model, torch.device("cpu"), settings, name="starting")
    try:
        t0 = time.monotonic()
        with pytest.raises(LimitExceeded, match="cannot take its weights"):
            footprint.book(wait_s=1.0)
        assert 1.0 <= time.monotonic() - t0 < 3.0
        threading.Timer(0.7, other.drop).start()  # it gives its memory back while the other waits
        t0 = time.monotonic()
        footprint.book(wait_s=10.0)
        assert 0.6 < time.monotonic() - t0 < 5.0
        assert footprint.holding is not None and footprint.holding.weights == footprint.weights
    finally:
        footprint.close()
        other.close()


def test_an_asleep_engine_keeps_what_it_still_holds_booked_and_its_wake_needs_only_the_rest(tmp_path: Path) -> None:
    """A sleeping engine still holds its CUDA context and graph pools (on the H100, five vLLM servers held 2.6 GiB
    more than the ledger knew): it re-books that as ``other`` with no weights (``Holding.rest``). The router learns
    footprints only from awake rows, and a wake needs its footprint less what it already holds booked."""
    import asyncio

    import torch

    from elastikv.config import Settings
    from elastikv.instance import open_holding
    from elastikv.ledger import summaries
    from elastikv.router.room import Room

    settings = Settings.from_env({"ELASTIKV_BACKEND": "host", "ELASTIKV_HOST_MEMORY": "64MiB",
                                  "ELASTIKV_BOOK_WEIGHTS": "on", "ELASTIKV_DEVICE_BUDGET": "10MiB",
                                  "ELASTIKV_LEDGER_DIR": str(tmp_path / "ledger")})  # fmt: skip
    keeper = open_holding(torch.device("cpu"), settings, name="keeper")
    sleeper = open_holding(torch.device("cpu"), settings, name="waking")
    assert keeper is not None and sleeper is not None

    def rows() -> dict[str, tuple[int, int]]:
        (summary,) = summaries(tmp_path / "ledger")
        return {h.name: (h.weights_bytes, h.other_bytes) for h in summary.holdings}

    try:
        keeper.book(weights=3 * MIB)
        sleeper.book(weights=4 * MIB, other=2 * MIB)
        sleeper.rest(2 * MIB)  # asleep: the weights are off the device, the context is not
        assert rows() == {"keeper": (3 * MIB, 0), "waking": (0, 2 * MIB)}

        async def run() -> None:
            async with httpx.AsyncClient() as client:
                awake, waking = _keeper_and_waking(client, tmp_path)
                room = Room({"keeper": awake, "waking": waking}, lambda m: summaries(tmp_path / "ledger")[0])
                room.footprint["waking"] = 6 * MIB  # learned when it was last awake
                # 10 MiB budget, 5 MiB booked: the wake needs 6 - 2 (already booked) + 1 (KV reserve) = 5 MiB.
                async with room.for_wake(waking):
                    assert room.lock.locked()  # it fits: no eviction (the keeper is pinned), no wait
                assert room.footprint["waking"] == 6 * MIB  # the asleep row (no weights) taught it nothing

        asyncio.run(run())
        sleeper.rest(0)  # nothing measurable left (no driver figure): the booking goes
        assert rows() == {"keeper": (3 * MIB, 0)}
    finally:
        sleeper.close()
        keeper.close()


def test_room_ahead_on_an_unreadable_ledger_logs_and_returns_with_the_room_free(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault while making room ahead (here the ledger cannot be read) ends that round with a warning: nothing
    raised into the router's watch, nothing put to sleep, the room's lock free for the next wake."""
    import asyncio
    import dataclasses

    from elastikv.errors import LedgerError
    from elastikv.router.room import Room
    from elastikv.router.states import State

    def unreadable(_model: object) -> None:
        raise LedgerError("the ledger is busy: held by pid 1 (a test)")

    async def run() -> None:
        async with httpx.AsyncClient() as client:
            idle, waiting = _keeper_and_waking(client, tmp_path)
            idle.spec = dataclasses.replace(idle.spec, pin=False)
            idle.last_used -= 60.0  # idle for a minute
            for state in (State.STARTING, State.AWAKE, State.DRAINING, State.SLEEPING, State.ASLEEP):
                waiting.state = state
            room = Room({"keeper": idle, "waking": waiting}, unreadable)
            room.footprint["waking"] = 4 * MIB
            await asyncio.wait_for(room.make_room_ahead(1.0), timeout=5)
            assert not room.lock.locked()
            assert idle.state is State.AWAKE and not room.evictions

    with caplog.at_level("WARNING", logger="elastikv.router"):
        asyncio.run(run())
    assert "room ahead: the ledger is busy" in caplog.text
