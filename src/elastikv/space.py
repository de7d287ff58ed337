"""KVSpace: one engine's KV cache as reserved virtual ranges, with torch views, mapped a page at a time.

Terms (DESIGN.md): a *chunk* is one physical allocation; a *page* is the unit of elasticity, the same slot in
every KV buffer, mapped whole or not at all; a *block* is the engine's unit (``block_shape`` elements of one
buffer of one layer). Blocks never straddle pages.

Two layouts:

``per-layer``
    One virtual range per buffer (``num_layers * buffers_per_layer`` ranges), each ``[num_blocks, *block_shape]``
    contiguous: the engine-native layout any kernel accepts. A page is one chunk in *each* range, so mapping a
    page is ``num_layers * buffers_per_layer`` driver mappings.
``interleaved``
    One range, block-major: block ``i`` of every layer and buffer sits together (``[num_blocks, layers*buffers,
    *block_shape]``), so a page is *one* chunk and maps ~70x faster on an H100. Each buffer's view is strided
    (block stride ``layers * buffers * block_bytes``); use it where the engine's kernels take a block stride.

Who owns what: the space owns the reservations, the chunks and the record of which pages are mapped. It does
not decide *when* to map: that is the allocator's job (``allocator.py``). Touching a block whose page is not
mapped faults (SIGSEGV on the host backend, an illegal address on the GPU), so engines only touch blocks the
allocator gave them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import torch

from elastikv.config import LayoutName, format_bytes
from elastikv.errors import ConfigError, DriverError
from elastikv.memory import Chunk, Fence, MemoryBackend
from elastikv.page_plan import KVGeometry as KVGeometry  # re-exported: engines and tests import it from here
from elastikv.page_plan import PagePlan

log = logging.getLogger(__name__)


class Pages(Protocol):
    """What the allocator needs of a space: its page geometry, and whole pages mapped, unmapped and fenced.

    :class:`KVSpace` is one (the pages are in this process). ``peer_pages.py``'s ``PeerPages`` is another: an
    engine scheduler's view of pages that live in worker processes, mapped over a socket.
    """

    num_pages: int
    num_blocks: int
    null_blocks: int
    blocks_per_page: int
    page_bytes: int

    def map_page(self, page: int) -> None: ...

    def unmap_page(self, page: int) -> None: ...

    def fence(self) -> Fence: ...


class KVSpace:
    """An engine's KV buffers over reserved virtual memory; pages are mapped and unmapped on request.

    The page arithmetic is a :class:`~elastikv.page_plan.PagePlan`, given as ``plan`` (an engine that sized its
    cache with one, so both agree by construction) or made here from the arguments below, which ``plan`` excludes.
    ``num_blocks`` defaults to the *virtual capacity*: as many blocks as the device's total memory could hold,
    never a snapshot of free memory. It is rounded up to whole pages. ``chunk_bytes`` overrides the chunk size
    (it must be a multiple of the granularity and hold whole blocks); ``min_chunk_bytes`` only raises the
    default, rounded up to whole blocks and granules (``ELASTIKV_CHUNK``). The first ``null_blocks`` blocks form
    an always-mapped region the allocator never hands out (engines that pad block tables with a null block point
    them there). ``layout`` defaults to ``interleaved`` (or the plan's). ``streams`` are the raw CUDA stream
    handles whose work must finish before a page is unmapped, for an engine that knows them all; by default
    every stream of the device (the fence synchronizes the device), which needs no knowledge of the engine.

    ``scratch_backed=True`` backs every page that has no memory of its own with one shared scratch chunk
    (mapped at every such slot), so that a stray access to a block that is not allocated (an engine reading
    padding, a warm-up with made-up block ids) lands in scratch instead of faulting. The data there is
    garbage shared by all such pages. It costs one chunk of memory (outside any budget) and doubles the
    driver calls of mapping and unmapping a page (the scratch view is unmapped first, and mapped back after).
    """

    def __init__(
        self,
        backend: MemoryBackend,
        geometry: KVGeometry,
        *,
        layout: LayoutName | None = None,
        num_blocks: int | None = None,
        chunk_bytes: int | None = None,
        min_chunk_bytes: int | None = None,
        null_blocks: int = 0,
        plan: PagePlan | None = None,
        streams: Sequence[int] | None = None,
        scratch_backed: bool = False,
    ) -> None:
        if plan is None:
            if num_blocks is None:
                num_blocks = backend.mem_info()[1] // geometry.group_bytes
            plan = PagePlan.for_blocks(
                geometry,
                layout or "interleaved",
                backend.granularity,
                num_blocks=num_blocks,
                null_blocks=null_blocks,
                chunk_bytes=chunk_bytes,
                min_chunk_bytes=min_chunk_bytes,
            )
        else:
            sized = num_blocks is not None or chunk_bytes is not None or min_chunk_bytes is not None or null_blocks != 0
            _check_plan(plan, backend, geometry, layout, sized)
        self.backend = backend
        self.geometry = geometry
        self.plan = plan
        self.layout: LayoutName = plan.layout
        self.chunk_bytes = chunk = plan.chunk_bytes
        self.blocks_per_page = plan.blocks_per_page
        self.chunks_per_page = plan.chunks_per_page
        self.page_bytes = plan.page_bytes
        self.num_pages = plan.num_pages
        self.num_blocks = plan.num_blocks
        self.null_blocks = plan.null_blocks

        # Address space.
        self._range_bytes = self.num_pages * chunk  # one buffer's range (per-layer) or the whole (interleaved)
        self._va_bytes = self._range_bytes * self.chunks_per_page
        self._va = backend.reserve(self._va_bytes)
        self._bases = [self._va + i * self._range_bytes for i in range(self.chunks_per_page)]
        self._chunks: dict[int, list[Chunk]] = {}  # mapped page -> its chunks, in self._bases order
        self._scratch: Chunk | None = None
        if scratch_backed:
            self._scratch = backend.create(chunk)
            try:
                for page in range(self.num_pages):
                    for base in self._bases:
                        self._back_with_scratch(base + page * chunk)
            except BaseException:
                self._scratch_teardown()
                backend.free_reservation(self._va, self._va_bytes)
                raise

        # Undeclared streams: every stream of the device (an engine may compute on streams of its own, e.g.
        # transformers' async batching or vLLM's forward stream, that no event on a known stream would order).
        self.streams: tuple[int, ...] = tuple(streams or ())

        self._raw = backend.tensor(self._va, self._va_bytes)
        self._views = self._make_views()
        self._closed = False

    # -- views ---------------------------------------------------------------------------------------------
    def _make_views(self) -> list[list[torch.Tensor]]:
        g, n = self.geometry, self.num_blocks
        typed = self._raw.view(g.dtype)
        views: list[list[torch.Tensor]] = []
        for layer in range(g.num_layers):
            row = []
            for b in range(g.buffers_per_layer):
                i = layer * g.buffers_per_layer + b
                if self.layout == "per-layer":
                    elems = self._range_bytes // g.dtype.itemsize
                    view = typed[i * elems : i * elems + n * g.block_elems].view(n, *g.block_shape)
                else:
                    view = typed.view(n, g.num_buffers, g.block_elems)[:, i].view(n, *g.block_shape)
                row.append(view)
            views.append(row)
        return views

    def buffer(self, layer: int, index: int = 0) -> torch.Tensor:
        """Layer ``layer``'s buffer ``index`` (0 = K, 1 = V) as ``[num_blocks, *block_shape]``."""
        return self._views[layer][index]

    def buffers(self) -> list[list[torch.Tensor]]:
        """All views, ``[layer][buffer]``."""
        return self._views

    @property
    def device(self) -> torch.device:
        return self._raw.device

    @property
    def raw(self) -> torch.Tensor:
        """The whole reserved range as one flat ``uint8`` tensor (every buffer, in address order), for engines
        that lay out their own views over one allocation (vLLM). Only mapped pages may be touched."""
        return self._raw

    # -- pages ---------------------------------------------------------------------------------------------
    def page_of(self, block: int) -> int:
        return block // self.blocks_per_page

    def is_mapped(self, page: int) -> bool:
        return page in self._chunks

    @property
    def mapped_pages(self) -> int:
        return len(self._chunks)

    @property
    def mapped_bytes(self) -> int:
        return len(self._chunks) * self.page_bytes

    def map_page(self, page: int) -> None:
        """Back ``page`` with physical memory in every buffer, all or nothing.

        A failure part-way (the driver out of memory on the 17th of 64 chunks, say) unmaps and releases
        every chunk this call made, then raises: the page is left exactly as it was, unmapped.
        """
        self._check_page(page)
        if page in self._chunks:
            raise DriverError("map_page", "ALREADY_MAPPED", f"page {page} is already mapped")
        backend, size, offset = self.backend, self.chunk_bytes, page * self.chunk_bytes
        scratch = self._scratch
        done: list[Chunk] = []
        try:
            for base in self._bases:
                addr = base + offset
                chunk = backend.create(size)  # first: if the device is full, the slot keeps what it had
                try:
                    if scratch is not None:
                        backend.unmap(addr, size)
                    try:
                        backend.map(addr, size, chunk)
                    except BaseException:
                        if scratch is not None:
                            self._back_with_scratch(addr)
                        raise
                except BaseException:
                    backend.release(chunk)
                    raise
                done.append(chunk)
                backend.set_access(addr, size)
        except BaseException:
            self._undo(page, done)
            raise
        self._chunks[page] = done

    def unmap_page(self, page: int) -> None:
        """Give ``page``'s memory back. The caller guarantees no live block and no pending GPU read."""
        self._check_page(page)
        chunks = self._chunks.pop(page, None)
        if chunks is None:
            raise DriverError("unmap_page", "NOT_MAPPED", f"page {page} is not mapped")
        self._undo(page, chunks, raise_first=True)

    def _back_with_scratch(self, addr: int) -> None:
        assert self._scratch is not None
        self.backend.map(addr, self.chunk_bytes, self._scratch)
        self.backend.set_access(addr, self.chunk_bytes)

    def _scratch_teardown(self) -> None:
        """Unmap the scratch view from every slot of every page without memory of its own, then free it."""
        if self._scratch is None:
            return
        for page in range(self.num_pages):
            if page in self._chunks:
                continue
            for base in self._bases:
                try:
                    self.backend.unmap(base + page * self.chunk_bytes, self.chunk_bytes)
                except Exception as exc:  # a slot the constructor had not reached yet
                    log.debug("scratch teardown, page %d: %s", page, exc)
        self.backend.release(self._scratch)
        self._scratch = None

    def _undo(self, page: int, chunks: list[Chunk], raise_first: bool = False, rescratch: bool = True) -> None:
        """Unmap and release ``chunks`` of ``page`` (in reverse), carrying on past errors; in a scratch-backed
        space, put the scratch view back in each slot (unless the space is closing)."""
        first: BaseException | None = None
        offset = page * self.chunk_bytes
        for base, chunk in reversed(list(zip(self._bases, chunks, strict=False))):
            try:
                self.backend.unmap(base + offset, chunk.size)
            except Exception as exc:  # keep going: leaking one chunk beats leaking all of them
                log.error("unmapping page %d: %s", page, exc)
                first = first or exc
            try:
                self.backend.release(chunk)
            except Exception as exc:
                log.error("releasing a chunk of page %d: %s", page, exc)
                first = first or exc
            if self._scratch is not None and rescratch:
                try:
                    self._back_with_scratch(base + offset)
                except Exception as exc:
                    log.error("putting scratch back under page %d: %s", page, exc)
                    first = first or exc
        if first is not None and raise_first:
            raise first

    def fence(self) -> Fence:
        """A fence after all work queued so far on the space's streams (default: the whole device)."""
        return self.backend.record_fence(self.streams)

    def _check_page(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise DriverError("page", "OUT_OF_RANGE", f"page {page} is outside 0..{self.num_pages - 1}")

    # -- lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap every page and free the address space. Views over it must not be used afterwards."""
        if self._closed:
            return
        self._closed = True
        if self._chunks:
            self.fence().wait()  # GPU work still queued on these pages must finish before they go
        self._scratch_teardown()  # skips the pages with memory of their own, undone next
        for page in list(self._chunks):
            chunks = self._chunks.pop(page)
            self._undo(page, chunks, rescratch=False)
        self._views = []
        del self._raw
        self.backend.free_reservation(self._va, self._va_bytes)

    def __enter__(self) -> KVSpace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        g = self.geometry
        return (
            f"{self.layout} KV space: {g.num_layers} layers x {g.buffers_per_layer} buffers, "
            f"{self.num_blocks} blocks of {format_bytes(g.group_bytes)} "
            f"({format_bytes(self.num_blocks * g.group_bytes)} virtual), "
            f"pages of {self.blocks_per_page} blocks = {format_bytes(self.page_bytes)} on {self.backend.device_label}"
        )


def _check_plan(plan: PagePlan, backend: MemoryBackend, geometry: KVGeometry, layout: str | None, sized: bool) -> None:
    """A space given a plan takes every number from it: refuse one made for another geometry, layout or
    granularity, or sizing arguments that would contradict it."""
    if sized:
        raise ConfigError("KVSpace: pass a plan or num_blocks, chunk_bytes, min_chunk_bytes, null_blocks; not both")
    if plan.geometry != geometry:
        raise ConfigError(f"KVSpace: the plan is for {plan.geometry}, not {geometry}")
    if layout is not None and layout != plan.layout:
        raise ConfigError(f"KVSpace: the plan is for the {plan.layout} layout, not {layout}")
    if plan.granularity != backend.granularity:
        raise ConfigError(
            f"KVSpace: the plan is for a {format_bytes(plan.granularity)} granularity; "
            f"{backend.device_label} maps {format_bytes(backend.granularity)}"
        )
