"""Changing an index's model without emptying search: embed everything again with a new model beside the
active one, then switch.

The new model is registered as the *target* (``start_target``); :func:`fill` embeds every item that lacks
a vector of it (image content, decoded again from one of its live files; captions; transcript segments) in
batches, each committed through :meth:`Store.write`, so an interrupted run loses at most a batch and the
next run embeds only what is still missing. Searches keep using the active model's vectors meanwhile
(readers search one model only). :func:`activate` makes the target active in one transaction once it has
every item, then deletes the previous model's vectors unless they are kept for a rollback.

``index`` runs while a target is pending embed their new content with it too (``Index.add_folder``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmsearch import db
from mmsearch.errors import BadMediaError
from mmsearch.images import load_image
from mmsearch.ingest import (
    IMAGE_DECODE_BUDGET_SECONDS,
    DecodePool,
    Embedder,
    Progress,
    bounded_map,
    caption_vectors,
    image_batch_size,
    unchanged_file,
)
from mmsearch.ingest_video import frame_vectors
from mmsearch.store import Store

log = logging.getLogger(__name__)

#: Texts (captions, segments) embedded and committed per transaction.
TEXT_BATCH = 256


@dataclass
class ReembedReport:
    model: str
    #: Whether this run registered the model as the target (False: it resumed an earlier run's).
    started: bool = False
    images: int = 0
    captions: int = 0
    segments: int = 0
    frames: int = 0
    #: Content none of whose files could be decoded now: (path, reason); its files are recorded as skipped.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: Content whose files all changed or went since they were indexed: left to the next ``index`` run.
    stale: int = 0
    activated: bool = False
    #: The previous model, when its vectors were deleted after the switch.
    removed_model: str | None = None
    seconds: float = 0.0

    @property
    def embedded(self) -> int:
        return self.images + self.captions + self.segments

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        return d


def start_target(store: Store, key: str, identity: dict[str, Any]) -> bool:
    """Register ``key`` and make it the target (a different target's partial vectors are deleted: one
    model is embedded at a time). False when it already was the target (a resumed run) or is active."""
    if key == store.model:
        return False
    current = store.catalog.target_model()
    if current == key:
        return False
    with store.write(*db.VECTOR_KINDS) as tx:
        if current is not None:
            for kind, ids in db.forget_model(tx.conn, current).items():
                tx.removed(kind, ids)
        db.register_model(tx.conn, key, identity)
        db.set_target(tx.conn, key)
    if current is not None:
        store.forget_vectors(current)
    return True


def fill(
    store: Store,
    model: str,
    embedder: Callable[[], Embedder],
    *,
    progress: Progress | None = None,
    workers: int = 2,
) -> ReembedReport:
    """Embed with ``model`` every item lacking its vector; ``embedder`` is called only if there is one.
    The caller holds the write lock."""
    started = time.monotonic()
    tick = progress or (lambda stage, done, total: None)
    report = ReembedReport(model)
    todo = {kind: store.catalog.missing(model, kind) for kind in db.VECTOR_KINDS}
    if any(todo.values()):
        emb = embedder()
        _embed_images(store, model, emb, todo["image"], report, tick, workers)
        for kind in ("caption", "segment"):
            _embed_texts(store, model, emb, kind, todo[kind], report, tick)
        _embed_frames(store, model, emb, todo["frame"], report, tick)
        store.save_vectors()
    report.seconds = round(time.monotonic() - started, 3)
    return report


def activate(store: Store, model: str, *, keep_old: bool) -> tuple[bool, str | None]:
    """Make ``model`` the active one if it has every item: (whether it is active now, the previous model
    if its vectors were deleted). The caller holds the write lock."""
    previous = store.model
    if model == previous:
        return True, None
    with store.catalog.begin() as conn:
        # Complete, checked in the switching transaction (the write lock keeps it so until the commit).
        if any(conn.execute(db.missing_query(model, kind).limit(1)).first() for kind in db.VECTOR_KINDS):
            return False, None
        db.set_active(conn, model)
        if db.target_in(conn) == model:
            db.set_target(conn, None)
    store.follow_active()
    store.describe_active_model()
    store.save_vectors()  # the new model's files, current: readers switching load them
    if keep_old:
        return True, None
    with store.write(*db.VECTOR_KINDS) as tx:
        for kind, ids in db.forget_model(tx.conn, previous).items():
            tx.removed(kind, ids)
    store.forget_vectors(previous)
    return True, previous


def _embed_frames(
    store: Store, model: str, emb: Embedder, frame_ids: list[int], report: ReembedReport, tick: Progress
) -> None:
    """Keyframes, decoded again from one of their video's unchanged files (the same keyframe choice as
    indexing) and matched to the stored ones by time: each stored frame takes the nearest frame decoded
    now (the same one, unless the keyframe choice changed since). One video per transaction."""
    if not frame_ids:
        return
    by_video = db.frames_of(store.catalog, frame_ids)
    live = db.live_files_of(store.catalog, list(by_video))
    for done, (mid, stored) in enumerate(by_video.items()):
        tick("frames", done, len(by_video))
        path = unchanged_file(live.get(mid, []))
        if path is None:
            report.stale += 1
            continue
        try:
            times, vectors = frame_vectors(path, emb)
        except BadMediaError as e:
            report.skipped.append((str(path), f"keyframes not decoded again: {e}"))
            continue
        if not times:
            report.skipped.append((str(path), "no keyframe decoded again"))
            continue
        nearest = [int(np.argmin(np.abs(np.asarray(times) - t))) for _, t in stored]
        chosen = np.stack([vectors[i] for i in nearest]).astype(np.float32, copy=False)
        with store.write("frame", model=model) as tx:
            ids = db.add_embeddings(tx.conn, "frame", chosen, [fid for fid, _ in stored], model=model)
            tx.added("frame", ids, chosen)
        report.frames += len(stored)
    tick("frames", len(by_video), len(by_video))


_Decoded = tuple[int, list[db.FileRow], Any, "str | None"]  # (media id, live files, tensor, error)


def _embed_images(
    store: Store,
    model: str,
    emb: Embedder,
    media_ids: list[int],
    report: ReembedReport,
    tick: Progress,
    workers: int,
) -> None:
    if not media_ids:
        return
    bs = image_batch_size(emb)
    budget = IMAGE_DECODE_BUDGET_SECONDS

    def decode(item: tuple[int, list[db.FileRow]]) -> _Decoded:
        """The content of one media from the first of its files unchanged since it was indexed (the
        same decoding as ingest); no tensor and no error when every file changed or went."""
        mid, rows = item
        path = unchanged_file(rows)
        if path is None:
            return mid, rows, None, None
        try:
            image = load_image(path, draft_size=emb.input_size)
            return mid, rows, emb.preprocess_image(image), None
        except BadMediaError as e:
            return mid, rows, None, str(e)  # every file of it holds the same bytes

    def overran(item: tuple[int, list[db.FileRow]]) -> _Decoded:
        log.warning("gave up decoding %s after %g s", os.fsdecode(item[1][0].path_key), budget)
        return item[0], item[1], None, f"decoding took longer than {budget:g} s"

    done = 0
    pool = DecodePool(workers)
    try:
        for start in range(0, len(media_ids), bs * 2):
            chunk = media_ids[start : start + bs * 2]
            live = db.live_files_of(store.catalog, chunk)
            items = [(mid, live[mid]) for mid in chunk if mid in live]
            decoded = list(bounded_map(decode, items, pool, ahead=2 * bs, budget=budget, on_timeout=overran))
            for i in range(0, len(decoded), bs):
                batch = decoded[i : i + bs]
                good = [(mid, t) for mid, _, t, err in batch if t is not None]
                vectors = (
                    emb.embed_image_tensors(np.stack([np.asarray(t) for _, t in good])) if good else None
                )
                _commit_images(store, model, batch, good, vectors, report)
            done += len(chunk)
            tick("images", done, len(media_ids))
    finally:
        pool.close()


def _commit_images(
    store: Store,
    model: str,
    batch: list[_Decoded],
    good: list[tuple[int, Any]],
    vectors: np.ndarray | None,
    report: ReembedReport,
) -> None:
    bad = [(rows, err) for _, rows, t, err in batch if t is None and err is not None]
    report.stale += sum(1 for _, _, t, err in batch if t is None and err is None)
    with store.write(*db.VECTOR_KINDS, model=model) as tx:
        if vectors is not None:
            ids = db.add_embeddings(tx.conn, "image", vectors, [mid for mid, _ in good], model=model)
            tx.added("image", ids, vectors)
        for rows, err in bad:
            # As ingest records a file that does not decode: skipped, with the reason, its content and
            # captions gone (of every model).
            for row in rows:
                log.info("skipping %s: %s", os.fsdecode(row.path_key), err)
                db.write_file(
                    tx.conn,
                    Path(os.fsdecode(row.path_key)),
                    kind=row.kind,
                    size=row.size,
                    mtime_ns=row.mtime_ns,
                    sha256=row.sha256,
                    media_id=None,
                    reason=err,
                )
                report.skipped.append((os.fsdecode(row.path_key), str(err)))
            cap_ids = db.caption_ids_of(tx.conn, [r.id for r in rows])
            for kind, ids in db.remove_captions(tx.conn, cap_ids).items():
                tx.removed(kind, ids)
        shas: set[str] = set()
        if bad:
            removed, shas = db.remove_orphan_media(tx.conn)
            for kind, ids in removed.items():
                tx.removed(kind, ids)
    store.drop_thumbnails(shas)
    report.images += len(good)


def _embed_texts(
    store: Store,
    model: str,
    emb: Embedder,
    kind: str,
    ids: list[int],
    report: ReembedReport,
    tick: Progress,
) -> None:
    for start in range(0, len(ids), TEXT_BATCH):
        tick(f"{kind}s", start, len(ids))
        chunk = ids[start : start + TEXT_BATCH]
        texts = db.texts_of(store.catalog, kind, chunk)
        chunk = [i for i in chunk if i in texts]
        if not chunk:
            continue
        vectors, _ = caption_vectors(store, emb, [texts[i] for i in chunk], model, reuse=kind == "caption")
        with store.write(kind, model=model) as tx:
            tx.added(kind, db.add_embeddings(tx.conn, kind, vectors, chunk, model=model), vectors)
        setattr(report, f"{kind}s", getattr(report, f"{kind}s") + len(chunk))
    if ids:
        tick(f"{kind}s", len(ids), len(ids))
