"""What the embedded engine holds on its device besides its KV cache, booked in the device's ledger.

The engine's weights (every distinct storage of its parameters and buffers) and, once it has served, ``other``:
what the process holds on a GPU beyond the weights and KV (its CUDA context, activations, workspaces; by the
driver's count where it can be read, ``memory/usage.py``). Asleep, what it still holds there (its context) stays
booked in their place. Booked through
:class:`~elastikv.instance.Holding` against the same budget as KV, so a router can tell whether a model fits
before waking it (``router/room.py``), and ``elastikv status`` shows weights, KV and other per engine.

Order (the invariant): booked *before* the weights go on the device (at start and at every wake; a refusal means
they are not loaded), dropped *after* they are off it (at sleep). Where the settings book nothing
(``ELASTIKV_BOOK_WEIGHTS``: auto books on a GPU only), every method is a no-op.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from elastikv.config import Settings
from elastikv.errors import LimitExceeded
from elastikv.instance import Holding, open_holding, other_bytes, resident_bytes, weight_bytes

log = logging.getLogger("elastikv")

START_ROOM_WAIT_S = 15.0  # how long a starting engine waits for room for its weights before it gives up
ROOM_POLL_S = 0.5


class Footprint:
    def __init__(self, model: Any, device: torch.device, settings: Settings, *, name: str) -> None:
        self.device = device
        self.weights = weight_bytes(model)
        self.other = 0
        self.holding: Holding | None = open_holding(device, settings, name=name)

    def book(self, wait_s: float = 0.0) -> None:
        """Before the weights go on the device. ``LimitExceeded`` (nothing booked) if the budget cannot take
        them, after trying for up to ``wait_s`` seconds: the caller must not load them.

        Why wait at start: a router makes room before it starts a model (``router/room.py``), but the engines
        already awake keep growing their KV reserves under load while this one loads (seconds), and give the
        surplus back once idle (their trim). Refusing at the first look made such a start a crash, restarted with
        backoff while its requests were refused."""
        if self.holding is None:
            return
        deadline, warned = time.monotonic() + wait_s, False
        while True:
            try:
                self.holding.book(weights=self.weights, other=self.other)
                return
            except LimitExceeded as exc:
                if time.monotonic() >= deadline:
                    raise
                if not warned:
                    log.warning("elastikv: %s (waiting up to %.0f s for room)", exc, wait_s)
                    warned = True
                time.sleep(ROOM_POLL_S)

    def measure_other(self, kv: int) -> None:
        """After the engine served once: book what it holds beyond the weights and its ``kv`` mapped bytes too (on
        a GPU). A budget that cannot take it is logged; the weights stay booked (the memory is already held)."""
        if self.holding is None or self.device.type != "cuda":
            return
        other = other_bytes(self.device, weights=self.weights, kv=kv)
        if self.holding.book_held(weights=self.weights, other=other):
            self.other = other

    def drop(self) -> None:
        """After the weights and KV left the device (asleep): what the process still holds there stays booked."""
        if self.holding is not None:
            self.holding.rest(resident_bytes(self.device, kv=0))

    def close(self) -> None:
        if self.holding is not None:
            self.holding.close()
            self.holding = None
