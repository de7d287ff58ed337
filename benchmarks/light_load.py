"""Light load, one engine: requests one at a time with idle gaps between them, static KV cache against elastikv's.

    python benchmarks/light_load.py [--requests 8] [--prompt-tokens 4096] [--output-tokens 128] [--profile]

The multi-model benchmark's light-load figure mixes two things: what elastikv costs an engine, and how the three
models' requests happen to overlap on the GPU (which moves TTFT by tens of percent from one trace to the next).
This takes the second away: one embedded engine (the same code the router starts: ``serving/engine.py``), each
request sent when the engine is idle and its memory has gone back (the engine's own idle release, elastikv's
trim), so each one pays whatever an idle elastic model pays to start again. Modes alternate in ABBA order
(static, elastic, elastic, static, ...) on one loaded model, so a drift of the GPU's clocks hits both alike.
Prints TTFT and TPOT per mode and their ratios; ``--profile`` also prints the top operations of one request of
each mode (torch profiler). On a CPU: the tiny model on the host backend.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._results import environment, save

from elastikv.bench.models import make_model_once
from elastikv.config import Settings
from elastikv.serving.kv_size import kv_bytes_per_token


async def one_request(engine: Any, prompt: list[int], output_tokens: int) -> tuple[float, float]:
    """TTFT and TPOT (seconds) of one streamed request."""
    t0 = time.perf_counter()
    first = last = 0.0
    n = 0
    async for tokens, done, error in engine.generate(prompt, output_tokens):
        if error:
            raise RuntimeError(error)
        now = time.perf_counter()
        if not first:
            first = now
        last, n = now, len(tokens)
        if done:
            break
    return first - t0, (last - first) / max(1, n - 1)


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8b" if gpu else "tiny", choices=["tiny", "1b", "8b"])
    ap.add_argument("--requests", type=int, default=8, help="per mode (after one warm-up each)")
    ap.add_argument("--prompt-tokens", type=int, default=4096 if gpu else 256)
    ap.add_argument("--output-tokens", type=int, default=128 if gpu else 16)
    ap.add_argument("--max-batch-tokens", type=int, default=2048 if gpu else 512)
    ap.add_argument("--static-kv", default="5.33GiB" if gpu else "4MiB", help="the static mode's KV cache")
    ap.add_argument(
        "--read-tokens",
        type=int,
        default=131072 if gpu else 8192,
        help="elastic mode's per-batch KV read budget (the multi-model benchmark: what 16 GiB holds)",
    )
    ap.add_argument("--gap", type=float, default=1.0, help="idle seconds before each request")
    ap.add_argument("--model-dir", default=None, help="keep the random model here (made once; reused after)")
    ap.add_argument("--profile", action="store_true", help="print one request's top operations per mode")
    args = ap.parse_args()
    from elastikv.config import parse_size

    static_kv = parse_size(args.static_kv, what="--static-kv", allow_percent=False, allow_zero=False).resolve(0)
    label = torch.cuda.get_device_name() if gpu else "CPU (host backend)"
    dtype = "bfloat16" if args.size != "tiny" else "float32"
    profiles: dict[str, str] = {}

    with tempfile.TemporaryDirectory(prefix="elastikv-light-") as tmp:
        path = Path(args.model_dir or Path(tmp) / args.size)
        make_model_once(path, size=args.size)  # --model-dir: the multi-model benchmark's cache, shared
        from transformers.generation.continuous_batching import continuous_api

        from elastikv.serving.engine import Engine

        static_cache = continuous_api.PagedAttentionCache
        env = {"ELASTIKV_PREFIX_CACHE": "0", "ELASTIKV_LEDGER_DIR": str(Path(tmp) / "ledger")}
        if not gpu:
            env |= {"ELASTIKV_HOST_MEMORY": "2GiB", "ELASTIKV_RESERVE": "1MiB"}
        engine = Engine(path, name="light", settings=Settings.from_env(env), dtype=dtype,
                        max_batch_tokens=args.max_batch_tokens, max_kv_tokens=args.read_tokens)  # fmt: skip
        engine._stop()
        elastic_cache = continuous_api.PagedAttentionCache
        per_token = kv_bytes_per_token(engine.model.config.to_dict(), torch.finfo(getattr(torch, dtype)).bits // 8)
        static_blocks = static_kv // (32 * per_token)
        g = torch.Generator().manual_seed(0)

        def prompt() -> list[int]:
            return torch.randint(10, 2000, (args.prompt_tokens,), generator=g).tolist()

        def start(mode: str) -> None:  # the engine as the router starts it in that mode
            elastic = mode == "elastic"
            continuous_api.PagedAttentionCache = elastic_cache if elastic else static_cache
            engine.static_kv = None if elastic else static_kv
            engine.cb_config.num_blocks = None if elastic else static_blocks
            engine._start()

        async def run() -> dict[str, list[tuple[float, float]]]:
            out: dict[str, list[tuple[float, float]]] = {"static": [], "elastic": []}
            for i in range(args.requests // 2 + 1):
                for mode in ("static", "elastic") if i % 2 == 0 else ("elastic", "static"):
                    start(mode)
                    await asyncio.sleep(args.gap)
                    await one_request(engine, prompt(), args.output_tokens)  # warm-up: each start pays once
                    for _ in range(2 if i else 0):
                        await asyncio.sleep(args.gap)  # idle: memory goes back (engine and elastikv)
                        out[mode].append(await one_request(engine, prompt(), args.output_tokens))
                    if args.profile and i == 1 and mode not in profiles:
                        await asyncio.sleep(args.gap)
                        from torch.profiler import ProfilerActivity, profile

                        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
                        with profile(activities=acts) as prof:
                            await one_request(engine, prompt(), args.output_tokens)
                        key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
                        profiles[mode] = prof.key_averages().table(sort_by=key, row_limit=25)
                    engine._stop()
            return out

        results = asyncio.run(run())

    rows = {}
    for mode, figures in results.items():
        ttft = [t for t, _ in figures]
        tpot = [p for _, p in figures]
        rows[mode] = {
            "requests": len(figures),
            "ttft_mean_ms": 1e3 * statistics.fmean(ttft),
            "ttft_median_ms": 1e3 * statistics.median(ttft),
            "ttft_ms": [round(1e3 * t, 1) for t in ttft],
            "tpot_mean_ms": 1e3 * statistics.fmean(tpot),
            "tpot_ms": [round(1e3 * t, 2) for t in tpot],
        }
    ratio = {k: rows["elastic"][k] / rows["static"][k] for k in ("ttft_mean_ms", "ttft_median_ms", "tpot_mean_ms")}
    env_info = environment(label)
    lines = [
        f"# light load, one engine: static KV cache vs elastikv ({label})",
        "",
        f"{env_info['date']}, commit {env_info['commit']}: `{env_info['command']}`",
        "",
        f"{args.size} model, requests of {args.prompt_tokens}+{args.output_tokens} tokens one at a time, "
        f"{args.gap:g} s idle before each; static cache {args.static_kv}; modes in ABBA order.",
        "",
        "| mode | requests | TTFT mean (ms) | TTFT median | TPOT mean (ms) |",
        "|---|---|---|---|---|",
    ]
    for mode, r in rows.items():
        lines.append(f"| {mode} | {r['requests']} | {r['ttft_mean_ms']:.1f} | {r['ttft_median_ms']:.1f} | "
                     f"{r['tpot_mean_ms']:.2f} |")  # fmt: skip
    lines += [
        "",
        f"elastic / static: TTFT mean **{ratio['ttft_mean_ms']:.3f}**, median {ratio['ttft_median_ms']:.3f}, "
        f"TPOT {ratio['tpot_mean_ms']:.3f}",
    ]
    md = "\n".join(lines) + "\n"
    print(md)
    for mode, table in profiles.items():
        print(f"== profile of one {mode} request\n{table}")
    path = save("light-load", label, {"env": env_info, "args": vars(args), "modes": rows, "ratios": ratio,
                                      "profiles": profiles}, md)  # fmt: skip
    print(f"saved {path}")


if __name__ == "__main__":
    main()
