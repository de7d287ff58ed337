"""Saving benchmark results: one JSON file per run (named by benchmark, device and date) and a Markdown
summary beside it, under benchmarks/results/ (and $OUT too when the device tool runs us)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device_label: str) -> dict[str, Any]:
    import torch

    commit = os.environ.get("ELASTIKV_COMMIT", "")  # the device copy has no .git: the run command passes it
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent, timeout=10
            ).stdout.strip()
        except Exception:
            commit = ""
    return {
        "device": device_label,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "commit": commit,
    }


def save(name: str, device_label: str, data: dict[str, Any], summary_md: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_label).strip("-").lower()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}-{slug}-{stamp}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    path.with_suffix(".md").write_text(summary_md)
    out = os.environ.get("OUT")
    if out:
        Path(out, "results").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out, "results", path.name))
        shutil.copy(path.with_suffix(".md"), Path(out, "results", path.with_suffix(".md").name))
    return path
