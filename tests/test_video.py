"""Video decoding (mmsearch.video) and the demo videos (mmsearch.demo.videos): keyframes at scene changes and
intervals, upright pictures, and hostile files that end in keyframes or a BadMediaError with a reason, never
a hang or a crash."""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from mmsearch import video
from mmsearch.audio import TimeBudget, load_pcm
from mmsearch.demo.videos import DEMO_VIDEOS, Scene, make_video, write_demo_videos
from mmsearch.demo.world import BACKGROUNDS, COLOURS, Attributes
from mmsearch.errors import BadMediaError


def _budget() -> TimeBudget:
    return TimeBudget(20.0, what="test decoding")  # far above what any of these files needs: a hang fails


def _kept(path: Path, **kwargs: object) -> tuple[list[video.Keyframe], video.KeyframeStream]:
    stream = video.keyframes(path, budget=_budget(), **kwargs)  # type: ignore[arg-type]
    return list(stream), stream


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 30) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def _share_of_colour(image, rgb: tuple[int, int, int], tol: int = 45) -> float:
    px = np.asarray(image.convert("RGB")).astype(int)
    return float((np.abs(px - np.array(rgb)).max(axis=2) <= tol).mean())


def _write_raw(
    path: Path,
    frames: list[tuple[float, np.ndarray]],
    *,
    rotation: int = 0,
    hflip: bool = False,
    codec: str = "libx264",
    gop: int = 12,
    audio: bool = False,
) -> Path:
    """Frames (time in seconds, RGB array) at exact times (variable frame rate), optionally a display matrix."""
    container = av.open(str(path), "w")
    h, w = frames[0][1].shape[:2]
    stream = container.add_stream(codec, rate=25)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
    stream.codec_context.gop_size = gop
    audio = _add_tone(container) if audio else None
    if rotation or hflip:
        stream.set_display_rotation(rotation, hflip=hflip)
    for t, pixels in frames:
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        frame.pts = round(t * 1000)
        frame.time_base = Fraction(1, 1000)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    if audio is not None:
        _encode_tone(container, audio, 1.0)
    container.close()
    return path


def _add_tone(container: av.container.OutputContainer) -> av.audio.stream.AudioStream:
    return container.add_stream("aac", rate=16000, layout="mono")


def _encode_tone(
    container: av.container.OutputContainer, astream: av.audio.stream.AudioStream, seconds: float
) -> None:
    n = astream.codec_context.frame_size or 1024
    tone = (0.3 * np.sin(np.arange(int(seconds * 16000)) * 2 * np.pi * 440 / 16000)).astype(np.float32)
    for i in range(0, tone.size - n + 1, n):
        frame = av.AudioFrame.from_ndarray(tone[i : i + n].reshape(1, -1), format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 16000, i, Fraction(1, 16000)
        for packet in astream.encode(frame):
            container.mux(packet)
    for packet in astream.encode():
        container.mux(packet)


def _halves(w: int, h: int, left: tuple[int, int, int], right: tuple[int, int, int]) -> np.ndarray:
    px = np.zeros((h, w, 3), np.uint8)
    px[:, : w // 2] = left
    px[:, w // 2 :] = right
    return px


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return make_video(
        tmp_path_factory.mktemp("video") / "shapes.mp4", DEMO_VIDEOS["shapes_1.mp4"], narrate=False
    )


# ---------------------------------------------------------------------------------------------- demo video


def test_demo_keyframes_mark_each_scene_with_its_colours(demo) -> None:
    kept, stream = _kept(demo.path)
    assert stream.truncated is None
    assert kept[0].reason == "first" and kept[0].time == 0.0
    for scene in demo.scenes:
        at = [k for k in kept if scene.start <= k.time < min(scene.start + video.DEFAULT_INTERVAL, scene.end)]
        assert at, f"no keyframe within the scene starting at {scene.start}"
        k = at[0]
        assert k.time - scene.start <= 2.0  # the demo's GOP is 2 s
        if scene.start > 0:
            assert k.reason == "scene"
        # The picture is this scene's: its background at a corner, its shape's colour on a fair share of it.
        assert _close(k.image.getpixel((1, 1)), BACKGROUNDS[scene.attributes.background])
        assert _share_of_colour(k.image, COLOURS[scene.attributes.colour]) > 0.03
        assert k.image.mode == "RGB" and k.image.size == (256, 256)


def test_keyframe_only_decoding_decodes_only_keyframes(demo) -> None:
    _, stream = _kept(demo.path)
    assert stream.stats["full_gops"] == 0
    assert stream.stats["decoded"] == stream.stats["gops"] < stream.stats["packets"] / 5
    assert stream.duration == pytest.approx(demo.duration, abs=0.15)


def test_probe_describes_a_video_only_file(demo) -> None:
    info = video.probe(demo.path, budget=_budget())
    assert info.has_video and not info.has_audio and info.audio_codec is None
    assert (info.width, info.height, info.rotation, info.codec) == (256, 256, 0, "h264")
    assert info.fps == pytest.approx(10.0)
    assert info.duration == pytest.approx(12.0, abs=0.15) and not info.truncated


def test_make_video_is_deterministic(tmp_path: Path) -> None:
    scenes = DEMO_VIDEOS["shapes_2.mp4"]
    a = make_video(tmp_path / "a.mp4", scenes, narrate=False, seed=3)
    b = make_video(tmp_path / "b.mp4", scenes, narrate=False, seed=3)
    assert a.scenes == b.scenes
    assert a.path.read_bytes() == b.path.read_bytes()
    assert [s.start for s in a.scenes] == [0.0, 4.0, 6.0] and a.scenes[1].attributes is None


def test_long_gop_gets_interval_frames_by_decoding_it(tmp_path: Path) -> None:
    scenes = [
        Scene(Attributes("red", "circle", "large", 1, "white"), duration=13.0, background="white"),
        Scene(Attributes("green", "triangle", "large", 1, "black"), duration=12.0, background="black"),
    ]
    truth = make_video(tmp_path / "long.mp4", scenes, narrate=False, gop=10_000)
    kept, stream = _kept(truth.path, interval=5.0)
    times = [k.time for k in kept]
    assert stream.stats["full_gops"] >= 1
    assert max(np.diff(times + [truth.duration])) <= 5.0 + 0.11
    assert any(k.reason == "scene" and 13.0 <= k.time <= 13.5 for k in kept)
    green = next(k for k in kept if k.time >= 13.0)
    assert _share_of_colour(green.image, COLOURS["green"]) > 0.03


def test_write_demo_videos(tmp_path: Path) -> None:
    truths = write_demo_videos(tmp_path, narrate=False)
    assert [t.path.name for t in truths] == list(DEMO_VIDEOS)
    assert all(t.path.parent == tmp_path / "videos" and t.path.stat().st_size > 0 for t in truths)


def test_narration_is_timed_with_its_scene(tmp_path: Path) -> None:
    pytest.importorskip("piper")
    truth = make_video(tmp_path / "spoken.mp4", DEMO_VIDEOS["shapes_1.mp4"], narrate=True)
    info = video.probe(truth.path, budget=_budget())
    assert info.has_audio and info.audio_codec == "aac"
    assert truth.scenes[1].narration == "A green triangle appears."
    pcm = load_pcm(truth.path)
    rate = 16000

    def rms(a: float, b: float) -> float:
        return float(np.sqrt(np.mean(pcm[int(a * rate) : int(b * rate)] ** 2)))

    for scene in truth.scenes:
        assert scene.start < scene.speech_start < scene.speech_end < scene.end
        assert rms(scene.speech_start, scene.speech_end) > 0.02  # speech where the truth says
        assert rms(scene.start, scene.start + 0.25) < 0.003  # silence before it
        assert rms(scene.speech_end + 0.1, scene.end - 0.05) < 0.003  # and after it


# --------------------------------------------------------------------------------------------- orientation


@pytest.mark.parametrize(
    ("rotation", "hflip", "size", "red_at", "blue_at"),
    [
        (0, False, (64, 32), (2, 16), (61, 16)),
        (90, False, (32, 64), (16, 61), (16, 2)),  # 90 degrees counter-clockwise: the left side goes down
        (-90, False, (32, 64), (16, 2), (16, 61)),
        (180, False, (64, 32), (61, 16), (2, 16)),
        (0, True, (64, 32), (61, 16), (2, 16)),  # mirrored (FFmpeg calls that matrix a 180-degree rotation)
        (90, True, (32, 64), (16, 61), (16, 2)),  # turned, then mirrored left to right
    ],
)
def test_rotated_video_comes_out_upright(tmp_path: Path, rotation, hflip, size, red_at, blue_at) -> None:
    frames = [(i / 25, _halves(64, 32, (230, 20, 20), (20, 20, 230))) for i in range(10)]
    path = _write_raw(tmp_path / "phone.mp4", frames, rotation=rotation, hflip=hflip)
    info = video.probe(path, budget=_budget())
    assert (info.width, info.height) == size and (info.coded_width, info.coded_height) == (64, 32)
    assert info.mirrored == hflip
    if not hflip:
        assert info.rotation == rotation
    (k,) = _kept(path)[0]
    assert k.image.size == size
    assert _close(k.image.getpixel(red_at), (230, 20, 20), 40)
    assert _close(k.image.getpixel(blue_at), (20, 20, 230), 40)


def test_longest_side_is_reduced_before_rotation(tmp_path: Path) -> None:
    frames = [(0.0, _halves(320, 160, (230, 20, 20), (20, 20, 230)))]
    path = _write_raw(tmp_path / "big.mp4", frames, rotation=90)
    (k,) = _kept(path, max_side=100)[0]
    assert k.image.size == (50, 100)


# ------------------------------------------------------------------------------------------- frame timing


def test_variable_frame_rate_times_are_the_frames_own(tmp_path: Path) -> None:
    red, blue = _halves(64, 64, (230, 20, 20), (230, 20, 20)), _halves(64, 64, (20, 20, 230), (20, 20, 230))
    times = [0.0, 0.04, 0.5, 0.51, 3.0, 3.02, 7.3, 7.34, 7.4, 9.9, 12.0]
    frames = [(t, red if t < 7.3 else blue) for t in times]
    path = _write_raw(tmp_path / "vfr.mkv", frames, gop=1)
    kept, stream = _kept(path, interval=5.0)
    # 3.0, the last frame looked at before 7.3 would be more than 5 s after 0.0; 12.0 is under 5 s after 7.3.
    assert [(k.time, k.reason) for k in kept] == [(0.0, "first"), (3.0, "interval"), (7.3, "scene")]
    assert stream.duration == pytest.approx(12.04, abs=0.02)
    assert stream.truncated is None


# ----------------------------------------------------------------------------------------------- hostile


def test_zero_length_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(BadMediaError, match="empty file"):
        video.probe(path)
    with pytest.raises(BadMediaError, match="empty file"):
        video.keyframes(path)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.mkv"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(BadMediaError, match="not a readable video file"):
        video.keyframes(path)


def test_audio_only_file_is_described_not_decoded(tmp_path: Path) -> None:
    path = tmp_path / "talk.mp4"
    container = av.open(str(path), "w")
    _encode_tone(container, _add_tone(container), 2.0)
    container.close()
    info = video.probe(path, budget=_budget())
    assert not info.has_video and info.has_audio and info.audio_codec == "aac"
    assert info.duration == pytest.approx(2.0, abs=0.15)
    with pytest.raises(BadMediaError, match="no video stream"):
        video.keyframes(path)


def test_video_with_audio(tmp_path: Path) -> None:
    frames = [(i / 25, _halves(64, 32, (230, 20, 20), (20, 20, 230))) for i in range(25)]
    path = _write_raw(tmp_path / "av.mp4", frames, audio=True)
    info = video.probe(path, budget=_budget())
    assert info.has_video and info.has_audio
    assert len(_kept(path)[0]) == 1


def test_truncated_mp4_without_its_index_is_refused(demo, tmp_path: Path) -> None:
    data = demo.path.read_bytes()
    assert data.find(b"moov") > data.find(b"mdat")  # PyAV writes the index last: cut, it is gone
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadMediaError, match="not a readable video file"):
        video.keyframes(path)


def test_truncated_stream_yields_what_decodes_and_says_so(demo, tmp_path: Path) -> None:
    mkv = make_video(tmp_path / "whole.mkv", DEMO_VIDEOS["shapes_1.mp4"], narrate=False)
    data = mkv.path.read_bytes()
    path = tmp_path / "cut.mkv"
    path.write_bytes(data[: int(len(data) * 0.6)])
    kept, stream = _kept(path)
    assert kept and kept[0].reason == "first"
    assert max(k.time for k in kept) < 12.0
    assert stream.truncated is not None and "header says 12.0 s" in stream.truncated
    assert video.probe(path, budget=_budget()).truncated


def test_header_claiming_hours_does_not_plan_hours(tmp_path: Path) -> None:
    truth = make_video(tmp_path / "honest.mkv", DEMO_VIDEOS["shapes_1.mp4"], narrate=False)
    data = bytearray(truth.path.read_bytes())
    at = data.find(b"\x44\x89\x88")  # Matroska's Duration element (milliseconds, 8-byte float)
    assert struct.unpack(">d", data[at + 3 : at + 11]) == (12000.0,)
    data[at + 3 : at + 11] = struct.pack(">d", 3 * 3600 * 1000.0)
    path = tmp_path / "liar.mkv"
    path.write_bytes(bytes(data))
    info = video.probe(path, budget=TimeBudget(5.0))
    assert info.claimed_duration == pytest.approx(10800.0)
    assert info.duration == pytest.approx(12.0, abs=0.15) and info.truncated
    kept, stream = _kept(path)
    assert [k.time for k in kept] == [0.0, 4.0, 8.0]
    assert stream.duration == pytest.approx(12.0, abs=0.15)
    assert stream.truncated == "the video ends at 12.0 s; the file's header says 10800.0 s"


def test_frames_over_the_pixel_budget_are_refused_before_decoding(demo) -> None:
    with pytest.raises(BadMediaError, match="video frames too large: 256x256"):
        video.keyframes(demo.path, max_pixels=256 * 255)
    with pytest.raises(BadMediaError, match="video frames too large"):
        video.probe(demo.path, max_pixels=1000)


def test_8k_video_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "8k.mp4"
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=1)
    stream.width, stream.height, stream.pix_fmt = 7680, 4320, "yuv420p"
    stream.codec_context.options = {"preset": "ultrafast"}
    frame = av.VideoFrame.from_ndarray(np.zeros((4320 * 3 // 2, 7680), np.uint8), format="yuv420p")
    frame.pts = 0
    for packet in [*stream.encode(frame), *stream.encode()]:
        container.mux(packet)
    container.close()
    with pytest.raises(BadMediaError, match=r"7680x4320 pixels \(33.2 Mpx\) is over the budget of 22.4 Mpx"):
        video.keyframes(path)
    with pytest.raises(BadMediaError, match="too large"):
        video.probe(path)


def test_time_budget_stops_decoding(demo) -> None:
    stream = video.keyframes(demo.path, budget=TimeBudget(0.0, what="video decoding"))
    with pytest.raises(BadMediaError, match="video decoding took longer"):
        list(stream)


def test_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(BadMediaError, match="cannot read file"):
        video.probe(tmp_path / "missing.mp4")


def test_bad_arguments_are_errors_of_the_caller(demo) -> None:
    with pytest.raises(ValueError):
        video.keyframes(demo.path, interval=0)


def test_frame_size_growing_mid_stream_is_refused(tmp_path: Path) -> None:
    small = [(i / 25, _halves(64, 64, (230, 20, 20), (20, 20, 230))) for i in range(5)]
    large = [(i / 25, _halves(256, 256, (230, 20, 20), (20, 20, 230))) for i in range(5)]
    a = _write_raw(tmp_path / "a.ts", small)
    b = _write_raw(tmp_path / "b.ts", large)
    path = tmp_path / "joined.ts"  # MPEG-TS files concatenate: the second part brings a new frame size
    path.write_bytes(a.read_bytes() + b.read_bytes())
    stream = video.keyframes(path, budget=_budget(), max_pixels=64 * 64 * 2)
    with pytest.raises(BadMediaError, match="the size changes to 256x256 pixels"):
        list(stream)
