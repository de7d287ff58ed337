"""``elastikv cluster CONFIG``: the models of a cluster config served over a Ray cluster, until Ctrl-C or SIGTERM.

Imports nothing of Ray (nor of the serving extras) until it runs, so ``elastikv --help`` works without them;
without Ray it says to ``pip install 'elastikv[ray]'``.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import replace

import click


@click.command(name="cluster")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--address", default=None, help="Ray's address, over cluster.address: auto (a running local Ray) or "
              "ray://HOST:10001. Default: a Ray of our own on this machine.")  # fmt: skip
def cluster(config: str, address: str | None) -> None:
    """Serve every model in CONFIG over a Ray cluster behind one OpenAI-compatible endpoint: one engine replica per
    GPU, each running its own `elastikv serve` (sleep, wake, room for a wake); requests go where their model is
    awake, else where it wakes with the most memory free; replicas scale between min and max (docs/ray.md).
    Ctrl-C or SIGTERM deletes the application (every replica stops its engines) and leaves Ray.
    """
    from elastikv.ray import require_ray

    require_ray()
    import ray

    from elastikv.ray import deploy
    from elastikv.ray.config import load_cluster_config

    cfg = load_cluster_config(config)
    if address is not None:
        cfg = replace(cfg, cluster=cfg.cluster.model_copy(update={"address": address}))
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM,)}
    t0 = time.monotonic()
    try:
        url = deploy.start(cfg)
        click.echo(f"elastikv cluster: serving {', '.join(cfg.models)} on {url}/v1 "
                   f"(up in {time.monotonic() - t0:.1f} s); Ctrl-C stops it")  # fmt: skip
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("elastikv cluster: stopping every replica")
        try:
            deploy.stop()
        finally:
            ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
