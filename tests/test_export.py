"""mmsearch.export on a demo index (real OpenCLIP demo model, SQLite, FAISS): the files are where
clip-retrieval puts them, read back they hold the catalog's vectors, and every metadata row describes the
vector of its own row - checked against the catalog by id and, without trusting any id, by embedding the
row's image or caption again."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import mmsearch
from mmsearch import db
from mmsearch.demo import world
from mmsearch.errors import ConfigError, MmsearchError
from mmsearch.export import export, read_export
from mmsearch.images import load_image


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[world.DemoFolder, Path]:
    """24 demo images with their caption files, and one image copied under a second name (one content,
    two files: one image vector, two caption sets)."""
    root = tmp_path_factory.mktemp("export")
    folder = world.write_demo_folder(root / "demo", n_images=24, seed=3, speech=False)
    first = folder.images[0]
    shutil.copy(first.path, first.path.with_name("copy_" + first.path.name))
    with mmsearch.Index.create(root / "index", model="demo") as idx:
        report = idx.add_folder(folder.media_dir)
    assert report.images_embedded == 24 and not report.skipped
    return folder, root / "index"


def catalog_vectors(idx: mmsearch.Index, kinds: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    store = idx.store
    parts = [store.catalog.load_vectors(k, store.dim, store.model) for k in kinds]
    return np.concatenate([i for i, _ in parts]), np.concatenate([v for _, v in parts])


def test_npy_layout_and_round_trip(demo, tmp_path: Path) -> None:
    folder, index = demo
    out = tmp_path / "out"
    with mmsearch.Index.open(index) as idx:
        report = export(idx, out, "npy")
        data = read_export(out)
        assert report.counts == {"images": 24, "texts": 24} and report.skipped == 0
        for name, kinds in (("images", ("image",)), ("texts", ("caption",))):
            ids, vectors = catalog_vectors(idx, kinds)
            got, rows = data[name]
            assert got.dtype == np.float32 and np.array_equal(got, vectors)  # float32: bit for bit
            assert [r["item_id"] for r in rows] == ids.tolist()
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "export.json",
        "images/img_emb/img_emb_0.npy",
        "images/metadata/metadata_0.parquet",
        "texts/metadata/metadata_0.parquet",
        "texts/text_emb/text_emb_0.npy",
    ]
    assert np.load(out / "images/img_emb/img_emb_0.npy").shape == (24, 128)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["model"]["name"] == "demo" and manifest["dim"] == 128 and manifest["format"] == "npy"
    assert not list(tmp_path.glob(".out.partial-*"))


def test_each_row_describes_its_own_vector(demo, tmp_path: Path) -> None:
    """The pairing, three ways: by the catalog's ids, by the file each row names, and by meaning (the row's
    image or caption embedded again is nearest to the row's own vector)."""
    folder, index = demo
    captions = {str(im.path): im.caption.text for im in folder.images}
    with mmsearch.Index.open(index) as idx:
        export(idx, tmp_path / "out", "npy")
        images, image_rows = read_export(tmp_path / "out")["images"]
        texts, text_rows = read_export(tmp_path / "out")["texts"]
        catalog = idx.store.catalog
        stored = catalog.vectors_for([r["item_id"] for r in image_rows + text_rows])
        for vector, row in zip(np.concatenate([images, texts]), image_rows + text_rows, strict=True):
            assert np.array_equal(stored[row["item_id"]], vector)
            details = db.file_details(catalog, row["file_id"])
            assert details is not None and details.path == row["path"] == row["image_path"]

        # images: each row's file, decoded and embedded now, is closest to that row's vector
        fresh = idx.embedder.embed_images([load_image(r["image_path"]) for r in image_rows])
        nearest = (fresh @ images.T).argmax(axis=1)
        assert nearest.tolist() == list(range(len(image_rows)))
        # captions: each row's text embedded now is (up to the indexing tower's rounding) that row's vector,
        # and nearest to it or to a row of the same text
        again = idx.embedder.embed_texts([r["caption"] for r in text_rows])
        similarity = again @ texts.T
        assert (np.diag(similarity) > 0.99).all()
        best = similarity.argmax(axis=1)
        assert [text_rows[b]["caption"] for b in best] == [r["caption"] for r in text_rows]
    for row in text_rows:
        path = row["image_path"].replace("copy_", "")
        assert row["kind"] == "caption" and captions[path] == row["caption"]
    # an image row carries its file's captions; the copy's content has one vector, shown with one file
    assert all(r["caption"] == captions[r["image_path"]] for r in image_rows)
    assert sum("copy_" in r["path"] for r in image_rows) == 0


def test_parquet_float16_keeps_vectors_and_identity(demo, tmp_path: Path) -> None:
    _, index = demo
    out = tmp_path / "out"
    with mmsearch.Index.open(index) as idx:
        export(idx, out, "parquet", dtype="float16")
        identity = idx.model_identity
        for name, kinds in (("images", ("image",)), ("texts", ("caption",))):
            ids, vectors = catalog_vectors(idx, kinds)
            got, rows = read_export(out)[name]
            assert got.dtype == np.float16
            assert np.allclose(got.astype(np.float32), vectors, atol=1e-3)
            assert [r["item_id"] for r in rows] == ids.tolist()
    assert not (out / "images" / "metadata").exists()
    table = pq.read_table(out / "images" / "img_emb" / "img_emb_0.parquet")
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: halffloat>[128]"
    manifest = json.loads(table.schema.metadata[b"mmsearch"])
    assert manifest["model"] == identity and manifest["dtype"] == "float16"
    # what embedding-reader's parquet reader does: stack the column's arrays
    stacked = np.array(table.column("embedding").to_pylist())
    assert stacked.shape == (24, 128)


def test_shards_are_numbered_as_clip_retrieval_numbers_them(demo, tmp_path: Path) -> None:
    _, index = demo
    with mmsearch.Index.open(index) as idx:
        export(idx, tmp_path / "one", "npy")
        export(idx, tmp_path / "many", "npy", shard_rows=2)
    names = sorted(p.name for p in (tmp_path / "many/images/img_emb").iterdir())
    assert names == [f"img_emb_{i:02d}.npy" for i in range(12)]
    metadata = sorted(p.name for p in (tmp_path / "many/images/metadata").iterdir())
    assert metadata == [f"metadata_{i:02d}.parquet" for i in range(12)]
    for name in ("images", "texts"):
        one, one_rows = read_export(tmp_path / "one")[name]
        many, many_rows = read_export(tmp_path / "many")[name]
        assert np.array_equal(one, many) and one_rows == many_rows


def test_refusals(demo, tmp_path: Path) -> None:
    _, index = demo
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    with mmsearch.Index.open(index) as idx:
        with pytest.raises(MmsearchError, match="not an empty folder"):
            export(idx, tmp_path / "full")
        assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
        with pytest.raises(ConfigError, match="unknown export format"):
            export(idx, tmp_path / "x", "csv")
        with pytest.raises(ConfigError, match="unknown vector type"):
            export(idx, tmp_path / "x", dtype="int8")
        export(idx, tmp_path / "empty")  # an empty folder is taken
    assert (tmp_path / "empty" / "export.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]


@pytest.mark.speech
@pytest.mark.slow
def test_transcript_segments_are_exported_with_their_times(tmp_path: Path) -> None:
    folder = world.write_demo_folder(tmp_path / "demo", n_images=8, seed=4, speech=True)
    with mmsearch.Index.create(tmp_path / "index", model="demo") as idx:
        idx.add_folder(folder.media_dir)
        export(idx, tmp_path / "out", "parquet")
        texts, rows = read_export(tmp_path / "out")["texts"]
        stored = idx.store.catalog.vectors_for([r["item_id"] for r in rows])
    segments = [(v, r) for v, r in zip(texts, rows, strict=True) if r["kind"] == "segment"]
    assert segments and rows[: len(rows) - len(segments)] == [r for r in rows if r["kind"] == "caption"]
    spoken = {str(f.path): f.text.lower() for f in folder.recordings}
    for video in folder.videos:  # the demo videos' narrations are spoken segments too
        spoken[str(video.path)] = " ".join(s.narration or "" for s in video.scenes).lower()
    for vector, row in segments:
        assert np.array_equal(stored[row["item_id"]], vector)
        assert row["image_path"] is None and 0 <= row["start"] < row["end"]
        said = row["caption"].lower().strip(" .")
        assert said and said.split()[-1] in spoken[row["path"]]  # the segment's words are its recording's
