"""Sleep and wake through the weight stash on a GPU: pinned host buffers made once, whole-buffer copies, the same
answers, and the time of sleep, wake and wake to first token against the copy floor (bytes / pinned bandwidth).

A small random model (about 0.3 GB in bf16): the times here are mostly fixed costs; benchmarks/engine.py measures
the 8B model, where the copies dominate.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[serve]'")

import torch  # noqa: E402
from tests.tiny_models import build_tiny_llama  # noqa: E402

from elastikv.config import Settings  # noqa: E402

pytestmark = pytest.mark.gpu

SMALL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, head_dim=64, vocab_size=2048)  # fmt: skip


def _model_dir(tmp_path: Path) -> Path:
    """The small Llama, with make-model's tokenizer (same vocabulary size) beside it."""
    from elastikv.bench.models import make_model

    tiny = make_model(tmp_path / "tiny", size="tiny")
    path = build_tiny_llama(tmp_path / "small", **SMALL)
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path / f.name)
    return path


def pinned_h2d_bandwidth(nbytes: int = 1024**3, repeats: int = 5) -> float:
    """Bytes per second of one host-to-device copy from pinned memory (the best of ``repeats``)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


async def _ask(engine: Any, prompt: list[int], n: int = 8) -> tuple[list[int], float]:
    t0, first, last = time.perf_counter(), None, []
    async for tokens, _done, _error in engine.generate(prompt, n):
        first = first if first is not None else time.perf_counter() - t0
        last = tokens
    return last, first or 0.0


@pytest.mark.parametrize(("wake_chunk", "early"), [(None, "off"), ("16MiB", "off"), ("16MiB", "on")],
                         ids=["one-buffer", "pieces", "pieces-early"])  # fmt: skip
def test_sleep_and_wake_through_pinned_buffers_answer_the_same(tmp_path: Path, wake_chunk: str | None,
                                                              early: str) -> None:  # fmt: skip
    """ELASTIKV_WAKE_CHUNK (the wake in pieces) and ELASTIKV_WAKE_EARLY (requests taken while the copies run, the
    forward waiting for them on the GPU) give the same answers as the one-buffer wake."""
    from elastikv.serving.engine import Engine

    env = {"ELASTIKV_LEDGER_DIR": str(tmp_path / "ledger"), "ELASTIKV_RESERVE": "64MiB", "ELASTIKV_WAKE_EARLY": early}
    settings = Settings.from_env(env | ({"ELASTIKV_WAKE_CHUNK": wake_chunk} if wake_chunk else {}))
    engine = Engine(_model_dir(tmp_path), name="small", settings=settings, device="cuda", dtype="bfloat16")
    try:
        stash = engine.stash
        assert stash is not None, engine.no_stash
        assert stash.wait(60), stash.why_not()
        host = stash.host_buffer(torch.bfloat16)
        assert stash.pinned  # cudaHostRegister'ed (the driver then copies by DMA, whatever PyTorch thinks of it)
        address, nbytes = host.data_ptr(), stash.nbytes
        prompts = [[5, 9, 13, 20, 40, 64, 100], list(range(30, 290))]
        before = [asyncio.run(_ask(engine, p)) for p in prompts]
        warm_ttft = min(asyncio.run(_ask(engine, prompts[0]))[1] for _ in range(3))
        rows = []
        for i in range(4):
            torch.cuda.synchronize()
            allocated = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            slept = engine.sleep(1)
            t_sleep = time.perf_counter() - t0
            assert slept["sleeping"] == 1, slept
            assert allocated - torch.cuda.memory_allocated() >= nbytes * 0.99  # the weights left the device
            assert stash.host_buffer(torch.bfloat16).data_ptr() == address  # the buffer made once
            t0 = time.perf_counter()
            engine.wake_up()
            t_wake = time.perf_counter() - t0
            answer, ttft = asyncio.run(_ask(engine, prompts[0]))
            t_first = t_wake + ttft
            assert len({p.untyped_storage().data_ptr() for p in engine.model.parameters()}) == len(stash._pieces)
            assert answer == before[0][0]
            assert asyncio.run(_ask(engine, prompts[1]))[0] == before[1][0]
            rows.append((i, t_sleep, t_wake, t_first))
        floor = nbytes / pinned_h2d_bandwidth()
        print(f"\n{torch.cuda.get_device_name()} ({len(stash._pieces)} wake allocations): "
              f"{nbytes / 2**20:.0f} MiB of bf16 weights; PyTorch sees the "
              f"buffer pinned: {host.is_pinned()}; pinned in "
              f"{stash.prepare_seconds:.2f} s (background); copy floor {floor * 1e3:.1f} ms; warm TTFT "
              f"{warm_ttft * 1e3:.1f} ms")  # fmt: skip
        for i, s, w, f in rows:
            print(f"  sleep {i + 1}: {s * 1e3:.1f} ms; wake {w * 1e3:.1f} ms ({w / floor:.1f}x floor); "
                  f"wake to first token {f * 1e3:.1f} ms")  # fmt: skip
        # Loose bounds (a shared machine): the point is no pinning and no warm-up on the path.
        assert max(s for _, s, _, _ in rows) < 1.0
        assert max(w for _, _, w, _ in rows) < 1.0
    finally:
        engine.close()


def test_a_wake_copies_on_its_own_stream_and_a_forward_or_a_sleep_after_it_reads_the_copied_weights() -> None:
    """The stash's copy stream: right after ``wake(sync=False)`` the caller's stream has nothing queued (what the
    engine's batching thread queues as it starts, such as transformers' ``set_tp_seed`` ``.item()``, does not wait
    for 1 GiB of copies), yet a stream that ran ``await_copies`` reads the weights as they were, and a sleep
    straight after the wake copies out the weights, not what the copies had not yet written."""
    from elastikv.serving.weights import WeightStash

    torch.manual_seed(0)
    model = torch.nn.Linear(16384, 32768, bias=False, dtype=torch.bfloat16, device="cuda")  # 1 GiB
    want = model.weight.detach().clone()
    stash = WeightStash(model, torch.device("cuda"))
    stash.prepare()
    assert stash.ready, stash.why_not()
    try:
        stash.stash()
        for _ in range(2):
            stash.wake(sync=False)
            assert torch.cuda.current_stream().query(), "the wake's copies were queued on the caller's stream"
            stash.stash()  # a sleep straight after the wake, nothing waited for by the caller
        stash.wake(sync=False)
        stash.await_copies()
        assert torch.equal(model.weight, want)  # read on the caller's stream, after the copies
    finally:
        stash.close()
