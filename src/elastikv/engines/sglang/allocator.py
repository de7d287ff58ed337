"""SGLang adapter, the allocator: SGLang's token allocator and prefill budget over elastikv's
:class:`~elastikv.allocator.BlockAllocator`.

SGLang's token and paged allocators are replaced by ``ElasticTokenAllocator`` (a subclass of its
``PagedTokenToKVPoolAllocator``, page size 1 included), whose free list holds only pages secured from the
BlockAllocator (mapped and booked). ``available_size()`` is what could be secured within the limit, so SGLang's
admission, radix-cache eviction and decode retraction work unchanged; a prefill is admitted only once its pages
are secured (or evictable), a decode step only once its new pages are (``ElasticPrefillBudget``,
``check_decode_capacity``), so an allocation never fails after admission (SGLang treats that as fatal). Unused
cached prefixes are bounded by ``ELASTIKV_PREFIX_CACHE`` (evicted at each admission round and when idle), so
pages really empty and go back to other models. ``clear()`` (flush, and the sleep ``/release_memory_occupation``)
frees every page and gives the reserve back at once.

The logic is in two mixins defined here. The classes SGLang instantiates subclass them and SGLang's own classes,
which can be imported only where SGLang is installed, so :func:`classes` makes them on first use (this module
imports without SGLang, as every elastikv module must).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from elastikv.config import format_bytes
from elastikv.engines.sglang import process
from elastikv.engines.sglang.pools import pool_instance
from elastikv.engines.sglang.targets import version
from elastikv.errors import AllocationRefused, ElastikvError, UnsupportedEngine

if TYPE_CHECKING:  # what the mixins extend (Any to the type checker: SGLang ships no types)
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator as _Paged
    from sglang.srt.mem_cache.prefill_budget import PrefillBudget as _PrefillBudget
else:  # at run time the mixins stand alone; classes() puts SGLang's class after them
    _Paged = _PrefillBudget = object

log = logging.getLogger("elastikv")

# How long an allocation SGLang already admitted may wait for room (another instance booked the device budget
# between SGLang's check and its allocation, a race the admission hooks make rare) before it is given up.
ALLOC_WAIT_S = 60.0


class ElasticPrefillBudgetMixin(_PrefillBudget):  # type: ignore[misc]
    """SGLang's prefill budget, securing each admitted request's pages as it is admitted.

    SGLang admits on ``available + evictable`` and then allocates; an allocation that fails after admission
    kills the server. So a request passes only if its new pages were just secured (mapped and booked for
    this engine), or can be taken from the evictable prefix cache, which SGLang evicts before it allocates.
    """

    def __init__(self, allocator: Any, tree_cache: Any, *, num_mixed_decode_tokens: int = 0) -> None:
        super().__init__(allocator, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)
        self._promised = 0  # pages of the requests admitted so far in this round

    def _secure_for(self, tokens: int) -> bool:
        alloc = self.allocator
        pages = -(-tokens // alloc.page_size) + 1  # the partial last page of the prefix may need a page more
        want = self._promised + pages
        if alloc.secure(want) or alloc.secured_pages + self.tree_cache.evictable_size() // alloc.page_size >= want:
            self._promised = want
            return True
        return False

    def check_prefill(self, **kwargs: Any) -> tuple[bool, int | None]:
        ok, limit = super().check_prefill(**kwargs)
        if not ok or self._secure_for(int(kwargs["extend_input_len"])):
            return ok, limit
        return False, None

    def can_allocate_prefill(self, **kwargs: Any) -> bool:
        ok = super().can_allocate_prefill(**kwargs)
        return bool(ok) and self._secure_for(int(kwargs["paged_input"]))


class ElasticTokenAllocatorMixin(_Paged):  # type: ignore[misc]
    """SGLang's paged token allocator (any page size) over elastikv's :class:`BlockAllocator`.

    Who holds which page: the BlockAllocator holds every page nobody uses (mapped or not); ``_secured`` (and
    its device copy ``free_pages``, SGLang's own free list, which its allocation kernels read from the front)
    holds pages taken from the BlockAllocator for the allocations about to happen; ``_out`` holds the pages
    handed to SGLang (requests and the radix cache) until SGLang frees them. Page 0 is SGLang's padding page,
    elastikv's null block: never handed out.

    ``available_size()``: secured pages plus what the BlockAllocator could give within the limit, never more
    than SGLang's own capacity minus what it holds. Every allocation secures exactly the pages SGLang's
    kernel will take (the count is known on the host before it runs), so a refusal surfaces before any
    device work.
    """

    # SGLang's own, bound by :func:`classes` where SGLang is imported
    _num_new_pages: Callable[..., Any]  # allocator.paged.get_num_new_pages
    _evict_params: Callable[..., Any]  # base_prefix_cache.EvictParams
    _budget_class: Callable[..., Any]  # ElasticPrefillBudget

    def __init__(self, size: int, page_size: int, dtype: Any, device: Any, kvcache: Any, need_sort: bool) -> None:
        inst = pool_instance(kvcache)
        if need_sort:
            raise UnsupportedEngine(
                "elastikv does not support SGLang's PD disaggregation (its allocator keeps sorted free lists); "
                "run the disaggregated engines without ELASTIKV=1"
            )
        if page_size != int(kvcache.page_size):
            raise UnsupportedEngine(f"SGLang's allocator page size {page_size} differs from its pool's")
        self._inst = inst
        self._alloc = inst.allocator
        self._offset = int(kvcache._elastikv_offset)  # SGLang page p is the allocator's block p + offset
        self._secured: list[int] = []
        self._out: set[int] = set()
        self._tree: Any = None
        self._waiting_since: float | None = None
        page_bytes = inst.space.geometry.group_bytes
        settings = process.settings()
        self._prefix_tokens = settings.prefix_cache.resolve(inst.backend.mem_info()[1]) // page_bytes * page_size
        super().__init__(size, page_size, dtype, device, kvcache, need_sort)
        if self._alloc.num_blocks < self.num_pages:
            raise UnsupportedEngine(
                f"SGLang's pool has {self.num_pages} pages but its elastic cache {self._alloc.num_blocks}"
            )
        log.info(
            "elastikv active: engine=sglang %s pid=%d name=%s page=%d tokens virtual capacity=%s (%d tokens) "
            "limit=%s prefix cache bound=%s",
            version(),
            os.getpid(),
            inst.name,
            page_size,
            format_bytes(self._alloc.capacity_bytes),
            self.num_pages * page_size,
            format_bytes(self._alloc.limit),
            format_bytes(self._prefix_tokens // page_size * page_bytes),
        )

    # -- free list ------------------------------------------------------------------------------------
    @property
    def secured_pages(self) -> int:
        return len(self._secured)

    def _publish(self) -> None:
        self.free_pages = torch.tensor(self._secured, dtype=torch.int64, device=self.device)

    def secure(self, pages: int) -> bool:
        """Hold at least ``pages`` free pages for the allocations to come; False (nothing taken) if the
        limit, the device budget or the driver refuses."""
        want = pages - len(self._secured)
        if want <= 0:
            return True
        try:
            self._secured += [b - self._offset for b in self._alloc.allocate(want)]
        except AllocationRefused:
            return False
        except ElastikvError as exc:  # never let a failing map crash the engine: refuse, keep serving
            log.error("elastikv: securing %d pages failed: %s", want, exc)
            return False
        self._publish()
        return True

    def _secure_admitted(self, pages: int) -> bool:
        """Secure pages for an allocation SGLang already admitted: evict unused prefixes if the limit is
        reached, then wait (bounded) for another instance to give memory back."""
        if self.secure(pages):
            return True
        deadline = time.monotonic() + ALLOC_WAIT_S
        warned = False
        while True:
            short = pages - len(self._secured)
            if self._tree is not None and self._tree.evictable_size() > 0:
                self._tree.evict(self._evict_params(num_tokens=short * self.page_size))
            if self.secure(pages):
                if warned:
                    log.warning("elastikv: room found; allocation of %d pages goes ahead", pages)
                return True
            if time.monotonic() > deadline:
                log.error(
                    "elastikv: SGLang admitted work needing %d more KV pages, and none came free within %.0f s "
                    "(limit %s; raise it with `elastikv limit`, or lower other models' limits)",
                    short,
                    ALLOC_WAIT_S,
                    format_bytes(self._alloc.limit),
                )
                return False
            if not warned:
                log.warning("elastikv: waiting for %d KV pages (device budget or limit reached)", short)
                warned = True
            time.sleep(0.005)

    def _handed_out(self, pages: int) -> None:
        taken, self._secured = self._secured[:pages], self._secured[pages:]
        self._out.update(taken)

    # -- SGLang's allocator interface ----------------------------------------------------------------
    def available_size(self) -> int:
        pages = len(self._secured) + self._alloc.available()
        return int(min(pages, self.num_pages - len(self._out)) * self.page_size)

    def withheld_tokens(self, available: int | None = None) -> int:
        """Tokens of SGLang's capacity that are neither free for it nor held by it: the limit's doing.

        ``available`` is the free count the caller already read (SGLang's idle check reads ``available_size()``
        once into its pool stats): pass it, because a page the maintainer maps or unmaps in between changes a
        second reading, and the check would then see that page as leaked and stop the scheduler."""
        if available is None:
            available = self.available_size()
        return int((self.num_pages - len(self._out)) * self.page_size) - available

    def merge_and_sort_free(self) -> None:
        pass  # never staged: need_sort is refused

    def alloc(self, need_size: int) -> Any:
        pages = need_size // self.page_size
        if not self._secure_admitted(pages):
            return None
        out = super().alloc(need_size)
        if out is not None:
            self._handed_out(pages)
        return out

    def alloc_extend(
        self,
        prefix_lens: Any,
        prefix_lens_cpu: Any,
        seq_lens: Any,
        seq_lens_cpu: Any,
        last_loc: Any,
        extend_num_tokens: int,
        num_new_pages: int | None = None,
    ) -> Any:
        if num_new_pages is None:
            num_new_pages = int(
                self._num_new_pages(seq_lens=seq_lens_cpu, page_size=self.page_size, prefix_lens=prefix_lens_cpu)
            )
        if not self._secure_admitted(num_new_pages):
            return None
        out = super().alloc_extend(
            prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens, num_new_pages
        )
        if out is not None:
            self._handed_out(num_new_pages)
        return out

    def alloc_decode(self, seq_lens: Any, seq_lens_cpu: Any, last_loc: Any) -> Any:
        pages = int(self._num_new_pages(seq_lens=seq_lens_cpu, page_size=self.page_size, decode=True))
        if not self._secure_admitted(pages):
            return None
        out = super().alloc_decode(seq_lens, seq_lens_cpu, last_loc)
        if out is not None:
            self._handed_out(pages)
        return out

    def _release_page_ids(self, *page_ids: Any) -> None:
        # Every free (free, free_segment, free_page_ids, a free group's end) ends here.
        ids = [int(p) for t in page_ids for p in t.reshape(-1).tolist()]
        if not ids:
            return
        unknown = [p for p in ids if p not in self._out]
        if unknown:
            raise ElastikvError(f"SGLang freed KV pages it does not hold: {unknown[:8]}")
        self._out.difference_update(ids)
        self._give_back(ids)

    def _give_back(self, pages: list[int]) -> None:
        self._alloc.free([p + self._offset for p in pages])

    def clear(self) -> None:
        # At construction (nothing held yet), on flush_cache and on release_memory_occupation: everything
        # is free, so every page goes back and the reserve with it.
        held = list(self._out) + self._secured
        self._out = set()
        self._secured = []
        self._publish()
        self.free_group = None
        self.free_page_ids_group: list[Any] = []
        self.staged_pages: list[Any] = []
        self.num_staged_pages = 0
        if held:
            self._give_back(held)
        self._alloc.idle()

    # -- capacity hooks ------------------------------------------------------------------------------
    def create_prefill_budget(self, tree_cache: Any, *, num_mixed_decode_tokens: int = 0) -> Any:
        self._tree = tree_cache
        self.bound_prefix_cache()
        return self._budget_class(self, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)

    def evict_to_free_tokens(self, tree_cache: Any, num_tokens: int) -> Any:
        self._tree = tree_cache
        return super().evict_to_free_tokens(tree_cache, num_tokens)

    def check_decode_capacity(
        self, *, num_tokens: int, tree_cache: Any, requests: Any = None, spec_algorithm: Any = None
    ) -> bool:
        # SGLang asks for exactly the next step's new pages (page_size tokens each). False retracts requests.
        self._tree = tree_cache
        self.evict_to_free_tokens(tree_cache, num_tokens)
        pages = -(-num_tokens // self.page_size)
        if self.secure(pages):
            return True
        short = pages - len(self._secured)
        if tree_cache is not None and tree_cache.evictable_size() > 0:
            tree_cache.evict(self._evict_params(num_tokens=short * self.page_size))
        return bool(self.secure(pages))

    # -- elastic housekeeping ------------------------------------------------------------------------
    def bound_prefix_cache(self) -> None:
        """Evict unused cached prefixes beyond ``ELASTIKV_PREFIX_CACHE``, so their pages go back."""
        tree = self._tree
        if tree is None:
            return
        over = int(tree.evictable_size()) - self._prefix_tokens
        if over > 0:
            tree.evict(self._evict_params(num_tokens=over))

    def on_idle(self, fully_idle: bool) -> None:
        self.bound_prefix_cache()
        if fully_idle and self._secured:
            spare, self._secured = self._secured, []
            self._publish()
            self._give_back(spare)


@functools.cache
def classes() -> tuple[type, type]:
    """``(ElasticTokenAllocator, ElasticPrefillBudget)``: the mixins over SGLang's own classes, made once SGLang
    is importable."""
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator, get_num_new_pages
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams
    from sglang.srt.mem_cache.prefill_budget import PrefillBudget

    class ElasticPrefillBudget(ElasticPrefillBudgetMixin, PrefillBudget):  # type: ignore[misc]
        __doc__ = ElasticPrefillBudgetMixin.__doc__

    class ElasticTokenAllocator(ElasticTokenAllocatorMixin, PagedTokenToKVPoolAllocator):  # type: ignore[misc]
        __doc__ = ElasticTokenAllocatorMixin.__doc__
        _num_new_pages = staticmethod(get_num_new_pages)
        _evict_params = EvictParams
        _budget_class = ElasticPrefillBudget

    return ElasticTokenAllocator, ElasticPrefillBudget


def allocator_class() -> type:
    """ElasticTokenAllocator (SGLang must be importable)."""
    return classes()[0]


def token_allocator(size: int, dtype: Any, device: Any, kvcache: Any, need_sort: bool) -> Any:
    """What SGLang's configurator gets for ``TokenToKVPoolAllocator(...)``: the same allocator, page size 1."""
    return allocator_class()(size, 1, dtype, device, kvcache, need_sort)
