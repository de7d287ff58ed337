"""The vLLM adapter's contract with the installed vLLM, and what a user sees when it does not hold.

The adapter's targets (:func:`~elastikv.engines.vllm.targets_for`) list every vLLM name it patches or calls. Here the
installed vLLM's *source files* are parsed (no import of the code under test's patches) and each target must
be bound at the top of its module, or defined on its class, with the parameters the adapter passes. A vLLM
release that moves one fails this test in CI instead of failing users.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.tiny_models import build_tiny_llama
from tests.vllm_harness import needs_vllm

from elastikv.engines import autopatch
from elastikv.engines.contract import source_problems

ROOT = Path(__file__).resolve().parent.parent


def contract_problems(root: Path | None = None) -> list[str]:
    """Every adapter target the vLLM source (installed, or unpacked under ``root``) does not provide.

    ``python tests/test_vllm_contract.py DIR`` (or ``python -m elastikv.engines.contract vllm DIR``) checks a
    release without installing it (unzip its wheel's ``vllm/*.py`` into DIR): how 0.33 was checked on a machine
    that can only run 0.32.
    """
    from elastikv.engines.contract import installed_root, vllm_version_in
    from elastikv.engines.vllm import targets_for

    found = vllm_version_in(root or installed_root("vllm") or Path("."))
    assert found is not None, "no vllm/_version.py: which release is this?"
    return source_problems(targets_for(found), root)


@needs_vllm
def test_every_patch_target_is_in_the_installed_vllm_source() -> None:
    problems = contract_problems()
    assert not problems, "\n".join(problems)


@needs_vllm
def test_the_runtime_check_agrees_and_the_version_is_supported() -> None:
    from elastikv.engines import vllm as adapter

    assert adapter.missing_targets() == []
    text, tup = adapter.version()
    adapter.check_version(text, tup)


def test_an_unknown_version_is_refused_with_the_supported_ones() -> None:
    from elastikv.engines.vllm import check_version
    from elastikv.errors import UnsupportedEngine

    with pytest.raises(UnsupportedEngine, match=r"supports vLLM 0\.26, 0\.32, 0\.33, 0\.34; this is vLLM 0\.35\.1\b"):
        check_version("0.35.1", (0, 35, 1))
    for supported in ((0, 26, 0), (0, 32, 0), (0, 33, 0), (0, 34, 0)):
        check_version(".".join(map(str, supported)), supported)


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ELASTIKV", "VLLM_"))}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )


@needs_vllm
def test_an_unsupported_vllm_refuses_to_start(tmp_path: Path) -> None:
    """What a user sees: the engine stops at start-up, before loading the model, naming the versions."""
    model = build_tiny_llama(tmp_path / "tiny")
    code = (
        "import vllm\n"
        "vllm.__version__, vllm.__version_tuple__ = '0.31.2', (0, 31, 2)\n"
        "from vllm import LLM\n"
        f"LLM(model={str(model)!r}, skip_tokenizer_init=True, enforce_eager=True)\n"
        "print('STARTED')\n"
    )
    out = _python(code, ELASTIKV="1", TMPDIR=str(tmp_path))
    assert out.returncode != 0
    assert "STARTED" not in out.stdout
    assert "elastikv supports vLLM 0.26, 0.32, 0.33, 0.34; this is vLLM 0.31.2" in out.stderr, out.stderr[-3000:]


@needs_vllm
def test_a_moved_patch_target_refuses_to_start_naming_it(tmp_path: Path) -> None:
    code = (
        "import vllm.v1.core.block_pool as bp\n"
        "del bp.BlockPool.touch\n"  # what a vLLM release that renamed it would look like
        "from elastikv.engines.autopatch import vllm_plugin\n"
        "vllm_plugin()\n"
        "print('PATCHED')\n"
    )
    out = _python(code, ELASTIKV="1", TMPDIR=str(tmp_path))
    assert out.returncode != 0 and "PATCHED" not in out.stdout
    assert "vllm.v1.core.block_pool.BlockPool.touch: missing" in out.stderr, out.stderr[-3000:]
    assert "refusing to run vLLM unpatched" in out.stderr


def test_the_hook_does_nothing_without_elastikv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELASTIKV", raising=False)
    autopatch.vllm_plugin()  # returns before importing vLLM at all
    assert "elastikv.engines.vllm" not in sys.modules or not sys.modules["elastikv.engines.vllm"].patched()


def test_the_hook_stops_on_a_malformed_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from elastikv.errors import ConfigError

    monkeypatch.setenv("ELASTIKV", "1")
    monkeypatch.setenv("ELASTIKV_PREFIX_CACHE", "lots")
    with pytest.raises(ConfigError, match="ELASTIKV_PREFIX_CACHE"):
        autopatch.vllm_plugin()


def _elastikv(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ELASTIKV", "VLLM_"))}
    return subprocess.run(
        [sys.executable, "-m", "elastikv.cli", *args], env={**base, **env}, capture_output=True, text=True, timeout=60
    )


def test_elastikv_run_starts_the_command_with_elastikv_on() -> None:
    out = _elastikv("run", "--", sys.executable, "-c", "import os; print('ELASTIKV=' + os.environ['ELASTIKV'])")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ELASTIKV=1"


def test_elastikv_run_refuses_what_would_leave_the_engine_static() -> None:
    out = _elastikv("run", "--", "vllm", "serve", "m", VLLM_PLUGINS="other")
    assert out.returncode == 2
    assert "VLLM_PLUGINS='other' leaves out 'elastikv'" in out.stderr
    assert "VLLM_PLUGINS=other,elastikv" in out.stderr
    out = _elastikv("run", "--", "no-such-engine-command")
    assert out.returncode == 2 and "command not found: no-such-engine-command" in out.stderr
    out = _elastikv("run", "--", sys.executable, "-V", ELASTIKV_RESERVE="much")
    assert out.returncode == 2 and "ELASTIKV_RESERVE" in out.stderr


if __name__ == "__main__":
    found = contract_problems(Path(sys.argv[1]))
    print("\n".join(found) or f"{sys.argv[1]}: every target present")
    sys.exit(1 if found else 0)
