"""`mmsearch serve` under load, and terminal query time with and without a warm server.

1. Builds an index on ViT-B-32 (seeded random weights: speed, not meaning) holding a few dozen real images
   plus ``--vectors`` synthetic L2-normalised image vectors written through the catalog (100k by default).
2. Load test: a server on 127.0.0.1 (``python -m mmsearch.server``), ``--requests`` requests from
   ``--threads`` threads on keep-alive connections, in the mix the web page makes (a search, the 12
   thumbnails of its hits, an item's details, a few media range reads, now and then the stats). No
   response may be 5xx. p50/p95 per kind and overall →
   ``benchmarks/results/server.json``.
3. Terminal: wall time of ``mmsearch query "…"`` as a new process each time, cold (no server: loads torch
   and the model) and warm (a server for the index is up), plus the floor of the warm path (a bare
   stdlib client script). → ``benchmarks/results/terminal_query.json``.

Run: ``python benchmarks/bench_server.py`` (about 6 minutes on an idle 2-core machine; ``--vectors 20000 --requests 500`` for a
quick look). Cold and warm are measured in the same run, on the same index, as ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _machine import cpu_model

if TYPE_CHECKING:
    from mmsearch.client import Server

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUERIES = [
    "a red circle",
    "a small blue square on a white background",
    "three green triangles",
    "a photo of a dog",
    "yellow shapes on black",
    "a large purple star",
    "two orange circles",
    "a sunset over the sea",
]


def machine() -> dict[str, Any]:
    cpu = cpu_model()
    versions: dict[str, str] = {}
    for mod in ("torch", "open_clip", "faiss", "fastapi", "uvicorn", "starlette", "sqlalchemy"):
        try:
            versions[mod] = str(__import__(mod).__version__)
        except Exception:  # noqa: BLE001 - a missing library is reported as such
            versions[mod] = "not installed"
    return {
        "cpu": cpu,
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_at_start": os.getloadavg(),
        **versions,
    }


# --- index -------------------------------------------------------------------------------------------
def build_index(dest: Path, n_vectors: int, n_images: int, model: str) -> Path:
    """An index with ``n_images`` real images (ingested normally) and ``n_vectors`` synthetic ones."""
    from _synthetic import add_random_images
    from PIL import Image, ImageDraw

    import mmsearch

    media = dest / "media"
    media.mkdir(parents=True)
    rng = random.Random(0)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    for i in range(n_images):
        c, bg = rng.choice(colours), rng.choice(colours)
        im = Image.new("RGB", (800, 600), bg)
        ImageDraw.Draw(im).ellipse((200, 100, 600, 500), fill=c)
        im.save(media / f"img{i:03d}.jpg", quality=90)
        (media / f"img{i:03d}.txt").write_text(f"a {c} circle on {bg}\n")
    index_dir = dest / "index"
    t0 = time.perf_counter()
    with mmsearch.Index.create(index_dir, model=model, pretrained="random") as idx:
        idx.add_folder(media)
        add_random_images(idx.store, n_vectors)
    print(
        f"index: {n_images} real + {n_vectors} synthetic image vectors ({model}) in {time.perf_counter() - t0:.0f} s"
    )
    return index_dir


# --- server ------------------------------------------------------------------------------------------
def start_server(index: Path, timeout: float = 300) -> tuple[subprocess.Popen[bytes], Server]:
    from mmsearch.client import find_server

    log = open(index / "bench-server.log", "ab")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsearch.server", str(index), "--port", "0"], stdout=log, stderr=log
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: see {index / 'bench-server.log'}")
        server = find_server(index)
        if server is not None:
            return proc, server
        time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("server did not start")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def load_test(server: Server, index: Path, n_requests: int, n_threads: int) -> dict[str, Any]:
    import mmsearch

    with mmsearch.Index.open(index) as idx, idx.store.catalog.read() as conn:
        from sqlalchemy import select

        from mmsearch import db

        real = [
            int(i)
            for (i,) in conn.execute(
                select(db.files.c.id).where(~db.files.c.path.like("/synthetic/%"), db.files.c.kind == "image")
            )
        ]
        synthetic_max = conn.execute(
            select(db.files.c.id).order_by(db.files.c.id.desc()).limit(1)
        ).scalar_one()
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    auth = {"Authorization": f"Bearer {server.token}"}  # what the page's cookie or the CLI sends
    # What the web page does: one search, then the thumbnails of its hits, an item's details now and then,
    # and a few range reads of a file being played. Synthetic hits have no file, so thumbnails and media
    # go to the real images.
    rng = random.Random(1)
    plan: list[tuple[str, str, dict[str, str]]] = []
    while len(plan) < n_requests:
        q = rng.choice(QUERIES).replace(" ", "+")
        target = rng.choice(["images", "images", "captions", "all"])
        plan.append(("search", f"/api/search?q={q}&target={target}&k=12", {}))
        plan.extend(("thumb", f"/api/thumbs/{fid}", {}) for fid in rng.sample(real, min(12, len(real))))
        fid = rng.choice(real) if rng.random() < 0.5 else rng.randint(1, synthetic_max)
        plan.append(("item", f"/api/items/{fid}", {}))
        for _ in range(rng.randint(0, 2)):
            a = rng.randint(0, 2000)
            plan.append(("media-range", f"/api/media/{rng.choice(real)}", {"Range": f"bytes={a}-{a + 4095}"}))
        if rng.random() < 0.05:
            plan.append(("stats", "/api/stats", {}))
    plan = plan[:n_requests]
    lat: dict[str, list[float]] = {}
    codes: dict[int, int] = {}
    errors: list[str] = []
    lock = threading.Lock()
    cursor = iter(plan)

    def worker() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        while True:
            with lock:
                job = next(cursor, None)
            if job is None:
                break
            kind, path, headers = job
            t0 = time.perf_counter()
            try:
                conn.request("GET", path, headers={**auth, **headers})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=120)
                with lock:
                    errors.append(f"{path}: {e!r}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                lat.setdefault(kind, []).append(dt)
                codes[status] = codes.get(status, 0) + 1
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    every = [x for xs in lat.values() for x in xs]
    summary = {
        "requests": n_requests,
        "threads": n_threads,
        "wall_s": round(wall, 2),
        "requests_per_s": round(n_requests / wall, 1),
        "status_codes": {str(k): v for k, v in sorted(codes.items())},
        "server_errors_5xx": sum(v for k, v in codes.items() if k >= 500),
        "transport_errors": errors[:10],
        "p50_ms": round(pct(every, 50) * 1000, 2),
        "p95_ms": round(pct(every, 95) * 1000, 2),
        "by_kind": {
            k: {
                "n": len(xs),
                "p50_ms": round(pct(xs, 50) * 1000, 2),
                "p95_ms": round(pct(xs, 95) * 1000, 2),
                "max_ms": round(max(xs) * 1000, 2),
            }
            for k, xs in sorted(lat.items())
        },
    }
    return summary


# --- terminal ----------------------------------------------------------------------------------------
def mmsearch_command() -> list[str]:
    """The installed console script itself (not a pyenv shim, which adds its own start-up time)."""
    script = Path(sysconfig.get_path("scripts")) / "mmsearch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mmsearch"]


CLIENT_FLOOR = """
import sys
# The package's __init__ imports nothing heavy (names are lazy): client.py is the standard library only.
import mmsearch.client as c
server = c.find_server(sys.argv[1])
assert server, "no server"
r = c.query_server(server, text=sys.argv[2], k=10)
print(len(r["hits"]), r["hits"][0]["path"])
"""


def time_command(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return dt, out.stdout


def terminal_timing(index: Path, cold_runs: int, warm_runs: int) -> dict[str, Any]:
    cmd = mmsearch_command()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # This sandbox sets PYTHONDONTWRITEBYTECODE, which makes every run recompile mmsearch from source; a
    # user's installation has its bytecode cached, so time that.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    query = ["query", "--index", str(index), "-k", "10"]
    cold = []
    for i in range(cold_runs):
        dt, out = time_command([*cmd, *query, QUERIES[i % len(QUERIES)]], env)
        cold.append(dt)
        print(f"  cold #{i + 1}: {dt:.2f} s")
    proc, _server = start_server(index)
    try:
        warm, floor = [], []
        for i in range(warm_runs):
            dt, out = time_command([*cmd, *query, QUERIES[i % len(QUERIES)]], env)
            warm.append(dt)
            print(f"  warm #{i + 1}: {dt:.2f} s")
        for i in range(warm_runs):
            dt, _ = time_command(
                [
                    sys.executable,
                    "-c",
                    CLIENT_FLOOR,
                    str(index),
                    QUERIES[i % len(QUERIES)],
                ],
                env,
            )
            floor.append(dt)
        bare, _ = time_command([sys.executable, "-c", "pass"])
    finally:
        stop_server(proc)
    med_cold, med_warm = statistics.median(cold), statistics.median(warm)
    return {
        "command": " ".join([*cmd, *query, "TEXT"]),
        "cold_s": [round(x, 3) for x in cold],
        "warm_s": [round(x, 3) for x in warm],
        "client_floor_s": [round(x, 3) for x in floor],
        "python_startup_s": round(bare, 3),
        "cold_median_s": round(med_cold, 3),
        "warm_median_s": round(med_warm, 3),
        "warm_max_s": round(max(warm), 3),
        "client_floor_median_s": round(statistics.median(floor), 3),
        "warm_over_cold": round(med_warm / med_cold, 4),
        "target_warm_s": 1.0,
        "warm_meets_target": max(warm[1:] or warm) <= 1.0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--warm-runs", type=int, default=10)
    ap.add_argument("--workdir", type=Path, help="build the index under DIR and keep it (reused if there)")
    ap.add_argument("--note", default="", help="recorded in the results (e.g. which code was measured)")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--skip-terminal", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    facts = machine()
    print(f"machine: {facts['cpu']} × {facts['nproc']}, load {facts['load_avg_at_start']}")
    tmp = None
    if args.workdir and (args.workdir / "index" / "mmsearch.json").exists():
        index = args.workdir / "index"
        print(f"reusing {index}")
    elif args.workdir:
        index = build_index(args.workdir, args.vectors, args.images, args.model)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="mmsearch-bench-server-"))
        index = build_index(tmp, args.vectors, args.images, args.model)
    config = {
        "vectors": args.vectors,
        "real_images": args.images,
        "model": f"{args.model} (random weights)",
        "note": args.note,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_load:
            proc, server = start_server(index)
            try:
                load = load_test(server, index, args.requests, args.threads)
            finally:
                stop_server(proc)
            print(
                f"load: {load['requests']} requests / {load['threads']} threads in {load['wall_s']} s "
                f"({load['requests_per_s']}/s), p50 {load['p50_ms']} ms, p95 {load['p95_ms']} ms, "
                f"5xx {load['server_errors_5xx']}, codes {load['status_codes']}"
            )
            for kind, s in load["by_kind"].items():
                print(f"  {kind:12s} n={s['n']:5d}  p50 {s['p50_ms']:8.2f} ms  p95 {s['p95_ms']:8.2f} ms")
            out = {"benchmark": "server", "machine": facts, "config": config, **load}
            (RESULTS / "server.json").write_text(json.dumps(out, indent=2) + "\n")
            if load["server_errors_5xx"] or load["transport_errors"]:
                print("FAIL: server errors under load")
                return 1
        if not args.skip_terminal:
            term = terminal_timing(index, args.cold_runs, args.warm_runs)
            print(
                f"terminal: cold median {term['cold_median_s']} s, warm median {term['warm_median_s']} s "
                f"(max {term['warm_max_s']} s), warm/cold {term['warm_over_cold']}, stdlib-client floor "
                f"{term['client_floor_median_s']} s, python start-up {term['python_startup_s']} s"
            )
            out = {"benchmark": "terminal_query", "machine": facts, "config": config, **term}
            (RESULTS / "terminal_query.json").write_text(json.dumps(out, indent=2) + "\n")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
