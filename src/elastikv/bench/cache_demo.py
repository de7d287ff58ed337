"""`elastikv demo`: one elastic KV cache growing with a burst of requests and shrinking when they finish.

A Llama-3.1-8B-shaped KV cache (32 layers, 8 KV heads, head dim 128, bf16, 16-token blocks) is reserved as
large as the device, then requests arrive in waves; each writes its prompt's K and V into the blocks it was
given, and frees them when it finishes. The table shows what was really mapped at each step, against what a
static cache would hold all along (the whole device).
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from elastikv.config import Settings, format_bytes
from elastikv.instance import Instance, open_instance
from elastikv.memory import MemoryBackend, used_bytes
from elastikv.space import KVGeometry

LLAMA_8B = KVGeometry.for_attention(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)


@dataclass
class Request:
    tokens: int
    blocks: list[int]
    ends_at: int


def run_demo(
    settings: Settings, *, steps: int = 24, step_seconds: float = 0.3, seed: int = 0, console: Console | None = None
) -> dict[str, float]:
    """Run the demo (as a ledger instance named "demo", visible to `elastikv status`); return its figures."""
    console = console or Console()
    inst = open_instance(LLAMA_8B, engine="demo", name=settings.name or f"demo-{os.getpid()}", settings=settings)
    try:
        return _demo(inst, settings, steps, step_seconds, seed, console)
    finally:
        inst.close()


def _held(backend: MemoryBackend, used0: int) -> int:
    """Memory the device really holds for this cache now."""
    return used_bytes(backend) - used0


def _demo(
    inst: Instance, settings: Settings, steps: int, step_seconds: float, seed: int, console: Console
) -> dict[str, float]:
    rng = random.Random(seed)
    backend, space, alloc = inst.backend, inst.space, inst.allocator
    alloc.maintain()  # let the minimum reserve land before the baseline is read
    _, total = backend.mem_info()
    deadline = time.monotonic() + 5  # the baseline is read with no page in flight (booked == mapped)
    while alloc.stats().mapped_bytes != space.mapped_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    used0 = used_bytes(backend) - space.mapped_bytes  # what others (and torch) hold: not our mapped pages
    console.print(f"[bold]elastikv demo[/] on {backend.device_label}")
    console.print(f"  {space.describe()}")
    console.print(
        f"  instance {inst.name!r} (see `elastikv status`), limit {format_bytes(alloc.limit)}, "
        f"minimum reserve {format_bytes(settings.reserve.resolve(total))}; "
        "a static cache would hold all of it from the start\n"
    )
    # Requests sized so the peak takes roughly a third of the device (less on a host: populating host
    # pages runs at ~1.5 GB/s, and the point is the shape, not the size).
    peak_bytes = total / 3 if backend.name == "cuda" else min(total / 3, 3 * 1024**3)
    tokens_per_request = 2048
    per_request = math.ceil(tokens_per_request / LLAMA_8B.block_shape[0]) * LLAMA_8B.group_bytes
    peak_requests = max(2, int(peak_bytes // per_request))
    live: list[Request] = []
    table = Table(title="one elastic KV cache, step by step")
    for col in ("step", "+req", "-req", "live", "blocks", "pages", "mapped", "held", "alloc ms"):
        table.add_column(col, justify="right")
    peak_mapped = 0
    view = space.buffer(0, 0)
    for step in range(steps):
        # Two waves: a ramp to the peak, a drain, a smaller second wave, a drain.
        phase = step / steps
        wave = math.sin(math.pi * min(1.0, phase / 0.45)) if phase < 0.45 else 0.0
        if 0.55 <= phase < 0.85:
            wave = 0.5 * math.sin(math.pi * (phase - 0.55) / 0.3)
        wanted = int(peak_requests * wave)
        arrive = max(0, wanted - len(live))
        done = [r for r in live if r.ends_at <= step]
        for r in done:
            alloc.free(r.blocks)
            live.remove(r)
        t0 = time.perf_counter()
        for _ in range(arrive):
            tokens = rng.randint(tokens_per_request // 2, tokens_per_request)
            blocks = alloc.allocate(math.ceil(tokens / LLAMA_8B.block_shape[0]))
            # Write the prompt's K into layer 0 (real memory, really written).
            ids = torch.tensor(blocks, device=space.device)
            view.index_fill_(0, ids, float(step % 7 + 1))
            live.append(Request(tokens, blocks, ends_at=step + rng.randint(1, 3)))
        alloc_ms = (time.perf_counter() - t0) * 1e3
        time.sleep(step_seconds)  # time passes; the maintainer trims what finished requests left behind
        s = alloc.stats()
        peak_mapped = max(peak_mapped, s.mapped_bytes)
        table.add_row(
            str(step),
            str(arrive),
            str(len(done)),
            str(len(live)),
            str(s.blocks_in_use),
            str(s.pages_mapped),
            format_bytes(s.mapped_bytes),
            format_bytes(_held(backend, used0)),
            f"{alloc_ms:.1f}",
        )
    for r in live:
        alloc.free(r.blocks)
    deadline = time.monotonic() + 3
    reserve_pages = math.ceil(settings.reserve.resolve(total) / space.page_bytes)
    while alloc.stats().pages_mapped > reserve_pages:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    s = alloc.stats()
    console.print(table)
    capacity = space.num_blocks * LLAMA_8B.group_bytes
    console.print(
        f"\npeak mapped {format_bytes(peak_mapped)} of a {format_bytes(capacity)} virtual cache "
        f"({peak_mapped / capacity:.0%}); a static cache holds {format_bytes(capacity)} at every step."
    )
    console.print(
        f"after every request finished: {format_bytes(s.mapped_bytes)} still mapped "
        f"(the reserve: {reserve_pages} page(s)), "
        f"{s.pages_mapped_total} pages mapped and {s.pages_unmapped_total} unmapped in all, "
        f"{s.pages_mapped_by_caller} mapped on the caller's thread."
    )
    return {
        "peak_mapped": peak_mapped,
        "capacity": capacity,
        "final_mapped": s.mapped_bytes,
        "final_held": _held(backend, used0),
    }
