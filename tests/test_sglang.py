"""The SGLang adapter, run where SGLang runs: ``tests/sglang_env`` inside ``.venv-sglang`` (built by
``scripts/sglang-env``: SGLang 0.5.23 and its CPU-installable dependencies over this project's environment, plus
the test-only stand-ins of ``tests/sglang_shims``). SGLang cannot share this interpreter: it pins another
transformers and needs triton, which this environment's vLLM build must not see."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(os.environ.get("EKV_SGLANG_PYTHON", ROOT / ".venv-sglang" / "bin" / "python"))


def test_sglang_adapter_in_the_sglang_environment() -> None:
    if not PYTHON.exists():
        message = f"no SGLang test environment at {PYTHON}: run scripts/sglang-env first"
        if os.environ.get("EKV_REQUIRE_SGLANG") == "1":
            pytest.fail(message)
        pytest.skip(message)
    env = dict(os.environ, EKV_TEST_SGLANG_ENV="1")
    cmd = [str(PYTHON), "-m", "pytest", "tests/sglang_env", "-q", "-p", "no:cacheprovider", "-W", "ignore"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, f"{summary}\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
