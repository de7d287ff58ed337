"""vLLM adapter, KV allocation of vLLM 0.34 ("extensible": Model Runner V2 only, an ``allocate=`` hook).

0.34 plans the KV cache as 0.32-0.33 do (one backing buffer, vLLM's own views) and lets the caller of
``allocate_kv_cache(..., allocate=None)`` supply the buffer. It also brings its own driver-mapped KV cache,
``ExtensibleKVCache``, on by default on CUDA; it cannot share a range with elastikv's, so the engine core turns it
off the way vLLM itself does for an unsupported setup (``Executor.extensible_kv_cache_unsupported_reason``
returns a reason, and vLLM disables it on every worker before profiling). The real allocation then passes
``allocate=`` a function returning elastikv's space, and vLLM's view code is left in charge.

Contract-checked against the 0.34.0 release; not run end to end here (no CPU wheel, and the GPU machine's torch
is 2.11, which 0.34 does not support).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from elastikv.engines.patching import Target
from elastikv.engines.vllm import kv_unified
from elastikv.engines.vllm import worker as vllm_worker
from elastikv.errors import UnsupportedEngine

log = logging.getLogger("elastikv")

VERSIONS: tuple[tuple[int, int], ...] = ((0, 34),)
CALLERS = ("vllm.v1.worker.utils", "vllm.v1.worker.gpu.attn_utils")
REASON = "elastikv manages the KV cache (ELASTIKV=1)"

TARGETS: tuple[Target, ...] = (
    Target(
        "vllm.v1.worker.utils",
        "allocate_kv_cache",
        ("kv_cache_config", "device", "layout", "kernel_block_sizes", "allocate"),
    ),
    Target("vllm.v1.worker.gpu.attn_utils", "allocate_kv_cache"),
    Target("vllm.v1.kv_cache_interface", "KVCacheTensor"),
    Target("vllm.v1.executor.abstract", "Executor.extensible_kv_cache_unsupported_reason", ("self", "kv_cache_specs")),
)


def install(patch: Callable[[str, str, Callable[[Any], Any]], None]) -> None:
    for module in CALLERS:
        patch(module, "allocate_kv_cache", _make_allocate_kv_cache)
    patch("vllm.v1.executor.abstract", "Executor.extensible_kv_cache_unsupported_reason", _wrap_unsupported_reason)


def _wrap_unsupported_reason(original: Callable[..., str | None]) -> Callable[..., str | None]:
    def extensible_kv_cache_unsupported_reason(self: Any, kv_cache_specs: Any) -> str | None:
        if getattr(self.vllm_config.cache_config, "enable_extensible_kv_cache", None) is True:
            raise UnsupportedEngine(
                "--enable-extensible-kv-cache and ELASTIKV=1 both manage the KV cache; drop one of them"
            )
        return REASON

    return extensible_kv_cache_unsupported_reason


def _make_allocate_kv_cache(original: Callable[..., dict[str, torch.Tensor]]) -> Callable[..., Any]:
    def allocate_kv_cache(
        kv_cache_config: Any,
        device: torch.device,
        layout: Any,
        kernel_block_sizes: list[int] | None = None,
        allocate: Callable[[int], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        worker = vllm_worker.real_allocation_worker()
        if worker is None or not kv_cache_config.kv_cache_tensors:
            return original(kv_cache_config, device, layout, kernel_block_sizes, allocate=allocate)
        if allocate is not None:
            raise UnsupportedEngine("vLLM asked for its extensible KV cache although elastikv turned it off")
        space = vllm_worker.take_space(device, lambda backend: kv_unified._space_for(kv_cache_config, backend))

        def elastic_buffer(size: int) -> torch.Tensor:
            raw = space.raw.view(torch.int8)
            if size > raw.numel():
                raise UnsupportedEngine(f"vLLM wants a {size}-byte KV buffer; elastikv's space has {raw.numel()}")
            return raw[:size]

        out = original(kv_cache_config, device, layout, kernel_block_sizes, allocate=elastic_buffer)
        vllm_worker.serve_pages(worker)
        return out

    return allocate_kv_cache
