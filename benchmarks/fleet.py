"""More models than the device holds, behind one router: every request answered, return visits woken fast, the
device's memory sampled against the budget (issue 22's fleet).

    python benchmarks/fleet.py [--engine vllm|elastikv] [--models 10] [--size 8b] [--rounds 2] [--gap 6]
                               [--requests 2] [--budget 90%] [--modes elastic,own] [--model-cache DIR]

One model directory serves every fleet member (their weights are loaded apart, so that costs nothing in
fairness and saves making ten random models). All start lazily: the first round's visits are cold starts
(reported apart); later rounds return to models that were put to sleep to make room for others. The trace visits
the models in turn, ``requests`` streamed requests (a 256-token prompt, 16 tokens out) per visit, ``gap`` seconds
apart. Modes, run one after the other in the same command:

- ``elastic``: elastikv active; every engine books its weights, KV and other memory in the ledger against
  ``--budget``, and the router makes room before a wake or start (the least recently used idle model sleeps,
  level 1); no idle timer;
- ``own`` (vLLM only): vLLM's own sleep mode without elastikv, the router putting a model to sleep once idle for
  ``gap / 2`` s (no ledger, so no room-making: a wake or start either fits in what is free or fails), each
  server sized by ``--gpu-memory-utilization`` to its weights + 4 GiB of KV;
- ``elastic-idle``: ``elastic`` with ``own``'s idle timer, so that the two differ only in the engine's memory
  management (a visit in turn finds its model asleep, never waiting for another's eviction: on the H100 elastic's
  return visits took 0.72 s, a sleep and a wake, against own's 0.38 s, a wake);
- ``elastic-ahead``: ``elastic`` with the router's ``room_ahead`` of ``gap / 2``: no idle timer, models stay awake
  while the budget holds them, and room for the next wake is made before it comes (``router/room.py``).

Printed and saved (benchmarks/results/fleet-*.json/.md): per mode, requests answered and failed, time to first
token of requests that found their model asleep (p50, p99, max) and of cold starts, wakes, starts, evictions,
the most device memory the fleet held (sampled every 0.1 s, less what was in use before it started: this process's
own CUDA context) against the budget, and out-of-memory lines in engine logs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._results import environment, save
from rich.console import Console

from elastikv.bench.models import make_model_once
from elastikv.bench.replay import replay_through_router
from elastikv.bench.workload import Arrival, Outcome, percentile
from elastikv.config import format_bytes, parse_size
from elastikv.router.config import ModelSpec, RouterConfig

KV_PER_MODEL = 4 * 2**30  # what an `own` vLLM server is sized for beside its weights


class DeviceSampler:
    """The device's memory in use (the driver's figure: every process), sampled in a thread; host: 0. ``base``:
    what was in use when sampling began, before the fleet's engines started (this benchmark's own CUDA context,
    ~0.5 GiB on an H100, and anything else on the device); ``fleet_peak``: the peak less that, what the fleet held
    at most, which is what the budget bounds."""

    def __init__(self) -> None:
        self.peak = 0
        self.base = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import torch

        if not torch.cuda.is_available():
            return
        free, total = torch.cuda.mem_get_info()
        self.base = self.peak = total - free
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            self._stop.wait(0.1)

    @property
    def fleet_peak(self) -> int:
        return max(0, self.peak - self.base)

    def __enter__(self) -> DeviceSampler:
        self._thread.start()
        while self._thread.is_alive() and self.peak == 0:  # the base is read before any engine starts
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def trace(names: list[str], rounds: int, gap: float, requests: int) -> list[Arrival]:
    return [Arrival(at=(r * len(names) + i) * gap + j * 0.05, model=name, prompt_tokens=256, output_tokens=16)
            for r in range(rounds) for i, name in enumerate(names) for j in range(requests)]  # fmt: skip


def fleet_config(mode: str, engine: str, model: Path, n: int, budget: int, env: dict[str, str], gap: float,
                 on_gpu: bool, start: str = "lazy") -> RouterConfig:  # fmt: skip
    from elastikv.router.router import free_port

    menv = dict(env)
    args: list[str] = []
    if engine == "vllm":
        args = ["--dtype", "bfloat16" if on_gpu else "float32", "--max-model-len", "4096",
                "--no-enable-prefix-caching", "--enable-sleep-mode"]  # fmt: skip
        menv |= {"VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1"}
    else:
        args = ["--dtype", "bfloat16" if on_gpu else "float32"]
    if mode.startswith("elastic"):
        menv |= {"ELASTIKV_DEVICE_BUDGET": str(budget), "ELASTIKV_BOOK_WEIGHTS": "on"}
        if engine == "vllm":
            args += ["--gpu-memory-utilization", "0.1"]  # checked free at start; sizes nothing under elastikv
    else:
        import torch

        weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        total = torch.cuda.mem_get_info()[1] if on_gpu else 2**40
        args += ["--gpu-memory-utilization", f"{(weights + KV_PER_MODEL + 2 * 2**30) / total:.3f}"]
    idle_s = None if mode in ("elastic", "elastic-ahead") else gap / 2  # elastic-idle: the same idle timer as own
    specs = tuple(
        ModelSpec(name=f"m{i}", engine=engine, model=str(model), command=None, args=tuple(args), env=menv,
                  limit=None, idle_s=idle_s, sleep_level=1, port=free_port(), health_path="/health",
                  start_timeout_s=900.0, start=start)
        for i in range(n)
    )  # fmt: skip
    return RouterConfig(host="127.0.0.1", port=free_port(), admin_token=None, models=specs, source=None,
                        room_ahead_s=gap / 2 if mode == "elastic-ahead" else None)  # fmt: skip


def figures(outcomes: list[Outcome], first_round: int) -> dict[str, Any]:
    cold = [o.ttft for o in outcomes[:first_round] if o.ttft is not None]
    back = [o.ttft for o in outcomes[first_round:] if o.ttft is not None]
    return {
        "requests": len(outcomes),
        "answered": sum(o.ok for o in outcomes),
        "errors": sorted({(o.error or f"status {o.status}")[:160] for o in outcomes if not o.ok}),
        "return_ttft_p50_s": percentile(back, 50),
        "return_ttft_p99_s": percentile(back, 99),
        "return_ttft_max_s": max(back, default=float("nan")),
        "cold_ttft_p50_s": percentile(cold, 50),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="vllm", choices=["vllm", "elastikv"])
    ap.add_argument("--models", type=int, default=10)
    ap.add_argument("--size", default="8b", choices=["tiny", "1b", "8b"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gap", type=float, default=6.0, help="seconds between visits")
    ap.add_argument("--requests", type=int, default=2, help="requests per visit")
    ap.add_argument("--budget", default="90%", help="the device budget (elastic): bytes or a share of the device")
    ap.add_argument("--modes", default="elastic,own")
    ap.add_argument("--host-memory", default="4GiB", help="on a CPU: the host backend's memory (a smoke run)")
    ap.add_argument("--model-cache", default=os.environ.get("EKV_MODEL_CACHE", ".models"))
    ap.add_argument("--start", default="lazy", choices=["lazy", "asleep"],
                    help="lazy: the first round's visits are cold starts; asleep: every model is loaded at the "
                         "router's start (one at a time, room made for each) and put to sleep, so every visit "
                         "of the trace finds its model asleep or awake, never unloaded")  # fmt: skip
    args = ap.parse_args()
    import torch

    on_gpu = torch.cuda.is_available()
    if args.engine == "vllm" and not on_gpu:  # its sleep mode (what the router puts models to sleep with) is CUDA's
        sys.exit("fleet.py: vLLM's sleep mode needs a CUDA GPU (vLLM says 'Sleep mode is not supported on current "
                 "platform'); on a CPU run --engine elastikv --size tiny")  # fmt: skip
    device = torch.cuda.get_device_name(0) if on_gpu else "cpu (host backend)"
    total = torch.cuda.mem_get_info()[1] if on_gpu else parse_size(args.host_memory).resolve(0)
    budget = parse_size(args.budget, what="--budget").resolve(total)
    model = Path(args.model_cache) / f"{args.size}-seed0"
    make_model_once(model, size=args.size)
    env = {} if on_gpu else {"ELASTIKV_BACKEND": "host", "ELASTIKV_HOST_MEMORY": args.host_memory}
    names = [f"m{i}" for i in range(args.models)]
    arrivals = trace(names, args.rounds, args.gap, args.requests)
    unknown = sorted(set(args.modes.split(",")) - {"elastic", "elastic-ahead", "elastic-idle", "own"})
    if unknown:
        sys.exit(f"fleet.py: unknown mode(s) {', '.join(unknown)}: use elastic, elastic-ahead, elastic-idle or own")
    modes = [m for m in args.modes.split(",") if m.startswith("elastic") or args.engine == "vllm"]
    console = Console()
    results: dict[str, Any] = {}
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix="elastikv-fleet-") as d:
            menv = env | {"ELASTIKV_LEDGER_DIR": str(Path(d) / "ledger")}
            config = fleet_config(mode, args.engine, model, args.models, budget, menv, args.gap, on_gpu, args.start)
            t0 = time.monotonic()
            with DeviceSampler() as sampler:
                replayed, states = asyncio.run(replay_through_router(
                    config, [arrivals], log_dir=Path(d) / "logs", held=lambda _r: {}, console=console,
                    label=mode))  # fmt: skip
            logs = "".join(p.read_text(errors="replace") for p in (Path(d) / "logs").glob("*.log"))
            results[mode] = {
                **figures(replayed[0].outcomes, len(names) * args.requests),
                "seconds": time.monotonic() - t0,
                "wakes": sum(s["wakes"] for s in states.values()),
                "sleeps": sum(s["sleeps"] for s in states.values()),
                "restarts": sum(s["restarts"] for s in states.values()),
                "device_peak_bytes": sampler.peak,
                "device_base_bytes": sampler.base,
                "fleet_peak_bytes": sampler.fleet_peak,
                "oom_lines": sum("out of memory" in line.lower() for line in logs.splitlines()),
            }
    lines = [
        f"{args.models} x {args.size} ({args.engine} engine) on {device}: {args.rounds} rounds of visits {args.gap} s "
        f"apart, {args.requests} requests each; budget {format_bytes(budget)} of {format_bytes(total)}; models "
        f"start {args.start} (first round: {'cold starts' if args.start == 'lazy' else 'wakes'})",
        "",
        "| mode | answered | return visits: TTFT p50 / p99 / max (s) | first round: TTFT p50 (s) | wakes | sleeps "
        "| restarts | fleet peak (device less before) | OOM lines |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        lines.append(
            f"| {mode} | {r['answered']} of {r['requests']} | {r['return_ttft_p50_s']:.3f} / "
            f"{r['return_ttft_p99_s']:.3f} / {r['return_ttft_max_s']:.3f} | {r['cold_ttft_p50_s']:.2f} | "
            f"{r['wakes']} | {r['sleeps']} | {r['restarts']} | {format_bytes(r['fleet_peak_bytes'])} "
            f"({format_bytes(r['device_peak_bytes'])} less {format_bytes(r['device_base_bytes'])}) | "
            f"{r['oom_lines']} |"
        )
        for e in r["errors"][:3]:
            lines.append(f"|  | error: {e} | | | | | | | |")
    lines += ["", "Targets (issue 22): every request answered; p99 TTFT of a return visit <= 1 s (level 1); the "
              "device never above the budget; no out-of-memory."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    data = {**environment(device), "engine": args.engine, "models": args.models, "size": args.size,
            "budget_bytes": budget, "total_bytes": total, "start": args.start, "results": results}  # fmt: skip
    print("saved", save("fleet", device, data, text))


if __name__ == "__main__":
    main()
