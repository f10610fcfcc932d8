"""Filtered vector search (``VectorIndex.search(..., allowed=ids)``) on real FAISS, against numpy brute force
over the allowed vectors, for every index type and both of its methods (selector scan, subset scoring)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from mmsearch import vectors
from mmsearch.vectors import VectorIndex
from tests.test_vectors import DIM, clustered, recall_at_10, unit

N = 5000
K = 10
IVF_SPECS = ("ivf-sq8", "compact", "ivf-pq")


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    """Clustered vectors under sparse ids far larger than N (so selectors use the hash set), and queries."""
    rng = np.random.default_rng(11)
    centres = unit(rng, 64)
    x = clustered(rng, N, centres)
    ids = np.sort(rng.choice(2**40, N, replace=False)).astype(np.int64)
    q = clustered(rng, 60, centres)
    return {"ids": ids, "x": x, "q": q}


@pytest.fixture(scope="module")
def indexes(data: dict[str, np.ndarray]) -> dict[str, VectorIndex]:
    return {spec: VectorIndex.build(DIM, data["ids"], data["x"], spec=spec) for spec in ("flat", *IVF_SPECS)}


def select(data: dict[str, np.ndarray], fraction: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(data["ids"], max(1, round(N * fraction)), replace=False))


def exact(data: dict[str, np.ndarray], allowed: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top k among the allowed vectors the data holds."""
    keep = np.isin(data["ids"], allowed)
    ids, x = data["ids"][keep], data["x"][keep]
    s = data["q"] @ x.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), ids[order]


def force(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Make an IVF index's filtered search use ``method``, whatever the selection's size."""
    cost = 0.0 if method == "subset" else float("inf")
    monkeypatch.setattr(vectors, "SUBSET_ROW_COST", dict.fromkeys(IVF_SPECS, cost))


@pytest.fixture(params=["selector", "subset"])
def method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    force(monkeypatch, request.param)
    return str(request.param)


@pytest.mark.parametrize("fraction", [0.5, 0.01, 0.001])
def test_flat_equals_exact_filtered_search(
    data: dict[str, np.ndarray], indexes: dict[str, VectorIndex], fraction: float
) -> None:
    allowed = select(data, fraction)
    scores, ids = indexes["flat"].search(data["q"], K, allowed=allowed)
    want_scores, want_ids = exact(data, allowed)
    n = min(K, len(allowed))
    np.testing.assert_allclose(scores[:, :n], want_scores[:, :n], rtol=0, atol=1e-5)
    assert [set(row) for row in ids[:, :n]] == [set(row) for row in want_ids[:, :n]]
    assert (ids[:, n:] == -1).all() and np.isneginf(scores[:, n:]).all()


@pytest.mark.parametrize("spec", ["ivf-sq8", "compact"])
@pytest.mark.parametrize("fraction", [0.5, 0.01])
def test_ivf_recall_against_exact_filtered_search(
    data: dict[str, np.ndarray], indexes: dict[str, VectorIndex], spec: str, fraction: float, method: str
) -> None:
    allowed = select(data, fraction)
    assert indexes[spec].filter_plan(len(allowed))["method"] == method
    _, ids = indexes[spec].search(data["q"], K, allowed=allowed)
    assert recall_at_10(ids, exact(data, allowed)[1]) >= 0.9


@pytest.mark.parametrize("fraction", [0.5, 0.01])
def test_ivf_pq_filtered_recall_is_its_unfiltered_recall(
    data: dict[str, np.ndarray], indexes: dict[str, VectorIndex], fraction: float, method: str
) -> None:
    """ivf-pq ranks by 4-dimension PQ codes without re-ranking, so even unfiltered it misses many exact
    neighbours; a filter must not make that worse."""
    index = indexes["ivf-pq"]
    unfiltered = recall_at_10(index.search(data["q"], K)[1], exact(data, data["ids"])[1])
    allowed = select(data, fraction)
    filtered = recall_at_10(index.search(data["q"], K, allowed=allowed)[1], exact(data, allowed)[1])
    assert filtered >= unfiltered - 0.05


@pytest.mark.parametrize("spec", ["flat", *IVF_SPECS])
def test_only_allowed_ids_and_k_hits_at_a_tenth_of_a_percent(
    data: dict[str, np.ndarray], indexes: dict[str, VectorIndex], spec: str, method: str
) -> None:
    allowed = select(data, 0.001)  # 5 ids: k hits for k <= 5, all 5 for larger k
    for k in (1, 5, K, 50):
        scores, ids = indexes[spec].search(data["q"], k, allowed=allowed)
        found = ids[ids >= 0]
        assert np.isin(found, allowed).all()
        assert ((ids >= 0).sum(axis=1) == min(k, len(allowed))).all()
        assert all(len(set(row[row >= 0])) == (row >= 0).sum() for row in ids)  # no id twice
        assert np.isfinite(scores[ids >= 0]).all() and np.isneginf(scores[ids < 0]).all()
        assert (np.diff(scores[:, : min(k, len(allowed))], axis=1) <= 1e-6).all()  # best first


@pytest.mark.parametrize("spec", ["flat", *IVF_SPECS])
def test_allowed_ids_the_index_does_not_hold_are_ignored(
    data: dict[str, np.ndarray], indexes: dict[str, VectorIndex], spec: str, method: str
) -> None:
    held = select(data, 0.004, seed=1)  # 20 ids
    absent = np.setdiff1d(np.arange(1, 2**40, 2**33, dtype=np.int64), data["ids"])[:500]
    allowed = np.union1d(held, absent)
    _, ids = indexes[spec].search(data["q"], K, allowed=allowed)
    assert np.isin(ids, held).all()
    assert recall_at_10(ids, exact(data, held)[1]) >= (1.0 if spec in ("flat", "compact") else 0.8)
    _, none = indexes[spec].search(data["q"], K, allowed=absent)
    assert (none == -1).all()


@pytest.mark.parametrize("spec", ["flat", *IVF_SPECS])
def test_empty_selection_returns_no_hits(
    data: dict[str, np.ndarray], indexes: dict[str, VectorIndex], spec: str
) -> None:
    scores, ids = indexes[spec].search(data["q"][:3], K, allowed=np.empty(0, np.int64))
    assert ids.shape == (3, K) and (ids == -1).all() and np.isneginf(scores).all()


@pytest.mark.parametrize("spec", ["flat", "ivf-sq8", "compact"])
def test_bitmap_and_hash_set_selectors_agree_for_ids_beyond_ntotal(spec: str) -> None:
    """Dense ids (bitmap) and the same selection plus one huge id (hash set) give the same hits; every
    id is larger than the index's size."""
    rng = np.random.default_rng(5)
    x = clustered(rng, 3000, unit(rng, 32))
    ids = 3 * np.arange(3000, dtype=np.int64) + 20_000
    index = VectorIndex.build(DIM, ids, x, spec=spec)
    q = clustered(rng, 20, unit(rng, 32))
    allowed = ids[rng.random(3000) < 0.3]
    assert vectors._Selection(allowed).kind == "bitmap"
    sparse = np.append(allowed, 2**50)
    assert vectors._Selection(sparse).kind == "batch"
    dense_hits = index.search(q, K, allowed=allowed)
    sparse_hits = index.search(q, K, allowed=sparse)
    np.testing.assert_array_equal(dense_hits[1], sparse_hits[1])
    assert np.isin(dense_hits[1], allowed).all()


def test_a_read_only_selection_is_reused_and_a_writable_one_is_not(
    data: dict[str, np.ndarray], indexes: dict[str, VectorIndex]
) -> None:
    index = indexes["flat"]
    frozen = select(data, 0.05)
    frozen.setflags(write=False)
    first = index.search(data["q"], K, allowed=frozen)[1]
    assert vectors._last_selection is not None and vectors._last_selection[0] is frozen
    np.testing.assert_array_equal(index.search(data["q"], K, allowed=frozen)[1], first)
    writable = select(data, 0.05)
    before = index.search(data["q"], K, allowed=writable)[1]
    writable[:] = select(data, 0.05, seed=9)  # changed in place: the new ids count
    after = index.search(data["q"], K, allowed=writable)[1]
    assert np.isin(after, writable).all() and not np.array_equal(before, after)


def test_negative_ids_are_refused(indexes: dict[str, VectorIndex], data: dict[str, np.ndarray]) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        indexes["flat"].search(data["q"], K, allowed=np.array([-1, 5], np.int64))


@pytest.mark.parametrize("spec", IVF_SPECS)
def test_filtered_search_follows_add_and_remove_and_survives_save(
    spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subset method's own bookkeeping (held ids, the direct map, compact's removed rows) follows
    add/remove, both methods see the change, and a saved file holds no direct map."""
    rng = np.random.default_rng(3)
    centres = unit(rng, 32)
    x = clustered(rng, 2000, centres)
    ids = np.arange(10, 2010, dtype=np.int64)
    index = VectorIndex.build(DIM, ids, x, spec=spec)
    allowed = ids[::25]  # 80 ids
    force(monkeypatch, "subset")
    assert np.isin(index.search(x[:5], K, allowed=allowed)[1], allowed).all()  # bookkeeping made here

    gone = allowed[:40]
    assert index.remove(gone) == 40
    new_ids = np.array([5000, 5001, 2020], dtype=np.int64)
    index.add(new_ids, x[:3])  # the vectors of ids 10..12 (10 is gone, 11 and 12 are not allowed)
    allowed = np.union1d(allowed, new_ids)

    def check(idx: VectorIndex) -> None:
        for method in ("subset", "selector"):
            force(monkeypatch, method)
            _, found = idx.search(x[:3], K, allowed=allowed)
            assert not np.isin(found, gone).any() and np.isin(found, allowed).all()
            assert ((found >= 0).sum(axis=1) == K).all()
            for row, new_id in zip(found, new_ids, strict=True):
                assert new_id in row[:2]

    check(index)
    sha, n = index.save(tmp_path / "v.faiss")
    loaded = VectorIndex.load(tmp_path / "v.faiss", sha256=sha, ntotal=n, dim=DIM)
    assert loaded is not None
    if spec != "compact":  # decoded through the direct map, kept in RAM but not written
        assert index._index.direct_map.type == faiss.DirectMap.Hashtable
        assert loaded._index.direct_map.type == faiss.DirectMap.NoMap
    check(index)
    check(loaded)


def test_a_query_batch_matches_single_queries(
    data: dict[str, np.ndarray], indexes: dict[str, VectorIndex]
) -> None:
    allowed = select(data, 0.05)
    for spec in ("flat", "ivf-sq8", "compact"):
        index = indexes[spec]
        batch = index.search(data["q"][:5], K, allowed=allowed)[1]
        single = np.vstack([index.search(qv[None], K, allowed=allowed)[1] for qv in data["q"][:5]])
        np.testing.assert_array_equal(batch, single)


@pytest.mark.parametrize("spec", ["ivf-sq8", "ivf-pq"])
def test_decoded_subset_is_reused_until_the_index_changes(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The subset method keeps the decoded vectors of a read-only selection: the same answers from them,
    and a removed id never comes back from them after remove (nor is an added one missed after add)."""
    rng = np.random.default_rng(5)
    centres = unit(rng, 32)
    x = clustered(rng, 2000, centres)
    ids = np.arange(10, 2010, dtype=np.int64)
    index = VectorIndex.build(DIM, ids, x, spec=spec)
    force(monkeypatch, "subset")
    allowed = ids[::20].copy()
    allowed.setflags(write=False)
    first = index.search(x[:5], K, allowed=allowed)
    cached = index._subset_cache
    assert cached is not None and cached[0] is allowed
    again = index.search(x[:5], K, allowed=allowed)
    assert index._subset_cache is cached
    np.testing.assert_array_equal(again[1], first[1])
    np.testing.assert_array_equal(again[0], first[0])

    top = first[1][:, 0]
    assert index.remove(top) == len(np.unique(top))
    after = index.search(x[:5], K, allowed=allowed)[1]
    assert not np.isin(after, top).any() and np.isin(after, allowed).all()
    index.add(top[:1], x[top[0] - 10][None])  # back, with its vector
    assert top[0] in index.search(x[:1], K, allowed=allowed)[1][0]

    writable = ids[::20].copy()
    index.search(x[:1], K, allowed=writable)
    assert index._subset_cache is None or index._subset_cache[0] is not writable


@pytest.mark.parametrize("spec", ["ivf-sq8", "compact"])
def test_a_contiguous_range_queried_from_other_clusters(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder's files: ids in cluster order, a contiguous range of them is a few whole clusters. Queries
    from the other clusters are far from every list holding allowed ids; recall@10 against exact filtered
    search must still hold, with k hits, and only lists holding allowed ids are probed."""
    rng = np.random.default_rng(21)
    centres = unit(rng, 40)
    labels = np.sort(rng.integers(0, len(centres), 8000))
    noise = rng.standard_normal((8000, DIM), dtype=np.float32) / np.sqrt(DIM)
    x = centres[labels] + noise
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(8000, dtype=np.int64)
    index = VectorIndex.build(DIM, ids, x, spec=spec)
    force(monkeypatch, "selector")
    inside = labels < 4  # clusters 0-3: about a tenth of the index
    allowed = ids[inside]
    q = clustered(rng, 60, centres[10:])  # from clusters holding no allowed id
    _, found = index.search(q, K, allowed=allowed)
    s = q @ x[inside].T
    truth = allowed[np.argsort(-s, axis=1, kind="stable")[:, :K]]
    assert np.isin(found, allowed).all() and (found >= 0).all()
    assert recall_at_10(found, truth) >= 0.95

    selection = vectors._Selection(allowed)
    lists, counts = index._allowed_lists(selection)
    assign = index._probe(q, K, selection, index.filter_plan(len(allowed)))[0]
    assert np.isin(assign[assign >= 0], lists).all()
    assert counts.sum() == len(allowed)


@pytest.mark.parametrize("spec", IVF_SPECS)
def test_the_far_budget_shrinks_with_the_selection(
    indexes: dict[str, VectorIndex], spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FAR_BUDGET from FAR_BUDGET_SELECTIVITY of the index up; below, (s / that)^FAR_BUDGET_EXPONENT of it
    (about half at a tenth of the size), never below the near budget."""
    force(monkeypatch, "selector")
    index = indexes[spec]
    per_probe = index.params["nprobe"] * index.ntotal / int(index.params["nlist"])

    def far(fraction: float) -> int:
        return int(index.filter_plan(round(index.ntotal * fraction))["far_budget"])

    full = int(vectors.FAR_BUDGET * per_probe)
    assert far(1.0) == far(0.8) == far(vectors.FAR_BUDGET_SELECTIVITY) == full
    tenth = vectors.FAR_BUDGET * (0.1**vectors.FAR_BUDGET_EXPONENT) * per_probe
    assert abs(far(vectors.FAR_BUDGET_SELECTIVITY / 10) - tenth) <= 1 and tenth < 0.55 * full
    fars = [far(f) for f in (0.001, 0.01, 0.05, 0.1, 0.2, 0.5)]
    assert fars == sorted(fars)
    assert far(1 / index.ntotal) >= index.filter_plan(1)["budget"]  # never below the near budget


@pytest.mark.parametrize("spec", ["ivf-sq8", "compact"])
def test_a_far_query_on_a_small_selection_probes_its_far_budget(
    spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queries far from a small contiguous range probe the nearest lists holding allowed ids until they
    hold the (smaller) far budget, not all of them, and still get k allowed hits."""
    rng = np.random.default_rng(21)
    centres = unit(rng, 40)
    labels = np.sort(rng.integers(0, len(centres), 8000))
    x = centres[labels] + rng.standard_normal((8000, DIM), dtype=np.float32) / np.sqrt(DIM)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(8000, dtype=np.int64)
    index = VectorIndex.build(DIM, ids, x, spec=spec)
    force(monkeypatch, "selector")
    # At this size any far budget covers a whole 10 % range; a smaller FAR_BUDGET makes it bind.
    monkeypatch.setattr(vectors, "FAR_BUDGET", 2.0)
    allowed = ids[labels < 4]
    plan = index.filter_plan(len(allowed))
    assert plan["budget"] <= plan["far_budget"] < index.filter_plan(len(ids) // 2)["far_budget"]
    assert plan["far_budget"] < len(allowed)
    q = clustered(rng, 60, centres[10:])  # from clusters holding no allowed id
    selection = vectors._Selection(allowed)
    lists, counts = index._allowed_lists(selection)
    scores = index._centroid_scores(q)
    far = scores[:, lists].max(axis=1) < vectors.FAR_SCORE_RATIO * scores.max(axis=1)
    assert far.mean() > 0.9
    assign = index._probe(q, K, selection, plan)[0]
    held = {int(lst): int(c) for lst, c in zip(lists, counts, strict=True)}
    for row in assign[far]:
        probed = [held[int(lst)] for lst in row[row >= 0]]
        assert sum(probed) >= plan["far_budget"] > sum(probed[:-1])  # stops at the far budget
        assert len(probed) < len(lists)
    _, found = index.search(q, K, allowed=allowed)
    assert np.isin(found, allowed).all() and (found >= 0).all()


@pytest.mark.parametrize("spec", IVF_SPECS)
def test_allowed_counts_per_list_follow_add_and_remove(spec: str) -> None:
    rng = np.random.default_rng(8)
    x = clustered(rng, 3000, unit(rng, 32))
    ids = np.arange(3000, dtype=np.int64) * 7
    index = VectorIndex.build(DIM, ids, x, spec=spec)
    allowed = ids[::3].copy()
    allowed.setflags(write=False)
    selection = vectors._selection(allowed)

    def check(expected_total: int) -> None:
        lists, counts = index._allowed_lists(selection)
        assert (counts > 0).all() and counts.sum() == expected_total
        held = set(index.ids().tolist()) & set(allowed.tolist())
        assert len(held) == expected_total

    check(1000)
    index.remove(allowed[:10])
    check(990)
    index.add(allowed[:4], x[:4])
    check(994)
