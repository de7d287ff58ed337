"""What this process holds on a GPU, by the driver's count: the part of an engine's footprint PyTorch cannot see.

An engine holds more than its weights and KV: the CUDA context (about 0.5 GiB a process on an H100 with CUDA 13),
library workspaces, CUDA graph pools, and the activation peak of its largest batch. The device budget is meant to
cover what engines really hold (issue 22: a fleet of five vLLM 8B servers stayed inside a 71.3 GiB ledger budget
while the device held 73.9 GiB, 2026-12-07, H100), so each engine books this ``other`` memory beside its weights
(``instance.Holding``), awake and asleep: a sleeping engine keeps its context and graph pools.

PyTorch's counters miss the context and whatever is allocated beside its allocator; the driver's per-process figure
(NVML's running compute processes) sees everything this process holds, pages mapped through the VMM API included,
and reading it makes no CUDA context. NVML comes from ``nvidia-ml-py`` (the ``cuda`` extra) or, inside vLLM, the
copy vLLM vendors. Where neither imports, or the driver reports no per-process figure (some containers, MIG),
the figures fall back to PyTorch's allocator (its peak less the weights), which undercounts by the context; the
first fallback is logged so the gap is never silent.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from typing import Any

import torch

log = logging.getLogger("elastikv")


@functools.cache
def _nvml() -> Any | None:
    """NVML, initialised once for the process's life (its per-call queries are then a millisecond), or None."""
    for module in ("pynvml", "vllm.third_party.pynvml"):
        if module.startswith("vllm.") and "vllm" not in sys.modules:
            continue  # vLLM's copy only inside vLLM: importing vLLM elsewhere costs seconds and sets its defaults
        try:
            nvml = importlib.import_module(module)
        except ImportError:
            continue
        try:
            nvml.nvmlInit()
        except Exception as exc:  # no driver library, no permission: the fallback below
            log.info("elastikv: NVML (%s) did not initialise: %s", module, exc)
            return None
        return nvml
    return None


@functools.cache
def _handle(nvml: Any, index: int) -> Any:
    """NVML's handle of CUDA device ``index`` (by UUID: CUDA_VISIBLE_DEVICES renumbers devices, NVML does not)."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        return nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    return nvml.nvmlDeviceGetHandleByIndex(index)


def process_device_bytes(device: torch.device) -> int | None:
    """Bytes of ``device`` this process holds by the driver's count, or None where it cannot be read."""
    if device.type != "cuda":
        return None
    nvml = _nvml()
    if nvml is None:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        processes = nvml.nvmlDeviceGetComputeRunningProcesses(_handle(nvml, index))
    except Exception as exc:  # NVMLError and friends: a driver that will not say
        log.info("elastikv: NVML could not list the processes on cuda:%d: %s", index, exc)
        return None
    pid = os.getpid()
    for p in processes:
        used = getattr(p, "usedGpuMemory", None)
        if p.pid == pid and used is not None:
            return int(used)
    return None  # not listed under our pid: another pid namespace (a container), or no usage reported


@functools.cache
def _warn_fallback(label: str) -> None:
    log.warning(
        "elastikv: the driver's per-process memory figure cannot be read on %s (install nvidia-ml-py: pip install "
        "'elastikv[cuda]'); booking PyTorch's count of what the engine holds besides weights and KV, which misses "
        "the CUDA context (~0.5 GiB): leave that much of the device outside ELASTIKV_DEVICE_BUDGET",
        label,
    )


def other_bytes(device: torch.device, *, weights: int, kv: int) -> int:
    """What this process holds on ``device`` besides ``weights`` and ``kv`` bytes, counting the activation peak
    PyTorch has given back since (the next large batch takes it again). 0 off a GPU."""
    if device.type != "cuda":
        return 0
    peak = torch.cuda.max_memory_reserved(device)
    held = process_device_bytes(device)
    if held is None:
        _warn_fallback(str(device))
        return max(0, peak - weights)
    return max(0, held - weights - kv) + max(0, peak - torch.cuda.memory_reserved(device))


def resident_bytes(device: torch.device, *, kv: int) -> int:
    """What this process still holds on ``device`` besides ``kv`` bytes once its weights are off it (asleep: the
    context, graph pools, what PyTorch keeps cached). 0 where the driver's figure cannot be read (the weights' and
    other booking is then dropped whole at sleep, as PyTorch's count alone cannot tell the context apart)."""
    held = process_device_bytes(device)
    return 0 if held is None else max(0, held - kv)
