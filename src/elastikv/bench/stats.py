"""The multi-model benchmark's headline figures, from its runs: ratios of mode to baseline, the rate from which
static queues, the best peak, and the light-load ratios (TTFT, decode speed) pooled over repeats, TTFT's with a
paired bootstrap interval: elastic's, and every other mode's over static alike (``light_by_mode``).

Reads the report's JSON shape (a fresh run's, or older results files merged by ``--merge``), so that every
results file gives its figures the same way.
"""

from __future__ import annotations

import math
import random
from typing import Any

QUEUEING = 3.0  # static "queues" at a rate whose p99 TTFT is this many times its p50 at the lightest rate
BOOTSTRAP = 2000  # resamples for the light-load interval


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN where either is NaN or ``b`` is 0 (a mode that answered nothing)."""
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def best_peak(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run where static's p99 TTFT is the most times elastic's."""
    return max(
        runs, key=lambda r: ratio(r["modes"]["static"]["all"]["ttft_p99"], r["modes"]["elastic"]["all"]["ttft_p99"])
    )


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The sweep's headline figures, from its runs (lightest rate first; a rate run more than once is pooled)."""
    runs = sorted(report["runs"], key=lambda r: r["rate"])
    report["runs"] = runs
    light = runs[0]["modes"]["static"]["all"]["ttft_p50"]
    queues_from = next((r["rate"] for r in runs if r["modes"]["static"]["all"]["ttft_p99"] > QUEUEING * light), None)
    peak = best_peak(runs)
    report["static_queues_from_rate"] = queues_from
    report["queueing_rule"] = f"static p99 TTFT above {QUEUEING:g}x its p50 at the lightest rate"
    report["best_peak_rate"] = peak["rate"]
    report["peak_p99_ttft_static_over_elastic"] = ratio(
        peak["modes"]["static"]["all"]["ttft_p99"], peak["modes"]["elastic"]["all"]["ttft_p99"]
    )
    if "kvcached" in peak["modes"]:
        report["peak_p99_ttft_kvcached_over_elastic"] = ratio(
            peak["modes"]["kvcached"]["all"]["ttft_p99"], peak["modes"]["elastic"]["all"]["ttft_p99"]
        )
    lightest = [r for r in runs if r["rate"] == runs[0]["rate"]]
    report["light"] = pooled(lightest)
    report["light_mean_ttft_elastic_over_static"] = report["light"]["ttft_mean_ratio"]
    report["light_decode_elastic_over_static"] = report["light"]["decode_ratio"]
    others = dict.fromkeys(m for r in lightest for m in r["modes"] if m not in ("static", "elastic"))
    report["light_by_mode"] = {  # kvcached, elastic-v2, variants (elastic@chunk=8MiB): each over static, alike
        m: pooled([r for r in lightest if m in r["modes"]], m) for m in others
    }
    return report


def decode_ratio(runs: list[dict[str, Any]], mode: str = "elastic") -> float:
    """``mode``'s decode speed over static's (static's mean TPOT over the mode's), pooled over ``runs`` with each
    run's mean weighted by the requests it completed: above 1, ``mode`` decodes faster."""

    def tpot(m: str) -> float:
        n = [int(run["modes"][m]["all"]["completed"]) for run in runs]
        total = sum(k * float(run["modes"][m]["all"]["tpot_mean"]) for k, run in zip(n, runs, strict=True))
        return total / max(sum(n), 1)

    return ratio(tpot("static"), tpot(mode))


def pooled(runs: list[dict[str, Any]], mode: str = "elastic") -> dict[str, Any]:
    """``mode``'s mean TTFT over static's, pooled over ``runs`` (repeats of one rate: each request counts once), with
    a 95% interval from a paired bootstrap over the requests when every run kept them (reports from before
    2026-11-24 did not: their means are pooled, weighted by requests, and no interval is given). Requests of one
    run overlap in time and are not independent, so the interval is read beside the per-run ratios, not alone."""
    per_run = [run[f"{mode}_over_static"]["ttft_mean"] for run in runs]
    kept = [(run["modes"]["static"].get("ttft_by_request"), run["modes"][mode].get("ttft_by_request")) for run in runs]
    if any(s is None or e is None for s, e in kept):
        n = [run["modes"]["static"]["all"]["completed"] for run in runs]
        static = sum(k * run["modes"]["static"]["all"]["ttft_mean"] for k, run in zip(n, runs, strict=True))
        other = sum(k * run["modes"][mode]["all"]["ttft_mean"] for k, run in zip(n, runs, strict=True))
        return {"runs": len(runs), "requests": sum(n), "ttft_mean_ratio": ratio(other, static), "ci95": None,
                "per_run": per_run, "decode_ratio": decode_ratio(runs, mode)}  # fmt: skip
    pairs = [(s, e) for ss, es in kept for s, e in zip(ss, es, strict=True) if s is not None and e is not None]
    rng = random.Random(0)
    ratios = []
    for _ in range(BOOTSTRAP):
        sample = rng.choices(pairs, k=len(pairs))
        ratios.append(ratio(sum(e for _, e in sample), sum(s for s, _ in sample)))
    ratios.sort()
    ci = [ratios[int(0.025 * BOOTSTRAP)], ratios[int(0.975 * BOOTSTRAP) - 1]] if pairs else None
    mean_ratio = ratio(sum(e for _, e in pairs), sum(s for s, _ in pairs))
    return {"runs": len(runs), "requests": len(pairs), "ttft_mean_ratio": mean_ratio, "ci95": ci, "per_run": per_run,
            "decode_ratio": decode_ratio(runs, mode)}  # fmt: skip
