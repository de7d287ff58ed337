"""A test process: one elastic cache (host backend, registered in the ledger) driven by the test.

    python tests/instance_worker.py NAME random SECONDS SEED   # allocate and free at random, then exit cleanly
    python tests/instance_worker.py NAME storm SECONDS SEED    # like random, printing a heartbeat line every
        0.25 s; SIGUSR1 freezes it (SIGSTOP) inside a ledger write transaction, until the test sends SIGCONT
    python tests/instance_worker.py NAME serve                  # obey commands on stdin, one per line:
        grow N | free N | stats | exit

It prints one JSON line when ready ({"ready": true, "pid": ..., "memfd": ...}) and one per command. Settings
(ledger directory, device budget, limit, reserve) come from the ELASTIKV_* environment the test sets.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict

import torch

from elastikv.errors import AllocationRefused
from elastikv.instance import open_instance
from elastikv.ledger import Ledger
from elastikv.space import KVGeometry

# A shell that starts a job in the background (`cmd &`, no job control) has it ignore SIGINT, and Python then
# leaves SIGINT ignored; the tests' Ctrl-C must reach this worker as KeyboardInterrupt wherever the suite runs.
signal.signal(signal.SIGINT, signal.default_int_handler)

GEOMETRY = KVGeometry(num_layers=1, block_shape=(16, 8, 128), dtype=torch.float32)  # 32 blocks in a 4 MiB page


def say(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")  # one write: two threads may speak
    sys.stdout.flush()


def freeze_in_a_transaction(ledger: Ledger) -> None:
    """Fault injection: stop this whole process while one of its threads holds the ledger's write lock (as a
    debugger or a container freeze would catch it). A thread, because the main thread may itself be inside a
    transaction when the signal lands (the ledger's lock is not reentrant)."""

    def hold() -> None:
        with ledger._transaction():
            say(frozen=True)
            os.kill(os.getpid(), signal.SIGSTOP)

    threading.Thread(target=hold, daemon=True).start()


def main() -> None:
    name, mode = sys.argv[1], sys.argv[2]
    inst = open_instance(GEOMETRY, engine="test", name=name, num_blocks=64 * 32)
    say(ready=True, pid=os.getpid(), memfd=inst.backend._fd)  # type: ignore[attr-defined]
    alloc, view = inst.allocator, inst.space.buffer(0, 0)
    held: list[list[int]] = []
    if mode in ("random", "storm"):
        seconds, rng = float(sys.argv[3]), random.Random(int(sys.argv[4]))
        if mode == "storm":
            signal.signal(signal.SIGUSR1, lambda *_: freeze_in_a_transaction(inst.ledger))
        deadline, allocs, refusals, beat, last_refusal = time.monotonic() + seconds, 0, 0, 0.0, ""
        while time.monotonic() < deadline:
            if mode == "storm" and time.monotonic() - beat > 0.25:
                beat = time.monotonic()
                say(beat=True, allocs=allocs, refusals=refusals, held=sum(map(len, held)))
            if held and rng.random() < 0.45:
                alloc.free(held.pop(rng.randrange(len(held))))
            else:
                try:
                    blocks = alloc.allocate(rng.randint(1, 40))
                except AllocationRefused as exc:
                    refusals += 1
                    last_refusal = f"{type(exc).__name__}: {exc}"
                    time.sleep(0.002)
                    continue
                view[torch.tensor(blocks)] = float(allocs % 100)  # really touch the memory
                held.append(blocks)
                allocs += 1
        say(done=True, allocs=allocs, refusals=refusals, last_refusal=last_refusal)
    else:
        for line in sys.stdin:
            cmd, *arg = line.split()
            if cmd == "grow":
                try:
                    held.append(alloc.allocate(int(arg[0])))
                    say(ok=True)
                except AllocationRefused as exc:
                    say(ok=False, error=type(exc).__name__, message=str(exc))
            elif cmd == "free":
                n, freed = int(arg[0]), []
                while held and len(freed) < n:
                    freed += held.pop()
                alloc.free(freed)
                say(ok=True, freed=len(freed))
            elif cmd == "stats":
                say(**asdict(alloc.stats()))
            elif cmd == "exit":
                break
    inst.close()


if __name__ == "__main__":
    main()
