"""elastikv: elastic, virtual-memory-backed KV caches, so that several LLM engines share one GPU.

The public surface is small::

    backend = open_backend()                      # the GPU if there is one, else host memory
    space = KVSpace(backend, KVGeometry.for_attention(...))   # reserved as large as the device
    alloc = BlockAllocator(space, limit=...)      # blocks in, pages mapped; blocks out, pages unmapped
    blocks = alloc.allocate(n); space.buffer(layer, 0)[blocks] = ...; alloc.free(blocks)
"""

from elastikv.allocator import AllocatorStats, BlockAllocator, Budget, LocalBudget
from elastikv.config import Settings, parse_size
from elastikv.errors import (
    AllocationRefused,
    ConfigError,
    ElastikvError,
    InvalidBlockError,
    LimitExceeded,
    OutOfMemory,
)
from elastikv.memory import MemoryBackend, open_backend
from elastikv.space import KVGeometry, KVSpace

__version__ = "0.1.0"

__all__ = [
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
]
