"""The embedded engine: decode throughput with and without elastikv, and sleep/wake, in one process.

    python benchmarks/engine.py [--size 8b] [--requests 32] [--new-tokens 256]

On a GPU (the default there: an 8B-shaped random bf16 Llama written by make-model) it measures:

- decode throughput of transformers continuous batching with its own static paged cache (baseline) and with
  elastikv's elastic cache, same requests, same process; the ratio (target: within 3%);
- sleep level 1 then wake: memory given back by sleep (device free memory before and after, against the
  weights plus the KV mapped; target >= 95%) and the wall time of wake until the engine answers (target
  <= 0.35 s; weights come back from pinned host memory).

On a CPU it runs the tiny model and sleep level 2 (weights live in host memory already: level 1 moves nothing).
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

from elastikv.bench.models import make_model
from elastikv.config import Settings


def device_free() -> int:
    """Free device memory (GPU). On a CPU there is no device: host memory freed by Python is not reliably
    returned to the system, so the CPU run counts what sleep released (KV mapped + weight bytes) instead."""
    return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else 0


def throughput(model: Any, prompts: list[list[int]], new_tokens: int, block_size: int, batch_tokens: int) -> float:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gc = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    blocks = len(prompts) * ((len(prompts[0]) + new_tokens) // block_size + 2) + 8
    cb = ContinuousBatchingConfig(block_size=block_size, max_batch_tokens=batch_tokens, num_blocks=blocks,
                                  use_async_batching=False)  # fmt: skip
    model.set_attn_implementation("paged|sdpa")
    manager = model.init_continuous_batching(generation_config=gc, continuous_batching_config=cb)
    manager.start()
    # Timed: from submission to the last token. Not timed: start-up and transformers' stop(), whose
    # gc.collect() takes ~0.5 s and would swamp a short run.
    t0 = time.perf_counter()
    ids = manager.add_requests(prompts, max_new_tokens=new_tokens)
    done = 0
    while done < len(ids):
        out = manager.get_result(timeout=60)
        if out is not None and out.is_finished():
            assert len(out.generated_tokens) == new_tokens, out.error
            done += 1
    seconds = time.perf_counter() - t0
    manager.stop(block=True)
    manager.destroy()
    model.set_attn_implementation("sdpa")
    return len(prompts) * new_tokens / seconds


async def ask(engine: Any, prompt: list[int]) -> list[int]:
    last: list[int] = []
    async for tokens, _done, _error in engine.generate(prompt, 16):
        last = tokens
    return last


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8b" if gpu else "tiny", choices=["tiny", "1b", "8b"])
    ap.add_argument("--requests", type=int, default=32 if gpu else 8)
    ap.add_argument("--new-tokens", type=int, default=256 if gpu else 64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-dir", default=None, help="reuse a model made earlier")
    args = ap.parse_args()
    device = torch.cuda.get_device_name() if gpu else "CPU (host backend)"
    level = 1 if gpu else 2

    with tempfile.TemporaryDirectory(prefix="elastikv-bench-") as tmp:
        path = Path(args.model_dir) if args.model_dir else make_model(Path(tmp) / args.size, size=args.size)
        from elastikv.serving.engine import Engine

        dtype = torch.bfloat16 if args.size != "tiny" else torch.float32
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(10, 2000, (128,), generator=g).tolist() for _ in range(args.requests)]

        # One model for both; repeats alternate between transformers' own static paged cache (the baseline)
        # and elastikv's, by swapping the class continuous batching builds (elastikv's other hooks do nothing
        # for a cache that is not elastic), so that drift in the machine hits both alike.
        from transformers.generation.continuous_batching import continuous_api

        static_cache = continuous_api.PagedAttentionCache
        settings = Settings.from_env({"ELASTIKV_RESERVE": "256MiB", "ELASTIKV_PREFIX_CACHE": "0"} if gpu else
                                     {"ELASTIKV_HOST_MEMORY": "2GiB", "ELASTIKV_RESERVE": "8MiB",
                                      "ELASTIKV_PREFIX_CACHE": "0"})  # fmt: skip
        engine = Engine(path, name="bench", settings=settings, dtype=str(dtype).removeprefix("torch."),
                        max_batch_tokens=512, max_kv_tokens=args.requests * (128 + args.new_tokens) + 1024)  # fmt: skip
        engine.close()  # the engine's own manager is not needed for the throughput runs
        elastic_cache = continuous_api.PagedAttentionCache
        base: list[float] = []
        elastic: list[float] = []
        for i in range(args.repeats + 1):  # the first pair warms up
            for kind in ("static", "elastic") if i % 2 else ("elastic", "static"):
                continuous_api.PagedAttentionCache = static_cache if kind == "static" else elastic_cache
                tok_s = throughput(engine.model, prompts, args.new_tokens, 32, 512)
                if i:
                    (base if kind == "static" else elastic).append(tok_s)
        continuous_api.PagedAttentionCache = elastic_cache

        # Sleep and wake through the engine, with a request before and after.
        engine.wake_up() if engine.sleeping else engine._start()
        before = asyncio.run(ask(engine, prompts[0][:32]))
        kv = engine.instance.allocator.stats().mapped_bytes
        weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        if gpu:
            torch.cuda.synchronize()
        free0 = device_free()
        slept = engine.sleep(level)
        free1 = device_free()
        weights_asleep = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        kv_asleep = engine.instance.allocator.stats().mapped_bytes if engine.instance is not None else 0
        t0 = time.perf_counter()
        woke = engine.wake_up()
        after = asyncio.run(ask(engine, prompts[0][:32]))
        wake_to_answer = time.perf_counter() - t0
        engine.close()

    released = free1 - free0 if gpu else (kv - kv_asleep) + (weights - weights_asleep)  # CPU: counted
    ratio = statistics.median(elastic) / statistics.median(base)
    lines = [
        f"embedded engine on {device}: {args.size} random Llama ({dtype}), {args.requests} requests x 128 prompt "
        f"+ {args.new_tokens} new tokens, medians of {args.repeats}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| decode throughput, transformers' static cache (tok/s) | {statistics.median(base):.0f} |",
        f"| decode throughput, elastikv (tok/s) | {statistics.median(elastic):.0f} |",
        f"| elastic / static | {ratio:.3f} |",
        f"| sleep level {level}: seconds | {slept['seconds']:.3f} |",
        f"| memory released by sleep | {released / 2**20:.0f} MiB of {(weights + kv) / 2**20:.0f} MiB weights+KV "
        f"({released / max(1, weights + kv):.1%}) |",
        f"| wake_up (s) | {woke['seconds']:.3f} |",
        f"| wake_up to first answer (s) | {wake_to_answer:.3f} |",
        f"| answer after wake identical | {after == before} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    save("engine", device, {"env": environment(device), "base_tok_s": base, "elastic_tok_s": elastic,
                            "ratio": ratio, "sleep": slept, "wake": woke, "wake_to_answer_s": wake_to_answer,
                            "released_bytes": released, "weights_bytes": weights, "kv_bytes": kv,
                            "identical_after_wake": after == before, "level": level}, text)  # fmt: skip
    if after != before:
        sys.exit(1)


if __name__ == "__main__":
    main()
