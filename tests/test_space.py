"""KVSpace: layouts, views, whole-page mapping with rollback, bad geometry."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import MULTI, SMALL, device_filled, used_bytes

from elastikv.allocator import BlockAllocator
from elastikv.errors import ConfigError, DriverError, OutOfMemory
from elastikv.memory import MemoryBackend
from elastikv.space import KVGeometry, KVSpace


def test_views_have_engine_shapes(backend: MemoryBackend, layout: str) -> None:
    with KVSpace(backend, MULTI, layout=layout, num_blocks=100) as space:
        assert space.num_blocks % space.blocks_per_page == 0 and space.num_blocks >= 100
        assert len(space.buffers()) == 3 and all(len(row) == 2 for row in space.buffers())
        k = space.buffer(2, 0)
        assert k.shape == (space.num_blocks, 16, 8, 128) and k.dtype == torch.float32
        assert k.device.type == backend.name.replace("host", "cpu")
        if layout == "per-layer":
            assert k.is_contiguous()
            assert space.chunks_per_page == 6
        else:
            assert k.stride(0) == 6 * 16 * 8 * 128  # block stride: every layer and buffer of a block
            assert space.chunks_per_page == 1
        assert space.page_bytes == space.blocks_per_page * MULTI.group_bytes


def test_a_minimum_chunk_makes_fewer_larger_pages_of_whole_blocks(backend: MemoryBackend, layout: str) -> None:
    """ELASTIKV_CHUNK: chunks of at least that many bytes, rounded up to whole default chunks (so to whole
    blocks and granules); a minimum below the default changes nothing."""
    with KVSpace(backend, MULTI, layout=layout, num_blocks=100) as default:
        base = default.chunk_bytes
    with KVSpace(backend, MULTI, layout=layout, num_blocks=100, min_chunk_bytes=3 * base - 1) as space:
        assert space.chunk_bytes == 3 * base and space.blocks_per_page == 3 * default.blocks_per_page
        alloc = BlockAllocator(space, reserve_bytes=0, background=False)
        blocks = alloc.allocate(space.blocks_per_page + 1)  # a page and a block: two pages mapped
        assert alloc.stats().pages_mapped == 2
        alloc.free(blocks)
        alloc.close()
    with KVSpace(backend, MULTI, layout=layout, num_blocks=100, min_chunk_bytes=base // 2) as space:
        assert space.chunk_bytes == base
    with pytest.raises(ConfigError, match="ELASTIKV_CHUNK"):
        KVSpace(backend, MULTI, layout=layout, num_blocks=100, min_chunk_bytes=3 * 1024**3)


def test_every_buffer_of_every_block_is_its_own_memory(backend: MemoryBackend, layout: str) -> None:
    with KVSpace(backend, MULTI, layout=layout, num_blocks=64) as space:
        alloc = BlockAllocator(space, reserve_bytes=0, background=False)
        blocks = alloc.allocate(space.num_blocks)
        ids = torch.tensor(blocks, device=space.device)
        for layer in range(3):
            for b in range(2):
                value = (ids * 10 + layer * 2 + b).float()
                space.buffer(layer, b)[ids] = value.view(-1, 1, 1, 1).expand(-1, 16, 8, 128)
        for layer in range(3):
            for b in range(2):
                got = space.buffer(layer, b)[ids]
                want = (ids * 10 + layer * 2 + b).float().view(-1, 1, 1, 1)
                assert torch.equal(got, want.expand_as(got))
        alloc.close()


def test_data_survives_other_pages_mapping_and_unmapping(backend: MemoryBackend, layout: str) -> None:
    with KVSpace(backend, MULTI, layout=layout, num_blocks=8 * 32) as space:
        alloc = BlockAllocator(space, reserve_bytes=0, background=False, trim_delay=0.0)
        kept = alloc.allocate(40)  # a page and a bit
        kept_t = torch.tensor(kept, device=space.device)
        pattern = torch.randn(len(kept), 16, 8, 128, device=space.device)
        for layer in range(3):
            space.buffer(layer, 1)[kept_t] = pattern + layer
        now = 0.0
        for round_ in range(5):
            other = alloc.allocate(150 + round_)
            other_t = torch.tensor(other, device=space.device)
            space.buffer(0, 1)[other_t] = -1.0
            space.buffer(2, 0)[other_t] = -2.0
            alloc.free(other)
            now += 10
            alloc.maintain(now=now)
            alloc.maintain(now=now + 1)
            assert alloc.stats().pages_mapped == 2, "emptied pages were unmapped"
        for layer in range(3):
            assert torch.equal(space.buffer(layer, 1)[kept_t], pattern + layer)
        assert alloc.stats().pages_unmapped_total >= 5
        alloc.close()


def test_failed_map_rolls_back_every_chunk(backend: MemoryBackend) -> None:
    """Invariant 4 at the space's level: the driver says no on a chunk in the middle of a page."""
    with KVSpace(backend, MULTI, layout="per-layer", num_blocks=64) as space:
        assert space.chunks_per_page == 6
        before = used_bytes(backend)
        with device_filled(backend, leave=3 * space.chunk_bytes + backend.granularity // 2):
            filled = used_bytes(backend)
            with pytest.raises(OutOfMemory):
                space.map_page(1)
            assert not space.is_mapped(1) and space.mapped_pages == 0
            assert used_bytes(backend) == filled, "a chunk of the failed page leaked"
        assert used_bytes(backend) == before
        space.map_page(1)  # and the page maps fine once there is room
        assert space.is_mapped(1)
        with pytest.raises(DriverError, match="already mapped"):
            space.map_page(1)
        space.unmap_page(1)
        with pytest.raises(DriverError, match="not mapped"):
            space.unmap_page(1)
        with pytest.raises(DriverError, match="outside"):
            space.map_page(space.num_pages)


def test_virtual_capacity_comes_from_device_total(backend: MemoryBackend) -> None:
    _, total = backend.mem_info()
    with KVSpace(backend, SMALL) as space:
        assert space.num_blocks * SMALL.group_bytes >= total - space.page_bytes
        assert space.num_blocks * SMALL.group_bytes <= total + space.page_bytes
        assert space.mapped_pages == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_layers": 0, "block_shape": (16, 8, 128)}, "num_layers must be a positive"),
        ({"num_layers": -2, "block_shape": (16, 8, 128)}, "num_layers must be a positive"),
        ({"num_layers": 2, "block_shape": (16, 0, 128)}, "block_shape must be positive"),
        ({"num_layers": 2, "block_shape": ()}, "block_shape must be positive"),
        ({"num_layers": 2, "block_shape": (16, 8, 128), "buffers_per_layer": 0}, "buffers_per_layer"),
        ({"num_layers": 2, "block_shape": (16, 8, 128), "dtype": "bf16"}, "torch.dtype"),
    ],
)
def test_bad_geometry(kwargs: dict[str, object], message: str) -> None:
    kwargs.setdefault("dtype", torch.float16)
    with pytest.raises(ConfigError, match=message):
        KVGeometry(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "diagonal"}, "not one of interleaved, per-layer"),
        ({"layout": "per-layer", "chunk_bytes": 2 * 1024**2, "geometry": (1024, 8, 128)}, "bigger than the"),
        ({"layout": "per-layer", "chunk_bytes": 6 * 1024**2, "geometry": (1024, 8, 128)}, "do not divide"),
        ({"chunk_bytes": 1000}, "multiple of the 2 MiB granularity"),
        ({"chunk_bytes": 0}, "multiple of the 2 MiB granularity"),
        ({"num_blocks": 0}, "num_blocks must be a positive"),
        ({"num_blocks": -5}, "num_blocks must be a positive"),
        ({"null_blocks": 10**9}, "null_blocks must be between"),
        ({"layout": "per-layer", "geometry": (3, 1000, 3)}, "fits the 2 MiB granularity badly"),
    ],
)
def test_bad_space_arguments(backend: MemoryBackend, kwargs: dict[str, object], message: str) -> None:
    kwargs = dict(kwargs)
    shape = kwargs.pop("geometry", (16, 8, 128))
    geometry = KVGeometry(2, shape, torch.float32)  # type: ignore[arg-type]
    kwargs.setdefault("num_blocks", 64)
    before = used_bytes(backend)
    with pytest.raises(ConfigError, match=message):
        KVSpace(backend, geometry, **kwargs)  # type: ignore[arg-type]
    assert used_bytes(backend) == before


def test_scratch_backed_space_never_faults_on_stray_access(backend: MemoryBackend, layout: str) -> None:
    """Engines read padding and warm up with made-up block ids: with scratch backing, blocks that are not
    allocated are readable and writable (garbage, shared), never an illegal address or a SIGSEGV."""
    before = used_bytes(backend)
    with KVSpace(backend, MULTI, layout=layout, num_blocks=4 * 32, scratch_backed=True) as space:
        alloc = BlockAllocator(space, reserve_bytes=0, background=False, trim_delay=0.0)
        assert used_bytes(backend) - before == space.chunk_bytes, "one scratch chunk, whatever the size"
        stray = torch.tensor([5, 40, 127], device=space.device)  # pages 0, 1, 3: none mapped
        space.buffer(2, 1)[stray] = 7.0  # writes land in scratch
        assert space.buffer(2, 1)[stray].shape == (3, 16, 8, 128)  # and reads come back
        kept = alloc.allocate(32)  # page 0 gets memory of its own
        ids = torch.tensor(kept, device=space.device)
        data = torch.randn(32, 16, 8, 128, device=space.device)
        space.buffer(0, 0)[ids] = data
        space.buffer(1, 1)[torch.tensor([40, 127], device=space.device)] = -3.0  # scratch again
        assert torch.equal(space.buffer(0, 0)[ids], data), "scratch writes never reach a real page"
        other = alloc.allocate(32)
        alloc.free(other)
        alloc.maintain(now=10.0)  # page 1 back to scratch
        assert not space.is_mapped(1)
        _ = space.buffer(0, 1)[torch.tensor([other[0]], device=space.device)].sum().item()  # readable
        assert torch.equal(space.buffer(0, 0)[ids], data)
        with device_filled(backend, leave=space.chunk_bytes + backend.granularity // 2):
            with pytest.raises(OutOfMemory):
                alloc.allocate(64)  # two more pages: fails part-way, rolled back onto scratch
            _ = space.buffer(2, 0)[stray].sum().item()  # still readable everywhere
        alloc.close()
    assert used_bytes(backend) == before
