"""Calibrated confidence on the demo model: a query the collection cannot answer gets a confidence below the
default, one it can answer above it; the calibration is stored per model, reloaded without writing, and fit
again only when the collection changed enough.

The collection is a subset of the demo world: red, green and blue circles, squares and triangles (no
yellow, purple or orange, no stars), captioned in the held-out phrasing.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import mmsearch
from mmsearch import calibrate
from mmsearch.demo import world
from mmsearch.identity import ModelSpec
from tests.conftest import TINY_MODEL, solid

COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square", "triangle")
SEED = 4242  # images from a seed the demo model's training never used
# The demo model indexes ~80 images once per module (~15 s idle, more on a busy machine).
slow = pytest.mark.slow


def write_images(folder: Path, n: int, seed: int) -> list[world.Attributes]:
    """Images of the subset (drawn from ``n`` generated ones), each with a held-out caption that states
    colour, shape and a random part of the rest."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    kept = []
    for i, (attrs, img) in enumerate(world.generate(n, seed)):
        if attrs.colour in COLOURS and attrs.shape in SHAPES:
            path = folder / f"{i:04d}.png"
            img.save(path)
            stated = [a for a in world.OPTIONAL_ATTRIBUTES if rng.random() < 0.5]
            path.with_suffix(".txt").write_text(world.held_out_caption(attrs, stated=stated).text + "\n")
            kept.append(attrs)
    return kept


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[mmsearch.Index]:
    root = tmp_path_factory.mktemp("calibrate")
    kept = write_images(root / "media" / "base", 240, SEED)
    assert len(kept) >= 80
    # The torch image tower: no ONNX export for a few dozen images.
    idx = mmsearch.Index.create(root / "index", model="demo", device="cpu", image_tower="torch")
    idx.add_folder(root / "media")
    try:
        yield idx
    finally:
        idx.close()


@pytest.fixture
def own_index(demo_index: mmsearch.Index, tmp_path: Path) -> Iterator[mmsearch.Index]:
    """A copy of the demo index, for a test that changes it."""
    shutil.copytree(demo_index.path, tmp_path / "index")
    idx = mmsearch.Index.open(tmp_path / "index", device="cpu", image_tower="torch")
    try:
        yield idx
    finally:
        idx.close()


def top_confidence(idx: mmsearch.Index, cal: calibrate.Calibration, text: str) -> float:
    vector = idx.embedder.embed_texts([text])
    scores, _ = idx.store.vectors("image").search(vector, 1)
    confidence = cal.confidence("text", "image", float(scores[0, 0]))
    assert confidence is not None
    return confidence


@slow
def test_absent_queries_are_cut_present_ones_kept(demo_index: mmsearch.Index) -> None:
    cal = calibrate.ensure_calibrated(demo_index.store, demo_index.store.model)
    default = calibrate.DEFAULT_MIN_CONFIDENCE
    assert top_confidence(demo_index, cal, "an image with a purple star") < default
    assert top_confidence(demo_index, cal, "an image with a red circle") >= default

    present, absent = [], []
    for colour in world.COLOURS:
        for shape in world.SHAPES:
            text = world.held_out_caption(
                world.Attributes(colour, shape, "small", 1, "white"), stated=()
            ).text
            conf = top_confidence(demo_index, cal, text)
            (present if colour in COLOURS and shape in SHAPES else absent).append((text, conf))
    assert all(conf >= default for _, conf in present), present
    cut = [text for text, conf in absent if conf < default]
    assert len(cut) >= 0.9 * len(absent), sorted(set(t for t, _ in absent) - set(cut))


@slow
def test_image_query_confidence(demo_index: mmsearch.Index) -> None:
    cal = calibrate.ensure_calibrated(demo_index.store, demo_index.store.model)
    rng = random.Random(7)
    images = [
        world.render(world.Attributes("red", "circle", "large", 1, "white"), rng),
        world.render(world.Attributes("blue", "square", "small", 2, "gray"), rng),
        world.render(world.Attributes("purple", "star", "large", 1, "white"), rng),
        world.render(world.Attributes("orange", "star", "small", 2, "black"), rng),
    ]
    scores, _ = demo_index.store.vectors("caption").search(demo_index.embedder.embed_images(images), 1)
    conf = [cal.confidence("image", "caption", float(s)) for s in scores[:, 0]]
    default = calibrate.DEFAULT_MIN_CONFIDENCE
    assert conf[0] >= default and conf[1] >= default, conf
    assert conf[2] < default and conf[3] < default, conf


@slow
def test_pairs_without_known_matches_are_not_calibrated(demo_index: mmsearch.Index) -> None:
    cal = calibrate.ensure_calibrated(demo_index.store, demo_index.store.model)
    assert set(cal.pairs) == {("text", "image"), ("image", "caption")}
    assert cal.confidence("image", "image", 0.99) is None
    assert cal.confidence("text", "segment", 0.99) is None
    with pytest.raises(ValueError, match="query kind"):
        cal.confidence("audio", "image", 0.5)  # a spoken query is searched as text


@slow
def test_stored_calibration_is_reloaded_without_writing(demo_index: mmsearch.Index) -> None:
    store = demo_index.store
    fitted = calibrate.ensure_calibrated(store, store.model)
    raw = store.catalog.get_meta(f"calibration.{store.model}")
    assert raw["fit_on"]["image"] == fitted.fit_on["image"] > 0
    with mmsearch.Index.open(demo_index.path) as reader:
        loaded = calibrate.load(reader.store, reader.store.model)
    assert loaded is not None and loaded.fitted_at == fitted.fitted_at
    assert loaded.pairs == fitted.pairs
    for score in (0.3, 0.7, 0.74, 0.8, 0.95):
        assert loaded.confidence("text", "image", score) == fitted.confidence("text", "image", score)
    assert store.catalog.get_meta(f"calibration.{store.model}") == raw  # a reader never writes
    assert calibrate.load(store, "no-such-model") is None


@slow
def test_refit_only_when_the_collection_changed(own_index: mmsearch.Index, tmp_path: Path) -> None:
    store = own_index.store
    first = calibrate.ensure_calibrated(store, store.model)
    assert calibrate.ensure_calibrated(store, store.model).fitted_at == first.fitted_at
    n = first.fit_on["image"]

    # A few more images (within REFIT_CHANGE): the stored calibration stays.
    few = write_images(tmp_path / "few", 16, SEED + 1)
    assert 0 < len(few) <= calibrate.REFIT_CHANGE * n
    own_index.add_folder(tmp_path / "few")
    assert calibrate.ensure_calibrated(store, store.model).fitted_at == first.fitted_at

    # Many more: fit again on the new counts.
    write_images(tmp_path / "many", 120, SEED + 2)
    own_index.add_folder(tmp_path / "many")
    refit = calibrate.ensure_calibrated(store, store.model)
    assert refit.fitted_at != first.fitted_at
    assert refit.fit_on["image"] == calibrate.vector_counts(store, store.model)["image"] > n
    assert calibrate.load(store, store.model) == refit


@slow
def test_calibration_follows_the_model(own_index: mmsearch.Index) -> None:
    """Another model of the same index gets its own calibration, from its own scores."""
    store = own_index.store
    demo_key = store.model
    demo = calibrate.ensure_calibrated(store, demo_key)
    own_index.reembed(ModelSpec(TINY_MODEL, "random"), keep_old=True)
    tiny_key = store.model
    assert tiny_key != demo_key
    tiny = calibrate.load(store, tiny_key)  # fit by reembed once the model became active
    assert tiny is not None and calibrate.ensure_calibrated(store, tiny_key) == tiny
    assert store.catalog.get_meta(f"calibration.{tiny_key}")["model"] == tiny_key
    assert calibrate.load(store, demo_key) == demo  # the first model's is untouched
    # Random weights match captions to images no better than chance: its scale is its own.
    tiny_fit, demo_fit = tiny.pairs[("text", "image")], demo.pairs[("text", "image")]
    assert abs(tiny_fit.median - demo_fit.median) > 5 * demo_fit.spread
    calibrate.forget(store, tiny_key)
    assert calibrate.load(store, tiny_key) is None
    own_index.activate(ModelSpec("demo"))
    assert store.follow_active() == demo_key
    assert calibrate.ensure_calibrated(store, demo_key) == demo  # nothing changed: not fit again


def test_no_captions_no_calibration(tiny_index: mmsearch.Index, tmp_path: Path) -> None:
    """Images without captions have no known matches: every pair stays uncalibrated (the cut is off)."""
    for i, colour in enumerate(("red", "green", "blue", "white", "black")):
        solid(tmp_path / "photos" / f"{i}.png", colour)
    tiny_index.add_folder(tmp_path / "photos")
    cal = calibrate.ensure_calibrated(tiny_index.store, tiny_index.store.model)
    assert cal.pairs == {}
    assert cal.confidence("text", "image", 1.0) is None
    assert cal.fit_on["image"] == 5


def test_match_fit_maps_scores_to_confidence() -> None:
    scores = np.random.default_rng(0).normal(0.3, 0.02, 2000)
    fit = calibrate.MatchFit.of(scores)
    assert fit.median == pytest.approx(0.3, abs=0.003) and fit.spread == pytest.approx(0.02, rel=0.1)
    assert fit.confidence(0.3) == pytest.approx(1.0, abs=0.01)
    assert fit.confidence(0.5) == 1.0 and fit.confidence(0.0) == pytest.approx(0.0, abs=1e-9)
    assert fit.confidence(float("-inf")) == 0.0
    # Two spreads below the median: about 2 x 2.3 % of known matches score lower.
    assert fit.confidence(0.26) == pytest.approx(0.0455, abs=0.01)
    grid = np.linspace(0.2, 0.4, 50)
    assert np.all(np.diff([fit.confidence(s) for s in grid]) >= 0)
    assert fit.confidence(fit.score_at(calibrate.DEFAULT_MIN_CONFIDENCE)) == pytest.approx(
        calibrate.DEFAULT_MIN_CONFIDENCE
    )
