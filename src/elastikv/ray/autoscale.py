"""How many engine replicas (GPUs) the cluster wants: the autoscaling policy, called ~10 times a second.

Serve feeds it each replica's ``record_autoscaling_stats()`` (:meth:`ReplicaStats.as_autoscaling`: requests in
flight, awake models, KV mapped, free memory), averaged over ``look_back_period_s``, and its own count of requests
running and queued at the handles. The policy returns a replica count; Serve then clamps it to
``[min_replicas, max_replicas]`` and acts on it only after the change was wanted for ``upscale_delay_s`` /
``downscale_delay_s``.

- **Up** by one (over the running replicas) when the requests per running replica (the larger of the replicas'
  own count and Serve's, which includes requests queued at the handle because every replica was full) pass
  ``scale_up_at``.
- **Down** by one when they are below ``scale_down_at`` *and* some replica is cold: nothing in flight and no
  model awake (its models went to sleep after their ``idle`` time), so the GPU it would give back holds nothing
  worth keeping. Serve, not this policy, picks which replica stops (replicas not yet running first, then those
  off the head node, on the nodes with the fewest replicas, newest first): the policy returns only a count and
  cannot name the cold one, so a replica with awake models may stop instead; see docs/ray.md, "Limits".
- Otherwise, the count Serve is already moving to (keeping a replica that is starting).

It must not block: it reads only what it is given (no I/O, no Ray calls) and is O(replicas).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def desired_replicas(
    running: int,
    per_replica: Mapping[Any, Mapping[str, float]],
    *,
    target: int | None = None,
    queued_total: float = 0.0,
    scale_up_at: float,
    scale_down_at: float,
) -> int:
    """The count wanted, from each running replica's stats (``in_flight``, ``awake_models``; a replica without
    them, one just started, counts as neither busy nor cold) and Serve's total of requests (running and queued).

    ``target`` is the count Serve is already moving to (None: ``running``). A decision already taken is kept while
    the load is neither hot nor cool: answering ``running`` while a new replica starts would cancel its start.
    Not clamped to min/max: Serve does that."""
    target = running if target is None else target
    if running <= 0:
        return max(target, 1)  # cold start (Serve handles it before calling us; kept for direct use)
    ours = {r: s for r, s in per_replica.items() if "awake_models" in s}
    in_flight = sum(s.get("in_flight", 0.0) for s in ours.values())
    load = max(in_flight, queued_total) / running
    if load > scale_up_at:
        return max(target, running + 1)
    cold = [r for r, s in ours.items() if s.get("in_flight", 0.0) < 0.5 and s["awake_models"] < 0.5]
    if load < scale_down_at and cold and running > 1:
        return min(target, running - 1)
    return target


class ElastikvScaling:
    """Serve's class-callable policy: made once by the controller with ``policy_kwargs``, called every tick."""

    def __init__(self, scale_up_at: float = 4.0, scale_down_at: float = 1.0) -> None:
        self.scale_up_at = scale_up_at
        self.scale_down_at = scale_down_at

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """``ctx``: Serve's ``AutoscalingContext``. Returns (replicas wanted, the policy's state: what it saw)."""
        metrics: Mapping[str, Mapping[Any, float]] = ctx.aggregated_metrics or {}
        per_replica: dict[Any, dict[str, float]] = {}
        for name, values in metrics.items():
            for replica, value in values.items():
                per_replica.setdefault(replica, {})[name] = float(value)
        try:
            queued = float(ctx.total_num_requests)
        except (TypeError, ValueError):
            queued = 0.0
        want = desired_replicas(ctx.current_num_replicas, per_replica, target=ctx.target_num_replicas,
                                queued_total=queued,
                                scale_up_at=self.scale_up_at, scale_down_at=self.scale_down_at)  # fmt: skip
        seen = {
            "in_flight": sum(s.get("in_flight", 0.0) for s in per_replica.values()),
            "awake_models": sum(s.get("awake_models", 0.0) for s in per_replica.values()),
            "kv_mapped_bytes": sum(s.get("kv_mapped_bytes", 0.0) for s in per_replica.values()),
            "requests": queued,
        }
        return want, {"elastikv": seen}
