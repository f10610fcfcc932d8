"""The server's files: an indexed file opened only while it is still the one the catalog knows, sent from
that open descriptor with byte ranges, and image thumbnails cached in the index folder.

A file is served only by catalog id (never by a path a client sent), and only if, opened without following
a symlink, it is a regular file of the indexed size and mtime; it is then read from that descriptor, never
re-opened by path, so nothing swapped in after the check is served. Thumbnail decodes are bounded.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import mimetypes
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING

from mmsearch.errors import MissingDependencyError, MmsearchError

try:
    from fastapi import HTTPException
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import Headers, MutableHeaders
    from starlette.types import Receive, Scope, Send
except ImportError as e:  # pragma: no cover - depends on the installation
    raise MissingDependencyError(e.name or "fastapi", "mmsearch serve", extra="server") from e

if TYPE_CHECKING:
    from mmsearch.db import FileDetails
    from mmsearch.store import Store

log = logging.getLogger(__name__)

THUMB_SIDE = 256
THUMB_DECODES = 2  # thumbnails decoded at once: each can hold a large image in memory
MEDIA_CHUNK = 256 * 1024


def display(text: str) -> str:
    """``text`` as valid UTF-8 for JSON: surrogate escapes (undecodable bytes of a name) replaced."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def open_file(row: FileDetails) -> IO[bytes]:
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


#: The MIME types of the video containers indexed, whatever the system's MIME table says (a browser's
#: ``<video>`` needs one it knows to try playing the file).
VIDEO_TYPES = {
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".mov": "video/quicktime",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".avi": "video/x-msvideo",
}


def media_type(row: FileDetails) -> str:
    """The MIME type a file is served as: what its suffix says, never sniffed."""
    path = display(row.path)
    known = VIDEO_TYPES.get(os.path.splitext(path)[1].lower())
    return known or mimetypes.guess_type(path)[0] or "application/octet-stream"


class Thumbnails:
    """JPEG thumbnails of image items, made on first request and cached in the index folder (named by
    content hash); at most :data:`THUMB_DECODES` decodes at once. A video's keyframes are served as saved
    when it was indexed (:func:`mmsearch.ingest_video.frame_thumb_path`), never decoded here."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._decodes = threading.BoundedSemaphore(THUMB_DECODES)

    def frame(self, row: FileDetails, idx: int) -> Path:
        """The saved thumbnail of keyframe ``idx`` of video ``row``; 404 unless the file is still the one
        indexed (see :func:`open_file`), or if none was saved (the index folder was read-only then)."""
        from mmsearch.ingest_video import frame_thumb_path

        if row.kind != "video":
            raise HTTPException(404, f"item {row.id} is {row.kind}: no frames")
        with open_file(row):
            try:
                saved: Path | None = frame_thumb_path(self.store, row.sha256, idx)
            except (OSError, MmsearchError):  # no thumbnails folder, and a read-only index folder
                saved = None
            if saved is None or not saved.is_file():
                raise HTTPException(404, f"item {row.id}: no thumbnail of keyframe {idx} was saved")
        return saved

    def get(self, row: FileDetails) -> Path | bytes:
        """The cached thumbnail of ``row``, or its bytes if the index folder is read-only; 404 unless the
        file is still the one indexed (see :func:`open_file`)."""
        from PIL import Image

        from mmsearch.errors import BadMediaError
        from mmsearch.images import INDEX_MAX_PIXELS, load_image

        if row.kind != "image":
            raise HTTPException(404, f"item {row.id} is {row.kind}: no thumbnail")
        cached = self.store.thumbnail_path(row.sha256, THUMB_SIDE)
        with open_file(row) as f:
            if cached.is_file():
                return cached
            # Bounded: each decode can hold a large image in memory, and a page asks for many at once.
            with self._decodes:
                try:
                    image = load_image(
                        f,
                        max_side=THUMB_SIDE * 2,
                        draft_size=THUMB_SIDE,
                        max_pixels=INDEX_MAX_PIXELS,
                        suffix=os.path.splitext(row.path)[1],  # an open file has no name: RAW is told by it
                    )
                except BadMediaError as e:
                    raise HTTPException(404, f"item {row.id} cannot be read now: {e}") from e
        image.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
        try:
            self.store.thumbnails_folder()  # owner-only, like the rest of the index folder
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


class OpenFileResponse(Response):
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
                wanted = byte_range(Headers(scope=scope).get("range"), self.size)
            except Unsatisfiable:
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


class Unsatisfiable(Exception):
    """A Range no byte of the file satisfies: answered 416."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The [start, end) a Range header asks for; None to send the whole file (no header, or not one single
    byte range: RFC 9110 lets a server ignore those); :class:`Unsatisfiable` for a 416."""
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
            raise Unsatisfiable
        return max(0, size - int(last)), size
    start = int(first)
    end = size if last == "" else int(last) + 1
    if last != "" and end <= start:
        return None  # "bytes=9-5" is not a valid range: ignored
    if start >= size:
        raise Unsatisfiable
    return start, min(end, size)
