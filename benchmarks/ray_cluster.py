"""``elastikv cluster`` on a simulated Ray cluster: start time, routing overhead, a wake on another node.

    python benchmarks/ray_cluster.py [--nodes 2] [--requests 60]

One machine, ``ray.cluster_utils.Cluster``: a head node without GPUs (Serve's proxy, controller and the ingress)
and ``--nodes`` worker nodes with one fake GPU each, one engine replica per node, each with its own ledger and
budget (the simulation knobs of docs/ray.md). Two tiny models on the host backend, started asleep. It measures:

- cluster start: from creating the Ray cluster to every replica's ``elastikv serve`` answering (and, apart, the
  deploy alone: ``deploy.start``);
- routing overhead: the median time of a 1-token completion through the cluster (proxy, ingress, request
  router, replica, its router, the engine) less the same through a direct ``elastikv serve`` of the same model on
  the same machine, both warm, requests one after another;
- wake on another node: model ``a`` awake on one node, ``b`` asleep everywhere; a request for ``b`` wakes it on
  the node with the most memory free (not ``a``'s): the whole request, and the same request once ``b`` is awake
  (the difference is the wake and the routing to it). ``b`` sleeps after 1 s idle, so this repeats.

On a CPU the engines, Ray's processes and the client share the machine's cores: the figures include that
contention (the machine is named in the results). Real GPUs across hosts add a network hop per request
(client -> head -> node), which this does not measure.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import httpx
import yaml
from benchmarks._results import environment, save

from elastikv import children
from elastikv.bench.models import make_model
from elastikv.ports import free_port

ENV = {"ELASTIKV_BACKEND": "host", "ELASTIKV_HOST_MEMORY": "512MiB", "ELASTIKV_RESERVE": "0",
       "ELASTIKV_BOOK_WEIGHTS": "on"}  # fmt: skip
BODY = {"prompt": "Hello", "max_tokens": 1}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, simulated Ray cluster"


def timed(url: str, model: str, **extra: Any) -> tuple[float, httpx.Response]:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", json={"model": model, **BODY, **extra}, timeout=120)
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    return elapsed, r


def median_ms(url: str, model: str, n: int) -> float:
    for _ in range(5):  # warm: connections, caches
        timed(url, model)
    return 1000 * statistics.median(timed(url, model)[0] for _ in range(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=2, help="Worker nodes (one fake GPU, one replica each).")
    ap.add_argument("--requests", type=int, default=60, help="Requests per median.")
    ap.add_argument("--wakes", type=int, default=5, help="Wakes of b to time.")
    args = ap.parse_args()

    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    import ray
    from ray.cluster_utils import Cluster

    from elastikv.ray import deploy
    from elastikv.ray.config import load_cluster_config

    tmp = Path(tempfile.mkdtemp(prefix="elastikv-ray-bench-"))
    for seed, name in enumerate(("a", "b")):
        make_model(tmp / name, size="tiny", seed=seed)
    models = [{"name": "a", "model": "./a", "idle": "never", "args": ["--dtype", "float32"]},
              {"name": "b", "model": "./b", "idle": "1s", "args": ["--dtype", "float32"]}]  # fmt: skip
    port, direct_port = free_port(), free_port()
    cluster_cfg = {"env": ENV, "models": models, "cluster": {
        "listen": f"127.0.0.1:{port}", "min_replicas": args.nodes, "stats_period_s": 0.25,
        "ledger_dir": str(tmp / "ledger" / "{node}"), "device_budget": "64MiB"}}  # fmt: skip
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(cluster_cfg, sort_keys=False))
    direct_cfg = {"listen": f"127.0.0.1:{direct_port}", "env": {**ENV, "ELASTIKV_LEDGER_DIR": str(tmp / "dl")},
                  "models": [{**models[0], "start": "awake"}]}  # fmt: skip
    (tmp / "direct.yaml").write_text(yaml.safe_dump(direct_cfg, sort_keys=False))
    results: dict[str, Any] = {"nodes": args.nodes, "requests": args.requests}

    # The direct router first, alone on the machine: its figure is the baseline.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIKV")}
    direct = children.popen([sys.executable, "-m", "elastikv.cli", "serve", str(tmp / "direct.yaml"), "--log-dir",
                             str(tmp / "direct-logs")], env=env, stdout=(tmp / "direct.log").open("wb"),
                            stderr=subprocess.STDOUT)  # fmt: skip
    direct_url = f"http://127.0.0.1:{direct_port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{direct_url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert direct.poll() is None and time.monotonic() < deadline, (tmp / "direct.log").read_text()[-3000:]
        time.sleep(0.2)
    rc = None
    try:
        t0 = time.monotonic()
        rc = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
        for _ in range(args.nodes):
            rc.add_node(num_cpus=2, num_gpus=1)
        ray.init(address=rc.address, logging_level="WARNING")
        rc.wait_for_nodes()
        t1 = time.monotonic()
        url = deploy.start(load_cluster_config(tmp / "cluster.yaml"))
        results["cluster_start_s"] = round(time.monotonic() - t0, 2)
        results["deploy_s"] = round(time.monotonic() - t1, 2)
        node_a = timed(url, "a")[1].headers["x-elastikv-node"]  # wakes a on one node
        time.sleep(1.0)  # the request routers hear of it
        direct_ms = median_ms(direct_url, "a", args.requests)
        cluster_ms = median_ms(url, "a", args.requests)
        results |= {"direct_ms": round(direct_ms, 2), "cluster_ms": round(cluster_ms, 2),
                    "routing_overhead_ms": round(cluster_ms - direct_ms, 2)}  # fmt: skip
        wakes, awake, elsewhere = [], [], 0
        for _ in range(args.wakes):
            while any(s["models"].get("b", {}).get("state") == "awake" for s in deploy.replica_stats()):
                time.sleep(0.2)  # b sleeps after 1 s idle
            time.sleep(0.6)  # ... and the request routers hear of it
            elapsed, r = timed(url, "b")
            wakes.append(elapsed)
            elsewhere += r.headers["x-elastikv-node"] != node_a
            awake.append(min(timed(url, "b")[0] for _ in range(3)))
        results |= {"wake_elsewhere_s": [round(w, 3) for w in wakes], "wake_elsewhere_median_s":
                    round(statistics.median(wakes), 3), "b_awake_s": round(statistics.median(awake), 3),
                    "wakes_on_another_node": f"{elsewhere}/{args.wakes}"}  # fmt: skip
        t2 = time.monotonic()
        deploy.stop()
        results["stop_s"] = round(time.monotonic() - t2, 2)
    finally:
        if rc is not None:
            ray.shutdown()
            rc.shutdown()
        children.stop_group(direct)
    label = machine()
    summary = "\n".join([
        f"# Ray cluster ({label})", "",
        f"- cluster start ({args.nodes} GPU nodes + head, 2 tiny models asleep): {results['cluster_start_s']} s "
        f"(deploy alone {results['deploy_s']} s)",
        f"- 1-token completion, median of {args.requests}: direct router {results['direct_ms']} ms, through the "
        f"cluster {results['cluster_ms']} ms: routing overhead {results['routing_overhead_ms']} ms",
        f"- wake on another node (b asleep everywhere, a awake elsewhere): median {results['wake_elsewhere_median_s']}"
        f" s per request ({results['wakes_on_another_node']} on a node other than a's), b awake: "
        f"{results['b_awake_s']} s",
        f"- stop: {results['stop_s']} s", "",
    ])  # fmt: skip
    print(summary)
    path = save("ray-cluster", label, {"env": environment(label), "results": results}, summary)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
