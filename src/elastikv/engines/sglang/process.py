"""SGLang adapter, this process's state: the one thing the patched SGLang methods share.

Only SGLang's scheduler processes (one per tensor-parallel rank) hold KV memory, and each holds all of its own:
model runner, KV pools, token allocator and radix tree. So each one gets its own memory backend the first time
it needs one (:func:`for_device`), books and maps its own pages, and remembers the elastic caches it opened. The
patched methods are called by SGLang with SGLang's own arguments, so this state is reached through the module,
not passed along; nothing else in the adapter is global.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from elastikv import lifecycle
from elastikv.config import Settings
from elastikv.instance import Holding, Instance, MemoryBackend, backend_for


@dataclass
class SchedulerProcess:
    """What one SGLang scheduler process has: the backend its pages live on, its settings, the model runner's
    forward stream, and the elastic caches opened here (one per KV pool SGLang built)."""

    backend: MemoryBackend
    settings: Settings
    forward_stream: Any = None
    instances: list[Instance] = field(default_factory=list)
    holding: Holding | None = None  # the model's weights in the ledger (``pools._book_weights``)

    def streams(self) -> list[int] | None:
        """CUDA streams whose queued work may read a page: with SGLang's overlap scheduler a forward is already
        queued on the runner's forward stream when the host frees a request's pages."""
        if self.backend.name != "cuda":
            return None
        streams = [0, torch.cuda.current_stream().cuda_stream]
        fwd = getattr(self.forward_stream, "cuda_stream", None)
        if fwd:
            streams.append(int(fwd))
        return streams


_current: SchedulerProcess | None = None


def for_device(device: str | torch.device) -> SchedulerProcess:
    """This process's state, made (with its backend on ``device``) the first time it is asked for."""
    global _current
    if _current is None:
        settings = Settings.from_env()
        backend = backend_for(torch.device(device), settings, holder="this SGLang scheduler")
        _current = SchedulerProcess(backend, settings)
        lifecycle.on_exit(backend.close)  # closers run newest first: the instances go before their backend
    return _current


def current() -> SchedulerProcess | None:
    """This process's state, if a KV pool was built here (None in SGLang's other processes)."""
    return _current


def settings() -> Settings:
    """The settings this process's caches were opened with (from the environment if none was)."""
    return _current.settings if _current is not None else Settings.from_env()


def instances() -> list[Instance]:
    """The elastic KV caches opened in this process (one per KV pool SGLang built here)."""
    return list(_current.instances) if _current is not None else []
