"""Per-request attention for the embedded engine: ``paged|elastikv``.

Why it exists: transformers' ``paged|sdpa`` runs one masked attention over the packed batch, every query token
against the keys of *every* request in the batch (a ``[batch tokens, batch KV tokens]`` mask), so a step costs in
proportion to (tokens in the step) x (KV held by the whole batch). An engine that admits three times as many
long requests (what elastikv is for) then slows every step by about that much. This function attends each
request's queries to that request's keys only (variable-length attention), so a step's attention costs the sum
of each request's own work, as in vLLM or SGLang.

How: the step's new K/V are written into the paged cache and the batch's keys and values gathered request
after request into one reused workspace (``_write_and_gather``: transformers' ``cache.update`` for a
full-attention layer, minus a fresh tensor every step); ``cu_seq_lens_k`` gives each request's bounds; then
- on a CUDA device with half-precision activations: PyTorch's flash attention kernel in its variable-length form
  (``aten::_flash_attention_forward``: grouped-query heads natively, causal mask aligned to the end of each
  request's keys, so chunked prefill and decode are both right);
- anywhere else (CPU tests, float32): one ``scaled_dot_product_attention`` per request with the same
  end-aligned causal mask. Exact, and cheap for the tiny models that run there.

The output is the same as ``paged|sdpa`` up to floating-point rounding (tests compare greedy tokens).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from elastikv.config import ATTENTIONS
from elastikv.errors import ConfigError

NAME = "paged|elastikv"
_WORKSPACE = "_elastikv_gather"  # the attribute of transformers' cache that holds the gather workspace


def choose(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """``elastikv`` or ``sdpa`` for an engine's ``--attention`` choice: ``auto`` picks this module's per-request
    attention where its fast kernel runs (CUDA, bf16/fp16) and transformers' ``paged|sdpa`` elsewhere (on a CPU
    both are exact; sdpa is transformers' tested default)."""
    if choice not in ATTENTIONS:
        raise ConfigError(f"attention {choice!r}: use one of {', '.join(ATTENTIONS)}")
    if choice == "auto":
        return "elastikv" if _flash_ok(device, dtype) else "sdpa"
    return choice


def resolve(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """The transformers attention implementation (``paged|elastikv``, registered, or ``paged|sdpa``)."""
    if choose(choice, device, dtype) == "elastikv":
        register()
        return NAME
    return "paged|sdpa"


def register() -> None:
    """Make ``paged|elastikv`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, paged_varlen_attention)


def drop_workspace(cache: Any) -> None:
    """Let the gather workspace of ``cache`` go (an idle engine gives its memory back); the next step makes one."""
    setattr(cache, _WORKSPACE, None)


@functools.cache  # asked at every layer of every step
def _flash_ok(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return bool(torch.backends.cuda.is_flash_attention_available()) and torch.cuda.get_device_capability(device)[0] >= 8


def paged_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, q tokens, head_dim]
    key: torch.Tensor,  # [1, kv heads, q tokens, head_dim]: this step's new keys
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # None: transformers builds no mask for this implementation
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; continuous batching passes the paged-cache arguments."""
    cache = kwargs.get("cache")
    if cache is None:
        raise ValueError(f"`{NAME}` needs transformers' continuous batching (a paged cache); use `sdpa` otherwise")
    if getattr(module, "sliding_window", None):
        raise ValueError(f"`{NAME}` does not handle sliding-window layers; start the engine with --attention sdpa")
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    keys, values = _write_and_gather(cache, layer, key, value, kwargs["read_index"], kwargs["write_index"])
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    max_q, max_k = kwargs["max_seqlen_q"], kwargs["max_seqlen_k"]
    if isinstance(cu_k, dict):  # several layer types: this layer is full attention (sliding refused above)
        cu_k, max_k = cu_k["full_attention"], max_k["full_attention"]
    q = query[0].transpose(0, 1)  # [q tokens, heads, head_dim]
    out = varlen_attention(q, keys, values, cu_q, cu_k, int(max_q), int(max_k), scaling)
    return out, None  # [q tokens, heads, head_dim]: the model reshapes it to [1, q tokens, hidden]


def _write_and_gather(
    cache: Any, layer: int, key: torch.Tensor, value: torch.Tensor, read: list[torch.Tensor], write: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """What transformers' ``cache.update`` does for a full-attention layer (write this step's K/V at ``write``,
    read the batch's K/V at ``read``), but reading into one workspace kept on the cache.

    Why: the batch's KV grows a little every step, and a fresh ``index_select`` result each step is a slightly
    larger allocation each time, which PyTorch's caching allocator cannot serve from the smaller blocks it
    freed: on the H100 each engine's cache grew by 6-11 GiB during one peak and an engine ran out of device
    memory. The workspace grows by powers of two and is reused by every layer and step."""
    group, index = cache.layer_index_to_group_indices[layer]
    k_cache, v_cache = cache.key_cache[index], cache.value_cache[index]
    new_k, new_v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [q tokens, kv heads, head_dim]
    k_cache.index_copy_(0, write[group], new_k)
    v_cache.index_copy_(0, write[group], new_v)
    rows = read[group]
    if rows.numel() == 0:  # prefills only: the step's own K/V are all there is to attend to
        return new_k, new_v
    n = rows.numel()
    work: torch.Tensor | None = getattr(cache, _WORKSPACE, None)
    if work is None or work.shape[1] < n or work.dtype != k_cache.dtype:
        size = 1 << max(n - 1, 1).bit_length()  # the next power of two: a handful of sizes over a lifetime
        drop_workspace(cache)  # the old one goes back before the new one is made
        work = torch.empty((2, size, *k_cache.shape[1:]), dtype=k_cache.dtype, device=k_cache.device)
        setattr(cache, _WORKSPACE, work)
    keys, values = work[0, :n], work[1, :n]
    torch.index_select(k_cache, 0, rows, out=keys)
    torch.index_select(v_cache, 0, rows, out=values)
    return keys, values


def varlen_attention(
    q: torch.Tensor,  # [q tokens, heads, head_dim], request after request
    k: torch.Tensor,  # [KV tokens, kv heads, head_dim], request after request
    v: torch.Tensor,
    cu_q: torch.Tensor,  # [requests + 1]: request i's queries are q[cu_q[i]:cu_q[i+1]]
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float | None,
) -> torch.Tensor:
    """Causal attention of each request's queries to its own keys; a request's queries are its last tokens."""
    if _flash_ok(q.device, q.dtype):
        out: torch.Tensor = torch.ops.aten._flash_attention_forward(
            q.contiguous(), k.contiguous(), v.contiguous(), cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
            0.0, True, False, scale=scale,
        )[0]  # fmt: skip
        return out
    return _per_request_sdpa(q, k, v, cu_q, cu_k, scale)


def _per_request_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """The reference path: each request's queries against its own keys, causal from the end of its keys."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        if q1 == q0:
            continue  # padding entry
        qi = q[q0:q1].transpose(0, 1)  # [heads, n_q, d]
        ki = k[k0:k1].transpose(0, 1).repeat_interleave(groups, dim=0)
        vi = v[k0:k1].transpose(0, 1).repeat_interleave(groups, dim=0)
        n_q, n_k = q1 - q0, k1 - k0
        # query j (the (n_k - n_q + j)-th token of the request) sees keys 0 .. n_k - n_q + j
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
        o = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out[q0:q1] = o.transpose(0, 1)
    return out
