"""The router's state: every model it serves, the HTTP client that reaches their engines, the idle watch.

Who owns what: the ``Router`` owns one ``ManagedModel`` per configured model (each owning its engine process),
one ``httpx.AsyncClient`` shared by all of them, and the task that puts idle models to sleep. ``start`` brings
every engine up at once and waits for all of them; ``stop`` ends them all and leaves no instance of theirs in
the ledger (a process that ended holds nothing after the next ledger access, invariant 6: ``stop`` makes that
access).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import tempfile
from pathlib import Path

import httpx

from elastikv.config import Settings
from elastikv.ledger import Ledger, LedgerError, ledger_files
from elastikv.router.config import RouterConfig
from elastikv.router.supervisor import ManagedModel

log = logging.getLogger("elastikv.router")

WATCH_EVERY_S = 0.25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Router:
    def __init__(self, config: RouterConfig, *, log_dir: str | Path | None = None) -> None:
        self.config = config
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="elastikv-serve-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # No read timeout: a long generation may stream for minutes; connecting is what must be quick.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=5.0),
            # Idle connections are dropped before the engine's server drops them (uvicorn: after 5 s), so a request
            # never goes out on a connection the other end is closing at that moment.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0),
        )
        self.models: dict[str, ManagedModel] = {}
        for spec in config.models:
            self.models[spec.name] = ManagedModel(spec, spec.port or free_port(), self.client, self.log_dir)
        self._watch_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        log.info("starting %d engine(s); their logs are in %s", len(self.models), self.log_dir)
        await asyncio.gather(*(m.start() for m in self.models.values()))
        c = self.config
        log.info("serving %s on http://%s:%d/v1", ", ".join(self.models), c.host, c.port)
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_models())

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        await asyncio.gather(*(m.close() for m in self.models.values()), return_exceptions=True)
        await self.client.aclose()
        left = self.ledger_rows()  # this access also clears the rows of every engine that just ended
        ours = {name: n for name, n in left.items() if name in self.models}
        if ours:
            log.warning("still in the ledger after stopping: %s", ", ".join(ours))
        log.info("stopped every engine")

    async def _watch_models(self) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            for m in self.models.values():
                m.maybe_sleep_when_idle()
                m.maybe_check_health()

    def ledger_dirs(self) -> list[str | None]:
        """The ledger directories the engines book in (their ELASTIKV_LEDGER_DIR, else the default)."""
        dirs: list[str | None] = []
        for m in self.models.values():
            d = Settings.from_env({k: v for k, v in m.launch.env.items() if k.startswith("ELASTIKV")}).ledger_dir
            if d not in dirs:
                dirs.append(d)
        return dirs

    def ledger_rows(self) -> dict[str, int]:
        """KV bytes mapped per instance name, over every device the engines use. Reaps dead processes' rows."""
        mapped: dict[str, int] = {}
        for d in self.ledger_dirs():
            for path in ledger_files(d):
                try:
                    ledger = Ledger.open_existing(path)
                except LedgerError:
                    continue
                try:
                    for row in ledger.instances():
                        mapped[row.name] = mapped.get(row.name, 0) + row.mapped_bytes
                finally:
                    ledger.close()
        return mapped
