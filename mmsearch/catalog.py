"""The catalog: SQLite through SQLAlchemy 2 Core, the index's source of truth.

It holds the files seen (with size, mtime and content hash), the distinct media contents, captions,
transcript segments, every embedding vector, the model identity and the schema version. The FAISS files are
derived from the ``embeddings`` table and can always be rebuilt from it. :class:`Catalog` opens (and
migrates) it and answers its reads; the named writes are in :mod:`mmsearch.catalog_writes`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    create_engine,
    event,
    func,
    select,
    text,
    true,
)

from mmsearch import catalog_errors
from mmsearch.catalog_errors import disk_full_message, storage_errors
from mmsearch.errors import MmsearchError
from mmsearch.filters import distance_km
from mmsearch.schema import (
    ACTIVE_META,
    MIGRATION_MODEL,
    MIGRATIONS,
    MODELS_META,
    PHOTO_META_FROM,
    READABLE_FROM,
    REF_COLUMNS,
    SCHEMA_VERSION,
    TARGET_META,
    VIDEO_FROM,
    _get_meta,
    _set_meta,
    captions,
    deletions,
    embeddings,
    files,
    frames,
    media,
    meta,
    segments,
    vector_counts,
)

# The facade's name, kept so log lines read as before the split.
log = logging.getLogger("mmsearch.db")
T = TypeVar("T")


@dataclass(frozen=True)
class FileRow:
    id: int
    path_key: bytes
    kind: str
    size: int
    mtime_ns: int
    sha256: str | None
    media_id: int | None
    status: str
    reason: str | None
    #: The PHOTO_META_VERSION that read the file's photo metadata (None: never read; images only).
    meta_version: int | None = None
    #: When the row was written (unix seconds): a metadata sidecar changed since is read again.
    updated_at: float = 0.0


#: Mode of the catalog file; SQLite gives its -wal and -shm files the same one.
PRIVATE_FILE_MODE = 0o600


class Catalog:
    def __init__(self, path: Path, model_identity: dict[str, Any] | None = None) -> None:
        self.path = path
        #: The model of the index's description: what migration 4 gives the existing embeddings.
        self.model_identity = model_identity
        #: True when the disk was too full to open the catalog normally: it can be searched, not written.
        self.read_only = False
        #: The schema version the catalog is at once opened (older than SCHEMA_VERSION only read-only).
        self.schema_version = SCHEMA_VERSION
        self.engine: Engine = create_engine(f"sqlite:///{path}", future=True)
        event.listen(self.engine, "connect", _on_connect)
        try:
            with storage_errors(path):
                _create_private(path)
                self._migrate()
        except MmsearchError:
            if not self._can_read_while_full():
                raise
            self._open_read_only()

    @property
    def has_deletion_log(self) -> bool:
        """Whether deleted embeddings are logged (schema 3): a reader of an older catalog rebuilds instead."""
        return self.schema_version >= 3

    @property
    def has_models(self) -> bool:
        """Whether each embedding names its model (schema 4); an older catalog holds one model's."""
        return self.schema_version >= 4

    @property
    def has_photo_meta(self) -> bool:
        """Whether files hold what photos say of themselves and there are tags (schema 7)."""
        return self.schema_version >= PHOTO_META_FROM

    @property
    def has_video(self) -> bool:
        """Whether there are video keyframes (schema 8): an older catalog opened read-only has none."""
        return self.schema_version >= VIDEO_FROM

    def slot(self, prefix: str, kind: str, model: str) -> str:
        """The meta key of one (model, kind)'s ``prefix`` (generation, faiss, deletions_pruned)."""
        return f"{prefix}.{model}.{kind}" if self.has_models else f"{prefix}.{kind}"

    def of_model(self, model: str, table: Table = embeddings) -> Any:
        """The condition selecting ``model``'s rows of ``table`` (every row in an older catalog)."""
        return table.c.model == model if self.has_models else true()

    def _can_read_while_full(self) -> bool:
        """On a full disk SQLite cannot create the WAL index (-shm) a normal open needs. Without a WAL
        holding commits (none, or empty) the database file alone is the whole committed state."""
        wal = Path(f"{self.path}-wal")
        return (
            self.path.is_file()
            and catalog_errors._free_bytes(self.path) < catalog_errors._NEARLY_FULL
            and (not wal.exists() or wal.stat().st_size == 0)
        )

    def _open_read_only(self) -> None:
        log.info("the disk holding %s is full: the index is opened read-only", self.path)
        self.engine.dispose()
        # immutable=1: no locks and no -shm file (nothing can be created on a full disk). A writer that
        # still runs could not commit anything on this disk either.
        uri = f"file:{quote(str(self.path))}?mode=ro&immutable=1"
        self.engine = create_engine(f"sqlite:///{uri}&uri=true", future=True)
        self.read_only = True
        with storage_errors(self.path), self.engine.connect() as conn:
            self.schema_version = self._schema_version(conn)
            if not READABLE_FROM <= self.schema_version <= SCHEMA_VERSION:
                raise MmsearchError(disk_full_message(self.path))  # it would need a migration

    @staticmethod
    def _schema_version(conn: Connection) -> int:
        has_meta = conn.execute(
            text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'")
        ).first()
        if not has_meta:
            return 0
        row = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).first()
        return int(row[0]) if row else 0

    def _check_not_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise MmsearchError(
                f"{self.path} has schema version {version}, newer than this mmsearch ({SCHEMA_VERSION}): upgrade"
            )

    def _migrate(self) -> None:
        """Run the pending migrations, all in one transaction.

        An up-to-date catalog is only read (opening never waits for a running writer). Otherwise the
        write lock is taken first (BEGIN IMMEDIATE) and the version read again under it, so two processes
        opening an old catalog at once migrate it once. Foreign keys are off meanwhile (a table rebuild
        drops a parent table; SQLite ignores the pragma inside a transaction) and checked before COMMIT.
        """
        with self.engine.connect() as conn:
            version = self._schema_version(conn)
        self._check_not_newer(version)
        if version == SCHEMA_VERSION:
            return
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")  # we say BEGIN and COMMIT
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.info[MIGRATION_MODEL] = self.model_identity
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                try:
                    conn.execute(
                        text("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value TEXT NOT NULL)")
                    )
                    version = self._schema_version(conn)
                    self._check_not_newer(version)
                    for i in range(version, SCHEMA_VERSION):
                        log.info("migrating catalog %s to schema version %d", self.path, i + 1)
                        MIGRATIONS[i](conn)
                        _set_meta(conn, "schema_version", str(i + 1))
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").first()
                    if broken is not None:
                        raise MmsearchError(f"{self.path}: a migration broke a foreign key ({tuple(broken)})")
                    conn.exec_driver_sql("COMMIT")
                except BaseException:
                    if conn.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
                        conn.exec_driver_sql("ROLLBACK")  # (SQLite may have rolled back already)
                    raise
            finally:
                conn.info.pop(MIGRATION_MODEL, None)
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """One transaction: everything in it is visible to others at once, or not at all."""
        with storage_errors(self.path), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with storage_errors(self.path), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """Several reads of one committed state (a read transaction: WAL keeps it while writers commit)."""
        with self.read() as conn:
            conn.exec_driver_sql("BEGIN")  # the driver only opens transactions for writes by itself
            yield conn  # leaving read() rolls the read transaction back

    # --- meta ---------------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        with self.read() as conn:
            row = conn.execute(select(meta.c.value).where(meta.c.key == key)).first()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        with self.begin() as conn:
            _set_meta(conn, key, json.dumps(value))

    def delete_meta(self, key: str) -> None:
        with self.begin() as conn:
            conn.execute(meta.delete().where(meta.c.key == key))

    def generation(self, kind: str, model: str | None = None) -> int:
        """Bumped by every transaction that changes embeddings of ``kind`` of ``model`` (default: the active
        one); a FAISS file records the one it reflects, so a stale file is known without reading it."""
        return int(self.get_meta(self.slot("generation", kind, model or self.active_model() or ""), 0))

    # --- models -------------------------------------------------------------------------------
    def active_model(self) -> str | None:
        """The key of the model searched (None in a catalog older than schema 4: its only model)."""
        return self.get_meta(ACTIVE_META) if self.has_models else None

    def target_model(self) -> str | None:
        """The key of the model being embedded to replace the active one, if any."""
        return self.get_meta(TARGET_META) if self.has_models else None

    def models(self) -> dict[str, dict[str, Any]]:
        """Every registered model: key -> identity."""
        return dict(self.get_meta(MODELS_META, {})) if self.has_models else {}

    def coverage(self) -> dict[str, dict[str, int]]:
        """How many vectors each model holds, by kind."""
        out: dict[str, dict[str, int]] = {}
        if not self.has_models:
            return out
        with self.read() as conn:
            for model, kind, n in conn.execute(
                select(vector_counts.c.model, vector_counts.c.kind, vector_counts.c.n)
            ):
                if n:
                    out.setdefault(model, {})[kind] = int(n)
        return out

    def item_counts(self) -> dict[str, int]:
        """How many items each kind has to embed: image content with a live file, captions, segments."""
        live = select(files.c.id).where(files.c.media_id == media.c.id, files.c.status == "ok").exists()
        with self.read() as conn:
            return {
                "image": conn.execute(
                    select(func.count()).select_from(media).where(media.c.kind == "image", live)
                ).scalar_one(),
                "caption": conn.execute(select(func.count()).select_from(captions)).scalar_one(),
                "segment": conn.execute(select(func.count()).select_from(segments)).scalar_one(),
                "frame": conn.execute(select(func.count()).select_from(frames)).scalar_one()
                if self.has_video
                else 0,
            }

    def missing(self, model: str, kind: str, limit: int | None = None) -> list[int]:
        """The items of ``kind`` (image: media ids of live image content; caption, segment: their ids) that
        have no vector of ``model``, in id order."""
        q = missing_query(model, kind)
        if limit is not None:
            q = q.limit(limit)
        with self.read() as conn:
            return [int(i) for i in conn.execute(q).scalars()]

    # --- files --------------------------------------------------------------------------------
    def files_by_key(self) -> dict[bytes, FileRow]:
        with self.read() as conn:
            rows = conn.execute(
                select(
                    files.c.id,
                    files.c.path_key,
                    files.c.kind,
                    files.c.size,
                    files.c.mtime_ns,
                    files.c.sha256,
                    files.c.media_id,
                    files.c.status,
                    files.c.reason,
                    files.c.meta_version,
                    files.c.updated_at,
                )
            ).all()
        return {r.path_key: FileRow(**r._mapping) for r in rows}

    def captions_of(self, file_ids: Sequence[int]) -> dict[int, list[tuple[int, str, str]]]:
        """file id -> [(caption id, source, text)]."""
        out: dict[int, list[tuple[int, str, str]]] = {}
        with self.read() as conn:
            for chunk in _chunks(list(file_ids), 900):
                q = select(captions.c.file_id, captions.c.id, captions.c.source, captions.c.text).where(
                    captions.c.file_id.in_(chunk)
                )
                for fid, cid, source, txt in conn.execute(q):
                    out.setdefault(fid, []).append((cid, source, txt))
        return out

    def caption_vectors(self, texts: Sequence[str], dim: int, model: str) -> dict[str, np.ndarray]:
        """Text -> ``model``'s vector of a caption already stored with exactly that text, for the texts that
        have one."""
        out: dict[str, np.ndarray] = {}
        with self.read() as conn:
            for chunk in _chunks(sorted(set(texts)), 900):
                # One embedding id per text first: a text under thousands of images ("untitled") must not
                # read thousands of vectors.
                first = (
                    select(captions.c.text, func.min(embeddings.c.id).label("eid"))
                    .join(embeddings, embeddings.c.caption_id == captions.c.id)
                    .where(captions.c.text.in_(chunk), self.of_model(model))
                    .group_by(captions.c.text)
                    .subquery()
                )
                q = select(first.c.text, embeddings.c.vector).join(embeddings, embeddings.c.id == first.c.eid)
                for txt, blob in conn.execute(q):
                    if len(blob) == dim * 4:
                        out[txt] = np.frombuffer(blob, np.float32)
        return out

    def has_orphan_media(self) -> bool:
        """Whether some content is held by no file (see :func:`remove_orphan_media`)."""
        with self.read() as conn:
            q = select(media.c.id).where(media.c.id.not_in(_media_in_use())).limit(1)
            return conn.execute(q).first() is not None

    # --- reporting ----------------------------------------------------------------------------
    def counts(self) -> dict[str, Any]:
        """How many files (by kind and status), media, captions, segments and vectors (by kind) it holds."""
        counts: dict[str, Any] = {}
        with self.read() as conn:
            by = conn.execute(
                select(files.c.kind, files.c.status, func.count()).group_by(files.c.kind, files.c.status)
            ).all()
            counts["files"] = {f"{kind}_{status}": n for kind, status, n in by}
            for name, table in (("media", media), ("captions", captions), ("segments", segments)):
                counts[name] = conn.execute(select(func.count()).select_from(table)).scalar_one()
            active = json.loads(_get_meta(conn, ACTIVE_META) or "null") if self.has_models else None
            vec = conn.execute(
                select(embeddings.c.kind, func.count())
                .where(true() if active is None else self.of_model(active))
                .group_by(embeddings.c.kind)
            ).all()
            counts["vectors"] = {kind: n for kind, n in vec}  # the active model's
        return counts

    def skipped(self) -> list[tuple[bytes, str]]:
        """(exact path bytes, reason) of every file recorded as skipped, ordered by display path (a skipped
        file has a reason)."""
        with self.read() as conn:
            rows = conn.execute(
                select(files.c.path_key, files.c.reason)
                .where(files.c.status == "skipped")
                .order_by(files.c.path)
            ).all()
        return [(k, r) for k, r in rows]

    # --- vectors ------------------------------------------------------------------------------
    def load_vectors(self, kind: str, dim: int, model: str) -> tuple[np.ndarray, np.ndarray]:
        """All (ids, vectors) of one kind of one model, ordered by id: what a FAISS index is rebuilt from."""
        with self.snapshot() as conn:
            return _read_vectors(conn, kind, dim, after_id=0, model=self.of_model(model))

    def vector_state(self, kind: str, dim: int, model: str) -> VectorState:
        """All vectors of one (model, kind) with the positions they reflect, read in one snapshot."""
        with self.snapshot() as conn:
            position = self._position(conn, kind, model)
            ids, vecs = _read_vectors(conn, kind, dim, after_id=0, model=self.of_model(model))
        return VectorState(
            position.generation, max(int(ids.max(initial=0)), position.max_id), position.seq, ids, vecs
        )

    def vector_delta(
        self, kind: str, dim: int, model: str, *, after_id: int, after_seq: int
    ) -> VectorDelta | None:
        """What changed in one kind's vectors since an index reflecting (``after_id``, ``after_seq``), read
        in one snapshot: the embeddings added with a larger id, the ids deleted with a larger log seq.

        None when the deletion log cannot say: it was pruned past ``after_seq`` (reload a saved file), or
        the catalog predates the log (rebuild).
        """
        if not self.has_deletion_log:
            return None
        with self.snapshot() as conn:
            pruned = int(json.loads(_get_meta(conn, self.slot("deletions_pruned", kind, model)) or "0"))
            if pruned > after_seq:
                return None
            position = self._position(conn, kind, model)
            ids, vecs = _read_vectors(conn, kind, dim, after_id=after_id, model=self.of_model(model))
            removed = np.fromiter(
                conn.execute(
                    select(deletions.c.embedding_id).where(
                        deletions.c.kind == kind, deletions.c.seq > after_seq, self.of_model(model, deletions)
                    )
                ).scalars(),
                np.int64,
            )
            count = conn.execute(
                select(vector_counts.c.n).where(
                    vector_counts.c.kind == kind, self.of_model(model, vector_counts)
                )
            ).scalar()
        return VectorDelta(
            position.generation,
            max(after_id, int(ids.max(initial=0))),
            max(after_seq, position.seq),
            ids,
            vecs,
            removed,
            int(count or 0),
        )

    def vector_position(self, kind: str, model: str) -> VectorState:
        """Where the catalog stands for one (model, kind): generation, largest id, last deletion seq."""
        with self.snapshot() as conn:
            position = self._position(conn, kind, model)
            max_id = conn.execute(
                select(func.max(embeddings.c.id)).where(embeddings.c.kind == kind, self.of_model(model))
            ).scalar()
        return VectorState(
            position.generation, int(max_id or 0), position.seq, position.ids, position.vectors
        )

    def _position(self, conn: Connection, kind: str, model: str) -> VectorState:
        """The generation of (``model``, ``kind``) and the last deletion-log seq (vectors left empty)."""
        generation = int(json.loads(_get_meta(conn, self.slot("generation", kind, model)) or "0"))
        seq = 0
        if self.has_deletion_log:
            row = conn.execute(text("SELECT seq FROM sqlite_sequence WHERE name = 'deletions'")).first()
            seq = int(row[0]) if row else 0
        return VectorState(generation, 0, seq, np.empty(0, np.int64), np.empty((0, 0), np.float32))

    def record_saved_vectors(self, kind: str, model: str, record: dict[str, Any]) -> None:
        """Record a FAISS file just saved (its checksum, size and the positions it reflects) and prune the
        deletion-log rows it reflects; one transaction."""
        with self.begin() as conn:
            _set_meta(conn, self.slot("faiss", kind, model), json.dumps(record))
            seq = int(record["seq"])
            if self.has_deletion_log and seq:
                conn.execute(
                    deletions.delete().where(
                        deletions.c.kind == kind, deletions.c.seq <= seq, self.of_model(model, deletions)
                    )
                )
                key = self.slot("deletions_pruned", kind, model)
                pruned = int(json.loads(_get_meta(conn, key) or "0"))
                _set_meta(conn, key, json.dumps(max(pruned, seq)))

    def vectors_for(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        with self.read() as conn:
            for chunk in _chunks(list(ids), 900):
                q = select(embeddings.c.id, embeddings.c.vector).where(embeddings.c.id.in_(chunk))
                for eid, blob in conn.execute(q):
                    out[eid] = np.frombuffer(blob, np.float32)
        return out


@dataclass(frozen=True)
class VectorState:
    """One kind's vectors as of a catalog generation. ``max_id``: every embedding of the kind with a larger
    id was added later; ``seq``: every deletion logged with a larger seq came later."""

    generation: int
    max_id: int
    seq: int
    ids: np.ndarray
    vectors: np.ndarray


@dataclass(frozen=True)
class VectorDelta:
    """The change from an index's position to the positions here (see :meth:`Catalog.vector_delta`);
    ``count`` is how many vectors the kind holds afterwards (a check of the result)."""

    generation: int
    max_id: int
    seq: int
    ids: np.ndarray
    vectors: np.ndarray
    removed: np.ndarray
    count: int


def _read_vectors(
    conn: Connection, kind: str, dim: int, *, after_id: int, model: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of one kind with an id above ``after_id``, ordered by id; ``model``: the condition
    selecting one model's (:meth:`Catalog.of_model`)."""
    where = (embeddings.c.kind == kind) & (embeddings.c.id > after_id) & model
    n = conn.execute(select(func.count()).where(where)).scalar_one() if after_id == 0 else None
    ids_list: list[int] = []
    chunks: list[bytes] = []
    q = select(embeddings.c.id, embeddings.c.vector).where(where).order_by(embeddings.c.id)
    if n is not None:  # a full load: preallocate (a million rows as Python bytes would double the memory)
        ids = np.empty(n, np.int64)
        vecs = np.empty((n, dim), np.float32)
        i = 0
        for eid, blob in conn.execute(q):
            ids[i] = eid
            vecs[i] = np.frombuffer(blob, np.float32)
            i += 1
        return ids[:i], vecs[:i]
    for eid, blob in conn.execute(q):
        ids_list.append(eid)
        chunks.append(blob)
    vecs = np.frombuffer(b"".join(chunks), np.float32).reshape(len(ids_list), dim).copy()
    return np.asarray(ids_list, np.int64), vecs


def _create_private(path: Path) -> None:
    """Create the catalog file owner-only before SQLite opens it (SQLite would create it with the process
    umask, usually world-readable, and gives its -wal and -shm files the database file's mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # the umask may have removed bits: this is the mode wanted
    finally:
        os.close(fd)


def _on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers see the last committed state while a run writes; synchronous=FULL so a commit
    # that returned survives power loss, not only a process crash.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()
    # The --near filter's exact distance (mmsearch.catalog_filters); NULL places give NULL.
    dbapi_conn.create_function(DISTANCE_FUNCTION, 4, _distance_or_null, deterministic=True)


#: The SQL function ``DISTANCE_FUNCTION(lat1, lon1, lat2, lon2)``: km between two places.
DISTANCE_FUNCTION = "mmsearch_km"


def _distance_or_null(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> float | None:
    if None in (lat1, lon1, lat2, lon2):
        return None
    return distance_km(float(lat1), float(lon1), float(lat2), float(lon2))


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _media_in_use() -> Any:
    return select(files.c.media_id).where(files.c.media_id.is_not(None))


def missing_query(model: str, kind: str) -> Any:
    """The ids of the items of ``kind`` without a vector of ``model``: image content with a live file,
    captions, transcript segments."""
    has = (
        select(embeddings.c.id)
        .where(embeddings.c.model == model, embeddings.c.kind == kind)
        .where(getattr(embeddings.c, REF_COLUMNS[kind]) == _ITEM_ID[kind])
        .exists()
    )
    if kind == "image":
        live = select(files.c.id).where(files.c.media_id == media.c.id, files.c.status == "ok").exists()
        return select(media.c.id).where(media.c.kind == "image", live, ~has).order_by(media.c.id)
    table = {"caption": captions, "segment": segments, "frame": frames}[kind]
    return select(table.c.id).where(~has).order_by(table.c.id)


_ITEM_ID = {"image": media.c.id, "caption": captions.c.id, "segment": segments.c.id, "frame": frames.c.id}
