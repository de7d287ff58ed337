"""Installation: every module of elastikv imports in this environment (scripts/check-imports), and scripts/install
picks torch for the machine it runs on (its --dry-run prints the pip commands without running them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"


def source_modules() -> set[str]:
    """elastikv's module names, one for each .py file under src/elastikv."""
    names = set()
    for path in (SRC / "elastikv").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def check_imports(*python_flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, *python_flags, str(REPO / "scripts" / "check-imports")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip


def test_every_module_imports() -> None:
    result = check_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    imported = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("imported ")}
    assert imported == source_modules()
    assert f"from {SRC / 'elastikv'}," in result.stdout


def test_check_imports_names_what_is_missing() -> None:
    # Without site-packages (python -S) elastikv's own source is there but none of its dependencies.
    result = check_imports("-S")
    assert result.returncode == 1
    assert "FAILED elastikv.space: missing module 'torch' (distribution torch" in result.stderr
    assert "FAILED elastikv.router.config: missing module 'yaml' (distribution pyyaml" in result.stderr


def run_install(path: list[Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    """scripts/install --dry-run, run from ``cwd``, seeing only ``path`` (python3 and nvidia-smi come from it)."""
    tools = cwd / "tools"  # what the script needs besides python3
    tools.mkdir(exist_ok=True)
    for tool in ["dirname"]:
        if not (tools / tool).exists():
            (tools / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    env = {**os.environ, "PATH": os.pathsep.join(str(p) for p in [*path, tools])}
    env.pop("VIRTUAL_ENV", None)
    bash = shutil.which("bash") or "/bin/bash"
    result = subprocess.run(
        [bash, str(REPO / "scripts" / "install"), "--dry-run"], capture_output=True, text=True, env=env, cwd=cwd,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[1] == f"+ cd {REPO}"  # the repository, wherever it was run from
    return result


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment (no torch, nothing installed): its bin directory."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    return venv / "bin"


def test_install_cpu_path_without_nvidia_smi(bare_python: Path, tmp_path: Path) -> None:
    result = run_install([bare_python], tmp_path)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("scripts/install: CPU path: no NVIDIA GPU"), result.stdout
    assert lines[2:] == [
        "+ python3 -m pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu",
        "+ python3 -m pip install -e '.[serve]'",
    ]
    # The README and CI name the same torch.
    assert "torch==2.13.0\n" in (REPO / "constraints" / "cpu.txt").read_text()


def test_install_leaves_an_installed_torch_alone(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    # This interpreter's directory first: its python3 is the one with torch (a venv's bin holds python3).
    here = Path(sys.executable).parent
    if not (here / "python3").exists():
        pytest.skip(f"no python3 beside {sys.executable}")
    result = run_install([here], tmp_path)
    lines = result.stdout.splitlines()
    assert "is already importable: leaving it alone" in lines[0], result.stdout
    assert lines[2:] == ["+ python3 -m pip install -e '.[serve]'"]


def test_install_gpu_path(bare_python: Path, tmp_path: Path) -> None:
    # An nvidia-smi that lists a GPU (the real one runs only where there is one).
    fake = tmp_path / "gpu"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    result = run_install([bare_python, fake], tmp_path)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("scripts/install: GPU path: nvidia-smi -L lists GPU 0: NVIDIA H100"), result.stdout
    assert lines[2:] == ["+ python3 -m pip install -e '.[serve,cuda]'"]
