"""An index folder: it describes itself and holds everything needed to search it.

Layout::

    INDEX/mmsearch.json        format, schema, model identity, speech settings (human-readable)
    INDEX/catalog.sqlite       the source of truth (see db.py)
    INDEX/vectors/KIND.faiss   one FAISS index per item kind, derived from the catalog
    INDEX/write.lock           held by the one process allowed to write
    INDEX/thumbs/SHA-SIDE.jpg  thumbnails the server made, by content hash (dropped with their content)

Each FAISS file's checksum, vector count and the catalog generation it reflects are recorded in the catalog.
On open, a missing, stale or corrupt file is rebuilt from the catalog (FAISS itself loads many corrupt
files without complaint, so the checksum is what we trust).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from mmsearch.db import SCHEMA_VERSION, VECTOR_KINDS, Catalog, storage_errors
from mmsearch.errors import IndexLockedError, IndexNotFoundError, MmsearchError
from mmsearch.scan import INDEX_MARKER
from mmsearch.vectors import VectorIndex, needs_rebuild

log = logging.getLogger(__name__)

FORMAT = "mmsearch-index"
CATALOG = "catalog.sqlite"
LOCK = "write.lock"
THUMBS = "thumbs"


class Store:
    """Catalog + vector indexes of one index folder. Writers must hold :meth:`lock_for_writing`."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        self.folder = folder
        self.config = config
        self.catalog = Catalog(folder / CATALOG)  # runs any pending migrations
        self.dim = int(config["model"]["dim"])
        self._vectors: dict[str, VectorIndex] = {}
        self._loaded_generation: dict[str, int] = {}
        self._lock_fd: int | None = None

    # --- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, config: dict[str, Any]) -> Store:
        if (folder / INDEX_MARKER).exists():
            raise MmsearchError(f"an index already exists at {folder}")
        if folder.exists() and any(p.name != ".gitkeep" for p in folder.iterdir()):
            raise MmsearchError(f"{folder} exists and is not an empty folder; choose another --index")
        full = {"format": FORMAT, "schema_version": SCHEMA_VERSION, **config}
        with storage_errors(folder):
            (folder / "vectors").mkdir(parents=True, exist_ok=True)
            _atomic_write_text(folder / INDEX_MARKER, json.dumps(full, indent=2, sort_keys=True) + "\n")
        return cls(folder, full)

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
        self.unlock()
        self.catalog.close()

    def update_config(self, **changes: Any) -> None:
        self.config.update(changes)
        with storage_errors(self.folder):
            _atomic_write_text(
                self.folder / INDEX_MARKER, json.dumps(self.config, indent=2, sort_keys=True) + "\n"
            )

    # --- derived files ------------------------------------------------------------------------
    def thumbnail_path(self, sha256: str, side: int) -> Path:
        return self.folder / THUMBS / f"{sha256}-{side}.jpg"

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
        path = self.folder / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise IndexLockedError(
                    f"index {self.folder} is being written by another process (pid {holder}); "
                    "wait for it to finish or stop it"
                ) from e
            raise
        try:
            with storage_errors(self.folder):
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            if self.config.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
                # The catalog was migrated on open; the folder's description follows, by the writer only
                # (a reader rewriting mmsearch.json could undo a writer's change to it).
                self.update_config(schema_version=SCHEMA_VERSION)
        except BaseException:
            os.close(fd)  # releases the lock: a writer that cannot start must not block the next one
            raise
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            # The lock file stays (removing it would race with a waiting writer); flock dies with us.
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- vectors ------------------------------------------------------------------------------
    def vectors(self, kind: str) -> VectorIndex:
        """The index of one kind, consistent with the catalog's committed state."""
        if kind not in self._vectors:
            self._vectors[kind] = self._load_or_rebuild(kind)
        return self._vectors[kind]

    def refresh(self) -> None:
        """Drop in-memory indexes that no longer match the catalog (a writer committed since)."""
        for kind in list(self._vectors):
            if self._loaded_generation.get(kind) != self.catalog.generation(kind):
                del self._vectors[kind]

    def _load_or_rebuild(self, kind: str) -> VectorIndex:
        gen = self.catalog.generation(kind)
        record = self.catalog.get_meta(f"faiss.{kind}")
        path = self._faiss_path(kind)
        if record and record.get("generation") == gen:
            index = VectorIndex.load(path, sha256=record["sha256"], ntotal=record["ntotal"], dim=self.dim)
            if index is not None:
                self._loaded_generation[kind] = gen
                return index
            log.warning("vector file %s is missing or corrupt: rebuilding it from the catalog", path)
        elif path.exists():
            log.info("vector file %s is stale: rebuilding it from the catalog", path)
        ids, vecs = self.catalog.load_vectors(kind, self.dim)
        index = VectorIndex.build(self.dim, ids, vecs)
        self._loaded_generation[kind] = gen
        if self._lock_fd is not None:
            self._save(kind, index, gen)
        return index

    def apply(
        self, kind: str, added: tuple[np.ndarray, np.ndarray] | None, removed: np.ndarray | None
    ) -> None:
        """Mirror a committed catalog change in the in-memory index (saved later by :meth:`save_vectors`)."""
        if kind not in self._vectors:
            self.vectors(kind)  # loaded after the commit, so it already holds the change
            return
        index = self._vectors[kind]
        if removed is not None and len(removed):
            index.remove(removed)
        if added is not None and len(added[0]):
            index.add(*added)
        self._loaded_generation[kind] = self.catalog.generation(kind)

    def save_vectors(self) -> None:
        """Write every index that changed; re-choose the index type when the collection outgrew it."""
        for kind in VECTOR_KINDS:
            gen = self.catalog.generation(kind)
            index = self.vectors(kind)
            rebuilt = needs_rebuild(index)
            if rebuilt:
                ids, vecs = self.catalog.load_vectors(kind, self.dim)
                index = self._vectors[kind] = VectorIndex.build(self.dim, ids, vecs)
            record = self.catalog.get_meta(f"faiss.{kind}")
            if not rebuilt and record and record.get("generation") == gen and self._faiss_path(kind).exists():
                continue
            self._save(kind, index, gen)

    def _save(self, kind: str, index: VectorIndex, gen: int) -> None:
        # On a full disk the save leaves the previous file and its record in place; both are older than
        # the catalog's generation, so the next open rebuilds this kind from the catalog.
        with storage_errors(self.folder):
            sha, ntotal = index.save(self._faiss_path(kind))
        self.catalog.set_meta(f"faiss.{kind}", {"sha256": sha, "ntotal": ntotal, "generation": gen})

    def _faiss_path(self, kind: str) -> Path:
        return self.folder / "vectors" / f"{kind}.faiss"


def _atomic_write_text(path: Path, content: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written temp file behind (e.g. disk full)
        raise
