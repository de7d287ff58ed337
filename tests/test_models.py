"""`elastikv make-model`: a random-weight model directory that transformers and vLLM load like a downloaded one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[serve]'")


def _make_model(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "elastikv.cli", "make-model", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_make_model_writes_a_loadable_model_with_a_trained_tokenizer(tmp_path: Path) -> None:
    out = _make_model(str(tmp_path / "m"), "--size", "tiny")
    assert out.returncode == 0, out.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    text = "Return a new list containing all items from the iterable in ascending order."
    ids = tok(text).input_ids
    assert 8 <= len(ids) <= 40  # trained on English prose: words, not bytes
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|assistant|>\n")
    generated = model.generate(tok(text, return_tensors="pt").input_ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == len(ids) + 8
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["eos_token_id"] == tok.eos_token_id
    assert config["architectures"] == ["LlamaForCausalLM"]  # SGLang and vLLM pick the model class from it


def test_make_model_rejects_an_unknown_size(tmp_path: Path) -> None:
    out = _make_model(str(tmp_path / "m"), "--size", "huge")
    assert out.returncode == 2 and "huge" in out.stderr


@pytest.mark.gpu
def test_weights_drawn_on_the_gpu_are_the_same_model_on_the_cpu(tmp_path: Path) -> None:
    """gpu-plan draws the 8B's weights on the GPU (draw_on='cuda'); what it writes is an ordinary CPU model."""
    import torch
    from safetensors.torch import load_file

    from elastikv.bench.models import make_model

    on_gpu = make_model(tmp_path / "g", size="tiny", draw_on="cuda")
    on_cpu = make_model(tmp_path / "c", size="tiny")
    g, c = load_file(str(on_gpu / "model.safetensors")), load_file(str(on_cpu / "model.safetensors"))
    assert g.keys() == c.keys()
    for name, t in g.items():
        assert t.device.type == "cpu" and t.dtype == c[name].dtype and t.shape == c[name].shape
        if t.dim() > 1:  # drawn: another generator, so other values of the same spread
            assert not torch.equal(t, c[name])
            assert abs(t.float().std().item() - c[name].float().std().item()) < 0.01
