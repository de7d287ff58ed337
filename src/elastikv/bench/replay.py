"""Several models behind the router, in this process, with traces replayed through it: what ``elastikv demo`` and
``elastikv bench multi-model`` both run, once per mode (static split, elastic sharing).

The router (``elastikv serve``'s code) starts every engine once; the traces are then replayed one after the
other (each waits for all its requests), while a thread samples how much KV memory each model holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from elastikv.bench import engine_metrics
from elastikv.bench.workload import Arrival, Outcome, replay
from elastikv.config import format_bytes
from elastikv.errors import Interrupted
from elastikv.router.config import ModelSpec, RouterConfig


@dataclass
class Replayed:
    """One trace replayed: every request's outcome, and the KV bytes each model held over time."""

    outcomes: list[Outcome]
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # (seconds since its start, held)
    seconds: float = 0.0  # from the first send to the last answer
    engine_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> its elastikv_* figures
    engine_counts: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> vLLM's, this trace's share


Held = Callable[[Any], dict[str, int]]  # the Router -> bytes of KV each model holds now


def embedded_config(
    models: dict[str, tuple[Path, list[str]]], env: dict[str, str], *, idle_s: float | None, start_timeout_s: float
) -> RouterConfig:
    """A router on free local ports serving each ``name -> (model dir, engine args)`` with the embedded engine."""
    from elastikv.router.router import free_port

    specs = tuple(
        ModelSpec(
            name=name,
            engine="elastikv",
            model=str(path),
            command=None,
            args=tuple(args),
            env=env,
            limit=None,
            idle_s=idle_s,
            sleep_level=1,
            port=free_port(),
            health_path="/health",
            start_timeout_s=start_timeout_s,
        )
        for name, (path, args) in models.items()
    )
    return RouterConfig(host="127.0.0.1", port=free_port(), admin_token=None, models=specs, source=None)


def held_kv(mode: str, names: Sequence[str], share: int) -> Held:
    """What each model holds: in ``static`` mode its share, allocated at start and held throughout (transformers'
    own cache); otherwise what the ledger shows."""

    def held(router: Any) -> dict[str, int]:
        if mode == "static":
            return dict.fromkeys(names, share)
        rows = router.ledger_rows()
        return {name: rows.get(name, 0) for name in names}

    return held


async def replay_through_router(
    config: RouterConfig,
    traces: Sequence[Sequence[Arrival]],
    *,
    log_dir: Path,
    held: Held,
    console: Console,
    label: str,
    between: Callable[[int], None] | None = None,
    after_start: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    stall_s: float | None = None,
) -> tuple[list[Replayed], dict[str, dict[str, Any]]]:
    """Start the router and its engines, replay each trace in turn, stop everything. Returns each trace's
    :class:`Replayed` and every model's final status (wakes, sleeps, restarts). ``between(i)`` runs before trace
    ``i`` is sent (e.g. to print what comes); ``after_start()`` is entered once every engine is up and left before
    they stop (e.g. a device ballast, or limits set in the engines). ``stall_s``: ``workload.replay``'s."""
    from elastikv import ports
    from elastikv.router.router import Router
    from elastikv.router.run import serve

    sock = ports.listen(config.host, config.port, what=f"{label}'s router")
    router = Router(config, log_dir=log_dir)
    logging.getLogger("elastikv").setLevel(logging.WARNING)
    stop, started = asyncio.Event(), asyncio.Event()
    serving = asyncio.create_task(serve(router, sock, stop=stop, started=started))
    names = [m.name for m in config.models]
    out: list[Replayed] = []
    try:
        with console.status(f"{label}: starting {len(names)} engines..."):
            waiter = asyncio.create_task(started.wait())
            await asyncio.wait({serving, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if serving.done():
                serving.result()  # an engine did not start: EngineStartFailed with its log's end
                raise Interrupted(f"{label}: stopped while starting the engines")
        with after_start() if after_start is not None else contextlib.nullcontext():
            for i, trace in enumerate(traces):
                if between is not None:
                    between(i)
                replaying = _replay_one(router, config, list(trace), held, console, label, stall_s)
                out.append(await _until_stopped(replaying, serving))
    finally:
        states = {name: m.status() for name, m in router.models.items()}
        stop.set()
        try:
            await serving
        finally:
            sock.close()
    return out, states


async def _until_stopped(work: Any, serving: asyncio.Task[None]) -> Any:
    """Run ``work`` while the router serves; if the router stops first (a signal), cancel it and raise."""
    task = asyncio.ensure_future(work)
    await asyncio.wait({task, serving}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    serving.result()
    raise Interrupted("stopped by a signal; every engine has been stopped")


async def _replay_one(
    router: Any,
    config: RouterConfig,
    trace: list[Arrival],
    held: Held,
    console: Console,
    label: str,
    stall_s: float | None,
) -> Replayed:
    result = Replayed(outcomes=[])
    before = await engine_metrics.read(router)
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:  # in a thread: the ledger is SQLite
        while not stop.is_set():
            result.samples.append((time.monotonic() - t0, held(router)))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    columns = (TextColumn(f"[bold]{label:>7}[/] replaying"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn())  # fmt: skip
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(label, total=len(trace), note="")
            failed = 0

            def done(o: Outcome) -> None:
                nonlocal failed
                failed += 0 if o.ok else 1
                now = result.samples[-1][1] if result.samples else {}
                note = "  ".join(f"{n}: {format_bytes(b)}" for n, b in now.items())
                progress.update(task, advance=1, note=note + (f"  [red]{failed} failed[/]" if failed else ""))

            result.outcomes = await replay(f"http://{config.host}:{config.port}", trace, on_done=done,
                                           stall_s=stall_s)  # fmt: skip
    finally:
        stop.set()
        sampler.join()
    result.seconds = time.monotonic() - t0
    after = await engine_metrics.read(router)
    result.engine_metrics = engine_metrics.gauges(after)
    result.engine_counts = engine_metrics.counts(before, after)
    return result
