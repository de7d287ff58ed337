"""The router's config file: which models ``elastikv serve CONFIG`` runs, and how.

A complete example (YAML; every key but ``models`` and each model's ``name`` and ``model`` is optional)::

    listen: 127.0.0.1:8000               # host:port, or just a port number; default 127.0.0.1:8000
    admin_token: $ELASTIKV_ADMIN_TOKEN   # a literal token, or $VAR (${VAR}) read from the environment; $$ = a literal $
                                         # without one the admin endpoints refuse everything
    env:                                 # environment for every engine; ELASTIKV_* variables are checked here
      ELASTIKV_DEVICE_BUDGET: 90%
    room_ahead: 2s                       # after a wake, sleep models idle 2 s+ until the next wake fits; default never
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

TOML has the same structure (``listen = "127.0.0.1:8000"``, ``[env]``, ``[[models]]`` tables each with
``name = "llama-a"`` ..., ``[models.env]``; docs/router.md shows a whole file).

Every error names the file, the line and the value: ``router.yaml:7: models[1].idle: '5x' is not a duration; ...``.

The file is read into plain values (PyYAML or tomllib) with the line of each value, checked by the pydantic schema
in :mod:`elastikv.router.config_schema`, and given back as the frozen :class:`RouterConfig` the router uses.
"""

from __future__ import annotations

import bisect
import functools
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]  # first: scripts/check-imports names it when missing
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from elastikv.errors import ConfigError
from elastikv.router.config_schema import Invalid, Key, ModelEntry, RouterFile, parse_duration

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = ["ModelSpec", "RouterConfig", "load_config", "parse_config", "parse_duration", "parse_model"]

_YAML_MERGE_TAG, _YAML_STR_TAG = "tag:yaml.org,2002:merge", "tag:yaml.org,2002:str"
LineOf = Callable[[Key], "int | None"]  # the line of the value at a location in the file, None if it has none


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
    pin: bool = False  # never put to sleep to make room for another model
    priority: int = 0  # when room is needed, idle models of lower priority sleep first (then least recently used)
    start: str = "awake"  # "awake": at the router's start; "asleep": loaded, then asleep; "lazy": at its first request


@dataclass(frozen=True)
class RouterConfig:
    """The whole config file."""

    host: str
    port: int
    admin_token: str | None
    models: tuple[ModelSpec, ...]
    source: Path | None  # the file it came from
    env: dict[str, str] = field(default_factory=dict)  # the global env: models added at run time get it too
    room_ahead_s: float | None = None  # after a wake, models idle this long sleep until the next wake fits (room.py)


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
    name = "<config>" if source is None else str(source)
    if fmt == "yaml":
        data, line_of = _read_yaml(text, name)
    elif fmt == "toml":
        data, line_of = _read_toml(text, name)
    else:
        raise ConfigError(f"{name}: unknown config format {fmt!r}; use yaml or toml")
    if data is None:
        raise ConfigError(f"{name}:1: the file is empty; list the models to serve under 'models' (see {__name__})")
    # Relative model paths are relative to the file, so a config works from any working directory.
    base = (Path() if source is None else source.parent).resolve()
    context = {"base": base, "environ": os.environ if environ is None else environ}  # what the checks read
    try:
        checked = RouterFile.model_validate(data, context=context)
    except ValidationError as exc:
        raise _located(exc.errors()[0], name, line_of) from None  # the first, as a person fixes them: top down
    host, port = checked.listen
    models = tuple(_model_spec(entry, checked.env) for entry in checked.models or ())
    return RouterConfig(host=host, port=port, admin_token=checked.admin_token, models=models, source=source,
                        env=checked.env, room_ahead_s=checked.room_ahead_s)  # fmt: skip


def parse_model(
    data: object, config: RouterConfig, *, what: str = "the model", environ: Mapping[str, str] | None = None
) -> ModelSpec:
    """One model entry (the keys of an entry of ``models``), checked as the file's are, for a model added while
    the router runs (``POST /admin/models``): the router's global env under its own, relative paths from the
    config file's directory. Errors name the key: ``ConfigError("the model: idle: '5x' is not a duration; ...")``.
    Clashes with the models already served (name, port) are the router's to check: it knows which are served now."""
    base = (Path() if config.source is None else config.source.parent).resolve()
    context = {"base": base, "environ": os.environ if environ is None else environ}
    try:
        entry = ModelEntry.model_validate(data, context=context)
    except ValidationError as exc:
        path, _at, message = _explained(exc.errors()[0])
        raise ConfigError(f"{what}: {_dotted(path)}: {message}" if path else f"{what}: {message}") from None
    return _model_spec(entry, config.env)


def _model_spec(entry: ModelEntry, global_env: dict[str, str]) -> ModelSpec:
    """The checked entry (its fields are ModelSpec's) with the global env under its own, and ELASTIKV_LIMIT."""
    env = {**global_env, **entry.env}
    if entry.limit is not None:
        env["ELASTIKV_LIMIT"] = entry.limit
    return ModelSpec(**{**dict(entry), "env": env})


# -- locations ------------------------------------------------------------------------------------------------


def _dotted(path: Key) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _line(line_of: LineOf, loc: Key) -> int:
    # A value with no line of its own (a default, a merged YAML key) is reported at its parent's.
    for end in range(len(loc), -1, -1):
        if (found := line_of(loc[:end])) is not None:
            return found
    return 1


def _explained(error: ErrorDetails) -> tuple[Key, Key, str]:
    """A validation error's path (pydantic's ``loc`` plus the :class:`Invalid`'s own ``path``), the location of
    the value at fault (``at``) and the message."""
    loc: Key = tuple(error["loc"])
    invalid = error.get("ctx", {}).get("error")
    if isinstance(invalid, Invalid):
        return (*loc, *invalid.path), (*loc, *invalid.at), str(invalid)
    return loc, loc, error["msg"]  # pydantic's own words: a problem none of the schema's checks foresaw


def _located(error: ErrorDetails, name: str, line_of: LineOf) -> ConfigError:
    """A validation error as ``{file}:{line}: {path}: {message}``: the one place where a location becomes a line
    of the file."""
    path, at, message = _explained(error)
    invalid = error.get("ctx", {}).get("error")
    if isinstance(invalid, Invalid) and invalid.other is not None:
        message += f" (line {_line(line_of, (*tuple(error['loc']), *invalid.other))})"
    where = f"{name}:{_line(line_of, at)}"
    return ConfigError(f"{where}: {_dotted(path)}: {message}" if path else f"{where}: {message}")


def _last_line(text: str, line: int) -> int:
    # A parser at the end of the text counts the empty line after the final newline; editors show none there.
    return max(1, min(line, len(text.splitlines())))


# -- YAML -----------------------------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):  # type: ignore[misc,unused-ignore]
    """PyYAML's safe loader, except that a scalar that does not fit its explicit tag (``!!int abc``) is a YAML
    error at its line rather than a bare ValueError."""

    def construct_object(self, node: Any, deep: bool = False) -> object:
        try:
            return super().construct_object(node, deep=deep)
        except ValueError as exc:
            problem = f"{node.value!r} is not a valid {node.tag}: {exc}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def _read_yaml(text: str, name: str) -> tuple[object, LineOf]:
    """The document as plain values (None if it is empty), and the line of each value."""
    loader = _YamlLoader(text)
    lines: dict[Key, int] = {}
    try:
        root = loader.get_single_node()
        if root is None:
            return None, lines.get
        _yaml_lines(root, (), lines, set(), name)
        return loader.construct_document(root), lines.get
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = _last_line(text, mark.line + 1 if mark else 1)
        context = f" ({exc.context})" if exc.context else ""
        raise ConfigError(f"{name}:{line}: invalid YAML: {exc.problem}{context}") from None
    except yaml.YAMLError as exc:  # a reader error: a character YAML does not allow
        line = _last_line(text, text.count("\n", 0, getattr(exc, "position", 0)) + 1)
        raise ConfigError(f"{name}:{line}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def _yaml_lines(node: Any, loc: Key, lines: dict[Key, int], seen: set[int], name: str) -> None:
    """Record the line of every value under the composed ``node`` (a mapping's values at their key's line), and
    refuse the keys that safe_load lets pass: one given twice (the last would silently win), and a list or mapping.
    It runs before the loader constructs the values, which flattens the merge keys ("<<: *base") away."""
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode) or id(node) in seen:
        return  # an alias keeps the lines of where it was first written; this also ends a cycle of aliases
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _yaml_lines(item, (*loc, i), lines, seen, name)
        return
    own: dict[str, int] = {}  # key -> its line
    merged: list[Any] = []
    for key, value in node.value:
        if key.tag == _YAML_MERGE_TAG:
            merged += value.value if isinstance(value, yaml.SequenceNode) else [value]
            continue
        line = key.start_mark.line + 1
        if not isinstance(key, yaml.ScalarNode):
            raise ConfigError(f"{name}:{line}: {_dotted(loc) or 'the file'}: keys must be plain words")
        key_loc = (*loc, key.value)
        if key.value in own:
            raise ConfigError(f"{name}:{line}: {_dotted(key_loc)}: given twice (first at line {own[key.value]})")
        own[key.value] = lines[key_loc] = line
        key.tag = _YAML_STR_TAG  # a key is read as written: YAML 1.1 reads "on" or "no" (env names) as booleans
        _yaml_lines(value, key_loc, lines, seen, name)
    for source in merged:  # after the mapping's own keys, whose lines win
        _yaml_lines(source, loc, lines, seen, name)


# -- TOML -----------------------------------------------------------------------------------------------------

_TOML_AT_RE = re.compile(r"\s*\(at line (\d+), column \d+\)$")


def _read_toml(text: str, name: str) -> tuple[object, LineOf]:
    """The document as plain values (None if it holds nothing, as YAML reports it), and the line of a value."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = _TOML_AT_RE.search(message)
        # Without a position the problem is at the end ("at end of document").
        line = _last_line(text, int(at.group(1)) if at else len(text))
        raise ConfigError(f"{name}:{line}: invalid TOML: {message[: at.start()] if at else message}") from None
    return data or None, functools.partial(_toml_line, text.splitlines(keepends=True))


def _toml_line(lines: list[str], loc: Key) -> int | None:
    """The line where ``loc`` is first written. tomllib keeps no positions, so beginnings of the file are parsed,
    bisecting for the shortest one that holds ``loc``. A beginning that cuts a value spanning lines (a multi-line
    array or string) does not parse and counts as the first longer one that does, so a key inside such a value
    (a bad item of a multi-line array) is put on the value's first line."""

    def holds(end: int) -> bool:
        for stop in range(end, len(lines) + 1):
            try:
                value: object = tomllib.loads("".join(lines[:stop]))
            except tomllib.TOMLDecodeError:
                continue  # it cuts a value that spans lines
            try:
                for part in loc:
                    value = value[part]  # type: ignore[index]
            except (KeyError, IndexError, TypeError):
                return False
            return True
        return False

    line = bisect.bisect_left(range(1, len(lines) + 1), True, key=holds) + 1
    return line if line <= len(lines) else None
