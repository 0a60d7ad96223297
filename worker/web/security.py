"""Headers every answer of the status page carries, and the Origin check of its POSTs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
HSTS: Final = "max-age=31536000"


def security_headers(*, https: bool) -> dict[str, str]:
    headers = {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        # Pages show who sent which invoice: no shared cache keeps them.
        "Cache-Control": "no-store",
    }
    if https:
        headers["Strict-Transport-Security"] = HSTS
    return headers


class SecurityHeaders:
    """ASGI middleware: sets `security_headers` on every HTTP answer (errors included)."""

    def __init__(self, app: ASGIApp, *, https: bool) -> None:
        self._app = app
        self._headers = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in security_headers(https=https).items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in self._headers}
                kept = [item for item in message.get("headers", []) if item[0] not in names]
                message["headers"] = kept + self._headers
            await send(message)

        await self._app(scope, receive, with_headers)


def origin_allowed(headers: Mapping[str, str], public_origin: str | None) -> bool:
    """A POST's Origin (or, from a browser that sends none, its Referer) must be the
    published page's; without a public URL there is nothing to compare with."""
    if public_origin is None:
        return True
    origin = headers.get("origin")
    if origin is not None:
        return origin == public_origin
    referer = headers.get("referer")
    return referer is not None and (
        referer == public_origin or referer.startswith(public_origin + "/")
    )
