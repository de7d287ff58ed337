"""Mode variants: an elastic mode run again with other elastikv settings, in the same command as its baseline.

``elastic@chunk=8MiB`` is the ``elastic`` mode with ``ELASTIKV_CHUNK=8MiB`` in its engines' environment;
``elastic@chunk=8MiB@reserve=768MiB`` sets two. Each setting is one of elastikv's own variables (``config.ENV_VARS``,
named without its ``ELASTIKV_`` prefix, any case) and is checked as elastikv would check it. The benchmark's report
treats a variant as a mode of its own (its own row, its ratio to static and kvcached, its light-load figure), so
that two settings are compared against one static run on one GPU, not across commands.

The benchmark owns a few variables (the shared budget, the ledger, the engines' names, and weight booking, off in
every elastic mode so that the budget is KV's as static's shares are): a variant may not set them.
"""

from __future__ import annotations

from elastikv.config import ENV_VARS
from elastikv.errors import ConfigError

SEPARATOR = "@"
OWNED = ("ELASTIKV_DEVICE_BUDGET", "ELASTIKV_LEDGER_DIR", "ELASTIKV_NAME", "ELASTIKV_BOOK_WEIGHTS")


def base_mode(mode: str) -> str:
    """``elastic@chunk=8MiB`` -> ``elastic``; a plain mode is its own base."""
    return mode.split(SEPARATOR, 1)[0]


def variant_env(mode: str) -> dict[str, str]:
    """The elastikv settings ``mode`` adds to its engines' environment (none for a plain mode), each checked."""
    base, *settings = mode.split(SEPARATOR)
    if settings and not base.startswith("elastic"):
        raise ConfigError(f"mode {mode!r}: only elastic modes take settings (elastic@chunk=8MiB); {base} has none")
    env: dict[str, str] = {}
    for setting in settings:
        key, eq, value = setting.partition("=")
        var = "ELASTIKV_" + key.strip().upper()
        if not eq or not key.strip() or not value:
            raise ConfigError(f"mode {mode!r}: {setting!r} is not NAME=VALUE (e.g. elastic@chunk=8MiB)")
        if var not in ENV_VARS or var in OWNED:
            usable = [v.removeprefix("ELASTIKV_").lower() for v in ENV_VARS if v.startswith("ELASTIKV_")]
            raise ConfigError(
                f"mode {mode!r}: {key!r} is not a setting a variant can change; use one of "
                + ", ".join(u for u in usable if "ELASTIKV_" + u.upper() not in OWNED)
            )
        ENV_VARS[var][1](value, f"mode {mode!r}: {key}")  # raises ConfigError naming the problem
        if var in env:
            raise ConfigError(f"mode {mode!r}: {key} is set twice")
        env[var] = value
    return env
