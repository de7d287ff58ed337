"""``elastikv demo``: three models on one device, elastic sharing against a static split of the same memory.

What it runs, all on this machine with nothing downloaded: three tiny random-weight Llamas (``make_model``),
each served by the embedded engine in its own process behind the router (``elastikv serve``'s code, in this
process), on the GPU where there is one, else on host memory. The same intermittent trace (each model nearly idle,
peaking at its own moment) is replayed twice:

- **static**: each engine runs without elastikv, with transformers' own KV cache of a third of the budget, held
  from start to end (what a fixed split of the device gives each model);
- **elastic**: each engine with elastikv, all three sharing the whole budget (``ELASTIKV_DEVICE_BUDGET``), idle
  models put to sleep by the router and woken by their next request.

Both modes read at most the same number of KV tokens per step (the static cache's size), so what differs is
only where the memory may go. It prints a table of time to first token and completed requests per model and
mode, and writes a PNG of each model's KV memory over time, the trace and a JSON of every figure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from elastikv.bench.replay import embedded_config, held_kv, replay_through_router
from elastikv.bench.workload import Arrival, Outcome, intermittent, save_trace, summary
from elastikv.config import format_bytes
from elastikv.router.config import RouterConfig
from elastikv.serving.kv_size import kv_bytes_per_token

MODES = ("static", "elastic")
MiB = 1024**2


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    models: tuple[str, ...] = ("llama-a", "llama-b", "llama-c")
    # Sized so that KV memory is what binds at a peak, not this machine's compute: a static third holds about 40
    # of these requests at once, a peak brings about 50 within a second, and each holds its blocks for ~100 steps.
    budget: int = 12 * MiB  # KV memory all three share (elastic) or split in thirds (static)
    duration: float = 30.0  # seconds of trace
    base_rate: float = 0.1  # requests/s per model between peaks
    peak_rate: float = 100.0  # extra requests/s at the top of a model's peak
    peak_width: float = 1.0  # seconds
    prompt_tokens: int = 64
    output_tokens: int = 96
    idle_s: float = 6.0  # elastic mode: sleep a model after this long without requests
    seed: int = 0


def run_demo(out_dir: str | Path, plan: DemoPlan = DemoPlan(), *, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="elastikv-demo-"))
    try:
        return _run(out, plan, work, console)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # models, engine logs, the demo's own ledger: none is kept


def _run(out: Path, plan: DemoPlan, work: Path, console: Console) -> dict[str, Any]:
    device, dtype = _device()
    console.print(f"[bold]elastikv demo[/]: {len(plan.models)} models on {device}, a KV budget of "
                  f"{format_bytes(plan.budget)}")  # fmt: skip
    with console.status("making three tiny random-weight models (no download)..."):
        paths = _make_models(work, plan.models)
    trace = intermittent(plan.models, duration=plan.duration, base_rate=plan.base_rate, peak_rate=plan.peak_rate,
                         peak_width=plan.peak_width, prompt_tokens=plan.prompt_tokens,
                         output_tokens=plan.output_tokens, seed=plan.seed)  # fmt: skip
    save_trace(trace, out / "trace.jsonl")
    console.print(f"trace: {len(trace)} requests over {plan.duration:.0f} s, each model peaking in turn "
                  f"({plan.prompt_tokens} prompt + {plan.output_tokens} output tokens each)")  # fmt: skip
    results: dict[str, Any] = {}
    for mode in MODES:
        results[mode] = asyncio.run(_run_mode(mode, plan, paths, trace, work, device, dtype, console))
    report = _report(plan, trace, results, device)
    _print_table(console, plan, report)
    png = _plot(out / "demo-memory.png", plan, results, device)
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    console.print(f"wrote {png}, {out / 'demo.json'} and {out / 'trace.jsonl'}")
    return report


def _device() -> tuple[str, str]:
    import torch

    from elastikv.memory import open_backend

    backend = open_backend()
    label = backend.device_label
    backend.close()
    on_gpu = torch.cuda.is_available() and backend.name == "cuda"
    # float32 on the GPU too: the same bytes per token everywhere, so the budget binds at the same load.
    return (label if on_gpu else f"the CPU ({label})"), "float32"


def _make_models(work: Path, names: tuple[str, ...]) -> dict[str, Path]:
    from elastikv.bench.models import make_model

    return {name: make_model(work / name, size="tiny", seed=i) for i, name in enumerate(names)}


def _config(mode: str, plan: DemoPlan, paths: dict[str, Path], work: Path, dtype: str) -> RouterConfig:
    third = plan.budget // len(plan.models)
    env = {
        "ELASTIKV_LEDGER_DIR": str(work / "ledger"),  # the demo's own book: other elastikv users are left alone
        "ELASTIKV_DEVICE_BUDGET": str(plan.budget),
        "ELASTIKV_HOST_MEMORY": "1GiB",  # on a CPU: the pretend device holding the budget
        "ELASTIKV_RESERVE": "0",  # an idle engine holds only its null blocks' page
        "ELASTIKV_PREFIX_CACHE": "0",  # the trace's prompts share nothing; keep no finished blocks
    }
    models = {}
    for name in plan.models:
        config = json.loads((paths[name] / "config.json").read_text())
        tokens = third // kv_bytes_per_token(config, 4 if dtype == "float32" else 2)
        args = ["--dtype", dtype, "--max-kv-tokens", str(tokens)]
        if mode == "static":
            args += ["--static-kv", str(third)]
        models[name] = (paths[name], args)
    idle = plan.idle_s if mode == "elastic" else None
    return embedded_config(models, env, idle_s=idle, start_timeout_s=300.0)


async def _run_mode(mode: str, plan: DemoPlan, paths: dict[str, Path], trace: list[Arrival], work: Path,
                    device: str, dtype: str, console: Console) -> dict[str, Any]:  # fmt: skip
    config = _config(mode, plan, paths, work, dtype)
    held = held_kv(mode, plan.models, plan.budget // len(plan.models))
    what = ("each engine without elastikv, a static third of the budget" if mode == "static"
            else "elastikv sharing the whole budget, idle models asleep")  # fmt: skip
    console.print(f"{mode}: {what}")
    (replayed,), states = await replay_through_router(
        config, [trace], log_dir=work / f"logs-{mode}", held=held, console=console, label=mode
    )
    return {"outcomes": replayed.outcomes, "samples": replayed.samples, "models": states}


def _report(plan: DemoPlan, trace: list[Arrival], results: dict[str, Any], device: str) -> dict[str, Any]:
    report: dict[str, Any] = {"device": device, "plan": dataclasses.asdict(plan), "requests": len(trace),
                              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
                              "modes": {}}  # fmt: skip
    for mode in MODES:
        outcomes: list[Outcome] = results[mode]["outcomes"]
        per_model = {name: summary([o for o in outcomes if o.arrival.model == name]) for name in plan.models}
        peak = max((sum(h.values()) for _, h in results[mode]["samples"]), default=0)
        report["modes"][mode] = {
            "all": summary(outcomes),
            "models": per_model,
            "peak_kv_bytes": peak,
            "wakes": sum(s["wakes"] for s in results[mode]["models"].values()),
            "sleeps": sum(s["sleeps"] for s in results[mode]["models"].values()),
            "memory": [(round(t, 2), held) for t, held in results[mode]["samples"]],
        }
    s, e = report["modes"]["static"]["all"], report["modes"]["elastic"]["all"]
    report["elastic_over_static"] = {k: _ratio(e[k], s[k]) for k in ("ttft_mean", "ttft_p50", "ttft_p99", "tpot_mean")}
    return report


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def _print_table(console: Console, plan: DemoPlan, report: dict[str, Any]) -> None:
    table = Table(title="time to first token (ms) and requests completed, per model", title_justify="left")
    for col in ("model", "mode", "completed", "TTFT mean", "p50", "p99", "TPOT mean"):
        table.add_column(col, justify="left" if col in ("model", "mode") else "right")
    for name in (*plan.models, "all"):
        for mode in MODES:
            m = report["modes"][mode]
            s = m["all"] if name == "all" else m["models"][name]
            times = (_ms(s[k]) for k in ("ttft_mean", "ttft_p50", "ttft_p99", "tpot_mean"))
            table.add_row(name, mode, f"{s['completed']}/{s['requests']}", *times, end_section=mode == "elastic")
    console.print(table)
    r = report["elastic_over_static"]
    e, s = report["modes"]["elastic"], report["modes"]["static"]
    console.print(
        f"elastic / static TTFT: mean [bold]{r['ttft_mean']:.2f}[/], p50 {r['ttft_p50']:.2f}, "
        f"p99 [bold]{r['ttft_p99']:.2f}[/] (lower is better); TPOT {r['tpot_mean']:.2f}. KV memory at most "
        f"{format_bytes(e['peak_kv_bytes'])} (elastic, {e['sleeps']} sleeps, {e['wakes']} wakes) vs "
        f"{format_bytes(s['peak_kv_bytes'])} held throughout (static)."
    )


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def _plot(path: Path, plan: DemoPlan, results: dict[str, Any], device: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(MODES), 1, figsize=(11, 6.5), sharex=True, sharey=True, layout="constrained")
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    top = plan.budget / MiB * 1.45  # room above the budget line for the arrival ticks
    for ax, mode in zip(axes, MODES, strict=True):
        samples = results[mode]["samples"]
        t = [s[0] for s in samples]
        stacks = [[s[1].get(name, 0) / MiB for s in samples] for name in plan.models]
        ax.stackplot(t, stacks, labels=plan.models, colors=colors[: len(plan.models)], alpha=0.8, step="post")
        ax.axhline(plan.budget / MiB, color="black", linestyle="--", linewidth=1, label="budget")
        # When each model's requests arrived: a row of ticks per model at the top, in axes coordinates (not MiB).
        strip = ax.get_xaxis_transform()
        for i, name in enumerate(plan.models):
            at = [o.arrival.at for o in results[mode]["outcomes"] if o.arrival.model == name]
            ax.plot(at, [0.9 - 0.055 * i] * len(at), "|", color=colors[i], markersize=6, transform=strip)
        ax.text(0.005, 0.985, "requests arriving, per model", transform=ax.transAxes, va="top", fontsize=7)
        ax.set_ylim(0, top)
        ax.set_title(f"{mode}: " + ("each model holds a fixed third" if mode == "static"
                                    else "the models share the budget; idle ones sleep"), loc="left")  # fmt: skip
        ax.set_ylabel("KV memory (MiB)")
    axes[-1].set_xlabel("seconds since the trace began")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle(f"elastikv demo: KV memory per model over time, {device}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
