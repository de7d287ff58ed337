"""vLLM adapter, KV allocation of vLLM 0.32 and 0.33 ("unified": one backing buffer, vLLM's own views).

There, every model runner (V1, Model Runner V2, CPU) gets its KV cache from ``allocate_kv_cache(kv_cache_config,
device, layout, kernel_block_sizes)``: one ``int8`` buffer for the whole plan, then per-layer views made by
``create_kv_cache_views`` in the model-wide ``KVCacheLayout``. The callers import it by name, so each importing
module's binding is replaced. The real allocation becomes a scratch-backed :class:`~elastikv.space.KVSpace` whose
bytes are laid out exactly as vLLM planned (a layer-outermost plan is our ``per-layer`` layout, a block-outermost
one our ``interleaved``), with vLLM's own views over it; profiling allocations go to vLLM's function.
"""

from __future__ import annotations

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

VERSIONS: tuple[tuple[int, int], ...] = ((0, 32), (0, 33))
CALLERS = ("vllm.v1.worker.utils", "vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.attn_utils")

TARGETS: tuple[Target, ...] = (
    Target("vllm.v1.worker.utils", "allocate_kv_cache", ("kv_cache_config", "device", "layout", "kernel_block_sizes")),
    Target("vllm.v1.worker.gpu_model_runner", "allocate_kv_cache"),
    Target("vllm.v1.worker.gpu.attn_utils", "allocate_kv_cache", optional=True),
    Target(
        "vllm.v1.kv_cache_interface",
        "create_kv_cache_views",
        ("raw", "spec", "num_blocks", "layout", "kv_cache_tensor", "kernel_block_size"),
    ),
    Target("vllm.v1.kv_cache_interface", "KVCacheTensor"),
    Target("vllm.v1.kv_cache_interface", "UniformTypeKVCacheSpecs"),
)


def install(patch: Callable[[str, str, Callable[[Any], Any]], None]) -> None:
    for module in CALLERS:
        try:
            patch(module, "allocate_kv_cache", _make_allocate_kv_cache)
        except ImportError:
            if module != "vllm.v1.worker.gpu.attn_utils":  # Model Runner V2 is absent from some builds
                raise


def _space_for(kv_cache_config: Any, backend: MemoryBackend) -> KVSpace:
    """A KVSpace with exactly the byte layout vLLM planned for its one backing allocation."""
    tensors = kv_cache_config.kv_cache_tensors
    if len(tensors) != 1:
        raise UnsupportedEngine(
            f"elastikv handles a KV cache planned as one tensor; this model has {len(tensors)} (hybrid or "
            "multi-group models are not supported yet). Run it without ELASTIKV=1."
        )
    t = tensors[0]
    n, layers = kv_cache_config.num_blocks, len(t.layers)
    if t.offset == 0 and t.block_stride * n == t.layer_stride and t.size == layers * t.layer_stride:
        geometry, layout = KVGeometry(layers, (t.block_stride,), torch.uint8, buffers_per_layer=1), "per-layer"
    elif t.offset == 0 and t.layer_stride * layers <= t.block_stride and t.size == n * t.block_stride:
        geometry, layout = KVGeometry(1, (t.block_stride,), torch.uint8, buffers_per_layer=1), "interleaved"
    else:
        raise UnsupportedEngine(
            f"unknown KV cache placement (size {t.size}, {layers} layers, layer stride {t.layer_stride}, block "
            f"stride {t.block_stride}, offset {t.offset}, {n} blocks); elastikv knows layer-outermost and "
            "block-outermost layouts"
        )
    return vllm_worker.open_space(backend, geometry, layout, n)


def _make_allocate_kv_cache(original: Callable[..., dict[str, torch.Tensor]]) -> Callable[..., Any]:
    def allocate_kv_cache(
        kv_cache_config: Any, device: torch.device, layout: Any, kernel_block_sizes: list[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """The worker's real KV cache over elastikv's space (profiling allocations go to vLLM's own)."""
        worker = vllm_worker.real_allocation_worker()
        if worker is None or not kv_cache_config.kv_cache_tensors:
            return original(kv_cache_config, device, layout, kernel_block_sizes)
        return _elastic_kv_cache(worker, kv_cache_config, device, layout, kernel_block_sizes)

    return allocate_kv_cache


def _elastic_kv_cache(
    worker: Any, kv_cache_config: Any, device: torch.device, layout: Any, kernel_block_sizes: list[int] | None
) -> dict[str, torch.Tensor]:
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs, create_kv_cache_views

    space = vllm_worker.take_space(device, lambda backend: _space_for(kv_cache_config, backend))
    raw = space.raw.view(torch.int8)
    out: dict[str, torch.Tensor] = {}
    for t in kv_cache_config.kv_cache_tensors:
        group_id, group = next(
            (i, g) for i, g in enumerate(kv_cache_config.kv_cache_groups) if t.layers[0] in g.layer_names
        )
        spec = group.kv_cache_spec
        if isinstance(spec, UniformTypeKVCacheSpecs):
            spec = spec.kv_cache_specs[t.layers[0]]
        if not getattr(spec, "has_layer_views", True):
            out.update((name, raw) for name in t.layers)
            continue
        kbs = kernel_block_sizes[group_id] if kernel_block_sizes and group_id < len(kernel_block_sizes) else None
        views = create_kv_cache_views(raw, spec, kv_cache_config.num_blocks, layout, t, kernel_block_size=kbs)
        out.update(zip(t.layers, views, strict=False))
    vllm_worker.serve_pages(worker)
    return out
