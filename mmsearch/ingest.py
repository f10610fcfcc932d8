"""Index a folder: scan → hash → decode/transcribe → embed → store, incrementally.

Work is decided by content: a file whose size and mtime are unchanged is not read again; a new or changed
file is hashed, and content already in the catalog (a moved, renamed or duplicated file) is linked, never
re-embedded. Every batch is committed in one transaction together with its embeddings, so a crash loses at
most the batches in flight (one per model stream) and never leaves a half-written item. One bad file is
recorded and skipped.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from sqlalchemy import Connection, select

from mmsearch import db
from mmsearch.errors import BadMediaError, MmsearchError
from mmsearch.identity import sha256_file
from mmsearch.images import load_image
from mmsearch.scan import Caption, FoundFile, kind_of, scan
from mmsearch.store import Store

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): stages are scan, hash, images, audio, captions, cleanup, save."""

# A transcript this short is also embedded whole, so a query can match words spread over segments.
WHOLE_TRANSCRIPT_MAX_SECONDS = 30.0


class Embedder(Protocol):
    dim: int
    batch_size: int

    def preprocess_image(self, image: Any) -> Any: ...
    def embed_image_tensors(self, batch: Any) -> np.ndarray: ...
    def embed_texts(self, texts: list[str]) -> np.ndarray: ...


@dataclass
class IngestReport:
    root: str
    files_seen: int = 0
    unchanged: int = 0
    images_embedded: int = 0
    audio_transcribed: int = 0
    segments_embedded: int = 0
    linked: int = 0  # moved, renamed or duplicate content: no model work
    captions_added: int = 0
    captions_embedded: int = 0  # of those, the texts the model had to embed (not already in the index)
    captions_removed: int = 0
    files_removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        return d


def ingest(
    store: Store,
    root: str | Path,
    *,
    embedder: Callable[[], Embedder],
    transcriber: Callable[[], Any],
    progress: Progress | None = None,
    workers: int = 2,
) -> IngestReport:
    """Bring the index up to date with ``root``. ``embedder``/``transcriber`` are called only if needed."""
    started = time.monotonic()
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise MmsearchError(f"not a folder: {root}")
    report = IngestReport(root=str(root))
    # The model's objects (about 400k for ViT-B-32) would be walked by every full garbage collection:
    # 0.2 s each here, 5 % of indexing 300 photos. Set aside while indexing; a caller's own freeze is kept.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        return _ingest(store, root, report, embedder, transcriber, progress, workers, started)
    finally:
        if freeze:
            gc.unfreeze()


def _ingest(
    store: Store,
    root: Path,
    report: IngestReport,
    embedder: Callable[[], Embedder],
    transcriber: Callable[[], Any],
    progress: Progress | None,
    workers: int,
    started: float,
) -> IngestReport:
    tick = progress or (lambda stage, done, total: None)
    tick("scan", 0, 1)
    found = scan(root)
    tick("scan", 1, 1)
    report.files_seen = len(found.files)
    report.skipped.extend((str(p), reason) for p, reason in found.problems)
    run = _Run(store, report, tick, embedder, transcriber, workers)
    seen = {db.path_key(f.path) for f in found.files}
    seen |= run.record_problems(found.problems, seen)
    pending = run.hash_new_files(found.files)
    run.embed_images([(sha, group) for sha, group in pending.items() if group[0].kind == "image"])
    run.transcribe_audio([(sha, group) for sha, group in pending.items() if group[0].kind == "audio"])
    run.sync_captions(root, found.captions)
    # A folder that could not be listed this time (permissions, a flaky mount) keeps what it held:
    # forgetting its files would throw away their embeddings over a transient error.
    kept = tuple(
        db.path_key(p).rstrip(b"/") + b"/"
        for p, reason in found.problems
        if reason.startswith("unreadable folder")
    )
    run.remove_missing(root, seen, kept)
    tick("save", 0, 1)
    store.save_vectors()
    tick("save", 1, 1)
    report.seconds = round(time.monotonic() - started, 3)
    return report


T = TypeVar("T")
R = TypeVar("R")

# Images per model call when several streams run side by side. One int8 ViT-B-32-256 session on one core
# here: 105 img/s at 4-8 images a call, 102 at 16, 93 at 32 (smaller calls stay in cache); small batches
# also leave less of a run's tail to one stream while the others idle.
STREAM_BATCH = 8


def image_batch_size(embedder: Any) -> int:
    """How many images ingestion hands the embedder at once (benchmarks time the model alone the same way)."""
    streams = getattr(embedder, "image_streams", 1)
    return (
        int(embedder.batch_size)
        if streams == 1
        else max(1, min(STREAM_BATCH, embedder.batch_size // streams))
    )


def bounded_map(
    fn: Callable[[T], R], items: Iterable[T], pool: ThreadPoolExecutor, ahead: int
) -> Iterator[R]:
    """Like ``pool.map`` but with at most ``ahead`` results in flight, so memory stays bounded."""
    queue: list[Future[R]] = []
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) >= ahead:
            yield queue.pop(0).result()
    for fut in queue:
        yield fut.result()


_Decoded = tuple[str, list[FoundFile], Any, "str | None"]  # (sha256, files, tensor, error)


class _Run:
    def __init__(
        self,
        store: Store,
        report: IngestReport,
        tick: Progress,
        embedder: Callable[[], Embedder],
        transcriber: Callable[[], Any],
        workers: int,
    ) -> None:
        self.store, self.report, self.tick = store, report, tick
        self._embedder_factory, self._transcriber_factory = embedder, transcriber
        self._embedder: Embedder | None = None
        self._transcriber: Any = None
        self.workers = workers
        self.existing = store.catalog.files_by_key()
        self._files_written = 0  # rows of `existing` are current until this run writes a file row

    def _load_vectors(self, *kinds: str) -> None:
        """Load these kinds' FAISS indexes before a transaction changes their vectors.

        The file matches the catalog before the change, so the change is then applied in memory. Loaded
        only after the commit, the file would be one generation behind: the store would rebuild the whole
        index from SQLite (retraining an IVF index) and rewrite it, on every run that adds anything.
        """
        for kind in kinds:
            self.store.vectors(kind)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = self._embedder_factory()
            if gc.get_freeze_count():
                gc.freeze()  # the model just loaded joins what full collections skip (see ingest)
        return self._embedder

    @property
    def transcriber(self) -> Any:
        if self._transcriber is None:
            self._transcriber = self._transcriber_factory()
        return self._transcriber

    # --- files --------------------------------------------------------------------------------
    def record_problems(self, problems: list[tuple[Path, str]], found: set[bytes]) -> set[bytes]:
        """Record what the scan could not read (broken symlinks, special files, unreadable caption files
        or folders) as skipped rows, so ``mmsearch status`` lists them; returns their keys."""
        reasons: dict[bytes, tuple[Path, list[str]]] = {}
        for path, reason in problems:
            key = db.path_key(path)
            if key not in found:  # a media file's own row says more than a problem about it
                reasons.setdefault(key, (path, []))[1].append(reason)
        if not reasons:
            return set()
        with self.store.catalog.begin() as conn:
            for key, (path, why) in reasons.items():
                row = self.existing.get(key)
                if row is not None and row.status == "skipped" and row.reason == "; ".join(why):
                    continue  # recorded by an earlier run: no write, so a no-op re-index stays cheap
                # size/mtime -1: never matches a real file, so a fixed file is hashed on the next run.
                f = FoundFile(path, kind_of(path) or "other", -1, -1)
                self._write_file(conn, f, None, None, "; ".join(why))
        return set(reasons)

    def hash_new_files(self, found: list[FoundFile]) -> dict[str, list[FoundFile]]:
        """Hash new/changed files; link known content at once. Returns content to process, by hash."""
        todo = []
        for f in found:
            row = self.existing.get(db.path_key(f.path))
            if row is not None and row.size == f.size and row.mtime_ns == f.mtime_ns:
                self.report.unchanged += 1
            else:
                todo.append(f)
        pending: dict[str, list[FoundFile]] = {}
        with self.store.catalog.begin() as conn:
            for i, f in enumerate(todo):
                self.tick("hash", i, len(todo))
                if f.size == 0:
                    self._skip(conn, f, None, "empty file")
                    continue
                try:
                    sha = sha256_file(f.path)
                except OSError as e:
                    # size -1: a permission or I/O problem may be fixed without touching the file's
                    # mtime, so this file is tried again on every run.
                    self._skip(conn, replace(f, size=-1), None, f"unreadable: {e.strerror or e}")
                    continue
                media_id = _media_of_kind(conn, sha, f.kind)
                if media_id is not None:
                    self._write_file(conn, f, sha, media_id)
                    self.report.linked += 1
                else:
                    pending.setdefault(sha, []).append(f)
            self.tick("hash", len(todo), len(todo))
        return pending

    def _write_file(
        self, conn: Connection, f: FoundFile, sha: str | None, media_id: int | None, reason: str | None = None
    ) -> None:
        from sqlalchemy.dialects.sqlite import insert

        key = db.path_key(f.path)
        values = {
            "path_key": key,
            "path": db.display_path(key),
            "kind": f.kind,
            "size": f.size,
            "mtime_ns": f.mtime_ns,
            "sha256": sha,
            "media_id": media_id,
            "status": "skipped" if reason else "ok",
            "reason": None if reason is None else db.storable(reason),  # may quote a non-UTF-8 name
            "updated_at": time.time(),
        }
        stmt = insert(db.files).values(**values)
        conn.execute(stmt.on_conflict_do_update(index_elements=[db.files.c.path_key], set_=values))
        self._files_written += 1

    def _skip(self, conn: Connection, f: FoundFile, sha: str | None, reason: str) -> None:
        log.info("skipping %s: %s", f.path, reason)
        self._write_file(conn, f, sha, None, reason)
        self.report.skipped.append((str(f.path), reason))

    # --- images -------------------------------------------------------------------------------
    def embed_images(self, groups: list[tuple[str, list[FoundFile]]]) -> None:
        if not groups:
            return
        emb = self.embedder
        # With several model streams (ONNX sessions), that many batches are embedded at once, each whole
        # on one stream, and committed one at a time, in order.
        streams = getattr(emb, "image_streams", 1)
        bs = image_batch_size(emb)

        def decode(item: tuple[str, list[FoundFile]]) -> _Decoded:
            sha, group = item
            try:
                # Decode JPEGs at reduced scale: a 1600x1200 photo for a 256-px model decodes at 400x300.
                image = load_image(group[0].path, draft_size=getattr(emb, "input_size", None))
                return sha, group, emb.preprocess_image(image), None
            except BadMediaError as e:
                return sha, group, None, str(e)

        in_flight: deque[tuple[list[_Decoded], Future[np.ndarray] | None]] = deque()
        done = 0
        with ThreadPoolExecutor(self.workers) as pool:
            decoded = bounded_map(decode, groups, pool, ahead=2 * bs)
            while True:
                batch = _take(decoded, bs)
                if batch:
                    in_flight.append((batch, self._start_embedding(batch)))
                if in_flight and (len(in_flight) >= streams or not batch):
                    first, future = in_flight.popleft()
                    self._commit_images(first, future.result() if future is not None else None)
                    done += len(first)
                    self.tick("images", done, len(groups))
                if not batch and not in_flight:
                    break

    def _start_embedding(self, batch: list[_Decoded]) -> Future[np.ndarray] | None:
        tensors = [t for _, _, t, err in batch if err is None]
        if not tensors:
            return None
        # numpy, not torch.stack: torch copies with its OpenMP threads, which then spin waiting for more work
        # on the cores the model streams and the decoders need (the tensors are CPU tensors: no copy here).
        stacked = np.stack([np.asarray(t) for t in tensors])
        submit = getattr(self.embedder, "submit_image_tensors", None)
        if submit is not None:
            return submit(stacked)
        done: Future[np.ndarray] = Future()
        done.set_result(self.embedder.embed_image_tensors(stacked))
        return done

    def _commit_images(self, batch: list[_Decoded], vectors: np.ndarray | None) -> None:
        good = [(sha, g, t) for sha, g, t, err in batch if err is None]
        if vectors is not None:
            self._load_vectors("image")
        with self.store.catalog.begin() as conn:
            media_ids = []
            for sha, group, _ in good:
                res = conn.execute(db.media.insert().values(sha256=sha, kind="image"))
                mid = db.inserted_id(res)
                media_ids.append(mid)
                for f in group:
                    self._write_file(conn, f, sha, mid)
            ids = db.add_embeddings(conn, "image", vectors, media_ids) if vectors is not None else []
            for sha, group, _, err in batch:
                if err is not None:
                    for f in group:
                        self._skip(conn, f, sha, err)
        if vectors is not None:
            self.store.apply("image", (np.asarray(ids, np.int64), vectors), None)
            self.report.images_embedded += len(good)

    # --- audio --------------------------------------------------------------------------------
    def transcribe_audio(self, groups: list[tuple[str, list[FoundFile]]]) -> None:
        for i, (sha, group) in enumerate(groups):
            self.tick("audio", i, len(groups))
            f = group[0]
            try:
                transcript = self.transcriber.transcribe(f.path)
                reason = None if transcript.segments else "no speech detected"
            except BadMediaError as e:
                transcript, reason = None, str(e)
            except MmsearchError:
                raise  # missing weights or dependency: the whole run cannot go on
            except Exception as e:  # a decoder library failing on one file must not stop the run
                log.exception("transcription failed for %s", f.path)
                transcript, reason = None, f"transcription failed: {type(e).__name__}: {e}"
            if transcript is None or reason is not None:
                with self.store.catalog.begin() as conn:
                    for g in group:
                        self._skip(conn, g, sha, reason or "no speech detected")
                continue
            self._commit_audio(group, sha, transcript)
        self.tick("audio", len(groups), len(groups))

    def _commit_audio(self, group: list[FoundFile], sha: str, transcript: Any) -> None:
        texts = [s.text for s in transcript.segments]
        spans = [(i, s.start, s.end) for i, s in enumerate(transcript.segments)]
        if len(texts) > 1 and transcript.duration <= WHOLE_TRANSCRIPT_MAX_SECONDS:
            texts.append(transcript.text)
            spans.append((-1, transcript.segments[0].start, transcript.segments[-1].end))
        vectors = self.embedder.embed_texts(texts)
        self._load_vectors("segment")
        with self.store.catalog.begin() as conn:
            res = conn.execute(
                db.media.insert().values(
                    sha256=sha,
                    kind="audio",
                    duration=transcript.duration,
                    language=transcript.language,
                    transcript=transcript.text,
                )
            )
            mid = db.inserted_id(res)
            seg_ids = []
            for text, (idx, start, end) in zip(texts, spans, strict=True):
                r = conn.execute(
                    db.segments.insert().values(media_id=mid, idx=idx, start=start, end=end, text=text)
                )
                seg_ids.append(db.inserted_id(r))
            ids = db.add_embeddings(conn, "segment", vectors, seg_ids)
            for f in group:
                self._write_file(conn, f, sha, mid)
        self.store.apply("segment", (np.asarray(ids, np.int64), vectors), None)
        self.report.audio_transcribed += 1
        self.report.segments_embedded += len(texts)

    # --- captions -----------------------------------------------------------------------------
    def sync_captions(self, root: Path, wanted: dict[Path, list[Caption]]) -> None:
        """Make each image's captions equal to what the folder says; only changed captions are embedded."""
        rows = self._rows_under(root)
        ok_images = {key: r for key, r in rows.items() if r.kind == "image" and r.status == "ok"}
        have = self.store.catalog.captions_of([r.id for r in rows.values() if r.kind == "image"])
        # Sources are stored as valid UTF-8 (a sidecar's name may not be): compare in that form.
        wanted_by_key = {
            db.path_key(p): [Caption(c.text, db.storable(c.source)) for c in cs] for p, cs in wanted.items()
        }
        to_remove: list[int] = []
        to_add: list[tuple[int, Caption]] = []
        for key, row in rows.items():
            current = have.get(row.id, [])
            if not current and key not in wanted_by_key:
                continue  # the common case in a large folder: nothing to compare
            desired = Counter(wanted_by_key.get(key, [])) if key in ok_images else Counter()
            for cid, source, text in current:
                c = Caption(text, source)
                if desired[c] > 0:
                    desired[c] -= 1
                else:
                    to_remove.append(cid)
            to_add.extend((row.id, c) for c, n in desired.items() for _ in range(n))
        if to_remove or to_add:
            self._load_vectors("caption")
        # Additions go first, so that the captions of a renamed or moved image are still in the catalog
        # when their texts are looked up (a crash in between leaves extra captions the next run removes).
        bs = 256
        for i in range(0, len(to_add), bs):
            self.tick("captions", i, len(to_add))
            chunk = to_add[i : i + bs]
            vectors = self._caption_vectors([c.text for _, c in chunk])
            with self.store.catalog.begin() as conn:
                cids = []
                for fid, c in chunk:
                    r = conn.execute(db.captions.insert().values(file_id=fid, source=c.source, text=c.text))
                    cids.append(db.inserted_id(r))
                ids = db.add_embeddings(conn, "caption", vectors, cids)
            self.store.apply("caption", (np.asarray(ids, np.int64), vectors), None)
            self.report.captions_added += len(chunk)
        if to_add:
            self.tick("captions", len(to_add), len(to_add))
        if to_remove:
            with self.store.catalog.begin() as conn:
                removed = db.delete_embeddings(conn, db.embeddings.c.caption_id.in_(to_remove))
                conn.execute(db.captions.delete().where(db.captions.c.id.in_(to_remove)))
            self.store.apply("caption", None, np.asarray(removed.get("caption", []), np.int64))
            self.report.captions_removed += len(to_remove)

    def _caption_vectors(self, texts: list[str]) -> np.ndarray:
        """One vector per text: a text already in the catalog keeps its vector (one index, one model: the
        text tower would give the same one), the rest are embedded once each."""
        known = self.store.catalog.caption_vectors(texts, self.store.dim)
        new = list(dict.fromkeys(t for t in texts if t not in known))
        if new:
            known.update(zip(new, self.embedder.embed_texts(new), strict=True))
            self.report.captions_embedded += len(new)
        return np.stack([known[t] for t in texts]).astype(np.float32, copy=False)

    def _any(self, query: Any) -> bool:
        with self.store.catalog.read() as conn:
            return conn.execute(query).first() is not None

    def _rows_under(self, root: Path) -> dict[bytes, db.FileRow]:
        prefix = db.path_key(root).rstrip(b"/") + b"/"
        if self._files_written:  # re-read only when this run changed the files table
            self.existing = self.store.catalog.files_by_key()
            self._files_written = 0
        return {k: r for k, r in self.existing.items() if k.startswith(prefix)}

    # --- deletions ----------------------------------------------------------------------------
    def remove_missing(self, root: Path, seen: set[bytes], kept: tuple[bytes, ...] = ()) -> None:
        """Forget files under ``root`` that are gone (except under ``kept`` folder prefixes), then content
        no file refers to any more."""
        gone = [r for k, r in self._rows_under(root).items() if k not in seen and not k.startswith(kept)]
        used = select(db.files.c.media_id).where(db.files.c.media_id.is_not(None))
        if gone or self._any(select(db.media.c.id).where(db.media.c.id.not_in(used)).limit(1)):
            self._load_vectors(*db.VECTOR_KINDS)
        removed: dict[str, list[int]] = {}
        with self.store.catalog.begin() as conn:
            if gone:
                ids = [r.id for r in gone]
                cap_ids = select(db.captions.c.id).where(db.captions.c.file_id.in_(ids))
                _merge(removed, db.delete_embeddings(conn, db.embeddings.c.caption_id.in_(cap_ids)))
                conn.execute(db.captions.delete().where(db.captions.c.file_id.in_(ids)))
                conn.execute(db.files.delete().where(db.files.c.id.in_(ids)))
            orphan_rows = conn.execute(
                select(db.media.c.id, db.media.c.sha256).where(db.media.c.id.not_in(used))
            )
            orphans, orphan_shas = [], set()
            for mid, sha in orphan_rows:
                orphans.append(int(mid))
                orphan_shas.add(sha)
            if orphans:
                seg_ids = select(db.segments.c.id).where(db.segments.c.media_id.in_(orphans))
                _merge(removed, db.delete_embeddings(conn, db.embeddings.c.media_id.in_(orphans)))
                _merge(removed, db.delete_embeddings(conn, db.embeddings.c.segment_id.in_(seg_ids)))
                conn.execute(db.segments.delete().where(db.segments.c.media_id.in_(orphans)))
                conn.execute(db.media.delete().where(db.media.c.id.in_(orphans)))
        for kind, ids_ in removed.items():
            self.store.apply(kind, None, np.asarray(ids_, np.int64))
        self.store.drop_thumbnails(orphan_shas)  # after the commit: a crash before it keeps them, harmlessly
        self.report.files_removed += len(gone)


def _media_of_kind(conn: Connection, sha: str, kind: str) -> int | None:
    row = conn.execute(select(db.media.c.id).where(db.media.c.sha256 == sha, db.media.c.kind == kind)).first()
    return int(row[0]) if row else None


def _take(it: Iterator[T], n: int) -> list[T]:
    out = []
    for item in it:
        out.append(item)
        if len(out) == n:
            break
    return out


def _merge(into: dict[str, list[int]], more: dict[str, list[int]]) -> None:
    for kind, ids in more.items():
        into.setdefault(kind, []).extend(ids)
