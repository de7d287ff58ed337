"""The embedded engine's OpenAI server, driven by the OpenAI Python client, on the CPU with a made model."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from elastikv import children

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="needs the OpenAI client: pip install openai")
pytest.importorskip("uvicorn", reason="needs uvicorn: pip install -e '.[serve]'")

pytestmark = pytest.mark.skipif(
    not transformers.__version__.startswith("5.17."),
    reason=f"the engine supports transformers 5.17; this is {transformers.__version__}",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    import uvicorn

    from elastikv.bench.models import make_model
    from elastikv.config import Settings
    from elastikv.serving.engine import Engine
    from elastikv.serving.server import create_app

    tmp = tmp_path_factory.mktemp("served")
    path = make_model(tmp / "tiny", size="tiny")
    settings = Settings.from_env(
        {"ELASTIKV_HOST_MEMORY": "1GiB", "ELASTIKV_RESERVE": "2MiB", "ELASTIKV_LEDGER_DIR": str(tmp / "ledger")}
    )
    engine = Engine(path, name="tiny", settings=settings, device="cpu", dtype="float32")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    yield client, engine
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()


PROMPT = "Return the number of items in a container."


def test_completions_streamed_and_not_agree(served: tuple[Any, Any]) -> None:
    client, _ = served
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16)
    assert whole.usage.completion_tokens == 16 and whole.choices[0].finish_reason == "length"
    parts = [
        c.choices[0].text for c in client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, stream=True)
    ]
    assert "".join(parts) == whole.choices[0].text
    assert len(parts) >= 2


def test_chat_streamed_and_not_agree(served: tuple[Any, Any]) -> None:
    client, _ = served
    messages = [{"role": "user", "content": "Say something about lists."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole.choices[0].message.content
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_sleep_gives_memory_back_and_wake_answers_the_same(served: tuple[Any, Any]) -> None:
    import httpx

    client, engine = served
    before = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16)
    base = str(client.base_url).removesuffix("/v1/")
    held = engine.instance.allocator.stats().mapped_bytes
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    assert held > 0
    r = httpx.post(f"{base}/sleep", params={"level": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["sleeping"] == 2
    assert engine.instance is None  # the KV instance is closed: every page unmapped, its ledger row gone
    assert sum(p.numel() * p.element_size() for p in engine.model.parameters()) == 0
    assert httpx.get(f"{base}/is_sleeping").json() == {"is_sleeping": True, "level": 2}
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
    assert refused.value.status_code == 409 and "wake_up" in str(refused.value)
    r = httpx.post(f"{base}/wake_up", timeout=60)
    assert r.status_code == 200
    after = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16)
    assert after.choices[0].text == before.choices[0].text
    print(
        f"\nsleep level 2 released {held / 2**20:.0f} MiB of KV and {weights / 2**20:.1f} MiB of weights; "
        f"wake took {r.json()['seconds']:.3f} s"
    )


def test_metrics_and_bad_requests(served: tuple[Any, Any]) -> None:
    import httpx

    client, _ = served
    base = str(client.base_url).removesuffix("/v1/")
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
    text = httpx.get(f"{base}/metrics").text
    assert 'elastikv_kv_mapped_bytes{model="tiny"}' in text and "elastikv_time_to_first_token_seconds_count" in text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0)


def test_a_client_that_goes_away_mid_stream_stops_its_generation(served: tuple[Any, Any]) -> None:
    """Issue 20, item 6: a streamed request whose client disconnects after the first tokens is cancelled in the
    engine (its KV freed at once), not generated to max_tokens; 20 times over, and the engine still answers."""
    import httpx

    client, engine = served
    base = str(client.base_url).removesuffix("/v1/")
    before = engine.stats.cancelled
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4000, "stream": True, "ignore_eos": True}
    for _ in range(20):
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # the first tokens came: hang up
    inst = engine.instance
    deadline = time.monotonic() + 30
    while engine.stats.running or engine.stats.waiting or inst.allocator.stats().blocks_in_use:
        assert time.monotonic() < deadline, (engine.stats, inst.allocator.stats())
        time.sleep(0.05)
    assert engine.stats.cancelled - before == 20
    answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
    assert answer.choices[0].text is not None
    assert len(engine.stats.ttft) <= engine.stats.ttft.maxlen  # samples bounded whether /metrics reads them or not


def test_hostile_requests_get_a_400_naming_the_problem_and_never_harm_the_engine(served: tuple[Any, Any]) -> None:
    """Issue 20, item 11 (the engine's edge): malformed or impossible requests are refused with a 400 that names the
    field and the limit, before they reach the batching thread; the engine answers normally afterwards."""
    import httpx

    client, engine = served
    base = str(client.base_url).removesuffix("/v1/")
    url = f"{base}/v1/completions"
    cases: list[tuple[Any, str]] = [
        ({"prompt": [], "max_tokens": 4}, "prompt is empty"),
        ({"prompt": [5, -1, 7], "max_tokens": 4}, "prompt token 1 is -1"),
        ({"prompt": [5, engine.vocab_size], "max_tokens": 4}, f"[0, {engine.vocab_size})"),
        ({"prompt": [5, True], "max_tokens": 4}, "a string or a list of token ids"),
        ({"prompt": [7] * 8300, "max_tokens": 4}, "maximum length of 8192"),
        ({"prompt": [7] * 10, "max_tokens": 9000}, "maximum length"),
        ({"prompt": "hi", "max_tokens": "4"}, "max_tokens must be a positive whole number"),
        ({"prompt": {"a": 1}, "max_tokens": 4}, "a string or a list of token ids"),
    ]
    with httpx.Client(timeout=30) as http:
        for body, message in cases:
            for stream in (False, True):
                r = http.post(url, json={"model": "tiny", "stream": stream, **body})
                assert r.status_code == 400 and message in r.json()["error"]["message"], (body, r.text[:300])
        raw_bodies = [b"\xff\xfe not utf-8", b'{"prompt": "\\ud800", "max_tokens": 2', b"[" * 200_000 + b"]" * 200_000]
        for raw in raw_bodies:
            r = http.post(url, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400, (raw[:40], r.status_code, r.text[:200])
        chat = http.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": 7}]})
        assert chat.status_code == 400 and "messages[0]" in chat.json()["error"]["message"], chat.text
    assert engine.stats.running == 0 and engine.stats.waiting == 0
    answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
    assert answer.choices[0].text is not None and engine.died is None


# The tests above share the module's engine; the ones below make engines of their own. One process holds one
# embedded engine's cache at a time (a new one closes the old), so tests of `served` must stay above this line.


def test_elastikv_engine_command_serves_and_shows_in_status(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    import httpx

    from elastikv.bench.models import make_model

    path = make_model(tmp_path / "tiny", size="tiny")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIKV")}
    env.update(ELASTIKV_HOST_MEMORY="1GiB", ELASTIKV_RESERVE="2MiB", ELASTIKV_LEDGER_DIR=str(tmp_path / "ledger"))
    cmd = [
        sys.executable,
        "-m",
        "elastikv.cli",
        "engine",
        "--model",
        str(path),
        "--port",
        str(port),
        "--limit",
        "64MiB",
    ]
    cmd += ["--device", "cpu", "--dtype", "float32"]
    proc = children.popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 8}
        ).json()
        assert reply["usage"]["completion_tokens"] == 8
        status = subprocess.run(
            [sys.executable, "-m", "elastikv.cli", "status", "--json"], env=env, capture_output=True, text=True
        )
        rows = [r for d in json.loads(status.stdout) for r in d["instances"]]
        assert [(r["name"], r["engine"], r["limit_bytes"]) for r in rows] == [("tiny", "transformers", 64 * 2**20)]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert "elastikv active: engine=transformers name=tiny" in out, out[-3000:]


def test_a_flood_over_the_limit_all_completes_through_the_server(tmp_path: Path) -> None:
    import asyncio

    import httpx
    import uvicorn

    from elastikv.bench.models import make_model
    from elastikv.config import Settings
    from elastikv.serving.engine import Engine
    from elastikv.serving.server import create_app

    path = make_model(tmp_path / "tiny", size="tiny")
    settings = Settings.from_env(
        {
            "ELASTIKV_HOST_MEMORY": "1GiB",
            "ELASTIKV_RESERVE": "2MiB",
            "ELASTIKV_LIMIT": "6MiB",  # 24 requests x ~480 tokens need ~11 MiB of KV
            "ELASTIKV_PREFIX_CACHE": "0",
            "ELASTIKV_LEDGER_DIR": str(tmp_path / "ledger"),
        }
    )
    engine = Engine(path, name="tiny", settings=settings, device="cpu", dtype="float32")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    prompt = " ".join(["Return a new list containing all items from the iterable in ascending order."] * 30)

    async def flood() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 32}
            replies = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(24)))
            return [r.json() for r in replies]

    try:
        replies = asyncio.run(flood())
        stats = engine.instance.allocator.stats()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.close()
    assert all(r["usage"]["prompt_tokens"] >= 400 for r in replies)  # so the flood needs ~2x the limit
    assert [r["usage"]["completion_tokens"] for r in replies] == [32] * 24
    assert len({r["choices"][0]["text"] for r in replies}) == 1  # same prompt, greedy: the same answer
    assert stats.pages_mapped_total * stats.page_bytes <= 6 * 2**20  # never more than the limit


def test_a_wake_the_budget_cannot_take_is_a_503_naming_it_and_the_engine_stays_asleep(tmp_path: Path) -> None:
    """Another process books the device budget while the engine sleeps: POST /wake_up answers 503 with the
    ledger's reason (what the router takes as 'not now': the model stays asleep, the next request tries again),
    the engine is still asleep and books no weights; once the memory comes free, the same wake goes ahead."""
    import httpx
    import torch
    import uvicorn

    from elastikv.bench.models import make_model
    from elastikv.config import Settings
    from elastikv.instance import open_holding
    from elastikv.ledger import summaries
    from elastikv.serving.engine import Engine
    from elastikv.serving.server import create_app

    settings = Settings.from_env({"ELASTIKV_HOST_MEMORY": "1GiB", "ELASTIKV_RESERVE": "2MiB",
                                  "ELASTIKV_LEDGER_DIR": str(tmp_path / "ledger"), "ELASTIKV_BOOK_WEIGHTS": "on",
                                  "ELASTIKV_DEVICE_BUDGET": "24MiB"})  # fmt: skip
    engine = Engine(make_model(tmp_path / "tiny", size="tiny"), name="tiny", settings=settings, device="cpu",
                    dtype="float32")  # fmt: skip
    hog = open_holding(torch.device("cpu"), settings, name="hog")
    assert hog is not None
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"

    def weights_booked() -> int:
        (summary,) = summaries(tmp_path / "ledger")
        return sum(h.weights_bytes for h in summary.holdings if h.name == "tiny")

    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert weights_booked() > 0
        assert httpx.post(f"{base}/sleep", params={"level": 2}, timeout=60).json()["sleeping"] == 2
        hog.book(weights=22 * 1024**2)  # what is left of the budget cannot take the tiny model's weights
        refused = httpx.post(f"{base}/wake_up", timeout=60)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["type"] == "wake_refused" and "budget" in refused.text, refused.text
        print("\nrefused:", refused.json()["error"]["message"])
        assert httpx.get(f"{base}/is_sleeping").json()["is_sleeping"] is True and weights_booked() == 0
        hog.drop()
        assert httpx.post(f"{base}/wake_up", timeout=60).status_code == 200 and weights_booked() > 0
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        hog.close()
        engine.close()
