"""The cluster config file (``elastikv.ray.config``), the ranking and the autoscaling policy: no Ray needed.

The router part is checked by the router's own parser with the ``cluster:`` section blanked out, so its errors
keep their lines; the ``cluster:`` section's errors name their line too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("yaml", reason="needs PyYAML: pip install -e '.[serve]'")
pytest.importorskip("pydantic", reason="needs pydantic: pip install -e '.[serve]'")

from elastikv.errors import ConfigError
from elastikv.ray.autoscale import desired_replicas
from elastikv.ray.config import parse_cluster_config
from elastikv.ray.ranking import rank
from elastikv.ray.stats import ModelState, ReplicaStats


def _model(tmp_path: Path) -> Path:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    return tmp_path / "cluster.yaml"


def test_a_cluster_config_gives_every_replica_the_router_part(tmp_path: Path) -> None:
    source = _model(tmp_path)
    text = "env: {ELASTIKV_RESERVE: '0'}\nmodels:\n  - {name: a, model: ./m}\n  - {name: b, model: ./m, start: lazy}\n"
    text += "cluster:\n  min_replicas: 2\n  max_replicas: 4\n  listen: 0.0.0.0:9000\n"
    cfg = parse_cluster_config(text, source=source)
    assert cfg.models == ("a", "b") and cfg.cluster.replicas_max == 4 and cfg.cluster.port == 9000
    assert cfg.router["models"][0] == {"name": "a", "model": str((tmp_path / "m").resolve()), "start": "asleep"}
    assert cfg.router["models"][1]["start"] == "lazy" and "cluster" not in cfg.router


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models:\n  - {name: a, model: ./m, idle: 5x}\ncluster:\n  min_replicas: 1\n", ":2: models[0].idle"),
        ("cluster:\n  min_replicas: 1\n\nmodels:\n  - {name: a, model: ./m, idle: 5x}\n", ":5: models[0].idle"),
        (
            "models:\n  - {name: a, model: ./m}\ncluster:\n  min_replicas: 1\n  max_replica: 2\n",
            ":5: cluster.max_replica",
        ),
        ("models:\n  - {name: a, model: ./m}\ncluster:\n  min_replicas: 3\n  max_replicas: 2\n", "below min_replicas"),
        ("listen: 8000\nmodels:\n  - {name: a, model: ./m}\n", ":1: listen: not in a cluster config"),
        ("models:\n  - {name: a, model: ./m}\ncluster:\n  listen: nowhere\n", ":4: cluster.listen"),
    ],
)
def test_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_cluster_config(text, source=_model(tmp_path))


def _stats(free: int | None, **models: str) -> ReplicaStats:
    return ReplicaStats(True, "n", {m: ModelState(s) for m, s in models.items()}, 0, free_bytes=free)


def test_ranking_awake_then_asleep_by_free_memory_then_the_rest() -> None:
    replicas = [("x", _stats(10, a="asleep")), ("y", _stats(None, a="asleep")), ("z", _stats(50, a="asleep")),
                ("w", _stats(0, a="awake")), ("v", _stats(5, a="awake")), ("down", ReplicaStats())]  # fmt: skip
    assert rank("a", replicas) == [["w", "v"], ["z"], ["x"], ["y"], ["down"]]
    assert rank("unknown", replicas) == [["x", "y", "z", "w", "v", "down"]]  # its replica's router answers 404
    assert rank(None, replicas) == [["x", "y", "z", "w", "v", "down"]]


def test_the_policy_scales_on_load_and_only_down_with_a_cold_replica() -> None:
    busy = {"r1": {"in_flight": 6.0, "awake_models": 1.0}, "r2": {"in_flight": 4.0, "awake_models": 1.0}}
    assert desired_replicas(2, busy, scale_up_at=4, scale_down_at=1) == 3
    warm = {"r1": {"in_flight": 0.0, "awake_models": 1.0}, "r2": {"in_flight": 0.0, "awake_models": 2.0}}
    assert desired_replicas(2, warm, scale_up_at=4, scale_down_at=1) == 2  # idle but nothing cold: keep
    cold = {**warm, "r3": {"in_flight": 0.0, "awake_models": 0.0}}
    assert desired_replicas(3, cold, scale_up_at=4, scale_down_at=1) == 2
    # A replica still starting reports nothing: it is neither busy nor cold, and a scale-up under way is kept.
    assert desired_replicas(2, {**warm, "new": {"running_requests": 0.0}}, target=3, scale_up_at=4,
                            scale_down_at=1) == 3  # fmt: skip
    # Requests queued at the handles (every replica full) count as load.
    assert desired_replicas(2, warm, queued_total=12, scale_up_at=4, scale_down_at=1) == 3
