"""Re-index benchmark: first index of N small files, a no-op re-index of the unchanged folder, and a
re-index after renaming a folder of 500 images with their captions (which must need no model either).

The folder holds ``--n`` tiny PNGs (distinct colours, so every one is distinct content) each with a
one-line caption sidecar, so a folder of 10,000 images is 20,000 files. The model is the tiny random
OpenCLIP config of the test suite: this measures the engine's bookkeeping (scan, stat, catalog reads,
caption comparison), not a real model, whose cost a no-op re-index must not pay at all. The no-op run
also checks that no model was loaded and nothing was embedded.

Usage: python benchmarks/bench_reindex.py [--n 10000] [--repeat 3]
Writes benchmarks/results/reindex.json.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_model, package_versions
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import mmsearch  # noqa: E402

TINY_MODEL = str(ROOT / "tests" / "data" / "tiny-clip.json")


def machine_facts() -> dict[str, object]:
    cpu = cpu_model()
    versions = package_versions(("torch", "open_clip_torch", "faiss-cpu", "sqlalchemy", "pillow", "numpy"))
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": __import__("sqlite3").sqlite_version,
        "versions": versions,
        "loadavg_at_start": os.getloadavg(),
    }


def make_folder(root: Path, n: int) -> float:
    """n tiny PNGs in folders of 500, each with a caption sidecar; returns seconds taken."""
    t0 = time.perf_counter()
    for i in range(n):
        sub = root / f"d{i // 500:03d}"
        if i % 500 == 0:
            sub.mkdir(parents=True)
        colour = (i % 256, (i // 256) % 256, (i // 65536) % 256)
        Image.new("RGB", (8, 8), colour).save(sub / f"img{i:05d}.png", compress_level=1)
        (sub / f"img{i:05d}.txt").write_text(f"caption number {i}\n")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="images (each with a caption file)")
    ap.add_argument("--repeat", type=int, default=3, help="no-op re-index runs (the median is reported)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one no-op run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reindex.json")
    args = ap.parse_args()

    facts = machine_facts()
    with tempfile.TemporaryDirectory(prefix="bench-reindex-") as tmp:
        media, index = Path(tmp) / "media", Path(tmp) / "index"
        gen_s = make_folder(media, args.n)
        print(f"generated {args.n} images + {args.n} captions in {gen_s:.1f} s")

        t0 = time.perf_counter()
        with mmsearch.Index.create(index, model=TINY_MODEL, pretrained="random") as idx:
            first = idx.add_folder(media)
        first_s = time.perf_counter() - t0
        assert first.images_embedded == args.n and first.captions_added == args.n, first
        print(f"first index: {first_s:.1f} s ({args.n / first_s:.0f} images/s, tiny model, incl. model load)")

        noop_runs = []
        for r in range(args.repeat):
            t0 = time.perf_counter()
            # A fresh open each time, as a new `mmsearch index` run would do (no warm in-process state).
            with mmsearch.Index.open(index) as idx:
                prof = cProfile.Profile() if args.profile and r == 0 else None
                if prof:
                    prof.enable()
                report = idx.add_folder(media)
                if prof:
                    prof.disable()
                model_loaded = idx._embedder is not None
            noop_runs.append(time.perf_counter() - t0)
            assert report.unchanged == args.n and not model_loaded, report
            assert report.images_embedded == report.captions_added == report.captions_removed == 0, report
            if prof:
                pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        noop_runs.sort()
        noop_s = noop_runs[len(noop_runs) // 2]
        print(
            f"no-op re-index of {args.n} images + {args.n} captions: {noop_s:.2f} s median of "
            f"{args.repeat} (runs: {', '.join(f'{s:.2f}' for s in noop_runs)}); "
            f"first/no-op ratio {first_s / noop_s:.1f}x"
        )

        # Rename one folder of 500 images with their captions: linked by content and caption text, no model.
        moved = min(500, args.n)
        os.rename(media / "d000", media / "renamed-d000")
        t0 = time.perf_counter()
        with mmsearch.Index.open(index) as idx:
            renamed = idx.add_folder(media)
            rename_model_loaded = idx._embedder is not None
        rename_s = time.perf_counter() - t0
        assert (renamed.linked, renamed.files_removed, renamed.captions_added) == (moved, moved, moved), (
            renamed
        )
        assert renamed.images_embedded == renamed.captions_embedded == 0 and not rename_model_loaded, renamed
        print(
            f"re-index after renaming a folder of {moved} images + captions: {rename_s:.2f} s, no model loaded"
        )

    result = {
        "benchmark": "reindex",
        "n_images": args.n,
        "n_files": 2 * args.n,
        "model": "tests/data/tiny-clip.json (random weights)",
        "first_index_s": round(first_s, 3),
        "noop_reindex_s": round(noop_s, 3),
        "noop_reindex_runs_s": [round(s, 3) for s in noop_runs],
        "first_over_noop_ratio": round(first_s / noop_s, 2),
        "noop_model_loaded": False,
        "renamed_folder_images": moved,
        "rename_reindex_s": round(rename_s, 3),
        "rename_model_loaded": rename_model_loaded,
        "machine": facts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
