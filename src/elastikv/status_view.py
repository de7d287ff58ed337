"""``elastikv status`` as tables: one per device, a row per instance (KV, weights, other) and per model asleep."""

from __future__ import annotations

import time

from rich.console import Group
from rich.table import Table
from rich.text import Text

from elastikv.config import format_bytes
from elastikv.ledger_rows import DeviceSummary


def _short(n: int) -> str:
    """Bytes in a few characters, for tables: 1.1G, 256M, 0."""
    for unit, size in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _ago(t: float) -> str:
    dt = max(0.0, time.time() - t)
    return f"{dt:.0f}s ago" if dt < 120 else f"{dt / 60:.0f}m ago" if dt < 7200 else f"{dt / 3600:.0f}h ago"


def status_tables(summaries: list[DeviceSummary]) -> Group | Text:
    if not summaries:
        return Text("no elastikv instance is running (no ledger found)")
    parts: list[Table | Text] = []
    for d in summaries:
        weights = sum(h.weights_bytes for h in d.holdings)
        other = sum(h.other_bytes for h in d.holdings)
        table = Table(
            title=f"{d.device_label}: {format_bytes(d.held_bytes)} held (KV {format_bytes(d.mapped_bytes)}, weights "
            f"{format_bytes(weights)}, other {format_bytes(other)}) of a {format_bytes(d.budget_bytes)} budget "
            f"({d.budget} of {format_bytes(d.total_bytes)})",
            title_justify="left",
        )
        cols = ("name", "engine", "state", "pid", "mapped", "in use", "reserve", "limit", "weights", "other", "share",
                "active")  # fmt: skip
        for col in cols:
            table.add_column(col, justify="left" if col in ("name", "engine", "state") else "right", no_wrap=True)
        kv_names = {r.name for r in d.instances}
        for r in d.instances:
            h = d.holding_of(r.name)
            held = r.mapped_bytes + (h.held_bytes if h else 0)
            table.add_row(
                r.name,
                r.engine,
                "awake",
                str(r.pid),
                _short(r.mapped_bytes),
                _short(r.in_use_bytes),
                _short(r.reserve_bytes),
                _short(r.limit_bytes),
                _short(h.weights_bytes) if h else "",
                _short(h.other_bytes) if h else "",
                f"{held / d.total_bytes:.1%}",
                _ago(r.last_activity),
            )
        for h in d.holdings:  # awake with no KV instance open (e.g. between a wake and its first request)
            if h.name not in kv_names:
                table.add_row(h.name, "", "awake", str(h.pid), "none", "", "", "", _short(h.weights_bytes),
                              _short(h.other_bytes), f"{h.held_bytes / d.total_bytes:.1%}", _ago(h.since))  # fmt: skip
        for a in d.asleep:  # put to sleep by a router: nothing mapped, woken by its next request
            woke = "never woke" if a.last_wake is None else f"woke {_ago(a.last_wake)}"
            level = "stopped" if a.level == "stop" else f"asleep (level {a.level})"
            table.add_row(a.name, a.engine, level, "", "none", "", "", "", "", "", "0%",
                          f"for {_ago(a.since)[:-4]}, {woke}")  # fmt: skip
        if not d.instances and not d.asleep:
            table.add_row("(none)", *[""] * (len(cols) - 1))
        parts.append(table)
    return Group(*parts)
