"""The `elastikv` command."""

from __future__ import annotations

import logging
import sys

import click

from elastikv import __version__
from elastikv.config import BACKENDS, LAYOUTS, Settings, format_bytes
from elastikv.errors import ElastikvError


def _settings(backend: str | None, layout: str | None) -> Settings:
    settings = Settings.from_env()
    changes = {k: v for k, v in {"backend": backend, "layout": layout}.items() if v is not None}
    return Settings(**{**settings.__dict__, **changes})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="elastikv")
def main() -> None:
    """Elastic, virtual-memory-backed KV caches: several LLM engines, one GPU."""


@main.command()
@click.option("--backend", type=click.Choice(BACKENDS), default=None, help="Memory backend (default: auto).")
@click.option("--layout", type=click.Choice(LAYOUTS), default=None, help="KV layout (default: interleaved).")
@click.option("--steps", default=24, show_default=True, help="Steps of the simulated workload.")
def demo(backend: str | None, layout: str | None, steps: int) -> None:
    """Grow and shrink one elastic KV cache under a burst of requests, printing what it mapped."""
    from elastikv.cache_demo import run_demo

    settings = _settings(backend, layout)
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    run_demo(settings, steps=steps)


@main.command()
@click.option("--backend", type=click.Choice(BACKENDS), default=None)
def info(backend: str | None) -> None:
    """Which memory backend elastikv would use here, and the device's facts."""
    from elastikv.memory import open_backend

    settings = _settings(backend, None)
    be = open_backend(settings.backend, device=settings.device)
    free, total = be.mem_info()
    click.echo(f"backend:     {be.name}")
    click.echo(f"device:      {be.device_label}")
    click.echo(f"device id:   {be.device_id}")
    click.echo(f"granularity: {format_bytes(be.granularity)}")
    click.echo(f"memory:      {format_bytes(free)} free of {format_bytes(total)}")
    be.close()


def run() -> None:
    try:
        main(standalone_mode=True)
    except ElastikvError as exc:
        click.echo(f"elastikv: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
