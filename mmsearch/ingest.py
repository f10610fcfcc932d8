"""Index a folder: scan → hash → decode/transcribe → embed → store, incrementally.

Work is decided by content: a file whose size and mtime are unchanged is not read again; a new or changed
file is hashed, and content already in the catalog (a moved, renamed or duplicated file) is linked, never
re-embedded. Every batch is committed in one transaction together with its embeddings, so a crash loses at
most the batches in flight (one per model stream) and never leaves a half-written item. One bad file is
recorded and skipped.

What cannot be seen is not taken for gone. A folder of the catalog that this run cannot see (an unreadable
folder, a broken link to a folder, an unplugged drive's empty mount point, the indexed folder itself missing
or empty) keeps its files, their content and vectors: forgetting them over a transient condition would
throw away hours of embedding and transcription. They are listed in ``IngestReport.unavailable`` and in the
catalog's meta (for ``status``), and removed only with ``prune=True``. A file whose parent folder is
readable and which is really gone is forgotten as always.

One file cannot stall a run: each image decode has a time budget (:data:`IMAGE_DECODE_BUDGET_SECONDS`);
a decode that overruns it is recorded as skipped and the run goes on without waiting for it.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from sqlalchemy import Connection, select

from mmsearch import db
from mmsearch.errors import BadMediaError, MmsearchError
from mmsearch.identity import sha256_file
from mmsearch.images import load_image
from mmsearch.scan import (
    BROKEN_LINK_REASON,
    OUTSIDE_LINK_REASON,
    UNREADABLE_FOLDER_REASON,
    Caption,
    FoundFile,
    ScanResult,
    kind_of,
    scan,
)
from mmsearch.store import Store

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): stages are scan, hash, images, audio, captions, cleanup, save."""

# A transcript this short is also embedded whole, so a query can match words spread over segments.
WHOLE_TRANSCRIPT_MAX_SECONDS = 30.0
# Longest an image decode (and its preprocessing) may take before the file is skipped. Pillow cannot be
# interrupted inside one C call: the run stops waiting for it and leaves its thread behind.
IMAGE_DECODE_BUDGET_SECONDS = 60.0
# Catalog meta keys: folders seen as mount points (an unmounted one is an empty folder), and what the
# last run of each indexed folder kept because it could not be seen.
MOUNT_POINTS_META = "scan.mount_points"
UNAVAILABLE_META = "ingest.unavailable"
ROOT_EMPTY_REASON = "folder is empty (a drive not mounted?)"
EMPTY_MOUNT_REASON = "empty mount point (a drive not mounted?)"
ROOT_MISSING_REASON = "folder not found"


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
    # Folders (or links) the catalog holds files under that this run could not see, and the number of
    # catalog files kept under them; removed only with prune=True.
    unavailable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    kept_unavailable: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        d["unavailable"] = [{"path": p, "reason": r} for p, r in self.unavailable]
        return d


def ingest(
    store: Store,
    root: str | Path,
    *,
    embedder: Callable[[], Embedder],
    transcriber: Callable[[], Any],
    progress: Progress | None = None,
    workers: int = 2,
    follow_links: bool = False,
    prune: bool = False,
) -> IngestReport:
    """Bring the index up to date with ``root``. ``embedder``/``transcriber`` are called only if needed.

    ``follow_links``: also index what links pointing outside ``root`` lead to (see :mod:`mmsearch.scan`).
    ``prune``: forget the files of folders that cannot be seen (see the module docstring) instead of
    keeping them.
    """
    started = time.monotonic()
    root = Path(os.path.abspath(root))
    report = IngestReport(root=str(root))
    if not root.is_dir():
        return _missing_root(store, root, report, prune, embedder, transcriber, started)
    # The model's objects (about 400k for ViT-B-32) would be walked by every full garbage collection:
    # 0.2 s each here, 5 % of indexing 300 photos. Set aside while indexing; a caller's own freeze is kept.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        return _ingest(
            store, root, report, embedder, transcriber, progress, workers, started, follow_links, prune
        )
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
    follow_links: bool,
    prune: bool,
) -> IngestReport:
    tick = progress or (lambda stage, done, total: None)
    tick("scan", 0, 1)
    found = scan(root, follow_links=follow_links)
    tick("scan", 1, 1)
    report.files_seen = len(found.files)
    report.skipped.extend((str(p), reason) for p, reason in found.problems)
    run = _Run(store, report, tick, embedder, transcriber, workers)
    seen = {db.path_key(f.path) for f in found.files}
    rows = run.rows_under(root)
    known_mounts = _known_mount_points(store)
    # What the catalog holds that this run could not see is kept (see the module docstring).
    unseen = [k for k in rows if k not in seen]
    unavailable = [] if prune else unavailable_folders(found, unseen, known_mounts)
    kept = tuple(_folder_prefix(db.path_key(p)) for p, _ in unavailable)
    kept_keys = {db.path_key(p) for p, _ in unavailable}
    report.unavailable = [(str(p), reason) for p, reason in unavailable]
    report.kept_unavailable = sum(1 for k in unseen if k in kept_keys or k.startswith(kept))
    seen |= run.record_problems(found.problems, seen, keep=kept_keys)
    pending = run.hash_new_files(found.files)
    run.embed_images([(sha, group) for sha, group in pending.items() if group[0].kind == "image"])
    run.transcribe_audio([(sha, group) for sha, group in pending.items() if group[0].kind == "audio"])
    run.sync_captions(root, found.captions, kept, kept_keys)
    run.remove_missing(root, seen, kept)
    tick("save", 0, 1)
    store.save_vectors()
    tick("save", 1, 1)
    mounts = {db.path_key(p) for p in found.mount_points} | {
        k for k in known_mounts if k in kept_keys or k.startswith(kept)
    }
    _record_unavailable(store, root, report, mounts)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _missing_root(
    store: Store,
    root: Path,
    report: IngestReport,
    prune: bool,
    embedder: Callable[[], Embedder],
    transcriber: Callable[[], Any],
    started: float,
) -> IngestReport:
    """``root`` is not a folder now: an error if the catalog holds nothing under it (a typo), else its
    files are kept (an unplugged drive), or forgotten with ``prune``."""
    key = db.path_key(root)
    run = _Run(store, report, lambda stage, done, total: None, embedder, transcriber, 1)
    held = run.rows_under(root)
    if not held:
        raise MmsearchError(f"not a folder: {root}")
    if prune:
        run.remove_missing(root, set(), ())
        store.save_vectors()
    else:
        if root.is_symlink():
            reason = BROKEN_LINK_REASON
        else:
            reason = "not a folder" if os.path.lexists(root) else ROOT_MISSING_REASON
        report.unavailable = [(str(root), reason)]
        report.kept_unavailable = len(held)
    prefix = _folder_prefix(key)
    mounts = set() if prune else {m for m in _known_mount_points(store) if m == key or m.startswith(prefix)}
    _record_unavailable(store, root, report, mounts)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _folder_prefix(key: bytes) -> bytes:
    return key.rstrip(b"/") + b"/"


def unavailable_folders(
    found: ScanResult, unseen: list[bytes], known_mounts: set[bytes]
) -> list[tuple[Path, str]]:
    """The folders (or links) that this scan could not see and under which the catalog holds ``unseen``
    files: those files are not known to be gone. Pure: a function of the scan and the catalog's keys.

    Candidates: unreadable folders; broken links and links not followed (a drive reached through a link,
    or indexed with follow_links earlier); the indexed folder itself when empty; an empty folder that is or
    was a mount point. A folder that was simply deleted is none of these: its files are forgotten.
    """
    if not unseen:
        return []  # the common case: nothing the catalog holds went missing
    candidates: list[tuple[Path, str]] = [
        (p, reason)
        for p, reason in found.problems
        if reason.startswith(UNREADABLE_FOLDER_REASON) or reason in (BROKEN_LINK_REASON, OUTSIDE_LINK_REASON)
    ]
    mounts = known_mounts | {db.path_key(p) for p in found.mount_points}
    for folder in found.empty_folders:
        if folder == found.root:
            candidates.append((folder, ROOT_EMPTY_REASON))
        elif db.path_key(folder) in mounts:
            candidates.append((folder, EMPTY_MOUNT_REASON))
    out = []
    for path, reason in candidates:
        key = db.path_key(path)
        prefix = _folder_prefix(key)
        if any(k == key or k.startswith(prefix) for k in unseen):
            out.append((path, reason))
    return out


def _known_mount_points(store: Store) -> set[bytes]:
    return {os.fsencode(p) for p in store.catalog.get_meta(MOUNT_POINTS_META, [])}


def _record_unavailable(
    store: Store, root: Path, report: IngestReport, mounts_under_root: set[bytes]
) -> None:
    """Remember the mount points seen under ``root`` and what this run kept; written only when changed,
    so that a no-op re-index stays a read-only run."""
    key = db.path_key(root)
    prefix = _folder_prefix(key)
    old_mounts = _known_mount_points(store)
    mounts = {m for m in old_mounts if m != key and not m.startswith(prefix)} | mounts_under_root
    if mounts != old_mounts:
        store.catalog.set_meta(MOUNT_POINTS_META, sorted(os.fsdecode(m) for m in mounts))
    old: dict[str, dict[str, Any]] = store.catalog.get_meta(UNAVAILABLE_META, {})
    new = dict(old)
    shown = db.display_path(key)
    new.pop(shown, None)
    if report.unavailable:
        new[shown] = {
            "files_kept": report.kept_unavailable,
            "folders": [
                {"path": db.display_path(db.path_key(p)), "reason": db.storable(r)}
                for p, r in report.unavailable
            ],
        }
    if new != old:
        store.catalog.set_meta(UNAVAILABLE_META, new)


def unavailable_summary(store: Store) -> list[dict[str, Any]]:
    """What the last run of each indexed folder kept because it could not be seen (for ``status``)."""
    recorded: dict[str, dict[str, Any]] = store.catalog.get_meta(UNAVAILABLE_META, {})
    return [
        {"root": root, "files_kept": entry["files_kept"], "folders": entry["folders"]}
        for root, entry in sorted(recorded.items())
    ]


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


class _Task(Future[R]):
    """A future that knows when its call started running (None while it waits for a thread)."""

    started: float | None = None


class DecodePool:
    """A fixed number of daemon threads running calls, for decoders that may hang.

    Unlike ``ThreadPoolExecutor``, a thread stuck in one C call (Pillow cannot be interrupted) blocks
    neither :meth:`close` nor the interpreter's exit (which joins every executor thread), and a caller
    that gives up on a call gets a replacement thread (:meth:`replace_stuck_worker`), so the rest of the
    work keeps its parallelism.
    """

    def __init__(self, workers: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[_Task[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._threads = 0
        for _ in range(max(1, workers)):
            self._spawn()

    def _spawn(self) -> None:
        threading.Thread(target=self._work, name="mmsearch-decode", daemon=True).start()
        self._threads += 1

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            task, call = job
            if not task.set_running_or_notify_cancel():
                continue
            task.started = time.monotonic()
            try:
                task.set_result(call())
            except BaseException as e:  # handed to the waiting caller, as ThreadPoolExecutor does
                task.set_exception(e)

    def submit(self, fn: Callable[[T], R], item: T) -> _Task[R]:
        task: _Task[R] = _Task()
        self._jobs.put((task, lambda: fn(item)))
        return task

    def replace_stuck_worker(self) -> None:
        self._spawn()

    def close(self) -> None:
        """Let idle threads end once the queue is drained; never waits (a stuck thread stays behind)."""
        for _ in range(self._threads):
            self._jobs.put(None)


def wait_within(task: _Task[R], budget: float | None) -> R:
    """``task``'s result, or :class:`TimeoutError` once it has been running longer than ``budget`` seconds
    (time spent waiting for a free thread does not count)."""
    if budget is None:
        return task.result()
    while True:
        started = task.started
        remaining = budget if started is None else started + budget - time.monotonic()
        try:
            return task.result(timeout=max(remaining, 0.0))
        except FutureTimeout:
            if task.started is not None and time.monotonic() - task.started >= budget:
                raise TimeoutError from None


def bounded_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    pool: DecodePool,
    ahead: int,
    *,
    budget: float | None = None,
    on_timeout: Callable[[T], R] | None = None,
) -> Iterator[R]:
    """Like ``pool.map`` but with at most ``ahead`` results in flight, so memory stays bounded. A call that
    runs longer than ``budget`` seconds is given up: ``on_timeout(item)`` is yielded in its place and the
    pool gets a thread to replace the stuck one."""
    pending: deque[tuple[T, _Task[R]]] = deque()

    def next_result() -> R:
        item, task = pending.popleft()
        try:
            return wait_within(task, budget)
        except TimeoutError:
            if on_timeout is None:
                raise
            pool.replace_stuck_worker()
            return on_timeout(item)

    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= ahead:
            yield next_result()
    while pending:
        yield next_result()


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
    def record_problems(
        self, problems: list[tuple[Path, str]], found: set[bytes], keep: set[bytes] | None = None
    ) -> set[bytes]:
        """Record what the scan could not read (broken symlinks, special files, unreadable caption files
        or folders) as skipped rows, so ``mmsearch status`` lists them; returns their keys. The rows of
        ``keep`` (an indexed file behind a link now broken or not followed) are left as they are."""
        reasons: dict[bytes, tuple[Path, list[str]]] = {}
        for path, reason in problems:
            key = db.path_key(path)
            if key not in found:  # a media file's own row says more than a problem about it
                reasons.setdefault(key, (path, []))[1].append(reason)
        keys = set(reasons)
        for key in (keep or set()) & keys:
            row = self.existing.get(key)
            if row is not None and row.status == "ok":
                del reasons[key]
        if not reasons:
            return keys
        with self.store.catalog.begin() as conn:
            for key, (path, why) in reasons.items():
                row = self.existing.get(key)
                if row is not None and row.status == "skipped" and row.reason == "; ".join(why):
                    continue  # recorded by an earlier run: no write, so a no-op re-index stays cheap
                # size/mtime -1: never matches a real file, so a fixed file is hashed on the next run.
                f = FoundFile(path, kind_of(path) or "other", -1, -1)
                self._write_file(conn, f, None, None, "; ".join(why))
        return keys

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

        budget = IMAGE_DECODE_BUDGET_SECONDS  # read at each run, so that a test can lower it

        def overran(item: tuple[str, list[FoundFile]]) -> _Decoded:
            log.warning("gave up decoding %s after %g s", item[1][0].path, budget)
            return item[0], item[1], None, f"decoding took longer than {budget:g} s"

        in_flight: deque[tuple[list[_Decoded], Future[np.ndarray] | None]] = deque()
        done = 0
        pool = DecodePool(self.workers)
        try:
            decoded = bounded_map(decode, groups, pool, ahead=2 * bs, budget=budget, on_timeout=overran)
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
        finally:
            pool.close()  # never joins: a decode still stuck in Pillow must not hold the run (or its lock)

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
    def sync_captions(
        self,
        root: Path,
        wanted: dict[Path, list[Caption]],
        kept: tuple[bytes, ...] = (),
        kept_keys: set[bytes] | None = None,
    ) -> None:
        """Make each image's captions equal to what the folder says; only changed captions are embedded.
        Images under ``kept`` folder prefixes or in ``kept_keys`` (not seen by this run) keep theirs."""
        rows = self.rows_under(root)
        if kept or kept_keys:
            rows = {k: r for k, r in rows.items() if not k.startswith(kept) and k not in (kept_keys or ())}
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

    def rows_under(self, root: Path) -> dict[bytes, db.FileRow]:
        prefix = db.path_key(root).rstrip(b"/") + b"/"
        if self._files_written:  # re-read only when this run changed the files table
            self.existing = self.store.catalog.files_by_key()
            self._files_written = 0
        return {k: r for k, r in self.existing.items() if k.startswith(prefix)}

    # --- deletions ----------------------------------------------------------------------------
    def remove_missing(self, root: Path, seen: set[bytes], kept: tuple[bytes, ...] = ()) -> None:
        """Forget files under ``root`` that are gone (except under ``kept`` folder prefixes), then content
        no file refers to any more."""
        gone = [r for k, r in self.rows_under(root).items() if k not in seen and not k.startswith(kept)]
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
