"""ANN benchmark: mmsearch's vector index types on synthetic clustered 512-d unit vectors.

Data: ``--n`` base vectors (default 1,000,000) from a mixture of Gaussians around ``--clusters``
random unit centres (per-dimension noise ``spread / sqrt(d)``), normalised; the queries are fresh
draws from the same mixture, not base vectors. Ground truth is exact inner-product search.

For each configuration it reports build time, single-query latency p50/p95 through
``VectorIndex.search`` (one query at a time, k = 10, ``faiss.omp_set_num_threads(--threads)``,
which is what the query service uses), recall@10 against exact search, and RAM bytes per vector,
measured two ways: the in-RAM structures' serialized size (FAISS index, plus the id array for
compact) and the growth of the process's anonymous RSS (RssAnon) when the saved index is loaded
into a fresh process. The compact mode's exact vectors live in a memory-mapped file: file-backed
page cache, not anonymous memory; latency is measured with that file warm in the page cache.

Usage: python benchmarks/bench_ann.py [--n 1000000] [--quick]  (``--quick`` = ``--n 100000``)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from _machine import cpu_model, package_versions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmsearch.vectors import FLAT_MAX, TUNE_RECALL, VectorIndex  # noqa: E402

DIM = 512
K = 10


def machine_facts() -> dict[str, object]:
    cpu = cpu_model()
    versions = package_versions(("faiss-cpu", "numpy", "torch"))
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "faiss_compile_options": faiss.get_compile_options(),
        "versions": versions,
        "loadavg_at_start": os.getloadavg(),
    }


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    """``n`` unit vectors from the mixture, generated in chunks straight into one array."""
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    scale = np.float32(spread / np.sqrt(centres.shape[1]))
    for s in range(0, n, 65536):
        e = min(n, s + 65536)
        chunk = rng.standard_normal((e - s, centres.shape[1]), dtype=np.float32)
        chunk *= scale
        chunk += centres[rng.integers(0, len(centres), e - s)]
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        out[s:e] = chunk
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f[:K], t[:K])) for f, t in zip(found, truth, strict=True))
    return hits / (len(truth) * K)


def latencies_ms(index: VectorIndex, queries: np.ndarray) -> np.ndarray:
    for q in queries[:20]:  # warm-up: first touches of lazily-paged memory
        index.search(q[None], K)
    out = np.empty(len(queries))
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        index.search(q[None], K)
        out[i] = (time.perf_counter() - t0) * 1000
    return out


_LOAD_PROBE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[5])
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024
from mmsearch.vectors import VectorIndex
import numpy as np
base = anon()
t0 = time.perf_counter()
vi = VectorIndex.load(sys.argv[1], sha256=sys.argv[2], ntotal=int(sys.argv[3]), dim=int(sys.argv[4]))
load_s = time.perf_counter() - t0
after = anon()
rng = np.random.default_rng(1)
q = rng.standard_normal((200, vi.dim), dtype=np.float32)
q /= np.linalg.norm(q, axis=1, keepdims=True)
for row in q:
    vi.search(row[None], 10)
print(json.dumps({"load_s": load_s, "rss_anon_delta": after - base, "rss_anon_delta_after_queries": anon() - base}))
"""


def measure_load(path: Path, sha: str, n: int) -> dict[str, float]:
    """Load the saved index in a fresh process: load time (sha256 included) and anonymous RSS growth."""
    root = str(Path(__file__).resolve().parents[1])
    res = subprocess.run(
        [sys.executable, "-c", _LOAD_PROBE, str(path), sha, str(n), str(DIM), root],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_config(
    name: str,
    spec: str,
    ids: np.ndarray,
    xb: np.ndarray,
    xq: np.ndarray,
    truth: np.ndarray,
    args: argparse.Namespace,
    workdir: Path,
) -> tuple[dict[str, object], VectorIndex]:
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # building uses every core
    t0 = time.perf_counter()
    index = VectorIndex.build(DIM, ids, xb, spec=spec)
    build_s = time.perf_counter() - t0
    path = workdir / f"{name}.mmsidx"
    t0 = time.perf_counter()
    sha, n = index.save(path)  # compact: from here on the exact vectors are read from this file
    save_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(args.threads)
    nlat = args.flat_queries if spec == "flat" else len(xq)
    lat = latencies_ms(index, xq[:nlat])
    # Exact search's recall is 1 by construction; checking it on the timed queries is enough.
    _, found = index.search(xq[:nlat], K)
    rec = recall_at_k(found, truth[:nlat])
    file_bytes = path.stat().st_size
    desc = index.describe()
    meta_ram = _ram_bytes(index, file_bytes)
    load = measure_load(path, sha, n)
    path.unlink()
    row: dict[str, object] = {
        "config": name,
        "describe": desc,
        "build_s": round(build_s, 2),
        "save_s": round(save_s, 2),
        "load_s": round(load["load_s"], 3),
        "latency_queries": nlat,
        "recall_queries": nlat,
        "p50_ms": round(float(np.percentile(lat, 50)), 4),
        "p95_ms": round(float(np.percentile(lat, 95)), 4),
        "recall_at_10": round(rec, 4),
        "ram_bytes_per_vector_serialized": round(meta_ram / n, 1),
        "ram_bytes_per_vector_rss_anon": round(load["rss_anon_delta"] / n, 1),
        "ram_bytes_per_vector_rss_anon_after_queries": round(load["rss_anon_delta_after_queries"] / n, 1),
        "file_bytes_per_vector": round(file_bytes / n, 1),
    }
    return row, index


def _ram_bytes(index: VectorIndex, file_bytes: int) -> int:
    """Serialized size of what a loaded index keeps in RAM: the FAISS index (+ ids for compact)."""
    faiss_bytes = int(faiss.serialize_index(index._index).size)
    if index.spec == "compact":
        faiss_bytes += index.ntotal * 8  # the sorted id array kept in RAM beside the memmap
    return faiss_bytes


def run_pq_reference(
    compact: VectorIndex,
    xq: np.ndarray,
    truth: np.ndarray,
    compact_row: dict[str, object],
    args: argparse.Namespace,
) -> dict[str, object]:
    """The compact index's IVF-PQ codes searched alone (no re-rank), at the same nprobe."""
    faiss.omp_set_num_threads(args.threads)
    pq = compact._index
    for q in xq[:20]:
        pq.search(q[None], K)
    lat = np.empty(len(xq))
    for i, q in enumerate(xq):
        t0 = time.perf_counter()
        pq.search(q[None], K)
        lat[i] = (time.perf_counter() - t0) * 1000
    _, found = pq.search(xq[: len(truth)], K)
    n = compact.ntotal
    return {
        "config": "ivf-pq (no re-rank)",
        "describe": {
            **compact.describe(),
            "type": "ivf-pq",
            "factory": compact.describe()["factory"].replace("+rerank(mmap)", ""),
            "shortlist": None,
        },
        "build_s": compact_row["build_s"],
        "note": "the compact index's IVF-PQ part searched alone at the same nprobe; same build",
        "latency_queries": len(xq),
        "p50_ms": round(float(np.percentile(lat, 50)), 4),
        "p95_ms": round(float(np.percentile(lat, 95)), 4),
        "recall_at_10": round(recall_at_k(found, truth), 4),
        "ram_bytes_per_vector_serialized": round(int(faiss.serialize_index(pq).size) / n, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="base vectors (default 1,000,000)")
    ap.add_argument("--quick", action="store_true", help="same as --n 100000")
    ap.add_argument("--queries", type=int, default=1000, help="queries for latency and recall")
    ap.add_argument("--flat-queries", type=int, default=50, help="queries timed on the (slow) exact index")
    ap.add_argument("--clusters", type=int, default=1024)
    ap.add_argument("--spread", type=float, default=1.0, help="noise norm relative to the unit centres")
    ap.add_argument(
        "--far-spread",
        type=float,
        default=3.0,
        help="noise of a second query set far from every centre (a stand-in for cross-modal queries)",
    )
    ap.add_argument("--threads", type=int, default=1, help="FAISS threads for queries (serving setting)")
    ap.add_argument("--configs", default="flat,ivf-sq8,compact", help="comma list of specs to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ann.json")
    args = ap.parse_args()
    if args.quick:
        args.n = 100_000
    started = time.perf_counter()
    facts = machine_facts()
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t0 = time.perf_counter()
    xb = clustered(rng, centres, args.n, args.spread)
    xq = clustered(rng, centres, args.queries, args.spread)
    xq_far = clustered(rng, centres, min(args.queries, 500), args.far_spread)
    ids = np.arange(args.n, dtype=np.int64)
    print(
        f"generated {args.n:,} base + {args.queries} query vectors in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    _, truth = faiss.knn(xq, xb, K, faiss.METRIC_INNER_PRODUCT)
    _, truth_far = faiss.knn(xq_far, xb, K, faiss.METRIC_INNER_PRODUCT)
    print(f"exact ground truth in {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_ann-") as tmp:
        for spec in args.configs.split(","):
            row, index = run_config(spec, spec, ids, xb, xq, truth, args, Path(tmp))
            faiss.omp_set_num_threads(args.threads)
            nfar = args.flat_queries if spec == "flat" else len(xq_far)
            row["recall_at_10_far_queries"] = round(
                recall_at_k(index.search(xq_far[:nfar], K)[1], truth_far[:nfar]), 4
            )
            rows.append(row)
            _print_row(row)
            if spec == "compact":
                ref = run_pq_reference(index, xq, truth, row, args)
                ref["recall_at_10_far_queries"] = round(
                    recall_at_k(index._index.search(xq_far, K)[1], truth_far), 4
                )
                rows.append(ref)
                _print_row(ref)
            del index

    result = {
        "benchmark": "ann",
        "machine": {**facts, "loadavg_at_end": os.getloadavg()},
        "setup": {
            "n": args.n,
            "dim": DIM,
            "clusters": args.clusters,
            "spread": args.spread,
            "far_spread": args.far_spread,
            "queries": args.queries,
            "k": K,
            "query_threads": args.threads,
            "build_threads": os.cpu_count(),
            "flat_max": FLAT_MAX,
            "tune_recall_target": TUNE_RECALL,
            "latency": "single query through VectorIndex.search, k=10, after 20 warm-up queries",
            "ram_serialized": "faiss.serialize_index size of the in-RAM index (+ 8 B/vector ids for compact)",
            "ram_rss_anon": "RssAnon growth when a fresh process loads the saved file (memmap pages excluded)",
        },
        "results": rows,
        "targets": {"p50_ms": 1.0, "recall_at_10": 0.95, "compact_ram_bytes_per_vector": 300},
        "total_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['total_s']} s in all)")


def _print_row(row: dict[str, object]) -> None:
    d = row["describe"]
    params = {k: d.get(k) for k in ("nlist", "nprobe", "shortlist") if d.get(k) is not None}
    print(
        f"{row['config']:<20} {d['factory']:<28} build {row['build_s']:>7.1f} s  "
        f"p50 {row['p50_ms']:.3f} ms  p95 {row['p95_ms']:.3f} ms  recall@10 {row['recall_at_10']:.4f} "
        f"(far queries {row.get('recall_at_10_far_queries', float('nan')):.4f})  "
        f"RAM {row['ram_bytes_per_vector_serialized']:.0f} B/vec (serialized)"
        + (
            f", {row['ram_bytes_per_vector_rss_anon']:.0f} B/vec (RssAnon)"
            if "ram_bytes_per_vector_rss_anon" in row
            else ""
        )
        + f"  {params}",
        flush=True,
    )


if __name__ == "__main__":
    main()
