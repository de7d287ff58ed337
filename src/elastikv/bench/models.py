"""Random-weight models with a locally trained tokenizer, for machines with no model hub (``elastikv make-model``).

The directory written is a normal Hugging Face model directory (``config.json``, ``*.safetensors``,
``tokenizer.json`` + ``tokenizer_config.json`` with a chat template, ``generation_config.json``): vLLM,
transformers and elastikv's own engine load it like any downloaded model. Weights come from a fixed seed and
are written one tensor at a time, so an 8B-shaped model needs no more memory than its largest tensor.

The tokenizer is a byte-level BPE trained on the docstrings of Python's standard library (English prose
found on every machine), so prompts in plain text tokenize to sensible lengths.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastikv.errors import ConfigError

ARCHES = ("llama",)


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tokenizer_vocab: int
    dtype: str


SIZES: dict[str, Shape] = {
    # vLLM's CPU build wants a head dim of at least 32; float32 keeps CPU greedy decoding deterministic
    "tiny": Shape(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=2048, tokenizer_vocab=2048,
                  dtype="float32"),
    "1b": Shape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=32000, tokenizer_vocab=8000,
                dtype="bfloat16"),
    "8b": Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256,
                tokenizer_vocab=8000, dtype="bfloat16"),
}  # fmt: skip

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def _corpus() -> list[str]:
    """English prose every Python install has: the standard library's docstrings."""
    import importlib
    import sys

    texts: list[str] = []
    names = sorted(set(sys.stdlib_module_names))
    for name in names:
        if name.startswith("_") or name in {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}:
            continue
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        for obj in [mod, *vars(mod).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40:
                texts.append(doc)
        if len(texts) > 6000:
            break
    return texts


@functools.cache  # training takes seconds; models made in one process (the demo's three) share the result
def train_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def make_model(
    path: str | Path, *, arch: str = "llama", size: str = "tiny", seed: int = 0, draw_on: str = "cpu"
) -> Path:
    """Write a random-weight ``arch`` model of ``size`` with a trained tokenizer to ``path``; return it.

    ``draw_on="cuda"`` draws the random weights on the GPU (the same seed gives other weights than on the CPU): an
    8B's 8e9 draws take ~45 s of one CPU core and well under a second there, which a fresh GPU machine with a
    30-minute budget feels (scripts/gpu-plan). Only a caller with no other use for a CUDA context should ask."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if arch not in ARCHES:
        raise ConfigError(f"--arch {arch!r}: elastikv can make {', '.join(ARCHES)}")
    if size not in SIZES:
        raise ConfigError(f"--size {size!r}: choose one of {', '.join(SIZES)}")
    s = SIZES[size]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(s.tokenizer_vocab)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", unk_token="<unk>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("<|end|>")

    config = LlamaConfig(
        architectures=["LlamaForCausalLM"],  # engines pick the model class from it (SGLang fails without it)
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.hidden // s.heads,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        dtype=s.dtype,
    )
    config.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}) + "\n")

    # The parameter names and shapes of the real class, without allocating it; then one tensor at a time.
    with torch.device("meta"):
        meta_model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
        shapes = {name: tuple(p.shape) for name, p in meta_model.state_dict().items()}
    dtype = getattr(torch, s.dtype)
    gen = torch.Generator(device=draw_on).manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, index, n = 0, {}, 0
    limit = 2 * 1024**3
    for name, shape in shapes.items():
        if len(shape) == 1:  # norms
            t = torch.ones(shape, dtype=dtype)
        else:  # large enough that greedy decoding does not collapse to one token
            t = torch.empty(shape, dtype=torch.float32, device=draw_on)
            t = t.normal_(0.0, 0.08 if size == "tiny" else 0.02, generator=gen).to(dtype).cpu()
        nbytes = t.numel() * t.element_size()
        if shard and shard_bytes + nbytes > limit:
            n += 1
            save_file(shard, str(path / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})
            shard, shard_bytes = {}, 0
        shard[name] = t
        shard_bytes += nbytes
        index[name] = n + 1
    n += 1
    save_file(shard, str(path / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})
    total = n
    if total == 1:
        (path / "model-00001.safetensors").rename(path / "model.safetensors")
    else:
        names = {k: f"model-{v:05d}.safetensors" for k, v in index.items()}
        weight_map = {"metadata": {"total_size": _total_bytes(shapes, dtype)}, "weight_map": names}
        (path / "model.safetensors.index.json").write_text(json.dumps(weight_map, indent=1) + "\n")
    return path


def _total_bytes(shapes: dict[str, tuple[int, ...]], dtype: Any) -> int:
    return int(sum(math.prod(s) for s in shapes.values()) * dtype.itemsize)


def make_model_once(path: str | Path, *, size: str, seed: int = 0, draw_on: str = "cpu") -> bool:
    """Make ``path`` with :func:`make_model` unless a complete one is there already (a ``DONE`` marker, written
    last, so that a run killed while writing weights makes it again); True if it was made now. Benchmarks keep
    their random model this way between runs (``--model-cache``, ``.models/`` on the GPU machine)."""
    path = Path(path)
    if (path / "DONE").is_file():
        return False
    make_model(path, size=size, seed=seed, draw_on=draw_on)
    (path / "DONE").write_text("")
    return True
