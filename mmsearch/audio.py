"""Audio decoding with PyAV: any container/codec FFmpeg reads, as mono float32 PCM at 16 kHz.

Decoding is streamed packet by packet, so a many-hour recording is never held whole in memory unless the
caller asks for it with :func:`load_pcm`. Undecodable input raises :class:`BadMediaError` with a short
reason; silence is valid audio and decodes to zeros.

Hostile input is bounded three ways: sample rates outside 8-192 kHz are refused (a WAV declaring 1 Hz
turns each byte into a second of 16 kHz audio); a caller may refuse audio longer than ``max_seconds``
(spoken queries: :data:`QUERY_MAX_AUDIO_SECONDS`); and every decode runs under a wall-clock
:class:`TimeBudget`, checked between packets.

No cap is put on decoded audio per file byte: once rates are bounded, legitimate silence-heavy files
(FLAC, Opus with DTX: up to ~0.1 s of audio per byte) reach the ratios a hostile file can, so such a cap
could not tell them apart; the query cap and the time budget do that work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from mmsearch.errors import BadMediaError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# Sample rates of real recordings: telephone 8 kHz up to studio 192 kHz.
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
# A spoken query is a question, not a recording to index: longer ones are refused, not truncated.
QUERY_MAX_AUDIO_SECONDS = 60.0
# The default wall-clock budget of one file's decoding (and transcription, see mmsearch.transcribe):
# FILE_TIME_BUDGET_SECONDS plus TIME_BUDGET_PER_AUDIO_SECOND for each second of audio decoded so far.
# Decoding alone runs hundreds of times faster than real time; transcription with tiny.en here runs at
# RTF 0.010-0.056, and a model ~40x its size (large-v3, openai-whisper fp32) on the same CPU would be near
# RTF 2. 4 s per second of audio keeps every supported model on a slow CPU inside the budget, and still
# stops a file that stops making progress (a decoder grinding through garbage, a stalled transcription).
FILE_TIME_BUDGET_SECONDS = 60.0
TIME_BUDGET_PER_AUDIO_SECOND = 4.0
# Resampling may add a few samples past a file's exact length: not a reason to refuse it.
_LENGTH_SLACK_SECONDS = 0.05


class TimeBudget:
    """Wall-clock allowance for one file: ``seconds``, plus ``per_audio_second`` for each second of audio
    decoded so far (counted by the decoder through :meth:`add_audio`).

    The clock starts when the budget is made and counts everything until the last check, including what the
    consumer of a streamed decode does between chunks (a transcription). Checks happen between packets and
    between transcription windows: one packet or one Whisper call is never interrupted.
    """

    def __init__(self, seconds: float, per_audio_second: float = 0.0, *, what: str = "decoding") -> None:
        self.seconds = seconds
        self.per_audio_second = per_audio_second
        self.what = what
        self.audio_seconds = 0.0
        self._start = time.monotonic()

    @classmethod
    def default(cls, what: str = "decoding") -> TimeBudget:
        return cls(FILE_TIME_BUDGET_SECONDS, TIME_BUDGET_PER_AUDIO_SECOND, what=what)

    def allowed(self) -> float:
        return self.seconds + self.per_audio_second * self.audio_seconds

    def add_audio(self, seconds: float) -> None:
        self.audio_seconds += seconds

    def check(self) -> None:
        """Raise :class:`BadMediaError` if the time spent is over the allowance."""
        allowed = self.allowed()
        if time.monotonic() - self._start <= allowed:
            return
        detail = (
            f" ({self.seconds:g} s + {self.per_audio_second:g} s per second of audio, "
            f"{self.audio_seconds:.1f} s decoded)"
            if self.per_audio_second
            else ""
        )
        raise BadMediaError(f"{self.what} took longer than {allowed:.3g} s{detail}")


def _check_rate(rate: int | None) -> None:
    if rate is not None and not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise BadMediaError(
            f"sample rate of {rate} Hz is outside {MIN_SAMPLE_RATE // 1000}-{MAX_SAMPLE_RATE // 1000} kHz"
        )


def open_container(path: str | Path, what: str) -> av.container.InputContainer:
    """``path`` opened by PyAV for reading; :class:`BadMediaError` for an empty or unreadable file, saying
    it is not a readable ``what`` (audio, video) file."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise BadMediaError(f"cannot read file: {exc.strerror or exc}") from exc
    if size == 0:
        raise BadMediaError("empty file")
    try:
        return av.open(str(p), mode="r")
    except av.FFmpegError as exc:
        raise BadMediaError(f"not a readable {what} file ({reason(exc)})") from exc
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BadMediaError(f"not a readable {what} file ({exc})") from exc


def _open(path: str | Path) -> av.container.InputContainer:
    container = open_container(path, "audio")
    if not container.streams.audio:
        container.close()
        raise BadMediaError("no audio stream")
    try:
        # 0 means "not known before decoding": then each decoded frame's rate is checked instead.
        _check_rate(container.streams.audio[0].codec_context.sample_rate or None)
    except BadMediaError:
        container.close()
        raise
    return container


def reason(exc: Exception) -> str:
    """A PyAV (or OS) error as a short reason."""
    # PyAV messages look like "[Errno 1094995529] Invalid data found when processing input: 'x.wav'".
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _iter_frames(
    container: av.container.InputContainer,
    sr: int,
    budget: TimeBudget,
    max_seconds: float | None = None,
) -> Iterator[np.ndarray]:
    """Yield mono float32 blocks at ``sr`` Hz, resampled by FFmpeg (swresample), as they are decoded.

    Raises :class:`BadMediaError` once more than ``max_seconds`` of audio are decoded, or when ``budget``
    runs out (checked before each packet).
    """
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
    limit = None if max_seconds is None else int((max_seconds + _LENGTH_SLACK_SECONDS) * sr)
    too_long = f"audio longer than the {max_seconds:g} s limit" if max_seconds is not None else ""
    total = 0
    decoded_any = False
    errors = 0

    def counted(block: np.ndarray) -> np.ndarray:
        nonlocal total
        total += block.size
        budget.add_audio(block.size / sr)
        if limit is not None and total > limit:
            raise BadMediaError(too_long)
        return block

    try:
        for packet in container.demux(stream):
            budget.check()
            try:
                frames = packet.decode()
            except av.FFmpegError as exc:
                # A damaged packet in an otherwise good file is skipped, as ffmpeg itself does.
                errors += 1
                logger.debug("skipping undecodable packet: %s", exc)
                if not decoded_any and errors >= 8:
                    raise BadMediaError(f"undecodable audio ({reason(exc)})") from exc
                continue
            for frame in frames:
                _check_rate(frame.sample_rate)  # a stream may change rate mid-way
                decoded_any = True
                for out in resampler.resample(frame):
                    yield counted(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):  # flush the resampler's delay line
            yield counted(out.to_ndarray().reshape(-1))
    except av.FFmpegError as exc:  # demuxing itself failed
        if not decoded_any:
            raise BadMediaError(f"undecodable audio ({reason(exc)})") from exc
        logger.warning("audio truncated by a read error: %s", reason(exc))
    if not decoded_any:
        raise BadMediaError("no audio samples" if errors == 0 else "undecodable audio")


def iter_pcm_chunks(
    path: str | Path,
    chunk_seconds: float,
    sr: int = SAMPLE_RATE,
    *,
    max_seconds: float | None = None,
    budget: TimeBudget | None = None,
) -> Iterator[np.ndarray]:
    """Stream ``path`` as consecutive mono float32 chunks of ``chunk_seconds`` at ``sr`` Hz.

    Every chunk but the last has exactly ``round(chunk_seconds * sr)`` samples; memory use is bounded by
    about one chunk whatever the file's length. Audio longer than ``max_seconds`` is refused
    (:class:`BadMediaError`) as soon as that much is decoded. ``budget`` defaults to
    :meth:`TimeBudget.default`, started at the first chunk asked for.
    """
    chunk = int(round(chunk_seconds * sr))
    if chunk <= 0:
        raise ValueError("chunk_seconds must be positive")
    budget = TimeBudget.default() if budget is None else budget
    container = _open(path)
    try:
        pending: list[np.ndarray] = []
        n_pending = 0
        for block in _iter_frames(container, sr, budget, max_seconds):
            pending.append(block)
            n_pending += block.size
            if n_pending >= chunk:
                buf = np.concatenate(pending)
                n_full = buf.size // chunk
                for i in range(n_full):
                    yield buf[i * chunk : (i + 1) * chunk].copy()
                rest = buf[n_full * chunk :]
                pending, n_pending = ([rest], rest.size) if rest.size else ([], 0)
        if n_pending:
            yield np.concatenate(pending)
    finally:
        container.close()


def load_pcm(
    path: str | Path,
    sr: int = SAMPLE_RATE,
    first_seconds: float | None = None,
    *,
    max_seconds: float | None = None,
    budget: TimeBudget | None = None,
) -> np.ndarray:
    """Decode ``path`` whole (or only its first ``first_seconds``) into one mono float32 array at ``sr`` Hz.

    ``max_seconds`` and ``budget`` as for :func:`iter_pcm_chunks`.
    """
    limit = None if first_seconds is None else int(round(first_seconds * sr))
    budget = TimeBudget.default() if budget is None else budget
    container = _open(path)
    try:
        blocks: list[np.ndarray] = []
        total = 0
        for block in _iter_frames(container, sr, budget, max_seconds):
            blocks.append(block)
            total += block.size
            if limit is not None and total >= limit:
                break
    finally:
        container.close()
    pcm = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    return pcm[:limit] if limit is not None else pcm


def probe_duration(path: str | Path, *, budget: TimeBudget | None = None) -> float:
    """Duration of ``path`` in seconds.

    Read from the container's metadata when it has any; otherwise (some raw or streamed files) by decoding,
    within ``budget`` (default :meth:`TimeBudget.default`). The first packets are always decoded, so a file
    with a plausible header but garbage inside is caught.
    """
    budget = TimeBudget.default() if budget is None else budget
    container = _open(path)
    try:
        stream = container.streams.audio[0]
        # Decode a little: catches garbage that happens to probe as some format.
        frames = _iter_frames(container, SAMPLE_RATE, budget)
        next(frames)
        frames.close()  # type: ignore[attr-defined]  # a generator, typed as the Iterator it is used as
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / av.time_base
        else:
            seconds = -1.0
    except StopIteration:
        raise BadMediaError("no audio samples") from None
    finally:
        container.close()
    if seconds <= 0:
        seconds = sum(block.size for block in iter_pcm_chunks(path, 60.0, budget=budget)) / SAMPLE_RATE
    return seconds
