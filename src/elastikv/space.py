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
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from elastikv.config import LAYOUTS, LayoutName, check_choice, format_bytes
from elastikv.errors import ConfigError, DriverError
from elastikv.memory import Chunk, Fence, MemoryBackend, round_up

log = logging.getLogger(__name__)

_MAX_CHUNK = 2 * 1024**3  # a default chunk larger than this means the geometry fits the granularity badly


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


def default_chunk_bytes(unit: int, granularity: int, *, target_blocks: int | None = None, what: str = "block") -> int:
    """The chunk a space makes by default for ``unit``-byte blocks: about ``target_blocks`` of them (default:
    as many as fill one granule), rounded up to a multiple of both the unit and the granularity.

    Engines that size their cache themselves (vLLM) use it to pick a block count of whole pages.
    """
    if target_blocks is None:
        target_blocks = max(1, granularity // unit)
    chunk = round_up(target_blocks * unit, math.lcm(unit, granularity))
    if chunk > _MAX_CHUNK:
        raise ConfigError(
            f"the {what} is {unit} bytes, which fits the {format_bytes(granularity)} granularity badly "
            f"(a page would need {format_bytes(chunk)}); pass chunk_bytes, a multiple of both"
        )
    return chunk


@dataclass(frozen=True)
class KVGeometry:
    """Shape of one engine's KV cache, independent of how many blocks it has.

    ``block_shape`` is one block of one buffer of one layer, e.g. ``(block_size, kv_heads, head_dim)``;
    ``buffers_per_layer`` is 2 for K and V, 1 for MLA's joint latent.
    """

    num_layers: int
    block_shape: tuple[int, ...]
    dtype: torch.dtype
    buffers_per_layer: int = 2

    def __post_init__(self) -> None:
        for name in ("num_layers", "buffers_per_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"KVGeometry.{name} must be a positive whole number, got {value!r}")
        shape = tuple(self.block_shape)
        if not shape or any(not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in shape):
            raise ConfigError(f"KVGeometry.block_shape must be positive whole numbers, got {self.block_shape!r}")
        object.__setattr__(self, "block_shape", shape)
        if not isinstance(self.dtype, torch.dtype):
            raise ConfigError(f"KVGeometry.dtype must be a torch.dtype such as torch.bfloat16, got {self.dtype!r}")

    @classmethod
    def for_attention(
        cls,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        buffers_per_layer: int = 2,
    ) -> KVGeometry:
        return cls(num_layers, (block_size, num_kv_heads, head_dim), dtype, buffers_per_layer)

    @property
    def num_buffers(self) -> int:
        return self.num_layers * self.buffers_per_layer

    @property
    def block_elems(self) -> int:
        return math.prod(self.block_shape)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in one buffer of one layer."""
        return self.block_elems * self.dtype.itemsize

    @property
    def group_bytes(self) -> int:
        """Bytes of one block across every layer and buffer: what one block id really costs."""
        return self.num_buffers * self.block_bytes


def chunk_bytes_for(
    geometry: KVGeometry, layout: LayoutName, granularity: int, min_chunk_bytes: int | None = None
) -> int:
    """The chunk a :class:`KVSpace` of ``geometry`` and ``layout`` makes when not given ``chunk_bytes``: one
    block (per-layer) or block group (interleaved) per granule, at least one; raised to ``min_chunk_bytes``
    (``ELASTIKV_CHUNK``) rounded up to whole default chunks. Engines that size their pool in pages call it too."""
    unit = geometry.block_bytes if layout == "per-layer" else geometry.group_bytes
    what = "block" if layout == "per-layer" else "block group (one block in every layer and buffer)"
    chunk = default_chunk_bytes(unit, granularity, target_blocks=max(1, granularity // geometry.block_bytes), what=what)
    if min_chunk_bytes is not None and min_chunk_bytes > chunk:
        # Fewer, larger chunks: the driver's cost is per mapping, not per byte (DESIGN: flat 2-128 MiB).
        chunk = round_up(min_chunk_bytes, chunk)  # the default is a multiple of the block and granule
        if chunk > _MAX_CHUNK:
            raise ConfigError(f"ELASTIKV_CHUNK: {format_bytes(chunk)} chunks are too large; use at most 2GiB")
    return chunk


class KVSpace:
    """An engine's KV buffers over reserved virtual memory; pages are mapped and unmapped on request.

    ``num_blocks`` defaults to the *virtual capacity*: as many blocks as the device's total memory could
    hold, never a snapshot of free memory. It is rounded up to whole pages. ``chunk_bytes`` overrides the
    chunk size (it must be a multiple of the granularity and hold whole blocks); ``min_chunk_bytes`` only
    raises the default, rounded up to whole blocks and granules (``ELASTIKV_CHUNK``). The first ``null_blocks``
    blocks form an always-mapped region the allocator never hands out (engines that pad block tables with a
    null block point them there). ``streams`` are the raw CUDA stream handles whose work must finish before
    a page is unmapped, for an engine that knows them all; by default every stream of the device (the fence
    synchronizes the device), which needs no knowledge of the engine.

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
        layout: LayoutName = "interleaved",
        num_blocks: int | None = None,
        chunk_bytes: int | None = None,
        min_chunk_bytes: int | None = None,
        null_blocks: int = 0,
        streams: Sequence[int] | None = None,
        scratch_backed: bool = False,
    ) -> None:
        check_choice(layout, LAYOUTS, "layout")
        self.backend = backend
        self.geometry = geometry
        self.layout: LayoutName = layout
        gran = backend.granularity
        g = geometry

        # Chunk size and blocks per page.
        unit = g.block_bytes if layout == "per-layer" else g.group_bytes
        what = "block" if layout == "per-layer" else "block group (one block in every layer and buffer)"
        if chunk_bytes is None:
            chunk = chunk_bytes_for(g, layout, gran, min_chunk_bytes)
        else:
            chunk = chunk_bytes
            if not isinstance(chunk, int) or chunk <= 0 or chunk % gran:
                raise ConfigError(
                    f"chunk_bytes={chunk_bytes!r} must be a positive multiple of the {format_bytes(gran)} granularity"
                )
            if chunk < unit:
                raise ConfigError(
                    f"a {what} of {format_bytes(unit)} is bigger than the {format_bytes(chunk)} chunk; "
                    f"use chunk_bytes of at least {round_up(unit, gran)}"
                )
            if chunk % unit:
                raise ConfigError(
                    f"{format_bytes(unit)} blocks do not divide the {format_bytes(chunk)} chunk; "
                    f"use a chunk_bytes that is a multiple of {unit} and of {gran}"
                )
        self.chunk_bytes = chunk
        self.blocks_per_page = chunk // unit
        self.chunks_per_page = g.num_buffers if layout == "per-layer" else 1
        self.page_bytes = chunk * self.chunks_per_page

        # Capacity, in whole pages.
        if num_blocks is None:
            _, total = backend.mem_info()
            num_blocks = total // g.group_bytes
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks <= 0:
            raise ConfigError(f"num_blocks must be a positive whole number, got {num_blocks!r}")
        self.num_pages = -(-num_blocks // self.blocks_per_page)
        self.num_blocks = self.num_pages * self.blocks_per_page
        if not isinstance(null_blocks, int) or not 0 <= null_blocks < self.num_blocks:
            raise ConfigError(f"null_blocks must be between 0 and {self.num_blocks - 1}, got {null_blocks!r}")
        self.null_blocks = null_blocks

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
