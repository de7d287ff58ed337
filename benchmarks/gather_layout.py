"""What one engine step's KV gather and write cost in the embedded engine's cache layout, against transformers' own.

    python benchmarks/gather_layout.py [--tokens 131072] [--requests 30] [--context 4352]

elastikv's transformers cache is token-interleaved (``[tokens, layers, K/V, kv heads, head dim]``: one chunk maps
a page of every layer), so one layer's K rows are 2 KiB pieces 128 KiB apart (Llama-8B geometry). transformers'
own cache keeps each layer's K in one contiguous ``[tokens, kv heads, head dim]`` tensor. The per-request
attention (``serving/attention.py``) gathers the batch's rows of every layer each step and writes the step's new
rows; this times both on the two layouts (plain device memory for both, so only the layout differs), with the
batch's blocks scattered over the cache as a busy engine leaves them, and the flash attention that follows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

LAYERS, KV_HEADS, HEAD_DIM, HEADS, BLOCK = 32, 8, 128, 32, 32


def _time(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072, help="cache size in tokens (16 GiB for Llama-8B)")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--context", type=int, default=4352, help="tokens of KV per request")
    ap.add_argument("--new", type=int, default=2048, help="tokens written per step")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from elastikv.serving.attention import varlen_attention

    dev, dt = torch.device("cuda"), torch.bfloat16
    n, g = args.tokens, torch.Generator(device="cpu").manual_seed(0)
    blocks = torch.randperm(n // BLOCK, generator=g)  # a busy cache: each request's blocks anywhere
    per_req = -(-args.context // BLOCK)
    rows = torch.cat(
        [
            (blocks[r * per_req : (r + 1) * per_req, None] * BLOCK + torch.arange(BLOCK)).flatten()[: args.context]
            for r in range(args.requests)
        ]
    ).to(dev)
    write = rows[torch.randperm(rows.numel(), generator=g)[: args.new].to(dev)]
    new = torch.randn(args.new, KV_HEADS, HEAD_DIM, device=dev, dtype=dt)
    work = torch.empty(2, rows.numel(), KV_HEADS, HEAD_DIM, device=dev, dtype=dt)

    figures: dict[str, float] = {}

    def step(views: list[tuple[torch.Tensor, torch.Tensor]], gather: bool) -> None:
        for k, v in views:
            k.index_copy_(0, write, new)
            v.index_copy_(0, write, new)
            if gather:
                torch.index_select(k, 0, rows, out=work[0])
                torch.index_select(v, 0, rows, out=work[1])

    def measure(views: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
        return _time(lambda: step(views, False)) * 1e3, _time(lambda: step(views, True)) * 1e3

    interleaved = torch.zeros(n, LAYERS, 2, KV_HEADS, HEAD_DIM, device=dev, dtype=dt)
    figures["interleaved_write_ms"], figures["interleaved_step_ms"] = measure(
        [(interleaved[:, layer, 0], interleaved[:, layer, 1]) for layer in range(LAYERS)]
    )
    del interleaved
    torch.cuda.empty_cache()
    per_layer = torch.zeros(LAYERS, 2, n, KV_HEADS, HEAD_DIM, device=dev, dtype=dt)
    figures["per_layer_write_ms"], figures["per_layer_step_ms"] = measure(
        [(per_layer[layer, 0], per_layer[layer, 1]) for layer in range(LAYERS)]
    )
    del per_layer
    torch.cuda.empty_cache()

    # the attention that follows the gather, decode (one query a request) and prefill-chunk shapes, 32 layers
    lens = [args.context] * args.requests
    cu_k = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=dev, dtype=torch.int32)
    k, v = work[0], work[1]
    q1 = torch.randn(args.requests, HEADS, HEAD_DIM, device=dev, dtype=dt)
    cu_q1 = torch.arange(args.requests + 1, device=dev, dtype=torch.int32)
    figures["attention_decode_ms"] = (
        _time(lambda: [varlen_attention(q1, k, v, cu_q1, cu_k, 1, args.context, 0.088) for _ in range(LAYERS)]) * 1e3
    )
    gathered_gib = 2 * rows.numel() * KV_HEADS * HEAD_DIM * 2 * LAYERS / 1024**3
    figures["gathered_gib_per_step"] = gathered_gib
    figures["interleaved_over_per_layer_step"] = figures["interleaved_step_ms"] / figures["per_layer_step_ms"]
    device = torch.cuda.get_device_name()
    print(f"KV gather + write per step on {device}: {args.requests} requests x {args.context} tokens "
          f"({gathered_gib:.2f} GiB read), {args.new} rows written, 32 layers")  # fmt: skip
    for key, value in figures.items():
        print(f"  {key:36s} {value:8.3f}")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    name = f"gather-layout-{device.lower().replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    (out / name).write_text(json.dumps({"device": device, "args": vars(args), **figures}, indent=2))
    print(f"wrote benchmarks/results/{name}")


if __name__ == "__main__":
    main()
