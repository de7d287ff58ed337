"""The embedded engine: decode throughput with and without elastikv, and sleep/wake, in one process.

    python benchmarks/engine.py [--size 8b] [--requests 32] [--new-tokens 256]

On a GPU (the default there: an 8B-shaped random bf16 Llama written by make-model) it measures:

- decode throughput of transformers continuous batching with its own static paged cache (baseline) and with
  elastikv's elastic cache, same requests, same process; the ratio (target: within 3%);
- sleep level 1 then wake, through the engine's weight stash (serving/weights.py: one host buffer per dtype,
  pinned once in the background after start): memory given back by sleep (device free memory before and after,
  against the weights plus the KV mapped; target >= 95%); the first sleep (parameter by parameter) and the later
  ones (one copy per dtype; target: every sleep <= 0.5 s on the 8B); wake; wake to the first token of the first
  request after it (target <= 0.35 s), against the same request's TTFT when warm (the difference is what waking
  leaves on the first request's path); each against the copy floor: the weights' bytes / the measured pinned
  host-to-device bandwidth.

On a CPU it runs the tiny model with the stash on (weights live in host memory already; the engine leaves them
there by default): the same code path, the floor is a host-to-host copy.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._results import environment, save

from elastikv.bench.models import make_model
from elastikv.config import Settings


def copy_bandwidth(gpu: bool, nbytes: int = 1024**3, repeats: int = 5) -> float:
    """Bytes per second of one copy from pinned host memory to the device (on a CPU: host to host), the best of
    ``repeats``: the rate the copy floor is computed at."""
    host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=gpu)
    dest = torch.empty(nbytes, dtype=torch.uint8, device="cuda" if gpu else "cpu")
    dest.zero_()
    best = float("inf")
    for _ in range(repeats):
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dest.copy_(host, non_blocking=True)
        if gpu:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


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


async def ask(engine: Any, prompt: list[int]) -> tuple[list[int], float, float]:
    """16 tokens: (the tokens, when the first came, when the last came), in ``time.perf_counter()`` seconds."""
    first, last = None, []
    async for tokens, _done, _error in engine.generate(prompt, 16):
        first = first if first is not None else time.perf_counter()
        last = tokens
    end = time.perf_counter()
    return last, first or end, end


def timed_ask(engine: Any, prompt: list[int]) -> tuple[list[int], float, float]:
    """(the tokens, seconds to the first, seconds to the last)."""
    t0 = time.perf_counter()
    tokens, first, end = asyncio.run(ask(engine, prompt))
    return tokens, first - t0, end - t0


def wake_watching_syncs(engine: Any, watch: bool) -> tuple[dict[str, Any], list[str]]:
    """``engine.wake_up()``; with ``watch``, also where it synchronized with the device (file:line of each call
    PyTorch flags, from any thread: the batching thread starts inside the wake)."""
    if not watch:
        return engine.wake_up(), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            woke = engine.wake_up()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return woke, sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})


def _variant(text: str) -> tuple[str, int, bool]:
    """``CHUNK/EARLY`` -> (its name, bytes per wake allocation (0: one per dtype), early)."""
    from elastikv.config import parse_size

    chunk, _, early = text.strip().partition("/")
    if early not in ("on", "off"):
        sys.exit(f"--wake {text!r}: write CHUNK/EARLY, CHUNK a size or 'whole', EARLY on or off")
    nbytes = 0 if chunk == "whole" else parse_size(chunk, what="--wake", allow_percent=False).resolve(0)
    return text.strip(), nbytes, early == "on"


def _variant_row(name: str, rows: list[dict[str, Any]], base: list[dict[str, Any]], floor: float) -> str:
    wake = statistics.median(r["wake_s"] for r in rows)
    first = statistics.median(r["wake_to_first_token_s"] for r in rows)
    base_first = statistics.median(r["wake_to_first_token_s"] for r in base)
    phases = " / ".join(f"{statistics.median(r['wake'].get(k, float('nan')) for r in rows):.3f}"
                        for k in ("weights_s", "start_s", "copies_wait_s"))  # fmt: skip
    return (f"| {name} | {rows[0]['pieces']} | {wake:.3f} | {phases} | {first:.3f} | {first / floor:.2f}x | "
            f"{first / base_first:.3f} | {all(r['same_answer'] for r in rows)} |")  # fmt: skip


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8b" if gpu else "tiny", choices=["tiny", "1b", "8b"])
    ap.add_argument("--requests", type=int, default=32 if gpu else 8)
    ap.add_argument("--new-tokens", type=int, default=256 if gpu else 64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sleeps", type=int, default=4, help="sleep/wake cycles (the first sleep is reported apart)")
    ap.add_argument("--wake", default="whole/off", metavar="CHUNK/EARLY,...",
                    help="wake variants, each run for --sleeps cycles in this one process, the first the baseline: "
                         "CHUNK the most bytes per device allocation (ELASTIKV_WAKE_CHUNK; whole: one per dtype), "
                         "EARLY on/off (ELASTIKV_WAKE_EARLY); e.g. whole/off,1GiB/off,1GiB/on")  # fmt: skip
    ap.add_argument("--model-dir", default=None, help="reuse a model made earlier")
    ap.add_argument("--sync-debug", action="store_true",
                    help="record where a wake synchronizes with the device (torch.cuda.set_sync_debug_mode): what "
                         "keeps an early wake from returning before its copies end")  # fmt: skip
    args = ap.parse_args()
    device = torch.cuda.get_device_name() if gpu else "CPU (host backend)"
    level = 1

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
        env = ({"ELASTIKV_RESERVE": "256MiB", "ELASTIKV_PREFIX_CACHE": "0"} if gpu else
               {"ELASTIKV_HOST_MEMORY": "2GiB", "ELASTIKV_RESERVE": "8MiB", "ELASTIKV_PREFIX_CACHE": "0"})  # fmt: skip
        settings = Settings.from_env(env)
        variants = [_variant(v) for v in args.wake.split(",")]
        engine = Engine(path, name="bench", settings=settings, dtype=str(dtype).removeprefix("torch."),
                        max_batch_tokens=512, max_kv_tokens=args.requests * (128 + args.new_tokens) + 1024,
                        stash_weights=True)  # fmt: skip
        engine._stop()  # the engine's own manager is not needed for the throughput runs (its stash is kept)
        stash = engine.stash
        assert stash is not None, engine.no_stash
        # Pinned in the background (the engine serves meanwhile); waited for here so that it does not run under
        # the throughput runs.
        pinned_in = stash.prepare_seconds if stash.wait(600) else None
        pinned = stash.pinned  # read now: closing the engine unpins
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

        # Sleep and wake through the engine, with requests before and after each wake.
        engine._start()
        prompt = prompts[0][:32]
        before, _, _ = timed_ask(engine, prompt)
        warm = [timed_ask(engine, prompt) for _ in range(3)]
        warm_ttft, warm_answer = statistics.median(w[1] for w in warm), statistics.median(w[2] for w in warm)
        kv = engine.instance.allocator.stats().mapped_bytes
        weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        cycles: list[dict[str, Any]] = []
        identical = True
        released = 0
        by_variant: dict[str, list[dict[str, Any]]] = {}
        for name, chunk, early in variants:
            stash.set_chunk(chunk)
            engine.wake_early = early
            mine = by_variant.setdefault(name, [])
            for _ in range(args.sleeps):
                if gpu:
                    torch.cuda.synchronize()
                free0 = device_free()
                slept = engine.sleep(level)
                free1 = device_free()
                if not cycles:
                    weights_asleep = sum(p.numel() * p.element_size() for p in engine.model.parameters())
                    kv_asleep = engine.instance.allocator.stats().mapped_bytes if engine.instance is not None else 0
                    released = free1 - free0 if gpu else (kv - kv_asleep) + (weights - weights_asleep)  # CPU: counted
                t0 = time.perf_counter()
                woke, syncs = wake_watching_syncs(engine, args.sync_debug and gpu)
                t1 = time.perf_counter()
                after, first, end = asyncio.run(ask(engine, prompt))
                identical = identical and after == before
                row = {"variant": name, "pieces": stash.pieces, "sleep": slept, "wake": woke, "wake_s": woke["seconds"],
                       "wake_to_first_token_s": first - t0, "wake_to_answer_s": end - t0, "ttft_s": first - t1,
                       "answer_s": end - t1, "same_answer": after == before, "syncs": syncs}  # fmt: skip
                mine.append(row)
                if name == variants[0][0]:
                    cycles.append(row)
        engine.close()
        bandwidth = copy_bandwidth(gpu)

    floor = stash.nbytes / bandwidth
    first_sleep = cycles[0]["sleep"]["seconds"]
    later_sleeps = statistics.median(c["sleep"]["seconds"] for c in cycles[1:]) if len(cycles) > 1 else float("nan")
    wake = statistics.median(c["wake_s"] for c in cycles)
    to_token = statistics.median(c["wake_to_first_token_s"] for c in cycles)
    to_answer = statistics.median(c["wake_to_answer_s"] for c in cycles)
    ratio = statistics.median(elastic) / statistics.median(base)
    slept_at = sorted({c["sleep"]["sleeping"] for c in cycles})

    def vs_floor(seconds: float) -> str:
        return f"{seconds:.3f} ({seconds / floor:.2f}x floor)"

    lines = [
        f"embedded engine on {device}: {args.size} random Llama ({dtype}), {args.requests} requests x 128 prompt "
        f"+ {args.new_tokens} new tokens, medians of {args.repeats}; {args.sleeps} sleep/wake cycles",
        "",
        "| figure | value |",
        "|---|---|",
        f"| decode throughput, transformers' static cache (tok/s) | {statistics.median(base):.0f} |",
        f"| decode throughput, elastikv (tok/s) | {statistics.median(elastic):.0f} |",
        f"| elastic / static | {ratio:.3f} |",
        f"| weights stashed | {stash.nbytes / 2**20:.0f} MiB, {'pinned' if pinned else 'not pinned'}, made in "
        f"{'-' if pinned_in is None else f'{pinned_in:.2f}'} s in the background |",
        f"| copy floor: bytes / {'pinned H2D' if gpu else 'host'} bandwidth ({bandwidth / 1e9:.1f} GB/s), s | "
        f"{floor:.3f} |",
        f"| sleep level {level} (level used: {slept_at}), first (s) | {vs_floor(first_sleep)} |",
        f"| sleep, later ones, median (s) | {vs_floor(later_sleeps)} |",
        f"| memory released by the first sleep | {released / 2**20:.0f} MiB of {(weights + kv) / 2**20:.0f} MiB "
        f"weights+KV ({released / max(1, weights + kv):.1%}) |",
        f"| wake_up, median (s) | {vs_floor(wake)} |",
        f"| wake_up to first token, median (s) | {vs_floor(to_token)} |",
        f"| same request's TTFT when warm (s) | {warm_ttft:.3f} |",
        f"| wake_up to the 16-token answer, median (s) | {to_answer:.3f} (warm answer: {warm_answer:.3f}) |",
        f"| answers after every wake identical | {identical} |",
        "",
        f"Wake variants ({args.sleeps} cycles each, medians; the first is the baseline and the table above):",
        "",
        "| wake (chunk/early) | allocations | wake_up (s) | weights / start / copies waited (s) "
        "| wake to first token (s) | / floor | / baseline | same |",
        "|---|---|---|---|---|---|---|---|",
        *(_variant_row(name, rows, by_variant[variants[0][0]], floor) for name, rows in by_variant.items()),
    ]
    if args.sync_debug:
        lines += ["", "Where each wake_up synchronized with the device (--sync-debug; file:line, every cycle's):", ""]
        lines += [f"- {name}: {', '.join(sorted({s for r in rows for s in r['syncs']})) or 'nowhere'}"
                  for name, rows in by_variant.items()]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    save("engine", device, {"env": environment(device), "base_tok_s": base, "elastic_tok_s": elastic,
                            "ratio": ratio, "sleep": cycles[0]["sleep"], "wake": cycles[0]["wake"],
                            "wake_to_answer_s": cycles[0]["wake_to_answer_s"], "cycles": cycles,
                            "first_sleep_s": first_sleep, "later_sleeps_s": later_sleeps, "wake_s": wake,
                            "wake_to_first_token_s": to_token, "warm_ttft_s": warm_ttft, "warm_answer_s": warm_answer,
                            "stash_bytes": stash.nbytes, "stash_pinned": pinned, "stash_made_s": pinned_in,
                            "copy_bandwidth_bytes_s": bandwidth, "copy_floor_s": floor,
                            "released_bytes": released, "weights_bytes": weights, "kv_bytes": kv,
                            "identical_after_wake": identical, "level": level,
                            "wake_variants": by_variant}, text)  # fmt: skip
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
