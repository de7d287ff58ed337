"""The Serve request router of the engine replicas: a request goes where its model is awake, else where it wakes best.

Serve runs one instance of ``ModelAwareRouter`` (:func:`model_aware_router`) inside every handle to the
``EngineReplica`` deployment (the ingress holds one). For each request it calls :func:`choose_replicas`; the
ranking itself is :func:`elastikv.ray.ranking.rank`'s, over each replica's ``routing_stats`` (what the replica's
``record_routing_stats`` returned, at most ``cluster.stats_period_s`` old).

The model comes from the request's first positional argument: the ingress calls
``handle.relay.remote(model, method, path, body)``, so ``PendingRequest.args[0]`` is the body's ``model`` (or
None), read once at the ingress instead of parsing the body again here.

Why no ``FIFOMixin``: it hands a replica found for one request to the *oldest* pending request, which may be for
another model; the base class's default (the replica goes to the request it was chosen for) is what routing by
model needs. No ``LocalityMixin`` either: the model's whereabouts matter more than the ingress's node.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from elastikv.ray.ranking import rank
from elastikv.ray.stats import ReplicaStats

if TYPE_CHECKING:
    from ray.serve.request_router import PendingRequest, RunningReplica


def model_of(pending_request: PendingRequest | None) -> str | None:
    """The model a pending ``relay`` call is for (its first argument), None when it names none."""
    if pending_request is None or not pending_request.args:
        return None
    first: Any = pending_request.args[0]
    return first if isinstance(first, str) else None


async def choose_replicas(
    _router: Any, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
) -> list[list[RunningReplica]]:
    """``RequestRouter.choose_replicas``: the ranks of :func:`~elastikv.ray.ranking.rank` as Serve's replicas."""
    by_id = {r.replica_id: r for r in candidate_replicas}
    stats = [(r.replica_id, ReplicaStats.from_routing(r.routing_stats)) for r in candidate_replicas]
    if pending_request is not None:
        # Every rank is given at once: once they are all tried (all full), Serve should back off before the
        # next round rather than spin (the base class loops at once unless told to back off).
        pending_request.routing_context.should_backoff = True
    return [[by_id[i] for i in group] for group in rank(model_of(pending_request), stats)]


@functools.cache
def model_aware_router() -> type:
    """The request router class, made on first use so that this module imports without Ray (scripts/check-imports
    imports every module in an environment without it). Serve pickles the class by value with cloudpickle."""
    from ray.serve.request_router import RequestRouter

    return type("ModelAwareRouter", (RequestRouter,), {"choose_replicas": choose_replicas,
                                                       "__module__": __name__, "__doc__": __doc__})  # fmt: skip


def __getattr__(name: str) -> Any:
    """``elastikv.ray.routing.ModelAwareRouter``: Serve finds the class by its module and name (PEP 562)."""
    if name == "ModelAwareRouter":
        return model_aware_router()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
