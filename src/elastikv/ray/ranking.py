"""Which replicas a request for ``model`` should try, best first: the request router's policy, without Ray.

Ranks, each tried in turn by Serve (within a rank Serve takes the replica with the shortest queue among those not
full; a rank whose replicas are all full, at ``max_ongoing_requests``, passes the request to the next rank):

1. replicas where ``model`` is awake, all in one rank: least loaded first (Serve's queue lengths decide);
2. replicas where ``model`` is known but not awake (asleep, stopped, starting, waking ...), one replica a rank,
   most free device memory first (unknown free memory after every known figure): a wake goes where it fits best,
   and a hot model whose awake replicas are full spreads to the next-best replica;
3. every other replica (down, or not reporting yet), in one rank: a request is never left without a replica
   while any exists. A model known nowhere ends here too: the replica's router answers OpenAI's 404.

``model`` None (``/v1/models``, or a body without one) puts every replica in one rank.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

from elastikv.ray.stats import AWAKE, ReplicaStats

K = TypeVar("K", bound=Hashable)


def rank(model: str | None, replicas: Sequence[tuple[K, ReplicaStats]]) -> list[list[K]]:
    """The ranks for ``model`` over ``replicas`` (a key per replica and its last stats). Every key appears once."""
    if model is None:
        return [[k for k, _ in replicas]] if replicas else []
    awake: list[K] = []
    wakeable: list[tuple[K, ReplicaStats]] = []
    rest: list[K] = []
    for key, stats in replicas:
        state = stats.state_of(model) if stats.up else None
        if state == AWAKE:
            awake.append(key)
        elif state is not None:
            wakeable.append((key, stats))
        else:
            rest.append(key)
    # Most free first; unknown free memory after all known figures; then fewest requests in flight.
    wakeable.sort(key=lambda ks: (ks[1].free_bytes is None, -(ks[1].free_bytes or 0), ks[1].in_flight))
    ranks = [awake] if awake else []
    ranks += [[k] for k, _ in wakeable]
    if rest:
        ranks.append(rest)
    return ranks
