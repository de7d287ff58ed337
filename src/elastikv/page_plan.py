"""Page plans: how one engine's KV cache divides into chunks, pages and blocks, computed once.

Why a module of its own: the same arithmetic (the chunk for a geometry, a layout, the granularity and
``ELASTIKV_CHUNK``; blocks per page; a block count or a byte capacity rounded to whole pages; the null blocks at
the front; SGLang's front padding) was computed by :class:`~elastikv.space.KVSpace`, by vLLM's worker (to report a
capacity whose block count fills whole pages) and by SGLang's pools (to pad SGLang's page 0 to a page boundary),
each its own way, and they had to agree to the byte. Now a :class:`PagePlan` is made once by a named constructor,
and the space and the adapters read its numbers. Nothing here touches memory: it is arithmetic over a
:class:`KVGeometry`, so it can be tested exhaustively and used by engines before any space exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from elastikv.config import LAYOUTS, LayoutName, check_choice, format_bytes
from elastikv.errors import ConfigError
from elastikv.memory import round_up

MAX_CHUNK = 2 * 1024**3  # a chunk larger than this means the geometry fits the granularity badly


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


def unit_bytes(geometry: KVGeometry, layout: LayoutName) -> int:
    """What one block id takes in one chunk: a block of one buffer (``per-layer``: a page is a chunk in each
    buffer's range) or a block of every buffer (``interleaved``: a page is one chunk)."""
    return geometry.block_bytes if layout == "per-layer" else geometry.group_bytes


def chunks_per_page(geometry: KVGeometry, layout: LayoutName) -> int:
    """Chunks mapped for one page: one in each buffer's range (``per-layer``), or one (``interleaved``)."""
    return geometry.num_buffers if layout == "per-layer" else 1


def _unit_name(layout: LayoutName) -> str:
    return "block" if layout == "per-layer" else "block group (one block in every layer and buffer)"


def default_chunk_bytes(unit: int, granularity: int, *, target_blocks: int | None = None, what: str = "block") -> int:
    """About ``target_blocks`` units (default: as many as fill one granule), rounded up to a multiple of both the
    unit and the granularity: the smallest chunk that maps whole granules and holds whole blocks."""
    if target_blocks is None:
        target_blocks = max(1, granularity // unit)
    chunk = round_up(target_blocks * unit, math.lcm(unit, granularity))
    if chunk > MAX_CHUNK:
        raise ConfigError(
            f"the {what} is {unit} bytes, which fits the {format_bytes(granularity)} granularity badly "
            f"(a page would need {format_bytes(chunk)}); pass chunk_bytes, a multiple of both"
        )
    return chunk


def chunk_bytes_for(
    geometry: KVGeometry,
    layout: LayoutName,
    granularity: int,
    min_chunk_bytes: int | None = None,
    *,
    target_blocks: int | None = None,
) -> int:
    """The default chunk: one block (per-layer) or block group (interleaved) per granule-sized block, so both
    layouts give a page the same number of blocks; ``target_blocks`` overrides that count (vLLM's block-outermost
    plan, whose flattened geometry no longer knows a layer's block). Raised to ``min_chunk_bytes``
    (``ELASTIKV_CHUNK``) rounded up to whole default chunks, so still whole blocks and granules."""
    check_choice(layout, LAYOUTS, "layout")
    if target_blocks is None:
        target_blocks = max(1, granularity // geometry.block_bytes)
    unit = unit_bytes(geometry, layout)
    chunk = default_chunk_bytes(unit, granularity, target_blocks=target_blocks, what=_unit_name(layout))
    if min_chunk_bytes is not None and min_chunk_bytes > chunk:
        # Fewer, larger chunks: the driver's cost is per mapping, not per byte (DESIGN: flat 2-128 MiB).
        chunk = round_up(min_chunk_bytes, chunk)  # the default is a multiple of the block and granule
        if chunk > MAX_CHUNK:
            raise ConfigError(f"ELASTIKV_CHUNK: {format_bytes(chunk)} chunks are too large; use at most 2GiB")
    return chunk


def _checked_chunk(geometry: KVGeometry, layout: LayoutName, granularity: int, chunk_bytes: object) -> int:
    """A chunk size the caller chose, refused (naming the fix) unless it maps whole granules and holds whole
    blocks."""
    check_choice(layout, LAYOUTS, "layout")
    unit = unit_bytes(geometry, layout)
    if not isinstance(chunk_bytes, int) or chunk_bytes <= 0 or chunk_bytes % granularity:
        raise ConfigError(
            f"chunk_bytes={chunk_bytes!r} must be a positive multiple of the {format_bytes(granularity)} granularity"
        )
    if chunk_bytes < unit:
        raise ConfigError(
            f"a {_unit_name(layout)} of {format_bytes(unit)} is bigger than the {format_bytes(chunk_bytes)} chunk; "
            f"use chunk_bytes of at least {round_up(unit, granularity)}"
        )
    if chunk_bytes % unit:
        raise ConfigError(
            f"{format_bytes(unit)} blocks do not divide the {format_bytes(chunk_bytes)} chunk; "
            f"use a chunk_bytes that is a multiple of {unit} and of {granularity}"
        )
    return chunk_bytes


@dataclass(frozen=True)
class PagePlan:
    """How one KV cache of ``geometry`` in ``layout`` is cut into chunks, pages and blocks.

    Invariants (``__post_init__`` checks them whichever way the plan was made):

    - ``chunk_bytes`` is a positive multiple of ``granularity`` (a chunk maps whole granules) and of
      :func:`unit_bytes` (it holds whole blocks, so no block straddles two pages);
    - a page is ``chunks_per_page`` chunks, the same slot in each range (one per buffer per-layer, one in
      interleaved), and holds exactly ``blocks_per_page = chunk_bytes // unit`` blocks;
    - ``num_blocks = num_pages * blocks_per_page``: a whole number of pages, at least one;
    - ``0 <= null_blocks < num_blocks``: the first ``null_blocks`` blocks are mapped at start, never handed out,
      never unmapped;
    - ``0 <= front_padding <= null_blocks`` and ``front_padding < blocks_per_page``: an engine that wants an exact
      row count (SGLang) sees block ``b`` of its own as block ``b + front_padding``; the padding is null.

    Make one with a named constructor: :meth:`for_blocks` (a block count, rounded up: KVSpace, vLLM's plan),
    :meth:`for_capacity` (a byte capacity, rounded down: vLLM's reported capacity), :meth:`for_front_padded`
    (an exact row count padded at the front: SGLang's pool).
    """

    geometry: KVGeometry
    layout: LayoutName
    granularity: int
    chunk_bytes: int
    num_pages: int
    null_blocks: int = 0
    front_padding: int = 0

    def __post_init__(self) -> None:
        check_choice(self.layout, LAYOUTS, "layout")
        gran, chunk, unit = self.granularity, self.chunk_bytes, self.unit_bytes
        if gran <= 0 or chunk <= 0 or chunk % gran or chunk % unit:
            raise ConfigError(f"PagePlan: a {chunk}-byte chunk is not whole {gran}-byte granules of {unit}-byte blocks")
        if self.num_pages < 1:
            raise ConfigError(f"PagePlan: num_pages must be at least 1, got {self.num_pages}")
        if not isinstance(self.null_blocks, int) or not 0 <= self.null_blocks < self.num_blocks:
            raise ConfigError(f"null_blocks must be between 0 and {self.num_blocks - 1}, got {self.null_blocks!r}")
        if not 0 <= self.front_padding <= self.null_blocks or self.front_padding >= self.blocks_per_page:
            raise ConfigError(
                f"PagePlan: front_padding {self.front_padding} must be null blocks within the first page "
                f"({self.null_blocks} null, {self.blocks_per_page} blocks a page)"
            )

    # -- what the numbers are ------------------------------------------------------------------------------
    @property
    def unit_bytes(self) -> int:
        """What one block id takes in one chunk (see :func:`unit_bytes`)."""
        return unit_bytes(self.geometry, self.layout)

    @property
    def chunks_per_page(self) -> int:
        return chunks_per_page(self.geometry, self.layout)

    @property
    def blocks_per_page(self) -> int:
        return self.chunk_bytes // self.unit_bytes

    @property
    def page_bytes(self) -> int:
        """Physical bytes of one mapped page: ``blocks_per_page`` blocks of every layer and buffer."""
        return self.chunk_bytes * self.chunks_per_page

    @property
    def num_blocks(self) -> int:
        return self.num_pages * self.blocks_per_page

    @property
    def capacity_bytes(self) -> int:
        """The whole plan's bytes (its virtual size): every page mapped."""
        return self.num_pages * self.page_bytes

    # -- named constructors --------------------------------------------------------------------------------
    @staticmethod
    def chunk_size(
        geometry: KVGeometry,
        layout: LayoutName,
        granularity: int,
        *,
        chunk_bytes: int | None = None,
        min_chunk_bytes: int | None = None,
        target_blocks: int | None = None,
    ) -> int:
        """``chunk_bytes`` checked, if given (``min_chunk_bytes`` then does not apply), else the default chunk
        (:func:`chunk_bytes_for`)."""
        if chunk_bytes is not None:
            return _checked_chunk(geometry, layout, granularity, chunk_bytes)
        return chunk_bytes_for(geometry, layout, granularity, min_chunk_bytes, target_blocks=target_blocks)

    @classmethod
    def for_blocks(
        cls,
        geometry: KVGeometry,
        layout: LayoutName,
        granularity: int,
        *,
        num_blocks: int,
        null_blocks: int = 0,
        chunk_bytes: int | None = None,
        min_chunk_bytes: int | None = None,
    ) -> PagePlan:
        """At least ``num_blocks`` blocks, rounded *up* to whole pages (a space asked for 100 blocks of 32-block
        pages has 128). An engine that needs exactly ``num_blocks`` (vLLM planned them) compares
        ``num_blocks`` afterwards."""
        chunk = cls.chunk_size(geometry, layout, granularity, chunk_bytes=chunk_bytes, min_chunk_bytes=min_chunk_bytes)
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks <= 0:
            raise ConfigError(f"num_blocks must be a positive whole number, got {num_blocks!r}")
        num_pages = -(-num_blocks // (chunk // unit_bytes(geometry, layout)))
        return cls(geometry, layout, granularity, chunk, num_pages, null_blocks)

    @classmethod
    def for_capacity(
        cls,
        geometry: KVGeometry,
        layout: LayoutName,
        granularity: int,
        *,
        capacity_bytes: int,
        null_blocks: int = 0,
        chunk_bytes: int | None = None,
        min_chunk_bytes: int | None = None,
        target_blocks: int | None = None,
    ) -> PagePlan:
        """As many whole pages as ``capacity_bytes`` (the device's memory) holds, rounded *down*: an engine that
        turns a byte count into blocks itself (vLLM divides by its block size) then plans whole pages, and never
        more than the bytes given."""
        chunk = cls.chunk_size(
            geometry,
            layout,
            granularity,
            chunk_bytes=chunk_bytes,
            min_chunk_bytes=min_chunk_bytes,
            target_blocks=target_blocks,
        )
        page = chunk * chunks_per_page(geometry, layout)
        num_pages = capacity_bytes // page
        if num_pages < 1:
            raise ConfigError(
                f"the device ({format_bytes(capacity_bytes)}) cannot hold one page of {format_bytes(page)}"
            )
        return cls(geometry, layout, granularity, chunk, num_pages, null_blocks)

    @classmethod
    def for_front_padded(
        cls,
        geometry: KVGeometry,
        layout: LayoutName,
        granularity: int,
        *,
        engine_blocks: int,
        engine_null_blocks: int = 1,
        min_chunk_bytes: int | None = None,
    ) -> PagePlan:
        """For an engine that indexes exactly ``engine_blocks`` rows, its first ``engine_null_blocks`` being its
        own null ones (SGLang: its padded page 0, then pages 1..P, so ``P + 1`` rows and one null). A plan has
        whole pages, so the rows are padded at the *front*: the engine's block ``b`` is the plan's block
        ``b + front_padding``, the padding and the engine's null blocks are the plan's ``null_blocks``, and the
        blocks the allocator hands out (``null_blocks .. num_blocks - 1``) are exactly the engine's
        ``engine_null_blocks .. engine_blocks - 1``. Padding at the back instead would leave blocks the engine
        cannot address in the allocator's hands."""
        chunk = chunk_bytes_for(geometry, layout, granularity, min_chunk_bytes)
        for name, value, least in (("engine_blocks", engine_blocks, 1), ("engine_null_blocks", engine_null_blocks, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{name} must be a whole number of at least {least}, got {value!r}")
        per_page = chunk // unit_bytes(geometry, layout)
        num_pages = -(-engine_blocks // per_page)
        padding = num_pages * per_page - engine_blocks
        return cls(geometry, layout, granularity, chunk, num_pages, padding + engine_null_blocks, padding)
