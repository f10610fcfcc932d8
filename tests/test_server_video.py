"""`mmsearch serve` and video (issue 14): a moment's keyframe thumbnail, the video served with byte ranges
as its container's MIME type, a video item's keyframe times, and the `at` parameter validated.

A real uvicorn server over real sockets (as tests/test_server.py), on an index of the demo model with short
generated videos (no narration: the speech path has its own tests) and one image.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmsearch
from mmsearch import client, routes
from mmsearch.demo.videos import Scene, VideoTruth, make_video
from mmsearch.demo.world import BACKGROUNDS, COLOURS, Attributes
from mmsearch.search import Hit
from tests.conftest import solid
from tests.test_server import send, start

# Three shots, each a cut (new shape, new background): the frame shown at a time tells which shot it is.
SCENES = (
    Scene(Attributes("red", "circle", "large", 1, "white"), duration=3.0, background="white"),
    Scene(Attributes("green", "square", "large", 1, "black"), duration=3.0, background="black"),
    Scene(Attributes("blue", "triangle", "large", 1, "gray"), duration=3.0, background="gray"),
)
SHORT = (Scene(Attributes("yellow", "star", "large", 1, "black"), duration=1.5, background="black"),)
MIME = {"clip.mp4": "video/mp4", "short.webm": "video/webm", "short.mov": "video/quicktime"}


@dataclass
class Site:
    host: str
    port: int
    token: str
    index: Path
    media: Path
    truth: VideoTruth  # of clip.mp4
    ids: dict[str, int]  # file name -> file id


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("video-server")
    media = root / "media"
    truth = make_video(media / "clip.mp4", SCENES, narrate=False)
    for name in ("short.webm", "short.mov"):
        make_video(media / name, SHORT, narrate=False)
    solid(media / "photo.png", "red")
    index = root / "index"
    with mmsearch.Index.create(index, model="demo") as idx:
        report = idx.add_folder(media)
        assert not report.skipped, report.skipped
        ids = {
            os.path.basename(key).decode(): row.id for key, row in idx.store.catalog.files_by_key().items()
        }
    _, thread, stop = start(index)
    info = json.loads((index / client.SERVER_FILE).read_text())
    host, port = info["url"].removeprefix("http://").rsplit(":", 1)
    yield Site(host, int(port), info["token"], index, media, truth, ids)
    stop.set()
    thread.join(30)


def get(site: Site, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return send(site.host, site.port, site.token, "GET", path, headers=headers)


def get_json(site: Site, path: str) -> object:
    status, _, body = get(site, path)
    assert status == 200, (path, status, body[:300])
    return json.loads(body)


def jpeg(body: bytes) -> Image.Image:
    with Image.open(io.BytesIO(body)) as im:
        assert im.format == "JPEG"
        return im.convert("RGB")


def share_near(image: Image.Image, colour: tuple[int, int, int], tolerance: int = 60) -> float:
    """The share of ``image``'s pixels within ``tolerance`` (per channel) of ``colour``."""
    pixels = np.asarray(image, np.int16).reshape(-1, 3)
    return float(np.mean(np.all(np.abs(pixels - np.asarray(colour)) <= tolerance, axis=1)))


def dominant(image: Image.Image) -> tuple[int, int, int]:
    """The most common colour, on a coarse grid (JPEG noise and the shapes' jitter fall in one cell)."""
    counts = image.quantize(colors=8, method=Image.Quantize.MEDIANCUT).convert("RGB").getcolors(1 << 16)
    assert counts
    return max(counts)[1]


def assert_shows_scene(image: Image.Image, truth: VideoTruth, t: float) -> None:
    """``image`` is the picture of the shot on screen at ``t``: its background dominates and its shape's
    colour is there; the other shots' shape colours are not."""
    scene = truth.scene_at(t)
    assert scene.attributes is not None
    background = BACKGROUNDS[scene.attributes.background]
    assert all(abs(a - b) <= 40 for a, b in zip(dominant(image), background)), (
        t,
        dominant(image),
        background,
    )
    assert share_near(image, COLOURS[scene.attributes.colour]) > 0.03, (t, scene.attributes)
    for other in truth.scenes:
        if other.attributes is not None and other.attributes.colour != scene.attributes.colour:
            assert share_near(image, COLOURS[other.attributes.colour]) < 0.01, (t, other.attributes.colour)


def test_video_hits_thumbnails_show_the_scene_at_their_time(site: Site) -> None:
    found = get_json(site, "/api/search?q=a+green+square&target=video&k=10")
    hits = found["hits"]  # type: ignore[index]
    assert hits and all(h["file_kind"] == "video" for h in hits)
    best = hits[0]
    assert best["file_id"] == site.ids["clip.mp4"] and best["kind"] == "frame"
    assert best["start"] == best["end"] and site.truth.scene_at(best["start"]).attributes.colour == "green"
    assert best["media"] == f"/api/media/{site.ids['clip.mp4']}"
    assert best["item"] == f"/api/items/{site.ids['clip.mp4']}"
    assert isinstance(best["moments"], list)
    moments = [(h["thumb"], h["start"]) for h in hits if h["file_id"] == site.ids["clip.mp4"]]
    moments += [
        (m["thumb"], m["start"]) for h in hits for m in h["moments"] if h["file_id"] == best["file_id"]
    ]
    assert {site.truth.scene_at(t).attributes.colour for _, t in moments} == {"red", "green", "blue"}
    for thumb, t in moments:
        assert thumb.startswith(f"/api/thumbs/{site.ids['clip.mp4']}?at=")
        status, headers, body = get(site, thumb)
        assert status == 200 and headers["content-type"] == "image/jpeg", (thumb, status, body[:200])
        image = jpeg(body)
        assert max(image.size) == 256
        assert_shows_scene(image, site.truth, t)


def test_a_time_between_keyframes_shows_the_frame_on_screen_then(site: Site) -> None:
    file_id = site.ids["clip.mp4"]
    item = get_json(site, f"/api/items/{file_id}")
    assert item["kind"] == "video" and item["thumb"] == f"/api/thumbs/{file_id}"  # type: ignore[index]
    times = item["frames"]  # type: ignore[index]
    assert times == sorted(times) and times[0] == 0.0 and len(times) >= 3
    assert item["duration"] == pytest.approx(site.truth.duration, abs=0.2)  # type: ignore[index]
    by_time = {t: get(site, f"/api/thumbs/{file_id}?at={t!r}")[2] for t in times}
    assert len(set(by_time.values())) == len(times), "each keyframe has its own thumbnail"
    assert get(site, f"/api/thumbs/{file_id}")[2] == by_time[0.0], "a video's own thumbnail: its first frame"
    for before, after in zip(times, [*times[1:], times[-1] + 1000.0]):
        middle = (before + after) / 2
        assert get(site, f"/api/thumbs/{file_id}?at={middle}")[2] == by_time[before], middle
        assert_shows_scene(jpeg(by_time[before]), site.truth, before)
    assert get(site, f"/api/thumbs/{file_id}?at=0")[2] == by_time[0.0]


def test_segment_and_folded_moments_get_the_nearest_keyframe(site: Site) -> None:
    """A spoken segment of a video, and the moments folded under a video's best hit, are shown by the
    keyframe on screen when they start (no narration here: the hits are made up, the catalog is real)."""
    file_id = site.ids["clip.mp4"]
    path = str(site.media / "clip.mp4")
    segment = Hit(1, 0.5, "segment", path, "a green square appears", 4.6, 5.9, 99, file_id, file_kind="video")
    moments = (
        {"kind": "frame", "start": 0.0, "end": 0.0, "score": 0.3, "item_id": 1},
        {"kind": "segment", "start": 7.1, "end": 8.0, "score": 0.2, "item_id": 98},
    )
    frame = Hit(2, 0.4, "frame", path, None, 4.0, 4.0, 2, file_id, file_kind="video", moments=moments)
    photo = Hit(3, 0.1, "image", str(site.media / "photo.png"), None, None, None, 3, site.ids["photo.png"])
    with mmsearch.Index.open(site.index) as idx:
        out = routes.Service(idx).hits_out([segment, frame, photo])
    assert out[0]["thumb"] == f"/api/thumbs/{file_id}?at=4.6"
    assert [m["thumb"] for m in out[1]["moments"]] == [f"/api/thumbs/{file_id}?at={t}" for t in (0.0, 7.1)]
    assert out[2]["thumb"] == f"/api/thumbs/{site.ids['photo.png']}" and out[2]["moments"] == []
    for thumb, t in ((out[0]["thumb"], 4.6), *((m["thumb"], m["start"]) for m in out[1]["moments"])):
        status, _, body = get(site, thumb)
        assert status == 200
        assert_shows_scene(jpeg(body), site.truth, t)
    routes.HitOut.model_validate(out[1])  # the response model keeps the moments and their thumbnails
    assert routes.HitOut.model_validate(out[1]).model_dump()["moments"][1]["thumb"].endswith("?at=7.1")


@pytest.mark.parametrize("name", sorted(MIME))
def test_media_serves_videos_with_their_type_and_byte_ranges(site: Site, name: str) -> None:
    data = (site.media / name).read_bytes()
    path = f"/api/media/{site.ids[name]}"
    status, headers, body = get(site, path)
    assert status == 200 and body == data and headers["content-type"] == MIME[name]
    assert headers["accept-ranges"] == "bytes" and "sandbox" in headers["content-security-policy"]
    # What a browser's <video> asks first, then a seek into the middle, then the end (an MP4 index).
    status, headers, body = get(site, path, {"Range": "bytes=0-"})
    assert (
        status == 206 and body == data and headers["content-range"] == f"bytes 0-{len(data) - 1}/{len(data)}"
    )
    a, b = len(data) // 3, 2 * len(data) // 3
    status, headers, body = get(site, path, {"Range": f"bytes={a}-{b - 1}"})
    assert status == 206 and body == data[a:b] and headers["content-length"] == str(b - a)
    assert headers["content-type"] == MIME[name]
    status, _, body = get(site, path, {"Range": "bytes=-512"})
    assert status == 206 and body == data[-512:]
    assert get(site, path, {"Range": f"bytes={len(data)}-"})[0] == 416


@pytest.mark.parametrize(
    "at",
    ["-1", "-0.001", "nan", "NaN", "inf", "-inf", "1e309", "abc", "", "1,5", "0x10", str(routes.MAX_AT + 1)],
)
def test_bad_times_are_4xx(site: Site, at: str) -> None:
    status, headers, body = get(site, f"/api/thumbs/{site.ids['clip.mp4']}?at={at}")
    assert 400 <= status < 500 and headers["content-type"] == "application/json", (at, status)
    assert b"clip" not in body and str(site.media).encode() not in body


def test_at_on_a_file_that_is_not_a_video_shows_nothing(site: Site) -> None:
    photo = site.ids["photo.png"]
    assert get(site, f"/api/thumbs/{photo}")[0] == 200  # its own thumbnail, as before
    for at in ("0", "4.0", "1000"):
        status, headers, body = get(site, f"/api/thumbs/{photo}?at={at}")
        assert status == 404 and headers["content-type"] == "application/json"
        detail = json.loads(body)["detail"]
        assert "photo" not in detail and str(site.media) not in detail and "clip" not in detail
    missing = max(site.ids.values()) + 100
    assert get(site, f"/api/thumbs/{missing}?at=1")[0] == 404
    item = get_json(site, f"/api/items/{photo}")
    assert item["frames"] == []  # type: ignore[index]


def test_a_changed_video_shows_no_frames(site: Site) -> None:
    """A frame thumbnail only for a file still the one indexed: a video changed on disk shows none."""
    path = site.media / "short.mov"
    file_id = site.ids["short.mov"]
    assert get(site, f"/api/thumbs/{file_id}?at=0")[0] == 200
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        for url in (f"/api/thumbs/{file_id}?at=0", f"/api/thumbs/{file_id}", f"/api/media/{file_id}"):
            assert get(site, url)[0] == 404, url
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert get(site, f"/api/thumbs/{file_id}?at=0")[0] == 200


def test_missing_saved_frame_thumbnail_is_404(site: Site) -> None:
    from mmsearch.ingest_video import frame_thumb_path

    file_id = site.ids["short.webm"]
    with mmsearch.Index.open(site.index) as idx:
        sha = idx.store.catalog.files_by_key()[os.fsencode(site.media / "short.webm")].sha256
        saved = frame_thumb_path(idx.store, sha, 0)
    assert get(site, f"/api/thumbs/{file_id}")[0] == 200
    kept = saved.read_bytes()
    saved.unlink()
    try:
        status, _, body = get(site, f"/api/thumbs/{file_id}")
        assert status == 404 and str(saved).encode() not in body
    finally:
        saved.write_bytes(kept)


def test_page_offers_video(site: Site) -> None:
    from importlib import resources

    html = resources.files("mmsearch.web").joinpath("index.html").read_bytes()
    assert b'<option value="video">' in html and b'id="f-kind-video"' in html
    status, _, js = get(site, "/app.js")
    assert status == 200 and b"f-kind-video" in js and b"#t=" in js and b"innerHTML" not in js
