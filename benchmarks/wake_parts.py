"""Where a wake's time goes beyond the copy floor (issue 22's wake to first token, 0.371 s against 0.35 on the H100,
with a 0.290 s copy floor): bringing an 8B's weights back is one device allocation and one pinned host-to-device
copy per dtype (``serving/weights.py``, ``WeightStash.wake``), after a sleep that emptied PyTorch's cache.

    python benchmarks/wake_parts.py [--gib 15] [--chunk-mib 1024] [--repeats 5]

Measured on one GPU, each the median of ``--repeats``, PyTorch's cache emptied before each (as a sleep leaves it):

- ``floor``: the copy alone, into device memory allocated beforehand (what no wake can beat);
- ``alloc``: the allocation alone (one ``cudaMalloc`` of the whole buffer);
- ``one buffer``: allocate, then copy: what ``WeightStash.wake`` does today;
- ``chunked``: the same in ``--chunk-mib`` pieces, each piece's copy queued as soon as it is allocated, so that
  allocating the next overlaps the DMA of this one (what a chunked stash would do).

Ratios are against ``floor``; saved as benchmarks/results/wake-parts-*.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from benchmarks._results import environment, save


def timed(work: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``work`` until the device is idle, the cache emptied before each run."""
    seconds = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        kept = work()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        del kept
    torch.cuda.empty_cache()
    return statistics.median(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=15.0, help="bytes of weights to bring back (8B bf16: 15)")
    ap.add_argument("--chunk-mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("wake_parts.py measures CUDA allocation and host-to-device copies: run it on a GPU")
    n = int(args.gib * 2**30)
    chunk = args.chunk_mib * 2**20
    device = torch.device("cuda", 0)
    label = torch.cuda.get_device_name(device)
    t0 = time.perf_counter()
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)  # as the stash holds it: pinned once, kept
    pinning = time.perf_counter() - t0

    held = [torch.empty(n, dtype=torch.uint8, device=device)]  # allocated beforehand; let go after
    floor = timed(lambda: held[0].copy_(host, non_blocking=True), args.repeats)
    held.clear()

    def one_buffer() -> torch.Tensor:
        return torch.empty(n, dtype=torch.uint8, device=device).copy_(host, non_blocking=True)

    def chunked() -> list[torch.Tensor]:
        pieces = []
        for at in range(0, n, chunk):
            piece = torch.empty(min(chunk, n - at), dtype=torch.uint8, device=device)
            piece.copy_(host[at : at + piece.numel()], non_blocking=True)
            pieces.append(piece)
        return pieces

    figures = {
        "floor": floor,
        "alloc": timed(lambda: torch.empty(n, dtype=torch.uint8, device=device), args.repeats),
        "one buffer": timed(one_buffer, args.repeats),
        "chunked": timed(chunked, args.repeats),
    }
    lines = [
        f"{args.gib:g} GiB back from pinned host memory on {label} (median of {args.repeats}; pinned in "
        f"{pinning:.1f} s; chunks of {args.chunk_mib} MiB)",
        "",
        "| path | seconds | GiB/s | / floor |",
        "|---|---|---|---|",
        *(f"| {k} | {v:.4f} | {args.gib / v:.1f} | {v / floor:.3f} |" for k, v in figures.items()),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    data = {**environment(label), "gib": args.gib, "chunk_mib": args.chunk_mib, "repeats": args.repeats,
            "pinning_s": pinning, "seconds": figures}  # fmt: skip
    print("saved", save("wake-parts", label, data, text))


if __name__ == "__main__":
    main()
