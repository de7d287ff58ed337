"""`elastikv demo`, run as the README says (shorter trace): both modes answer every request, the table, the
ratio line and the files come out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[serve]'")
pytest.importorskip("matplotlib", reason="needs matplotlib: pip install -e '.[serve]'")

pytestmark = pytest.mark.slow


def test_the_demo_compares_static_and_elastic_and_writes_its_files(tmp_path: Path) -> None:
    env_cmd = [sys.executable, "-m", "elastikv.cli", "demo", "--duration", "9", "--out", str(tmp_path / "out")]
    r = subprocess.run(env_cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "elastic / static TTFT: mean" in r.stdout and "llama-a" in r.stdout
    report = json.loads((tmp_path / "out" / "demo.json").read_text())
    for mode in ("static", "elastic"):
        s = report["modes"][mode]["all"]
        assert s["completed"] == s["requests"] == report["requests"] > 50, (mode, s)
        assert report["modes"][mode]["peak_kv_bytes"] <= report["plan"]["budget"]
    assert report["modes"]["static"]["peak_kv_bytes"] == report["plan"]["budget"]  # held from start to end
    assert (tmp_path / "out" / "demo-memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "out" / "trace.jsonl").read_text().splitlines()) == report["requests"]
