"""Search: a query vector against one or more item kinds, hits resolved to files through the catalog."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mmsearch import db
from mmsearch.constants import MAX_K, TARGETS
from mmsearch.errors import ActiveModelChanged, BadQueryError
from mmsearch.store import Store

__all__ = ["MAX_K", "TARGETS", "Hit", "kinds_for", "search_vector"]


@dataclass(frozen=True)
class Hit:
    """One result. ``kind`` is image, caption or segment; ``start``/``end`` (seconds) only for segments.
    ``score`` is the cosine similarity to the query vector; ``confidence`` its calibrated value in [0, 1]
    (None without a calibration); ``matched``: found by ``vector``, ``words`` or ``both`` (see
    :mod:`mmsearch.query`).

    ``path`` is the file's name as :func:`os.fsdecode` gives it (undecodable bytes as surrogate escapes),
    so ``open(hit.path)`` opens the file whatever its name.
    """

    rank: int
    score: float
    kind: str
    path: str
    text: str | None
    start: float | None
    end: float | None
    item_id: int
    file_id: int
    confidence: float | None = None
    matched: str = "vector"
    # The kind of the hit's file (image, audio, video): a segment or a frame of a video is a moment in it.
    file_kind: str | None = None
    # A video's other moments in the results, folded under its best one (see mmsearch.query): each
    # {"kind", "start", "end", "score", "item_id"}, best first.
    moments: tuple[dict[str, Any], ...] = ()
    # What a photo's file says of itself (None when unknown): unix seconds, "Make Model", WGS84 degrees.
    taken_at: float | None = None
    camera: str | None = None
    lat: float | None = None
    lon: float | None = None

    @classmethod
    def of(cls, row: db.ItemRow, rank: int, score: float, **extra: object) -> Hit:
        """The hit of catalog item ``row`` (from :func:`mmsearch.db.resolve_items`)."""
        return cls(
            rank=rank,
            score=round(float(score), 6),
            kind=row.kind,
            path=os.fsdecode(row.path_key),
            text=row.text,
            start=row.start,
            end=row.end,
            item_id=row.id,
            file_id=row.file_id,
            file_kind=row.file_kind,
            taken_at=row.taken_at,
            camera=row.camera,
            lat=row.lat,
            lon=row.lon,
            **extra,  # type: ignore[arg-type]
        )

    def as_dict(self) -> dict[str, object]:
        """JSON-safe: ``path`` in display form (valid UTF-8, undecodable bytes replaced by U+FFFD) and
        ``path_b64``, the standard base64 of the path's exact bytes."""
        return {**asdict(self), **db.path_json(os.fsencode(self.path))}


def kinds_for(target: str) -> tuple[str, ...]:
    try:
        return TARGETS[target]
    except KeyError:
        raise BadQueryError(f"unknown target '{target}' (choose from {', '.join(TARGETS)})") from None


def search_vector(
    store: Store, query: np.ndarray, target: str, k: int, *, model: str | None = None
) -> list[Hit]:
    """Top ``k`` items of ``target`` by cosine similarity to the L2-normalised ``query``, among the active
    model's vectors. ``model``: the model that embedded ``query``; :class:`ActiveModelChanged` if another
    one is active by now (all kinds are searched in the one model's indexes, whatever commits meanwhile)."""
    if not 1 <= k <= MAX_K:
        raise BadQueryError(f"k must be between 1 and {MAX_K}")
    kinds = kinds_for(target)
    active = store.refresh()
    if model is not None and model != active:
        raise ActiveModelChanged(f"the index now searches model {active}, not {model}")
    q = np.ascontiguousarray(query, np.float32).reshape(1, -1)
    if q.shape[1] != store.dim_of(active):
        raise BadQueryError(f"query vector has dimension {q.shape[1]}, the index {store.dim_of(active)}")
    candidates: list[tuple[float, int]] = []
    for kind in kinds:
        index = store.vectors(kind, active)
        if index.ntotal == 0:
            continue
        # Over-fetch: several image vectors can share a file, and an item may vanish between the
        # FAISS lookup and the catalog read while a writer runs.
        scores, ids = index.search(q, min(index.ntotal, 2 * k + 8))
        candidates.extend((float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0)
    candidates.sort(key=lambda c: -c[0])
    # Only items of the kinds searched: an id never names two items (ids are not reused), and a stale
    # id must not resolve to an item of another kind either.
    rows = db.resolve_items(store.catalog, [i for _, i in candidates], kinds)
    hits: list[Hit] = []
    for score, item_id in candidates:
        row = rows.get(item_id)
        if row is None:
            continue
        hits.append(Hit.of(row, len(hits) + 1, score))
        if len(hits) == k:
            break
    return hits
