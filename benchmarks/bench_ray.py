"""Ray's cost and the driver's ceiling (issue 13, "Proof on this machine and on paper").

1. **Ray overhead.** The same folder of camera-size JPEGs indexed twice, alternating, by a plain local run and
   by ``--ray`` on a local cluster of two raylets with one CPU each (the same two cores): images/s of each and
   their ratio (goal: Ray >= 0.8 of local). Both runs include model loading, as a user's run does; the Ray run
   also starts its actors (the cluster itself is up before the clock starts, as on a real cluster).
2. **The driver's commit rate.** What one driver accepts when the cluster is infinitely fast: ingestion given
   a :class:`mmsearch.ingest.RemoteWork` that answers at once with random vectors (this harness, not a model),
   so the figure is the driver's own work per image (scan, hash, write the rows, add to FAISS, commit), and
   the write path alone (``Store.write`` of batches of vectors with their rows). Their images/s, divided by
   one GPU node's embedding rate, is how many nodes one driver can feed.
3. **Sharded search.** p50/p95 of a query over vectors split across Ray actors against one in-process index of
   the same vectors (``benchmarks/bench_ray_search.py``, run from here).

    python benchmarks/bench_ray.py [--n 300] [--model ViT-B-32-256] [--rounds 2] [--skip-search]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from _machine import cpu_flags, cpu_model, package_versions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ingest import make_folder  # noqa: E402

import mmsearch  # noqa: E402
from mmsearch import db, ray_cluster  # noqa: E402
from mmsearch.identity import sha256_file  # noqa: E402
from mmsearch.ingest import AudioDone, ImageDone, ingest  # noqa: E402
from mmsearch.ray_ingest import RayOptions  # noqa: E402
from mmsearch.store import Store  # noqa: E402

RESULTS = Path(__file__).parent / "results"


class InstantRemote:
    """A :class:`mmsearch.ingest.RemoteWork` with no model behind it: the files' hashes made before the
    clock starts, random unit vectors at once, in batches like the cluster's. Only for measuring what the
    driver itself can take."""

    def __init__(self, dim: int, batch: int, hashed: dict[Path, str | OSError]) -> None:
        self.dim, self.batch, self.hashed = dim, batch, hashed
        self.rng = np.random.default_rng(0)

    def hashes(self, paths: list[Path]) -> dict[Path, str | OSError]:
        return {p: self.hashed[p] for p in paths}

    def images(self, items: list[tuple[str, Path]]) -> Iterator[tuple[list[ImageDone], np.ndarray]]:
        for i in range(0, len(items), self.batch):
            chunk = items[i : i + self.batch]
            v = self.rng.standard_normal((len(chunk), self.dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            yield [ImageDone(sha, None) for sha, _ in chunk], v

    def transcripts(self, items: list[tuple[str, Path]]) -> Iterator[AudioDone]:
        return iter(())


def _run(work: Path, folder: Path, model: str, ray: RayOptions | None, tag: str) -> dict[str, Any]:
    path = work / f"index-{tag}"
    shutil.rmtree(path, ignore_errors=True)
    commits: list[tuple[float, int]] = []

    def tick(stage: str, done: int, total: int) -> None:
        if stage == "images" and done:
            commits.append((time.perf_counter(), done))

    with mmsearch.Index.create(path, model=model, pretrained="random", image_tower="onnx-int8") as idx:
        started = time.perf_counter()
        report = idx.add_folder(folder, ray=ray, progress=tick)
        seconds = time.perf_counter() - started
    assert report.images_embedded and not report.skipped, (report.images_embedded, report.skipped[:3])
    # No "steady state" rate from the commits: Ray Data hands results back per finished block, so by its
    # first commit a Ray run has embedded far more than one batch; only the whole run compares fairly.
    return {
        "seconds": round(seconds, 2),
        "images_per_s": round(report.images_embedded / seconds, 2),
        "first_commit_s": round(commits[0][0] - started, 2),
    }


def overhead(work: Path, folder: Path, model: str, rounds: int, actors: int) -> dict[str, Any]:
    """Local and Ray runs of the same folder, alternating (the machine is shared: one run's ratio)."""
    local, on_ray = [], []
    with ray_cluster.local_cluster(nodes=2, cpus_per_node=1):
        # Untimed: the first run exports the model's towers (once per model), which neither side should pay.
        _run(work, folder, model, None, "warm")
        for r in range(rounds):
            local.append(_run(work, folder, model, None, f"local{r}"))
            on_ray.append(_run(work, folder, model, RayOptions("auto", image_actors=actors), f"ray{r}"))
            print(f"  round {r}: local {local[-1]}, ray {on_ray[-1]}")
    best_local = max(x["images_per_s"] for x in local)
    best_ray = max(x["images_per_s"] for x in on_ray)
    return {
        "cluster": "2 raylets x 1 CPU on this machine (ray.cluster_utils.Cluster)",
        "image_actors": actors,
        "local_runs": local,
        "ray_runs": on_ray,
        "ray_over_local": round(best_ray / best_local, 3),
        "ray_over_local_median_round": round(
            float(np.median([b["images_per_s"] / a["images_per_s"] for a, b in zip(local, on_ray)])), 3
        ),
        "ratio_per_round": [round(b["images_per_s"] / a["images_per_s"], 3) for a, b in zip(local, on_ray)],
    }


def commit_rate(work: Path, n: int, dim: int = 512, batch: int = 256) -> dict[str, Any]:
    """The driver alone: ingestion with :class:`InstantRemote` over ``n`` small files, and the write path."""
    folder = work / "tiny"
    folder.mkdir(exist_ok=True)
    from PIL import Image

    for i in range(n):  # distinct contents: one content per file, as in a photo library
        Image.new("RGB", (8, 8), (i % 256, i // 256 % 256, i // 65536)).save(folder / f"{i:07d}.png")
    hashed: dict[Path, str | OSError] = {p: sha256_file(p) for p in folder.iterdir()}
    store = Store.create(work / "commit-index", {"model": {"name": "bench", "arch": "bench", "dim": dim}})
    try:
        started = time.perf_counter()
        report = ingest(
            store,
            folder,
            embedder=lambda: None,  # type: ignore[arg-type,return-value]
            transcriber=lambda: None,
            remote=InstantRemote(dim, batch, hashed),
        )
        whole = time.perf_counter() - started
        assert report.images_embedded == n, report.images_embedded
    finally:
        store.close()
    store = Store.create(work / "write-index", {"model": {"name": "bench", "arch": "bench", "dim": dim}})
    rng = np.random.default_rng(1)
    try:
        started = time.perf_counter()
        for first in range(0, n, batch):
            v = rng.standard_normal((min(batch, n - first), dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            with store.write("image") as tx:
                mids = db.add_image_medias(tx.conn, [f"{first + i:064x}" for i in range(len(v))])
                tx.added("image", db.add_embeddings(tx.conn, "image", v, mids), v)
        store.save_vectors()
        write_only = time.perf_counter() - started
    finally:
        store.close()
    return {
        "images": n,
        "batch": batch,
        "driver_images_per_s": round(n / whole, 1),
        "write_path_vectors_per_s": round(n / write_only, 1),
        "note": "driver: scan, photo metadata, rows, FAISS and commit per image; hashing and embedding "
        "done by the cluster, answering at once",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="JPEGs of 1600x1200 for the overhead runs")
    ap.add_argument("--model", default="ViT-B-32-256")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--actors", type=int, default=2, help="image actors of the Ray run")
    ap.add_argument("--commit-n", type=int, default=20000, help="images for the driver's commit rate")
    ap.add_argument("--skip-search", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="mmsearch-bench-ray-"))
    results: dict[str, Any] = {
        "machine": {
            "cpu": cpu_model(),
            "cpu_flags": cpu_flags(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "packages": package_versions(["ray", "faiss-cpu", "onnxruntime", "sqlalchemy"]),
            "loadavg_at_start": os.getloadavg(),
        },
    }
    try:
        folder = work / "photos"
        make_folder(folder, args.n, (1600, 1200))
        print(f"Ray overhead: {args.n} JPEGs 1600x1200, {args.model} (random weights), ONNX int8")
        results["overhead"] = {
            "images": args.n,
            "model": f"{args.model} (random weights), onnx-int8",
            **overhead(work, folder, args.model, args.rounds, args.actors),
        }
        o = results["overhead"]
        print(
            f"  ray / local: best run of each {o['ray_over_local']}, "
            f"median of rounds {o['ray_over_local_median_round']}"
        )
        print(f"Driver commit rate: {args.commit_n} images")
        results["commit"] = commit_rate(work, args.commit_n)
        print(
            f"  driver {results['commit']['driver_images_per_s']} img/s, "
            f"write path {results['commit']['write_path_vectors_per_s']} vectors/s"
        )
        if not args.skip_search:
            from bench_ray_search import measure

            results["sharded_search"] = measure()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / 'ray.json'}")


if __name__ == "__main__":
    main()
