"""The engine adapters by engine name: what each one patches or calls in a given release.

The contract check (``elastikv check-contract ENGINE [DIR]``, ``contract.py``) gets the tables from here, so
``contract.py`` itself names no adapter, and no adapter imports ``contract.py``: the adapters depend only on
``patching.py``. The adapters are imported when asked for, not before (neither needs its engine to import).
"""

from __future__ import annotations

from elastikv.engines.patching import Target

ENGINES: tuple[str, ...] = ("vllm", "sglang")


def targets_of(engine: str, release: tuple[int, ...] | None = None) -> tuple[Target, ...]:
    """Every name ``engine``'s adapter patches or calls in ``release`` (vLLM's targets depend on its release,
    which must be given; SGLang's adapter supports one release). ``SystemExit`` naming the engines otherwise."""
    if engine == "vllm":
        from elastikv.engines import vllm

        if release is None:
            raise SystemExit("which vLLM release? its targets depend on it")
        return vllm.targets_for(release)
    if engine == "sglang":
        from elastikv.engines.sglang import TARGETS as SGLANG_TARGETS

        return SGLANG_TARGETS
    raise SystemExit(f"unknown engine {engine!r}: {' or '.join(ENGINES)}")
