"""Child processes that never outlive their parent.

Every engine, router or worker elastikv starts (the router's engines, the demo's and the benchmarks' routers, the
tests' servers) is started with :func:`popen` or with :func:`die_with_parent` as its ``preexec_fn``:

- it leads a process group of its own (``start_new_session``), so the parent can end it *and its helpers*
  (vLLM's engine core and workers) with one ``killpg``, and a Ctrl-C typed at the terminal reaches only the
  parent, which then stops its children in order;
- on Linux the kernel sends it ``SIGTERM`` the moment its parent dies, however the parent dies (SIGKILL, a
  crash, a test timeout): ``prctl(PR_SET_PDEATHSIG)``. The engine's own SIGTERM handling then ends its group.

One caveat of ``PR_SET_PDEATHSIG``: "parent" is the *thread* that forked. Start children from the thread that
lives as long as they should (the asyncio loop's thread, the main thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

PR_SET_PDEATHSIG = 1

_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child must not load libraries


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when the process that started it dies (Linux; elsewhere the
    process group is all there is)."""
    parent = os.getpid()

    def preexec() -> None:
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl: nobody would signal us
            os.kill(os.getpid(), sig)

    return preexec


def popen(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen`` for a child that leads its own process group and dies with this process."""
    return subprocess.Popen(list(argv), start_new_session=True, preexec_fn=die_with_parent(), **kwargs)


def stop_group(proc: subprocess.Popen[Any], grace_s: float = 10.0) -> int:
    """End ``proc``'s process group: SIGTERM, then SIGKILL after ``grace_s``. Returns the leader's exit code.
    A group whose leader already exited is killed too: its helpers may linger."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def group_alive(pgid: int) -> bool:
    """Whether any process of the group ``pgid`` is still running (zombies count as gone)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) succeeds for zombies too: look for a member that is not one.
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
            fields = data[data.rindex(b")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != b"Z":  # fields: state, ppid, pgrp, ...
                return True
    return not os.path.isdir("/proc")


def wait_group_gone(pgid: int, timeout_s: float) -> bool:
    """Wait until no process of group ``pgid`` runs, at most ``timeout_s``. True if it is gone."""
    deadline = time.monotonic() + timeout_s
    while group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
