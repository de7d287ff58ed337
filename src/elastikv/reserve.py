"""How many free mapped blocks to keep ready, from how fast the engine has been growing.

The reserve exists so that an allocation finds mapped memory waiting and makes no driver call. Too small and
bursts pay for mapping on the engine's thread; too large and idle memory is held from other models. So the
target is the configured minimum plus what the last ``window`` seconds of *net* growth (blocks in use going
up, not allocate/free churn) say the next ``lookahead`` seconds will need, capped. Once growth stops, the
target falls back to the minimum within ``window`` seconds and the surplus is unmapped.
"""

from __future__ import annotations

import math
from collections import deque


class ReservePolicy:
    def __init__(self, min_blocks: int, max_blocks: int, *, window: float = 1.0, lookahead: float = 0.25) -> None:
        if min_blocks < 0 or max_blocks < min_blocks:
            raise ValueError(f"reserve bounds must satisfy 0 <= min <= max, got {min_blocks}, {max_blocks}")
        self.min_blocks = min_blocks
        self.max_blocks = max_blocks
        self.window = window
        self.lookahead = lookahead
        self._samples: deque[tuple[float, int]] = deque()  # (time, blocks in use), oldest first

    def observe(self, now: float, in_use: int) -> None:
        samples = self._samples
        samples.append((now, in_use))
        while len(samples) > 1 and samples[0][0] < now - self.window:
            samples.popleft()

    def growth(self) -> int:
        """Net blocks gained over the window: now minus the lowest point since the window began."""
        if not self._samples:
            return 0
        low = min(in_use for _, in_use in self._samples)
        return max(0, self._samples[-1][1] - low)

    def target_blocks(self) -> int:
        extra = math.ceil(self.growth() * self.lookahead / self.window)
        return min(self.max_blocks, self.min_blocks + extra)
