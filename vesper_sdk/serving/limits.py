"""The request-body limit: a body over the limit gets 413 before anything parses it.

Pure ASGI: a ``Content-Length`` over the limit is refused before the body is read; a body
sent without one (chunked) is counted as it arrives and refused as soon as it passes the
limit. Either way no handler sees it, so a huge body never reaches JSON parsing or the
tokenizer. The rest of the body is read and dropped (up to ``DRAIN_FACTOR`` times the
limit, then the connection is closed) before the answer goes out: a client still sending
would otherwise see its connection reset instead of the 413.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DRAIN_FACTOR = 32


class _TooLarge(HTTPException):
    """Raised while the body is read: FastAPI answers it (413) like any HTTP error."""


class BodyLimitMiddleware:
    def __init__(self, app: Any, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _text(self, size: str) -> str:
        return (f"the request body ({size}) is over this server's limit of "
                f"{self.max_bytes} bytes: send a shorter prompt (the server's --max-body-mb "
                "sets the limit)")

    def _message(self, size: str) -> bytes:
        return json.dumps({"error": {"message": self._text(size),
                                     "type": "invalid_request_error", "param": None,
                                     "code": "request_too_large"}}).encode()

    async def _drain(self, receive: Callable, message: dict) -> None:
        """Read and drop the rest of the body (a bounded amount)."""
        drained = 0
        while message.get("more_body", False) and drained <= DRAIN_FACTOR * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            drained += len(message.get("body", b""))

    async def _refuse(self, receive: Callable, send: Callable, size: str) -> None:
        await self._drain(receive, {"more_body": True})
        body = self._message(size)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(receive, send, f"{int(length)} bytes")
            return
        received = 0
        started = False

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    await self._drain(receive, message)
                    raise _TooLarge(413, self._text(f"over {self.max_bytes} bytes"))
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:  # raised outside FastAPI's body reading (it answers those itself)
            if not started:
                await self._refuse(receive, send, f"over {self.max_bytes} bytes")
