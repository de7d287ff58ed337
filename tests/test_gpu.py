"""What only a GPU can show: CUDA kernels on the views, PyTorch seeing VMM memory, fences against real work."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from tests.conftest import MULTI

from elastikv.allocator import BlockAllocator
from elastikv.memory import MemoryBackend
from elastikv.space import KVGeometry, KVSpace

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda() -> MemoryBackend:
    from elastikv.memory.cuda import CudaBackend

    torch.cuda.init()
    be = CudaBackend(0)
    yield be
    be.close()


@pytest.mark.parametrize("layout", ["interleaved", "per-layer"])
def test_kernels_read_and_write_through_the_views(cuda: MemoryBackend, layout: str) -> None:
    geometry = KVGeometry.for_attention(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)
    with KVSpace(cuda, geometry, layout=layout, num_blocks=4096) as space:
        alloc = BlockAllocator(space, reserve_bytes=0, background=False)
        blocks = alloc.allocate(300)
        ids = torch.tensor(blocks, device="cuda")
        ref = {}
        for layer in range(4):
            for b in range(2):
                data = torch.randn(len(blocks), 16, 8, 128, device="cuda", dtype=torch.bfloat16)
                space.buffer(layer, b).index_copy_(0, ids, data)  # a CUDA kernel writing through the view
                ref[layer, b] = data.cpu()
        # A reduction kernel over the views (attention-like: q . k over every block of a layer).
        q = torch.randn(8, 128, device="cuda", dtype=torch.bfloat16)
        k = space.buffer(3, 0)[ids].float()
        scores = torch.einsum("hd,nthd->nth", q.float(), k)
        want = torch.einsum("hd,nthd->nth", q.float().cpu(), ref[3, 0].float())
        assert torch.allclose(scores.cpu(), want, rtol=1e-3, atol=1e-2)
        for (layer, b), data in ref.items():
            assert torch.equal(space.buffer(layer, b)[ids].cpu(), data)
        alloc.close()


def test_torch_sees_mapped_memory(cuda: MemoryBackend) -> None:
    with KVSpace(cuda, MULTI, num_blocks=64 * 1024) as space:
        alloc = BlockAllocator(space, reserve_bytes=0, background=False, trim_delay=0.0)
        free0, _ = torch.cuda.mem_get_info()
        held = alloc.allocate(100 * space.blocks_per_page)
        free1, _ = torch.cuda.mem_get_info()
        assert free0 - free1 >= 100 * space.page_bytes
        alloc.free(held)
        alloc.maintain(now=100.0)
        free2, _ = torch.cuda.mem_get_info()
        assert free2 - free1 >= 100 * space.page_bytes * 0.99
        alloc.close()


def test_unmap_waits_for_gpu_work_on_the_page(cuda: MemoryBackend) -> None:
    """Invariant 5 with real work: a kernel still queued behind a long sleep writes into a block whose page
    the engine has already freed. The unmap must wait for it; unmapping first would be an illegal address."""
    with KVSpace(cuda, MULTI, num_blocks=1024) as space:
        alloc = BlockAllocator(space, reserve_bytes=0, background=False, trim_delay=0.0)
        blocks = alloc.allocate(space.blocks_per_page)
        ids = torch.tensor(blocks, device="cuda")
        torch.cuda.synchronize()
        start = time.monotonic()
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time on an H100
        space.buffer(0, 0).index_fill_(0, ids, 3.0)  # queued behind the sleep
        alloc.free(blocks)  # the engine frees at schedule time, before the GPU ran the work
        trimmer = threading.Thread(target=alloc.maintain, kwargs={"now": 100.0})
        trimmer.start()
        time.sleep(0.2)
        assert space.is_mapped(0), "the page was unmapped while GPU work on it was still queued"
        trimmer.join(30)
        elapsed = time.monotonic() - start
        assert not space.is_mapped(0)
        torch.cuda.synchronize()  # would raise on an illegal address
        assert elapsed > 0.3
        alloc.close()


def test_closing_a_space_waits_for_queued_work(cuda: MemoryBackend) -> None:
    """Shutting down while the GPU still has work queued on the cache must not pull memory from under it."""
    space = KVSpace(cuda, MULTI, num_blocks=1024)
    alloc = BlockAllocator(space, reserve_bytes=0, background=False)
    ids = torch.tensor(alloc.allocate(10), device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)
    space.buffer(1, 1).index_fill_(0, ids, 1.0)  # queued behind the sleep
    alloc.close()
    space.close()
    torch.cuda.synchronize()  # would raise on an illegal address


def test_the_drivers_count_of_this_process_sees_vmm_pages_and_what_torch_cannot(cuda: MemoryBackend) -> None:
    """The figure an engine books as ``other`` (``memory/usage.py``): the driver's per-process count sees pages
    mapped through VMM and the CUDA context, which PyTorch's allocator does not count."""
    from elastikv.memory.usage import other_bytes, process_device_bytes

    device = torch.device("cuda", 0)
    before = process_device_bytes(device)
    if before is None:
        pytest.skip("NVML is not importable here (pip install nvidia-ml-py) or reports no per-process figure")
    geometry = KVGeometry.for_attention(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)
    with KVSpace(cuda, geometry, layout="per-layer", num_blocks=4096) as space:
        alloc = BlockAllocator(space, reserve_bytes=0, background=False)
        alloc.allocate(2048)
        mapped = space.mapped_bytes
        assert mapped >= 64 * 2**20
        held = process_device_bytes(device)
        assert held is not None and held - before >= mapped  # VMM pages are in the driver's count
        weights = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
        other = other_bytes(device, weights=weights.nbytes, kv=mapped)
        # what is left besides weights and KV: the context (hundreds of MiB), beyond PyTorch's own count
        assert other > torch.cuda.memory_reserved(device) - weights.nbytes + 64 * 2**20
        alloc.close()
