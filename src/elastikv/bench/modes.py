"""What each mode of the multi-model benchmark serves: the model directories (the user's own, or one random
model made once and served under every name) and, per mode, the router config, how to read the KV memory each
model holds, and what to hold while the engines run (vLLM modes: a device ballast, kvcached's own limits)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from elastikv.bench.plan import BenchPlan, GiB
from elastikv.bench.replay import Held, embedded_config, held_kv
from elastikv.bench.variants import base_mode, variant_env
from elastikv.bench.vllm import KV_ONLY
from elastikv.bench.workload import Arrival
from elastikv.errors import ConfigError
from elastikv.router.config import RouterConfig


@dataclass(frozen=True)
class ModeSetup:
    """One mode, ready to replay through the router."""

    config: RouterConfig  # the router and its engines
    held: Held  # the KV bytes each model holds now, sampled during the replay
    after_start: Callable[[], contextlib.AbstractContextManager[Any]] | None  # held once every engine is up


def model_dirs(plan: BenchPlan, work: Path, cache: Path | None, console: Console) -> dict[str, Path]:
    """Each model's directory: the user's (``--model``, checked), or one random ``plan.size`` model made once in
    ``cache`` (or ``work``) that every model serves (each engine its own copy in memory)."""
    if plan.model_paths:
        paths = {name: Path(p) for name, p in zip(plan.models, plan.model_paths, strict=True)}
        for name, p in paths.items():
            if not (p / "config.json").is_file():
                raise ConfigError(f"--model {p} (for {name}) has no config.json: give a local model directory")
        return paths
    from elastikv.bench.models import make_model_once

    where = (cache or work) / f"{plan.size}-seed{plan.seed}"  # every model serves it (its own copy in memory)
    t0 = time.monotonic()
    with console.status(f"making a random-weight {plan.size} Llama in {where} (no download)..."):
        made = make_model_once(where, size=plan.size, seed=plan.seed)
    if made:
        console.print(f"made {where} in {time.monotonic() - t0:.0f} s")
    return dict.fromkeys(plan.models, where)


def mode_setup(
    mode: str,
    plan: BenchPlan,
    paths: dict[str, Path],
    work: Path,
    traces: list[list[Arrival]],
    third_tokens: int,
    per_token: int,
) -> ModeSetup:
    """The router config, the KV-held sampler and what to hold once the engines are up, for one mode."""
    share = plan.kv_budget // len(plan.models)
    if plan.engine == "embedded":
        config = embedded_router_config(mode, plan, paths, work, third_tokens, per_token)
        return ModeSetup(config, held_kv(mode, plan.models, share), None)
    from elastikv.bench import vllm as bench_vllm

    env = {"ELASTIKV_LEDGER_DIR": str(work / "ledger"), "VLLM_LOGGING_LEVEL": "WARNING"}
    if plan.reserve is not None:
        env["ELASTIKV_RESERVE"] = str(plan.reserve)
    longest = max((a.prompt_tokens + a.output_tokens for t in traces for a in t), default=1)
    cfg = bench_vllm.router_config(mode, paths, share=share, budget=plan.kv_budget, env=env, dtype=plan.dtype,
                                   max_model_len=-(-(longest + 16) // 256) * 256, extra_args=plan.vllm_args,
                                   start_timeout_s=900.0)  # fmt: skip
    if base_mode(mode) == "kvcached":
        names = plan.models

        def kvcached_held(_router: Any) -> dict[str, int]:
            return bench_vllm.kvcached_held(names)

        @contextlib.contextmanager
        def after_start() -> Iterator[dict[str, Any]]:
            bench_vllm.set_kvcached_limits(names, plan.kv_budget)
            with bench_vllm.ballast(plan.kv_budget) as info:
                yield info

        return ModeSetup(cfg, kvcached_held, after_start)
    held = held_kv("static" if mode == "static" else "elastic", plan.models, bench_vllm.static_kv_bytes(share))
    if mode == "static":
        return ModeSetup(cfg, held, None)
    return ModeSetup(cfg, held, lambda: bench_vllm.ballast(plan.kv_budget))


def embedded_router_config(
    mode: str, plan: BenchPlan, paths: dict[str, Path], work: Path, third_tokens: int, per_token: int
) -> RouterConfig:
    """The router for one mode on elastikv's embedded engine: ``static`` gives each engine transformers' own cache
    of a share, ``elastic`` (and its variants, with their settings) lets them all share the budget through the
    ledger."""
    settings = variant_env(mode)
    mode = base_mode(mode)
    share = plan.kv_budget // len(plan.models)
    env = {
        "ELASTIKV_LEDGER_DIR": str(work / "ledger"),  # the benchmark's own book: other elastikv users are left alone
        "ELASTIKV_DEVICE_BUDGET": str(plan.kv_budget),
        **KV_ONLY,  # the budget is for KV only, as static's shares are
        "ELASTIKV_PREFIX_CACHE": "0",  # the trace's prompts share nothing
    }
    if plan.reserve is not None:
        env["ELASTIKV_RESERVE"] = str(plan.reserve)
    if "ELASTIKV_HOST_MEMORY" not in os.environ:
        env["ELASTIKV_HOST_MEMORY"] = str(max(plan.kv_budget * 2, GiB))  # on a CPU: the pretend device
    env.update(settings)
    models = {}
    for name in plan.models:
        args = ["--dtype", plan.dtype, "--max-batch-tokens", str(plan.max_batch_tokens), "--attention", plan.attention]
        if mode == "static":
            args += ["--static-kv", str(share), "--max-kv-tokens", str(third_tokens)]
        else:
            read = plan.elastic_read_tokens or plan.kv_budget // per_token
            args += ["--max-kv-tokens", str(read)]
        models[name] = (paths[name], args)
    idle = plan.idle_s if mode == "elastic" else None
    return embedded_config(models, env, idle_s=idle, start_timeout_s=900.0)
