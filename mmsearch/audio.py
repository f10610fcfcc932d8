"""Audio decoding with PyAV: any container/codec FFmpeg reads, as mono float32 PCM at 16 kHz.

Decoding is streamed packet by packet, so a many-hour recording is never held whole in memory unless the
caller asks for it with :func:`load_pcm`. Undecodable input raises :class:`BadMediaError` with a short
reason; silence is valid audio and decodes to zeros.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from mmsearch.errors import BadMediaError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
AUDIO_EXTENSIONS = frozenset({".wav", ".mp3", ".flac", ".ogg", ".m4a", ".opus"})


def _open(path: str | Path) -> av.container.InputContainer:
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise BadMediaError(f"cannot read file: {exc.strerror or exc}") from exc
    if size == 0:
        raise BadMediaError("empty file")
    try:
        container = av.open(str(p), mode="r")
    except av.FFmpegError as exc:
        raise BadMediaError(f"not a readable audio file ({_reason(exc)})") from exc
    if not container.streams.audio:
        container.close()
        raise BadMediaError("no audio stream")
    return container


def _reason(exc: Exception) -> str:
    # PyAV messages look like "[Errno 1094995529] Invalid data found when processing input: 'x.wav'".
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _iter_frames(container: av.container.InputContainer, sr: int) -> Iterator[np.ndarray]:
    """Yield mono float32 blocks at ``sr`` Hz, resampled by FFmpeg (swresample), as they are decoded."""
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
    decoded_any = False
    errors = 0
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError as exc:
                # A damaged packet in an otherwise good file is skipped, as ffmpeg itself does.
                errors += 1
                logger.debug("skipping undecodable packet: %s", exc)
                if not decoded_any and errors >= 8:
                    raise BadMediaError(f"undecodable audio ({_reason(exc)})") from exc
                continue
            for frame in frames:
                decoded_any = True
                for out in resampler.resample(frame):
                    yield out.to_ndarray().reshape(-1)
        for out in resampler.resample(None):  # flush the resampler's delay line
            yield out.to_ndarray().reshape(-1)
    except av.FFmpegError as exc:  # demuxing itself failed
        if not decoded_any:
            raise BadMediaError(f"undecodable audio ({_reason(exc)})") from exc
        logger.warning("audio truncated by a read error: %s", _reason(exc))
    if not decoded_any:
        raise BadMediaError("no audio samples" if errors == 0 else "undecodable audio")


def iter_pcm_chunks(path: str | Path, chunk_seconds: float, sr: int = SAMPLE_RATE) -> Iterator[np.ndarray]:
    """Stream ``path`` as consecutive mono float32 chunks of ``chunk_seconds`` at ``sr`` Hz.

    Every chunk but the last has exactly ``round(chunk_seconds * sr)`` samples; memory use is bounded by
    about one chunk whatever the file's length.
    """
    chunk = int(round(chunk_seconds * sr))
    if chunk <= 0:
        raise ValueError("chunk_seconds must be positive")
    container = _open(path)
    try:
        pending: list[np.ndarray] = []
        n_pending = 0
        for block in _iter_frames(container, sr):
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


def load_pcm(path: str | Path, sr: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Decode ``path`` whole (or its first ``max_seconds``) into one mono float32 array at ``sr`` Hz."""
    limit = None if max_seconds is None else int(round(max_seconds * sr))
    container = _open(path)
    try:
        blocks: list[np.ndarray] = []
        total = 0
        for block in _iter_frames(container, sr):
            blocks.append(block)
            total += block.size
            if limit is not None and total >= limit:
                break
    finally:
        container.close()
    pcm = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    return pcm[:limit] if limit is not None else pcm


def probe_duration(path: str | Path) -> float:
    """Duration of ``path`` in seconds.

    Read from the container's metadata when it has any; otherwise (some raw or streamed files) by decoding.
    The first packets are always decoded, so a file with a plausible header but garbage inside is caught.
    """
    container = _open(path)
    try:
        stream = container.streams.audio[0]
        # Decode a little: catches garbage that happens to probe as some format.
        frames = _iter_frames(container, SAMPLE_RATE)
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
        seconds = sum(block.size for block in iter_pcm_chunks(path, 60.0)) / SAMPLE_RATE
    return seconds
