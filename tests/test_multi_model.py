"""`elastikv bench multi-model` on this CPU (its CPU preset, trimmed): both modes serve every request of every
rate through the router, the report's figures come from those requests, and a sweep split over several runs
merges back into the same figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[serve]'")
pytest.importorskip("matplotlib", reason="needs matplotlib: pip install -e '.[serve]'")
pytest.importorskip("pydantic", reason="needs pydantic: pip install -e '.[serve]'")

from elastikv.bench.merge import merge_and_save, merge_reports
from elastikv.bench.plan import BenchPlan, plan_from_options
from elastikv.bench.workload import intermittent, peak_rate, save_trace
from elastikv.config import Settings
from elastikv.errors import ConfigError

pytestmark = pytest.mark.slow


def test_the_benchmark_runs_both_modes_over_the_rates_and_a_split_sweep_merges(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "elastikv.cli", "bench", "multi-model", "--models", "2", "--rates", "2,30",
           "--duration", "5", "--peak-width", "1.5", "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "elastic / static TTFT mean" in r.stdout and "static queues from" in r.stdout
    (path,) = out.glob("multi-model-*.json")
    report = json.loads(path.read_text())
    assert [run["rate"] for run in report["runs"]] == [2.0, 30.0]
    budget = report["plan"]["kv_budget"]
    for run in report["runs"]:
        assert sum(len(a) for a in run["arrivals"].values()) == run["requests"] > 0
        for mode in ("static", "elastic"):
            m = run["modes"][mode]
            assert m["all"]["completed"] == m["all"]["requests"] == run["requests"], (run["rate"], mode, m["all"])
            assert 0 < m["peak_kv_bytes"] <= budget and m["output_tokens_per_s"] > 0
        assert run["modes"]["static"]["peak_kv_bytes"] == budget  # the split is held from start to end
        for name, figures in run["modes"]["elastic"]["engine_metrics"].items():  # each engine's own /metrics
            assert figures["kv_pages_mapped_total"] >= 1 and figures["kv_background_map_seconds"] >= 0, name
        assert sorted(run["modes"]["elastic"]["engine_metrics"]) == report["plan"]["models"]
        assert all(not math.isnan(v) for v in run["elastic_over_static"].values())
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 30 | elastic |" in path.with_suffix(".md").read_text()
    assert "Elastic engines' allocators in the driver" in path.with_suffix(".md").read_text()

    # The same sweep as two runs of one rate each, merged: the same runs and headline figures.
    halves = []
    for i, run in enumerate(report["runs"]):
        half = dict(report, runs=[run], plan=dict(report["plan"], rates=[run["rate"]]))
        halves.append(tmp_path / f"half{i}.json")
        halves[-1].write_text(json.dumps(half))
    merged = merge_and_save(halves[::-1], tmp_path / "merged")
    assert merged["runs"] == report["runs"]
    for key in ("static_queues_from_rate", "peak_p99_ttft_static_over_elastic", "light_mean_ttft_elastic_over_static"):
        assert merged[key] == report[key], key
    assert len(list((tmp_path / "merged").glob("multi-model-sweep-*.png"))) == 1
    # A rate run again (here: the same file under another name) is a repeat: its runs are pooled, not replaced.
    (tmp_path / "again.json").write_text(path.read_text())
    twice = merge_reports([path, tmp_path / "again.json"])
    assert len(twice["runs"]) == 4 and twice["light"]["runs"] == 2
    assert twice["light"]["requests"] == 2 * report["light"]["requests"]
    assert twice["light_mean_ttft_elastic_over_static"] == pytest.approx(report["light_mean_ttft_elastic_over_static"])
    with pytest.raises(ConfigError, match="given twice"):
        merge_reports([path, path])
    other = dict(report, plan=dict(report["plan"], prompt_tokens=1))
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="prompt_tokens"):
        merge_and_save([path, tmp_path / "other.json"], tmp_path / "merged")
    # Runs of more modes than others (a mode added later, as elastic-v2 was on the H100) merge: each rate shows the
    # modes it ran. The second half here carries its elastic figures again under a third mode's name.
    fast = json.loads(halves[1].read_text())
    fast["plan"]["modes"] = [*fast["plan"]["modes"], "elastic-v2"]
    fast["runs"][0]["modes"]["elastic-v2"] = fast["runs"][0]["modes"]["elastic"]
    halves[1].write_text(json.dumps(fast))
    mixed = merge_and_save(halves, tmp_path / "mixed")
    assert mixed["plan"]["modes"] == [*report["plan"]["modes"], "elastic-v2"]
    (md,) = (tmp_path / "mixed").glob("multi-model-sweep-*.md")
    assert "| 30 | elastic-v2 |" in md.read_text() and "| 2 | elastic-v2 |" not in md.read_text()
    assert mixed["peak_p99_ttft_static_over_elastic"] == report["peak_p99_ttft_static_over_elastic"]
    # A run whose elastic mode never ran (a partial report: stopped during elastic) cannot join.
    runs = [dict(run, modes={m: f for m, f in run["modes"].items() if m != "elastic"}) for run in report["runs"]]
    no_elastic = dict(report, runs=runs, partial={"why": "stopped", "done": ["static"], "left": ["elastic"]})
    (tmp_path / "no-elastic.json").write_text(json.dumps(no_elastic))
    with pytest.raises(ConfigError, match="without both static and elastic"):
        merge_reports([path, tmp_path / "no-elastic.json"])


def test_a_trace_replays_in_either_order_and_is_placed_by_its_peak_rate(tmp_path: Path) -> None:
    trace = intermittent(("model-a", "model-b"), duration=5, base_rate=0.2, peak_rate=3, peak_width=2,
                         prompt_tokens=128, output_tokens=8, seed=4)  # fmt: skip
    save_trace(trace, tmp_path / "trace.jsonl")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "elastikv.cli", "bench", "multi-model", "--models", "2", "--trace",
           str(tmp_path / "trace.jsonl"), "--elastic-first", "--modes", f"static,elastic,{VARIANT}", "--out",
           str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.index("elastic: done") < r.stdout.index("static: done")  # the order asked for
    (path,) = out.glob("multi-model-*.json")
    report = json.loads(path.read_text())
    assert report["plan"]["elastic_first"] is True
    (run,) = report["runs"]
    assert run["rate"] == peak_rate(trace, report["plan"]["peak_width"]) > 0
    for mode in ("static", "elastic", VARIANT):
        ttfts = run["modes"][mode]["ttft_by_request"]
        assert len(ttfts) == len(trace) and all(t is not None and t > 0 for t in ttfts), (mode, ttfts)
    light = report["light"]
    assert light["runs"] == 1 and light["requests"] == len(trace)
    lo, hi = light["ci95"]
    assert lo <= report["light_mean_ttft_elastic_over_static"] <= hi
    assert light["per_run"] == [run["elastic_over_static"]["ttft_mean"]]
    assert light["decode_ratio"] == pytest.approx(1 / run["elastic_over_static"]["tpot_mean"])
    # The variant (the elastic mode with a setting of its own) is a mode beside the others, measured against the
    # same static run: its own light-load figure, in the report too.
    variant = report["light_by_mode"][VARIANT]
    assert variant["requests"] == len(trace) and variant["per_run"] == [run[f"{VARIANT}_over_static"]["ttft_mean"]]
    assert variant["ci95"][0] <= variant["ttft_mean_ratio"] <= variant["ci95"][1]
    assert f"lightest rate: {VARIANT} mean TTFT / static" in path.with_suffix(".md").read_text()
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


VARIANT = "elastic@reserve=4MiB"  # the CPU preset's elastic engines keep no reserve; this one keeps 4 MiB


def test_a_variant_is_the_elastic_mode_with_its_settings_checked_and_passed_to_its_engines(tmp_path: Path) -> None:
    from elastikv.bench.modes import embedded_router_config
    from elastikv.bench.plan import comparisons
    from elastikv.bench.variants import base_mode, variant_env
    from elastikv.bench.vllm import router_config

    assert variant_env("elastic@chunk=8MiB@RESERVE=768MiB") == {"ELASTIKV_CHUNK": "8MiB", "ELASTIKV_RESERVE": "768MiB"}
    assert base_mode("elastic-v2@chunk=8MiB") == "elastic-v2" and variant_env("kvcached") == {}
    refused = {
        "static@chunk=8MiB": "only elastic modes take settings",
        "elastic@chunk": "not NAME=VALUE",
        "elastic@chunk=lots": "chunk",
        "elastic@device_budget=1GiB": "not a setting",
        "elastic@colour=red": "use one of .*chunk",
        "elastic@chunk=8MiB@chunk=4MiB": "set twice",
    }
    for bad, why in refused.items():
        with pytest.raises(ConfigError, match=why):
            variant_env(bad)
        with pytest.raises(ConfigError):
            BenchPlan(modes=("static", "elastic", bad))
    with pytest.raises(ConfigError, match="the embedded engine runs static, elastic"):
        BenchPlan(modes=("static", "elastic", "kvcached@chunk=8MiB"))
    modes = ("static", "kvcached", "elastic", "elastic@chunk=8MiB")
    assert BenchPlan(engine="vllm", modes=modes).modes == modes
    assert ("elastic@chunk=8MiB", "kvcached") in comparisons(modes)
    paths = {"m1": tmp_path, "m2": tmp_path}
    for spec in router_config("elastic@chunk=8MiB", paths, share=1, budget=2 * 1024**3, env={}, dtype="bfloat16",
                              max_model_len=4608, extra_args=(), start_timeout_s=1).models:  # fmt: skip
        assert spec.engine == "vllm" and spec.env["ELASTIKV_CHUNK"] == "8MiB"
        assert spec.env.get("VLLM_USE_V2_MODEL_RUNNER") == "0" and Settings.from_env(spec.env).book_weights == "off"
    plan = BenchPlan(models=("a", "b"), kv_budget=64 * 1024**2, reserve=0)
    for spec in embedded_router_config(VARIANT, plan, {"a": tmp_path, "b": tmp_path}, tmp_path, 64, 1024).models:
        assert Settings.from_env(spec.env).reserve.resolve(0) == 4 * 1024**2  # the variant's, over the plan's


def test_bad_options_are_refused_with_what_to_write() -> None:
    with pytest.raises(ConfigError, match="--rates 'fast'"):
        plan_from_options(rates="fast")
    with pytest.raises(ConfigError, match="positive request rates"):
        plan_from_options(rates="0,1")
    with pytest.raises(ConfigError, match="2 --model paths for 3 models"):
        BenchPlan(model_paths=("a", "b"))
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        from elastikv.bench.modes import model_dirs

        model_dirs(BenchPlan(models=("a",), model_paths=("/nonexistent",)), Path("/tmp"), None, None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="the embedded engine runs static, elastic"):
        plan_from_options(modes="static,kvcached,elastic")
    with pytest.raises(ConfigError, match="static and elastic are always among them"):
        plan_from_options(engine="vllm", modes="kvcached,elastic")
    with pytest.raises(ConfigError, match="--engine 'sglang'"):
        plan_from_options(engine="sglang")
    assert plan_from_options(engine="vllm", modes="static,kvcached,elastic,elastic-v2").modes == (
        "static", "kvcached", "elastic", "elastic-v2")  # fmt: skip


def test_chat_lengths_follow_sharegpt_as_the_vllm_paper_measured_it() -> None:
    """Log-normal around ShareGPT's means (161 prompt, 338 output tokens): the medians are exp(mu), which clipping
    does not move; the spread covers short and long requests alike."""
    import random
    import statistics

    from elastikv.bench.workload import CHAT_MEAN_OUTPUT, CHAT_MEAN_PROMPT, CHAT_SIGMA, chat_lengths

    draw, rng = chat_lengths(), random.Random(0)
    pairs = [draw(rng) for _ in range(20000)]
    prompts, outputs = [p for p, _ in pairs], [o for _, o in pairs]
    assert statistics.median(prompts) == pytest.approx(CHAT_MEAN_PROMPT / math.exp(CHAT_SIGMA**2 / 2), rel=0.05)
    assert statistics.median(outputs) == pytest.approx(CHAT_MEAN_OUTPUT / math.exp(CHAT_SIGMA**2 / 2), rel=0.05)
    assert min(prompts) >= 4 and max(prompts) <= 2048 and max(outputs) <= 1024
    assert statistics.fmean(prompts) == pytest.approx(CHAT_MEAN_PROMPT, rel=0.1)
    trace = intermittent(["a", "b"], duration=30, base_rate=1, peak_rate=5, peak_width=5, prompt_tokens=1,
                         output_tokens=1, seed=3, lengths=chat_lengths())  # fmt: skip
    assert len({a.prompt_tokens for a in trace}) > len(trace) // 3  # lengths vary request by request


def test_every_vllm_mode_runs_the_same_flags_and_only_the_kv_owner_differs(tmp_path: Path) -> None:
    from elastikv.bench.vllm import VLLM_MODES, router_config

    paths = {"m1": tmp_path / "m", "m2": tmp_path / "m"}

    def config(mode: str) -> Any:
        return router_config(mode, paths, share=2 * 1024**3, budget=6 * 1024**3, env={"X": "1"}, dtype="bfloat16",
                             max_model_len=4608, extra_args=("--seed", "0"), start_timeout_s=60)  # fmt: skip

    configs = {mode: config(mode) for mode in VLLM_MODES}
    common = ["--dtype", "bfloat16", "--max-model-len", "4608", "--no-enable-prefix-caching"]
    for mode, cfg in configs.items():
        assert [m.name for m in cfg.models] == ["m1", "m2"]
        for spec in cfg.models:
            assert spec.args[: len(common)] == tuple(common) and "--seed" in spec.args, (mode, spec.args)
            assert spec.idle_s is None and spec.sleep_level == "stop"  # weights resident, no sleep mode flags
            assert spec.env["X"] == "1"
            assert spec.env.get("VLLM_USE_V2_MODEL_RUNNER") == (None if mode == "elastic-v2" else "0")
    static = configs["static"].models[0]
    assert static.engine == "command" and "--kv-cache-memory-bytes" in static.args
    assert static.args[static.args.index("--kv-cache-memory-bytes") + 1] == str(2 * 1024**3)
    kvc = configs["kvcached"].models[1]
    assert kvc.engine == "command" and kvc.env["ENABLE_KVCACHED"] == "true" and kvc.env["KVCACHED_IPC_NAME"] == (
        "kvcached_m2")  # fmt: skip
    assert "ELASTIKV_DEVICE_BUDGET" not in kvc.env and "--kv-cache-memory-bytes" not in kvc.args
    for mode in ("elastic", "elastic-v2"):
        spec = configs[mode].models[0]
        assert spec.engine == "vllm" and spec.env["ELASTIKV_DEVICE_BUDGET"] == str(6 * 1024**3)
        # the budget is KV's, as static's shares are: on a GPU elastikv would book the weights in it by default (the
        # H100 run of 2026-12-07 spent a 16 GiB budget on one 8B's weights and every elastic request timed out)
        assert Settings.from_env(spec.env).book_weights == "off"
    with pytest.raises(ConfigError, match="mode 'lmcache'"):
        router_config("lmcache", paths, share=1, budget=1, env={}, dtype="bfloat16", max_model_len=1, extra_args=(),
                      start_timeout_s=1)  # fmt: skip


def test_the_embedded_elastic_engines_spend_the_budget_on_kv_only(tmp_path: Path) -> None:
    from elastikv.bench.modes import embedded_router_config

    plan = BenchPlan(models=("a", "b"), kv_budget=64 * 1024**2)
    cfg = embedded_router_config("elastic", plan, {"a": tmp_path, "b": tmp_path}, tmp_path, 64, 1024)
    for spec in cfg.models:
        settings = Settings.from_env(spec.env)
        assert settings.book_weights == "off" and spec.env["ELASTIKV_DEVICE_BUDGET"] == str(64 * 1024**2)


def test_what_a_kvcached_server_holds_is_read_from_its_segment() -> None:
    import os
    import struct

    from elastikv.bench.vllm import kvcached_held, kvcached_ipc

    name = f"ekv-test-{os.getpid()}"
    path = Path("/dev/shm") / kvcached_ipc(name)
    path.write_bytes(struct.pack("<3q", 8 * 1024**3, 3 * 1024**3, 64 * 1024**2))  # limit, used, preallocated
    try:
        assert kvcached_held([name, "absent"]) == {name: 3 * 1024**3 + 64 * 1024**2, "absent": 0}
    finally:
        path.unlink()


def test_the_report_names_kvcached_beside_static_when_it_ran(tmp_path: Path) -> None:
    """A report with a kvcached mode renders every mode and both ratios (the renderer reads only the report)."""
    from elastikv.bench.plan import comparisons

    assert comparisons(("static", "kvcached", "elastic", "elastic-v2")) == [
        ("kvcached", "static"), ("elastic", "static"), ("elastic-v2", "static"), ("elastic", "kvcached"),
        ("elastic-v2", "kvcached")]  # fmt: skip
    assert comparisons(("static", "elastic")) == [("elastic", "static")]


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("EKV_LONG_TESTS") != "1",
    reason="~3 minutes of vLLM start-ups on a CPU, "
    "more than CI's budget allows: set EKV_LONG_TESTS=1 (the GPU runs it: scripts/gpu-check)",
)
def test_the_benchmark_serves_each_mode_with_vllm(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "elastikv.cli", "bench", "multi-model", "--engine", "vllm", "--models", "2",
           "--rates", "4", "--duration", "4", "--peak-width", "1.5", "--prompt-tokens", "128", "--output-tokens", "8",
           "--vllm-arg=--enforce-eager", "--vllm-arg=--block-size=32", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(next(out.glob("multi-model-*.json")).read_text())
    run = report["runs"][0]
    assert report["plan"]["engine"] == "vllm" and list(run["modes"]) == ["static", "elastic"]
    for mode in ("static", "elastic"):
        assert run["modes"][mode]["all"]["completed"] == run["requests"], run["modes"][mode]["all"]
    assert run["modes"]["elastic"]["peak_kv_bytes"] <= report["plan"]["kv_budget"]
    assert "elastic_over_static" in run
    for mode in ("static", "elastic"):  # vLLM's own counts of this trace, every request in them
        counted = run["modes"][mode]["engine_counts"]
        assert sorted(counted) == sorted(report["plan"]["models"]), counted
        assert sum(c["requests"] for c in counted.values()) == run["requests"], counted
        assert all(c["queue_s"] >= 0 and c["prefill_s"] > 0 for c in counted.values()), counted
    assert "Where TTFT went, by vLLM's own counts" in next(out.glob("multi-model-*.md")).read_text()


def test_vllms_counters_are_read_per_trace_from_a_prometheus_exposition() -> None:
    """engine_metrics: vLLM's preemption counter and its queue and prefill histograms (written here by
    prometheus_client, as vLLM writes them, one label set per engine), summed over label sets; a trace's share is
    the difference of two readings; elastikv's gauges apart; an engine without them gives no counts."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from elastikv.bench import engine_metrics

    registry = CollectorRegistry()
    labels = ["model_name", "engine"]
    preempted = Counter("vllm:num_preemptions", "preemptions", labels, registry=registry)
    queue = Histogram("vllm:request_queue_time_seconds", "queue", labels, registry=registry)
    prefill = Histogram("vllm:request_prefill_time_seconds", "prefill", labels, registry=registry)
    mapped = Gauge("elastikv_kv_pages_mapped_total", "pages", ["model"], registry=registry)
    mapped.labels("a").set(7)

    def serve(n: int, queued_s: float, engine: str) -> None:
        for _ in range(n):
            queue.labels("a", engine).observe(queued_s)
            prefill.labels("a", engine).observe(0.05)

    serve(2, 0.5, "0")
    before = {"a": engine_metrics.parse(generate_latest(registry).decode())}
    serve(3, 1.0, "0")
    serve(1, 2.0, "1")
    preempted.labels("a", "1").inc(4)
    after = {"a": engine_metrics.parse(generate_latest(registry).decode()), "asleep": {}}
    share = engine_metrics.counts(before, after)
    assert share == {"a": {"requests": 4.0, "preemptions": 4.0, "queue_s": pytest.approx(5.0 / 4),
                           "prefill_s": pytest.approx(0.05)}}  # fmt: skip
    assert engine_metrics.gauges(after) == {"a": {"kv_pages_mapped_total": 7.0}, "asleep": {}}


def test_a_mode_that_fails_is_a_result_and_the_other_modes_still_run(tmp_path: Path) -> None:
    """The elastic engines refuse to start (a read window of -5 tokens): the run goes on, static is measured, and
    the report says elastic failed and why, every one of its requests counted as failed."""
    from elastikv.bench.multi_model import run_bench
    from elastikv.bench.plan import CPU
    from elastikv.bench.report import markdown

    plan = BenchPlan(**{**CPU, "models": ("model-a",), "rates": (4.0,), "duration": 3.0, "peak_width": 1.0,
                        "elastic_read_tokens": -5})  # fmt: skip
    report = run_bench(plan, png=tmp_path / "r.png", model_cache=tmp_path / "models")
    run = report["runs"][0]
    assert run["modes"]["static"]["all"]["completed"] == run["requests"] > 0
    assert run["modes"]["elastic"]["all"]["completed"] == 0 and run["modes"]["elastic"]["all"]["failed"] > 0
    assert list(report["failed_modes"]) == ["elastic"] and "max-kv-tokens" in report["failed_modes"]["elastic"]
    assert "max-kv-tokens" in markdown(report).split("**elastic failed**")[1], "the Markdown says why"


def test_why_requests_failed_in_a_mode_that_ran_is_in_the_results_and_the_report() -> None:
    """The H100 run of 2026-12-07 saved elastic's 0/56 with no word of why; a mode that runs but whose requests
    fail keeps their most common errors (JSON) and the report gives them per rate and mode."""
    from elastikv.bench.replay import Replayed
    from elastikv.bench.report import request_failures
    from elastikv.bench.results import RunResult
    from elastikv.bench.workload import Arrival, Outcome

    trace = [Arrival(float(i), "a", 8, 4) for i in range(4)]
    stalled = "stalled: no token from any of the 3 requests in flight for 120 s"
    good = [Outcome(a, status=200, ttft=0.1, latency=0.4, tokens=4) for a in trace]
    bad = [good[0], Outcome(trace[1], error=stalled), Outcome(trace[2], error=stalled), Outcome(trace[3], status=503)]
    run = RunResult.of(4.0, trace, {"static": Replayed(good), "elastic": Replayed(bad)}, ["a"])
    assert run.modes["static"].errors == {}
    assert run.modes["elastic"].errors == {stalled: 2, "HTTP 503, no token": 1}
    report = {"plan": {"modes": ["static", "elastic"]}, "runs": [json.loads(json.dumps(run.as_json()))]}
    assert request_failures(report) == [
        f"rate 4, elastic: 3 of 4 requests failed: {stalled} (x2); HTTP 503, no token (x1)"]  # fmt: skip
    report["failed_modes"] = {"elastic": "EngineStartFailed: ..."}  # said apart, not twice
    assert request_failures(report) == []


def test_a_failed_modes_summary_keeps_each_engines_first_error_however_long_the_logs() -> None:
    """kvcached's failed start on the H100 (2026-12-06) was saved as its API server's last lines only; the summary
    in the report names each engine's first logged error (once) before the reason's end."""
    from elastikv.bench.report import failure_summary

    engine = "m{}: the engine exited with code 1 while starting; its log's end:\n{}\n...\n" + "noise\n" * 200
    first = "the first error in the log (line 9): torch.OutOfMemoryError: CUDA out of memory"
    end = "RuntimeError: see root cause above"
    why = "EngineStartFailed: " + "".join(engine.format(i, first) for i in range(3)) + end
    short = failure_summary(why)
    assert short.count(first) == 1 and short.endswith(end) and len(short) < 800


def test_a_run_stopped_by_a_signal_keeps_the_modes_it_finished(tmp_path: Path) -> None:
    """On 2026-12-08 a device's time limit ended a vLLM run during its fourth mode and the three modes it had
    finished were lost with it (the report was written only at the end). Each finished mode's figures are now saved
    as they come, and a SIGTERM during a mode saves them once more, naming the mode it stopped, before exit 130."""
    import signal

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "elastikv.cli", "bench", "multi-model", "--models", "1", "--rates", "4",
           "--duration", "3", "--peak-width", "1", "--modes", "static,elastic", "--out", str(out),
           "--model-cache", str(tmp_path / "models")]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the static figures in the log at once; then elastic's trace is sent
            seen.append(line)
            if line.startswith("elastic: rate 4"):
                (partial,) = out.glob("multi-model-*.json")  # saved after static, before elastic started
                assert json.loads(partial.read_text())["partial"]["left"] == ["elastic"]
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    log = "".join(seen) + rest
    assert proc.returncode == 130, log[-3000:]
    assert any(line.startswith("static, rate 4: ") and " completed, TTFT mean " in line for line in seen), log
    report = json.loads(next(out.glob("multi-model-*.json")).read_text())
    assert report["partial"] == {"why": "stopped by a signal during elastic", "done": ["static"], "left": ["elastic"]}
    (run,) = report["runs"]
    assert list(run["modes"]) == ["static"] and run["modes"]["static"]["all"]["completed"] == run["requests"] > 0
    md = next(out.glob("multi-model-*.md")).read_text()
    assert "**partial report** (stopped by a signal during elastic): modes done static; left elastic" in md
    assert not list(out.glob("multi-model-*.png")), "the PNG comes with the whole report only"


def test_a_report_so_far_that_cannot_be_saved_does_not_stop_the_run() -> None:
    """The copy kept after each mode is a safeguard: a fault in it (here a full disk) is printed, not raised."""
    from rich.console import Console

    from elastikv.bench.multi_model import _save_partial

    def full_disk(report: dict[str, Any]) -> None:
        raise OSError(28, "No space left on device")

    console = Console(record=True, width=200)
    _save_partial(full_disk, lambda why: {"partial": {"why": why}}, "running", console)
    assert "the report so far was not saved: OSError: [Errno 28] No space left on device" in console.export_text()
    saved: list[dict[str, Any]] = []
    _save_partial(saved.append, lambda why: {"partial": {"why": why}}, "running", console)
    assert saved == [{"partial": {"why": "running"}}]
