"""The router's HTTP face: the OpenAI endpoints routed by ``model``, admin endpoints, Prometheus metrics.

Requests are relayed byte for byte: the body goes to the engine unchanged and the engine's answer (a JSON body,
or a server-sent-event stream relayed chunk by chunk as it arrives) comes back unchanged, so whatever the
engine supports (sampling options, tools, logprobs) works through the router. Errors the router itself makes
use OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from elastikv.errors import ConfigError, ElastikvError
from elastikv.router.config import parse_model
from elastikv.router.router import Router
from elastikv.router.states import ModelConflict, State, Unavailable
from elastikv.router.supervisor import DRAIN_TIMEOUT_S, ManagedModel
from elastikv.serving import requests


def error(status: int, message: str, *, type_: str, code: str | None = None, param: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def unavailable(exc: Unavailable) -> JSONResponse:
    return error(503, str(exc), type_="service_unavailable", code="engine_unavailable",
                 headers={"Retry-After": str(max(1, round(exc.retry_after_s)))})  # fmt: skip


class Metrics:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.registry = r = CollectorRegistry()
        self.requests = Counter("elastikv_router_requests", "Requests answered", ["model", "code"], registry=r)
        self.latency = Histogram("elastikv_router_request_seconds", "Time to the last byte", ["model"], registry=r)
        self.first_byte = Histogram(
            "elastikv_router_first_byte_seconds", "Time to the first byte (TTFT when streaming)", ["model"], registry=r
        )
        self.wake_seconds = Histogram("elastikv_router_wake_seconds", "Time a wake took", ["model"], registry=r)
        self.state = Gauge(
            "elastikv_router_model_state", "1 for the model's current state", ["model", "state"], registry=r
        )
        self.active = Gauge("elastikv_router_requests_active", "Requests at the engine now", ["model"], registry=r)
        self.counts = {
            key: Gauge(f"elastikv_router_{key}", help_, ["model"], registry=r)
            for key, help_ in (("wakes", "Wakes so far"), ("sleeps", "Sleeps so far"),
                               ("restarts", "Restarts after a crash so far"), ("crashes", "Engine exits not asked for"))
        }  # fmt: skip
        self.kv_mapped = Gauge("elastikv_kv_mapped_bytes", "KV memory mapped (from the ledger)", ["model"], registry=r)
        self.evictions = Gauge("elastikv_router_evictions", "Times a model was put to sleep to make room for another",
                               ["model", "reason"], registry=r)  # fmt: skip

    def render(self) -> str:
        mapped = self.router.ledger_rows()
        for name, m in list(self.router.models.items()):  # a thread: the loop may add or remove models meanwhile
            for s in State:
                self.state.labels(name, s.value).set(1 if m.state is s else 0)
            self.active.labels(name).set(m.active)
            c = m.counters
            for key in self.counts:
                self.counts[key].labels(name).set(getattr(c, key))
            while c.wake_seconds:
                self.wake_seconds.labels(name).observe(c.wake_seconds.popleft())
            self.kv_mapped.labels(name).set(mapped.get(name, 0))
        for (name, reason), n in self.router.room.evictions.items():
            self.evictions.labels(name, reason).set(n)
        return generate_latest(self.registry).decode()


def create_app(router: Router, *, manage_lifetime: bool = True) -> FastAPI:
    """The router's app. With ``manage_lifetime`` the app's start-up starts every engine and its shutdown
    (uvicorn's SIGTERM/SIGINT handling included) stops them."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifetime:
            await router.start()
        try:
            yield
        finally:
            if manage_lifetime:
                await router.stop()

    app = FastAPI(title="elastikv router", lifespan=lifespan)
    metrics = Metrics(router)
    token = router.config.admin_token

    async def relay(request: Request, path: str) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep
            return error(400, "the body is not JSON", type_="invalid_request_error")
        name = body.get("model") if isinstance(body, dict) else None
        if not isinstance(name, str):
            served = ", ".join(router.models)
            return error(400, f"say which model: \"model\" is required (served here: {served})",
                         type_="invalid_request_error", param="model")  # fmt: skip
        model = router.models.get(name)
        if model is None:
            served = ", ".join(router.models)
            return error(404, f"The model `{name}` does not exist. Served here: {served}.",
                         type_="invalid_request_error", param="model", code="model_not_found")  # fmt: skip
        try:  # before the model is woken or started for it
            requests.check_body(path, body)
        except requests.BadRequest as exc:
            return error(400, str(exc), type_="invalid_request_error")
        t0 = time.monotonic()
        try:
            await model.acquire()
        except Unavailable as exc:
            metrics.requests.labels(name, "503").inc()
            return unavailable(exc)
        released = False

        def done(code: int) -> None:
            nonlocal released
            if not released:
                released = True
                model.release()
                metrics.requests.labels(name, str(code)).inc()
                metrics.latency.labels(name).observe(time.monotonic() - t0)

        try:
            upstream = await router.client.send(
                router.client.build_request(
                    "POST", model.url + path, content=raw, headers={"content-type": "application/json"}
                ),
                stream=True,
            )
        except httpx.HTTPError as exc:
            done(503)
            return await lost(model, exc)
        metrics.first_byte.labels(name).observe(time.monotonic() - t0)
        media = upstream.headers.get("content-type", "application/json")
        if not media.startswith("text/event-stream"):
            try:
                data = await upstream.aread()
            except httpx.HTTPError as exc:
                done(503)
                return await lost(model, exc)
            finally:
                await upstream.aclose()
            done(upstream.status_code)
            return Response(data, status_code=upstream.status_code, media_type=media)

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            except httpx.HTTPError as exc:
                message = f"the engine for {name!r} stopped mid-answer ({type(exc).__name__}); it is being restarted"
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'engine_unavailable'}})}\n\n".encode()
            finally:
                await upstream.aclose()
                done(upstream.status_code)

        return StreamingResponse(stream(), status_code=upstream.status_code, media_type=media)

    async def lost(model: ManagedModel, exc: Exception) -> JSONResponse:
        # The engine did not answer: most likely it died. Its exit reaches the supervisor a moment later; give it
        # that moment so the answer can say what happened.
        await asyncio.sleep(0.1)
        try:
            model.refuse_if_down()
        except Unavailable as down:
            return unavailable(down)
        return unavailable(Unavailable(
            f"the engine for {model.spec.name!r} did not answer ({type(exc).__name__}: {exc}); "
            f"if it crashed it is being restarted (log: {model.log_path}); retry shortly"
        ))  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await relay(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await relay(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": name, "object": "model", "owned_by": "elastikv", "engine": m.spec.engine,
                 "state": m.state.value} for name, m in router.models.items()]  # fmt: skip
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": {name: m.state.value for name, m in router.models.items()}}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        text = await asyncio.get_running_loop().run_in_executor(None, metrics.render)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # -- admin ------------------------------------------------------------------------------------------------
    def refused(request: Request) -> JSONResponse | None:
        if token is None:
            return error(403, "admin endpoints are off: set admin_token in the router's config "
                         "(or ELASTIKV_ADMIN_TOKEN) and restart it", type_="permission_error")  # fmt: skip
        given = request.headers.get("authorization", "")
        if not given.lower().startswith("bearer "):
            return error(401, "admin endpoints need the admin token: send 'Authorization: Bearer <token>'",
                         type_="authentication_error", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        if not secrets.compare_digest(given[7:].strip().encode(), token.encode()):
            return error(403, "wrong admin token", type_="permission_error")
        return None

    async def admin_target(request: Request) -> tuple[ManagedModel, dict[str, Any]] | JSONResponse:
        """The model an admin request names, and its body; or the refusal to send back."""
        if (no := refused(request)) is not None:
            return no
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            body = None
        name = body.get("model") if isinstance(body, dict) else None
        if not isinstance(body, dict) or not isinstance(name, str) or name not in router.models:
            return error(404 if isinstance(name, str) else 400,
                         f"give an existing model as {{\"model\": NAME}}; served here: {', '.join(router.models)}",
                         type_="invalid_request_error", param="model")  # fmt: skip
        return router.models[name], body

    @app.get("/admin/status")
    async def admin_status(request: Request) -> Response:
        if (no := refused(request)) is not None:
            return no
        loop = asyncio.get_running_loop()
        mapped = await loop.run_in_executor(None, router.ledger_rows)
        device = await loop.run_in_executor(None, router.device_room)
        rows = [{**m.status(), "kv_mapped_bytes": mapped.get(name, 0)} for name, m in list(router.models.items())]
        return JSONResponse({"models": rows, "device": device, "log_dir": str(router.log_dir)})

    @app.post("/admin/models")
    async def admin_add(request: Request) -> Response:
        """Serve one more model from now on: the body is one entry of the config's ``models``."""
        if (no := refused(request)) is not None:
            return no
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            return error(400, "the body is not JSON; send one model entry, e.g. {\"name\": ..., \"model\": ...}",
                         type_="invalid_request_error")  # fmt: skip
        try:
            spec = parse_model(body, router.config, what="the model to add")
            model = await router.add_model(spec)
        except ConfigError as exc:
            return error(400, str(exc), type_="invalid_request_error")
        except ModelConflict as exc:
            return error(409, str(exc), type_="invalid_request_error", code="conflict")
        except Unavailable as exc:
            return unavailable(exc)
        except ElastikvError as exc:  # it did not come up: the end of its log is in the message
            return error(502, str(exc), type_="engine_error", code="engine_start_failed")
        return JSONResponse(model.status(), status_code=201)

    @app.delete("/admin/models/{name}")
    async def admin_remove(request: Request, name: str) -> Response:
        """Stop serving a model: refused from now on, requests in flight finish (``drain``: seconds, default
        120), then its engine stops."""
        if (no := refused(request)) is not None:
            return no
        try:
            drain_s = float(request.query_params.get("drain", DRAIN_TIMEOUT_S))
        except ValueError:
            return error(400, "drain: a number of seconds", type_="invalid_request_error", param="drain")
        try:
            return JSONResponse(await router.remove_model(name, drain_s=drain_s))
        except KeyError:
            return error(404, f"no model {name!r} here; served: {', '.join(router.models)}",
                         type_="invalid_request_error", code="model_not_found")  # fmt: skip
        except ModelConflict as exc:
            return error(409, str(exc), type_="invalid_request_error", code="conflict")

    @app.post("/admin/sleep")
    async def admin_sleep(request: Request) -> Response:
        target = await admin_target(request)
        if isinstance(target, JSONResponse):
            return target
        model, body = target
        level = body.get("level")
        if level not in (None, 1, 2, "stop"):
            return error(400, f'level {level!r}: use 1, 2 or "stop"', type_="invalid_request_error", param="level")
        try:
            return JSONResponse(await model.sleep(level, reason="admin"))
        except Unavailable as exc:
            return unavailable(exc)

    @app.post("/admin/wake")
    async def admin_wake(request: Request) -> Response:
        target = await admin_target(request)
        if isinstance(target, JSONResponse):
            return target
        try:
            return JSONResponse(await target[0].wake())
        except Unavailable as exc:
            return unavailable(exc)

    return app
