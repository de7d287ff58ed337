"""The router's config file: real YAML and TOML files parsed, every error pointing at its line."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("pydantic", reason="needs pydantic: pip install -e '.[serve]'")
pytest.importorskip("yaml", reason="needs PyYAML: pip install -e '.[serve]'")

from elastikv.errors import ConfigError
from elastikv.router.config import ModelSpec, RouterConfig, load_config, parse_config, parse_duration


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """tmp_path with model directories ``a`` and ``b`` (each with a config.json) under ``models/``."""
    for name in ("a", "b"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text("{}")
    return tmp_path


def write(directory: Path, text: str, name: str = "router.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def error_at(path: Path, line: int, pattern: str) -> str:
    """Load ``path``; it must fail at ``line`` with a message matching ``pattern``."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert re.search(pattern, message), message
    return message


FULL_YAML = """
listen: 0.0.0.0:9000
admin_token: $ROUTER_TEST_TOKEN
env:
  ELASTIKV_DEVICE_BUDGET: 90%
  HF_HUB_OFFLINE: true
models:
  - name: llama-a
    engine: elastikv
    model: ./models/a
    limit: 40%
    idle: 30s
    sleep_level: 1
    port: 8101
    args: [--dtype, float32, --seed, 7]
    env: {ELASTIKV_RESERVE: 8MiB, HF_HUB_OFFLINE: false}
    start_timeout: 120s
  - name: qwen
    engine: vllm
    model: Qwen/Qwen2.5-0.5B-Instruct
    idle: never
    sleep_level: 2
  - name: custom
    engine: command
    command: "python my_server.py --port {port} --model {model}"
    model: models/b
    health: /ready
"""

FULL_TOML = """
listen = "0.0.0.0:9000"
admin_token = "$ROUTER_TEST_TOKEN"

[env]
ELASTIKV_DEVICE_BUDGET = "90%"
HF_HUB_OFFLINE = true

[[models]]
name = "llama-a"
engine = "elastikv"
model = "./models/a"
limit = "40%"
idle = "30s"
sleep_level = 1
port = 8101
args = ["--dtype", "float32", "--seed", 7]
start_timeout = "120s"

[models.env]
ELASTIKV_RESERVE = "8MiB"
HF_HUB_OFFLINE = false

[[models]]
name = "qwen"
engine = "vllm"
model = "Qwen/Qwen2.5-0.5B-Instruct"
idle = "never"
sleep_level = 2

[[models]]
name = "custom"
engine = "command"
command = "python my_server.py --port {port} --model {model}"
model = "models/b"
health = "/ready"
"""


def test_full_yaml_and_toml_give_the_same_config(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_TEST_TOKEN", "s3cret")
    from_yaml = load_config(write(models, FULL_YAML))
    from_toml = load_config(write(models, FULL_TOML, "router.toml"))
    assert from_yaml.source == models / "router.yaml"
    assert from_toml.source == models / "router.toml"
    assert dataclasses.replace(from_yaml, source=None) == dataclasses.replace(from_toml, source=None)
    assert (from_yaml.host, from_yaml.port, from_yaml.admin_token) == ("0.0.0.0", 9000, "s3cret")
    llama, qwen, custom = from_yaml.models
    assert llama == ModelSpec(
        name="llama-a",
        engine="elastikv",
        model=str((models / "models" / "a").resolve()),
        command=None,
        args=("--dtype", "float32", "--seed", "7"),
        env={
            "ELASTIKV_DEVICE_BUDGET": "90%",
            "HF_HUB_OFFLINE": "0",
            "ELASTIKV_RESERVE": "8MiB",
            "ELASTIKV_LIMIT": "40%",
        },
        limit="40%",
        idle_s=30.0,
        sleep_level=1,
        port=8101,
        health_path="/health",
        start_timeout_s=120.0,
    )
    assert (qwen.model, qwen.idle_s, qwen.sleep_level, qwen.start_timeout_s) == (
        "Qwen/Qwen2.5-0.5B-Instruct",
        None,
        2,
        900.0,
    )
    assert qwen.env == {"ELASTIKV_DEVICE_BUDGET": "90%", "HF_HUB_OFFLINE": "1"}
    assert custom.command == ("python", "my_server.py", "--port", "{port}", "--model", "{model}")
    assert (custom.model, custom.health_path, custom.sleep_level) == (
        str((models / "models" / "b").resolve()),
        "/ready",
        "stop",
    )


def test_defaults(models: Path) -> None:
    config = load_config(write(models, "models:\n  - {name: a, model: ./models/a}\n"))
    assert (config.host, config.port, config.admin_token) == ("127.0.0.1", 8000, None)
    assert config.models == (
        ModelSpec(
            name="a",
            engine="elastikv",
            model=str((models / "models" / "a").resolve()),
            command=None,
            args=(),
            env={},
            limit=None,
            idle_s=300.0,
            sleep_level=1,
            port=None,
            health_path="/health",
            start_timeout_s=180.0,
        ),
    )


def test_engine_defaults_and_empty_values(models: Path) -> None:
    config = load_config(
        write(
            models,
            """
            listen: 8080
            env:
              # nothing here yet: an empty value counts as not given
            models:
              - {name: s, engine: sglang, model: org/model, idle:}
              - {name: c, engine: command, command: [serve, --port, "{port}", 3]}
            """,
        )
    )
    sglang, command = config.models
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert (sglang.sleep_level, sglang.start_timeout_s, sglang.idle_s, sglang.env) == (1, 900.0, 300.0, {})
    assert (command.sleep_level, command.start_timeout_s, command.model) == ("stop", 180.0, None)
    assert command.command == ("serve", "--port", "{port}", "3")


def test_relative_paths_are_relative_to_the_file(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = models / "conf"
    conf.mkdir()
    (models / "home" / "m").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(models / "home"))
    monkeypatch.chdir(models / "models")  # the working directory must not matter
    config = load_config(
        write(
            conf,
            """
            models:
              - {name: up, model: ../models/a}
              - {name: home, engine: vllm, model: ~/m}
              - {name: hub, engine: vllm, model: meta-llama/Llama-3.2-1B}
              - {name: absent, engine: vllm, model: ./not-there}
            """,
        )
    )
    assert [m.model for m in config.models] == [
        str((models / "models" / "a").resolve()),
        str((models / "home" / "m").resolve()),
        "meta-llama/Llama-3.2-1B",  # a hub id: no such path, and not written as one
        str((conf / "not-there").resolve()),  # written as a path: vllm reports it missing, with the full path
    ]


def test_parse_config_text_resolves_against_the_working_directory(
    models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(models)
    config = parse_config("models = [{name = 'a', model = 'models/a'}]", fmt="toml", environ={})
    assert config.source is None
    assert config.models[0].model == str((models / "models" / "a").resolve())


@pytest.mark.parametrize(
    ("written", "token"),
    [("$TOKEN_VAR", "from-env"), ("${TOKEN_VAR}", "from-env"), ("literal-token", "literal-token"), ("$$x", "$x")],
)
def test_admin_token(models: Path, written: str, token: str) -> None:
    text = f"admin_token: '{written}'\nmodels: [{{name: a, model: ./models/a}}]\n"
    config = parse_config(text, fmt="yaml", source=models / "r.yaml", environ={"TOKEN_VAR": "from-env"})
    assert config.admin_token == token


def test_without_admin_token_the_token_comes_from_elastikv_admin_token(models: Path) -> None:
    text = "models: [{name: a, model: ./models/a}]\n"
    src = models / "r.yaml"
    assert parse_config(text, fmt="yaml", source=src, environ={"ELASTIKV_ADMIN_TOKEN": "s"}).admin_token == "s"
    assert parse_config(text, fmt="yaml", source=src, environ={}).admin_token is None


def test_admin_token_variable_must_be_set(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROUTER_TEST_UNSET", raising=False)
    path = write(models, "models: [{name: a, model: ./models/a}]\nadmin_token: $ROUTER_TEST_UNSET\n")
    error_at(path, 2, r"admin_token: the environment variable ROUTER_TEST_UNSET is not set")
    text = path.read_text()
    with pytest.raises(ConfigError, match=r"^<config>:2: admin_token: the environment variable T is empty"):
        parse_config(text.replace("ROUTER_TEST_UNSET", "T"), fmt="yaml", environ={"T": ""})


M = "models:\n  - name: a\n    model: ./models/a\n"  # a valid first model, lines 1-3

YAML_ERRORS = [
    pytest.param("", 1, r"the file is empty", id="empty"),
    pytest.param("# nothing but a comment\n", 1, r"the file is empty", id="only-comments"),
    pytest.param(
        "- a\n- b\n", 1, r"expected a mapping with listen, admin_token, env, room_ahead, models; got a list", id="list"
    ),
    pytest.param(
        "listen: 8000\nlisen: 9000\n" + M,
        2,
        r": unknown key 'lisen' \(did you mean 'listen'\?\); the file takes: listen, admin_token, env, room_ahead, "
        r"models$",
        id="unknown-top-key",
    ),
    pytest.param(
        M + "    idel: 30s\n",
        4,
        r": models\[0\]: unknown key 'idel' \(did you mean 'idle'\?\); a model takes: name, engine, model, command,",
        id="unknown-model-key",
    ),
    pytest.param("listen: 8000\n", 1, r"no 'models': list at least one model", id="no-models"),
    pytest.param("listen: 8000\nmodels: []\n", 2, r": models: the list is empty", id="empty-models"),
    pytest.param(
        "listen: 8000\nmodels: {name: a}\n", 2, r": models: expected a list of models; got a mapping", id="dict"
    ),
    pytest.param(
        M + "  - just-a-name\n", 4, r": models\[1\]: expected a mapping .*; got 'just-a-name'", id="not-a-mapping"
    ),
    pytest.param(M + "  - model: ./models/a\n", 4, r": models\[1\]: no name; every model needs one", id="no-name"),
    pytest.param(
        M + "  - model: ./models/a\n    name: two words\n",
        5,
        r": models\[1\]\.name: 'two words' is not a usable instance name",
        id="bad-name",
    ),
    pytest.param(
        M + "  - model: ./models/b\n\n    name: a\n",
        6,
        r": models\[1\]\.name: 'a' is already the name of models\[0\] \(line 2\)$",
        id="duplicate-name",
    ),
    pytest.param(
        M + "    engine: vlm\n",
        4,
        r": models\[0\]\.engine: 'vlm' is not an engine \(did you mean vllm\?\); "
        r"use one of elastikv, vllm, sglang, command$",
        id="unknown-engine",
    ),
    pytest.param(
        "models:\n  - name: a\n    engine: vllm\n", 2, r": models\[0\]: no model; engine vllm needs", id="no-model"
    ),
    pytest.param(
        "models:\n  - name: a\n    engine: command\n",
        2,
        r": models\[0\]: no command; engine command needs",
        id="no-command",
    ),
    pytest.param(
        M + "    command: serve {port}\n",
        4,
        r": models\[0\]\.command: only engine command takes a command; this model's engine is elastikv",
        id="command-for-elastikv",
    ),
    pytest.param(
        "models:\n  - name: a\n    model: ./models/nope\n",
        3,
        r": models\[0\]\.model: './models/nope': no such model directory \(.*nope\); "
        r"make one with: elastikv make-model .*/models/nope$",
        id="model-missing",
    ),
    pytest.param(
        "models:\n  - name: a\n    model: .\n",
        3,
        r": models\[0\]\.model: '\.': .* has no config\.json, so it is no model; make one with: elastikv make-model ",
        id="model-without-config-json",
    ),
    pytest.param(
        "models:\n  - name: a\n    model: org/hub-id\n",
        3,
        r"'org/hub-id': no such model directory .*make one with: elastikv make-model",
        id="elastikv-takes-no-hub-id",
    ),
    pytest.param(
        M + "    limit: 5 parsecs\n",
        4,
        r": models\[0\]\.limit: unknown unit 'parsecs' in '5 parsecs'; write a size such as 8GiB",
        id="bad-limit",
    ),
    pytest.param(M + "    limit: 0%\n", 4, r": models\[0\]\.limit: '0%' must be more than 0%", id="zero-limit"),
    pytest.param(
        M + "    limit: 40%\n    env:\n      ELASTIKV_LIMIT: 30%\n",
        4,
        r": models\[0\]\.env: ELASTIKV_LIMIT given here and as limit; keep one",
        id="limit-twice",
    ),
    pytest.param(
        M + "    idle: 5x\n",
        4,
        r"^\S+:4: models\[0\]\.idle: '5x' is not a duration; write 30s, 5m, 1h or never$",
        id="bad-idle",
    ),
    pytest.param(M + "    idle: 0\n", 4, r": models\[0\]\.idle: 0 must be more than zero", id="zero-idle"),
    pytest.param(
        M + "room_ahead: soon\n",
        4,
        r"^\S+:4: room_ahead: 'soon' is not a duration; write 30s, 5m, 1h or never$",
        id="bad-room-ahead",
    ),
    pytest.param(
        M + "    start_timeout: never\n",
        4,
        r": models\[0\]\.start_timeout: must be a duration, not never",
        id="timeout-never",
    ),
    pytest.param(
        M + "    start_timeout: -5s\n", 4, r": models\[0\]\.start_timeout: '-5s' must be more than zero", id="negative"
    ),
    pytest.param(
        M + "    sleep_level: 3\n", 4, r": models\[0\]\.sleep_level: 3 is not a sleep level; write 1", id="level-3"
    ),
    pytest.param(
        M + "    idle: never\n    sleep_level: deep\n", 5, r"'deep' is not a sleep level", id="level-checked-when-never"
    ),
    pytest.param(
        "models:\n  - name: a\n    engine: command\n    command: [serve, '{port}']\n    sleep_level: 1\n",
        5,
        r": models\[0\]\.sleep_level: engine command can only sleep by stopping; write stop, not 1",
        id="command-level",
    ),
    pytest.param(
        M + "    port: 70000\n", 4, r": models\[0\]\.port: 70000 is not a port; write a number from 1", id="port-range"
    ),
    pytest.param(M + "    port: 0\n", 4, r"0 is not a port", id="port-zero"),
    pytest.param(
        M + "    port: 8101\n  - name: b\n    model: ./models/b\n    port: 8101\n",
        7,
        r": models\[1\]\.port: 8101 is already taken by models\[0\] \(line 4\)$",
        id="duplicate-port",
    ),
    pytest.param(
        "listen: 9000\n" + M + "    port: 9000\n",
        5,
        r": models\[0\]\.port: 9000 is already taken by listen \(line 1\)$",
        id="listen-port",
    ),
    pytest.param(
        M + "    port: 8000\n", 4, r"8000 is already taken by the router \(listen default\)", id="default-port"
    ),
    pytest.param(
        "listen: localhost\n" + M, 1, r"^\S+:1: listen: 'localhost' is not host:port; write host:port", id="listen-host"
    ),
    pytest.param(
        "listen: 'h:99999'\n" + M, 1, r"listen: 'h:99999': the port must be a number from 1 to 65535", id="listen"
    ),
    pytest.param(
        M + "    args: --dtype float32\n",
        4,
        r": models\[0\]\.args: expected a list of strings, e.g\. \[--dtype, float32\]; got '--dtype float32'",
        id="args-string",
    ),
    pytest.param(
        M + "    args:\n      - --flag\n      - yes\n",
        6,
        r": models\[0\]\.args\[1\]: True is not a string; write it in quotes",
        id="args-bool",
    ),
    pytest.param(
        "env: [ELASTIKV_LIMIT]\n" + M,
        1,
        r"^\S+:1: env: expected a mapping of variable names to values; got a list",
        id="env",
    ),
    pytest.param(
        M + "    env:\n      A: 1\n      B: [1, 2]\n",
        6,
        r": models\[0\]\.env: B: a list is not a value for a variable; write a string",
        id="env-list-value",
    ),
    pytest.param(
        "env:\n  ELASTIKV_LIMT: 40%\n" + M,
        2,
        r"^\S+:2: env: unknown setting ELASTIKV_LIMT \(did you mean ELASTIKV_LIMIT\?\); elastikv reads only:",
        id="env-unknown-setting",
    ),
    pytest.param(
        M + "    env:\n      ELASTIKV_RESERVE: lots\n",
        5,
        r": models\[0\]\.env: ELASTIKV_RESERVE: 'lots' is not a size",
        id="env-bad-setting",
    ),
    pytest.param(
        M + "    env:\n      ELASTIKV_NAME: other\n",
        5,
        r"ELASTIKV_NAME cannot be set here: the router sets it to each model's name",
        id="env-router-var",
    ),
    pytest.param(
        "env:\n  'BAD NAME': x\n" + M, 2, r"env: 'BAD NAME' is not an environment variable name", id="env-key"
    ),
    pytest.param(
        "models:\n  - name: a\n    engine: command\n    command: serve --model {model} --port {port}\n",
        4,
        r"models\[0\]\.command: the command uses \{model\}, but this model has no model",
        id="command-model-placeholder",
    ),
    pytest.param(
        "models:\n  - name: a\n    engine: command\n    command: serve --port 9\n",
        4,
        r"the command must take the port the router picks \(\{port\}\), or give the model a port",
        id="command-no-port",
    ),
    pytest.param(
        'models:\n  - name: a\n    engine: command\n    command: "serve \'unclosed"\n',
        4,
        r"models\[0\]\.command: cannot split .* into arguments: No closing quotation",
        id="command-quotes",
    ),
    pytest.param(M + "    health: health\n", 4, r"models\[0\]\.health: 'health' is not a path", id="health"),
    pytest.param(
        M + "    idle: 30s\n    idle: 1m\n", 5, r"models\[0\]\.idle: given twice \(first at line 4\)", id="dup-key"
    ),
    pytest.param(M + "    name: [a\n", 4, r"invalid YAML: expected ',' or '\]'", id="syntax-at-the-end"),
    pytest.param(M + "  bad: indentation\n", 4, r"invalid YAML: ", id="syntax-indent"),
    pytest.param(
        M + "    idle: !!python/name:os.system\n", 4, r"invalid YAML: could not determine a constructor", id="tag"
    ),
]


@pytest.mark.parametrize(("text", "line", "pattern"), YAML_ERRORS)
def test_yaml_errors_point_at_the_line(models: Path, text: str, line: int, pattern: str) -> None:
    error_at(write(models, text), line, pattern)


TOML_ERRORS = [
    pytest.param("", 1, r"the file is empty", id="empty"),
    pytest.param(
        'listen = 8000\nlisen = 9000\n[[models]]\nname = "a"\nmodel = "./models/a"\n',
        2,
        r": unknown key 'lisen' \(did you mean 'listen'\?\)",
        id="unknown-top-key",
    ),
    pytest.param(
        '[[models]]\nname = "a"\nmodel = "./models/a"\n\n[[models]]\nname = "b"\nmodel = "./models/b"\nidel = "1m"\n',
        8,
        r": models\[1\]: unknown key 'idel' \(did you mean 'idle'\?\)",
        id="unknown-model-key",
    ),
    pytest.param(
        '[[models]]\nname = "a"\nmodel = "./models/a"\n[[models]]\nmodel = "./models/b"\n',
        4,
        r": models\[1\]: no name",
        id="no-name",
    ),
    pytest.param(
        '[[models]]\nname = "a"\nmodel = "./models/a"\n[[models]]\nmodel = "./models/b"\nname = "a"\n',
        6,
        r": models\[1\]\.name: 'a' is already the name of models\[0\] \(line 2\)$",
        id="duplicate-name",
    ),
    pytest.param(
        '[[models]]\nname = "a"\nengine = "vlm"\n', 3, r"models\[0\]\.engine: 'vlm' is not an engine", id="engine"
    ),
    pytest.param(
        '[[models]]\nname = "a"\nmodel = "./models/a"\nidle = "5x"\n',
        4,
        r": models\[0\]\.idle: '5x' is not a duration; write 30s, 5m, 1h or never$",
        id="bad-idle",
    ),
    pytest.param(
        '[[models]]\nname = "a"\nmodel = "./models/nope"\n',
        3,
        r"no such model directory .*make one with: elastikv make-model",
        id="model-missing",
    ),
    pytest.param(
        '[env]\nA = "1"\n\n[[models]]\nname = "a"\nmodel = "./models/a"\n[models.env]\nB = "2"\nELASTIKV_LIMT = "1"\n',
        9,
        r": models\[0\]\.env: unknown setting ELASTIKV_LIMT \(did you mean ELASTIKV_LIMIT\?\)",
        id="model-env",
    ),
    pytest.param(
        '[env]\nELASTIKV_LAYOUT = "diagonal"\n[[models]]\nname = "a"\nmodel = "./models/a"\n',
        2,
        r": env: ELASTIKV_LAYOUT: 'diagonal' is not one of interleaved, per-layer",
        id="global-env",
    ),
    pytest.param(
        'listen = "nohost"\n[[models]]\nname = "a"\nmodel = "./models/a"\n',
        1,
        r"listen: 'nohost' is not host:port",
        id="listen",
    ),
    pytest.param(
        '[[models]]\nname = "a"\nmodel = "./models/a"\nport = 8101\n[[models]]\nname = "b"\nmodel = "./models/b"\n'
        "port = 8101\n",
        8,
        r"models\[1\]\.port: 8101 is already taken by models\[0\] \(line 4\)",
        id="duplicate-port",
    ),
    pytest.param(
        'models = [{name = "a", model = "./models/a", idle = "soon"}]\n',
        1,
        r"models\[0\]\.idle: 'soon' is not a duration",
        id="inline-array",
    ),
    # tomllib's wording differs between versions; the position moves from its end to the front
    pytest.param('[[models]]\nname = "a"\nidle = 30s\n', 3, r"invalid TOML: \w[^()]*$", id="syntax"),
    pytest.param('[[models]]\nname = "a"\nname = "b"\n', 3, r"invalid TOML: \w[^()]*$", id="dup-key"),
    pytest.param('[[models]]\nname = "a"\nargs = ["x",\n', 3, r"invalid TOML: \w", id="syntax-at-the-end"),
]


@pytest.mark.parametrize(("text", "line", "pattern"), TOML_ERRORS)
def test_toml_errors_point_at_the_line(models: Path, text: str, line: int, pattern: str) -> None:
    error_at(write(models, text, "router.toml"), line, pattern)


def test_yaml_anchors_and_merge_keys(models: Path) -> None:
    config = load_config(
        write(
            models,
            """
            models:
              - &base {name: a, model: ./models/a, idle: 1m, args: [--x]}
              - <<: *base
                name: b
                idle: 2m
            """,
        )
    )
    assert [(m.name, m.idle_s, m.args) for m in config.models] == [("a", 60.0, ("--x",)), ("b", 120.0, ("--x",))]


def test_yaml_keys_are_taken_as_written(models: Path) -> None:
    # YAML 1.1 reads a key "on" as True; an env variable named "on" must stay a name, and "yes" a value of "1".
    config = load_config(write(models, "env: {on: yes, N: 8, F: 0.5}\n" + M))
    assert config.models[0].env == {"on": "1", "N": "8", "F": "0.5"}


def test_load_config_picks_the_format_by_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"router\.json: a config file must end in \.yaml, \.yml or \.toml"):
        load_config(write(tmp_path, "{}", "router.json"))
    with pytest.raises(ConfigError, match=r"missing\.yml: cannot read it: No such file"):
        load_config(tmp_path / "missing.yml")
    with pytest.raises(ConfigError, match=r"^<config>: unknown config format 'json'"):
        parse_config("{}", fmt="json")


def test_the_result_is_plain_frozen_data(models: Path) -> None:
    config = load_config(write(models, M))
    assert isinstance(config, RouterConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


def test_room_ahead_is_a_duration_or_never_and_never_by_default(tmp_path: Path) -> None:
    (tmp_path / "models" / "a").mkdir(parents=True)
    (tmp_path / "models" / "a" / "config.json").write_text("{}")
    src = tmp_path / "r.yaml"
    assert parse_config(M, fmt="yaml", source=src, environ={}).room_ahead_s is None
    assert parse_config("room_ahead: 2s\n" + M, fmt="yaml", source=src, environ={}).room_ahead_s == 2.0
    assert parse_config("room_ahead: never\n" + M, fmt="yaml", source=src, environ={}).room_ahead_s is None
    toml = 'room_ahead = "500ms"\n[[models]]\nname = "a"\nmodel = "./models/a"\n'
    assert parse_config(toml, fmt="toml", source=src, environ={}).room_ahead_s == 0.5


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        (" 2 M ", 120.0),
        ("45", 45.0),
        (".5s", 0.5),
        (30, 30.0),
        (2.5, 2.5),
        ("never", None),
        ("OFF", None),
        (False, None),
    ],
)
def test_parse_duration(value: object, seconds: float | None) -> None:
    assert parse_duration(value, "idle") == seconds


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("5x", "is not a duration"),
        ("", "is not a duration"),
        ("1d", "is not a duration"),
        (True, "is not a duration"),
        (None, "is not a duration"),
        ([1], "is not a duration"),
        (0, "must be more than zero"),
        ("0s", "must be more than zero"),
        (-1, "must be more than zero"),
        ("-3m", "must be more than zero"),
        (float("inf"), "must be more than zero"),
    ],
)
def test_parse_duration_refuses(value: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=rf"^idle: .* {problem}; write 30s, 5m, 1h or never$"):
        parse_duration(value, "idle")


@given(st.integers(min_value=1, max_value=10**12))
def test_parse_duration_round_trips(n: int) -> None:
    assert parse_duration(f"{n}s", "t") == n
    assert parse_duration(f"{n}ms", "t") == n / 1000
    assert parse_duration(n, "t") == n


def test_toml_lines_around_values_that_span_lines(models: Path) -> None:
    # tomllib keeps no positions: the finder parses beginnings of the file, and one that cuts a multi-line value
    # does not parse. An item of a multi-line array is put on its key's line; keys after such a value keep theirs.
    head = '[[models]]\nname = "a"\nmodel = "./models/a"\n'
    error_at(write(models, head + 'args = [\n  "x",\n  true,\n]\n', "router.toml"), 4, r"models\[0\]\.args\[1\]: True")
    text = head + 'health = """\n/x\n"""\n\n[[models]]\nname = "b"\nmodel = "./models/b"\nidle = "5x"\n'
    error_at(write(models, text, "router.toml"), 11, r"models\[1\]\.idle: '5x' is not a duration")


def test_yaml_scalar_that_does_not_fit_its_tag(models: Path) -> None:
    error_at(
        write(models, M + "    idle: !!int abc\n"), 4, r"invalid YAML: 'abc' is not a valid tag:yaml\.org,2002:int"
    )


def test_yaml_merged_keys_are_checked_like_written_ones(models: Path) -> None:
    text = "models:\n  - &a {name: a, model: ./models/a}\n  - <<: *a\n    name: b\n    port: 0\n"
    error_at(write(models, text), 5, r"models\[1\]\.port: 0 is not a port")
    error_at(write(models, "models:\n  - <<: {name: a, model: ./models/a}\n    idel: 1m\n"), 3, r"unknown key 'idel'")


def test_vllm_sleep_levels_on_a_machine_without_a_gpu_say_to_stop_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's sleep mode runs on CUDA and ROCm only: without a GPU its server fails at start with "Sleep mode is not
    supported on current platform". The router says why before starting anything, and what to write instead."""
    from elastikv.router import launch

    (tmp_path / "m").mkdir()
    config = parse_config("models: [{name: v, engine: vllm, model: ./m}]\n", fmt="yaml", source=tmp_path / "r.yaml")
    spec = config.models[0]
    monkeypatch.setattr(launch, "GPU_NODES", (str(tmp_path / "no-such-device"),))
    with pytest.raises(
        ConfigError, match=r"model 'v': vLLM's sleep mode \(sleep_level 1.*needs a GPU.*sleep_level: stop"
    ):
        launch.launch(spec, 8000)
    assert "--enable-sleep-mode" not in launch.launch(dataclasses.replace(spec, sleep_level="stop"), 8000).argv
    monkeypatch.setattr(launch, "GPU_NODES", (str(tmp_path / "m"),))  # a device node that is there
    assert "--enable-sleep-mode" in launch.launch(spec, 8000).argv
    # vLLM's level 2 discards the weights' contents and its wake does not bring them back: after such a wake the
    # router reloads them through vLLM's dev-mode RPC (tests/test_vllm_gpu_serving.py runs it on a GPU)
    assert launch.launch(spec, 8000).reload == ("POST", "/collective_rpc", {"method": "reload_weights"})
    assert launch.launch(dataclasses.replace(spec, engine="elastikv"), 8000).reload is None  # reloads itself
