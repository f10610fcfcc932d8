"""An index folder: it describes itself and holds everything needed to search it.

Layout (the folder and everything in it owner-only: 0700 folders, 0600 files)::

    INDEX/mmsearch.json        format, schema, model identity, speech settings (human-readable)
    INDEX/catalog.sqlite       the source of truth (see db.py)
    INDEX/vectors/MODEL/KIND.faiss  one FAISS index per model and item kind, derived from the catalog
                               (an index made before models were named has its first one's at KIND.faiss)
    INDEX/write.lock           held by the one process allowed to write (and by the one creating the index)
    INDEX/thumbs/SHA-SIDE.jpg  thumbnails the server made, by content hash (dropped with their content)

Each FAISS file's checksum, vector count, the catalog generation it reflects and its position (the largest
embedding id and the last deletion-log seq it reflects) are recorded in the catalog. On open, a missing or
corrupt file is rebuilt from the catalog (FAISS itself loads many corrupt files without complaint, so the
checksum is what we trust); a file older than the catalog is brought up to date by the change since its
position (ids are never reused, deletions are logged), or rebuilt when that change is unknown.

A reader follows a writer the same way: after each commit it adds the embeddings with a larger id and
removes the logged deletions, instead of rebuilding (and retraining) the whole index.

An index may hold the vectors of several models (see :mod:`mmsearch.reembed`); one is *active*, named in
the catalog, and only its vectors are searched. A reader notices an activation at its next
:meth:`Store.refresh` and from then on searches only the new model's indexes. A writer saves the
FAISS files now and then during a long run (:meth:`Store.checkpoint_vectors`), which lets it prune the log.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsearch.constants import VECTORS_FOLDER, vector_file
from mmsearch.db import PRIVATE_FILE_MODE, SCHEMA_VERSION, VECTOR_KINDS, Catalog, VectorDelta, storage_errors
from mmsearch.errors import IndexLockedError, IndexNotFoundError, MmsearchError
from mmsearch.identity import model_key
from mmsearch.scan import INDEX_MARKER
from mmsearch.vectors import VectorIndex, needs_rebuild

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from mmsearch.shards import ShardedVectors, ShardSet

log = logging.getLogger(__name__)

FORMAT = "mmsearch-index"
CATALOG = "catalog.sqlite"
LOCK = "write.lock"
THUMBS = "thumbs"
#: Mode of the index folder and its sub-folders (files: db.PRIVATE_FILE_MODE): other local users can
#: neither list nor read what was indexed.
PRIVATE_FOLDER_MODE = 0o700
#: A writer saves its FAISS files at most this often during a run (see Store.checkpoint_vectors) ...
CHECKPOINT_SECONDS = 60.0
#: ... and spends at most 1/CHECKPOINT_COST_FACTOR of the run's time saving them (large indexes).
CHECKPOINT_COST_FACTOR = 10.0


@dataclass
class WriteUnit:
    """One transaction of a writer, opened by :meth:`Store.write`: ``conn`` is the transaction; the caller
    records the vectors it changed with :meth:`added` and :meth:`removed` (of any model: every loaded
    index of a changed kind follows the commit, from the catalog's own record of the change, so only the
    kinds changed are kept here)."""

    conn: Connection
    kinds: tuple[str, ...]
    changed: set[str] = field(default_factory=set)

    def added(self, kind: str, ids: Any, vectors: np.ndarray) -> None:
        """Embeddings of ``kind`` inserted by this transaction (ids from :func:`db.add_embeddings`)."""
        self._record(kind)

    def removed(self, kind: str, ids: Any) -> None:
        """Embeddings of ``kind`` deleted by this transaction."""
        self._record(kind)

    def _record(self, kind: str) -> None:
        if kind not in self.kinds:
            # Its index was not loaded before the change: following it after the commit would rebuild it.
            raise ValueError(f"store.write() was not told that this transaction changes {kind} vectors")
        self.changed.add(kind)


@dataclass
class _Live:
    """An in-memory index and where it stands: it reflects the catalog at ``generation``, every embedding
    of its kind with an id up to ``max_id`` and every deletion logged up to ``seq``."""

    index: VectorIndex
    generation: int
    max_id: int
    seq: int
    #: The checksum of the saved file this index equals (None once it changed since).
    sha: str | None = None
    #: The last saved file a reader looked at to replace an outgrown index (see Store._adopt_retrained).
    seen_sha: str | None = None


class Store:
    """Catalog + vector indexes of one index folder. Writers must hold :meth:`lock_for_writing`."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        self.folder = folder
        self.config = config
        self.catalog = Catalog(folder / CATALOG, config.get("model"))  # runs any pending migrations
        #: The key of the model searched (see :meth:`follow_active`).
        self.model = self.catalog.active_model() or model_key(config["model"])
        self._models = self.catalog.models() or {self.model: dict(config["model"])}
        if self.model in self._models and model_key(config["model"]) != self.model:
            # Activated by a writer that stopped before rewriting mmsearch.json: the catalog decides (the
            # next writer rewrites the description).
            self.config["model"] = dict(self._models[self.model])
        self._live: dict[tuple[str, str], _Live] = {}
        #: Indexes being loaded on a thread (:meth:`preload`); :meth:`vectors` takes them.
        self._loading: dict[tuple[str, str], Future[_Live]] = {}
        self._lock_fd: int | None = None
        #: Drop and rebuild an index on every change instead of following it (the behaviour before the
        #: deletion log; kept for the live-reads benchmark).
        self.rebuild_on_refresh = False
        #: Serves this reader's searches when set (:meth:`use_shards`).
        self._shards: ShardSet | None = None
        self._next_checkpoint = time.monotonic() + CHECKPOINT_SECONDS

    # --- lifecycle ----------------------------------------------------------------------------
    @staticmethod
    def check_creatable(folder: Path) -> None:
        """Raise unless an index could be created at ``folder`` (call before loading a model for it)."""
        if (folder / INDEX_MARKER).exists():
            raise MmsearchError(f"an index already exists at {folder}")
        if folder.exists() and any(p.name not in (".gitkeep", LOCK) for p in folder.iterdir()):
            raise MmsearchError(f"{folder} exists and is not an empty folder; choose another --index")

    @classmethod
    def create(cls, folder: Path, config: dict[str, Any]) -> Store:
        """Create an empty index, owner-only, under the write lock.

        The description (``mmsearch.json``) appears at once and complete, and only if none exists: of two
        processes creating the same index, one fails (the index is being created, or already exists).
        """
        cls.check_creatable(folder)
        with storage_errors(folder):
            _private_folder(folder, parents=True)
        fd = _take_lock(folder / LOCK, folder)
        try:
            cls.check_creatable(folder)  # again, under the lock: another process may have created it
            full = {"format": FORMAT, "schema_version": SCHEMA_VERSION, **config}
            with storage_errors(folder):
                _private_folder(folder / VECTORS_FOLDER)
                _write_private(folder / INDEX_MARKER, _describe(full), exclusive=True)
            return cls(folder, full)
        finally:
            os.close(fd)

    @staticmethod
    def exists(folder: Path) -> bool:
        return (folder / INDEX_MARKER).is_file()

    @classmethod
    def open(cls, folder: Path) -> Store:
        marker = folder / INDEX_MARKER
        if not marker.is_file():
            raise IndexNotFoundError(
                f"no mmsearch index at {folder} (create one with `mmsearch index FOLDER`)"
            )
        try:
            config = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            raise MmsearchError(f"{marker} is unreadable: {e}") from e
        if config.get("format") != FORMAT:
            raise MmsearchError(f"{marker} does not describe an mmsearch index")
        return cls(folder, config)

    def close(self) -> None:
        for pending in self._loading.values():  # it reads the catalog being closed
            if not pending.cancel():
                wait([pending])  # its error, if any, was never asked for
        self._loading.clear()
        self.unlock()
        if self._shards is not None:
            self._shards.close()
        self.catalog.close()

    def use_shards(self, shards: ShardSet | None) -> None:
        """Search the vectors split over Ray actors (:class:`mmsearch.shards.ShardSet`) instead of in-process
        indexes: :meth:`vectors` returns them while this store does not hold the write lock (a writer keeps
        its own indexes, which it brings in step and saves), and :meth:`refresh` makes them follow the
        catalog. None: back to in-process indexes."""
        self._shards = shards

    @property
    def dim(self) -> int:
        """The dimension of the active model's vectors."""
        return self.dim_of(self.model)

    def dim_of(self, model: str) -> int:
        if model not in self._models:
            self._models = self.catalog.models() or self._models
        return int(self._models[model]["dim"])

    def follow_active(self) -> str:
        """Switch to the model the catalog names active if it changed (another process activated one):
        the previous model's in-memory indexes are dropped, never searched again. Returns its key."""
        active = self.catalog.active_model()
        if active is not None and active != self.model:
            self._models = self.catalog.models()
            log.info("the index now searches model %s (was %s)", active, self.model)
            self.model = active
            self.config["model"] = dict(self._models[active])
            if self._lock_fd is None:  # a writer keeps what it loaded: it may be embedding either model
                self._live = {slot: live for slot, live in self._live.items() if slot[0] == active}
                self._loading = {slot: f for slot, f in self._loading.items() if slot[0] == active}
        return self.model

    def identity_of(self, model: str) -> dict[str, Any]:
        """The identity of a registered model."""
        if model not in self._models:
            self._models = self.catalog.models() or self._models
        if model not in self._models:
            raise MmsearchError(f"model {model} is not registered in the index")
        return dict(self._models[model])

    def describe_active_model(self) -> None:
        """Make mmsearch.json name the active model (the torch-free identity checks read it); writer only."""
        on_disk = json.loads((self.folder / INDEX_MARKER).read_text()).get("model", {})
        if model_key(on_disk) != self.model:
            self.update_config(model=self.identity_of(self.model))

    def update_config(self, **changes: Any) -> None:
        self.config.update(changes)
        with storage_errors(self.folder):
            _write_private(self.folder / INDEX_MARKER, _describe(self.config))

    # --- derived files ------------------------------------------------------------------------
    def thumbnail_path(self, sha256: str, side: int) -> Path:
        return self.folder / THUMBS / f"{sha256}-{side}.jpg"

    def thumbnails_folder(self) -> Path:
        """The thumbnails' folder, created owner-only if missing (make it with this, not mkdir)."""
        path = self.folder / THUMBS
        with storage_errors(self.folder):
            _private_folder(path)
        return path

    def drop_thumbnails(self, shas: set[str]) -> int:
        """Delete the cached thumbnails of content no file holds any more; returns how many went."""
        if not shas:
            return 0
        dropped = 0
        try:  # one listing whatever the number of hashes: a glob per hash would list the folder each time
            with os.scandir(self.folder / THUMBS) as entries:
                for entry in entries:
                    if entry.name.split("-", 1)[0] in shas:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                            dropped += 1
        except FileNotFoundError:
            return 0  # no server ever made a thumbnail here
        except OSError as e:  # a read-only folder: stale thumbnails cost space, not correctness
            log.warning("cannot prune thumbnails in %s: %s", self.folder / THUMBS, e)
        return dropped

    # --- single writer ------------------------------------------------------------------------
    def lock_for_writing(self) -> None:
        if self._lock_fd is not None:
            return  # already ours
        fd = _take_lock(self.folder / LOCK, self.folder)
        try:
            if self.config.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
                # The catalog was migrated on open; the folder's description follows, by the writer only
                # (a reader rewriting mmsearch.json could undo a writer's change to it).
                self.update_config(schema_version=SCHEMA_VERSION)
            self.follow_active()
            self.describe_active_model()
            self._make_owner_only()
        except BaseException:
            os.close(fd)  # releases the lock: a writer that cannot start must not block the next one
            raise
        self._lock_fd = fd
        self._next_checkpoint = time.monotonic() + CHECKPOINT_SECONDS

    def unlock(self) -> None:
        if self._lock_fd is not None:
            # The lock file stays (removing it would race with a waiting writer); flock dies with us.
            os.close(self._lock_fd)
            self._lock_fd = None

    def _make_owner_only(self) -> None:
        """Tighten an index made by an older mmsearch (catalog 0644): the writer, who owns it, does it."""
        paths = [(self.folder, PRIVATE_FOLDER_MODE), (self.folder / VECTORS_FOLDER, PRIVATE_FOLDER_MODE)]
        paths.append((self.folder / THUMBS, PRIVATE_FOLDER_MODE))
        for name in (CATALOG, f"{CATALOG}-wal", f"{CATALOG}-shm", INDEX_MARKER, LOCK):
            paths.append((self.folder / name, PRIVATE_FILE_MODE))
        paths.extend(
            (self.folder / VECTORS_FOLDER / f"{kind}.faiss", PRIVATE_FILE_MODE) for kind in VECTOR_KINDS
        )
        for model in self._models:
            paths.append((self.folder / VECTORS_FOLDER / model, PRIVATE_FOLDER_MODE))
            paths.extend((self._faiss_path(kind, model), PRIVATE_FILE_MODE) for kind in VECTOR_KINDS)
        for path, mode in paths:
            try:
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) == mode:
                    continue
                os.chmod(path, mode)
                log.info("%s was readable by others: now owner-only", path)
            except FileNotFoundError:
                continue
            except OSError as e:  # e.g. a read-only mount: the index still works
                log.warning("cannot make %s owner-only: %s", path, e)

    # --- vectors ------------------------------------------------------------------------------
    def vectors(self, kind: str, model: str | None = None) -> VectorIndex | ShardedVectors:
        """The index of one kind of ``model`` (default: the active one), consistent with the catalog's
        committed state when it was loaded or last followed (:meth:`refresh`); sharded when
        :meth:`use_shards` asked for it and this store is not writing."""
        if self._shards is not None and self._lock_fd is None:
            model = model or self.model
            return self._shards.vectors(self.catalog, kind, model, self.dim_of(model))
        slot = (model or self.model, kind)
        if slot not in self._live:
            pending = self._loading.pop(slot, None)
            if pending is None:
                self._live[slot] = self._open(slot)
            else:  # loaded as the catalog stood then: followed to where it stands now, as refresh() would
                self._live[slot] = pending.result()
                self._follow(slot)
                if slot not in self._live:  # dropped to be rebuilt (rebuild_on_refresh)
                    self._live[slot] = self._open(slot)
        return self._live[slot].index

    def preload(self, kinds: Iterable[str], model: str | None = None) -> None:
        """Start loading the in-process indexes of ``kinds`` of ``model`` (default: the active one) that are not
        loaded yet, on a thread; :meth:`vectors` takes them. Reading a saved file into FAISS releases the GIL,
        so a search that embeds its query meanwhile (also mostly outside Python) has both done in about the
        time of the longer. Readers only: a writer's indexes are loaded before its changes (:meth:`write`)."""
        if self._lock_fd is not None or self._shards is not None:
            return
        for kind in kinds:
            slot = (model or self.model, kind)
            if slot not in self._live and slot not in self._loading:
                self._loading[slot] = _loader().submit(self._open, slot)

    def refresh(self) -> str:
        """Bring in-memory indexes up to the catalog's committed state (a writer committed since), after
        switching to the active model if another became active (:meth:`follow_active`); returns its key."""
        active = self.follow_active()
        if self._shards is not None:
            self._shards.refresh(self.catalog, active, self.dim_of(active))
        for slot in list(self._live):
            self._follow(slot)
        return active

    def _follow(self, slot: tuple[str, str]) -> None:
        """Bring one loaded index in step with the catalog's committed state."""
        if self._live[slot].generation == self.catalog.generation(slot[1], slot[0]):
            return
        if self.rebuild_on_refresh:
            del self._live[slot]  # rebuilt from SQLite by the next vectors()
            return
        self._catch_up(slot)
        if self._lock_fd is None:
            self._adopt_retrained(slot)

    def apply(self, kind: str) -> None:
        """Bring one kind's in-memory index in step with a change just committed (saved later by
        :meth:`save_vectors`, or by a checkpoint during a long run).

        The index follows the catalog's own record of the change (embeddings with new ids, the deletion
        log), as every reader does.
        """
        loaded = [slot for slot in self._live if slot[1] == kind]
        if not loaded:
            self.vectors(kind)  # loaded after the commit, so it already holds the change
        for slot in loaded:
            self._catch_up(slot)
        self._maybe_checkpoint()

    @contextlib.contextmanager
    def write(self, *kinds: str, model: str | None = None) -> Iterator[WriteUnit]:
        """One write: a catalog transaction that changes the vectors of ``kinds`` of ``model`` (default: the
        active one; none: files only).

        Those kinds' indexes are loaded first: the saved files then match the catalog before the change,
        which is followed in memory after the commit (loaded only after it, a file would be a generation
        behind and the whole index rebuilt from SQLite). On leaving, the transaction commits, then every
        kind recorded with ``tx.added`` / ``tx.removed`` is brought in step (:meth:`apply`, which also
        checkpoints the vector files now and then). An exception rolls everything back and applies nothing.
        """
        for kind in kinds:
            self.vectors(kind, model)
        with self.catalog.begin() as conn:
            tx = WriteUnit(conn, kinds)
            yield tx
        for kind in tx.kinds:  # in the order declared
            if kind in tx.changed:
                self.apply(kind)

    def checkpoint_vectors(self) -> None:
        """Save the FAISS files that changed, during a run: a reader opening the index then starts from
        them instead of the catalog, and the deletion log they reflect is pruned.

        The catalog holds everything, so a save that fails (disk full) is logged and left to the next one.
        Called by :meth:`apply` every :data:`CHECKPOINT_SECONDS` or more (see CHECKPOINT_COST_FACTOR).
        """
        started = time.monotonic()
        try:
            self._save_all()
        except MmsearchError as e:
            log.warning("could not save the vector indexes during the run (%s); the next save retries", e)
        took = time.monotonic() - started
        self._next_checkpoint = time.monotonic() + max(CHECKPOINT_SECONDS, CHECKPOINT_COST_FACTOR * took)

    def save_vectors(self) -> None:
        """Write every index that changed; re-choose the index type when the collection outgrew it."""
        self._save_all()

    def _maybe_checkpoint(self) -> None:
        if self._lock_fd is not None and time.monotonic() >= self._next_checkpoint:
            self.checkpoint_vectors()

    def _save_all(self) -> None:
        slots = [(self.model, kind) for kind in VECTOR_KINDS]
        slots += [slot for slot in self._live if slot not in slots and slot[0] in self._models]
        for slot in slots:
            model, kind = slot
            self.vectors(kind, model)
            if self._live[slot].generation != self.catalog.generation(kind, model):
                self._catch_up(slot)  # changed by a caller that did not apply() it
            live = self._live[slot]
            if needs_rebuild(live.index):
                live = self._live[slot] = self._rebuild(slot)  # saved if we hold the lock
            record = self.catalog.get_meta(self.catalog.slot("faiss", kind, model))
            if record and record.get("sha256") == live.sha and self._faiss_path(kind, model, record).exists():
                continue  # the saved file is this index
            self._save(slot, live)

    def forget_vectors(self, model: str) -> None:
        """Drop a model's in-memory indexes and saved files (after its vectors left the catalog)."""
        for slot in [slot for slot in self._live if slot[0] == model]:
            del self._live[slot]
        self._models.pop(model, None)
        with contextlib.suppress(OSError):
            for kind in VECTOR_KINDS:
                self._faiss_path(kind, model).unlink(missing_ok=True)
            (self.folder / VECTORS_FOLDER / model).rmdir()

    def _catch_up(self, slot: tuple[str, str]) -> None:
        live = self._live[slot]
        model, kind = slot
        delta = self.catalog.vector_delta(
            kind, self.dim_of(model), model, after_id=live.max_id, after_seq=live.seq
        )
        if delta is None:  # the change is no longer (or not) logged: start again from the saved file
            self._live[slot] = self._open(slot)
        elif not _apply_delta(live, delta):
            log.warning("the %s vectors differ from the catalog after following it: rebuilding them", kind)
            self._live[slot] = self._rebuild(slot)

    def _adopt_retrained(self, slot: tuple[str, str]) -> None:
        """A reader's index grown past its type (an IVF trained on far fewer vectors, a flat index past
        FLAT_MAX) is replaced by the writer's saved file once that was retrained: loading it trains nothing."""
        live = self._live[slot]
        if not needs_rebuild(live.index):
            return
        record = self.catalog.get_meta(self.catalog.slot("faiss", slot[1], slot[0]))
        if not record or record.get("sha256") in (live.sha, live.seen_sha):
            return
        live.seen_sha = record.get("sha256")
        if (record.get("spec"), record.get("trained_n")) == (live.index.spec, live.index.trained_n):
            return  # the writer has not retrained it yet
        saved = self._open_saved(slot)
        if saved is not None:
            self._live[slot] = saved

    def _open(self, slot: tuple[str, str]) -> _Live:
        return self._open_saved(slot) or self._rebuild(slot)

    def _open_saved(self, slot: tuple[str, str]) -> _Live | None:
        """The saved file brought up to the catalog's state, or None when it cannot be (then rebuild)."""
        model, kind = slot
        record = self.catalog.get_meta(self.catalog.slot("faiss", kind, model))
        path = self._faiss_path(kind, model, record)
        dim = self.dim_of(model)
        if not record:
            if path.exists():
                log.info("vector file %s is not recorded in the catalog: rebuilding it", path)
            return None
        index = VectorIndex.load(path, sha256=record["sha256"], ntotal=record["ntotal"], dim=dim)
        if index is None:
            log.warning("vector file %s is missing or corrupt: rebuilding it from the catalog", path)
            return None
        position = self.catalog.vector_position(kind, model)
        if record.get("generation") == position.generation:  # the file is the catalog's current state
            return _Live(index, position.generation, position.max_id, position.seq, sha=record["sha256"])
        if "max_id" not in record or "seq" not in record:  # saved before positions were recorded
            log.info("vector file %s is stale: rebuilding it from the catalog", path)
            return None
        live = _Live(
            index, int(record["generation"]), int(record["max_id"]), int(record["seq"]), sha=record["sha256"]
        )
        delta = self.catalog.vector_delta(kind, dim, model, after_id=live.max_id, after_seq=live.seq)
        if delta is None:
            log.info("vector file %s is older than the deletion log: rebuilding it from the catalog", path)
            return None
        if not _apply_delta(live, delta):
            log.warning("vector file %s differs from the catalog after its changes: rebuilding it", path)
            return None
        return live

    def _rebuild(self, slot: tuple[str, str]) -> _Live:
        model, kind = slot
        dim = self.dim_of(model)
        state = self.catalog.vector_state(kind, dim, model)
        live = _Live(
            VectorIndex.build(dim, state.ids, state.vectors), state.generation, state.max_id, state.seq
        )
        if self._lock_fd is not None:
            self._save(slot, live)
        return live

    def _save(self, slot: tuple[str, str], live: _Live) -> None:
        # On a full disk the save leaves the previous file and its record in place; the record's position
        # is older than the catalog, so the next open follows the change since, or rebuilds.
        model, kind = slot
        old = self.catalog.get_meta(self.catalog.slot("faiss", kind, model))
        path = self._faiss_path(kind, model)
        with storage_errors(self.folder):
            _private_folder(
                self.folder / VECTORS_FOLDER
            )  # deleted by hand: made again owner-only, not by FAISS
            _private_folder(path.parent)
            sha, ntotal = live.index.save(path)
        record = {
            "sha256": sha,
            "ntotal": ntotal,
            "generation": live.generation,
            "max_id": live.max_id,
            "seq": live.seq,
            "spec": live.index.spec,
            "trained_n": live.index.trained_n,
        }
        if self.catalog.has_models:
            record["file"] = str(path.relative_to(self.folder / VECTORS_FOLDER))
        self.catalog.record_saved_vectors(kind, model, record)
        live.sha = sha
        if old and old.get("file") not in (None, record.get("file")):  # the flat layout of older indexes
            with contextlib.suppress(OSError):
                (self.folder / VECTORS_FOLDER / old["file"]).unlink()

    def _faiss_path(self, kind: str, model: str, record: dict[str, Any] | None = None) -> Path:
        """Where (model, kind)'s FAISS file is: as its record says, else vectors/MODEL/KIND.faiss (in a
        catalog older than schema 4, vectors/KIND.faiss)."""
        if record and record.get("file"):
            return self.folder / VECTORS_FOLDER / str(record["file"])
        if not self.catalog.has_models:
            return self.folder / VECTORS_FOLDER / f"{kind}.faiss"
        return vector_file(self.folder, model, kind)


@functools.cache
def _loader() -> ThreadPoolExecutor:
    """The thread that loads indexes for :meth:`Store.preload`, shared by every store of the process."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmsearch-vectors-load")


def _apply_delta(live: _Live, delta: VectorDelta) -> bool:
    """Apply a catalog change to an in-memory index; False when the result does not hold as many vectors
    as the catalog (then the index is not to be trusted)."""
    if len(delta.ids):
        live.index.add(delta.ids, delta.vectors, above=live.max_id)  # every id held is <= max_id
    if len(delta.removed):
        live.index.remove(delta.removed)
    if len(delta.ids) or len(delta.removed):
        live.sha = None
    live.generation, live.max_id, live.seq = delta.generation, delta.max_id, delta.seq
    return live.index.ntotal == delta.count


def _take_lock(path: Path, folder: Path) -> int:
    """Hold ``path`` (flock, non-blocking) and write our pid in it; returns the descriptor."""
    with storage_errors(folder):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise IndexLockedError(
                f"index {folder} is being created or written by another process (pid {holder}); "
                "wait for it to finish or stop it"
            ) from e
        raise
    try:
        with storage_errors(folder):
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, PRIVATE_FILE_MODE)  # the umask does not decide (nor an older mmsearch's 0644)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _private_folder(path: Path, *, parents: bool = False) -> None:
    """Create ``path`` with mode 0700 whatever the umask (an existing one is left as it is)."""
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, PRIVATE_FOLDER_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
        if not any(path.iterdir()):  # an empty folder made for the index (e.g. indexes/default)
            os.chmod(path, PRIVATE_FOLDER_MODE)
        return
    os.chmod(path, PRIVATE_FOLDER_MODE)


def _describe(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _write_private(path: Path, content: str, *, exclusive: bool = False) -> None:
    """Write ``content`` to ``path`` atomically, mode 0600. ``exclusive``: fail with MmsearchError if
    ``path`` exists (a hard link of the complete temp file: never a partial or a replaced file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
        with open(fd, "w", encoding="utf-8") as f:
            os.fchmod(fd, PRIVATE_FILE_MODE)
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise MmsearchError(f"an index already exists at {path.parent}") from None
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # never leave a temp file behind (e.g. disk full)
