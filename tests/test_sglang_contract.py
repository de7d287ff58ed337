"""The SGLang adapter's contract with SGLang's source: every target present in the installed release (read as
files: CI installs SGLang with --no-deps, as it cannot run here), a moved target reported, an unsupported version
refused with the supported one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from elastikv.engines.contract import installed_root, source_problems
from elastikv.engines.sglang import SUPPORTED, TARGETS, check_version
from elastikv.errors import UnsupportedEngine

ROOT = installed_root("sglang")
needs_sglang = pytest.mark.skipif(
    ROOT is None, reason="SGLang's source is not installed here: pip install --no-deps sglang==0.5.23 (.ci/run does)"
)


@needs_sglang
def test_every_target_is_in_the_installed_sglang_source() -> None:
    assert ROOT is not None
    problems = source_problems(TARGETS, ROOT)
    assert not problems, "\n".join(problems)


@needs_sglang
def test_a_moved_target_is_reported(tmp_path: Path) -> None:
    """SGLang's allocator package copied, one method taken out of the paged allocator and one module removed:
    both are named."""
    assert ROOT is not None
    shutil.copytree(ROOT / "sglang", tmp_path / "sglang", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    paged = tmp_path / "sglang/srt/mem_cache/allocator/paged.py"
    paged.write_text(paged.read_text().replace("def alloc_decode(", "def alloc_decode_renamed("))
    (tmp_path / "sglang/srt/mem_cache/prefill_budget.py").unlink()
    problems = source_problems(TARGETS, tmp_path)
    assert (
        "sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator.alloc_decode: not defined on the class"
        in problems
    )
    assert "sglang.srt.mem_cache.prefill_budget: module missing" in problems


def test_an_unsupported_version_is_refused_with_the_supported_one() -> None:
    with pytest.raises(UnsupportedEngine, match=r"supports SGLang 0\.5\.23; this is SGLang 0\.5\.24\b.*pip install"):
        check_version("0.5.24")
    check_version(SUPPORTED[-1])
    check_version(SUPPORTED[-1] + "+cpu")
