"""One start of a model's engine: the child process, the tokens this start gave it, and how it is ended.

Who owns what: the :class:`~elastikv.router.supervisor.ManagedModel` decides when to start, restart and stop; an
``EngineProcess`` is one such start. Its child leads its own process group (so an engine's own helpers, such as
vLLM's engine core and workers, go with it), which dies with the router (``elastikv.children``). Each start gets
fresh tokens: the start token the embedded engine reports on ``/health`` (so the router knows the port answers as
*this* start), and the control token the engine's ``/sleep`` and ``/wake_up`` require (never shown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import signal
from pathlib import Path

import httpx

from elastikv import ports
from elastikv.children import die_with_parent
from elastikv.router.config import ModelSpec
from elastikv.router.launch import Launch, describe
from elastikv.router.states import EngineExited

log = logging.getLogger("elastikv.router")

STOP_GRACE_S = 15.0  # SIGTERM, then this long, then SIGKILL


class EngineProcess:
    def __init__(self, proc: asyncio.subprocess.Process, start_token: str, control_token: str) -> None:
        self.proc = proc
        self.start_token = start_token
        self.control_token = control_token

    @classmethod
    async def spawn(cls, launch: Launch, log_path: Path) -> EngineProcess:
        """Start ``launch`` with its output appended to ``log_path``; raises ``OSError`` if it cannot be spawned."""
        start_token, control_token = secrets.token_hex(8), secrets.token_hex(16)
        log_file = log_path.open("ab")
        try:
            log_file.write(f"\n=== elastikv serve: starting {describe(launch.argv)}\n".encode())
            log_file.flush()
            proc = await asyncio.create_subprocess_exec(
                *launch.argv,
                env={**launch.env, "ELASTIKV_START_TOKEN": start_token, "ELASTIKV_CONTROL_TOKEN": control_token},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                # Its own process group, which dies with the router (elastikv.children): Ctrl-C reaches the router,
                # which stops it in order, and a router that dies any other way takes it along.
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        finally:
            log_file.close()
        return cls(proc, start_token, control_token)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def wait(self) -> int:
        return await self.proc.wait()

    def exit_text(self) -> str:
        """How the process ended, as far as it has been reaped: for messages."""
        code = self.proc.returncode
        if code is None:
            return "exited"
        return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"

    async def wait_healthy(self, spec: ModelSpec, port: int, client: httpx.AsyncClient, log_path: Path) -> None:
        """Until the engine answers its health check as this start; raises ``EngineExited`` (with the end of its
        log) if it exits first or is not healthy within the spec's ``start_timeout``."""
        url = f"http://127.0.0.1:{port}{spec.health_path}"
        deadline = asyncio.get_running_loop().time() + spec.start_timeout_s
        while True:
            if self.proc.returncode is not None:
                raise EngineExited(
                    f"{spec.name}: the engine exited with code {self.proc.returncode} while starting; "
                    f"the end of its log ({log_path}):\n{log_tail(log_path)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                r = await client.get(url, timeout=2.0)
                if r.status_code == 200:
                    self._check_answering_as_ours(r, spec, port)
                    return
            if asyncio.get_running_loop().time() > deadline:
                raise EngineExited(
                    f"{spec.name}: not healthy after {spec.start_timeout_s:.0f} s (start_timeout); "
                    f"the end of its log ({log_path}):\n{log_tail(log_path)}"
                )
            await asyncio.sleep(0.1)

    def _check_answering_as_ours(self, health: httpx.Response, spec: ModelSpec, port: int) -> None:
        """The port answered: make sure it is the engine this start launched, not another server that holds the
        port. The embedded engine says so itself (this start's token on /health); for the others, the process
        listening on the port must be in the engine's process group."""
        if spec.engine == "elastikv":
            with contextlib.suppress(ValueError):
                body = health.json()
                if isinstance(body, dict) and body.get("start_token") == self.start_token:
                    return
            who = ports.holder(port)
        else:
            pid = ports.listener_pid(port)
            if pid is None:
                return  # cannot tell (another user's process, or no psutil): the port was free before the start
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(pid) == self.proc.pid:
                    return
            who = ports.holder(port)
        raise EngineExited(
            f"{spec.name}: port {port} answers, but not as the engine the router started: it is held by "
            f"{who}; stop that process or give the model another port"
        )

    def kill(self) -> None:
        """SIGKILL the process group now, without waiting (a hung engine; the router told to stop twice)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def terminate(self, name: str) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period; returns once the leader is reaped."""
        proc = self.proc
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except asyncio.TimeoutError:
                log.warning("%s: no exit %.0f s after SIGTERM; killing it", name, STOP_GRACE_S)
        # The leader may be gone while its helpers linger: the group goes in any case.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


# The line that names an exception at the end of a traceback ("RuntimeError: ...", "torch.OutOfMemoryError: ..."),
# behind any prefix a logger puts on it ("(EngineCore_DP0 pid=7) ERROR 12-06 17:20:01 [core.py:708] "); not a
# frame's source line ("    raise NotImplementedError").
FIRST_ERROR = "the first error in the log"  # how log_tail introduces it (bench/report.py finds it by this)
_EXCEPTION_LINE = re.compile(r"(?<!raise)(?:^|\s)(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception)(?::\s.*)?$")


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` of an engine's log, for error messages, after the first traceback's exception line when
    that lies before them. Why: an engine's end is often a consequence, its cause far above; vLLM's API server
    ends with "Engine core initialization failed. See root cause above", the cause being its engine core's
    exception (an out-of-memory, a refused patch) some hundred lines earlier."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    all_lines = text.splitlines()
    tail = "\n".join(all_lines[-lines:])
    head = all_lines[:-lines]
    start = next((i for i, line in enumerate(head) if "Traceback (most recent call last)" in line), None)
    if start is None:
        return tail
    cause = next((i for i in range(start + 1, len(head)) if _EXCEPTION_LINE.search(head[i].rstrip())), None)
    if cause is None:
        return tail
    return f"{FIRST_ERROR} (line {cause + 1}): {head[cause].strip()}\n...\n{tail}"
