"""The fast terminal path: ask a running `mmsearch serve` for the same index instead of loading the model.

Loading torch and OpenCLIP takes seconds; a warm server answers a query in milliseconds. This module
imports only the standard library (no numpy, torch, faiss, sqlalchemy), so ``mmsearch query`` can use it
before deciding whether it needs the heavy engine at all.

>>> server = find_server("indexes/default")        # None if no live server for this index
>>> query_server(server, text="a red circle", target="images", k=5)["hits"][0]["path"]

A server is used only if it proves it is the one this index's ``server.json`` names (see
:mod:`mmsearch.discovery`): the file is a private file of this user, its pid is alive and is the pid the
server reports, the server reports this package's version, this index's folder and this index's model, and
it answers the health challenge with the file's token. Anything else returns None, and the CLI searches
locally. Every query then carries the token (``Authorization: Bearer``), which the server requires.

:func:`start_server` launches a background server (``python -m mmsearch.server``) that exits on its own
after some idle minutes: what ``mmsearch query --serve`` uses so that the next queries are warm. It runs
isolated from the caller's folder (see :func:`server_command`).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmsearch import discovery
from mmsearch.constants import TARGETS
from mmsearch.discovery import SERVER_FILE, SERVER_LOG, read_server_file
from mmsearch.errors import BadQueryError, MmsearchError

__all__ = [
    "SERVER_FILE",
    "SERVER_LOG",
    "Server",
    "ServerError",
    "find_server",
    "query_server",
    "read_server_file",
    "start_server",
    "wait_for_server",
]

TARGET_NAMES = tuple(TARGETS)
HEALTH_TIMEOUT = 0.5
DEFAULT_IDLE_MINUTES = 15.0

if TYPE_CHECKING:
    import urllib.error
    import urllib.request


@functools.cache
def _opener() -> urllib.request.OpenerDirector:
    """Loopback needs no proxy, and an http_proxy in the environment must not see local queries. (Made on
    first use: urllib.request imports http.client, email and ssl, which a local search never needs.)"""
    import urllib.request

    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(MmsearchError):
    """The server answered with an error it could not attribute to the query."""


@dataclass(frozen=True)
class Server:
    """A live server for an index, as :func:`find_server` verified it: where it listens, its token, its pid."""

    url: str  # http://HOST:PORT, no trailing slash
    token: str
    pid: int

    def __repr__(self) -> str:  # never print the token into a log or a traceback
        return f"Server(url={self.url!r}, pid={self.pid})"

    @property
    def page_url(self) -> str:
        """The web page's address with the token, as ``mmsearch serve`` prints it."""
        return discovery.page_url(self.url, self.token)


def find_server(index_path: str | Path, *, timeout: float = HEALTH_TIMEOUT) -> Server | None:
    """The live server for this index, or None.

    Live means: ``server.json`` is this user's private file, its pid exists, and ``/api/health`` answers
    within ``timeout`` with that pid, this package's version, this index's folder and model, and the proof
    that it holds the file's token (so a stale file whose port another program now uses is never trusted,
    and never receives a query).
    """
    info = read_server_file(index_path)
    if info is None or not discovery.pid_alive(info["pid"]):
        return None
    url = info["url"].rstrip("/")
    nonce = discovery.new_nonce()
    try:
        health = _request(f"{url}/api/health?nonce={nonce}", timeout=timeout)
    except (OSError, ValueError, MmsearchError):
        return None
    if (
        health.get("pid") != info["pid"]
        or health.get("version") != discovery.VERSION
        or not isinstance(health.get("proof"), str)
        or not discovery.same_token(health["proof"], discovery.health_proof(info["token"], nonce))
    ):
        return None
    model = discovery.index_model(index_path)
    if model is not None and health.get("model") != model:
        return None
    try:
        same = os.path.samefile(str(health.get("index", "")), index_path)
    except OSError:
        return None
    return Server(url, info["token"], info["pid"]) if same else None


def query_server(
    server: Server,
    *,
    text: str | None = None,
    image: str | Path | None = None,
    audio: str | Path | None = None,
    target: str | None = None,
    k: int = 10,
    options: Mapping[str, Any] | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Run one query on ``server`` (from :func:`find_server`): ``text``, ``image`` or ``audio`` (an image may
    come with a text; an ``add`` option alone is a query too), and ``options``, the keyword arguments of
    :meth:`mmsearch.Index.search` (mode, fusion, combine, add, subtract, weights, filters, cut-offs) sent
    as query parameters.

    Returns the server's JSON: ``{"target", "k", "took_ms", "no_match", "hits": [...], "transcript"?}``,
    each hit with the fields of :class:`mmsearch.search.Hit` plus ``name``, ``file_kind``, ``captions``
    and URLs. A query the server rejects raises :class:`BadQueryError` with its reason.
    """
    if image is not None and audio is not None or text is not None and audio is not None:
        raise BadQueryError("a spoken query goes alone: no text or image with it")
    params: list[tuple[str, Any]] = [("k", k)]
    if target is not None:
        params.append(("target", target))
    if text is not None:
        params.append(("q", text))
    params += search_params(options or {})
    auth = {"Authorization": f"Bearer {server.token}"}
    if image is None and audio is None:
        query = urllib.parse.urlencode(params)
        return _request(f"{server.url}/api/search?{query}", headers=auth, timeout=timeout)
    kind = "image" if image is not None else "audio"
    path = Path(image if image is not None else audio)  # type: ignore[arg-type]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadQueryError(f"query {kind} not readable: {path}: {e.strerror or e}") from e
    body, content_type = _multipart("file", path.name, data)
    query = urllib.parse.urlencode(params)
    return _request(
        f"{server.url}/api/search/{kind}?{query}",
        data=body,
        headers={**auth, "Content-Type": content_type},
        timeout=timeout,
    )


def search_options(
    *,
    mode: str,
    fusion: str,
    combine: str,
    add: Sequence[str] | None,
    subtract: Sequence[str] | None,
    weight: Sequence[str] | None,
    path: Sequence[str] | None,
    ext: Sequence[str] | None,
    kind: Sequence[str] | None,
    after: str | None,
    before: str | None,
    min_duration: float | None,
    max_duration: float | None,
    min_confidence: float | None,
    min_score: float | None,
    tag: Sequence[str] | None = None,
    taken_after: str | None = None,
    taken_before: str | None = None,
    near: str | None = None,
) -> dict[str, Any]:
    """Query options as given on a command line or in query parameters (``weight`` as ``ROLE=W`` or
    ``ROLE:W``, lists possibly None) -> :meth:`mmsearch.Index.search` keyword arguments; the CLI and the
    server both translate through this. :class:`BadQueryError` for a malformed weight."""
    weights: dict[str, float] = {}
    for w in weight or []:
        role, sep, value = w.replace(":", "=", 1).partition("=")
        try:
            weights[role.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise BadQueryError(f"a weight is ROLE=NUMBER (e.g. image=2), not '{w}'")
    return {
        "mode": mode,
        "fusion": fusion,
        "combine": combine,
        "add": list(add or []),
        "subtract": list(subtract or []),
        "weights": weights or None,
        "path": list(path or []),
        "ext": list(ext or []),
        "kind": list(kind or []),
        "after": after,
        "before": before,
        "min_duration": min_duration,
        "max_duration": max_duration,
        "tag": list(tag or []),
        "taken_after": taken_after,
        "taken_before": taken_before,
        "near": near,
        "min_confidence": min_confidence,
        "min_score": min_score,
    }


def search_params(options: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """:meth:`mmsearch.Index.search` keyword arguments as the HTTP API's query parameters (lists repeated,
    ``weights`` as ``weight=ROLE:W``, None left out)."""
    out: list[tuple[str, Any]] = []
    for name, value in options.items():
        if value is None:
            continue
        if name == "weights":
            out += [("weight", f"{role}:{w}") for role, w in value.items()]
        elif isinstance(value, list | tuple):
            out += [(name, v) for v in value]
        else:
            out.append((name, value))
    return out


def server_command(index_path: str | Path, *, port: int = 0, idle_minutes: float | None = None) -> list[str]:
    """The command line of a background ``python -m mmsearch.server`` for ``index_path``.

    ``-m`` puts the current folder first on ``sys.path``, so a stray ``argparse.py`` there would run
    inside the server. The caller runs this with the index folder as cwd (written only by mmsearch) and,
    on Python >= 3.11, ``-P`` keeps even that folder off ``sys.path``. Not ``-I``: it also drops
    ``PYTHONPATH`` and the user site-packages, where mmsearch itself may be installed.
    """
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    cmd = [sys.executable, *safe_path, "-m", "mmsearch.server", str(Path(index_path).resolve())]
    cmd += ["--port", str(port)]
    if idle_minutes is not None:
        cmd += ["--idle-timeout", str(idle_minutes * 60)]
    return cmd


def start_server(
    index_path: str | Path, *, idle_minutes: float = DEFAULT_IDLE_MINUTES, wait: float | None = 120.0
) -> Server | None:
    """Start a background server for this index (any free loopback port) that exits after ``idle_minutes``
    without a request, and wait up to ``wait`` seconds for it to answer. Returns it (None if it did not
    come up in time; its log is ``INDEX/server.log``). A server already running is reused."""
    import subprocess

    folder = Path(index_path).resolve()
    running = find_server(folder)
    if running is not None:
        return running
    log_fd = discovery.open_private(folder / SERVER_LOG, os.O_WRONLY | os.O_APPEND)
    with os.fdopen(log_fd, "ab") as log:
        subprocess.Popen(
            server_command(folder, idle_minutes=idle_minutes),
            cwd=folder,  # not the caller's folder: see server_command
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # not killed with the terminal's process group, nor by Ctrl-C
            close_fds=True,
        )
    return wait_for_server(folder, wait) if wait else None


def wait_for_server(index_path: str | Path, timeout: float) -> Server | None:
    """Poll until a server for this index answers (or ``timeout`` seconds pass)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = find_server(index_path)
        if running is not None:
            return running
        time.sleep(0.1)
    return None


# --- plumbing -----------------------------------------------------------------------------------------
def _request(
    url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None, timeout: float
) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, headers={"Accept": "application/json", **(headers or {})})
    try:
        with _opener().open(req, timeout=timeout) as resp:
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
