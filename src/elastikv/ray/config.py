"""The cluster config file: a router config (``models``, ``env``) plus a ``cluster:`` section.

``elastikv cluster cluster.yaml`` reads it. Every replica runs its own ``elastikv serve`` over the same models, so
the router part is checked here exactly as ``elastikv serve`` checks it (the same errors, the same lines: the
``cluster:`` section is blanked out before the router's parser reads the text)::

    env:                                 # as in a router config: for every engine of every replica
      ELASTIKV_BOOK_WEIGHTS: "on"
    models:                              # as in a router config; a model without `start` starts `asleep` here
      - {name: llama-a, model: ./models/a, idle: 5m}
      - {name: llama-b, model: ./models/b, start: lazy}
    cluster:
      address: auto                      # Ray's address (auto, ray://host:10001); default: a local Ray of our own
      listen: 0.0.0.0:8000               # the one OpenAI endpoint (Serve's HTTP proxy on the head node)
      min_replicas: 1                    # one replica per GPU: its own `elastikv serve` over every model
      max_replicas: 4
      gpus_per_replica: 1
      max_ongoing_requests: 16           # a replica with this many requests takes no more (Serve's back-pressure)
      scale_up_at: 4                     # requests in flight per replica (mean) above which one more is asked for
      scale_down_at: 1                   # ... below which one fewer
      upscale_delay_s: 5                 # Serve's own delays before it acts on the policy's number
      downscale_delay_s: 30
      stats_period_s: 0.5                # how often each replica's state reaches the request router
      replica_start_timeout_s: 600       # a replica's `elastikv serve` must answer within this
      # Simulation knobs (several "nodes" on one machine; see docs/ray.md): {node} is the Ray node id.
      ledger_dir: /tmp/ekv-ledger/{node}  # ELASTIKV_LEDGER_DIR per replica; real nodes each have their own /dev/shm
      device_budget: 256MiB              # ELASTIKV_DEVICE_BUDGET per replica

The top-level ``listen`` and ``admin_token`` of a router config are refused: the endpoint is ``cluster.listen``,
and each replica's router gets a generated admin token of its own (only its replica talks to it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from elastikv.config import parse_size
from elastikv.errors import ConfigError, ElastikvError
from elastikv.router.config import parse_config

__all__ = ["ClusterConfig", "ClusterSettings", "load_cluster_config", "parse_cluster_config"]

_ROUTER_ONLY = {
    "listen": "the endpoint of a cluster is cluster.listen (each replica's router listens on a port of its own)",
    "admin_token": "each replica's router gets a generated admin token; only its replica talks to it",
}


class ClusterSettings(BaseModel):
    """The ``cluster:`` section, checked; every key has a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = None
    listen: str = "127.0.0.1:8000"
    min_replicas: int = Field(1, ge=1)
    max_replicas: int | None = Field(None, ge=1)  # None: min_replicas (no autoscaling)
    gpus_per_replica: float = Field(1.0, ge=0)
    max_ongoing_requests: int = Field(16, ge=1)
    scale_up_at: float = Field(4.0, gt=0)
    scale_down_at: float = Field(1.0, ge=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    stats_period_s: float = Field(0.5, gt=0)
    replica_start_timeout_s: float = Field(600.0, gt=0)
    ledger_dir: str | None = None
    device_budget: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        port = value.rpartition(":")[2]
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not host:port; write e.g. 0.0.0.0:8000")
        return value

    @field_validator("device_budget")
    @classmethod
    def _budget(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value, what="cluster.device_budget")  # raises ConfigError naming the value
        return value

    @model_validator(mode="after")
    def _bounds(self) -> ClusterSettings:
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} is below min_replicas {self.min_replicas}")
        if self.scale_down_at >= self.scale_up_at:
            raise ValueError(f"scale_down_at {self.scale_down_at} must be below scale_up_at {self.scale_up_at}")
        return self

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0] or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def replicas_max(self) -> int:
        return self.max_replicas or self.min_replicas


@dataclass(frozen=True)
class ClusterConfig:
    """The whole file. ``router`` is the router config every replica writes for its own ``elastikv serve``
    (model paths made absolute, ``start`` defaulting to ``asleep``), less ``listen`` and ``admin_token``, which
    each replica fills in."""

    cluster: ClusterSettings
    router: dict[str, Any]
    models: tuple[str, ...]
    source: Path | None


def load_cluster_config(path: str | Path) -> ClusterConfig:
    source = Path(path)
    if source.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"{source}: a cluster config is YAML (.yaml or .yml)")
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read it: {exc}") from None
    return parse_cluster_config(text, source=source)


def parse_cluster_config(text: str, *, source: Path | None = None) -> ClusterConfig:
    name = "<config>" if source is None else str(source)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: not YAML: {exc}") from None
    keys: dict[str, Any] = {}  # top-level key -> (key node, value node)
    if isinstance(root, yaml.MappingNode):
        keys = {k.value: (k, v) for k, v in root.value if isinstance(k, yaml.ScalarNode)}
    for key, why in _ROUTER_ONLY.items():
        if key in keys:
            raise ConfigError(f"{name}:{keys[key][0].start_mark.line + 1}: {key}: not in a cluster config: {why}")
    router_text, lines = text, text.splitlines(keepends=True)
    cluster_data: Any = None
    if "cluster" in keys:
        key_node, value_node = keys["cluster"]
        first, last = key_node.start_mark.line, value_node.end_mark.line
        if value_node.end_mark.column == 0:  # the mark sits at the start of the line after the section
            last -= 1
        # Blank lines keep every other line where it was, so the router's errors name the right line.
        router_text = "".join(lines[:first] + ["\n"] * (last - first + 1) + lines[last + 1 :])
        cluster_data = yaml.safe_load(yaml.serialize(value_node))
    router_config = parse_config(router_text, fmt="yaml", source=source)  # every router error, file:line
    try:
        settings = ClusterSettings.model_validate(cluster_data or {})
    except ValidationError as exc:
        first_error = exc.errors()[0]
        where = ".".join(str(p) for p in first_error["loc"])
        line = _line_of(keys.get("cluster"), first_error["loc"])
        raise ConfigError(f"{name}:{line}: cluster{'.' + where if where else ''}: {first_error['msg']}") from None
    except ElastikvError as exc:
        raise ConfigError(f"{name}: cluster: {exc}") from None
    data = yaml.safe_load(router_text) or {}
    for entry, spec in zip(data.get("models") or [], router_config.models, strict=True):
        if spec.model is not None:
            entry["model"] = spec.model  # absolute: the replica's config file lives elsewhere
        entry.setdefault("start", "asleep")  # loaded once per replica, then asleep: a wake is what a request pays
    return ClusterConfig(settings, data, tuple(s.name for s in router_config.models), source)


def _line_of(cluster: tuple[Any, Any] | None, loc: tuple[Any, ...]) -> int:
    """The line of the key a validation error names, else the ``cluster:`` line (1 without one)."""
    if cluster is None:
        return 1
    key_node, value_node = cluster
    if loc and isinstance(value_node, yaml.MappingNode):
        for k, _v in value_node.value:
            if k.value == loc[0]:
                return int(k.start_mark.line) + 1
    return int(key_node.start_mark.line) + 1
