"""SGLang 0.5.23 end to end on this CPU: its real scheduler, radix cache, allocator kernels and torch-native
attention, started unchanged (``ELASTIKV=1`` through its plugin hook), against the same SGLang without elastikv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

MIB = 1024**2
SCRIPT = Path(__file__).with_name("engine_script.py")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def run(model: Path, tmp: Path, page_size: int, elastic: bool, **env: str) -> tuple[dict[str, Any], str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIKV")}
    full.update(ELASTIKV_LEDGER_DIR=str(tmp / "ledger"), **env)
    if elastic:
        full["ELASTIKV"] = "1"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(page_size), str(model)], env=full, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT ") :]), proc.stderr


@pytest.fixture(scope="module")
def static(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result, _ = run(model, tmp_path_factory.mktemp("static"), 16, elastic=False)
    return result


def test_elastic_sglang_matches_static_and_memory_follows_load(model: Path, tmp_path: Path, static: Any) -> None:
    page = 8 * MIB  # tiny Llama, page 16 tokens: one elastikv page = 512 SGLang pages in 2 layers x K,V
    result, log = run(
        model,
        tmp_path,
        16,
        elastic=True,
        ELASTIKV_HOST_MEMORY="512MiB",
        ELASTIKV_RESERVE="0",
        ELASTIKV_PREFIX_CACHE="8MiB",
        ELASTIKV_BOOK_WEIGHTS="on",
        PAGE_BYTES=str(page),
        PREFIX_BYTES=str(8 * MIB),
    )
    # Every SGLang process patched (HTTP-less Engine: main, scheduler, detokenizer), one active line.
    assert log.count("SGLang 0.5.23 patched in process") == 3, log[-4000:]
    assert "elastikv active: engine=sglang 0.5.23" in log
    # Invariant 7: greedy output identical to SGLang without elastikv, cached-prefix pass included.
    assert result["tokens"] == static["tokens"]
    assert result["shared"] == static["shared"] and result["shared"][0] == result["shared"][1]
    # Memory: the burst needs 12 x 1500 tokens (> 2 pages); idle and after, at most the null page + the prefix
    # cache bound + one page of slack (eviction is by age, not page-aware); asleep, the null page alone.
    assert result["peak"] >= 3 * page + page, result
    assert result["after"] < result["peak"] and result["after"] <= 3 * page, result
    assert result["idle"] <= 3 * page, result
    assert result["released"] == page, result
    assert result["tokens_after_wake"] == static["tokens"]
    # The scheduler booked the model's weights beside its KV: one holding, the files' parameters plus the buffers
    # SGLang's model holds (its rotary cache among them): 2.26 MB for 1.71 MB of files here.
    files = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    assert len(result["weights"]) == 1 and files <= result["weights"][0] <= 2 * files, (result, files)


def test_a_budget_that_can_never_hold_one_request_stops_sglang_at_start_saying_why(tmp_path: Path) -> None:
    """Weights booked (as on a GPU) in a budget that leaves less KV than one request of the model's context length
    (32,768 tokens, 32 MiB here): such requests would wait for ever, so the scheduler refuses to start, naming the
    figures and the ways out (as vLLM does for its own cache and elastikv's vLLM adapter for the budget)."""
    from tiny_models import build_tiny_llama

    model = build_tiny_llama(tmp_path / "long", max_position_embeddings=32768)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIKV")}
    env.update(
        ELASTIKV="1",
        ELASTIKV_LEDGER_DIR=str(tmp_path / "ledger"),
        ELASTIKV_HOST_MEMORY="512MiB",
        ELASTIKV_RESERVE="0",
        ELASTIKV_BOOK_WEIGHTS="on",
        ELASTIKV_NAME="small",
        ELASTIKV_DEVICE_BUDGET=str(2 * weights + 10 * MIB),
    )  # weights (and buffers) and the null page fit
    proc = subprocess.run([sys.executable, str(SCRIPT), "16", str(model)], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    out = proc.stdout + proc.stderr
    served = any(line.startswith("RESULT ") for line in proc.stdout.splitlines())
    assert proc.returncode != 0 and not served, out[-3000:]
    assert "small could never hold one 32768-token request (32 MiB of KV)" in out, out[-6000:]
    assert "lower --context-length" in out and "ELASTIKV_BOOK_WEIGHTS=off" in out
