"""elastikv: elastic, virtual-memory-backed KV caches, so that several LLM engines share one GPU.

The public surface is small::

    backend = open_backend()                      # the GPU if there is one, else host memory
    space = KVSpace(backend, KVGeometry.for_attention(...))   # reserved as large as the device
    alloc = BlockAllocator(space, limit=...)      # blocks in, pages mapped; blocks out, pages unmapped
    blocks = alloc.allocate(n); space.buffer(layer, 0)[blocks] = ...; alloc.free(blocks)
"""

from __future__ import annotations

import importlib
from typing import Any

# Names are imported on first use (PEP 562), so that `elastikv status` and `elastikv limit` start without
# importing torch.
_EXPORTS = {
    "AllocatorStats": "elastikv.allocator",
    "BlockAllocator": "elastikv.allocator",
    "Budget": "elastikv.allocator",
    "LocalBudget": "elastikv.allocator",
    "Settings": "elastikv.config",
    "parse_size": "elastikv.config",
    "AllocationRefused": "elastikv.errors",
    "ConfigError": "elastikv.errors",
    "ElastikvError": "elastikv.errors",
    "InvalidBlockError": "elastikv.errors",
    "LimitExceeded": "elastikv.errors",
    "OutOfMemory": "elastikv.errors",
    "MemoryBackend": "elastikv.memory",
    "open_backend": "elastikv.memory",
    "KVGeometry": "elastikv.space",
    "KVSpace": "elastikv.space",
    "Instance": "elastikv.instance",
    "open_instance": "elastikv.instance",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'elastikv' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [  # noqa: RUF022
    "AllocationRefused",
    "AllocatorStats",
    "BlockAllocator",
    "Budget",
    "ConfigError",
    "ElastikvError",
    "InvalidBlockError",
    "KVGeometry",
    "KVSpace",
    "LimitExceeded",
    "LocalBudget",
    "MemoryBackend",
    "OutOfMemory",
    "Settings",
    "__version__",
    "open_backend",
    "parse_size",
    "Instance",
    "open_instance",
]
