"""Start-up hooks: with ``ELASTIKV=1``, every engine process patches itself as it starts.

SGLang loads the ``sglang.srt.plugins`` entry points in each of its processes (``launch_server``, ``sglang
serve``, ``Engine``; the HTTP server, the detokenizer and every scheduler, all started by spawn): elastikv
registers :func:`sglang_plugin` there. The same holds for vLLM:

vLLM loads the ``vllm.general_plugins`` entry points in each of its processes (API server, engine core, every
worker), whether started as ``vllm serve``, ``python -m vllm.entrypoints.openai.api_server`` or ``LLM(...)``,
with fork or spawn. elastikv registers :func:`vllm_plugin` there (``pyproject.toml``), which works the same for
editable and normal installs. ``elastikv run -- CMD`` is ``ELASTIKV=1 CMD`` with checks that the hook will
really run.

This module stays import-light: vLLM swallows a plugin that fails to *import*, which would leave the engine
silently static. Everything that can fail happens inside :func:`vllm_plugin`, where a failure stops the process.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Sequence
from typing import NoReturn

PLUGIN_NAME = "elastikv"


def _setup_logging(level: str) -> None:
    logger = logging.getLogger("elastikv")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("(elastikv pid=%(process)d) %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


def _active() -> bool:
    """Whether ``ELASTIKV=1``; if so, the settings are valid (or this raises with the reason) and logging is on."""
    from elastikv.config import ENV_VARS, Settings

    _, flag = ENV_VARS["ELASTIKV"]
    if not flag(os.environ.get("ELASTIKV", "0").strip() or "0", "ELASTIKV"):
        return False  # off: the other ELASTIKV_* variables are none of the engine's business
    _setup_logging(Settings.from_env().log_level)
    return True


def vllm_plugin() -> None:
    """vLLM's plugin hook. Does nothing unless ``ELASTIKV=1``; then patches this process or stops it."""
    if not _active():  # a malformed ELASTIKV_* variable stops the engine with its reason
        return
    from elastikv.engines import vllm

    try:
        vllm.apply()
    except Exception as exc:
        logging.getLogger("elastikv").error("elastikv: refusing to run vLLM unpatched: %s", exc)
        raise


def sglang_plugin() -> None:
    """SGLang's plugin hook (group ``sglang.srt.plugins``, loaded in every SGLang process). Does nothing unless
    ``ELASTIKV=1``; then patches this process or stops it. SGLang logs and swallows a plugin's exceptions (the
    engine would run static, silently), so a refusal is a ``SystemExit``, which it does not catch."""
    try:
        if not _active():
            return
        from elastikv.engines import sglang

        sglang.apply()
    except Exception as exc:
        _setup_logging("INFO")
        logging.getLogger("elastikv").error("elastikv: refusing to run SGLang unpatched: %s", exc)
        raise SystemExit(f"elastikv: refusing to run SGLang unpatched: {exc}") from exc


def run(argv: Sequence[str]) -> NoReturn:
    """Replace this process with ``argv``, with ``ELASTIKV=1`` set."""
    from elastikv.config import Settings
    from elastikv.errors import ConfigError

    if not argv:
        raise ConfigError("elastikv run needs a command, e.g. elastikv run -- vllm serve MODEL")
    env = dict(os.environ)
    env["ELASTIKV"] = "1"
    Settings.from_env(env)  # fail here, with the reason, rather than inside the engine
    allowed = env.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in [p.strip() for p in allowed.split(",")]:
        raise ConfigError(
            f"VLLM_PLUGINS={allowed!r} leaves out {PLUGIN_NAME!r}, so vLLM would run without elastikv; "
            f"add it: VLLM_PLUGINS={allowed},{PLUGIN_NAME}"
        )
    allowed = env.get("SGLANG_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in [p.strip() for p in allowed.split(",")]:
        raise ConfigError(
            f"SGLANG_PLUGINS={allowed!r} leaves out {PLUGIN_NAME!r}, so SGLang would run without elastikv; "
            f"add it: SGLANG_PLUGINS={allowed},{PLUGIN_NAME}"
        )
    if shutil.which(argv[0]) is None:
        raise ConfigError(f"command not found: {argv[0]}")
    os.execvpe(argv[0], list(argv), env)
