"""The multi-model benchmark's report, rendered and written: a terminal table, a Markdown summary, a PNG (TTFT
against rate per mode; KV memory per model over time), and the results files (JSON, Markdown, PNG). Reads only
the JSON-ready report ``bench/multi_model.py`` makes, so a merged or old report renders the same way (reports from
before the vLLM modes have no ``plan.modes``: static and elastic)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from elastikv.bench.stats import best_peak
from elastikv.config import format_bytes
from elastikv.router.engine_process import FIRST_ERROR

GiB = 1024**3
COLORS = {"static": "tab:red", "elastic": "tab:blue", "kvcached": "tab:green", "elastic-v2": "tab:purple"}


def modes_of(report: dict[str, Any]) -> list[str]:
    return list(report["plan"].get("modes", ("static", "elastic")))


def run_modes(report: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """The modes ``run`` has, in the report's order (a merged sweep may hold runs of fewer modes than others)."""
    return [mode for mode in modes_of(report) if mode in run["modes"]]


def _ratio_keys(run: dict[str, Any]) -> list[tuple[str, tuple[str, str]]]:
    """The run's ``<mode>_over_<baseline>`` entries, as (key, (mode, baseline)), static baselines first."""
    keys = [k for k in run if k.endswith(("_over_static", "_over_kvcached"))]
    return [
        (k, (k.split("_over_")[0], k.split("_over_")[1]))
        for k in sorted(keys, key=lambda k: (k.endswith("kvcached"), k))
    ]


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def print_report(console: Console, report: dict[str, Any]) -> None:
    """The report as a terminal table of every rate and mode, then its ratios and headline figures."""
    table = Table(title=f"multi-model benchmark on {report['device']}: TTFT and TPOT (ms), per rate and mode",
                  title_justify="left")  # fmt: skip
    for col in ("rate", "mode", "done", "TTFT mean", "p50", "p99", "TPOT mean", "out tok/s", "prompt tok/s", "KV peak"):
        table.add_column(col, justify="left" if col in ("mode",) else "right")
    for run in report["runs"]:
        for mode in run_modes(report, run):
            m = run["modes"][mode]
            s = m["all"]
            table.add_row(
                f"{run['rate']:g}", mode, f"{s['completed']}/{s['requests']}",
                *(_ms(s[k]) for k in ("ttft_mean", "ttft_p50", "ttft_p99", "tpot_mean")),
                f"{m['output_tokens_per_s']:.0f}", f"{m['prompt_tokens_per_s']:.0f}", format_bytes(m["peak_kv_bytes"]),
                end_section=mode == run_modes(report, run)[-1],
            )  # fmt: skip
    console.print(table)
    for run in report["runs"]:
        for key, (mode, base) in _ratio_keys(run):
            r = run[key]
            console.print(f"rate {run['rate']:g}: {mode} / {base} TTFT mean {r['ttft_mean']:.2f}, p50 "
                          f"{r['ttft_p50']:.2f}, p99 {r['ttft_p99']:.2f}; TPOT {r['tpot_mean']:.2f}")  # fmt: skip
    for mode, why in report.get("failed_modes", {}).items():
        console.print(f"[red]{mode} failed[/] (its requests count as failed): {failure_summary(why)}")
    for line in request_failures(report):
        console.print(f"[red]{line}[/]")
    if "peak_p99_ttft_kvcached_over_elastic" in report:
        console.print(f"at {report['best_peak_rate']:g} req/s kvcached's p99 TTFT is "
                      f"[bold]{report['peak_p99_ttft_kvcached_over_elastic']:.2f}x[/] elastic's")  # fmt: skip
    console.print(
        f"static queues from {report['static_queues_from_rate']} req/s ({report['queueing_rule']}); at "
        f"{report['best_peak_rate']:g} req/s static p99 TTFT is "
        f"[bold]{report['peak_p99_ttft_static_over_elastic']:.1f}x[/] elastic's; at the lightest, elastic mean TTFT "
        f"is [bold]{report['light_mean_ttft_elastic_over_static']:.3f}x[/] static's ({_light_text(report['light'])}), "
        f"its decode speed [bold]{report['light_decode_elastic_over_static']:.3f}x[/] static's"
    )
    for mode, light in report.get("light_by_mode", {}).items():
        console.print(f"at the lightest, {mode} mean TTFT is [bold]{light['ttft_mean_ratio']:.3f}x[/] static's "
                      f"({_light_text(light)}), its decode speed {light['decode_ratio']:.3f}x")  # fmt: skip


def _settings_line(report: dict[str, Any]) -> list[str]:
    """The elastikv settings the engines inherited from the benchmark's environment (e.g. ``ELASTIKV_CHUNK``),
    as one line, or none."""
    env = {k: v for k, v in report.get("environment", {}).items() if k != "ELASTIKV_COMMIT"}
    return ["", "Settings from the environment: " + ", ".join(f"`{k}={v}`" for k, v in env.items())] if env else []


def _light_text(light: dict[str, Any]) -> str:
    ci = light["ci95"]
    interval = f", 95% interval {ci[0]:.3f}-{ci[1]:.3f}" if ci else ""
    runs = ", ".join(f"{r:.3f}" for r in light["per_run"])
    return f"{light['requests']} requests in {light['runs']} run(s){interval}; per run {runs}"


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown summary (what the results directory keeps beside the JSON)."""
    p = report["plan"]
    lines = [
        f"# multi-model benchmark: {len(p['models'])} models on {report['device']}",
        "",
        f"{report['date']}, commit {report['commit']}: `{report['command']}`",
        "",
        f"KV budget {format_bytes(p['kv_budget'])} ({report['static_share_tokens']} tokens per model when split), "
        f"requests of {p['prompt_tokens']} prompt + {p['output_tokens']} output tokens, {p['duration']:g} s of trace "
        f"per rate (peaks {p['peak_width']:g} s wide, base rate {p['base_rate']:g}/s), attention "
        f"{report.get('attention', 'sdpa')} in every mode. Why: {report['why']}.",
        *_settings_line(report),
        "",
        "| peak rate (req/s) | mode | completed | TTFT mean (ms) | p50 | p99 | TPOT mean (ms) | output tok/s | "
        "prompt tok/s | KV peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        for mode in run_modes(report, run):
            m = run["modes"][mode]
            s = m["all"]
            times = " | ".join(_ms(s[k]) for k in ("ttft_mean", "ttft_p50", "ttft_p99", "tpot_mean"))
            lines.append(
                f"| {run['rate']:g} | {mode} | {s['completed']}/{s['requests']} | {times} | "
                f"{m['output_tokens_per_s']:.0f} | {m['prompt_tokens_per_s']:.0f} | "
                f"{format_bytes(m['peak_kv_bytes'])} |"
            )
    lines += ["", "| peak rate | ratio | TTFT mean | p50 | p99 | TPOT mean |", "|---|---|---|---|---|---|"]
    for run in report["runs"]:
        for key, (mode, base) in _ratio_keys(run):
            r = run[key]
            lines.append(f"| {run['rate']:g} | {mode} / {base} | {r['ttft_mean']:.3f} | {r['ttft_p50']:.3f} | "
                         f"{r['ttft_p99']:.3f} | {r['tpot_mean']:.3f} |")  # fmt: skip
    lines += ["", *_headline(report), *(f"- **{mode} failed**: {failure_summary(why)}"
                                         for mode, why in report.get("failed_modes", {}).items()),
              *(f"- {line}" for line in request_failures(report)), "", "Per model:", "",
              "| peak rate | model | mode | completed | TTFT mean (ms) | p99 | KV peak |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in report["runs"]:
        for name in p["models"]:
            for mode in run_modes(report, run):
                m = run["modes"][mode]
                s = m["models"][name]
                lines.append(f"| {run['rate']:g} | {name} | {mode} | {s['completed']}/{s['requests']} | "
                             f"{_ms(s['ttft_mean'])} | {_ms(s['ttft_p99'])} | "
                             f"{format_bytes(m['peak_kv_bytes_per_model'][name])} |")  # fmt: skip
    return "\n".join([*lines, *_engine_tables(report)]) + "\n"


def _headline(report: dict[str, Any]) -> list[str]:
    """The headline figures' lines; for a partial report (modes left to run), which those are instead."""
    if "partial" in report:
        part = report["partial"]
        done, left = ", ".join(part["done"]) or "none", ", ".join(part["left"])
        return [f"- **partial report** ({part['why']}): modes done {done}; left {left}"]
    return [
        f"- static queues from: {report['static_queues_from_rate']} req/s ({report['queueing_rule']})",
        f"- best peak rate ({report['best_peak_rate']:g} req/s): static p99 TTFT / elastic p99 TTFT = "
        f"**{report['peak_p99_ttft_static_over_elastic']:.2f}** (target >= 5)",
        f"- lightest rate: elastic mean TTFT / static = **{report['light_mean_ttft_elastic_over_static']:.3f}** "
        f"(target <= 1.03; {_light_text(report['light'])})",
        f"- lightest rate: elastic decode speed / static (static TPOT / elastic TPOT) = "
        f"**{report['light_decode_elastic_over_static']:.3f}** (target >= 0.98)",
        *(
            f"- lightest rate: {mode} mean TTFT / static = **{light['ttft_mean_ratio']:.3f}** "
            f"({_light_text(light)}); decode speed / static **{light['decode_ratio']:.3f}**"
            for mode, light in report.get("light_by_mode", {}).items()
        ),
        *(
            [
                f"- best peak rate: kvcached p99 TTFT / elastic p99 TTFT = "
                f"**{report['peak_p99_ttft_kvcached_over_elastic']:.2f}** (aim >= 1.5)"
            ]
            if "peak_p99_ttft_kvcached_over_elastic" in report
            else []
        ),
    ]


def _engine_tables(report: dict[str, Any]) -> list[str]:
    """The elastic engines' driver time and vLLM's own counts, where the report has them."""
    lines: list[str] = []
    driver = [(run["rate"], name, f) for run in report["runs"]
              for name, f in run["modes"].get("elastic", {}).get("engine_metrics", {}).items() if f]  # fmt: skip
    if driver:
        lines += ["", "Elastic engines' allocators in the driver (cumulative since the engine started, seconds):", "",
                  "| after rate | model | caller map | background map | unmap | pages mapped (by caller) |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for rate, name, f in driver:
            g = {k.removeprefix("kv_"): v for k, v in f.items()}
            maps, by_caller = g.get("pages_mapped_total", 0), g.get("pages_mapped_by_caller", 0)
            lines.append(f"| {rate:g} | {name} | {g.get('caller_map_seconds', 0):.3f} | "
                         f"{g.get('background_map_seconds', 0):.3f} | {g.get('unmap_seconds', 0):.3f} | "
                         f"{maps:.0f} ({by_caller:.0f}) |")  # fmt: skip
    counted = [(run["rate"], mode, name, c) for run in report["runs"] for mode in run_modes(report, run)
               for name, c in run["modes"][mode].get("engine_counts", {}).items()]  # fmt: skip
    if counted:
        lines += ["", "Where TTFT went, by vLLM's own counts (means over this rate's requests; queue: waiting to be "
                  "scheduled, for KV memory or for compute):", "",
                  "| peak rate | mode | model | requests | queue mean (ms) | prefill mean (ms) | preemptions |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {rate:g} | {mode} | {name} | {c['requests']:.0f} | {_ms(c['queue_s'])} | {_ms(c['prefill_s'])} | "
                  f"{c['preemptions']:.0f} |" for rate, mode, name, c in counted]  # fmt: skip
    return lines


def plot(path: Path, report: dict[str, Any]) -> None:
    """The report's PNG: TTFT against rate per mode; elastic's KV memory per model at the best peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan, device, runs = report["plan"], report["device"], report["runs"]
    models, budget = plan["models"], plan["kv_budget"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8))
    others = iter(["tab:olive", "tab:cyan", "tab:brown", "tab:pink", "tab:gray"])  # variants (elastic@chunk=8MiB)
    for mode in modes_of(report):  # a rate run more than once: each run a point, the line their mean
        color = COLORS.get(mode) or next(others, "tab:gray")
        ran = [r for r in runs if mode in r["modes"]]  # a merged sweep: some runs may lack a mode
        if all(math.isnan(r["modes"][mode]["all"]["ttft_mean"]) for r in ran):
            continue  # a mode that failed, or answered nothing: nothing to draw (the tables say why)
        mode_rates = sorted({r["rate"] for r in ran})
        for key, style in (("ttft_p99", "-o"), ("ttft_mean", "--s")):
            values = [[r["modes"][mode]["all"][key] for r in ran if r["rate"] == rate] for rate in mode_rates]
            top.plot(mode_rates, [sum(v) / len(v) for v in values], style, color=color,
                     label=f"{mode} {key.replace('ttft_', 'TTFT ')}")  # fmt: skip
            top.plot([r["rate"] for r in ran], [r["modes"][mode]["all"][key] for r in ran], style[-1], color=color,
                     alpha=0.4)  # fmt: skip
    top.set_xscale("log")
    top.set_yscale("log")
    top.set_xlabel("peak request rate per model (requests/s)")
    top.set_ylabel("time to first token (s)")
    top.legend(fontsize=8)
    top.set_title("TTFT against load: static split vs elastic sharing", loc="left")
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    shown = best_peak(runs)
    samples = shown["modes"]["elastic"]["memory"]
    t = [s[0] for s in samples]
    stacks = [[s[1].get(name, 0) / GiB for s in samples] for name in models]
    bottom.stackplot(t, stacks, labels=models, colors=colors[: len(models)], alpha=0.8, step="post")
    share = budget / len(models) / GiB
    for k in range(1, len(models) + 1):
        bottom.axhline(share * k, color="black", linestyle=":", linewidth=0.8)
    bottom.axhline(budget / GiB, color="black", linestyle="--", linewidth=1, label="budget (static: split)")
    for i, name in enumerate(models):
        at = shown["arrivals"][name]
        bottom.plot(at, [-0.02 * budget / GiB * (i + 1)] * len(at), "|", color=colors[i % len(colors)], markersize=6)
    bottom.set_xlabel("seconds (ticks below: request arrivals per model)")
    bottom.set_ylabel("KV memory mapped (GiB)")
    bottom.legend(loc="upper right", fontsize=8, ncols=len(models) + 1)
    bottom.set_title(f"elastic, peak rate {shown['rate']:g} req/s: KV memory per model (dotted: the static split)",
                     loc="left")  # fmt: skip
    fig.suptitle(f"elastikv multi-model benchmark, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def request_failures(report: dict[str, Any]) -> list[str]:
    """Why requests failed in the modes that ran (a failed mode's reason is given apart): one line per rate and
    mode with failures, their most common errors and counts."""
    lines = []
    for run in report["runs"]:
        for mode in run_modes(report, run):
            m = run["modes"][mode]
            if mode in report.get("failed_modes", {}) or not m["all"]["failed"]:
                continue
            why = "; ".join(f"{error} (x{n})" for error, n in m.get("errors", {}).items())
            lines.append(f"rate {run['rate']:g}, {mode}: {m['all']['failed']} of {m['all']['requests']} requests "
                         f"failed: {why or 'no reason recorded'}")  # fmt: skip
    return lines


def failure_summary(why: str, tail: int = 600) -> str:
    """A failed mode's reason, short: each engine's first logged error (where its start failure names one) and
    the reason's last ``tail`` characters."""
    firsts = [line.strip() for line in why.splitlines() if line.startswith(FIRST_ERROR)]
    return "\n".join([*dict.fromkeys(firsts), why[-tail:]])


def results_stem(out: Path, device: str, name: str = "multi-model") -> Path:
    """``out/<name>-<device>-<time>``: the results files' path less their suffix (``out`` is made)."""
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    return out / f"{name}-{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def save(stem: Path, report: dict[str, Any]) -> None:
    """Write the report's JSON and Markdown beside its PNG (made already), and copy all three under
    ``$OUT/results`` when the device tool runs it."""
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    written = [suffix for suffix in (".json", ".md", ".png") if stem.with_suffix(suffix).exists()]  # partial: no PNG
    if os.environ.get("OUT"):
        dest = Path(os.environ["OUT"], "results")
        dest.mkdir(parents=True, exist_ok=True)
        for suffix in written:
            shutil.copy(stem.with_suffix(suffix), dest)
    Console().print(f"wrote {stem}{', '.join(written)}" + (" (partial)" if "partial" in report else ""))
