"""`elastikv demo`, run as the README says (in CI: the README's own run; elsewhere a shorter trace): both modes
answer every request, the table, the ratio line and the files come out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[serve]'")
pytest.importorskip("matplotlib", reason="needs matplotlib: pip install -e '.[serve]'")

pytestmark = pytest.mark.slow


def test_the_demo_compares_static_and_elastic_and_writes_its_files(tmp_path: Path) -> None:
    """The demo's report, plot and trace. CI has just run the README's own `elastikv demo` (step 1 of .ci/run)
    and points EKV_DEMO_OUT and EKV_DEMO_LOG at its output directory and printout: those are checked here rather
    than running the demo a second time (two minutes of CI's twenty). Elsewhere the test runs a short demo."""
    if os.environ.get("EKV_DEMO_OUT"):
        out, stdout = Path(os.environ["EKV_DEMO_OUT"]), Path(os.environ["EKV_DEMO_LOG"]).read_text()
    else:
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "elastikv.cli", "demo", "--duration", "9", "--out", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        stdout = r.stdout
    assert "elastic / static TTFT: mean" in stdout and "llama-a" in stdout
    report = json.loads((out / "demo.json").read_text())
    for mode in ("static", "elastic"):
        s = report["modes"][mode]["all"]
        assert s["completed"] == s["requests"] == report["requests"] > 50, (mode, s)
        assert report["modes"][mode]["peak_kv_bytes"] <= report["plan"]["budget"]
    assert report["modes"]["static"]["peak_kv_bytes"] == report["plan"]["budget"]  # held from start to end
    assert (out / "demo-memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "trace.jsonl").read_text().splitlines()) == report["requests"]
