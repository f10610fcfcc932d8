"""Who may ask the server, and what every answer carries: the app's pure ASGI middlewares.

- Only requests whose Host header names this machine (or a name given with ``--host``) get through
  (``TrustedHostMiddleware`` with :func:`allowed_hosts`), so a web page elsewhere cannot reach the server
  through DNS rebinding.
- :class:`Gate` refuses requests another site's page sent (``Sec-Fetch-Site`` cross-site or same-site, or
  an ``Origin`` that is not this server's) if they could cost or change anything, and asks every ``/api``
  route but ``/api/health`` for the server's token (``Authorization: Bearer`` or the page's cookie).
- :class:`Guard` adds the security headers to every response (CSP, ``nosniff``, no referrer,
  ``Cross-Origin-Resource-Policy: same-origin``) and counts requests in flight for the idle timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from mmsearch import discovery
from mmsearch.errors import MissingDependencyError

try:
    from fastapi.responses import JSONResponse
    from starlette.datastructures import Headers
    from starlette.requests import cookie_parser
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as e:  # pragma: no cover - depends on the installation
    raise MissingDependencyError(e.name or "fastapi", "mmsearch serve", extra="server") from e

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# Sec-Fetch-Site values of requests this server's own page (or a typed address) sends; browsers send
# "cross-site" or "same-site" (another port of localhost is the same site) for other pages' requests.
OWN_FETCH_SITES = (b"same-origin", b"none")
SAFE_METHODS = ("GET", "HEAD")
OPEN_PATHS = ("/api/health",)  # the /api routes that need no token
# The page loads nothing from elsewhere and runs no inline script: an injected caption cannot execute.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# A user's file is shown as what its suffix says, never sniffed into HTML, and runs nothing if opened.
MEDIA_CSP = "default-src 'none'; img-src 'self'; media-src 'self'; style-src 'unsafe-inline'; sandbox"


def allowed_hosts(extra: Iterable[str]) -> list[str]:
    """The Host header names answered: this machine's loopback names plus ``extra`` (as given to bind)."""
    return sorted({*LOCAL_HOSTS, *(_host_pattern(h) for h in extra)})


def _host_pattern(host: str) -> str:
    host = host.strip().lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass
class Activity:
    """Requests in flight and when the last one ended: what an idle timeout looks at."""

    in_flight: int = 0
    last: float = 0.0

    def __post_init__(self) -> None:
        self.last = time.monotonic()


class Guard:
    """Pure ASGI middleware: security headers on every response, and request activity for idle exit."""

    def __init__(self, app: ASGIApp, activity: Activity) -> None:
        self.app = app
        self.activity = activity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_media = scope["path"].startswith("/api/media/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                # No other origin may embed or read anything from here (<img>, <audio>, <script>).
                headers.append((b"cross-origin-resource-policy", b"same-origin"))
                headers.append((b"content-security-policy", (MEDIA_CSP if is_media else PAGE_CSP).encode()))
                message = {**message, "headers": headers}
            await send(message)

        self.activity.in_flight += 1
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            self.activity.in_flight -= 1
            self.activity.last = time.monotonic()


class Gate:
    """Pure ASGI middleware, inside the Host check: who may ask.

    1. A request another site's page sent is refused (403) if it could cost or change anything: every
       ``/api`` route but health, and any method but GET/HEAD. Browsers say where a request comes from with
       ``Sec-Fetch-Site`` (allowed: same-origin, none = typed by the user) and ``Origin`` (allowed: this
       server's own); a request with neither (the CLI, curl) is not a browser's cross-site request.
    2. Every ``/api`` route but health needs the token (401): ``Authorization: Bearer TOKEN`` or the page's
       cookie (see :func:`token_cookie`).
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        guarded = path.startswith("/api/") and path not in OPEN_PATHS
        headers = Headers(scope=scope)
        if guarded or scope["method"] not in SAFE_METHODS:
            refused = _cross_site(headers)
            if refused is not None:
                await _deny(scope, receive, send, 403, f"refused: {refused}")
                return
        if guarded and not self._has_token(scope, headers):
            detail = (
                "this server needs its token: open the address `mmsearch serve` printed (…/?token=…), "
                "or send Authorization: Bearer with the token from the index's server.json"
            )
            await _deny(scope, receive, send, 401, detail, {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)

    def _has_token(self, scope: Scope, headers: Headers) -> bool:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and discovery.same_token(given.strip(), self.token):
            return True
        cookie = cookie_parser(headers.get("cookie", "")).get(token_cookie(scope))
        return discovery.same_token(cookie, self.token)


def _cross_site(headers: Headers) -> str | None:
    """Why a browser request comes from another site's page, or None."""
    site = headers.get("sec-fetch-site")
    if site is not None and site.encode() not in OWN_FETCH_SITES:
        return f"a request from another site (Sec-Fetch-Site: {site})"
    origin = headers.get("origin")
    # The Host header was checked against this machine's names before: the page's own origin is http://Host.
    if origin is not None and origin.lower() != f"http://{headers.get('host', '').lower()}":
        return "a request from another origin (Origin is not this server)"
    return None


async def _deny(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    detail: str,
    headers: dict[str, str] | None = None,
) -> None:
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)


def token_cookie(scope: Scope) -> str:
    """The page's token cookie. Browsers share cookies between all ports of a host, so the name carries
    this server's port: two servers on one machine do not overwrite each other's cookie."""
    server = scope.get("server")
    port = server[1] if server and len(server) > 1 and server[1] else None
    return f"{discovery.TOKEN_COOKIE}_{port}" if port else discovery.TOKEN_COOKIE
