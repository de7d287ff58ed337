"""An OpenAI-compatible HTTP server over the embedded engine (``elastikv engine --model DIR``).

``/v1/completions`` and ``/v1/chat/completions`` (streamed as server-sent events with ``"stream": true``),
``/v1/models``, ``/health``, ``/metrics`` (Prometheus), and sleep control: ``POST /sleep?level=1|2`` (the answer
names the level used: a level 1 the engine's weight stash cannot take is done as level 2, with the reason),
``POST /wake_up``, ``GET /is_sleeping``. A request to a sleeping engine gets 409 with what to do (the router
wakes engines first). Decoding is greedy (the server's generation config); ``temperature`` is accepted and
ignored, and said so in the model card.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from elastikv.errors import ConfigError, ElastikvError, EngineDied
from elastikv.serving import requests
from elastikv.serving.engine import Asleep, Engine


def create_app(
    engine: Engine,
    *,
    close_on_shutdown: bool = False,
    start_token: str | None = None,
    control_token: str | None = None,
    on_serving: Callable[[], None] | None = None,
) -> FastAPI:
    """The engine's app. With ``close_on_shutdown`` the server's shutdown (SIGTERM, Ctrl-C) closes the engine, so
    its KV pages are unmapped and its ledger row leaves before the process ends. ``start_token`` (the router's
    ``ELASTIKV_START_TOKEN`` for this start) is reported on /health, so the router knows the port answers as the
    engine it started, not a foreign server. ``control_token`` (the router's ``ELASTIKV_CONTROL_TOKEN``, never shown)
    is then required on /sleep and /wake_up: another user of the machine, who can reach the port, cannot put the
    engine to sleep. ``on_serving`` runs once the server takes requests."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if on_serving is not None:
            on_serving()
        try:
            yield
        finally:
            if close_on_shutdown:
                await asyncio.get_running_loop().run_in_executor(None, engine.close)

    app = FastAPI(title=f"elastikv engine: {engine.name}", lifespan=lifespan)
    registry = CollectorRegistry()
    labels = ["model"]
    kv_mapped = Gauge("elastikv_kv_mapped_bytes", "KV memory mapped", labels, registry=registry)
    kv_in_use = Gauge("elastikv_kv_in_use_bytes", "KV memory holding live blocks", labels, registry=registry)
    kv_reserve = Gauge(
        "elastikv_kv_reserve_bytes", "KV memory mapped and free (the reserve)", labels, registry=registry
    )
    running = Gauge("elastikv_requests_running", "Requests generating", labels, registry=registry)
    waiting = Gauge("elastikv_requests_waiting", "Requests waiting for their first token", labels, registry=registry)
    sleeping = Gauge("elastikv_sleeping", "0 awake, else the sleep level", labels, registry=registry)
    kv_waits = Gauge(
        "elastikv_kv_waits",
        "Batches that waited for KV memory (budget full, nothing to preempt)",
        labels,
        registry=registry,
    )
    wakes = Gauge("elastikv_wakes", "Completed wake_up calls since start", labels, registry=registry)
    driver = {  # the allocator's time in the driver, for the current KV cache (see AllocatorStats)
        key: Gauge(f"elastikv_kv_{key}", help_, labels, registry=registry)
        for key, help_ in (
            ("caller_map_seconds", "Seconds allocations spent mapping pages themselves (the engine waited)"),
            ("background_map_seconds", "Seconds the maintainer spent mapping reserve pages"),
            ("unmap_seconds", "Seconds spent unmapping pages (fence waits included)"),
            ("pages_mapped_by_caller", "Pages allocations had to map themselves"),
            ("pages_mapped_total", "Pages mapped"),
        )
    }
    ttft = Histogram("elastikv_time_to_first_token_seconds", "Time to first token", labels, registry=registry)

    def usage(prompt: list[int], tokens: list[int]) -> dict[str, int]:
        return {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(tokens),
            "total_tokens": len(prompt) + len(tokens),
        }

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, a lone surrogate, nesting too deep
            raise HTTPException(400, f"the body is not JSON ({type(exc).__name__})") from None
        try:
            requests.check_body(request.url.path, body)  # the shape every edge checks (the router does too)
        except requests.BadRequest as exc:
            raise HTTPException(400, str(exc)) from None
        return dict(body)

    def check_model(body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != engine.name:
            raise HTTPException(404, f"model {model!r} is not served here; this engine serves {engine.name!r}")

    async def run(prompt: list[int], max_tokens: int, stream: bool, make_chunk: Any, make_final: Any) -> Any:
        problem = engine.check_request(prompt, max_tokens)
        if problem is not None:
            raise HTTPException(400, problem)
        if engine.sleeping:
            raise HTTPException(409, f"{engine.name} is asleep; POST /wake_up first (the router does it for you)")
        try:
            gen = engine.generate(prompt, max_tokens)
            if not stream:
                final: list[int] = []
                try:
                    async for tokens, _done, error in gen:
                        if error:
                            raise HTTPException(400, error)
                        final = tokens
                except EngineDied as exc:
                    raise HTTPException(503, str(exc)) from None
                return make_final(final)

            async def events() -> AsyncIterator[bytes]:
                sent = ""
                try:  # (closed early when the client disconnects: the finally below stops the generation)
                    async for tokens, done, error in gen:
                        if error:
                            yield f"data: {json.dumps({'error': {'message': error}})}\n\n".encode()
                            break
                        text = engine.decode(tokens)
                        delta, sent = text[len(sent) :], text
                        yield f"data: {json.dumps(make_chunk(delta, done, tokens))}\n\n".encode()
                except EngineDied as exc:
                    yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'engine_died'}})}\n\n".encode()
                finally:
                    await gen.aclose()  # at once, not when the garbage collector gets to it: the KV goes back now
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        except Asleep as exc:
            raise HTTPException(409, str(exc)) from None

    def finish_reason(tokens: list[int], max_tokens: int) -> str:
        return "length" if len(tokens) >= max_tokens else "stop"

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await body_of(request)
        check_model(body)
        prompt_in = body.get("prompt", "")
        if isinstance(prompt_in, list) and all(type(t) is int for t in prompt_in):
            prompt = list(prompt_in)
        elif isinstance(prompt_in, str):
            prompt = engine.encode(prompt_in)
        else:
            raise HTTPException(400, "prompt must be a string or a list of token ids (one prompt per request)")
        max_tokens = requests.max_tokens_of(body)
        rid, created = f"cmpl-{uuid.uuid4().hex[:16]}", int(time.time())

        def chunk(delta: str, done: bool, tokens: list[int]) -> dict[str, Any]:
            reason = finish_reason(tokens, max_tokens) if done else None
            return {"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                    "choices": [{"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}]}  # fmt: skip

        def final(tokens: list[int]) -> dict[str, Any]:
            out = chunk(engine.decode(tokens), True, tokens)
            out["choices"][0]["token_ids"] = tokens
            out["usage"] = usage(prompt, tokens)
            return out

        return await run(prompt, max_tokens, requests.stream_of(body), chunk, final)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await body_of(request)
        check_model(body)
        prompt = engine.encode_chat(requests.messages_of(body))
        max_tokens = requests.max_tokens_of(body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:16]}", int(time.time())

        def chunk(delta: str, done: bool, tokens: list[int]) -> dict[str, Any]:
            reason = finish_reason(tokens, max_tokens) if done else None
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": delta},
                                 "finish_reason": reason}]}  # fmt: skip

        def final(tokens: list[int]) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion", "created": created, "model": engine.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": engine.decode(tokens)},
                                 "finish_reason": finish_reason(tokens, max_tokens), "token_ids": tokens}],
                    "usage": usage(prompt, tokens)}  # fmt: skip

        return await run(prompt, max_tokens, requests.stream_of(body), chunk, final)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "elastikv",
                                            "root": str(engine.path), "decoding": "greedy"}]}  # fmt: skip

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.healthy
        body = {"status": "ok" if ok else "dead", "model": engine.name, "sleeping": engine.sleeping,
                "start_token": start_token, "reason": engine.died}  # fmt: skip
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/is_sleeping")
    async def is_sleeping() -> dict[str, Any]:
        return {"is_sleeping": bool(engine.sleeping), "level": engine.sleeping}

    def check_control(request: Request) -> None:
        if control_token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {control_token}".encode()):
            raise HTTPException(403, "sleep and wake are the router's: this engine was started with a control token")

    @app.post("/sleep")
    async def sleep(request: Request, level: int = 1) -> dict[str, Any]:
        check_control(request)
        try:
            return await asyncio.get_running_loop().run_in_executor(None, engine.sleep, level)
        except ConfigError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.post("/wake_up")
    async def wake_up(request: Request) -> Any:
        check_control(request)
        try:
            return await asyncio.get_running_loop().run_in_executor(None, engine.wake_up)
        except EngineDied as exc:
            raise HTTPException(503, str(exc)) from None
        except ElastikvError as exc:  # no room for the weights, or they did not come back: still asleep, try later
            return JSONResponse({"error": {"message": str(exc), "type": "wake_refused"}}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        inst = engine.instance
        if inst is not None and not engine.sleeping:
            s = inst.allocator.stats()
            kv_mapped.labels(engine.name).set(s.mapped_bytes)
            kv_in_use.labels(engine.name).set(s.blocks_in_use * s.page_bytes // max(1, inst.allocator.blocks_per_page))
            kv_reserve.labels(engine.name).set(
                s.blocks_free_mapped * s.page_bytes // max(1, inst.allocator.blocks_per_page)
            )
            for key, gauge in driver.items():
                gauge.labels(engine.name).set(getattr(s, key))
        else:
            for g in (kv_mapped, kv_in_use, kv_reserve):
                g.labels(engine.name).set(0)
            if engine.static_kv is not None and not engine.sleeping:
                kv_mapped.labels(engine.name).set(engine.static_kv)  # held from start to end
        kv_waits.labels(engine.name).set(engine.kv_waits)
        running.labels(engine.name).set(engine.stats.running)
        waiting.labels(engine.name).set(engine.stats.waiting)
        sleeping.labels(engine.name).set(engine.sleeping)
        wakes.labels(engine.name).set(engine.wakes)
        while engine.stats.ttft:
            ttft.labels(engine.name).observe(engine.stats.ttft.popleft())
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        code = {
            400: "invalid_request_error",
            403: "forbidden",
            404: "model_not_found",
            409: "engine_asleep",
            503: "engine_died",
        }.get(exc.status_code, "error")
        return JSONResponse({"error": {"message": exc.detail, "type": code}}, status_code=exc.status_code)

    return app
