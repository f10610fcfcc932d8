"""Videos indexed end to end on the demo model: keyframes and the spoken track become moments that text,
image and voice queries find; one result per video (its other moments folded under it); incremental like
everything else; Live Photos are one item; hostile videos skipped with their reason while the run goes on.

Real videos made by PyAV (mmsearch.demo.videos: demo-world shapes appearing, narrated by the Piper voice),
real Whisper tiny.en for the spoken track, real SQLite, FAISS and OpenCLIP code."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import mmsearch
from mmsearch.demo import world
from mmsearch.demo.videos import DEMO_VIDEOS, Scene, VideoTruth, make_video, write_demo_videos
from mmsearch.video import DEFAULT_INTERVAL
from tests.conftest import solid
from tests.test_ingest import assert_consistent

pytestmark = pytest.mark.speech  # the spoken track goes through Whisper tiny.en


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[VideoTruth]]:
    folder = tmp_path_factory.mktemp("media")
    return folder, write_demo_videos(folder)


@pytest.fixture(scope="module")
def indexed(
    videos: tuple[Path, list[VideoTruth]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[mmsearch.Index]:
    folder, _ = videos
    idx = mmsearch.Index.create(tmp_path_factory.mktemp("idx") / "index", model="demo")
    report = idx.add_folder(folder)
    assert report.videos_indexed == 2 and not report.skipped and not report.partial
    assert report.frames_embedded >= 6 and report.segments_embedded >= 4
    yield idx
    idx.close()


def moment(truths: list[VideoTruth], name: str, colour: str, shape: str) -> float:
    """When ``colour`` ``shape`` appears in video ``name``."""
    truth = next(t for t in truths if t.path.name == name)
    return next(
        s.start
        for s in truth.scenes
        if s.attributes is not None and (s.attributes.colour, s.attributes.shape) == (colour, shape)
    )


SHOWN = [
    ("shapes_1.mp4", "red", "circle"),
    ("shapes_1.mp4", "green", "triangle"),
    ("shapes_1.mp4", "blue", "square"),
    ("shapes_2.mp4", "yellow", "star"),
]


@pytest.mark.parametrize(("name", "colour", "shape"), SHOWN)
def test_text_finds_the_moment(
    indexed: mmsearch.Index, videos: tuple[Path, list[VideoTruth]], name: str, colour: str, shape: str
) -> None:
    result = indexed.search(f"a {colour} {shape}", target="video", k=3)
    best = result.hits[0]
    assert Path(best.path).name == name and best.file_kind == "video"
    appears = moment(videos[1], name, colour, shape)
    # The best moment, or one folded under it, is within one keyframe interval of the appearance.
    times = [best.start] + [m["start"] for m in best.moments]
    assert any(t is not None and appears - 0.5 <= t <= appears + DEFAULT_INTERVAL for t in times), times
    # One result per video: its other moments are folded under the best one.
    assert len({h.file_id for h in result.hits}) == len(result.hits)


def test_an_image_finds_the_frame(
    indexed: mmsearch.Index, videos: tuple[Path, list[VideoTruth]], tmp_path: Path
) -> None:
    import random

    query = world.render(world.Attributes("green", "triangle", "large", 1, "gray"), random.Random(7))
    query.save(tmp_path / "q.png")
    hits = indexed.search(image=tmp_path / "q.png", target="video", k=2, min_confidence=0).hits
    assert hits[0].kind == "frame" and Path(hits[0].path).name == "shapes_1.mp4"
    assert abs(hits[0].start - moment(videos[1], "shapes_1.mp4", "green", "triangle")) <= DEFAULT_INTERVAL


@pytest.mark.parametrize(
    ("said", "name", "colour", "shape"),
    [
        ("a green triangle", "shapes_1.mp4", "green", "triangle"),
        ("a yellow star", "shapes_2.mp4", "yellow", "star"),
    ],
)
def test_a_spoken_query_finds_the_moment(
    indexed: mmsearch.Index,
    videos: tuple[Path, list[VideoTruth]],
    said: str,
    name: str,
    colour: str,
    shape: str,
) -> None:
    from tests._speech import speech_wav

    result = indexed.search(audio=speech_wav(said), target="video", k=2)
    assert result.hits and Path(result.hits[0].path).name == name, result.transcript
    best = result.hits[0]
    appears = moment(videos[1], name, colour, shape)
    times = [best.start] + [m["start"] for m in best.moments]
    assert any(t is not None and appears - 0.5 <= t <= appears + DEFAULT_INTERVAL for t in times), times


def test_images_and_audio_targets_are_as_before(indexed: mmsearch.Index) -> None:
    assert indexed.search("a red circle", target="images", k=3, min_confidence=0).hits == []
    assert {h.kind for h in indexed.search("a red circle", target="all", k=10, min_confidence=0).hits} <= {
        "frame",
        "segment",
    }
    # The spoken track is audio too: its segments answer --target audio.
    said = indexed.search("a green triangle appears", target="audio", k=3, min_confidence=0).hits
    assert said and said[0].kind == "segment" and said[0].file_kind == "video"


def test_status_and_kind_filter(indexed: mmsearch.Index) -> None:
    stats = indexed.stats()
    assert stats["vectors"]["frame"] >= 6
    assert indexed.search("a red circle", target="all", kind="image", k=3, min_confidence=0).hits == []
    assert indexed.search("a red circle", target="all", kind="video", k=3, min_confidence=0).hits


def test_renamed_re_encoded_and_removed_videos(tmp_path: Path) -> None:
    folder = tmp_path / "media"
    scenes = DEMO_VIDEOS["shapes_1.mp4"][:2]
    make_video(folder / "a.mp4", scenes, narrate=False)
    solid(folder / "keep.png")  # (a folder left empty would be kept as an unplugged drive)
    with mmsearch.Index.create(tmp_path / "index", model="demo") as idx:
        first = idx.add_folder(folder)
        assert first.videos_indexed == 1 and first.frames_embedded >= 2
        os.rename(folder / "a.mp4", folder / "b.mp4")
        moved = idx.add_folder(folder)
        assert moved.linked == 1 and moved.videos_indexed == 0 and moved.frames_embedded == 0
        # Trimmed (the first scene only): new content, embedded again; the old content leaves.
        make_video(folder / "b.mp4", scenes[:1], narrate=False)
        trimmed = idx.add_folder(folder)
        assert trimmed.videos_indexed == 1
        assert idx.stats()["vectors"]["frame"] == trimmed.frames_embedded
        os.remove(folder / "b.mp4")
        idx.add_folder(folder)
        assert idx.stats()["vectors"].get("frame", 0) == 0
        assert_consistent(idx)


def test_a_live_photo_is_one_item(tmp_path: Path) -> None:
    folder = tmp_path / "media"
    folder.mkdir()
    import random

    world.render(world.Attributes("red", "circle", "large", 1, "white"), random.Random(1)).save(
        folder / "IMG_1.jpg"
    )
    make_video(
        folder / "IMG_1.MOV",
        [Scene(world.Attributes("red", "circle", "large", 1, "white"), duration=2.0)],
        narrate=False,
    )
    with mmsearch.Index.create(tmp_path / "index", model="demo") as idx:
        report = idx.add_folder(folder)
        assert report.images_embedded == 1 and report.videos_indexed == 0
        assert [(Path(p).name, r) for p, r in report.excluded] == [
            ("IMG_1.MOV", "Live Photo video, part of the photo IMG_1.jpg")
        ]


def test_hostile_videos_are_skipped_with_reasons_and_the_run_goes_on(tmp_path: Path) -> None:
    folder = tmp_path / "media"
    good = make_video(folder / "good.mp4", DEMO_VIDEOS["shapes_1.mp4"][:1], narrate=False)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "garbage.mkv").write_bytes(os.urandom(4096))
    data = good.path.read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 3])
    shutil.copy(good.path, folder / "renamed.webm")  # an mp4 named .webm: read by content
    with mmsearch.Index.create(tmp_path / "index", model="demo") as idx:
        report = idx.add_folder(folder)
        skipped = {Path(p).name: r for p, r in report.skipped}
        assert set(skipped) >= {"empty.mp4", "garbage.mkv"}, skipped
        assert "empty" in skipped["empty.mp4"]
        indexed = {Path(p).name for p in ("good.mp4", "renamed.webm")}
        hits = idx.search("a red circle", target="video", k=5, min_confidence=0).hits
        assert indexed <= {Path(h.path).name for h in hits} | {"renamed.webm"}  # same content: one item
        # A truncated file is indexed with what decodes, or skipped with a reason: never a crash.
        assert (
            "truncated.mp4" in skipped
            or any("truncated.mp4" in p for p, _ in report.partial)
            or any(Path(h.path).name == "truncated.mp4" for h in hits)
        )
        assert_consistent(idx)


def test_a_new_model_embeds_the_keyframes_again(tmp_path: Path) -> None:
    """reembed decodes each video's keyframes again (the same choice as indexing) for the new model; the
    index switches only once every keyframe has its vector, and search finds the moment with it."""
    from mmsearch.identity import ModelSpec
    from tests.conftest import TINY_MODEL

    folder = tmp_path / "media"
    make_video(folder / "a.mp4", DEMO_VIDEOS["shapes_1.mp4"], narrate=False)
    solid(folder / "keep.png")
    with mmsearch.Index.create(tmp_path / "index", model=TINY_MODEL, pretrained="random") as idx:
        first = idx.add_folder(folder)
        report = idx.reembed(ModelSpec("demo"))
        assert report.activated and report.frames == first.frames_embedded and not report.skipped
        assert idx.stats()["vectors"]["frame"] == first.frames_embedded
        hit = idx.search("a blue square", target="video", k=1).hits[0]
        times = [hit.start] + [m["start"] for m in hit.moments]
        assert any(7.5 <= t <= 8.0 + DEFAULT_INTERVAL for t in times if t is not None), times
        assert_consistent(idx)


def test_a_video_is_found_by_its_file_name(indexed: mmsearch.Index) -> None:
    hits = indexed.search("shapes_2", target="video", mode="words", k=3).hits
    assert hits and Path(hits[0].path).name == "shapes_2.mp4" and hits[0].kind in ("frame", "segment")
