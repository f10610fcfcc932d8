"""Meaning, end to end: the bundled demo model on a generated folder, through the API and the CLI.

Real OpenCLIP code on the demo weights, real SQLite and FAISS, real piper speech and real Whisper tiny.en:
"a red circle" finds red circles, a picture of a blue square finds its caption, a spoken "a green triangle"
finds green triangles, and a podcast sentence is found with its time range.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mmsearch
from mmsearch.demo import world

pytestmark = [pytest.mark.speech, pytest.mark.slow]  # the demo model and Whisper end to end


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[world.DemoFolder, Path]:
    root = tmp_path_factory.mktemp("demo")
    folder = world.write_demo_folder(root, n_images=36, seed=11, speech=True)
    with mmsearch.Index.create(root / "index", model="demo") as idx:
        report = idx.add_folder(folder.media_dir)
    assert report.images_embedded == 36 and not report.skipped
    assert report.audio_transcribed == len(folder.recordings) > 0
    return folder, root / "index"


def attributes_by_path(folder: world.DemoFolder) -> dict[str, world.Attributes]:
    return {str(im.path): im.attributes for im in folder.images}


def test_text_to_image(demo: tuple[world.DemoFolder, Path]) -> None:
    folder, index = demo
    attrs = attributes_by_path(folder)
    wanted = {"colour": "red", "shape": "circle"}
    relevant = sum(world.matches(wanted, a) for a in attrs.values())
    assert relevant >= 2
    with mmsearch.Index.open(index) as idx:
        hits = idx.search_text("a red circle", target="images", k=relevant)
    assert all(h.kind == "image" for h in hits)
    assert sum(world.matches(wanted, attrs[h.path]) for h in hits) >= relevant - 1
    assert world.matches(wanted, attrs[hits[0].path])


def test_image_to_text(demo: tuple[world.DemoFolder, Path]) -> None:
    folder, index = demo
    assert folder.image_query is not None and folder.image_query_attributes is not None
    attrs = attributes_by_path(folder)
    with mmsearch.Index.open(index) as idx:
        hits = idx.search_image(folder.image_query, target="captions", k=3)
    top = hits[0]
    assert top.kind == "caption" and top.text
    assert "blue" in top.text and "square" in top.text
    assert attrs[top.path].colour == "blue" and attrs[top.path].shape == "square"


def test_spoken_query_to_image(demo: tuple[world.DemoFolder, Path]) -> None:
    folder, index = demo
    assert folder.audio_query is not None
    attrs = attributes_by_path(folder)
    wanted = {"colour": "green", "shape": "triangle"}
    with mmsearch.Index.open(index) as idx:
        heard = idx.transcribe_query(folder.audio_query)
        hits = idx.search_audio(folder.audio_query, target="images", k=3)
        # A search-only process loads the speech model tuned for short clips, not the one for indexing.
        assert idx._transcriber is None and idx._query_transcriber is not None
        assert idx._query_transcriber._pipeline.workers is None
    assert "green" in heard.lower() and "triangle" in heard.lower()
    assert sum(world.matches(wanted, attrs[h.path]) for h in hits) >= 2
    assert world.matches(wanted, attrs[hits[0].path])


def test_podcast_sentence_is_found_with_its_time_range(demo: tuple[world.DemoFolder, Path]) -> None:
    folder, index = demo
    recording = folder.recordings[0]
    sentence = recording.text.split(".")[1].strip()  # the second sentence of the first episode
    with mmsearch.Index.open(index) as idx:
        hits = idx.search_text(sentence, target="audio", k=3)
        stats = idx.stats()
    assert stats["segments"] >= len(folder.recordings) * 2
    top = hits[0]
    assert top.kind == "segment" and top.path == str(recording.path)
    assert top.start is not None and top.end is not None and 0.0 <= top.start < top.end
    # The matched segment says the sentence (Whisper may write digits or drop an article).
    words = {w for w in sentence.lower().split() if len(w) > 3}
    assert words & set(top.text.lower().replace(",", " ").replace(".", " ").split())


def _cli(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "mmsearch", *args, "--json"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cli_every_direction(demo: tuple[world.DemoFolder, Path]) -> None:
    folder, index = demo
    attrs = attributes_by_path(folder)
    text = _cli("query", "a red circle", "--index", str(index), "-k", "1")
    assert world.matches({"colour": "red", "shape": "circle"}, attrs[text["hits"][0]["path"]])
    image = _cli("query", "--image", str(folder.image_query), "--index", str(index), "-k", "1")
    assert image["target"] == "texts" and "blue" in image["hits"][0]["text"]
    audio = _cli("query", "--audio", str(folder.audio_query), "--index", str(index), "-k", "1")
    assert "green" in audio["transcript"].lower()
    assert world.matches({"colour": "green", "shape": "triangle"}, attrs[audio["hits"][0]["path"]])
