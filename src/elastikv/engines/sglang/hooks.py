"""SGLang adapter, the patches: which SGLang names are replaced or wrapped (:func:`install`), and the wrappers
of SGLang's configurator and scheduler.

Configurator
    Its ``PagedTokenToKVPoolAllocator`` and ``TokenToKVPoolAllocator`` names build elastikv's allocator
    (``allocator.py``); the allocator it then chose is checked, so a platform or configuration that builds
    another one over an elastic pool is refused instead of handing out pages elastikv never mapped.
Scheduler
    ``Scheduler.on_idle`` trims the radix cache to ``ELASTIKV_PREFIX_CACHE`` and gives spare secured pages back.
    SGLang's strict idle check (``SchedulerInvariantChecker._check_full_pool``) is told about the tokens the limit
    withholds, so it still catches real leaks.
Sleep
    ``/release_memory_occupation`` (the router's sleep for ``engine: sglang``) flushes the cache, which ends in
    the allocator's ``clear()``: every page is freed and the reserve is given back at once (relied on, not
    patched).

Sizing and the KV buffers are patched with the wrappers of ``pools.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from elastikv.engines.patching import Patch
from elastikv.engines.sglang import pools
from elastikv.engines.sglang.allocator import ElasticTokenAllocatorMixin, allocator_class, token_allocator
from elastikv.engines.sglang.targets import MEM_CACHE
from elastikv.errors import UnsupportedEngine

CONFIGURATOR = f"{MEM_CACHE}.kv_cache_configurator"
MEMORY_POOL = f"{MEM_CACHE}.memory_pool"


def install(patch: Patch) -> None:
    """Install every patch of this process's SGLang (each one a name in ``targets.TARGETS``)."""
    patch(CONFIGURATOR, "KVCacheConfigurator._profile_available_bytes", pools.wrap_profile_available_bytes)
    patch(CONFIGURATOR, "PagedTokenToKVPoolAllocator", lambda _orig: allocator_class())
    patch(CONFIGURATOR, "TokenToKVPoolAllocator", lambda _orig: token_allocator)
    patch(CONFIGURATOR, "KVCacheConfigurator._build_token_to_kv_pool_allocator", wrap_build_allocator)
    patch(MEMORY_POOL, "MHATokenToKVPool._create_buffers_normal", pools.wrap_create_buffers_normal)
    patch(MEMORY_POOL, "MLATokenToKVPool._create_buffers", pools.wrap_mla_create_buffers)
    patch("sglang.srt.model_executor.model_runner", "ModelRunner.alloc_memory_pool", pools.wrap_alloc_memory_pool)
    patch("sglang.srt.managers.scheduler", "Scheduler.on_idle", wrap_on_idle)
    patch(
        "sglang.srt.managers.scheduler_components.invariant_checker",
        "SchedulerInvariantChecker._check_full_pool",
        wrap_check_full_pool,
    )


def wrap_build_allocator(original: Callable[..., Any]) -> Callable[..., Any]:
    """``KVCacheConfigurator._build_token_to_kv_pool_allocator``: refuse any allocator but elastikv's over an
    elastic pool."""

    def _build_token_to_kv_pool_allocator(self: Any, **kwargs: Any) -> Any:
        allocator = original(self, **kwargs)
        pool = kwargs.get("token_to_kv_pool")
        if getattr(pool, "_elastikv", None) is not None and not isinstance(allocator, ElasticTokenAllocatorMixin):
            raise UnsupportedEngine(
                f"SGLang chose the allocator {type(allocator).__name__} (a platform or configuration elastikv does "
                "not support), which would hand out pages elastikv never mapped; run without ELASTIKV=1"
            )
        return allocator

    return _build_token_to_kv_pool_allocator


def wrap_on_idle(original: Callable[..., Any]) -> Callable[..., Any]:
    """``Scheduler.on_idle``: the allocator's idle housekeeping, then SGLang's."""

    def on_idle(self: Any) -> Any:
        alloc = getattr(self, "token_to_kv_pool_allocator", None)
        if isinstance(alloc, ElasticTokenAllocatorMixin):
            alloc._tree = getattr(self, "tree_cache", alloc._tree)
            alloc.on_idle(bool(self.is_fully_idle()))
        return original(self)

    return on_idle


def wrap_check_full_pool(original: Callable[..., Any]) -> Callable[..., Any]:
    """``SchedulerInvariantChecker._check_full_pool``: the tokens the limit withholds are not leaked."""

    def _check_full_pool(self: Any, ps: Any, uncached: int = 0) -> Any:
        alloc = getattr(self, "token_to_kv_pool_allocator", None)
        if isinstance(alloc, ElasticTokenAllocatorMixin):
            # Not leaked: withheld by the limit. Measured against the free count SGLang's check itself read, not a
            # fresh one (the background maintainer may have mapped or unmapped a page since).
            seen = getattr(ps, "full_available_size", None)
            uncached += alloc.withheld_tokens(None if seen is None else int(seen))
        return original(self, ps, uncached=uncached)

    return _check_full_pool
