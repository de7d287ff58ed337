"""The router's config file: which models ``elastikv serve CONFIG`` runs, and how.

A complete example (YAML; every key but ``models`` and each model's ``name`` and ``model`` is optional)::

    listen: 127.0.0.1:8000               # host:port, or just a port number; default 127.0.0.1:8000
    admin_token: $ELASTIKV_ADMIN_TOKEN   # a literal token, or $VAR (${VAR}) read from the environment; $$ = a literal $
                                         # without one the admin endpoints refuse everything
    env:                                 # environment for every engine; ELASTIKV_* variables are checked here
      ELASTIKV_DEVICE_BUDGET: 90%
    models:
      - name: llama-a                    # what clients send as "model": letters, digits, '.', '_', '-'
        engine: elastikv                 # elastikv (default) | vllm | sglang | command
        model: ./models/a                # a path (relative to this file's directory) or a hub id
        limit: 40%                       # KV memory limit, passed on as ELASTIKV_LIMIT
        idle: 30s                        # sleep after this long without requests (ms, s, m, h); never: stay awake
        sleep_level: 1                   # 1 weights to host memory, 2 weights dropped, stop: end the process
        port: 8101                       # fixed engine port; default a free port chosen at start
        args: [--dtype, float32]         # extra command-line arguments for the engine
        env: {ELASTIKV_RESERVE: 8MiB}    # merged over the global env
        start_timeout: 120s              # how long the engine may take to become healthy
      - name: qwen
        engine: vllm
        model: Qwen/Qwen2.5-0.5B-Instruct
        idle: never
      - name: custom
        engine: command                  # any OpenAI-compatible server; it sleeps by stopping
        command: "python my_server.py --port {port} --model {model}"   # string (shlex-split) or list
        model: ./models/b                # optional here; fills {model}
        health: /health                  # the path polled until the engine answers 200

Placeholders in ``command``: ``{port}`` ``{host}`` ``{model}`` ``{name}``. Defaults: ``idle`` 5m; ``sleep_level``
1 (``stop`` for ``command``); ``start_timeout`` 180s (900s for vllm and sglang, which load slowly); ``health``
/health. A key with an empty value (``env:`` with every entry commented out) counts as not given.

TOML has the same structure::

    listen = "127.0.0.1:8000"
    [env]
    ELASTIKV_DEVICE_BUDGET = "90%"
    [[models]]
    name = "llama-a"
    model = "./models/a"
    idle = "30s"
    [models.env]
    ELASTIKV_RESERVE = "8MiB"

Every error names the file, the line and the value: ``router.yaml:7: models[1].idle: '5x' is not a duration; ...``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml  # type: ignore[import-untyped,unused-ignore]

from elastikv.config import Settings, check_name, parse_size
from elastikv.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

ENGINES = ("elastikv", "vllm", "sglang", "command")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_IDLE_S = 300.0
DEFAULT_HEALTH = "/health"
START_TIMEOUT_S = {"elastikv": 180.0, "vllm": 900.0, "sglang": 900.0, "command": 180.0}

_TOP_KEYS = ("listen", "admin_token", "env", "models")
_MODEL_KEYS = (
    "name",
    "engine",
    "model",
    "command",
    "limit",
    "idle",
    "sleep_level",
    "port",
    "args",
    "env",
    "start_timeout",
    "health",
)
# Set by the router itself for each engine; a value in the config would be silently overridden.
_ROUTER_VARS = {
    "ELASTIKV_NAME": "the router sets it to each model's name",
    "ELASTIKV_ADMIN_TOKEN": "it is the router's secret and engines never see it; use admin_token",
}
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOKEN_VAR_RE = re.compile(r"^\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))$")
_LISTEN_RE = re.compile(r"^(?:\[([^\[\]\s]+)\]|([^\[\]\s:]+)):(\d+)$")
_DURATION_RE = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
# (multiplier, divisor): milliseconds divide so that "3ms" is exactly 3 / 1000, not 3 * 0.001.
_DURATION_UNITS = {"": (1, 1), "s": (1, 1), "m": (60, 1), "h": (3600, 1), "ms": (1, 1000)}
_DURATION_HELP = "write 30s, 5m, 1h or never"
_YAML_MERGE_TAG = "tag:yaml.org,2002:merge"

_SLEEP_LEVELS: dict[str, int | str] = {"1": 1, "2": 2, "stop": "stop"}

Key = tuple[str | int, ...]  # where a value sits in the document: ("models", 1, "idle")
T = TypeVar("T")


@dataclass(frozen=True)
class ModelSpec:
    """One model the router serves, validated and with every default filled in."""

    name: str
    engine: str  # "elastikv" | "vllm" | "sglang" | "command"
    model: str | None  # an absolute path where it names a path, else a hub id as written; None: command without one
    command: tuple[str, ...] | None  # engine "command" only; placeholders left for the launcher to fill
    args: tuple[str, ...]
    env: dict[str, str]  # the global env, the model's env over it, and ELASTIKV_LIMIT when limit is set
    limit: str | None  # as written
    idle_s: float | None  # None: never sleep
    sleep_level: int | str  # 1, 2 or "stop"
    port: int | None
    health_path: str
    start_timeout_s: float


@dataclass(frozen=True)
class RouterConfig:
    """The whole config file."""

    host: str
    port: int
    admin_token: str | None
    models: tuple[ModelSpec, ...]
    source: Path | None  # the file it came from


def load_config(path: str | Path) -> RouterConfig:
    """Read and validate a config file; YAML for .yaml/.yml, TOML for .toml."""
    source = Path(path)
    suffix = source.suffix.lower()
    fmt = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml"}.get(suffix)
    if fmt is None:
        raise ConfigError(f"{source}: a config file must end in .yaml, .yml or .toml, not {suffix or 'nothing'!r}")
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_config(text, fmt=fmt, source=source)


def parse_config(
    text: str, *, fmt: str, source: Path | None = None, environ: Mapping[str, str] | None = None
) -> RouterConfig:
    """Parse config ``text`` (``fmt`` "yaml" or "toml"). ``environ`` answers ``$VAR`` (default: os.environ)."""
    doc = _Doc("<config>" if source is None else str(source))
    if fmt == "yaml":
        data = _read_yaml(text, doc)
    elif fmt == "toml":
        data = _read_toml(text, doc)
    else:
        raise ConfigError(f"{doc.name}: unknown config format {fmt!r}; use yaml or toml")
    # Relative model paths are relative to the file, so a config works from any working directory.
    base = (Path() if source is None else source.parent).resolve()
    return _build(doc, data, base=base, environ=os.environ if environ is None else environ, source=source)


def parse_duration(value: object, what: str) -> float | None:
    """Seconds in ``value`` ("250ms", "30s", "5m", "1h", a bare number of seconds); None for never/off/false."""
    if value is False or (isinstance(value, str) and value.strip().lower() in ("never", "off")):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{what}: {value!r} is not a duration; {_DURATION_HELP}")
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is None:
            raise ConfigError(f"{what}: {value!r} is not a duration; {_DURATION_HELP}")
        multiplier, divisor = _DURATION_UNITS[(match.group(2) or "").lower()]
        seconds = float(match.group(1)) * multiplier / divisor
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{what}: {value!r} must be more than zero; {_DURATION_HELP}")
    return seconds


# -- locations ------------------------------------------------------------------------------------------------


def _dotted(path: Key) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


@dataclass
class _Doc:
    """The file's name and the line of every value in it, for messages that point at the line."""

    name: str
    lines: dict[Key, int] = field(default_factory=dict)

    def line(self, path: Key) -> int:
        # A value with no line of its own (a default, an item of an inline list) is reported at its parent's.
        for end in range(len(path), -1, -1):
            found = self.lines.get(path[:end])
            if found is not None:
                return found
        return 1

    def error(self, path: Key, message: str, *, at: Key | None = None) -> ConfigError:
        """``{file}:{line}: {path}: {message}``, the line being that of ``at`` (default ``path``)."""
        where = f"{self.name}:{self.line(path if at is None else at)}"
        return ConfigError(f"{where}: {_dotted(path)}: {message}" if path else f"{where}: {message}")

    def wrap(self, path: Key, exc: ConfigError) -> ConfigError:
        """A helper's error (its message already names the value) at the line of ``path``."""
        return ConfigError(f"{self.name}:{self.line(path)}: {exc}")


# -- YAML -----------------------------------------------------------------------------------------------------


def _read_yaml(text: str, doc: _Doc) -> object:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        return None if root is None else _yaml_value(loader, root, (), doc, set())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = _last_line(text, mark.line + 1 if mark else 1)
        context = f" ({exc.context})" if exc.context else ""
        raise ConfigError(f"{doc.name}:{line}: invalid YAML: {exc.problem}{context}") from None
    except yaml.YAMLError as exc:  # a reader error: a character YAML does not allow
        line = _last_line(text, text.count("\n", 0, getattr(exc, "position", 0)) + 1)
        raise ConfigError(f"{doc.name}:{line}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def _last_line(text: str, line: int) -> int:
    # A parser at the end of the text counts the empty line after the final newline; editors show none there.
    return max(1, min(line, len(text.splitlines())))


def _yaml_value(loader: Any, node: Any, path: Key, doc: _Doc, open_nodes: set[int]) -> object:
    """The plain value of ``node``, recording each value's line in ``doc`` (a key's line for a mapping's values)."""
    doc.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode):
        try:
            return loader.construct_object(node)
        except ValueError as exc:  # an explicit tag on text that does not fit it: "!!int abc"
            raise doc.error(path, f"{node.value!r} is not a valid {node.tag}: {exc}") from None
    if id(node) in open_nodes:
        raise doc.error(path, "an alias refers to a value that contains it")
    open_nodes.add(id(node))
    try:
        if isinstance(node, yaml.SequenceNode):
            return [_yaml_value(loader, item, (*path, i), doc, open_nodes) for i, item in enumerate(node.value)]
        return _yaml_mapping(loader, node, path, doc, open_nodes)
    finally:
        open_nodes.discard(id(node))


def _yaml_mapping(loader: Any, node: Any, path: Key, doc: _Doc, open_nodes: set[int]) -> dict[str, object]:
    result: dict[str, object] = {}
    merges = []
    for key_node, value_node in node.value:
        if key_node.tag == _YAML_MERGE_TAG:
            merges.append(value_node)
            continue
        key_line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            raise ConfigError(f"{doc.name}:{key_line}: {_dotted(path) or 'the file'}: keys must be plain words")
        # The key as written: YAML 1.1 would read keys such as "on" or "no" as booleans.
        key: str = key_node.value
        key_path = (*path, key)
        if key in result:
            first = doc.lines[key_path]
            raise ConfigError(f"{doc.name}:{key_line}: {_dotted(key_path)}: given twice (first at line {first})")
        doc.lines.setdefault(key_path, key_line)
        result[key] = _yaml_value(loader, value_node, key_path, doc, open_nodes)
    # "<<: *defaults" fills in the keys the mapping does not set itself, as safe_load would.
    for merge in merges:
        for source in merge.value if isinstance(merge, yaml.SequenceNode) else [merge]:
            merged = _yaml_value(loader, source, path, doc, open_nodes)
            if not isinstance(merged, dict):
                raise doc.error(path, f"<< merges a mapping or a list of mappings, not {_describe(merged)}")
            for key, value in merged.items():
                result.setdefault(key, value)
    return result


# -- TOML -----------------------------------------------------------------------------------------------------

_TOML_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_TOML_DOTTED = rf"{_TOML_PART}(?:\s*\.\s*{_TOML_PART})*"
_TOML_ARRAY_HEADER_RE = re.compile(rf"^\s*\[\[\s*({_TOML_DOTTED})\s*\]\]\s*(?:#.*)?$")
_TOML_TABLE_HEADER_RE = re.compile(rf"^\s*\[\s*({_TOML_DOTTED})\s*\]\s*(?:#.*)?$")
_TOML_KEY_RE = re.compile(rf"^\s*({_TOML_DOTTED})\s*=")
_TOML_AT_RE = re.compile(r"\s*\(at line (\d+), column \d+\)$")


def _read_toml(text: str, doc: _Doc) -> object:
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = _TOML_AT_RE.search(message)
        # Without a position the problem is at the end ("at end of document").
        line = _last_line(text, int(at.group(1)) if at else len(text))
        raise ConfigError(f"{doc.name}:{line}: invalid TOML: {message[: at.start()] if at else message}") from None
    doc.lines.update(_toml_lines(text))
    return data or None  # nothing but comments: report it as empty, as YAML does


def _toml_key(dotted: str) -> list[str]:
    return [part.strip("\"'") for part in re.findall(_TOML_PART, dotted)]


def _toml_lines(text: str) -> dict[Key, int]:
    """Best-effort line of each key: TOML parsers keep no positions, so the text is scanned for headers and
    ``key =`` lines. Keys inside multi-line strings or arrays may be misread; inline tables get their key's line."""
    lines: dict[Key, int] = {}
    tables_seen: dict[tuple[str, ...], int] = {}  # array-of-tables name -> index of its latest table
    table: Key = ()
    for number, line in enumerate(text.splitlines(), start=1):
        if header := _TOML_ARRAY_HEADER_RE.match(line):
            name = tuple(_toml_key(header.group(1)))
            tables_seen[name] = tables_seen.get(name, -1) + 1
            table = _toml_table_path(name, tables_seen)
        elif header := _TOML_TABLE_HEADER_RE.match(line):
            table = _toml_table_path(tuple(_toml_key(header.group(1))), tables_seen)
        elif key := _TOML_KEY_RE.match(line):
            lines.setdefault((*table, *_toml_key(key.group(1))), number)
            continue
        else:
            continue
        for end in range(1, len(table) + 1):
            lines.setdefault(table[:end], number)
    return lines


def _toml_table_path(name: tuple[str, ...], tables_seen: dict[tuple[str, ...], int]) -> Key:
    # [models.env] under the k-th [[models]] is ("models", k, "env").
    path: list[str | int] = []
    for end in range(1, len(name) + 1):
        path.append(name[end - 1])
        if name[:end] in tables_seen:
            path.append(tables_seen[name[:end]])
    return tuple(path)


# -- validation -----------------------------------------------------------------------------------------------


def _describe(value: object) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "an empty value" if value is None else repr(value)


def _check_keys(doc: _Doc, path: Key, entry: Mapping[str, object], allowed: tuple[str, ...], owner: str) -> None:
    for key in entry:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise doc.error(path, f"unknown key {key!r}{hint}; {owner} takes: {', '.join(allowed)}", at=(*path, key))


def _given(entry: Mapping[str, object]) -> dict[str, object]:
    return {key: value for key, value in entry.items() if value is not None}


def _build(doc: _Doc, data: object, *, base: Path, environ: Mapping[str, str], source: Path | None) -> RouterConfig:
    if data is None:
        raise doc.error((), "the file is empty; list the models to serve under 'models' (see elastikv.router.config)")
    if not isinstance(data, Mapping):
        raise doc.error((), f"expected a mapping with {', '.join(_TOP_KEYS)}; got {_describe(data)}")
    _check_keys(doc, (), data, _TOP_KEYS, "the file")
    top = _given(data)
    host, port = _listen(doc, top.get("listen"))
    admin_token = _admin_token(doc, top.get("admin_token"), environ)
    global_env = _env(doc, ("env",), top.get("env"))
    entries = top.get("models")
    if entries is None:
        raise doc.error((), "no 'models': list at least one model to serve", at=("models",))
    if not isinstance(entries, list):
        raise doc.error(("models",), f"expected a list of models; got {_describe(entries)}")
    if not entries:
        raise doc.error(("models",), "the list is empty; list at least one model to serve")
    # port -> who took it; the listen port counts, engines on the same host cannot share it
    ports = {port: f"listen (line {doc.line(('listen',))})" if "listen" in top else "the router (listen default)"}
    names: dict[str, Key] = {}
    models = []
    for i, entry in enumerate(entries):
        path: Key = ("models", i)
        spec = _model(doc, path, entry, global_env, base)
        if spec.name in names:
            first = names[spec.name]
            taken = f"{_dotted(first)} (line {doc.line((*first, 'name'))})"
            raise doc.error((*path, "name"), f"{spec.name!r} is already the name of {taken}")
        names[spec.name] = path
        if spec.port is not None:
            if spec.port in ports:
                raise doc.error((*path, "port"), f"{spec.port} is already taken by {ports[spec.port]}")
            ports[spec.port] = f"{_dotted(path)} (line {doc.line((*path, 'port'))})"
        models.append(spec)
    return RouterConfig(host=host, port=port, admin_token=admin_token, models=tuple(models), source=source)


def _model(doc: _Doc, path: Key, entry: object, global_env: dict[str, str], base: Path) -> ModelSpec:
    if not isinstance(entry, Mapping):
        raise doc.error(path, f"expected a mapping with name, engine, model, ...; got {_describe(entry)}")
    _check_keys(doc, path, entry, _MODEL_KEYS, "a model")
    given = _given(entry)
    if "name" not in given:
        raise doc.error(path, 'no name; every model needs one (what clients send as "model")')
    name = _name(doc, (*path, "name"), given["name"])
    engine = _engine(doc, (*path, "engine"), given.get("engine", "elastikv"))
    model = _model_path(doc, path, given.get("model"), engine, base)
    command = _command(doc, path, given, engine, model)
    limit = _limit(doc, (*path, "limit"), given.get("limit"))
    model_env = _env(doc, (*path, "env"), given.get("env"))
    env = {**global_env, **model_env}
    if limit is not None:
        if "ELASTIKV_LIMIT" in model_env:
            raise doc.error((*path, "env"), "ELASTIKV_LIMIT given here and as limit; keep one", at=(*path, "limit"))
        env["ELASTIKV_LIMIT"] = limit
    default_level: int | str = "stop" if engine == "command" else 1
    timeout = _checked(
        doc,
        (*path, "start_timeout"),
        lambda what: parse_duration(given.get("start_timeout", START_TIMEOUT_S[engine]), what),
    )
    if timeout is None:
        raise doc.error((*path, "start_timeout"), "must be a duration, not never; write e.g. 300s")
    return ModelSpec(
        name=name,
        engine=engine,
        model=model,
        command=command,
        args=_strings(doc, (*path, "args"), given.get("args", [])),
        env=env,
        limit=limit,
        idle_s=_checked(doc, (*path, "idle"), lambda what: parse_duration(given.get("idle", DEFAULT_IDLE_S), what)),
        sleep_level=_sleep_level(doc, (*path, "sleep_level"), given.get("sleep_level", default_level), engine),
        port=None if "port" not in given else _port(doc, (*path, "port"), given["port"]),
        health_path=_health(doc, (*path, "health"), given.get("health", DEFAULT_HEALTH)),
        start_timeout_s=timeout,
    )


def _checked(doc: _Doc, path: Key, check: Callable[[str], T]) -> T:
    """``check(dotted path)``, its ConfigError located at ``path``'s line."""
    try:
        return check(_dotted(path))
    except ConfigError as exc:
        raise doc.wrap(path, exc) from None


def _name(doc: _Doc, path: Key, value: object) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # "name: 7": clients send it as the string "7"
    if not isinstance(value, str):
        raise doc.error(path, f"{_describe(value)} is not a name; write letters, digits, '.', '_' or '-'")
    return _checked(doc, path, lambda what: check_name(value, what))


def _engine(doc: _Doc, path: Key, value: object) -> str:
    if not isinstance(value, str) or value not in ENGINES:
        close = difflib.get_close_matches(str(value), ENGINES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise doc.error(path, f"{value!r} is not an engine{hint}; use one of {', '.join(ENGINES)}")
    return value


def _model_path(doc: _Doc, path: Key, value: object, engine: str, base: Path) -> str | None:
    """An absolute path where ``value`` names one (it starts with ./ ../ / ~, or exists), else the hub id."""
    at = (*path, "model")
    if value is None:
        if engine == "command":
            return None
        what = "a model directory" if engine == "elastikv" else "a model directory or hub id"
        raise doc.error(path, f"no model; engine {engine} needs {what}")
    if not isinstance(value, str) or not value.strip():
        raise doc.error(at, f"expected a path or a hub id; got {_describe(value)}")
    candidate = base / Path(value).expanduser()
    explicit = value.startswith(("./", "../", "/", "~")) or value in (".", "..")
    resolved = str(candidate.resolve()) if explicit or candidate.exists() else value
    if engine == "elastikv":
        make = f"make one with: elastikv make-model {shlex.quote(str(candidate.resolve()))}"
        if not candidate.is_dir():
            raise doc.error(at, f"{value!r}: no such model directory ({candidate.resolve()}); {make}")
        if not (candidate / "config.json").is_file():
            raise doc.error(at, f"{value!r}: {candidate.resolve()} has no config.json, so it is no model; {make}")
    return resolved


def _command(
    doc: _Doc, path: Key, given: Mapping[str, object], engine: str, model: str | None
) -> tuple[str, ...] | None:
    at = (*path, "command")
    value = given.get("command")
    if engine != "command":
        if value is not None:
            raise doc.error(at, f"only engine command takes a command; this model's engine is {engine}")
        return None
    if value is None:
        raise doc.error(path, 'no command; engine command needs one, e.g. command: "my-server --port {port}"')
    if isinstance(value, str):
        try:
            parts = tuple(shlex.split(value))
        except ValueError as exc:
            raise doc.error(at, f"cannot split {value!r} into arguments: {exc}") from None
    else:
        parts = _strings(doc, at, value)
    if not parts:
        raise doc.error(at, "the command is empty")
    text = " ".join(parts)
    if "{model}" in text and model is None:
        raise doc.error(at, "the command uses {model}, but this model has no model; add model: PATH_OR_HUB_ID")
    if "{port}" not in text and "port" not in given:
        # The router picks a free port and only tells the process through {port}.
        raise doc.error(at, "the command must take the port the router picks ({port}), or give the model a port")
    return parts


def _strings(doc: _Doc, path: Key, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise doc.error(path, f"expected a list of strings, e.g. [--dtype, float32]; got {_describe(value)}")
    items = []
    for i, item in enumerate(value):
        # YAML 1.1 reads yes/no/on/off as booleans: asking for quotes beats guessing which spelling was meant.
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise doc.error((*path, i), f"{item!r} is not a string; write it in quotes")
        items.append(str(item))
    return tuple(items)


def _env(doc: _Doc, path: Key, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise doc.error(path, f"expected a mapping of variable names to values; got {_describe(value)}")
    env: dict[str, str] = {}
    for key, raw in value.items():
        at = (*path, key)
        if not isinstance(key, str) or not _ENV_NAME_RE.match(key):
            raise doc.error(path, f"{key!r} is not an environment variable name", at=at)
        if key in _ROUTER_VARS:
            raise doc.error(path, f"{key} cannot be set here: {_ROUTER_VARS[key]}", at=at)
        text = _env_text(doc, path, key, raw)
        if key.startswith("ELASTIKV"):
            try:
                Settings.from_env({key: text})
            except ConfigError as exc:
                raise doc.error(path, str(exc), at=at) from None
        env[key] = text
    return env


def _env_text(doc: _Doc, path: Key, key: str, raw: object) -> str:
    if isinstance(raw, bool):
        return "1" if raw else "0"  # what ELASTIKV's own flags and most programs take
    if isinstance(raw, (str, int, float)):
        return str(raw)
    raise doc.error(path, f"{key}: {_describe(raw)} is not a value for a variable; write a string", at=(*path, key))


def _limit(doc: _Doc, path: Key, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise doc.error(path, f"{_describe(value)} is not a size; write e.g. 40% or 8GiB")
    text = str(value)
    _checked(doc, path, lambda what: parse_size(text, what=what, allow_zero=False))
    return text


def _sleep_level(doc: _Doc, path: Key, value: object, engine: str) -> int | str:
    known = isinstance(value, (int, str)) and not isinstance(value, bool)
    level = _SLEEP_LEVELS.get(str(value).strip().lower()) if known else None
    if level is None:
        raise doc.error(path, f"{value!r} is not a sleep level; write 1 (weights to host memory), 2 (weights "
                        "dropped) or stop (end the process, start it again on demand)")  # fmt: skip
    if engine == "command" and level != "stop":
        raise doc.error(path, f"engine command can only sleep by stopping; write stop, not {value!r}")
    return level


def _port_number(value: object) -> int | None:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    return None


def _port(doc: _Doc, path: Key, value: object) -> int:
    port = _port_number(value)
    if port is None:
        raise doc.error(path, f"{value!r} is not a port; write a number from 1 to 65535")
    return port


def _listen(doc: _Doc, value: object) -> tuple[str, int]:
    if value is None:
        return DEFAULT_HOST, DEFAULT_PORT
    help_ = "write host:port (127.0.0.1:8000, 0.0.0.0:8000, [::1]:8000) or just a port number"
    if isinstance(value, str) and not value.strip().isdigit():
        match = _LISTEN_RE.match(value.strip())
        if match is None:
            raise doc.error(("listen",), f"{value!r} is not host:port; {help_}")
        host, port = match.group(1) or match.group(2), _port_number(match.group(3))
    else:
        host, port = DEFAULT_HOST, _port_number(value)
    if port is None:
        raise doc.error(("listen",), f"{value!r}: the port must be a number from 1 to 65535; {help_}")
    return host, port


def _admin_token(doc: _Doc, value: object, environ: Mapping[str, str]) -> str | None:
    path: Key = ("admin_token",)
    if value is None:
        return environ.get("ELASTIKV_ADMIN_TOKEN") or None  # the one other place a token may come from
    if not isinstance(value, str) or not value.strip():
        raise doc.error(path, f"expected a token or $VARIABLE; got {_describe(value)} (quote a token of digits)")
    if value.startswith("$$"):
        return value[1:]
    if not value.startswith("$"):
        return value
    match = _TOKEN_VAR_RE.match(value)
    if match is None:
        raise doc.error(path, f"{value!r}: write $NAME or ${{NAME}} to read the token from the environment "
                        "($$ for a token that starts with $)")  # fmt: skip
    var = match.group(1) or match.group(2)
    token = environ.get(var)
    if not token:
        state = "is empty" if token == "" else "is not set"
        raise doc.error(path, f"the environment variable {var} {state}; set it, or write the token here")
    return token


def _health(doc: _Doc, path: Key, value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise doc.error(path, f"{_describe(value)} is not a path; write one such as /health")
    return value
