"""Sharded search benchmark: vectors split over Ray actors (mmsearch.shards) against one index of the same size.

Data: ``--n`` clustered 512-d unit vectors (a mixture of Gaussians around ``--clusters`` random unit centres,
as bench_ann.py), queries fresh draws from the same mixture; ground truth is exact inner-product search.

For each index type (``--specs``, forced on the single index and on every shard) it reports build time,
single-query latency p50/p95 (k = 10, one query at a time, as a server asks) and recall@10 against exact
search, for one in-process :class:`VectorIndex` and for :class:`ShardedVectors` over ``--shards`` actors,
unfiltered and with a random 10 % selection (``allowed``). Also the fixed cost of a sharded query: the
latency over shards of a few vectors, which is Ray's round trip.

The cluster is a local one (``ray_cluster.local_cluster``: ``--nodes`` raylets on this machine, loopback)
unless this process is already connected to one; every node runs on the same cores, so the figures show
Ray's overhead and how the shards share one machine's cores, not what more machines add.
The single index searches with one FAISS thread, as do the shard actors (Ray sets OMP_NUM_THREADS=1).

Usage: python benchmarks/bench_ray_search.py [--n 200000] [--quick]  (``--quick`` = ``--n 50000``)
``measure(...)`` returns the result as a dict (bench_ray.py imports it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from _machine import cpu_model, package_versions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_ann import clustered, recall_at_k  # noqa: E402

from mmsearch import ray_cluster  # noqa: E402
from mmsearch.shards import ShardedVectors  # noqa: E402
from mmsearch.vectors import VectorIndex  # noqa: E402

DIM = 512
K = 10
RESULTS = Path(__file__).parent / "results" / "ray_search.json"


def latencies_ms(search: Callable[[np.ndarray], Any], queries: np.ndarray) -> dict[str, float]:
    """p50/p95 of one query at a time, after a few warm-up queries (first touches, actor start)."""
    for q in queries[:10]:
        search(q[None])
    out = np.empty(len(queries))
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        search(q[None])
        out[i] = (time.perf_counter() - t0) * 1000
    return {
        "p50_ms": round(float(np.percentile(out, 50)), 3),
        "p95_ms": round(float(np.percentile(out, 95)), 3),
    }


@contextlib.contextmanager
def _cluster(nodes: int) -> Iterator[dict[str, Any]]:
    """The Ray cluster this process is connected to, or a local one of ``nodes`` for the run."""
    ray = ray_cluster.ray_module()
    if ray.is_initialized():
        yield {"cluster": "existing", "resources": ray_cluster.resources()}
        return
    with ray_cluster.local_cluster(nodes=nodes, cpus_per_node=1):
        yield {"cluster": f"local, {nodes} nodes on this machine", "resources": ray_cluster.resources()}


def _same_as(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> bool:
    return bool(np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-5))


def measure(
    n: int = 200_000,
    *,
    specs: Sequence[str] = ("flat", "ivf-sq8"),
    shard_counts: Sequence[int] = (2, 4),
    n_queries: int = 200,
    flat_queries: int = 100,
    clusters: int = 1024,
    spread: float = 1.0,
    allowed_fraction: float = 0.1,
    nodes: int = 2,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Sharded versus single-index search over ``n`` vectors; see the module docstring. Uses the Ray cluster
    this process is connected to, else starts a local one of ``nodes`` nodes for the run."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    xb = clustered(rng, centres, n, spread)
    xq = clustered(rng, centres, n_queries, spread)
    ids = np.arange(1, n + 1, dtype=np.int64)  # catalog ids start at 1
    allowed = np.sort(rng.choice(ids, max(1, int(allowed_fraction * n)), replace=False))
    allowed.setflags(write=False)  # as query.py caches a filter's ids
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    _, truth = faiss.knn(xq, xb, K, faiss.METRIC_INNER_PRODUCT)
    truth = ids[truth]
    log(f"{n:,} vectors and {n_queries} queries; exact ground truth in {time.perf_counter() - started:.1f} s")

    rows: list[dict[str, Any]] = []
    with _cluster(nodes) as cluster:
        # Ray's fixed cost of one sharded query: shards of a few vectors each.
        tiny = ShardedVectors.build(DIM, ids[:64], xb[:64], shards=max(shard_counts))
        overhead = latencies_ms(lambda q: tiny.search(q, K), xq)
        tiny.close()
        log(f"round trip over {max(shard_counts)} near-empty shards: p50 {overhead['p50_ms']} ms")
        for spec in specs:
            nlat = flat_queries if spec == "flat" else n_queries
            faiss.omp_set_num_threads(os.cpu_count() or 1)  # building uses every core
            t0 = time.perf_counter()
            single = VectorIndex.build(DIM, ids, xb, spec=spec)
            build_s = time.perf_counter() - t0
            faiss.omp_set_num_threads(1)  # queries: one thread, as the shard actors
            want = single.search(xq[:nlat], K)
            base = {
                "spec": spec,
                "shards": 1,
                "where": "one VectorIndex in this process",
                "build_s": round(build_s, 2),
                "describe": [single.describe()],
                "recall_at_10": round(recall_at_k(want[1], truth[:nlat]), 4),
                **latencies_ms(lambda q, s=single: s.search(q, K), xq[:nlat]),
                "filtered": latencies_ms(lambda q, s=single: s.search(q, K, allowed=allowed), xq[:nlat]),
            }
            rows.append(base)
            log(_line(base))
            for shards in shard_counts:
                t0 = time.perf_counter()
                sharded = ShardedVectors.build(DIM, ids, xb, shards=shards, spec=spec)
                build_s = time.perf_counter() - t0
                try:
                    got = sharded.search(xq[:nlat], K)
                    row = {
                        "spec": spec,
                        "shards": shards,
                        "where": "ShardedVectors, one Ray actor per shard",
                        "build_s": round(build_s, 2),
                        "describe": sharded.describe(),
                        "recall_at_10": round(recall_at_k(got[1], truth[:nlat]), 4),
                        "same_as_single_index": _same_as(got, want),
                        **latencies_ms(lambda q, s=sharded: s.search(q, K), xq[:nlat]),
                        "filtered": latencies_ms(
                            lambda q, s=sharded: s.search(q, K, allowed=allowed), xq[:nlat]
                        ),
                    }
                finally:
                    sharded.close()
                row["p50_vs_single"] = round(row["p50_ms"] / base["p50_ms"], 2)
                row["p95_vs_single"] = round(row["p95_ms"] / base["p95_ms"], 2)
                rows.append(row)
                log(_line(row))
            del single
    return {
        "benchmark": "ray_search",
        "setup": {
            "n": n,
            "dim": DIM,
            "k": K,
            "clusters": clusters,
            "spread": spread,
            "queries": n_queries,
            "flat_queries": flat_queries,
            "allowed_fraction": allowed_fraction,
            "query_threads": 1,
            "latency": "single query, k=10, after 10 warm-up queries; sharded: ray.get of every shard, merged",
            **cluster,
        },
        "ray_round_trip": {"shards": max(shard_counts), **overhead},
        "results": rows,
        "total_s": round(time.perf_counter() - started, 1),
    }


def _line(row: dict[str, Any]) -> str:
    ratio = f"  ({row['p50_vs_single']}x single p50)" if "p50_vs_single" in row else ""
    same = "" if "same_as_single_index" not in row else f"  same as single: {row['same_as_single_index']}"
    return (
        f"{row['spec']:8s} shards={row['shards']}  build {row['build_s']:7.1f} s  p50 {row['p50_ms']:8.3f} ms  "
        f"p95 {row['p95_ms']:8.3f} ms  filtered p50 {row['filtered']['p50_ms']:8.3f} ms  "
        f"recall@10 {row['recall_at_10']:.4f}{ratio}{same}"
    )


def machine_facts() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "versions": package_versions(("faiss-cpu", "numpy", "ray")),
        "loadavg_at_start": os.getloadavg(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="vectors (default 200,000)")
    ap.add_argument("--quick", action="store_true", help="same as --n 50000")
    ap.add_argument(
        "--specs", default="flat,ivf-sq8", help="comma list of index types (forced on every shard)"
    )
    ap.add_argument("--shards", default="2,4", help="comma list of shard counts")
    ap.add_argument("--queries", type=int, default=200, help="queries timed on ANN indexes")
    ap.add_argument("--flat-queries", type=int, default=100, help="queries timed on exact indexes")
    ap.add_argument("--nodes", type=int, default=2, help="nodes of the local cluster")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.n = 50_000
    facts = machine_facts()
    result = measure(
        args.n,
        specs=args.specs.split(","),
        shard_counts=[int(s) for s in args.shards.split(",")],
        n_queries=args.queries,
        flat_queries=args.flat_queries,
        nodes=args.nodes,
        seed=args.seed,
    )
    result = {
        "benchmark": result.pop("benchmark"),
        "machine": {**facts, "loadavg_at_end": os.getloadavg()},
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
