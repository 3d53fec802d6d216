"""The request body's size limit, enforced while the body is read (an ASGI middleware).

A ``Content-Length`` can be checked before reading, but a ``Transfer-Encoding: chunked`` body
says nothing of its size: read whole before the check, a 400 MiB upload grew the server by
800 MiB. Here every body message the app receives is counted, and the one that passes the limit
raises ``APIError(413)`` (answered in OpenAI's error shape by the app's handler) instead of being
handed on. The answer carries ``Connection: close``: the server then closes the connection rather
than read the rest of the upload (it has stopped reading it anyway: the HTTP server pauses a
connection whose body the app does not take).
"""

from __future__ import annotations

from mpdp.openai_api.response import APIError


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> APIError:
        return APIError(413, f"the request body is over {self.max_bytes} bytes")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared = _content_length(scope)
        seen = 0
        cut = declared is not None and declared > limit    # the app refuses it unread: close as well

        async def counted_receive():
            nonlocal seen, cut
            if cut:
                raise self.too_large()     # never read a byte of a body declared too large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    cut = True
                    raise self.too_large()
            return message

        async def closing_send(message):
            if cut and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, counted_receive, closing_send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None
