"""Pages mapped in other processes: a worker's :class:`PageServer` and the scheduler's :class:`PeerPages`.

Engines such as vLLM keep their block bookkeeping (the scheduler, where elastikv's allocator runs) in one
process and the KV buffers in others: one worker per tensor-parallel rank, each holding its shard of every
block. Every rank maps the same pages. The scheduler's allocator drives a :class:`PeerPages`, which sends each
map and unmap to every worker's :class:`PageServer` over a persistent Unix socket and waits for the answers.

Wire format: one JSON object per line, each way. A peer never runs code it receives (no pickle)::

    -> {"op": "map", "pages": [3]}        <- {"ok": true}
    -> {"op": "drain"}                    <- {"ok": true}   (every kernel queued on the device has finished)
    -> {"op": "unmap", "pages": [3, 4]}   <- {"ok": true}
    -> {"op": "facts"}                    <- {"ok": true, "facts": {...}}
    <- {"ok": false, "error": "OutOfMemory", "message": "..."}   (the worker changed nothing)

Who owns what: the worker owns its :class:`~elastikv.space.KVSpace` (memory, views); the scheduler owns
every decision to map or unmap. A map that fails on any rank is undone on the ranks that made it, so all ranks
always hold the same pages; the allocator then refuses the allocation and the engine queues the request.
A reply that does not come within the timeout marks the peer lost: every later map is refused at once (the
engine keeps serving what it holds; nothing hangs), and pages are never unmapped on a guess.

Invariant 5 across processes: :meth:`PeerPages.fence` has every worker drain its device (``torch.cuda.synchronize``,
all streams) and returns once they have. The allocator takes that fence *after* the pages it unmaps became empty,
so the kernels that read a freed block, queued before the scheduler freed it, have finished before the unmap.
One drain per batch of pages, not per page: a drain while the engine decodes waits for its current step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

from elastikv.errors import AllocationRefused, ConfigError, DriverError, ElastikvError, LimitExceeded, OutOfMemory
from elastikv.memory import DoneFence
from elastikv.space import KVSpace

log = logging.getLogger(__name__)

_REFUSALS: dict[str, type[AllocationRefused]] = {"OutOfMemory": OutOfMemory, "LimitExceeded": LimitExceeded}


class PeerLost(DriverError):
    """A worker did not answer in time, or its socket closed: its pages can no longer be changed."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__("peer", "LOST", f"{where}: {detail}")


class PageServer:
    """Serves map/unmap requests for one worker's KV space on a Unix socket in a private directory.

    ``facts`` (JSON-able) is what the scheduler learns on connecting: page geometry, device, pid. Requests from
    any number of connections are applied one at a time.
    """

    def __init__(self, space: KVSpace, facts: dict[str, Any]) -> None:
        self.space = space
        self.facts = {
            **facts,
            "num_pages": space.num_pages,
            "num_blocks": space.num_blocks,
            "null_blocks": space.null_blocks,
            "blocks_per_page": space.blocks_per_page,
            "page_bytes": space.page_bytes,
            "pid": os.getpid(),
        }
        self._dir = tempfile.mkdtemp(prefix="elastikv-peer-")  # 0700: only this user can connect
        self.path = os.path.join(self._dir, "pages.sock")
        self.facts["socket"] = self.path
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(8)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="elastikv-page-server", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="elastikv-page-peer", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                try:
                    reply = self.handle(json.loads(line))
                except Exception as exc:  # a malformed request: say so, keep serving
                    reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    return

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Apply one request; all or nothing for maps. Public so that a worker in the scheduler's own process
        can be driven without a socket."""
        op = request.get("op")
        if op == "facts":
            return {"ok": True, "facts": self.facts}
        if op == "drain":
            self.drain()
            return {"ok": True}
        pages = request.get("pages")
        if not isinstance(pages, list) or not all(type(p) is int for p in pages):
            raise ConfigError(f"request {request!r}: 'pages' must be a list of page numbers")
        with self._lock:
            if self._closed:
                return {"ok": False, "error": "PeerLost", "message": "the worker's KV space is closed"}
            if op == "map":
                return self._map(pages)
            if op == "unmap":
                return self._unmap(pages)
        raise ConfigError(f"unknown op {op!r}; use map, unmap, drain or facts")

    def _map(self, pages: list[int]) -> dict[str, Any]:
        done: list[int] = []
        try:
            for p in pages:
                self.space.map_page(p)
                done.append(p)
        except ElastikvError as exc:
            for p in reversed(done):
                self.space.unmap_page(p)
            return {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        return {"ok": True}

    def _unmap(self, pages: list[int]) -> dict[str, Any]:
        # No drain here: the scheduler fenced (op "drain") after these pages emptied; a rollback of a map
        # unmaps a page no kernel was ever given.
        failed: list[str] = []
        for p in pages:
            try:
                self.space.unmap_page(p)
            except ElastikvError as exc:
                failed.append(f"page {p}: {exc}")
        if failed:
            return {"ok": False, "error": "DriverError", "message": "; ".join(failed)}
        return {"ok": True}

    def drain(self) -> None:
        """Wait for every kernel queued on this worker's device, on any stream (vLLM runs its forward pass on
        a stream of its own)."""
        if self.space.backend.name == "cuda":
            import torch

            torch.cuda.synchronize(self.space.device)
        else:
            self.space.fence().wait()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        try:
            self._sock.close()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)


class _Peer:
    """One persistent connection to a worker's PageServer (or the server itself, in the same process)."""

    def __init__(self, facts: dict[str, Any], timeout: float, local: PageServer | None) -> None:
        self.where = f"worker pid {facts.get('pid')} (rank {facts.get('rank', '?')})"
        self._local = local
        self._sock: socket.socket | None = None
        self._lines: Any = None
        self.lost: str | None = None
        if local is None:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(facts["socket"])
            except OSError as exc:
                raise PeerLost(self.where, f"cannot connect to {facts['socket']}: {exc}") from None
            self._sock = sock
            self._lines = sock.makefile("rb")

    def call(self, op: str, pages: Sequence[int]) -> None:
        if self.lost is not None:
            raise PeerLost(self.where, self.lost)
        request: dict[str, Any] = {"op": op} if op == "drain" else {"op": op, "pages": list(pages)}
        if self._local is not None:
            reply = self._local.handle(request)
        else:
            assert self._sock is not None
            try:
                self._sock.sendall(json.dumps(request).encode() + b"\n")
                line = self._lines.readline()
            except OSError as exc:  # socket.timeout included
                self._lose(f"no answer to {op} {list(pages)}: {exc or type(exc).__name__}")
            if not line:
                self._lose("the worker closed the connection (did it exit?)")
            reply = json.loads(line)
        if not reply.get("ok"):
            error, message = reply.get("error", "?"), reply.get("message", "")
            if error in _REFUSALS:
                raise _REFUSALS[error](f"{self.where}: {message}")
            if error == "PeerLost":
                self._lose(message)
            raise DriverError(f"{op} on {self.where}", error, message)

    def _lose(self, why: str) -> None:
        self.lost = why
        self.close()
        raise PeerLost(self.where, why)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


class PeerPages:
    """The scheduler's view of pages that live in worker processes: a :class:`~elastikv.space.Pages`.

    ``endpoints`` are the workers' ``PageServer.facts``, rank order. All ranks must agree on the page geometry.
    ``local`` maps a socket path to a PageServer in this very process (one process holding scheduler and
    worker): it is called directly.
    """

    def __init__(
        self, endpoints: Sequence[dict[str, Any]], *, timeout: float = 30.0, local: dict[str, PageServer] | None = None
    ) -> None:
        if not endpoints:
            raise ConfigError("PeerPages needs at least one worker endpoint")
        first = endpoints[0]
        for key in ("num_pages", "num_blocks", "null_blocks", "blocks_per_page"):
            values = {e[key] for e in endpoints}
            if len(values) != 1:
                raise ConfigError(f"the workers disagree on {key} ({sorted(values)}); every rank must see one cache")
        self.num_pages: int = first["num_pages"]
        self.num_blocks: int = first["num_blocks"]
        self.null_blocks: int = first["null_blocks"]
        self.blocks_per_page: int = first["blocks_per_page"]
        self.page_bytes: int = first["page_bytes"]  # rank 0's: what this instance books on its device
        self.endpoints = list(endpoints)
        local = local or {}
        self._peers: list[_Peer] = []
        try:
            for e in endpoints:
                self._peers.append(_Peer(e, timeout, local.get(e["socket"])))
        except BaseException:
            self.close()
            raise
        self._lock = threading.Lock()  # one request in flight: the scheduler thread and the maintainer share it

    def map_page(self, page: int) -> None:
        """Map ``page`` on every rank, or on none: a rank that fails is rolled back by its worker, and the
        ranks that had mapped it unmap it again before the error is raised."""
        with self._lock:
            done: list[_Peer] = []
            try:
                for peer in self._peers:
                    peer.call("map", [page])
                    done.append(peer)
            except BaseException:
                for peer in done:
                    try:
                        peer.call("unmap", [page])
                    except ElastikvError:
                        log.exception("rolling back page %d on %s failed", page, peer.where)
                raise

    def unmap_page(self, page: int) -> None:
        """Unmap ``page`` on every rank (after a :meth:`fence` taken once it was empty). Raises if any rank failed
        (the allocator then keeps the page booked and out of use)."""
        with self._lock:
            errors: list[ElastikvError] = []
            for peer in self._peers:
                try:
                    peer.call("unmap", [page])
                except ElastikvError as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]

    def fence(self) -> DoneFence:
        """Every worker drains its device now (all streams); returns a fence that has passed. A lost worker is
        skipped: no page can be unmapped there anyway (its unmaps fail and the allocator quarantines the page)."""
        with self._lock:
            for peer in self._peers:
                if peer.lost is None:
                    with contextlib.suppress(PeerLost):
                        peer.call("drain", ())
        return DoneFence()

    @property
    def lost(self) -> list[str]:
        return [f"{p.where}: {p.lost}" for p in self._peers if p.lost]

    def close(self) -> None:
        for peer in self._peers:
            peer.close()
