"""Changing an index's model without emptying search (issue 15): re-embed beside the active model, switch
atomically, roll back, resume after kill -9, and `index` while a model is pending.

Real models: the bundled demo model and the tiny random-weights config (tests/data), real SQLite, FAISS and
subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import mmsearch
from mmsearch import db
from mmsearch.cli import app
from mmsearch.demo import world
from mmsearch.errors import ActiveModelChanged, ModelMismatchError
from mmsearch.identity import ModelSpec, model_key
from mmsearch.search import search_vector
from mmsearch.store import Store
from mmsearch.vectors import VectorIndex
from tests import test_store_hardening as hardening
from tests.conftest import TINY_MODEL, solid
from tests.test_ingest import assert_consistent
from tests.test_store_hardening import DIM, make_v2_index

TINY = ModelSpec(TINY_MODEL, "random")
count_builds = hardening.count_builds  # the fixture: every rebuild of a FAISS index from SQLite
DEMO = ModelSpec("demo")
QUERY = "a red circle"


@pytest.fixture
def demo_index(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(index, media folder): 24 demo images with their captions (no videos: the counts below are of
    images and captions), indexed with the demo model."""
    folder = world.write_demo_folder(tmp_path / "demo", n_images=24, seed=5, speech=False, videos=False)
    index = tmp_path / "index"
    with mmsearch.Index.create(index, model="demo") as idx:
        report = idx.add_folder(folder.media_dir)
    assert report.images_embedded == 24 and report.captions_added == 24
    yield index, folder.media_dir


def _rows(index: Path, sql: str, *args: object) -> list[tuple]:
    con = sqlite3.connect(index / "catalog.sqlite")
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def _vectors_by_model(index: Path) -> dict[str, dict[int, np.ndarray]]:
    out: dict[str, dict[int, np.ndarray]] = {}
    for eid, model, blob in _rows(index, "SELECT id, model, vector FROM embeddings"):
        out.setdefault(model, {})[eid] = np.frombuffer(blob, np.float32)
    return out


def _no_item_twice(index: Path) -> None:
    """No item holds two vectors of one model."""
    for ref in ("media_id", "caption_id", "segment_id"):
        dup = _rows(
            index,
            f"SELECT model, {ref}, count(*) FROM embeddings WHERE {ref} IS NOT NULL "
            f"GROUP BY model, kind, {ref} HAVING count(*) > 1",
        )
        assert dup == [], ref
    # ... and the counts the triggers keep per (model, kind) are the rows'.
    counted = _rows(index, "SELECT model, kind, n FROM vector_counts WHERE n > 0 ORDER BY model, kind")
    actual = _rows(
        index, "SELECT model, kind, count(*) FROM embeddings GROUP BY model, kind ORDER BY model, kind"
    )
    assert counted == actual


@pytest.mark.slow
def test_switch_to_another_model_and_back_while_search_answers(demo_index: tuple[Path, Path]) -> None:
    index, _ = demo_index
    demo_key = model_key(DEMO.expected_identity())
    tiny_key = model_key(TINY.expected_identity())
    answers: list[list[tuple[int, float]]] = []  # (item id, score) of each answer's hits
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        with mmsearch.Index.open(index) as r:
            while not stop.is_set():
                try:
                    hits = r.search_text(QUERY, target="all", k=8)
                    answers.append([(h.item_id, h.score) for h in hits])
                except BaseException as e:  # every error counts
                    errors.append(e)
                    return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        while not answers and thread.is_alive():
            time.sleep(0.01)
        with mmsearch.Index.open(index) as idx:
            report = idx.reembed(TINY, keep_old=True)
            assert report.activated and report.started and report.removed_model is None
            assert (report.images, report.captions, report.segments) == (24, 24, 0)
            switched = len(answers)
            deadline = time.monotonic() + 60
            while len(answers) < switched + 3 and thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            # Status while both are held: full coverage each, the tiny model active.
            models = {m["key"]: m for m in idx.stats()["models"]}
            assert set(models) == {demo_key, tiny_key}
            assert models[tiny_key]["active"] and not models[demo_key]["active"]
            for m in models.values():
                assert m["vectors"] == m["items"] == {"image": 24, "caption": 24, "segment": 0, "frame": 0}
            assert json.loads((index / "mmsearch.json").read_text())["model"]["arch"] == "tiny-clip"
            # Rollback: instant, no model work.
            assert idx.activate(DEMO) == demo_key
            assert idx.store.model == demo_key
            rolled = len(answers)
            while len(answers) < rolled + 3 and thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    # Every answer is exactly one model's: its items are that model's vectors and its scores are the query,
    # embedded by that model, against them; the reader saw demo, then tiny, then demo again.
    vectors = _vectors_by_model(index)
    with mmsearch.Index.open(index) as idx:
        queries = {key: idx.embedder_for(key).embed_texts([QUERY])[0] for key in (demo_key, tiny_key)}
    seen: list[str] = []
    for hits in answers:
        assert hits
        consistent = [
            model
            for model in (demo_key, tiny_key)
            if all(
                item_id in vectors[model]
                and float(queries[model] @ vectors[model][item_id]) == pytest.approx(score, abs=1e-3)
                for item_id, score in hits
            )
        ]
        assert len(consistent) == 1, hits
        if not seen or seen[-1] != consistent[0]:
            seen.append(consistent[0])
    assert seen == [demo_key, tiny_key, demo_key]
    _no_item_twice(index)
    with mmsearch.Index.open(index, model="demo") as idx:  # the torch-free check reads mmsearch.json
        assert_consistent(idx)
        top = Path(idx.search_text(QUERY, k=1)[0].path).name  # the demo model's meaning is back
        assert "red" in top and "circle" in top
    with pytest.raises(ModelMismatchError):
        mmsearch.Index.open(index, model=TINY_MODEL, pretrained="random")


@pytest.mark.slow
def test_without_keep_old_the_old_vectors_go_and_a_reader_switches_atomically(
    demo_index: tuple[Path, Path],
) -> None:
    index, _ = demo_index
    demo_key = model_key(DEMO.expected_identity())
    with mmsearch.Index.open(index) as reader, mmsearch.Index.open(index) as writer:
        q_demo = reader.embedder.embed_texts([QUERY])[0]
        assert reader.search_vector(q_demo, target="images", k=3, model=demo_key)
        report = writer.reembed(TINY)
        assert report.activated and report.removed_model == demo_key
        # The reader held the demo model's indexes: a query embedded by it is refused, not searched
        # against the tiny model's vectors, and the next text query is embedded by the tiny model.
        with pytest.raises(ActiveModelChanged):
            search_vector(reader.store, q_demo, "images", 3, model=demo_key)
        hits = reader.search_text(QUERY, target="all", k=5)
        assert hits and reader.store.model == report.model and reader.store.dim == 32
        assert reader.embedder.identity["arch"] == "tiny-clip"
        assert_consistent(reader)
    assert {m for (m,) in _rows(index, "SELECT DISTINCT model FROM embeddings")} == {report.model}
    assert sorted(p.name for p in (index / "vectors").iterdir()) == [report.model]
    with mmsearch.Index.open(index, model=TINY_MODEL, pretrained="random") as idx:
        assert [m["key"] for m in idx.stats()["models"]] == [report.model]
        with pytest.raises(mmsearch.MmsearchError, match="no vectors"):
            idx.activate(DEMO)


@pytest.mark.slow
def test_index_while_a_model_is_pending_embeds_new_content_with_both(demo_index: tuple[Path, Path]) -> None:
    index, media = demo_index

    class Stop(Exception):
        pass

    def stop_after_images(stage: str, done: int, total: int) -> None:
        if stage == "images" and done >= 1:
            raise Stop  # an interrupted run: the target stays pending with part of its vectors

    with mmsearch.Index.open(index) as idx:
        with pytest.raises(Stop):
            idx.reembed(TINY, progress=stop_after_images)
        target = idx.store.catalog.target_model()
        assert target is not None and target != idx.store.model
        partial = idx.store.catalog.coverage()[target]
        assert 0 < partial["image"] < 24 and "caption" not in partial
        solid(media / "new" / "late.png", "purple")
        (media / "new" / "late.txt").write_text("a late purple picture")
        report = idx.add_folder(media)
        assert report.images_embedded == 1 and report.captions_added == 1
        assert report.target_embedded == (25 - partial["image"]) + 25
        models = {m["key"]: m for m in idx.stats()["models"]}
        assert models[target]["target"] and models[target]["vectors"] == models[target]["items"]
        assert (
            models[idx.store.model]["vectors"]
            == models[target]["vectors"]
            == {
                "image": 25,
                "caption": 25,
                "segment": 0,
                "frame": 0,
            }
        )
        # The searches still use the demo model; the target switches in with no model work left.
        assert idx.search_text("a purple picture", target="captions", k=1)[0].text == "a late purple picture"
        again = idx.reembed(TINY)
        assert again.activated and again.embedded == 0 and not again.started
    _no_item_twice(index)
    with mmsearch.Index.open(index) as idx:
        assert_consistent(idx)


_REEMBED_SLOWLY = """
import sys, time
import mmsearch
from mmsearch.identity import ModelSpec

def tick(stage, done, total):
    print(stage, done, total, flush=True)
    time.sleep(0.3)

with mmsearch.Index.open(sys.argv[1], image_tower="torch") as idx:
    idx.reembed(ModelSpec(sys.argv[2], "random"), progress=tick, workers=1)
"""


@pytest.mark.slow
def test_kill_9_during_reembed_then_resume_embeds_nothing_twice(
    tmp_path: Path, demo_index: tuple[Path, Path]
) -> None:
    index, media = demo_index
    for i in range(150):  # more content: several committed image batches
        solid(media / "more" / f"{i:03d}.png", (i, 255 - i, (7 * i) % 256), size=(32 + i % 9, 24))
    with mmsearch.Index.open(index) as idx:
        idx.add_folder(media)
    total = 174
    proc = subprocess.Popen(
        [sys.executable, "-c", _REEMBED_SLOWLY, str(index), TINY_MODEL],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        stage, done, _ = line.split()
        if stage == "images" and 0 < int(done) < total:
            os.kill(proc.pid, signal.SIGKILL)  # mid-run, right after a committed batch
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    tiny_key = model_key(TINY.expected_identity())
    before = {mid for (mid,) in _rows(index, "SELECT media_id FROM embeddings WHERE model = ?", tiny_key)}
    assert 0 < len(before) < total
    # Searches answer from the demo model meanwhile.
    with mmsearch.Index.open(index) as idx:
        assert idx.store.model != tiny_key and idx.search_text(QUERY, k=3)
    result = CliRunner().invoke(
        app, ["reembed", "-i", str(index), "--model", TINY_MODEL, "--pretrained", "random", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["activated"] and not report["started"]  # resumed the pending target
    assert report["images"] == total - len(before) and report["captions"] == 24
    _no_item_twice(index)
    assert {m for (m,) in _rows(index, "SELECT DISTINCT model FROM embeddings")} == {tiny_key}
    with mmsearch.Index.open(index) as idx:
        assert idx.store.model == tiny_key
        assert idx.stats()["vectors"] == {"image": total, "caption": 24}
        assert_consistent(idx)


def test_status_and_activate_on_the_command_line(tmp_path: Path) -> None:
    """The tiny model twice (two seeds of the same config would be the same model: use a copy of it under
    another name, a different architecture name), status --json lists both with coverage."""
    media = tmp_path / "m"
    for i, colour in enumerate(("red", "green", "blue")):
        solid(media / f"{i}.png", colour)
        (media / f"{i}.txt").write_text(f"a {colour} picture")
    other = tmp_path / "tiny-clip-b.json"
    other.write_text(Path(TINY_MODEL).read_text())
    index = tmp_path / "index"
    with mmsearch.Index.create(index, model=TINY_MODEL, pretrained="random") as idx:
        idx.add_folder(media)
        first = idx.store.model
    runner = CliRunner()
    args = ["-i", str(index), "--json"]
    out = runner.invoke(
        app, ["reembed", "--model", str(other), "--pretrained", "random", "--keep-old", *args]
    )
    assert out.exit_code == 0, out.output
    second = json.loads(out.output)["model"]
    status = json.loads(runner.invoke(app, ["status", *args]).output)
    coverage = {m["key"]: (m["active"], m["vectors"]) for m in status["models"]}
    full = {"image": 3, "caption": 3, "segment": 0, "frame": 0}
    assert coverage == {first: (False, full), second: (True, full)}
    assert status["vectors"] == {"image": 3, "caption": 3}  # the active model's
    text = runner.invoke(app, ["status", "-i", str(index)]).output
    assert "[active]: 3/3 caption, 0/0 frame, 3/3 image, 0/0 segment" in text and "[kept]" in text
    out = runner.invoke(app, ["activate", "--model", TINY_MODEL, "--pretrained", "random", *args])
    assert out.exit_code == 0 and json.loads(out.output)["active"] == first
    with mmsearch.Index.open(index) as idx:
        assert idx.store.model == first and idx.search_text("a red picture", target="captions", k=1)
        assert_consistent(idx)
    unknown = runner.invoke(app, ["activate", "--model", "demo", "-i", str(index)])
    assert unknown.exit_code != 0 and "Traceback" not in unknown.output


def test_a_model_key_names_weights_not_spelling() -> None:
    a = {"name": "x.json", "arch": "x", "pretrained": "random", "checkpoint_sha256": None}
    assert model_key(a) == model_key({**a, "dim": 32, "image_tower": "onnx-int8"})
    assert model_key(a) != model_key({**a, "pretrained": "other"})
    sha = {"name": "demo", "arch": "d", "pretrained": None, "checkpoint_sha256": "ab" * 32}
    assert model_key(sha) != model_key({**sha, "checkpoint_sha256": "cd" * 32})
    assert "/" not in model_key({"name": "/some/where/My Model.json", "arch": "m"})
    assert db.SCHEMA_VERSION >= 4


def test_an_older_index_is_migrated_its_vectors_named_and_its_flat_files_read(
    tmp_path: Path, count_builds: list[int]
) -> None:
    """A version-2 index with a saved FAISS file in the flat layout (vectors/image.faiss): migration 4
    gives its embeddings the index's model, which becomes the active one, and its file is read where it
    is (no rebuild); the writer's next save moves it to vectors/MODEL/image.faiss."""
    folder = tmp_path / "idx"
    live = make_v2_index(folder, np.random.default_rng(7))
    con = sqlite3.connect(folder / "catalog.sqlite")
    ids, blobs = zip(*con.execute("SELECT id, vector FROM embeddings ORDER BY id"), strict=True)
    flat = VectorIndex.build(
        DIM, np.asarray(ids, np.int64), np.frombuffer(b"".join(blobs), np.float32).reshape(-1, DIM)
    )
    (folder / "vectors").mkdir()
    sha, ntotal = flat.save(folder / "vectors" / "image.faiss")
    record = {"sha256": sha, "ntotal": ntotal, "generation": 2, "max_id": 3, "seq": 0}
    con.execute("INSERT INTO meta VALUES ('faiss.image', ?)", (json.dumps(record),))
    con.commit()
    con.close()
    count_builds.clear()

    store = Store.open(folder)
    try:
        key = model_key(store.config["model"])
        assert store.model == key and store.catalog.models() == {key: store.config["model"]}
        assert {m for (m,) in _rows(folder, "SELECT DISTINCT model FROM embeddings")} == {key}
        assert _rows(folder, "SELECT model, kind, n FROM vector_counts") == [(key, "image", 3)]
        assert set(store.vectors("image").ids().tolist()) == set(live["embeddings"])
        assert count_builds == []  # the flat file, not a rebuild
        store.lock_for_writing()
        rng = np.random.default_rng(8)
        with store.write("image") as tx:
            mid = db.add_image_media(tx.conn, rng.bytes(32).hex())
            vec = rng.standard_normal((1, DIM)).astype(np.float32)
            tx.added("image", db.add_embeddings(tx.conn, "image", vec / np.linalg.norm(vec), [mid]), vec)
        store.save_vectors()
    finally:
        store.close()
    count_builds.clear()
    assert not (folder / "vectors" / "image.faiss").exists()
    assert (folder / "vectors" / key / "image.faiss").is_file()
    store = Store.open(folder)
    try:
        assert store.vectors("image").ntotal == 4 and count_builds == []
    finally:
        store.close()


def test_transcript_segments_are_re_embedded(tiny_index: mmsearch.Index, tmp_path: Path) -> None:
    """Segments are re-embedded like captions. The transcript is written as ingest writes one after
    transcribing (the speech model is not what this is about), with vectors of the index's model."""
    recording = tmp_path / "m" / "talk.wav"
    recording.parent.mkdir()
    recording.write_bytes(b"RIFF....WAVE")
    said = ["the weather is sunny", "a talk about trains"]
    store = tiny_index.store
    store.lock_for_writing()
    vectors = tiny_index.embedder.embed_texts(said)
    with store.write("segment") as tx:
        mid, seg_ids = db.add_transcript(
            tx.conn,
            "ab" * 32,
            duration=4.0,
            language="en",
            text=" ".join(said),
            spans=[(i, i, i + 1, t) for i, t in enumerate(said)],
        )
        tx.added("segment", db.add_embeddings(tx.conn, "segment", vectors, seg_ids), vectors)
        st = recording.stat()
        db.write_file(
            tx.conn,
            recording,
            kind="audio",
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            sha256="ab" * 32,
            media_id=mid,
        )
    store.unlock()
    other = tmp_path / "tiny-clip-b.json"
    other.write_text(Path(TINY_MODEL).read_text())
    report = tiny_index.reembed(ModelSpec(str(other), "random"))
    assert report.activated and (report.images, report.captions, report.segments) == (0, 0, 2)
    assert tiny_index.store.model == report.model
    assert tiny_index.stats()["vectors"] == {"segment": 2}
    hit = tiny_index.search_text("a talk about trains", target="audio", k=1)[0]
    assert hit.text == "a talk about trains" and hit.path == str(recording)
    assert_consistent(tiny_index)


@pytest.mark.slow
@pytest.mark.speech
def test_retranscribe_swaps_each_recording_and_resumes(tmp_path: Path) -> None:
    """tiny.en on faster-whisper, then the same weights on openai-whisper (other speech settings): each
    recording's transcript, segments and segment vectors are swapped in one transaction; an interrupted
    run resumes with the recordings not yet done; the index's speech settings switch at the end."""
    import shutil

    from mmsearch.identity import speech_key
    from tests._speech import ct2_tiny_en, openai_checkpoint, speech_wav

    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(speech_wav("The quick brown fox jumps over the lazy dog."), media / "fox.wav")
    shutil.copy(speech_wav("Please remember to water the plants in the garden."), media / "plants.wav")
    index = tmp_path / "index"
    old = {"backend": "faster-whisper", "model": str(ct2_tiny_en()), "language": None}
    new = {"backend": "openai-whisper", "model": str(openai_checkpoint()), "language": None}
    with mmsearch.Index.create(
        index, model=TINY_MODEL, pretrained="random", speech_backend=old["backend"], speech_model=old["model"]
    ) as idx:
        assert idx.add_folder(media).audio_transcribed == 2
    before = dict(_rows(index, "SELECT id, media_id FROM segments"))

    class Stop(Exception):
        pass

    def stop_after_one(stage: str, done: int, total: int) -> None:
        if stage == "audio" and done == 1:
            raise Stop

    with mmsearch.Index.open(index) as idx:
        with pytest.raises(Stop):
            idx.retranscribe(new["model"], speech_backend=new["backend"], progress=stop_after_one)
        by = dict(_rows(index, "SELECT id, speech FROM media"))
        assert sorted(by.values()) == sorted([speech_key(old), speech_key(new)])
        swapped = next(mid for mid, key in by.items() if key == speech_key(new))
        assert not {sid for sid, mid in before.items() if mid == swapped} & {
            s for (s,) in _rows(index, "SELECT id FROM segments")
        }
        assert idx.store.config["speech"]["backend"] == "faster-whisper"  # not switched yet
        assert_consistent(idx)
    result = CliRunner().invoke(
        app,
        [
            "retranscribe",
            "-i",
            str(index),
            "--speech-backend",
            new["backend"],
            "--speech-model",
            new["model"],
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["transcribed"] == 1 and report["switched"] and report["kept"] == []
    assert {key for (key,) in _rows(index, "SELECT speech FROM media")} == {speech_key(new)}
    assert not set(before) & {s for (s,) in _rows(index, "SELECT id FROM segments")}  # every segment is new
    # No vector of a replaced segment is left; every segment has exactly one vector.
    assert _rows(
        index,
        "SELECT count(*) FROM embeddings e LEFT JOIN segments s ON s.id = e.segment_id WHERE e.kind = 'segment' AND s.id IS NULL",
    ) == [(0,)]
    _no_item_twice(index)
    with mmsearch.Index.open(index) as idx:
        assert {k: idx.store.config["speech"][k] for k in new} == new
        assert_consistent(idx)
        assert idx.stats()["vectors"]["segment"] == idx.stats()["segments"]
        hits = idx.search_vector(
            idx.embedder.embed_texts(
                [_rows(index, "SELECT text FROM segments WHERE text LIKE '%fox%'")[0][0]]
            )[0],
            target="audio",
            k=1,
        )
        assert hits[0].path.endswith("fox.wav")
