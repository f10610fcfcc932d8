"""Retrievers for RAG frameworks over an open :class:`mmsearch.Index`: LangChain
(:mod:`mmsearch.integrations.langchain`, extra ``langchain``) and LlamaIndex
(:mod:`mmsearch.integrations.llamaindex`, extra ``llamaindex``). Each framework module only wraps what is
here: one search, and each hit as a :class:`Retrieved` (text, metadata, the image file to load).

What a hit becomes:

- ``text``: a caption's or transcript segment's own text; for an image, its captions (one per line), or
  its file name when it has none;
- ``metadata``: ``source`` and ``path`` (the file, display form: valid UTF-8), ``path_b64`` (its exact
  bytes, base64), ``kind`` (image | caption | segment), ``file_kind`` (image | audio), ``start``/``end``
  (seconds, segments only), ``score`` (cosine similarity), ``confidence`` (calibrated, 0-1, or None),
  ``matched`` (vector | words | both), ``rank``, ``item_id``, ``file_id``, and for a hit on an image file
  (an image or one of its captions) ``image_path``, the path that opens it (``os.fsdecode`` form; it
  differs from ``path`` only for a name that is not valid UTF-8).

Searches through one :class:`~mmsearch.Index` run one at a time (its models are not shared between
threads), whichever retriever or thread asks.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmsearch import db

if TYPE_CHECKING:
    from mmsearch.api import Index
    from mmsearch.search import Hit

#: Hits a retriever returns unless told otherwise.
DEFAULT_K = 4

_locks: weakref.WeakKeyDictionary[Index, threading.Lock] = weakref.WeakKeyDictionary()
_locks_lock = threading.Lock()


@dataclass(frozen=True)
class Retrieved:
    """One hit as a framework document: its id (``mmsearch:ITEM_ID``), text, score and metadata."""

    id: str
    text: str
    score: float
    metadata: dict[str, Any]

    @property
    def image_path(self) -> str | None:
        return self.metadata.get("image_path")


def retrieve(
    index: Index,
    text: str | None,
    *,
    image: str | Path | None = None,
    target: str | None = None,
    k: int = DEFAULT_K,
    mode: str = "hybrid",
    search_kwargs: Mapping[str, Any] | None = None,
) -> list[Retrieved]:
    """Search ``index`` (see :meth:`mmsearch.Index.search`; ``search_kwargs`` are its other keywords:
    filters, cut-offs, +/- terms) and describe each hit. Nothing that passes the confidence cut-off gives
    an empty list."""
    with _lock_of(index):
        result = index.search(text, image=image, target=target, k=k, mode=mode, **dict(search_kwargs or {}))
        image_files = sorted({h.file_id for h in result.hits if h.kind == "image"})
        captions = index.store.catalog.captions_of(image_files) if image_files else {}
    return [_describe(h, [txt for _, _, txt in sorted(captions.get(h.file_id, []))]) for h in result.hits]


def _describe(hit: Hit, captions: list[str]) -> Retrieved:
    raw = os.fsencode(hit.path)
    where = db.path_json(raw)
    on_image = hit.kind in ("image", "caption")
    text = hit.text if hit.kind != "image" else "\n".join(captions)
    metadata: dict[str, Any] = {
        "source": where["path"],
        **where,
        "kind": hit.kind,
        "file_kind": "image" if on_image else "audio",
        "start": hit.start,
        "end": hit.end,
        "score": hit.score,
        "confidence": hit.confidence,
        "matched": hit.matched,
        "rank": hit.rank,
        "item_id": hit.item_id,
        "file_id": hit.file_id,
    }
    if on_image:
        metadata["image_path"] = hit.path
    return Retrieved(
        id=f"mmsearch:{hit.item_id}",
        text=text or os.path.basename(where["path"]),
        score=hit.score,
        metadata=metadata,
    )


def _lock_of(index: Index) -> threading.Lock:
    with _locks_lock:
        lock = _locks.get(index)
        if lock is None:
            lock = _locks[index] = threading.Lock()
        return lock
