"""Synthetic image rows for benchmarks that need a large index without decoding images: each vector gets
the catalog rows a real image has (content, file, embedding of the active model), inserted in bulk."""

from __future__ import annotations

from typing import Any

import numpy as np

from mmsearch import db

PREFIX = "/synthetic/"  # their display paths; no such file exists


def insert_images(conn: Any, vecs: np.ndarray, first: int) -> list[int]:
    """Rows for ``vecs`` numbered from ``first`` inside the caller's transaction; returns the embedding ids."""
    shas = [f"{first + i:064x}" for i in range(len(vecs))]
    conn.execute(db.media.insert(), [{"sha256": s, "kind": "image"} for s in shas])
    rows = conn.execute(
        db.media.select()
        .with_only_columns(db.media.c.id, db.media.c.sha256)
        .where(db.media.c.sha256.in_(shas))
    ).all()
    mid = {s: m for m, s in rows}
    conn.execute(
        db.files.insert(),
        [
            {
                "path_key": f"{PREFIX}{first + i:08d}.jpg".encode(),
                "path": f"{PREFIX}{first + i:08d}.jpg",
                "kind": "image",
                "size": 1,
                "mtime_ns": 0,
                "sha256": s,
                "media_id": mid[s],
                "status": "ok",
                "updated_at": 0.0,
            }
            for i, s in enumerate(shas)
        ],
    )
    return db.add_embeddings(conn, "image", vecs, [mid[s] for s in shas])
