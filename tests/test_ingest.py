"""Ingestion end to end on the tiny model: pairing, incremental re-indexing, dedup, deletions, consistency."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

import mmsearch
from mmsearch import db, ingest
from tests.conftest import TINY_MODEL, solid


def assert_consistent(idx: mmsearch.Index) -> None:
    """FAISS ids == live SQLite embedding rows, per kind (of the active model), and every embedding maps
    to a live file."""
    store = idx.store
    store.refresh()
    with store.catalog.read() as conn:
        for kind in db.VECTOR_KINDS:
            of_kind = (db.embeddings.c.kind == kind) & (db.embeddings.c.model == store.model)
            rows = {int(i) for (i,) in conn.execute(select(db.embeddings.c.id).where(of_kind))}
            assert set(store.vectors(kind).ids().tolist()) == rows, kind
        all_ids = [int(i) for (i,) in conn.execute(select(db.embeddings.c.id))]
        orphans = conn.execute(
            select(func.count())
            .select_from(db.media)
            .where(db.media.c.id.not_in(select(db.files.c.media_id).where(db.files.c.media_id.is_not(None))))
        ).scalar_one()
    assert orphans == 0
    resolved = db.resolve_items(store.catalog, all_ids)
    assert set(resolved) == set(all_ids)
    for item in resolved.values():
        assert os.path.exists(os.fsdecode(item.path_key))


def top_caption(idx: mmsearch.Index, text: str) -> mmsearch.Hit:
    hits = idx.search_text(text, target="captions", k=1)
    assert hits and hits[0].text == text
    return hits[0]


def test_captions_stay_paired_with_their_images(tiny_index: mmsearch.Index, tmp_path: Path) -> None:
    media = tmp_path / "media"
    pairs = {
        "a/photo.jpg": "alpha caption one",
        "b/photo.jpg": "bravo caption two",
        "my.holiday.v2.png": "charlie caption with dots",
        "my holiday.png": "delta caption with spaces",
        "über/café 東京.webp": "echo caption unicode",
    }
    for i, (rel, caption) in enumerate(pairs.items()):
        solid(media / rel, (40 * i, 200 - 30 * i, 90))
        Path(media / rel).with_suffix(".txt").write_text(caption)
    report = tiny_index.add_folder(media)
    assert report.images_embedded == 5 and report.captions_added == 5 and not report.skipped
    for rel, caption in pairs.items():
        hit = top_caption(tiny_index, caption)
        assert hit.path == str(media / rel)
        assert hit.score > 0.999  # the caption's own vector
    assert_consistent(tiny_index)


def test_identical_images_are_embedded_once(tiny_index: mmsearch.Index, tmp_path: Path) -> None:
    solid(tmp_path / "m" / "one.png", "red")
    shutil.copy(tmp_path / "m" / "one.png", tmp_path / "m" / "two.png")
    report = tiny_index.add_folder(tmp_path / "m")
    assert report.images_embedded == 1
    assert tiny_index.stats()["files"] == {"image_ok": 2}
    assert_consistent(tiny_index)


def test_unchanged_folder_does_no_model_work(tmp_path: Path) -> None:
    media = tmp_path / "m"
    for i in range(5):
        solid(media / f"{i}.png", (i * 40, 0, 0))
        (media / f"{i}.txt").write_text(f"caption {i}")
    with mmsearch.Index.create(tmp_path / "idx", model=TINY_MODEL, pretrained="random") as idx:
        idx.add_folder(media)
    with mmsearch.Index.open(tmp_path / "idx") as idx:
        report = idx.add_folder(media)
        assert idx._embedder is None  # the model was never loaded
        assert report.unchanged == 5 and report.images_embedded == 0 and report.captions_added == 0


def test_rename_move_edit_delete(tiny_index: mmsearch.Index, tmp_path: Path) -> None:
    media = tmp_path / "m"
    for name, color in (("a", "red"), ("b", "green"), ("c", "blue")):
        solid(media / f"{name}.png", color)
        (media / f"{name}.txt").write_text(f"first {name}\nsecond {name}")
    tiny_index.add_folder(media)
    before = tiny_index.stats()["vectors"]
    assert before == {"image": 3, "caption": 6}

    # Rename a (with its caption) and move b into a subfolder: no image is embedded again.
    os.rename(media / "a.png", media / "renamed a.png")
    os.rename(media / "a.txt", media / "renamed a.txt")
    (media / "sub").mkdir()
    os.rename(media / "b.png", media / "sub" / "b.png")
    os.rename(media / "b.txt", media / "sub" / "b.txt")
    r = tiny_index.add_folder(media)
    assert (r.images_embedded, r.linked, r.files_removed) == (0, 2, 2)
    # Their captions move with them and keep their vectors: the text tower is not run either.
    assert (r.captions_added, r.captions_embedded, r.captions_removed) == (4, 0, 4)
    assert top_caption(tiny_index, "first a").path == str(media / "renamed a.png")
    assert top_caption(tiny_index, "second b").path == str(media / "sub" / "b.png")
    assert_consistent(tiny_index)

    # Edit one caption line: exactly that caption is re-embedded.
    (media / "c.txt").write_text("first c\nsecond c, edited")
    time.sleep(0.01)
    r = tiny_index.add_folder(media)
    assert (r.captions_added, r.captions_embedded, r.captions_removed, r.images_embedded) == (1, 1, 1, 0)
    assert top_caption(tiny_index, "second c, edited").path == str(media / "c.png")

    # Change an image's pixels: it is embedded again, the old content is dropped.
    solid(media / "c.png", "yellow")
    os.utime(media / "c.png", ns=(1, 1))
    r = tiny_index.add_folder(media)
    assert r.images_embedded == 1

    # Delete: the file, its captions and its vectors leave SQLite and FAISS.
    (media / "c.png").unlink()
    r = tiny_index.add_folder(media)
    assert r.files_removed == 1
    assert tiny_index.stats()["vectors"] == {"image": 2, "caption": 4}
    assert all(h.path != str(media / "c.png") for h in tiny_index.search_text("first c", target="all", k=50))
    assert_consistent(tiny_index)


def test_two_roots_do_not_delete_each_other(tiny_index: mmsearch.Index, tmp_path: Path) -> None:
    solid(tmp_path / "one" / "x.png", "red")
    solid(tmp_path / "two" / "y.png", "blue")
    tiny_index.add_folder(tmp_path / "one")
    tiny_index.add_folder(tmp_path / "two")
    tiny_index.add_folder(tmp_path / "one")
    assert tiny_index.stats()["files"] == {"image_ok": 2}


def test_bad_files_are_recorded_and_the_run_goes_on(tiny_index: mmsearch.Index, tmp_path: Path) -> None:
    media = tmp_path / "m"
    solid(media / "good.png")
    (media / "empty.jpg").write_bytes(b"")
    (media / "text.jpg").write_text("I am text")
    raw = os.path.join(os.fsencode(media), b"odd-\xfe.png")
    solid(Path(os.fsdecode(raw)), "blue")
    os.symlink(media / "gone.png", media / "dangling.png")
    r = tiny_index.add_folder(media)
    reasons = dict(r.skipped)
    assert reasons[str(media / "empty.jpg")] == "empty file"
    assert "not a supported image" in reasons[str(media / "text.jpg")]
    assert reasons[str(media / "dangling.png")] == "broken symlink"
    assert r.images_embedded == 2  # good.png and the non-UTF-8 name
    skipped = {s["path"] for s in tiny_index.skipped()}
    assert {str(media / "empty.jpg"), str(media / "text.jpg")} <= skipped
    hits = tiny_index.search_image(Image.new("RGB", (64, 48), "blue"), target="images", k=1)
    assert os.fsencode(hits[0].path) == raw  # the non-UTF-8 name round-trips exactly


def test_search_targets_and_k(tiny_index: mmsearch.Index, tmp_path: Path) -> None:
    for i in range(4):
        solid(tmp_path / "m" / f"{i}.png", (60 * i, 10, 10))
        (tmp_path / "m" / f"{i}.txt").write_text(f"caption number {i}")
    tiny_index.add_folder(tmp_path / "m")
    assert {h.kind for h in tiny_index.search_text("x", target="images", k=10)} == {"image"}
    assert {h.kind for h in tiny_index.search_text("x", target="captions", k=10)} == {"caption"}
    both = tiny_index.search_text("x", target="all", k=8)
    assert len(both) == 8 and [h.rank for h in both] == list(range(1, 9))
    assert all(a.score >= b.score for a, b in zip(both, both[1:]))
    assert tiny_index.search_text("x", target="audio", k=3) == []
    vec = np.asarray(tiny_index.embedder.embed_texts(["caption number 2"])[0])
    assert tiny_index.search_vector(vec, target="texts", k=1)[0].text == "caption number 2"


def test_parallel_model_streams_keep_images_paired_with_their_vectors(tmp_path: Path) -> None:
    """Batches embedded side by side on several ONNX sessions are committed to the right images."""
    from mmsearch.accel import OnnxImageTower

    media = tmp_path / "m"
    rng = np.random.default_rng(0)
    media.mkdir()
    for i in range(23):  # 23 images in batches of 4: six batches, the last one short
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(media / f"{i:02d}.png")

    def index_with(streams: int) -> dict[str, bytes]:
        with mmsearch.Index.create(tmp_path / f"idx{streams}", model=TINY_MODEL, pretrained="random") as idx:
            emb = idx._indexing_embedder()
            emb.batch_size = 4 * streams  # each stream embeds batches of 4: the same batches in both runs
            emb._onnx_tower = OnnxImageTower(emb._onnx_tower.path, streams=streams, threads=1)
            assert emb.image_streams == streams
            idx.add_folder(media)
            assert_consistent(idx)
            with idx.store.catalog.read() as conn:
                rows = conn.execute(
                    select(db.files.c.path, db.embeddings.c.vector)
                    .join(db.embeddings, db.embeddings.c.media_id == db.files.c.media_id)
                    .where(db.embeddings.c.kind == "image")
                )
                return {path: vec for path, vec in rows}

    one, three = index_with(1), index_with(3)
    assert len(one) == 23 and one.keys() == three.keys()
    for path, vec in one.items():  # same batches, same sessions: the same bytes for the same file
        np.testing.assert_allclose(np.frombuffer(three[path], np.float32), np.frombuffer(vec, np.float32))
    # ... and not all the same vector (which would make the pairing check vacuous).
    assert len({bytes(v) for v in one.values()}) == 23


def test_a_known_caption_text_keeps_its_vector_and_its_own_image(tmp_path: Path) -> None:
    """Reused caption vectors equal what the text tower gives, and each caption row stays with its image."""
    media = tmp_path / "m"
    solid(media / "one.png", "red")
    (media / "one.txt").write_text("a shared caption\nonly on one")
    with mmsearch.Index.create(tmp_path / "idx", model=TINY_MODEL, pretrained="random") as idx:
        first = idx.add_folder(media)
        assert (first.captions_added, first.captions_embedded) == (2, 2)
        solid(media / "two.png", "blue")
        (media / "two.txt").write_text("a shared caption\nonly on two\nonly on two")
        r = idx.add_folder(media)
        # "a shared caption" is known; "only on two" twice in one file is embedded once.
        assert (r.images_embedded, r.captions_added, r.captions_embedded) == (1, 3, 1)
        hits = idx.search_text("a shared caption", target="captions", k=10)
        shared = {h.path for h in hits if h.text == "a shared caption"}
        assert shared == {str(media / "one.png"), str(media / "two.png")}
        assert top_caption(idx, "only on two").path == str(media / "two.png")
        want = idx.embedder.embed_texts(["a shared caption", "only on two"])
        with idx.store.catalog.read() as conn:
            rows = conn.execute(
                select(db.captions.c.text, db.embeddings.c.vector).join(
                    db.embeddings, db.embeddings.c.caption_id == db.captions.c.id
                )
            ).all()
        for text, blob in rows:
            if text in ("a shared caption", "only on two"):
                got = np.frombuffer(blob, np.float32)
                np.testing.assert_allclose(got, want[0 if text == "a shared caption" else 1], atol=1e-5)
        assert_consistent(idx)


def test_thumbnails_leave_with_their_content(tiny_index: mmsearch.Index, tmp_path: Path) -> None:
    """The server's cached thumbnails are dropped when no file holds their content any more."""
    from mmsearch import server

    media = tmp_path / "m"
    for name, color in (("keep", "red"), ("gone", "green"), ("edited", "blue")):
        solid(media / f"{name}.png", color)
    tiny_index.add_folder(media)
    rows = {Path(os.fsdecode(k)).name: r for k, r in tiny_index.store.catalog.files_by_key().items()}
    service = server._Service(tiny_index)
    thumbs: dict[str, Path] = {}
    for name, row in rows.items():
        made = service.thumbnail(row.id)
        assert isinstance(made, Path) and made.is_file()  # cached in the index folder
        thumbs[name] = made
    (media / "gone.png").unlink()
    solid(media / "edited.png", "yellow")
    os.utime(media / "edited.png", ns=(1, 1))
    tiny_index.add_folder(media)
    assert [name for name, p in thumbs.items() if p.exists()] == ["keep.png"]
    shutil.copy(media / "keep.png", media / "copy.png")  # still held by a file: its thumbnail stays
    (media / "keep.png").unlink()
    tiny_index.add_folder(media)
    assert thumbs["keep.png"].exists()


def test_images_are_committed_chunk_by_chunk_as_files_are_hashed(
    tiny_index: mmsearch.Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first images are embedded and committed before the rest of the folder is hashed (ingest.hash_chunks);
    a content met again in a later chunk is linked to the one already committed, never embedded twice."""
    monkeypatch.setattr(ingest, "HASH_CHUNK", 3)
    media = tmp_path / "m"
    colors = ["red", "green", "blue", "red", "yellow", "green", "purple", "blue"]  # 5 contents, 8 files
    for i, color in enumerate(colors):
        solid(media / f"{i}.png", color)
    ticks: list[tuple[str, int, int]] = []
    report = tiny_index.add_folder(media, progress=lambda *t: ticks.append(t))
    assert report.images_embedded == 5 and report.linked == 3 and not report.skipped
    assert tiny_index.stats()["files"] == {"image_ok": 8}
    first_commit = next(i for i, (stage, done, _) in enumerate(ticks) if stage == "images" and done > 0)
    hashed_all = ticks.index(("hash", 8, 8))
    assert first_commit < hashed_all
    assert [t for t in ticks if t[0] == "images"][-1] == ("images", 5, 5)  # the bar ends full
    assert_consistent(tiny_index)
    media_of = {os.fsdecode(k): r.media_id for k, r in tiny_index.store.catalog.files_by_key().items()}
    for a, b in ((0, 3), (1, 5), (2, 7)):  # each content once, whichever chunk its files were hashed in
        assert media_of[str(media / f"{a}.png")] == media_of[str(media / f"{b}.png")]
    assert len(set(media_of.values())) == 5
