"""Tensor parallelism on vLLM's CPU build (issue 24, the part this machine allows): two worker processes, one per
rank, each with its own elastic KV space over host memory; the engine core maps every page on both ranks through
``PeerPages`` (all or nothing) and unmaps only after each worker drains.

What needs the two-GPU machine kind (TP=2 on two H200s with CUDA graphs, a map refused on one device because
another process filled it) is not here; ``tests/test_peer.py`` drives the same ``PeerPages`` over real page servers
and sockets, including a map that fails on one rank and is undone on the other.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from tests.tiny_models import build_tiny_llama
from tests.vllm_harness import Engine, engine_env, needs_vllm, prompts

from elastikv.procfs import process_start_time

pytestmark = [needs_vllm, pytest.mark.slow]

# vLLM's CPU workers each bind their threads to cores; on one NUMA node it needs telling which (one core a rank).
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
MIXED = prompts(6, 40, seed=11) + prompts(6, 300, seed=12) + prompts(4, 700, seed=13)  # mixed lengths


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-tp"))  # 2 KV heads: one per rank


def _rank_pids(log: list[str]) -> dict[int, int]:
    """Each rank's worker pid, from the lines its elastikv logged when it made its KV space."""
    found = {}
    for line in log:
        if m := re.search(r"\(elastikv pid=(\d+)\) .*worker rank (\d+): .*pages served at", line):
            found[int(m.group(2))] = int(m.group(1))
    return found


def _ledger_rows(ledger_dir: Path) -> list[str]:
    from elastikv.ledger import summaries

    return [row.name for s in summaries(ledger_dir) for row in s.instances]  # reading reaps dead processes' rows


def _mapped(ledger_dir: Path) -> int:
    from elastikv.ledger import summaries

    return sum(row.mapped_bytes for s in summaries(ledger_dir) for row in s.instances)


def test_tp2_with_elastikv_answers_as_plain_tp2_and_a_killed_worker_leaves_nothing(model: Path, tmp_path: Path) -> None:
    """Greedy tokens equal plain TP=2; one instance whose allocator spans both ranks, each serving its own KV space;
    then rank 1 killed mid-generation: the engine ends with a reason (not a hang), no worker outlives it, and the
    instance's KV is given back (no ledger row left). One engine for both: a TP=2 start is the slow part here."""
    with Engine(model, engine_env(tmp_path / "plain", elastic=False, multiprocess=True, **TP_ENV), tp=2) as plain:
        assert plain.wait_ready()["elastic"] is False
        want = plain.call(op="generate", prompts=MIXED, max_tokens=16)["tokens"]
    ledger = tmp_path / "elastic" / "ledger"
    engine = Engine(model, engine_env(tmp_path / "elastic", elastic=True, multiprocess=True, **TP_ENV), tp=2)
    try:
        engine.wait_ready()
        first = engine.call(op="generate", prompts=MIXED, max_tokens=16)["tokens"]
        second = engine.call(op="generate", prompts=MIXED, max_tokens=16)["tokens"]  # pages reused or remapped
        rows = _ledger_rows(ledger)
        ranks = _rank_pids(engine.log)
        log = "\n".join(engine.log)
        assert first == want and second == want
        assert "ranks=2" in log, log[-3000:]  # one instance, its allocator over both ranks
        assert sorted(ranks) == [0, 1], log[-3000:]  # each rank made and served its own KV space
        assert len(rows) == 1, rows
        # Kill mid-generation, known from the ledger: the long requests map pages beyond what the short ones
        # left (a fixed sleep lost the race on CI's loaded cores: the whole generation ran before the kill).
        before = _mapped(ledger)
        engine.send(op="generate", prompts=prompts(16, 300, seed=21), max_tokens=1600)  # busy on both ranks
        deadline = time.monotonic() + 60
        while _mapped(ledger) <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _mapped(ledger) > before, "the long generation never mapped a page"
        t0 = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        try:
            reply = engine.receive(timeout=90)
        except AssertionError as exc:  # an end with a reason, not a hang
            assert "the engine exited" in str(exc), str(exc)[-3000:]
        else:
            pytest.fail(
                f"answered after rank 1 was killed: finish {reply['finish']}, lengths "
                f"{[len(t) for t in reply['tokens']]}, {reply['seconds']:.1f} s; log:\n{engine.tail(80)}"
            )
        ended_in = time.monotonic() - t0
    finally:
        if engine.proc.poll() is None:
            engine.proc.kill()
        engine.proc.wait()
    deadline = time.monotonic() + 30
    while any(process_start_time(p) is not None for p in ranks.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in ranks.values() if process_start_time(p) is not None], "a worker outlived the engine"
    assert _ledger_rows(ledger) == [], "the instance's KV is given back on both ranks"
    assert ended_in < 60, ended_in
    print(f"\nTP=2 tokens equal plain TP=2; rank 1 killed mid-generation: the engine ended {ended_in:.1f} s later")
