"""vLLM's wake with its copies overlapped (``engines/vllm/wake.py``), on vLLM's own sleep-mode allocator: every byte
back, vLLM's ``libcudart`` restored, a fault in the wake propagated with nothing half done. Needs a CUDA build of
vLLM (the GPU machine's kit: ``scripts/gpu-check --vllm``)."""

from __future__ import annotations

import pytest
from tests.vllm_harness import HAVE_VLLM

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAVE_VLLM or not torch.cuda.is_available(), reason="needs a CUDA GPU and a CUDA vLLM"),
]

MiB = 1024**2


def test_an_overlapped_wake_brings_every_byte_back_and_leaves_vllm_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.device_allocator import cumem

    from elastikv.engines.vllm.wake import wrap_wake_up

    allocator = cumem.CuMemAllocator.get_instance()
    sizes = [(i % 7 + 1) * 8 * MiB + 4096 * i for i in range(40)]  # ~1.2 GiB in 40 allocations of mixed sizes
    with allocator.use_memory_pool(tag="weights"):
        held = [torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda") for n in sizes]
    expected = [t.sum(dtype=torch.int64).item() for t in held]
    firsts = [t[:4096].cpu() for t in held]
    real = cumem.libcudart
    free_before_sleep = torch.cuda.mem_get_info()[0]
    allocator.sleep(offload_tags=("weights",))
    assert torch.cuda.mem_get_info()[0] - free_before_sleep >= sum(sizes) // 2  # the weights really left
    wrap_wake_up(cumem.CuMemAllocator.wake_up)(allocator)
    assert cumem.libcudart is real
    assert [t.sum(dtype=torch.int64).item() for t in held] == expected
    assert all(torch.equal(t[:4096].cpu(), f) for t, f in zip(held, firsts, strict=True))

    # A fault in the wake (the driver refuses the first mapping): it propagates as vLLM's would, libcudart is
    # vLLM's own again, and vLLM's own wake then brings every byte back (nothing was half done).
    allocator.sleep(offload_tags=("weights",))

    def refusing_map(handle: object) -> None:
        raise RuntimeError("injected: the driver refused to map")

    monkeypatch.setattr(cumem, "create_and_map", refusing_map)
    with pytest.raises(RuntimeError, match="injected"):
        wrap_wake_up(cumem.CuMemAllocator.wake_up)(allocator)
    monkeypatch.undo()
    assert cumem.libcudart is real
    cumem.CuMemAllocator.wake_up(allocator)
    assert [t.sum(dtype=torch.int64).item() for t in held] == expected
