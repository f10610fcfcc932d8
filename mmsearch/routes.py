"""The web app of ``mmsearch serve``: its routes and response models, over one open index.

:func:`create_app` wraps the routes in the middlewares of :mod:`mmsearch.access` (Host check, origin and
token, security headers); files and thumbnails come from :mod:`mmsearch.media`, query uploads are received
by :mod:`mmsearch.uploads`, item details are read from the catalog (:mod:`mmsearch.db`).

Model calls go through one lock: the embedder, the transcriber and the in-memory vector indexes are used by
one request at a time. Metadata, thumbnails and media need no model and are served concurrently.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from importlib import resources
from pathlib import Path
from typing import IO, Annotated, Any, TypeVar

import numpy as np

from mmsearch import access, db, discovery
from mmsearch.access import Activity, Gate, Guard, token_cookie
from mmsearch.api import SWITCH_RETRIES, Index, embed_parts
from mmsearch.client import search_options as parse_search_options
from mmsearch.constants import (
    DEFAULT_COMBINE,
    DEFAULT_FUSION,
    DEFAULT_MODE,
    QUERY_COMBINES,
    QUERY_FUSIONS,
    QUERY_MODES,
    SERVER_MAX_K,
)
from mmsearch.errors import (
    ActiveModelChanged,
    BadQueryError,
    IndexNotFoundError,
    MissingDependencyError,
    MmsearchError,
    WeightsUnavailableError,
)
from mmsearch.items import hits_with_files, item_details
from mmsearch.media import OpenFileResponse, Thumbnails, media_type, open_file
from mmsearch.query import Plan, SearchResult, execute
from mmsearch.query import Query as SearchQuery
from mmsearch.search import TARGETS
from mmsearch.uploads import MAX_AUDIO_BYTES, MAX_IMAGE_BYTES, receive_upload, upload_dir

try:
    from fastapi import Depends, FastAPI, HTTPException, Query, Request
    from fastapi import Path as PathParam
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
    from pydantic import BaseModel
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware.trustedhost import TrustedHostMiddleware
except ImportError as e:  # pragma: no cover - depends on the installation
    raise MissingDependencyError(e.name or "fastapi", "mmsearch serve", extra="server") from e

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_K = SERVER_MAX_K  # a bigger -k makes `mmsearch query` search locally instead
MAX_QUERY_CHARS = 1000
MAX_SEGMENTS = 5000
TEXT_BATCH = 32  # most text queries embedded in one forward pass
WEB_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
IntId = PathParam(ge=1, le=2**63 - 1, description="A file id from a search hit")
MAX_FRAMES = 5000  # keyframe times listed for a video item
MAX_AT = 7 * 24 * 3600.0  # the latest time a thumbnail may be asked at (seconds): a week
# A frame hit's time goes through the URL as text: a hair of slack finds that frame, never the one before.
FRAME_TIME_SLACK = 1e-3


# --- response models (for the OpenAPI schema) ---------------------------------------------------------
class MomentOut(BaseModel):
    """Another moment of the same video, folded under its best hit."""

    kind: str  # frame | segment
    start: float | None
    end: float | None
    score: float
    item_id: int
    thumb: str | None = None  # the keyframe on screen at ``start``


class HitOut(BaseModel):
    rank: int
    score: float  # cosine similarity to the query
    confidence: float | None  # calibrated, 0-1 (None: the index has no calibration)
    matched: str  # vector | words | both
    kind: str
    path: str  # display form: valid UTF-8, undecodable bytes replaced
    path_b64: str  # the exact path bytes, standard base64
    name: str
    text: str | None
    start: float | None
    end: float | None
    item_id: int
    file_id: int
    # What a photo says of itself (None when unknown): unix seconds, "Make Model", WGS84 degrees.
    taken_at: float | None = None
    camera: str | None = None
    lat: float | None = None
    lon: float | None = None
    file_kind: str
    captions: list[str]
    thumb: str | None  # a video's hit: the keyframe on screen at ``start``
    media: str
    item: str
    moments: list[MomentOut] = []  # a video's other moments in the results (see mmsearch.query)


class SearchOut(BaseModel):
    query: str
    input: str  # text | image | audio
    mode: str  # hybrid | vector | words
    target: str
    k: int
    took_ms: float
    no_match: bool  # nothing in the index answers the query well
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
    # A photo's date taken (unix seconds, and where it was read), camera, place, keywords (tag, source)
    # and zero-shot tags (tag, confidence).
    taken_at: float | None = None
    taken_source: str | None = None
    camera: str | None = None
    lat: float | None = None
    lon: float | None = None
    keywords: list[dict[str, str]] = []
    tags: list[dict[str, Any]] = []
    frames: list[float] = []  # a video's keyframe times (seconds), each shown by /api/thumbs/{id}?at=TIME
    thumb: str | None
    media: str


class HealthOut(BaseModel):
    ok: bool
    version: str
    index: str  # the index folder's real path
    pid: int
    model: dict[str, Any]  # the index's model identity
    proof: str | None = None  # HMAC(token, nonce): this server holds the token of server.json


# --- what the routes share -----------------------------------------------------------------------------
class Service:
    """What the endpoints share: the index, the model lock, and catalog look-ups."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.lock = threading.Lock()  # the embedder, the transcriber and the vector indexes
        self._pending: list[tuple[list[str], Future[Any]]] = []
        self._pending_lock = threading.Lock()
        self.thumbnails = Thumbnails(index.store)

    def locked(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.lock:
            return fn(*args, **kwargs)

    def embed_texts(self, texts: list[str]) -> tuple[str, np.ndarray]:
        """(the active model, its vectors of ``texts``). Concurrent queries share text-tower forward passes:
        whoever holds the model lock embeds the texts of every query waiting by then (one batch costs far
        less than one pass per query), so queued requests do not each pay a full model call."""
        mine: Future[Any] = Future()
        with self._pending_lock:
            self._pending.append((texts, mine))
        while not mine.done():
            with self.lock:
                if mine.done():
                    break
                with self._pending_lock:
                    batch, self._pending = self._pending[:TEXT_BATCH], self._pending[TEXT_BATCH:]
                try:
                    model = self.index.store.follow_active()
                    flat = [t for ts, _ in batch for t in ts]
                    vectors = self.index.embedder_for(model).embed_texts(flat)
                except Exception as e:  # every waiter gets the same error
                    for _, future in batch:
                        future.set_exception(e)
                    continue
                at = 0
                for ts, future in batch:
                    future.set_result((model, vectors[at : at + len(ts)]))
                    at += len(ts)
        model, vectors = mine.result()
        return model, np.asarray(vectors, np.float32)

    def run(self, p: Plan) -> SearchResult:
        """One plan: text inputs embedded in shared batches (:meth:`embed_texts`), an image under the lock,
        the search under the lock; embedded again if another model became active meanwhile."""
        for _ in range(SWITCH_RETRIES):
            vectors = None
            if p.parts and not p.images:
                model, vectors = self.embed_texts(p.texts)
            with self.lock:
                if not p.parts:
                    model = self.index.store.follow_active()
                elif p.images:
                    model = self.index.store.follow_active()
                    vectors = embed_parts(p, self.index.embedder_for(model))
                try:
                    return execute(self.index.store, p, vectors, model=model)
                except ActiveModelChanged:
                    continue
        raise MmsearchError("the index's active model keeps changing: try again")

    def search(self, query: SearchQuery, audio: Path | None = None) -> SearchResult:
        hypotheses = self.locked(self.index.hear_query, audio) if audio is not None else None
        return self.index.answer(query, hypotheses, run=self.run)

    def file_row(self, file_id: int) -> db.FileDetails:
        row = db.file_details(self.index.store.catalog, file_id)
        if row is None:
            raise HTTPException(404, f"no item {file_id}")
        return row

    def item(self, file_id: int) -> dict[str, Any]:
        details = item_details(self.index.store.catalog, file_id, MAX_SEGMENTS)
        if details is None:
            raise HTTPException(404, f"no item {file_id}")
        kind = details["kind"]
        details["thumb"] = f"/api/thumbs/{file_id}" if kind in ("image", "video") else None
        if kind == "video":
            row = self.file_row(file_id)
            details["frames"] = db.frame_times(self.index.store.catalog, row.media_id, MAX_FRAMES)
        details["media"] = f"/api/media/{file_id}"
        return details

    def hits_out(self, hits: list[Any]) -> list[dict[str, Any]]:
        out = hits_with_files(self.index.store.catalog, hits)
        for d in out:
            d["thumb"] = thumb_url(d["file_id"], d["file_kind"], d["start"])
            d["media"] = f"/api/media/{d['file_id']}"
            d["item"] = f"/api/items/{d['file_id']}"
            d["moments"] = [
                {**m, "thumb": thumb_url(d["file_id"], d["file_kind"], m.get("start"))}
                for m in d.get("moments") or ()
            ]
        return out

    def thumbnail(self, file_id: int, at: float | None = None) -> Path | bytes:
        """The JPEG thumbnail of item ``file_id``: an image's (cached, or its bytes if the index folder is
        read-only), or a video's keyframe on screen at ``at`` seconds (the first one by default) as saved
        at index time; 404 unless the file is still the one indexed (see :func:`mmsearch.media.open_file`)
        and, for ``at``, unless it is a video."""
        row = self.file_row(file_id)
        if row.kind == "video":
            found = db.frame_at(self.index.store.catalog, row.media_id, (at or 0.0) + FRAME_TIME_SLACK)
            if found is None:
                raise HTTPException(404, f"item {file_id} has no keyframes")
            return self.thumbnails.frame(row, found[0])
        if at is not None:
            raise HTTPException(404, f"item {file_id} is {row.kind}: no frames")
        return self.thumbnails.get(row)

    def media(self, file_id: int) -> tuple[IO[bytes], int, str]:
        """(the open file, its size, its MIME type) of item ``file_id``; see :func:`mmsearch.media.open_file`."""
        row = self.file_row(file_id)
        return open_file(row), row.size, media_type(row)


# --- the app -----------------------------------------------------------------------------------------
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
    service = Service(index)
    token = token or discovery.new_token()
    app = FastAPI(
        title="mmsearch",
        summary="Cross-modal semantic search over images, captions and audio",
        docs_url=None,  # Swagger UI would load scripts from a CDN: the schema is at /openapi.json
        redoc_url=None,
    )
    app.state.service = service
    app.state.token = token
    # Last added runs first: Guard (headers on every answer) → Host check → Gate (origin, token) → routes.
    app.add_middleware(Gate, token=token)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=access.allowed_hosts(allowed_hosts))
    app.add_middleware(Guard, activity=activity or Activity())

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

    def search_response(kind: str, query: str, k: int, result: SearchResult, t0: float) -> dict[str, Any]:
        out = {
            "query": query,
            "input": kind,
            "mode": result.mode,
            "target": result.target,
            "k": k,
            "took_ms": round((time.perf_counter() - t0) * 1000, 2),
            "no_match": result.no_match,
            "hits": service.hits_out(result.hits),
        }
        if result.transcript is not None:
            out["transcript"] = result.transcript
        return out

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
        options: Annotated[dict[str, Any], Depends(search_options)],
        q: str | None = Query(None, max_length=MAX_QUERY_CHARS, description="Text to search for"),
    ) -> dict[str, Any]:
        """Search by text (and/or ``add`` terms), with filters, +/- terms and cut-offs."""
        t0 = time.perf_counter()
        query = index.make_query(q or None, **options)
        return search_response("text", q or "", query.k, service.search(query), t0)

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
        options: Annotated[dict[str, Any], Depends(search_options)],
        q: str | None = Query(None, max_length=MAX_QUERY_CHARS, description="Text searched with the image"),
    ) -> dict[str, Any]:
        """Search with an uploaded image (multipart field ``file``, at most 20 MB), with the same options."""
        with upload_dir() as folder:
            path, name = await receive_upload(request, folder, max_image_bytes)
            t0 = time.perf_counter()
            query = await run_in_threadpool(index.make_query, q or None, image=path, **options)
            result = await run_in_threadpool(service.search, query)
        return search_response("image", name, query.k, result, t0)

    @app.post("/api/search/audio", response_model=SearchOut, tags=["search"], openapi_extra=upload_body)
    async def search_audio(
        request: Request, options: Annotated[dict[str, Any], Depends(search_options)]
    ) -> dict[str, Any]:
        """Search with an uploaded or recorded voice query (multipart field ``file``, at most 50 MB);
        the response's ``transcript`` is what was heard."""
        with upload_dir() as folder:
            path, name = await receive_upload(request, folder, max_audio_bytes)
            t0 = time.perf_counter()
            query = index.make_query(**options)
            result = await run_in_threadpool(service.search, query, path)
        return search_response("audio", name, query.k, result, t0)

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
    def thumb(
        file_id: int = IntId,
        at: float | None = Query(
            None, ge=0, le=MAX_AT, description="A video's time (seconds): its keyframe on screen then"
        ),
    ) -> Response:
        """A JPEG thumbnail of an image item (made once, cached in the index folder), or of a video's
        keyframe (the first, or the one on screen at ``at`` seconds)."""
        if at is not None and not math.isfinite(at):
            raise HTTPException(422, "at: a finite number of seconds")
        made = service.thumbnail(file_id, at)
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
        """The file itself, by id, while it is the file indexed; supports HTTP range requests (audio and
        video seeking)."""
        f, size, mime = service.media(file_id)
        return OpenFileResponse(f, size, mime, {"Content-Disposition": "inline"})

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


def search_options(
    target: str | None = Query(
        None, description=" | ".join(TARGETS) + " (default: images; texts for an image)"
    ),
    k: int = Query(10, ge=1, le=MAX_K),
    mode: str = Query(DEFAULT_MODE, description=" | ".join(QUERY_MODES)),
    fusion: str = Query(DEFAULT_FUSION, description=" | ".join(QUERY_FUSIONS)),
    combine: str = Query(DEFAULT_COMBINE, description=" | ".join(QUERY_COMBINES)),
    add: Annotated[
        list[str] | None, Query(max_length=MAX_QUERY_CHARS, description="Text whose meaning is added")
    ] = None,
    subtract: Annotated[
        list[str] | None, Query(max_length=MAX_QUERY_CHARS, description="Text whose meaning is taken away")
    ] = None,
    weight: Annotated[
        list[str] | None, Query(max_length=64, description="ROLE:W, role text|image|audio|add|subtract")
    ] = None,
    path: Annotated[
        list[str] | None, Query(max_length=1024, description="Glob on the file's full path (any matches)")
    ] = None,
    ext: Annotated[list[str] | None, Query(max_length=32, description="File extension")] = None,
    kind: Annotated[
        list[str] | None, Query(max_length=16, description="File kind: image | audio | video")
    ] = None,
    after: str | None = Query(
        None, max_length=64, description="Files modified at or after (ISO 8601 / unix)"
    ),
    before: str | None = Query(None, max_length=64, description="Files modified before"),
    min_duration: float | None = Query(None, ge=0, description="Recordings at least this long (s)"),
    max_duration: float | None = Query(None, ge=0, description="Recordings at most this long (s)"),
    tag: Annotated[
        list[str] | None, Query(max_length=200, description="Keyword or zero-shot tag (any matches)")
    ] = None,
    taken_after: str | None = Query(None, max_length=64, description="Photos taken at or after"),
    taken_before: str | None = Query(None, max_length=64, description="Photos taken before"),
    near: str | None = Query(None, max_length=96, description="LAT,LON,KM: photos taken within KM"),
    min_confidence: float | None = Query(None, ge=0, le=1, description="Calibrated confidence cut-off"),
    min_score: float | None = Query(None, ge=-1, le=1, description="Raw cosine cut-off"),
) -> dict[str, Any]:
    """The query options shared by the three search endpoints, as :meth:`Index.make_query` arguments."""
    if target is not None:
        _check_target(target)
    return {
        "target": target,
        "k": k,
        **parse_search_options(
            mode=mode, fusion=fusion, combine=combine, add=add, subtract=subtract, weight=weight, path=path,
            ext=ext, kind=kind, after=after, before=before, min_duration=min_duration,
            max_duration=max_duration, min_confidence=min_confidence, min_score=min_score, tag=tag,
            taken_after=taken_after, taken_before=taken_before, near=near,
        ),
    }  # fmt: skip


def thumb_url(file_id: int, file_kind: str | None, start: float | None) -> str | None:
    """The thumbnail of a hit: an image's own; a video's keyframe on screen at ``start`` (``repr`` keeps
    every digit, so a frame hit's time names that very frame); None for audio."""
    if file_kind == "image":
        return f"/api/thumbs/{file_id}"
    if file_kind == "video":
        return f"/api/thumbs/{file_id}" if start is None else f"/api/thumbs/{file_id}?at={float(start)!r}"
    return None


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise HTTPException(400, f"unknown target '{target}' (choose from {', '.join(TARGETS)})")


TOKEN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mmsearch</title><link rel="stylesheet" href="/style.css">
</head><body><h1>mmsearch</h1>
<p>This server needs its token. Open the address <code>mmsearch serve</code> printed when it started
(it ends in <code>/?token=…</code>).</p></body></html>
"""


def _token_page(status: int) -> Response:
    return HTMLResponse(TOKEN_PAGE, status_code=status, headers={"Cache-Control": "no-store"})


def _web_file(name: str) -> Response:
    data = resources.files("mmsearch.web").joinpath(name).read_bytes()
    return Response(data, media_type=WEB_FILES[name], headers={"Cache-Control": "no-cache"})
