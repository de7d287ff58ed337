"""The multi-model benchmark's results, typed: one mode's figures for one replayed trace (:class:`ModeResult`) and
one rate's run across every mode, with the ratios between them (:class:`RunResult`).

``as_json`` gives the report's JSON shape. Its keys are the results files' format (``benchmarks/results``, read
back by ``--merge``, the renderers and the statistics): a field renamed here breaks every older file.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from elastikv.bench.plan import comparisons
from elastikv.bench.replay import Replayed
from elastikv.bench.stats import ratio
from elastikv.bench.workload import Arrival, Outcome, summary

RATIO_FIGURES = ("ttft_mean", "ttft_p50", "ttft_p99", "tpot_mean")  # what ``<mode>_over_<baseline>`` compares


@dataclasses.dataclass(frozen=True)
class ModeResult:
    """One mode's figures for one replayed trace (times in seconds, memory in bytes)."""

    all: dict[str, float | int]  # workload.summary of every request
    ttft_by_request: list[float | None]  # in trace order (the same requests in every mode): pooling, pairing
    models: dict[str, dict[str, float | int]]  # workload.summary per model
    seconds: float  # from the first send to the last answer
    output_tokens_per_s: float
    prompt_tokens_per_s: float
    peak_kv_bytes: int  # the most KV memory all models held at once
    peak_kv_bytes_per_model: dict[str, int]
    memory: list[tuple[float, dict[str, int]]]  # (seconds, KV bytes each model held), sampled
    engine_metrics: dict[str, dict[str, float]]  # cumulative per engine since its start (driver time...)
    errors: dict[str, int] = dataclasses.field(default_factory=dict)  # why requests failed: the 5 most common
    # vLLM's own counts for this trace per model: preemptions, mean queue and prefill seconds (engine_metrics.py)
    engine_counts: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, r: Replayed, models: Sequence[str]) -> ModeResult:
        ok = [o for o in r.outcomes if o.ok]
        in_order = sorted(r.outcomes, key=lambda o: (o.arrival.at, o.arrival.model))  # the trace's order
        return cls(
            all=summary(r.outcomes),
            ttft_by_request=[round(o.ttft, 4) if o.ok and o.ttft is not None else None for o in in_order],
            models={n: summary([o for o in r.outcomes if o.arrival.model == n]) for n in models},
            seconds=round(r.seconds, 2),
            output_tokens_per_s=sum(o.tokens for o in ok) / r.seconds if r.seconds else math.nan,
            prompt_tokens_per_s=sum(o.arrival.prompt_tokens for o in ok) / r.seconds if r.seconds else math.nan,
            peak_kv_bytes=max((sum(h.values()) for _, h in r.samples), default=0),
            peak_kv_bytes_per_model={n: max((h.get(n, 0) for _, h in r.samples), default=0) for n in models},
            memory=[(round(t, 2), h) for t, h in r.samples],
            engine_metrics=r.engine_metrics,
            errors=dict(Counter(_why(o) for o in r.outcomes if not o.ok).most_common(5)),
            engine_counts=r.engine_counts,
        )

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _why(o: Outcome) -> str:
    return (o.error or f"HTTP {o.status}, no token")[:200]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One rate's trace, replayed in every mode."""

    rate: float  # the peak request rate per model (requests/s)
    requests: int
    arrivals: dict[str, list[float]]  # each model's arrival times (seconds)
    modes: dict[str, ModeResult]
    ratios: dict[str, dict[str, float]]  # "<mode>_over_<baseline>" -> RATIO_FIGURES, mode's over baseline's

    @classmethod
    def of(
        cls, rate: float, trace: Sequence[Arrival], replayed: dict[str, Replayed], models: Sequence[str]
    ) -> RunResult:
        """The run of ``trace`` at ``rate`` from each mode's replay (``replayed``, in the plan's mode order)."""
        modes = {mode: ModeResult.of(r, models) for mode, r in replayed.items()}
        ratios = {
            f"{mode}_over_{base}": {k: ratio(modes[mode].all[k], modes[base].all[k]) for k in RATIO_FIGURES}
            for mode, base in comparisons(tuple(modes))  # elastic_over_static, elastic_over_kvcached, ...
        }
        arrivals = {n: [a.at for a in trace if a.model == n] for n in models}
        return cls(rate=rate, requests=len(trace), arrivals=arrivals, modes=modes, ratios=ratios)

    def as_json(self) -> dict[str, Any]:
        """The run as the report keeps it: the ratios are keys of the run itself, beside ``modes``."""
        modes = {mode: m.as_json() for mode, m in self.modes.items()}
        return {"rate": self.rate, "requests": self.requests, "arrivals": self.arrivals, "modes": modes, **self.ratios}
