"""The demo's and benchmarks' workload: an intermittent trace, its file form, and the figures over outcomes."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from elastikv.bench.workload import (
    Arrival,
    Outcome,
    intermittent,
    load_trace,
    peak_rate,
    percentile,
    prompt_ids,
    save_trace,
    summary,
)
from elastikv.errors import ConfigError

MODELS = ("a", "b", "c")


def test_each_model_peaks_in_turn_and_is_nearly_idle_otherwise() -> None:
    trace = intermittent(MODELS, duration=30, base_rate=0.1, peak_rate=50, peak_width=2, prompt_tokens=8,
                         output_tokens=4, seed=3)  # fmt: skip
    assert trace == sorted(trace, key=lambda a: a.at) and all(0 <= a.at < 30 for a in trace)
    for i, m in enumerate(MODELS):
        times = [a.at for a in trace if a.model == m]
        centre = (i + 0.5) * 10
        near = [t for t in times if abs(t - centre) < 1]
        assert len(near) >= 30, (m, len(near))  # the peak: ~50 expected
        assert len(times) - len(near) <= 10  # the rest of 30 s at 0.1/s: ~3 expected
        assert abs(statistics.median(near) - centre) < 0.3
    again = intermittent(MODELS, duration=30, base_rate=0.1, peak_rate=50, peak_width=2, prompt_tokens=8,
                         output_tokens=4, seed=3)  # fmt: skip
    assert again == trace  # a seed gives one trace


def test_a_trace_survives_its_file_and_a_bad_line_names_itself(tmp_path: Path) -> None:
    trace = intermittent(MODELS, duration=5, base_rate=1, peak_rate=10, peak_width=1, prompt_tokens=8,
                         output_tokens=4, seed=1)  # fmt: skip
    save_trace(trace, tmp_path / "t.jsonl")
    assert load_trace(tmp_path / "t.jsonl") == trace
    (tmp_path / "bad.jsonl").write_text('{"at": 1, "model": "a", "prompt_tokens": 8, "output_tokens": 4}\n{"at": 2}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not a trace line"):
        load_trace(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="positive"):
        intermittent(MODELS, duration=0, base_rate=1, peak_rate=1, peak_width=1, prompt_tokens=1, output_tokens=1)


def test_a_trace_is_labelled_with_the_busiest_window_of_any_one_model() -> None:
    def at(model: str, *times: float) -> list[Arrival]:
        return [Arrival(t, model, 8, 4) for t in times]

    # b: 3 requests within 2 s (0.5, 1.0, 2.4); a: 2 in any 2 s; c's burst is 4 arrivals but over more than 2 s
    trace = at("a", 0, 1.5, 4) + at("b", 0.5, 1.0, 2.4, 9) + at("c", 3, 4.1, 5.2, 6.3)
    assert peak_rate(trace, 2.0) == 1.5
    assert peak_rate(trace, 10.0) == 0.4  # b's 4 (or c's 4) in 10 s
    assert peak_rate([], 2.0) == 0
    made = intermittent(MODELS, duration=60, base_rate=0.02, peak_rate=0.5, peak_width=20, prompt_tokens=8,
                        output_tokens=4, seed=1)  # fmt: skip
    assert 0.25 <= peak_rate(made, 20.0) <= 1.0  # about the rate it was made with
    with pytest.raises(ValueError, match="positive"):
        peak_rate(trace, 0)


def test_prompts_are_fixed_per_request_and_never_repeat_across_traces() -> None:
    # Two traces replayed to the same engines (a sweep's rates): a prompt of the first reappearing in the second
    # would be a prefix-cache hit in one mode and a prefill in the other.
    first = intermittent(MODELS, duration=60, base_rate=0.1, peak_rate=1, peak_width=10, prompt_tokens=64,
                         output_tokens=4, seed=0)  # fmt: skip
    second = intermittent(MODELS, duration=60, base_rate=0.1, peak_rate=1, peak_width=10, prompt_tokens=64,
                          output_tokens=4, seed=1)  # fmt: skip
    prompts = [tuple(prompt_ids(a, i)) for trace in (first, second) for i, a in enumerate(trace)]
    assert len(set(prompts)) == len(prompts) == len(first) + len(second)
    assert len({p[:32] for p in prompts}) == len(prompts)  # no shared first block either
    assert [prompt_ids(a, i) for i, a in enumerate(first)] == [list(p) for p in prompts[: len(first)]]  # fixed
    assert all(len(p) == 64 and min(p) >= 10 for p in prompts)


def test_percentiles_and_the_summary() -> None:
    assert percentile([3, 1, 2], 50) == 2 and percentile([1, 2], 50) == 1.5 and percentile([5], 99) == 5
    assert math.isnan(percentile([], 50))
    a = Arrival(0.0, "a", 8, 4)
    outcomes = [Outcome(a, 200, ttft=0.1 * (i + 1), latency=0.1 * (i + 1) + 0.3, tokens=4) for i in range(10)]
    outcomes.append(Outcome(a, 503, error="restarting"))
    s = summary(outcomes)
    assert (s["requests"], s["completed"], s["failed"]) == (11, 10, 1)
    assert s["ttft_mean"] == pytest.approx(0.55) and s["ttft_p50"] == pytest.approx(0.55)
    assert s["tpot_mean"] == pytest.approx(0.1)  # 0.3 s over the 3 tokens after the first


def test_a_replay_that_stalls_ends_after_the_stall_bound_saying_so() -> None:
    """Engines that accept requests and never answer (seen on the H100: every request waiting for KV memory the
    budget never had) must not hold a benchmark for every request's timeout: with ``stall_s``, a run with requests
    in flight and no token from any of them for that long ends, each unanswered request failing with the reason.
    A server that is slow but streams (a token every 0.3 s) is not a stall."""
    import asyncio
    import socket
    import threading
    import time
    from collections.abc import AsyncIterator

    uvicorn = pytest.importorskip("uvicorn", reason="needs uvicorn: pip install -e '.[serve]'")
    fastapi = pytest.importorskip("fastapi", reason="needs FastAPI: pip install -e '.[serve]'")
    from fastapi.responses import StreamingResponse

    from elastikv.bench.workload import replay

    app = fastapi.FastAPI()

    @app.post("/v1/completions")
    async def completions(body: dict) -> StreamingResponse:  # type: ignore[type-arg]
        async def stream() -> AsyncIterator[str]:
            if body["model"] == "stuck":
                await asyncio.sleep(3600)  # accepted, never answered
            for _ in range(body["max_tokens"]):
                await asyncio.sleep(0.3)
                yield 'data: {"choices": [{"text": "x"}]}\n\n'
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    try:
        slow = asyncio.run(replay(url, [Arrival(0.0, "slow", 4, 8)], stall_s=1.0))
        assert slow[0].ok and slow[0].tokens == 8, slow[0]  # 2.4 s of streaming, never 1 s without a token
        trace = [Arrival(0.0, "stuck", 4, 4), Arrival(0.1, "stuck", 4, 4), Arrival(60.0, "stuck", 4, 4)]
        t0 = time.monotonic()
        stuck = asyncio.run(replay(url, trace, stall_s=1.0, timeout=600))
        assert time.monotonic() - t0 < 10
        assert [o.error for o in stuck] == [
            "stalled: no token from any of the 2 requests in flight for 1 s",
            "stalled: no token from any of the 2 requests in flight for 1 s",
            "not sent: stalled: no token from any of the 2 requests in flight for 1 s",
        ]
        assert not any(o.ok for o in stuck)
    finally:
        server.should_exit = True
