"""Live reads: query latency while an index run commits, with readers that follow the commits (the deletion
log and new ids) and, in the same run, readers that rebuild on every change (the behaviour before).

Setup: an index of ``--n`` synthetic clustered 512-d unit image vectors (default 1,000,000), inserted
through the catalog API with a file row each, and its FAISS file saved (an IVF above 50k vectors). Then, per
mode, a writer process commits ``--batch`` new vectors and deletes ``--deletes`` old ones every
``--interval`` seconds through the path ingest uses (catalog transaction, then ``Store.apply``), while this
process searches continuously through ``search_vector`` (k = 10, one FAISS thread, like the server). Each
query's latency includes its ``Store.refresh``; the table also gives the slowest refresh alone.

``follow``: the readers of this version; ``rebuild``: ``Store.rebuild_on_refresh`` (drop the index on a
change, rebuild it from SQLite, retraining the IVF).

Usage: python benchmarks/bench_live_reads.py [--n 1000000] [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from _machine import cpu_model, package_versions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _synthetic import insert_images  # noqa: E402

from mmsearch import db  # noqa: E402
from mmsearch.search import search_vector  # noqa: E402
from mmsearch.store import Store  # noqa: E402

DIM = 512
K = 10


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float = 1.0) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)]
    x = x + rng.standard_normal((n, DIM), dtype=np.float32) * np.float32(spread / np.sqrt(DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(folder: Path, n: int, centres: np.ndarray) -> float:
    t0 = time.perf_counter()
    store = Store.create(folder, {"model": {"name": "synthetic", "dim": DIM}})
    store.lock_for_writing()
    rng = np.random.default_rng(1)
    with store.catalog.begin() as conn:
        for s in range(0, n, 20_000):
            insert_images(conn, clustered(rng, centres, min(20_000, n - s)), s)
    store.save_vectors()  # builds and saves the FAISS index (IVF above FLAT_MAX)
    store.close()
    return time.perf_counter() - t0


def writer(
    folder: str, centres: np.ndarray, batch: int, deletes: int, interval: float, serial: int, stop: Any
) -> None:
    store = Store.open(Path(folder))
    store.lock_for_writing()
    store.vectors("image")
    rng = np.random.default_rng(serial)
    while not stop.is_set():
        t0 = time.monotonic()
        with store.catalog.begin() as conn:
            insert_images(conn, clustered(rng, centres, batch), serial)
            gone = (
                conn.execute(
                    db.embeddings.select()
                    .with_only_columns(db.embeddings.c.id)
                    .order_by(db.embeddings.c.id)
                    .limit(deletes)
                )
                .scalars()
                .all()
            )
            db.delete_embeddings(conn, db.embeddings.c.id.in_(gone))
        serial += batch
        store.apply("image")  # follows the commit: the new ids and the logged deletions
        stop.wait(max(0.0, interval - (time.monotonic() - t0)))
    store.close()


def measure(
    folder: Path, mode: str, centres: np.ndarray, args: argparse.Namespace, serial: int
) -> dict[str, Any]:
    store = Store.open(folder)
    store.rebuild_on_refresh = mode == "rebuild"
    rng = np.random.default_rng(3)
    queries = clustered(rng, centres, 256)
    t0 = time.perf_counter()
    store.vectors("image")
    open_s = time.perf_counter() - t0
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    proc = ctx.Process(
        target=writer, args=(str(folder), centres, args.batch, args.deletes, args.interval, serial, stop)
    )
    proc.start()
    latencies, refreshes, rebuilt = [], [], 0
    end = time.monotonic() + args.seconds
    i = 0
    while time.monotonic() < end:
        q = queries[i % len(queries)]
        i += 1
        t0 = time.perf_counter()
        before = store._live.get((store.model, "image"))
        store.refresh()
        store.vectors("image")
        t1 = time.perf_counter()
        hits = search_vector(store, q, "images", K)
        t2 = time.perf_counter()
        assert hits, "no hits"
        rebuilt += store._live.get((store.model, "image")) is not before and mode == "rebuild"
        refreshes.append(t1 - t0)
        latencies.append(t2 - t0)
    stop.set()
    proc.join(120)
    store.close()
    lat = np.asarray(latencies) * 1000
    return {
        "mode": mode,
        "queries": len(lat),
        "qps": round(len(lat) / args.seconds, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p95_ms": round(float(np.percentile(lat, 95)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "max_ms": round(float(lat.max()), 1),
        "worst_refresh_ms": round(max(refreshes) * 1000, 1),
        "rebuilds": int(rebuilt),
        "open_s": round(open_s, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in the index (default 1,000,000)")
    ap.add_argument("--seconds", type=float, default=30.0, help="measuring time per mode")
    ap.add_argument("--batch", type=int, default=100, help="vectors the writer adds per commit")
    ap.add_argument("--deletes", type=int, default=10, help="vectors the writer deletes per commit")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between the writer's commits")
    ap.add_argument("--clusters", type=int, default=1024)
    ap.add_argument("--modes", default="follow,rebuild", help="comma list of follow, rebuild")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "live_reads.json")
    args = ap.parse_args()
    started = time.perf_counter()
    facts = {
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "versions": package_versions(("faiss-cpu", "numpy", "sqlalchemy")),
        "loadavg_at_start": os.getloadavg(),
    }
    faiss.omp_set_num_threads(1)  # queries are served one at a time (as the server does)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.clusters, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_live_reads-") as tmp:
        folder = Path(tmp) / "idx"
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        build_s = build(folder, args.n, centres)
        faiss.omp_set_num_threads(1)
        print(f"index of {args.n:,} vectors built and saved in {build_s:.0f} s", flush=True)
        print(
            f"{'mode':<8} {'queries':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>9} {'worst refresh ms':>17}"
        )
        for i, mode in enumerate(args.modes.split(",")):
            row = measure(folder, mode, centres, args, serial=10**9 * (i + 1))
            rows.append(row)
            print(
                f"{mode:<8} {row['queries']:>8} {row['p50_ms']:>8.2f} {row['p95_ms']:>8.2f} {row['p99_ms']:>8.2f} "
                f"{row['max_ms']:>9.1f} {row['worst_refresh_ms']:>17.1f}",
                flush=True,
            )
    by = {r["mode"]: r for r in rows}
    ratio = (
        {
            k: round(by["rebuild"][k] / max(by["follow"][k], 1e-9), 1)
            for k in ("p50_ms", "p95_ms", "worst_refresh_ms")
        }
        if {"follow", "rebuild"} <= set(by)
        else None
    )
    result = {
        "benchmark": "live_reads",
        "machine": {**facts, "loadavg_at_end": os.getloadavg()},
        "setup": {
            "n": args.n,
            "dim": DIM,
            "clusters": args.clusters,
            "k": K,
            "seconds_per_mode": args.seconds,
            "writer": f"{args.batch} added + {args.deletes} deleted per commit, one commit every {args.interval} s",
            "latency": "refresh + search_vector (FAISS, catalog resolve) per query, one query at a time",
            "build_s": round(build_s, 1),
        },
        "results": rows,
        "rebuild_over_follow": ratio,
        "total_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if ratio:
        print(f"rebuild / follow: {ratio}")
    print(f"wrote {args.out} ({result['total_s']} s in all)")


if __name__ == "__main__":
    main()
