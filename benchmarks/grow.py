"""Growing, shrinking and steady allocation of one elastic KV cache, against the raw driver calls.

Llama-3.1-8B KV geometry (32 layers, 8 KV heads, head dim 128, bf16, 16-token blocks: 2 MiB a block across
all layers). For each layout, in one process:

1. raw floor: the driver calls alone (create + map + set access) for the same pages, then unmap + release;
2. burst: ``--gib`` of ``allocate(blocks_per_page)`` calls back to back with the reserve on (160 x 64 blocks
   = 20 GiB by default), timed as a whole and per call; ratio to the raw floor (target <= 1.15). Raw floor
   and burst are each run ``--reps`` times (a fresh allocator each time) and the medians compared;
3. free-all, then the device memory still held 2 s later (target: no more than the configured reserve);
   A last row repeats the interleaved run booking through a ledger (as every engine process does), with
   leases; ``--no-ledger`` skips it.
4. steady state: ``--pairs`` allocate(1)/free pairs, median of 5 runs (target <= 3 us a pair; the reference
   system: 10-15 us).

    python benchmarks/grow.py                 # the GPU if there is one, else host memory (2 GiB default)
    python benchmarks/grow.py --backend host --gib 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import _results
from elastikv.allocator import BlockAllocator
from elastikv.bench.cache_demo import LLAMA_8B
from elastikv.budget import LedgerBudget
from elastikv.config import format_bytes, parse_size
from elastikv.ledger import Ledger
from elastikv.memory import MemoryBackend, open_backend
from elastikv.memory import used_bytes as used
from elastikv.space import KVSpace

GiB = 1024**3


def raw_floor(backend: MemoryBackend, chunk: int, chunks_per_page: int, pages: int) -> dict[str, float]:
    """The same mappings as elastikv makes, in the same order, with nothing else around them."""
    range_bytes = pages * chunk
    va = backend.reserve(range_bytes * chunks_per_page)
    bases = [va + i * range_bytes for i in range(chunks_per_page)]
    handles = []
    t0 = time.perf_counter()
    for p in range(pages):
        for base in bases:
            c = backend.create(chunk)
            backend.map(base + p * chunk, chunk, c)
            backend.set_access(base + p * chunk, chunk)
            handles.append((base + p * chunk, c))
    map_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for addr, c in handles:
        backend.unmap(addr, chunk)
        backend.release(c)
    unmap_s = time.perf_counter() - t0
    backend.free_reservation(va, range_bytes * chunks_per_page)
    return {"map_s": map_s, "unmap_s": unmap_s, "mappings": len(handles)}


def burst(
    space: KVSpace, pages: int, reserve: int, ledger: Ledger | None = None
) -> tuple[BlockAllocator, list[list[int]], dict[str, Any]]:
    """A fresh allocator (booking through ``ledger`` if given), its minimum reserve mapped, then ``pages``
    allocations of a page each, timed."""
    bpp, page = space.blocks_per_page, space.page_bytes
    budget = None
    if ledger is not None:
        capacity = space.num_pages * page
        budget = LedgerBudget.register(
            ledger,
            f"grow-{time.monotonic_ns()}",
            engine="bench",
            limit=capacity,
            capacity=capacity,
            unit=page,
            max_lease_units=LedgerBudget.DEFAULT_MAX_LEASE_UNITS,
        )
    alloc = BlockAllocator(space, reserve_bytes=reserve, budget=budget)
    deadline = time.monotonic() + 10
    while alloc.stats().blocks_free_mapped < min(reserve // page, pages) * bpp and time.monotonic() < deadline:
        time.sleep(0.005)
    premapped = alloc.stats().pages_mapped
    mapped_before = alloc.stats().pages_mapped_total
    latencies, held = [], []
    t_burst = time.perf_counter()
    for _ in range(pages):
        t = time.perf_counter()
        held.append(alloc.allocate(bpp))
        latencies.append(time.perf_counter() - t)
    burst_s = time.perf_counter() - t_burst
    s = alloc.stats()
    lat_ms = sorted(x * 1e3 for x in latencies)
    return (
        alloc,
        held,
        {
            "burst_s": burst_s,
            "alloc_p50_ms": statistics.median(lat_ms),
            "alloc_p99_ms": lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))],
            "alloc_max_ms": lat_ms[-1],
            "reserve_pages_premapped": premapped,
            "pages_mapped_by_caller": s.pages_mapped_by_caller,
            "pages_mapped_during_burst": s.pages_mapped_total - mapped_before,
            "ledger_transactions": budget.transactions if budget is not None else 0,
        },
    )


def run_layout(
    backend: MemoryBackend, layout: str, gib: float, reserve: int, pairs: int, reps: int, with_ledger: bool = False
) -> dict[str, Any]:
    space = KVSpace(backend, LLAMA_8B, layout=layout)
    _, total = backend.mem_info()
    ledger = None
    if with_ledger:  # a private ledger, as every engine process has one: booking through it costs transactions
        ledger = Ledger(
            backend.device_id,
            device_label=backend.device_label,
            total_bytes=total,
            free_bytes=lambda: backend.mem_info()[0],
            directory=tempfile.mkdtemp(prefix="elastikv-grow-"),
        )
    page = space.page_bytes
    pages = int(gib * GiB // page)
    raws = [raw_floor(backend, space.chunk_bytes, space.chunks_per_page, pages) for _ in range(reps)]

    used0 = used(backend)
    bursts = []
    for rep in range(reps):
        alloc, held, figures = burst(space, pages, reserve, ledger)
        bursts.append(figures)
        if rep < reps - 1:
            alloc.close()
    # The last allocator: free-all, watch memory go back, then the steady state.
    t_free = time.monotonic()
    for blocks in held:
        alloc.free(blocks)
    free_call_s = time.monotonic() - t_free
    trimmed_at = None
    while time.monotonic() - t_free < 2.0:
        if trimmed_at is None and alloc.stats().mapped_bytes <= reserve:
            trimmed_at = time.monotonic() - t_free
        time.sleep(0.01)
    held_2s = used(backend) - used0
    after = alloc.stats()
    pair_runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(pairs):
            alloc.free(alloc.allocate(1))
        pair_runs.append((time.perf_counter() - t) / pairs * 1e6)
    alloc.close()
    space.close()
    if ledger is not None:
        ledger.close()

    raw_s = statistics.median(r["map_s"] for r in raws)
    burst_s = statistics.median(b["burst_s"] for b in bursts)
    mid = sorted(bursts, key=lambda b: b["burst_s"])[len(bursts) // 2]
    return {
        "layout": layout + (" + ledger" if with_ledger else ""),
        "page_bytes": page,
        "chunk_bytes": space.chunk_bytes,
        "chunks_per_page": space.chunks_per_page,
        "pages": pages,
        "grown_bytes": pages * page,
        "repetitions": reps,
        "raw_map_s": raw_s,
        "raw_map_s_each": [r["map_s"] for r in raws],
        "raw_unmap_s": statistics.median(r["unmap_s"] for r in raws),
        "raw_mappings": raws[0]["mappings"],
        "raw_us_per_mapping": raw_s / raws[0]["mappings"] * 1e6,
        "burst_s": burst_s,
        "burst_s_each": [b["burst_s"] for b in bursts],
        "burst_ratio_to_raw": burst_s / raw_s,
        **{k: v for k, v in mid.items() if k != "burst_s"},
        "free_all_s": free_call_s,
        "trimmed_to_reserve_s": trimmed_at,
        "held_after_2s_bytes": held_2s,
        "mapped_after_2s_bytes": after.mapped_bytes,
        "reserve_bytes": reserve,
        "steady_pairs": pairs,
        "steady_pair_us": statistics.median(pair_runs),
        "steady_pair_us_each": pair_runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="auto", choices=["auto", "cuda", "host"])
    ap.add_argument("--gib", type=float, default=None, help="burst size (default: 20 on a GPU, 2 on host)")
    ap.add_argument("--reserve", default="256MiB", help="minimum reserve (default 256MiB)")
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--layouts", default="interleaved,per-layer")
    ap.add_argument("--no-ledger", action="store_true", help="skip the interleaved run that books through a ledger")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of raw floor and burst (medians reported)")
    args = ap.parse_args()

    backend = open_backend(args.backend)
    gib = args.gib if args.gib is not None else (20.0 if backend.name == "cuda" else 2.0)
    reserve = parse_size(args.reserve, what="--reserve", allow_percent=False).resolve(0)
    env = _results.environment(backend.device_label)
    print(
        f"grow benchmark on {backend.device_label}: Llama-3.1-8B KV geometry, {gib:g} GiB burst, "
        f"reserve {format_bytes(reserve)}, {args.pairs} steady pairs"
    )
    rows = [run_layout(backend, layout, gib, reserve, args.pairs, args.reps) for layout in args.layouts.split(",")]
    if not args.no_ledger:
        rows.append(run_layout(backend, "interleaved", gib, reserve, args.pairs, args.reps, with_ledger=True))
    backend.close()

    lines = [
        f"# grow: {env['device']}, {env['date']}",
        "",
        f"`{env['command']}` (commit {env['commit']}, torch {env['torch']})",
        "",
        "| layout | page | burst | raw floor | ratio (<=1.15) | alloc(64) p50 / p99 | by caller | "
        "held 2 s after free-all (<= reserve) | steady pair (<=3 us) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {format_bytes(r['page_bytes'])} ({r['chunks_per_page']} x "
            f"{format_bytes(r['chunk_bytes'])}) | {r['burst_s']:.3f} s for {format_bytes(r['grown_bytes'])} | "
            f"{r['raw_map_s']:.3f} s ({r['raw_us_per_mapping']:.1f} us/mapping) | {r['burst_ratio_to_raw']:.2f} | "
            f"{r['alloc_p50_ms']:.3f} / {r['alloc_p99_ms']:.3f} ms | {r['pages_mapped_by_caller']}/{r['pages']} | "
            f"{format_bytes(r['held_after_2s_bytes'])} (reserve {format_bytes(r['reserve_bytes'])}) | "
            f"{r['steady_pair_us']:.2f} us |"
        )
    summary = "\n".join(lines) + "\n"
    path = _results.save("grow", backend.device_label, {"env": env, "results": rows}, summary)
    print(summary)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
