"""What one request's KV mapping costs, call by call (issue 19's light load: a 4096 + 256-token request under vLLM
maps ~5 pages of 2 MiB in each of 64 per-layer buffers on the scheduler's thread, ~10 ms, ~65 us a mapping).

    python benchmarks/map_calls.py [--buffers 64] [--pages 5] [--chunk-mib 2,8] [--repeats 5]

For each chunk size, ``--buffers`` reserved ranges (one per layer buffer, as vLLM's per-layer plan has) each get
``--pages`` chunks, timed by driver call (median of ``--repeats``, everything unmapped and released between):

- ``create`` / ``map`` / ``set_access`` / ``unmap`` / ``release``: microseconds per chunk, each call on its own;
- ``per chunk``: what ``KVSpace.map_page`` does today, create + map + set_access for each chunk in turn;
- ``access per run``: create + map for each chunk, then one ``cuMemSetAccess`` over each buffer's run of chunks;
- ``threads``: ``per chunk`` with the buffers shared among ``--threads`` threads (whether the driver serializes
  these calls: if not, a request's growth could map its layers in parallel).

Ratios are against ``per chunk`` at the first chunk size (the same bytes mapped every way). Raw driver calls
through elastikv's backend (``memory/cuda.py``; ``--backend host`` checks the script on a CPU), no allocator;
saved as benchmarks/results/map-calls-*.json/.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from benchmarks._results import environment, save

from elastikv.memory import MemoryBackend, open_backend


def measure(
    backend: MemoryBackend, buffers: int, pages: int, chunk: int, repeats: int, threads: int
) -> dict[str, float]:
    """Seconds for one request's mapping done each way, and microseconds per chunk for each call alone."""
    span = pages * chunk
    bases = [backend.reserve(span) for _ in range(buffers)]
    addrs = [base + p * chunk for base in bases for p in range(pages)]
    seconds: dict[str, list[float]] = {
        k: [] for k in ("create", "map", "set_access", "unmap", "release", "per chunk", "access per run", "threads")
    }
    pool = ThreadPoolExecutor(threads)

    def map_buffers(mine: list[int]) -> list[int]:  # one thread's share of the "threads" way: per chunk, in turn
        made = []
        for a in (bases[i] + p * chunk for i in mine for p in range(pages)):
            c = backend.create(chunk)
            backend.map(a, chunk, c)
            backend.set_access(a, chunk)
            made.append(c)
        return made

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        seconds[name].append(now - t0)
        return now

    try:
        for _ in range(repeats):
            t = time.perf_counter()  # each call on its own, over every chunk
            chunks = [backend.create(chunk) for _ in addrs]
            t = lap("create", t)
            for a, c in zip(addrs, chunks, strict=True):
                backend.map(a, chunk, c)
            t = lap("map", t)
            for a in addrs:
                backend.set_access(a, chunk)
            t = lap("set_access", t)
            for a in addrs:
                backend.unmap(a, chunk)
            t = lap("unmap", t)
            for c in chunks:
                backend.release(c)
            lap("release", t)

            t = time.perf_counter()
            shares = [list(range(buffers))[k::threads] for k in range(threads)]
            chunks = [c for made in pool.map(map_buffers, shares) for c in made]
            lap("threads", t)
            for a in addrs:
                backend.unmap(a, chunk)
            for c in chunks:
                backend.release(c)

            for way in ("per chunk", "access per run"):
                t = time.perf_counter()
                chunks = []
                for a in addrs:
                    c = backend.create(chunk)
                    backend.map(a, chunk, c)
                    chunks.append(c)
                    if way == "per chunk":  # as KVSpace.map_page does
                        backend.set_access(a, chunk)
                if way == "access per run":
                    for base in bases:
                        backend.set_access(base, span)
                lap(way, t)
                for a in addrs:
                    backend.unmap(a, chunk)
                for c in chunks:
                    backend.release(c)
    finally:
        pool.shutdown()
        for base in bases:
            backend.free_reservation(base, span)
    out = {k: statistics.median(v) for k, v in seconds.items()}
    for k in ("create", "map", "set_access", "unmap", "release"):
        out[k] *= 1e6 / len(addrs)  # microseconds per chunk
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--buffers", type=int, default=64, help="reserved ranges (vLLM 8B: K and V of 32 layers)")
    ap.add_argument("--pages", type=int, default=5, help="chunks mapped in each (2 MiB: one request's ~288 MiB)")
    ap.add_argument("--chunk-mib", default="2,8", help="chunk sizes to compare, MiB, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=4, help="threads for the 'threads' way")
    ap.add_argument("--backend", default="cuda", help="cuda (the figures that matter) or host (a check on a CPU)")
    args = ap.parse_args()
    try:
        backend = open_backend(args.backend)
    except Exception as exc:
        sys.exit(f"map_calls.py times CUDA driver calls: run it on a GPU ({exc})")
    label = backend.device_label
    sizes = [int(s) for s in args.chunk_mib.split(",")]
    figures: dict[str, dict[str, float]] = {}
    for mib in sizes:
        pages = max(1, args.pages * sizes[0] // mib)  # the same bytes at every size
        figures[f"{mib} MiB"] = {
            "pages": pages,
            **measure(backend, args.buffers, pages, mib * 2**20, args.repeats, args.threads),
        }
    base = figures[f"{sizes[0]} MiB"]["per chunk"]
    lines = [
        f"One request's KV mapped in {args.buffers} buffers ({args.pages} x {sizes[0]} MiB each) on {label}, "
        f"median of {args.repeats}",
        "",
        "| chunk | chunks | create | map | set_access | unmap | release (us/chunk) | per chunk (ms) | / base | "
        f"access per run (ms) | / base | {args.threads} threads (ms) | / base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in figures.items():
        lines.append(
            f"| {name} | {args.buffers} x {int(f['pages'])} | {f['create']:.1f} | {f['map']:.1f} | "
            f"{f['set_access']:.1f} | {f['unmap']:.1f} | {f['release']:.1f} | {f['per chunk'] * 1e3:.2f} | "
            f"{f['per chunk'] / base:.2f} | {f['access per run'] * 1e3:.2f} | {f['access per run'] / base:.2f} | "
            f"{f['threads'] * 1e3:.2f} | {f['threads'] / base:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    data = {**environment(label), "buffers": args.buffers, "pages": args.pages, "repeats": args.repeats,
            "threads": args.threads, "figures": figures}  # fmt: skip
    print("saved", save("map-calls", label, data, text))
    backend.close()


if __name__ == "__main__":
    main()
