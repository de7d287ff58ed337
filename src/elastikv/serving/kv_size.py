"""Bytes of KV cache one token takes in a model, read from its Hugging Face ``config.json`` values.

The embedded engine sizes its KV read window with it (``serving/engine.py``); the benchmarks and the demo size
their budgets and static shares with it. Torch-free, so that importing it costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def kv_bytes_per_token(config: Mapping[str, Any], dtype_bytes: int) -> int:
    """K and V of one token in every layer (full attention), from a model's ``config.json`` values.

    ``head_dim`` defaults to ``hidden_size / num_attention_heads`` and ``num_key_value_heads`` to
    ``num_attention_heads`` (no grouped-query attention), as transformers reads them; ``dtype_bytes`` is the KV
    dtype's size (2 for bf16/fp16, 4 for fp32).
    """
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return int(2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes)
