"""The patching machinery both engine adapters share (``engines/patching.py``), on a stand-in module, and the
contract check's command (``elastikv check-contract``), which lives in the CLI so that ``contract.py`` imports no
adapter."""

from __future__ import annotations

import inspect
import subprocess
import sys
import types
from collections.abc import Iterator

import pytest

from elastikv.engines.patching import Patches, Target, refuse_problems, runtime_problems
from elastikv.errors import UnsupportedEngine

MODULE = "ekv_patching_standin"


class Engine:
    def step(self, tokens: int, budget: int = 0) -> int:
        return tokens


@pytest.fixture
def standin() -> Iterator[types.ModuleType]:
    module = types.ModuleType(MODULE)
    module.Engine = Engine  # type: ignore[attr-defined]
    module.limit = lambda: 1  # type: ignore[attr-defined]
    sys.modules[MODULE] = module
    original = Engine.step
    yield module
    Engine.step = original  # type: ignore[method-assign]
    del sys.modules[MODULE]


def _doubled(original: object) -> object:
    def step(self: Engine, tokens: int, budget: int = 0) -> int:
        return 2 * original(self, tokens, budget)  # type: ignore[operator]

    return step


def test_a_patch_is_installed_once_finds_its_original_and_is_undone(standin: types.ModuleType) -> None:
    patches = Patches()
    original = Engine.step
    assert not patches.installed
    patches.patch(MODULE, "Engine.step", _doubled)
    patches.patch(MODULE, "Engine.step", _doubled)  # an engine loading its plugins again: no second layer
    patches.patch(MODULE, "limit", lambda _orig: lambda: 2)
    assert patches.installed and Engine().step(3) == 6 and standin.limit() == 2
    assert inspect.unwrap(Engine.step) is original  # __wrapped__ set where the wrapper had none
    patches.undo()
    assert not patches.installed and Engine.step is original and standin.limit() == 1


def test_a_missing_optional_module_patches_nothing() -> None:
    patches = Patches()
    with pytest.raises(ImportError):
        patches.patch("ekv_no_such_module", "thing", lambda orig: orig)
    assert not patches.installed


def test_moved_targets_are_named_and_refused(standin: types.ModuleType) -> None:
    targets = (
        Target(MODULE, "Engine.step", ("self", "tokens", "budget")),
        Target(MODULE, "Engine.step", ("self", "tokens", "lookahead")),
        Target(MODULE, "Engine.stop"),
        Target("ekv_no_such_module", "thing", optional=True),
        Target("ekv_no_such_module", "thing"),
    )
    problems = runtime_problems(targets)
    assert problems[0] == f"{MODULE}.Engine.step: no parameter lookahead"
    assert problems[1].startswith(f"{MODULE}.Engine.stop: missing (")
    assert problems[2].startswith("ekv_no_such_module.thing: missing (")
    assert len(problems) == 3
    refuse_problems("Engine", "1.0", [], "1.0")  # nothing moved: nothing raised
    with pytest.raises(UnsupportedEngine, match=r"^Engine 2\.0 lacks what elastikv patches:\n  a\n  b\nelastikv "
                       r"supports Engine 1\.0; run without ELASTIKV=1 or report this\.$"):  # fmt: skip
        refuse_problems("Engine", "2.0", ["a", "b"], "1.0")


def test_the_contract_check_imports_no_adapter() -> None:
    code = (
        "import sys, elastikv.engines.contract\n"
        "print(sorted(m for m in sys.modules if m.startswith('elastikv.engines.') and m not in "
        "('elastikv.engines.contract', 'elastikv.engines.patching')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", [["-m", "elastikv.cli", "check-contract"], ["-m", "elastikv.engines.contract"]])
def test_check_contract_command_and_its_old_spelling(command: list[str]) -> None:
    usage = subprocess.run([sys.executable, *command, "nosuchengine"], capture_output=True, text=True, timeout=120)
    assert usage.returncode != 0 and "sglang" in usage.stderr
    from elastikv.engines.contract import installed_root

    if installed_root("sglang") is None:
        pytest.skip("SGLang's source is not installed here")
    out = subprocess.run([sys.executable, *command, "sglang"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "every sglang target is present"
