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
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from mmsearch import db
from mmsearch.errors import BadMediaError, MmsearchError
from mmsearch.identity import sha256_file, speech_key
from mmsearch.images import load_image
from mmsearch.ingest_video import commit_video, read_video, save_frame_thumb, skip_reason
from mmsearch.photo_meta import EMBEDDED_SOURCE, PhotoMeta, read_embedded, read_sidecar
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
from mmsearch.sidecars import Sidecar
from mmsearch.store import Store, WriteUnit

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): stages are scan, hash, metadata, images, audio, captions, cleanup, save."""

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
    """What ingestion asks of the model (:class:`mmsearch.model.ClipEmbedder` provides it)."""

    dim: int
    batch_size: int
    #: The model's input side: JPEGs are decoded at the smallest scale still at least this large.
    input_size: int

    @property
    def image_streams(self) -> int:
        """How many image batches :meth:`submit_image_tensors` runs at once."""
        ...

    def preprocess_image(self, image: Any) -> Any: ...
    def embed_image_tensors(self, batch: Any) -> np.ndarray: ...
    def submit_image_tensors(self, batch: Any) -> Future[np.ndarray]:
        """:meth:`embed_image_tensors` of a stacked batch, run in the background when the model has
        several streams (already done when it has one)."""
        ...

    def embed_texts(self, texts: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class ImageDone:
    """An image content embedded elsewhere (see :class:`RemoteWork`), or why it could not be."""

    sha256: str
    error: str | None


@dataclass(frozen=True)
class AudioDone:
    """An audio content transcribed and its texts embedded elsewhere, or why it has no transcript."""

    sha256: str
    transcript: Any  # mmsearch.transcribe.Transcript, or None with an error
    error: str | None
    vectors: np.ndarray | None  # one per text of transcript_spans(transcript)


class RemoteWork(Protocol):
    """Model work done outside this process (:class:`mmsearch.ray_ingest.RayWork`, on a Ray cluster): the
    run still plans, hashes and commits here, and hands over only the new images and audio content."""

    def images(self, items: list[tuple[str, Path]]) -> Iterator[tuple[list[ImageDone], np.ndarray]]:
        """(content hash, a file holding it) → per batch, in any order: each content's result and the
        vectors of those without an error, in their order. Each content comes back once."""
        ...

    def transcripts(self, items: list[tuple[str, Path]]) -> Iterator[AudioDone]:
        """(content hash, a file holding it) → each content's transcript and vectors, once, in any order."""
        ...

    def hashes(self, paths: list[Path]) -> dict[Path, str | OSError]:
        """Each file's sha256, or the error reading it raised; a file left out is hashed here (all of them
        when the remote judges it not worth its while)."""
        ...


@dataclass
class IngestReport:
    root: str
    files_seen: int = 0
    unchanged: int = 0
    images_embedded: int = 0
    audio_transcribed: int = 0
    segments_embedded: int = 0
    videos_indexed: int = 0
    frames_embedded: int = 0
    linked: int = 0  # moved, renamed or duplicate content: no model work
    captions_added: int = 0
    captions_embedded: int = 0  # of those, the texts the model had to embed (not already in the index)
    captions_removed: int = 0
    files_removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run
    # Folders and media files left out on purpose (hidden, cache folder, .mmsearchignore, exclude pattern),
    # with why; what the catalog held there is forgotten (see mmsearch.scan). Hidden media files: counted.
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run
    hidden_files: int = 0
    # Metadata that could not be read (an XMP bomb, a Takeout JSON that is not JSON): the photo is indexed
    # without it. (path of the photo or sidecar, reason)
    metadata_problems: list[tuple[str, str]] = field(default_factory=list)
    # Videos indexed with part of what they hold: a picture that stopped decoding part-way, or that could
    # not be read while the speech could (path, what was left out and why).
    partial: list[tuple[str, str]] = field(default_factory=list)
    # Folders (or links) the catalog holds files under that this run could not see, and the number of
    # catalog files kept under them; removed only with prune=True.
    unavailable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    kept_unavailable: int = 0
    # Items embedded by the model being re-embedded to (see mmsearch.reembed), when one is.
    target_embedded: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["skipped"] = [{**db.path_json(os.fsencode(p)), "reason": r} for p, r in self.skipped]
        d["unavailable"] = [{**db.path_json(os.fsencode(p)), "reason": r} for p, r in self.unavailable]
        d["excluded"] = [{**db.path_json(os.fsencode(p)), "reason": r} for p, r in self.excluded]
        d["partial"] = [{**db.path_json(os.fsencode(p)), "reason": r} for p, r in self.partial]
        d["metadata_problems"] = [
            {**db.path_json(os.fsencode(p)), "reason": r} for p, r in self.metadata_problems
        ]
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
    exclude: Iterable[str] = (),
    include_hidden: bool = False,
    remote: RemoteWork | None = None,
) -> IngestReport:
    """Bring the index up to date with ``root``. ``embedder``/``transcriber`` are called only if needed.

    ``remote``: where new images and audio are embedded and transcribed (a Ray cluster); captions and
    videos are still embedded here, with ``embedder``.

    ``follow_links``: also index what links pointing outside ``root`` lead to (see :mod:`mmsearch.scan`).
    ``exclude`` (gitignore patterns relative to ``root``), ``include_hidden``: what to leave out, with the
    ``.mmsearchignore`` files (see :mod:`mmsearch.scan`). What the catalog holds that is now left out is
    forgotten by this run, like a deleted file. Raises ConfigError for an invalid pattern.
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
            store,
            root,
            report,
            embedder,
            transcriber,
            progress,
            workers,
            started,
            follow_links,
            prune,
            exclude,
            include_hidden,
            remote,
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
    exclude: Iterable[str] = (),
    include_hidden: bool = False,
    remote: RemoteWork | None = None,
) -> IngestReport:
    tick = progress or (lambda stage, done, total: None)
    tick("scan", 0, 1)
    found = scan(root, follow_links=follow_links, exclude=exclude, include_hidden=include_hidden)
    tick("scan", 1, 1)
    report.files_seen = len(found.files)
    report.skipped.extend((str(p), reason) for p, reason in found.problems)
    report.excluded = [(str(p), reason) for p, reason in found.excluded]
    report.hidden_files = found.hidden_files
    run = _Run(store, report, tick, embedder, transcriber, workers, remote)
    run.sidecars = found.sidecars
    known_mounts = _known_mount_points(store)
    plan = plan_run(found, run.existing, known_mounts, prune=prune)
    report.unavailable = [(str(p), reason) for p, reason in plan.unavailable]
    report.kept_unavailable = plan.kept_unavailable
    report.unchanged += plan.unchanged
    run.record_problems(plan.problems)
    # New images are embedded chunk by chunk as their files are hashed (see hash_chunks): the first batch is
    # committed, and searchable, after a few files are read rather than the whole folder. Audio and video
    # follow, their contents gathered over every chunk.
    pending: dict[str, list[FoundFile]] = {}
    hashed = images_done = 0
    images_total = sum(1 for f in plan.to_hash if f.kind == "image")
    chunks = hash_chunks(plan.to_hash, whole=remote is not None)
    ahead: Future[dict[Path, str | OSError]] | None = None
    for n, chunk in enumerate(chunks):
        read = ahead.result() if ahead is not None else None
        found_new = run.hash_new_files(chunk, read=read, done_before=hashed, total=len(plan.to_hash))
        hashed += len(chunk)
        if n + 1 < len(chunks):  # the next chunk's files are read and hashed while this chunk's images embed
            ahead = _in_background(
                "mmsearch-hash-ahead", hash_paths, [f.path for f in chunks[n + 1] if f.size]
            )
        images = [(sha, group) for sha, group in found_new.items() if group[0].kind == "image"]
        run.embed_images(images, done_before=images_done, total=images_total)
        images_done += len(images)
        for sha, group in found_new.items():
            if group[0].kind != "image":
                pending.setdefault(sha, []).extend(group)
    if images_done < images_total and images_done:  # fewer contents than files (shared or already known)
        tick("images", images_done, images_done)
    run.reread_photos(plan.to_reread)
    run.transcribe_audio([(sha, group) for sha, group in pending.items() if group[0].kind == "audio"])
    run.index_videos([(sha, group) for sha, group in pending.items() if group[0].kind == "video"])
    run.sync_captions(root, found.captions, plan.kept, plan.kept_keys)
    run.remove_missing(plan.to_delete)
    tick("save", 0, 1)
    store.save_vectors()
    tick("save", 1, 1)
    mounts = {db.path_key(p) for p in found.mount_points} | {
        k for k in known_mounts if k in plan.kept_keys or k.startswith(plan.kept)
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
        run.remove_missing(list(held.values()))
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


@dataclass
class IngestPlan:
    """What a run does before any file is read: a function of the scan and the catalog's rows (see
    :func:`plan_run`). What to embed and what to link is known only once the files to hash are hashed."""

    #: New or changed files (size or mtime differ from the catalog's row): hashed, then linked to known
    #: content or embedded.
    to_hash: list[FoundFile]
    #: Files whose row is current: nothing to do.
    unchanged: int
    #: Of those, the images whose photo metadata was read by an older PHOTO_META_VERSION (or never): their
    #: metadata is read again, nothing else.
    to_reread: list[FoundFile]
    #: Skipped rows to write for what the scan could not read: key -> (path, reason); rows already saying
    #: so are left out, so that a no-op re-index writes nothing.
    problems: dict[bytes, tuple[Path, str]]
    #: The folders (or links) that could not be seen, with why; their files are kept (see the module
    #: docstring), as are the files under the ``kept`` folder prefixes and at the ``kept_keys``.
    unavailable: list[tuple[Path, str]]
    kept: tuple[bytes, ...]
    kept_keys: set[bytes]
    #: How many catalog files were kept because they could not be seen.
    kept_unavailable: int
    #: The catalog's files that are gone: forgotten, with their captions (and content no file holds).
    to_delete: list[db.FileRow]


def plan_run(
    found: ScanResult, rows: dict[bytes, db.FileRow], known_mounts: set[bytes], *, prune: bool = False
) -> IngestPlan:
    """The plan of a run over ``found.root`` given the catalog's file ``rows`` (by path key) and the
    folders known to be mount points. Pure: no model, no database, no file system."""
    seen = {db.path_key(f.path) for f in found.files}
    prefix = _folder_prefix(db.path_key(found.root))
    under_root = [k for k in rows if k.startswith(prefix)]
    # What the catalog holds that this run could not see is kept (see the module docstring).
    unseen = [k for k in under_root if k not in seen]
    unavailable = [] if prune else unavailable_folders(found, unseen, known_mounts)
    kept = tuple(_folder_prefix(db.path_key(p)) for p, _ in unavailable)
    kept_keys = {db.path_key(p) for p, _ in unavailable}
    problem_keys, problems = _problem_rows(found.problems, seen, kept_keys, rows)
    seen |= problem_keys
    to_hash, unchanged, to_reread = [], 0, []
    for f in found.files:
        row = rows.get(db.path_key(f.path))
        if row is not None and row.size == f.size and row.mtime_ns == f.mtime_ns:
            unchanged += 1
            if (
                row.kind == "image"
                and row.status == "ok"
                and _metadata_stale(row, found.sidecars.get(str(f.path)))
            ):
                to_reread.append(f)
        else:
            to_hash.append(f)
    return IngestPlan(
        to_hash=to_hash,
        unchanged=unchanged,
        to_reread=to_reread,
        problems=problems,
        unavailable=unavailable,
        kept=kept,
        kept_keys=kept_keys,
        kept_unavailable=sum(1 for k in unseen if k in kept_keys or k.startswith(kept)),
        to_delete=[rows[k] for k in under_root if k not in seen and not k.startswith(kept)],
    )


def _metadata_stale(row: db.FileRow, sidecars: list[Sidecar] | None) -> bool:
    """Whether an unchanged image's metadata must be read again: read by an older PHOTO_META_VERSION (or
    never), or one of its metadata sidecars changed or appeared since its row was written."""
    if row.meta_version != db.PHOTO_META_VERSION:
        return True
    written_ns = row.updated_at * 1e9
    return any(changed > written_ns for _, changed in sidecars or ())


def _problem_rows(
    problems: list[tuple[Path, str]], found: set[bytes], keep: set[bytes], rows: dict[bytes, db.FileRow]
) -> tuple[set[bytes], dict[bytes, tuple[Path, str]]]:
    """What the scan could not read (broken symlinks, special files, unreadable caption files or folders)
    becomes skipped rows, so ``mmsearch status`` lists them. Returns the keys of all of them (not gone)
    and the rows to write: the rows of ``keep`` (an indexed file behind a link now broken or not followed)
    stay as they are, and so do rows already recording the same reason."""
    reasons: dict[bytes, tuple[Path, list[str]]] = {}
    for path, reason in problems:
        key = db.path_key(path)
        if key not in found:  # a media file's own row says more than a problem about it
            reasons.setdefault(key, (path, []))[1].append(reason)
    to_write = {}
    for key, (path, why) in reasons.items():
        row = rows.get(key)
        if key in keep and row is not None and row.status == "ok":
            continue
        if row is not None and row.status == "skipped" and row.reason == "; ".join(why):
            continue  # recorded by an earlier run: no write, so a no-op re-index stays cheap
        to_write[key] = (path, "; ".join(why))
    return set(reasons), to_write


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

# Images per model call when several streams run side by side: an int8 session runs small calls a little
# faster than large ones (they stay in cache; bench_model_speed.py), and small batches leave less of a
# run's tail to one stream while the others idle.
STREAM_BATCH = 8
# Images in a run's first batch: a small one is embedded and committed soon after the model is ready, so a
# short run shows (and keeps) its first images early; the batches after it are full (bench_startup.py).
FIRST_BATCH = 2
#: New files hashed before their images are embedded, after the first chunk (see hash_chunks).
HASH_CHUNK = 1024


def hash_chunks(todo: list[FoundFile], *, whole: bool = False) -> list[list[FoundFile]]:
    """``todo`` in the chunks a run hashes, each chunk's new images embedded before the next is hashed: up to
    the FIRST_BATCH-th image file, so that a first batch is committed after a few files are read, then
    HASH_CHUNK files at a time. ``whole``: one chunk (a Ray run: each chunk would be a job of its own)."""
    if whole or not todo:
        return [todo] if todo else []
    images = [i for i, f in enumerate(todo) if f.kind == "image"]
    first = images[FIRST_BATCH - 1] + 1 if len(images) > FIRST_BATCH else len(todo)
    rest = todo[first:]
    return [todo[:first]] + [rest[i : i + HASH_CHUNK] for i in range(0, len(rest), HASH_CHUNK)]


def image_batch_size(embedder: Embedder) -> int:
    """How many images ingestion hands the embedder at once (benchmarks time the model alone the same way)."""
    streams = embedder.image_streams
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
        remote: RemoteWork | None = None,
    ) -> None:
        self.store, self.report, self.tick = store, report, tick
        self.remote = remote
        self._embedder_factory, self._transcriber_factory = embedder, transcriber
        self._embedder: Embedder | None = None
        self._embedder_loading: Future[Embedder] | None = None  # see prepare_embedder
        self._transcriber: Any = None
        self.workers = workers
        self.existing = store.catalog.files_by_key()
        self._files_written = 0  # rows of `existing` are current until this run writes a file row
        # What this run read of each image file (by path key): written with its row, and its embedded
        # captions made the file's (see sync_captions).
        self.photos: dict[bytes, PhotoMeta] = {}
        self.sidecars: dict[str, list[Sidecar]] = {}  # image path -> its metadata sidecars (the scan's)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            loading, self._embedder_loading = self._embedder_loading, None
            # A load started by prepare_embedder raises its error here, where the model is first used.
            self._embedder = loading.result() if loading is not None else self._embedder_factory()
            if gc.get_freeze_count():
                gc.freeze()  # the model just loaded joins what full collections skip (see ingest)
        return self._embedder

    def prepare_embedder(self) -> None:
        """Start loading the model in a background thread, its image streams too (an ONNX embedder makes
        its sessions when asked for them): called when hashing finds the first new image content, so that
        loading overlaps the rest of hashing instead of following it. :attr:`embedder` waits for it."""
        if self._embedder is not None or self._embedder_loading is not None:
            return

        def load() -> Embedder:
            embedder = self._embedder_factory()
            embedder.image_streams  # noqa: B018 - asking starts the sessions' loading
            return embedder

        self._embedder_loading = _in_background("mmsearch-model-load", load)

    @property
    def transcriber(self) -> Any:
        if self._transcriber is None:
            self._transcriber = self._transcriber_factory()
        return self._transcriber

    # --- files --------------------------------------------------------------------------------
    def record_problems(self, problems: dict[bytes, tuple[Path, str]]) -> None:
        """Write the skipped rows of what the scan could not read (see :func:`plan_run`)."""
        if not problems:
            return
        # size/mtime -1: never matches a real file, so a fixed file is hashed on the next run.
        found = [
            (FoundFile(path, kind_of(path) or "other", -1, -1), reason) for path, reason in problems.values()
        ]
        with self.store.write() as tx:
            self._write(tx, [r for f, reason in found for r in self._records([f], None, None, reason)])

    def hash_new_files(
        self,
        todo: list[FoundFile],
        *,
        read: dict[Path, str | OSError] | None = None,
        done_before: int = 0,
        total: int | None = None,
    ) -> dict[str, list[FoundFile]]:
        """Hash new/changed files (``read``: hashes made beforehand, see :func:`hash_paths`); link known
        content at once. Returns content to process, by hash."""
        total = len(todo) if total is None else total
        pending: dict[str, list[FoundFile]] = {}
        hashed: dict[Path, str | OSError] = dict(read or {})
        if self.remote is not None and todo:
            # Reading every new file is the driver's largest cost on real photos: the remote may read them.
            self.tick("hash", done_before, total)
            hashed.update(self.remote.hashes([f.path for f in todo if f.size]))
        with self.store.write() as tx:
            records: list[db.FileRecord] = []  # written together at the end of the transaction
            for i, f in enumerate(todo):
                self.tick("hash", done_before + i, total)
                if f.size == 0:
                    records += self._skipped([f], None, "empty file")
                    continue
                try:
                    sha = _hash(f.path, hashed)
                except OSError as e:
                    # size -1: a permission or I/O problem may be fixed without touching the file's
                    # mtime, so this file is tried again on every run.
                    records += self._skipped([replace(f, size=-1)], None, f"unreadable: {e.strerror or e}")
                    continue
                if f.kind == "image":
                    self.read_photo(f)
                media_id = db.media_of_kind(tx.conn, sha, f.kind)
                if media_id is not None:
                    records += self._records([f], sha, media_id)
                    self.report.linked += 1
                else:
                    if f.kind == "image" and self.remote is None:
                        self.prepare_embedder()
                    pending.setdefault(sha, []).append(f)
            self._write(tx, records)
            self.tick("hash", done_before + len(todo), total)
        return pending

    def read_photo(self, f: FoundFile) -> None:
        """Read what an image file says of itself (never raises): kept for its row and its captions."""
        photo = read_embedded(f.path)
        problems = [(str(f.path), why) for why in photo.problems]
        for path, _ in self.sidecars.get(str(f.path), []):
            # Sidecar captions are named by the sidecar (as a .txt one is): storable, as sources are kept.
            from_sidecar = read_sidecar(Path(path), db.storable(path))
            problems += [(path, why) for why in from_sidecar.problems]
            photo = photo.merged(from_sidecar)
        self.photos[db.path_key(f.path)] = photo
        self.report.metadata_problems.extend(problems)
        for path, why in problems:
            log.warning("metadata of %s not read: %s", path, why)

    def reread_photos(self, todo: list[FoundFile]) -> None:
        """Read the photo metadata of unchanged image files (see :attr:`IngestPlan.to_reread`) and record
        it with their rows: no hashing, no model work."""
        bs = 256
        for i in range(0, len(todo), bs):
            self.tick("metadata", i, len(todo))
            chunk = todo[i : i + bs]
            for f in chunk:
                self.read_photo(f)
            rows = [self.existing[db.path_key(f.path)] for f in chunk]
            with self.store.write() as tx:
                self._write(
                    tx,
                    [r for f, row in zip(chunk, rows) for r in self._records([f], row.sha256, row.media_id)],
                )
        if todo:
            self.tick("metadata", len(todo), len(todo))

    def _records(
        self, found: Sequence[FoundFile], sha: str | None, media_id: int | None, reason: str | None = None
    ) -> list[db.FileRecord]:
        """The rows of files of one content (``sha``, ``media_id``), seen or skipped (``reason``)."""
        return [
            db.FileRecord(
                f.path,
                f.kind,
                f.size,
                f.mtime_ns,
                sha,
                media_id,
                reason,
                self.photos.get(db.path_key(f.path)) if reason is None else None,
            )
            for f in found
        ]

    def _skipped(self, found: Sequence[FoundFile], sha: str | None, reason: str) -> list[db.FileRecord]:
        """The rows of files skipped for ``reason``, counted in the report."""
        for f in found:
            log.info("skipping %s: %s", f.path, reason)
            self.report.skipped.append((str(f.path), reason))
        return self._records(found, sha, None, reason)

    def _write(self, tx: WriteUnit, records: list[db.FileRecord]) -> None:
        db.write_files(tx.conn, records)
        self._files_written += len(records)

    # --- images -------------------------------------------------------------------------------
    def embed_images(
        self, groups: list[tuple[str, list[FoundFile]]], *, done_before: int = 0, total: int | None = None
    ) -> None:
        """Embed and commit new image contents; ``done_before`` of ``total`` (default: these) were before."""
        if not groups:
            return
        total = len(groups) if total is None else total
        self.tick("images", done_before, total)  # the stage starts (its first commit may be seconds away)
        if self.remote is not None:
            return self._embed_images_remotely(self.remote, groups, done_before, total)
        emb = self.embedder
        # With several model streams (ONNX sessions), that many batches are embedded at once, each whole
        # on one stream, and committed one at a time, in order.
        streams = emb.image_streams
        bs = image_batch_size(emb)

        def decode(item: tuple[str, list[FoundFile]]) -> _Decoded:
            sha, group = item
            try:
                # Decode JPEGs at reduced scale: a 1600x1200 photo for a 256-px model decodes at 400x300.
                image = load_image(group[0].path, draft_size=emb.input_size)
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
            # The image vectors' index (FAISS imported, its file read) made ready while the first images
            # decode and the model's sessions load, rather than by the first commit.
            self.store.vectors("image")
            while True:
                batch = _take(decoded, min(bs, FIRST_BATCH) if done == 0 and not in_flight else bs)
                if batch:
                    in_flight.append((batch, self._start_embedding(batch)))
                if in_flight and (len(in_flight) >= streams or not batch):
                    first, future = in_flight.popleft()
                    self._commit_images(first, future.result() if future is not None else None)
                    done += len(first)
                    self.tick("images", done_before + done, total)
                if not batch and not in_flight:
                    break
        finally:
            pool.close()  # never joins: a decode still stuck in Pillow must not hold the run (or its lock)

    def _embed_images_remotely(
        self, remote: RemoteWork, groups: list[tuple[str, list[FoundFile]]], done_before: int, total: int
    ) -> None:
        """Each batch that comes back embedded is committed as a local batch is."""
        by_sha = dict(groups)
        self.store.vectors("image")  # loaded before the first commit (see Store.write)
        done = 0
        for results, vectors in remote.images([(sha, group[0].path) for sha, group in groups]):
            batch: list[_Decoded] = [(r.sha256, by_sha[r.sha256], None, r.error) for r in results]
            self._commit_images(batch, vectors if len(vectors) else None)
            done += len(batch)
            self.tick("images", done_before + done, total)

    def _start_embedding(self, batch: list[_Decoded]) -> Future[np.ndarray] | None:
        tensors = [t for _, _, t, err in batch if err is None]
        if not tensors:
            return None
        # numpy, not torch.stack: torch copies with its OpenMP threads, which then spin waiting for more work
        # on the cores the model streams and the decoders need (the tensors are CPU tensors: no copy here).
        stacked = np.stack([np.asarray(t) for t in tensors])
        return self.embedder.submit_image_tensors(stacked)

    def _commit_images(self, batch: list[_Decoded], vectors: np.ndarray | None) -> None:
        good = [(sha, g, t) for sha, g, t, err in batch if err is None]
        with self.store.write(*(("image",) if vectors is not None else ())) as tx:
            media_ids = db.add_image_medias(tx.conn, [sha for sha, _, _ in good])
            records = [
                r
                for (sha, group, _), mid in zip(good, media_ids, strict=True)
                for r in self._records(group, sha, mid)
            ]
            if vectors is not None:
                tx.added("image", db.add_embeddings(tx.conn, "image", vectors, media_ids), vectors)
            for sha, group, _, err in batch:
                if err is not None:
                    records += self._skipped(group, sha, err)
            self._write(tx, records)
        if vectors is not None:
            self.report.images_embedded += len(good)

    # --- audio --------------------------------------------------------------------------------
    def transcribe_audio(self, groups: list[tuple[str, list[FoundFile]]]) -> None:
        if self.remote is not None and groups:
            return self._transcribe_remotely(self.remote, groups)
        for i, (sha, group) in enumerate(groups):
            self.tick("audio", i, len(groups))
            transcript, reason = transcribe_file(self.transcriber, group[0].path)
            if transcript is None or reason is not None:
                with self.store.write() as tx:
                    self._write(tx, self._skipped(group, sha, reason or "no speech detected"))
                continue
            self._commit_audio(group, sha, transcript)
        self.tick("audio", len(groups), len(groups))

    def _transcribe_remotely(self, remote: RemoteWork, groups: list[tuple[str, list[FoundFile]]]) -> None:
        by_sha = dict(groups)
        for i, done in enumerate(remote.transcripts([(sha, group[0].path) for sha, group in groups])):
            self.tick("audio", i, len(groups))
            group = by_sha[done.sha256]
            if done.transcript is None or done.error is not None:
                with self.store.write() as tx:
                    self._write(tx, self._skipped(group, done.sha256, done.error or "no speech detected"))
                continue
            self._commit_audio(group, done.sha256, done.transcript, done.vectors)
        self.tick("audio", len(groups), len(groups))

    def _commit_audio(
        self, group: list[FoundFile], sha: str, transcript: Any, vectors: np.ndarray | None = None
    ) -> None:
        """``vectors``: of the transcript's texts (see :func:`transcript_spans`) when embedded elsewhere."""
        texts, spans = transcript_spans(transcript)
        if vectors is None:
            vectors = self.embedder.embed_texts(texts)
        with self.store.write("segment") as tx:
            mid, seg_ids = db.add_transcript(
                tx.conn,
                sha,
                duration=transcript.duration,
                language=transcript.language,
                text=transcript.text,
                spans=spans,
                speech=speech_key(self.store.config.get("speech") or {}),
            )
            tx.added("segment", db.add_embeddings(tx.conn, "segment", vectors, seg_ids), vectors)
            self._write(tx, self._records(group, sha, mid))
        self.report.audio_transcribed += 1
        self.report.segments_embedded += len(texts)

    # --- video --------------------------------------------------------------------------------
    def index_videos(self, groups: list[tuple[str, list[FoundFile]]]) -> None:
        """Each new video content: keyframes and spoken track read, embedded and committed with its files
        in one transaction (see :mod:`mmsearch.ingest_video`)."""
        for i, (sha, group) in enumerate(groups):
            self.tick("video", i, len(groups))
            path = group[0].path
            read = read_video(
                path,
                self.embedder,
                lambda p: transcribe_file(self.transcriber, p),
                save_frame_thumb(self.store, sha),
            )
            if read.empty:
                with self.store.write() as tx:
                    self._write(tx, self._skipped(group, sha, skip_reason(read)))
                continue
            texts, spans = transcript_spans(read.transcript) if read.transcript is not None else ([], [])
            said = self.embedder.embed_texts(texts) if texts else None
            with self.store.write("frame", "segment") as tx:
                speech = speech_key(self.store.config.get("speech") or {})
                mid, frame_ids, seg_ids = commit_video(tx.conn, sha, read, spans, speech)
                if frame_ids:
                    seen = np.stack(read.vectors).astype(np.float32, copy=False)
                    tx.added("frame", db.add_embeddings(tx.conn, "frame", seen, frame_ids), seen)
                if said is not None:
                    tx.added("segment", db.add_embeddings(tx.conn, "segment", said, seg_ids), said)
                self._write(tx, self._records(group, sha, mid))
            self.report.videos_indexed += 1
            self.report.frames_embedded += len(frame_ids)
            self.report.segments_embedded += len(texts)
            for why in (
                read.truncated and f"picture read only in part: {read.truncated}",
                read.picture_problem and f"picture not read: {read.picture_problem}",
            ):
                if why:
                    self.report.partial.append((str(path), why))
        if groups:
            self.tick("video", len(groups), len(groups))

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
            photo = self.photos.get(key)
            if not current and key not in wanted_by_key and not (photo and photo.captions):
                continue  # the common case in a large folder: nothing to compare
            desired = Counter(wanted_by_key.get(key, [])) if key in ok_images else Counter()
            if key in ok_images:
                # Captions inside the file and its metadata sidecars: as read by this run, else (nothing
                # changed) as they are, but for those of a sidecar that is gone.
                if photo is not None:
                    desired.update(Caption(text, source) for source, text in photo.captions)
                else:
                    have_sidecars = {db.storable(p) for p, _ in self.sidecars.get(os.fsdecode(key), [])}
                    desired.update(
                        Caption(t, src)
                        for _, src, t in current
                        if src.startswith(EMBEDDED_SOURCE) or src in have_sidecars
                    )
            for cid, source, text in current:
                c = Caption(text, source)
                if desired[c] > 0:
                    desired[c] -= 1
                else:
                    to_remove.append(cid)
            to_add.extend((row.id, c) for c, n in desired.items() for _ in range(n))
        # Additions go first, so that the captions of a renamed or moved image are still in the catalog
        # when their texts are looked up (a crash in between leaves extra captions the next run removes).
        bs = 256
        for i in range(0, len(to_add), bs):
            self.tick("captions", i, len(to_add))
            chunk = to_add[i : i + bs]
            vectors, embedded = caption_vectors(
                self.store, self.embedder, [c.text for _, c in chunk], self.store.model
            )
            self.report.captions_embedded += embedded
            with self.store.write("caption") as tx:
                cids = db.add_captions(tx.conn, [(fid, c.source, c.text) for fid, c in chunk])
                tx.added("caption", db.add_embeddings(tx.conn, "caption", vectors, cids), vectors)
            self.report.captions_added += len(chunk)
        if to_add:
            self.tick("captions", len(to_add), len(to_add))
        if to_remove:
            with self.store.write("caption") as tx:
                removed = db.remove_captions(tx.conn, to_remove)
                tx.removed("caption", removed.get("caption", []))
            self.report.captions_removed += len(to_remove)

    def rows_under(self, root: Path) -> dict[bytes, db.FileRow]:
        prefix = db.path_key(root).rstrip(b"/") + b"/"
        if self._files_written:  # re-read only when this run changed the files table
            self.existing = self.store.catalog.files_by_key()
            self._files_written = 0
        return {k: r for k, r in self.existing.items() if k.startswith(prefix)}

    # --- deletions ----------------------------------------------------------------------------
    def remove_missing(self, gone: list[db.FileRow]) -> None:
        """Forget files that are gone, then content no file refers to any more."""
        changes = bool(gone) or self.store.catalog.has_orphan_media()
        with self.store.write(*(db.VECTOR_KINDS if changes else ())) as tx:
            if gone:
                for kind, ids in db.remove_files(tx.conn, [r.id for r in gone]).items():
                    tx.removed(kind, ids)
            removed, orphan_shas = db.remove_orphan_media(tx.conn)
            for kind, ids in removed.items():
                tx.removed(kind, ids)
        self.store.drop_thumbnails(orphan_shas)  # after the commit: a crash before it keeps them, harmlessly
        self.report.files_removed += len(gone)


def caption_vectors(
    store: Store, embedder: Embedder, texts: list[str], model: str, *, reuse: bool = True
) -> tuple[np.ndarray, int]:
    """One vector of ``model`` per text, and how many texts the model embedded: with ``reuse``, a text a
    caption already holds a vector of ``model`` for keeps it (the text tower would give the same one);
    the rest are embedded once each, however often they repeat."""
    known = store.catalog.caption_vectors(texts, embedder.dim, model) if reuse else {}
    new = list(dict.fromkeys(t for t in texts if t not in known))
    if new:
        known.update(zip(new, embedder.embed_texts(new), strict=True))
    return np.stack([known[t] for t in texts]).astype(np.float32, copy=False), len(new)


def hash_paths(paths: list[Path]) -> dict[Path, str | OSError]:
    """Each file's sha256, or the error reading it raised (for :func:`_hash`; a Ray task's too)."""
    out: dict[Path, str | OSError] = {}
    for path in paths:
        try:
            out[path] = sha256_file(path)
        except OSError as e:
            out[path] = e
    return out


def _in_background(name: str, fn: Callable[..., T], *args: Any) -> Future[T]:
    """``fn(*args)`` on a daemon thread named ``name``: an interrupted run does not wait for it at exit."""
    future: Future[T] = Future()

    def work() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # handed to whoever asks for the result
            future.set_exception(e)

    threading.Thread(target=work, name=name, daemon=True).start()
    return future


def _hash(path: Path, hashed: dict[Path, str | OSError]) -> str:
    """``path``'s sha256: as hashed elsewhere if it was (raising the error reading it raised), else here."""
    found = hashed.get(path)
    if isinstance(found, OSError):
        raise found
    return found if found is not None else sha256_file(path)


def transcribe_file(transcriber: Any, path: Path) -> tuple[Any, str | None]:
    """``(transcript, None)``, or ``(transcript or None, reason)`` when the file has no speech or cannot be
    transcribed: one bad file is skipped with its reason, never raised; a missing model or dependency
    (:class:`MmsearchError`) stops the run."""
    try:
        transcript = transcriber.transcribe(path)
    except BadMediaError as e:
        return None, str(e)
    except MmsearchError:
        raise
    except Exception as e:  # a decoder library failing on one file must not stop the run
        log.exception("transcription failed for %s", path)
        return None, f"transcription failed: {type(e).__name__}: {e}"
    return transcript, None if transcript.segments else "no speech detected"


def unchanged_file(rows: list[db.FileRow]) -> Path | None:
    """The first of ``rows``' files still holding the bytes that were indexed (same size and mtime), or
    None when every one changed or went (the next ``index`` run hashes them again)."""
    for row in rows:
        path = Path(os.fsdecode(row.path_key))
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_size, st.st_mtime_ns) == (row.size, row.mtime_ns):
            return path
    return None


def transcript_spans(transcript: Any) -> tuple[list[str], list[tuple[int, float, float, str]]]:
    """The texts to embed of a transcript and its segment rows ``(idx, start, end, text)``: one per
    segment, and the whole transcript (idx -1) when it is short and has several segments."""
    texts = [s.text for s in transcript.segments]
    spans = [(i, s.start, s.end, s.text) for i, s in enumerate(transcript.segments)]
    if len(texts) > 1 and transcript.duration <= WHOLE_TRANSCRIPT_MAX_SECONDS:
        texts.append(transcript.text)
        spans.append((-1, transcript.segments[0].start, transcript.segments[-1].end, transcript.text))
    return texts, spans


def _take(it: Iterator[T], n: int) -> list[T]:
    out = []
    for item in it:
        out.append(item)
        if len(out) == n:
            break
    return out
