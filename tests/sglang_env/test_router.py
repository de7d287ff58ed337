"""`engine: sglang` behind `elastikv serve`: SGLang's unchanged OpenAI server (``python -m sglang.launch_server``)
started by the router with elastikv active, put to sleep when idle (its KV pages all go back to the device) and
woken by the next request, which is answered exactly as before the sleep."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from elastikv import children

MIB = 1024**2
PAGE = 8 * MIB  # tiny model, per-layer layout: 2 layers x (K, V) x one 2 MiB chunk
PROMPTS = ["The quick brown fox", "Return the list of all the values in the mapping"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from elastikv.bench.models import make_model

    return make_model(tmp_path_factory.mktemp("model") / "tiny", size="tiny")  # with a tokenizer: text prompts


def test_the_router_serves_sglang_sleeps_it_when_idle_and_wakes_it_on_demand(model: Path, tmp_path: Path) -> None:
    import yaml

    from elastikv.router.router import free_port

    port = free_port()
    args = ["--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32", "--page-size", "16"]
    args += ["--max-running-requests", "8", "--log-level", "warning"]
    spec = {"name": "tiny-sglang", "engine": "sglang", "model": str(model), "idle": "3s", "sleep_level": 1}
    config = {"listen": f"127.0.0.1:{port}", "admin_token": "t", "models": [{**spec, "args": args}]}
    (tmp_path / "router.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIKV")}
    env.update(ELASTIKV_LEDGER_DIR=str(tmp_path / "ledger"), ELASTIKV_HOST_MEMORY="512MiB", ELASTIKV_RESERVE="0",
               ELASTIKV_PREFIX_CACHE="8MiB")  # fmt: skip
    cmd = [sys.executable, "-m", "elastikv.cli", "serve", str(tmp_path / "router.yaml"), "--log-dir", str(tmp_path)]
    url = f"http://127.0.0.1:{port}"
    engine_log = tmp_path / "tiny-sglang.log"
    with (tmp_path / "router.log").open("w") as out:
        router = children.popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, router, tmp_path / "router.log")
        first = [_complete(url, p) for p in PROMPTS]  # the first request waits for SGLang to start
        status = _admin_status(url)
        assert status["state"] == "awake" and status["engine"] == "sglang", status
        awake = _mapped(tmp_path)
        assert awake >= PAGE, awake  # the null page at least: SGLang's pool is ours
        deadline = time.monotonic() + 90
        while _admin_status(url)["state"] != "asleep":  # idle 3 s: /release_memory_occupation
            assert time.monotonic() < deadline, (_admin_status(url), engine_log.read_text()[-3000:])
            time.sleep(0.5)
        asleep = _mapped(tmp_path)
        assert asleep == PAGE, asleep  # every KV page back to the device but the always-mapped null page
        second = [_complete(url, p) for p in PROMPTS]  # wakes it (/resume_memory_occupation), then answers
        status = _admin_status(url)
        assert status["wakes"] == 1 and status["sleeps"] == 1 and status["restarts"] == 0, status
    finally:
        router.terminate()
        router.wait(timeout=120)
    assert all(text for text in first), first
    assert second == first  # greedy answers unchanged by the sleep
    log = engine_log.read_text()
    assert log.count("SGLang 0.5.23 patched in process") == 3, log[-4000:]  # server, scheduler, detokenizer
    assert "elastikv active: engine=sglang 0.5.23" in log


def _wait_for_port(port: int, router: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            with contextlib.closing(socket.create_connection(("127.0.0.1", port), timeout=1)):
                return
        except OSError:
            assert router.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)


def _complete(url: str, prompt: str) -> str:
    body = {"model": "tiny-sglang", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    headers = {"content-type": "application/json"}
    req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=600) as resp:
        return str(json.loads(resp.read())["choices"][0]["text"])


def _admin_status(url: str) -> dict[str, Any]:
    req = urllib.request.Request(f"{url}/admin/status", headers={"Authorization": "Bearer t"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return dict(json.loads(r.read())["models"][0])


def _mapped(tmp: Path) -> int:
    from elastikv.ledger import summaries

    return sum(s.mapped_bytes for s in summaries(tmp / "ledger"))
