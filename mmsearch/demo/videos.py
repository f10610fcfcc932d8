"""Short demo videos made from the demo world: shapes appearing and disappearing, with a spoken narration.

A video is a list of :class:`Scene`: each shows one world image (:func:`mmsearch.demo.world.render`), or
only a background when nothing is shown, for ``duration`` seconds; its shapes drift slowly so the encoder
sees motion, not a still. With ``narrate``, a sentence such as "A green triangle appears." is spoken by the
Piper voice (:mod:`mmsearch.tts`, deterministic) starting :data:`NARRATION_DELAY` seconds after its scene
starts, into the file's audio track. :class:`VideoTruth` records what appears when, for tests.

Everything is deterministic given ``seed``. Video is H.264 (libx264) in MP4/MOV/MKV/AVI and VP9 in WebM;
MPEG-4 Part 2 replaces H.264 where the FFmpeg in PyAV's wheel has no libx264. Audio is AAC (Opus in WebM).
"""

from __future__ import annotations

import random
import tempfile
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import cast

import av
import numpy as np

from mmsearch.demo.world import BACKGROUNDS, Attributes, describe, render

#: Seconds from a scene's start to the start of its narration.
NARRATION_DELAY = 0.3
AUDIO_RATE = 22050
DEFAULT_FPS = 10
DEFAULT_SIZE = 256
_DRIFT_PX = 6  # how far the shapes wander from their place, in pixels (well inside the world's margins)


@dataclass(frozen=True)
class Scene:
    """``attributes`` shown for ``duration`` seconds; ``None`` shows only the ``background`` (the shapes of
    the scene before have disappeared). ``narration`` defaults to "A <colour> <shape> appears."."""

    attributes: Attributes | None
    duration: float = 4.0
    narration: str | None = None
    background: str = "white"

    def sentence(self) -> str | None:
        if self.narration is not None:
            return self.narration or None
        if self.attributes is None:
            return None
        words = describe(
            self.attributes, phrasing="bare", stated=("count",) if self.attributes.count > 1 else ()
        )
        verb = "appear" if self.attributes.count > 1 else "appears"
        text = f"{words.text} {verb}."
        return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class SceneTruth:
    start: float
    end: float
    attributes: Attributes | None
    narration: str | None
    speech_start: float | None  # where the narration's audio lies in the file, seconds
    speech_end: float | None


@dataclass(frozen=True)
class VideoTruth:
    """What :func:`make_video` wrote: the scenes with their times, and how."""

    path: Path
    scenes: tuple[SceneTruth, ...]
    duration: float
    fps: int
    size: int
    video_codec: str
    audio_codec: str | None

    def scene_at(self, t: float) -> SceneTruth:
        for scene in self.scenes:
            if scene.start <= t < scene.end:
                return scene
        return self.scenes[-1]


def video_codec_for(suffix: str) -> str:
    """The encoder used for a container: H.264 if PyAV's FFmpeg has it, VP9 for WebM."""
    if suffix.lower() == ".webm":
        return "libvpx-vp9"
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _frames_of(scene: Scene, n_frames: int, size: int, rng: random.Random) -> list[np.ndarray]:
    if scene.attributes is None:
        colour = BACKGROUNDS[scene.background]
        still = np.empty((size, size, 3), np.uint8)
        still[:] = colour
        return [still] * n_frames
    base = np.asarray(render(scene.attributes, rng, size=size))
    phase = rng.uniform(0, 2 * np.pi)
    out = []
    for k in range(n_frames):
        dx = int(round(_DRIFT_PX * np.sin(phase + k * 0.15)))
        dy = int(round(_DRIFT_PX * np.cos(phase + k * 0.11)))
        out.append(np.roll(base, (dy, dx), axis=(0, 1)))  # the background is plain: rolling moves the shapes
    return out


def _speech(text: str) -> np.ndarray:
    from mmsearch.tts import synthesize  # the TTS backend is optional; import only when speaking

    with tempfile.TemporaryDirectory(prefix="mmsearch-narration-") as tmp:
        wav_path = synthesize(text, Path(tmp) / "say.wav", sample_rate=AUDIO_RATE, deterministic=True)
        with wave.open(str(wav_path), "rb") as wav:
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def make_video(
    path: str | Path,
    scenes: Sequence[Scene],
    *,
    narrate: bool = True,
    fps: int = DEFAULT_FPS,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    gop: int | None = None,
    rotation: int = 0,
    codec: str | None = None,
) -> VideoTruth:
    """Write ``scenes`` as a video at ``path`` (container from the suffix) and return what is where.

    ``gop`` is the most frames between keyframes; by default a keyframe every 2 s, as web video is encoded
    (the encoder may add more at cuts). ``rotation`` writes a display matrix (degrees counter-clockwise, as
    FFmpeg reports it): players, and :mod:`mmsearch.video`, turn the picture by that much. A narration that
    does not end before its scene does raises ValueError: the timing would no longer match the picture.
    """
    if not scenes:
        raise ValueError("a video needs at least one scene")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"mmsearch-demo-video-{seed}")
    vcodec = codec or video_codec_for(path.suffix)
    acodec = "libopus" if path.suffix.lower() == ".webm" else "aac"
    audio_rate = 48000 if acodec == "libopus" else AUDIO_RATE

    truths: list[SceneTruth] = []
    t = 0.0
    frame_counts = []
    for scene in scenes:
        n = max(1, round(scene.duration * fps))
        frame_counts.append(n)
        truths.append(SceneTruth(t, t + n / fps, scene.attributes, scene.sentence(), None, None))
        t += n / fps
    total = t

    track: np.ndarray | None = None
    if narrate:
        track = np.zeros(int(round(total * AUDIO_RATE)), np.float32)
        for i, (scene, truth) in enumerate(zip(scenes, truths)):
            if truth.narration is None:
                continue
            speech = _speech(truth.narration)
            begin = truth.start + NARRATION_DELAY
            stop = begin + speech.size / AUDIO_RATE
            if stop > truth.end:
                raise ValueError(
                    f"the narration {truth.narration!r} lasts {speech.size / AUDIO_RATE:.1f} s, longer than "
                    f"its scene allows ({scene.duration - NARRATION_DELAY:.1f} s)"
                )
            a = int(round(begin * AUDIO_RATE))
            track[a : a + speech.size] = speech
            truths[i] = SceneTruth(truth.start, truth.end, truth.attributes, truth.narration, begin, stop)
        if audio_rate != AUDIO_RATE:
            from mmsearch.tts import _resample

            track = _resample(track, AUDIO_RATE, audio_rate)

    container = av.open(str(path), mode="w")
    try:
        stream = cast(av.video.stream.VideoStream, container.add_stream(vcodec, rate=fps))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        options = {"threads": "1"}
        if vcodec == "libx264":
            options |= {"preset": "veryfast"}
        gop = max(1, round(2 * fps)) if gop is None else gop
        stream.codec_context.gop_size = gop
        if vcodec == "libx264":
            options |= {"keyint_min": str(min(gop, 25))}
        stream.codec_context.options = options
        if rotation:
            stream.set_display_rotation(rotation)
        astream = None
        if track is not None:
            astream = cast(
                av.audio.stream.AudioStream, container.add_stream(acodec, rate=audio_rate, layout="mono")
            )
        index = 0
        for scene, n in zip(scenes, frame_counts):
            for pixels in _frames_of(scene, n, size, rng):
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                frame.pts = index
                frame.time_base = Fraction(1, fps)
                index += 1
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if astream is not None and track is not None:
            _encode_audio(container, astream, track, audio_rate)
    finally:
        container.close()
    return VideoTruth(path, tuple(truths), total, fps, size, vcodec, acodec if track is not None else None)


def _encode_audio(
    container: av.container.OutputContainer, stream: av.audio.stream.AudioStream, pcm: np.ndarray, rate: int
) -> None:
    frame_size = stream.codec_context.frame_size or 1024
    samples = np.clip(pcm, -1.0, 1.0).astype(np.float32)
    fmt = stream.codec_context.format.name  # aac: fltp; opus: flt or s16
    for i in range(0, samples.size, frame_size):
        chunk = samples[i : i + frame_size]
        if chunk.size < frame_size:
            chunk = np.concatenate([chunk, np.zeros(frame_size - chunk.size, np.float32)])
        if fmt.startswith("s16"):
            data = (chunk * 32767).astype(np.int16).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(data, format="s16", layout="mono")
        else:
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = i
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


#: The videos of the demo folder. Each scene change is a cut (a new background as well as new shapes), as
#: between the shots of a real video; "a green triangle" appears 4 s into the first.
DEMO_VIDEOS: dict[str, tuple[Scene, ...]] = {
    "shapes_1.mp4": (
        Scene(Attributes("red", "circle", "large", 1, "white"), background="white"),
        Scene(Attributes("green", "triangle", "large", 1, "gray"), background="gray"),
        Scene(Attributes("blue", "square", "large", 1, "black"), background="black"),
    ),
    "shapes_2.mp4": (
        Scene(Attributes("yellow", "star", "large", 1, "black"), background="black"),
        Scene(None, background="white", duration=2.0),
        Scene(Attributes("purple", "circle", "small", 2, "gray"), background="gray"),
    ),
}


def write_demo_videos(media_dir: str | Path, *, narrate: bool = True, seed: int = 0) -> list[VideoTruth]:
    """Write :data:`DEMO_VIDEOS` into ``media_dir/videos/`` (for the demo folder builder)."""
    out = Path(media_dir) / "videos"
    return [
        make_video(out / name, scenes, narrate=narrate, seed=seed + i)
        for i, (name, scenes) in enumerate(DEMO_VIDEOS.items())
    ]
