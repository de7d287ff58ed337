"""SIGTERM stops `elastikv serve` in every state an engine can be in, within seconds, and leaves no process.

The engines here are `command` engines (any OpenAI-compatible server; the router stops and starts them to sleep
and wake): a few lines of Python that can be told to come up slowly, to crash after a while, or both, so that the
router can be caught starting, restarting after a crash, or adding a model at run time when the signal arrives.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from elastikv import children
from elastikv.ports import free_port
from elastikv.procfs import process_start_time

httpx = pytest.importorskip("httpx", reason="needs httpx: pip install -e '.[serve]'")
pytest.importorskip("yaml", reason="needs PyYAML: pip install -e '.[serve]'")

TOKEN = "signals-token"
ENGINE = r"""
import http.server, os, sys, threading, time
port, pids, delay, life = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
with open(pids, "a") as f:
    f.write(f"{os.getpid()}\n")
time.sleep(delay)  # a slow start: not listening yet
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
if life > 0:  # then a crash, again and again: the router restarts it with backoff
    threading.Timer(life, lambda: os._exit(7)).start()
server.serve_forever()
"""


def _engine(tmp: Path, name: str, delay: float, life: float) -> dict[str, object]:
    script = tmp / "engine.py"
    script.write_text(ENGINE)
    command = [sys.executable, str(script), "{port}", str(tmp / f"{name}.pids"), str(delay), str(life)]
    return {"name": name, "engine": "command", "command": command, "idle": "never", "start_timeout": "120s"}


def _serve(tmp: Path, models: list[dict[str, object]]) -> tuple[subprocess.Popen[bytes], str]:
    import yaml

    port = free_port()
    config = {"listen": f"127.0.0.1:{port}", "admin_token": TOKEN, "models": models}
    (tmp / "r.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIKV")}
    proc = children.popen([sys.executable, "-m", "elastikv.cli", "serve", str(tmp / "r.yaml"), "--log-dir",
                           str(tmp / "logs")], env=env, stdout=(tmp / "router.log").open("wb"),
                          stderr=subprocess.STDOUT)  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def _pids(tmp: Path) -> list[int]:
    return [int(line) for f in tmp.glob("*.pids") for line in f.read_text().split()]


def _until(what: str, check: Callable[[], object], proc: subprocess.Popen[bytes], log: Path, bound: float = 60) -> None:
    deadline = time.monotonic() + bound
    while not check():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{what} not within {bound} s: {log.read_text()[-2000:]}"
        time.sleep(0.05)


def _sigterm_ends_everything(tmp: Path, proc: subprocess.Popen[bytes]) -> float:
    """SIGTERM the router; it must exit within 15 s with every engine it started gone. Returns the seconds."""
    pids = _pids(tmp)
    assert pids
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the router ignored SIGTERM: {(tmp / 'router.log').read_text()[-2000:]}")
    seconds = time.monotonic() - t0
    time.sleep(0.2)  # the engines' groups were killed before the router exited; let the kernel finish reaping
    alive = [p for p in pids if process_start_time(p) is not None]
    assert not alive, f"engines outlived the router: {alive}"
    return seconds


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigterm_while_an_engine_is_still_starting(tmp_path: Path) -> None:
    proc, _url = _serve(tmp_path, [_engine(tmp_path, "slow", delay=60, life=0)])
    _until("the slow engine spawned", lambda: _pids(tmp_path), proc, tmp_path / "router.log")
    assert _sigterm_ends_everything(tmp_path, proc) < 10


def test_sigterm_while_an_engine_crashes_and_restarts_again_and_again(tmp_path: Path) -> None:
    proc, url = _serve(tmp_path, [_engine(tmp_path, "flaky", delay=0, life=0.6)])
    _until("serving", lambda: _healthy(url), proc, tmp_path / "router.log")
    _until("three starts (two restarts)", lambda: len(_pids(tmp_path)) >= 3, proc, tmp_path / "router.log")
    assert _sigterm_ends_everything(tmp_path, proc) < 10


def test_sigterm_while_a_model_is_being_added(tmp_path: Path) -> None:
    proc, url = _serve(tmp_path, [_engine(tmp_path, "steady", delay=0, life=0)])
    _until("serving", lambda: _healthy(url), proc, tmp_path / "router.log")
    answers: list[int] = []

    def add() -> None:
        with contextlib.suppress(httpx.HTTPError):
            body = _engine(tmp_path, "added", delay=60, life=0)
            r = httpx.post(f"{url}/admin/models", json=body, headers={"Authorization": f"Bearer {TOKEN}"},
                           timeout=30)  # fmt: skip
            answers.append(r.status_code)

    adding = threading.Thread(target=add)
    adding.start()
    _until("the added engine spawned", lambda: (tmp_path / "added.pids").exists(), proc, tmp_path / "router.log")
    assert _sigterm_ends_everything(tmp_path, proc) < 10
    adding.join(timeout=30)
    assert not adding.is_alive()
