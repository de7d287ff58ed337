"""Typed errors. Each message says what went wrong and what to do about it.

Refusals (``AllocationRefused`` and its subclasses) are normal events: an engine catches them to queue or
preempt a request. Everything else is a programming or configuration error.
"""

from __future__ import annotations


class ElastikvError(Exception):
    """Base class of every error elastikv raises on purpose."""


class ConfigError(ElastikvError, ValueError):
    """A setting (environment variable, flag, argument) is malformed or out of range."""


class InvalidBlockError(ElastikvError, ValueError):
    """An engine freed a block it does not own (never allocated, already free, or out of range)."""


class DriverError(ElastikvError, RuntimeError):
    """A memory call failed for a reason other than running out of memory."""

    def __init__(self, call: str, code: int | str, detail: str = "") -> None:
        self.call = call
        self.code = code
        msg = f"{call} failed with {code}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class BackendUnavailable(ElastikvError, RuntimeError):
    """The requested memory backend cannot run on this machine (no GPU, no driver, no cuda-bindings)."""


class AllocationRefused(ElastikvError):
    """An allocation could not be satisfied now. State is unchanged; the engine should queue or preempt.

    ``requested`` is the number of blocks asked for, ``available`` how many could be had at that moment.
    """

    reason = "refused"

    def __init__(self, message: str, *, requested: int = 0, available: int = 0) -> None:
        super().__init__(message)
        self.requested = requested
        self.available = available


class OutOfMemory(AllocationRefused):
    """The device (driver) or the virtual capacity has no room for another page."""

    reason = "out_of_memory"


class LimitExceeded(AllocationRefused):
    """The instance's memory limit (or the device budget shared with other instances) is reached."""

    reason = "limit"


class BudgetUnavailable(AllocationRefused):
    """The budget could not be consulted (the ledger failed: busy past its wait, its row gone, unreadable): the
    allocation is refused and nothing changed. Growth resumes when the ledger answers again."""

    reason = "budget_unavailable"


class UnsupportedEngine(ElastikvError, RuntimeError):
    """An engine version or patch target that elastikv does not know; it refuses to run unpatched."""


class EngineDied(ElastikvError, RuntimeError):
    """An engine's batching thread has ended (at start, or while serving): it cannot answer any more. The message
    carries the thread's error and, where known, the fix."""


class Interrupted(ElastikvError):
    """Ctrl-C or SIGTERM stopped a run (the demo, a benchmark) after every engine it started was stopped."""


class EngineStartFailed(ElastikvError):
    """An engine did not come up when a router started it (it exited, or never answered): the router serves
    none rather than half its config. The message has the end of the engine's log."""


class LedgerError(ElastikvError, RuntimeError):
    """The ledger cannot be used: foreign, corrupt, or its files have unsafe permissions."""


class LedgerBusy(LedgerError):
    """Another process held the ledger's lock for longer than the wait (``BUSY_TIMEOUT``): it is alive and mid
    transaction, or frozen there (SIGSTOP, a debugger). The ledger is fine; never remove it for this."""


class RowMissing(LedgerError):
    """This process's row is gone from the ledger while it runs (deleted by hand, reaped from another pid
    namespace, the file replaced). Its budget re-joins as soon as what it holds fits
    (:meth:`elastikv.ledger.Ledger.rejoin`)."""


class UnknownInstance(ElastikvError, LookupError):
    """No live instance has that name on any device."""


class NameTaken(ConfigError):
    """A live instance on the device already has that name."""
