"""Import-only stand-in for SGLang's CPU kernel package (see ../README.md). Test-only, never shipped.

SGLang 0.5.23 imports these eight names at module import time when ``SGLANG_USE_CPU_ENGINE=1``. The ones used by
speculative decoding and KV moves raise if called (the tests use neither); ``assign_req_to_token_pool_cpu`` is
plain torch.
"""

from __future__ import annotations

from typing import Any

import torch

__version__ = "0.0.0+elastikv-test-stub"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    _row_len: int,
) -> None:
    """Write each request's new cache locations into its row of ``req_to_token`` (SGLang passes the row
    length last; the batch is every entry of ``req_pool_indices``)."""
    pos = 0
    for i in range(len(req_pool_indices)):
        start, end = int(start_offset[i]), int(end_offset[i])
        req_to_token[int(req_pool_indices[i]), start:end] = out_cache_loc[pos : pos + end - start]
        pos += end - start


def _missing(name: str) -> Any:
    def f(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(f"sgl_kernel.{name} is not available in elastikv's test stand-in")

    f.__name__ = name
    return f


copy_all_layer_kv_cache_cpu = _missing("copy_all_layer_kv_cache_cpu")
build_tree_kernel_efficient_cpu = _missing("build_tree_kernel_efficient_cpu")
verify_tree_greedy_cpu = _missing("verify_tree_greedy_cpu")
assign_draft_cache_locs_contiguous_cpu = _missing("assign_draft_cache_locs_contiguous_cpu")
assign_extend_cache_locs_cpu = _missing("assign_extend_cache_locs_cpu")
fill_accept_out_cache_loc_cpu = _missing("fill_accept_out_cache_loc_cpu")
fill_bonus_tokens_cpu = _missing("fill_bonus_tokens_cpu")
