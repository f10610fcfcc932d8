"""The query layer (mmsearch.query): planning and fusion as pure functions, then its semantics end to end on
the bundled demo model (real OpenCLIP, SQLite with FTS5, FAISS): words and meaning, filters that still
return k hits, combined queries with +/- terms, the CLI and the HTTP API translating the same options."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mmsearch
from mmsearch import query as q
from mmsearch.demo import world
from mmsearch.errors import BadQueryError

# --- planning and fusion: no index, no model --------------------------------------------------------------


def test_plan_defaults_and_parts() -> None:
    p = q.plan(q.Query(text="a red circle", add=("blue",), subtract=("red",), weights={"subtract": 0.5}))
    assert p.target == "images" and p.kinds == ("image",) and p.mode == "hybrid"
    assert [(x.role, x.weight) for x in p.parts] == [("text", 1.0), ("add", 1.0), ("subtract", -0.5)]
    assert p.words == "a red circle blue"  # subtracted words never reach the words index
    image_only = q.plan(q.Query(image=object()))
    assert image_only.target == "texts" and image_only.query_kind == "image" and image_only.words is None
    assert p.query_kind is None  # a combined query: no calibration applies
    words = q.plan(q.Query(text="kubernetes", mode="words"))
    assert words.parts == () and words.words == "kubernetes"
    assert q.plan(q.Query(text="x", mode="vector")).words is None


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (q.Query(), "nothing to search for"),
        (q.Query(text="   "), "empty"),
        (q.Query(text="a", mode="fuzzy"), "unknown mode"),
        (q.Query(text="a", fusion="max"), "unknown fusion"),
        (q.Query(text="a", combine="middle"), "unknown combination"),
        (q.Query(text="a", k=0), "k must be"),
        (q.Query(text="a", weights={"video": 1.0}), "unknown weight"),
        (q.Query(text="a", weights={"text": -1.0}), "weight of text"),
        (q.Query(text="a", weights={"text": float("nan")}), "weight of text"),
        (q.Query(text="a", weights={"text": 0.0}), "weight 0"),
        (q.Query(text="a", min_confidence=1.5), "min_confidence"),
        (q.Query(text="a", min_score=2.0), "min_score"),
        (q.Query(text="a", heard="b"), "not both"),
        (q.Query(image=object(), mode="words"), "words mode needs words"),
        (q.Query(text="a" * 1001), "longer than"),
        (q.Query(text="a", add=tuple("x" * 17)), "at most"),
    ],
)
def test_plan_refuses_bad_queries(query: q.Query, message: str) -> None:
    with pytest.raises(BadQueryError, match=message):
        q.plan(query)


def test_rrf_counts_ranks_and_signed_weights() -> None:
    fused = q.rrf([([1, 2, 3], 1.0), ([3, 1], 1.0), ([2], -1.0)], k=60)
    assert fused[1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[3] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[2] == pytest.approx(1 / 62 - 1 / 61)
    assert sorted(fused, key=lambda i: -fused[i]) == [1, 3, 2]


def test_weighted_fusion_normalises_each_list() -> None:
    fused = q.weighted({1: 0.30, 2: 0.20}, {2: 12.0, 3: 6.0}, share=0.5)
    # vector list scaled to 1 / 0, words list to 1 / 0: item 2 is second in one list and first in the other
    assert fused == pytest.approx({1: 0.5, 2: 0.5, 3: 0.0})
    assert q.weighted({1: 0.3}, {}, share=0.5) == pytest.approx({1: 0.5})


def test_combined_vector_is_the_normalised_signed_sum() -> None:
    a, b = np.eye(4, dtype=np.float32)[:2]
    v = q.combined_vector(np.stack([a * 3, b]), [1.0, -1.0])
    assert np.allclose(v, (a - b) / np.sqrt(2))
    with pytest.raises(BadQueryError, match="cancel out"):
        q.combined_vector(np.stack([a, a]), [1.0, -1.0])


# --- semantics on the demo model ---------------------------------------------------------------------------
RARE = {
    "kubernetes": "a slide about kubernetes",
    "zorblax": "zorblax brand sticker",
    "Quetzalcoatl": "Quetzalcoatl was drawn here",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[world.DemoFolder, Path, dict[str, Path]]:
    """A demo folder (no speech) whose three images got a caption line with a rare word."""
    root = tmp_path_factory.mktemp("query")
    folder = world.write_demo_folder(root, n_images=48, seed=5, speech=False)
    rng = random.Random(3)
    rare_files: dict[str, Path] = {}
    for word, line in RARE.items():
        im = rng.choice([i for i in folder.images if i.path not in rare_files.values()])
        with im.caption_path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
        rare_files[word] = im.path
    with mmsearch.Index.create(root / "index", model="demo") as idx:
        report = idx.add_folder(folder.media_dir)
    assert report.images_embedded == 48 and not report.skipped
    return folder, root / "index", rare_files


def test_rare_words_are_found_first_by_words_and_hybrid(demo) -> None:
    _, index, rare = demo
    with mmsearch.Index.open(index) as idx:
        for word, path in rare.items():
            for mode in ("hybrid", "words"):
                r = idx.search(word, mode=mode, k=5, min_confidence=0)
                assert r.hits[0].path == str(path), (word, mode, r.hits[:2])
                assert r.hits[0].matched in ("words", "both")
            # the caption itself, as a text hit
            r = idx.search(word, mode="words", target="captions", k=3)
            assert word.lower() in (r.hits[0].text or "").lower()


@pytest.mark.parametrize(("fusion", "combine"), [("rrf", "early"), ("weighted", "early"), ("rrf", "late")])
def test_every_hybrid_hit_shows_its_cosine_to_the_query(demo, fusion: str, combine: str) -> None:
    """Hits found by words alone get their cosine from the vectors the words search read with them, the
    others from FAISS (or, for late fusion, read as the hits are built): the same cosine either way."""
    from mmsearch.api import embed_parts

    _, index, _ = demo
    with mmsearch.Index.open(index) as idx:
        query = q.Query(
            text="zorblax red circle", add=("blue",), mode="hybrid", fusion=fusion, combine=combine, k=8
        )
        # Lists shorter than the collection, so that some hits are found by words alone.
        p = dataclasses.replace(q.plan(dataclasses.replace(query, min_confidence=0)), depth=6)
        model = idx.store.follow_active()
        vectors = embed_parts(p, idx.embedder_for(model))
        hits = q.execute(idx.store, p, vectors, model=model).hits
        wanted = q.combined_vector(vectors, [part.weight for part in p.parts])
        stored = idx.store.catalog.vectors_for([h.item_id for h in hits])
    assert len(hits) == 8 and {h.matched for h in hits} >= {"words", "vector"}
    for h in hits:
        assert h.score == pytest.approx(float(stored[h.item_id] @ wanted), abs=1e-3), h


def test_hybrid_keeps_meaning_for_ordinary_queries(demo) -> None:
    folder, index, _ = demo
    attrs = {str(im.path): im.attributes for im in folder.images}
    with mmsearch.Index.open(index) as idx:
        for mode in ("hybrid", "vector"):
            hits = idx.search("a red circle", mode=mode, k=3, min_confidence=0).hits
            assert world.matches({"colour": "red", "shape": "circle"}, attrs[hits[0].path]), mode
            assert all(h.score > -1 for h in hits)


def test_filters_are_applied_inside_the_search_and_still_fill_k(demo) -> None:
    folder, index, _ = demo
    photos = [im for im in folder.images if im.path.suffix == ".jpg"]
    assert len(photos) >= 10
    with mmsearch.Index.open(index) as idx:
        for opts in ({"ext": [".jpg"]}, {"path": [str(folder.media_dir / "photos" / "*")]}):
            r = idx.search("a red circle", k=10, mode="vector", min_confidence=0, **opts)
            assert len(r.hits) == 10, opts  # not the few jpgs among the unfiltered top 10
            assert all(h.path.endswith(".jpg") for h in r.hits)
        # a filter nothing passes: no hits, said honestly
        r = idx.search("a red circle", k=5, after="2999-01-01", min_confidence=0)
        assert r.hits == [] and r.no_match
        with pytest.raises(BadQueryError):
            idx.search("a red circle", kind=["video-game"])


def test_a_hybrid_query_with_a_path_filter_returns_k_allowed_items(demo) -> None:
    """The filter is inside both lists: words rank only the allowed files' texts and names, the vectors
    only the allowed images; a rare word's file inside the folder still comes first, one outside never
    shows."""
    folder, index, rare = demo
    (word, path), *others = rare.items()
    allowed = [im.path for im in folder.images if im.path.parent == path.parent]
    assert len(allowed) >= 5
    with mmsearch.Index.open(index) as idx:
        for mode in ("hybrid", "words"):
            r = idx.search(word, mode=mode, k=5, min_confidence=0, path=[str(path.parent / "*")])
            assert r.hits[0].path == str(path), (mode, r.hits[:2])
            assert all(Path(h.path).parent == path.parent for h in r.hits), mode
        r = idx.search("a red circle", mode="hybrid", k=5, min_confidence=0, path=[str(path.parent / "*")])
        assert len(r.hits) == 5 and all(Path(h.path).parent == path.parent for h in r.hits)
        for other, other_path in others:
            if other_path.parent != path.parent:
                r = idx.search(other, mode="hybrid", k=5, min_confidence=0, path=[str(path.parent / "*")])
                assert str(other_path) not in [h.path for h in r.hits]


def _red_circle_image() -> object:
    return world.render(world.Attributes("red", "circle", "large", 1, "white"), random.Random(99))


@pytest.mark.parametrize("combine", ["early", "late"])
def test_image_plus_blue_minus_red_finds_blue_circles(demo, combine: str) -> None:
    folder, index, _ = demo
    attrs = {str(im.path): im.attributes for im in folder.images}
    with mmsearch.Index.open(index) as idx:
        plain = idx.search(image=_red_circle_image(), target="images", k=1, min_confidence=0, mode="vector")
        assert attrs[plain.hits[0].path].colour == "red"
        edited = idx.search(
            image=_red_circle_image(),
            add=["blue"],
            subtract=["red"],
            target="images",
            k=3,
            min_confidence=0,
            mode="vector",
            combine=combine,
        )
    top = attrs[edited.hits[0].path]
    assert top.colour == "blue", (combine, top)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmsearch", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_cli_query_options(demo) -> None:
    _, index, rare = demo
    out = _cli("query", "zorblax", "--index", str(index), "--mode", "words", "--local", "--json")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["no_match"] is False and payload["hits"][0]["path"] == str(rare["zorblax"])
    assert payload["hits"][0]["matched"] == "words" and "confidence" in payload["hits"][0]
    out = _cli(
        "query",
        "a red circle",
        "--index",
        str(index),
        "--ext",
        "jpg",
        "--path",
        "photos/*",
        "--local",
        "--json",
        "-k",
        "4",
        "--min-confidence",
        "0",
    )
    assert out.returncode == 0, out.stderr
    assert [h["path"][-4:] for h in json.loads(out.stdout)["hits"]] == [".jpg"] * 4
    for bad, says in (
        (["--mode", "fuzzy"], "unknown mode"),
        (["--weight", "image"], "ROLE=NUMBER"),
        (["--after", "yesterday-ish"], "after"),
        (["--kind", "video-game"], "kind"),
    ):
        out = _cli("query", "a red circle", "--index", str(index), "--local", *bad)
        assert out.returncode != 0 and says in out.stderr and "Traceback" not in out.stderr, (bad, out.stderr)
