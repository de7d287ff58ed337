"""``elastikv bench multi-model --merge``: one sweep from several runs' results files of the same plan (a sweep
longer than one command, or a rate repeated), with its headline figures computed again over all of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from elastikv.bench.report import plot, print_report, results_stem, save
from elastikv.bench.stats import summarize
from elastikv.errors import ConfigError


def merge_reports(paths: list[Path]) -> dict[str, Any]:
    """One sweep from several runs of the same plan but for the traces (a sweep longer than one command). A rate
    found in several files is a repeat: its runs are pooled (the light-load figure) and each is shown. Runs may
    differ in their modes (a mode added later): each rate shows the modes it ran; static and elastic must be in
    every run, since the headline figures compare them."""
    if len({Path(p).resolve() for p in paths}) != len(paths):
        raise ConfigError("a file is given twice to --merge: each run would count twice")
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    # the traces, the order and the modes (runs with fewer modes than others), not the system under test
    keep = ("rates", "duration", "seed", "trace", "elastic_first", "modes")
    for p, r in zip(paths, reports, strict=True):
        a = {k: v for k, v in first["plan"].items() if k not in keep}
        b = {k: v for k, v in r["plan"].items() if k not in keep}
        if a != b or r["device"] != first["device"]:
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            raise ConfigError(f"{p}: another plan or device than {paths[0]} ({', '.join(diff) or 'device'}); "
                              "merge runs of one plan only")  # fmt: skip
    for p, r in zip(paths, reports, strict=True):  # a partial report (a run cut short) joins if both ran
        if not all({"static", "elastic"} <= set(run["modes"]) for run in r["runs"]):
            raise ConfigError(f"{p}: a run without both static and elastic modes cannot join a sweep (its headline "
                              "figures compare them)")  # fmt: skip
    merged = dict(first)
    merged["runs"] = [run for r in reports for run in r["runs"]]
    merged.pop("partial", None)  # each run says which modes it has
    modes = list(dict.fromkeys(m for r in reports for m in r["plan"].get("modes", ("static", "elastic"))))
    merged["plan"] = dict(first["plan"], rates=sorted(run["rate"] for run in merged["runs"]), modes=modes)
    merged["merged_from"] = [{"file": Path(p).name, "date": r["date"], "commit": r["commit"], "command": r["command"]}
                             for p, r in zip(paths, reports, strict=True)]  # fmt: skip
    return summarize(merged)


def merge_and_save(paths: list[Path], out: Path) -> dict[str, Any]:
    """Merge several runs' JSON (see :func:`merge_reports`) and write the sweep's JSON, Markdown and PNG."""
    report = merge_reports(paths)
    stem = results_stem(out, report["device"], "multi-model-sweep")
    plot(stem.with_suffix(".png"), report)
    report["png"] = str(stem.with_suffix(".png"))
    print_report(Console(), report)
    save(stem, report)
    return report
