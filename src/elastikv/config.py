"""Every setting elastikv reads, parsed and validated in one place.

Sizes are written the way people write them: ``8GiB``, ``512MiB``, ``1.5GB``, ``4096`` (bytes) or ``40%``
(of the device's total memory, resolved once the device is known). Environment variables all start with
``ELASTIKV``; an unknown one (usually a typo) is an error rather than a silently ignored setting.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from elastikv.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_PERCENT_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")
_SIZE_HELP = "write a size such as 8GiB, 512MiB, 1.5GB or 4096 (bytes), or a percent such as 40%"


@dataclass(frozen=True)
class Size:
    """A size given either in bytes or as a fraction of the device's total memory."""

    nbytes: int | None = None
    fraction: float | None = None

    def resolve(self, total: int) -> int:
        """Bytes this size stands for on a device with ``total`` bytes."""
        if self.nbytes is not None:
            return self.nbytes
        assert self.fraction is not None
        return int(total * self.fraction)

    def __str__(self) -> str:
        if self.nbytes is not None:
            return format_bytes(self.nbytes)
        assert self.fraction is not None
        return f"{self.fraction * 100:g}%"


def parse_size(text: str | int, *, what: str = "size", allow_percent: bool = True, allow_zero: bool = True) -> Size:
    """Parse ``text`` into a :class:`Size`; raise :class:`ConfigError` naming ``what`` on bad input."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: {text!r} is not a size; {_SIZE_HELP}")
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        if not isinstance(text, str):
            raise ConfigError(f"{what}: {text!r} is not a size; {_SIZE_HELP}")
        pct = _PERCENT_RE.match(text)
        if pct:
            if not allow_percent:
                raise ConfigError(f"{what}: {text!r} must be an absolute size here (such as 8GiB), not a percent")
            fraction = float(pct.group(1)) / 100
            if not 0 <= fraction <= 1:
                raise ConfigError(f"{what}: {text!r} is outside 0%..100%")
            if fraction == 0 and not allow_zero:
                raise ConfigError(f"{what}: {text!r} must be more than 0%")
            return Size(fraction=fraction)
        m = _SIZE_RE.match(text)
        if not m:
            raise ConfigError(f"{what}: {text!r} is not a size; {_SIZE_HELP}")
        value, unit = float(m.group(1)), m.group(2).lower()
    if unit not in _UNITS:
        raise ConfigError(f"{what}: unknown unit {unit!r} in {text!r}; {_SIZE_HELP}")
    nbytes = value * _UNITS[unit]
    if not math.isfinite(nbytes) or nbytes < 0:
        raise ConfigError(f"{what}: {text!r} must be a non-negative size; {_SIZE_HELP}")
    if nbytes == 0 and not allow_zero:
        raise ConfigError(f"{what}: {text!r} must be more than zero")
    return Size(nbytes=int(nbytes))


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``, ``1023.5 * 2**20 -> '1024 MiB'``: binary units, three significant digits (all
    the digits from 100 up: never an exponent)."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{sign}{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


BackendName = Literal["auto", "cuda", "host"]
LayoutName = Literal["interleaved", "per-layer"]
BACKENDS: tuple[BackendName, ...] = ("auto", "cuda", "host")
LAYOUTS: tuple[LayoutName, ...] = ("interleaved", "per-layer")
ATTENTIONS = ("auto", "elastikv", "sdpa")  # the embedded engine's --attention (serving/attention.py)


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ConfigError(f"{what}: {value!r} is not one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Settings:
    """elastikv's settings from the environment. Defaults are what a user gets with nothing set."""

    enabled: bool = False
    backend: BackendName = "auto"
    device: int = 0
    layout: LayoutName = "interleaved"
    limit: Size = Size(fraction=1.0)
    reserve: Size = Size(nbytes=256 * 1024**2)
    chunk: Size | None = None  # least bytes per physical allocation (rounded up to whole blocks); None: one block
    host_memory: Size | None = None
    # Most host memory one engine may pin to hold its sleeping weights (serving/weights.py): bytes, or a percent
    # of the host's physical memory. Per engine: each engine on a host pins its own. 0: never pin (sleep level 1
    # becomes level 2).
    pin_budget: Size = Size(fraction=0.5)
    # The most bytes one device allocation of a wake brings back (serving/weights.py); 0 or None: one per dtype.
    # 1 GiB pieces let the next piece's allocation overlap this one's copy (H100, 8B: 0.332 s wake to first token
    # with wake_early, 0.341 s in one piece; docs/engine.md).
    wake_chunk: Size | None = Size(nbytes=1024**3)
    # on: the embedded engine takes requests while a wake's copies still run (the forward waits for them on the
    # GPU, not the host); off: the wake returns once the weights are back.
    wake_early: str = "on"
    log_level: str = "INFO"
    name: str | None = None
    device_budget: Size | None = None  # None: keep what the device's ledger has (95% when new)
    ledger_dir: str | None = None
    prefix_cache: Size = Size(fraction=0.05)  # most memory idle cached prefixes may keep mapped (engines)
    peer_timeout: float = 30.0  # seconds a worker process may take to answer a page map/unmap
    commit: str | None = None  # the commit benchmark results name, where the copy has no .git (the GPU machine)
    admin_token: str | None = None  # the router's admin token, where its config file does not give one
    start_token: str | None = None  # set by the router for each engine start; the engine shows it on /health
    control_token: str | None = None  # set by the router for each start: the engine's /sleep and /wake_up need it
    # Whether an engine books its weights and other working memory in the ledger beside its KV: auto (on a GPU;
    # on the host backend weights are not device memory), on (also on the host backend, as if they were: tests
    # of a fleet on a CPU), off.
    book_weights: str = "auto"
    # vLLM's wake with each weight copy queued on a side stream as soon as its memory is mapped (on), or vLLM's own
    # map-then-copy, one allocation after another (off). engines/vllm/wake.py
    vllm_overlap_wake: str = "off"

    @property
    def wake_chunk_bytes(self) -> int:
        """``ELASTIKV_WAKE_CHUNK`` in bytes (default 1 GiB), or 0 (a wake brings each dtype's weights back in one
        allocation)."""
        return 0 if self.wake_chunk is None else self.wake_chunk.resolve(0)

    @property
    def min_chunk_bytes(self) -> int | None:
        """``ELASTIKV_CHUNK`` in bytes, or None (spaces keep their default chunk)."""
        return None if self.chunk is None else self.chunk.resolve(0)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        unknown = sorted(k for k in env if k.startswith("ELASTIKV") and k not in ENV_VARS)
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, ENV_VARS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown setting {name}{hint}; elastikv reads only: {', '.join(sorted(ENV_VARS))}")
        kwargs: dict[str, object] = {}
        for var, (field, parse) in ENV_VARS.items():
            raw = env.get(var)
            if raw is not None and raw.strip() != "":
                kwargs[field] = parse(raw.strip(), var)
        return cls(**kwargs)  # type: ignore[arg-type]


def _flag(raw: str, var: str) -> bool:
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{var}={raw!r}: write 1 or 0")


def _int(raw: str, var: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{var}={raw!r}: write a whole number such as 0") from None
    if value < 0:
        raise ConfigError(f"{var}={raw!r}: must not be negative")
    return value


def _seconds(raw: str, var: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{var}={raw!r}: write a number of seconds such as 30") from None
    if not value > 0:
        raise ConfigError(f"{var}={raw!r}: must be more than 0 seconds")
    return value


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str, what: str = "name") -> str:
    """Instance names: what `elastikv status` shows and `elastikv limit NAME` takes."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"{what}: {name!r} is not a usable instance name; use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _log_level(raw: str, var: str) -> str:
    return check_choice(raw.upper(), ("DEBUG", "INFO", "WARNING", "ERROR"), var)


# variable -> (Settings field, parser). The one list of what elastikv reads from the environment.
ENV_VARS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "ELASTIKV": ("enabled", _flag),
    "ELASTIKV_BACKEND": ("backend", lambda raw, var: check_choice(raw, BACKENDS, var)),
    "ELASTIKV_DEVICE": ("device", _int),
    "ELASTIKV_LAYOUT": ("layout", lambda raw, var: check_choice(raw, LAYOUTS, var)),
    "ELASTIKV_LIMIT": ("limit", lambda raw, var: parse_size(raw, what=var, allow_zero=False)),
    "ELASTIKV_RESERVE": ("reserve", lambda raw, var: parse_size(raw, what=var)),
    "ELASTIKV_CHUNK": ("chunk", lambda raw, var: parse_size(raw, what=var, allow_percent=False, allow_zero=False)),
    "ELASTIKV_HOST_MEMORY": (
        "host_memory",
        lambda raw, var: parse_size(raw, what=var, allow_percent=True, allow_zero=False),
    ),
    "ELASTIKV_PIN_BUDGET": ("pin_budget", lambda raw, var: parse_size(raw, what=var, allow_percent=True)),
    "ELASTIKV_WAKE_CHUNK": ("wake_chunk", lambda raw, var: parse_size(raw, what=var, allow_percent=False)),
    "ELASTIKV_WAKE_EARLY": ("wake_early", lambda raw, var: check_choice(raw, ("on", "off"), var)),
    "ELASTIKV_LOG_LEVEL": ("log_level", _log_level),
    "ELASTIKV_NAME": ("name", lambda raw, var: check_name(raw, var)),
    "ELASTIKV_DEVICE_BUDGET": ("device_budget", lambda raw, var: parse_size(raw, what=var, allow_zero=False)),
    "ELASTIKV_LEDGER_DIR": ("ledger_dir", lambda raw, var: raw),
    "ELASTIKV_PREFIX_CACHE": ("prefix_cache", lambda raw, var: parse_size(raw, what=var, allow_percent=True)),
    "ELASTIKV_PEER_TIMEOUT": ("peer_timeout", lambda raw, var: _seconds(raw, var)),
    "ELASTIKV_COMMIT": ("commit", lambda raw, var: raw),
    "ELASTIKV_ADMIN_TOKEN": ("admin_token", lambda raw, var: raw),
    "ELASTIKV_START_TOKEN": ("start_token", lambda raw, var: raw),
    "ELASTIKV_CONTROL_TOKEN": ("control_token", lambda raw, var: raw),
    "ELASTIKV_BOOK_WEIGHTS": ("book_weights", lambda raw, var: check_choice(raw, ("auto", "on", "off"), var)),
    "ELASTIKV_VLLM_OVERLAP_WAKE": ("vllm_overlap_wake", lambda raw, var: check_choice(raw, ("on", "off"), var)),
}
