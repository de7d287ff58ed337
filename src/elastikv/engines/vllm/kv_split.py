"""vLLM adapter, KV allocation of vLLM 0.26 ("split": one raw tensor per layer, reshaped by vLLM).

There the plan (``KVCacheConfig.kv_cache_tensors``) holds one ``KVCacheTensor(size, shared_by)`` per layer, and
each model runner allocates one ``int8`` tensor of ``size`` bytes per entry, which vLLM then views in its
attention backend's shape (FlashAttention: ``[num_blocks, block_size, heads, 2 * head_size]``, block-first):

- Model Runner V1: ``GPUModelRunner._allocate_kv_cache_tensors(self, kv_cache_config)`` (a method; the CPU runner
  inherits it);
- Model Runner V2 (0.26's default for dense models on a GPU): ``vllm.v1.worker.gpu.attn_utils._allocate_kv_cache
  (kv_cache_config, shared_layers, device)``, called by its module's ``init_kv_cache`` through the module global.

Block ``b`` of a layer is bytes ``[b * page, (b + 1) * page)`` of that layer's tensor, so the real allocation is
one scratch-backed :class:`~elastikv.space.KVSpace` in the ``per-layer`` layout (a range per layer, a page one
chunk in each) and each layer's tensor is that layer's range; vLLM's reshape is left as it is. Refused, naming
why: a packed plan (``block_stride > 0``: DeepSeek-V4, cross-layer connectors), layers of unequal size (hybrid
models), static-sink attention (its manager pops blocks from the free queue elastikv keeps empty).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from elastikv.engines.patching import Target
from elastikv.engines.vllm import worker as vllm_worker
from elastikv.errors import UnsupportedEngine
from elastikv.instance import MemoryBackend
from elastikv.space import KVGeometry, KVSpace

log = logging.getLogger("elastikv")

VERSIONS: tuple[tuple[int, int], ...] = ((0, 26),)

TARGETS: tuple[Target, ...] = (
    Target("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._allocate_kv_cache_tensors", ("self", "kv_cache_config")),
    Target("vllm.v1.worker.gpu.attn_utils", "_allocate_kv_cache", ("kv_cache_config", "shared_layers", "device")),
    Target("vllm.v1.worker.gpu.attn_utils", "init_kv_cache", ("kv_cache_config",)),
    Target("vllm.v1.kv_cache_interface", "KVCacheTensor"),
)


def install(patch: Callable[[str, str, Callable[[Any], Any]], None]) -> None:
    patch("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._allocate_kv_cache_tensors", _wrap_runner_v1)
    with contextlib.suppress(ImportError):  # a build without Model Runner V2
        patch("vllm.v1.worker.gpu.attn_utils", "_allocate_kv_cache", _wrap_runner_v2)


def _wrap_runner_v1(original: Callable[..., dict[str, torch.Tensor]]) -> Callable[..., dict[str, torch.Tensor]]:
    def _allocate_kv_cache_tensors(self: Any, kv_cache_config: Any) -> dict[str, torch.Tensor]:
        worker = vllm_worker.real_allocation_worker()
        if worker is None or not kv_cache_config.kv_cache_tensors:
            return original(self, kv_cache_config)
        skip = set(getattr(self, "runner_only_attn_layers", ()) or ())
        return _elastic_tensors(worker, kv_cache_config, self.device, skip)

    return _allocate_kv_cache_tensors


def _wrap_runner_v2(original: Callable[..., dict[str, torch.Tensor]]) -> Callable[..., dict[str, torch.Tensor]]:
    def _allocate_kv_cache(kv_cache_config: Any, shared_layers: Any, device: torch.device) -> dict[str, torch.Tensor]:
        worker = vllm_worker.real_allocation_worker()
        if worker is None or not kv_cache_config.kv_cache_tensors:
            return original(kv_cache_config, shared_layers, device)
        return _elastic_tensors(worker, kv_cache_config, device, set(shared_layers or ()))

    return _allocate_kv_cache


def _check_plan(kv_cache_config: Any) -> tuple[int, int]:
    """The plan's (layers, bytes per layer), or ``UnsupportedEngine`` saying why elastikv cannot hold it."""
    tensors = kv_cache_config.kv_cache_tensors
    if any(int(getattr(t, "block_stride", 0) or 0) > 0 for t in tensors):
        raise UnsupportedEngine(
            "this model's KV cache is planned packed (one allocation, a block stride across layers); elastikv "
            "handles vLLM 0.26's per-layer plans only. Run it without ELASTIKV=1."
        )
    sizes = {int(t.size) for t in tensors}
    if len(sizes) != 1:
        raise UnsupportedEngine(
            f"this model's KV cache layers differ in size ({sorted(sizes)} bytes: a hybrid or multi-group model); "
            "elastikv needs one size per layer. Run it without ELASTIKV=1."
        )
    for group in kv_cache_config.kv_cache_groups:
        if "Sink" in type(group.kv_cache_spec).__name__:
            raise UnsupportedEngine(
                "static-sink attention takes blocks from vLLM's free queue directly, which elastikv keeps empty; "
                "run this model without ELASTIKV=1."
            )
    size = sizes.pop()
    n = int(kv_cache_config.num_blocks)
    if size % n:
        raise UnsupportedEngine(f"a KV layer of {size} bytes is not {n} whole blocks")
    return len(tensors), size


def _space_for(kv_cache_config: Any, backend: MemoryBackend) -> KVSpace:
    layers, size = _check_plan(kv_cache_config)
    n = int(kv_cache_config.num_blocks)
    geometry = KVGeometry(layers, (size // n,), torch.uint8, buffers_per_layer=1)
    return vllm_worker.open_space(backend, geometry, "per-layer", n)


def _elastic_tensors(
    worker: Any, kv_cache_config: Any, device: torch.device, skip: set[str]
) -> dict[str, torch.Tensor]:
    """Each planned tensor as its layer's range of one elastic space (what vLLM's allocation returns)."""
    space = vllm_worker.take_space(device, lambda backend: _space_for(kv_cache_config, backend))
    out: dict[str, torch.Tensor] = {}
    for layer, t in enumerate(kv_cache_config.kv_cache_tensors):
        raw = space.buffer(layer).view(-1).view(torch.int8)  # [num_blocks * page] bytes, contiguous
        assert raw.numel() == int(t.size)
        out.update((name, raw) for name in t.shared_by)
    wanted = {name for g in kv_cache_config.kv_cache_groups for name in g.layer_names} - skip
    if set(out) != wanted:
        raise UnsupportedEngine(f"vLLM's KV plan names layers {sorted(set(out) ^ wanted)} inconsistently")
    vllm_worker.serve_pages(worker)
    return out
