from __future__ import annotations

import pytest

from elastikv.config import Settings, Size, format_bytes, parse_size
from elastikv.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("8GiB", 8 * 1024**3),
        ("512MiB", 512 * 1024**2),
        ("1.5GB", 1_500_000_000),
        ("4096", 4096),
        ("2 g", 2 * 1024**3),
        (" 64kib ", 65536),
        (1024, 1024),
        ("0", 0),
    ],
)
def test_sizes(text: str | int, nbytes: int) -> None:
    assert parse_size(text).nbytes == nbytes


def test_percent_resolves_against_the_device() -> None:
    size = parse_size("40%")
    assert size == Size(fraction=0.4)
    assert size.resolve(1000) == 400
    assert str(size) == "40%"


@pytest.mark.parametrize("text", ["", "abc", "-1GiB", "8 parsecs", "150%", "1e400", "GiB", "nan", True, None, 2.5])
def test_bad_sizes_name_the_problem_and_the_fix(text: object) -> None:
    with pytest.raises(ConfigError, match=r"limit: .*(size|percent|unit|100%)"):
        parse_size(text, what="limit")  # type: ignore[arg-type]


def test_zero_and_percent_can_be_refused() -> None:
    with pytest.raises(ConfigError, match="more than zero"):
        parse_size("0", allow_zero=False)
    with pytest.raises(ConfigError, match="absolute size"):
        parse_size("10%", allow_percent=False)


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(20 * 1024**3) == "20 GiB"


def test_settings_defaults_and_parsing() -> None:
    assert Settings.from_env({}) == Settings()
    s = Settings.from_env(
        {
            "ELASTIKV": "1",
            "ELASTIKV_LIMIT": "40%",
            "ELASTIKV_LAYOUT": "per-layer",
            "ELASTIKV_BACKEND": "host",
            "ELASTIKV_RESERVE": "0",
            "ELASTIKV_DEVICE": "1",
            "ELASTIKV_CHUNK": "32MiB",
        }
    )
    assert s.enabled and s.limit == Size(fraction=0.4) and s.layout == "per-layer"
    assert s.backend == "host" and s.reserve.nbytes == 0 and s.device == 1 and s.chunk == Size(nbytes=32 * 1024**2)


def test_the_pin_budget_is_a_size_or_a_percent_of_host_memory() -> None:
    assert Settings().pin_budget == Size(fraction=0.5)  # default: half the host's physical memory, per engine
    assert Settings.from_env({"ELASTIKV_PIN_BUDGET": "64GiB"}).pin_budget == Size(nbytes=64 * 1024**3)
    assert Settings.from_env({"ELASTIKV_PIN_BUDGET": "25%"}).pin_budget == Size(fraction=0.25)
    assert Settings.from_env({"ELASTIKV_PIN_BUDGET": "0"}).pin_budget == Size(nbytes=0)  # never pin
    with pytest.raises(ConfigError, match="ELASTIKV_PIN_BUDGET: 'much' is not a size"):
        Settings.from_env({"ELASTIKV_PIN_BUDGET": "much"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ELASTIKV_LIMTI": "1GiB"}, "did you mean ELASTIKV_LIMIT"),
        ({"ELASTIKV_LIMIT": "0"}, "more than zero"),
        ({"ELASTIKV_LIMIT": "lots"}, "not a size"),
        ({"ELASTIKV_LAYOUT": "diagonal"}, "not one of interleaved, per-layer"),
        ({"ELASTIKV_BACKEND": "tpu"}, "not one of auto, cuda, host"),
        ({"ELASTIKV": "maybe"}, "write 1 or 0"),
        ({"ELASTIKV_DEVICE": "-1"}, "negative"),
        ({"ELASTIKV_CHUNK": "10%"}, "absolute size"),
    ],
)
def test_bad_settings_are_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)
