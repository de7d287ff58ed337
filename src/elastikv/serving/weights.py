"""Where a sleeping model's weights wait: one host buffer per dtype, made once and kept across sleeps.

Who owns what. A :class:`WeightStash` belongs to one engine (``serving/engine.py``) and owns:

- its host buffers: one flat tensor per dtype over an anonymous ``mmap``, sized to the model's parameters, made
  once by :meth:`WeightStash.prepare` (on a background thread from :meth:`WeightStash.start`, once the
  engine has started, so that no sleep pays for it) and kept until :meth:`WeightStash.close`. On a CUDA device each
  buffer is pinned with ``cudaHostRegister`` (page-locked, so copies are DMA at full speed; PyTorch's pinned
  allocator would round a 17 GiB buffer up to 32 GiB, and keep it cached after use); on a CPU it is plain host
  memory, and every other step is the same code;
- the layout, fixed at construction from the model as loaded: each distinct storage behind the parameters gets
  one slot (its bytes, starting at a multiple of ``ALIGN`` bytes) in its dtype's buffer, and each parameter is a
  view of its storage's slot at its own offset, shape and stride. Parameters that shared a storage share a slot,
  so tied weights come back tied (one ``Parameter`` object under two names, as transformers ties embeddings, is
  one parameter here).

The model owns its parameters; the stash only re-points their ``.data``. A wake brings the weights back in
*pieces*: consecutive slots of one dtype, one device allocation and one copy each. By default one piece per dtype
(one ``cudaMalloc`` of the whole 15 GiB, then its copy); with ``ELASTIKV_WAKE_CHUNK`` pieces of at most that many
bytes (a slot larger than that is a piece alone), each copy queued as soon as its piece is allocated, so that
allocating the next overlaps it (``benchmarks/wake_parts.py`` measures both). After :meth:`WeightStash.wake` the
device pieces are owned by the parameters that view them: the stash keeps only their addresses, so dropping the
parameters' data (sleep level 2) frees them.

Invariants:

- the host buffers are never made again: every sleep writes the same memory (the same ``data_ptr``);
- the pieces partition each dtype's buffer (cut at construction, or again by :meth:`WeightStash.set_chunk`):
  every slot lies in exactly one;
- after :meth:`WeightStash.wake` every parameter is a view of its piece's device buffer at its slot, so the next
  :meth:`WeightStash.copy_out` copies one whole buffer per piece; before the first wake, or after the weights
  were reloaded from files, it copies parameter by parameter into the same slots;
- from :meth:`WeightStash.free_device` to :meth:`WeightStash.wake` every parameter is an empty tensor on the
  device and the host buffers hold the only copy of the weights;
- a wake's copies run on the stash's own stream, so that nothing else the engine queues waits behind them (a
  ``.item()`` on the default stream while the batching thread starts would otherwise wait for all 15 GiB); a
  stream that ran :meth:`WeightStash.await_copies` reads the weights only after them (the engine's
  ``ELASTIKV_WAKE_EARLY`` takes requests before they end on that basis), and :meth:`WeightStash.copy_out` runs
  it first, so a sleep straight after a wake copies out what the wake copied in.

Module buffers (``register_buffer``: rotary frequencies and the like) are not moved: they are small and stay.

Host memory bound: ``ELASTIKV_PIN_BUDGET`` (:func:`over_budget`) is per engine: every engine on a host pins its
own weights. Engines see each other without a shared file: pinned memory is not in the host's ``MemAvailable``,
and :meth:`WeightStash.prepare` refuses to pin what would leave less than ``HOST_RESERVE`` of the host's memory
available.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from elastikv.config import Settings, format_bytes
from elastikv.errors import ElastikvError
from elastikv.instance import physical_memory, pin_refusal

log = logging.getLogger("elastikv")

ALIGN = 512  # bytes: each slot starts at a multiple, as PyTorch's CUDA allocator aligns its blocks
CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, as PyTorch registers memory


class StashUnavailable(ElastikvError):
    """The stash has no host buffers (over the pin budget, pinning failed or not finished): use sleep level 2."""


def over_budget(nbytes: int, settings: Settings) -> str | None:
    """Why ``nbytes`` of weights may not be pinned by one engine under ``ELASTIKV_PIN_BUDGET``, or None."""
    budget = settings.pin_budget.resolve(physical_memory())
    if 0 < nbytes <= budget:
        return None
    return (
        f"the weights ({format_bytes(nbytes)}) exceed ELASTIKV_PIN_BUDGET ({settings.pin_budget}: "
        f"{format_bytes(budget)} of host memory one engine may pin)"
    )


@dataclass(frozen=True)
class _Slot:
    """One parameter's place: ``start`` (elements into its dtype's buffer) is its storage's slot, ``offset`` its
    own offset in that storage."""

    param: torch.nn.Parameter
    dtype: torch.dtype
    start: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def at(self) -> int:
        return self.start + self.offset

    def matches(self, data: torch.Tensor) -> bool:
        return (
            data.dtype == self.dtype
            and tuple(data.shape) == self.shape
            and (data.numel() == 0 or tuple(data.stride()) == self.stride)
        )


def _layout(model: torch.nn.Module) -> tuple[list[_Slot], dict[torch.dtype, int]]:
    """Every parameter's slot, and the elements of each dtype's buffer."""
    slots: list[_Slot] = []
    sizes: dict[torch.dtype, int] = {}
    storages: dict[int, tuple[torch.dtype, int]] = {}  # a storage's address -> (its dtype, its slot's start)
    for name, p in model.named_parameters():  # each Parameter object once
        data = p.data
        storage = data.untyped_storage()
        key = storage.data_ptr()
        if key in storages and key != 0:
            dtype, start = storages[key]
            if dtype != data.dtype:
                raise ElastikvError(f"parameter {name} ({data.dtype}) shares its storage with a {dtype} parameter: "
                                    "the weight stash keeps one dtype per storage; use sleep level 2")  # fmt: skip
        else:
            dtype, itemsize = data.dtype, data.element_size()
            align = max(1, ALIGN // itemsize)
            start = -(-sizes.get(dtype, 0) // align) * align
            sizes[dtype] = start + -(-storage.nbytes() // itemsize)
            storages[key] = (dtype, start)
        offset = int(data.storage_offset())
        slots.append(_Slot(p, dtype, start, offset, tuple(data.shape), tuple(data.stride())))
    return slots, sizes


@dataclass(frozen=True)
class _Piece:
    """Elements ``[lo, hi)`` of one dtype's buffer: what one wake allocation and one copy bring back."""

    dtype: torch.dtype
    lo: int
    hi: int


def _pieces(slots: list[_Slot], sizes: dict[torch.dtype, int], chunk_bytes: int) -> list[_Piece]:
    """Each dtype's buffer cut at slot starts into pieces of at most ``chunk_bytes`` (0: one piece per dtype),
    in the order the model named its parameters' storages (so layer by layer, as a forward pass reads them)."""
    out: list[_Piece] = []
    for dtype, n in sizes.items():
        starts = sorted({s.start for s in slots if s.dtype == dtype})  # each storage's slot (the first at 0)
        most = n if chunk_bytes <= 0 else max(1, chunk_bytes // dtype.itemsize)
        lo = 0
        for start, end in zip(starts, [*starts[1:], n], strict=True):  # each slot's extent, up to the next slot
            if start > lo and end - lo > most:
                out.append(_Piece(dtype, lo, start))
                lo = start
        out.append(_Piece(dtype, lo, n))
    return out


def load_weights(model: torch.nn.Module, path: Path, device: torch.device, *, name: str) -> None:
    """Every parameter of ``model`` read again from ``path``'s safetensors files onto ``device`` (the wake after
    sleep level 2). A parameter neither in the files nor tied to one that is is an error naming it."""
    from safetensors.torch import load_file

    by_name = dict(model.named_parameters())
    loaded: set[str] = set()
    for f in sorted(path.glob("*.safetensors")):
        for key, tensor in load_file(str(f), device=str(device)).items():
            p = by_name.get(key)
            if p is not None:
                p.data = tensor.to(p.dtype)
                loaded.add(key)
    for key in set(by_name) - loaded:  # tied weights share a tensor with a loaded one
        if model.get_parameter(key).numel() == 0:
            raise ElastikvError(f"waking {name}: weight {key} is not in {path}'s files")


def _cudart() -> Any:
    return torch.cuda.cudart()  # type: ignore[no-untyped-call]


def _pin(ptr: int, nbytes: int) -> None:
    err = int(_cudart().cudaHostRegister(ptr, nbytes, CUDA_HOST_REGISTER_PORTABLE))
    if err != 0:
        raise StashUnavailable(f"cudaHostRegister of {format_bytes(nbytes)} of host memory failed (cudaError {err})")


def _release(pinned: list[int], host: dict[torch.dtype, torch.Tensor], maps: list[mmap.mmap]) -> None:
    """Unpin and drop the host buffers (the memory goes back once no tensor views it)."""
    for ptr in pinned:
        with contextlib.suppress(Exception):
            _cudart().cudaHostUnregister(ptr)
    pinned.clear()
    host.clear()
    maps.clear()


class WeightStash:
    """One model's weights while it sleeps: host buffers made once, whole-buffer copies both ways. Not
    thread-safe for :meth:`copy_out`, :meth:`free_device` and :meth:`wake` (the engine serialises sleep and wake);
    :meth:`prepare` may run on another thread meanwhile."""

    def __init__(self, model: torch.nn.Module, device: torch.device, *, chunk_bytes: int = 0) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # "cuda" alone means the caller's current device; the pinning thread must name it (set_device
            # refuses a device without an index, and a new thread's current device is device 0)
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._slots, self._sizes = _layout(model)
        self._host: dict[torch.dtype, torch.Tensor] = {}
        self._maps: list[mmap.mmap] = []
        self._pinned: list[int] = []  # addresses registered with CUDA
        self._live: list[int] = []  # after wake: each piece's device buffer address
        self._copied: Any = None  # after a wake on CUDA: an event recorded behind its copies (await_copies)
        self._copy_stream: Any = None  # on CUDA, made at the first wake: where a wake's copies run
        self.set_chunk(chunk_bytes)  # the pieces a wake brings back
        self._lock = threading.Lock()
        self._done = threading.Event()  # prepare finished, made or failed
        self._thread: threading.Thread | None = None
        self._started_at: float | None = None
        self.error: BaseException | None = None
        self.prepare_seconds: float | None = None
        self.asleep = False  # the weights are in the host buffers only
        self._finalizer = weakref.finalize(self, _release, self._pinned, self._host, self._maps)

    # -- the host buffers ----------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Host bytes the buffers take (the parameters' storages, each slot aligned)."""
        return sum(n * dtype.itemsize for dtype, n in self._sizes.items())

    @property
    def pieces(self) -> int:
        """Device allocations (and copies) a wake makes: one per dtype, or more with ``ELASTIKV_WAKE_CHUNK``."""
        return len(self._pieces)

    @property
    def pinned(self) -> bool:
        return bool(self._pinned)

    @property
    def ready(self) -> bool:
        return self._done.is_set() and self.error is None

    def host_buffer(self, dtype: torch.dtype) -> torch.Tensor:
        """The flat host buffer of ``dtype`` (made by :meth:`prepare`)."""
        return self._host[dtype]

    def prepare(self) -> None:
        """Make the host buffers: map, touch every page (pinning does that on CUDA), pin. Idempotent and
        thread-safe; a failure is kept in ``error`` (sleeps then drop the weights instead) and raised."""
        with self._lock:
            if self._done.is_set():
                if self.error is not None:
                    raise self.error
                return
            t0 = time.perf_counter()
            try:
                refusal = pin_refusal(self.nbytes)
                if refusal is not None:
                    raise StashUnavailable(f"{refusal}: the weights' host buffer is not made")
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)
                for dtype, n in self._sizes.items():
                    nbytes = n * dtype.itemsize
                    mm = mmap.mmap(-1, max(1, nbytes))  # anonymous: page-aligned, returned to the host on release
                    self._maps.append(mm)
                    with contextlib.suppress(AttributeError, OSError):
                        mm.madvise(mmap.MADV_HUGEPAGE)  # fewer pages to pin and to walk in a copy
                    host = torch.frombuffer(mm, dtype=dtype, count=n) if n else torch.empty(0, dtype=dtype)
                    if self.device.type == "cuda" and n:
                        _pin(host.data_ptr(), nbytes)
                        self._pinned.append(host.data_ptr())
                    else:
                        host.zero_()  # every page faulted in now, not in the first sleep
                    self._host[dtype] = host
            except BaseException as exc:
                self.error = exc
                _release(self._pinned, self._host, self._maps)
                raise
            finally:
                self.prepare_seconds = time.perf_counter() - t0
                self._done.set()

    def start(self) -> None:
        """:meth:`prepare` on a background thread (its outcome: :meth:`wait`, ``error``, logged)."""

        def run() -> None:
            try:
                self.prepare()
            except BaseException as exc:
                log.warning("elastikv: no host buffer for the sleeping weights (%s): sleep level 1 becomes 2", exc)
                return
            log.info("elastikv: %s of host memory %s for the sleeping weights in %.1f s", format_bytes(self.nbytes),
                     "pinned" if self.pinned else "made", self.prepare_seconds or 0.0)  # fmt: skip

        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=run, name="elastikv-weight-stash", daemon=True)
        self._thread.start()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for :meth:`prepare`; whether the buffers are ready."""
        self._done.wait(timeout)
        return self.ready

    def why_not(self) -> str:
        """Why the buffers are not ready (for the sleep's answer and the log)."""
        if self.error is not None:
            return f"making the host buffer failed: {self.error}"
        if not self._done.is_set():
            since = "" if self._started_at is None else f" after {time.monotonic() - self._started_at:.0f} s"
            return f"the host buffer for the weights ({format_bytes(self.nbytes)}) is still being pinned{since}"
        return "ready"

    # -- sleep and wake ------------------------------------------------------------------------------------
    def copy_out(self) -> None:
        """Start copying the weights into the host buffers (non-blocking on CUDA); :meth:`free_device` waits for
        the copies. Nothing may write the weights in between."""
        if not self.ready:
            raise StashUnavailable(self.why_not())
        if self.asleep:
            raise ElastikvError("the weights are stashed already (wake before stashing again)")
        self.await_copies()  # a sleep straight after an early wake: read what the wake's copies wrote
        whole = self._device_buffers()
        if whole is not None:  # after a wake from the stash: one copy per piece
            for piece, flat in zip(self._pieces, whole, strict=True):
                self._host[piece.dtype][piece.lo : piece.hi].copy_(flat, non_blocking=True)
            return
        for s in self._slots:
            data = s.param.data
            if not s.matches(data):
                raise ElastikvError(f"a parameter changed shape or dtype since the engine loaded ({s.shape} "
                                    f"{s.dtype} -> {tuple(data.shape)} {data.dtype}): use sleep level 2")  # fmt: skip
            self._host[s.dtype].as_strided(s.shape, s.stride, s.at).copy_(data, non_blocking=True)

    def free_device(self) -> None:
        """Wait for :meth:`copy_out`'s copies, then give the device copy up: every parameter becomes an empty
        tensor on the device (the memory is freed once nothing else holds it)."""
        self.synchronize()
        for s in self._slots:
            s.param.data = torch.empty(0, dtype=s.dtype, device=self.device)
        self._live = []
        self._copied = None
        self.asleep = True

    def stash(self) -> None:
        """:meth:`copy_out` then :meth:`free_device`."""
        self.copy_out()
        self.free_device()

    def wake(self, *, sync: bool = True) -> None:
        """Bring the weights back: one device allocation and one copy per piece, each copy queued before the next
        piece is allocated, every parameter re-pointed at its slot. The copies run on the stash's stream; with
        ``sync=False`` they may still run on return: a stream reads the weights after :meth:`await_copies`, or
        after :meth:`synchronize`."""
        if not self.asleep:
            raise ElastikvError("the weights are not stashed")
        stream = None
        if self.device.type == "cuda":
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            stream = self._copy_stream
            stream.wait_stream(torch.cuda.current_stream(self.device))  # after what was queued before the wake
        device: list[torch.Tensor] = []
        for piece in self._pieces:
            flat = torch.empty(piece.hi - piece.lo, dtype=piece.dtype, device=self.device)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                flat.copy_(self._host[piece.dtype][piece.lo : piece.hi], non_blocking=True)
            if stream is not None:
                flat.record_stream(stream)  # freed early (a failed wake), its memory waits for the copy
            device.append(flat)
        for s, i in zip(self._slots, self._piece_of, strict=True):
            s.param.data = device[i].as_strided(s.shape, s.stride, s.at - self._pieces[i].lo)
        self._live = [flat.untyped_storage().data_ptr() for flat in device]
        if stream is not None:
            self._copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._copied.record(stream)  # behind the copies
        self.asleep = False
        if sync:
            self.synchronize()

    def await_copies(self) -> None:
        """Make the calling thread's current stream wait, on the device, for the last wake's copies (the host does
        not wait). For a forward that may start while a wake's copies still run (``ELASTIKV_WAKE_EARLY``); a
        no-op off CUDA, after the copies were waited for, and while a CUDA graph is being captured (the warm-up
        forward before a capture has waited on the same stream)."""
        copied = self._copied
        if copied is None or torch.cuda.is_current_stream_capturing():
            return
        if copied.query():  # done: no stream need wait again (each forward calls this; after a wake, nothing to do)
            self._copied = None
            return
        torch.cuda.current_stream(self.device).wait_event(copied)

    def set_chunk(self, chunk_bytes: int) -> None:
        """Cut the buffers into pieces of at most ``chunk_bytes`` from the next wake on (0: one per dtype). Awake,
        the next sleep then copies parameter by parameter (the device buffers were cut the old way)."""
        self._pieces = _pieces(self._slots, self._sizes, chunk_bytes)
        self._piece_of = [next(i for i, p in enumerate(self._pieces) if p.dtype == s.dtype and p.lo <= s.start < p.hi)
                          for s in self._slots]  # fmt: skip
        self._live = []

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._copied = None  # the wake's copies are done: await_copies has nothing to wait for

    def _device_buffers(self) -> list[torch.Tensor] | None:
        """Each piece's whole device buffer, if every parameter is still the view :meth:`wake` made; else None."""
        if not self._live:
            return None
        first: dict[int, torch.Tensor] = {}
        for s, i in zip(self._slots, self._piece_of, strict=True):
            data = s.param.data
            if (  # (an address is unique across host and devices: CUDA's unified addressing)
                not s.matches(data)
                or data.untyped_storage().data_ptr() != self._live[i]
                or data.storage_offset() != s.at - self._pieces[i].lo
            ):
                return None
            first.setdefault(i, data)
        return [first[i].as_strided((p.hi - p.lo,), (1,), 0) for i, p in enumerate(self._pieces)]

    def close(self) -> None:
        """Unpin and drop the host buffers (waits for a :meth:`prepare` still running). Weights stashed are lost."""
        if self._thread is not None:
            self._thread.join()
        self._finalizer()
        if self._done.is_set() and self.error is None:
            self.error = StashUnavailable("the weight stash is closed")
        self._done.set()
