"""elastikv over a Ray cluster (``elastikv cluster``): Ray Serve places one engine replica per GPU and routes each
request to a replica; elastikv, inside each replica, decides what the GPU holds (docs/ray.md).

The modules, one concept each: ``config`` (the cluster file), ``stats`` (what a replica publishes), ``child`` (a
replica's own ``elastikv serve``), ``replica`` (the Serve deployment per GPU), ``ranking`` and ``routing`` (which
replica a request goes to), ``autoscale`` (how many replicas), ``ingress`` (the one OpenAI endpoint), ``deploy``
(the application, started on a Ray cluster) and ``command`` (the CLI). Ray is imported only by the modules that
need it, and only once a cluster is asked for: :func:`require_ray` says how to install it when it is missing.
"""

from __future__ import annotations

from elastikv.errors import ElastikvError

RAY_VERSION = "2.60.0"  # what pyproject's `ray` extra pins and the tests ran


def require_ray() -> None:
    """Raise a clear error if Ray Serve cannot be imported."""
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise ElastikvError(
            f"elastikv cluster needs Ray Serve ({exc}); install it with: pip install 'elastikv[ray]' "
            f"(ray[serve]=={RAY_VERSION})"
        ) from None
