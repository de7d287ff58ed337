"""PagePlan: the page arithmetic every engine and KVSpace share, checked as properties over many geometries, and
a KVSpace made from a plan checked on the real host backend (its numbers, its memory, its null blocks)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tests.conftest import MULTI, SMALL, used_bytes

from elastikv.allocator import BlockAllocator
from elastikv.config import Settings
from elastikv.errors import AllocationRefused, ConfigError
from elastikv.instance import open_instance
from elastikv.memory import HostBackend, MemoryBackend
from elastikv.page_plan import MAX_CHUNK, KVGeometry, PagePlan, chunks_per_page, unit_bytes
from elastikv.space import KVSpace

KiB, MiB = 1024, 1024**2
LAYOUTS = ("interleaved", "per-layer")
PROPERTY = settings(max_examples=300, deadline=None)

geometries = st.builds(
    KVGeometry.for_attention,
    num_layers=st.integers(1, 64),
    num_kv_heads=st.sampled_from([1, 2, 3, 4, 5, 8, 16]),
    head_dim=st.sampled_from([64, 80, 96, 128, 192, 256, 576]),
    block_size=st.sampled_from([1, 8, 16, 32, 64]),
    dtype=st.sampled_from([torch.uint8, torch.bfloat16, torch.float32]),
    buffers_per_layer=st.integers(1, 2),
)
pow2_geometries = st.builds(  # blocks of a power of two bytes: they divide every granule up to their size
    KVGeometry.for_attention,
    num_layers=st.integers(1, 64),
    num_kv_heads=st.sampled_from([1, 2, 4, 8]),
    head_dim=st.sampled_from([64, 128, 256]),
    block_size=st.sampled_from([1, 8, 16]),
    dtype=st.sampled_from([torch.uint8, torch.bfloat16, torch.float32]),
    buffers_per_layer=st.integers(1, 2),
)
granularities = st.sampled_from([4 * KiB, 64 * KiB, 2 * MiB])  # host pages, small GPUs' and the H100's
min_chunks = st.none() | st.integers(1, 256 * MiB)
# vLLM's page of one layer: block size x heads x head size x (K and V) x dtype bytes
vllm_layer_pages = st.builds(
    lambda *factors: math.prod(factors),
    *(st.sampled_from(f) for f in ([1, 16, 32], [1, 2, 8], [64, 96, 128, 576], [1, 2], [1, 2, 4])),
)


def made(build: Callable[[], PagePlan]) -> PagePlan:
    """The plan, or (rejecting the example) the documented refusal of a chunk over 2 GiB."""
    try:
        return build()
    except ConfigError as exc:
        assert "badly" in str(exc) or "ELASTIKV_CHUNK" in str(exc), exc
        assume(False)
        raise


def check_invariants(plan: PagePlan) -> None:
    """What the class docstring promises, whichever constructor made the plan."""
    unit = unit_bytes(plan.geometry, plan.layout)
    assert plan.chunk_bytes % plan.granularity == 0, "a chunk maps whole granules"
    assert plan.chunk_bytes % unit == 0 and plan.blocks_per_page == plan.chunk_bytes // unit >= 1
    assert plan.chunk_bytes <= MAX_CHUNK
    assert plan.chunks_per_page == (plan.geometry.num_buffers if plan.layout == "per-layer" else 1)
    assert plan.page_bytes == plan.blocks_per_page * plan.geometry.group_bytes, "a page is whole blocks of all"
    assert plan.num_pages >= 1 and plan.num_blocks == plan.num_pages * plan.blocks_per_page
    assert plan.capacity_bytes == plan.num_blocks * plan.geometry.group_bytes
    assert 0 <= plan.null_blocks < plan.num_blocks
    assert 0 <= plan.front_padding <= plan.null_blocks and plan.front_padding < plan.blocks_per_page


@PROPERTY
@given(geometries, st.sampled_from(LAYOUTS), granularities, min_chunks, st.integers(1, 10**7), st.data())
def test_a_block_count_is_rounded_up_to_whole_pages(
    geometry: KVGeometry, layout: str, gran: int, min_chunk: int | None, num_blocks: int, data: st.DataObject
) -> None:
    null = data.draw(st.integers(0, num_blocks - 1))
    plan = made(lambda: PagePlan.for_blocks(geometry, layout, gran, num_blocks=num_blocks, null_blocks=null,
                                            min_chunk_bytes=min_chunk))  # type: ignore[arg-type]  # fmt: skip
    check_invariants(plan)
    assert num_blocks <= plan.num_blocks < num_blocks + plan.blocks_per_page, "rounded up, by less than a page"
    assert plan.null_blocks == null and plan.front_padding == 0
    default = made(lambda: PagePlan.for_blocks(geometry, layout, gran, num_blocks=1))  # type: ignore[arg-type]
    unit = unit_bytes(geometry, layout)
    target = max(1, gran // geometry.block_bytes)
    assert default.chunk_bytes - math.lcm(unit, gran) < target * unit <= default.chunk_bytes, "smallest such chunk"
    if min_chunk is None or min_chunk <= default.chunk_bytes:
        assert plan.chunk_bytes == default.chunk_bytes, "ELASTIKV_CHUNK only ever raises the chunk"
    else:
        assert plan.chunk_bytes % default.chunk_bytes == 0, "whole default chunks, so whole blocks and granules"
        assert min_chunk <= plan.chunk_bytes < min_chunk + default.chunk_bytes


@PROPERTY
@given(pow2_geometries, granularities)
def test_both_layouts_give_a_page_as_many_blocks_when_a_block_divides_the_granule(
    geometry: KVGeometry, gran: int
) -> None:
    """docs/architecture.md: the layouts are equally elastic; they differ in mapping cost, not page size."""
    assume(gran % geometry.block_bytes == 0)
    plans = [made(lambda lay=lay: PagePlan.for_blocks(geometry, lay, gran, num_blocks=1)) for lay in LAYOUTS]  # type: ignore[misc]
    assert plans[0].blocks_per_page == plans[1].blocks_per_page == gran // geometry.block_bytes
    assert plans[0].page_bytes == plans[1].page_bytes
    assert chunks_per_page(geometry, "per-layer") * plans[1].chunk_bytes == plans[0].chunk_bytes


@PROPERTY
@given(geometries, st.sampled_from(LAYOUTS), granularities, st.integers(0, 2**42))
def test_a_capacity_is_rounded_down_to_whole_pages(geometry: KVGeometry, layout: str, gran: int, capacity: int) -> None:
    def build() -> PagePlan:
        return PagePlan.for_capacity(geometry, layout, gran, capacity_bytes=capacity)  # type: ignore[arg-type]

    page = made(lambda: PagePlan.for_blocks(geometry, layout, gran, num_blocks=1)).page_bytes  # type: ignore[arg-type]
    if capacity < page:
        with pytest.raises(ConfigError, match="cannot hold one page"):
            build()
        return
    plan = made(build)
    check_invariants(plan)
    assert plan.page_bytes == page
    assert plan.capacity_bytes <= capacity < plan.capacity_bytes + plan.page_bytes, "never more, less than a page lost"
    assert capacity // geometry.group_bytes >= plan.num_blocks  # an engine dividing by its block size gets at least


@PROPERTY
@given(
    vllm_layer_pages,
    st.sampled_from([1, 2, 12, 16, 24, 28, 32, 36, 40, 48, 61, 64, 80]),
    st.sampled_from([1, 256, 4 * KiB]),
    granularities,
    st.integers(2**28, 2**40),
    st.booleans(),
    min_chunks,
)
def test_the_capacity_vllm_is_told_gives_a_block_count_of_whole_pages_of_its_space(
    page: int, layers: int, align: int, gran: int, total: int, block_outermost: bool, min_chunk: int | None
) -> None:
    """The contract between vLLM's worker (``_capacity``: the capacity plan) and ``open_space`` (the space's plan
    for the block count vLLM derives from it): vLLM divides the capacity by its block size, and that count must be
    whole pages of the space, or ``open_space`` refuses it. A per-layer plan takes ``ELASTIKV_CHUNK`` in both."""
    if block_outermost:  # one flattened block of every layer, padded to the alignment
        unit = -(-page * layers // align) * align
        geometry, layout = KVGeometry(1, (unit,), torch.uint8, buffers_per_layer=1), "interleaved"
        target, min_chunk = max(1, gran // page), None
    else:  # a range per layer
        unit = page * layers
        geometry, layout, target = KVGeometry(layers, (page,), torch.uint8, buffers_per_layer=1), "per-layer", None
    try:
        capacity = PagePlan.for_capacity(geometry, layout, gran, capacity_bytes=total, target_blocks=target,  # type: ignore[arg-type]
                                         min_chunk_bytes=min_chunk)  # fmt: skip
    except ConfigError as exc:
        assert "badly" in str(exc) or "cannot hold one page" in str(exc), exc
        assume(False)
        raise
    check_invariants(capacity)
    vllm_blocks = capacity.capacity_bytes // unit
    assume(vllm_blocks > 1)  # block 0 is vLLM's null block
    space = PagePlan.for_blocks(geometry, layout, gran, num_blocks=vllm_blocks, null_blocks=1,  # type: ignore[arg-type]
                                min_chunk_bytes=min_chunk)  # fmt: skip
    assert space.num_blocks == vllm_blocks, "open_space would refuse vLLM's plan"
    assert capacity.blocks_per_page % space.blocks_per_page == 0


@PROPERTY
@given(geometries, granularities, min_chunks, st.integers(1, 200_000), st.sampled_from([1, 4, 16, 64]))
def test_sglang_pages_sit_after_a_front_padding_and_are_exactly_the_allocators_blocks(
    geometry: KVGeometry, gran: int, min_chunk: int | None, pages: int, page_size: int
) -> None:
    plan = made(
        lambda: PagePlan.for_front_padded(
            geometry, "per-layer", gran, engine_blocks=pages + 1, engine_null_blocks=1, min_chunk_bytes=min_chunk
        )
    )
    check_invariants(plan)
    offset = plan.front_padding
    assert plan.num_blocks == offset + pages + 1, "exactly SGLang's page 0 and pages 1..P after the padding"
    rows = slice(offset * page_size, plan.num_blocks * page_size)  # what open_pool_space hands SGLang
    assert rows.stop - rows.start == (pages + 1) * page_size
    assert 0 + offset < plan.null_blocks, "SGLang's page 0 is a null block"
    handed_out = range(plan.null_blocks, plan.num_blocks)  # what the allocator may hand out
    assert list(handed_out) == [p + offset for p in range(1, pages + 1)]


def test_a_front_padded_plan_without_an_engine_page_is_refused() -> None:
    """One row (SGLang's page 0 alone): the plan would be all null blocks, the message KVSpace always gave."""
    with pytest.raises(ConfigError, match="null_blocks must be between 0 and 31, got 32"):
        PagePlan.for_front_padded(SMALL, "per-layer", 2 * MiB, engine_blocks=1)
    with pytest.raises(ConfigError, match="engine_blocks"):
        PagePlan.for_front_padded(SMALL, "per-layer", 2 * MiB, engine_blocks=0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"chunk_bytes": 3 * MiB}, "not whole"),  # not whole granules
        ({"chunk_bytes": 2 * MiB, "geometry": KVGeometry(1, (3, 8, 128), torch.float32)}, "not whole"),  # blocks
        ({"num_pages": 0}, "num_pages"),
        ({"null_blocks": 32}, "null_blocks must be between 0 and 31"),
        ({"null_blocks": 2, "front_padding": 3}, "front_padding"),
        ({"null_blocks": 2, "front_padding": 32, "num_pages": 2}, "front_padding"),
        ({"layout": "diagonal"}, "not one of"),
    ],
)
def test_a_plan_that_breaks_an_invariant_cannot_be_made(fields: dict[str, object], message: str) -> None:
    kwargs: dict[str, object] = {"geometry": SMALL, "layout": "per-layer", "granularity": 2 * MiB,
                                 "chunk_bytes": 2 * MiB, "num_pages": 1, **fields}  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        PagePlan(**kwargs)  # type: ignore[arg-type]


# -- a KVSpace made from a plan, on the host backend ------------------------------------------------------------


@pytest.fixture
def host() -> MemoryBackend:
    be = HostBackend(total_bytes=512 * MiB)
    yield be  # type: ignore[misc]
    be.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_space_built_from_a_plan_has_exactly_its_numbers(host: MemoryBackend, layout: str) -> None:
    plan = PagePlan.for_blocks(MULTI, layout, host.granularity, num_blocks=70, null_blocks=3)  # type: ignore[arg-type]
    before = used_bytes(host)
    with KVSpace(host, MULTI, plan=plan) as space:
        assert space.plan is plan and space.layout == layout
        got = (space.chunk_bytes, space.chunks_per_page, space.blocks_per_page, space.page_bytes, space.num_pages,
               space.num_blocks, space.null_blocks)  # fmt: skip
        assert got == (plan.chunk_bytes, plan.chunks_per_page, plan.blocks_per_page, plan.page_bytes, plan.num_pages,
                       plan.num_blocks, plan.null_blocks)  # fmt: skip
        assert space.raw.numel() == plan.capacity_bytes, "reserved: every page of the plan, nothing more"
        assert space.buffer(2, 1).shape == (plan.num_blocks, *MULTI.block_shape)
        alloc = BlockAllocator(space, reserve_bytes=0, background=False, trim_delay=0.0)
        assert used_bytes(host) - before == plan.page_bytes, "page 0 (the null blocks) mapped at start"
        blocks = alloc.allocate(plan.num_blocks - plan.null_blocks)
        assert sorted(blocks) == list(range(plan.null_blocks, plan.num_blocks)), "every block but the null ones"
        assert used_bytes(host) - before == plan.capacity_bytes
        alloc.free(blocks)
        alloc.close()
    assert used_bytes(host) == before


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_space_sized_by_arguments_makes_the_same_plan(host: MemoryBackend, layout: str) -> None:
    """KVSpace's own sizing is PagePlan.for_blocks: one arithmetic, whichever way a space is asked for."""
    sizing = {"num_blocks": 100, "null_blocks": 2, "min_chunk_bytes": 5 * MiB}
    with KVSpace(host, MULTI, layout=layout, **sizing) as space:  # type: ignore[arg-type]
        assert space.plan == PagePlan.for_blocks(MULTI, layout, host.granularity, **sizing)  # type: ignore[arg-type]
    with KVSpace(host, SMALL) as space:  # the default: the device's total memory, in whole pages
        assert space.plan == PagePlan.for_blocks(
            SMALL, "interleaved", host.granularity, num_blocks=host.mem_info()[1] // SMALL.group_bytes
        )


def test_a_front_padded_space_hands_out_exactly_sglangs_pages(host: MemoryBackend) -> None:
    pages = 45  # SGLang's pages 1..45 and its page 0: 46 rows, padded to two 32-block pages
    plan = PagePlan.for_front_padded(SMALL, "per-layer", host.granularity, engine_blocks=pages + 1)
    assert (plan.num_blocks, plan.front_padding, plan.null_blocks) == (64, 18, 19)
    with KVSpace(host, SMALL, plan=plan) as space:
        alloc = BlockAllocator(space, reserve_bytes=0, background=False)
        blocks = alloc.allocate(pages)
        assert sorted(b - plan.front_padding for b in blocks) == list(range(1, pages + 1))
        with pytest.raises(AllocationRefused):
            alloc.allocate(1)  # the padding and SGLang's page 0 are never handed out
        alloc.free(blocks)
        alloc.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"geometry": MULTI}, "the plan is for"),
        ({"layout": "interleaved"}, "the plan is for the per-layer layout"),
        ({"num_blocks": 64}, "not both"),
        ({"null_blocks": 1}, "not both"),
        ({"min_chunk_bytes": 4 * MiB}, "not both"),
        ({"plan_granularity": 4 * MiB}, "granularity"),
    ],
)
def test_a_space_refuses_a_plan_it_cannot_honour(host: MemoryBackend, kwargs: dict[str, object], message: str) -> None:
    gran = int(kwargs.pop("plan_granularity", host.granularity))  # type: ignore[call-overload]
    plan = PagePlan.for_blocks(SMALL, "per-layer", gran, num_blocks=64)
    geometry = kwargs.pop("geometry", SMALL)
    before = used_bytes(host)
    with pytest.raises(ConfigError, match=message):
        KVSpace(host, geometry, plan=plan, **kwargs)  # type: ignore[arg-type]
    assert used_bytes(host) == before


def test_an_instance_opened_with_a_plan_books_and_hands_out_its_blocks(host: MemoryBackend, tmp_path: Path) -> None:
    """open_instance(plan=...): what SGLang's pools do, end to end through the ledger and the allocator."""
    cfg = Settings.from_env({"ELASTIKV_LEDGER_DIR": str(tmp_path / "ledger"), "ELASTIKV_RESERVE": "0"})
    plan = PagePlan.for_front_padded(SMALL, "per-layer", host.granularity, engine_blocks=40)
    with open_instance(SMALL, engine="test", backend=host, plan=plan, settings=cfg) as inst:
        assert inst.space.plan is plan
        assert inst.allocator.capacity_bytes == plan.capacity_bytes
        blocks = inst.allocator.allocate(39)
        assert min(blocks) == plan.null_blocks and max(blocks) == plan.num_blocks - 1
        inst.allocator.free(blocks)
    with pytest.raises(ConfigError, match="not both"):
        open_instance(SMALL, engine="test", backend=host, plan=plan, settings=cfg, num_blocks=64)
