"""transformers adapter: continuous batching's paged KV cache over elastikv (transformers 5.17).

:func:`enable` installs, in this process, three subclasses into transformers' continuous batching, without
changing its files; every model that then starts continuous batching (``generate_batch``,
``init_continuous_batching``) gets an elastic cache:

``ElasticCache`` (replaces ``PagedAttentionCache`` where ``continuous_api`` builds it)
    Built small by transformers (one block), then re-pointed at one :class:`~elastikv.space.KVSpace` of the
    device's virtual size. Layout: token-interleaved, ``[blocks * block_size, layers, 2 (K, V), heads,
    head_dim]``, so a block is one contiguous range (one chunk maps a page of every layer) and each layer's K and V
    are affine ``[slots, heads, head_dim]`` views, as transformers' kernels index them (by slot, on dim 0).
    Blocks 0 and 1 are the always-mapped null blocks, used as transformers' read trash (zeros, for padding reads)
    and write trash. ``num_pages`` is the per-batch KV read budget (``max_kv_tokens``), not the virtual size,
    so that the attention mask of the sdpa/eager paths stays small.
``ElasticBlockManager`` (the cache's ``_block_manager``)
    Block ids from the :class:`~elastikv.allocator.BlockAllocator`; a refusal is ``None`` ("not now").
``prepare_next_batch`` and ``_setup_static_tensors``, wrapped
    When nothing can be scheduled and transformers has nothing left to preempt, it would raise and fail every
    request; with an elastic cache the batch waits instead (memory held by other instances comes back). Its IO
    buffers are sized from the read budget.

Memory bound: a request whose prompt and output can never fit the limit fails alone, with the reason, when it
is submitted, instead of waiting forever. Prefix sharing (transformers' own, on for full-attention models) is
kept: blocks of cached prefixes stay mapped up to ``ELASTIKV_PREFIX_CACHE``.

The adapter, one concern a module: ``cache.py`` (``ElasticCache``, ``ElasticBlockManager`` and the queue over the
allocator, as mixins bound to transformers' classes on first use; this process's options and open caches) and
``hooks.py`` (what is patched, and the waits). Nothing here imports transformers until :func:`enable` runs.
"""

from __future__ import annotations

import logging
import threading

from elastikv.config import Settings
from elastikv.engines.transformers import cache, hooks
from elastikv.engines.transformers.cache import NULL_BLOCKS, Options, caches, close_caches, latest_instance
from elastikv.errors import UnsupportedEngine

__all__ = [
    "NULL_BLOCKS",
    "SUPPORTED",
    "Options",
    "caches",
    "check_version",
    "close_caches",
    "enable",
    "latest_instance",
    "patched",
    "version",
]

log = logging.getLogger("elastikv")

SUPPORTED: tuple[tuple[int, int], ...] = ((5, 17),)

_lock = threading.Lock()
_enabled = False


def version() -> tuple[str, tuple[int, ...]]:
    import transformers

    text = str(transformers.__version__)
    parts: list[int] = []
    for p in text.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return text, tuple(parts)


def check_version(text: str, tup: tuple[int, ...]) -> None:
    if tuple(tup[:2]) not in SUPPORTED:
        supported = ", ".join(f"{a}.{b}" for a, b in SUPPORTED)
        raise UnsupportedEngine(
            f"elastikv's transformers engine supports transformers {supported}; this is {text}. "
            "Install it: pip install 'transformers>=5.17,<5.18' (5.18+ lays its paged cache out anew)."
        )


def enable(*, name: str | None = None, settings: Settings | None = None, max_kv_tokens: int = 16384) -> None:
    """Make continuous batching in this process elastic. Idempotent; the options apply to caches built later."""
    global _enabled
    text, tup = version()
    check_version(text, tup)
    with _lock:
        cache.options.name, cache.options.settings, cache.options.max_kv_tokens = name, settings, max_kv_tokens
        if _enabled:
            return
        hooks.install()
        _enabled = True
    log.info("elastikv: transformers %s continuous batching patched (elastic KV cache)", text)


def patched() -> bool:
    return _enabled
