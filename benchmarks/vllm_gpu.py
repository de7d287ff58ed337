"""vLLM with and without elastikv on the GPU, same command, same model: decode throughput and light-load TTFT.

    python benchmarks/vllm_gpu.py [--size 8b] [--waves 6] [--singles 24] [--model-cache DIR]

Two engines (``tests/vllm_runner.py``, scheduler and worker in one process; bf16, torch.compile, CUDA graphs,
FlashAttention 3, prefix caching on, vLLM 0.26's default Model Runner V2), both up at once and used one at a time,
alternating, so that drift of the machine hits both alike: plain vLLM (its static cache,
``gpu_memory_utilization`` 0.4) and vLLM with ``ELASTIKV=1`` (mapped on demand).

- decode throughput: waves of 32 prompts x (128 + 256 generated) tokens, greedy; generated tokens per second;
- light-load TTFT: one request at a time, a 512-token prompt and one generated token (the request's latency
  through ``LLM.generate``, which is its time to first token plus vLLM's per-call overhead, equal on both sides).

Every prompt is unique (no prefix-cache hits). Printed and saved (benchmarks/results/vllm-gpu-*.json/.md): the
figures, the ratios elastic / plain with the spread over paired waves, and whether the greedy tokens agree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._results import environment, save
from tests.vllm_harness import Engine, engine_env, prompts


def _env(tmp: Path, elastic: bool, extra: dict[str, str]) -> dict[str, str]:
    env = engine_env(tmp, elastic=elastic, multiprocess=False, VLLM_USE_FLASHINFER_SAMPLER="0", HF_HUB_OFFLINE="1",
                     ELASTIKV_RESERVE="256MiB")  # fmt: skip  # the default reserve
    env.pop("ELASTIKV_HOST_MEMORY", None)
    if elastic:
        env.update(extra)
    return env


def run(model: Path, tmp: Path, waves: int, singles: int, extra: dict[str, str]) -> dict[str, Any]:
    engines: dict[str, Engine] = {}
    start: dict[str, float] = {}
    kinds = ("plain", "elastic")
    decode: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    ttft: dict[str, list[float]] = {k: [] for k in kinds}
    single_maps = [0, 0]  # pages elastikv mapped during the single requests: in the background, by the caller
    try:
        for kind in kinds:  # one after the other: vLLM sizes the plain cache from free memory at its start
            t0 = time.perf_counter()
            engines[kind] = Engine(model, _env(tmp / kind, kind == "elastic", extra), gpu=True, util=0.4)
            ready = engines[kind].wait_ready()
            assert ready["elastic"] is (kind == "elastic"), engines[kind].tail()
            start[kind] = time.perf_counter() - t0
        for kind in kinds:  # warm-up: first batch shapes, CUDA graph replays, the elastic reserve
            engines[kind].call(op="generate", prompts=prompts(32, 128, seed=1), max_tokens=256, sample_ms=1000)
            engines[kind].call(op="generate", prompts=prompts(1, 512, seed=2), max_tokens=1, sample_ms=1000)
        for w in range(waves):
            batch = prompts(32, 128, seed=100 + w)
            for kind in kinds if w % 2 == 0 else kinds[::-1]:
                decode[kind].append(engines[kind].call(op="generate", prompts=batch, max_tokens=256, sample_ms=1000))
        for i in range(singles):
            one = prompts(1, 512, seed=1000 + i)
            for kind in kinds if i % 2 == 0 else kinds[::-1]:
                reply = engines[kind].call(op="generate", prompts=one, max_tokens=1, sample_ms=1000)
                ttft[kind].append(reply["seconds"])
                single_maps[0] += reply["pages_mapped"]
                single_maps[1] += reply["pages_mapped_by_caller"]
    finally:
        for e in engines.values():
            e.close()
    generated = 32 * 256
    tok_s = {k: [generated / r["seconds"] for r in decode[k]] for k in kinds}
    pair_tok = [e / p for p, e in zip(tok_s["plain"], tok_s["elastic"], strict=True)]
    pair_ttft = [e / p for p, e in zip(ttft["plain"], ttft["elastic"], strict=True)]
    same = sum(a["tokens"] == b["tokens"] for a, b in zip(decode["plain"], decode["elastic"], strict=True))
    return {
        "start_s": start,
        "decode_tok_s": tok_s,
        "ttft_s": ttft,
        "decode_ratio_mean": statistics.mean(tok_s["elastic"]) / statistics.mean(tok_s["plain"]),
        "decode_ratio_pairs": [min(pair_tok), statistics.median(pair_tok), max(pair_tok)],
        "ttft_ratio_mean": statistics.mean(ttft["elastic"]) / statistics.mean(ttft["plain"]),
        "ttft_ratio_pairs": [min(pair_ttft), statistics.median(pair_ttft), max(pair_ttft)],
        "waves_with_identical_tokens": same,
        "elastic_peak_mapped": max(r["peak_mapped"] for r in decode["elastic"]),
        "elastic_pages_mapped_during_singles": single_maps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8b", choices=["1b", "8b"])
    ap.add_argument("--waves", type=int, default=6)
    ap.add_argument("--singles", type=int, default=24)
    ap.add_argument("--model-cache", default=os.environ.get("EKV_MODEL_CACHE", ".models"))
    ap.add_argument("--elastic-env", action="append", default=[], metavar="KEY=VALUE",
                    help="more environment for the elastic engine (ELASTIKV_PREFIX_CACHE=0, ...)")  # fmt: skip
    args = ap.parse_args()
    import torch
    import vllm

    from elastikv.bench.models import make_model_once

    device = torch.cuda.get_device_name(0)
    model = Path(args.model_cache) / f"llama-{args.size}"
    make_model_once(model, size=args.size)
    with tempfile.TemporaryDirectory(prefix="elastikv-bench-") as d:
        extra = dict(kv.split("=", 1) for kv in args.elastic_env)
        r = run(model, Path(d), args.waves, args.singles, extra)
    mean = statistics.mean
    lines = [
        f"vLLM {vllm.__version__} on {device}: random {args.size} Llama (bf16), CUDA graphs, Model Runner V2, "
        f"{args.waves} waves of 32 x (128 + 256) tokens, {args.singles} single 512-token requests (1 token each)",
        f"greedy tokens identical in {r['waves_with_identical_tokens']} of {args.waves} waves (as started: an engine "
        "that compiled the model from a cold torch.compile cache and one that loaded it can differ without "
        "elastikv; tests/test_vllm_gpu.py is the identity proof)",
        "",
        "| figure | plain vLLM | vLLM + elastikv | elastic / plain (paired min / median / max) |",
        "|---|---|---|---|",
        f"| start-up (s) | {r['start_s']['plain']:.1f} | {r['start_s']['elastic']:.1f} | "
        f"{r['start_s']['elastic'] / r['start_s']['plain']:.3f} |",
        f"| decode throughput (generated tok/s, mean of waves) | {mean(r['decode_tok_s']['plain']):.0f} | "
        f"{mean(r['decode_tok_s']['elastic']):.0f} | **{r['decode_ratio_mean']:.3f}** "
        f"({' / '.join(f'{x:.3f}' for x in r['decode_ratio_pairs'])}) |",
        f"| light-load TTFT (ms, mean) | {1000 * mean(r['ttft_s']['plain']):.1f} | "
        f"{1000 * mean(r['ttft_s']['elastic']):.1f} | **{r['ttft_ratio_mean']:.3f}** "
        f"({' / '.join(f'{x:.3f}' for x in r['ttft_ratio_pairs'])}) |",
        "",
        f"elastikv mapped at most {r['elastic_peak_mapped'] / 1024**3:.2f} GiB of KV in the decode waves; plain vLLM "
        "holds its whole static cache throughout. Pages elastikv mapped during the single requests (background / "
        f"on the engine's thread): {r['elastic_pages_mapped_during_singles'][0]} / "
        f"{r['elastic_pages_mapped_during_singles'][1]}"
        + (f"; elastic engine's extra settings: {extra}" if extra else "."),
        "Targets (issue 18): decode >= 0.98x, light-load TTFT <= 1.03x.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    path = save("vllm-gpu", device, {"env": environment(device), "size": args.size, "elastic_env": extra, **r}, text)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
