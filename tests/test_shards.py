"""Sharded search on a real Ray cluster of two nodes on this machine (loopback only), real FAISS, real SQLite:
it must return what one index returns over the same vectors (exact shards), follow the catalog as a local
reader does, and keep the recall of ANN shards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

import mmsearch
from mmsearch import db, ray_cluster
from mmsearch.demo import world
from mmsearch.shards import ShardedVectors, ShardSet, merge_topk
from mmsearch.store import Store
from mmsearch.vectors import VectorIndex
from tests.test_store_hardening import delete_images

pytest.importorskip("ray")

DIM = 32


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with ray_cluster.local_cluster(nodes=2, cpus_per_node=1) as c:
        yield c


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)


def test_merge_breaks_ties_by_id_and_puts_missing_slots_last() -> None:
    scores = [np.array([[0.9, 0.5, -np.inf]], np.float32), np.array([[0.9, 0.7, 0.1]], np.float32)]
    ids = [np.array([[8, 3, -1]]), np.array([[5, 4, 2]])]
    s, i = merge_topk(scores, ids, 4)
    assert i.tolist() == [[5, 8, 4, 3]]
    assert s[0].tolist() == pytest.approx([0.9, 0.9, 0.7, 0.5])
    s, i = merge_topk([np.full((1, 2), -np.inf, np.float32)], [np.full((1, 2), -1)], 3)
    assert i.tolist() == [[-1, -1, -1]] and np.isneginf(s).all()


@pytest.mark.slow  # a Ray cluster of two raylets
def test_flat_shards_equal_one_index(cluster: Any) -> None:
    rng = np.random.default_rng(1)
    n = 3000
    ids = np.sort(rng.choice(10 * n, n, replace=False)).astype(np.int64)  # gaps, as after deletions
    vecs = unit(rng, n)
    single = VectorIndex.build(DIM, ids, vecs)
    sharded = ShardedVectors.build(DIM, ids, vecs, shards=3)
    try:
        assert sharded.ntotal == n and sorted(sharded.ids().tolist()) == ids.tolist()
        shards = sharded.describe()
        assert [s["type"] for s in shards] == ["flat"] * 3
        assert sum(s["ntotal"] for s in shards) == n
        assert len({s["node_id"] for s in shards}) == 2  # one shard per node, round robin
        queries = unit(rng, 25)
        for k in (1, 10, 60):
            assert_same(sharded.search(queries, k), single.search(queries, k))
            assert_same(sharded.search(queries[0], k), single.search(queries[:1], k))
        wide = np.sort(rng.choice(ids, n // 10, replace=False))
        narrow = np.sort(rng.choice(ids, 4, replace=False))  # fewer than k: padded with -1
        unknown = np.array([1, 2, 3, 10 * n + 7], np.int64)  # mostly ids no shard holds
        for allowed in (wide, narrow, unknown, np.empty(0, np.int64)):
            got = sharded.search(queries, 10, allowed=allowed)
            assert_same(got, single.search(queries, 10, allowed=allowed))
            assert set(got[1][got[1] >= 0].tolist()) <= set(allowed.tolist())
        wide.setflags(write=False)  # a caller's cached filter: split and shipped once
        assert_same(sharded.search(queries, 10, allowed=wide), single.search(queries, 10, allowed=wide))
        assert_same(sharded.search(queries, 10, allowed=wide), single.search(queries, 10, allowed=wide))
        with pytest.raises(ValueError):
            sharded.search(unit(rng, 2, DIM + 1), 10)
    finally:
        sharded.close()


@pytest.mark.slow  # a Ray cluster of two raylets
def test_more_shards_than_vectors(cluster: Any) -> None:
    rng = np.random.default_rng(2)
    ids = np.array([4, 9], np.int64)
    vecs = unit(rng, 2)
    sharded = ShardedVectors.build(DIM, ids, vecs, shards=4)  # two shards empty
    try:
        q = unit(rng, 3)
        assert_same(sharded.search(q, 5), VectorIndex.build(DIM, ids, vecs).search(q, 5))
        empty = ShardedVectors.build(DIM, np.empty(0, np.int64), np.empty((0, DIM), np.float32), shards=2)
        s, i = empty.search(q, 3)
        assert empty.ntotal == 0 and (i == -1).all() and np.isneginf(s).all()
        empty.close()
    finally:
        sharded.close()


@pytest.mark.slow  # a Ray cluster of two raylets
def test_a_dead_shard_is_a_clear_error(cluster: Any) -> None:
    rng = np.random.default_rng(6)
    sharded = ShardedVectors.build(DIM, np.arange(1, 101), unit(rng, 100), shards=2)
    try:
        ray_cluster.ray_module().kill(sharded._actors[1])  # as when its node goes away
        with pytest.raises(mmsearch.MmsearchError, match="shard .* unavailable"):
            sharded.search(unit(rng, 1), 5)
    finally:
        sharded.close()


@pytest.mark.slow  # a Ray cluster of two raylets
def test_a_dead_shard_is_replaced_and_rebuilt_by_its_recover_hook(cluster: Any) -> None:
    rng = np.random.default_rng(7)
    ids, vecs = np.arange(1, 301), unit(rng, 300)
    sharded = ShardedVectors.build(DIM, ids, vecs, shards=2)
    rebuilt: list[list[int]] = []

    def recover(dead: list[int]) -> None:
        rebuilt.append(dead)
        sharded.build_shards(dead, ids, vecs)

    sharded.recover = recover
    try:
        queries = unit(rng, 4)
        want = sharded.search(queries, 10)
        old = sharded._actors[0]
        ray_cluster.ray_module().kill(old)  # no restart by Ray: the actor is gone for good
        assert_same(sharded.search(queries, 10), want)
        assert rebuilt == [[0]] and sharded._actors[0] is not old and sharded.ntotal == 300
        assert sorted(sharded.ids().tolist()) == ids.tolist()
    finally:
        sharded.close()


@pytest.mark.slow  # a Ray cluster of two raylets
def test_a_sharded_reader_rebuilds_dead_shards_from_the_catalog(cluster: Any, tmp_path: Path) -> None:
    """A shard actor that dies is replaced and rebuilt from the catalog, whether a search finds it dead or
    the catch-up after a writer's change does: the reader keeps answering what a local reader answers."""
    rng = np.random.default_rng(8)
    writer = Store.create(tmp_path / "idx", {"model": {"name": "fake", "dim": DIM}})
    writer.lock_for_writing()
    add_images(writer, unit(rng, 300), rng)
    writer.save_vectors()
    local, sharded = Store.open(tmp_path / "idx"), Store.open(tmp_path / "idx")
    sharded.use_shards(ShardSet(3))
    ray = ray_cluster.ray_module()
    try:
        queries = unit(rng, 6)

        def check() -> None:
            local.refresh()
            sharded.refresh()
            index = sharded.vectors("image")
            assert isinstance(index, ShardedVectors)
            assert_same(index.search(queries, 12), local.vectors("image").search(queries, 12))
            assert sorted(index.ids().tolist()) == catalog_ids(writer)

        check()
        index = sharded.vectors("image")
        assert isinstance(index, ShardedVectors)
        ray.kill(index._actors[1])  # found by the next search
        check()
        ray.kill(index._actors[2])  # found by the catch-up of the next change
        add_images(writer, unit(rng, 20), rng)
        check()
        assert sharded.vectors("image") is index  # the same index, its shards replaced
    finally:
        sharded.close()
        local.close()
        writer.close()


@pytest.mark.slow  # a Ray cluster of two raylets
def test_ann_shards_recall(cluster: Any) -> None:
    """IVF-PQ shards re-ranked with the exact vectors (compact), on clustered data, against exact search."""
    rng = np.random.default_rng(3)
    n, dim = 12_000, 64
    centres = unit(rng, 60, dim)
    vecs = centres[rng.integers(0, 60, n)] + rng.standard_normal((n, dim)).astype(np.float32) * 0.08
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(1, n + 1, dtype=np.int64)
    queries = centres[rng.integers(0, 60, 200)] + rng.standard_normal((200, dim)).astype(np.float32) * 0.08
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, truth = VectorIndex.build(dim, ids, vecs, spec="flat").search(queries, 10)
    for spec in ("compact", "ivf-sq8"):
        sharded = ShardedVectors.build(dim, ids, vecs, shards=2, spec=spec)
        try:
            assert {s["type"] for s in sharded.describe()} == {spec}
            _, found = sharded.search(queries, 10)
            recall = np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth, strict=True)])
            assert recall >= 0.9, (spec, recall)
        finally:
            sharded.close()


# --- following the catalog ------------------------------------------------------------------------------


def add_images(store: Store, vecs: np.ndarray, rng: np.random.Generator) -> list[int]:
    with store.write("image") as tx:
        mids = [db.add_image_media(tx.conn, rng.bytes(32).hex()) for _ in range(len(vecs))]
        ids = db.add_embeddings(tx.conn, "image", vecs, mids)
        tx.added("image", ids, vecs)
    return ids


def catalog_ids(store: Store) -> list[int]:
    with store.catalog.read() as conn:
        return sorted(
            int(i) for (i,) in conn.execute(select(db.embeddings.c.id).where(db.embeddings.c.kind == "image"))
        )


@pytest.mark.slow  # a Ray cluster of two raylets
def test_sharded_reader_follows_the_writer(cluster: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    writer = Store.create(tmp_path / "idx", {"model": {"name": "fake", "dim": DIM}})
    writer.lock_for_writing()
    ids = add_images(writer, unit(rng, 400), rng)
    writer.save_vectors()
    local, sharded = Store.open(tmp_path / "idx"), Store.open(tmp_path / "idx")
    sharded.use_shards(ShardSet(3))
    try:
        queries = unit(rng, 12)

        def check() -> None:
            local.refresh()
            sharded.refresh()
            index = sharded.vectors("image")
            assert isinstance(index, ShardedVectors)
            assert sorted(index.ids().tolist()) == catalog_ids(writer)
            assert_same(index.search(queries, 15), local.vectors("image").search(queries, 15))
            allowed = np.array(sorted(catalog_ids(writer)[::7]), np.int64)
            assert_same(
                index.search(queries, 5, allowed=allowed),
                local.vectors("image").search(queries, 5, allowed=allowed),
            )

        check()
        first = sharded.vectors("image")
        ids += add_images(writer, unit(rng, 50), rng)  # followed through the catalog's delta
        delete_images(writer, ids[::5])
        check()
        assert sharded.vectors("image") is first  # the same actors, brought up to date
        delete_images(writer, ids[1::5])
        writer.save_vectors()  # prunes the deletion log past the reader's position: the delta is unknown
        add_images(writer, unit(rng, 30), rng)
        check()
        # A searched id the catalog no longer holds would resolve to nothing: the shards dropped them all.
        assert not set(ids[::5] + ids[1::5]) & set(sharded.vectors("image").ids().tolist())
    finally:
        sharded.close()
        local.close()
        writer.close()


@pytest.mark.slow  # a Ray cluster of two raylets
def test_a_sharded_writer_writes_through_its_own_indexes(cluster: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    store = Store.create(tmp_path / "idx", {"model": {"name": "fake", "dim": DIM}})
    store.use_shards(ShardSet(2))
    try:
        store.lock_for_writing()
        add_images(store, unit(rng, 40), rng)
        assert isinstance(store.vectors("image"), VectorIndex)  # writes keep the in-process path
        store.save_vectors()
        store.unlock()
        store.refresh()
        index = store.vectors("image")
        assert isinstance(index, ShardedVectors) and index.ntotal == 40
    finally:
        store.close()


# --- the API ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    folder = world.write_demo_folder(root, n_images=24, seed=5, speech=False, videos=False)
    with mmsearch.Index.create(root / "index", model="demo") as idx:
        report = idx.add_folder(folder.media_dir)
    assert report.images_embedded == 24
    return root / "index"


@pytest.mark.slow
def test_index_open_with_ray_gives_the_same_hits(cluster: Any, demo_index: Path) -> None:
    texts = ["a red circle", "a blue square on a white background", "green triangle", "yellow star"]

    def answers(idx: mmsearch.Index) -> list[Any]:
        out: list[Any] = []
        for text in texts:
            out.append([(h.path, round(h.score, 5)) for h in idx.search_text(text, target="images", k=8)])
            out.append([(h.path, round(h.score, 5)) for h in idx.search_text(text, target="all", k=8)])
            result = idx.search(text, k=6, ext=["png"], min_confidence=0.0)
            out.append([(h.path, round(h.score, 5)) for h in result.hits])
        return out

    with mmsearch.Index.open(demo_index) as idx:
        want = answers(idx)
    with mmsearch.Index.open(demo_index, ray="auto", shards=3) as idx:
        got = answers(idx)
        assert isinstance(idx.store.vectors("image"), ShardedVectors)
    assert got == want
    assert all(want)  # every search found something


def test_shards_need_a_cluster(tmp_path: Path) -> None:
    Store.create(tmp_path / "idx", {"model": {"name": "fake", "dim": DIM}}).close()
    with pytest.raises(mmsearch.MmsearchError, match="Ray cluster"):
        mmsearch.Index.open(tmp_path / "idx", shards=2)
