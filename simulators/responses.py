"""OpenAI Responses API simulator (`POST /v1/responses`, non-streaming), beside Realtime.

The gateway's summarizer calls `client.responses.create(...)`; this answers with a
`Response` object the SDK parses, built from the request's own input so a test can
see facts carried from a conversation into the summary. Failures are injectable.
"""

from __future__ import annotations

import inspect
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

SummaryFn = Callable[[str, str], "str | Awaitable[str]"]  # (instructions, input) -> output


def echo_summary(instructions: str, text: str) -> str:
    """A 'summary' that keeps every line the person said, so facts survive verbatim."""
    said = [line for line in text.splitlines() if line.strip()]
    return "Resumo: " + " | ".join(said)[:4000]


@dataclass
class ResponsesRequest:
    at: float
    body: dict[str, Any]
    status: int


@dataclass
class ResponsesSimulator:
    reply: SummaryFn = echo_summary
    requests: list[ResponsesRequest] = field(default_factory=list)
    _failures: list[int] = field(default_factory=list)

    def attach(self, app: web.Application, prefix: str = "/v1") -> None:
        app.router.add_post(f"{prefix}/responses", self.handle)

    def fail_next(self, count: int = 1, status: int = 500) -> None:
        self._failures += [status] * count

    async def handle(self, request: web.Request) -> web.Response:
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return _error(401, "Missing bearer authentication in header", "invalid_api_key")
        try:
            raw = await request.read()
        except ConnectionError:  # the client left mid-body (a gateway shutting down)
            return _error(400, "The request body did not arrive", None)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._record({}, _error(400, "We could not parse the JSON body", None))
        if not isinstance(body, dict) or "model" not in body or "input" not in body:
            return self._record({}, _error(400, "Missing required parameter: 'model' or 'input'",
                                           "missing_required_parameter"))  # fmt: skip
        if self._failures:
            status = self._failures.pop(0)
            return self._record(body, _error(status, "The server had an error", "server_error"))
        text = self.reply(str(body.get("instructions") or ""), _input_text(body["input"]))
        if inspect.isawaitable(text):  # a test holding the answer back
            text = await text
        return self._record(body, web.json_response(_response(body, text)))

    def _record(self, body: dict[str, Any], response: web.Response) -> web.Response:
        self.requests.append(ResponsesRequest(time.monotonic(), body, response.status))
        return response


def _input_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    parts = []
    for item in value if isinstance(value, list) else []:
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [c.get("text", "") for c in content if isinstance(c, dict)]
    return "\n".join(parts)


def _response(body: dict[str, Any], text: str) -> dict[str, Any]:
    words_in = len(_input_text(body["input"]).split()) + len(str(body.get("instructions", "")))
    words_out = len(text.split())
    return {
        "id": f"resp_{secrets.token_hex(12)}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": body["model"],
        "output": [
            {
                "type": "message",
                "id": f"msg_{secrets.token_hex(12)}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "instructions": body.get("instructions"),
        "usage": {
            "input_tokens": words_in,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": words_out,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": words_in + words_out,
        },
    }


def _error(status: int, message: str, code: str | None) -> web.Response:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status)
