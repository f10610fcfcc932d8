"""Synthetic catalog rows for benchmarks that need a large index without decoding media: each image vector
or transcript segment gets the rows a real one has (content, file, embedding of the active model), in bulk."""

from __future__ import annotations

from typing import Any

import numpy as np

from mmsearch import db

PREFIX = "/synthetic/"  # their display paths; no such file exists


def _contents_and_files(
    conn: Any, shas: list[str], names: list[str], kind: str, **media: Any
) -> dict[str, int]:
    """One content row per sha and one live file per content (``PREFIX + name``); returns sha -> media id."""
    conn.execute(db.media.insert(), [{"sha256": s, "kind": kind, **media} for s in shas])
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
                "path_key": f"{PREFIX}{name}".encode(),
                "path": f"{PREFIX}{name}",
                "kind": kind,
                "size": 1,
                "mtime_ns": 0,
                "sha256": s,
                "media_id": mid[s],
                "status": "ok",
                "updated_at": 0.0,
            }
            for s, name in zip(shas, names, strict=True)
        ],
    )
    return mid


def insert_images(conn: Any, vecs: np.ndarray, first: int) -> list[int]:
    """Rows for ``vecs`` numbered from ``first`` inside the caller's transaction; returns the embedding ids."""
    shas = [f"{first + i:064x}" for i in range(len(vecs))]
    mid = _contents_and_files(conn, shas, [f"{first + i:08d}.jpg" for i in range(len(shas))], "image")
    return db.add_embeddings(conn, "image", vecs, [mid[s] for s in shas])


def add_random_images(store: Any, n: int, *, seed: int = 0, chunk: int = 5000) -> np.ndarray:
    """``n`` random L2-normalised image vectors written into ``store`` (with their content and file rows,
    under its write lock, the FAISS files saved); returns the vectors."""
    vecs = np.random.default_rng(seed).standard_normal((n, store.dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    store.lock_for_writing()
    try:
        with store.catalog.begin() as conn:
            for start in range(0, n, chunk):
                insert_images(conn, vecs[start : start + chunk], start + 1)
        store.refresh()
        store.save_vectors()
    finally:
        store.unlock()
    return vecs


def insert_recordings(conn: Any, texts: list[str], vecs: np.ndarray, first: int, per_file: int = 10) -> None:
    """Transcript rows for ``texts`` (one segment each, ``per_file`` segments per recording) with their vectors
    ``vecs``, numbered from ``first`` inside the caller's transaction; bulk inserts, FTS kept by triggers."""
    model = db.active_model(conn)
    n_files = -(-len(texts) // per_file)
    shas = [f"a{first + i:063x}" for i in range(n_files)]
    names = [f"talk{first + i:08d}.mp3" for i in range(n_files)]
    mid = _contents_and_files(conn, shas, names, "audio", duration=60.0)
    seg_rows = [
        {
            "media_id": mid[shas[i // per_file]],
            "idx": i % per_file,
            "start": 6.0 * (i % per_file),
            "end": 6.0 * (i % per_file) + 6.0,
            "text": t,
        }
        for i, t in enumerate(texts)
    ]
    conn.execute(db.segments.insert(), seg_rows)
    seg_ids = (
        conn.execute(
            db.segments.select()
            .with_only_columns(db.segments.c.id)
            .where(db.segments.c.media_id.in_(list(mid.values())))
            .order_by(db.segments.c.media_id, db.segments.c.idx)
        )
        .scalars()
        .all()
    )
    conn.execute(
        db.embeddings.insert(),
        [
            {
                "kind": "segment",
                "model": model,
                "segment_id": sid,
                "vector": np.ascontiguousarray(v).tobytes(),
            }
            for sid, v in zip(seg_ids, vecs, strict=True)
        ],
    )
    db.bump_generation(conn, "segment", model)
