"""The fast terminal path: ask a running `mmsearch serve` for the same index instead of loading the model.

Loading torch and OpenCLIP takes seconds; a warm server answers a query in milliseconds. This module
imports only the standard library (no numpy, torch, faiss, sqlalchemy), so ``mmsearch query`` can use it
before deciding whether it needs the heavy engine at all.

>>> url = find_server("indexes/default")           # None if no live server for this index
>>> query_server(url, text="a red circle", target="images", k=5)["hits"][0]["path"]

:func:`start_server` launches a background server (``python -m mmsearch.server``) that exits on its own
after some idle minutes: what ``mmsearch query --serve`` uses so that the next queries are warm.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from mmsearch.errors import BadQueryError, MmsearchError

SERVER_FILE = "server.json"  # written by mmsearch.server while it runs
SERVER_LOG = "server.log"
# The keys of mmsearch.search.TARGETS, repeated here so the CLI can validate without importing numpy
# (a test checks the two agree).
TARGET_NAMES = ("images", "texts", "captions", "audio", "all")
HEALTH_TIMEOUT = 0.5
# Most results a server returns per query (mmsearch.server uses this); a larger -k is answered locally.
SERVER_MAX_K = 200
DEFAULT_IDLE_MINUTES = 15.0

# Loopback needs no proxy, and an http_proxy in the environment must not see local queries.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(MmsearchError):
    """The server answered with an error it could not attribute to the query."""


def read_server_file(index_path: str | Path) -> dict[str, Any] | None:
    """What ``INDEX/server.json`` says, or None if there is none (or it is unreadable)."""
    try:
        info = json.loads((Path(index_path) / SERVER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("url"), str)
        or not isinstance(info.get("pid"), int)
    ):
        return None
    return info


def find_server(index_path: str | Path, *, timeout: float = HEALTH_TIMEOUT) -> str | None:
    """The URL of a live server for this index, or None.

    Live means: the pid in ``server.json`` exists, and ``/api/health`` answers within ``timeout`` with that
    pid and this index's folder (so a stale file whose port another program now uses is never trusted).
    """
    info = read_server_file(index_path)
    if info is None or not _pid_alive(info["pid"]):
        return None
    url = info["url"].rstrip("/")
    try:
        health = _request(f"{url}/api/health", timeout=timeout)
    except (OSError, ValueError, MmsearchError):
        return None
    if health.get("pid") != info["pid"]:
        return None
    try:
        same = os.path.samefile(health.get("index", ""), index_path)
    except OSError:
        return None
    return url if same else None


def query_server(
    url: str,
    *,
    text: str | None = None,
    image: str | Path | None = None,
    audio: str | Path | None = None,
    target: str | None = None,
    k: int = 10,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Run one query on the server at ``url``; exactly one of ``text``, ``image``, ``audio``.

    Returns the server's JSON: ``{"target", "k", "took_ms", "hits": [...], "transcript"?}``, each hit
    with the fields of :class:`mmsearch.search.Hit` plus ``name``, ``file_kind``, ``captions`` and URLs.
    A query the server rejects raises :class:`BadQueryError` with its reason.
    """
    given = [v for v in (text, image, audio) if v is not None]
    if len(given) != 1:
        raise BadQueryError("give exactly one of text, image or audio")
    url = url.rstrip("/")
    if text is not None:
        target = target or "images"
        params = urllib.parse.urlencode({"q": text, "target": target, "k": k})
        return _request(f"{url}/api/search?{params}", timeout=timeout)
    kind = "image" if image is not None else "audio"
    path = Path(image if image is not None else audio)  # type: ignore[arg-type]
    target = target or ("texts" if kind == "image" else "images")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadQueryError(f"query {kind} not readable: {path}: {e.strerror or e}") from e
    body, content_type = _multipart("file", path.name, data)
    params = urllib.parse.urlencode({"target": target, "k": k})
    return _request(
        f"{url}/api/search/{kind}?{params}",
        data=body,
        headers={"Content-Type": content_type},
        timeout=timeout,
    )


def start_server(
    index_path: str | Path, *, idle_minutes: float = DEFAULT_IDLE_MINUTES, wait: float | None = 120.0
) -> str | None:
    """Start a background server for this index (any free loopback port) that exits after ``idle_minutes``
    without a request, and wait up to ``wait`` seconds for it to answer. Returns its URL (None if it did not
    come up in time; its log is ``INDEX/server.log``). A server already running is reused."""
    import subprocess
    import sys

    folder = Path(index_path)
    url = find_server(folder)
    if url is not None:
        return url
    with open(folder / SERVER_LOG, "ab") as log:
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mmsearch.server",
                str(folder),
                "--port",
                "0",
                "--idle-timeout",
                str(idle_minutes * 60),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # not killed with the terminal's process group, nor by Ctrl-C
            close_fds=True,
        )
    return wait_for_server(folder, wait) if wait else None


def wait_for_server(index_path: str | Path, timeout: float) -> str | None:
    """Poll until a server for this index answers (or ``timeout`` seconds pass)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        url = find_server(index_path)
        if url is not None:
            return url
        time.sleep(0.1)
    return None


# --- plumbing -----------------------------------------------------------------------------------------
def _request(
    url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None, timeout: float
) -> dict[str, Any]:
    req = urllib.request.Request(url, data=data, headers={"Accept": "application/json", **(headers or {})})
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as e:
        detail = _detail(e)
        if e.code in (400, 404, 413, 422):
            raise BadQueryError(detail) from None
        raise ServerError(f"the server at {url.split('/api/')[0]} failed ({e.code}): {detail}") from None
    except urllib.error.URLError as e:
        raise ServerError(f"cannot reach {url.split('/api/')[0]}: {e.reason}") from e


def _detail(e: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(e.read()).get("detail", e.reason)
    except (OSError, ValueError, AttributeError):
        return str(e.reason)
    if isinstance(detail, list):  # FastAPI validation errors
        return "; ".join(str(d.get("msg", d)) for d in detail)
    return str(detail)


def _multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "mmsearch-" + os.urandom(16).hex()
    safe_name = filename.replace("\\", "_").replace('"', "_").replace("\r", "_").replace("\n", "_")
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{safe_name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode("utf-8", "replace")
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
