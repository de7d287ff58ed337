"""Engines and routers as a user meets them: a start that fails says why within seconds, a port someone else holds
is refused naming that process, and no engine outlives what started it (SIGTERM, Ctrl-C, SIGKILL, mid-start).

All real: engine and router processes, a foreign HTTP server on the port, the transformers batching thread killed
at start by a missing psutil (a ``sitecustomize`` on PYTHONPATH that hides it, as on a machine without psutil).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="needs httpx: pip install -e '.[serve]'")
psutil = pytest.importorskip("psutil", reason="needs psutil: pip install -e '.[serve]'")

from elastikv import children, ports  # noqa: E402

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "elastikv.cli"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIKV")}
    env.update(ELASTIKV_BACKEND="host", ELASTIKV_HOST_MEMORY="512MiB", ELASTIKV_LEDGER_DIR=str(tmp_path / "ledger"))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from elastikv.bench.models import make_model

    return make_model(tmp_path_factory.mktemp("model") / "m", size="tiny")


@pytest.fixture
def foreign_server() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """Another program's HTTP server (python -m http.server), answering 200 on every GET."""
    port = ports.free_port()
    proc = children.popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    yield port, proc
    children.stop_group(proc)


def _descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _engines_of(pid: int, count: int, timeout_s: float) -> list[int]:
    """The pids of ``count`` `elastikv engine` processes started by ``pid``, once they exist."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = []
        for child in _descendants(pid):
            try:
                if "engine" in psutil.Process(child).cmdline():
                    found.append(child)
            except psutil.NoSuchProcess:
                continue
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"only {len(found)} engines appeared"
        time.sleep(0.1)


def _answers(engine: int) -> bool:
    """Whether the `elastikv engine` process ``engine`` serves (its /health answers 200)."""
    argv = psutil.Process(engine).cmdline()
    port = argv[argv.index("--port") + 1]
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _all_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _router_config(tmp_path: Path, model: Path, *, listen: int, port: int | None = None, names: int = 1) -> Path:
    import yaml

    config = {
        "listen": f"127.0.0.1:{listen}",
        "env": {"ELASTIKV_BACKEND": "host", "ELASTIKV_HOST_MEMORY": "512MiB",
                "ELASTIKV_LEDGER_DIR": str(tmp_path / "ledger")},
        "models": [{"name": f"m{i}", "model": str(model), "idle": "never", "args": ["--dtype", "float32"],
                    **({"port": port} if port is not None and i == 0 else {})} for i in range(names)],
    }  # fmt: skip
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_a_batching_thread_that_dies_at_start_ends_the_engine_with_the_reason(tmp_path: Path, model: Path) -> None:
    shim = tmp_path / "no-psutil"  # a machine without psutil: `import psutil` fails, find_spec finds nothing
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['psutil'] = None\n")
    env = _env(tmp_path, PYTHONPATH=os.pathsep.join([str(shim), *sys.path]))
    t0 = time.monotonic()
    r = subprocess.run([*CLI, "engine", "--model", str(model), "--port", str(ports.free_port()), "--dtype", "float32"],
                       env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    seconds = time.monotonic() - t0
    assert r.returncode == 5, r.stderr[-3000:]
    assert "batching thread died at start" in r.stderr and "pip install psutil" in r.stderr, r.stderr[-3000:]
    assert "serving" not in r.stderr  # never claimed to serve
    assert seconds < 60, seconds  # seconds of model loading, not a start timeout


def test_the_engine_refuses_a_port_in_use_naming_the_process(
    tmp_path: Path, model: Path, foreign_server: tuple[int, subprocess.Popen[bytes]]
) -> None:
    port, server = foreign_server
    r = subprocess.run([*CLI, "engine", "--model", str(model), "--port", str(port)], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2
    assert f"port {port}" in r.stderr and f"pid {server.pid}" in r.stderr and "http.server" in r.stderr, r.stderr


def test_a_foreign_server_on_an_engine_port_is_refused_before_anything_starts(
    tmp_path: Path, model: Path, foreign_server: tuple[int, subprocess.Popen[bytes]]
) -> None:
    port, server = foreign_server
    config = _router_config(tmp_path, model, listen=ports.free_port(), port=port, names=2)
    proc = children.popen([*CLI, "serve", str(config), "--log-dir", str(tmp_path / "logs")], env=_env(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "'m0'" in out and f"port {port}" in out and f"pid {server.pid}" in out and "http.server" in out, out
    assert not list((tmp_path / "logs").glob("*.log"))  # no engine was started


def test_the_routers_port_in_use_fails_before_any_engine_starts(
    tmp_path: Path, model: Path, foreign_server: tuple[int, subprocess.Popen[bytes]]
) -> None:
    port, server = foreign_server
    config = _router_config(tmp_path, model, listen=port)
    t0 = time.monotonic()
    r = subprocess.run([*CLI, "serve", str(config), "--log-dir", str(tmp_path / "logs")], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and time.monotonic() - t0 < 30
    assert f"port {port}" in r.stderr and f"pid {server.pid}" in r.stderr, r.stderr
    assert "serving" not in r.stderr and not list((tmp_path / "logs").glob("*.log"))


def test_ctrl_c_while_engines_start_stops_them_at_once(tmp_path: Path, model: Path) -> None:
    config = _router_config(tmp_path, model, listen=ports.free_port(), names=2)
    proc = children.popen([*CLI, "serve", str(config), "--log-dir", str(tmp_path / "logs")], env=_env(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        engines = _engines_of(proc.pid, 2, timeout_s=60)  # started, still loading: not yet answering
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 20, out
        assert _all_gone(engines, 10) == [], out
        assert "serving" not in out, out
    finally:
        children.stop_group(proc)


def test_a_killed_router_takes_its_engines_with_it(tmp_path: Path, model: Path) -> None:
    """SIGKILL: the router cannot stop anything; the kernel signals its engines (PR_SET_PDEATHSIG) and they end."""
    config = _router_config(tmp_path, model, listen=ports.free_port())
    proc = children.popen([*CLI, "serve", str(config), "--log-dir", str(tmp_path / "logs")], env=_env(tmp_path),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        (engine,) = _engines_of(proc.pid, 1, timeout_s=60)
        deadline = time.monotonic() + 120
        while not _answers(engine):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        proc.kill()
        proc.wait()
        assert _all_gone([engine], 30) == []
    finally:
        children.stop_group(proc)


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_the_demo_ended_by_a_signal_leaves_no_engine(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM: the demo stops its engines in order and removes its work directory (SIGKILL: the test above)."""
    proc = children.popen([*CLI, "demo", "--duration", "60", "--out", str(tmp_path / "out")], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        engines = _engines_of(proc.pid, 3, timeout_s=180)
        deadline = time.monotonic() + 120  # until they serve: the demo is then replaying its trace
        while not all(_answers(e) for e in engines):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(3.0)  # the router takes requests a moment after its engines do
        argv = [a for e in engines for a in psutil.Process(e).cmdline()]
        work = {Path(a).parent for a in argv if a.startswith("/") and a.endswith("/llama-a")}  # the demo's work dir
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert _all_gone(engines, 30) == [], out
        if sig == signal.SIGTERM:
            assert proc.returncode == 130 and "stopped by a signal; every engine has been stopped" in out, out
            assert work and not any(w.exists() for w in work), work  # the demo's models, logs and ledger: gone
    finally:
        children.stop_group(proc)


def test_a_child_dies_with_its_parent_however_the_parent_dies(tmp_path: Path) -> None:
    """A parent started with start_new_session starts a child with children.popen, then is SIGKILLed."""
    script = (
        "import subprocess, sys, time\n"
        "from elastikv import children\n"
        "c = children.popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert psutil.pid_exists(child)
    parent.kill()
    parent.wait()
    assert _all_gone([child], 10) == []
    assert children.wait_group_gone(child, 5)
