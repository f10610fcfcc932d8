"""Who may ask the server, and what it serves (issue 11): cross-site requests, the token, server discovery,
files swapped after indexing, non-UTF-8 names, and how the background server is started.

A real uvicorn server over real sockets, on an index of the tiny random model (plumbing, not semantics).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import http.server
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import mmsearch
from mmsearch import client, discovery, server
from tests.conftest import TINY_MODEL, solid
from tests.test_server import multipart, send, start

ODD_NAME = b"caf\xff-odd.png"  # not valid UTF-8


@dataclass
class Site:
    index: Path
    media: Path
    outside: Path  # a folder next to the indexed one, never indexed
    page_url: str  # what the server announced
    token: str
    port: int
    ids: dict[bytes, int]  # file name (bytes) -> file id

    @property
    def server(self) -> client.Server:
        return client.Server(f"http://127.0.0.1:{self.port}", self.token, os.getpid())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("security")
    media, outside = root / "media", root / "outside"
    outside.mkdir()
    for name, color in (
        ("red.png", "red"),
        ("green.png", "green"),
        ("swap.png", "blue"),
        ("thumb.png", "gray"),
        ("edited.png", "purple"),
    ):
        solid(media / name, color)
    solid(media / "fifo.png", "yellow")
    (media / "red.txt").write_text("a plain red picture\n")
    # A name that is not UTF-8: created through bytes paths.
    with open(os.path.join(os.fsencode(media), ODD_NAME), "wb") as f:
        f.write((media / "green.png").read_bytes())
    index = root / "index"
    with mmsearch.Index.create(index, model=TINY_MODEL, pretrained="random") as idx:
        report = idx.add_folder(media)
        assert not report.skipped, report.skipped
        ids = {os.path.basename(key): row.id for key, row in idx.store.catalog.files_by_key().items()}
    page_url, thread, stop = start(index)
    # Read from server.json with no client code, so the HTTP-level tests below also run against older servers.
    info = json.loads((index / client.SERVER_FILE).read_text())
    port = int(info["url"].rsplit(":", 1)[1])
    yield Site(index, media, outside, page_url, str(info.get("token")), port, ids)
    stop.set()
    thread.join(30)
    assert not thread.is_alive()


def request(
    site: Site,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    token: bool = True,
) -> tuple[int, dict[str, str], bytes]:
    return send(
        "127.0.0.1", site.port, site.token if token else None, method, path, headers=headers, body=body
    )


def image_upload(site: Site) -> tuple[bytes, dict[str, str]]:
    return multipart((site.media / "red.png").read_bytes(), "q.png")


# --- 1. cross-site requests ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "browser_headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},  # a sandboxed frame or a file:// page
        {"Origin": "http://localhost:1"},  # another local port: another origin
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # e.g. a page served by another port of localhost
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"},
    ],
)
def test_requests_from_other_sites_are_refused(site: Site, browser_headers: dict[str, str]) -> None:
    body, headers = image_upload(site)
    for method, path, data, extra in (
        ("POST", "/api/search/image?target=images&k=1", body, headers),
        ("POST", "/api/search/audio?k=1", body, headers),
        ("GET", "/api/search?q=red&k=1", None, {}),  # runs the model
        ("GET", f"/api/media/{site.ids[b'red.png']}", None, {}),
    ):
        status, got, payload = request(site, method, path, headers={**extra, **browser_headers}, body=data)
        # Refused even with the right token: a page cannot hold it, but a leaked cookie must not help either.
        assert status == 403, (method, path, status, payload[:200])
        assert "another" in json.loads(payload)["detail"]
        assert got["cross-origin-resource-policy"] == "same-origin"


@pytest.mark.parametrize(
    "browser_headers",
    [
        {},  # the CLI, curl: no browser headers
        {"Sec-Fetch-Site": "same-origin"},  # the page itself
        {"Sec-Fetch-Site": "none"},  # an address the user typed
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:{port}"},
    ],
)
def test_requests_from_the_page_itself_are_answered(site: Site, browser_headers: dict[str, str]) -> None:
    browser_headers = {k: v.format(port=site.port) for k, v in browser_headers.items()}
    body, headers = image_upload(site)
    status, _, payload = request(
        site, "POST", "/api/search/image?target=images&k=1", headers={**headers, **browser_headers}, body=body
    )
    assert status == 200, payload[:300]
    assert json.loads(payload)["hits"][0]["file_id"] == site.ids[b"red.png"]
    assert request(site, "GET", "/api/search?q=red&k=1", headers=browser_headers)[0] == 200


def test_every_response_forbids_cross_origin_reads(site: Site) -> None:
    for path, token, headers, expected in (
        ("/", False, {}, 401),
        ("/app.js", False, {}, 200),
        ("/api/health", False, {}, 200),
        ("/api/stats", False, {}, 401),
        ("/api/search?q=red", False, {"Origin": "http://evil.example"}, 403),
        (f"/api/thumbs/{site.ids[b'red.png']}", True, {}, 200),
        ("/api/items/999999", True, {}, 404),
        ("/api/health", False, {"Host": "evil.example"}, 400),
    ):
        status, got, _ = request(site, "GET", path, headers=headers, token=token)
        assert status == expected, (path, status)
        assert got["cross-origin-resource-policy"] == "same-origin", path


# --- 2. the token ----------------------------------------------------------------------------------------
def test_api_needs_the_token(site: Site) -> None:
    file_id = site.ids[b"red.png"]
    guarded = [
        "/api/search?q=red&target=captions",
        "/api/stats",
        f"/api/items/{file_id}",
        f"/api/media/{file_id}",
    ]
    guarded.append(f"/api/thumbs/{file_id}")
    wrong = site.token[:-1] + ("A" if site.token[-1] != "A" else "B")
    for path in guarded:
        for headers in ({}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": "Bearer "}):
            status, got, body = request(site, "GET", path, headers=headers, token=False)
            assert status == 401, (path, headers, status)
            assert "token" in json.loads(body)["detail"] and got["www-authenticate"] == "Bearer"
        assert request(site, "GET", path)[0] == 200, path
    body, headers = image_upload(site)
    assert request(site, "POST", "/api/search/image", headers=headers, body=body, token=False)[0] == 401
    # Health needs no token and gives none away.
    status, _, raw_health = request(site, "GET", "/api/health", token=False)
    health = json.loads(raw_health)
    assert status == 200 and site.token not in raw_health.decode()
    assert health["version"] == discovery.VERSION and health["pid"] == os.getpid()
    assert health["index"] == os.path.realpath(site.index)
    assert health["model"] == json.loads((site.index / "mmsearch.json").read_text())["model"]


def test_the_printed_url_sets_a_strict_cookie_and_leaves_the_address_bar(site: Site) -> None:
    parsed = urllib.parse.urlsplit(site.page_url)
    assert parsed.path == "/" and urllib.parse.parse_qs(parsed.query) == {"token": [site.token]}
    status, headers, body = request(site, "GET", f"/?{parsed.query}", token=False)
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    name = f"{discovery.TOKEN_COOKIE}_{site.port}"
    assert cookie.startswith(f"{name}={site.token};")
    attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= attributes
    # With the cookie: the page, and the API the page calls (media and thumbnails through <img>, <audio>).
    jar = {"Cookie": f"{name}={site.token}"}
    status, _, page = request(site, "GET", "/", headers=jar, token=False)
    assert status == 200 and b'<script src="/app.js"' in page
    assert request(site, "GET", f"/api/media/{site.ids[b'red.png']}", headers=jar, token=False)[0] == 200
    # Without it, or with a wrong token: a short page saying what to open, not the app.
    for path, headers in (("/", {}), ("/?token=wrong", {}), ("/", {"Cookie": f"{name}=wrong"})):
        status, _, page = request(site, "GET", path, headers=headers, token=False)
        assert status == 401 and b"mmsearch serve" in page and b"app.js" not in page
        assert site.token.encode() not in page
    # Another port's cookie does not open this server.
    other = {"Cookie": f"{discovery.TOKEN_COOKIE}_{site.port + 1}={site.token}"}
    assert request(site, "GET", "/", headers=other, token=False)[0] == 401


def test_server_files_are_private(site: Site) -> None:
    for name in (discovery.SERVER_FILE, discovery.SERVER_LOCK):
        mode = stat.S_IMODE((site.index / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    info = json.loads((site.index / discovery.SERVER_FILE).read_text())
    assert info["token"] == site.token and len(info["token"]) >= 40
    assert info["version"] == discovery.VERSION
    assert not [p for p in site.index.iterdir() if p.name.startswith(f".{discovery.SERVER_FILE}")]


class _Impostor(http.server.BaseHTTPRequestHandler):
    """Answers /api/health with whatever ``answer(nonce)`` returns."""

    answer: Any = None

    def do_GET(self) -> None:
        nonce = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("nonce", [""])[0]
        body = json.dumps(type(self).answer(nonce)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def impostor() -> Iterator[tuple[str, type[_Impostor]]]:
    handler = type("Handler", (_Impostor,), {})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_find_server_trusts_only_the_server_of_this_index(
    site: Site, tmp_path: Path, impostor: tuple[str, type[_Impostor]]
) -> None:
    """A process listening on the port of server.json is used only if it reports this version, index,
    model and pid, and proves it holds the file's token."""
    url, handler = impostor
    index = tmp_path / "index"
    mmsearch.Index.create(index, model=TINY_MODEL, pretrained="random").close()
    token = discovery.new_token()
    discovery.write_server_file(index, {"url": url, "pid": os.getpid(), "token": token})
    model = json.loads((index / "mmsearch.json").read_text())["model"]

    def genuine(nonce: str) -> dict[str, Any]:
        proof = hmac.new(
            token.encode(), discovery.HEALTH_PROOF_CONTEXT + nonce.encode(), hashlib.sha256
        ).hexdigest()
        return {
            "ok": True,
            "version": discovery.VERSION,
            "index": str(index.resolve()),
            "pid": os.getpid(),
            "model": model,
            "proof": proof,
        }

    handler.answer = genuine
    assert client.find_server(index) == client.Server(url, token, os.getpid())  # the control case
    for change in (
        {"version": "0.0.0+other"},
        {"index": str(site.index.resolve())},
        {"model": {**model, "name": "another"}},
        {"pid": os.getpid() + 1},
        {"proof": "0" * 64},  # took over the port, cannot know the token
        {"proof": None},
    ):
        handler.answer = lambda nonce, change=change: {**genuine(nonce), **change}
        assert client.find_server(index) is None, change
    handler.answer = genuine
    # server.json that another user could have written (not private) or that is a symlink is not read.
    path = index / discovery.SERVER_FILE
    path.chmod(0o644)
    assert client.find_server(index) is None
    path.chmod(0o600)
    assert client.find_server(index) is not None
    real = tmp_path / "elsewhere.json"
    os.replace(path, real)
    path.symlink_to(real)
    assert client.find_server(index) is None


def test_query_server_sends_the_token(site: Site) -> None:
    hits = client.query_server(site.server, text="red", target="images", k=1)["hits"]
    assert len(hits) == 1
    tokenless = client.Server(site.server.url, "not-the-token", site.server.pid)
    with pytest.raises(client.ServerError, match="401"):
        client.query_server(tokenless, text="red", target="images", k=1)
    assert site.token not in repr(site.server)


# --- 5. files changed on disk since they were indexed -----------------------------------------------------
def _same_stamp(path: Path, like: os.stat_result) -> None:
    os.utime(path, ns=(like.st_atime_ns, like.st_mtime_ns), follow_symlinks=False)


@contextlib.contextmanager
def _swapped(original: Path, replacement: Path) -> Iterator[None]:
    """``original`` replaced by ``replacement`` (already created elsewhere) for the block, then restored."""
    kept = original.with_name(original.name + ".kept")
    os.replace(original, kept)
    try:
        os.replace(replacement, original)
        yield
    finally:
        os.unlink(original)
        os.replace(kept, original)


def test_a_symlink_swapped_in_for_an_indexed_file_is_not_followed(site: Site) -> None:
    original = site.media / "swap.png"
    st = original.stat()
    secret = site.outside / "secret.txt"
    payload = b"TOP SECRET "
    secret.write_bytes((payload * (st.st_size // len(payload) + 1))[: st.st_size])
    _same_stamp(secret, st)  # even the target's size and mtime match the catalog
    link = site.outside / "link"
    link.symlink_to(secret)
    _same_stamp(link, st)
    file_id = site.ids[b"swap.png"]
    with _swapped(original, link):
        status, _, body = request(site, "GET", f"/api/media/{file_id}")
        assert status == 404 and b"SECRET" not in body, (status, body[:100])
        assert "symbolic link" in json.loads(body)["detail"]
        status, _, body = request(site, "GET", f"/api/media/{file_id}", headers={"Range": "bytes=0-99"})
        assert status == 404 and b"SECRET" not in body
    assert request(site, "GET", f"/api/media/{file_id}")[2] == original.read_bytes()  # restored: served


def test_a_thumbnail_is_not_made_from_a_swapped_in_symlink(site: Site) -> None:
    original = site.media / "thumb.png"
    secret = site.outside / "secret.png"
    solid(secret, "white", size=(300, 200))
    link = site.outside / "thumb-link"
    link.symlink_to(secret)
    _same_stamp(link, original.stat())
    file_id = site.ids[b"thumb.png"]
    with _swapped(original, link):
        status, headers, body = request(site, "GET", f"/api/thumbs/{file_id}")
        assert status == 404 and headers["content-type"] == "application/json", (status, headers)
    assert request(site, "GET", f"/api/thumbs/{file_id}")[0] == 200


def test_a_file_edited_since_indexing_is_not_served(site: Site) -> None:
    path = site.media / "edited.png"
    file_id = site.ids[b"edited.png"]
    indexed = path.read_bytes()
    assert request(site, "GET", f"/api/media/{file_id}")[2] == indexed
    st = path.stat()
    try:
        path.write_bytes(indexed + b"appended after indexing")
        status, _, body = request(site, "GET", f"/api/media/{file_id}")
        assert status == 404 and "changed on disk since it was indexed" in json.loads(body)["detail"]
        path.write_bytes(indexed)  # same size, other mtime
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        assert request(site, "GET", f"/api/media/{file_id}")[0] == 404
    finally:
        path.write_bytes(indexed)
        _same_stamp(path, st)
    assert request(site, "GET", f"/api/media/{file_id}")[2] == indexed


def test_a_fifo_swapped_in_does_not_hang_the_server(site: Site) -> None:
    original = site.media / "fifo.png"
    fifo = site.outside / "fifo"
    os.mkfifo(fifo)
    _same_stamp(fifo, original.stat())
    with _swapped(original, fifo):
        t0 = time.monotonic()
        assert request(site, "GET", f"/api/media/{site.ids[b'fifo.png']}")[0] == 404
        assert time.monotonic() - t0 < 10


def test_media_ranges_are_read_from_the_checked_file(site: Site) -> None:
    data = (site.media / "red.png").read_bytes()
    file_id = site.ids[b"red.png"]
    for header, status, want in (
        ("bytes=10-19", 206, data[10:20]),
        ("bytes=-7", 206, data[-7:]),
        (f"bytes=5-{len(data) + 100}", 206, data[5:]),
        ("bytes=0-", 206, data),
        ("bytes=0-1,5-6", 200, data),  # several ranges: the whole file
        ("items=0-1", 200, data),
    ):
        got, headers, body = request(site, "GET", f"/api/media/{file_id}", headers={"Range": header})
        assert (got, body) == (status, want), header
        assert headers["content-length"] == str(len(want))
    got, headers, _ = request(site, "GET", f"/api/media/{file_id}", headers={"Range": f"bytes={len(data)}-"})
    assert got == 416 and headers["content-range"] == f"bytes */{len(data)}"


# --- 6. names that are not UTF-8 -------------------------------------------------------------------------
def test_non_utf8_names_are_answered_with_their_exact_bytes(site: Site) -> None:
    file_id = site.ids[ODD_NAME]
    exact = os.path.join(os.fsencode(site.media), ODD_NAME)
    status, _, body = request(site, "GET", "/api/search?q=green&target=images&k=20")
    assert status == 200, body[:300]
    hit = next(h for h in json.loads(body)["hits"] if h["file_id"] == file_id)
    assert base64.b64decode(hit["path_b64"]) == exact
    assert hit["path"] == exact.decode("utf-8", "replace") and hit["name"] == "caf\ufffd-odd.png"
    status, _, body = request(site, "GET", f"/api/items/{file_id}")
    assert status == 200, body[:300]
    item = json.loads(body)
    assert base64.b64decode(item["path_b64"]) == exact and item["name"] == "caf\ufffd-odd.png"
    status, headers, body = request(site, "GET", f"/api/media/{file_id}")
    assert status == 200 and body == (site.media / "green.png").read_bytes()
    assert headers["content-type"] == "image/png"
    body, headers = multipart((site.media / "green.png").read_bytes(), "q.png")
    status, _, payload = request(
        site, "POST", "/api/search/image?target=images&k=20", headers=headers, body=body
    )
    assert status == 200 and any(h["file_id"] == file_id for h in json.loads(payload)["hits"])
    # The CLI's client decodes the same answer.
    hits = client.query_server(site.server, text="green", target="images", k=20)["hits"]
    assert any(base64.b64decode(h["path_b64"]) == exact for h in hits)


# --- 8. the background server runs nothing from the caller's folder --------------------------------------
EVIL_ARGPARSE = """
import importlib.util, pathlib, sys, sysconfig
pathlib.Path({marker!r}).write_text("imported from the caller's folder")
# Then behave as the real module, so that the server still starts and only the marker tells.
spec = importlib.util.spec_from_file_location("argparse", sysconfig.get_path("stdlib") + "/argparse.py")
module = importlib.util.module_from_spec(spec)
sys.modules["argparse"] = module
spec.loader.exec_module(module)
"""


@pytest.mark.slow
def test_background_server_ignores_modules_in_the_callers_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = tmp_path / "index"
    mmsearch.Index.create(index, model=TINY_MODEL, pretrained="random").close()
    cwd = tmp_path / "downloads"
    cwd.mkdir()
    marker = tmp_path / "marker"
    (cwd / "argparse.py").write_text(EVIL_ARGPARSE.format(marker=str(marker)))
    monkeypatch.chdir(cwd)
    running = client.start_server(Path(os.path.relpath(index, cwd)), idle_minutes=1, wait=120)
    try:
        assert running is not None, (index / client.SERVER_LOG).read_text()
        assert not marker.exists(), "the server imported argparse.py from the caller's folder"
        assert stat.S_IMODE((index / client.SERVER_LOG).stat().st_mode) == 0o600
        assert client.query_server(running, text="anything", k=1)["hits"] == []
    finally:
        with contextlib.suppress(OSError, ValueError):
            pid = json.loads((index / client.SERVER_FILE).read_text())["pid"]
            os.kill(pid, signal.SIGTERM)  # the server this test started
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                os.kill(pid, 0)  # ProcessLookupError (an OSError) once it is gone
                time.sleep(0.1)


# --- 9. binding beyond loopback is announced ---------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10"])
def test_python_m_server_warns_when_listening_beyond_loopback(tmp_path: Path, host: str) -> None:
    # An index that does not exist: the server stops right after its start-up messages, binding nothing.
    result = subprocess.run(
        [sys.executable, "-m", "mmsearch.server", str(tmp_path / "none"), "--host", host, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        # The mmsearch under test, wherever it is imported from here.
        env={**os.environ, "PYTHONPATH": str(Path(mmsearch.__file__).parents[1])},
    )
    assert result.returncode == 1
    assert f"WARNING mmsearch.server: listening on {host}" in result.stderr, result.stderr
    assert "token" in result.stderr and "TLS" in result.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_loopback_hosts_need_no_warning(host: str) -> None:
    assert server.exposure_warning(host) is None
