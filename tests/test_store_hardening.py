"""Issue 11 hardening of the index folder: ids never reused (12), readers follow a writer without
rebuilding (11), creation under the lock (9), owner-only files (2).

Most tests drive the store directly with synthetic vectors (no model): the catalog API and
``Store.write`` are the path ingest uses.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

import mmsearch
from mmsearch import catalog_errors, db, vectors
from mmsearch import store as store_mod
from mmsearch.errors import MmsearchError
from mmsearch.search import search_vector
from mmsearch.store import Store
from mmsearch.vectors import VectorIndex
from tests.conftest import TINY_MODEL, solid

DIM = 8


def _config(name: str = "fake") -> dict[str, Any]:
    return {"model": {"name": name, "dim": DIM}}


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Store]:
    store = Store.create(tmp_path / "idx", _config())
    store.lock_for_writing()
    try:
        yield store
    finally:
        store.close()


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def add_images(store: Store, n: int, rng: np.random.Generator) -> list[int]:
    """Commit ``n`` image media with their vectors, then mirror them as ingest does; returns the ids."""
    vecs = _unit(rng, n)
    with store.write("image") as tx:
        mids = [db.add_image_media(tx.conn, rng.bytes(32).hex()) for _ in range(n)]
        ids = db.add_embeddings(tx.conn, "image", vecs, mids)
        tx.added("image", ids, vecs)
    return ids


def delete_images(store: Store, ids: list[int]) -> None:
    with store.write("image") as tx:
        removed = db.delete_embeddings(tx.conn, db.embeddings.c.id.in_(ids))
        tx.removed("image", removed.get("image", []))


def catalog_ids(store: Store, kind: str = "image") -> set[int]:
    with store.catalog.read() as conn:
        return {
            int(i) for (i,) in conn.execute(select(db.embeddings.c.id).where(db.embeddings.c.kind == kind))
        }


@pytest.fixture
def count_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every VectorIndex.build (a rebuild from SQLite) appends its size here."""
    calls: list[int] = []
    real = VectorIndex.build.__func__  # type: ignore[attr-defined]

    def build(cls: type[VectorIndex], dim: int, ids: np.ndarray, vecs: np.ndarray, **kw: Any) -> VectorIndex:
        calls.append(len(ids))
        return real(cls, dim, ids, vecs, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(VectorIndex, "build", classmethod(build))
    return calls


# --- item 12: ids are never reused -------------------------------------------------------------------


def _insert_one_of_each(conn: Any, rng: np.random.Generator) -> dict[str, int]:
    mid = db.inserted_id(conn.execute(db.media.insert().values(sha256=rng.bytes(32).hex(), kind="image")))
    key = f"/x/{rng.integers(1 << 60)}.png"
    fid = db.inserted_id(
        conn.execute(
            db.files.insert().values(
                path_key=key.encode(),
                path=key,
                kind="image",
                size=1,
                mtime_ns=1,
                sha256=None,
                media_id=mid,
                status="ok",
                updated_at=0.0,
            )
        )
    )
    cid = db.inserted_id(conn.execute(db.captions.insert().values(file_id=fid, source="s", text="t")))
    sid = db.inserted_id(
        conn.execute(db.segments.insert().values(media_id=mid, idx=0, start=0.0, end=1.0, text="t"))
    )
    (eid,) = db.add_embeddings(conn, "image", _unit(rng, 1), [mid])
    return {"media": mid, "files": fid, "captions": cid, "segments": sid, "embeddings": eid}


def _delete_rows(conn: Any, ids: dict[str, int]) -> None:
    for table in ("embeddings", "captions", "segments", "files", "media"):
        t = db.metadata.tables[table]
        conn.execute(t.delete().where(t.c.id == ids[table]))


def test_deleting_the_newest_rows_never_gives_their_ids_to_new_ones(writer: Store) -> None:
    rng = np.random.default_rng(1)
    with writer.catalog.begin() as conn:
        _insert_one_of_each(conn, rng)
        newest = _insert_one_of_each(conn, rng)
    with writer.catalog.begin() as conn:
        _delete_rows(conn, newest)
    with writer.catalog.begin() as conn:
        again = _insert_one_of_each(conn, rng)
    for table, old_id in newest.items():
        assert again[table] > old_id, table  # today's main: SQLite gives max(rowid)+1, the deleted id


def test_a_replaced_newest_file_gets_new_file_and_vector_ids(tmp_path: Path) -> None:
    """End to end: delete the newest image, index, add another, index: its ids are new ones."""
    media = tmp_path / "m"
    solid(media / "a.png", "red")
    solid(media / "b.png", "blue")
    with mmsearch.Index.create(tmp_path / "idx", model=TINY_MODEL, pretrained="random") as idx:
        idx.add_folder(media)
        before = {h.path: (h.file_id, h.item_id) for h in idx.search_text("x", k=5)}
        (media / "b.png").unlink()
        idx.add_folder(media)
        solid(media / "c.png", "green")
        idx.add_folder(media)
        after = {h.path: (h.file_id, h.item_id) for h in idx.search_text("x", k=5)}
    new_file, new_item = after[str(media / "c.png")]
    assert new_file > max(f for f, _ in before.values())
    assert new_item > max(i for _, i in before.values())


# The schema a version-2 catalog has (exactly what SQLAlchemy created up to that version).
_V2_SCHEMA = """
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE media (id INTEGER NOT NULL, sha256 VARCHAR(64) NOT NULL, kind VARCHAR(8) NOT NULL,
  width INTEGER, height INTEGER, duration FLOAT, language VARCHAR(16), transcript TEXT,
  PRIMARY KEY (id), UNIQUE (sha256));
CREATE TABLE files (id INTEGER NOT NULL, path_key BLOB NOT NULL, path TEXT NOT NULL, kind VARCHAR(8) NOT NULL,
  size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 VARCHAR(64), media_id INTEGER,
  status VARCHAR(8) NOT NULL, reason TEXT, updated_at FLOAT NOT NULL,
  PRIMARY KEY (id), UNIQUE (path_key), FOREIGN KEY(media_id) REFERENCES media (id));
CREATE INDEX ix_files_media_id ON files (media_id);
CREATE TABLE segments (id INTEGER NOT NULL, media_id INTEGER NOT NULL, idx INTEGER NOT NULL,
  start FLOAT NOT NULL, "end" FLOAT NOT NULL, text TEXT NOT NULL,
  PRIMARY KEY (id), FOREIGN KEY(media_id) REFERENCES media (id));
CREATE INDEX ix_segments_media_id ON segments (media_id);
CREATE TABLE captions (id INTEGER NOT NULL, file_id INTEGER NOT NULL, source TEXT NOT NULL, text TEXT NOT NULL,
  PRIMARY KEY (id), FOREIGN KEY(file_id) REFERENCES files (id));
CREATE INDEX ix_captions_file_id ON captions (file_id);
CREATE INDEX ix_captions_text ON captions (text);
CREATE TABLE embeddings (id INTEGER NOT NULL, kind VARCHAR(8) NOT NULL, media_id INTEGER, caption_id INTEGER,
  segment_id INTEGER, vector BLOB NOT NULL, PRIMARY KEY (id), FOREIGN KEY(media_id) REFERENCES media (id),
  FOREIGN KEY(caption_id) REFERENCES captions (id), FOREIGN KEY(segment_id) REFERENCES segments (id));
CREATE INDEX ix_embeddings_media_id ON embeddings (media_id);
CREATE INDEX ix_embeddings_kind ON embeddings (kind);
CREATE INDEX ix_embeddings_segment_id ON embeddings (segment_id);
CREATE INDEX ix_embeddings_caption_id ON embeddings (caption_id);
"""


def make_v2_index(folder: Path, rng: np.random.Generator) -> dict[str, list[int]]:
    """A version-2 index folder: 5 images each with a file, caption, segment and vector; the two newest
    were deleted (so a version-2 catalog would hand out their ids again). Returns the live ids."""
    folder.mkdir(parents=True)
    (folder / "mmsearch.json").write_text(
        json.dumps({"format": "mmsearch-index", "schema_version": 2, **_config()})
    )
    con = sqlite3.connect(folder / "catalog.sqlite")
    con.executescript(_V2_SCHEMA)
    live: dict[str, list[int]] = {"media": [], "files": [], "captions": [], "segments": [], "embeddings": []}
    for i in range(1, 6):
        con.execute("INSERT INTO media (id, sha256, kind) VALUES (?, ?, 'image')", (i, f"{i:064x}"))
        con.execute(
            "INSERT INTO files VALUES (?, ?, ?, 'image', 1, 1, ?, ?, 'ok', NULL, 0)",
            (i, f"/p/{i}.png".encode(), f"/p/{i}.png", f"{i:064x}", i),
        )
        con.execute("INSERT INTO captions VALUES (?, ?, 'p.txt', ?)", (i, i, f"caption {i}"))
        con.execute("INSERT INTO segments VALUES (?, ?, 0, 0, 1, 'x')", (i, i))
        vec = _unit(rng, 1)[0].tobytes()
        con.execute("INSERT INTO embeddings VALUES (?, 'image', ?, NULL, NULL, ?)", (i, i, vec))
    for i in (4, 5):
        for table in ("embeddings", "captions", "segments", "files", "media"):
            con.execute(f"DELETE FROM {table} WHERE id = ?", (i,))
    for i in (1, 2, 3):
        for table in live:
            live[table].append(i)
    con.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    con.execute("INSERT INTO meta VALUES ('generation.image', '2')")
    con.commit()
    con.close()
    return live


def test_a_version_2_catalog_is_migrated_keeps_its_data_and_never_reuses_ids(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    folder = tmp_path / "idx"
    live = make_v2_index(folder, rng)
    before = sqlite3.connect(folder / "catalog.sqlite")
    rows_before = {t: before.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in live}
    indexes_before = set(before.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall())
    before.close()

    store = Store.open(folder)
    try:
        store.lock_for_writing()
        assert set(store.vectors("image").ids().tolist()) == set(live["embeddings"])
        with store.catalog.begin() as conn:  # the newest ids used (4 and 5) were deleted before migrating
            new = _insert_one_of_each(conn, rng)
    finally:
        store.close()
    con = sqlite3.connect(folder / "catalog.sqlite")
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        for table, rows in rows_before.items():
            now = con.execute(f"SELECT * FROM {table} WHERE id <= 3 ORDER BY id").fetchall()
            assert [row[: len(rows[0])] for row in now] == rows  # (embeddings gained a model column)
            sql = con.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
            assert "AUTOINCREMENT" in sql
        assert indexes_before <= set(
            con.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
        )
        version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        assert version == str(db.SCHEMA_VERSION)
    finally:
        con.close()
    # Ids 4 and 5 are gone for good only where the catalog remembers them: at migration the largest id
    # present (3) seeds the sequence, and nothing ever goes below it again.
    for table, new_id in new.items():
        assert new_id > max(live[table]), table
    store = Store.open(folder)
    try:
        with store.catalog.begin() as conn:
            _delete_rows(conn, new)
        with store.catalog.begin() as conn:
            again = _insert_one_of_each(conn, rng)
    finally:
        store.close()
    for table, new_id in new.items():
        assert again[table] > new_id, table


def test_a_version_2_catalog_on_a_full_disk_is_searchable_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """READABLE_FROM stays 1: an unmigrated catalog (no deletion log) is searched read-only."""
    folder = tmp_path / "idx"
    make_v2_index(folder, np.random.default_rng(3))

    def full(self: db.Catalog, *args: object) -> None:
        raise MmsearchError("database or disk is full")

    monkeypatch.setattr(db.Catalog, "_migrate", full)
    monkeypatch.setattr(catalog_errors, "_free_bytes", lambda path: 0)
    store = Store.open(folder)
    try:
        assert store.catalog.read_only and db.READABLE_FROM <= 2
        hits = search_vector(store, _unit(np.random.default_rng(4), 1)[0], "images", 5)
        assert sorted(h.item_id for h in hits) == [1, 2, 3]
    finally:
        store.close()


def test_an_id_is_resolved_only_as_an_item_of_the_kinds_searched(writer: Store) -> None:
    rng = np.random.default_rng(5)
    with writer.catalog.begin() as conn:
        ids = _insert_one_of_each(conn, rng)
    image_id = ids["embeddings"]
    assert set(db.resolve_items(writer.catalog, [image_id])) == {image_id}
    assert db.resolve_items(writer.catalog, [image_id], ("caption", "segment")) == {}
    # A caption index holding a stale id that names an image must not show that image as a caption.
    caption_index = writer.vectors("caption")
    vec = writer.catalog.vectors_for([image_id])[image_id]
    caption_index.add(np.asarray([image_id]), vec.reshape(1, -1))
    assert search_vector(writer, vec, "captions", 5) == []
    assert [h.kind for h in search_vector(writer, vec, "images", 5)] == ["image"]


# --- item 11: readers follow a writer ----------------------------------------------------------------


def test_a_reader_follows_commits_without_rebuilding(writer: Store, count_builds: list[int]) -> None:
    rng = np.random.default_rng(6)
    add_images(writer, 50, rng)
    writer.save_vectors()
    reader = Store.open(writer.folder)
    try:
        assert set(reader.vectors("image").ids().tolist()) == catalog_ids(writer)
        builds = len(count_builds)
        for round_ in range(8):
            added = add_images(writer, 7, rng)
            gone = rng.choice(sorted(catalog_ids(writer)), 3, replace=False).tolist()
            delete_images(writer, [*gone, added[0]])
            reader.refresh()
            assert set(reader.vectors("image").ids().tolist()) == catalog_ids(writer), round_
        assert len(count_builds) == builds  # today's main rebuilds from SQLite after every commit
        q = _unit(rng, 1)
        assert [h.item_id for h in search_vector(reader, q[0], "images", 10)] == [
            h.item_id for h in search_vector(writer, q[0], "images", 10)
        ]
    finally:
        reader.close()


def test_a_reader_behind_the_pruned_log_reloads_the_saved_file(
    writer: Store, count_builds: list[int]
) -> None:
    rng = np.random.default_rng(7)
    ids = add_images(writer, 40, rng)
    writer.save_vectors()
    reader = Store.open(writer.folder)
    try:
        reader.vectors("image")
        delete_images(writer, ids[:10])
        add_images(writer, 5, rng)
        writer.checkpoint_vectors()  # saves and prunes the log rows the file reflects
        with writer.catalog.read() as conn:
            assert conn.execute(select(db.deletions.c.seq)).first() is None
        delete_images(writer, ids[10:12])  # logged after the save
        builds = len(count_builds)
        reader.refresh()
        assert set(reader.vectors("image").ids().tolist()) == catalog_ids(writer)
        assert len(count_builds) == builds
    finally:
        reader.close()


def test_a_run_killed_after_a_checkpoint_is_followed_not_rebuilt(
    tmp_path: Path, count_builds: list[int]
) -> None:
    """The saved file plus the change since its position is the catalog's state: a new reader (a `query`
    process) loads it and follows the change, training nothing."""
    rng = np.random.default_rng(8)
    writer = Store.create(tmp_path / "idx", _config())
    writer.lock_for_writing()
    ids = add_images(writer, 30, rng)
    writer.checkpoint_vectors()
    add_images(writer, 4, rng)
    delete_images(writer, ids[:3])
    expected = catalog_ids(writer)
    writer.close()  # no save_vectors: as if killed
    builds = len(count_builds)
    reader = Store.open(tmp_path / "idx")
    try:
        assert set(reader.vectors("image").ids().tolist()) == expected
        assert len(count_builds) == builds
    finally:
        reader.close()


def test_a_change_the_log_does_not_explain_makes_the_reader_rebuild(writer: Store) -> None:
    """ "Rebuilt from SQLite when in doubt": a lost log row leaves the vector count off; it is rebuilt."""
    rng = np.random.default_rng(9)
    ids = add_images(writer, 20, rng)
    writer.save_vectors()
    reader = Store.open(writer.folder)
    try:
        reader.vectors("image")
        delete_images(writer, ids[:2])
        with writer.catalog.begin() as conn:
            conn.execute(db.deletions.delete())
        reader.refresh()
        assert set(reader.vectors("image").ids().tolist()) == catalog_ids(writer)
    finally:
        reader.close()


def test_a_long_run_saves_its_vectors_and_prunes_the_log(
    writer: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(10)
    ids = add_images(writer, 10, rng)
    writer.save_vectors()
    monkeypatch.setattr(store_mod, "CHECKPOINT_SECONDS", 0.0)
    writer._next_checkpoint = 0.0  # as if a minute had passed
    delete_images(writer, ids[:4])  # apply() checkpoints
    record = writer.catalog.get_meta(f"faiss.{writer.model}.image")
    assert record["generation"] == writer.catalog.generation("image") and record["ntotal"] == 6
    with writer.catalog.read() as conn:
        assert conn.execute(select(db.deletions.c.seq)).first() is None


def test_an_outgrown_reader_index_adopts_the_retrained_file(
    writer: Store, monkeypatch: pytest.MonkeyPatch, count_builds: list[int]
) -> None:
    """A reader that started flat follows the writer past FLAT_MAX; it takes the writer's IVF file
    (trained once, by the writer) instead of searching a huge flat index or training its own."""
    monkeypatch.setattr(vectors, "FLAT_MAX", 60)
    monkeypatch.setattr(vectors, "FLAT_MIN_FOR_IVF", 30)
    rng = np.random.default_rng(11)
    add_images(writer, 40, rng)
    writer.save_vectors()
    reader = Store.open(writer.folder)
    try:
        assert reader.vectors("image").spec == "flat"
        add_images(writer, 400, rng)
        writer.save_vectors()  # retrains: ivf-sq8
        builds = len(count_builds)
        reader.refresh()
        index = reader.vectors("image")
        assert index.spec == "ivf-sq8" and set(index.ids().tolist()) == catalog_ids(writer)
        assert len(count_builds) == builds
    finally:
        reader.close()


# --- item 9: creation under the lock -----------------------------------------------------------------


def _create_in_step(folder: str, name: str, barrier: Any, results: Any) -> None:
    """A creator process that meets the other one at a barrier while listing the folder, i.e. after the
    "no index here" check and before writing anything."""
    real_iterdir = Path.iterdir
    met = []

    def iterdir(self: Path) -> Iterator[Path]:
        entries = list(real_iterdir(self))
        if self == Path(folder) and not met:  # the first listing: the emptiness check, done by both
            met.append(True)
            with contextlib.suppress(threading.BrokenBarrierError):  # the other gave up: go on alone
                barrier.wait()
        return iter(entries)

    Path.iterdir = iterdir  # type: ignore[method-assign]
    try:
        Store.create(Path(folder), _config(name)).close()
        results.put((name, "created"))
    except MmsearchError as e:
        results.put((name, f"refused: {e}"))
    except Exception as e:  # the old code's failure: reported, not lost with the process
        results.put((name, f"crashed: {type(e).__name__}: {e}"))


def test_two_simultaneous_creations_leave_the_winners_model(tmp_path: Path) -> None:
    """Two processes create the same index with different models, both past the checks at once: only one
    may create it, and mmsearch.json names its model."""
    folder = tmp_path / "idx"
    folder.mkdir()
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2, timeout=20), ctx.Queue()
    procs = [
        ctx.Process(target=_create_in_step, args=(str(folder), name, barrier, results))
        for name in ("model-a", "model-b")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcome = dict(results.get(timeout=5) for _ in procs)
    created = [name for name, r in outcome.items() if r == "created"]
    assert len(created) == 1, outcome  # today's main: both "create", the last marker written wins
    assert json.loads((folder / "mmsearch.json").read_text())["model"]["name"] == created[0]
    with pytest.raises(MmsearchError, match="already exists"):
        Store.create(folder, _config("model-c"))


# --- item 2: owner-only files ------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_an_index_folder_is_created_owner_only(tmp_path: Path, umask_022: None) -> None:
    folder = tmp_path / "idx"
    store = Store.create(folder, _config())
    try:
        store.lock_for_writing()
        add_images(store, 3, np.random.default_rng(12))
        store.save_vectors()
        thumbs = store.thumbnails_folder()
        assert _mode(folder / "catalog.sqlite") == 0o600  # today's main: 0644, as the umask leaves it
        for name in ("catalog.sqlite-wal", "catalog.sqlite-shm", "mmsearch.json", "write.lock"):
            assert _mode(folder / name) == 0o600, name
        for kind in db.VECTOR_KINDS:
            assert _mode(folder / "vectors" / store.model / f"{kind}.faiss") == 0o600, kind
        for path in (folder, folder / "vectors", folder / "vectors" / store.model, thumbs):
            assert _mode(path) == 0o700, path
        store.update_config(note="rewritten")
        assert _mode(folder / "mmsearch.json") == 0o600
    finally:
        store.close()


def test_an_older_index_is_made_owner_only_by_its_next_writer(tmp_path: Path, umask_022: None) -> None:
    folder = tmp_path / "idx"
    store = Store.create(folder, _config())
    store.lock_for_writing()
    add_images(store, 3, np.random.default_rng(13))
    store.save_vectors()
    store.close()
    loose = [
        folder / "catalog.sqlite",
        folder / "mmsearch.json",
        folder / "vectors" / store.model / "image.faiss",
    ]
    for path in loose:
        os.chmod(path, 0o644)
    for path in (folder, folder / "vectors"):
        os.chmod(path, 0o755)
    reader = Store.open(folder)
    reader.vectors("image")
    reader.close()
    assert _mode(folder / "catalog.sqlite") == 0o644  # a reader changes nothing
    writer = Store.open(folder)
    try:
        writer.lock_for_writing()
        assert all(_mode(p) == 0o600 for p in loose)
        assert _mode(folder) == _mode(folder / "vectors") == 0o700
    finally:
        writer.close()


# --- the write unit (issue 15) -----------------------------------------------------------------------


def test_a_write_unit_commits_then_follows_the_change_without_rebuilding(
    writer: Store, count_builds: list[int]
) -> None:
    rng = np.random.default_rng(7)
    ids = add_images(writer, 5, rng)
    delete_images(writer, ids[:2])
    added = add_images(writer, 3, rng)
    assert count_builds == [0]  # the empty index, built once before the first change: then only followed
    index = writer.vectors("image")
    assert set(index.ids().tolist()) == catalog_ids(writer) == set(ids[2:]) | set(added)


def test_a_failed_write_unit_changes_neither_the_catalog_nor_the_index(writer: Store) -> None:
    rng = np.random.default_rng(8)
    ids = add_images(writer, 3, rng)
    with pytest.raises(RuntimeError), writer.write("image") as tx:
        removed = db.delete_embeddings(tx.conn, db.embeddings.c.id.in_(ids))
        tx.removed("image", removed["image"])
        raise RuntimeError("stopped before the commit")
    assert catalog_ids(writer) == set(ids)
    assert set(writer.vectors("image").ids().tolist()) == set(ids)


def test_a_write_unit_refuses_a_kind_it_was_not_told_of(writer: Store) -> None:
    rng = np.random.default_rng(9)
    vecs = _unit(rng, 1)
    with pytest.raises(ValueError, match="caption"), writer.write("image") as tx:
        mid = db.add_image_media(tx.conn, rng.bytes(32).hex())
        tx.added("caption", db.add_embeddings(tx.conn, "image", vecs, [mid]), vecs)
    assert catalog_ids(writer) == set()  # rolled back
