"""Running the router: its port first, then every engine, then the HTTP server; stopped at any moment.

The order matters to a user. The router's own port is bound before anything starts (a port in use fails at once,
naming the process that holds it, instead of after every engine has loaded). Engines then start with Ctrl-C and
SIGTERM live: either cancels the start and stops what has started (uvicorn's own handlers would wait for the
start to finish, minutes for a large model). Only once every engine answers does the server take requests. A
second Ctrl-C kills the engines' process groups at once instead of waiting for them to stop.

``serve`` is what ``elastikv serve``, ``elastikv demo`` and the benchmarks run; the engines' process groups die
with this process however it ends (``elastikv.children``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Generator
from typing import Any

import uvicorn

from elastikv.router.app import create_app
from elastikv.router.router import Router

log = logging.getLogger("elastikv.router")


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: ``serve`` handles SIGINT and SIGTERM itself, also while starting."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve(
    router: Router,
    sock: socket.socket,
    *,
    stop: asyncio.Event | None = None,
    started: asyncio.Event | None = None,
    **uvicorn_options: Any,
) -> None:
    """Start every engine, serve on ``sock`` until SIGINT/SIGTERM (main thread) or ``stop`` is set, then stop
    every engine. ``started`` is set once requests are served. Raises what ``Router.start`` raises (a port in use,
    an engine that did not come up), after stopping everything."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    hits = 0

    def on_signal() -> None:
        nonlocal hits
        hits += 1
        if hits == 1:
            log.warning("stopping every engine (Ctrl-C again to kill them at once)")
            stop.set()
        else:
            router.kill_now()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    config = uvicorn.Config(create_app(router, manage_lifetime=False), lifespan="on", log_level="warning",
                            timeout_graceful_shutdown=5, **uvicorn_options)  # fmt: skip
    server = _Server(config)
    try:
        if not await _unless_stopped(router.start(), stop):
            return
        serving = loop.create_task(server.serve(sockets=[sock]))
        waiter = loop.create_task(stop.wait())
        while not server.started and not serving.done() and not stop.is_set():
            await asyncio.sleep(0.02)
        if server.started and started is not None:
            started.set()
        await asyncio.wait({serving, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        server.should_exit = True
        await serving
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        stopping = asyncio.ensure_future(router.stop())
        try:
            await asyncio.shield(stopping)
        except asyncio.CancelledError:  # the caller gave up on us: the engines still go first
            await stopping
            raise


async def _unless_stopped(start: Any, stop: asyncio.Event) -> bool:
    """Run ``start`` unless ``stop`` is set first (then cancel it). True if it finished."""
    loop = asyncio.get_running_loop()
    task, waiter = loop.create_task(start), loop.create_task(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        task.result()  # raises what the start raised
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False
