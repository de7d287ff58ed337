"""The one OpenAI endpoint of a cluster: Serve's HTTP proxy hands every request here, and this hands it on.

A small CPU deployment (it asks for no GPU). For ``/v1/completions`` and ``/v1/chat/completions`` it reads the
body's ``model`` once and calls ``EngineReplica.relay(model, ...)`` through a streaming handle, whose request
router (:mod:`elastikv.ray.routing`) picks the replica by that first argument. The body goes on unchanged and the
answer comes back unchanged, chunk by chunk for a stream; ``/v1/models`` goes to any replica. Errors the
endpoint makes itself use OpenAI's body.

Failure: a replica that dies before answering (its node lost, its process killed) gives a 503 naming what
happened; one that dies mid-stream ends the stream with an SSE error event. Neither hangs: Ray reports the lost
actor to its caller.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

RELAYED = {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")}


def _error(status: int, message: str, *, code: str) -> JSONResponse:
    kind = "service_unavailable" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def _lost(exc: BaseException) -> str:
    first = (str(exc).splitlines() or [""])[0][:300]
    return (f"the replica serving this request was lost ({type(exc).__name__}: {first}); "
            "its models are served by the other replicas, retry")  # fmt: skip


def model_in(body: bytes) -> str | None:
    """The body's ``model``, None if it is not JSON or names none (the replica's router then says what is wrong)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    name = data.get("model") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None


class Endpoint:
    def __init__(self, engines: DeploymentHandle, models: list[str]) -> None:
        # Imported here: every module of elastikv imports without Ray (scripts/check-imports).
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        self.engines = engines.options(stream=True)
        self.models = models
        self.lost: tuple[type[BaseException], ...] = (RayError, RayServeException)  # a replica (or its node) lost

    async def __call__(self, request: Request) -> Response:
        method, path = request.method, request.url.path.rstrip("/")
        if (method, path) == ("GET", "/health"):
            return JSONResponse({"status": "ok", "models": self.models})
        if (method, path) not in RELAYED:
            return _error(404, f"{method} {path}: not served here; use /v1/completions, /v1/chat/completions or "
                          "/v1/models", code="not_found")  # fmt: skip
        body = await request.body()
        model = model_in(body) if method == "POST" else None
        gen: DeploymentResponseGenerator[Any] = self.engines.relay.remote(model, method, path, body)
        try:
            head = await gen.__anext__()
        except StopAsyncIteration:
            return _error(503, "the replica ended the answer before it began", code="engine_unavailable")
        except self.lost as exc:
            return _error(503, _lost(exc), code="replica_lost")
        headers = {"x-elastikv-node": str(head.get("node_id", "")), "x-elastikv-replica": str(head.get("replica", ""))}
        media = str(head.get("content_type", "application/json"))
        status = int(head.get("status", 502))
        if not media.startswith("text/event-stream"):
            chunks = []
            try:
                async for chunk in gen:
                    chunks.append(chunk)
            except self.lost as exc:
                return _error(503, _lost(exc), code="replica_lost")
            return Response(b"".join(chunks), status_code=status, media_type=media, headers=headers)
        return StreamingResponse(_rest(gen, self.lost), status_code=status, media_type=media, headers=headers)


async def _rest(gen: DeploymentResponseGenerator[Any], lost: tuple[type[BaseException], ...]) -> AsyncIterator[bytes]:
    finished = False
    try:
        async for chunk in gen:
            yield chunk
        finished = True
    except lost as exc:
        finished = True
        yield f"data: {json.dumps({'error': {'message': _lost(exc), 'type': 'replica_lost'}})}\n\n".encode()
    finally:
        if not finished:  # the client went away: stop the generation at the replica too
            gen.cancel()
