"""The shape of an OpenAI completion or chat request, checked where it enters elastikv: by the router before it
wakes a model for the request (a malformed request must not wake anything) and by the embedded engine. One
module, so that both edges refuse the same things with the same words.

Only what holds for every engine is checked here (types and ranges the OpenAI API defines); what depends on
the model (vocabulary, maximum length, KV budget) is the engine's (``Engine.check_request``). Each check raises
:class:`BadRequest` naming the field and what it must be; the HTTP layers answer 400 with that message.
"""

from __future__ import annotations

from typing import Any

DEFAULT_MAX_TOKENS = 256


class BadRequest(ValueError):
    """A request the API does not allow: a 400 with this message."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_body(path: str, body: Any) -> None:
    """Check a ``/v1/completions`` or ``/v1/chat/completions`` body (already parsed JSON)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if path.endswith("/chat/completions"):
        messages_of(body)
    elif "prompt" in body and not isinstance(body["prompt"], (str, list)):
        raise BadRequest("prompt must be a string or a list of token ids")
    max_tokens_of(body)
    stream_of(body)


def max_tokens_of(body: dict[str, Any]) -> int:
    value = body.get("max_tokens")  # null means "not given", as in vLLM
    if value is None:
        value = body.get("max_completion_tokens")
    if value is None:
        value = DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise BadRequest(f"max_tokens must be a positive whole number, got {value!r:.40}")
    return value


def stream_of(body: dict[str, Any]) -> bool:
    """``stream`` (a boolean), after checking the sampling fields: each, if given, must be a number >= 0."""
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and (not _number(value) or value < 0):
            raise BadRequest(f"{name} must be a number >= 0, got {value!r:.40}")
    value = body.get("stream")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"stream must be true or false, got {value!r:.40}")
    return value


def messages_of(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadRequest(f"messages[{i}] must be {{role: string, content: string}}, got {m!r:.80}")
    return messages
