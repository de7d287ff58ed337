"""The schema of the router's config file (documented in :mod:`elastikv.router.config`): two pydantic models,
:class:`RouterFile` and :class:`ModelEntry`, declare the keys, their defaults and a plain validator for each, which
gets the value as the file wrote it (pydantic coerces nothing) and refuses it with :class:`Invalid`, whose message
the user reads. Nothing here knows files or lines: ``config.py`` turns an error's location into its line.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import BaseModel, BeforeValidator, Field, PlainValidator, ValidationInfo, model_validator

from elastikv.config import Settings, check_name, parse_size
from elastikv.errors import ConfigError

ENGINES = ("elastikv", "vllm", "sglang", "command")
START_TIMEOUT_S = {"elastikv": 180.0, "vllm": 900.0, "sglang": 900.0, "command": 180.0}  # vllm, sglang load slowly
DEFAULT_HOST = "127.0.0.1"

# Set by the router itself for each engine; a value in the config would be silently overridden.
_ROUTER_VARS = {
    "ELASTIKV_NAME": "the router sets it to each model's name",
    "ELASTIKV_ADMIN_TOKEN": "it is the router's secret and engines never see it; use admin_token",
}
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOKEN_VAR_RE = re.compile(r"^\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))$")
_LISTEN_RE = re.compile(r"^(?:\[([^\[\]\s]+)\]|([^\[\]\s:]+)):(\d+)$")
_LISTEN_HELP = "write host:port (127.0.0.1:8000, 0.0.0.0:8000, [::1]:8000) or just a port number"
_DURATION_RE = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
# (multiplier, divisor): milliseconds divide so that "3ms" is exactly 3 / 1000, not 3 * 0.001.
_DURATION_UNITS = {"": (1, 1), "s": (1, 1), "m": (60, 1), "h": (3600, 1), "ms": (1, 1000)}
_DURATION_HELP = "write 30s, 5m, 1h or never"
_SLEEP_LEVELS: dict[str, int | str] = {"1": 1, "2": 2, "stop": "stop"}

Key = tuple[str | int, ...]  # where a value sits in the document: ("models", 1, "idle")
T = TypeVar("T")


class Invalid(ValueError):
    """A refused value. It is reported at the path where pydantic met it (``loc``) plus ``path``, on the line of
    ``loc`` plus ``at`` (default: ``path``): an unknown key, for one, is the mapping's error on the key's line.
    ``other``, where given, is a second place whose line ends the message: "is already the name of x (line 2)"."""

    def __init__(self, message: str, *, path: Key = (), at: Key | None = None, other: Key | None = None) -> None:
        super().__init__(message)
        self.path, self.at, self.other = path, path if at is None else at, other


def describe(value: object) -> str:
    kinds = {dict: "a mapping", list: "a list", type(None): "an empty value"}  # the containers YAML and TOML give
    return kinds.get(type(value), repr(value))


def _bare(check: Callable[[str], T]) -> T:
    """Run a check whose message starts with ``what:`` (elastikv.config's, parse_duration); that is left out here,
    since the path of the value goes in front of every message."""
    try:
        return check("<here>")
    except ConfigError as exc:
        raise Invalid(str(exc).removeprefix("<here>: ")) from None


def parse_duration(value: object, what: str) -> float | None:
    """Seconds in ``value`` ("250ms", "30s", "5m", "1h", a bare number of seconds); None for never/off/false."""
    if value is False or (isinstance(value, str) and value.strip().lower() in ("never", "off")):
        return None
    match = _DURATION_RE.match(value) if isinstance(value, str) else None
    if match is not None:
        multiplier, divisor = _DURATION_UNITS[(match.group(2) or "").lower()]
        seconds = float(match.group(1)) * multiplier / divisor
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigError(f"{what}: {value!r} is not a duration; {_DURATION_HELP}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{what}: {value!r} must be more than zero; {_DURATION_HELP}")
    return seconds


def _seconds(value: object) -> float | None:
    return _bare(lambda what: parse_duration(value, what))


def _start_timeout(value: object) -> float:
    if (seconds := _seconds(value)) is None:
        raise Invalid("must be a duration, not never; write e.g. 300s")
    return seconds


def _name(value: object) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # "name: 7": clients send it as the string "7"
    if not isinstance(value, str):
        raise Invalid(f"{describe(value)} is not a name; write letters, digits, '.', '_' or '-'")
    name = value
    return _bare(lambda what: check_name(name, what))


def _engine(value: object) -> str:
    if not isinstance(value, str) or value not in ENGINES:
        close = difflib.get_close_matches(str(value), ENGINES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise Invalid(f"{value!r} is not an engine{hint}; use one of {', '.join(ENGINES)}")
    return value


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise Invalid(f"expected a list of strings, e.g. [--dtype, float32]; got {describe(value)}")
    for i, item in enumerate(value):
        # YAML 1.1 reads yes/no/on/off as booleans: asking for quotes beats guessing which spelling was meant.
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise Invalid(f"{item!r} is not a string; write it in quotes", path=(i,))
    return tuple(str(item) for item in value)


def _env(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise Invalid(f"expected a mapping of variable names to values; got {describe(value)}")
    env: dict[str, str] = {}
    for key, raw in value.items():
        if not isinstance(key, str) or not _ENV_NAME_RE.match(key):
            raise Invalid(f"{key!r} is not an environment variable name", at=(key,))
        if key in _ROUTER_VARS:
            raise Invalid(f"{key} cannot be set here: {_ROUTER_VARS[key]}", at=(key,))
        if isinstance(raw, bool):
            env[key] = "1" if raw else "0"  # what ELASTIKV's own flags and most programs take
        elif isinstance(raw, (str, int, float)):
            env[key] = str(raw)
        else:
            raise Invalid(f"{key}: {describe(raw)} is not a value for a variable; write a string", at=(key,))
        if key.startswith("ELASTIKV"):  # elastikv's own settings are checked now, not when an engine starts
            try:
                Settings.from_env({key: env[key]})
            except ConfigError as exc:
                raise Invalid(str(exc), at=(key,)) from None
    return env


def _limit(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Invalid(f"{describe(value)} is not a size; write e.g. 40% or 8GiB")
    _bare(lambda what: parse_size(str(value), what=what, allow_zero=False))
    return str(value)  # as written: it is passed on as ELASTIKV_LIMIT


def _port(value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise Invalid(f"{value!r} is not a port; write a number from 1 to 65535")


def _listen(value: object) -> tuple[str, int]:
    host, port = DEFAULT_HOST, value  # a bare port number listens on DEFAULT_HOST
    if isinstance(value, str) and not value.strip().isdigit():
        if (match := _LISTEN_RE.match(value.strip())) is None:
            raise Invalid(f"{value!r} is not host:port; {_LISTEN_HELP}")
        host, port = match.group(1) or match.group(2), match.group(3)
    try:
        return host, _port(port)
    except Invalid:
        raise Invalid(f"{value!r}: the port must be a number from 1 to 65535; {_LISTEN_HELP}") from None


def _admin_token(value: object, info: ValidationInfo) -> str | None:
    environ: Mapping[str, str] = (info.context or {}).get("environ", os.environ)
    if value is None:  # not in the file: ELASTIKV_ADMIN_TOKEN is the one other place a token may come from
        return environ.get("ELASTIKV_ADMIN_TOKEN") or None
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"expected a token or $VARIABLE; got {describe(value)} (quote a token of digits)")
    if not value.startswith("$") or value.startswith("$$"):
        return value.removeprefix("$")  # "$$x" is the literal token "$x"
    if (match := _TOKEN_VAR_RE.match(value)) is None:
        raise Invalid(f"{value!r}: write $NAME or ${{NAME}} to read the token from the environment "
                      "($$ for a token that starts with $)")  # fmt: skip
    var = match.group(1) or match.group(2)
    if not (token := environ.get(var)):
        raise Invalid(f"the environment variable {var} {'is empty' if token == '' else 'is not set'}; "
                      "set it, or write the token here")  # fmt: skip
    return token


def _pin(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise Invalid(f"{describe(value)} is not true or false; write pin: true to never put this model to sleep for room")


def _priority(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise Invalid(f"{describe(value)} is not a whole number; higher priorities are put to sleep for room last")


def _start(value: object) -> str:
    if value in ("awake", "asleep", "lazy"):
        return str(value)
    raise Invalid(f"{describe(value)} is not a way to start; write awake (at the router's start), asleep (loaded, "
                  "then put to sleep) or lazy (at the model's first request)")  # fmt: skip


def _health(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise Invalid(f"{describe(value)} is not a path; write one such as /health")
    return value


def _model_path(value: object, info: ValidationInfo) -> str:
    """An absolute path where ``value`` names one (it starts with ./ ../ / ~, or exists), else the hub id."""
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"expected a path or a hub id; got {describe(value)}")
    # Relative to the config file's directory (base), so that the file works from any working directory.
    candidate = (info.context or {}).get("base", Path()) / Path(value).expanduser()
    if info.data.get("engine") == "elastikv":
        make = f"make one with: elastikv make-model {shlex.quote(str(candidate.resolve()))}"
        if not candidate.is_dir():
            raise Invalid(f"{value!r}: no such model directory ({candidate.resolve()}); {make}")
        if not (candidate / "config.json").is_file():
            raise Invalid(f"{value!r}: {candidate.resolve()} has no config.json, so it is no model; {make}")
    explicit = value.startswith(("./", "../", "/", "~")) or value in (".", "..")
    return str(candidate.resolve()) if explicit or candidate.exists() else value


def _command(value: object, info: ValidationInfo) -> tuple[str, ...]:
    if info.data.get("engine") != "command":
        raise Invalid(f"only engine command takes a command; this model's engine is {info.data.get('engine')}")
    if not isinstance(value, str):
        parts = _strings(value)
    else:
        try:
            parts = tuple(shlex.split(value))
        except ValueError as exc:  # an unclosed quote
            raise Invalid(f"cannot split {value!r} into arguments: {exc}") from None
    if not parts:
        raise Invalid("the command is empty")
    return parts


def _sleep_level(value: object, info: ValidationInfo) -> int | str:
    known = isinstance(value, (int, str)) and not isinstance(value, bool)
    level = _SLEEP_LEVELS.get(str(value).strip().lower()) if known else None
    if level is None:
        raise Invalid(f"{value!r} is not a sleep level; write 1 (weights to host memory), 2 (weights dropped) "
                      "or stop (end the process, start it again on demand)")  # fmt: skip
    if info.data.get("engine") == "command" and level != "stop":
        raise Invalid(f"engine command can only sleep by stopping; write stop, not {value!r}")
    return level


def _given(data: object, model: type[BaseModel], expected: str, owner: str) -> dict[str, object]:
    """``data`` checked to be a mapping of ``model``'s keys, less its empty values: ``idle:`` with nothing after it
    (or ``env:`` with every entry commented out) counts as not given, so that the default holds."""
    if not isinstance(data, Mapping):
        raise Invalid(f"expected a mapping with {expected}; got {describe(data)}")
    keys = tuple(field.alias or name for name, field in model.model_fields.items())  # as the file writes them
    for key in data:
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise Invalid(f"unknown key {key!r}{hint}; {owner} takes: {', '.join(keys)}", at=(key,))
    return {key: value for key, value in data.items() if value is not None}


class ModelEntry(BaseModel):
    """One entry of ``models``, checked, every default filled in. The fields are those of ``ModelSpec`` (the file
    writes three of them as their alias); ``env`` is the model's own, without the global env or ELASTIKV_LIMIT.
    Pydantic checks the fields in this order, so the checks that need the engine find it in ``info.data`` (where
    it is missing, the engine was refused, and that error comes first)."""

    name: Annotated[str, PlainValidator(_name)]
    engine: Annotated[str, PlainValidator(_engine)] = "elastikv"
    model: Annotated[str | None, PlainValidator(_model_path)] = None
    command: Annotated[tuple[str, ...] | None, PlainValidator(_command)] = None
    limit: Annotated[str | None, PlainValidator(_limit)] = None
    idle_s: Annotated[float | None, PlainValidator(_seconds), Field(alias="idle")] = 300.0  # None: never sleep
    sleep_level: Annotated[int | str, PlainValidator(_sleep_level)] = Field(
        default_factory=lambda data: "stop" if data.get("engine") == "command" else 1
    )
    port: Annotated[int | None, PlainValidator(_port)] = None  # None: a free port, chosen at start
    args: Annotated[tuple[str, ...], PlainValidator(_strings)] = ()
    env: Annotated[dict[str, str], PlainValidator(_env)] = Field(default_factory=dict)
    start_timeout_s: Annotated[float, PlainValidator(_start_timeout), Field(alias="start_timeout")] = Field(
        default_factory=lambda data: START_TIMEOUT_S[data.get("engine", "elastikv")]
    )
    health_path: Annotated[str, PlainValidator(_health), Field(alias="health")] = "/health"
    pin: Annotated[bool, PlainValidator(_pin)] = False  # never put to sleep to make room for another model
    priority: Annotated[int, PlainValidator(_priority)] = 0  # lower: put to sleep for room first
    start: Annotated[str, PlainValidator(_start)] = "awake"  # lazy: started by its first request

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: object) -> dict[str, object]:
        given = _given(data, cls, "name, engine, model, ...", "a model")
        if "name" not in given:
            raise Invalid('no name; every model needs one (what clients send as "model")')
        return given

    @model_validator(mode="after")
    def _complete(self) -> ModelEntry:
        """What takes more than one key: the model or command the engine needs, {model} and {port}, the limit."""
        if self.model is None and self.engine != "command":
            what = "a model directory" if self.engine == "elastikv" else "a model directory or hub id"
            raise Invalid(f"no model; engine {self.engine} needs {what}")
        if self.engine == "command" and self.command is None:
            raise Invalid('no command; engine command needs one, e.g. command: "my-server --port {port}"')
        text = " ".join(self.command or ())
        if "{model}" in text and self.model is None:
            raise Invalid("the command uses {model}, but this model has no model; add model: PATH_OR_HUB_ID",
                          path=("command",))  # fmt: skip
        if self.command is not None and "{port}" not in text and self.port is None:
            # The router picks a free port and only tells the process through {port}.
            raise Invalid("the command must take the port the router picks ({port}), or give the model a port",
                          path=("command",))  # fmt: skip
        if self.limit is not None and "ELASTIKV_LIMIT" in self.env:
            raise Invalid("ELASTIKV_LIMIT given here and as limit; keep one", path=("env",), at=("limit",))
        return self


def _model_list(value: object) -> object:
    if not isinstance(value, list):
        raise Invalid(f"expected a list of models; got {describe(value)}")
    if not value:
        raise Invalid("the list is empty; list at least one model to serve")
    return value  # its entries are checked as ModelEntry next


class RouterFile(BaseModel):
    """The whole file, checked. ``admin_token`` is the token itself, a $VAR read from the ``environ`` given in the
    validation context (as ``base``, where relative model paths start). ``models`` is None in a file without."""

    listen: Annotated[tuple[str, int], PlainValidator(_listen)] = (DEFAULT_HOST, 8000)
    admin_token: Annotated[str | None, PlainValidator(_admin_token)] = Field(None, validate_default=True)
    env: Annotated[dict[str, str], PlainValidator(_env)] = Field(default_factory=dict)
    # None (never): room for a wake is made when the wake comes; else idle models asleep ahead (room.py)
    room_ahead_s: Annotated[float | None, PlainValidator(_seconds), Field(alias="room_ahead")] = None
    models: Annotated[tuple[ModelEntry, ...] | None, BeforeValidator(_model_list)] = None

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: object) -> dict[str, object]:
        return _given(data, cls, "listen, admin_token, env, room_ahead, models", "the file")

    @model_validator(mode="after")
    def _apart(self) -> RouterFile:
        """Models need names and ports of their own; the router's port (listen) counts as taken."""
        if self.models is None:  # checked after the other keys, whose errors come first
            raise Invalid("no 'models': list at least one model to serve", at=("models",))
        given = "listen" in self.model_fields_set
        ports: dict[int, tuple[str, Key | None]] = {
            self.listen[1]: ("listen", ("listen",)) if given else ("the router (listen default)", None)
        }
        names: dict[str, int] = {}
        for i, model in enumerate(self.models):
            if (first := names.setdefault(model.name, i)) != i:
                raise Invalid(f"{model.name!r} is already the name of models[{first}]",
                              path=("models", i, "name"), other=("models", first, "name"))  # fmt: skip
            if model.port is not None and model.port in ports:
                taken, other = ports[model.port]
                raise Invalid(f"{model.port} is already taken by {taken}", path=("models", i, "port"), other=other)
            if model.port is not None:
                ports[model.port] = (f"models[{i}]", ("models", i, "port"))
        return self
