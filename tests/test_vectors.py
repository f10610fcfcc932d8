"""Tests of the FAISS layer (mmsearch.vectors) against numpy brute force, on real FAISS."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmsearch import vectors
from mmsearch.identity import sha256_file
from mmsearch.vectors import FLAT_MAX, VectorIndex, choose_spec, needs_rebuild

DIM = 128


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray, spread: float = 1.0) -> np.ndarray:
    """Unit vectors from a mixture of Gaussians around ``centres`` (the benchmark's distribution)."""
    x = centres[rng.integers(0, len(centres), n)]
    x = x + rng.standard_normal((n, centres.shape[1]), dtype=np.float32) * (
        spread / np.sqrt(centres.shape[1])
    )
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(ids: np.ndarray, x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ x.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), ids[order]


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10]) & set(t[:10])) / 10 for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def ann_data() -> dict[str, np.ndarray]:
    """8,000 clustered vectors with sparse, large ids, and 200 held-out queries from the same mixture."""
    rng = np.random.default_rng(7)
    centres = unit(rng, 64)
    x = clustered(rng, 8000, centres)
    ids = np.sort(rng.choice(2**40, 8000, replace=False)).astype(np.int64)
    rng.shuffle(ids)
    q = clustered(rng, 200, centres)
    _, truth = brute_force(ids, x, q, 10)
    return {"ids": ids, "x": x, "q": q, "truth": truth, "centres": centres}


@pytest.fixture(scope="module")
def ivf_index(ann_data: dict[str, np.ndarray]) -> VectorIndex:
    return VectorIndex.build(DIM, ann_data["ids"], ann_data["x"], spec="ivf-sq8")


@pytest.fixture(scope="module")
def compact_index(ann_data: dict[str, np.ndarray]) -> VectorIndex:
    return VectorIndex.build(DIM, ann_data["ids"], ann_data["x"], spec="compact")


# ---------------------------------------------------------------------- exact search, ids, updates


def test_flat_matches_brute_force_and_keeps_ids() -> None:
    rng = np.random.default_rng(0)
    x = unit(rng, 500)
    ids = rng.choice(2**50, 500, replace=False).astype(np.int64)  # ids beyond 32 bits survive
    index = VectorIndex.build(DIM, ids, x)
    assert index.describe()["type"] == "flat" and index.ntotal == 500
    assert sorted(index.ids().tolist()) == sorted(ids.tolist())
    q = unit(rng, 20)
    scores, found = index.search(q, 10)
    want_scores, want_ids = brute_force(ids, x, q, 10)
    assert found.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_add_remove_search_against_brute_force() -> None:
    rng = np.random.default_rng(1)
    x = unit(rng, 300)
    ids = np.arange(1000, 1300, dtype=np.int64)
    index = VectorIndex.build(DIM, ids, x)
    new_x = unit(rng, 50)
    new_ids = np.arange(5000, 5050, dtype=np.int64)
    index.add(new_ids, new_x)
    gone = ids[::3]
    assert index.remove(np.concatenate([gone, [999_999]])) == len(gone)  # absent ids are ignored
    assert index.remove(gone) == 0
    live = np.concatenate([ids, new_ids])
    live_x = np.concatenate([x, new_x])
    keep = ~np.isin(live, gone)
    assert sorted(index.ids().tolist()) == sorted(live[keep].tolist())
    q = unit(rng, 10)
    _, found = index.search(q, 15)
    _, want = brute_force(live[keep], live_x[keep], q, 15)
    np.testing.assert_array_equal(found, want)
    with pytest.raises(ValueError, match="duplicate"):
        index.add(new_ids[:1], new_x[:1])


def test_k_larger_than_ntotal_pads_with_minus_one() -> None:
    rng = np.random.default_rng(2)
    index = VectorIndex.build(DIM, np.array([3, 4, 5]), unit(rng, 3))
    scores, found = index.search(unit(rng, 2), 6)
    assert found.shape == (2, 6)
    assert (found[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert set(found[0, :3].tolist()) == {3, 4, 5}
    empty = VectorIndex.build(DIM, np.empty(0, np.int64), np.empty((0, DIM), np.float32))
    assert empty.ntotal == 0 and (empty.search(unit(rng, 1), 3)[1] == -1).all()


def test_bad_input_is_rejected() -> None:
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError):
        VectorIndex.build(DIM, np.array([1, 1]), unit(rng, 2))
    with pytest.raises(ValueError):
        VectorIndex.build(DIM, np.array([1, 2]), unit(rng, 2, dim=DIM + 1))
    with pytest.raises(ValueError):
        VectorIndex.build(DIM, np.array([1, 2]), unit(rng, 2), spec="HNSW32")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 60)), min_size=1, max_size=30))
def test_flat_updates_follow_a_model(ops: list[tuple[bool, int]]) -> None:
    """Any sequence of adds and removes leaves exactly the model's ids, and search agrees with numpy."""
    rng = np.random.default_rng(4)
    table = unit(rng, 61)  # id i always carries vector table[i]
    index = VectorIndex.build(DIM, np.empty(0, np.int64), np.empty((0, DIM), np.float32))
    model: set[int] = set()
    for is_add, i in ops:
        if is_add and i not in model:
            index.add(np.array([i]), table[i : i + 1])
            model.add(i)
        elif not is_add:
            assert index.remove(np.array([i])) == (1 if i in model else 0)
            model.discard(i)
    assert sorted(index.ids().tolist()) == sorted(model)
    if model:
        live = np.array(sorted(model))
        _, found = index.search(table[:3], 5)
        _, want = brute_force(live, table[live], table[:3], min(5, len(live)))
        np.testing.assert_array_equal(found[:, : want.shape[1]], want)


# ---------------------------------------------------------------------- index choice and recall


def test_spec_follows_collection_size() -> None:
    assert choose_spec(1000) == "flat"
    assert choose_spec(FLAT_MAX) == "flat"
    assert choose_spec(FLAT_MAX + 1) == "ivf-sq8"
    rng = np.random.default_rng(5)
    small = VectorIndex.build(DIM, np.arange(100), unit(rng, 100))
    assert not needs_rebuild(small, 1000)
    assert needs_rebuild(small, FLAT_MAX + 1)
    # An IVF chosen by size goes back to exact search only well below the threshold (hysteresis).
    grown = VectorIndex.build(DIM, np.arange(3000), unit(rng, 3000), spec="ivf-sq8")
    grown.forced_spec, grown.trained_n = None, FLAT_MAX + 10_000  # as if chosen for a larger collection
    assert not needs_rebuild(grown, vectors.FLAT_MIN_FOR_IVF)
    assert needs_rebuild(grown, vectors.FLAT_MIN_FOR_IVF - 1)
    # Too few vectors to train an IVF: a forced ANN spec falls back to exact search, and asks for a
    # rebuild once the collection is large enough.
    tiny = VectorIndex.build(DIM, np.arange(500), unit(rng, 500), spec="compact")
    assert tiny.describe()["type"] == "flat" and tiny.forced_spec == "compact"
    assert not needs_rebuild(tiny, 999)
    assert needs_rebuild(tiny, vectors.MIN_TRAIN["compact"])


def test_ivf_sq8_recall_and_regrowth(ivf_index: VectorIndex, ann_data: dict[str, np.ndarray]) -> None:
    d = ivf_index.describe()
    assert d["type"] == "ivf-sq8" and d["nprobe"] < d["nlist"]  # tuned, not a full scan
    _, found = ivf_index.search(ann_data["q"], 10)
    assert recall_at_10(found, ann_data["truth"]) >= 0.95
    assert not needs_rebuild(ivf_index, 8000)
    assert needs_rebuild(ivf_index, 8000 * 3)  # grew past REGROW_FACTOR × its training size
    assert not needs_rebuild(ivf_index, 100)  # a forced type is kept when the collection shrinks


def test_compact_recall_and_memory(compact_index: VectorIndex, ann_data: dict[str, np.ndarray]) -> None:
    d = compact_index.describe()
    assert d["type"] == "compact" and d["shortlist"] >= 10
    _, found = compact_index.search(ann_data["q"], 10)
    assert recall_at_10(found, ann_data["truth"]) >= 0.95
    # In RAM: the PQ code and two 8-byte ids (FAISS's and the exact store's) per vector.
    assert compact_index._index.code_size == DIM // vectors.COMPACT_DIMS_PER_BYTE
    assert compact_index._index.code_size + 16 < DIM * 4 // 4
    pq_only = VectorIndex.build(DIM, ann_data["ids"][:3000], ann_data["x"][:3000], spec="ivf-pq")
    assert pq_only.describe()["type"] == "ivf-pq"


# ---------------------------------------------------------------------- persistence


@pytest.mark.parametrize("spec", ["flat", "ivf-sq8", "compact"])
def test_save_load_round_trip(
    spec: str, tmp_path: Path, ann_data: dict[str, np.ndarray], request: pytest.FixtureRequest
) -> None:
    if spec == "flat":
        index = VectorIndex.build(DIM, ann_data["ids"][:2000], ann_data["x"][:2000])
    else:
        index = request.getfixturevalue("ivf_index" if spec == "ivf-sq8" else "compact_index")
    before = index.search(ann_data["q"], 10)
    path = tmp_path / f"{spec}.faiss"
    sha, n = index.save(path)
    assert n == index.ntotal and len(sha) == 64
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    loaded = VectorIndex.load(path, sha256=sha, ntotal=n, dim=DIM)
    assert loaded is not None
    assert loaded.describe() == index.describe()
    after = loaded.search(ann_data["q"], 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)
    assert sorted(loaded.ids().tolist()) == sorted(index.ids().tolist())


def test_compact_updates_survive_save_and_load(tmp_path: Path, ann_data: dict[str, np.ndarray]) -> None:
    """Rows added after a load (kept in RAM) and rows removed are merged into the next file."""
    ids, x = ann_data["ids"][:3000], ann_data["x"][:3000]
    index = VectorIndex.build(DIM, ids, x, spec="compact")
    path = tmp_path / "c.faiss"
    sha, n = index.save(path)
    index = VectorIndex.load(path, sha256=sha, ntotal=n, dim=DIM)
    assert index is not None
    rng = np.random.default_rng(8)
    new_ids = np.arange(1, 201, dtype=np.int64)  # smaller than every existing id: tests the id order
    new_x = clustered(rng, 200, ann_data["centres"])
    index.add(new_ids, new_x)
    assert index.remove(ids[:500]) == 500
    live_ids = np.concatenate([ids[500:], new_ids])
    live_x = np.concatenate([x[500:], new_x])
    for probe in (index, None):
        if probe is None:
            sha, n = index.save(path)
            probe = VectorIndex.load(path, sha256=sha, ntotal=n, dim=DIM)
            assert probe is not None and n == len(live_ids)
        # Query with stored vectors: each must come back first with its exact score.
        q_rows = np.r_[0:5, len(live_ids) - 5 : len(live_ids)]
        scores, found = probe.search(live_x[q_rows], 10)
        np.testing.assert_array_equal(found[:, 0], live_ids[q_rows])
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
        _, truth = brute_force(live_ids, live_x, ann_data["q"], 10)
        assert recall_at_10(probe.search(ann_data["q"], 10)[1], truth) >= 0.95


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, str, int, VectorIndex]:
    rng = np.random.default_rng(9)
    index = VectorIndex.build(DIM, np.arange(10, 410), unit(rng, 400))
    path = tmp_path / "image.faiss"
    sha, n = index.save(path)
    return path, sha, n, index


def test_load_rejects_missing_truncated_corrupt_and_stale(saved: tuple[Path, str, int, VectorIndex]) -> None:
    path, sha, n, _ = saved
    assert VectorIndex.load(path, sha256=sha, ntotal=n, dim=DIM) is not None
    assert VectorIndex.load(path, sha256=sha, ntotal=n + 1, dim=DIM) is None  # wrong ntotal
    assert VectorIndex.load(path, sha256=sha, ntotal=n, dim=DIM + 1) is None  # wrong dim
    assert VectorIndex.load(path, sha256="0" * 64, ntotal=n, dim=DIM) is None  # stale: another file
    assert VectorIndex.load(path.with_name("nope.faiss"), sha256=sha, ntotal=n, dim=DIM) is None
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(flipped))
    assert VectorIndex.load(path, sha256=sha, ntotal=n, dim=DIM) is None
    path.write_bytes(data[: len(data) // 3])
    assert VectorIndex.load(path, sha256=sha, ntotal=n, dim=DIM) is None


def _prefetched(path: Path) -> None:
    """Hash ``path`` ahead (as a cold query does) and wait for the digest."""
    vectors.prefetch_digests([path])
    with vectors._digests_lock:
        pending = [d for (p, _), d in vectors._digests.items() if p == str(path)]
    assert len(pending) == 1
    pending[0].result(timeout=30)


@pytest.mark.parametrize("change", ["in-place", "in-place, mtime restored", "replaced", "truncated"])
def test_a_file_changed_after_its_digest_was_prefetched_is_hashed_again(
    saved: tuple[Path, str, int, VectorIndex], change: str
) -> None:
    """A digest computed ahead is used only for the very file it hashed: any write since (ctime moves even
    when size and mtime are put back) or another file renamed over it makes the load hash it again, so a
    corrupt file is still refused."""
    path, sha, n, _ = saved
    _prefetched(path)
    assert VectorIndex.load(path, sha256=sha, ntotal=n, dim=DIM) is not None  # the digest taken
    assert not vectors._digests
    _prefetched(path)
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    st = path.stat()
    if change.startswith("in-place"):
        with open(path, "r+b") as f:
            f.write(bytes(flipped))
        if "restored" in change:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    elif change == "replaced":
        other = path.with_name("other.faiss")
        other.write_bytes(bytes(flipped))
        os.replace(other, path)
    else:
        with open(path, "r+b") as f:
            f.truncate(len(data) // 2)
    assert VectorIndex.load(path, sha256=sha, ntotal=n, dim=DIM) is None
    assert not vectors._digests  # the stale digest dropped
    path.write_bytes(data)  # the original bytes, written again: a new identity, hashed and accepted
    assert VectorIndex.load(path, sha256=sha, ntotal=n, dim=DIM) is not None


def test_a_prefetched_digest_of_a_corrupt_file_is_refused(saved: tuple[Path, str, int, VectorIndex]) -> None:
    path, sha, n, _ = saved
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    _prefetched(path)
    assert VectorIndex.load(path, sha256=sha, ntotal=n, dim=DIM) is None
    vectors.prefetch_digests([path.with_name("missing.faiss")])  # nothing to hash: nothing started
    assert not vectors._digests


@pytest.mark.parametrize("cut", [0, 100, -30, -5])
def test_load_never_raises_for_a_bad_file_with_a_matching_checksum(tmp_path: Path, cut: int) -> None:
    """Even when the recorded checksum matches (it was recorded for a bad file), load returns None."""
    rng = np.random.default_rng(10)
    good = tmp_path / "good.faiss"
    VectorIndex.build(DIM, np.arange(50), unit(rng, 50)).save(good)
    data = good.read_bytes()
    bad = data[:cut] if cut > 0 else (data[:cut] + data[cut + 1 :] if cut else b"")
    path = tmp_path / "bad.faiss"
    path.write_bytes(bad)
    assert VectorIndex.load(path, sha256=sha256_file(path), ntotal=50, dim=DIM) is None


@pytest.mark.parametrize("where", ["replace", "write"])
def test_failed_save_keeps_previous_file(
    saved: tuple[Path, str, int, VectorIndex], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    path, sha, n, index = saved
    rng = np.random.default_rng(11)
    index.add(np.arange(1000, 1100), unit(rng, 100))

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "replace":
        monkeypatch.setattr(vectors.os, "replace", disk_full)
    else:  # fail after part of the file was written
        real_write = vectors._HashingWriter.write

        def write(self: vectors._HashingWriter, data: bytes) -> None:
            if self.size > 10_000:
                disk_full()
            real_write(self, data)

        monkeypatch.setattr(vectors._HashingWriter, "write", write)
    with pytest.raises(OSError) as info:
        index.save(path)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # temp file removed
    old = VectorIndex.load(path, sha256=sha, ntotal=n, dim=DIM)
    assert old is not None and old.ntotal == 400
    # After space is freed the same save succeeds.
    sha2, n2 = index.save(path)
    assert n2 == 500 and VectorIndex.load(path, sha256=sha2, ntotal=n2, dim=DIM) is not None


def test_stale_temp_files_of_dead_writers_are_removed(saved: tuple[Path, str, int, VectorIndex]) -> None:
    path, _, _, index = saved
    dead_pid = 2**22 + 12345  # above the default pid_max on Linux: never alive
    stale = path.parent / f".{path.name}.tmp-{dead_pid}-abc"
    stale.write_bytes(b"half a file")
    live = path.parent / f".{path.name}.tmp-1-abc"  # pid 1 is always alive: another writer's file
    live.write_bytes(b"in progress")
    index.save(path)
    assert not stale.exists() and live.exists()
