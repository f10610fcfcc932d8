"""`mmsearch serve`: an HTTP API and a web page over one index, on uvicorn.

Safe by default:

- It binds 127.0.0.1 and answers only requests whose Host header names this machine, so a web page
  elsewhere cannot reach it through DNS rebinding.
- Every ``/api`` route but ``/api/health`` needs the server's token, made afresh at each start: the CLI
  sends it as ``Authorization: Bearer`` (read from ``INDEX/server.json``, 0600); the page gets it as an
  HttpOnly, SameSite=Strict cookie when opened from the URL the server prints (``/?token=…``, which then
  redirects to ``/`` so the token leaves the address bar). Other local users cannot read the token.
- Requests sent by another site's page (``Sec-Fetch-Site`` cross-site or same-site, or an ``Origin`` that is
  not this server's) are refused before they reach a route, so no page can make it search, upload or read;
  every response carries ``Cross-Origin-Resource-Policy: same-origin``.
- Files are served only by catalog id (never by a path a client sent), and only while they are still the
  file the catalog knows: opened without following a symlink, a regular file of the indexed size and
  mtime, then sent from that open descriptor (never re-opened by path).
- Upload sizes are capped, thumbnail decodes are bounded, and the page builds its DOM with
  ``textContent``, under a CSP that allows no inline script.

It does not encrypt (no TLS): bound to anything but loopback, the token crosses the network in clear.

Model calls go through one lock: the embedder, the transcriber and the in-memory vector indexes are used by
one request at a time. Metadata, thumbnails and media need no model and are served concurrently.

While it runs, ``INDEX/server.json`` tells ``mmsearch query`` where a warm server for the same index answers
and its token (see :mod:`mmsearch.discovery`, :mod:`mmsearch.client`); ``INDEX/server.lock`` keeps a second
server for the same index from starting.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import fcntl
import io
import ipaddress
import logging
import mimetypes
import os
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any, TypeVar

from mmsearch import discovery
from mmsearch.client import SERVER_MAX_K
from mmsearch.discovery import SERVER_LOCK
from mmsearch.errors import (
    BadQueryError,
    IndexNotFoundError,
    MissingDependencyError,
    MmsearchError,
    WeightsUnavailableError,
)

try:
    import uvicorn
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi import Path as PathParam
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
    from pydantic import BaseModel
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import Headers, MutableHeaders, UploadFile
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import cookie_parser
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as e:  # pragma: no cover - depends on the installation
    raise MissingDependencyError(e.name or "fastapi", "mmsearch serve", extra="server") from e

from mmsearch.api import Index
from mmsearch.search import TARGETS

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
THUMB_SIDE = 256
THUMB_DECODES = 2  # thumbnails decoded at once: each can hold a large image in memory
MEDIA_CHUNK = 256 * 1024
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_AUDIO_BYTES = 50 * 1024 * 1024
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file itself
MAX_K = SERVER_MAX_K  # a bigger -k makes `mmsearch query` search locally instead
MAX_QUERY_CHARS = 1000
MAX_SEGMENTS = 5000
TEXT_BATCH = 32  # most text queries embedded in one forward pass
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# Sec-Fetch-Site values of requests this server's own page (or a typed address) sends; browsers send
# "cross-site" or "same-site" (another port of localhost is the same site) for other pages' requests.
OWN_FETCH_SITES = (b"same-origin", b"none")
SAFE_METHODS = ("GET", "HEAD")
OPEN_PATHS = ("/api/health",)  # the /api routes that need no token
WEB_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
# Suffixes kept on uploaded temp files (decoders sniff content; the suffix only helps them guess).
UPLOAD_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
    | {".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".mp4", ".webm", ".aac"}
)
# The page loads nothing from elsewhere and runs no inline script: an injected caption cannot execute.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# A user's file is shown as what its suffix says, never sniffed into HTML, and runs nothing if opened.
MEDIA_CSP = "default-src 'none'; img-src 'self'; media-src 'self'; style-src 'unsafe-inline'; sandbox"
IntId = PathParam(ge=1, le=2**63 - 1, description="A file id from a search hit")


# --- response models (for the OpenAPI schema) ---------------------------------------------------------
class HitOut(BaseModel):
    rank: int
    score: float
    kind: str
    path: str  # display form: valid UTF-8, undecodable bytes replaced
    path_b64: str  # the exact path bytes, standard base64
    name: str
    text: str | None
    start: float | None
    end: float | None
    item_id: int
    file_id: int
    file_kind: str
    captions: list[str]
    thumb: str | None
    media: str
    item: str


class SearchOut(BaseModel):
    query: str
    mode: str
    target: str
    k: int
    took_ms: float
    transcript: str | None = None
    hits: list[HitOut]


class CaptionOut(BaseModel):
    id: int
    text: str
    source: str


class SegmentOut(BaseModel):
    start: float
    end: float
    text: str


class ItemOut(BaseModel):
    id: int
    kind: str
    path: str  # display form: valid UTF-8, undecodable bytes replaced
    path_b64: str  # the exact path bytes, standard base64
    name: str
    size: int
    width: int | None
    height: int | None
    duration: float | None
    language: str | None
    transcript: str | None
    captions: list[CaptionOut]
    segments: list[SegmentOut]
    thumb: str | None
    media: str


class HealthOut(BaseModel):
    ok: bool
    version: str
    index: str  # the index folder's real path
    pid: int
    model: dict[str, Any]  # the index's model identity
    proof: str | None = None  # HMAC(token, nonce): this server holds the token of server.json


# --- the app -----------------------------------------------------------------------------------------
@dataclass
class Activity:
    """Requests in flight and when the last one ended: what an idle timeout looks at."""

    in_flight: int = 0
    last: float = 0.0

    def __post_init__(self) -> None:
        self.last = time.monotonic()


class _Guard:
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


class _Gate:
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


class _TooLarge(Exception):
    pass


class _Service:
    """What the endpoints share: the index, the model lock, and catalog look-ups."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.lock = threading.Lock()  # the embedder, the transcriber and the vector indexes
        self._pending: list[tuple[str, Future[Any]]] = []
        self._pending_lock = threading.Lock()
        self._decodes = threading.BoundedSemaphore(THUMB_DECODES)

    def locked(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.lock:
            return fn(*args, **kwargs)

    def search_text(self, text: str, target: str, k: int) -> list[Any]:
        """:meth:`Index.search_text`, except that concurrent queries share text-tower forward passes:
        whoever holds the model lock embeds every query waiting by then (one batch costs far less than
        one pass per query), so queued requests do not each pay a full model call."""
        text = text.strip()
        if not text:
            raise BadQueryError("the query text is empty")
        mine: Future[Any] = Future()
        with self._pending_lock:
            self._pending.append((text, mine))
        while not mine.done():
            with self.lock:
                if mine.done():
                    break
                with self._pending_lock:
                    batch, self._pending = self._pending[:TEXT_BATCH], self._pending[TEXT_BATCH:]
                try:
                    vectors = self.index.embedder.embed_texts([t for t, _ in batch])
                except Exception as e:  # every waiter gets the same error
                    for _, future in batch:
                        future.set_exception(e)
                    continue
                for (_, future), vector in zip(batch, vectors, strict=True):
                    future.set_result(vector)
        vector = mine.result()
        with self.lock:
            return self.index.search_vector(vector, target=target, k=k)

    def file_row(self, file_id: int) -> Any:
        from sqlalchemy import select

        from mmsearch import db

        f, m = db.files, db.media
        q = (
            select(f.c.id, f.c.path_key, f.c.path, f.c.kind, f.c.size, f.c.mtime_ns, f.c.media_id, m.c.sha256)
            .add_columns(m.c.width, m.c.height, m.c.duration, m.c.language, m.c.transcript)
            .join(m, m.c.id == f.c.media_id)
            .where(f.c.id == file_id, f.c.status == "ok")
        )
        with self.index.store.catalog.read() as conn:
            row = conn.execute(q).first()
        if row is None:
            raise HTTPException(404, f"no item {file_id}")
        return row

    def item(self, file_id: int) -> dict[str, Any]:
        from sqlalchemy import select

        from mmsearch import db

        row = self.file_row(file_id)
        caps = self.index.store.catalog.captions_of([file_id]).get(file_id, [])
        segments: list[dict[str, Any]] = []
        if row.kind == "audio":
            s = db.segments
            q = (
                select(s.c.start, s.c.end, s.c.text)
                .where(s.c.media_id == row.media_id)
                .order_by(s.c.start, s.c.idx)
                .limit(MAX_SEGMENTS)
            )
            with self.index.store.catalog.read() as conn:
                segments = [{"start": a, "end": b, "text": t} for a, b, t in conn.execute(q)]
        return {
            "id": row.id,
            "kind": row.kind,
            "path": _display(row.path),
            "path_b64": base64.b64encode(row.path_key).decode("ascii"),
            "name": _name(_display(row.path)),
            "size": row.size,
            "width": row.width,
            "height": row.height,
            "duration": row.duration,
            "language": row.language,
            "transcript": row.transcript,
            "captions": [{"id": cid, "source": src, "text": txt} for cid, src, txt in caps],
            "segments": segments,
            "thumb": f"/api/thumbs/{row.id}" if row.kind == "image" else None,
            "media": f"/api/media/{row.id}",
        }

    def hits_out(self, hits: list[Any]) -> list[dict[str, Any]]:
        image_files = sorted({h.file_id for h in hits if h.kind != "segment"})
        caps = self.index.store.catalog.captions_of(image_files) if image_files else {}
        out = []
        for h in hits:
            d = h.as_dict()  # path in display form, path_b64 the exact bytes
            file_kind = "audio" if h.kind == "segment" else "image"
            d.update(
                name=_name(str(d["path"])),
                file_kind=file_kind,
                captions=[txt for _, _, txt in caps.get(h.file_id, [])][:5],
                thumb=f"/api/thumbs/{h.file_id}" if file_kind == "image" else None,
                media=f"/api/media/{h.file_id}",
                item=f"/api/items/{h.file_id}",
            )
            out.append(d)
        return out

    def thumbnail(self, file_id: int) -> Path | bytes:
        """The cached JPEG thumbnail (made on first request, named by content hash), or its bytes if the
        index folder is read-only; 404 unless the file is still the one indexed (see :meth:`open_file`)."""
        from PIL import Image

        from mmsearch.errors import BadMediaError
        from mmsearch.images import INDEX_MAX_PIXELS, load_image

        row = self.file_row(file_id)
        if row.kind != "image":
            raise HTTPException(404, f"item {file_id} is {row.kind}: no thumbnail")
        cached = self.index.store.thumbnail_path(row.sha256, THUMB_SIDE)
        with self.open_file(row) as f:
            if cached.is_file():
                return cached
            # Bounded: each decode can hold a large image in memory, and a page asks for many at once.
            with self._decodes:
                try:
                    image = load_image(
                        f, max_side=THUMB_SIDE * 2, draft_size=THUMB_SIDE, max_pixels=INDEX_MAX_PIXELS
                    )
                except BadMediaError as e:
                    raise HTTPException(404, f"item {file_id} cannot be read now: {e}") from e
        image.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
        try:
            self.index.store.thumbnails_folder()  # owner-only, like the rest of the index folder
            # Written whole then renamed: a concurrent request sees the old state or the full file.
            fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=".thumb-", suffix=".jpg")
            try:
                with os.fdopen(fd, "wb") as out:
                    image.save(out, "JPEG", quality=85)
                os.replace(tmp, cached)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            log.debug("made thumbnail %s", cached)
            return cached
        except (OSError, MmsearchError) as e:  # a read-only or full disk: MmsearchError from storage_errors
            log.warning("cannot cache thumbnails in %s (%s): serving them uncached", cached.parent, e)
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=85)
            return buf.getvalue()

    def open_file(self, row: Any) -> IO[bytes]:
        """The indexed file of catalog ``row``, open for reading, if it is still the file the catalog knows:
        not a symlink (one swapped in place of an indexed file could point anywhere), a regular file (not a
        FIFO that would block), with the indexed size and mtime. Else 404. Callers read the returned file,
        never the path again, so nothing swapped in after this check is served."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(row.path_key, flags)
        except FileNotFoundError:
            raise HTTPException(404, f"item {row.id} is no longer on disk") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise HTTPException(404, f"item {row.id} is a symbolic link now: not served") from None
            raise HTTPException(404, f"item {row.id} cannot be read now: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (row.size, row.mtime_ns):
                raise HTTPException(404, f"item {row.id} changed on disk since it was indexed")
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def media(self, file_id: int) -> tuple[IO[bytes], int, str]:
        """(the open file, its size, its MIME type) of item ``file_id``; see :meth:`open_file`."""
        row = self.file_row(file_id)
        f = self.open_file(row)
        mime = mimetypes.guess_type(_display(row.path))[0] or "application/octet-stream"
        return f, row.size, mime


class _OpenFileResponse(Response):
    """A file already opened and checked, sent from its descriptor (never re-opened by path, unlike
    FileResponse), with single byte ranges (what audio and video seeking asks for). Other Range forms are
    answered with the whole file, as RFC 9110 allows."""

    def __init__(self, file: IO[bytes], size: int, media_type: str, headers: dict[str, str]) -> None:
        self.file = file
        self.size = size
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers({**headers, "accept-ranges": "bytes"})

    def __del__(self) -> None:  # a response never sent still closes its file
        self.file.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            try:
                wanted = _byte_range(Headers(scope=scope).get("range"), self.size)
            except _Unsatisfiable:
                await Response(status_code=416, headers={"Content-Range": f"bytes */{self.size}"})(
                    scope, receive, send
                )
                return
            start, end = wanted or (0, self.size)
            headers = MutableHeaders(raw=list(self.raw_headers))
            headers["content-length"] = str(end - start)
            status = 200
            if wanted is not None:
                status = 206
                headers["content-range"] = f"bytes {start}-{end - 1}/{self.size}"
            await send({"type": "http.response.start", "status": status, "headers": headers.raw})
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            fd = self.file.fileno()
            while True:
                want = min(MEDIA_CHUNK, end - start)
                chunk = await run_in_threadpool(os.pread, fd, want, start) if want else b""
                start += len(chunk)
                more = start < end and len(chunk) == want  # a file cut short ends the body early
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
                if not more:
                    return
        finally:
            self.file.close()


class _Unsatisfiable(Exception):
    pass


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The [start, end) a Range header asks for; None to send the whole file (no header, or not one single
    byte range: RFC 9110 lets a server ignore those); :class:`_Unsatisfiable` for a 416."""
    if header is None or not header.startswith("bytes=") or "," in header:
        return None
    first, dash, last = header[len("bytes=") :].strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":  # the last N bytes
        if last == "":
            return None  # "bytes=-" is not a range
        if int(last) == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - int(last)), size
    start = int(first)
    end = size if last == "" else int(last) + 1
    if last != "" and end <= start:
        return None  # "bytes=9-5" is not a valid range: ignored
    if start >= size:
        raise _Unsatisfiable
    return start, min(end, size)


def create_app(
    index: Index,
    *,
    allowed_hosts: Sequence[str] = (),
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_audio_bytes: int = MAX_AUDIO_BYTES,
    activity: Activity | None = None,
    token: str | None = None,
) -> FastAPI:
    """The FastAPI app over ``index``. ``allowed_hosts`` adds Host header names to localhost's; ``token``
    is what ``/api`` requests must carry (default: a new random one, in ``app.state.token``)."""
    service = _Service(index)
    token = token or discovery.new_token()
    app = FastAPI(
        title="mmsearch",
        summary="Cross-modal semantic search over images, captions and audio",
        docs_url=None,  # Swagger UI would load scripts from a CDN: the schema is at /openapi.json
        redoc_url=None,
    )
    app.state.service = service
    app.state.token = token
    hosts = sorted({*LOCAL_HOSTS, *(_host_pattern(h) for h in allowed_hosts)})
    # Last added runs first: _Guard (headers on every answer) → Host check → _Gate (origin, token) → routes.
    app.add_middleware(_Gate, token=token)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    app.add_middleware(_Guard, activity=activity or Activity())

    @app.exception_handler(MmsearchError)
    async def _mmsearch_error(_request: Request, exc: MmsearchError) -> JSONResponse:
        if isinstance(exc, BadQueryError):
            status = 400
        elif isinstance(exc, IndexNotFoundError):
            status = 404
        elif isinstance(exc, WeightsUnavailableError | MissingDependencyError):
            status = 503
        else:
            log.error("request failed: %s", exc)
            status = 500
        return JSONResponse({"detail": str(exc)}, status_code=status)

    def search_response(mode: str, query: str, target: str, k: int, hits: list[Any], t0: float) -> dict:
        return {
            "query": query,
            "mode": mode,
            "target": target,
            "k": k,
            "took_ms": round((time.perf_counter() - t0) * 1000, 2),
            "hits": service.hits_out(hits),
        }

    @app.get("/api/health", response_model=HealthOut, tags=["meta"])
    def health(
        nonce: str | None = Query(
            None, max_length=discovery.MAX_NONCE_CHARS, description="Answered with proof = HMAC(token, nonce)"
        ),
    ) -> dict[str, Any]:
        """Cheap liveness check, no token needed: version, process and index this server answers for, and
        (given a nonce) proof that it holds the token of the index's server.json."""
        return {
            "ok": True,
            "version": discovery.VERSION,
            "index": os.path.realpath(index.path),
            "pid": os.getpid(),
            "model": index.model_identity,
            "proof": None if nonce is None else discovery.health_proof(token, nonce),
        }

    @app.get("/api/stats", tags=["meta"])
    def stats() -> dict[str, Any]:
        """What the index holds (files, vectors, captions, segments) and its model."""
        return index.stats()

    @app.get("/api/search", response_model=SearchOut, tags=["search"])
    def search_text(
        q: str = Query(min_length=1, max_length=MAX_QUERY_CHARS, description="Text to search for"),
        target: str = Query("images", description=" | ".join(TARGETS)),
        k: int = Query(10, ge=1, le=MAX_K),
    ) -> dict[str, Any]:
        """Search by text."""
        _check_target(target)
        t0 = time.perf_counter()
        hits = service.search_text(q, target, k)
        return search_response("text", q, target, k, hits, t0)

    upload_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    }
                }
            },
        }
    }

    @app.post("/api/search/image", response_model=SearchOut, tags=["search"], openapi_extra=upload_body)
    async def search_image(
        request: Request,
        target: str = Query("texts", description=" | ".join(TARGETS)),
        k: int = Query(10, ge=1, le=MAX_K),
    ) -> dict[str, Any]:
        """Search with an uploaded image (multipart field ``file``, at most 20 MB)."""
        _check_target(target)
        with _upload_dir() as folder:
            path, name = await _receive_upload(request, folder, max_image_bytes)
            t0 = time.perf_counter()
            hits = await run_in_threadpool(service.locked, index.search_image, path, target=target, k=k)
        return search_response("image", name, target, k, hits, t0)

    @app.post("/api/search/audio", response_model=SearchOut, tags=["search"], openapi_extra=upload_body)
    async def search_audio(
        request: Request,
        target: str = Query("images", description=" | ".join(TARGETS)),
        k: int = Query(10, ge=1, le=MAX_K),
    ) -> dict[str, Any]:
        """Search with an uploaded or recorded voice query (multipart field ``file``, at most 50 MB);
        the response's ``transcript`` is what was heard."""
        _check_target(target)
        with _upload_dir() as folder:
            path, name = await _receive_upload(request, folder, max_audio_bytes)
            t0 = time.perf_counter()
            heard = await run_in_threadpool(service.locked, index.transcribe_query, path)
        hits = await run_in_threadpool(service.search_text, heard, target, k)
        return {**search_response("audio", name, target, k, hits, t0), "transcript": heard}

    @app.get("/api/items/{file_id}", response_model=ItemOut, tags=["items"])
    def item(file_id: int = IntId) -> dict[str, Any]:
        """A file's metadata: kind, display path, size, captions, transcript segments."""
        return service.item(file_id)

    @app.get(
        "/api/thumbs/{file_id}",
        tags=["items"],
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}},
    )
    def thumb(file_id: int = IntId) -> Response:
        """A JPEG thumbnail of an image item (made once, cached in the index folder)."""
        made = service.thumbnail(file_id)
        headers = {"Cache-Control": "private, max-age=3600"}
        if isinstance(made, bytes):
            return Response(made, media_type="image/jpeg", headers=headers)
        return FileResponse(made, media_type="image/jpeg", headers=headers)

    @app.get(
        "/api/media/{file_id}",
        tags=["items"],
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "A byte range"}},
    )
    def media(file_id: int = IntId) -> Response:
        """The file itself, by id, while it is the file indexed; supports HTTP range requests (audio
        seeking)."""
        f, size, mime = service.media(file_id)
        return _OpenFileResponse(f, size, mime, {"Content-Disposition": "inline"})

    @app.get("/", include_in_schema=False)
    def page(request: Request) -> Response:
        """The page, for a browser holding the token cookie. Opened as ``/?token=TOKEN`` (the address the
        server printed), it sets the cookie and redirects to ``/``, so the token leaves the address bar."""
        given = request.query_params.get("token")
        if given is not None:
            if not discovery.same_token(given, token):
                return _token_page(401)
            done = RedirectResponse("/", status_code=303)
            done.set_cookie(token_cookie(request.scope), token, httponly=True, samesite="strict", path="/")
            return done
        if not discovery.same_token(request.cookies.get(token_cookie(request.scope)), token):
            return _token_page(401)
        return _web_file("index.html")

    @app.get("/app.js", include_in_schema=False)
    def app_js() -> Response:
        return _web_file("app.js")

    @app.get("/style.css", include_in_schema=False)
    def style_css() -> Response:
        return _web_file("style.css")

    return app


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise HTTPException(400, f"unknown target '{target}' (choose from {', '.join(TARGETS)})")


def _name(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def _display(text: str) -> str:
    """``text`` as valid UTF-8 for JSON: surrogate escapes (undecodable bytes of a name) replaced."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


TOKEN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mmsearch</title><link rel="stylesheet" href="/style.css">
</head><body><h1>mmsearch</h1>
<p>This server needs its token. Open the address <code>mmsearch serve</code> printed when it started
(it ends in <code>/?token=…</code>).</p></body></html>
"""


def _token_page(status: int) -> Response:
    return HTMLResponse(TOKEN_PAGE, status_code=status, headers={"Cache-Control": "no-store"})


def _host_pattern(host: str) -> str:
    host = host.strip().lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _web_file(name: str) -> Response:
    data = resources.files("mmsearch.web").joinpath(name).read_bytes()
    return Response(data, media_type=WEB_FILES[name], headers={"Cache-Control": "no-cache"})


@contextlib.contextmanager
def _upload_dir() -> Iterator[Path]:
    """A private temporary folder for one upload, removed with whatever it holds however the request ends."""
    with tempfile.TemporaryDirectory(prefix="mmsearch-upload-") as d:
        yield Path(d)


async def _receive_upload(request: Request, folder: Path, limit: int) -> tuple[Path, str]:
    """Stream the multipart field ``file`` into ``folder``; 413 as soon as the body exceeds ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise HTTPException(413, f"upload larger than {limit // (1024 * 1024)} MB")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(400, "send the file as multipart/form-data, field 'file'")
    received = 0

    async def counting_receive() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit + MULTIPART_SLACK:
                raise _TooLarge
        return message

    limited = Request(request.scope, counting_receive)
    try:
        async with limited.form(max_files=1, max_fields=4) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise HTTPException(400, "no file in the multipart field 'file'")
            name = upload.filename or "upload"
            suffix = Path(name).suffix.lower()
            path = folder / ("query" + (suffix if suffix in UPLOAD_SUFFIXES else ""))
            size = 0
            with open(path, "wb") as out:
                while chunk := await upload.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise _TooLarge
                    out.write(chunk)
    except _TooLarge:
        raise HTTPException(413, f"upload larger than {limit // (1024 * 1024)} MB") from None
    if size == 0:
        raise HTTPException(400, "the uploaded file is empty")
    return path, _name(name)[:200]


# --- running it --------------------------------------------------------------------------------------
def warm_up(index: Index, *, speech: bool = False) -> None:
    """Load the text tower and every vector index now, so the first query is as fast as the rest."""
    from mmsearch.db import VECTOR_KINDS

    t0 = time.perf_counter()
    index.embedder.embed_texts(["warm up"])
    for kind in VECTOR_KINDS:
        index.store.vectors(kind)
    if speech:
        index.query_transcriber  # noqa: B018 - loading is the point
    log.info("models and vectors loaded in %.1f s", time.perf_counter() - t0)


class _Server(uvicorn.Server):
    """uvicorn, plus: announce the URL once listening, and exit after ``idle_timeout`` s without requests."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        on_started: Callable[[], None],
        on_stopping: Callable[[], None],
        activity: Activity,
        idle_timeout: float | None,
        stop: threading.Event | None,
    ) -> None:
        super().__init__(config)
        self._stop = stop
        self._on_started = on_started
        self._on_stopping = on_stopping
        self._activity = activity
        self._idle_timeout = idle_timeout

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Here rather than after run(): on SIGTERM/SIGINT uvicorn re-raises the signal when serve() ends.
        self._on_stopping()
        await super().shutdown(sockets=sockets)

    async def on_tick(self, counter: int) -> bool:
        a = self._activity
        if self._idle_timeout and a.in_flight == 0 and time.monotonic() - a.last > self._idle_timeout:
            log.info("no request for %.0f s: exiting", self._idle_timeout)
            self.should_exit = True
        if self._stop is not None and self._stop.is_set():
            self.should_exit = True
        return await super().on_tick(counter)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), or a clear error if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise MmsearchError(
                f"port {port} on {host} is in use: choose another with --port (0: any)"
            ) from e
        raise MmsearchError(f"cannot listen on {host}:{port}: {e}") from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_for(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def _server_lock(folder: Path) -> Iterator[None]:
    fd = discovery.open_private(folder / SERVER_LOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            running = discovery.read_server_file(folder)
            where = f" at {running['url']}" if running else ""
            raise MmsearchError(f"a server for {folder} is already running{where}") from e
        yield
    finally:
        os.close(fd)


def _server_info(folder: Path, url: str, token: str) -> dict[str, Any]:
    return {
        "url": url,
        "pid": os.getpid(),
        "index": os.path.realpath(folder),
        "token": token,
        "version": discovery.VERSION,
        "started": time.time(),
    }


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str) -> str | None:
    """What to tell the user before listening on ``host``, or None for loopback."""
    if is_loopback(host):
        return None
    return (
        f"listening on {host}: anyone who can reach it and learns its token can search this index and read "
        "its files, and the token crosses the network unencrypted (no TLS)"
    )


def serve(
    index_path: str | Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    allowed_hosts: Sequence[str] = (),
    idle_timeout: float | None = None,
    warm: bool = True,
    warm_speech: bool = False,
    log_level: str = "warning",
    on_ready: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve the index at ``index_path`` until interrupted, idle for ``idle_timeout`` seconds, or ``stop``
    is set. ``on_ready(page_url)`` is called once it accepts requests (``port=0``: any free port), with the
    page's address including this run's token (``http://HOST:PORT/?token=…``): the address to open.

    Binding anything but loopback exposes the index's files to the network (see :func:`exposure_warning`):
    the caller should say so.
    """
    if "torch" not in sys.modules and "faiss" not in sys.modules:
        # torch and faiss each run an OpenMP pool; spin-waiting idle threads of one steal the cores the
        # other needs. Measured on this 2-core machine under load: one text embedding 3.6 s -> 0.17 s,
        # one flat search 87 ms -> 8 ms. Read by libgomp when it loads, so only before those imports.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with Index.open(index_path) as index:
        folder = index.path
        with _server_lock(folder):
            if warm:
                warm_up(index, speech=warm_speech)
            sock = bind(host, port)
            url = url_for(sock)
            activity = Activity()
            token = discovery.new_token()
            app = create_app(index, allowed_hosts=[host, *allowed_hosts], activity=activity, token=token)
            config = uvicorn.Config(
                app,
                log_level=log_level,
                access_log=False,
                server_header=False,
                lifespan="off",
                timeout_graceful_shutdown=5,  # then drop connections still waiting on a queued search
            )

            def started() -> None:
                discovery.write_server_file(folder, _server_info(folder, url, token))
                log.info("serving %s at %s", folder, url)  # without the token: logs are shared more
                if on_ready is not None:
                    on_ready(discovery.page_url(url, token))

            server = _Server(
                config,
                on_started=started,
                on_stopping=lambda: discovery.remove_server_file(folder, os.getpid()),
                activity=activity,
                idle_timeout=idle_timeout,
                stop=stop,
            )
            try:
                server.run(sockets=[sock])
            finally:
                sock.close()
                discovery.remove_server_file(folder, os.getpid())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmsearch.server INDEX``: what ``mmsearch query`` spawns as a background warm server."""
    p = argparse.ArgumentParser(prog="python -m mmsearch.server", description=main.__doc__)
    p.add_argument("index")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--idle-timeout", type=float, default=None, help="exit after this many idle seconds")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    warning = exposure_warning(args.host)
    if warning is not None:
        log.warning("%s", warning)
    try:
        serve(args.index, args.host, args.port, idle_timeout=args.idle_timeout, log_level=args.log_level)
    except MmsearchError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    # Run the imported module's main, so loggers are named mmsearch.server rather than __main__.
    from mmsearch.server import main as _main

    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(_main())
