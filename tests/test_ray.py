"""``elastikv.ray`` end to end on the CPU (issue 23, design A): real Ray, real Serve, real engines.

One simulated cluster for the whole module (``ray.cluster_utils.Cluster``): a head node with no GPU (Serve's
controller, its HTTP proxy, the ingress) and three worker nodes with one fake GPU each. Every engine replica runs
its own ``elastikv serve`` over three tiny models (two started asleep, one lazily), with a ledger directory and
a budget of its own per node (``cluster.ledger_dir`` with ``{node}``, ``cluster.device_budget``: the simulation
knobs), so free memory differs by node as it would on real GPUs. A direct ``elastikv serve`` of the same models
runs beside it, for the answers. The tests run in file order; the last deletes the application and checks
nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tests.test_router import wait_healthy

from elastikv import children

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="needs httpx: pip install -e '.[serve]'")
yaml = pytest.importorskip("yaml", reason="needs PyYAML: pip install -e '.[serve]'")
ray = pytest.importorskip("ray", reason="needs Ray Serve: pip install -e '.[ray]'")
pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install -e '.[ray]'")
psutil = pytest.importorskip("psutil")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not transformers.__version__.startswith("5.17."),
        reason=f"the engine supports transformers 5.17; this is {transformers.__version__}",
    ),
]

MODELS = ("a", "b", "hot")
MIB = 1024**2
BODY = {"prompt": "Return a list of items.", "max_tokens": 12}
# The replicas push their figures this often; Serve's defaults (10 s) are read at import in every Ray worker,
# which inherits this process's environment (the simulated nodes are its children).
PUSH = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}  # fmt: skip


@dataclass
class Cluster:
    ray_cluster: Any
    url: str
    direct: str  # a plain `elastikv serve` of the same models
    direct_pid: int
    tmp: Path
    start_s: float

    def node_of(self, node_id: str) -> Any:
        return next(n for n in self.ray_cluster.worker_nodes if n.node_id == node_id)


def _config(tmp: Path, port: int) -> dict[str, Any]:
    return {
        "env": {
            "ELASTIKV_BACKEND": "host",
            "ELASTIKV_HOST_MEMORY": "512MiB",
            "ELASTIKV_RESERVE": "0",
            "ELASTIKV_BOOK_WEIGHTS": "on",
        },
        "models": [
            {"name": "a", "model": "./a", "idle": "never", "args": ["--dtype", "float32"]},
            # Lazy: no engine until its first request (a replica starts faster; "stopped" ranks like "asleep").
            {"name": "b", "model": "./b", "idle": "never", "start": "lazy", "args": ["--dtype", "float32"]},
            # The hot model sleeps soon after its burst, so that the replica it spread to turns cold.
            {"name": "hot", "model": "./hot", "idle": "2s", "args": ["--dtype", "float32"]},
        ],
        "cluster": {
            "listen": f"127.0.0.1:{port}",
            "min_replicas": 2,
            "max_replicas": 3,
            "max_ongoing_requests": 4,
            "scale_up_at": 2,
            "scale_down_at": 0.5,
            "upscale_delay_s": 0.5,
            "downscale_delay_s": 1,
            "stats_period_s": 0.25,
            "replica_start_timeout_s": 120,
            "ledger_dir": str(tmp / "ledger" / "{node}"),
            "device_budget": "64MiB",
        },
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from ray.cluster_utils import Cluster as RayCluster

    from elastikv.bench.models import make_model
    from elastikv.ports import free_port
    from elastikv.ray import deploy
    from elastikv.ray.config import load_cluster_config

    tmp = tmp_path_factory.mktemp("ray")
    for seed, name in enumerate(MODELS):
        make_model(tmp / name, size="tiny", seed=seed)
    port, direct_port = free_port(), free_port()
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(_config(tmp, port), sort_keys=False))
    direct = {k: v for k, v in _config(tmp, port).items() if k != "cluster"}
    direct |= {"listen": f"127.0.0.1:{direct_port}", "env": {**direct["env"], "ELASTIKV_LEDGER_DIR": str(tmp / "dl")}}
    for entry in direct["models"]:
        entry["start"] = "awake"  # up before the tests (it starts while the cluster does)
    (tmp / "direct.yaml").write_text(yaml.safe_dump(direct, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIKV")}
    direct_proc = children.popen([sys.executable, "-m", "elastikv.cli", "serve", str(tmp / "direct.yaml"),
                                  "--log-dir", str(tmp / "direct-logs")], env=env,
                                 stdout=(tmp / "direct.log").open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
    saved = {k: os.environ.get(k) for k in PUSH}
    os.environ.update(PUSH)
    t0 = time.monotonic()
    # Lost nodes are noticed after health_check_period_ms * failure threshold (Ray's defaults: 3 s x 5).
    rc = RayCluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3},
    })  # fmt: skip
    for _ in range(3):
        rc.add_node(num_cpus=2, num_gpus=1)
    try:
        ray.init(address=rc.address, logging_level="WARNING")
        rc.wait_for_nodes()
        url = deploy.start(load_cluster_config(tmp / "cluster.yaml"))
        start_s = time.monotonic() - t0
        wait_healthy(direct_proc, f"http://127.0.0.1:{direct_port}", tmp / "direct.log")
        yield Cluster(rc, url, f"http://127.0.0.1:{direct_port}", direct_proc.pid, tmp, start_s)
    finally:
        with contextlib.suppress(Exception):
            deploy.stop()
        ray.shutdown()
        rc.shutdown()
        children.stop_group(direct_proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def post(url: str, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, **BODY, **extra}, timeout=120)


def stats_by_node() -> dict[str, dict[str, Any]]:
    from elastikv.ray import deploy

    return {s["node_id"]: s for s in deploy.replica_stats() if s["up"]}


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def test_one_endpoint_routes_by_model_and_wakes_where_most_memory_is_free(cluster: Cluster) -> None:
    print(f"cluster up in {cluster.start_s:.1f} s")
    nodes = wait_for(lambda: len(s := stats_by_node()) == 2 and s, 30, "two replicas reporting")
    assert all(m["state"] in ("asleep", "stopped") for s in nodes.values() for m in s["models"].values()), nodes
    # Asleep everywhere: "a" wakes on a node; "b" then wakes on the other, which has more memory free.
    node_a = post(cluster.url, "a").headers["x-elastikv-node"]
    wait_for(lambda: stats_by_node()[node_a]["models"]["a"]["state"] == "awake", 10, "a awake")
    time.sleep(0.6)  # the request router hears of it within stats_period_s (0.25 s) and a long poll
    free = {n: s["free_bytes"] for n, s in stats_by_node().items()}
    node_b = post(cluster.url, "b").headers["x-elastikv-node"]
    assert node_b != node_a and free[node_b] > free[node_a], (node_a, node_b, free)
    time.sleep(0.6)
    # Awake models stay where they are: no request misrouted.
    seen = {(m, post(cluster.url, m).headers["x-elastikv-node"]) for m in ("a", "b") * 20}
    assert seen == {("a", node_a), ("b", node_b)}, seen
    # A model known nowhere still reaches a replica, whose router answers OpenAI's 404.
    missing = post(cluster.url, "nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    listed = httpx.get(f"{cluster.url}/v1/models", timeout=30).json()
    assert sorted(m["id"] for m in listed["data"]) == sorted(MODELS)


def test_answers_and_streams_equal_a_direct_router(cluster: Cluster) -> None:
    for model in ("a", "b"):
        via = post(cluster.url, model, max_tokens=24).json()
        direct = post(cluster.direct, model, max_tokens=24).json()
        assert via["choices"][0]["text"] == direct["choices"][0]["text"], (via, direct)
        assert via["choices"][0].get("token_ids") == direct["choices"][0].get("token_ids")
        chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        c1 = httpx.post(f"{cluster.url}/v1/chat/completions", json=chat, timeout=60).json()
        c2 = httpx.post(f"{cluster.direct}/v1/chat/completions", json=chat, timeout=60).json()
        assert c1["choices"][0]["message"] == c2["choices"][0]["message"]
    # Streaming through proxy, ingress, replica, router and engine: incremental, and the same text.
    arrivals: list[tuple[float, str]] = []
    t0 = time.monotonic()
    body = {"model": "a", "prompt": "Describe a dictionary.", "max_tokens": 160, "stream": True}
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic() - t0, line[6:]))
    assert arrivals[-1][1] == "[DONE]"
    text = "".join(json.loads(d)["choices"][0]["text"] for _, d in arrivals[:-1])
    whole = post(cluster.direct, "a", prompt="Describe a dictionary.", max_tokens=160).json()["choices"][0]["text"]
    assert text == whole
    first, last = arrivals[0][0], arrivals[-1][0]
    assert last - first > 0.2 and len([t for t, _ in arrivals if first + 0.05 < t < last - 0.05]) >= 3, arrivals


def _policy_on(stats: list[dict[str, Any]], running: int, target: int | None = None) -> int:
    from elastikv.ray.autoscale import ElastikvScaling
    from elastikv.ray.stats import ReplicaStats

    metrics: dict[str, dict[str, float]] = {}
    for s in stats:  # what record_autoscaling_stats() sends Serve, from the same replica state
        for key, value in ReplicaStats.from_routing(s).as_autoscaling().items():
            metrics.setdefault(key, {})[s["replica"]] = value
    ctx = SimpleNamespace(
        aggregated_metrics=metrics,
        total_num_requests=0.0,
        current_num_replicas=running,
        target_num_replicas=running if target is None else target,
    )
    return ElastikvScaling(scale_up_at=2, scale_down_at=0.5)(ctx)[0]


def test_a_hot_model_spreads_to_a_new_replica_and_the_cluster_shrinks_when_it_cools(cluster: Cluster) -> None:
    from elastikv.ray import deploy

    stop = threading.Event()
    codes: list[int] = []

    def client(max_tokens: int, until: threading.Event) -> None:  # streams back to back until told to stop
        while not until.is_set():
            with httpx.stream("POST", f"{cluster.url}/v1/completions", timeout=120,
                              json={"model": "hot", "prompt": "Describe a list.", "max_tokens": max_tokens,
                                    "stream": True}) as r:  # fmt: skip
                codes.append(r.status_code)
                for _ in r.iter_raw():
                    pass

    before = set(stats_by_node())
    assert _policy_on(list(stats_by_node().values()), 2) == 2  # a and b awake, nothing in flight: stay
    burst = [threading.Thread(target=client, args=(48, stop), daemon=True) for _ in range(10)]
    t0 = time.monotonic()
    trickle_stop = threading.Event()
    trickle = [threading.Thread(target=client, args=(4, trickle_stop), daemon=True) for _ in range(2)]
    try:
        for c in burst:
            c.start()
        # The policy on the replicas' real figures under this burst wants one more replica, and Serve starts one.
        # 90 s: on CI's two loaded cores the first streams wait for "hot" to wake and for the ingress's handle.
        hot = wait_for(lambda: (s := list(stats_by_node().values())) and sum(r["in_flight"] for r in s) >= 5 and s,
                       90, "the burst in flight")  # fmt: skip
        assert _policy_on(hot, 2) == 3, hot
        wait_for(lambda: len(deploy.replica_stats()) == 3, 60, "Serve starting a third replica")
        t_up = time.monotonic()
        print(f"scale-up asked {t_up - t0:.1f} s into the burst")
        # Two CPU cores: the burst would starve the new replica's start. A trickle keeps the count wanted at 3.
        for c in trickle:
            c.start()
        stop.set()
        new = wait_for(lambda: set(stats_by_node()) - before, 120, "the third replica up")
        print(f"third replica up {time.monotonic() - t_up:.1f} s after it was asked for")
        # Another burst: the replicas where the hot model is awake fill up (max_ongoing_requests), and the next
        # rank is where it is asleep with the most memory free: the new node, which holds nothing awake. Waves until
        # the new node serves, within a bound: on two loaded cores the ingress's handle may hear of the new replica
        # (Serve's long poll) after a first wave has already drained into the old ones.
        seen: list[str] = []
        lock = threading.Lock()

        def one() -> None:
            r = post(cluster.url, "hot", max_tokens=48)
            with lock:
                codes.append(r.status_code)
                seen.append(r.headers.get("x-elastikv-node", ""))

        waves, deadline = 0, time.monotonic() + 90
        while not new & set(seen) and time.monotonic() < deadline:
            waves += 1
            wave = [threading.Thread(target=one) for _ in range(14)]
            for t in wave:
                t.start()
            for t in wave:
                t.join(120)
        assert new & set(seen), (new, seen)
        print(f"{waves} wave(s) of 14 before the new node served")
        print(f"hot model served on the new node {time.monotonic() - t0:.1f} s into the test")
    finally:
        stop.set()
        trickle_stop.set()
        for c in burst + trickle:
            if c.ident is not None:  # a failure before the trickle started leaves it unstarted: not joinable
                c.join(60)
    assert set(codes) == {200}, codes
    # Cool: the hot model sleeps after its idle time (2 s) wherever it woke; a replica with nothing awake and
    # nothing in flight is cold, and the policy gives one back. Serve picks which (docs/ray.md, "Limits").
    wait_for(lambda: _policy_on(list(stats_by_node().values()), 3) == 2, 30, "the policy wanting 2 again")
    t_cool = time.monotonic()
    wait_for(lambda: len(deploy.replica_stats()) == 2, 60, "back to two replicas")
    print(f"back to two replicas {time.monotonic() - t_cool:.1f} s after the policy wanted it")
    for model in ("a", "b"):
        assert post(cluster.url, model).status_code == 200


def test_a_lost_node_fails_its_requests_clearly_and_its_models_are_served_elsewhere(cluster: Cluster) -> None:
    node_a = post(cluster.url, "a").headers["x-elastikv-node"]
    lost = cluster.node_of(node_a)
    events: list[str] = []
    ended = threading.Event()

    def long_stream() -> None:
        body = {"model": "a", "prompt": "Describe a dictionary.", "max_tokens": 2000, "stream": True}
        try:
            with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
        except httpx.HTTPError as exc:
            events.append(f"transport error: {type(exc).__name__}")
        finally:
            ended.set()

    streamer = threading.Thread(target=long_stream, daemon=True)
    streamer.start()
    wait_for(lambda: len(events) >= 3, 30, "the stream under way")
    t0 = time.monotonic()
    cluster.ray_cluster.remove_node(lost, allow_graceful=False)
    assert ended.wait(30), "a request in flight on the lost node hung"
    failed_in = time.monotonic() - t0
    assert "[DONE]" not in events and ("replica_lost" in events[-1] or "error" in events[-1]), events[-3:]
    # The model is served by a replica on another node within seconds (woken there).
    deadline = time.monotonic() + 30
    while True:
        r = post(cluster.url, "a")
        if r.status_code == 200:
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    served_in = time.monotonic() - t0
    assert r.headers["x-elastikv-node"] != node_a
    print(f"lost node: in-flight stream ended in {failed_in:.1f} s with {events[-1]}; 'a' served elsewhere "
          f"{served_in:.1f} s after")  # fmt: skip
    assert served_in < 20


def _ours(tmp: Path, direct_pid: int) -> list[str]:
    """Processes of the cluster's still running: any whose command line names this test's directory or a
    replica's work directory, outside the direct router's process tree."""
    try:
        direct = {direct_pid} | {p.pid for p in psutil.Process(direct_pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        direct = set()
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if (str(tmp) in line or "elastikv-replica-" in line) and p.pid not in direct and p.pid != os.getpid():
            found.append(f"{p.pid}: {line[:160]}")
    return found


def test_stopping_leaves_no_process_and_no_ledger_row(cluster: Cluster) -> None:
    from elastikv.ledger import summaries
    from elastikv.ray import deploy

    t0 = time.monotonic()
    deploy.stop()
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not _ours(cluster.tmp, cluster.direct_pid), 30, "every process gone")
    print(f"stopped in {time.monotonic() - t0:.1f} s")
    assert not _ours(cluster.tmp, cluster.direct_pid)
    for node_dir in (cluster.tmp / "ledger").iterdir():
        for s in summaries(node_dir):
            assert not s.instances and not s.holdings and not s.asleep, (node_dir, s)
