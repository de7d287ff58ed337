"""vLLM's first sleep as fast as its later ones: the pinned host memory it copies the weights into, made at start.

vLLM's sleep (level 1) copies every weight allocation of its ``CuMemAllocator`` into a pinned host tensor it makes
at that moment (``torch.empty(..., pin_memory=True)``); at wake the tensor is freed into torch's pinned-memory
cache (``CachingHostAllocator``: it keeps freed blocks by size class), so later sleeps reuse it, but the first one
pays the page-locking of every byte (8B bf16 on the H200: 8.8 s against 0.37 s). Here each worker makes tensors of
exactly those sizes once, after loading, and frees them: torch's cache then holds the blocks the first sleep will
ask for. The cost moves to start-up (one engine start, off the request path), and the memory stays pinned for the
engine's life, as vLLM's own would after its first sleep.

Bounded by ``ELASTIKV_PIN_BUDGET`` (0: never) and by the host: weights over the budget, or more than the host can
pin and keep ``HOST_RESERVE`` available (every engine on a host pins its own), are not warmed, and the log says why
(the first sleep is slow then, as without elastikv). Level-2 sleeps copy nothing; the warmed blocks wait for a
level-1 sleep.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from elastikv.config import Settings, format_bytes
from elastikv.errors import ElastikvError
from elastikv.instance import physical_memory, pin_refusal

log = logging.getLogger("elastikv")

WEIGHTS_TAG = "weights"  # vLLM's tag for the model's weights in its CuMemAllocator (the offloaded ones)
# Bytes of pinned host memory this process has for the weights' copy: made at start, or pinned by a level 1 sleep
# let through (torch's pinned-memory cache keeps it after the wake).
_ready = 0


def weight_allocations() -> list[int]:
    """The sizes of vLLM's weight allocations in its sleep-mode allocator; [] without sleep mode (or vLLM)."""
    try:
        from vllm.device_allocator.cumem import CuMemAllocator
    except ImportError:  # no CUDA build: no sleep mode to prepare for
        return []
    allocator = CuMemAllocator.instance  # None until sleep mode made one: never create it here
    if allocator is None:
        return []
    return [int(data.handle[1]) for data in allocator.pointer_to_data.values() if data.tag == WEIGHTS_TAG]


def warm_pinned_cache(sizes: list[int], settings: Settings) -> float:
    """Make and free one pinned host tensor per size, so torch's pinned-memory cache holds them for vLLM's first
    sleep. Returns the seconds it took (0.0 when nothing was warmed: no sizes, no CUDA, or over the budget)."""
    total = sum(sizes)
    if not sizes:
        return 0.0
    budget = settings.pin_budget.resolve(physical_memory())
    if total > budget:
        log.warning(
            "elastikv: vLLM's first sleep will pin its weights' host copy then (%s is over ELASTIKV_PIN_BUDGET, "
            "%s); raise the budget to have it made at start",
            format_bytes(total),
            format_bytes(budget),
        )
        return 0.0
    refusal = pin_refusal(total)
    if refusal is not None:  # many engines on one host, each pinning its weights: never past the host's memory
        log.warning("elastikv: vLLM's sleep memory not made at start: %s; its first level 1 sleep will pin it then "
                    "(or fail: a sleep at level 2 needs no host memory)", refusal)  # fmt: skip
        return 0.0
    if not torch.cuda.is_available():  # pinning needs CUDA; vLLM's CPU build has no sleep mode to prepare for
        return 0.0
    t0 = time.monotonic()
    held: list[torch.Tensor] = []
    try:  # all at once: freed one by one, a block would be handed out again to the next size
        for size in sizes:
            held.append(torch.empty(size, dtype=torch.uint8, device="cpu", pin_memory=True))
    except RuntimeError as exc:  # the host cannot pin that much: the first sleep does it (and may fail) as before
        log.warning("elastikv: pinning %s of host memory for vLLM's sleep failed (%s)", format_bytes(total), exc)
        return 0.0
    finally:
        held.clear()  # back into torch's pinned-memory cache, where vLLM's first sleep finds them
    seconds = time.monotonic() - t0
    global _ready
    _ready = total
    log.info("elastikv: %s of pinned host memory made for vLLM's sleep in %.1f s", format_bytes(total), seconds)
    return seconds


def level_1_refusal(sizes: list[int]) -> str | None:
    """Why a level 1 sleep, copying weight allocations of ``sizes`` to pinned host memory, would leave the host
    short, or None (nothing more to pin, or room for it). Let through, the memory counts as pinned from then on:
    torch's pinned-memory cache keeps it after the wake, so later sleeps pin nothing more."""
    global _ready
    need = sum(sizes) - _ready
    refusal = pin_refusal(need) if need > 0 else None
    if refusal is None:
        _ready = max(_ready, sum(sizes))
    return refusal


def check_level_1(_worker_obj: Any = None) -> None:
    """Before vLLM's level 1 sleep, in every worker (collective_rpc): ``ElastikvError`` with the way out if its
    host copy would leave the host short. Raised before anything is offloaded, so vLLM stays awake and whole (its
    sleep, failing to pin half way, would leave some weights unmapped and the engine neither awake nor asleep)."""
    refusal = level_1_refusal(weight_allocations())
    if refusal is not None:
        raise ElastikvError(f"vLLM's sleep level 1 copies the weights to host memory: {refusal}; put this model to "
                            "sleep at level 2 instead (the router's sleep_level: 2; its weights are reloaded from "
                            "its files at wake)")  # fmt: skip


def prepare_first_sleep(_worker_obj: Any = None) -> float:
    """Run in every worker (collective_rpc) once its weights are loaded; see the module's docstring."""
    return warm_pinned_cache(weight_allocations(), Settings.from_env())
