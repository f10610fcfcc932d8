"""Search by words (mmsearch.catalog_words) over the full-text indexes of schema 6: the migration fills
them, the triggers keep them in step with every write, user text is never FTS5 syntax, hits map to the
embeddings of the model, kinds and filters asked for. Real SQLite catalogs written as ingest writes them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Connection, create_engine, select, text

import mmsearch
from mmsearch import catalog_errors, catalog_words, db
from mmsearch.catalog_filters import allowed_ids
from mmsearch.catalog_words import STOP_WORDS, WordHit, query_terms, word_hits
from mmsearch.errors import MmsearchError
from mmsearch.filters import Filters
from tests.conftest import solid
from tests.test_filters import (
    ALL,
    MODEL,
    OTHER_MODEL,
    add_image,
    add_recording,
    mark_skipped,
    new_catalog,
)


def ids(hits: list[WordHit]) -> list[int]:
    return [h.id for h in hits]


def found(catalog: db.Catalog, query: str, kinds: tuple[str, ...] = ALL, **given: object) -> list[int]:
    filters = Filters.parse(**given) if given else None  # type: ignore[arg-type]
    return ids(word_hits(catalog, query, kinds, MODEL, 50, filters))


@pytest.fixture
def catalog(tmp_path: Path) -> db.Catalog:
    cat = new_catalog(tmp_path / "catalog.sqlite")
    yield cat
    cat.close()


def fts_integrity(catalog: db.Catalog) -> None:
    """FTS5's own check of an external-content index against its table (raises when they differ)."""
    with catalog.begin() as conn:
        for fts in ("captions_fts", "segments_fts"):
            conn.execute(text(f"INSERT INTO {fts} ({fts}, rank) VALUES ('integrity-check', 1)"))
        conn.execute(text("INSERT INTO files_fts (files_fts) VALUES ('integrity-check')"))


# --- the migration -------------------------------------------------------------------------------------
def _old_file(conn: Connection, path: str, kind: str, sha: str, mid: int) -> None:
    """A files row as schema 5 wrote it (today's write_file also writes tables added later)."""
    conn.execute(
        db.files.insert().values(
            path_key=path.encode(),
            path=path,
            kind=kind,
            size=1,
            mtime_ns=1,
            sha256=sha,
            media_id=mid,
            status="ok",
            updated_at=0.0,
        )
    )


def make_schema_5(path: Path) -> dict[str, int]:
    """A catalog made by the first five migrations, with an image (file, caption) and a recording
    (file, two segments) and their vectors, written by the catalog's write functions."""
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        for migrate in db.MIGRATIONS[:5]:
            migrate(conn)
        conn.execute(db.meta.insert().values(key="schema_version", value="5"))
        db.register_model(conn, MODEL, {"name": MODEL})
        db.set_active(conn, MODEL)
        mid = db.add_image_media(conn, "a" * 64)
        _old_file(conn, "/old/zanzibar-beach.png", "image", "a" * 64, mid)
        fid = conn.execute(select(db.files.c.id)).scalar_one()
        (cid,) = db.add_captions(conn, [(fid, "txt", "a dhow sailing at sunset")])
        rec, sids = db.add_transcript(
            conn,
            "b" * 64,
            duration=9,
            language="en",
            text="",
            spans=[(0, 0, 4, "welcome"), (1, 4, 9, "kubernetes clusters")],
        )
        _old_file(conn, "/old/podcast.mp3", "audio", "b" * 64, rec)
        vec = np.ones((1, 4), np.float32)
        out = {
            "image": db.add_embeddings(conn, "image", vec, [mid], MODEL)[0],
            "caption": db.add_embeddings(conn, "caption", vec, [cid], MODEL)[0],
            "first": db.add_embeddings(conn, "segment", vec, [sids[0]], MODEL)[0],
            "segment": db.add_embeddings(conn, "segment", vec, [sids[1]], MODEL)[0],
        }
    engine.dispose()
    return out


def test_migration_6_indexes_the_rows_of_a_schema_5_catalog(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    made = make_schema_5(path)
    con = sqlite3.connect(path)
    assert con.execute("SELECT count(*) FROM sqlite_master WHERE name LIKE '%fts%'").fetchone() == (0,)
    con.close()
    catalog = db.Catalog(path)
    try:
        assert catalog.schema_version == db.SCHEMA_VERSION
        assert set(found(catalog, "dhow")) == {made["caption"], made["image"]}  # a caption
        assert found(catalog, "kubernetes") == [made["segment"]]
        assert found(catalog, "zanzibar") == [made["image"]]  # its file's name
        assert found(catalog, "podcast") == [made["first"]]  # a recording's name: its first segment
        fts_integrity(catalog)
        # New rows are indexed by the triggers the migration made.
        add_image(catalog, ["/new/x.png"], ["a quokka"])
        assert len(found(catalog, "quokka")) == 2
    finally:
        catalog.close()


def test_a_catalog_migrated_again_is_indexed_once(tmp_path: Path) -> None:
    catalog = new_catalog(tmp_path / "catalog.sqlite")
    item = add_image(catalog, ["/a/okapi.png"], ["an okapi"])
    catalog.close()
    con = sqlite3.connect(tmp_path / "catalog.sqlite")
    con.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    catalog = db.Catalog(tmp_path / "catalog.sqlite")
    try:
        hits = word_hits(catalog, "okapi", ALL, MODEL, 10)
        assert sorted(ids(hits)) == sorted([item.image, item.caption_vectors["an okapi"]])
        fts_integrity(catalog)
    finally:
        catalog.close()


def test_an_old_catalog_opened_read_only_is_searched_by_vector_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schema-5 catalog on a full disk cannot be migrated: no word hits, filters still work."""
    path = tmp_path / "catalog.sqlite"
    made = make_schema_5(path)

    def full(self: db.Catalog, *args: object) -> None:
        raise MmsearchError("database or disk is full")

    monkeypatch.setattr(db.Catalog, "_migrate", full)
    monkeypatch.setattr(catalog_errors, "_free_bytes", lambda path: 0)
    catalog = db.Catalog(path)
    try:
        assert catalog.read_only and catalog.schema_version == 5
        assert word_hits(catalog, "kubernetes", ALL, MODEL, 10) == []
        got = allowed_ids(catalog, Filters.parse(ext="mp3"), ALL, MODEL)
        assert got.tolist() == sorted([made["first"], made["segment"]])
        rows = db.resolve_items(catalog, [made["image"]], filters=Filters.parse(path="/old/*"))
        assert rows[made["image"]].path_key == b"/old/zanzibar-beach.png"
    finally:
        catalog.close()


# --- kept in step by every write ----------------------------------------------------------------------
def test_writes_keep_the_full_text_indexes_in_step(catalog: db.Catalog) -> None:
    pic = add_image(catalog, ["/a/aardvark.png", "/b/copy.png"], ["a wombat in the grass", "second caption"])
    talk = add_recording(catalog, ["/t/talk.mp3"], ["intro", "about narwhals"])
    wombat = {pic.image, pic.caption_vectors["a wombat in the grass"]}
    assert set(found(catalog, "wombat")) == wombat
    assert found(catalog, "narwhals") == [talk.segment_vectors[1]]
    with catalog.begin() as conn:  # a caption removed (as when its .txt file changed)
        db.remove_captions(conn, [pic.captions["second caption"]])
    assert found(catalog, "second") == []
    with catalog.begin() as conn:  # a transcript replaced (retranscribe)
        _, new = db.replace_transcript(
            conn,
            talk.media,
            duration=9,
            language="en",
            text="",
            spans=[(0, 0, 9, "about dolphins")],
            speech="s2",
        )
        (dolphin,) = db.add_embeddings(conn, "segment", np.ones((1, 4), np.float32), new, MODEL)
    assert found(catalog, "narwhals") == [] and found(catalog, "dolphins") == [dolphin]
    with catalog.begin() as conn:  # the same path written again (a changed file): indexed once
        db.write_file(
            conn, Path("/a/aardvark.png"), kind="image", size=2, mtime_ns=5, sha256=None, media_id=pic.media
        )
    assert found(catalog, "aardvark", ("image",)) == [pic.image]
    fts_integrity(catalog)
    with catalog.begin() as conn:  # the file holding the caption removed: its caption goes with it
        db.remove_files(conn, [pic.files["/a/aardvark.png"]])
    assert found(catalog, "wombat") == [] and found(catalog, "aardvark") == []
    assert found(catalog, "copy", ("image",)) == [pic.image]  # the other file still holds the image
    with catalog.begin() as conn:  # every file of the recording removed, then its content
        db.remove_files(conn, list(talk.files.values()))
        db.remove_orphan_media(conn)
    assert found(catalog, "dolphins") == [] and found(catalog, "talk") == []
    fts_integrity(catalog)
    with catalog.read() as conn:
        left = conn.execute(
            text("SELECT rowid FROM files_fts WHERE files_fts MATCH 'aardvark OR talk'")
        ).all()
    assert left == []  # the contentless name index forgot the removed files' names too


def test_ingest_indexes_captions_and_names_for_words(tiny_index: mmsearch.Index, tmp_path: Path) -> None:
    """Through the real indexing run: caption files and file names are searchable by words."""
    media = tmp_path / "media"
    solid(media / "Zebra crossing.png", "white")
    (media / "Zebra crossing.txt").write_text("pedestrians near the quayside")
    solid(media / "other.png", "black")
    (media / "other.txt").write_text("a plain picture")
    tiny_index.add_folder(media)
    store = tiny_index.store
    hits = word_hits(store.catalog, "quayside", ("image", "caption"), store.model, 10)
    rows = db.resolve_items(store.catalog, ids(hits))
    assert {rows[h.id].kind for h in hits} == {"image", "caption"}
    assert {rows[h.id].path_key for h in hits} == {str(media / "Zebra crossing.png").encode()}
    (by_name,) = word_hits(store.catalog, "zebra", ("image",), store.model, 10)
    assert db.resolve_items(store.catalog, [by_name.id])[by_name.id].path_key.endswith(b"Zebra crossing.png")
    (media / "Zebra crossing.png").unlink()
    (media / "Zebra crossing.txt").unlink()
    tiny_index.add_folder(media)
    assert word_hits(store.catalog, "quayside zebra", ALL, store.model, 10) == []


# --- what a query finds ----------------------------------------------------------------------------------
def test_a_rare_word_finds_its_item_first(catalog: db.Catalog) -> None:
    for i in range(30):
        add_image(catalog, [f"/p/img{i}.png"], [f"a photo of a cluster of boats number {i}"])
    talk = add_recording(
        catalog, ["/t/ops.mp3"], ["we deploy clusters", "kubernetes runs our clusters", "bye"]
    )
    hits = word_hits(catalog, "Kubernetes clusters", ALL, MODEL, 5)
    assert hits[0].id == talk.segment_vectors[1] and hits[0].all_terms
    assert all(h.score > 0 for h in hits) and [h.score for h in hits] == sorted(
        (h.score for h in hits), reverse=True
    )
    assert hits[1].id == talk.segment_vectors[0] and not hits[1].all_terms  # 'clusters' only
    assert len(word_hits(catalog, "boats", ALL, MODEL, 7)) == 7  # limit


def test_stop_words_alone_find_nothing(catalog: db.Catalog) -> None:
    add_image(catalog, ["/p/the.png"], ["the cat is on the mat"])
    assert query_terms("The, OF and... is it?") == []
    assert found(catalog, "the of and is it") == []
    assert found(catalog, "the cat") != []
    assert {"the", "and", "of"} <= STOP_WORDS


@pytest.mark.parametrize(
    ("query", "finds"),
    [
        ('"', False),
        ('""', False),
        ('"unbalanced', False),
        ("NEAR(ocelot boat, 2)", True),
        ("ocelot*", True),
        ("^ocelot", True),
        ("(ocelot OR", True),
        ("ocelot AND", True),
        ("NOT ocelot", True),  # 'not' is a stop word here, not an operator
        ("- ocelot", True),
        ("text:ocelot", True),
        ("captions_fts:ocelot", True),
        ("{text name}: ocelot", True),
        ("ocelot + boat", True),
        ("'; DROP TABLE captions; --", False),
        ("\x00ocelot\x00", True),
        ("ocelot" * 500, False),
        (" ".join(["ocelot"] * 5000), True),
        ("é\u0301\u0301", False),
        ("😀🚀", False),
        ("\u200d", False),
        ("rank MATCH bm25", False),
    ],
)
def test_hostile_query_text_never_raises(catalog: db.Catalog, query: str, finds: bool) -> None:
    pic = add_image(catalog, ["/z/ocelot.png"], ["an ocelot on a boat"])
    hits = word_hits(catalog, query, ALL, MODEL, 10)
    assert (pic.image in ids(hits)) is finds  # the words in it are searched as words, nothing else
    assert set(found(catalog, "ocelot")) == {pic.image, pic.caption_vectors["an ocelot on a boat"]}


def test_the_fts5_query_is_quoted_strings_only(catalog: db.Catalog) -> None:
    """query_terms already leaves no operator (it splits on punctuation and lower-cases); the query built
    from terms quotes each one as well, so even a term that were an operator or held a quote is data."""
    add_image(catalog, ["/z/near.png"], ['say "NEAR" and AND'])
    with catalog.read() as conn:
        for terms in (["NEAR"], ["AND", "OR"], ['a"b', "NOT"], ["text:x", "*", "^a", "(b"], ['"']):
            query = catalog_words._match(terms)
            conn.execute(
                text("SELECT rowid FROM captions_fts WHERE captions_fts MATCH :q"), {"q": query}
            ).all()
        q = {"q": catalog_words._match(["NEAR"])}
        assert conn.execute(text("SELECT rowid FROM captions_fts WHERE captions_fts MATCH :q"), q).all() != []


def test_updates_by_any_tool_keep_the_indexes_in_step(catalog: db.Catalog) -> None:
    """mmsearch never updates a caption's text, a segment's text or a file's path in place; another tool
    may, and the update triggers keep the indexes right."""
    pic = add_image(catalog, ["/a/earlier.png"], ["old words"])
    rec = add_recording(catalog, ["/a/rec.mp3"], ["spoken earlier"])
    renamed = (
        db.files.update().where(db.files.c.id == pic.files["/a/earlier.png"]).values(path="/a/renamed.png")
    )
    with catalog.begin() as conn:
        conn.execute(db.captions.update().values(text="new phrasing"))
        conn.execute(db.segments.update().values(text="spoken later"))
        conn.execute(renamed)
    assert found(catalog, "old") == [] and found(catalog, "earlier") == []
    assert set(found(catalog, "phrasing")) == {pic.image, pic.caption_vectors["old words"]}
    assert found(catalog, "later", ("segment",)) == [rec.segment_vectors[0]]
    assert found(catalog, "renamed", ("image",)) == [pic.image]
    fts_integrity(catalog)


def test_all_terms_says_a_text_holds_every_word(catalog: db.Catalog) -> None:
    both = add_image(catalog, ["/p/1.png"], ["Crème brûlée recipe"])
    one = add_image(catalog, ["/p/2.png"], ["a recipe for bread"])
    hits = {h.id: h for h in word_hits(catalog, "creme brulee recipe", ("caption",), MODEL, 10)}
    assert hits[both.caption_vectors["Crème brûlée recipe"]].all_terms
    assert not hits[one.caption_vectors["a recipe for bread"]].all_terms
    assert (
        hits[both.caption_vectors["Crème brûlée recipe"]].score
        > hits[one.caption_vectors["a recipe for bread"]].score
    )


def test_names_reach_images_and_first_segments(catalog: db.Catalog) -> None:
    pic = add_image(catalog, ["/photos/Serengeti_migration.2019.JPG"])
    rec = add_recording(catalog, ["/audio/serengeti-notes.wav"], ["first part", "second part"])
    assert set(found(catalog, "serengeti")) == {pic.image, rec.segment_vectors[0]}
    assert found(catalog, "serengeti", ("caption",)) == []
    assert found(catalog, "migration 2019", ("image",)) == [pic.image]
    assert found(catalog, "photos") == []  # a folder's name is not the file's name
    assert found(catalog, "jpg") == [] and found(catalog, "wav") == []  # nor is the extension


def test_hits_are_of_the_model_kinds_live_files_and_filters_asked(catalog: db.Catalog) -> None:
    shared = add_image(catalog, ["/a/one.png", "/b/two.jpg"], ["a capybara"])
    theirs = add_image(catalog, ["/a/three.png"], ["another capybara"], model=OTHER_MODEL)
    dead = add_image(catalog, ["/c/four.png"], ["capybara again"])
    rec = add_recording(catalog, ["/r/long.mp3"], ["capybara facts"], duration=600)
    mark_skipped(catalog, "/c/four.png")
    caption = shared.caption_vectors["a capybara"]
    assert set(found(catalog, "capybara")) == {shared.image, caption, rec.segment_vectors[0]}
    assert theirs.image not in found(catalog, "capybara") and dead.image not in found(catalog, "capybara")
    assert set(found(catalog, "capybara", ("caption", "segment"))) == {caption, rec.segment_vectors[0]}
    # The caption belongs to /a/one.png: a filter that file fails drops the caption and the image it reaches.
    assert found(catalog, "capybara", path="/b/*") == []
    assert set(found(catalog, "capybara", path="/a/*")) == {shared.image, caption}
    assert found(catalog, "capybara", min_duration=300) == [rec.segment_vectors[0]]
    assert found(catalog, "capybara", max_duration=300) == []
    # A name reaches the image through that file only: /b/two.jpg passes where /a/one.png does not.
    assert found(catalog, "two", ext="jpg") == [shared.image]
    assert found(catalog, "one", ext="jpg") == []
    other = word_hits(catalog, "capybara", ALL, OTHER_MODEL, 10)
    assert set(ids(other)) == {theirs.image, theirs.caption_vectors["another capybara"]}


def test_one_embedding_reached_several_ways_keeps_its_best_score(catalog: db.Catalog) -> None:
    pic = add_image(catalog, ["/p/gecko.png"], ["a gecko", "a small green gecko on a long white wall today"])
    hits = word_hits(catalog, "gecko", ("image",), MODEL, 10)
    assert ids(hits) == [pic.image]
    by_caption = word_hits(catalog, "gecko", ("caption",), MODEL, 10)
    assert hits[0].score >= max(h.score for h in by_caption)


def test_common_words_rank_a_bounded_number_of_rows(
    catalog: db.Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each index ranks at most MAX_RANKED rows: the rare words of a query, or windows of the newest rows
    when every word is common; either way the query is answered."""
    monkeypatch.setattr(catalog_words, "MAX_RANKED", 4)
    items = [add_image(catalog, [f"/p/{i}.png"], [f"common word {i}"]) for i in range(12)]
    rare = add_image(catalog, ["/p/rare.png"], ["common word platypus"])
    hits = word_hits(catalog, "common platypus", ("caption",), MODEL, 3)
    assert hits[0].id == rare.caption_vectors["common word platypus"] and hits[0].all_terms
    assert len(hits) == 3 and not hits[1].all_terms  # then rows holding the common word only
    # Only common words: the newest rows first, a window at a time, until enough hits pass the filters.
    newest = word_hits(catalog, "common", ("caption",), MODEL, 3)
    assert len(newest) == 3
    assert {h.id for h in newest} <= {rare.caption_vectors["common word platypus"]} | {
        v for it in items[-4:] for v in it.caption_vectors.values()
    }
    old = word_hits(catalog, "common", ("caption",), MODEL, 3, Filters.parse(path=["/p/1.png", "/p/2.png"]))
    assert sorted(ids(old)) == sorted(v for it in items[1:3] for v in it.caption_vectors.values())


def test_a_filter_ranks_its_own_rows_however_many_newer_rows_hold_the_words(
    catalog: db.Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows of the newest rows are read inside the rows a filter allows: a folder's old rows are reached
    when far more newer rows than MAX_WINDOWS windows hold the same common word."""
    monkeypatch.setattr(catalog_words, "MAX_RANKED", 4)
    old = [add_image(catalog, [f"/old/{i}.png"], [f"common word {i}"]) for i in range(3)]
    new = [add_image(catalog, [f"/new/{i}.png"], [f"common word extra {i}"]) for i in range(40)]
    want = sorted(v for it in old for v in it.caption_vectors.values())
    assert sorted(found(catalog, "common", ("caption",), path="/old/*")) == want
    rare = add_image(catalog, ["/old/rare.png"], ["common platypus"])
    hits = word_hits(catalog, "platypus common", ("caption",), MODEL, 3, Filters.parse(path="/old/*"))
    assert hits[0].id == rare.caption_vectors["common platypus"] and hits[0].all_terms
    assert {h.id for h in hits[1:]} <= set(want) and len(hits) == 3
    # Rows too scattered to read by ranges are ranked as unfiltered, the filter dropping rows after.
    monkeypatch.setattr(catalog_words, "MAX_SPANS", 0)
    catalog_words._ALLOWED.clear()
    scattered = found(catalog, "extra", ("caption",), path=["/new/1.png", "/new/39.png"])
    assert set(new[39].caption_vectors.values()) <= set(scattered)
    assert set(scattered) <= {v for it in (new[1], new[39]) for v in it.caption_vectors.values()}


def test_when_every_word_is_common_texts_holding_more_of_them_rank_first(
    catalog: db.Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog_words, "MAX_RANKED", 32)
    for i in range(80):  # each word in more than MAX_RANKED captions: windows of the newest rows
        add_image(catalog, [f"/p/{i}.png"], ["alpine hut" if i % 2 else "quiet meadow in spring"])
    both = add_image(catalog, ["/p/both.png"], ["alpine lake with alpine meadow"])
    (best,) = word_hits(catalog, "alpine meadow", ("caption",), MODEL, 1)
    assert best.id == both.caption_vectors["alpine lake with alpine meadow"] and best.all_terms
    hits = word_hits(catalog, "alpine meadow", ("caption",), MODEL, 10)
    assert hits[0] == best and len(hits) == 10
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert not any(h.all_terms for h in hits[1:])
