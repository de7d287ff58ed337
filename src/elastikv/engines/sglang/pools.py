"""SGLang adapter, KV sizing and buffers: SGLang's KV pools built over elastikv's spaces.

Sizing
    ``KVCacheConfigurator._profile_available_bytes`` reports the *virtual capacity* (the device's total memory),
    never a free-memory snapshot; SGLang derives ``max_total_num_tokens`` from it (``--max-total-tokens`` can
    still lower it).
Buffers
    ``MHATokenToKVPool._create_buffers_normal`` builds every layer's K and V buffer as a view of one
    :class:`~elastikv.space.KVSpace` (per-layer layout: SGLang indexes tokens with one slot stride, so the
    block-interleaved layout does not fit). An elastikv block is one SGLang page (``--page-size`` tokens); SGLang's
    padded page 0 is the always-mapped null block. Nothing is mapped until a page is handed out. MLA
    (``MLATokenToKVPool._create_buffers``): each layer's joint latent buffer is a view of one space the same way.

Each pool keeps its elastic cache as ``pool._elastikv`` (and the block offset of SGLang's pages as
``pool._elastikv_offset``); the allocator (``allocator.py``) finds it there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from elastikv.config import format_bytes
from elastikv.engines.sglang import process
from elastikv.errors import UnsupportedEngine
from elastikv.instance import Instance, open_holding, open_instance, weight_bytes
from elastikv.page_plan import PagePlan
from elastikv.space import KVGeometry

log = logging.getLogger("elastikv")


def wrap_profile_available_bytes(original: Callable[..., int]) -> Callable[..., int]:
    """``KVCacheConfigurator._profile_available_bytes``: the device's total memory (the virtual capacity)."""

    def _profile_available_bytes(self: Any, pre_model_load_memory: int) -> int:
        proc = process.for_device(self.device)
        total = proc.backend.mem_info()[1]
        log.info(
            "elastikv: SGLang's KV pool sized from the device's %s (virtual capacity), not from free memory",
            format_bytes(total),
        )
        return int(total)

    return _profile_available_bytes


def wrap_alloc_memory_pool(original: Callable[..., Any]) -> Callable[..., Any]:
    """``ModelRunner.alloc_memory_pool``: remember the runner's forward stream (an unmap waits for it); once the
    pools (and so the instance) exist, book the model's weights beside its KV (``ELASTIKV_BOOK_WEIGHTS``) and check
    that the budget leaves room for one request of the model's context length."""

    def alloc_memory_pool(self: Any, *args: Any, **kwargs: Any) -> Any:
        proc = process.for_device(self.device)
        proc.forward_stream = getattr(self, "forward_stream", None)
        result = original(self, *args, **kwargs)
        _book_weights(proc, self)
        if proc.instances:
            _require_one_request(proc.instances[0], self)
        return result

    return alloc_memory_pool


def _book_weights(proc: process.SchedulerProcess, runner: Any) -> None:
    """The runner's weights in the device's ledger under the instance's name. SGLang loads them before elastikv's
    instance exists, so a budget that cannot take them is logged, not refused; its memory release keeps the weights
    resident, so they stay booked until the process ends."""
    model = getattr(runner, "model", None)
    if proc.holding is not None or not proc.instances or model is None:
        return
    proc.holding = open_holding(torch.device(runner.device), proc.settings, name=proc.instances[0].name)
    if proc.holding is None:
        return
    proc.holding.book_held(weights=weight_bytes(model))


def _require_one_request(inst: Instance, runner: Any) -> None:
    """As vLLM's adapter does: a budget that, less what engines hold besides KV, could never give this engine one
    request of the model's context length stops the start, saying why, rather than leave such requests waiting."""
    tokens = int(getattr(getattr(runner, "model_config", None), "context_len", 0) or 0)
    if tokens <= 0:
        return
    blocks = -(-tokens // inst.space.geometry.block_shape[0])  # a block is one SGLang page of tokens
    inst.require_room(blocks, what=f"one {tokens}-token request", fix="lower --context-length")


def _refuse_custom_mem_pool(pool: Any) -> None:
    if getattr(pool, "enable_custom_mem_pool", False) or getattr(pool, "custom_mem_pool", None) is not None:
        raise UnsupportedEngine(
            "elastikv cannot back SGLang's custom KV memory pool (PD disaggregation transfer); run the "
            "disaggregated engines without ELASTIKV=1"
        )


def open_pool_space(pool: Any, geometry: KVGeometry) -> slice:
    """Open the elastic space behind one SGLang KV pool; return the rows of each buffer SGLang sees.

    SGLang wants exactly size + page_size rows (its padded page 0, then pages 1..P), but a space has whole pages
    of blocks. So the plan pads the front (:meth:`PagePlan.for_front_padded`): SGLang's page p is block
    p + offset, blocks 0..offset (the padding and SGLang's page 0, within the space's first page) are the
    always-mapped null blocks, and the allocator's blocks are exactly SGLang's pages 1..P."""
    ps = int(pool.page_size)
    proc = process.for_device(pool.device)
    plan = PagePlan.for_front_padded(
        geometry,
        "per-layer",
        proc.backend.granularity,
        engine_blocks=int(pool.size) // ps + 1,
        engine_null_blocks=1,
        min_chunk_bytes=proc.settings.min_chunk_bytes,
    )
    inst = open_instance(
        geometry, engine="sglang", backend=proc.backend, plan=plan, settings=proc.settings, streams=proc.streams()
    )
    proc.instances.append(inst)
    pool._elastikv_offset = plan.front_padding
    pool._elastikv = inst
    return slice(plan.front_padding * ps, plan.num_blocks * ps)


def wrap_create_buffers_normal(original: Callable[..., None]) -> Callable[..., None]:
    """MHA: every layer's K and V are views of one per-layer space (two buffers a layer)."""

    def _create_buffers_normal(self: Any) -> None:
        layout = getattr(self, "kv_cache_layout", "nhd")
        if layout != "nhd" or getattr(self, "use_hnd", False):
            raise UnsupportedEngine(
                f"elastikv supports SGLang's default KV layout 'nhd', not {layout!r}; unset SGLANG_USE_HND_KVCACHE "
                "(or the option that chose it) or run without ELASTIKV=1"
            )
        _refuse_custom_mem_pool(self)
        k_shape, v_shape = self._kv_buffer_shapes()
        if k_shape != v_shape:
            raise UnsupportedEngine(
                f"elastikv needs K and V of the same shape in SGLang's pool, got {k_shape} and {v_shape}; run this "
                "model without ELASTIKV=1"
            )
        ps, heads, dim = int(self.page_size), int(self.head_num), int(self.head_dim)
        geometry = KVGeometry.for_attention(
            num_layers=int(self.layer_num), num_kv_heads=heads, head_dim=dim, block_size=ps, dtype=self.store_dtype
        )
        rows = open_pool_space(self, geometry)
        space = self._elastikv.space
        self.k_buffer = [space.buffer(i, 0).view(-1, heads, dim)[rows] for i in range(int(self.layer_num))]
        self.v_buffer = [space.buffer(i, 1).view(-1, heads, dim)[rows] for i in range(int(self.layer_num))]

    return _create_buffers_normal


def wrap_mla_create_buffers(original: Callable[..., None]) -> Callable[..., None]:
    """MLA: every layer's joint latent ``[rows, 1, kv_lora_rank + qk_rope_head_dim]`` is a view of one space
    (one buffer a layer). Subclasses with other buffers (DSA's indexer cache, the unified pool) keep SGLang's own
    and are refused when the allocator is built."""

    def _create_buffers(self: Any) -> None:
        if type(self).__name__ != "MLATokenToKVPool" or getattr(self, "use_dsa", False):
            original(self)
            return
        _refuse_custom_mem_pool(self)
        ps, dim = int(self.page_size), int(self.kv_cache_dim)
        geometry = KVGeometry(int(self.layer_num), (ps, 1, dim), self.store_dtype, buffers_per_layer=1)
        rows = open_pool_space(self, geometry)
        space = self._elastikv.space
        self.kv_buffer = [space.buffer(i, 0).view(-1, 1, dim)[rows] for i in range(int(self.layer_num))]

    return _create_buffers


def pool_instance(kvcache: Any) -> Instance:
    """The elastic cache behind SGLang's KV pool ``kvcache``; refuses a pool elastikv did not build."""
    inst: Instance | None = getattr(kvcache, "_elastikv", None)
    if inst is None:
        raise UnsupportedEngine(
            f"ELASTIKV=1, but SGLang built its KV pool as {type(kvcache).__name__}, which elastikv does not back "
            "(it backs MHATokenToKVPool and MLATokenToKVPool: standard multi-head and multi-head latent attention; "
            "not DSA, hybrid SWA, Mamba or fp4 KV); run this model without ELASTIKV=1"
        )
    return inst
