"""The weight stash (serving/weights.py) and the engine's sleep and wake through it, on the CPU with real tiny models.

On a CPU the host buffers are not pinned; every other step is the code a GPU runs (tests/test_gpu_wake.py times it
there). Expected answers are the engine's own before it slept.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[serve]'")

import torch  # noqa: E402
from tests.tiny_models import build_tiny_llama  # noqa: E402

from elastikv.config import Settings  # noqa: E402
from elastikv.errors import ElastikvError  # noqa: E402
from elastikv.memory import host  # noqa: E402
from elastikv.serving import weights  # noqa: E402
from elastikv.serving.weights import ALIGN, StashUnavailable, WeightStash, over_budget  # noqa: E402

pytestmark = pytest.mark.skipif(
    not transformers.__version__.startswith("5.17."),
    reason=f"the engine supports transformers 5.17; this is {transformers.__version__}",
)

CPU = torch.device("cpu")


def _llama(path: Path, **overrides: object) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(build_tiny_llama(path, **overrides), dtype=torch.float32).eval()


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(3, 40).unsqueeze(0)).logits


def _storages(model: Any) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def test_stash_and_wake_give_the_same_model_with_one_buffer_made_once(tmp_path: Path) -> None:
    model = _llama(tmp_path / "m")
    want = _logits(model)
    stash = WeightStash(model, CPU)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert nbytes <= stash.nbytes <= nbytes + ALIGN * len(list(model.parameters()))
    with pytest.raises(StashUnavailable, match="still being pinned"):
        stash.copy_out()  # not prepared yet
    stash.start()
    assert stash.wait(30) and stash.ready and not stash.pinned  # a CPU: plain host memory
    host = stash.host_buffer(torch.float32)
    address = host.data_ptr()
    assert address % 4096 == 0 and host.numel() * 4 == stash.nbytes
    for round_ in range(3):
        stash.stash()
        assert stash.asleep and all(p.numel() == 0 for p in model.parameters())  # the host holds the only copy
        assert stash.host_buffer(torch.float32).data_ptr() == address  # the same buffer every sleep
        stash.wake()
        assert not stash.asleep
        assert len(_storages(model)) == 1  # one device buffer per dtype; every parameter is a view of it
        base = next(model.parameters()).untyped_storage().data_ptr()
        assert all((p.data_ptr() - base) % ALIGN == 0 for p in model.parameters())  # slots aligned in the buffer
        torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
        if round_ == 0:
            assert stash._device_buffers() is not None  # the next sleep copies one whole buffer
    stash.close()
    assert not stash.ready
    with pytest.raises(StashUnavailable, match="closed"):
        stash.copy_out()


def test_tied_weights_come_back_tied(tmp_path: Path) -> None:
    model = _llama(tmp_path / "tied", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # transformers ties one Parameter object
    want = _logits(model)
    # Two more Parameter objects over one storage: a whole tensor and a view at an offset in it.
    base = torch.randn(8, 16)
    model.register_parameter("shared_a", torch.nn.Parameter(base))
    model.register_parameter("shared_b", torch.nn.Parameter(base[2:5]))
    stash = WeightStash(model, CPU)
    plain = sum(p.numel() * 4 for n, p in model.named_parameters() if n != "shared_b")
    assert stash.nbytes - plain < ALIGN * 32  # the tied embedding and the shared storage are stashed once
    stash.prepare()
    for _ in range(2):
        stash.stash()
        stash.wake()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        a, b = model.get_parameter("shared_a"), model.get_parameter("shared_b")
        assert b.data_ptr() == a.data_ptr() + 2 * 16 * 4 and torch.equal(b, base[2:5])
        with torch.no_grad():
            a[3, 0] = 42.0  # still one storage: written through one, read through the other
        assert b[1, 0].item() == 42.0
        a.data[3, 0] = base[3, 0]
        torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
    stash.close()


def test_one_buffer_per_dtype(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
    model[1].to(torch.bfloat16)
    want = [p.detach().clone() for p in model.parameters()]
    stash = WeightStash(model, CPU)
    stash.prepare()
    assert {stash.host_buffer(torch.float32).dtype, stash.host_buffer(torch.bfloat16).dtype} == {
        torch.float32,
        torch.bfloat16,
    }
    stash.stash()
    stash.wake()
    assert len(_storages(model)) == 2
    assert all(torch.equal(p, w) and p.dtype == w.dtype for p, w in zip(model.parameters(), want, strict=True))
    stash.close()


def test_a_wake_in_pieces_gives_the_same_model_each_piece_within_the_chunk(tmp_path: Path) -> None:
    """ELASTIKV_WAKE_CHUNK: the buffer comes back as several device allocations, each at most the chunk (or one
    slot larger than it alone), cut at slot starts; tied weights stay tied; the next sleep copies whole pieces."""
    model = _llama(tmp_path / "m", tie_word_embeddings=True)
    model.register_parameter("bf16_extra", torch.nn.Parameter(torch.randn(64, 8).to(torch.bfloat16)))
    want, half = _logits(model), model.get_parameter("bf16_extra").detach().clone()
    sizes = sorted(p.numel() * p.element_size() for p in model.parameters() if p.dtype == torch.float32)
    chunk = sizes[-2] + 1  # the largest slot alone is over it
    stash = WeightStash(model, CPU, chunk_bytes=chunk)
    stash.prepare()
    pieces = stash._pieces
    assert len([p for p in pieces if p.dtype == torch.float32]) >= 3 and [p.dtype for p in pieces].count(
        torch.bfloat16) == 1  # fmt: skip
    starts = {s.start for s in stash._slots}
    for p in pieces:  # a partition of each dtype's buffer, cut where slots start
        assert p.lo in starts and (p.hi - p.lo) * p.dtype.itemsize <= max(chunk, sizes[-1] + ALIGN)
    for dtype in (torch.float32, torch.bfloat16):
        mine = [p for p in pieces if p.dtype == dtype]
        assert mine[0].lo == 0 and mine[-1].hi == stash._sizes[dtype]
        assert all(a.hi == b.lo for a, b in itertools.pairwise(mine))
    for _ in range(2):
        stash.stash()
        stash.wake()
        assert len(_storages(model)) == len(pieces)  # one device allocation per piece
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
        assert torch.equal(model.get_parameter("bf16_extra"), half)
        assert stash._device_buffers() is not None  # the next sleep copies whole pieces
    stash.close()


def test_the_wake_settings_are_read_and_checked() -> None:
    assert Settings.from_env({"ELASTIKV_WAKE_CHUNK": "1GiB"}).wake_chunk.resolve(0) == 2**30  # type: ignore[union-attr]
    assert Settings.from_env({}).wake_chunk_bytes == 2**30  # the default since the H100 run of 2026-12-07
    assert Settings.from_env({"ELASTIKV_WAKE_CHUNK": "0"}).wake_chunk_bytes == 0  # one piece per dtype
    with pytest.raises(ElastikvError, match="ELASTIKV_WAKE_CHUNK"):
        Settings.from_env({"ELASTIKV_WAKE_CHUNK": "10%"})
    assert Settings.from_env({"ELASTIKV_WAKE_EARLY": "on"}).wake_early == "on"
    assert Settings.from_env({}).wake_early == "on"  # the default since the H100 run of 2026-12-07
    assert Settings.from_env({"ELASTIKV_WAKE_EARLY": "off"}).wake_early == "off"
    with pytest.raises(ElastikvError, match="ELASTIKV_WAKE_EARLY"):
        Settings.from_env({"ELASTIKV_WAKE_EARLY": "yes"})


def test_a_storage_seen_as_two_dtypes_is_refused_with_the_way_out() -> None:
    model = torch.nn.Linear(4, 4)
    model.register_parameter("bits", torch.nn.Parameter(model.weight.data.view(torch.int32), requires_grad=False))
    with pytest.raises(ElastikvError, match="one dtype per storage; use sleep level 2"):
        WeightStash(model, CPU)


def test_the_pin_budget_and_the_host_bound() -> None:
    gib = 1024**3
    assert over_budget(gib, Settings()) is None  # half of any test machine's memory holds 1 GiB
    why = over_budget(gib, Settings.from_env({"ELASTIKV_PIN_BUDGET": "512MiB"}))
    assert why is not None and "ELASTIKV_PIN_BUDGET (512 MiB" in why and "1 GiB" in why
    assert over_budget(1, Settings.from_env({"ELASTIKV_PIN_BUDGET": "0"})) is not None  # 0: never pin
    assert over_budget(gib, Settings.from_env({"ELASTIKV_PIN_BUDGET": "100%"})) is None


def test_pinning_that_would_leave_the_host_short_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other engines' pinned weights are not in MemAvailable: a stash that would leave less than HOST_RESERVE of
    the host available is refused, with the reason, and the engine then sleeps at level 2."""
    model = torch.nn.Linear(1024, 1024)
    monkeypatch.setattr(host, "available_memory", lambda: 4 * 1024**2)  # the host as other engines left it
    stash = WeightStash(model, CPU)
    stash.start()
    assert not stash.wait(30)
    assert isinstance(stash.error, StashUnavailable) and "would leave" in stash.why_not()
    with pytest.raises(StashUnavailable, match="would leave"):
        stash.copy_out()
    assert model.weight.numel() == 1024 * 1024  # untouched


# -- the engine --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from elastikv.bench.models import make_model

    return make_model(tmp_path_factory.mktemp("engine") / "tiny", size="tiny")  # with a tokenizer


def _engine(tmp_path: Path, model_dir: Path, **env: str) -> Any:
    from elastikv.serving.engine import Engine

    settings = Settings.from_env({"ELASTIKV_HOST_MEMORY": "1GiB", "ELASTIKV_RESERVE": "2MiB",
                                  "ELASTIKV_LEDGER_DIR": str(tmp_path / "ledger"), **env})  # fmt: skip
    return Engine(model_dir, name="tiny", settings=settings, device="cpu", dtype="float32", stash_weights=True)


async def _ask(engine: Any, prompt: list[int], n: int = 12) -> tuple[list[int], float]:
    """The tokens, and seconds to the first token."""
    t0, first, last = time.perf_counter(), None, []
    async for tokens, _done, _error in engine.generate(prompt, n):
        first = first if first is not None else time.perf_counter() - t0
        last = tokens
    return last, first or 0.0


@pytest.fixture
def engine(tmp_path: Path, model_dir: Path) -> Iterator[Any]:
    e = _engine(tmp_path, model_dir)
    yield e
    e.close()


PROMPTS = [[5, 9, 13, 20, 40, 64, 100], list(range(30, 90))]


def test_the_engine_answers_the_same_after_every_wake(engine: Any) -> None:
    before = [asyncio.run(_ask(engine, p))[0] for p in PROMPTS]
    stash = engine.stash
    assert stash is not None and stash.wait(30)
    address = stash.host_buffer(torch.float32).data_ptr()
    timings = []
    for _ in range(3):
        t0 = time.perf_counter()
        slept = engine.sleep(1)
        t1 = time.perf_counter()
        assert slept["sleeping"] == 1 and slept["requested"] == 1 and "reason" not in slept
        assert engine.instance is None  # the KV instance closed: every page unmapped
        assert sum(p.numel() for p in engine.model.parameters()) == 0
        assert stash.host_buffer(torch.float32).data_ptr() == address  # no new buffer, ever
        t2 = time.perf_counter()
        engine.wake_up()
        woke = time.perf_counter() - t2
        answers = [asyncio.run(_ask(engine, p)) for p in PROMPTS]
        assert [a for a, _ in answers] == before
        timings.append((t1 - t0, woke, answers[0][1]))
    each = (f"sleep {s * 1e3:.1f} ms, wake {w * 1e3:.1f} ms, first token after {f * 1e3:.1f} ms" for s, w, f in timings)
    print("\nCPU, tiny Llama, stash on: " + "; ".join(each))


def test_a_wake_in_pieces_taking_requests_early_answers_the_same(tmp_path: Path, model_dir: Path) -> None:
    """ELASTIKV_WAKE_CHUNK and ELASTIKV_WAKE_EARLY through the engine: several allocations per wake, no host wait
    for the copies in wake_up (each forward's stream waits instead: a no-op on a CPU, whose copies are done on
    return), the same answers after every wake. tests/test_gpu_wake.py runs it where the copies are asynchronous."""
    engine = _engine(tmp_path, model_dir, ELASTIKV_WAKE_CHUNK="64KiB", ELASTIKV_WAKE_EARLY="on")
    try:
        before = [asyncio.run(_ask(engine, p))[0] for p in PROMPTS]
        stash = engine.stash
        assert stash is not None and stash.wait(30) and stash.pieces > 4 and engine.wake_early
        assert engine._await_weights in engine.model._forward_pre_hooks.values()
        for _ in range(3):
            assert engine.sleep(1)["sleeping"] == 1
            engine.wake_up()
            assert len({p.untyped_storage().data_ptr() for p in engine.model.parameters()}) == stash.pieces
            assert [asyncio.run(_ask(engine, p))[0] for p in PROMPTS] == before
    finally:
        engine.close()


def test_level_1_over_the_pin_budget_sleeps_at_level_2_and_says_so(tmp_path: Path, model_dir: Path) -> None:
    """What a router asking for level 1 needs: a model asleep either way (never one left awake holding its memory),
    and an answer that names the level used and why."""
    engine = _engine(tmp_path, model_dir, ELASTIKV_PIN_BUDGET="1KiB")
    try:
        assert engine.stash is None and engine.no_stash is not None
        before = asyncio.run(_ask(engine, PROMPTS[0]))[0]
        slept = engine.sleep(1)
        assert slept["sleeping"] == 2 and slept["requested"] == 1
        assert "ELASTIKV_PIN_BUDGET" in slept["reason"] and "level 2" in slept["reason"]
        assert engine.sleeping == 2 and sum(p.numel() for p in engine.model.parameters()) == 0
        engine.wake_up()  # reloaded from the model's files
        assert asyncio.run(_ask(engine, PROMPTS[0]))[0] == before
    finally:
        engine.close()


@pytest.mark.parametrize("level", [1, 2])
def test_a_wake_that_fails_bringing_the_weights_back_leaves_the_engine_asleep_holding_no_more(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, level: int
) -> None:
    """A driver out-of-memory while the weights come back (injected: the third device allocation of a wake in
    pieces, or of a level 2 reload, fails): wake_up raises an error that names it and says the engine is still
    asleep; nothing of the weights stays allocated; the ledger books what it booked asleep, not the weights; the
    next wake brings the same model back."""
    engine = _engine(tmp_path, model_dir, ELASTIKV_WAKE_CHUNK="64KiB", ELASTIKV_BOOK_WEIGHTS="on")
    try:
        before = asyncio.run(_ask(engine, PROMPTS[0]))[0]
        assert engine.stash is not None and engine.stash.wait(30)
        booked = engine.footprint.holding.ledger.summary  # type: ignore[union-attr]
        assert engine.sleep(level)["sleeping"] == level
        asleep = {h.name: h.weights_bytes for h in booked().holdings}
        assert asleep.get("tiny", 0) == 0
        calls, real_empty, real_load = [0], torch.empty, weights.load_weights

        def empty(*args: Any, **kwargs: Any) -> torch.Tensor:  # the stash's device allocations
            calls[0] += 1
            if calls[0] == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 KiB (injected)")
            return real_empty(*args, **kwargs)

        def load(model: Any, *args: Any, **kwargs: Any) -> None:  # level 2: fails after loading some weights
            real_load(model, *args, **kwargs)
            raise torch.OutOfMemoryError("CUDA out of memory (injected, after the load)")

        if level == 1:
            monkeypatch.setattr(torch, "empty", empty)
        else:
            monkeypatch.setattr("elastikv.serving.engine.load_weights", load)
        with pytest.raises(
            ElastikvError, match=r"waking failed bringing the weights back .*out of memory.*still asleep"
        ):
            engine.wake_up()
        monkeypatch.undo()
        assert engine.sleeping == level
        assert sum(p.numel() for p in engine.model.parameters()) == 0  # nothing of the weights kept
        assert {h.name: h.weights_bytes for h in booked().holdings}.get("tiny", 0) == 0  # the ledger as asleep
        assert engine.stash.asleep if level == 1 else True
        engine.wake_up()
        assert engine.sleeping == 0 and asyncio.run(_ask(engine, PROMPTS[0]))[0] == before
        assert {h.name: h.weights_bytes for h in booked().holdings}["tiny"] > 0
    finally:
        engine.close()


def test_a_sleep_that_finds_the_stash_still_pinning_waits_a_bounded_time(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from elastikv.serving import engine as engine_module

    before = asyncio.run(_ask(engine, PROMPTS[0]))[0]
    engine.stash.close()
    engine.stash = WeightStash(engine.model, engine.device)  # as if its pinning had not finished yet
    engine.stash._started_at = time.monotonic()
    monkeypatch.setattr(engine_module, "PIN_WAIT_S", 0.2)
    t0 = time.perf_counter()
    slept = engine.sleep(1)
    assert 0.2 <= time.perf_counter() - t0 < 5
    assert slept["sleeping"] == 2 and "still being pinned" in slept["reason"]
    engine.wake_up()
    assert asyncio.run(_ask(engine, PROMPTS[0]))[0] == before
    engine.stash.prepare()  # done now: the next level 1 uses it
    assert engine.sleep(1)["sleeping"] == 1
    engine.wake_up()
    assert asyncio.run(_ask(engine, PROMPTS[0]))[0] == before


def test_a_level_2_sleep_then_level_1_uses_the_stash_again(engine: Any) -> None:
    before = asyncio.run(_ask(engine, PROMPTS[1]))[0]
    for level in (1, 2, 1, 1):
        assert engine.sleep(level)["sleeping"] == level
        engine.wake_up()
        assert asyncio.run(_ask(engine, PROMPTS[1]))[0] == before


def test_the_router_records_the_level_the_engine_used() -> None:
    import httpx

    from elastikv.router.launch import level_used as _level_used

    def answer(body: bytes) -> httpx.Response:
        return httpx.Response(200, content=body)

    assert _level_used(answer(b'{"sleeping": 2, "requested": 1, "reason": "over"}'), 1) == 2
    assert _level_used(answer(b'{"sleeping": 1}'), 1) == 1
    assert _level_used(answer(b""), 1) == 1  # vLLM answers an empty 200
    assert _level_used(answer(b"[1]"), 2) == 2 and _level_used(answer(b"not json"), 1) == 1
    assert _level_used(answer(b'{"sleeping": true}'), 1) == 1


def test_vllm_first_sleep_warm_up_keeps_to_the_pin_budget(caplog: pytest.LogCaptureFixture) -> None:
    """engines/vllm/pinned.py: weights over ELASTIKV_PIN_BUDGET are not pinned at start, and the log says why."""
    from elastikv.engines.vllm import pinned

    small = Settings.from_env({"ELASTIKV_PIN_BUDGET": "1MiB"})
    with caplog.at_level("WARNING", logger="elastikv"):
        assert pinned.warm_pinned_cache([2**30], small) == 0.0
    assert "1 GiB is over ELASTIKV_PIN_BUDGET, 1 MiB" in caplog.text
    assert pinned.warm_pinned_cache([], small) == 0.0
    off = Settings.from_env({"ELASTIKV_PIN_BUDGET": "0"})
    assert pinned.warm_pinned_cache([4096], off) == 0.0


def test_vllm_first_sleep_warm_up_never_pins_past_what_the_host_has(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every vLLM engine on a host pins its weights' host copy at start: ten 8B engines want 150 GiB, and the H200
    machine has 128. Within the budget but past what the host has available (less HOST_RESERVE), nothing is
    pinned and the log says why and what follows (a level 2 sleep needs no host memory)."""
    from elastikv.engines.vllm import pinned

    monkeypatch.setattr(host, "available_memory", lambda: 6 * 1024**3)  # what ten engines' pinning left
    within = Settings.from_env({"ELASTIKV_PIN_BUDGET": "100%"})
    with caplog.at_level("WARNING", logger="elastikv"):
        assert pinned.warm_pinned_cache([15 * 1024**3], within) == 0.0
    assert "not made at start: pinning 15 GiB would leave 0 B of host memory available" in caplog.text
    assert "level 2" in caplog.text


def test_a_vllm_level_1_sleep_the_host_cannot_pin_is_refused_whole_with_the_way_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checked in every worker before vLLM offloads anything: refused while the host cannot pin the weights' copy
    (what was warmed at start counts as pinned), let through once it can; once let through, later sleeps pin
    nothing more (torch's cache keeps the blocks), so they are let through even on a host that filled up since."""
    from elastikv.engines.vllm import pinned

    gib = 1024**3
    monkeypatch.setattr(pinned, "_ready", 0)
    monkeypatch.setattr(host, "physical_memory", lambda: 32 * gib)  # 5% kept: 1.6 GiB
    monkeypatch.setattr(host, "available_memory", lambda: 8 * gib)
    assert "would leave 0 B of host memory available" in (pinned.level_1_refusal([8 * gib, 7 * gib]) or "")
    monkeypatch.setattr(pinned, "_ready", 10 * gib)  # warmed at start: only 5 GiB more to pin, which fits
    assert pinned.level_1_refusal([8 * gib, 7 * gib]) is None
    monkeypatch.setattr(host, "available_memory", lambda: 0)  # the host filled up since: nothing more to pin
    assert pinned.level_1_refusal([8 * gib, 7 * gib]) is None
    monkeypatch.setattr(pinned, "_ready", 0)
    with pytest.raises(ElastikvError, match=r"sleep level 1 .*host memory.*sleep_level: 2"):
        monkeypatch.setattr(pinned, "weight_allocations", lambda: [gib])
        pinned.check_level_1()


@pytest.mark.gpu
def test_vllm_first_sleep_finds_its_pinned_blocks_already_made() -> None:
    """After the warm-up, pinned tensors of the weights' sizes come from torch's cache: no new page-locking (what
    vLLM's first sleep allocates is then as quick as its later sleeps')."""
    from elastikv.engines.vllm import pinned

    sizes = [96 * 2**20, 64 * 2**20, 64 * 2**20]
    assert pinned.warm_pinned_cache(sizes, Settings.from_env({"ELASTIKV_PIN_BUDGET": "50%"})) > 0
    before = torch.cuda.host_memory_stats()["num_host_alloc"]
    taken = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for n in sizes]  # as vLLM's sleep makes them
    assert all(t.is_pinned() for t in taken)
    assert torch.cuda.host_memory_stats()["num_host_alloc"] == before
