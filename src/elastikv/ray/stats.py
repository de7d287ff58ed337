"""What a replica publishes about itself, and the two shapes Serve carries it in.

A replica's state comes from its own ``elastikv serve`` (``GET /admin/status``, polled in the background, never on
a request's path) and from the replica's own count of the requests it is relaying. Serve carries it twice:

- ``record_routing_stats()`` -> any JSON-able dict -> ``RunningReplica.routing_stats`` in every request router
  (``as_routing``/``from_routing``: the request router ranks replicas with it);
- ``record_autoscaling_stats()`` -> a flat ``{name: number}`` -> ``AutoscalingContext.aggregated_metrics``
  (``as_autoscaling``: the autoscaling policy reads it).

Memory figures may be unknown (``None``): the router's status gained its ``device`` key after this layer was
written, and an older router, or a replica whose router has not answered yet, has none. Unknown free memory ranks
below any known figure; it is never read as zero or as "all free".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

AWAKE = "awake"
# States from which a request can be served after a wake or a start (router/states.py's values).
WAKEABLE = frozenset({"asleep", "stopped", "sleeping", "waking", "starting"})


@dataclass(frozen=True)
class ModelState:
    state: str
    active: int = 0  # requests at the engine now (the child router's count)
    kv_mapped_bytes: int = 0


@dataclass(frozen=True)
class ReplicaStats:
    """One replica's state at one moment. ``up``: its ``elastikv serve`` answered the last poll."""

    up: bool = False
    node_id: str = ""
    models: dict[str, ModelState] = field(default_factory=dict)
    in_flight: int = 0  # requests this replica is relaying now (every model)
    budget_bytes: int | None = None
    held_bytes: int | None = None
    free_bytes: int | None = None
    at: float = 0.0  # time.time() of the poll

    @classmethod
    def from_status(
        cls, status: dict[str, Any], *, node_id: str, in_flight: int, at: float, device: dict[str, Any] | None = None
    ) -> ReplicaStats:
        """From the router's ``/admin/status`` body. ``device``: the ledger's figures where the body has none."""
        models = {}
        for row in status.get("models") or []:
            if isinstance(row, dict) and isinstance(row.get("model"), str):
                models[row["model"]] = ModelState(
                    str(row.get("state", "unknown")), _int(row.get("active")) or 0,
                    _int(row.get("kv_mapped_bytes")) or 0,
                )  # fmt: skip
        dev = status.get("device") if isinstance(status.get("device"), dict) else device
        dev = dev or {}
        return cls(True, node_id, models, in_flight, _int(dev.get("budget_bytes")), _int(dev.get("held_bytes")),
                   _int(dev.get("free_bytes")), at)  # fmt: skip

    def as_routing(self) -> dict[str, Any]:
        return {
            "up": self.up, "node_id": self.node_id, "in_flight": self.in_flight,
            "models": {n: {"state": m.state, "active": m.active, "kv_mapped_bytes": m.kv_mapped_bytes}
                       for n, m in self.models.items()},
            "budget_bytes": self.budget_bytes, "held_bytes": self.held_bytes, "free_bytes": self.free_bytes,
            "at": self.at,
        }  # fmt: skip

    @classmethod
    def from_routing(cls, stats: dict[str, Any] | None) -> ReplicaStats:
        """Back from ``routing_stats`` (``{}`` before the replica's first report: nothing known, not up)."""
        if not stats:
            return cls()
        models = {
            n: ModelState(
                str(m.get("state", "unknown")), _int(m.get("active")) or 0, _int(m.get("kv_mapped_bytes")) or 0
            )
            for n, m in (stats.get("models") or {}).items()
            if isinstance(m, dict)
        }
        return cls(bool(stats.get("up")), str(stats.get("node_id", "")), models, _int(stats.get("in_flight")) or 0,
                   _int(stats.get("budget_bytes")), _int(stats.get("held_bytes")), _int(stats.get("free_bytes")),
                   float(stats.get("at") or 0.0))  # fmt: skip

    def as_autoscaling(self) -> dict[str, float]:
        """Numbers only (Serve drops the whole report otherwise); unknown memory is left out, not zero."""
        out = {
            "in_flight": float(self.in_flight),
            "awake_models": float(sum(1 for m in self.models.values() if m.state == AWAKE)),
            "kv_mapped_bytes": float(sum(m.kv_mapped_bytes for m in self.models.values())),
        }
        if self.free_bytes is not None:
            out["free_bytes"] = float(self.free_bytes)
        return out

    def state_of(self, model: str) -> str | None:
        m = self.models.get(model)
        return None if m is None else m.state


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
