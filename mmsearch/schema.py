"""The catalog's tables, the triggers that keep its deletion log and vector counts, its numbered migrations
(``MIGRATIONS``; ``meta.schema_version`` says how many ran), its meta keys and how paths are stored.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    select,
    text,
)

from mmsearch.errors import MmsearchError

metadata = MetaData()

meta = Table("meta", metadata, Column("key", String, primary_key=True), Column("value", Text, nullable=False))

media = Table(
    "media",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sha256", String(64), nullable=False, unique=True),
    Column("kind", String(8), nullable=False),  # image | audio | video
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
    # What a photo says of itself (schema 7; NULL when unknown): see mmsearch.photo_meta.
    Column("taken_at", Float),  # when it was taken, unix seconds
    Column("taken_source", String(16)),  # exif | xmp | takeout
    Column("camera", Text),
    Column("lat", Float),  # WGS84 degrees, south and west negative
    Column("lon", Float),
    # The PHOTO_META_VERSION that read these (NULL: not read; the next run of the file's folder reads it).
    Column("meta_version", Integer),
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
    Column("frame_id", Integer, ForeignKey("frames.id"), index=True),  # (schema 8)
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

#: Words attached to a file or to content (schema 7). Keywords people wrote (IPTC, XMP, Takeout) belong to
#: the file that carries them (``file_id``); zero-shot tags belong to content (``media_id``), with the
#: calibrated confidence as ``score``. Exactly one of ``file_id`` and ``media_id`` is set.
tags = Table(
    "tags",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("file_id", Integer, ForeignKey("files.id"), index=True),
    Column("media_id", Integer, ForeignKey("media.id"), index=True),
    Column("tag", Text, nullable=False),
    Column("source", String(16), nullable=False),
    Column("score", Float),
    sqlite_autoincrement=True,
)
#: The schema version that added photo metadata (files.taken_at ...) and tags.
PHOTO_META_FROM = 7
#: The version of what indexing reads of a photo (mmsearch.photo_meta): a file read by an older one
#: (``files.meta_version``) is read again by the next run of its folder.
PHOTO_META_VERSION = 1
#: Meta key: how many times a row of tags was inserted, updated or deleted (kept by triggers).
TAGS_CHANGES_META = "tags.changes"
#: ``tags.source`` of zero-shot tags (the other sources name where a keyword was read).
ZERO_SHOT_SOURCE = "zero-shot"

#: The schema version that added video keyframes (frames, embeddings.frame_id).
VIDEO_FROM = 8
#: A video's keyframes (schema 8): a frame at its start, at each scene change and at least every N
#: seconds (see mmsearch.video); each is one image-tower vector of kind "frame".
frames = Table(
    "frames",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("media_id", Integer, ForeignKey("media.id"), nullable=False, index=True),
    Column("idx", Integer, nullable=False),
    Column("time", Float, nullable=False),  # seconds from the video's start
    Column("reason", String(8)),  # first | scene | interval
    sqlite_autoincrement=True,
)

VECTOR_KINDS = ("image", "caption", "segment", "frame")


#: The column of an embedding naming its item, by kind.
REF_COLUMNS = {"image": "media_id", "caption": "caption_id", "segment": "segment_id", "frame": "frame_id"}


def _migration_1(conn: Connection) -> None:
    # The tables of version 1 (in their current shape); later migrations add the others.
    metadata.create_all(conn, tables=[meta, media, files, captions, segments, embeddings])
    # create_all gave files its current columns: migration 7 adds them only to older catalogs.


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


def _get_meta(conn: Connection, key: str) -> str | None:
    row = conn.execute(select(meta.c.value).where(meta.c.key == key)).first()
    return str(row[0]) if row else None


def _set_meta(conn: Connection, key: str, value: str) -> None:
    from sqlalchemy.dialects.sqlite import insert

    stmt = insert(meta).values(key=key, value=value)
    conn.execute(stmt.on_conflict_do_update(index_elements=[meta.c.key], set_={"value": value}))


def register_model(conn: Connection, key: str, identity: dict[str, Any]) -> None:
    """Record a model's identity under its key (kept while the index holds its vectors)."""
    models = json.loads(_get_meta(conn, MODELS_META) or "{}")
    models[key] = identity
    _set_meta(conn, MODELS_META, json.dumps(models))


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


# --- full-text search (schema 6) -------------------------------------------------------------------
# FTS5 indexes of caption texts, transcript segment texts and file names, kept by triggers in the
# transaction of every write to their tables (see _migration_6). Their rowid is the id of the caption,
# segment or file. captions_fts and segments_fts are external-content tables (their text is read from
# the table); files_fts is contentless (it indexes a name computed from files.path, so nothing stored
# twice). A later migration that rebuilds captions, segments or files (as _migration_3 did) drops these
# triggers with the table and must create them again.

#: The schema version that added the full-text indexes: an older catalog (read-only) has none.
FTS_FROM = 6
#: Meta key: how many times a row of files was inserted, updated or deleted (kept by triggers).
FILES_CHANGES_META = "files.changes"
#: Letters and digits make words; case and diacritics are folded ('Café' matches 'cafe').
FTS_TOKENIZE = "unicode61 remove_diacritics 2"

# Declared for queries only (never created from this metadata: the migration creates them). The column
# named like the table is FTS5's hidden column for MATCH; rank is bm25 (lower is better).
fts_metadata = MetaData()


def _fts_table(name: str) -> Table:
    return Table(
        name,
        fts_metadata,
        Column("rowid", Integer, primary_key=True),
        Column(name, Text),
        Column("rank", Float),
    )


captions_fts = _fts_table("captions_fts")
segments_fts = _fts_table("segments_fts")
files_fts = _fts_table("files_fts")


#: The item columns of ix_embeddings_items (model, kind, then these), in order. An embedding names its
#: item in its kind's column (REF_COLUMNS) and leaves the others NULL.
ITEM_COLUMNS = ("media_id", "caption_id", "segment_id", "frame_id")
# ix_embeddings_items as migration 6 made it (migration 8 adds frame_id).
_ITEM_COLUMNS_V6 = ITEM_COLUMNS[:3]


def _file_name_sql(path: str) -> str:
    """SQL for the words of a file's name: its base name (after the last '/') without its extension
    (after the last '.', unless that '.' starts the name). Plain SQL, no registered function: any SQLite
    opening the catalog runs the triggers."""
    name = f"substr({path}, length(rtrim({path}, replace({path}, '/', ''))) + 1)"
    stem = f"substr({name}, 1, length(rtrim({name}, replace({name}, '.', ''))) - 1)"
    return f"(CASE WHEN instr({name}, '.') > 1 THEN {stem} ELSE {name} END)"


_FTS_TABLES = (
    f"CREATE VIRTUAL TABLE IF NOT EXISTS captions_fts USING fts5(text, content='captions', "
    f"content_rowid='id', tokenize='{FTS_TOKENIZE}')",
    f"CREATE VIRTUAL TABLE IF NOT EXISTS segments_fts USING fts5(text, content='segments', "
    f"content_rowid='id', tokenize='{FTS_TOKENIZE}')",
    f"CREATE VIRTUAL TABLE IF NOT EXISTS files_fts USING fts5(name, content='', tokenize='{FTS_TOKENIZE}')",
)


def _fts_triggers(table: str, fts: str, column: str, value: str) -> list[tuple[str, str]]:
    """(name, SQL) of the triggers keeping ``fts`` in step with ``table``: ``value`` is the SQL of the
    indexed text over a row alias (``{row}``); an update deletes the old entry and inserts the new."""
    old, new = value.format(row="old"), value.format(row="new")
    delete = f"INSERT INTO {fts} ({fts}, rowid, {column}) VALUES ('delete', old.id, {old});"
    insert = f"INSERT INTO {fts} (rowid, {column}) VALUES (new.id, {new});"
    watched = "id, path" if table == "files" else "id, text"
    return [
        (f"{fts}_insert", f"AFTER INSERT ON {table} BEGIN {insert} END"),
        (f"{fts}_delete", f"AFTER DELETE ON {table} BEGIN {delete} END"),
        (f"{fts}_update", f"AFTER UPDATE OF {watched} ON {table} BEGIN {delete} {insert} END"),
    ]


def _change_counter(table: str, key: str) -> list[tuple[str, str]]:
    """(name, SQL) of the triggers counting every insert, update and delete of ``table`` in meta ``key``."""
    bump = (
        f"INSERT INTO meta (key, value) VALUES ('{key}', '1') ON CONFLICT (key) "
        "DO UPDATE SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT);"
    )
    return [
        (f"{table}_changed_{op}", f"AFTER {op.upper()} ON {table} BEGIN {bump} END")
        for op in ("insert", "update", "delete")
    ]


def _migration_6(conn: Connection) -> None:
    """Full-text indexes of captions, transcript segments and file names, filled from the existing rows
    and kept in step by triggers (rerunnable: a catalog migrated again is indexed afresh), and an index
    of each embedding's model, kind and item; changes to files are counted."""
    for sql in _FTS_TABLES:
        conn.execute(text(sql))
    # Every change to files counts in meta (FILES_CHANGES_META): with the generations, what says that a
    # filter's selection computed earlier is still right.
    triggers = [
        *_fts_triggers("captions", "captions_fts", "text", "{row}.text"),
        *_fts_triggers("segments", "segments_fts", "text", "{row}.text"),
        *_fts_triggers("files", "files_fts", "name", _file_name_sql("{row}.path")),
        *_change_counter("files", FILES_CHANGES_META),
    ]
    for name, body in triggers:
        conn.execute(text(f"DROP TRIGGER IF EXISTS {name}"))
        conn.execute(text(f"CREATE TRIGGER {name} {body}"))
    # Which embeddings a filter lets through is read from this index alone (see mmsearch.catalog_filters):
    # an embedding row holds its vector, so reading the rows of a million would read gigabytes.
    conn.execute(
        text(
            f"CREATE INDEX IF NOT EXISTS ix_embeddings_items ON embeddings (model, kind, {', '.join(_ITEM_COLUMNS_V6)})"
        )
    )
    conn.execute(text("INSERT INTO captions_fts (captions_fts) VALUES ('rebuild')"))
    conn.execute(text("INSERT INTO segments_fts (segments_fts) VALUES ('rebuild')"))
    conn.execute(text("INSERT INTO files_fts (files_fts) VALUES ('delete-all')"))
    conn.execute(text(f"INSERT INTO files_fts (rowid, name) SELECT id, {_file_name_sql('path')} FROM files"))


_PHOTO_COLUMNS = (
    ("taken_at", "FLOAT"),
    ("taken_source", "VARCHAR(16)"),
    ("camera", "TEXT"),
    ("lat", "FLOAT"),
    ("lon", "FLOAT"),
    ("meta_version", "INTEGER"),
)


def _migration_7(conn: Connection) -> None:
    """What photos say of themselves: date taken, camera and place on files; keywords and zero-shot tags
    in ``tags``. The image files already indexed have no ``meta_version``: the next indexing run of
    their folder reads theirs (see mmsearch.ingest)."""
    have = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(files)")}
    for name, sql_type in _PHOTO_COLUMNS:
        if name not in have:
            conn.execute(text(f"ALTER TABLE files ADD COLUMN {name} {sql_type}"))
    tags.create(conn, checkfirst=True)
    # Tag filters compare case-folded (ASCII) tags: lower(tag) is what they look up.
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_tags_tag ON tags (lower(tag))"))
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_files_taken_at ON files (taken_at)"))
    # Tag filters' cached selections (mmsearch.catalog_filters.catalog_version) follow this count.
    for name, body in _change_counter("tags", TAGS_CHANGES_META):
        conn.execute(text(f"DROP TRIGGER IF EXISTS {name}"))
        conn.execute(text(f"CREATE TRIGGER {name} {body}"))


def _migration_8(conn: Connection) -> None:
    """Video: keyframes (``frames``), each embedding of kind ``frame`` naming its frame (``frame_id``), and
    the item index extended to it."""
    frames.create(conn, checkfirst=True)
    if "frame_id" not in {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(embeddings)")}:
        conn.execute(text("ALTER TABLE embeddings ADD COLUMN frame_id INTEGER REFERENCES frames (id)"))
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_embeddings_frame_id ON embeddings (frame_id)"))
    conn.execute(text("DROP INDEX IF EXISTS ix_embeddings_items"))
    conn.execute(
        text(f"CREATE INDEX ix_embeddings_items ON embeddings (model, kind, {', '.join(ITEM_COLUMNS)})")
    )


# Append only: each entry brings a database at version i to version i+1.
MIGRATIONS: list[Callable[[Connection], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
    _migration_8,
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
