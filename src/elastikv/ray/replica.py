"""The engine replica: one per GPU, running that GPU's own ``elastikv serve`` and relaying requests to it.

Serve places each replica on a node with ``gpus_per_replica`` free GPUs (``ray_actor_options``), restarts it when
its health check fails, and stops it when the deployment shrinks or shuts down. What happens on the GPU is
elastikv's: the replica's :class:`~elastikv.ray.child.ChildRouter` runs ``elastikv serve`` over every configured
model (started ``asleep`` unless the config says otherwise), which puts idle models to sleep, wakes them on
demand and makes room before a wake, within the GPU's budget.

Who owns what: the replica owns its child router (stopped in ``__del__``, which Serve calls on a graceful stop;
on a lost node or a killed worker the child dies with the process through ``PR_SET_PDEATHSIG``), its work
directory (the child's config, its log and its engines' logs; removed on a graceful stop), and one HTTP client.

:meth:`relay` streams the child's answer back through Serve: first a head (status, content type, which node and
replica), then the body's bytes as they arrive, unchanged. A child that does not answer gives a 503 with
OpenAI's error body; a child that stops mid-answer ends the stream with an SSE error event (as the router does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from elastikv.ray.child import ChildRouter
from elastikv.ray.config import ClusterSettings

log = logging.getLogger("elastikv.ray")

Head = dict[str, Any]  # {"status": int, "content_type": str, "node_id": str, "replica": str}


def error_body(message: str, *, code: str = "engine_unavailable") -> bytes:
    return json.dumps({"error": {"message": message, "type": "service_unavailable", "param": None,
                                 "code": code}}).encode()  # fmt: skip


class EngineReplica:
    def __init__(self, router: dict[str, Any], settings: dict[str, Any]) -> None:
        import ray  # here, not at the top: every module of elastikv imports without Ray (scripts/check-imports)
        from ray import serve

        s = ClusterSettings.model_validate(settings)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.replica = serve.get_replica_context().replica_id.unique_id
        env = dict(router.get("env") or {})
        # Simulation knobs: on one machine every "node" needs its own ledger (a real node has its own /dev/shm)
        # and its own budget. In the router's env, so that the child router reads the same ledger its engines use.
        if s.ledger_dir:
            ledger_dir = s.ledger_dir.format(node=self.node_id, replica=self.replica)
            env["ELASTIKV_LEDGER_DIR"] = ledger_dir
        if s.device_budget:
            env["ELASTIKV_DEVICE_BUDGET"] = s.device_budget
        self.work_dir = Path(tempfile.mkdtemp(prefix=f"elastikv-replica-{self.replica}-"))
        self.active: Counter[str] = Counter()  # requests being relayed now, by model ("" for none)
        self.child = ChildRouter(
            {**router, "env": env} if env else router, self.work_dir, ledger_dir=env.get("ELASTIKV_LEDGER_DIR"),
            node_id=self.node_id, poll_s=min(0.25, s.stats_period_s / 2), in_flight=self.in_flight,
        )  # fmt: skip
        log.info("replica %s on node %s: starting elastikv serve (%s)", self.replica, self.node_id, self.work_dir)
        self.child.start(s.replica_start_timeout_s)
        # No read timeout: a generation may stream for minutes; connecting must be quick (the child is local).
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))

    def in_flight(self) -> int:
        return sum(self.active.values())

    async def relay(self, model: str | None, method: str, path: str, body: bytes) -> AsyncIterator[Head | bytes]:
        """Relay one OpenAI request to this replica's router. ``model`` is there for the request router (it reads
        the first argument); the body goes on unchanged. Yields the head, then the body's chunks."""
        head: Head = {"node_id": self.node_id, "replica": self.replica}
        self.active[model or ""] += 1
        try:
            try:
                upstream = await self.client.send(
                    self.client.build_request(
                        method, self.child.url + path, content=body, headers={"content-type": "application/json"}
                    ),
                    stream=True,
                )
            except httpx.HTTPError as exc:
                yield {**head, "status": 503, "content_type": "application/json"}
                yield error_body(self._down(exc))
                return
            try:
                yield {**head, "status": upstream.status_code,
                       "content_type": upstream.headers.get("content-type", "application/json")}  # fmt: skip
                try:
                    async for chunk in upstream.aiter_raw():
                        yield chunk
                except httpx.HTTPError as exc:
                    event = {"error": {"message": self._down(exc), "type": "engine_unavailable"}}
                    yield f"data: {json.dumps(event)}\n\n".encode()
            finally:
                await upstream.aclose()
        finally:
            self.active[model or ""] -= 1
            self.child.poke()  # the model's state may have changed (woken for this request): report it soon

    def _down(self, exc: Exception) -> str:
        where = f"replica {self.replica} on node {self.node_id}"
        if not self.child.alive():
            return f"{where}: its elastikv serve exited; Serve restarts the replica (log: {self.child.log_path})"
        return f"{where}: its elastikv serve did not answer ({type(exc).__name__}: {exc}); retry shortly"

    # -- what Serve asks -------------------------------------------------------------------------------------------
    def record_routing_stats(self) -> dict[str, Any]:
        return dataclasses.replace(self.child.stats, in_flight=self.in_flight()).as_routing()

    def record_autoscaling_stats(self) -> dict[str, float]:
        return dataclasses.replace(self.child.stats, in_flight=self.in_flight()).as_autoscaling()

    def check_health(self) -> None:
        """Failing this makes Serve replace the replica: the child router is gone (its engines with it)."""
        if not self.child.alive() and not self.child.stopping:
            raise RuntimeError(f"replica {self.replica}: its elastikv serve exited:\n{self.child.log_tail(20)}")

    def stats(self) -> dict[str, Any]:
        """This replica's state now (for tests and ``elastikv cluster`` status)."""
        return self.record_routing_stats() | {"replica": self.replica}

    def __del__(self) -> None:
        child = getattr(self, "child", None)
        if child is not None:
            child.stop()
        with contextlib.suppress(OSError, AttributeError):
            shutil.rmtree(self.work_dir)
