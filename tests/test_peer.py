"""Pages mapped in other processes' spaces (peer_pages.py): a scheduler-side allocator over worker spaces.

The workers here are PageServers over real spaces in this process, reached over their real Unix sockets
(the vLLM tests run the same code across processes).
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from elastikv.allocator import BlockAllocator
from elastikv.errors import DriverError, OutOfMemory
from elastikv.memory import HostBackend, MemoryBackend
from elastikv.peer_pages import PageServer, PeerLost, PeerPages
from elastikv.space import KVGeometry, KVSpace

GEOMETRY = KVGeometry(num_layers=2, block_shape=(64 * 1024,), dtype=torch.uint8, buffers_per_layer=1)
MIB = 1024**2


def _space(backend: MemoryBackend, num_blocks: int = 512) -> KVSpace:
    return KVSpace(backend, GEOMETRY, layout="per-layer", num_blocks=num_blocks, null_blocks=1, scratch_backed=True)


def _rank(backend: MemoryBackend, rank: int, num_blocks: int = 512) -> PageServer:
    return PageServer(_space(backend, num_blocks), {"rank": rank, "device_id": backend.device_id})


def _shut(alloc: BlockAllocator, pages: PeerPages, servers: list[PageServer]) -> None:
    """Close an allocator over ``pages``, the pages, and every rank's server and space."""
    alloc.close()
    pages.close()
    for s in servers:
        s.close()
        s.space.close()


@pytest.fixture
def two_ranks(backend: MemoryBackend) -> Iterator[list[PageServer]]:
    servers = [_rank(backend, 0), _rank(backend, 1)]
    yield servers
    for s in servers:
        s.close()
        s.space.close()


def test_an_allocator_over_two_ranks_maps_and_unmaps_each_page_on_both(two_ranks: list[PageServer]) -> None:
    pages = PeerPages([s.facts for s in two_ranks], timeout=10)
    alloc = BlockAllocator(pages, reserve_bytes=0, background=False)
    try:
        assert [s.space.mapped_pages for s in two_ranks] == [1, 1]  # the null block's page, on every rank
        blocks = alloc.allocate(100)
        want = {b // pages.blocks_per_page for b in blocks} | {0}
        for s in two_ranks:
            assert {p for p in range(s.space.num_pages) if s.space.is_mapped(p)} == want
            for b in blocks:  # both ranks' memory is really there: write and read every block
                s.space.buffer(1)[b].fill_(b % 251)
                assert int(s.space.buffer(1)[b][-1]) == b % 251
        alloc.free(blocks)
        alloc.maintain(now=0.0)  # surplus seen...
        alloc.maintain(now=60.0)  # ...and still there after the trim delay: unmapped
        assert [s.space.mapped_pages for s in two_ranks] == [1, 1]
    finally:
        alloc.close()
        pages.close()
    assert [s.space.mapped_pages for s in two_ranks] == [0, 0]


def test_a_map_that_fails_on_one_rank_is_undone_on_all_and_refused() -> None:
    roomy, tight = HostBackend(total_bytes=256 * MIB), HostBackend(total_bytes=16 * MIB)  # rank 1 fills first
    servers = [_rank(roomy, 0), _rank(tight, 1)]
    pages = PeerPages([s.facts for s in servers], timeout=10)
    alloc = BlockAllocator(pages, reserve_bytes=0, background=False)
    try:
        got = []
        with pytest.raises(OutOfMemory, match="rank 1"):
            while True:
                got += alloc.allocate(alloc.blocks_per_page)
        held = [s.space.mapped_pages for s in servers]
        assert held[0] == held[1] > 1  # rank 0 gave back the page rank 1 could not map
        assert alloc.stats().mapped_bytes == held[0] * pages.page_bytes
        alloc.free(got)  # and the cache goes on working
        assert len(alloc.allocate(alloc.blocks_per_page)) == alloc.blocks_per_page
    finally:
        _shut(alloc, pages, servers)
        roomy.close()
        tight.close()


def test_a_worker_that_does_not_answer_is_lost_without_hanging(two_ranks: list[PageServer]) -> None:
    with tempfile.TemporaryDirectory() as d:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # accepts, never answers
        silent.bind(str(Path(d) / "s.sock"))
        silent.listen(1)
        facts = dict(two_ranks[1].facts, socket=str(Path(d) / "s.sock"), rank=1)
        pages = PeerPages([two_ranks[0].facts, facts], timeout=0.3)
        try:
            t0 = time.monotonic()
            with pytest.raises(PeerLost, match="rank 1"):
                pages.map_page(3)
            assert time.monotonic() - t0 < 5
            assert not two_ranks[0].space.is_mapped(3)  # rank 0 was rolled back
            with pytest.raises(PeerLost):  # and stays refused, at once
                pages.map_page(4)
            assert pages.lost
        finally:
            pages.close()
            silent.close()


def test_a_worker_that_exits_is_lost(two_ranks: list[PageServer]) -> None:
    pages = PeerPages([s.facts for s in two_ranks], timeout=5)
    try:
        pages.map_page(2)
        two_ranks[1].close()
        with pytest.raises(PeerLost):
            pages.unmap_page(2)
        with pytest.raises(PeerLost):
            pages.map_page(5)
    finally:
        pages.close()


def test_bad_requests_and_disagreeing_ranks_are_clear_errors(backend: MemoryBackend) -> None:
    a, b = _rank(backend, 0, num_blocks=512), _rank(backend, 1, num_blocks=1024)
    try:
        with pytest.raises(Exception, match="disagree on num_pages"):
            PeerPages([a.facts, b.facts])
        pages = PeerPages([a.facts])
        with pytest.raises(DriverError, match="already mapped"):
            pages.map_page(0) if a.space.is_mapped(0) else (pages.map_page(0), pages.map_page(0))
        with pytest.raises(DriverError, match="outside"):
            pages.map_page(10_000)
        pages.close()
        assert a.handle({"op": "facts"})["facts"]["rank"] == 0
        with pytest.raises(Exception, match="unknown op"):
            a.handle({"op": "explode", "pages": []})
    finally:
        for s in (a, b):
            s.close()
            s.space.close()


def test_requests_from_two_threads_never_interleave(two_ranks: list[PageServer]) -> None:
    pages = PeerPages([s.facts for s in two_ranks], timeout=10)
    errors: list[BaseException] = []

    def work(first: int) -> None:
        try:
            for _ in range(10):
                for p in range(first, first + 7):
                    pages.map_page(p)
                for p in range(first, first + 7):
                    pages.unmap_page(p)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(1 + 7 * i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pages.close()
    assert not errors
    assert [s.space.mapped_pages for s in two_ranks] == [0, 0]


class _CountingServer(PageServer):
    """A real PageServer that also counts its drains (the fence's observable effect on the host backend)."""

    drains = 0

    def drain(self) -> None:
        self.drains += 1
        super().drain()


def test_the_fence_drains_every_live_worker_once_and_skips_a_lost_one(backend: MemoryBackend) -> None:
    servers = [_CountingServer(_space(backend), {"rank": r, "device_id": backend.device_id}) for r in (0, 1)]
    pages = PeerPages([s.facts for s in servers], timeout=5)
    alloc = BlockAllocator(pages, reserve_bytes=0, background=False)
    try:
        blocks = alloc.allocate(3 * pages.blocks_per_page)  # three whole pages
        alloc.free(blocks)
        alloc.maintain(now=0.0)
        alloc.maintain(now=60.0)  # one trim of three pages: one drain per worker, not one per page
        assert [s.drains for s in servers] == [1, 1]
        assert [s.space.mapped_pages for s in servers] == [1, 1]
        servers[1].close()
        pages.fence().wait()  # the lost worker is skipped, not waited for
        assert servers[0].drains == 2
    finally:
        _shut(alloc, pages, servers)


@pytest.mark.gpu
def test_a_page_read_by_a_kernel_on_a_side_stream_is_unmapped_only_after_the_kernel(backend: MemoryBackend) -> None:
    """Invariant 5 on the GPU, across the scheduler/worker split: a kernel queued on a non-default stream (as
    vLLM's forward pass is) reads a block; the scheduler frees it and trims at once. The fence (every worker drains
    its device) holds the unmap back until the kernel has read the real data, not the scratch page."""
    if backend.name != "cuda":
        pytest.skip("the host backend has no streams")
    server = _rank(backend, 0)
    pages = PeerPages([server.facts], timeout=30)
    alloc = BlockAllocator(pages, reserve_bytes=0, background=False)
    try:
        held = alloc.allocate(2 * pages.blocks_per_page)
        block = held[-1]  # not in page 0, which holds the null block and stays mapped
        alloc.free(held[:-1])
        buf = server.space.buffer(0)
        buf[block].fill_(7)
        out = torch.zeros_like(buf[block])
        side = torch.cuda.Stream(device=buf.device)
        torch.cuda.synchronize(buf.device)
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the read
            out.copy_(buf[block])
        alloc.free([block])
        t0 = time.monotonic()
        alloc.maintain(now=0.0)
        alloc.maintain(now=60.0)  # trims the page: fence, then unmap
        assert not server.space.is_mapped(block // pages.blocks_per_page)
        assert side.query(), "the unmap returned while the kernel that reads the page was still queued"
        torch.cuda.synchronize(buf.device)
        assert int(out.min()) == 7 == int(out.max()), "the kernel read the page after it was unmapped"
        print(f"\nunmap waited {time.monotonic() - t0:.3f} s for the side stream's kernel")
    finally:
        _shut(alloc, pages, [server])
