"""The Serve application of a cluster config, and starting it on a Ray cluster.

Two deployments: ``engines`` (:class:`~elastikv.ray.replica.EngineReplica`, one replica per ``gpus_per_replica``
GPUs, routed by :class:`~elastikv.ray.routing.ModelAwareRouter`, scaled by
:class:`~elastikv.ray.autoscale.ElastikvScaling` between ``min_replicas`` and ``max_replicas``) and ``endpoint``
(:class:`~elastikv.ray.ingress.Endpoint`, the HTTP ingress, no GPU). Serve's HTTP proxy runs on the head node
only (``proxy_location="HeadOnly"``), the ingress beside it: one address for the whole cluster, which a lost worker
node does not take down.

Who owns what: Ray owns the processes of replicas (placement, restarts, stopping them); each replica owns its own
``elastikv serve``. :func:`start` connects to (or starts) Ray and deploys; :func:`stop` deletes the application,
which stops every replica gracefully (each stops its child router, whose engines clear their ledger rows).
"""

from __future__ import annotations

import logging
from typing import Any

from elastikv.ray import require_ray
from elastikv.ray.config import ClusterConfig

log = logging.getLogger("elastikv.ray")

APP = "elastikv"
HEAD = "node:__internal_head__"  # a resource only the head node has
# How often replicas push their autoscaling figures, and handles theirs (Serve's defaults: 10 s, too slow to
# follow a burst); read by Serve at import in each worker, hence the deployments' runtime_env.
PUSH_ENV = (
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
)


def build_app(config: ClusterConfig) -> Any:
    """The Serve application (``serve.run`` takes it). Imports Ray."""
    require_ray()
    from ray import serve
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

    from elastikv.ray.autoscale import ElastikvScaling
    from elastikv.ray.ingress import Endpoint
    from elastikv.ray.replica import EngineReplica
    from elastikv.ray.routing import model_aware_router

    s = config.cluster
    env = {"env_vars": {k: str(s.stats_period_s) for k in PUSH_ENV}}
    scaling: dict[str, Any] = {"num_replicas": s.min_replicas}
    if s.replicas_max > s.min_replicas:
        scaling = {"autoscaling_config": AutoscalingConfig(
            min_replicas=s.min_replicas, max_replicas=s.replicas_max, initial_replicas=s.min_replicas,
            upscale_delay_s=s.upscale_delay_s, downscale_delay_s=s.downscale_delay_s,
            look_back_period_s=max(1.0, 4 * s.stats_period_s), metrics_interval_s=s.stats_period_s,
            policy=AutoscalingPolicy(policy_function=ElastikvScaling,
                                     policy_kwargs={"scale_up_at": s.scale_up_at, "scale_down_at": s.scale_down_at}),
        )}  # fmt: skip
    engines = serve.deployment(EngineReplica).options(
        name="engines",
        ray_actor_options={"num_gpus": s.gpus_per_replica, "runtime_env": env},
        max_ongoing_requests=s.max_ongoing_requests,
        request_router_config=RequestRouterConfig(
            request_router_class=model_aware_router(),
            request_routing_stats_period_s=s.stats_period_s,
            request_routing_stats_timeout_s=max(5.0, 4 * s.stats_period_s),
        ),
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        # The child router stops its engines on SIGTERM (SIGKILL after 15 s): give it that long.
        graceful_shutdown_timeout_s=30.0,
        **scaling,
    )
    # On the head node, beside Serve's proxy and controller (the same resource Serve pins its controller with):
    # a lost worker node must not take the endpoint with it.
    endpoint = serve.deployment(Endpoint).options(
        name="endpoint", max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0, "resources": {HEAD: 0.001}, "runtime_env": env},
    )  # fmt: skip
    return endpoint.bind(engines.bind(config.router, s.model_dump()), list(config.models))


def start(config: ClusterConfig) -> str:
    """Connect to Ray (``cluster.address``; None: a local Ray of our own, or the one this process already
    joined), start Serve's proxy on ``cluster.listen`` and deploy; returns the endpoint's URL once every replica
    answers (its ``elastikv serve`` is up)."""
    require_ray()
    import ray
    from ray import serve

    from elastikv.errors import ConfigError

    s = config.cluster
    if not ray.is_initialized():
        ray.init(address=s.address, logging_level=logging.WARNING)
    # Serve would wait for GPUs that never come (the replicas stay pending, serve.run never returns): say so now.
    gpus, needed = ray.cluster_resources().get("GPU", 0), s.min_replicas * s.gpus_per_replica
    if gpus < needed:
        where = f"the Ray cluster at {s.address}" if s.address else "this machine's Ray"
        raise ConfigError(
            f"{where} has {gpus:g} GPU(s); min_replicas {s.min_replicas} x gpus_per_replica {s.gpus_per_replica:g} "
            f"needs {needed:g}: start Ray on more GPU nodes (or lower cluster.min_replicas; gpus_per_replica: 0 runs "
            "replicas on CPUs)"
        )
    serve.start(proxy_location="HeadOnly", http_options={"host": s.host, "port": s.port})
    serve.run(build_app(config), name=APP, route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if s.host in ('0.0.0.0', '::') else s.host}:{s.port}"
    log.info("serving %s on %s/v1 over %d-%d replica(s)", ", ".join(config.models), url, s.min_replicas,
             s.replicas_max)  # fmt: skip
    return url


def stop() -> None:
    """Delete the application (every replica stops its ``elastikv serve`` gracefully), then Serve."""
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    if not ray.is_initialized():
        return
    try:
        serve.delete(APP)
    except RayServeException:  # Serve never started (a start that failed early): nothing to delete
        return
    serve.shutdown()


def replica_stats() -> list[dict[str, Any]]:
    """Every engine replica's state now (what it reports to the request router), for status and tests; one still
    starting (or not answering) as ``{"up": False, "node_id": "", ...}``.

    Serve names its replica actors ``SERVE_REPLICA::<app>#<deployment>#<id>`` in the ``serve`` namespace and calls
    ``record_routing_stats`` on them itself; this asks each the same. A replica that does not answer is left out.
    """
    import ray

    out = []
    prefix = f"SERVE_REPLICA::{APP}#engines#"
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != "serve" or not str(entry.get("name", "")).startswith(prefix):
            continue
        replica = entry["name"].rpartition("#")[2]
        try:
            actor = ray.get_actor(entry["name"], namespace="serve")
            stats = ray.get(actor.record_routing_stats.remote(), timeout=10)
        except (ray.exceptions.RayError, ValueError):  # still starting (its constructor runs), or gone
            stats = {}
        out.append({"up": False, "node_id": "", "models": {}, "in_flight": 0, **stats, "replica": replica})
    return out
