"""Filtered vector search benchmark: ``VectorIndex.search(..., allowed=ids)`` against exact filtered search.

Data: ``--n`` base vectors (default 1,000,000) from bench_ann's mixture of Gaussians around ``--clusters``
random unit centres, with ids in cluster order (so a contiguous id range is a few whole clusters, as a
path filter on one folder of similar photos gives), and ``--flat-n`` (50,000) more for a flat index.
Queries are fresh draws from the whole mixture ("any"); for the clustered selection also draws from the
selected clusters ("inside").

Selections at 50 %, 5 % and 0.1 % of the index: "random" (ids drawn uniformly) and "range" (a contiguous
id range). For each: p50/p95 single-query latency through ``VectorIndex.search`` (k = 10, one FAISS
thread, the serving setting; the same read-only id array for every query, so the selector is built once
as when the caller caches a filter's ids), recall@10 against exact filtered search (numpy over the
allowed vectors), the fraction of queries that got 10 hits, the method the index chose
(``filter_plan``) and the time to build the selector from the sorted id array. Unfiltered p50 is
measured in the same run, for the ratio. Goal (issue 12): recall@10 >= 0.95 at every selectivity,
p50 <= 2 ms. For IVF indexes, both filtered-search methods are also timed, forced, on random selections
around the switch between them (``method_crossover``), which checks ``SUBSET_ROW_COST``.

Usage: python benchmarks/bench_filters.py [--n 1000000] [--queries 500] [--quick]
       (``--quick`` = ``--n 100000 --queries 100``)
       python benchmarks/bench_filters.py --index-cache /tmp/idx --flat-n 0 --no-crossover
       (latency and recall at --n only; the index is built once and reused by later runs)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from bench_ann import DIM, K, clustered, machine_facts

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmsearch import vectors  # noqa: E402
from mmsearch.vectors import (  # noqa: E402
    FAR_BUDGET,
    FAR_BUDGET_EXPONENT,
    FAR_BUDGET_SELECTIVITY,
    FAR_SCORE_RATIO,
    FILTER_BUDGET,
    VectorIndex,
    choose_spec,
)

SELECTIVITIES = (0.5, 0.05, 0.001)
GOALS = {"recall_at_10": 0.95, "p50_ms": 2.0}


def in_cluster_order(
    rng: np.random.Generator, centres: np.ndarray, n: int, spread: float
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` vectors of the mixture, cluster after cluster, and the cluster of each."""
    counts = np.bincount(rng.integers(0, len(centres), n), minlength=len(centres))
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    start = 0
    for c, count in enumerate(counts):
        out[start : start + count] = clustered(rng, centres[c : c + 1], int(count), spread)
        start += count
    return out, np.repeat(np.arange(len(centres)), counts)


def exact_filtered(xb: np.ndarray, allowed: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """Ids of the exact top-K inner products among ``allowed`` rows (ids are row numbers), in blocks."""
    best_s = np.full((len(xq), 0), -np.inf, dtype=np.float32)
    best_i = np.empty((len(xq), 0), dtype=np.int64)
    for s in range(0, len(allowed), 65536):
        block = allowed[s : s + 65536]
        scores = xq @ xb[block].T
        top = np.argpartition(-scores, min(K, len(block) - 1), axis=1)[:, :K]
        best_s = np.concatenate([best_s, np.take_along_axis(scores, top, axis=1)], axis=1)
        best_i = np.concatenate([best_i, block[top]], axis=1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :K]
        best_s = np.take_along_axis(best_s, keep, axis=1)
        best_i = np.take_along_axis(best_i, keep, axis=1)
    return best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def latencies_ms(index: VectorIndex, queries: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """Single-query latencies after 20 warm-up queries (with ``allowed``, the first builds the selector
    the later ones reuse, and the first subset search of an IVF index makes its id list and direct map)."""
    for q in queries[:20]:
        index.search(q[None], K, allowed=allowed)
    out = np.empty(len(queries))
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        index.search(q[None], K, allowed=allowed)
        out[i] = (time.perf_counter() - t0) * 1000
    return out


def selector_build_ms(allowed: np.ndarray, repeat: int = 20) -> tuple[float, str]:
    """Median time to build the IDSelector (and its buffer) from the sorted id array, and its kind."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        selection = vectors._Selection(allowed)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times)), selection.kind


def first_subset_search_ms(index: VectorIndex, q: np.ndarray, allowed: np.ndarray) -> float | None:
    """The one-off cost of an IVF index's first subset search (sorted id list, FAISS direct map)."""
    if index.filter_plan(len(allowed))["method"] != "subset":
        return None
    t0 = time.perf_counter()
    index.search(q[None], K, allowed=allowed)
    return (time.perf_counter() - t0) * 1000


def method_crossover(
    index: VectorIndex, xq: np.ndarray, rng: np.random.Generator, args: argparse.Namespace
) -> list[dict[str, object]]:
    """p50 of both filtered-search methods, forced, for random selections around the switch between them:
    checks SUBSET_ROW_COST (the method filter_plan picks should be the faster one)."""
    rows = []
    n = index.ntotal
    saved = dict(vectors.SUBSET_ROW_COST)
    try:
        for frac in (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01):
            allowed = np.sort(rng.choice(n, max(K, round(n * frac)), replace=False)).astype(np.int64)
            allowed.setflags(write=False)
            row: dict[str, object] = {"selectivity": frac, "allowed": len(allowed)}
            row["chosen"] = index.filter_plan(len(allowed))["method"]
            for method, cost in (("subset", 0.0), ("selector", float("inf"))):
                vectors.SUBSET_ROW_COST[index.spec] = cost
                lat = latencies_ms(index, xq[: args.crossover_queries], allowed)
                row[f"{method}_p50_ms"] = round(float(np.percentile(lat, 50)), 4)
                row[f"{method}_min_ms"] = round(float(lat.min()), 4)  # the least disturbed by other load
            vectors.SUBSET_ROW_COST.update(saved)
            rows.append(row)
            print(
                f"  crossover {frac:7.2%} ({len(allowed):>6} ids): subset p50 {row['subset_p50_ms']:.3f} ms "
                f"(min {row['subset_min_ms']:.3f}), selector p50 {row['selector_p50_ms']:.3f} ms "
                f"(min {row['selector_min_ms']:.3f}), chosen {row['chosen']}",
                flush=True,
            )
    finally:
        vectors.SUBSET_ROW_COST.update(saved)
    return rows


def selections(
    rng: np.random.Generator,
    n: int,
    labels: np.ndarray,
    centres: np.ndarray,
    xq: np.ndarray,
    args: argparse.Namespace,
) -> list[tuple[str, float, str, np.ndarray, np.ndarray]]:
    """(selection, selectivity, queries, allowed ids, query vectors) for every configuration."""
    out = []
    for frac in SELECTIVITIES:
        m = max(K, round(n * frac))
        random_ids = np.sort(rng.choice(n, m, replace=False)).astype(np.int64)
        out.append(("random", frac, "any", random_ids, xq))
        start = int(rng.integers(0, n - m + 1))
        range_ids = np.arange(start, start + m, dtype=np.int64)
        out.append(("range", frac, "any", range_ids, xq))
        inside = clustered(rng, centres[np.unique(labels[range_ids])], len(xq), args.spread)
        out.append(("range", frac, "inside", range_ids, inside))
    for *_, allowed, _ in out:
        allowed.setflags(write=False)  # as a caller's cache hands them out: the selector is reused
    return out


def _cached_build(spec: str, ids: np.ndarray, xb: np.ndarray, args: argparse.Namespace) -> VectorIndex:
    """The index over ``xb``, built, or loaded from ``--index-cache`` when a run with the same data saved it
    there (the data depend only on --n, --clusters, --spread, --seed and --queries, which are drawn first)."""
    if args.index_cache is None:
        return VectorIndex.build(DIM, ids, xb, spec=spec)
    name = f"{spec}-n{len(xb)}-c{args.clusters}-s{args.spread}-seed{args.seed}-q{args.queries}"
    path = args.index_cache / f"{name}.mmsvidx"
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        meta = json.loads(sidecar.read_text())
        index = VectorIndex.load(path, sha256=meta["sha256"], ntotal=len(xb), dim=DIM)
        if index is not None:
            return index
    index = VectorIndex.build(DIM, ids, xb, spec=spec)
    sha, _ = index.save(path)
    sidecar.write_text(json.dumps({"sha256": sha}))
    return index


def run_index(
    name: str,
    spec: str,
    xb: np.ndarray,
    labels: np.ndarray,
    centres: np.ndarray,
    xq: np.ndarray,
    rng: np.random.Generator,
    args: argparse.Namespace,
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    n = len(xb)
    ids = np.arange(n, dtype=np.int64)
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # building uses every core
    t0 = time.perf_counter()
    index = _cached_build(spec, ids, xb, args)
    build_s = time.perf_counter() - t0
    desc = index.describe()
    print(f"{name}: built {desc['factory']} over {n:,} in {build_s:.1f} s {index.params}", flush=True)

    faiss.omp_set_num_threads(args.threads)
    unfiltered = latencies_ms(index, xq, None)
    unfiltered_p50 = float(np.percentile(unfiltered, 50))
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    truth_all = exact_filtered(xb, ids, xq)
    faiss.omp_set_num_threads(args.threads)
    rows: list[dict[str, object]] = [
        {
            "index": name,
            "selection": "none",
            "selectivity": 1.0,
            "queries": "any",
            "p50_ms": round(unfiltered_p50, 4),
            "p95_ms": round(float(np.percentile(unfiltered, 95)), 4),
            "recall_at_10": round(recall_at_k(index.search(xq, K)[1], truth_all), 4),
        }
    ]
    _print_row(rows[0])
    for kind, frac, qname, allowed, queries in selections(rng, n, labels, centres, xq, args):
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        truth = exact_filtered(xb, allowed, queries)
        faiss.omp_set_num_threads(args.threads)
        build_ms, selector = selector_build_ms(allowed)
        first_ms = first_subset_search_ms(index, queries[0], allowed)
        lat = latencies_ms(index, queries, allowed)
        _, found = index.search(queries, K, allowed=allowed)
        assert np.isin(found[found >= 0], allowed).all(), "an id outside the selection was returned"
        plan = index.filter_plan(len(allowed))
        p50 = float(np.percentile(lat, 50))
        row: dict[str, object] = {
            "index": name,
            "selection": kind,
            "selectivity": frac,
            "allowed": len(allowed),
            "queries": qname,
            "method": plan["method"],
            "selector": selector if plan["method"] == "selector" else None,
            "budget": plan.get("budget"),
            "far_budget": plan.get("far_budget"),
            "p50_ms": round(p50, 4),
            "p95_ms": round(float(np.percentile(lat, 95)), 4),
            "p50_vs_unfiltered": round(p50 / unfiltered_p50, 2),
            "recall_at_10": round(recall_at_k(found, truth), 4),
            "full_k_fraction": round(float((found >= 0).all(axis=1).mean()), 4),
            "selector_build_ms": round(build_ms, 4),
            "first_subset_search_ms": None if first_ms is None else round(first_ms, 1),
        }
        rows.append(row)
        _print_row(row)
    for row in rows:
        row["describe"] = desc
        row["build_s"] = round(build_s, 1)
    crossover = method_crossover(index, xq, rng, args) if spec != "flat" and args.crossover else []
    return rows, crossover


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--n", type=int, default=1_000_000, help="base vectors of the large index (default 1,000,000)"
    )
    ap.add_argument("--queries", type=int, default=500, help="queries per configuration")
    ap.add_argument("--quick", action="store_true", help="same as --n 100000 --queries 100")
    ap.add_argument("--flat-n", type=int, default=50_000, help="vectors of the flat index (0: skip it)")
    ap.add_argument("--specs", default="", help="comma list of index types at --n (default: choose_spec's)")
    ap.add_argument("--clusters", type=int, default=1024)
    ap.add_argument("--spread", type=float, default=1.0, help="noise norm relative to the unit centres")
    ap.add_argument("--threads", type=int, default=1, help="FAISS threads for queries (serving setting)")
    ap.add_argument("--crossover-queries", type=int, default=200, help="queries per method-crossover point")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--index-cache", type=Path, default=None, help="folder where built indexes are saved and reused"
    )
    ap.add_argument(
        "--no-crossover", dest="crossover", action="store_false", help="skip the method-crossover timings"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "filters.json")
    args = ap.parse_args()
    if args.quick:
        args.n, args.queries, args.crossover_queries = 100_000, 100, 50
    started = time.perf_counter()
    facts = machine_facts()
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    xq = clustered(rng, centres, args.queries, args.spread)

    rows: list[dict[str, object]] = []
    crossover: dict[str, list[dict[str, object]]] = {}
    configs = [
        (f"{spec} {args.n:,}", spec, args.n) for spec in (args.specs or choose_spec(args.n)).split(",")
    ]
    if args.flat_n:
        configs.append((f"flat {args.flat_n:,}", "flat", args.flat_n))
    for name, spec, n in configs:
        t0 = time.perf_counter()
        xb, labels = in_cluster_order(rng, centres, n, args.spread)
        print(f"generated {n:,} vectors in {time.perf_counter() - t0:.1f} s", flush=True)
        index_rows, index_crossover = run_index(name, spec, xb, labels, centres, xq, rng, args)
        rows += index_rows
        if index_crossover:
            crossover[name] = index_crossover
        del xb

    result = {
        "benchmark": "filters",
        "machine": {**facts, "loadavg_at_end": os.getloadavg()},
        "setup": {
            "n": args.n,
            "flat_n": args.flat_n,
            "dim": DIM,
            "clusters": args.clusters,
            "spread": args.spread,
            "queries": args.queries,
            "k": K,
            "query_threads": args.threads,
            "filter_budget": FILTER_BUDGET,
            "far_budget": FAR_BUDGET,
            "far_budget_selectivity": FAR_BUDGET_SELECTIVITY,
            "far_budget_exponent": FAR_BUDGET_EXPONENT,
            "far_budget_rule": "far_budget = FAR_BUDGET * (min(s, FAR_BUDGET_SELECTIVITY) / "
            "FAR_BUDGET_SELECTIVITY) ** FAR_BUDGET_EXPONENT, at least filter_budget (s: selectivity)",
            "far_score_ratio": FAR_SCORE_RATIO,
            "ids": "row numbers in cluster order: a 'range' selection is a few whole clusters",
            "latency": "single query through VectorIndex.search(q, 10, allowed=ids), after 20 warm-up queries; "
            "the same read-only id array each time, so the selector is built once (selector_build_ms) and "
            "a subset search decodes its vectors once (first_subset_search_ms)",
            "truth": "exact inner-product top 10 among the allowed vectors (numpy)",
        },
        "results": rows,
        "method_crossover": crossover,
        "goals": GOALS,
        "total_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists() and (not args.flat_n or not args.crossover):
        # A partial run (--flat-n 0, --no-crossover) keeps the rows of an earlier run it did not measure.
        old = json.loads(args.out.read_text())
        measured = {row["index"] for row in rows}
        result["results"] = rows + [r for r in old.get("results", []) if r["index"] not in measured]
        result["method_crossover"] = {**old.get("method_crossover", {}), **crossover}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['total_s']} s in all)")


def _print_row(row: dict[str, object]) -> None:
    sel = f"{row['selection']} {float(row['selectivity']):.1%}"  # type: ignore[arg-type]
    how = f"{row.get('method', '')} {row.get('selector') or ''}".strip()
    extra = (
        f"  full k {row['full_k_fraction']:.3f}  x{row['p50_vs_unfiltered']} unfiltered  "
        f"selector build {row['selector_build_ms']:.3f} ms  [{how}]"
        if "method" in row
        else ""
    )
    print(
        f"  {row['index']:<16} {sel:<14} q={row['queries']:<6} p50 {row['p50_ms']:.3f} ms  "
        f"p95 {row['p95_ms']:.3f} ms  recall@10 {row['recall_at_10']:.4f}{extra}",
        flush=True,
    )


if __name__ == "__main__":
    main()
