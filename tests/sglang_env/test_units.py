"""The SGLang adapter's own logic against SGLang's real classes (0.5.23), on the host backend: the pool's buffers
over a KVSpace, the allocator bridge (SGLang's own allocation kernels reading our free list), free accounting,
limits and admission, refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

MIB = 1024**2
PS = 16  # SGLang page (tokens) = one elastikv block
SIZE = 65536  # SGLang's capacity in tokens: 4096 pages


@pytest.fixture(scope="module")
def sgl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[types.SimpleNamespace]:
    os.environ["ELASTIKV_HOST_MEMORY"] = "256MiB"
    os.environ["ELASTIKV_RESERVE"] = "0"
    os.environ["ELASTIKV_LEDGER_DIR"] = str(tmp_path_factory.mktemp("ledger"))
    from elastikv.engines import sglang as adapter

    adapter.apply()
    from sglang.srt.mem_cache import kv_cache_configurator as kc
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    yield types.SimpleNamespace(adapter=adapter, kc=kc, Pool=MHATokenToKVPool)


def _build(sgl: Any, size: int = SIZE, page_size: int = PS) -> tuple[Any, Any]:
    pool = sgl.Pool(
        size=size,
        page_size=page_size,
        dtype=torch.float32,
        head_num=2,
        head_dim=32,
        layer_num=2,
        device="cpu",
        enable_memory_saver=False,
    )
    if page_size == 1:
        alloc = sgl.kc.TokenToKVPoolAllocator(size, dtype=torch.float32, device="cpu", kvcache=pool, need_sort=False)
    else:
        alloc = sgl.kc.PagedTokenToKVPoolAllocator(
            size, page_size=page_size, dtype=torch.float32, device="cpu", kvcache=pool, need_sort=False
        )
    return pool, alloc


def _settle(alloc: Any, pages: int, timeout: float = 5.0) -> int:
    """Wait for the maintainer to bring mapped pages down to ``pages``; return what is mapped."""
    deadline = time.monotonic() + timeout
    while True:
        mapped = alloc._alloc.stats().pages_mapped
        if mapped <= pages or time.monotonic() > deadline:
            return int(mapped)
        time.sleep(0.02)


def _extend(alloc: Any, lens: list[int], prefix: list[int] | None = None) -> torch.Tensor:
    prefix = prefix or [0] * len(lens)
    p = torch.tensor(prefix, dtype=torch.int64)
    s = torch.tensor(lens, dtype=torch.int64)
    last = torch.full((len(lens),), -1, dtype=torch.int64)
    return alloc.alloc_extend(p, p, s, s, last, int(sum(lens) - sum(prefix)))


def test_pool_buffers_are_views_of_the_space_nothing_mapped_until_used(sgl: Any) -> None:
    pool, alloc = _build(sgl)
    inst = pool._elastikv
    assert type(alloc).__name__ == "ElasticTokenAllocator"
    assert pool.k_buffer[0].shape == (SIZE + PS, 2, 32) and pool.v_buffer[1].shape == (SIZE + PS, 2, 32)
    base, end = inst.space.raw.data_ptr(), inst.space.raw.data_ptr() + inst.space.raw.numel()
    for buf in pool.k_buffer + pool.v_buffer:
        assert base <= buf.data_ptr() < end  # SGLang's own tensors are ours, not torch.zeros
    stats = alloc._alloc.stats()
    assert stats.pages_mapped == 1 and stats.blocks_in_use == 0  # only the null page (SGLang's padded page 0)
    assert alloc.available_size() == SIZE and alloc.withheld_tokens() == 0
    alloc.clear()
    inst.close()


def test_sglang_kernels_allocate_from_secured_pages_and_frees_give_memory_back(sgl: Any) -> None:
    pool, alloc = _build(sgl)
    out = _extend(alloc, [40, 100, 9000])  # 3 + 7 + 563 pages: more than one elastikv page (512 blocks)
    assert out is not None and out.numel() == 9140 and len(torch.unique(out)) == 9140
    pages = set((out // PS).tolist())
    assert 0 not in pages and pages <= alloc._out and len(alloc._out) == 3 + 7 + 563
    assert alloc._alloc.stats().pages_mapped >= 3  # null page + the two elastikv pages these live in
    # Real data through SGLang's own views: every slot handed out is backed and keeps what is written.
    pool.k_buffer[1][out] = torch.arange(out.numel(), dtype=torch.float32)[:, None, None].expand(-1, 2, 32)
    assert torch.equal(pool.k_buffer[1][out][:, 1, 7], torch.arange(out.numel(), dtype=torch.float32))
    # Decode: the 40-token request crosses into a new page at token 49; SGLang's kernel takes exactly that one.
    seq = torch.tensor([49, 101, 9001])
    last = torch.stack([out[39] + 8, out[139], out[-1]])  # the last slot of each request so far (+8: 41..48)
    dec = alloc.alloc_decode(seq, seq, last)
    assert dec is not None and int(dec[0]) % PS == 0 and len(alloc._out) == 574
    held = alloc.available_size() + len(alloc._out) * PS + alloc.withheld_tokens()
    assert held == SIZE  # SGLang's conservation identity holds with the withheld tokens counted
    alloc.free(torch.cat([out, dec]))
    assert not alloc._out and alloc._alloc.stats().blocks_in_use == len(alloc._secured)
    alloc.clear()  # what flush_cache and release_memory_occupation end in: the reserve goes too
    assert _settle(alloc, 1) == 1
    pool._elastikv.close()


def test_page_size_one_uses_the_same_bridge(sgl: Any) -> None:
    pool, alloc = _build(sgl, size=16384, page_size=1)
    a = alloc.alloc(300)
    b = alloc.alloc(5)
    assert a is not None and b is not None and len(set(a.tolist()) | set(b.tolist())) == 305
    assert 0 not in set(a.tolist())
    alloc.free(a)
    assert len(alloc._out) == 5
    alloc.clear()
    pool._elastikv.close()


def test_mla_pool_latent_buffers_are_views_of_a_space_and_sglang_writes_through_them(sgl: Any) -> None:
    """MLA (DeepSeek-style): one joint latent buffer a layer, written with SGLang's own set_kv_buffer."""
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    rank, rope = 64, 16
    pool = MLATokenToKVPool(size=SIZE, page_size=PS, dtype=torch.float32, kv_lora_rank=rank, qk_rope_head_dim=rope,
                            layer_num=2, device="cpu", enable_memory_saver=False)  # fmt: skip
    alloc = sgl.kc.PagedTokenToKVPoolAllocator(
        SIZE, page_size=PS, dtype=torch.float32, device="cpu", kvcache=pool, need_sort=False
    )
    inst = pool._elastikv
    assert type(alloc).__name__ == "ElasticTokenAllocator" and inst.space.geometry.buffers_per_layer == 1
    assert pool.kv_buffer[1].shape == (SIZE + PS, 1, rank + rope)
    base, end = inst.space.raw.data_ptr(), inst.space.raw.data_ptr() + inst.space.raw.numel()
    assert all(base <= buf.data_ptr() < end for buf in pool.kv_buffer)
    assert int(pool.data_ptrs[1]) == pool.kv_buffer[1].data_ptr()  # the pointers SGLang's kernels read
    assert alloc._alloc.stats().pages_mapped == 1  # the null page only
    out = _extend(alloc, [100, 3000])
    assert out is not None and out.numel() == 3100 and 0 not in set((out // PS).tolist())
    layer = types.SimpleNamespace(layer_id=1)
    latent = torch.randn(out.numel(), 1, rank + rope)
    from sglang.srt.runtime_context import get_parallel

    with get_parallel().override(dcp_enabled=False):  # a single-rank engine publishes this at start-up
        pool.set_kv_buffer(layer, out, latent, latent[..., :rank])
    assert torch.equal(pool.get_key_buffer(1)[out], latent)
    assert torch.equal(pool.get_value_buffer(1)[out], latent[..., :rank])
    alloc.free(out)
    alloc.clear()
    assert _settle(alloc, 1) == 1  # every page back but the null page
    inst.close()


def test_the_limit_bounds_available_size_and_admission_secures_pages(sgl: Any) -> None:
    from sglang.srt.mem_cache.prefill_budget import PrefillBudget

    pool, alloc = _build(sgl)
    page_bytes = alloc._alloc.page_bytes
    alloc._alloc.set_limit(2 * page_bytes)  # the null page + one page of 512 SGLang pages
    tree = types.SimpleNamespace(evictable_size=lambda: 0, supports_mamba=lambda: False)
    assert alloc.available_size() == 512 * PS
    assert alloc.withheld_tokens() == SIZE - 512 * PS
    budget = alloc.create_prefill_budget(tree)
    assert isinstance(budget, PrefillBudget)

    def check(extend: int) -> bool:
        ok, _ = budget.check_prefill(
            extend_input_len=extend,
            total_tokens=extend + 16,
            max_new_tokens=16,
            input_tokens=extend,
            swa_host_hit_length=0,
            chunk_limit=None,
        )
        if ok:
            budget.reserve(extend, 16)
        return bool(ok)

    assert check(3000)  # 188 pages: admitted, and secured on the spot
    assert alloc.secured_pages >= 188
    # Another instance takes the rest of the device meanwhile: our headroom is gone; what is secured stays ours.
    alloc._alloc.set_limit(alloc._alloc.stats().mapped_bytes)
    assert not check(6000)
    out = _extend(alloc, [3000])
    assert out is not None and out.numel() == 3000  # the admitted request allocates: its pages were secured
    assert not alloc.check_decode_capacity(num_tokens=400 * PS, tree_cache=None)  # SGLang will retract
    alloc.free(out)
    alloc.clear()
    pool._elastikv.close()


def test_idle_check_counts_withheld_tokens_against_the_free_count_it_read(sgl: Any) -> None:
    """SGLang's idle check reads ``available_size()`` once into its pool stats; if the free count moves before our
    hook adds the withheld tokens (the maintainer maps a page, another instance takes memory), a fresh reading
    would make SGLang's conservation sum miss by a page and stop the scheduler as a "pool memory leak". The hook
    must measure against the reading SGLang used. Injected: the limit changes between the two readings."""
    from elastikv.engines.sglang.hooks import wrap_check_full_pool

    pool, alloc = _build(sgl)
    page_bytes = alloc._alloc.page_bytes
    alloc._alloc.set_limit(3 * page_bytes)
    out = _extend(alloc, [100])
    held = len(alloc._out) * PS
    seen = alloc.available_size()  # what SGLang's pool stats hold
    alloc._alloc.set_limit(2 * page_bytes)  # ...and the free count moves before the hook runs
    assert alloc.available_size() != seen
    sums: list[int] = []

    def original(checker: Any, ps: Any, uncached: int = 0) -> tuple[bool, str]:
        sums.append(ps.full_available_size + held + uncached)  # SGLang's identity: free + in use + uncached
        return False, ""

    checker = types.SimpleNamespace(token_to_kv_pool_allocator=alloc)
    wrap_check_full_pool(original)(checker, types.SimpleNamespace(full_available_size=seen))
    assert sums == [SIZE]  # conserved with the reading SGLang made, not off by the page that moved
    assert seen + held + alloc.withheld_tokens() != SIZE  # what a fresh reading would have reported
    alloc.free(out)
    alloc.clear()
    pool._elastikv.close()


def test_bad_frees_and_unsupported_pools_are_refused(sgl: Any) -> None:
    from elastikv.errors import ElastikvError, UnsupportedEngine

    pool, alloc = _build(sgl)
    out = _extend(alloc, [32])
    with pytest.raises(ElastikvError, match="does not hold"):
        alloc.free_page_ids(torch.tensor([4000]))
    assert len(alloc._out) == 2  # nothing changed
    alloc.free(out)
    with pytest.raises(UnsupportedEngine, match=r"SimpleNamespace.*run this model without ELASTIKV=1"):
        sgl.kc.PagedTokenToKVPoolAllocator(
            1024, page_size=16, dtype=torch.float32, device="cpu", kvcache=types.SimpleNamespace(), need_sort=False
        )
    with pytest.raises(UnsupportedEngine, match="PD disaggregation"):
        sgl.kc.PagedTokenToKVPoolAllocator(
            SIZE, page_size=PS, dtype=torch.float32, device="cpu", kvcache=pool, need_sort=True
        )
    alloc.clear()
    pool._elastikv.close()


def test_an_unsupported_sglang_version_stops_the_engine_with_the_reason(tmp_path: Path) -> None:
    script = tmp_path / "start.py"
    script.write_text(
        "import elastikv.engines.sglang as adapter\n"
        "adapter.version = lambda: '0.5.22'\n"
        "import sglang\n"
        "if __name__ == '__main__':\n"
        "    sglang.Engine(model_path='/nonexistent', device='cpu')\n"
        "    print('STARTED')\n"
    )
    env = dict(os.environ, ELASTIKV="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "STARTED" not in proc.stdout
    assert "refusing to run SGLang unpatched: elastikv supports SGLang 0.5.23; this is SGLang 0.5.22" in proc.stderr
