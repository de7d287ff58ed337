"""Workloads for several models at once: an intermittent, bursty trace, its replay over HTTP, and its figures.

The trace is what elastic sharing is for: each model idle most of the time (a low base rate) and ramping to a
peak at its own moment, so that at any time one model needs much more memory than a static share gives it while
the others need little. ``intermittent`` makes one from a seed; ``save_trace``/``load_trace`` keep it as JSON
lines so that a run can be repeated, or a user's own trace replayed. ``replay`` sends each request at its time to
an OpenAI-compatible endpoint (the router), streaming, and records when the first and last tokens came.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from elastikv.errors import ConfigError


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds from the start of the replay
    model: str
    prompt_tokens: int
    output_tokens: int


@dataclass
class Outcome:
    arrival: Arrival
    status: int = 0  # HTTP status; 0 when no answer came
    ttft: float | None = None  # seconds from sending to the first streamed token
    latency: float | None = None  # seconds from sending to the last byte
    tokens: int = 0  # completion tokens received
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.ttft is not None

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first."""
        if self.ttft is None or self.latency is None or self.tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.tokens - 1)


Lengths = Callable[[random.Random], tuple[int, int]]  # a request's (prompt, output) tokens, drawn from a seed

# ShareGPT conversations as the vLLM paper measured them (Kwon et al., SOSP 2023, section 6.1): 161 input and
# 338 output tokens on average, both spread over orders of magnitude. Drawn here from log-normals with those means.
CHAT_MEAN_PROMPT, CHAT_MEAN_OUTPUT, CHAT_SIGMA = 161.0, 338.0, 1.0


def chat_lengths(max_prompt: int = 2048, max_output: int = 1024) -> Lengths:
    """Chat-like request lengths (short prompts, answers of a few hundred tokens): ShareGPT's means as published
    by the vLLM paper, log-normal, clipped to ``[4, max]``. Memory rarely binds with these; compute does."""
    mu_p = math.log(CHAT_MEAN_PROMPT) - CHAT_SIGMA**2 / 2
    mu_o = math.log(CHAT_MEAN_OUTPUT) - CHAT_SIGMA**2 / 2

    def draw(rng: random.Random) -> tuple[int, int]:
        p = int(rng.lognormvariate(mu_p, CHAT_SIGMA))
        o = int(rng.lognormvariate(mu_o, CHAT_SIGMA))
        return min(max(4, p), max_prompt), min(max(4, o), max_output)

    return draw


def intermittent(
    models: Sequence[str],
    *,
    duration: float,
    base_rate: float,
    peak_rate: float,
    peak_width: float,
    prompt_tokens: int,
    output_tokens: int,
    seed: int = 0,
    lengths: Lengths | None = None,
) -> list[Arrival]:
    """A Poisson trace whose rate for model ``i`` is ``base_rate`` plus a raised-cosine peak of ``peak_rate``
    requests/s, ``peak_width`` seconds wide at its base, centred at ``(i + 0.5) / len(models)`` of ``duration``:
    the models peak one after the other and are nearly idle in between. Every request is ``prompt_tokens`` +
    ``output_tokens`` long, or as ``lengths`` draws it (e.g. :func:`chat_lengths`)."""
    if duration <= 0 or peak_width <= 0 or base_rate < 0 or peak_rate < 0:
        raise ConfigError("duration and peak width must be positive, rates not negative")
    rng = random.Random(seed)
    top = base_rate + peak_rate
    out: list[Arrival] = []
    for i, model in enumerate(models):
        centre = (i + 0.5) / len(models) * duration

        def rate(t: float, centre: float = centre) -> float:
            x = (t - centre) / (peak_width / 2)
            return base_rate + (peak_rate * 0.5 * (1 + math.cos(math.pi * x)) if abs(x) < 1 else 0.0)

        t = 0.0
        while True:  # thinning: candidates at the top rate, each kept with probability rate(t) / top
            t += rng.expovariate(top) if top > 0 else duration
            if t >= duration:
                break
            if rng.random() * top < rate(t):
                p, o = lengths(rng) if lengths is not None else (prompt_tokens, output_tokens)
                out.append(Arrival(round(t, 4), model, p, o))
    return sorted(out, key=lambda a: a.at)


def peak_rate(trace: Sequence[Arrival], window: float) -> float:
    """The highest rate (requests/s) at which any one model's requests arrive over ``window`` seconds of the
    trace: how a replayed trace is placed among a sweep's peak rates."""
    if window <= 0:
        raise ValueError(f"the window must be positive, got {window}")
    best = 0
    by_model: dict[str, list[float]] = {}
    for a in trace:
        by_model.setdefault(a.model, []).append(a.at)
    for times in by_model.values():
        times.sort()
        first = 0
        for last, t in enumerate(times):  # the arrivals in (t - window, t]
            while times[first] <= t - window:
                first += 1
            best = max(best, last - first + 1)
    return round(best / window, 3)


def save_trace(trace: Sequence[Arrival], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(asdict(a)) + "\n" for a in trace))


def load_trace(path: str | Path) -> list[Arrival]:
    """One JSON object per line: ``{"at": 1.5, "model": "a", "prompt_tokens": 128, "output_tokens": 64}``."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(Arrival(float(d["at"]), str(d["model"]), int(d["prompt_tokens"]), int(d["output_tokens"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}:{n}: not a trace line ({exc}); write {{\"at\": seconds, \"model\": name, "
                              "\"prompt_tokens\": n, \"output_tokens\": n}}") from None  # fmt: skip
    return sorted(out, key=lambda a: a.at)


def prompt_ids(arrival: Arrival, index: int, vocab: int = 2000) -> list[int]:
    """Token ids for one request's prompt: fixed by the request (its model, time and place in the trace), so a
    replay sends the same prompts in every mode, and distinct from every other request's, in this trace and in
    any other replayed to the same engines: a prompt seen before would be served from an engine's prefix cache
    (transformers keeps one in the static baseline) and time a cache hit instead of a prefill."""
    rng = random.Random(f"{arrival.model}:{arrival.at:.6f}:{index}")
    return [rng.randrange(10, vocab) for _ in range(arrival.prompt_tokens)]


STALL_S = 120.0  # the multi-model benchmark's: no token from any request in flight this long, the run has stalled


async def replay(
    url: str,
    trace: Sequence[Arrival],
    *,
    on_done: Callable[[Outcome], None] | None = None,
    timeout: float = 300.0,
    stall_s: float | None = None,
) -> list[Outcome]:
    """Send every request of ``trace`` at its time to ``url``'s ``/v1/completions`` (streamed) and wait for all.

    With ``stall_s``, a run that stalls (requests in flight and not one token from any of them for that long) ends
    there: every request not yet answered fails with that reason, so a mode whose engines can never serve costs
    ``stall_s``, not every request's ``timeout`` (seen on the H100: 56 requests waiting on KV memory the budget
    never had). None where a wait that long is normal (cold starts of vLLM servers behind a lazy router)."""
    import httpx

    outcomes = [Outcome(a) for a in trace]
    t0 = time.monotonic()
    progress, in_flight = t0, 0  # when any request last got a token (or ended); requests sent, not yet ended
    stalled: str | None = None

    async def one(i: int, client: httpx.AsyncClient) -> None:
        nonlocal progress, in_flight
        o = outcomes[i]
        a = o.arrival
        sending = False
        try:
            await asyncio.sleep(max(0.0, t0 + a.at - time.monotonic()))
            body = {"model": a.model, "prompt": prompt_ids(a, i), "max_tokens": a.output_tokens, "stream": True,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            sent = time.monotonic()
            sending, in_flight = True, in_flight + 1
            async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as r:
                o.status = r.status_code
                if r.status_code != 200:
                    o.error = (await r.aread()).decode(errors="replace")[:300]
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    progress = time.monotonic()
                    if o.ttft is None:
                        o.ttft = progress - sent
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        o.error = str(chunk["error"])
                    else:
                        o.tokens += 1
                o.latency = time.monotonic() - sent
        except httpx.HTTPError as exc:
            o.error = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            if stalled is None:
                raise  # the caller's cancellation (a signal): not ours to swallow
            o.error = stalled if sending else f"not sent: {stalled}"
        finally:
            if sending:
                in_flight -= 1
                progress = time.monotonic()
            if on_done is not None:
                on_done(o)

    async def watch(tasks: list[asyncio.Task[None]], stall_s: float) -> None:
        nonlocal stalled
        while True:
            await asyncio.sleep(min(1.0, stall_s / 4))
            if in_flight and time.monotonic() - progress > stall_s:
                stalled = f"stalled: no token from any of the {in_flight} requests in flight for {stall_s:g} s"
                for task in tasks:
                    task.cancel()
                return

    # keepalive_expiry below the server's (uvicorn: 5 s): never reuse a connection the server is closing.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=2.0)
    async with httpx.AsyncClient(limits=limits) as client:
        tasks = [asyncio.create_task(one(i, client)) for i in range(len(trace))]
        watcher = asyncio.create_task(watch(tasks, stall_s)) if stall_s is not None else None
        try:
            await asyncio.gather(*tasks)
        finally:
            if watcher is not None:
                watcher.cancel()
            for task in tasks:
                task.cancel()
    return outcomes


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between ranks; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(outcomes: Sequence[Outcome]) -> dict[str, float | int]:
    """TTFT and TPOT (mean, p50, p99, seconds) and counts, over the requests answered."""
    ok = [o for o in outcomes if o.ok]
    ttft = [o.ttft for o in ok if o.ttft is not None]
    tpot = [t for o in ok if (t := o.tpot) is not None]
    return {
        "requests": len(outcomes),
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
        "ttft_mean": statistics.fmean(ttft) if ttft else math.nan,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "tpot_mean": statistics.fmean(tpot) if tpot else math.nan,
        "tpot_p99": percentile(tpot, 99),
    }
