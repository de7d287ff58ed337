"""How each kind of engine is started, put to sleep and woken: the only engine-specific part of the router.

An engine is a child process serving the OpenAI API on 127.0.0.1:PORT for one model. elastikv is made active in
it through the environment (``ELASTIKV=1``, its instance name, its limit), exactly as ``elastikv run`` would, so
the router needs no engine changes either. Sleep and wake are HTTP calls to the engine's own endpoints:

==========  =====================================  ==========================================================
engine      sleep                                  wake
==========  =====================================  ==========================================================
elastikv    ``POST /sleep?level=N``                ``POST /wake_up``
vllm        ``POST /sleep?level=N`` (the router    ``POST /wake_up``; after a level 2 sleep also ``POST
            adds ``--enable-sleep-mode`` and       /collective_rpc {"method": "reload_weights"}``: vLLM's
            ``VLLM_SERVER_DEV_MODE=1``; CUDA only) level 2 discards the weights' contents and its wake maps
                                                   their memory back without them (its own docs: reload)
sglang      ``POST /release_memory_occupation``    ``POST /resume_memory_occupation`` (elastikv gives the KV
            (every KV page goes back to the        cache back at release and maps it on demand after resume;
            device; weights stay resident)         no ``--enable-memory-saver``, which needs CUDA's
                                                   torch_memory_saver and would also drop the weights)
command     none: ``sleep_level: stop`` ends the process, the next request starts it again
==========  =====================================  ==========================================================
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from dataclasses import dataclass

import httpx

from elastikv.errors import ConfigError
from elastikv.router.config import ModelSpec

GPU_NODES = ("/dev/nvidiactl", "/dev/kfd")  # NVIDIA's and AMD's: vLLM's sleep mode runs on CUDA and ROCm only


@dataclass(frozen=True)
class Launch:
    """What to run for one model, and how to reach it once it runs."""

    argv: list[str]
    env: dict[str, str]
    sleep: tuple[str, str] | None  # (method, path with "{level}") to put it to sleep; None: only "stop" can
    wake: tuple[str, str] | None
    # After a wake from level 2, where the engine does not reload its weights itself: (method, path, JSON body)
    reload: tuple[str, str, dict[str, str]] | None = None


def launch(spec: ModelSpec, port: int, *, host: str = "127.0.0.1") -> Launch:
    """The command line and environment that start ``spec``'s engine on ``port``."""
    env = {**os.environ, **spec.env, "ELASTIKV_NAME": spec.name}
    env.pop("ELASTIKV_ADMIN_TOKEN", None)  # the router's secret; engines have no use for it
    if spec.engine != "command":
        env["ELASTIKV"] = "1"
    level = spec.sleep_level
    sleep = wake = None
    reload: tuple[str, str, dict[str, str]] | None = None
    model = spec.model or ""
    if spec.engine == "elastikv":
        argv = [sys.executable, "-m", "elastikv.cli", "engine", "--model", model, "--name", spec.name]
        argv += ["--host", host, "--port", str(port)]
        sleep, wake = ("POST", "/sleep?level={level}"), ("POST", "/wake_up")  # always served
    elif spec.engine == "vllm":
        # The module, not `vllm serve`: the same server, and it also works where the `vllm` script is missing.
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        argv += ["--served-model-name", spec.name, "--host", host, "--port", str(port)]
        if level in (1, 2):
            if not any(os.path.exists(node) for node in GPU_NODES):  # else vLLM fails at start, saying less
                raise ConfigError(
                    f"model {spec.name!r}: vLLM's sleep mode (sleep_level {level}; 1 unless set) needs a GPU, and "
                    "this machine has none; write sleep_level: stop for it (the router then ends the engine when it "
                    "is idle and starts it again on demand)"
                )
            argv.append("--enable-sleep-mode")
            env["VLLM_SERVER_DEV_MODE"] = "1"  # vLLM serves /sleep and /wake_up only in its dev mode
            sleep, wake = ("POST", "/sleep?level={level}"), ("POST", "/wake_up")
            reload = ("POST", "/collective_rpc", {"method": "reload_weights"})  # from the model's files
    elif spec.engine == "sglang":
        argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", model]
        argv += ["--served-model-name", spec.name, "--host", host, "--port", str(port)]
        if level in (1, 2):
            # elastikv is active in SGLang (ELASTIKV=1 above): its release empties the KV pool and elastikv unmaps
            # every page, so this needs no memory saver. Levels 1 and 2 are the same here: weights stay resident.
            sleep, wake = ("POST", "/release_memory_occupation"), ("POST", "/resume_memory_occupation")
    else:
        fields = {"{port}": str(port), "{host}": host, "{model}": model, "{name}": spec.name}
        argv = [_fill(part, fields) for part in spec.command or ()]
    return Launch(argv=argv + list(spec.args), env=env, sleep=sleep, wake=wake, reload=reload)


def _fill(part: str, fields: dict[str, str]) -> str:
    # Plain replacement, not str.format: a command may hold other braces (JSON arguments, shell snippets).
    for key, value in fields.items():
        part = part.replace(key, value)
    return part


def describe(argv: list[str]) -> str:
    """The command line as a user would type it (for logs and status)."""
    return shlex.join(argv)


def level_used(answer: httpx.Response, asked: int | str) -> int | str:
    """The level an engine says it slept at (the embedded engine's ``sleeping``), else the level asked for."""
    with contextlib.suppress(ValueError, AttributeError):  # not JSON, or not an object
        used = answer.json().get("sleeping") if answer.content else None
        if type(used) is int and used in (1, 2):
            return used
    return asked
