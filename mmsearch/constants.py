"""Names and limits shared by several modules, defined once. Standard library only: the CLI's fast path to a
running server imports this without numpy, torch or SQLAlchemy."""

from __future__ import annotations

import os
from pathlib import Path

# What a user asks for -> which vector indexes answer. "texts" are captions and transcript segments.
# "video" is a video's keyframes and the segments of its spoken track (only a video's: see VIDEO_TARGET).
TARGETS: dict[str, tuple[str, ...]] = {
    "images": ("image",),
    "texts": ("caption", "segment"),
    "captions": ("caption",),
    "audio": ("segment",),
    "video": ("frame", "segment"),
    "all": ("image", "caption", "segment", "frame"),
}
#: The target whose hits come from video files only.
VIDEO_TARGET = "video"
#: Search modes: words and meaning together, meaning (vectors) only, words (FTS5/BM25) only.
QUERY_MODES = ("hybrid", "vector", "words")
#: How the words and the vector list of a hybrid query are merged: reciprocal rank fusion or weighted scores.
QUERY_FUSIONS = ("rrf", "weighted")
#: How several inputs of one query are merged: one summed vector (early) or rank fusion of their lists (late).
QUERY_COMBINES = ("early", "late")
#: The roles of a query's inputs, each with a weight.
QUERY_ROLES = ("text", "image", "audio", "add", "subtract")
#: The speech-recognition backends an index can record (mmsearch.transcribe loads them).
SPEECH_BACKENDS = ("faster-whisper", "openai-whisper")
DEFAULT_MODE = "hybrid"
DEFAULT_FUSION = "rrf"
DEFAULT_COMBINE = "early"
#: Most results one local search returns.
MAX_K = 10_000
#: Most results a server returns per query; `mmsearch query` answers a larger -k locally.
SERVER_MAX_K = 200

#: Camera RAW files: decoded by rawpy (LibRaw), never by Pillow (see mmsearch/raw.py).
RAW_SUFFIXES = frozenset({".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2"})
#: HEIF containers: HEIC/HEIF through pillow-heif, AVIF through Pillow's own plugin.
HEIF_SUFFIXES = frozenset({".heic", ".heif", ".avif"})
IMAGE_SUFFIXES = (
    frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
    | HEIF_SUFFIXES
    | RAW_SUFFIXES
)
AUDIO_SUFFIXES = frozenset({".wav", ".mp3", ".flac", ".ogg", ".m4a", ".opus"})
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi"})
#: A phone's Live Photo is a still and a short video of the same name: the video is part of the photo.
LIVE_PHOTO_VIDEO_SUFFIXES = frozenset({".mov", ".mp4"})

#: Where an index lives when neither --index nor $MMSEARCH_INDEX says.
DEFAULT_INDEX = Path("indexes") / "default"
INDEX_ENV = "MMSEARCH_INDEX"

_TRUE = frozenset({"1", "true", "yes", "on"})


#: An index folder's sub-folder of FAISS files (see :mod:`mmsearch.store`).
VECTORS_FOLDER = "vectors"


def vector_file(index: Path, model: str, kind: str) -> Path:
    """Where an index keeps the FAISS file of one kind of one model (its key): vectors/MODEL/KIND.faiss."""
    return index / VECTORS_FOLDER / model / f"{kind}.faiss"


def default_index_path() -> Path:
    return Path(os.environ.get(INDEX_ENV) or DEFAULT_INDEX)


def hub_offline() -> bool:
    """Whether the user told Hugging Face libraries to stay offline (``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE`` set to 1/true/yes/on): then no model hub is probed or contacted."""
    return any(
        os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


#: The caption source of text read from inside a media file (``embedded:exif``, ``embedded:iptc``, ...):
#: a sidecar's or manifest's source is its path instead.
EMBEDDED_SOURCE = "embedded:"
