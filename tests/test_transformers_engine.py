"""transformers continuous batching on elastikv's KV cache: the real engine, a tiny random Llama, on the CPU.

Expected tokens come from plain ``model.generate`` (greedy, no continuous batching, no elastikv).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[serve]'")

import torch  # noqa: E402
from tests.tiny_models import build_tiny_llama  # noqa: E402

from elastikv.budget import LedgerBudget  # noqa: E402
from elastikv.config import Settings  # noqa: E402
from elastikv.errors import UnsupportedEngine  # noqa: E402

pytestmark = pytest.mark.skipif(
    not transformers.__version__.startswith("5.17."),
    reason=f"the engine supports transformers 5.17; this is {transformers.__version__}",
)

MIB = 1024**2


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoModelForCausalLM

    path = build_tiny_llama(tmp_path_factory.mktemp("tiny"))
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield m


def _expected(model: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.set_attn_implementation("sdpa")  # plain transformers: no paged attention
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), generation_config=gc)[0, len(p) :].tolist() for p in prompts]


@pytest.fixture
def elastic(tmp_path: Path, model: Any) -> Iterator[Any]:
    """Continuous batching made elastic; yields a function that runs a batch and returns its outputs."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from elastikv.engines import transformers as tfe

    def run(
        prompts: list[list[int]], max_new_tokens: int, attention: str = "paged|sdpa", **env: str
    ) -> tuple[list[Any], Any]:
        settings = Settings.from_env(
            {
                "ELASTIKV_HOST_MEMORY": "1GiB",
                "ELASTIKV_RESERVE": "2MiB",
                "ELASTIKV_LEDGER_DIR": str(tmp_path / "ledger"),
                **env,
            }
        )
        tfe.enable(settings=settings, max_kv_tokens=4096)
        model.set_attn_implementation(attention)
        gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        cb = ContinuousBatchingConfig(block_size=32, max_batch_tokens=256)
        out = model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cb, warmup=False)
        return list(out.values()), tfe.caches()[-1]

    yield run

    tfe.close_caches()
    model.set_attn_implementation("sdpa")


def _prompts(n: int, lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def test_sixteen_concurrent_requests_match_plain_transformers(model: Any, elastic: Any) -> None:
    prompts = _prompts(16, [5, 9, 13, 20, 40, 64, 100, 7], seed=1)
    outs, cache = elastic(prompts, 24)
    assert [o.error for o in outs] == [None] * 16
    assert [o.generated_tokens for o in outs] == _expected(model, prompts, 24)
    assert cache.elastic.allocator.stats().pages_mapped_total >= 1  # the blocks really came from elastikv
    assert cache.key_cache[0].data_ptr() >= cache.elastic.space.raw.data_ptr()


def test_per_request_attention_matches_plain_transformers(model: Any, elastic: Any) -> None:
    """`paged|elastikv` (serving/attention.py; its CPU path: one sdpa per request): chunked prefills (prompts over
    max_batch_tokens=256), decodes and mixed steps give plain transformers' tokens."""
    from elastikv.serving import attention

    assert attention.resolve("elastikv", torch.device("cpu"), torch.float32) == attention.NAME
    assert attention.resolve("auto", torch.device("cpu"), torch.float32) == "paged|sdpa"  # no flash kernel here
    with pytest.raises(ValueError, match="use one of auto, elastikv, sdpa"):
        attention.resolve("flash", torch.device("cpu"), torch.float32)
    prompts = _prompts(12, [5, 300, 13, 40, 700, 64, 2, 257], seed=4)
    outs, cache = elastic(prompts, 20, attention=attention.NAME)
    assert model.config._attn_implementation == attention.NAME  # it ran, not a fallback
    assert [o.error for o in outs] == [None] * 12
    assert [o.generated_tokens for o in outs] == _expected(model, prompts, 20)
    assert cache.elastic.allocator.stats().pages_mapped_total >= 1


@pytest.mark.gpu
def test_on_the_gpu_the_flash_varlen_kernel_matches_the_per_request_reference() -> None:
    """The CUDA path of `paged|elastikv` (PyTorch's flash kernel, variable length) against one sdpa per request:
    grouped-query heads, a prefill, a prefill chunk after cached tokens, decodes, in bf16."""
    from elastikv.serving.attention import _per_request_sdpa, varlen_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q_lens, k_lens = [700, 1, 256, 1, 1, 33], [700, 4097, 1280, 17, 1, 33]  # queries are each request's last tokens
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    q = torch.randn(sum(q_lens), 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(sum(k_lens), 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(sum(k_lens), 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    got = varlen_attention(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), 128**-0.5)
    want = _per_request_sdpa(q.float(), k.float(), v.float(), cu_q, cu_k, 128**-0.5)
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_on_the_gpu_per_request_attention_generates_as_paged_sdpa_does(model: Any, tmp_path: Path) -> None:
    """The embedded engine's GPU default (`--attention auto` in bf16: `paged|elastikv` on the flash kernel) against
    transformers' `paged|sdpa` in the same process, on elastikv's device-mapped cache. bf16 kernels round
    differently, so greedy paths may part after a near tie: the first token of every request (prefill, chunked
    above 256 tokens) must agree and most of the rest."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from elastikv.engines import transformers as tfe
    from elastikv.serving import attention

    gpu_model = model.to("cuda", torch.bfloat16)
    assert attention.resolve("auto", torch.device("cuda"), torch.bfloat16) == attention.NAME
    prompts = _prompts(16, [5, 300, 13, 40, 700, 64, 2, 257], seed=5)
    gc = GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    outs = {}
    try:
        for impl in (attention.NAME, "paged|sdpa"):
            settings = Settings.from_env({"ELASTIKV_LEDGER_DIR": str(tmp_path / "ledger")})
            tfe.enable(settings=settings, max_kv_tokens=8192)
            gpu_model.set_attn_implementation(impl)
            cb = ContinuousBatchingConfig(block_size=32, max_batch_tokens=256, use_async_batching=False)
            out = gpu_model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cb, warmup=False)
            assert tfe.caches()[-1].elastic.backend.name == "cuda"
            outs[impl] = [o.generated_tokens for o in out.values()]
            tfe.close_caches()
        ours, theirs = outs[attention.NAME], outs["paged|sdpa"]
        assert [len(o) for o in ours] == [24] * 16
        assert [o[0] for o in ours] == [o[0] for o in theirs]
        same = sum(a == b for o, t in zip(ours, theirs, strict=True) for a, b in zip(o, t, strict=True))
        assert same >= 0.75 * 16 * 24, f"only {same} of {16 * 24} tokens agree"
    finally:
        tfe.close_caches()
        model.to("cpu", torch.float32)
        model.set_attn_implementation("sdpa")


def test_larger_chunks_serve_the_same_tokens_with_fewer_pages(model: Any, elastic: Any) -> None:
    """ELASTIKV_CHUNK raises the engine's page from one block group to several: fewer driver calls per request
    (what a long prompt costs in mapping), same output."""
    prompts = _prompts(6, [300, 40, 700], seed=6)
    outs, cache = elastic(prompts, 12)
    small = cache.elastic.allocator.page_bytes
    outs_big, cache = elastic(prompts, 12, ELASTIKV_CHUNK=str(8 * small))
    alloc = cache.elastic.allocator
    assert alloc.page_bytes == 8 * small and alloc.blocks_per_page == 8 * (
        small // cache.elastic.space.geometry.group_bytes
    )
    assert [o.generated_tokens for o in outs_big] == [o.generated_tokens for o in outs] == _expected(model, prompts, 12)


def test_one_generation_over_two_thousand_tokens_matches(model: Any, elastic: Any) -> None:
    prompts = _prompts(1, [16], seed=2)
    outs, _ = elastic(prompts, 2048)
    assert len(outs[0].generated_tokens) == 2048
    assert [outs[0].generated_tokens] == _expected(model, prompts, 2048)


def test_a_flood_over_the_budget_all_completes_and_memory_returns(model: Any, elastic: Any) -> None:
    # 24 requests x (400 + 64 tokens) = 24 x 15 blocks of 32 KiB = 11.25 MiB, against a 6 MiB limit.
    prompts = _prompts(24, [400], seed=3)
    t0 = time.perf_counter()
    outs, cache = elastic(prompts, 64, ELASTIKV_LIMIT="6MiB", ELASTIKV_PREFIX_CACHE="0")
    seconds = time.perf_counter() - t0
    stats = cache.elastic.allocator.stats()
    assert [o.error for o in outs] == [None] * 24
    assert [o.generated_tokens for o in outs] == _expected(model, prompts, 64)
    # The cache held at most the limit: free counts told transformers the truth, so it queued and preempted
    # (recomputing) instead of asking for more, and every answer is still exact.
    assert stats.mapped_bytes <= 6 * MIB and stats.pages_mapped_total * stats.page_bytes <= 6 * MIB
    deadline = time.monotonic() + 5
    while cache.elastic.allocator.stats().mapped_bytes > 4 * MIB and time.monotonic() < deadline:
        time.sleep(0.05)
    after = cache.elastic.allocator.stats()
    print(
        f"\nflood of 24 x 464 tokens (11.25 MiB of KV) under a 6 MiB limit: {seconds:.1f} s; held at the end "
        f"{stats.mapped_bytes / MIB:.0f} MiB, after settling {after.mapped_bytes / MIB:.0f} MiB"
    )
    assert after.blocks_in_use == 0 and after.mapped_bytes <= 4 * MIB  # null page + the 2 MiB reserve


def test_a_request_larger_than_the_whole_budget_gets_a_clear_error(model: Any, elastic: Any) -> None:
    prompts = _prompts(1, [100], seed=4)
    outs, _ = elastic(prompts, 8000, ELASTIKV_LIMIT="4MiB")
    assert outs[0].error is not None and "raise the limit" in outs[0].error, outs[0].error
    assert "needs 254 blocks" in outs[0].error


def test_a_request_the_device_budget_can_never_hold_gets_a_clear_error_not_a_wait(model: Any, elastic: Any) -> None:
    """Within the instance's limit but more than the device budget could ever give it (found with 8B weights booked
    in a budget meant for KV, on the H100: such requests waited for ever): it fails at once, saying why."""
    prompts = _prompts(1, [100], seed=5)
    done: list[Any] = []
    run = threading.Thread(target=lambda: done.append(elastic(prompts, 8000, ELASTIKV_DEVICE_BUDGET="6MiB")[0]),
                           daemon=True)  # fmt: skip
    run.start()
    run.join(120)
    assert done, "the request is still waiting for memory the budget can never give"
    error = done[0][0].error
    assert error is not None and "device budget can never give this engine" in error, error
    assert "needs 254 blocks" in error and "ELASTIKV_DEVICE_BUDGET" in error


def test_an_unsupported_transformers_version_is_refused() -> None:
    from elastikv.engines.transformers import check_version

    with pytest.raises(UnsupportedEngine, match=r"supports transformers 5\.17; this is 5\.19\.0"):
        check_version("5.19.0", (5, 19, 0))


def test_shared_prefixes_are_reused_and_the_cache_is_bounded(model: Any, elastic: Any) -> None:
    head = _prompts(1, [256], seed=5)[0]  # a common 256-token "system prompt": 8 full blocks
    prompts = [head + tail for tail in _prompts(6, [40], seed=6)]
    outs, cache = elastic(prompts, 16, ELASTIKV_PREFIX_CACHE="1MiB")  # 32 blocks of 32 KiB may stay cached
    assert [o.generated_tokens for o in outs] == _expected(model, prompts, 16)
    assert cache.use_prefix_sharing and cache._total_prefix_length >= 5 * 256  # later requests reused the head
    manager = cache._block_manager
    assert 0 < len(manager._init_block_ids) <= 32
    stats = cache.elastic.allocator.stats()
    assert stats.blocks_in_use == len(manager._init_block_ids)  # only the bounded cached blocks stay live


def test_with_no_prefix_cache_every_block_goes_back(model: Any, elastic: Any) -> None:
    head = _prompts(1, [256], seed=5)[0]
    prompts = [head + tail for tail in _prompts(4, [40], seed=7)]
    outs, cache = elastic(prompts, 16, ELASTIKV_PREFIX_CACHE="0")
    assert [o.generated_tokens for o in outs] == _expected(model, prompts, 16)
    assert cache.elastic.allocator.stats().blocks_in_use == 0


@pytest.mark.gpu
def test_on_the_gpu_the_cache_maps_device_memory_and_matches(model: Any, tmp_path: Path) -> None:
    """The same engine on CUDA: the KV space is device memory mapped with the driver's VMM calls."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from elastikv.engines import transformers as tfe

    gpu_model = model.to("cuda")
    try:
        prompts = _prompts(16, [5, 9, 13, 20, 40, 64, 100, 7], seed=1)
        want = _expected(gpu_model, prompts, 24)
        tfe.enable(settings=Settings.from_env({"ELASTIKV_LEDGER_DIR": str(tmp_path / "ledger")}), max_kv_tokens=4096)
        gpu_model.set_attn_implementation("paged|sdpa")
        gc = GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        cb = ContinuousBatchingConfig(block_size=32, max_batch_tokens=256, use_async_batching=False)
        out = gpu_model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cb, warmup=False)
        cache = tfe.caches()[-1]
        assert cache.elastic.backend.name == "cuda" and cache.key_cache[0].is_cuda
        assert [o.generated_tokens for o in out.values()] == want
    finally:
        tfe.close_caches()
        model.to("cpu")
        model.set_attn_implementation("sdpa")


def _hog(tmp_path: Path) -> tuple[Any, Any, Any]:
    """Another instance in the engine's ledger (a 16 MiB device budget on host memory): (host, ledger, its budget)."""
    from elastikv.ledger import Ledger
    from elastikv.memory import HostBackend

    host = HostBackend(total_bytes=1024 * MIB)
    ledger = Ledger(
        host.device_id,
        device_label=host.device_label,
        total_bytes=host.total_bytes,
        free_bytes=lambda: host.total_bytes,
        directory=str(tmp_path / "ledger"),
        budget=Settings.from_env({"ELASTIKV_DEVICE_BUDGET": "16MiB"}).device_budget,
    )
    return host, ledger, LedgerBudget.register(ledger, "hog", engine="test", limit=16 * MIB, capacity=16 * MIB)


def test_running_requests_wait_for_memory_another_instance_holds(model: Any, elastic: Any, tmp_path: Path) -> None:
    """The device budget is full because another instance (a booking in the same ledger) holds it; the batch
    waits, with no request failed, and finishes exactly once that instance gives its memory back."""
    host, ledger, hog = _hog(tmp_path)
    hog.book(12 * MIB)  # leaves 4 MiB: the null page and one more, 126 blocks; the batch below needs 168

    def give_back() -> None:  # one second after the engine's cache has joined the ledger
        deadline = time.monotonic() + 60
        while not any(r.engine == "transformers" for r in ledger.summary().instances):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        time.sleep(1.0)
        hog.release(12 * MIB)

    threading.Thread(target=give_back, daemon=True).start()
    prompts = _prompts(12, [400], seed=10)  # 12 x 14 blocks; seed 10: no prompt where plain generate meets EOS
    try:
        outs, cache = elastic(prompts, 32, ELASTIKV_DEVICE_BUDGET="16MiB", ELASTIKV_PREFIX_CACHE="0")
    finally:
        hog.close()
        ledger.close()
        host.close()
    assert [o.error for o in outs] == [None] * 12
    assert [o.generated_tokens for o in outs] == _expected(model, prompts, 32)
    assert cache.waits > 0 or cache.elastic.allocator.stats().refusals > 0  # it really had to wait


def test_a_cache_opened_while_the_budget_is_full_waits_for_room(model: Any, elastic: Any, tmp_path: Path) -> None:
    """Another instance holds the whole device budget when the cache opens, so not even its null blocks' page
    can be mapped: the batching thread waits (it used to die, dropping every request) and the batch completes,
    token for token, once that instance gives its memory back."""
    host, ledger, hog = _hog(tmp_path)
    hog.book(16 * MIB)
    released_at: list[float] = []

    def give_back() -> None:
        time.sleep(1.5)
        released_at.append(time.monotonic())
        hog.release(16 * MIB)

    threading.Thread(target=give_back, daemon=True).start()
    prompts = _prompts(4, [100], seed=10)
    try:
        outs, cache = elastic(prompts, 16, ELASTIKV_DEVICE_BUDGET="16MiB", ELASTIKV_PREFIX_CACHE="0")
        done_at = time.monotonic()
    finally:
        hog.close()
        ledger.close()
        host.close()
    assert [o.error for o in outs] == [None] * 4
    assert [o.generated_tokens for o in outs] == _expected(model, prompts, 16)
    assert released_at and done_at > released_at[0]  # it could only finish after the memory came back
    assert cache.elastic.allocator.stats().pages_mapped >= 1
