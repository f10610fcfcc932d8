"""Video decoding with PyAV: what a video holds (:func:`probe`) and the frames worth indexing (:func:`keyframes`).

A video becomes a few still images, each with its time: the first frame, a frame at each scene change, and at
least one every ``interval`` seconds. Decoding only what that needs is what makes indexing video cheap:

* Only the encoder's keyframes (I-frames) are decoded, one group of pictures (GOP) at a time. The packets of
  a GOP are held back (compressed, at most ``interval`` seconds of them) until the next keyframe shows how
  long the GOP is; a GOP that would leave more than ``interval`` seconds without a kept frame is then decoded
  in full, from its keyframe, and gives frames in between. Encoders put keyframes at scene cuts (x264's
  ``scenecut``) and every few seconds, so most files never need that; screen recordings with GOPs of minutes
  do. Decoding a long GOP once from its start costs less than seeking to each interval inside it, since
  every seek decodes again from the same keyframe.
* The decoder is drained and reset after each GOP, so a keyframe's picture comes out at once instead of
  after the decoder's reordering delay.
* Frames are converted to RGB by FFmpeg (swscale) straight at the reduced size; no full-size RGB copy of a
  frame is ever made. Scene changes are found on 32x32 colour thumbnails: the mean absolute difference
  from the last kept frame, in 0-1.

Safe-decoding rules as in :mod:`mmsearch.audio` and :mod:`mmsearch.images`: every failure is a
:class:`BadMediaError` with a reason; the frame size is checked against :data:`VIDEO_MAX_PIXELS` before any
frame is decoded; decoding runs under a :class:`~mmsearch.audio.TimeBudget`, checked between packets; the
duration is measured from the packets, not taken from the container's claim. A file whose video ends early
(truncated, or a read error mid-way) gives the keyframes it could decode and then sets
:attr:`KeyframeStream.truncated` to the reason. A file with no video stream (audio only; cover art does not
count as video) is not an error for :func:`probe` (``has_video`` is False, so the caller can index it as
audio); :func:`keyframes` refuses it with the reason ``"no video stream"``.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal, cast

import av
import numpy as np
from PIL import Image

from mmsearch.audio import TimeBudget, open_container
from mmsearch.audio import reason as media_error
from mmsearch.errors import BadMediaError
from mmsearch.images import INDEX_MAX_PIXELS, hold_pixels

logger = logging.getLogger(__name__)


#: At least one kept frame every this many seconds. Keyframe-only decoding is what makes video cheap, and it
#: holds only while the interval is longer than the file's GOP: a shorter interval decodes nearly every GOP
#: in full (13-17x real time instead of ~190x for 720p, benchmarks/results/video.json). The commonest GOP is
#: the x264/FFmpeg default of 250 frames: 10.4 s at 24 fps, 10 s at 25, 8.3 s at 30; 12 s is above all of
#: them.
DEFAULT_INTERVAL = 12.0
#: A frame whose 32x32 colour thumbnail differs from the last kept frame's by more than this (mean absolute
#: difference over the RGB channels, 0-1) starts a new scene. Measured by benchmarks/bench_video.py
#: (``thresholds``): cuts between unrelated shots 0.19-0.5; slide changes in a screen recording 0.076-0.105;
#: a still screen with a moving cursor under 0.002; one shot of moving test patterns with camera-like noise
#: 1 s apart, median 0.008 and 95th percentile 0.05 (fast-evolving patterns reach 0.16 over 8 s: change
#: enough to be kept). A false scene costs one more kept frame (at most one per GOP in keyframe-only
#: decoding, one per MIN_SCENE_GAP otherwise); a missed one waits for the next interval frame. Colour, not
#: grey: a red shape turning green barely changes in brightness.
DEFAULT_SCENE_THRESHOLD = 0.07
#: Longest side of a kept frame: the models' inputs are 224-384 px; this leaves room for a thumbnail.
DEFAULT_MAX_SIDE = 512
#: Scene changes closer than this to the last kept frame are not kept (flashes, strobes, fast cutting).
MIN_SCENE_GAP = 1.0
#: Frame-size budget, checked before decoding. A decoder holds several full-size frames at once (references
#: plus one per thread), so a video frame is charged 4 times a still image: a quarter of
#: :data:`~mmsearch.images.INDEX_MAX_PIXELS`, 22.4 Mpx, takes 4K (8.3 Mpx), 5.7K and 6K (21.2 Mpx) cameras
#: and refuses 8K (33.2 Mpx).
VIDEO_MAX_PIXELS = INDEX_MAX_PIXELS // 4
#: Frames a decode call is charged for in the process-wide pixels-in-flight budget (images.hold_pixels).
_FRAMES_CHARGED = 4
#: Wall-clock budget of one file's keyframe decoding: this, plus TIME_BUDGET_PER_VIDEO_SECOND per second of
#: video read. Keyframe-only decoding of 720p H.264 runs ~190x faster than real time, full decoding 10-28x
#: (benchmarks/results/video.json); 1 s per second lets a file that must be decoded in full (a long GOP)
#: decode at real time, as 4K may on a slow CPU, and still stops a decoder that makes no progress.
FILE_TIME_BUDGET_SECONDS = 60.0
TIME_BUDGET_PER_VIDEO_SECOND = 1.0
# Compressed packets held back for one GOP before it is decoded in full anyway (memory bound).
_MAX_HELD_BYTES = 64 * 1024 * 1024
# Credit to the time budget for one packet's step in time: a file whose timestamps jump by hours between
# packets does not earn hours of decoding.
_MAX_CREDIT_PER_PACKET = 1.0
_THUMB = 32
# Decoded frames closer together than this are not all compared (only where a GOP is decoded in full).
_LOOK_STEP = 0.25
_UNDECODABLE_LIMIT = 8

Reason = Literal["first", "scene", "interval"]


def default_budget() -> TimeBudget:
    """The default budget of one file (the budget counts seconds of video as its media seconds)."""
    return TimeBudget(FILE_TIME_BUDGET_SECONDS, TIME_BUDGET_PER_VIDEO_SECOND, what="video decoding")


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` found. ``width``/``height`` are the displayed size: after the sample aspect ratio
    and the rotation; ``coded_width``/``coded_height`` are the decoder's. ``rotation`` is FFmpeg's: degrees
    counter-clockwise, -90..180; ``mirrored`` when the display matrix also flips the picture. ``duration`` is
    measured from the packets; ``claimed_duration`` is the container's header (None when it has none)."""

    duration: float
    claimed_duration: float | None
    width: int
    height: int
    coded_width: int
    coded_height: int
    rotation: int
    mirrored: bool
    fps: float | None
    has_video: bool
    has_audio: bool
    codec: str | None
    audio_codec: str | None
    truncated: bool = False


@dataclass(frozen=True)
class Keyframe:
    """One kept frame: its presentation time in seconds from the video's start, the picture (RGB, upright,
    longest side at most ``max_side``) and why it was kept."""

    time: float
    image: Image.Image
    reason: Reason
    difference: float  # from the last kept frame's thumbnail (1.0 for the first)


# ------------------------------------------------------------------------------------------------- opening


def _open(path: str | Path) -> av.container.InputContainer:
    return open_container(path, "video")


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream | None:
    """The first video stream that is moving pictures (cover art in audio files is a one-frame 'video')."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _check_size(stream: av.video.stream.VideoStream, max_pixels: int) -> tuple[int, int]:
    cc = stream.codec_context
    width, height = cc.width or 0, cc.height or 0
    if width <= 0 or height <= 0:
        raise BadMediaError("video stream has no frame size")
    if width * height > max_pixels:
        raise BadMediaError(
            f"video frames too large: {width}x{height} pixels ({width * height / 1e6:.1f} Mpx) is over the "
            f"budget of {max_pixels / 1e6:.1f} Mpx"
        )
    return width, height


def _claimed(container: av.container.InputContainer) -> float | None:
    """The duration the container's header states, if any."""
    return container.duration / av.time_base if container.duration and container.duration > 0 else None


def _short_of(duration: float, claimed: float) -> bool:
    """Whether ``duration`` falls clearly short of what the header claims (a truncated or lying file)."""
    return claimed - duration > max(2.0, 0.05 * claimed)


def _display_size(width: int, height: int, sar: Fraction | None) -> tuple[int, int]:
    """The frame's size as shown, before rotation: anamorphic video is stretched horizontally."""
    if sar and sar > 0 and sar != 1 and Fraction(1, 8) <= sar <= 8:
        return max(1, round(width * sar)), height
    return width, height


# ------------------------------------------------------------------------------------------------ rotation


def _orient_ops(matrix: np.ndarray | None, rotation: int) -> list[Image.Transpose]:
    """PIL transpositions that show a decoded picture upright, from FFmpeg's display matrix.

    The matrix maps a source pixel (x, y) to display coordinates x' = a x + c y, y' = b x + d y (a, b, c, d
    = m[0], m[1], m[3], m[4]); for multiples of 90 degrees it is a signed permutation, which fixes one of
    the eight EXIF orientations (flips included). Other angles are rounded to the nearest quarter turn.
    """
    if matrix is not None and matrix.size == 9:
        a, b, c, d = (float(v) for v in (matrix[0], matrix[1], matrix[3], matrix[4]))
        if abs(a) + abs(d) >= abs(b) + abs(c):  # x' from x, y' from y
            swap, flip_x, flip_y = False, a < 0, d < 0
        else:  # x' from y, y' from x
            swap, flip_x, flip_y = True, c < 0, b < 0
    else:
        quarter = round(rotation / 90) % 4  # counter-clockwise quarter turns
        swap = quarter in (1, 3)
        flip_x, flip_y = {0: (False, False), 1: (False, True), 2: (True, True), 3: (True, False)}[quarter]
    ops: list[Image.Transpose] = []
    if swap:
        ops.append(Image.Transpose.TRANSPOSE)
    if flip_x:
        ops.append(Image.Transpose.FLIP_LEFT_RIGHT)
    if flip_y:
        ops.append(Image.Transpose.FLIP_TOP_BOTTOM)
    return ops


def _frame_orientation(frame: av.VideoFrame) -> tuple[list[Image.Transpose], int, bool]:
    """(transpositions showing ``frame`` upright, FFmpeg's rotation in -90..180, whether it is mirrored)."""
    matrix = None
    try:
        data = frame.side_data.get("DISPLAYMATRIX")
        if data is not None:
            matrix = np.frombuffer(bytes(cast(bytes, data)), dtype="<i4")
        rotation = int(round(frame.rotation))
    except (AttributeError, ValueError, TypeError):
        rotation = 0
    rotation = 180 if rotation == -180 else rotation
    mirrored = (
        matrix is not None
        and matrix.size == 9
        and float(matrix[0]) * matrix[4] < float(matrix[1]) * matrix[3]
    )
    return _orient_ops(matrix, rotation), rotation, bool(mirrored)


# ---------------------------------------------------------------------------------------------------- probe


def probe(
    path: str | Path, *, budget: TimeBudget | None = None, max_pixels: int = VIDEO_MAX_PIXELS
) -> VideoInfo:
    """What ``path`` holds, with its duration measured from the packets.

    MP4/MOV files are measured from their sample index (no data read; samples the index places past the
    end of the file are not counted, and set ``truncated``); other containers by reading their packets
    without decoding them. The first video frame is decoded (it proves the stream decodes and carries the
    rotation), after the frame size has been checked against ``max_pixels``. A file without video is
    described (``has_video`` False), not refused.
    """
    budget = default_budget() if budget is None else budget
    container = _open(path)
    try:
        return _probe(container, Path(path), budget, max_pixels)
    except av.FFmpegError as exc:
        raise BadMediaError(f"unreadable video ({media_error(exc)})") from exc
    except (MemoryError, OverflowError, ValueError) as exc:
        raise BadMediaError(f"unreadable video ({type(exc).__name__}: {exc})") from exc
    finally:
        container.close()


def _probe(
    container: av.container.InputContainer, path: Path, budget: TimeBudget, max_pixels: int
) -> VideoInfo:
    video = _video_stream(container)
    audio = container.streams.audio[0] if container.streams.audio else None
    claimed = _claimed(container)
    if video is None:
        if audio is None:
            raise BadMediaError("no video or audio stream")
        duration, truncated = _measure(container, audio, path, budget)
        return VideoInfo(
            duration=duration,
            claimed_duration=claimed,
            width=0,
            height=0,
            coded_width=0,
            coded_height=0,
            rotation=0,
            mirrored=False,
            fps=None,
            has_video=False,
            has_audio=True,
            codec=None,
            audio_codec=audio.codec_context.name,
            truncated=truncated,
        )
    coded_w, coded_h = _check_size(video, max_pixels)
    duration, truncated = _measure(container, video, path, budget)
    truncated = truncated or (claimed is not None and _short_of(duration, claimed))
    rate = video.average_rate or video.guessed_rate
    fps = float(rate) if rate else None
    container.seek(0)  # back to the start (a no-op for a file that was not read)
    frame = next(_first_frames(container, video, budget), None)
    if frame is None:
        raise BadMediaError("no decodable video frame")
    ops, rotation, mirrored = _frame_orientation(frame)
    w, h = _display_size(coded_w, coded_h, video.sample_aspect_ratio)
    if Image.Transpose.TRANSPOSE in ops:
        w, h = h, w
    return VideoInfo(
        duration,
        claimed,
        w,
        h,
        coded_w,
        coded_h,
        rotation,
        mirrored,
        fps,
        True,
        audio is not None,
        video.codec_context.name,
        audio.codec_context.name if audio is not None else None,
        truncated,
    )


def _measure(
    container: av.container.InputContainer, stream: av.stream.Stream, path: Path, budget: TimeBudget
) -> tuple[float, bool]:
    """(seconds of ``stream`` the file really holds, whether the file ends before its own index does)."""
    tb = stream.time_base or Fraction(1, 90000)
    if "mp4" in container.format.name or "mov" in container.format.name:
        entries = stream.index_entries
        if len(entries):
            size = path.stat().st_size
            first = entries[0].timestamp
            last, truncated = first, False
            for i, entry in enumerate(entries):
                if i % 4096 == 0:
                    budget.check()
                if entry.pos + entry.size > size:
                    truncated = True
                    continue
                last = max(last, entry.timestamp)
            rate = getattr(stream, "average_rate", None)
            step = float(1 / rate) if rate else 0.0
            return max(0.0, float((last - first) * tb) + step), truncated
    start: float | None = None
    end = 0.0
    for n, packet in enumerate(container.demux(stream)):
        if n % 256 == 0:
            budget.check()
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is None:
            continue
        t = float(ts * tb)
        t_end = t + float((packet.duration or 0) * tb)
        start = t if start is None else min(start, t)
        end = max(end, t_end)
    return (0.0 if start is None else max(0.0, end - start)), False


def _first_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, budget: TimeBudget
) -> Iterator[av.VideoFrame]:
    """Frames decoded from the start, skipping damaged packets (for the probe)."""
    errors = 0
    for packet in container.demux(stream):
        budget.check()
        try:
            frames = packet.decode()
        except av.FFmpegError as exc:
            errors += 1
            if errors >= _UNDECODABLE_LIMIT:
                raise BadMediaError(f"undecodable video ({media_error(exc)})") from exc
            continue
        yield from frames


# ------------------------------------------------------------------------------------------------ keyframes


class KeyframeStream(Iterator[Keyframe]):
    """The kept frames of one video, decoded as they are asked for (see :func:`keyframes`).

    After iteration ends, :attr:`truncated` is None when the whole video was read, else the reason it
    stopped early (the keyframes before it were good). :attr:`stats` counts packets read and frames decoded.
    Close it (or use it as a context manager) when not iterated to the end.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        interval: float,
        scene_threshold: float,
        max_side: int,
        budget: TimeBudget,
        max_pixels: int,
        full_decode: bool,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        if max_side < 1:
            raise ValueError("max_side must be positive")
        self.interval = interval
        self.scene_threshold = scene_threshold
        self.max_side = max_side
        self.budget = budget
        self.truncated: str | None = None
        self.duration: float | None = None  # measured from the packets, once iterated to the end
        self.stats = {"packets": 0, "decoded": 0, "full_gops": 0, "gops": 0}
        self._container = _open(path)
        try:
            stream = _video_stream(self._container)
            if stream is None:
                raise BadMediaError("no video stream")
            width, height = _check_size(stream, max_pixels)
        except BadMediaError:
            self._container.close()
            raise
        self._stream = stream
        self._max_pixels = max_pixels
        self._charge = width * height * _FRAMES_CHARGED
        self._full_decode = full_decode
        start, tb = stream.start_time, stream.time_base
        self._origin = float(start * tb) if start is not None and tb is not None else 0.0
        self._iter = self._run()

    def __iter__(self) -> KeyframeStream:
        return self

    def __next__(self) -> Keyframe:
        return next(self._iter)

    def close(self) -> None:
        self._iter.close()
        self._container.close()

    def __enter__(self) -> KeyframeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The state of one pass: the last kept frame and its thumbnail.
    _last_time: float | None = None
    _last_thumb: np.ndarray | None = None
    _decoded_any = False
    _errors = 0

    def _run(self) -> Generator[Keyframe, None, None]:
        try:
            yield from self._pass()
        except av.FFmpegError as exc:  # demuxing failed mid-way: a truncated or damaged file
            if not self._decoded_any:
                raise BadMediaError(f"undecodable video ({media_error(exc)})") from exc
            self.truncated = f"read error after {self._last_time or 0:.1f} s ({media_error(exc)})"
        except (MemoryError, OverflowError, ValueError) as exc:
            raise BadMediaError(f"undecodable video ({type(exc).__name__}: {exc})") from exc
        finally:
            self._container.close()
        if not self._decoded_any:
            raise BadMediaError("no decodable video frame" if self._errors == 0 else "undecodable video")

    def _pass(self) -> Iterator[Keyframe]:
        stream = self._stream
        tb = stream.time_base or Fraction(1, 90000)
        cc = stream.codec_context
        held: list[av.Packet] = []  # this GOP's packets since its keyframe, not yet sent to the decoder
        held_bytes = 0
        gop_key: av.Packet | None = None  # this GOP's keyframe packet
        full = False  # this GOP is being decoded in full
        progress: float | None = None
        end = 0.0

        for packet in self._container.demux(stream):
            self.budget.check()
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            self.stats["packets"] += 1
            ts = packet.dts if packet.dts is not None else packet.pts
            t = float(ts * tb) if ts is not None else (progress or 0.0)
            if progress is not None:
                self.budget.add_audio(min(_MAX_CREDIT_PER_PACKET, max(0.0, t - progress)))
            progress = t if progress is None else max(progress, t)
            shown = float(packet.pts * tb) if packet.pts is not None else t  # dts runs early with B-frames
            end = max(end, shown + float((packet.duration or 0) * tb))
            if self._full_decode:
                yield from self._decode(cc, packet, tb)
                continue
            if packet.is_keyframe or gop_key is None:
                # A new GOP. The last GOP's keyframe, if not kept, is kept now if this one comes too late.
                if self._pending is not None and self._due(t, strict=True):
                    yield self._keep_pending()
                yield from self._drain(cc, tb)
                cc.skip_frame = "DEFAULT"
                held, held_bytes, full = [], 0, False
                gop_key = packet
                self.stats["gops"] += 1
                yield from self._decode(cc, packet, tb)
                yield from self._drain(cc, tb)  # the keyframe's picture now, not after the reorder delay
                continue
            if full:
                yield from self._decode(cc, packet, tb)
                continue
            held.append(packet)
            held_bytes += packet.size
            # The GOP's keyframe, when not kept, is pending: kept when the next keyframe comes too late. Only
            # a GOP longer than the interval itself needs frames from inside it.
            since = self._pending[0] if self._pending is not None else self._last_time
            if (since is not None and t - since >= self.interval - 1e-6) or held_bytes > _MAX_HELD_BYTES:
                # A long GOP: decode it from its keyframe (the decoder was reset after it) to find frames
                # in between. Its keyframe comes out again and is passed over or pending again.
                full = True
                self.stats["full_gops"] += 1
                # Frames no other frame refers to are not decoded (1.7-2.6x less work, bench_video.py).
                cc.skip_frame = "NONREF"
                for p in [gop_key, *held]:
                    self.budget.check()
                    yield from self._decode(cc, p, tb)
                held, held_bytes = [], 0
        yield from self._drain(cc, tb)
        if self._pending is not None and self._due(end, strict=True):
            yield self._keep_pending()
        self._pending = None
        self.duration = max(0.0, end - self._origin)
        claimed = _claimed(self._container)
        if self.truncated is None and claimed is not None and _short_of(self.duration, claimed):
            self.truncated = (
                f"the video ends at {self.duration:.1f} s; the file's header says {claimed:.1f} s"
            )

    # -------------------------------------------------------------------------------------- frame handling

    _pending: tuple[float, av.VideoFrame, np.ndarray, float] | None = None

    def _due(self, t: float, *, strict: bool = False) -> bool:
        """Whether time ``t`` is an interval or more (``strict``: more) after the last kept frame."""
        if self._last_time is None:
            return False
        gap = t - self._last_time
        return gap > self.interval + 1e-6 if strict else gap >= self.interval - 1e-6

    def _keep_pending(self) -> Keyframe:
        assert self._pending is not None
        t, frame, thumb, diff = self._pending
        self._pending = None
        return self._keep(t, frame, thumb, "interval", diff)

    def _decode(
        self, cc: av.video.codeccontext.VideoCodecContext, packet: av.Packet, tb: Fraction
    ) -> Iterator[Keyframe]:
        try:
            with hold_pixels(self._charge):
                frames = cc.decode(packet)
        except av.FFmpegError as exc:
            self._errors += 1
            logger.debug("skipping undecodable video packet: %s", exc)
            if not self._decoded_any and self._errors >= _UNDECODABLE_LIMIT:
                raise BadMediaError(f"undecodable video ({media_error(exc)})") from exc
            return
        for frame in frames:
            kept = self._consider(frame, tb)
            if kept is not None:
                yield kept

    def _drain(self, cc: av.video.codeccontext.VideoCodecContext, tb: Fraction) -> Iterator[Keyframe]:
        """Every frame the decoder still holds, then a reset (it takes new packets from a keyframe on)."""
        try:
            with hold_pixels(self._charge):
                frames = cc.decode(None)
        except av.FFmpegError as exc:
            logger.debug("error draining the video decoder: %s", exc)
            frames = []
        cc.flush_buffers()
        for frame in frames:
            kept = self._consider(frame, tb)
            if kept is not None:
                yield kept

    def _consider(self, frame: av.VideoFrame, tb: Fraction) -> Keyframe | None:
        """Keep ``frame`` if it is the first, a new scene, or an interval has passed since the last kept;
        else it becomes the pending frame, kept later if no other frame comes in time."""
        if frame.pts is None:
            return None
        if frame.width * frame.height > self._max_pixels:  # the size changed mid-stream (a new SPS)
            raise BadMediaError(
                f"video frames too large: the size changes to {frame.width}x{frame.height} pixels, over the "
                f"budget of {self._max_pixels / 1e6:.1f} Mpx"
            )
        t = float(frame.pts * tb)
        last = self._last_time
        if last is not None and t <= last:
            return None  # a GOP's keyframe decoded a second time, or out-of-order timestamps
        self.stats["decoded"] += 1
        if self._pending is not None and t - self._pending[0] < _LOOK_STEP and not self._due(t):
            return None  # a thumbnail costs about as much as decoding a frame: a few per second are enough
        thumb = np.asarray(
            frame.reformat(width=_THUMB, height=_THUMB, format="rgb24", interpolation="AREA").to_ndarray(),
            dtype=np.int16,
        )
        if last is None or self._last_thumb is None:
            self._decoded_any = True
            return self._keep(t, frame, thumb, "first", 1.0)
        diff = float(np.abs(thumb - self._last_thumb).mean()) / 255.0
        if diff > self.scene_threshold and t - last >= MIN_SCENE_GAP:
            return self._keep(t, frame, thumb, "scene", diff)
        if self._due(t):
            return self._keep(t, frame, thumb, "interval", diff)
        self._pending = (t, frame, thumb, diff)
        return None

    def _keep(
        self, t: float, frame: av.VideoFrame, thumb: np.ndarray, reason: Reason, diff: float
    ) -> Keyframe:
        self._last_time, self._last_thumb, self._pending = t, thumb, None
        dw, dh = _display_size(frame.width, frame.height, self._stream.sample_aspect_ratio)
        scale = min(1.0, self.max_side / max(dw, dh))
        w, h = max(1, round(dw * scale)), max(1, round(dh * scale))
        image = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_image()
        ops = _frame_orientation(frame)[0]
        for op in ops:
            image = image.transpose(op)
        return Keyframe(time=max(0.0, t - self._origin), image=image, reason=reason, difference=diff)


def keyframes(
    path: str | Path,
    *,
    interval: float = DEFAULT_INTERVAL,
    scene_threshold: float = DEFAULT_SCENE_THRESHOLD,
    max_side: int = DEFAULT_MAX_SIDE,
    budget: TimeBudget | None = None,
    max_pixels: int = VIDEO_MAX_PIXELS,
    full_decode: bool = False,
) -> KeyframeStream:
    """The frames of ``path`` worth indexing, in time order: the first, one at each scene change (a
    thumbnail difference above ``scene_threshold`` from the last kept frame, at least
    :data:`MIN_SCENE_GAP` after it) and at least one every ``interval`` seconds.

    The file is opened, and refused with :class:`BadMediaError` (no video stream, frames over
    ``max_pixels``, unreadable), by this call; frames are decoded as the stream is iterated, under
    ``budget`` (default :func:`default_budget`). ``full_decode=True`` decodes every frame instead of
    keyframes and long GOPs only (for measurements; it keeps the same kinds of frames, more precisely placed).
    """
    return KeyframeStream(
        path,
        interval=interval,
        scene_threshold=scene_threshold,
        max_side=max_side,
        budget=default_budget() if budget is None else budget,
        max_pixels=max_pixels,
        full_decode=full_decode,
    )
