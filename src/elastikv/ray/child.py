"""One replica's own ``elastikv serve``: written, started, watched, polled and stopped. No Ray here.

Who owns what: a :class:`ChildRouter` owns one ``elastikv serve`` process (and through it that router's engines),
its config file (with an admin token generated here and a free port), and two threads:

- the *keeper* forks the process and then waits for it. ``PR_SET_PDEATHSIG`` fires when the thread that forked
  dies (``elastikv.children``), so the fork happens on a thread that lives exactly as long as the child may:
  a Serve replica runs its constructor on a thread that may end, the keeper does not end before the child;
- the *poller* reads ``GET /admin/status`` every ``poll_s`` and keeps the last answer as a :class:`ReplicaStats`
  (requests never wait for it; Serve's stats calls read the copy).

Invariants: the child leads its own process group and dies with this process however it ends (SIGKILL, a lost
Ray node); :meth:`stop` ends the group (SIGTERM, then SIGKILL after ``grace_s``) and is safe to call twice; the
child router itself stops its engines on SIGTERM and clears their ledger rows. Memory figures come from the
router's status (``device``) where it has them, else from this replica's ledger directory directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml  # type: ignore[import-untyped,unused-ignore]

from elastikv import children, ports
from elastikv.errors import ElastikvError, EngineStartFailed
from elastikv.ray.stats import ReplicaStats
from elastikv.router.engine_process import log_tail

log = logging.getLogger("elastikv.ray")


class ChildRouter:
    def __init__(
        self,
        router: dict[str, Any],
        work_dir: Path,
        *,
        env: dict[str, str] | None = None,
        ledger_dir: str | None = None,
        node_id: str = "",
        poll_s: float = 0.2,
        in_flight: Callable[[], int] = lambda: 0,
    ) -> None:
        self.work_dir = work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_urlsafe(24)
        self.port = ports.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ledger_dir = ledger_dir
        self.node_id = node_id
        self.poll_s = poll_s
        self.in_flight = in_flight
        self.config_path = work_dir / "router.yaml"
        self.config_path.write_text(
            yaml.safe_dump({**router, "listen": f"127.0.0.1:{self.port}", "admin_token": self.token}, sort_keys=False)
        )
        self.config_path.chmod(0o600)  # the admin token is in it
        self.log_path = work_dir / "router.log"
        self.env = {**os.environ, **(env or {})}
        self.stats = ReplicaStats(node_id=node_id)
        self.proc: subprocess.Popen[bytes] | None = None
        self._forked = threading.Event()
        self._stopping = threading.Event()
        self._poke = threading.Event()  # poll now (a relay just ended: its model's state may have changed)
        self._fork_error: BaseException | None = None
        self._keeper = threading.Thread(target=self._keep, name="elastikv-child-keeper", daemon=True)
        self._poller = threading.Thread(target=self._poll, name="elastikv-child-poller", daemon=True)

    # -- life ---------------------------------------------------------------------------------------------------
    def start(self, timeout_s: float) -> None:
        """Start ``elastikv serve`` and wait until it answers ``/health`` (its engines are up). Raises
        ``EngineStartFailed`` with the end of its log if it exits or is not up within ``timeout_s``."""
        self._keeper.start()
        self._forked.wait()
        if self._fork_error is not None:
            raise EngineStartFailed(f"could not start elastikv serve: {self._fork_error}")
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                if not self.alive():
                    raise EngineStartFailed(f"this replica's elastikv serve exited at start:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    self.stop()
                    raise EngineStartFailed(
                        f"this replica's elastikv serve did not answer within {timeout_s:.0f} s "
                        f"(cluster.replica_start_timeout_s):\n{self.log_tail()}"
                    )
                time.sleep(0.1)
            self._poll_once(client)  # a first report before the replica takes requests
        self._poller.start()

    def _keep(self) -> None:
        try:
            argv = [sys.executable, "-m", "elastikv.cli", "serve", str(self.config_path),
                    "--log-dir", str(self.work_dir / "engines")]  # fmt: skip
            self.proc = children.popen(argv, env=self.env, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT)
        except BaseException as exc:  # handed to start(), which raises it in the caller's thread
            self._fork_error = exc
            return
        finally:
            self._forked.set()
        self.proc.wait()  # this thread ends only once the child has: PR_SET_PDEATHSIG stays armed until then

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 15.0) -> None:
        """End the child's process group (its router stops its engines on SIGTERM). Safe to call twice."""
        self._stopping.set()
        self._poke.set()
        if self.proc is not None:
            children.stop_group(self.proc, grace_s)
        if self._keeper.is_alive():
            self._keeper.join(5)
        if self._poller.is_alive():
            self._poller.join(5)

    def log_tail(self, n: int = 40) -> str:
        return log_tail(self.log_path, n)

    # -- state --------------------------------------------------------------------------------------------------
    def poke(self) -> None:
        self._poke.set()

    def _poll(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self._stopping.is_set():
                self._poke.wait(self.poll_s)
                self._poke.clear()
                if not self._stopping.is_set():
                    self._poll_once(client)

    def _poll_once(self, client: httpx.Client) -> None:
        if not self.alive():
            self.stats = ReplicaStats(False, self.node_id, self.stats.models, self.in_flight(), at=time.time())
            return
        try:
            r = client.get(f"{self.url}/admin/status", headers={"Authorization": f"Bearer {self.token}"})
            r.raise_for_status()
            body = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("this replica's elastikv serve did not answer its status (%s)", exc)
            self.stats = ReplicaStats(False, self.node_id, self.stats.models, self.in_flight(), at=time.time())
            return
        device = None if isinstance(body.get("device"), dict) else self._ledger_device()
        self.stats = ReplicaStats.from_status(body, node_id=self.node_id, in_flight=self.in_flight(),
                                              at=time.time(), device=device)  # fmt: skip

    def _ledger_device(self) -> dict[str, int] | None:
        """Budget, held and free from this replica's ledger (a router whose status has no ``device`` key)."""
        from elastikv.ledger import summaries

        try:
            found = summaries(self.ledger_dir)
        except (ElastikvError, OSError):
            return None
        if len(found) != 1:  # none yet (nothing booked), or several devices: not one replica's GPU
            return None
        s = found[0]
        return {"budget_bytes": s.budget_bytes, "held_bytes": s.held_bytes,
                "free_bytes": max(0, s.unbooked_bytes)}  # fmt: skip
