"""Several processes share one device's budget through the ledger.

N worker processes (default 3), each an elastic Llama-3.1-8B-shaped KV cache registered in the device's
ledger, grow at the same moment until refused, against a device budget smaller than the sum of their limits.
The parent samples what the device really holds (``cudaMemGetInfo``; on the host backend, the workers' own
memory) and the ledger, and checks the budget was never passed. It reports:

- admission cost per page: one ledger transaction (check limit and device budget, book), alone and while
  every worker books at once, against the map itself (the driver's create + map + set access);
- the time a SIGKILLed worker's memory takes to come back in ``cudaMemGetInfo``, and that its ledger row is
  gone after one ledger access;
- that the survivors can then grow into the freed share.

    python benchmarks/share.py                       # GPU if present; budget 45% of the device, 3 workers
    python benchmarks/share.py --backend host --budget 1GiB --limit 512MiB
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import _results
from elastikv import children
from elastikv.bench.cache_demo import LLAMA_8B
from elastikv.config import format_bytes, parse_size
from elastikv.errors import AllocationRefused

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------- worker
def worker(name: str) -> None:
    from elastikv.instance import open_instance

    inst = open_instance(LLAMA_8B, engine="bench", name=name)
    alloc, budget, page = inst.allocator, inst.budget, inst.space.page_bytes
    bpp = inst.space.blocks_per_page

    def say(**fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    say(ready=True, pid=os.getpid(), page_bytes=page)
    held: list[list[int]] = []
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "admission":  # raw ledger transactions (no lease): book one page and give it back
            n = int(cmd[1])
            times = []
            for _ in range(n):
                t = time.perf_counter()
                budget.ledger.book(name, page)
                times.append(time.perf_counter() - t)
                budget.ledger.release(name, page)
            say(admission_us=statistics.median(times) * 1e6, admission_p99_us=sorted(times)[int(n * 0.99)] * 1e6)
        elif cmd[0] == "grow":  # allocate whole pages until refused
            times, refusal, tx0 = [], "", budget.transactions
            t0 = time.perf_counter()
            while True:
                t = time.perf_counter()
                try:
                    held.append(alloc.allocate(bpp))
                except AllocationRefused as exc:
                    refusal = str(exc)
                    break
                times.append(time.perf_counter() - t)
            say(
                pages=len(times),
                seconds=time.perf_counter() - t0,
                refusal=refusal,
                alloc_p50_us=statistics.median(times) * 1e6 if times else None,
                mapped=alloc.stats().mapped_bytes,
                ledger_transactions=budget.transactions - tx0,
            )
        elif cmd[0] == "exit":
            break
    inst.close()


# --------------------------------------------------------------------------------------------------- parent
class Worker:
    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.proc = children.popen(
            [sys.executable, __file__, "--worker", name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.info = self.read()

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (exit code {self.proc.wait()})")
        return dict(json.loads(line))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="auto", choices=["auto", "cuda", "host"])
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--budget", default="45%", help="device budget (default 45%% of the device)")
    ap.add_argument("--limit", default="25%", help="each worker's limit (default 25%%: the sum exceeds the budget)")
    ap.add_argument("--admissions", type=int, default=500)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return

    from elastikv.ledger import Ledger
    from elastikv.memory import HostBackend, open_backend

    backend = open_backend(args.backend)
    free0, total = backend.mem_info()
    budget = parse_size(args.budget, what="--budget").resolve(total)
    ledger_dir = tempfile.mkdtemp(prefix="elastikv-share-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIKV")}
    env.update(
        PYTHONPATH=f"{ROOT / 'src'}:{env.get('PYTHONPATH', '')}",
        ELASTIKV_BACKEND=backend.name,
        ELASTIKV_LEDGER_DIR=ledger_dir,
        ELASTIKV_DEVICE_BUDGET=args.budget,
        ELASTIKV_LIMIT=args.limit,
        ELASTIKV_RESERVE="0",
    )
    if isinstance(backend, HostBackend):
        env["ELASTIKV_HOST_MEMORY"] = "100%"

    def held_now() -> int:
        if isinstance(backend, HostBackend):  # each worker has its own memfd; the ledger's figure stands in
            return sum(r.mapped_bytes for r in ledger.instances())
        free, _ = backend.mem_info()
        return free0 - free

    print(
        f"share benchmark on {backend.device_label}: {args.processes} workers, device budget "
        f"{args.budget} = {format_bytes(budget)}, each limited to {args.limit}"
    )
    workers = [Worker(f"w{i}", env) for i in range(args.processes)]
    ledger = Ledger.open_existing(next(Path(ledger_dir).glob("*.sqlite")))
    free0, _ = backend.mem_info()  # the workers' contexts are made: measure KV memory from here
    page = workers[0].info["page_bytes"]
    results: dict[str, Any] = {
        "budget_bytes": budget,
        "page_bytes": page,
        "processes": args.processes,
        "limit": args.limit,
        "budget": args.budget,
    }

    # 1. admission cost: one worker alone, then all at once
    workers[0].send(f"admission {args.admissions}")
    alone = workers[0].read()
    for w in workers:
        w.send(f"admission {args.admissions}")
    together = [w.read() for w in workers]
    results["admission_alone_us"] = alone["admission_us"]
    results["admission_alone_p99_us"] = alone["admission_p99_us"]
    results["admission_contended_us"] = statistics.median(t["admission_us"] for t in together)

    # 2. everyone grows at once until refused; the parent samples what the device holds
    for w in workers:
        w.send("grow")
    samples, peak = 0, 0
    pending = list(workers)
    grown: dict[str, dict[str, Any]] = {}
    import select

    while pending:
        ready, _, _ = select.select([w.proc.stdout for w in pending], [], [], 0.005)
        held = held_now()
        peak = max(peak, held)
        samples += 1
        for w in list(pending):
            if w.proc.stdout in ready:
                grown[w.name] = w.read()
                pending.remove(w)
    rows = {r.name: r for r in ledger.instances()}
    results["grow"] = grown
    results["peak_held_bytes"] = peak
    results["samples"] = samples
    results["ledger_held_bytes"] = sum(r.mapped_bytes for r in rows.values())
    results["budget_kept"] = peak <= budget + page and results["ledger_held_bytes"] <= budget
    map_us = statistics.median(g["alloc_p50_us"] for g in grown.values() if g["alloc_p50_us"])
    results["alloc_page_with_ledger_p50_us"] = map_us

    # 3. SIGKILL one worker: how fast does the device get its memory back, and the ledger its row?
    victim = workers[0]
    victim_bytes = rows[victim.name].mapped_bytes
    free_before, _ = backend.mem_info()
    t0 = time.monotonic()
    victim.proc.send_signal(signal.SIGKILL)
    back_s = None
    while time.monotonic() - t0 < 30:
        free, _ = backend.mem_info()
        if isinstance(backend, HostBackend) or free - free_before >= victim_bytes * 0.99:
            back_s = time.monotonic() - t0
            break
        time.sleep(0.001)
    victim.proc.wait()
    t1 = time.monotonic()
    names_after = [r.name for r in ledger.instances()]
    results["killed_bytes"] = victim_bytes
    results["memory_back_s"] = back_s
    results["ledger_row_gone_after_one_access"] = victim.name not in names_after
    results["ledger_access_s"] = time.monotonic() - t1

    # 4. the survivors grow into the freed share
    for w in workers[1:]:
        w.send("grow")
    regrown = {w.name: w.read() for w in workers[1:]}
    results["regrow_pages"] = {k: v["pages"] for k, v in regrown.items()}
    results["held_after_regrow_bytes"] = sum(r.mapped_bytes for r in ledger.instances())
    for w in workers[1:]:
        w.send("exit")
        w.proc.wait(timeout=60)
    results["ledger_empty_at_end"] = ledger.instances() == []
    ledger.close()
    backend.close()

    env_info = _results.environment(backend.device_label)
    lines = [
        f"# share: {env_info['device']}, {env_info['date']}",
        "",
        f"`{env_info['command']}` (commit {env_info['commit']}, torch {env_info['torch']})",
        "",
        f"{args.processes} processes, device budget {args.budget} = {format_bytes(budget)}, each limited to "
        f"{args.limit}, pages of {format_bytes(page)}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| admission (one ledger transaction), alone, p50 / p99 | {results['admission_alone_us']:.0f} / "
        f"{results['admission_alone_p99_us']:.0f} us |",
        f"| admission, all {args.processes} booking at once, p50 | {results['admission_contended_us']:.0f} us |",
        f"| allocate one page (admission + map), p50, all growing | {map_us:.0f} us "
        f"({sum(g['pages'] for g in grown.values())} pages in "
        f"{sum(g['ledger_transactions'] for g in grown.values())} ledger transactions: leases) |",
        f"| peak held on the device while all grew (sampled {samples} times) | {format_bytes(peak)} "
        f"(budget {format_bytes(budget)}: {'kept' if results['budget_kept'] else 'PASSED'}) |",
        f"| SIGKILLed worker's {format_bytes(victim_bytes)} back in cudaMemGetInfo | "
        f"{back_s if back_s is None else f'{back_s * 1e3:.0f} ms'} |",
        f"| its ledger row gone after one access | {results['ledger_row_gone_after_one_access']} "
        f"({results['ledger_access_s'] * 1e3:.1f} ms) |",
        f"| survivors' growth into the freed share | {results['regrow_pages']} pages |",
        f"| ledger empty after clean exits | {results['ledger_empty_at_end']} |",
    ]
    summary = "\n".join(lines) + "\n"
    path = _results.save("share", backend.device_label, {"env": env_info, "results": results}, summary)
    print(summary)
    print(f"saved {path}")
    if not results["budget_kept"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
