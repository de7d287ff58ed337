"""`elastikv bench multi-model` on this CPU (its CPU preset, trimmed): both modes serve every request of every
rate through the router, the report's figures come from those requests, and a sweep split over several runs
merges back into the same figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[serve]'")
pytest.importorskip("matplotlib", reason="needs matplotlib: pip install -e '.[serve]'")

from elastikv.errors import ConfigError
from elastikv.multi_model import BenchPlan, merge_and_save, merge_reports, plan_from_options
from elastikv.workload import intermittent, peak_rate, save_trace

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


def test_a_trace_replays_in_either_order_and_is_placed_by_its_peak_rate(tmp_path: Path) -> None:
    trace = intermittent(("model-a", "model-b"), duration=5, base_rate=0.2, peak_rate=3, peak_width=2,
                         prompt_tokens=128, output_tokens=8, seed=4)  # fmt: skip
    save_trace(trace, tmp_path / "trace.jsonl")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "elastikv.cli", "bench", "multi-model", "--models", "2", "--trace",
           str(tmp_path / "trace.jsonl"), "--elastic-first", "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.index("elastic: done") < r.stdout.index("static: done")  # the order asked for
    (path,) = out.glob("multi-model-*.json")
    report = json.loads(path.read_text())
    assert report["plan"]["elastic_first"] is True
    (run,) = report["runs"]
    assert run["rate"] == peak_rate(trace, report["plan"]["peak_width"]) > 0
    for mode in ("static", "elastic"):
        ttfts = run["modes"][mode]["ttft_by_request"]
        assert len(ttfts) == len(trace) and all(t is not None and t > 0 for t in ttfts), (mode, ttfts)
    light = report["light"]
    assert light["runs"] == 1 and light["requests"] == len(trace)
    lo, hi = light["ci95"]
    assert lo <= report["light_mean_ttft_elastic_over_static"] <= hi
    assert light["per_run"] == [run["elastic_over_static"]["ttft_mean"]]
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_options_are_refused_with_what_to_write() -> None:
    with pytest.raises(ConfigError, match="--rates 'fast'"):
        plan_from_options(rates="fast")
    with pytest.raises(ConfigError, match="positive request rates"):
        plan_from_options(rates="0,1")
    with pytest.raises(ConfigError, match="2 --model paths for 3 models"):
        BenchPlan(model_paths=("a", "b"))
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        from elastikv.multi_model import _models

        _models(BenchPlan(models=("a",), model_paths=("/nonexistent",)), Path("/tmp"), None, None)  # type: ignore[arg-type]
