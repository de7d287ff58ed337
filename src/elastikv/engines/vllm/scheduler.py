"""vLLM adapter, scheduler side (engine-core process), shared by every supported vLLM (0.26 to 0.34).

After vLLM initialises the KV caches, the engine core asks every worker for its page server (``collective_rpc``),
books an instance in the device's ledger and starts a :class:`~elastikv.allocator.BlockAllocator` over the
workers' pages (:class:`~elastikv.engines.vllm.block_pool.VllmInstance`). The scheduler's ``BlockPool`` is
replaced by ``ElasticBlockPool`` (``block_pool.py``), which takes block ids from that allocator. Admission is
exact: while ``KVCacheManager.allocate_slots`` decides, the blocks it counts on are secured first (mapped on every
rank, booked in the ledger), so a refusal (limit, device budget, driver out of memory) is a plain "not now" (vLLM
queues or preempts) and never a failure inside an allocation.

The differences between vLLM releases in the pool are absorbed in ``block_pool.py``; the KV-allocation side is
in ``kv_*.py``.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any

from elastikv import lifecycle
from elastikv.config import Settings, format_bytes
from elastikv.engines.patching import Target
from elastikv.engines.vllm import block_pool, pinned
from elastikv.engines.vllm import worker as vllm_worker
from elastikv.errors import UnsupportedEngine
from elastikv.instance import DeviceFacts, book
from elastikv.peer_pages import PeerPages

log = logging.getLogger("elastikv")

# What this side patches or calls, in every supported release (checked before patching; see contract.py); the
# pool's own names are block_pool.TARGETS.
TARGETS: tuple[Target, ...] = (
    Target("vllm.v1.engine.core", "EngineCore._initialize_kv_caches", ("self", "vllm_config")),
    Target("vllm.v1.engine.core", "EngineCore.collective_rpc", ("self", "method")),
    Target("vllm.v1.engine.core", "EngineCore.shutdown", ("self",)),
    Target("vllm.v1.engine.core", "EngineCore.sleep", ("self", "level")),
    Target("vllm.v1.engine.core", "EngineCore.wake_up", ("self",)),
    Target("vllm.v1.core.kv_cache_coordinator", "BlockPool"),
    Target(
        "vllm.v1.core.kv_cache_coordinator",
        "KVCacheCoordinator.get_num_blocks_to_allocate",
        ("self", "request_id", "num_tokens", "new_computed_blocks"),
    ),
    Target("vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots", ("self", "request", "num_new_tokens")),
    *block_pool.TARGETS,
)


def install(patch: Callable[[str, str, Callable[[Any], Any]], None]) -> None:
    """Patch the engine core and the scheduler (every process; only the engine core uses them)."""
    patch("vllm.v1.engine.core", "EngineCore._initialize_kv_caches", _wrap_initialize_kv_caches)
    patch("vllm.v1.engine.core", "EngineCore.shutdown", _wrap_shutdown)
    patch("vllm.v1.engine.core", "EngineCore.sleep", _wrap_sleep)
    patch("vllm.v1.engine.core", "EngineCore.wake_up", _wrap_wake_up)
    patch("vllm.v1.core.kv_cache_coordinator", "BlockPool", lambda _orig: block_pool.pool_class())
    patch(
        "vllm.v1.core.kv_cache_coordinator",
        "KVCacheCoordinator.get_num_blocks_to_allocate",
        _wrap_get_num_blocks_to_allocate,
    )
    patch("vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots", _wrap_allocate_slots)


def _open_instance(endpoints: list[dict[str, Any]], vllm_config: Any) -> block_pool.VllmInstance:
    settings = Settings.from_env()
    worker = vllm_worker.this_worker()
    local = {worker.server.path: worker.server} if worker is not None and worker.server is not None else {}
    pages = PeerPages(endpoints, timeout=settings.peer_timeout, local=local)
    first = endpoints[0]
    device = DeviceFacts(first["device_id"], first["device_label"], first["total_bytes"], lambda: first["free_bytes"])
    try:
        name, ledger, budget, allocator = book(pages, device, engine="vllm", name=None, settings=settings)
    except BaseException:
        pages.close()
        raise
    block_bytes = pages.page_bytes // pages.blocks_per_page
    cached = settings.prefix_cache.resolve(device.total_bytes) // block_bytes
    inst = block_pool.VllmInstance(name, "vllm", ledger, budget, allocator, pages=pages, prefix_cache_blocks=cached)
    lifecycle.on_exit(inst.close)
    import vllm

    text = str(getattr(vllm, "__version__", "unknown"))
    log.info(
        "elastikv active: engine=vllm %s name=%s device=%s layout=%s ranks=%d virtual capacity=%s limit=%s "
        "prefix cache bound=%s",
        text,
        name,
        device.label,
        first["layout"],
        len(endpoints),
        format_bytes(allocator.capacity_bytes),
        format_bytes(allocator.limit),
        format_bytes(cached * block_bytes),
    )
    return inst


def _wrap_initialize_kv_caches(original: Callable[..., Any]) -> Callable[..., Any]:
    def _initialize_kv_caches(self: Any, vllm_config: Any) -> Any:
        kv_cache_config = original(self, vllm_config)
        endpoints = self.collective_rpc(vllm_worker.endpoint)
        if not endpoints or any(e is None for e in endpoints):
            raise UnsupportedEngine(
                "ELASTIKV=1, but a vLLM worker did not build its KV cache with elastikv (was elastikv installed "
                "in the workers' Python, and is VLLM_PLUGINS leaving it out?)"
            )
        block_pool.pending.clear()
        block_pool.pending.append(_open_instance(list(endpoints), vllm_config))
        self._elastikv = block_pool.pending[0]
        self.collective_rpc(vllm_worker.book_weights, args=(self._elastikv.name,))  # beside the KV, per rank
        _require_one_request(self._elastikv, vllm_config)
        if getattr(vllm_config.model_config, "enable_sleep_mode", False):  # its first sleep as fast as the later
            self.collective_rpc(pinned.prepare_first_sleep)
        return kv_cache_config

    return _initialize_kv_caches


def _require_one_request(inst: block_pool.VllmInstance, vllm_config: Any) -> None:
    """vLLM refuses to start when its KV cache cannot hold one request of ``max_model_len``; under elastikv the
    same bound is the device budget less what engines hold besides KV: a request larger than that would wait in
    the queue for ever (seen on the H100 when 8B weights were booked in a 16 GiB budget meant for KV)."""
    tokens = int(vllm_config.model_config.max_model_len)
    blocks = -(-tokens // int(vllm_config.cache_config.block_size))
    try:
        inst.require_room(blocks, what=f"one {tokens}-token request", fix="lower --max-model-len")
    except BaseException:
        inst.close()
        raise


def _wrap_shutdown(original: Callable[..., Any]) -> Callable[..., Any]:
    def shutdown(self: Any) -> Any:
        inst = getattr(self, "_elastikv", None)
        if inst is not None:  # unmap while the workers are still there to do it
            try:
                inst.close()
            except Exception:
                log.exception("elastikv: closing the KV cache failed")
        return original(self)

    return shutdown


def _wrap_sleep(original: Callable[..., Any]) -> Callable[..., Any]:
    """vLLM's sleep (level >= 1) clears the prefix cache, so every block is back in the allocator; then the
    allocator goes idle: every empty page is unmapped and no reserve is kept until the next request allocates.
    A level 1 sleep whose host copy the host cannot pin is refused first, in every worker (``pinned.py``).
    (vLLM's own sleep offloads or drops the weights; the KV cache is elastikv's, not in vLLM's memory pool.)"""

    def sleep(self: Any, *args: Any, **kwargs: Any) -> Any:
        level = int(kwargs.get("level", args[0] if args else 1))
        inst = getattr(self, "_elastikv", None)
        if inst is not None and level == 1:  # the host copy must fit: refused whole here, never half way in vLLM
            self.collective_rpc(pinned.check_level_1)
        result = original(self, *args, **kwargs)
        if inst is None or level < 1:
            return result
        if isinstance(result, concurrent.futures.Future):  # it sleeps once in-flight requests are done
            # (the weights stay booked: the workers cannot be called from this callback's thread)
            result.add_done_callback(lambda _done: inst.allocator.idle())
        else:
            inst.allocator.idle()
            self.collective_rpc(vllm_worker.drop_weights)  # off the device now
        return result

    return sleep


def _wrap_wake_up(original: Callable[..., Any]) -> Callable[..., Any]:
    """Book the weights again before vLLM puts them back; a budget that cannot take them refuses the wake
    (``LimitExceeded``), never a driver out-of-memory half way."""

    def wake_up(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_elastikv", None) is not None:
            self.collective_rpc(vllm_worker.rebook_weights)
        return original(self, *args, **kwargs)

    return wake_up


def _wrap_get_num_blocks_to_allocate(original: Callable[..., int]) -> Callable[..., int]:
    def get_num_blocks_to_allocate(self: Any, *args: Any, **kwargs: Any) -> int:
        n = original(self, *args, **kwargs)
        pool = self.block_pool
        if isinstance(pool, block_pool.ElasticBlockPoolMixin) and pool.admitting:
            pool.secure(n)
        return n

    return get_num_blocks_to_allocate


def _wrap_allocate_slots(original: Callable[..., Any]) -> Callable[..., Any]:
    def allocate_slots(self: Any, *args: Any, **kwargs: Any) -> Any:
        pool = self.block_pool
        if not isinstance(pool, block_pool.ElasticBlockPoolMixin) or pool.instance is None:
            return original(self, *args, **kwargs)
        pool.begin_admission(extra=int(getattr(self, "watermark_blocks", 0)) + int(kwargs.get("reserved_blocks", 0)))
        try:
            return original(self, *args, **kwargs)
        finally:
            pool.end_admission()

    return allocate_slots
