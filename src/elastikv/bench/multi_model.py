"""``elastikv bench multi-model``: N models on one GPU under intermittent peaks, elastic sharing against a static
split of the same KV memory, over a sweep of request rates.

What it runs: N models (default three 8B-shaped Llamas with random bf16 weights, made once by ``make_model`` and
shared; or the user's own model directories), each served by the embedded engine in its own process behind the
router (in this process). For each mode the engines start once and every rate's trace is replayed in turn:

- **static**: each engine without elastikv, transformers' own KV cache of ``kv_budget / N``, held throughout
  (what a fixed split of the GPU gives each model);
- **elastic**: each engine with elastikv, all of them sharing ``kv_budget`` (``ELASTIKV_DEVICE_BUDGET``).

Weights stay resident in both modes (no sleep unless ``idle_s`` is set), so the only difference is where the KV
memory may go. The trace (``workload.intermittent``) keeps each model nearly idle and raises it to a peak at its
own moment. The embedded engine decodes slowly (~420 tokens/s for an 8B model on an H100), so the workload is
long prompts and short outputs: KV memory, not compute, is what binds at a peak. Reports TTFT and TPOT (mean,
p50, p99) and completed requests per model, mode and rate, the engine's throughput, the ratio elastic/static,
the rate from which static queues, and a PNG of TTFT against rate and of KV memory per model over time.

This module runs it; the rest lives beside it in ``elastikv.bench``, one concept a module: the plan, its presets
and the CLI's options (``plan.py``), the models and router each mode serves (``modes.py``), the typed results
(``results.py``), the headline statistics (``stats.py``), the renderers and results files (``report.py``),
``--merge`` (``merge.py``) and the vLLM modes (``vllm.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from elastikv.bench.modes import mode_setup, model_dirs
from elastikv.bench.plan import BenchPlan
from elastikv.bench.replay import Replayed, replay_through_router
from elastikv.bench.report import failure_summary, plot, print_report, results_stem, save
from elastikv.bench.results import ModeResult, RunResult
from elastikv.bench.stats import summarize
from elastikv.bench.workload import (
    STALL_S,
    Arrival,
    Outcome,
    chat_lengths,
    intermittent,
    load_trace,
    peak_rate,
    save_trace,
)
from elastikv.config import format_bytes
from elastikv.errors import ConfigError, EngineDied, EngineStartFailed, Interrupted
from elastikv.serving.kv_size import kv_bytes_per_token


def run_bench(
    plan: BenchPlan,
    *,
    png: Path,
    console: Console | None = None,
    model_cache: Path | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every mode over the sweep; return the report (JSON-ready) and write the PNG to ``png``.

    ``checkpoint`` is given the report of the modes done so far (``partial`` says which are left) after each mode
    but the last, and once more if a signal stops the run (then :class:`Interrupted` is raised again): a run cut
    short by a device's time limit keeps what its finished modes measured (on 2026-12-08 one lost three modes'
    figures to a kill during its fourth)."""
    console = console or Console()
    work = Path(tempfile.mkdtemp(prefix="elastikv-bench-"))
    device = _device_label()
    paths = model_dirs(plan, work, model_cache, console)
    config = json.loads((paths[plan.models[0]] / "config.json").read_text())
    dtype_bytes = 4 if plan.dtype == "float32" else 2
    per_token = kv_bytes_per_token(config, dtype_bytes)
    third_tokens = plan.kv_budget // len(plan.models) // per_token
    if plan.trace:
        traces = [load_trace(plan.trace)]
        unknown = {a.model for a in traces[0]} - set(plan.models)
        if unknown:
            raise ConfigError(f"the trace names models {sorted(unknown)} that the plan does not serve")
        rates: tuple[float, ...] = (peak_rate(traces[0], plan.peak_width),)
    else:
        traces = [_trace(plan, rate, i) for i, rate in enumerate(plan.rates)]
        rates = plan.rates
    for rate, trace in zip(rates, traces, strict=True):
        save_trace(trace, work / f"trace-{rate}.jsonl")
    console.print(
        f"[bold]multi-model benchmark[/] on {device}: {len(plan.models)} models, KV budget "
        f"{format_bytes(plan.kv_budget)} ({format_bytes(plan.kv_budget // len(plan.models))} each when split: "
        f"{third_tokens} tokens, {third_tokens // (plan.prompt_tokens + plan.output_tokens)} requests of "
        f"{plan.prompt_tokens}+{plan.output_tokens} tokens); rates {', '.join(map(str, rates))} req/s at a peak; "
        f"work files in {work}"
    )
    if plan.engine == "vllm":  # what a mode needs installed: refused now, before any engine starts
        from elastikv.bench.vllm import check_vllm

        for mode in plan.modes:
            check_vllm(mode)
    results: dict[str, list[Replayed]] = {}
    states: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for mode in plan.modes[::-1] if plan.elastic_first else plan.modes:
        t0 = time.monotonic()

        def between(i: int, mode: str = mode) -> None:
            console.print(f"{mode}: rate {rates[i]} req/s at the peak, {len(traces[i])} requests")

        setup = mode_setup(mode, plan, paths, work, traces, third_tokens, per_token)
        so_far = functools.partial(_report_so_far, plan, device, rates, traces, results, states, failed, third_tokens,
                                   per_token)  # fmt: skip
        try:
            results[mode], states[mode] = asyncio.run(
                replay_through_router(
                    setup.config,
                    traces,
                    log_dir=work / f"logs-{mode}",
                    held=setup.held,
                    console=console,
                    label=mode,
                    between=between,
                    after_start=setup.after_start,
                    stall_s=STALL_S,  # engines are up before the trace: two minutes without a token is a stall
                )
            )
        except Interrupted:
            _save_partial(checkpoint, so_far, f"stopped by a signal during {mode}", console)
            raise
        except (EngineStartFailed, EngineDied, OSError, TimeoutError, ConfigError) as exc:
            # A mode that fails is a result, not the end of the run: every request of it counts as failed, with why.
            reason = f"{type(exc).__name__}: {exc}"
            console.print(f"[red]{mode} failed[/]: {failure_summary(reason, 2000)}")
            failed[mode] = reason[:20000]  # every engine's first error and log end (20 lines each)
            results[mode] = [Replayed(outcomes=[Outcome(a, error=f"{mode} failed: {reason[:300]}") for a in t])
                             for t in traces]  # fmt: skip
            states[mode] = {}
        console.print(f"{mode}: done in {time.monotonic() - t0:.0f} s")
        for rate, replayed in zip(rates, results[mode], strict=True):  # the figures in the log as soon as they exist
            s = ModeResult.of(replayed, plan.models).all
            ms = {k: f"{s[k] * 1e3:.0f}" for k in ("ttft_mean", "ttft_p50", "ttft_p99", "tpot_mean")}
            console.print(f"{mode}, rate {rate:g}: {s['completed']}/{s['requests']} completed, TTFT mean "
                          f"{ms['ttft_mean']} ms, p50 {ms['ttft_p50']}, p99 {ms['ttft_p99']}, TPOT mean "
                          f"{ms['tpot_mean']} ms")  # fmt: skip
        if len(results) < len(plan.modes):
            _save_partial(checkpoint, so_far, "running", console)
    report = _report_so_far(plan, device, rates, traces, results, states, failed, third_tokens, per_token)
    print_report(console, report)
    plot(png, report)
    report["png"] = str(png)
    return report


def run_and_save(plan: BenchPlan, out: Path, *, model_cache: Path | None = None) -> dict[str, Any]:
    """Run the benchmark and write ``multi-model-<device>-<time>.{json,md,png}`` under ``out`` (and under
    ``$OUT/results`` when the device tool runs it); after each mode, the JSON and Markdown of the modes done."""
    stem = results_stem(out, _device_label())
    report = run_bench(
        plan, png=stem.with_suffix(".png"), model_cache=model_cache, checkpoint=lambda part: save(stem, part)
    )
    save(stem, report)
    return report


def _save_partial(
    checkpoint: Callable[[dict[str, Any]], None] | None,
    so_far: Callable[[str], dict[str, Any]],
    why: str,
    console: Console,
) -> None:
    """Give ``checkpoint`` the report so far. A copy kept in case the run is cut short must never be what cuts it
    short: whatever goes wrong in it is printed, and the run goes on (the whole report is written at the end)."""
    if checkpoint is None:
        return
    try:
        checkpoint(so_far(why))
    except Exception as exc:  # any: see the docstring
        console.print(f"[yellow]the report so far was not saved[/]: {type(exc).__name__}: {exc}")


def _report_so_far(
    plan: BenchPlan,
    device: str,
    rates: tuple[float, ...],
    traces: list[list[Arrival]],
    results: dict[str, list[Replayed]],
    states: dict[str, Any],
    failed: dict[str, str],
    third_tokens: int,
    per_token: int,
    why: str = "",
) -> dict[str, Any]:
    """The report of the modes in ``results`` (all of them: the final report; fewer: ``partial`` says ``why`` and
    which are left, and the headline figures wait for static and elastic both)."""
    done = tuple(m for m in plan.modes if m in results)
    runs = [RunResult.of(rate, traces[i], {m: results[m][i] for m in done}, plan.models)
            for i, rate in enumerate(rates)]  # fmt: skip
    report = _report(plan, device, runs, states, third_tokens, per_token)  # the plan asked for; runs say what ran
    report["failed_modes"] = failed
    if len(done) < len(plan.modes):
        report["partial"] = {"why": why, "done": list(done), "left": [m for m in plan.modes if m not in done]}
    return report


def _device_label() -> str:
    from elastikv.memory import open_backend

    backend = open_backend()
    try:
        return backend.device_label
    finally:
        backend.close()


def _trace(plan: BenchPlan, rate: float, i: int) -> list[Arrival]:
    lengths = chat_lengths() if plan.workload == "chat" else None
    return intermittent(plan.models, duration=plan.duration, base_rate=plan.base_rate, peak_rate=rate,
                        peak_width=plan.peak_width, prompt_tokens=plan.prompt_tokens,
                        output_tokens=plan.output_tokens, seed=plan.seed + i, lengths=lengths)  # fmt: skip


def _report(
    plan: BenchPlan, device: str, runs: list[RunResult], states: dict[str, Any], third_tokens: int, per_token: int
) -> dict[str, Any]:
    """The report (JSON-ready; its keys are the results files' format), with its headline figures."""
    report = {
        "benchmark": "multi-model",
        "device": device,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": os.environ.get("ELASTIKV_COMMIT") or _git_commit(),
        "plan": dataclasses.asdict(plan),
        "kv_bytes_per_token": per_token,
        "static_share_tokens": third_tokens,
        "attention": _attention(plan) if plan.engine == "embedded" else "vLLM's own",
        "environment": {
            k: v
            for k, v in sorted(os.environ.items())  # settings the engines inherit
            if k.startswith("ELASTIKV") and k != "ELASTIKV_ADMIN_TOKEN"
        },
        "why": _why(plan),
        "runs": [run.as_json() for run in runs],
        "models": states,
    }
    ran = {m for run in runs for m in run.modes}
    return summarize(report) if {"static", "elastic"} <= ran else report  # partial: the headline needs both


def _why(plan: BenchPlan) -> str:
    """Why this workload, for the report: what it should show."""
    if plan.workload == "chat":
        return ("chat-like lengths (log-normal around ShareGPT's means): memory should not bind, so elasticity "
                "must cost nothing")  # fmt: skip
    held = "for ~13 s (the embedded engine decodes slowly)" if plan.engine == "embedded" else "while it runs"
    return (
        f"long prompts, moderate outputs: each request holds its whole KV {held}, so at a peak the requests "
        "a model holds at once outgrow a static third of the budget before the engine's compute saturates"
    )


def _attention(plan: BenchPlan) -> str:
    """The attention the engines run (both modes alike): ``elastikv`` (per request) or ``sdpa`` (whole batch)."""
    import torch

    from elastikv.serving.attention import choose

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return choose(plan.attention, device, getattr(torch, plan.dtype))


def _git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
