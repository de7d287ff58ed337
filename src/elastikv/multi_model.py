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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from elastikv.bench_vllm import VLLM_MODES
from elastikv.config import ATTENTIONS, format_bytes
from elastikv.errors import ConfigError, EngineDied, EngineStartFailed
from elastikv.models import SIZES, kv_bytes_per_token
from elastikv.multi_model_report import _best_peak, _plot, _print, _ratio, markdown
from elastikv.routed import Replayed, embedded_config, held_kv, replay_through_router
from elastikv.router.config import RouterConfig
from elastikv.workload import Arrival, Outcome, chat_lengths, intermittent, load_trace, peak_rate, save_trace, summary

MODES = ("static", "elastic")
ENGINES = ("embedded", "vllm")
WORKLOADS = ("long", "chat")
MiB, GiB = 1024**2, 1024**3
QUEUEING = 3.0  # static "queues" at a rate whose p99 TTFT is this many times its p50 at the lightest rate


def _comparisons(modes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(mode, baseline) pairs reported as ratios: every other mode over static, and elastic modes over kvcached."""
    pairs = [(m, "static") for m in modes if m != "static"]
    if "kvcached" in modes:
        pairs += [(m, "kvcached") for m in modes if m.startswith("elastic")]
    return pairs


@dataclasses.dataclass(frozen=True)
class BenchPlan:
    models: tuple[str, ...] = ("llama-a", "llama-b", "llama-c")
    size: str = "8b"  # of the random model made when model_paths is empty
    model_paths: tuple[str, ...] = ()  # the user's own models, one per name
    kv_budget: int = 16 * GiB  # KV memory all models share (elastic) or split evenly (static)
    rates: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)  # peak request rate per model (requests/s), one run each
    duration: float = 60.0  # seconds of trace per rate
    base_rate: float = 0.02  # requests/s per model between peaks
    peak_width: float = 20.0  # seconds, at the base of each model's peak (3 models in 60 s: no overlap)
    prompt_tokens: int = 4096
    output_tokens: int = 256  # with --attention elastikv a request lives ~13 s: 10 fit a static third at once
    max_batch_tokens: int = 2048  # tokens per forward pass (prefill chunk + decodes)
    elastic_read_tokens: int | None = None  # elastic --max-kv-tokens; default: all the budget holds
    dtype: str = "bfloat16"
    attention: str = "auto"  # the engines' --attention (serving/attention.py), the same in both modes
    reserve: int | None = None  # ELASTIKV_RESERVE for the elastic engines; None: elastikv's default
    idle_s: float | None = None  # elastic mode: sleep a model idle this long (weights to host); None: never
    trace: str | None = None  # replay this trace (JSON lines) instead of the rate sweep
    elastic_first: bool = False  # run the modes in reverse (runs in both orders cancel a drift of the GPU's speed)
    engine: str = "embedded"  # "embedded" (elastikv's own engine) or "vllm" (vLLM's OpenAI server; bench_vllm.py)
    modes: tuple[str, ...] = MODES  # vllm also: "kvcached", "elastic-v2"; static and elastic always run
    workload: str = "long"  # "long" (prompt_tokens + output_tokens each) or "chat" (ShareGPT-like lengths)
    vllm_args: tuple[str, ...] = ()  # more flags for every vLLM server, every mode
    timeout_s: float = 600.0  # per request
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("at least one model")
        if self.model_paths and len(self.model_paths) != len(self.models):
            raise ConfigError(f"{len(self.model_paths)} --model paths for {len(self.models)} models: give one each")
        if self.size not in SIZES:
            raise ConfigError(f"--size {self.size!r}: choose one of {', '.join(SIZES)}")
        if not self.rates or any(r <= 0 for r in self.rates):
            raise ConfigError("--rates must be positive request rates, e.g. 0.25,0.5,1")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"--attention {self.attention!r}: choose one of {', '.join(ATTENTIONS)}")
        if self.prompt_tokens < 1 or self.output_tokens < 1 or self.kv_budget <= 0:
            raise ConfigError("prompt and output tokens and the KV budget must be positive")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        known = MODES if self.engine == "embedded" else VLLM_MODES
        unknown = [m for m in self.modes if m not in known]
        if (
            unknown
            or "static" not in self.modes
            or "elastic" not in self.modes
            or len(set(self.modes)) < len(self.modes)
        ):
            raise ConfigError(f"--modes {','.join(self.modes)}: the {self.engine} engine runs {', '.join(known)}; "
                              "static and elastic are always among them, each once")  # fmt: skip
        if self.workload not in WORKLOADS:
            raise ConfigError(f"--workload {self.workload!r}: choose one of {', '.join(WORKLOADS)}")


SHORT = {  # fits one 10-minute command on the H100 (two rates: light and peak)
    "rates": (0.25, 2.0),
}
CPU = {  # tiny models on host memory: a run in about a minute per mode, for tests and a first look
    "size": "tiny",
    "kv_budget": 12 * MiB,
    "rates": (2.0, 60.0),
    "duration": 12.0,
    "peak_width": 2.0,
    "base_rate": 0.1,
    "prompt_tokens": 256,
    "output_tokens": 16,
    "max_batch_tokens": 512,
    "dtype": "float32",
    "reserve": 0,  # a 12 MiB budget: the default reserve (256 MiB, capped) would let one idle model hold it all
}


def run_bench(
    plan: BenchPlan, *, png: Path, console: Console | None = None, model_cache: Path | None = None
) -> dict[str, Any]:
    """Run both modes over the sweep; return the report (JSON-ready) and write the PNG to ``png``."""
    console = console or Console()
    work = Path(tempfile.mkdtemp(prefix="elastikv-bench-"))
    device = _device_label()
    paths = _models(plan, work, model_cache, console)
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
        from elastikv.bench_vllm import check_vllm

        for mode in plan.modes:
            check_vllm(mode)
    results: dict[str, list[Replayed]] = {}
    states: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for mode in plan.modes[::-1] if plan.elastic_first else plan.modes:
        t0 = time.monotonic()

        def between(i: int, mode: str = mode) -> None:
            console.print(f"{mode}: rate {rates[i]} req/s at the peak, {len(traces[i])} requests")

        cfg, held, after_start = _mode(mode, plan, paths, work, traces, third_tokens, per_token)
        try:
            results[mode], states[mode] = asyncio.run(
                replay_through_router(
                    cfg,
                    traces,
                    log_dir=work / f"logs-{mode}",
                    held=held,
                    console=console,
                    label=mode,
                    between=between,
                    after_start=after_start,
                )
            )
        except (EngineStartFailed, EngineDied, OSError, TimeoutError, ConfigError) as exc:
            # A mode that fails is a result, not the end of the run: every request of it counts as failed, with why.
            reason = f"{type(exc).__name__}: {exc}"
            console.print(f"[red]{mode} failed[/]: {reason[-2000:]}")
            failed[mode] = reason[-4000:]
            results[mode] = [Replayed(outcomes=[Outcome(a, error=f"{mode} failed: {reason[:300]}") for a in t])
                             for t in traces]  # fmt: skip
            states[mode] = {}
        console.print(f"{mode}: done in {time.monotonic() - t0:.0f} s")
    report = _report(plan, device, rates, traces, results, states, third_tokens, per_token)
    report["failed_modes"] = failed
    _print(console, report)
    _plot(png, report)
    report["png"] = str(png)
    return report


def _device_label() -> str:
    from elastikv.memory import open_backend

    backend = open_backend()
    try:
        return backend.device_label
    finally:
        backend.close()


def _models(plan: BenchPlan, work: Path, cache: Path | None, console: Console) -> dict[str, Path]:
    if plan.model_paths:
        paths = {name: Path(p) for name, p in zip(plan.models, plan.model_paths, strict=True)}
        for name, p in paths.items():
            if not (p / "config.json").is_file():
                raise ConfigError(f"--model {p} (for {name}) has no config.json: give a local model directory")
        return paths
    from elastikv.models import make_model_once

    where = (cache or work) / f"{plan.size}-seed{plan.seed}"  # every model serves it (its own copy in memory)
    t0 = time.monotonic()
    with console.status(f"making a random-weight {plan.size} Llama in {where} (no download)..."):
        made = make_model_once(where, size=plan.size, seed=plan.seed)
    if made:
        console.print(f"made {where} in {time.monotonic() - t0:.0f} s")
    return dict.fromkeys(plan.models, where)


def _trace(plan: BenchPlan, rate: float, i: int) -> list[Arrival]:
    lengths = chat_lengths() if plan.workload == "chat" else None
    return intermittent(plan.models, duration=plan.duration, base_rate=plan.base_rate, peak_rate=rate,
                        peak_width=plan.peak_width, prompt_tokens=plan.prompt_tokens,
                        output_tokens=plan.output_tokens, seed=plan.seed + i, lengths=lengths)  # fmt: skip


def _mode(
    mode: str,
    plan: BenchPlan,
    paths: dict[str, Path],
    work: Path,
    traces: list[list[Arrival]],
    third_tokens: int,
    per_token: int,
) -> tuple[RouterConfig, Any, Any]:
    """The router config, the KV-held sampler and what to hold once the engines are up, for one mode."""
    share = plan.kv_budget // len(plan.models)
    if plan.engine == "embedded":
        return _router_config(mode, plan, paths, work, third_tokens, per_token), held_kv(mode, plan.models, share), None
    from elastikv import bench_vllm

    env = {"ELASTIKV_LEDGER_DIR": str(work / "ledger"), "VLLM_LOGGING_LEVEL": "WARNING"}
    if plan.reserve is not None:
        env["ELASTIKV_RESERVE"] = str(plan.reserve)
    longest = max((a.prompt_tokens + a.output_tokens for t in traces for a in t), default=1)
    cfg = bench_vllm.router_config(mode, paths, share=share, budget=plan.kv_budget, env=env, dtype=plan.dtype,
                                   max_model_len=-(-(longest + 16) // 256) * 256, extra_args=plan.vllm_args,
                                   start_timeout_s=900.0)  # fmt: skip
    if mode == "kvcached":
        names = plan.models
        held: Any = lambda _router: bench_vllm.kvcached_held(names)  # noqa: E731

        @contextlib.contextmanager
        def after_start() -> Any:
            bench_vllm.set_kvcached_limits(names, plan.kv_budget)
            with bench_vllm.ballast(plan.kv_budget) as info:
                yield info

        return cfg, held, after_start
    held = held_kv("static" if mode == "static" else "elastic", plan.models, bench_vllm.static_kv_bytes(share))
    if mode == "static":
        return cfg, held, None
    return cfg, held, lambda: bench_vllm.ballast(plan.kv_budget)


def _router_config(
    mode: str, plan: BenchPlan, paths: dict[str, Path], work: Path, third_tokens: int, per_token: int
) -> RouterConfig:
    share = plan.kv_budget // len(plan.models)
    env = {
        "ELASTIKV_LEDGER_DIR": str(work / "ledger"),  # the benchmark's own book: other elastikv users are left alone
        "ELASTIKV_DEVICE_BUDGET": str(plan.kv_budget),
        "ELASTIKV_PREFIX_CACHE": "0",  # the trace's prompts share nothing
    }
    if plan.reserve is not None:
        env["ELASTIKV_RESERVE"] = str(plan.reserve)
    if "ELASTIKV_HOST_MEMORY" not in os.environ:
        env["ELASTIKV_HOST_MEMORY"] = str(max(plan.kv_budget * 2, GiB))  # on a CPU: the pretend device
    models = {}
    for name in plan.models:
        args = ["--dtype", plan.dtype, "--max-batch-tokens", str(plan.max_batch_tokens), "--attention", plan.attention]
        if mode == "static":
            args += ["--static-kv", str(share), "--max-kv-tokens", str(third_tokens)]
        else:
            read = plan.elastic_read_tokens or plan.kv_budget // per_token
            args += ["--max-kv-tokens", str(read)]
        models[name] = (paths[name], args)
    idle = plan.idle_s if mode == "elastic" else None
    return embedded_config(models, env, idle_s=idle, start_timeout_s=900.0)


def _report(
    plan: BenchPlan,
    device: str,
    rates: tuple[float, ...],
    traces: list[list[Arrival]],
    results: dict[str, list[Replayed]],
    states: dict[str, Any],
    third_tokens: int,
    per_token: int,
) -> dict[str, Any]:
    runs = []
    for i, rate in enumerate(rates):
        arrivals = {n: [a.at for a in traces[i] if a.model == n] for n in plan.models}
        run: dict[str, Any] = {"rate": rate, "requests": len(traces[i]), "arrivals": arrivals, "modes": {}}
        for mode in plan.modes:
            r = results[mode][i]
            ok = [o for o in r.outcomes if o.ok]
            in_order = sorted(r.outcomes, key=lambda o: (o.arrival.at, o.arrival.model))  # the trace's order
            run["modes"][mode] = {
                "all": summary(r.outcomes),
                # per request, in trace order (the same requests in both modes): pooling and paired statistics
                "ttft_by_request": [round(o.ttft, 4) if o.ok and o.ttft is not None else None for o in in_order],
                "models": {n: summary([o for o in r.outcomes if o.arrival.model == n]) for n in plan.models},
                "seconds": round(r.seconds, 2),
                "output_tokens_per_s": sum(o.tokens for o in ok) / r.seconds if r.seconds else math.nan,
                "prompt_tokens_per_s": sum(o.arrival.prompt_tokens for o in ok) / r.seconds if r.seconds else math.nan,
                "peak_kv_bytes": max((sum(h.values()) for _, h in r.samples), default=0),
                "peak_kv_bytes_per_model": {
                    n: max((h.get(n, 0) for _, h in r.samples), default=0) for n in plan.models
                },
                "memory": [(round(t, 2), h) for t, h in r.samples],
                "engine_metrics": r.engine_metrics,  # cumulative per engine since its start (driver time...)
            }
        for mode, base in _comparisons(plan.modes):  # elastic_over_static, elastic_over_kvcached, ...
            b, m = run["modes"][base]["all"], run["modes"][mode]["all"]
            run[f"{mode}_over_{base}"] = {k: _ratio(m[k], b[k]) for k in ("ttft_mean", "ttft_p50", "ttft_p99",
                                                                         "tpot_mean")}  # fmt: skip
        runs.append(run)
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
        "runs": runs,
        "models": states,
    }
    return _summarize(report)


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


def _summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The sweep's headline figures, from its runs (lightest rate first; a rate run more than once is pooled)."""
    runs = sorted(report["runs"], key=lambda r: r["rate"])
    report["runs"] = runs
    light = runs[0]["modes"]["static"]["all"]["ttft_p50"]
    queues_from = next((r["rate"] for r in runs if r["modes"]["static"]["all"]["ttft_p99"] > QUEUEING * light), None)
    peak = _best_peak(runs)
    report["static_queues_from_rate"] = queues_from
    report["queueing_rule"] = f"static p99 TTFT above {QUEUEING:g}x its p50 at the lightest rate"
    report["best_peak_rate"] = peak["rate"]
    report["peak_p99_ttft_static_over_elastic"] = _ratio(
        peak["modes"]["static"]["all"]["ttft_p99"], peak["modes"]["elastic"]["all"]["ttft_p99"]
    )
    if "kvcached" in peak["modes"]:
        report["peak_p99_ttft_kvcached_over_elastic"] = _ratio(
            peak["modes"]["kvcached"]["all"]["ttft_p99"], peak["modes"]["elastic"]["all"]["ttft_p99"]
        )
    report["light"] = _pooled([r for r in runs if r["rate"] == runs[0]["rate"]])
    report["light_mean_ttft_elastic_over_static"] = report["light"]["ttft_mean_ratio"]
    return report


BOOTSTRAP = 2000  # resamples for the light-load interval


def _pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Elastic mean TTFT over static's, pooled over ``runs`` (repeats of one rate: each request counts once), with
    a 95% interval from a paired bootstrap over the requests when every run kept them (reports from before
    2026-11-24 did not: their means are pooled, weighted by requests, and no interval is given). Requests of one
    run overlap in time and are not independent, so the interval is read beside the per-run ratios, not alone."""
    per_run = [run["elastic_over_static"]["ttft_mean"] for run in runs]
    kept = [
        (run["modes"]["static"].get("ttft_by_request"), run["modes"]["elastic"].get("ttft_by_request")) for run in runs
    ]
    if any(s is None or e is None for s, e in kept):
        n = [run["modes"]["static"]["all"]["completed"] for run in runs]
        static = sum(k * run["modes"]["static"]["all"]["ttft_mean"] for k, run in zip(n, runs, strict=True))
        elastic = sum(k * run["modes"]["elastic"]["all"]["ttft_mean"] for k, run in zip(n, runs, strict=True))
        return {"runs": len(runs), "requests": sum(n), "ttft_mean_ratio": _ratio(elastic, static), "ci95": None,
                "per_run": per_run}  # fmt: skip
    pairs = [(s, e) for ss, es in kept for s, e in zip(ss, es, strict=True) if s is not None and e is not None]
    rng = random.Random(0)
    ratios = []
    for _ in range(BOOTSTRAP):
        sample = rng.choices(pairs, k=len(pairs))
        ratios.append(_ratio(sum(e for _, e in sample), sum(s for s, _ in sample)))
    ratios.sort()
    ci = [ratios[int(0.025 * BOOTSTRAP)], ratios[int(0.975 * BOOTSTRAP) - 1]] if pairs else None
    ratio = _ratio(sum(e for _, e in pairs), sum(s for s, _ in pairs))
    return {"runs": len(runs), "requests": len(pairs), "ttft_mean_ratio": ratio, "ci95": ci, "per_run": per_run}


def merge_reports(paths: list[Path]) -> dict[str, Any]:
    """One sweep from several runs of the same plan but for the traces (a sweep longer than one command). A rate
    found in several files is a repeat: its runs are pooled (the light-load figure) and each is shown."""
    if len({Path(p).resolve() for p in paths}) != len(paths):
        raise ConfigError("a file is given twice to --merge: each run would count twice")
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    keep = ("rates", "duration", "seed", "trace", "elastic_first")  # the traces and the order, not the system
    for p, r in zip(paths, reports, strict=True):
        a = {k: v for k, v in first["plan"].items() if k not in keep}
        b = {k: v for k, v in r["plan"].items() if k not in keep}
        if a != b or r["device"] != first["device"]:
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            raise ConfigError(f"{p}: another plan or device than {paths[0]} ({', '.join(diff) or 'device'}); "
                              "merge runs of one plan only")  # fmt: skip
    merged = dict(first)
    merged["runs"] = [run for r in reports for run in r["runs"]]
    merged["plan"] = dict(first["plan"], rates=sorted(run["rate"] for run in merged["runs"]))
    merged["merged_from"] = [{"file": Path(p).name, "date": r["date"], "commit": r["commit"], "command": r["command"]}
                             for p, r in zip(paths, reports, strict=True)]  # fmt: skip
    return _summarize(merged)


def _git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def plan_from_options(
    *,
    model_paths: tuple[str, ...] = (),
    count: int = 3,
    size: str | None = None,
    kv_budget: str | None = None,
    rates: str | None = None,
    duration: float | None = None,
    peak_width: float | None = None,
    prompt_tokens: int | None = None,
    output_tokens: int | None = None,
    max_batch_tokens: int | None = None,
    attention: str | None = None,
    trace: str | None = None,
    short: bool = False,
    elastic_first: bool = False,
    seed: int = 0,
    engine: str = "embedded",
    modes: str | None = None,
    workload: str = "long",
    vllm_args: tuple[str, ...] = (),
) -> BenchPlan:
    """The plan for the CLI's options: the GPU defaults (three 8B models, 16 GiB of KV) where there is a GPU,
    the CPU preset (tiny models on host memory) elsewhere; ``--short`` trims the GPU sweep to one command."""
    import torch

    from elastikv.config import parse_size

    on_gpu = torch.cuda.is_available()
    fields: dict[str, Any] = {} if on_gpu else dict(CPU)
    if short and on_gpu:
        fields.update(SHORT)
    count = len(model_paths) or count
    if count < 1:
        raise ConfigError("--models must be at least 1")
    fields["models"] = tuple(f"model-{chr(ord('a') + i)}" if i < 26 else f"model-{i}" for i in range(count))
    fields["model_paths"] = tuple(model_paths)
    if size is not None:
        fields["size"] = size
    if kv_budget is not None:
        fields["kv_budget"] = parse_size(kv_budget, what="--kv-budget", allow_percent=False, allow_zero=False).resolve(
            0
        )
    if rates is not None:
        try:
            fields["rates"] = tuple(float(r) for r in rates.split(",") if r.strip())
        except ValueError:
            raise ConfigError(f"--rates {rates!r}: write request rates separated by commas, e.g. 0.25,0.5,1") from None
    given = {"duration": duration, "peak_width": peak_width, "prompt_tokens": prompt_tokens,
             "output_tokens": output_tokens, "max_batch_tokens": max_batch_tokens, "attention": attention,
             "trace": trace}  # fmt: skip
    fields.update({k: v for k, v in given.items() if v is not None})
    fields["seed"] = seed
    fields["elastic_first"] = elastic_first
    fields["engine"] = engine
    if modes is not None:
        fields["modes"] = tuple(m.strip() for m in modes.split(",") if m.strip())
    fields["workload"] = workload
    fields["vllm_args"] = tuple(vllm_args)
    return BenchPlan(**fields)


def run_and_save(plan: BenchPlan, out: Path, *, model_cache: Path | None = None) -> dict[str, Any]:
    """Run the benchmark and write ``multi-model-<device>-<time>.{json,md,png}`` under ``out`` (and under
    ``$OUT/results`` when the device tool runs it)."""
    stem = _stem(out, _device_label())
    report = run_bench(plan, png=stem.with_suffix(".png"), model_cache=model_cache)
    _save(stem, report)
    return report


def merge_and_save(paths: list[Path], out: Path) -> dict[str, Any]:
    """Merge several runs' JSON (see :func:`merge_reports`) and write the sweep's JSON, Markdown and PNG."""
    report = merge_reports(paths)
    stem = _stem(out, report["device"], "multi-model-sweep")
    _plot(stem.with_suffix(".png"), report)
    report["png"] = str(stem.with_suffix(".png"))
    _print(Console(), report)
    _save(stem, report)
    return report


def _stem(out: Path, device: str, name: str = "multi-model") -> Path:
    import re

    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    return out / f"{name}-{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def _save(stem: Path, report: dict[str, Any]) -> None:
    import shutil

    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    if os.environ.get("OUT"):
        dest = Path(os.environ["OUT"], "results")
        dest.mkdir(parents=True, exist_ok=True)
        for suffix in (".json", ".md", ".png"):
            shutil.copy(stem.with_suffix(suffix), dest)
    Console().print(f"wrote {stem}.json, .md and .png")
