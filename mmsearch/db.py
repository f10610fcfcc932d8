"""The catalog: SQLite through SQLAlchemy 2 Core, the index's source of truth.

It holds the files seen (with size, mtime and content hash), the distinct media contents, captions,
transcript segments, every embedding vector, the model identity and the schema version. The FAISS files are
derived from the ``embeddings`` table and can always be rebuilt from it.

Schema changes are numbered migrations (``MIGRATIONS``); ``meta.schema_version`` says how many ran.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    null,
    select,
    text,
    true,
)
from sqlalchemy.exc import OperationalError

from mmsearch.errors import MmsearchError

log = logging.getLogger(__name__)
T = TypeVar("T")

metadata = MetaData()

meta = Table("meta", metadata, Column("key", String, primary_key=True), Column("value", Text, nullable=False))

media = Table(
    "media",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sha256", String(64), nullable=False, unique=True),
    Column("kind", String(8), nullable=False),  # image | audio
    Column("width", Integer),
    Column("height", Integer),
    Column("duration", Float),
    Column("language", String(16)),
    Column("transcript", Text),
    # The speech settings that made the transcript (speech_key; NULL: made before they were recorded).
    Column("speech", String),
    sqlite_autoincrement=True,
)

files = Table(
    "files",
    metadata,
    Column("id", Integer, primary_key=True),
    # The exact bytes of the absolute path: file names need not be valid UTF-8.
    Column("path_key", LargeBinary, nullable=False, unique=True),
    Column("path", Text, nullable=False),  # for display (undecodable bytes replaced)
    Column("kind", String(8), nullable=False),
    Column("size", Integer, nullable=False),
    Column("mtime_ns", Integer, nullable=False),
    Column("sha256", String(64)),
    Column("media_id", Integer, ForeignKey("media.id"), index=True),
    Column("status", String(8), nullable=False),  # ok | skipped
    Column("reason", Text),
    Column("updated_at", Float, nullable=False),
    sqlite_autoincrement=True,
)

captions = Table(
    "captions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("file_id", Integer, ForeignKey("files.id"), nullable=False, index=True),
    Column("source", Text, nullable=False),
    Column("text", Text, nullable=False, index=True),  # index: a known caption text reuses its vector
    sqlite_autoincrement=True,
)

segments = Table(
    "segments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("media_id", Integer, ForeignKey("media.id"), nullable=False, index=True),
    Column("idx", Integer, nullable=False),  # -1: the whole (short) transcript
    Column("start", Float, nullable=False),
    Column("end", Float, nullable=False),
    Column("text", Text, nullable=False),
    sqlite_autoincrement=True,
)

embeddings = Table(
    "embeddings",
    metadata,
    Column("id", Integer, primary_key=True),  # the FAISS id
    Column("kind", String(8), nullable=False, index=True),  # image | caption | segment
    Column("media_id", Integer, ForeignKey("media.id"), index=True),
    Column("caption_id", Integer, ForeignKey("captions.id"), index=True),
    Column("segment_id", Integer, ForeignKey("segments.id"), index=True),
    Column("vector", LargeBinary, nullable=False),  # float32, L2-normalised
    # The model that made the vector (identity.model_key): an index holds several while it changes model.
    Column("model", String, nullable=False),
    sqlite_autoincrement=True,
)

# Every deleted embedding, logged by a trigger in the deleting transaction (see _migration_3): a reader
# holding an in-memory FAISS index removes the ids logged after its position instead of rebuilding it.
# Rows already reflected in a saved FAISS file are pruned by the writer (``meta deletions_pruned.KIND``).
deletions = Table(
    "deletions",
    metadata,
    Column("seq", Integer, primary_key=True),
    Column("kind", String(8), nullable=False),
    Column("embedding_id", Integer, nullable=False),
    Column("model", String),  # (schema 4)
    sqlite_autoincrement=True,
)

# How many embeddings each (model, kind) holds, kept by triggers (see _migration_4): the check a reader
# makes after following a change, which counting a million index rows would make cost more than the change.
vector_counts = Table(
    "vector_counts",
    metadata,
    Column("model", String, primary_key=True),
    Column("kind", String(8), primary_key=True),
    Column("n", Integer, nullable=False),
)

VECTOR_KINDS = ("image", "caption", "segment")


def _migration_1(conn: Connection) -> None:
    # The tables of version 1 (in their current shape); later migrations add the others.
    metadata.create_all(conn, tables=[meta, media, files, captions, segments, embeddings])


def _migration_2(conn: Connection) -> None:
    # Catalogs made at version 1 lack the caption text index (newer ones get it from create_all).
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_captions_text ON captions (text)"))


# The tables whose ids leave the catalog (FAISS ids, /api/media/{id} links, thumbnails cached by id):
# AUTOINCREMENT, so an id is never given to another row, even after the newest row was deleted.
_ID_TABLES = ("media", "files", "captions", "segments", "embeddings")
_TRIGGERS_V3 = (
    "CREATE TRIGGER IF NOT EXISTS embedding_deleted AFTER DELETE ON embeddings BEGIN "
    "INSERT INTO deletions (kind, embedding_id) VALUES (old.kind, old.id); "
    "UPDATE vector_counts SET n = n - 1 WHERE kind = old.kind; END",
    "CREATE TRIGGER IF NOT EXISTS embedding_added AFTER INSERT ON embeddings BEGIN "
    "UPDATE vector_counts SET n = n + 1 WHERE kind = new.kind; END",
)
_TRIGGERS = (
    "CREATE TRIGGER embedding_deleted AFTER DELETE ON embeddings BEGIN "
    "INSERT INTO deletions (kind, embedding_id, model) VALUES (old.kind, old.id, old.model); "
    "UPDATE vector_counts SET n = n - 1 WHERE model = old.model AND kind = old.kind; END",
    "CREATE TRIGGER embedding_added AFTER INSERT ON embeddings BEGIN "
    "INSERT OR IGNORE INTO vector_counts (model, kind, n) VALUES (new.model, new.kind, 0); "
    "UPDATE vector_counts SET n = n + 1 WHERE model = new.model AND kind = new.kind; END",
)


def _migration_3(conn: Connection) -> None:
    """Ids are never reused (AUTOINCREMENT); deleted embeddings are logged and counts kept for readers.

    SQLite only gives AUTOINCREMENT to a table created with it, so each older table is rebuilt: a new
    table from the old one's own definition (only the primary key changes), its rows copied with their
    ids (which seeds ``sqlite_sequence`` with the largest), the old table dropped, the new one renamed
    and the old one's indexes recreated. :meth:`Catalog._migrate` runs this with foreign keys off, in
    one transaction.
    """
    for table in _ID_TABLES:
        sql = conn.execute(
            text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :t"), {"t": table}
        ).scalar_one()
        if "AUTOINCREMENT" in sql.upper():
            continue  # created by this version's create_all
        new_sql, n = re.subn(
            r"\bid INTEGER NOT NULL,", "id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,", sql, count=1
        )
        new_sql, m = re.subn(r"PRIMARY KEY \(id\),\s*", "", new_sql, count=1)
        new_sql, k = re.subn(
            rf"^CREATE TABLE \"?{table}\"? \(", f"CREATE TABLE {table}__v3 (", new_sql, count=1
        )
        if (n, m, k) != (1, 1, 1):
            raise MmsearchError(f"cannot migrate table {table}: unexpected definition {sql!r}")
        indexes = (
            conn.execute(
                text(
                    "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = :t AND sql IS NOT NULL"
                ),
                {"t": table},
            )
            .scalars()
            .all()
        )
        conn.execute(text(new_sql))
        conn.execute(text(f"INSERT INTO {table}__v3 SELECT * FROM {table}"))
        conn.execute(text(f"DROP TABLE {table}"))
        conn.execute(text(f"ALTER TABLE {table}__v3 RENAME TO {table}"))
        for index_sql in indexes:
            conn.execute(text(index_sql))
    # The version-3 shapes of the two tables (migration 4 brings them to the current ones).
    conn.execute(
        text(
            "CREATE TABLE IF NOT EXISTS deletions (seq INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, "
            "kind VARCHAR(8) NOT NULL, embedding_id INTEGER NOT NULL)"
        )
    )
    conn.execute(
        text(
            "CREATE TABLE IF NOT EXISTS vector_counts (kind VARCHAR(8) NOT NULL PRIMARY KEY, n INTEGER NOT NULL)"
        )
    )
    if {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(vector_counts)")} != {"kind", "n"}:
        return  # a current catalog migrated again (its version lowered by hand): nothing to do
    conn.execute(
        text("INSERT OR REPLACE INTO vector_counts SELECT kind, count(*) FROM embeddings GROUP BY kind")
    )
    for kind in VECTOR_KINDS:
        conn.execute(text("INSERT OR IGNORE INTO vector_counts VALUES (:kind, 0)"), {"kind": kind})
    for trigger in _TRIGGERS_V3:
        conn.execute(text(trigger))


#: ``Connection.info`` key: the model identity in the index's description, for migration 4.
MIGRATION_MODEL = "mmsearch.model_identity"
#: Catalog meta keys: the registered models (key -> identity), the one searched, the one being embedded.
MODELS_META = "models"
#: The speech settings a retranscription is bringing every transcript to (see mmsearch.retranscribe).
SPEECH_TARGET_META = "speech.target"
ACTIVE_META = "model.active"
TARGET_META = "model.target"
# The per-kind meta keys that became per (model, kind) in schema 4.
_SLOT_PREFIXES = ("generation", "faiss", "deletions_pruned")


def _migration_4(conn: Connection) -> None:
    """Each embedding names its model: the existing ones get the index's model (``MIGRATION_MODEL``),
    which becomes the registered, active one; counts, log and meta keys become per (model, kind).

    Saved FAISS files stay where they are: their records (``faiss.MODEL.KIND``) name them (``file``)."""
    from mmsearch.identity import model_key, registered

    identity: dict[str, Any] | None = conn.info.get(MIGRATION_MODEL)
    key = model_key(identity) if identity else None
    columns = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(embeddings)")}
    if "model" not in columns:
        conn.execute(text("ALTER TABLE embeddings ADD COLUMN model VARCHAR NOT NULL DEFAULT ''"))
    if conn.execute(select(embeddings.c.id).where(embeddings.c.model == "").limit(1)).first() is not None:
        if key is None:
            raise MmsearchError("cannot migrate the catalog: the index's model is not known")
        conn.execute(embeddings.update().where(embeddings.c.model == "").values(model=key))
    conn.execute(
        text("CREATE INDEX IF NOT EXISTS ix_embeddings_model_kind_id ON embeddings (model, kind, id)")
    )
    if "model" not in {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(deletions)")}:
        conn.execute(text("ALTER TABLE deletions ADD COLUMN model VARCHAR"))
        if key is not None:
            conn.execute(deletions.update().values(model=key))
    conn.execute(text("DROP TABLE IF EXISTS vector_counts"))
    vector_counts.create(conn)
    conn.execute(
        text(
            "INSERT INTO vector_counts (model, kind, n) "
            "SELECT model, kind, count(*) FROM embeddings GROUP BY model, kind"
        )
    )
    conn.execute(text("DROP TRIGGER IF EXISTS embedding_deleted"))
    conn.execute(text("DROP TRIGGER IF EXISTS embedding_added"))
    for trigger in _TRIGGERS:
        conn.execute(text(trigger))
    if key is None:
        return
    for prefix in _SLOT_PREFIXES:
        for kind in VECTOR_KINDS:
            old = _get_meta(conn, f"{prefix}.{kind}")
            if old is None:
                continue
            if prefix == "faiss":
                old = json.dumps({**json.loads(old), "file": f"{kind}.faiss"})  # the flat layout
            _set_meta(conn, f"{prefix}.{key}.{kind}", old)
            conn.execute(meta.delete().where(meta.c.key == f"{prefix}.{kind}"))
    if _get_meta(conn, ACTIVE_META) is None:
        register_model(conn, key, registered(identity or {}))
        _set_meta(conn, ACTIVE_META, json.dumps(key))


def _migration_5(conn: Connection) -> None:
    """Each transcript names the speech settings that made it (see mmsearch.retranscribe)."""
    if "speech" not in {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(media)")}:
        conn.execute(text("ALTER TABLE media ADD COLUMN speech VARCHAR"))


# Append only: each entry brings a database at version i to version i+1.
MIGRATIONS: list[Callable[[Connection], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
]
SCHEMA_VERSION = len(MIGRATIONS)
# The oldest schema this code can search without migrating it: what a catalog on a full disk, which cannot
# be migrated, may be at. Migration 2 only adds an index; migration 3 adds AUTOINCREMENT (which only
# matters to inserts) and the deletion log, which a reader of an older catalog does without: it rebuilds a
# vector index whose generation changed instead of applying the log (see Catalog.has_deletion_log).
# Migration 4 names each embedding's model: an older catalog holds one model's, keyed by kind alone.
READABLE_FROM = 1


def path_key(path: Path | str) -> bytes:
    return os.fsencode(path)


def display_path(key: bytes) -> str:
    return key.decode("utf-8", "replace")


def path_json(key: bytes) -> dict[str, str]:
    """A path for JSON: ``path`` in display form (valid UTF-8, undecodable bytes replaced by U+FFFD) and
    ``path_b64``, the standard base64 of its exact bytes (file names need not be UTF-8)."""
    return {"path": display_path(key), "path_b64": base64.b64encode(key).decode("ascii")}


def storable(text: str) -> str:
    """``text`` as valid UTF-8 for a TEXT column: a non-UTF-8 file name inside it (decoded by Python with
    surrogate escapes) would make SQLite's driver raise UnicodeEncodeError."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


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
            and _free_bytes(self.path) < _NEARLY_FULL
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
                )
            ).all()
        return {r.path_key: FileRow(*r) for r in rows}

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


@dataclass(frozen=True)
class ItemRow:
    """What a search hit shows: the embedding's item and the (first live) file it belongs to."""

    id: int
    kind: str
    file_id: int
    path_key: bytes
    text: str | None
    start: float | None
    end: float | None
    media_id: int | None


def resolve_items(
    catalog: Catalog, ids: Sequence[int], kinds: Sequence[str] = VECTOR_KINDS
) -> dict[int, ItemRow]:
    """The items of these embedding ids that are of one of ``kinds`` (the kinds searched: an id found in
    one kind's index is never shown as an item of another)."""
    e, f, c, s = embeddings, files, captions, segments
    f2 = files.alias("f2")

    def first_file(media_id_col: Any) -> Any:
        # The lowest live file id of this media, looked up through the files.media_id index per row,
        # instead of grouping the whole files table on every query (seconds at 100k files).
        return (
            select(func.min(f2.c.id))
            .where(f2.c.media_id == media_id_col, f2.c.status == "ok")
            .scalar_subquery()
        )

    out: dict[int, ItemRow] = {}
    with catalog.read() as conn:
        for chunk in _chunks([int(i) for i in ids], 900):
            image_q = (
                select(e.c.id, e.c.kind, f.c.id, f.c.path_key, null(), null(), null(), e.c.media_id)
                .select_from(e)
                .join(f, f.c.id == first_file(e.c.media_id))
                .where(e.c.id.in_(chunk), e.c.kind == "image")
            )
            caption_q = (
                select(e.c.id, e.c.kind, f.c.id, f.c.path_key, c.c.text, null(), null(), f.c.media_id)
                .join(c, c.c.id == e.c.caption_id)
                .join(f, f.c.id == c.c.file_id)
                .where(e.c.id.in_(chunk), e.c.kind == "caption")
            )
            segment_q = (
                select(e.c.id, e.c.kind, f.c.id, f.c.path_key, s.c.text, s.c.start, s.c.end, s.c.media_id)
                .select_from(e)
                .join(s, s.c.id == e.c.segment_id)
                .join(f, f.c.id == first_file(s.c.media_id))
                .where(e.c.id.in_(chunk), e.c.kind == "segment")
            )
            for kind, q in (("image", image_q), ("caption", caption_q), ("segment", segment_q)):
                if kind not in kinds:
                    continue
                for row in conn.execute(q):
                    out[int(row[0])] = ItemRow(*row)
    return out


def inserted_id(result: Any) -> int:
    """The row id of a single-row INSERT."""
    key = result.inserted_primary_key
    if key is None:  # only for executemany/INSERT..SELECT, which we never use for this
        raise RuntimeError("INSERT returned no primary key")
    return int(key[0])


def add_embeddings(
    conn: Connection, kind: str, vectors: np.ndarray, refs: Sequence[int], model: str | None = None
) -> list[int]:
    """Insert vectors of one kind made by ``model`` (default: the active one); ``refs`` are media, caption
    or segment ids. Returns the new ids."""
    ref_col = REF_COLUMNS[kind]
    model = model or active_model(conn)
    ids = []
    for vec, ref in zip(vectors, refs, strict=True):
        res = conn.execute(
            embeddings.insert().values(
                kind=kind,
                model=model,
                vector=np.ascontiguousarray(vec, np.float32).tobytes(),
                **{ref_col: ref},
            )
        )
        ids.append(inserted_id(res))
    if ids:
        bump_generation(conn, kind, model)
    return ids


#: The column of an embedding naming its item, by kind.
REF_COLUMNS = {"image": "media_id", "caption": "caption_id", "segment": "segment_id"}


def active_model(conn: Connection) -> str:
    key = _get_meta(conn, ACTIVE_META)
    if key is None:
        raise MmsearchError("the catalog has no active model")
    return str(json.loads(key))


def bump_generation(conn: Connection, kind: str, model: str) -> None:
    key = f"generation.{model}.{kind}"
    row = conn.execute(select(meta.c.value).where(meta.c.key == key)).first()
    _set_meta(conn, key, json.dumps(int(json.loads(row[0])) + 1 if row else 1))


def delete_embeddings(conn: Connection, where: Any) -> dict[str, list[int]]:
    """Delete the embeddings matching ``where``; returns their ids by kind (to remove from FAISS)."""
    removed: dict[str, list[int]] = {}
    slots: set[tuple[str, str]] = set()
    for eid, kind, model in conn.execute(
        select(embeddings.c.id, embeddings.c.kind, embeddings.c.model).where(where)
    ):
        removed.setdefault(kind, []).append(int(eid))
        slots.add((model, kind))
    for ids in removed.values():
        for chunk in _chunks(ids, 900):
            conn.execute(embeddings.delete().where(embeddings.c.id.in_(chunk)))
    for model, kind in slots:
        bump_generation(conn, kind, model)
    return removed


# --- writes of an indexing run (each inside the caller's transaction) ----------------------------------


def write_file(
    conn: Connection,
    path: Path,
    *,
    kind: str,
    size: int,
    mtime_ns: int,
    sha256: str | None,
    media_id: int | None,
    reason: str | None = None,
) -> None:
    """Record a file as seen (``reason`` None) or skipped (why), replacing any row of the same path."""
    from sqlalchemy.dialects.sqlite import insert

    key = path_key(path)
    values = {
        "path_key": key,
        "path": display_path(key),
        "kind": kind,
        "size": size,
        "mtime_ns": mtime_ns,
        "sha256": sha256,
        "media_id": media_id,
        "status": "skipped" if reason else "ok",
        "reason": None if reason is None else storable(reason),  # may quote a non-UTF-8 name
        "updated_at": time.time(),
    }
    stmt = insert(files).values(**values)
    conn.execute(stmt.on_conflict_do_update(index_elements=[files.c.path_key], set_=values))


def media_of_kind(conn: Connection, sha256: str, kind: str) -> int | None:
    """The id of the content with this hash if the catalog holds it as ``kind``."""
    row = conn.execute(select(media.c.id).where(media.c.sha256 == sha256, media.c.kind == kind)).first()
    return int(row[0]) if row else None


def add_image_media(conn: Connection, sha256: str) -> int:
    """Record an image's content; returns its media id."""
    return inserted_id(conn.execute(media.insert().values(sha256=sha256, kind="image")))


def add_transcript(
    conn: Connection,
    sha256: str,
    *,
    duration: float,
    language: str | None,
    text: str,
    spans: Sequence[tuple[int, float, float, str]],
    speech: str | None = None,
) -> tuple[int, list[int]]:
    """Record a recording's content and its transcript segments ``(idx, start, end, text)`` made by the
    speech settings ``speech`` (a speech_key); returns the media id and the segment ids, in the order of
    ``spans``."""
    mid = inserted_id(
        conn.execute(
            media.insert().values(
                sha256=sha256,
                kind="audio",
                duration=duration,
                language=language,
                transcript=text,
                speech=speech,
            )
        )
    )
    return mid, _add_segments(conn, mid, spans)


def _add_segments(conn: Connection, mid: int, spans: Sequence[tuple[int, float, float, str]]) -> list[int]:
    seg_ids = []
    for idx, start, end, seg_text in spans:
        r = conn.execute(segments.insert().values(media_id=mid, idx=idx, start=start, end=end, text=seg_text))
        seg_ids.append(inserted_id(r))
    return seg_ids


def replace_transcript(
    conn: Connection,
    media_id: int,
    *,
    duration: float,
    language: str | None,
    text: str,
    spans: Sequence[tuple[int, float, float, str]],
    speech: str,
) -> tuple[dict[str, list[int]], list[int]]:
    """Replace a recording's transcript and segments (their vectors of every model deleted); returns the
    embedding ids deleted, by kind, and the new segment ids."""
    old = select(segments.c.id).where(segments.c.media_id == media_id)
    removed = delete_embeddings(conn, embeddings.c.segment_id.in_(old))
    conn.execute(segments.delete().where(segments.c.media_id == media_id))
    conn.execute(
        media.update()
        .where(media.c.id == media_id)
        .values(duration=duration, language=language, transcript=text, speech=speech)
    )
    return removed, _add_segments(conn, media_id, spans)


def mark_transcribed(conn: Connection, media_id: int, speech: str) -> None:
    """Record that ``speech`` settings were tried on a recording (its transcript kept as it was)."""
    conn.execute(media.update().where(media.c.id == media_id).values(speech=speech))


def recordings_not_by(catalog: Catalog, speech: str) -> list[int]:
    """The recordings (audio content with a live file) whose transcript other speech settings made."""
    live = select(files.c.id).where(files.c.media_id == media.c.id, files.c.status == "ok").exists()
    q = (
        select(media.c.id)
        .where(media.c.kind == "audio", live, (media.c.speech.is_(None)) | (media.c.speech != speech))
        .order_by(media.c.id)
    )
    with catalog.read() as conn:
        return [int(i) for i in conn.execute(q).scalars()]


def add_captions(conn: Connection, rows: Sequence[tuple[int, str, str]]) -> list[int]:
    """Record captions ``(file id, source, text)``; returns their ids, in order."""
    return [
        inserted_id(conn.execute(captions.insert().values(file_id=fid, source=source, text=txt)))
        for fid, source, txt in rows
    ]


def remove_captions(conn: Connection, caption_ids: Sequence[int]) -> dict[str, list[int]]:
    """Delete captions and their embeddings; returns the embedding ids deleted, by kind."""
    removed = delete_embeddings(conn, embeddings.c.caption_id.in_(caption_ids))
    conn.execute(captions.delete().where(captions.c.id.in_(caption_ids)))
    return removed


def remove_files(conn: Connection, file_ids: Sequence[int]) -> dict[str, list[int]]:
    """Forget files with their captions (their content stays: see :func:`remove_orphan_media`); returns
    the embedding ids deleted, by kind."""
    cap_ids = select(captions.c.id).where(captions.c.file_id.in_(file_ids))
    removed = delete_embeddings(conn, embeddings.c.caption_id.in_(cap_ids))
    conn.execute(captions.delete().where(captions.c.file_id.in_(file_ids)))
    conn.execute(files.delete().where(files.c.id.in_(file_ids)))
    return removed


def remove_orphan_media(conn: Connection) -> tuple[dict[str, list[int]], set[str]]:
    """Delete the content no file refers to any more, with its segments and embeddings; returns the
    embedding ids deleted (by kind) and the content hashes that went."""
    orphans, shas = [], set()
    q = select(media.c.id, media.c.sha256).where(media.c.id.not_in(_media_in_use()))
    for mid, sha in conn.execute(q):
        orphans.append(int(mid))
        shas.add(sha)
    removed: dict[str, list[int]] = {}
    if orphans:
        seg_ids = select(segments.c.id).where(segments.c.media_id.in_(orphans))
        for more in (
            delete_embeddings(conn, embeddings.c.media_id.in_(orphans)),
            delete_embeddings(conn, embeddings.c.segment_id.in_(seg_ids)),
        ):
            for kind, ids in more.items():
                removed.setdefault(kind, []).extend(ids)
        conn.execute(segments.delete().where(segments.c.media_id.in_(orphans)))
        conn.execute(media.delete().where(media.c.id.in_(orphans)))
    return removed, shas


def _media_in_use() -> Any:
    return select(files.c.media_id).where(files.c.media_id.is_not(None))


# SQLite primary result codes (the low byte of an extended code).
_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL = 8, 10, 13
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


_NEARLY_FULL = 1 << 16


def _free_bytes(path: Path | str) -> int:
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        st = os.statvfs(folder)
    except OSError:
        return _NEARLY_FULL  # unknown: do not claim the disk is full
    return st.f_bavail * st.f_frsize


def disk_full_message(path: Path | str) -> str:
    return (
        f"disk full while writing the index at {path}: free some space and run the same command again "
        "(everything committed before this point is kept and the index still answers queries)"
    )


@contextmanager
def storage_errors(path: Path | str) -> Iterator[None]:
    """Turn a full disk or a failing device under the index into one clear :class:`MmsearchError`.

    SQLite reports ENOSPC as SQLITE_FULL ("database or disk is full") and the transaction is rolled
    back, so the catalog keeps its last committed state; the raw driver error would tell a user nothing
    about what to do.
    """
    try:
        yield
    except OperationalError as e:
        code = getattr(e.orig, "sqlite_errorcode", None)  # Python >= 3.11
        primary = code & 0xFF if isinstance(code, int) else None
        message = str(e.orig)
        if primary == _SQLITE_FULL or "database or disk is full" in message:
            raise MmsearchError(disk_full_message(path)) from e
        if primary == _SQLITE_READONLY or "readonly database" in message:
            if _free_bytes(path) < _NEARLY_FULL:  # opened read-only because the disk is full
                raise MmsearchError(disk_full_message(path)) from e
            raise MmsearchError(f"the index catalog {path} is read-only: {message}") from e
        if primary == _SQLITE_IOERR or "disk I/O error" in message:
            # Growing the WAL index (-shm) on a full disk fails as an I/O error, not SQLITE_FULL.
            if _free_bytes(path) < _NEARLY_FULL:
                raise MmsearchError(disk_full_message(path)) from e
            raise MmsearchError(f"I/O error on the index catalog {path}: {message}") from e
        raise
    except OSError as e:
        if e.errno in _DISK_FULL_ERRNOS:
            raise MmsearchError(disk_full_message(path)) from e
        raise


def _get_meta(conn: Connection, key: str) -> str | None:
    row = conn.execute(select(meta.c.value).where(meta.c.key == key)).first()
    return str(row[0]) if row else None


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


def _set_meta(conn: Connection, key: str, value: str) -> None:
    from sqlalchemy.dialects.sqlite import insert

    stmt = insert(meta).values(key=key, value=value)
    conn.execute(stmt.on_conflict_do_update(index_elements=[meta.c.key], set_={"value": value}))


def _on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers see the last committed state while a run writes; synchronous=FULL so a commit
    # that returned survives power loss, not only a process crash.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --- item details: what the server shows of one file --------------------------------------------------
@dataclass(frozen=True)
class FileDetails:
    """A live file and its content's metadata: what the server shows, and checks before serving it."""

    id: int
    path_key: bytes  # the exact path bytes
    path: str  # display form
    kind: str  # image | audio
    size: int
    mtime_ns: int
    media_id: int
    sha256: str  # of the content
    width: int | None
    height: int | None
    duration: float | None
    language: str | None
    transcript: str | None


def file_details(catalog: Catalog, file_id: int) -> FileDetails | None:
    """File ``file_id`` with its content's metadata, or None unless it is in the catalog and live."""
    f, m = files, media
    q = (
        select(f.c.id, f.c.path_key, f.c.path, f.c.kind, f.c.size, f.c.mtime_ns, f.c.media_id, m.c.sha256)
        .add_columns(m.c.width, m.c.height, m.c.duration, m.c.language, m.c.transcript)
        .join(m, m.c.id == f.c.media_id)
        .where(f.c.id == file_id, f.c.status == "ok")
    )
    with catalog.read() as conn:
        row = conn.execute(q).first()
    return None if row is None else FileDetails(*row)


def segments_of(catalog: Catalog, media_id: int, limit: int) -> list[tuple[float, float, str]]:
    """The first ``limit`` transcript segments of content ``media_id`` in time order: (start, end, text)."""
    s = segments
    q = (
        select(s.c.start, s.c.end, s.c.text)
        .where(s.c.media_id == media_id)
        .order_by(s.c.start, s.c.idx)
        .limit(limit)
    )
    with catalog.read() as conn:
        return [(start, end, said) for start, end, said in conn.execute(q)]


# --- models: several in one index while it changes model (see mmsearch.reembed) ------------------------


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
    table = captions if kind == "caption" else segments
    return select(table.c.id).where(~has).order_by(table.c.id)


_ITEM_ID = {"image": media.c.id, "caption": captions.c.id, "segment": segments.c.id}


def register_model(conn: Connection, key: str, identity: dict[str, Any]) -> None:
    """Record a model's identity under its key (kept while the index holds its vectors)."""
    models = json.loads(_get_meta(conn, MODELS_META) or "{}")
    models[key] = identity
    _set_meta(conn, MODELS_META, json.dumps(models))


def set_target(conn: Connection, key: str | None) -> None:
    """Name the model being embedded for every item (None: no model is)."""
    if key is None:
        conn.execute(meta.delete().where(meta.c.key == TARGET_META))
    else:
        _set_meta(conn, TARGET_META, json.dumps(key))


def set_active(conn: Connection, key: str) -> None:
    """Make ``key`` the model searched: readers switch to it after this transaction commits."""
    _set_meta(conn, ACTIVE_META, json.dumps(key))


def forget_model(conn: Connection, key: str) -> dict[str, list[int]]:
    """Delete a model's vectors and its registration; returns the embedding ids deleted, by kind."""
    removed = delete_embeddings(conn, embeddings.c.model == key)
    # Its deletion-log rows go too (no file of it will be saved to prune them); a reader still following
    # it is sent back to a saved file or a rebuild (generations stay: they only ever grow).
    seq = conn.execute(text("SELECT seq FROM sqlite_sequence WHERE name = 'deletions'")).scalar()
    conn.execute(deletions.delete().where(deletions.c.model == key))
    for kind in VECTOR_KINDS:
        _set_meta(conn, f"deletions_pruned.{key}.{kind}", json.dumps(int(seq or 0)))
    models = json.loads(_get_meta(conn, MODELS_META) or "{}")
    models.pop(key, None)
    _set_meta(conn, MODELS_META, json.dumps(models))
    conn.execute(meta.delete().where(meta.c.key.like(f"faiss.{key}.%")))
    return removed


def live_files_of(catalog: Catalog, media_ids: Sequence[int]) -> dict[int, list[FileRow]]:
    """media id -> its live files (lowest id first): where content is read from again."""
    out: dict[int, list[FileRow]] = {}
    cols = [files.c.id, files.c.path_key, files.c.kind, files.c.size, files.c.mtime_ns, files.c.sha256]
    cols += [files.c.media_id, files.c.status, files.c.reason]
    with catalog.read() as conn:
        for chunk in _chunks(list(media_ids), 900):
            q = select(*cols).where(files.c.media_id.in_(chunk), files.c.status == "ok").order_by(files.c.id)
            for row in conn.execute(q):
                out.setdefault(int(row.media_id), []).append(FileRow(*row))
    return out


def texts_of(catalog: Catalog, kind: str, ids: Sequence[int]) -> dict[int, str]:
    """Caption or segment id -> its text."""
    table = captions if kind == "caption" else segments
    out: dict[int, str] = {}
    with catalog.read() as conn:
        for chunk in _chunks(list(ids), 900):
            for i, txt in conn.execute(select(table.c.id, table.c.text).where(table.c.id.in_(chunk))):
                out[int(i)] = txt
    return out


def caption_ids_of(conn: Connection, file_ids: Sequence[int]) -> list[int]:
    """The ids of the captions of these files."""
    return [
        int(i) for i in conn.execute(select(captions.c.id).where(captions.c.file_id.in_(file_ids))).scalars()
    ]


def target_in(conn: Connection) -> str | None:
    """The target model's key as this transaction sees it."""
    value = _get_meta(conn, TARGET_META)
    return None if value is None else str(json.loads(value))
