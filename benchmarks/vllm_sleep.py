"""vLLM's sleep and wake with and without elastikv on the GPU, same command, same model (issue 22).

    python benchmarks/vllm_sleep.py [--size 8b] [--cycles 4] [--model-cache DIR] [--overlap-wake]

Two engines (``tests/vllm_runner.py --sleep-mode``: scheduler and worker in one process; bf16, torch.compile,
CUDA graphs, FlashAttention 3), one after the other: plain vLLM (its own sleep mode) and vLLM with ``ELASTIKV=1``
(its sleep mode too, plus elastikv's KV cache, the weights booked in the ledger and dropped/re-booked around
the sleep, and the pinned host memory for the first sleep made at start: engines/vllm/pinned.py). Each does
``cycles`` times: sleep (level 1), wake, and one request (a 16-token prompt, one token): wake to first answer is
the wake plus that request. Also measured in the same command: the copy floor (the weights' bytes over this
machine's pinned host-to-device bandwidth, timed on a 1 GiB pinned copy). The first sleep is reported apart
(vLLM pins its host copy then, unless warmed). Greedy answers after each wake are compared with before.
``--overlap-wake`` adds a third engine: elastikv with ``ELASTIKV_VLLM_OVERLAP_WAKE=on`` (engines/vllm/wake.py).
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

KINDS = {"plain": {}, "elastic": {}, "overlap": {"ELASTIKV_VLLM_OVERLAP_WAKE": "on"}}  # engine: its extra settings


def _env(tmp: Path, kind: str) -> dict[str, str]:
    env = engine_env(tmp, elastic=kind != "plain", multiprocess=False, VLLM_USE_FLASHINFER_SAMPLER="0",
                     HF_HUB_OFFLINE="1", **KINDS[kind])  # fmt: skip
    env.pop("ELASTIKV_HOST_MEMORY", None)
    return env


def h2d_gib_s() -> float:
    """Pinned host -> device bandwidth on a 1 GiB copy (best of 3)."""
    import torch

    host = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 1.0 / best


def cycle(engine: Engine, cycles: int) -> dict[str, Any]:
    probe = prompts(1, 16, seed=7)
    before = engine.call(op="generate", prompts=probe, max_tokens=8)["tokens"]
    rows = []
    for _ in range(cycles):
        slept = engine.call(op="sleep", level=1)["seconds"]
        time.sleep(0.5)
        t0 = time.perf_counter()
        woke = engine.call(op="wake")["seconds"]
        answer = engine.call(op="generate", prompts=probe, max_tokens=1)
        first = time.perf_counter() - t0
        again = engine.call(op="generate", prompts=probe, max_tokens=8)["tokens"]
        rows.append({"sleep_s": slept, "wake_s": woke, "wake_to_first_answer_s": first,
                     "first_token_same": answer["tokens"][0][:1] == before[0][:1],
                     "same_answer": again == before})  # fmt: skip
    return {"cycles": rows}


def run(model: Path, tmp: Path, cycles: int, kinds: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in kinds:  # one at a time: each holds the weights and pins a host copy of them
        t0 = time.perf_counter()
        with Engine(model, _env(tmp / kind, kind), gpu=True, util=0.4, sleep_mode=True) as engine:
            ready = engine.wait_ready()
            assert ready["elastic"] is (kind != "plain"), engine.tail()
            start = time.perf_counter() - t0
            engine.call(op="generate", prompts=prompts(8, 128, seed=1), max_tokens=32)  # warm-up
            out[kind] = {"start_s": start, **cycle(engine, cycles)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8b", choices=["1b", "8b"])
    ap.add_argument("--cycles", type=int, default=4)
    ap.add_argument("--model-cache", default=os.environ.get("EKV_MODEL_CACHE", ".models"))
    ap.add_argument("--overlap-wake", action="store_true", help="a third engine: elastikv with its wake's copies "
                    "overlapped (ELASTIKV_VLLM_OVERLAP_WAKE=on)")  # fmt: skip
    args = ap.parse_args()
    kinds = ("plain", "elastic", "overlap") if args.overlap_wake else ("plain", "elastic")
    import torch
    import vllm

    from elastikv.bench.models import make_model_once

    device = torch.cuda.get_device_name(0)
    model = Path(args.model_cache) / f"llama-{args.size}"
    make_model_once(model, size=args.size)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))  # the weights, give or take a header
    bandwidth = h2d_gib_s()
    floor = weights / 2**30 / bandwidth
    with tempfile.TemporaryDirectory(prefix="elastikv-bench-") as d:
        r = run(model, Path(d), args.cycles, kinds)
    mean = statistics.mean

    def figures(kind: str) -> dict[str, float]:
        rows = r[kind]["cycles"]
        return {"first_sleep_s": rows[0]["sleep_s"], "later_sleep_s": mean(x["sleep_s"] for x in rows[1:]),
                "max_sleep_s": max(x["sleep_s"] for x in rows), "wake_s": mean(x["wake_s"] for x in rows),
                "wake_to_first_answer_s": mean(x["wake_to_first_answer_s"] for x in rows),
                "max_wake_to_first_answer_s": max(x["wake_to_first_answer_s"] for x in rows),
                "same_answers": sum(x["same_answer"] for x in rows)}  # fmt: skip

    f = {kind: figures(kind) for kind in kinds}
    overlap = "overlap" in kinds
    lines = [
        f"vLLM {vllm.__version__} on {device}: random {args.size} Llama (bf16, {weights / 2**30:.1f} GiB of weights), "
        f"sleep level 1, {args.cycles} cycles each; copy floor {floor:.3f} s ({bandwidth:.1f} GiB/s pinned H2D)",
        "",
        "| figure | vLLM's own sleep | vLLM + elastikv | elastic / plain |"
        + (" + overlapped wake | overlapped / plain |" if overlap else ""),
        "|---|---|---|---|" + ("---|---|" if overlap else ""),
    ]
    for key, label in (("first_sleep_s", "first sleep (s)"), ("later_sleep_s", "later sleeps (s, mean)"),
                       ("wake_s", "wake (s, mean)"), ("wake_to_first_answer_s", "wake to first answer (s, mean)"),
                       ("max_wake_to_first_answer_s", "wake to first answer (s, worst)")):  # fmt: skip
        p, e = f["plain"][key], f["elastic"][key]
        o = f" {f['overlap'][key]:.3f} | {f['overlap'][key] / p:.2f} |" if overlap else ""
        lines.append(f"| {label} | {p:.3f} | {e:.3f} | {e / p:.2f} |{o}")
    starts = " | ".join(f"{r[k]['start_s']:.1f}" for k in kinds)
    same = " | ".join(f"{f[k]['same_answers']} of {args.cycles}" for k in kinds)
    lines += [
        f"| start-up (s) | {starts} | |" + (" |" if overlap else ""),
        f"| answers equal to before the sleep | {same} | |" + (" |" if overlap else ""),
        "",
        "Targets (issue 22): every sleep <= 0.5 s; wake to first answer <= 0.35 s; the same answers after a wake.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    data = {**environment(device), "vllm": vllm.__version__, "size": args.size, "weights_bytes": weights,
            "h2d_gib_s": bandwidth, "copy_floor_s": floor, "figures": f, "runs": r}  # fmt: skip
    print("saved", save("vllm-sleep", device, data, text))


if __name__ == "__main__":
    main()
