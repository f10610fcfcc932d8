"""The video stage of an indexing run: each new video content becomes its keyframes (image-tower vectors of
kind ``frame``, each with its time) and the time-coded segments of its spoken track, committed in one
transaction with its files (see :mod:`mmsearch.ingest` for the run around it, :mod:`mmsearch.video` for
which frames are kept and how they are decoded).

A video whose picture cannot be read but whose speech can (or the reverse) is indexed with what it has; one
with neither is skipped with both reasons. A video that stops decoding part-way (a truncated file) keeps
the keyframes before the break, and the run reports how far it got.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from mmsearch import db
from mmsearch.errors import BadMediaError, MmsearchError

if TYPE_CHECKING:
    from mmsearch import video
    from mmsearch.ingest import Embedder
    from mmsearch.store import Store

log = logging.getLogger(__name__)

#: The side of the keyframe thumbnails saved at index time (what the server shows for a frame hit).
FRAME_THUMB_SIDE = 256


@dataclass
class VideoRead:
    """What was read of one video: its keyframes' (idx, time, reason) and vectors, its transcript."""

    info: video.VideoInfo | None = None
    keyframes: list[tuple[int, float, str]] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    transcript: Any = None
    #: Why the picture or the speech could not be read (None: read, or absent).
    picture_problem: str | None = None
    speech_problem: str | None = None
    #: The picture stopped decoding part-way: why (the keyframes before it are kept).
    truncated: str | None = None

    @property
    def empty(self) -> bool:
        return not self.keyframes and (self.transcript is None or not self.transcript.segments)


def frame_thumb_path(store: Store, sha256: str, idx: int) -> Path:
    """Where keyframe ``idx`` of content ``sha256`` is kept as a thumbnail. Named after the content, like
    image thumbnails, so that :meth:`Store.drop_thumbnails` removes them with it."""
    return store.thumbnails_folder() / f"{sha256}-{FRAME_THUMB_SIDE}-f{idx}.jpg"


def read_video(
    path: Path,
    embedder: Embedder,
    transcribe: Callable[[Path], tuple[Any, str | None]],
    save_thumb: Callable[[int, Image.Image], None] | None = None,
) -> VideoRead:
    """Probe, keyframes embedded as they are decoded (a batch at a time: a long video's frames are never
    all held), the spoken track transcribed meanwhile in another thread (Whisper, FFmpeg and ONNX Runtime
    release the GIL: the two halves share the cores). Never raises for a bad file (:class:`BadMediaError`
    becomes a problem); a missing model does."""
    from mmsearch import video  # PyAV: imported when a video comes, not by every `index` or query

    out = VideoRead()
    try:
        out.info = video.probe(path)
    except BadMediaError as e:
        out.picture_problem = str(e)
        return out
    speech: Future[tuple[Any, str | None]] | None = None
    if out.info.has_audio:
        pool = ThreadPoolExecutor(1, thread_name_prefix="mmsearch-speech")
        speech = pool.submit(transcribe, path)
        pool.shutdown(wait=False)  # (the one task still runs)
    try:
        if out.info.has_video:
            _read_keyframes(path, embedder, out, save_thumb)
    finally:
        if speech is not None:
            transcript, reason = speech.result()
            out.transcript, out.speech_problem = (transcript, None) if reason is None else (None, reason)
    return out


def _read_keyframes(
    path: Path,
    embedder: Embedder,
    out: VideoRead,
    save_thumb: Callable[[int, Image.Image], None] | None,
) -> None:
    from mmsearch import video

    batch: list[Any] = []
    size = max(1, int(embedder.batch_size))

    def flush() -> None:
        if batch:
            out.vectors.extend(embedder.embed_image_tensors(np.stack([np.asarray(t) for t in batch])))
            batch.clear()

    try:
        with video.keyframes(path) as frames:
            for idx, kf in enumerate(frames):
                out.keyframes.append((idx, round(float(kf.time), 3), kf.reason))
                if save_thumb is not None:
                    save_thumb(idx, kf.image)
                batch.append(embedder.preprocess_image(kf.image))
                if len(batch) >= size:
                    flush()
            out.truncated = frames.truncated
    except BadMediaError as e:
        if out.keyframes:
            out.truncated = str(e)
        else:
            out.picture_problem = str(e)
    flush()


def frame_vectors(path: Path, embedder: Embedder) -> tuple[list[float], list[np.ndarray]]:
    """The keyframes of ``path`` as indexing chooses them: their times and vectors (for a new model).
    :class:`BadMediaError` when none can be decoded."""
    read = VideoRead()
    _read_keyframes(path, embedder, read, None)
    if read.picture_problem is not None:
        raise BadMediaError(read.picture_problem)
    return [t for _, t, _ in read.keyframes], read.vectors


def save_frame_thumb(store: Store, sha256: str) -> Callable[[int, Image.Image], None]:
    """A thumbnail writer for one content's keyframes (best effort: a read-only or full thumbnails folder
    costs the server a placeholder, not the run)."""

    def save(idx: int, image: Image.Image) -> None:
        with contextlib.suppress(OSError, MmsearchError):
            target = frame_thumb_path(store, sha256, idx)
            thumb = image.copy()
            thumb.thumbnail((FRAME_THUMB_SIDE, FRAME_THUMB_SIDE), Image.Resampling.LANCZOS)
            tmp = target.with_name(f".{target.name}.{os.getpid()}")
            thumb.save(tmp, "JPEG", quality=85)
            os.replace(tmp, target)

    return save


def skip_reason(read: VideoRead) -> str:
    """Why a video with neither keyframes nor speech is skipped."""
    parts = [read.picture_problem and f"picture: {read.picture_problem}"]
    if read.info is not None and not read.info.has_video:
        parts.append("no video stream")
    parts.append(read.speech_problem and f"speech: {read.speech_problem}")
    if read.info is not None and not read.info.has_audio:
        parts.append("no audio stream")
    return "; ".join(p for p in parts if p) or "nothing to index"


def commit_video(
    conn: Any,
    sha: str,
    read: VideoRead,
    spans: Sequence[tuple[int, float, float, str]],
    speech: str | None,
) -> tuple[int, list[int], list[int]]:
    """Write one video's content, keyframes and segments (inside the caller's transaction)."""
    info = read.info
    transcript = read.transcript
    return db.add_video(
        conn,
        sha,
        duration=float(info.duration) if info is not None else 0.0,
        width=info.width if info is not None and info.has_video else None,
        height=info.height if info is not None and info.has_video else None,
        keyframes=read.keyframes,
        language=getattr(transcript, "language", None),
        text=getattr(transcript, "text", None),
        spans=spans,
        speech=speech if transcript is not None else None,
    )
