"""The index folder: self-description, FAISS files checked and rebuilt, one writer, model identity."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest

import mmsearch
from mmsearch import catalog_errors, db
from mmsearch.errors import IndexLockedError, MmsearchError, ModelMismatchError
from mmsearch.identity import model_key
from tests.conftest import TINY_MODEL, solid
from tests.test_ingest import assert_consistent


@pytest.fixture
def built(tmp_path: Path) -> Path:
    for i in range(6):
        solid(tmp_path / "m" / f"{i}.png", (40 * i, 30, 200 - 30 * i))
        (tmp_path / "m" / f"{i}.txt").write_text(f"caption {i}")
    with mmsearch.Index.create(tmp_path / "idx", model=TINY_MODEL, pretrained="random") as idx:
        idx.add_folder(tmp_path / "m")
    return tmp_path / "idx"


def _image_faiss(index: Path) -> Path:
    return (
        index
        / "vectors"
        / model_key(json.loads((index / "mmsearch.json").read_text())["model"])
        / "image.faiss"
    )


def test_index_folder_describes_itself(built: Path) -> None:
    config = json.loads((built / "mmsearch.json").read_text())
    assert config["format"] == "mmsearch-index" and config["schema_version"] == db.SCHEMA_VERSION
    assert config["model"]["arch"] == "tiny-clip" and config["model"]["dim"] == 32
    (model_folder,) = (built / "vectors").iterdir()  # vectors/MODEL/KIND.faiss
    assert model_folder.name == model_key(config["model"])
    assert sorted(p.name for p in model_folder.iterdir()) == [
        "caption.faiss",
        "frame.faiss",
        "image.faiss",
        "segment.faiss",
    ]
    assert (built / "catalog.sqlite").is_file()


@pytest.mark.parametrize("damage", ["delete", "flip", "truncate", "garbage"])
def test_damaged_faiss_file_is_rebuilt_from_sqlite(built: Path, damage: str) -> None:
    path = _image_faiss(built)
    with mmsearch.Index.open(built) as idx:
        expected = [(h.path, h.score) for h in idx.search_text("caption 3", k=6)]
    data = path.read_bytes()
    if damage == "delete":
        path.unlink()
    elif damage == "flip":
        path.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(os.urandom(len(data)))
    with mmsearch.Index.open(built) as idx:
        assert [(h.path, h.score) for h in idx.search_text("caption 3", k=6)] == expected
        assert_consistent(idx)


def test_stale_faiss_file_is_not_trusted(built: Path, tmp_path: Path) -> None:
    old = _image_faiss(built).read_bytes()
    solid(tmp_path / "m" / "new.png", "black")
    with mmsearch.Index.open(built) as idx:
        idx.add_folder(tmp_path / "m")
    _image_faiss(built).write_bytes(old)  # an older, internally valid file
    with mmsearch.Index.open(built) as idx:
        assert idx.store.vectors("image").ntotal == 7
        assert_consistent(idx)


def _hold_lock(
    path: str, ready: multiprocessing.synchronize.Event, done: multiprocessing.synchronize.Event
) -> None:
    idx = mmsearch.Index.open(path)
    idx.store.lock_for_writing()
    ready.set()
    done.wait(30)
    idx.close()


def test_second_writer_fails_at_once_naming_the_first(built: Path, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(built), ready, done))
    holder.start()
    try:
        assert ready.wait(30)
        with mmsearch.Index.open(built) as idx:
            with pytest.raises(IndexLockedError, match=f"pid {holder.pid}"):
                idx.add_folder(tmp_path / "m")
            assert len(idx.search_text("caption 1", k=3)) == 3  # readers are not blocked
    finally:
        done.set()
        holder.join(30)
    with mmsearch.Index.open(built) as idx:  # the lock died with its holder
        idx.add_folder(tmp_path / "m")


def test_opening_with_another_model_names_both(built: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelMismatchError) as err:
        mmsearch.Index.open(built, model="ViT-B-32")
    message = str(err.value)
    assert "tiny-clip" in message and "ViT-B-32/laion2b_s34b_b79k" in message
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"not the same weights")
    with pytest.raises(ModelMismatchError, match="other.safetensors"):
        mmsearch.Index.open(built, model=TINY_MODEL, checkpoint=str(other))
    mmsearch.Index.open(built, model=TINY_MODEL, pretrained="random").close()


def test_creating_over_an_existing_index_is_refused(built: Path) -> None:
    with pytest.raises(mmsearch.MmsearchError, match="already exists"):
        mmsearch.Index.create(built, model=TINY_MODEL, pretrained="random")


def test_a_version_1_catalog_is_migrated_on_open(built: Path) -> None:
    """Schema 1 had no index on caption texts; opening such an index adds it and records version 2."""
    con = sqlite3.connect(built / "catalog.sqlite")
    con.execute("DROP INDEX ix_captions_text")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    config = json.loads((built / "mmsearch.json").read_text())
    (built / "mmsearch.json").write_text(json.dumps({**config, "schema_version": 1}))
    with mmsearch.Index.open(built) as idx:
        assert idx.search_text("caption 3", target="captions", k=1)[0].text == "caption 3"
        # A reader writes nothing; the writer records the new version.
        assert json.loads((built / "mmsearch.json").read_text())["schema_version"] == 1
        idx.add_folder(built.parent / "m")
    con = sqlite3.connect(built / "catalog.sqlite")
    indexes = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    con.close()
    assert "ix_captions_text" in indexes and version == str(db.SCHEMA_VERSION)
    assert json.loads((built / "mmsearch.json").read_text())["schema_version"] == db.SCHEMA_VERSION


def test_a_version_1_catalog_on_a_full_disk_is_still_searchable(
    built: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 2 cannot run on a full disk; the catalog opens read-only at version 1 and answers."""
    con = sqlite3.connect(built / "catalog.sqlite")
    con.execute("DROP INDEX ix_captions_text")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.commit()
    con.close()

    def full(self: db.Catalog, *args: object) -> None:
        raise MmsearchError("database or disk is full")

    monkeypatch.setattr(db.Catalog, "_migrate", full)
    monkeypatch.setattr(catalog_errors, "_free_bytes", lambda path: 0)
    with mmsearch.Index.open(built) as idx:
        assert idx.store.catalog.read_only
        assert idx.search_text("caption 3", target="captions", k=1)[0].text == "caption 3"
    con = sqlite3.connect(built / "catalog.sqlite")
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
    con.close()


@pytest.mark.parametrize("rebuild_on_refresh", [False, True])
def test_a_preloaded_index_follows_a_commit_made_after_it_loaded(
    built: Path, tmp_path: Path, rebuild_on_refresh: bool
) -> None:
    """Store.preload reads an index on a thread and vectors() takes it. A writer that committed after the load
    and before the taking is followed, as refresh() follows an index loaded earlier (or drops it to be
    rebuilt, with rebuild_on_refresh)."""
    with mmsearch.Index.open(built) as reader:
        store = reader.store
        store.rebuild_on_refresh = rebuild_on_refresh
        store.preload(["image", "caption"])
        for pending in list(store._loading.values()):
            pending.result()  # loaded: the commit below comes after it
        solid(tmp_path / "m" / "new.png", "black")
        with mmsearch.Index.open(built) as writer:
            writer.add_folder(tmp_path / "m")
        assert store.vectors("image").ntotal == 7 and store.vectors("caption").ntotal == 6
        assert not store._loading
        hits = [(h.path, round(h.score, 5)) for h in reader.search_text("caption 3", k=7)]
    with mmsearch.Index.open(built) as fresh:
        assert hits == [(h.path, round(h.score, 5)) for h in fresh.search_text("caption 3", k=7)]
        assert_consistent(fresh)


def test_closing_a_store_with_a_load_under_way(built: Path) -> None:
    with mmsearch.Index.open(built) as idx:
        idx.store.preload(db.VECTOR_KINDS)
    assert not idx.store._loading  # waited for or cancelled, before the catalog closed


def test_a_writer_does_not_preload(built: Path) -> None:
    with mmsearch.Index.open(built) as idx:
        idx.store.lock_for_writing()
        idx.store.preload(["image"])
        assert not idx.store._loading
        idx.store.unlock()
