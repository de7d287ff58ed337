"""Tiny random-weight models built on the spot (no model hub here): a Llama small enough for a CPU test.

The weights come from a fixed seed, so every process that builds the same model gets the same weights and
greedy outputs can be compared across processes and engines.
"""

from __future__ import annotations

import json
from pathlib import Path

# vLLM's CPU build wants a head dim of at least 32 and a block size that is a multiple of 32.
TINY_LLAMA = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def build_tiny_llama(path: str | Path, seed: int = 0, **overrides: object) -> Path:
    """Write a random-weight Llama to ``path`` (config.json + safetensors) and return it. Idempotent."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides}, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    # Larger weights than the default init, so that greedy decoding does not collapse to one token.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return path
