"""vLLM's OpenAI server on the GPU with elastikv, as users run it (``vllm serve``, bf16, torch.compile, CUDA
graphs, prefix caching), driven with the OpenAI client: answers equal to plain vLLM's, memory that follows load
(the ledger and ``torch.cuda.mem_get_info``), ``elastikv limit`` obeyed while it runs, vLLM's own sleep and wake,
two servers sharing one budget (one SIGKILLed), and ``elastikv serve`` with two vLLM models sleeping and waking.
Runs where a CUDA vLLM is importable (``scripts/gpu-check --vllm``); skipped elsewhere, saying so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from tests.vllm_harness import HAVE_VLLM, engine_env, prompts, wait_healthy

from elastikv import children

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_VLLM, reason="needs a CUDA build of vLLM (the GPU machine: scripts/gpu-check --vllm)"),
]

MiB, GiB = 1024**2, 1024**3
RESERVE = 64 * MiB
# What users pass: bf16, torch.compile + CUDA graphs (no --enforce-eager), prefix caching. The utilisation only
# sizes plain vLLM's static cache (elastikv maps on demand), but vLLM checks at start that this share is free.
SERVE_ARGS = ["--dtype", "bfloat16", "--max-model-len", "4096", "--block-size", "16", "--enable-prefix-caching",
              "--skip-tokenizer-init", "--gpu-memory-utilization", "0.25", "--seed", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from elastikv.bench.models import make_model_once

    path = Path(os.environ.get("EKV_MODEL_CACHE", tmp_path_factory.mktemp("models"))) / "llama-1b"
    make_model_once(path, size="1b")
    return path


def _env(tmp: Path, *, elastic: bool, **extra: str) -> dict[str, str]:
    env = engine_env(tmp, elastic=elastic, multiprocess=True, VLLM_USE_FLASHINFER_SAMPLER="0", HF_HUB_OFFLINE="1",
                     VLLM_SERVER_DEV_MODE="1", ELASTIKV_RESERVE=str(RESERVE), **extra)  # fmt: skip
    env.pop("ELASTIKV_HOST_MEMORY", None)
    return env


def _free_port() -> int:
    from elastikv.router.router import free_port

    return free_port()


class Server:
    """``vllm serve MODEL`` (vLLM's CLI, as `python -m vllm.entrypoints.cli.main`) in its own process group."""

    def __init__(self, model: Path, env: dict[str, str], log: Path, *extra: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model), "--port", str(self.port),
               "--served-model-name", "m", *SERVE_ARGS, *extra]  # fmt: skip
        with log.open("w") as out:
            self.proc = children.popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 420) -> None:
        wait_healthy(self.url, self.proc, self.log, timeout)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def post(self, path: str) -> float:
        t0 = time.perf_counter()
        req = urllib.request.Request(f"{self.url}{path}", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=300) as r:
            assert r.status == 200, r.status
        return time.perf_counter() - t0

    def complete(self, prompt: list[int], max_tokens: int = 32) -> list[int]:
        import openai

        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", timeout=600)
        out = client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                        extra_body={"return_token_ids": True, "ignore_eos": True})  # fmt: skip
        choice = out.choices[0]
        return list(getattr(choice, "token_ids", None) or (choice.model_extra or {})["token_ids"])

    def burst(self, batch: list[list[int]], max_tokens: int) -> list[list[int]]:
        with ThreadPoolExecutor(len(batch)) as pool:
            return list(pool.map(lambda p: self.complete(p, max_tokens), batch))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


class Watch:
    """Samples the ledger (mapped bytes per instance) and the device's free memory every 20 ms."""

    def __init__(self, ledger: Path) -> None:
        self.ledger = ledger
        self.samples: list[tuple[float, dict[str, int], int]] = []  # (time, {name: mapped}, device free bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def mapped(self) -> dict[str, int] | None:
        """Mapped bytes per instance, or None when the ledger could not be read this time (busy): never a
        made-up zero, which would read as "under the limit"."""
        from elastikv.ledger import summaries

        try:
            return {r.name: r.mapped_bytes for d in summaries(self.ledger) for r in d.instances}
        except Exception:
            return None

    def now(self, name: str) -> int:
        """``name``'s mapped bytes now (read again while the ledger is busy)."""
        while (mapped := self.mapped()) is None:
            time.sleep(0.01)
        return mapped.get(name, 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()  # a sample read after t shows the state at t or later
            mapped = self.mapped()
            if mapped is not None:
                self.samples.append((t, mapped, torch.cuda.mem_get_info()[0]))
            time.sleep(0.02)  # each sample is a ledger transaction: leave the engines room to book

    def peak(self, name: str | None = None, since: float = 0.0, until: float = float("inf")) -> int:
        values = [
            sum(m.values()) if name is None else m.get(name, 0) for t, m, _ in self.samples if since <= t <= until
        ]
        return max(values, default=0)

    def min_free(self, since: float = 0.0) -> int:
        return min((f for t, _, f in self.samples if t >= since), default=0)

    def wait_until(self, name: str, at_most: int, timeout: float) -> float:
        """Seconds until ``name`` maps at most ``at_most`` bytes; fails after ``timeout``."""
        t0 = time.monotonic()
        while (mapped := self.mapped()) is None or mapped.get(name, 0) > at_most:
            assert time.monotonic() - t0 < timeout, f"{name} still maps {(mapped or {}).get(name, -1) / MiB:.0f} MiB"
            time.sleep(0.01)
        return time.monotonic() - t0

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _mixed(n: int, seed: int) -> list[list[int]]:
    """``n`` prompts of 40 to 2,300 tokens, the even ones sharing a 256-token head (prefix-cache hits)."""
    head = prompts(1, 256, seed=seed)[0]
    out = []
    for i in range(n):
        body = prompts(1, [40, 300, 900, 2300][i % 4] + i, seed=seed * 1000 + i)[0]
        out.append(head + body[256:] if i % 2 == 0 and len(body) > 256 else body)
    return out


def _differ(a: list[list[int]], b: list[list[int]]) -> list[int]:
    """Indices of the prompts whose tokens differ."""
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


@pytest.fixture
def cuda() -> Iterator[None]:
    torch.cuda.init()
    yield


def test_vllm_serve_answers_like_plain_vllm_follows_load_obeys_a_lowered_limit_and_sleeps(
    model: Path, tmp_path: Path, cuda: None
) -> None:
    asked = _mixed(8, seed=3)  # sequential: each request alone in its batch, so both servers compute alike
    plain = Server(model, _env(tmp_path, elastic=False), tmp_path / "plain.log")
    try:
        plain.wait_ready()
        want = [plain.complete(p) for p in asked]
        want_again = [plain.complete(p) for p in asked]  # from cached prefixes
    finally:
        plain.stop()
    env = _env(tmp_path, elastic=True, ELASTIKV_NAME="served", ELASTIKV_PREFIX_CACHE="50%")
    server = Server(model, env, tmp_path / "elastic.log", "--enable-sleep-mode")
    watch = Watch(tmp_path / "ledger")
    try:
        server.wait_ready()
        got = [server.complete(p) for p in asked]
        got_again = [server.complete(p) for p in asked]
        assert got == want, [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
        assert got_again == want_again, [
            i for i, (a, b) in enumerate(zip(got_again, want_again, strict=True)) if a != b
        ]

        # A burst: mapped KV rises (ledger and device), and after it (cached prefixes reset) is back within 2 s.
        idle_free = torch.cuda.mem_get_info()[0]
        t0 = time.monotonic()
        server.burst(prompts(48, 1500, seed=11), max_tokens=64)
        t_end = time.monotonic()
        peak, min_free = watch.peak("served", since=t0), watch.min_free(since=t0)
        server.post("/reset_prefix_cache")
        back = watch.wait_until("served", at_most=4 * RESERVE, timeout=2.0)
        during = subprocess.run([sys.executable, "-m", "elastikv.cli", "status", "--json"], env=env,
                                capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        row = next(r for d in json.loads(during.stdout) for r in d["instances"] if r["name"] == "served")
        returned = torch.cuda.mem_get_info()[0] - min_free
        assert peak > 1.5 * GiB and idle_free - min_free > 1.5 * GiB, (peak, idle_free - min_free)  # of ~2.3 GiB
        # The device got the KV back (vLLM's own activation cache may keep a little more than before the burst).
        assert returned > 0.8 * (peak - 4 * RESERVE), (returned, peak)

        # `elastikv limit` lowered while a burst runs: mapped memory comes under it and every request completes.
        done: list[list[list[int]]] = []
        runner = threading.Thread(target=lambda: done.append(server.burst(prompts(48, 1500, seed=12), 128)))
        runner.start()
        while watch.now("served") < 1 * GiB and runner.is_alive():
            time.sleep(0.01)
        t_limit = time.monotonic()
        subprocess.run([sys.executable, "-m", "elastikv.cli", "limit", "served", "512MiB"], env=env, check=True,
                       capture_output=True, timeout=60)  # fmt: skip
        watch.wait_until("served", at_most=512 * MiB, timeout=30.0)
        t_under = time.monotonic()  # (the CLI itself takes a second or two: count from before it ran)
        under = t_under - t_limit
        runner.join(timeout=600)
        t_done = time.monotonic()
        assert done and len(done[0]) == 48 and all(len(t) == 128 for t in done[0])
        held_after = watch.peak("served", since=t_under, until=t_done)
        assert held_after <= 512 * MiB, held_after
        subprocess.run([sys.executable, "-m", "elastikv.cli", "limit", "served", "--reset"], env=env, check=True,
                       capture_output=True, timeout=60)  # fmt: skip

        # vLLM's sleep (level 1) and wake through its endpoints, elastikv active: memory freed, the same answer.
        awake_free = torch.cuda.mem_get_info()[0]
        slept = server.post("/sleep?level=1")
        time.sleep(0.5)  # the allocator unmaps its reserve on its next pass
        asleep_free = torch.cuda.mem_get_info()[0]
        asleep_mapped = watch.now("served")
        woke = server.post("/wake_up")
        t1 = time.perf_counter()
        after_wake = server.complete(asked[0])
        first_answer = time.perf_counter() - t1
    finally:
        watch.close()
        server.stop()
    assert after_wake == want[0] or after_wake == want_again[0]
    assert asleep_free - awake_free > 1.5 * GiB  # the 1B's bf16 weights (2.0 GiB) went to host memory
    assert asleep_mapped <= 2 * 64 * MiB, asleep_mapped  # the null block's page (and nothing of the reserve)
    print(
        f"\nvllm serve (1B, bf16, CUDA graphs) with elastikv: {len(asked)} sequential answers x2 identical to plain "
        f"vLLM; burst of 48 x 1500 tokens mapped {peak / GiB:.2f} GiB (device free fell "
        f"{(idle_free - min_free) / GiB:.2f} GiB, rose {returned / GiB:.2f} GiB after), "
        f"back to <= {4 * RESERVE / MiB:.0f} MiB "
        f"{back:.2f} s after the reset (burst ended "
        f"{t_end - t0:.1f} s after it began; status row: {row['mapped_bytes'] / MiB:.0f} MiB mapped); limit 512 MiB "
        f"set mid-burst: under it in {under:.2f} s, all 48 completed; sleep level 1 "
        f"{slept:.2f} s freed {(asleep_free - awake_free) / GiB:.2f} GiB (KV mapped asleep {asleep_mapped / MiB:.0f} "
        f"MiB), wake {woke:.2f} s, first answer {first_answer:.2f} s later, same tokens"
    )


def test_two_vllm_servers_share_one_budget_and_a_killed_one_gives_its_kv_back(
    model: Path, tmp_path: Path, cuda: None
) -> None:
    budget = 3 * GiB  # one burst (~2.3 GiB of KV) fits beside an idle server, two at once do not
    env = _env(tmp_path, elastic=True, ELASTIKV_DEVICE_BUDGET="3GiB", ELASTIKV_PREFIX_CACHE="0")
    a = Server(model, {**env, "ELASTIKV_NAME": "a"}, tmp_path / "a.log")
    watch = Watch(tmp_path / "ledger")
    b: Server | None = None
    try:
        a.wait_ready()  # one at a time: two torch.compile runs would race on one compile cache
        b = Server(model, {**env, "ELASTIKV_NAME": "b"}, tmp_path / "b.log")
        b.wait_ready()
        t0 = time.monotonic()
        a.burst(prompts(48, 1500, seed=21), max_tokens=64)
        peak_a = watch.peak("a", since=t0)
        back_a = watch.wait_until("a", at_most=4 * RESERVE, timeout=2.0)
        t1 = time.monotonic()
        b.burst(prompts(48, 1500, seed=22), max_tokens=64)
        peak_b = watch.peak("b", since=t1)
        assert peak_a + peak_b > budget, (peak_a, peak_b)  # B used what A gave back

        # Both at once want more than the budget: requests wait for memory, and all complete.
        t2 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            both = list(pool.map(lambda s: s[0].burst(prompts(48, 1500, seed=s[1]), 128), [(a, 23), (b, 24)]))
        t3 = time.monotonic()
        assert [len(r) for r in both] == [48, 48] and all(len(t) == 128 for r in both for t in r)
        together = watch.peak(since=t2, until=t3)
        assert budget - 512 * MiB < together <= budget, together  # the budget was full, and never overrun

        # SIGKILL A: the next ledger access returns its KV; B keeps serving.
        free_before = torch.cuda.mem_get_info()[0]
        a.kill()  # the server's whole process group; its engine core (the ledger row's pid) exits with it
        t_kill = time.monotonic()
        while True:  # the next ledger access after the engine core has exited (its GPU context torn down) reaps it
            status = subprocess.run([sys.executable, "-m", "elastikv.cli", "status", "--json"], env=env,
                                    capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
            names = [r["name"] for d in json.loads(status.stdout) for r in d["instances"]]
            if names == ["b"] or time.monotonic() - t_kill > 15:
                break
            time.sleep(0.2)
        reaped = time.monotonic() - t_kill
        t4 = time.monotonic()
        last = b.burst(prompts(48, 1500, seed=25), max_tokens=64)
        peak_b_alone = watch.peak("b", since=t4)
        free_after = torch.cuda.mem_get_info()[0]
    finally:
        watch.close()
        a.stop()
        if b is not None:
            b.stop()
    assert names == ["b"], names
    assert len(last) == 48
    assert watch.peak(since=t0) <= budget
    print(
        f"\ntwo vllm servers (1B, bf16) on one 3 GiB budget: A alone peaked at {peak_a / GiB:.2f} GiB and was back "
        f"to <= {4 * RESERVE / MiB:.0f} MiB in {back_a:.2f} s; B then peaked at {peak_b / GiB:.2f} GiB; both at once "
        f"held {together / GiB:.2f} GiB at most and all 96 requests completed ({t3 - t2:.1f} s); A SIGKILLed: status "
        f"lists {names} {reaped:.1f} s later, device free "
        f"{free_before / GiB:.1f} -> {free_after / GiB:.1f} GiB, B served 48 more "
        f"(peak {peak_b_alone / GiB:.2f} GiB)"
    )


def _admin(url: str, path: str = "/admin/status") -> Any:
    req = urllib.request.Request(f"{url}{path}", headers={"Authorization": "Bearer t"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_elastikv_serve_runs_two_vllm_models_that_sleep_when_idle_and_wake_on_demand(
    model: Path, tmp_path: Path, cuda: None
) -> None:
    import yaml

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    spec = {"engine": "vllm", "model": str(model), "idle": "4s", "sleep_level": 1, "args": SERVE_ARGS}
    # m2 sleeps at level 2: vLLM discards its weights, and the router reloads them after the wake (launch.reload)
    config = {"listen": f"127.0.0.1:{port}", "admin_token": "t",
              "models": [{"name": "m1", **spec}, {"name": "m2", **spec, "sleep_level": 2}]}  # fmt: skip
    (tmp_path / "router.yaml").write_text(yaml.safe_dump(config))
    env = _env(tmp_path, elastic=False)
    cmd = [sys.executable, "-m", "elastikv.cli", "serve", str(tmp_path / "router.yaml"), "--log-dir", str(tmp_path)]
    with (tmp_path / "router.log").open("w") as out:
        router = children.popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    asked = _mixed(4, seed=5)

    def complete(name: str, prompt: list[int]) -> list[int]:
        body = {"model": name, "prompt": prompt, "max_tokens": 32, "temperature": 0, "return_token_ids": True,
                "ignore_eos": True}  # fmt: skip
        req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=600) as r:
            return list(json.loads(r.read())["choices"][0]["token_ids"])

    try:
        wait_healthy(url, router, tmp_path / "router.log", timeout=600)
        first = {name: [complete(name, p) for p in asked] for name in ("m1", "m2")}
        awake_free = torch.cuda.mem_get_info()[0]
        deadline = time.monotonic() + 60
        while {m["state"] for m in _admin(url)["models"]} != {"asleep"}:
            assert time.monotonic() < deadline, _admin(url)
            time.sleep(0.5)
        time.sleep(0.5)
        asleep_free = torch.cuda.mem_get_info()[0]
        status = subprocess.run([sys.executable, "-m", "elastikv.cli", "status", "--json"], env=env,
                                capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        rows = {r["name"]: r["mapped_bytes"] for d in json.loads(status.stdout) for r in d["instances"]}
        t0 = time.perf_counter()
        woken = complete("m1", asked[0])  # wakes m1 (m2 stays asleep)
        wake_to_answer = time.perf_counter() - t0
        second = {name: [complete(name, p) for p in asked] for name in ("m1", "m2")}
        models = {m["model"]: m for m in _admin(url)["models"]}
    finally:
        router.terminate()
        router.wait(timeout=120)
    assert first["m1"] == first["m2"], "two servers of one model answer alike"
    assert second == first and woken == first["m1"][0], "the same answers after sleep (levels 1 and 2) and wake"
    assert all(m["wakes"] >= 1 for m in models.values()), models
    assert asleep_free - awake_free > 3 * GiB, asleep_free - awake_free  # both 1B models' weights (2 x 2.0 GiB)
    assert rows and all(v <= 2 * 64 * MiB for v in rows.values()), rows  # asleep: no KV but the null block's page
    print(
        f"\nelastikv serve, two vLLM models (1B, bf16, sleep levels 1 and 2): answers equal before and after sleep; "
        f"both asleep freed {(asleep_free - awake_free) / GiB:.2f} GiB (KV mapped asleep: "
        f"{ {k: round(v / MiB) for k, v in rows.items()} } MiB); wake to first answer {wake_to_answer:.2f} s"
    )
