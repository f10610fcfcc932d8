"""Run every benchmark one after another, then write the markdown table for the README.

    python benchmarks/run_all.py                       # default sizes (the issue's sizes where they fit)
    python benchmarks/run_all.py --quick               # smoke sizes, a few minutes
    python benchmarks/run_all.py --only ingest,ann     # a subset
    python benchmarks/run_all.py --args ann="--n 200000" --args ingest="--n 300"

Each benchmark runs in its own process (so one's imports and threads do not slow the next), writes its
``benchmarks/results/<name>.json`` and prints its own figures; ``report.py`` then turns all result files
into ``benchmarks/results/SUMMARY.md``. The wall time of every step is written to
``benchmarks/results/run_all.json``; the total for the default sizes on the 2-core reference machine is
quoted in the README. Benchmarks run sequentially on purpose: on two cores, any two at once would
measure each other.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name -> (script, default arguments, --quick arguments). Default sizes are the where they fit the
# 15-minute budget: the ANN set is the full 1M vectors; speech keeps its 3.6-minute recording (the target
# needs >= 3 minutes) and skips openai-whisper's slow plain-library rows; torch.compile is left out of the
# model-speed comparison (minutes of compiling for a variant already measured and rejected).
STEPS: dict[str, tuple[str, list[str], list[str]]] = {
    "ann": ("bench_ann.py", [], ["--quick", "--queries", "200"]),
    "model_speed": (
        "bench_model_speed.py",
        ["--archs", "ViT-B-32-256", "--rounds", "2", "--demo-images", "200"],
        ["--archs", "ViT-B-32-256", "--rounds", "1", "--demo-images", "60"],
    ),
    "ingest": ("bench_ingest.py", ["--n", "500"], ["--n", "96"]),
    "reindex": ("bench_reindex.py", ["--n", "10000", "--repeat", "3"], ["--n", "1000", "--repeat", "1"]),
    "speech": ("bench_speech.py", ["--core"], ["--quick", "--core"]),
    "demo_quality": ("bench_demo_quality.py", [], ["--images", "72", "--extra-spoken", "2"]),
    "live_reads": ("bench_live_reads.py", ["--seconds", "30"], ["--n", "20000", "--seconds", "5"]),
    "startup": ("bench_startup.py", [], ["--quick"]),
    "query": ("bench_query.py", [], ["--quick"]),
    "filters": ("bench_filters.py", [], ["--quick"]),
    "no_match": ("bench_no_match.py", [], ["--quick"]),
    "spoken_query": (
        "bench_spoken_query.py",
        [],
        ["--images", "72", "--extra", "0", "--voices", "piper,espeak-ng", "--prompt-forms", "4"],
    ),
    "server": (
        "bench_server.py",
        ["--requests", "1000", "--cold-runs", "2"],
        ["--vectors", "10000", "--requests", "200", "--cold-runs", "1", "--warm-runs", "3"],
    ),
    "video": ("bench_video.py", [], ["--quick"]),
    "photos": ("bench_photos.py", [], ["--quick"]),
    # Ray's overhead and the driver's rate; the sharded search is its own step (IVF shards build for minutes).
    "ray": (
        "bench_ray.py",
        ["--n", "1200", "--skip-search"],
        ["--n", "60", "--rounds", "1", "--commit-n", "2000", "--skip-search"],
    ),
    "ray_search": ("bench_ray_search.py", [], ["--quick"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes (figures not comparable)")
    ap.add_argument("--only", help=f"comma list of: {','.join(STEPS)}")
    ap.add_argument("--skip", default="", help="comma list of benchmarks to leave out")
    ap.add_argument(
        "--args",
        action="append",
        default=[],
        metavar='NAME="ARGS"',
        help='extra arguments for one benchmark (after its defaults, so they win), e.g. ann="--n 200000"',
    )
    args = ap.parse_args()

    names = args.only.split(",") if args.only else list(STEPS)
    skip = {s for s in args.skip.split(",") if s}
    extra: dict[str, list[str]] = {}
    for item in args.args:
        name, _, rest = item.partition("=")
        extra.setdefault(name, []).extend(shlex.split(rest))
    unknown = (set(names) | skip | set(extra)) - set(STEPS)
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; choose from {', '.join(STEPS)}")

    steps = []
    started = time.perf_counter()
    for name in names:
        if name in skip:
            continue
        script, default, quick = STEPS[name]
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else default), *extra.get(name, [])]
        print(f"\n=== {name}: {shlex.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        code = subprocess.call(cmd, cwd=HERE.parent)
        seconds = time.perf_counter() - t
        steps.append(
            {"name": name, "command": shlex.join(cmd[1:]), "seconds": round(seconds, 1), "exit": code}
        )
        print(
            f"=== {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds / 60:.1f} min",
            flush=True,
        )

    total = time.perf_counter() - started
    summary = {
        "benchmark": "run_all",
        "quick": args.quick,
        "steps": steps,
        "total_seconds": round(total, 1),
        "loadavg_at_end": os.getloadavg(),
    }
    if not args.quick and not args.only and not skip and not extra:
        (RESULTS / "run_all.json").write_text(json.dumps(summary, indent=2) + "\n")  # the default run only
    report = subprocess.call([sys.executable, str(HERE / "report.py")], cwd=HERE.parent)
    print(f"\nall benchmarks: {total / 60:.1f} min")
    for s in steps:
        print(f"  {s['name']:<14}{s['seconds'] / 60:6.1f} min  {'ok' if s['exit'] == 0 else 'FAILED'}")
    failed = [s["name"] for s in steps if s["exit"] != 0]
    if failed or report != 0:
        print(f"failed: {', '.join(failed) or 'report.py'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
