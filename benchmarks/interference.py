"""Does one model's memory traffic slow another model's steps? Step time of a decode-like loop while another
process (or a thread of the same process) maps and unmaps KV pages.

    python benchmarks/interference.py [--phase-seconds 6] [--victim-gib 14]

Why: models that share a GPU elastically map pages when a request arrives and unmap them when it ends, while
the other models keep decoding. The driver's cost to the process that calls it is known (DESIGN.md); this
measures what the calls cost everyone else. A *victim* process runs an 8B-shaped decode step (32 layers of
bf16 GEMMs over ~14 GiB of weights, batch 16) back to back and times each step; an *aggressor* goes through
phases, each ``--phase-seconds`` long:

- ``idle``                     nothing (the baseline every ratio is against);
- ``vmm-4MiB`` / ``vmm-64MiB`` another process maps then unmaps 512 MiB, in 4 MiB or 64 MiB chunks, in a loop
                               (create + map + set access, then unmap + release: what elastikv's allocator does);
- ``torch-malloc``             another process allocates and frees 512 MiB through PyTorch, emptying its cache
                               each time (cudaMalloc/cudaFree: what an engine's ``empty_cache`` does);
- ``thread-vmm-4MiB``          the 4 MiB loop on a thread of the victim's own process (the allocator's
                               maintainer thread beside the engine's).

Per phase: victim step time mean/p50/p99 and its ratio to idle, the aggressor's operations per second, and the
victim time lost per aggressor operation. On a CPU the same runs on the host backend (mmap) and CPU matmuls.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._results import environment, save

CHURN_BYTES = 512 * 1024**2
PHASES = ("idle", "vmm-4MiB", "vmm-64MiB", "torch-malloc", "thread-vmm-4MiB")


def churn_vmm(chunk: int, stop: Any) -> int:
    """Map CHURN_BYTES in ``chunk``-sized pieces into one reserved range, unmap them, again until ``stop`` is
    set; returns the driver operations done (one map = create+map+access, one unmap = unmap+release)."""
    from elastikv.memory import open_backend

    backend = open_backend("auto")
    va = backend.reserve(CHURN_BYTES)
    ops = 0
    try:
        while not stop.is_set():
            chunks = []
            for off in range(0, CHURN_BYTES, chunk):
                c = backend.create(chunk)
                backend.map(va + off, chunk, c)
                backend.set_access(va + off, chunk)
                chunks.append(c)
                ops += 1
                if stop.is_set():
                    break
            for i, c in enumerate(chunks):
                backend.unmap(va + i * chunk, chunk)
                backend.release(c)
                ops += 1
    finally:
        backend.free_reservation(va, CHURN_BYTES)
    return ops


def churn_torch(device: str, stop: Any) -> int:
    import torch

    ops = 0
    while not stop.is_set():
        t = torch.empty(CHURN_BYTES, dtype=torch.uint8, device=device)
        t[:1].zero_()
        del t
        if device == "cuda":
            torch.cuda.empty_cache()
        ops += 2
    return ops


def aggressor(phase: str, device: str, start: Any, stop: Any, result: Any) -> None:
    start.wait()
    t0 = time.monotonic()
    if phase == "vmm-4MiB":
        ops = churn_vmm(4 * 1024**2, stop)
    elif phase == "vmm-64MiB":
        ops = churn_vmm(64 * 1024**2, stop)
    else:
        ops = churn_torch(device, stop)
    result.put((ops, time.monotonic() - t0))


def victim(device: str, gib: float, ready: Any, stop: Any, thread_churn: Any, out: Any) -> None:
    """Decode steps back to back until ``stop``; sends [(end time, seconds)] for each step. While
    ``thread_churn`` is set, a thread of this process runs the 4 MiB map/unmap loop."""
    import torch

    gpu = device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    # Llama-3.1-8B's shapes: attention's q, k, v and o projections as one GEMM, the MLP as two
    hidden, attn, inter, batch = (4096, 6144 + 4096, 14336, 16) if gpu else (256, 640, 896, 4)
    layer_bytes = (hidden * attn + 3 * hidden * inter) * (2 if gpu else 4)
    layers = max(1, int(gib * 1024**3 / layer_bytes)) if gpu else 4
    w = [
        (
            torch.randn(hidden, attn, device=device, dtype=dtype) * 0.01,
            torch.randn(hidden, 2 * inter, device=device, dtype=dtype) * 0.01,
            torch.randn(inter, hidden, device=device, dtype=dtype) * 0.01,
        )
        for _ in range(layers)
    ]
    x = torch.randn(batch, hidden, device=device, dtype=dtype)

    def step() -> None:
        h = x
        for wqkv, w13, w2 in w:
            h = h + (h @ wqkv)[:, :hidden]
            gate, up = (h @ w13).chunk(2, dim=-1)
            h = h + (torch.nn.functional.silu(gate) * up) @ w2
        if gpu:
            torch.cuda.synchronize()

    for _ in range(5):
        step()
    ready.set()
    times: list[tuple[float, float]] = []
    churn_stop = threading.Event()
    churner: threading.Thread | None = None
    while not stop.is_set():
        if thread_churn.is_set() and churner is None:
            churn_stop.clear()
            churner = threading.Thread(target=lambda: out.put(("thread-ops", churn_vmm(4 * 1024**2, churn_stop))))
            churner.start()
        if not thread_churn.is_set() and churner is not None:
            churn_stop.set()
            churner.join()
            churner = None
        t0 = time.monotonic()
        step()
        t1 = time.monotonic()
        times.append((t1, t1 - t0))
    out.put(("steps", times))


def summarise(steps: list[float]) -> dict[str, float]:
    s = sorted(steps)
    return {
        "steps": len(s),
        "mean_ms": 1e3 * statistics.fmean(s),
        "p50_ms": 1e3 * s[len(s) // 2],
        "p99_ms": 1e3 * s[min(len(s) - 1, int(0.99 * len(s)))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase-seconds", type=float, default=6.0)
    ap.add_argument("--victim-gib", type=float, default=14.0, help="victim weights read per step (GPU)")
    args = ap.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    label = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    ctx = mp.get_context("spawn")
    ready, stop, thread_churn = ctx.Event(), ctx.Event(), ctx.Event()
    out: Any = ctx.Queue()
    vp = ctx.Process(target=victim, args=(device, args.victim_gib, ready, stop, thread_churn, out))
    vp.start()
    if not ready.wait(300):
        raise SystemExit("the victim did not start within 300 s")
    windows: dict[str, tuple[float, float]] = {}
    ops: dict[str, tuple[int, float]] = {}
    for phase in PHASES:
        t0 = time.monotonic()
        if phase == "idle":
            time.sleep(args.phase_seconds)
        elif phase.startswith("thread-"):
            thread_churn.set()
            time.sleep(args.phase_seconds)
            thread_churn.clear()
        else:
            start, pstop, result = ctx.Event(), ctx.Event(), ctx.Queue()
            ap_ = ctx.Process(target=aggressor, args=(phase, device, start, pstop, result))
            ap_.start()
            time.sleep(2.0)  # the aggressor's CUDA start-up is not part of the phase
            t0 = time.monotonic()
            start.set()
            time.sleep(args.phase_seconds)
            pstop.set()
            ops[phase] = result.get(timeout=120)
            ap_.join()
        windows[phase] = (t0 + 0.5, time.monotonic())  # the first half second: the aggressor ramping up
        time.sleep(1.0)  # a gap between phases
    stop.set()
    steps: list[tuple[float, float]] = []
    while True:
        kind, value = out.get(timeout=120)
        if kind == "thread-ops":
            lo, hi = windows["thread-vmm-4MiB"]
            ops["thread-vmm-4MiB"] = (value, hi - lo + 0.5)
        else:
            steps = value
            break
    vp.join()

    rows: dict[str, dict[str, float]] = {}
    for phase, (lo, hi) in windows.items():
        rows[phase] = summarise([dt for end, dt in steps if lo <= end - dt and end <= hi])
    base = rows["idle"]["mean_ms"]
    for phase, row in rows.items():
        row["mean_ratio"] = row["mean_ms"] / base
        if phase in ops:
            n, secs = ops[phase]
            row["aggressor_ops_per_s"] = n / secs
            # victim time lost per aggressor operation: (slowdown fraction) / (ops per second)
            row["victim_us_lost_per_op"] = 1e6 * (row["mean_ratio"] - 1) / (n / secs) if n else 0.0
    env = environment(label)
    lines = [
        f"# interference: other processes' memory traffic vs a decode loop ({label})",
        "",
        f"{env['date']}, commit {env['commit']}: `{env['command']}`",
        "",
        "| aggressor | steps | step mean (ms) | p50 | p99 | mean / idle | aggressor ops/s | victim us lost / op |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for phase, r in rows.items():
        lines.append(
            f"| {phase} | {r['steps']} | {r['mean_ms']:.2f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['mean_ratio']:.3f} | {r.get('aggressor_ops_per_s', 0):.0f} | {r.get('victim_us_lost_per_op', 0):.1f} |"
        )
    md = "\n".join(lines) + "\n"
    print(md)
    path = save("interference", label, {"env": env, "phases": rows, "args": vars(args)}, md)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
