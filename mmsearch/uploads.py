"""Query files sent to the server (an image, a voice recording): received into a private temporary folder,
streamed to disk and cut off with a 413 as soon as they exceed their cap."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mmsearch.constants import AUDIO_SUFFIXES, IMAGE_SUFFIXES
from mmsearch.errors import MissingDependencyError
from mmsearch.render import base_name

try:
    from fastapi import HTTPException, Request
    from starlette.datastructures import UploadFile
    from starlette.types import Message
except ImportError as e:  # pragma: no cover - depends on the installation
    raise MissingDependencyError(e.name or "fastapi", "mmsearch serve", extra="server") from e

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_AUDIO_BYTES = 50 * 1024 * 1024
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file itself
# Suffixes kept on uploaded temp files (decoders sniff content; the suffix only helps them guess).
# Beyond the indexed formats: what browsers record a voice query as.
UPLOAD_SUFFIXES = IMAGE_SUFFIXES | AUDIO_SUFFIXES | {".oga", ".mp4", ".webm", ".aac"}


class _TooLarge(Exception):
    pass


@contextlib.contextmanager
def upload_dir() -> Iterator[Path]:
    """A private temporary folder for one upload, removed with whatever it holds however the request ends."""
    with tempfile.TemporaryDirectory(prefix="mmsearch-upload-") as d:
        yield Path(d)


async def receive_upload(request: Request, folder: Path, limit: int) -> tuple[Path, str]:
    """Stream the multipart field ``file`` into ``folder``; 413 as soon as the body exceeds ``limit``.
    Returns the file written and the name the client gave it (at most 200 characters)."""
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
    return path, base_name(name)[:200]
