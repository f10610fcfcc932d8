"""The catalog side of zero-shot tags (table ``tags``, source 'zero-shot', one row per content and label).

Writes run inside the caller's transaction (``with store.write() as tx: ... tx.conn``); reads take a
connection too (``with catalog.read() as conn``). Labels compare case-insensitively, as the tag filter
does.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, func, select

from mmsearch.catalog import _chunks
from mmsearch.schema import ZERO_SHOT_SOURCE, embeddings, files, tags


def image_media(conn: Connection, embedding_ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """embedding id -> (media id, lowest live file id) for the image embeddings among ``embedding_ids``
    whose content some file still holds."""
    out: dict[int, tuple[int, int]] = {}
    first = (
        select(func.min(files.c.id))
        .where(files.c.media_id == embeddings.c.media_id, files.c.status == "ok")
        .scalar_subquery()
    )
    for chunk in _chunks([int(i) for i in embedding_ids], 900):
        q = select(embeddings.c.id, embeddings.c.media_id, first).where(
            embeddings.c.id.in_(chunk), embeddings.c.kind == "image"
        )
        for eid, mid, fid in conn.execute(q):
            if fid is not None:
                out[int(eid)] = (int(mid), int(fid))
    return out


def replace_zero_shot(conn: Connection, labels: Sequence[str], rows: Sequence[tuple[int, str, float]]) -> int:
    """Replace the zero-shot tags of ``labels`` (any case) with ``rows`` (media id, tag, confidence);
    returns how many rows went."""
    folded = sorted({label.lower() for label in labels})
    removed = 0
    for chunk in _chunks(folded, 900):
        removed += conn.execute(
            tags.delete().where(tags.c.source == ZERO_SHOT_SOURCE, func.lower(tags.c.tag).in_(chunk))
        ).rowcount
    if rows:
        conn.execute(
            tags.insert(),
            [{"media_id": m, "tag": t, "source": ZERO_SHOT_SOURCE, "score": s} for m, t, s in rows],
        )
    return int(removed)


def clear_zero_shot(conn: Connection) -> int:
    """Delete every zero-shot tag; returns how many went."""
    return int(conn.execute(tags.delete().where(tags.c.source == ZERO_SHOT_SOURCE)).rowcount)


def zero_shot_counts(conn: Connection) -> dict[str, int]:
    """How many contents carry each zero-shot tag, most first."""
    q = (
        select(tags.c.tag, func.count())
        .where(tags.c.source == ZERO_SHOT_SOURCE)
        .group_by(tags.c.tag)
        .order_by(func.count().desc(), tags.c.tag)
    )
    return {str(tag): int(n) for tag, n in conn.execute(q)}


def tags_of_media(conn: Connection, media_ids: Sequence[int]) -> dict[int, list[tuple[str, float]]]:
    """media id -> [(tag, confidence)] of its zero-shot tags, most confident first."""
    out: dict[int, list[tuple[str, float]]] = {}
    for chunk in _chunks([int(i) for i in media_ids], 900):
        q = (
            select(tags.c.media_id, tags.c.tag, tags.c.score)
            .where(tags.c.source == ZERO_SHOT_SOURCE, tags.c.media_id.in_(chunk))
            .order_by(tags.c.media_id, tags.c.score.desc(), tags.c.tag)
        )
        for mid, tag, score in conn.execute(q):
            out.setdefault(int(mid), []).append((str(tag), float(score or 0.0)))
    return out
