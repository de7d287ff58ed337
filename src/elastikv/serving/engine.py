"""The embedded engine: one model, transformers continuous batching on an elastic KV cache, sleep and wake.

Who owns what: the engine owns the model, the tokenizer and one ``ContinuousBatchingManager`` (its background
thread runs the batches); the KV cache, and so the memory, belongs to the elastikv instance the manager's cache
opened (``engines/transformers/``). Requests are submitted from an asyncio loop and their tokens come back
through transformers' result handlers, delivered on that loop.

Sleep ends the manager, which closes the KV instance: every KV page is unmapped and its ledger row leaves. Level 1
then moves the weights to the engine's ``WeightStash`` (``serving/weights.py``: one pinned host buffer per dtype,
pinned on a background thread right after the engine starts, kept across sleeps; on a CPU the weights already
live in host memory and stay put unless ``stash_weights=True``). Level 2 drops the weights; wake reloads them from
the model's files. A level 1 the stash cannot take (weights over ``ELASTIKV_PIN_BUDGET``, pinning failed or still
running after ``PIN_WAIT_S``) is done as level 2, logged, and the answer says so (``sleeping: 2``,
``requested: 1``, ``reason``): a router that asks for level 1 gets a model asleep either way, never one left
awake holding its memory. Wake copies the weights back (one copy per dtype) while it starts a new manager; KV pages
are mapped again as requests arrive.

Off the wake's path, done once at start and kept: the host buffers (above); one short request through the
batching manager (``warmup``: CUDA kernels loaded, cuBLAS handles made, so that a model put to sleep before it
ever served does not pay for them on the first request after its wake); and ``gc.freeze()`` of everything the
model load made (``freeze_gc``), so that the two full collections transformers runs when a manager stops walk
only what was made since (0.5 s per sleep on the CPU test machine without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from elastikv.config import Settings
from elastikv.errors import ConfigError, ElastikvError, EngineDied
from elastikv.serving import attention as attention_impl
from elastikv.serving.footprint import START_ROOM_WAIT_S, Footprint
from elastikv.serving.kv_size import kv_bytes_per_token
from elastikv.serving.weights import WeightStash, load_weights, over_budget

log = logging.getLogger("elastikv")


class Asleep(ElastikvError):
    """The engine is asleep: wake it (POST /wake_up) before sending requests."""


_DIED = object()  # put in a request's queue when the batching thread is found dead
START_TIMEOUT_S = 120.0  # the batching thread makes its KV cache within this long, or the start fails
PIN_WAIT_S = 30.0  # a sleep waits this long for the weight stash still being pinned, then sleeps at level 2
WARMUP_TIMEOUT_S = 60.0  # the start-up request; one that takes longer is cancelled and the engine serves anyway


def _why(error: BaseException | None) -> str:
    """The batching thread's fatal error, with the fix where it is known."""
    if error is None:
        return "it ended without an error (the engine's log says more)"
    text = f"{type(error).__name__}: {error}"
    if "available memory 0" in text:
        try:
            import psutil  # noqa: F401
        except ImportError:
            return text + " (transformers sizes its cache with psutil, which is not installed: `pip install psutil`)"
    return text


@dataclass
class Stats:
    running: int = 0
    waiting: int = 0
    finished: int = 0
    # seconds to the first token, of requests since /metrics last read them; bounded, as nothing may ever read them
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    cancelled: int = 0  # requests whose client went away before they finished: stopped, their KV freed


class Engine:
    """Serves one model. Thread-safe for submission from one asyncio loop; sleep/wake serialised by a lock."""

    def __init__(
        self,
        model: str | Path,
        *,
        name: str | None = None,
        settings: Settings | None = None,
        device: str | None = None,
        dtype: str = "auto",
        block_size: int = 32,
        max_batch_tokens: int = 512,
        max_kv_tokens: int = 16384,
        static_kv: int | None = None,
        attention: str = "auto",
        stash_weights: bool | None = None,
        warmup: bool = True,
        freeze_gc: bool = True,
    ) -> None:
        """``stash_weights``: sleep level 1 moves the weights to a host buffer (default: on a GPU; on a CPU they
        stay where they are). ``warmup``: one short request at start (see the module's docstring). ``freeze_gc``:
        ``gc.freeze()`` after the model loads, undone by :meth:`close` (process-wide: meant for a process that
        serves one engine, as the router starts them)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        from elastikv.engines import transformers as adapter

        self.path = Path(model)
        if not (self.path / "config.json").exists():
            raise ConfigError(
                f"{model}: no model directory there (config.json missing); make one with "
                f"`elastikv make-model {model}` or pass a local model directory"
            )
        self.settings = settings or Settings.from_env()
        self.name = name or self.settings.name or self.path.name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype)
        loaded: Any = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch_dtype)
        self.footprint = Footprint(loaded, self.device, self.settings, name=self.name)
        self.footprint.book(wait_s=START_ROOM_WAIT_S)  # before the weights go on the device (LimitExceeded: no room)
        self.model: Any = loaded.to(self.device).eval()
        # transformers' paged|sdpa, or per-request attention (serving/attention.py); the same in both modes
        self.attention = attention_impl.resolve(attention, self.device, next(self.model.parameters()).dtype)
        # static_kv: the baseline elastikv is measured against: transformers' own paged cache of that many bytes,
        # allocated at start and held for good, with elastikv left off in this process.
        self.static_kv = static_kv
        config = self.model.config
        self.vocab_size = int(config.vocab_size)
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        # One request's prompt + output must fit one batch's KV read budget, or it is never scheduled.
        self.max_request_tokens = max_kv_tokens if static_kv is None else None
        num_blocks = None
        if static_kv is None:
            adapter.enable(name=self.name, settings=self.settings, max_kv_tokens=max_kv_tokens)
        else:
            per_token = kv_bytes_per_token(self.model.config.to_dict(), next(self.model.parameters()).element_size())
            num_blocks = static_kv // (block_size * per_token)
            if num_blocks < 2:
                raise ConfigError(f"--static-kv {static_kv} bytes holds fewer than 2 blocks of {block_size} tokens")
        eos = self.tokenizer.eos_token_id
        self.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=False, eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id or 0, max_new_tokens=256
        )
        self.cb_config = ContinuousBatchingConfig(
            block_size=block_size,
            max_batch_tokens=max_batch_tokens,
            use_async_batching=False,
            num_blocks=num_blocks,  # static: transformers' own cache, with its own admission margin
        )
        self._adapter = adapter
        self._lock = threading.Lock()
        self._manager: Any = None
        self._asleep: int = 0  # 0 awake, else the level
        self.stash: WeightStash | None = None  # where level 1 puts the weights; None: they stay put, or level 2
        self.wake_early = self.settings.wake_early == "on"  # take requests while a wake's copies run
        self.no_stash: str | None = None  # why a level 1 sleep is done as level 2, when it always is
        if self.device.type == "cuda" if stash_weights is None else stash_weights:
            try:
                stash = WeightStash(self.model, self.device, chunk_bytes=self.settings.wake_chunk_bytes)
                self.no_stash = over_budget(stash.nbytes, self.settings)
            except ElastikvError as exc:  # a layout it cannot keep
                self.no_stash = str(exc)
            if self.no_stash is None:
                self.stash = stash  # pinned once the engine serves (below); the first sleep waits (PIN_WAIT_S)
                self.model.register_forward_pre_hook(self._await_weights)  # every forward after a wake's copies
            else:
                log.warning("%s: %s: sleep level 1 will be level 2 (weights reloaded from %s at wake)",
                            self.name, self.no_stash, self.path)  # fmt: skip
        self._froze = freeze_gc
        if freeze_gc:
            gc.collect()
            gc.freeze()
        self.stats = Stats()
        self._queues: dict[str, asyncio.Queue[Any]] = {}  # requests waiting for tokens, by id
        self._watchdog: asyncio.Task[None] | None = None
        self.wakes = 0  # completed wake_up calls (the router's tests count them)
        self.died: str | None = None  # why the engine can no longer serve (a wake whose batching thread died)
        try:
            self._start()
        except BaseException:
            self._let_go()
            raise
        if warmup:
            self._warm_up()
        kv = self.instance.allocator.stats().mapped_bytes if self.instance is not None else 0
        self.footprint.measure_other(kv)  # what serving holds beyond weights and KV, into the ledger (on a GPU)
        if self.stash is not None:
            self.stash.start()  # after the start, which a driver lock held while pinning could otherwise delay

    # -- lifetime -----------------------------------------------------------------------------------------
    def _start(self) -> None:
        """Start transformers' batching thread and wait until it can serve: its KV cache made (that is where a
        start fails: no memory, no psutil, a bad config). A thread that dies is ``EngineDied`` with its error,
        within seconds, never a server that answers nothing."""
        self.model.set_attn_implementation(self.attention)
        self._manager = self.model.init_continuous_batching(
            generation_config=self.generation_config, continuous_batching_config=self.cb_config
        )
        self._manager.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        manager = self._manager
        while manager.batch_processor is None or manager.background_thread_status.fatal_error is not None:
            error = manager.background_thread_status.fatal_error
            if error is not None or not manager.is_running():
                self._stop()
                raise EngineDied(f"{self.name}: transformers' batching thread died at start: {_why(error)}")
            if time.monotonic() > deadline:
                self._stop()
                raise EngineDied(f"{self.name}: transformers' batching thread not ready after {START_TIMEOUT_S:.0f} s")
            time.sleep(0.001)

    def _warm_up(self) -> None:
        """One short request (prefill and a decode step) through the manager, once: what a first request does
        once per process (CUDA kernels loaded, cuBLAS handles) is then done before the first sleep."""
        manager, rid = self._manager, "elastikv-warmup"
        t0 = time.perf_counter()
        prompt = [i % self.vocab_size for i in range(1, 17)]
        try:
            manager.add_request(prompt, request_id=rid, max_new_tokens=2)
            out = None
            while time.perf_counter() - t0 < WARMUP_TIMEOUT_S and manager.is_running():
                out = manager.get_result(request_id=rid, timeout=1.0)
                if out is not None and out.is_finished():
                    break
            if out is None or not out.is_finished():
                manager.cancel_request(rid)
                why = "the batching thread stopped" if not manager.is_running() else f"over {WARMUP_TIMEOUT_S:.0f} s"
                log.warning("%s: the start-up request did not finish (%s); skipped", self.name, why)
            elif out.error:
                log.warning("%s: the start-up request failed: %s", self.name, out.error)
        except Exception as exc:  # the engine serves anyway; a real request will say what is wrong
            log.warning("%s: the start-up request failed: %s", self.name, exc)
        self._release_idle_memory()
        log.info("%s: start-up request in %.2f s", self.name, time.perf_counter() - t0)

    def _stop_manager(self) -> None:
        manager, self._manager = self._manager, None
        if manager is None:
            return
        # transformers' batching thread checks for a stop between waits of up to 0.1 s for a new request: ask it
        # to stop, then end its wait (5.17's event), so that sleep does not wait it out.
        status = manager.background_thread_status
        status.request_stop(status.FLUSH_AND_STOP, manager.distributed_helper.global_rank)
        event = getattr(manager, "_has_new_requests", None)
        if event is not None:
            event.set()
        manager.stop(block=True)
        manager.destroy()

    def _close_kv(self) -> None:
        self._adapter.close_caches()  # the manager's cache: unmap every page, leave the ledger
        if self.static_kv is not None:
            gc.collect()  # transformers' static cache tensors go with the manager

    def _stop(self) -> None:
        self._stop_manager()
        self._close_kv()

    def close(self) -> None:
        with self._lock:
            self._stop()
            self._let_go()

    def _let_go(self) -> None:
        """What the engine holds beyond its manager: the weight stash's host buffers, the frozen objects, the
        ledger's booking of its weights."""
        self.footprint.close()
        if self.stash is not None:
            self.stash.close()
        if self._froze:
            self._froze = False
            gc.unfreeze()

    @property
    def instance(self) -> Any:
        return self._adapter.latest_instance()

    @property
    def kv_waits(self) -> int:
        """Batches that waited for KV memory, in the current cache (0 while asleep)."""
        caches = self._adapter.caches()
        return int(caches[-1].waits) if caches else 0

    @property
    def sleeping(self) -> int:
        return self._asleep

    @property
    def healthy(self) -> bool:
        """Asleep, or awake with transformers' batching thread alive (it ends on an error it cannot handle)."""
        if self.died is not None:
            return False
        return bool(self._asleep) or (self._manager is not None and self._manager.is_running())

    # -- sleep and wake -------------------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> dict[str, Any]:
        """Give back every KV page, and the weights' device memory (level 1: to the weight stash; level 2:
        dropped). Waits for requests in flight to finish. The answer: ``sleeping`` (the level used), ``requested``,
        ``seconds``, and ``reason`` where level 1 was done as level 2."""
        if level not in (1, 2):
            raise ConfigError(f"sleep level {level!r}: use 1 (weights to host memory) or 2 (weights dropped)")
        with self._lock:
            if self._asleep:
                return {"sleeping": self._asleep, "requested": level, "seconds": 0.0}
            t0 = time.perf_counter()
            used, reason = level, None
            if level == 1 and self.no_stash is not None:
                used, reason = 2, self.no_stash
            elif level == 1 and self.stash is not None and not self.stash.wait(PIN_WAIT_S):
                used, reason = 2, self.stash.why_not()
            self._stop_manager()
            stashing = used == 1 and self.stash is not None
            if stashing:
                assert self.stash is not None
                try:
                    self.stash.copy_out()
                except ElastikvError as exc:  # the weights are untouched: drop them instead
                    stashing, used, reason = False, 2, str(exc)
            if reason is not None:
                log.warning("%s: sleep level 1 done as level 2: %s", self.name, reason)
            self._close_kv()  # (while the weights copy, if they do)
            if stashing:
                assert self.stash is not None
                self.stash.free_device()
            elif used == 2:
                self._weights_off()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.footprint.drop()  # the weights are off the device
            self._asleep = used
            out: dict[str, Any] = {"sleeping": used, "requested": level, "seconds": time.perf_counter() - t0}
            if reason is not None:
                out["reason"] = f"{reason}; slept at level 2 (weights reloaded from files at wake)"
            return out

    def wake_up(self) -> dict[str, Any]:
        with self._lock:
            if not self._asleep:
                return {"sleeping": 0, "seconds": 0.0}
            t0 = time.perf_counter()
            self.footprint.book()  # before the weights come back (LimitExceeded: no room; it stays asleep)
            copying = self._asleep == 1 and self.stash is not None and self.stash.asleep
            try:
                if self._asleep == 2:
                    load_weights(self.model, self.path, self.device, name=self.name)
                elif copying:
                    assert self.stash is not None
                    self.stash.wake(sync=False)  # copies in flight while the manager starts (it runs no model yet)
                queued = time.perf_counter()
            except Exception as exc:  # a driver out-of-memory, a bad file: asleep as before, holding no more
                self._weights_off()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.footprint.drop()
                raise ElastikvError(f"{self.name}: waking failed bringing the weights back ({exc}); still asleep, "
                                    "holding only what it held asleep: the next wake tries again") from exc  # fmt: skip
            try:
                self._start()
                started = time.perf_counter()
            except EngineDied as exc:
                self.died = str(exc)  # unhealthy from now on: the router restarts the engine
                raise
            finally:
                if copying and not self.wake_early:
                    assert self.stash is not None
                    self.stash.synchronize()  # before any request: the batching thread computes on its own stream
            self._asleep = 0
            self.wakes += 1
            # the phases, for benchmarks/engine.py: weights back (queued only, with ELASTIKV_WAKE_EARLY), the
            # batching thread up, the wake's copies waited for (none left with ELASTIKV_WAKE_EARLY)
            end = time.perf_counter()
            return {"sleeping": 0, "seconds": end - t0, "weights_s": queued - t0, "start_s": started - queued,
                    "copies_wait_s": end - started}  # fmt: skip

    def _weights_off(self) -> None:
        """Every parameter an empty tensor on the device (level 2 asleep; a failed wake's partial load undone)."""
        for p in self.model.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=self.device)

    def _await_weights(self, _module: Any, _args: Any) -> None:
        """Before each forward, its stream waits on the GPU for the last wake's copies (they run on the stash's
        own stream): with ``wake_early`` the first request is scheduled and launched while they run, and in any
        mode a forward the batching thread runs as it starts reads the weights, not what the copies will
        overwrite. The host does not wait; a wait on copies long done costs nothing measurable."""
        if self.stash is not None:
            self.stash.await_copies()

    def _watch_manager(self, loop: asyncio.AbstractEventLoop) -> None:
        """While requests wait for tokens, check once a second that transformers' batching thread lives; if it
        died (it drops its requests without a word), end every waiting request with ``EngineDied``. One task per
        engine, off the per-token path."""
        if self._watchdog is not None and not self._watchdog.done():
            return

        async def watch() -> None:
            while self._queues:
                await asyncio.sleep(1.0)
                manager = self._manager
                if manager is not None and not manager.is_running():  # None: asleep, nothing in flight
                    for q in self._queues.values():
                        q.put_nowait(_DIED)
                    return

        self._watchdog = loop.create_task(watch())

    # -- requests -----------------------------------------------------------------------------------------
    def check_request(self, prompt: list[int], max_tokens: int) -> str | None:
        """Why this request cannot be served (a message naming the field and the limit), or None. Checked at the
        edge: what reaches transformers' batching thread must never kill or starve it."""
        if not prompt:
            return "the prompt is empty: give at least one token"
        bad = next((i for i, t in enumerate(prompt) if type(t) is not int or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            return f"prompt token {bad} is {prompt[bad]!r}: token ids are whole numbers in [0, {self.vocab_size})"
        total = len(prompt) + max_tokens
        if self.max_positions is not None and total > self.max_positions:
            return (f"the prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) is {total} tokens, more than this "
                    f"model's maximum length of {self.max_positions}")  # fmt: skip
        if self.max_request_tokens is not None and total > self.max_request_tokens:
            return (f"the prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) is {total} tokens, more than one "
                    f"batch may read ({self.max_request_tokens}, the engine's --max-kv-tokens)")  # fmt: skip
        return None

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        ids: Any = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # a BatchEncoding in some versions
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    async def generate(self, prompt: list[int], max_tokens: int) -> AsyncGenerator[tuple[list[int], bool, str | None]]:
        """Yields (all tokens so far, finished, error) as they come."""
        if self._asleep:
            raise Asleep(f"{self.name} is asleep (level {self._asleep}); POST /wake_up first")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        rid = f"req-{uuid.uuid4().hex[:12]}"
        manager = self._manager
        manager.register_result_handler(rid, queue.put_nowait)
        self._queues[rid] = queue
        self._watch_manager(loop)
        t0 = time.perf_counter()
        self.stats.waiting += 1
        await loop.run_in_executor(
            None, lambda: manager.add_request(prompt, request_id=rid, max_new_tokens=max_tokens, streaming=True)
        )
        first = True
        done = False
        try:
            while True:
                out = await queue.get()
                if out is _DIED:
                    raise EngineDied(
                        f"{self.name}: transformers' batching thread has stopped; the request is lost "
                        "(the engine's log says why); restart the engine"
                    )
                if first:
                    first = False
                    self.stats.waiting -= 1
                    self.stats.running += 1
                    self.stats.ttft.append(time.perf_counter() - t0)
                done = out.is_finished()
                yield list(out.generated_tokens), done, out.error
                if done:
                    break
        finally:
            if not done:  # the caller stopped reading (client disconnected, task cancelled): stop generating
                self.stats.cancelled += 1
                with contextlib.suppress(Exception):
                    manager.cancel_request(rid)  # thread-safe (a queue the batching thread reads): frees its KV
            self._queues.pop(rid, None)
            if first:
                self.stats.waiting -= 1
            else:
                self.stats.running -= 1
            self.stats.finished += 1
            if not self._queues:
                self._release_idle_memory()

    def _release_idle_memory(self) -> None:
        """The last request has left: give PyTorch's cached activation memory back to the driver, so that the
        models sharing this GPU can use it (elastikv gives back the KV pages itself). Without this, each
        engine keeps the high-water mark of its busiest moment: GiBs per engine on the H100 benchmark."""
        if self.device.type != "cuda":
            return
        for cache in self._adapter.caches():
            attention_impl.drop_workspace(cache)  # sized for the busiest batch
        torch.cuda.empty_cache()
