"""What /proc says about other processes: whether a pid is still the process a ledger row was written by (its
start time), and who holds a file open. The ledger uses both to reap rows of dead processes and to say who holds
its lock; Linux only, like the rest of elastikv's process handling."""

from __future__ import annotations

import os
from pathlib import Path


def holders(path: Path) -> list[int]:
    """Other processes with the ledger (or its WAL files) open, from /proc (those of this user)."""
    names = {str(path), f"{path}-wal", f"{path}-shm"}
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) in names for fd in (entry / "fd").iterdir()):
                out.append(int(entry.name))
        except OSError:
            continue
    return sorted(out)


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if there is no such process or it has
    exited and waits only to be reaped (a zombie: its memory, GPU memory included, is already gone; in a container
    whose PID 1 never reaps, it would otherwise hold its ledger row forever)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:  # hidepid: assume alive with the start time we know cannot be checked
        return -1
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):  # field 3 of stat(5), the state: zombie or dead
        return None
    return int(fields[19])  # field 22 of stat(5)
