"""Clean shutdown: whatever elastikv holds in a process is given back on normal exit, SIGTERM and SIGINT.

A process that dies any other way (SIGKILL, a crash) loses its memory with it (the driver or the kernel
frees it) and its ledger row is removed by the next ledger access of any other process; this module only
makes the ordinary endings prompt and tidy.
"""

from __future__ import annotations

import atexit
import logging
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)

_closers: list[Callable[[], None]] = []
_installed = False


def on_exit(close: Callable[[], None]) -> None:
    """Run ``close`` at exit (newest first), also when the process is ended by SIGTERM or SIGINT."""
    global _installed
    _closers.append(close)
    if _installed:
        return
    _installed = True
    atexit.register(run_closers)
    # SIGINT already raises KeyboardInterrupt, which runs atexit. SIGTERM's default ends the process at once:
    # turn it into SystemExit, unless the engine installed a handler of its own (then it decides).
    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def forget(close: Callable[[], None]) -> None:
    if close in _closers:
        _closers.remove(close)


def run_closers() -> None:
    while _closers:
        close = _closers.pop()
        try:
            close()
        except Exception:
            log.exception("elastikv: cleanup at exit failed")


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)
