"""Whole `mmsearch` processes, torch-free against the torch path (issue 16), and rclip 3.3 where it can run.

Measured, each in a new process, alternating the variants round by round so all see the same machine load:

* ``index`` of a generated folder of camera-size JPEGs (default 300 at 1600x1200, ``--quick`` 40) into a new
  index: wall time, images/s, peak RSS (``wait4`` of that child), and the time from process start to the
  first committed batch (the catalog polled read-only every 20 ms);
* a cold ``query "…" --local`` on an index of ``--vectors`` (100k) synthetic image vectors: wall, peak RSS.

Variants: ``onnx`` is the shipped path (ONNX Runtime only: the model's export is cached); ``torch`` is the
same command with ``MMSEARCH_TORCH_FREE=0``, the start-up before torch-free loading (torch and open_clip
imported, the model instantiated, ONNX image tower for indexing, torch text tower for queries); ``rclip`` is
rclip 3.3 (``--rclip PATH``, or found on PATH) given the same random weights exported in its layout
(fp32 visual.onnx / textual.onnx), since its own download cannot run offline.

The model is ViT-B-32-256 with seeded random weights (speed does not depend on them), exported once to the
user cache (:func:`mmsearch.accel.default_cache_dir`) before timing. Then, with the demo model, whether
anything is lost: text→image retrieval on generated held-out images with the torch fp32 towers against the
torch-free int8 towers (precision@1/@5 by the world's relevance rule, same top-1, top-5 overlap, cosines).

    python benchmarks/bench_startup.py [--n 300] [--quick] [--rounds 3] [--query-runs 6] [--rclip PATH]
        [--variants onnx] [--skip-quality] [--query-only]

``--variants onnx`` measures only the shipped path (first commit, cold query) and keeps the other variants'
runs and medians from the JSON it rewrites (``carried_over`` says which, and from which run);
``--skip-quality`` likewise keeps the demo quality figures, and ``--query-only`` every ``index`` figure
(rclip then indexes a few photos, untimed, to have a database to grow to ``--vectors`` rows).

Writes ``benchmarks/results/startup.json``. Run time on the 2-core reference machine: see its ``seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _machine import cpu_flags, cpu_model, package_versions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ingest import make_folder  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "startup.json"
MODEL = "ViT-B-32-256"
QUERIES = ["a dog running on the beach", "red car parked in the snow", "birthday cake with candles"]
GOALS = {
    "index_vs_rclip_img_s": 3.0,  # at least 3x rclip's images/s
    "first_commit_s": 1.5,
    "index_peak_rss_gb": 0.8,
    "cold_query_median_s": 1.0,
}
RCLIP_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"  # rclip 3.3's model folder


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "versions": package_versions(
            ("torch", "open_clip_torch", "onnxruntime", "numpy", "faiss-cpu", "rclip")
        ),
        "loadavg_at_start": os.getloadavg(),
    }


def mmsearch_command() -> list[str]:
    """The installed console script itself (not a pyenv shim, which adds its own start-up time)."""
    script = Path(sysconfig.get_path("scripts")) / "mmsearch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mmsearch"]


def child_env(torch_free: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MMSEARCH_IMAGE_TOWER", "MMSEARCH_TORCH_FREE")}
    # This sandbox sets PYTHONDONTWRITEBYTECODE, which makes every run recompile mmsearch from source; a
    # user's installation has its bytecode cached, so time that.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["HF_HUB_OFFLINE"] = "1"
    env["MMSEARCH_TORCH_FREE"] = "1" if torch_free else "0"
    return env


def run_child(
    cmd: list[str], env: dict[str, str], cwd: Path | None = None, catalog: Path | None = None
) -> dict[str, Any]:
    """Run one process to its end: wall and CPU seconds, peak RSS (its VmHWM, read every 20 ms: the last
    reading is kept, the one from before ``exec`` is the parent's), and with ``catalog`` the seconds until a
    first image is committed there (polled every 20 ms, read-only)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err)
        first: float | None = None
        hwm = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            hwm = _peak_rss_kb(proc.pid) or hwm
            if catalog is not None and first is None and _committed_images(catalog):
                first = time.perf_counter() - t0
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.read().decode()[-2000:]}")
        out.seek(0)
        result = {
            "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": hwm / 1024,
            "loadavg_1m": load,  # the machine's load when the process started
            "stdout": out.read().decode(),
        }
    if catalog is not None:
        result["first_commit_s"] = first
    return result


def _peak_rss_kb(pid: int) -> int | None:
    """The process's peak RSS so far (VmHWM). Not ``wait4``'s ru_maxrss: a child started by vfork counts the
    parent's memory there, however small the program it then runs."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def _committed_images(catalog: Path) -> bool:
    if not catalog.exists():
        return False
    try:
        con = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True, timeout=0.05)
        try:
            return bool(con.execute("SELECT 1 FROM media WHERE kind = 'image' LIMIT 1").fetchone())
        finally:
            con.close()
    except sqlite3.Error:
        return False  # not created yet, or locked for a moment


def ensure_export(model: str) -> dict[str, Any]:
    """The model's ONNX towers and manifest in the user cache (exported by a child process if missing)."""
    from mmsearch.accel import default_cache_dir
    from mmsearch.identity import ModelSpec
    from mmsearch.onnx_embedder import find_exported

    identity = ModelSpec(model, pretrained="random").expected_identity()
    cache = default_cache_dir()
    if find_exported(identity, quantize=True, cache_dirs=[cache]) is None:
        print(f"exporting {model} (random weights) to {cache} …", flush=True)
        code = (
            "from mmsearch.clip_torch import export_towers; from mmsearch.identity import ModelSpec; "
            "from mmsearch.accel import default_cache_dir; "
            f"assert export_towers(ModelSpec({model!r}, pretrained='random'), default_cache_dir())"
        )
        subprocess.run([sys.executable, "-c", code], check=True, env=child_env(True))
    found = find_exported(identity, quantize=True, cache_dirs=[cache])
    assert found is not None
    manifest, image, text = found
    return {
        "cache": str(cache),
        "image_tower": image.name,
        "image_mb": round(image.stat().st_size / 1e6, 1),
        "text_tower": text.name,
        "text_mb": round(text.stat().st_size / 1e6, 1),
        "text_int8": manifest["text_int8"],
        # The int8 text tower against torch fp32 on the export's probe sentences (random weights).
        "text_probe_cosine_min": json.loads(text.with_suffix(".json").read_text()).get("probe_cosine_min"),
    }


# --- rclip -------------------------------------------------------------------------------------------
def find_rclip(given: str | None) -> str | None:
    if given:
        return given if Path(given).exists() else None
    return shutil.which("rclip")


def rclip_version(rclip: str) -> str:
    out = subprocess.run([rclip, "--version"], capture_output=True, text=True, check=False)
    return f"{rclip}: {(out.stdout or out.stderr).strip()}"


def rclip_datadir(dest: Path, model: str) -> Path:
    """rclip 3.3's data folder holding our fp32 towers of the same random weights under its file names (its
    graphs take an input named "input"; its own weights download from a hub this machine cannot reach)."""
    import onnx

    from mmsearch.accel import cache_file_name, default_cache_dir, tower_key
    from mmsearch.identity import ModelSpec
    from mmsearch.onnx_text import text_file
    from mmsearch.tokenizer import default_bpe_path

    key = tower_key(ModelSpec(model, pretrained="random").expected_identity())
    cache = default_cache_dir()
    image_fp32, text_fp32 = cache / cache_file_name(key, False), text_file(cache, key, False)
    if not (image_fp32.is_file() and text_fp32.is_file()):
        code = (
            "from mmsearch.clip_torch import export_towers; from mmsearch.identity import ModelSpec; "
            "from mmsearch.accel import default_cache_dir; "
            f"export_towers(ModelSpec({model!r}, pretrained='random'), default_cache_dir(), quantize=False)"
        )
        subprocess.run([sys.executable, "-c", code], check=True, env=child_env(True))
    folder = dest / RCLIP_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    for src, name in ((image_fp32, "visual.onnx"), (text_fp32, "textual.onnx")):
        graph = onnx.load(str(src))
        old = graph.graph.input[0].name
        graph.graph.input[0].name = "input"
        for node in graph.graph.node:
            node.input[:] = ["input" if x == old else x for x in node.input]
        onnx.save(graph, str(folder / name))
    (dest / "tokenizer").mkdir(exist_ok=True)
    shutil.copy(default_bpe_path(), dest / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz")
    return dest


def rclip_env(datadir: Path) -> dict[str, str]:
    env = child_env(True)
    env["RCLIP_DATADIR"] = str(datadir)
    return env


def rclip_seed(folder: Path, seed: Path, datadir: Path, rclip: str, n: int = 8) -> Path:
    """rclip's database made by indexing ``n`` photos of ``folder`` copied to ``seed`` (untimed): what
    :func:`rclip_synthetic` grows when only queries are measured. Returns ``seed``, where rclip then runs."""
    seed.mkdir(parents=True, exist_ok=True)
    for photo in sorted(folder.glob("*.jpg"))[:n]:
        shutil.copy(photo, seed / photo.name)
    (datadir / "db.sqlite3").unlink(missing_ok=True)
    run_child([rclip, "-t", "1", "-f", QUERIES[0]], rclip_env(datadir), cwd=seed)
    return seed


def rclip_synthetic(datadir: Path, folder: Path, vectors: np.ndarray) -> None:
    """Grow rclip's database (made by an indexing run) to ``len(vectors)`` rows under ``folder``."""
    con = sqlite3.connect(datadir / "db.sqlite3")
    with con:
        con.executemany(
            "INSERT INTO images (filepath, modified_at, size, vector) VALUES (?, 0, 1, ?)",
            ((str(folder / f"synthetic_{i:07d}.jpg"), v.tobytes()) for i, v in enumerate(vectors)),
        )
    con.close()


# --- the 100k index ------------------------------------------------------------------------------------
def build_query_index(dest: Path, n_vectors: int, model: str) -> tuple[Path, np.ndarray]:
    """An index of ``n_vectors`` synthetic L2-normalised image vectors, written through the catalog."""
    from _synthetic import add_random_images

    import mmsearch

    with mmsearch.Index.create(dest, model=model, pretrained="random") as idx:
        vecs = add_random_images(idx.store, n_vectors)
    return dest, vecs


# --- quality -----------------------------------------------------------------------------------------
def demo_quality(n_images: int) -> dict[str, Any]:
    """Text→image retrieval with the demo model: torch fp32 towers against the torch-free int8 towers."""
    from mmsearch.accel import cosines
    from mmsearch.clip_torch import ClipEmbedder
    from mmsearch.demo import world
    from mmsearch.identity import ModelSpec
    from mmsearch.model import load_embedder
    from mmsearch.onnx_embedder import OnnxEmbedder

    reference = ClipEmbedder(ModelSpec("demo"), device="cpu")  # torch only: nothing exported is used
    onnx = load_embedder(ModelSpec("demo"), device="cpu", image_tower="onnx-int8")
    assert isinstance(onnx, OnnxEmbedder)
    items = world.generate(n_images, 2024)
    attrs, images = [a for a, _ in items], [im for _, im in items]
    captions = world.held_out_queries(attrs)
    texts = [c.text for c in captions]
    vecs = {
        "torch_fp32": (reference.embed_texts(texts), reference.embed_images(images)),
        "onnx_int8": (onnx.embed_texts(texts), onnx.embed_images(images)),
    }
    result: dict[str, Any] = {"images": n_images, "queries": len(texts), "phrasing": world.HELD_OUT_PHRASING}
    tops: dict[str, np.ndarray] = {}
    for name, (t, i) in vecs.items():
        order = np.argsort(-(t @ i.T), axis=1)[:, :5]
        tops[name] = order
        hits = np.array([[world.matches(c.stated, attrs[j]) for j in row] for c, row in zip(captions, order)])
        result[name] = {
            "precision_at_1": round(float(hits[:, 0].mean()), 4),
            "precision_at_5": round(float(hits.mean()), 4),
        }
    a, b = tops["torch_fp32"], tops["onnx_int8"]
    result["same_top1"] = round(float((a[:, 0] == b[:, 0]).mean()), 4)
    result["top5_overlap"] = round(float(np.mean([len(set(x) & set(y)) / 5 for x, y in zip(a, b)])), 4)
    for kind, idx in (("text", 0), ("image", 1)):
        cos = cosines(vecs["onnx_int8"][idx], vecs["torch_fp32"][idx])
        result[f"{kind}_cosine_int8_vs_torch"] = {
            "mean": round(float(cos.mean()), 6),
            "min": round(float(cos.min()), 6),
        }
    return result


def summary(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="40 photos, 20k vectors, 1 round: a smoke test")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--query-runs", type=int, default=6)
    ap.add_argument("--demo-images", type=int, default=200)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--rclip", help="rclip executable (default: `rclip` on PATH, skipped if none)")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "mmsearch-bench-jpegs")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--variants",
        type=lambda v: v.split(","),
        help="comma-separated subset of onnx,torch,rclip to measure; the others are kept from --out",
    )
    ap.add_argument("--skip-quality", action="store_true", help="keep the demo quality figures from --out")
    ap.add_argument("--query-only", action="store_true", help="measure cold queries only; keep index figures")
    args = ap.parse_args()
    if args.quick:
        args.n, args.vectors, args.rounds, args.query_runs, args.demo_images = 40, 20_000, 1, 2, 60
    started = time.monotonic()
    result: dict[str, Any] = {"benchmark": "startup", "machine": machine()}
    previous = json.loads(args.out.read_text()) if args.out.is_file() else None
    if (args.variants or args.skip_quality or args.query_only) and previous is None:
        ap.error(
            f"--variants, --skip-quality and --query-only keep figures from {args.out}, which does not exist"
        )

    export = ensure_export(args.model)
    folder = args.data / f"startup-{args.n}"
    make_folder(folder, args.n, (1600, 1200))
    for extra in sorted(folder.glob("*.jpg"))[args.n :]:
        extra.unlink()
    n = len(list(folder.glob("*.jpg")))
    rclip = find_rclip(args.rclip)
    work = Path(tempfile.mkdtemp(prefix="mmsearch-bench-startup-"))
    variants = ["onnx", "torch"] + (["rclip"] if rclip else [])
    if args.variants:
        unknown = set(args.variants) - {"onnx", "torch", "rclip"}
        if unknown or "onnx" not in args.variants:
            ap.error(f"--variants: a subset of onnx,torch,rclip including onnx (not {','.join(unknown)})")
        carried = [v for v in previous["setup"]["variants"] if v not in args.variants] if previous else []
        variants = [v for v in variants if v in args.variants]
        rclip = rclip if "rclip" in variants else None
    else:
        carried = []
    result["setup"] = {
        "photos": n,
        "size": [1600, 1200],
        "model": f"{args.model} (random weights)",
        "export": export,
        "vectors": args.vectors,
        "rounds": args.rounds,
        "query_runs": args.query_runs,
        "variants": variants + carried,
        "rclip": rclip_version(rclip) if rclip else "not found: torch vs onnx only",
    }
    if carried:
        assert previous is not None
        result["setup"]["rclip"] = previous["setup"]["rclip"]
    try:
        datadir = rclip_datadir(work / "rclip-data", args.model) if rclip else None
        index_runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        rclip_folder, rclip_photos = folder, n  # where rclip runs, and how many photos it indexed there
        if args.query_only and datadir is not None:
            assert rclip is not None
            rclip_folder = rclip_seed(folder, work / "rclip-seed", datadir, rclip)
            rclip_photos = len(list(rclip_folder.glob("*.jpg")))
        for r in range(0 if args.query_only else args.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for variant in order:
                target = work / f"index-{variant}"
                shutil.rmtree(target, ignore_errors=True)
                if variant == "rclip":
                    assert datadir is not None and rclip is not None
                    (datadir / "db.sqlite3").unlink(missing_ok=True)
                    run = run_child([rclip, "-t", "1", "-f", QUERIES[0]], rclip_env(datadir), cwd=folder)
                else:
                    cmd = [*mmsearch_command(), "index", str(folder), "--index", str(target)]
                    cmd += ["--model", args.model, "--pretrained", "random", "--json"]
                    run = run_child(cmd, child_env(variant == "onnx"), catalog=target / "catalog.sqlite")
                    assert json.loads(run["stdout"])["runs"][0]["images_embedded"] == n
                run.pop("stdout")
                run["img_s"] = n / run["wall_s"]
                index_runs[variant].append(
                    {k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()}
                )
                print(
                    f"index  {variant:5s} round {r + 1}: {run['wall_s']:6.2f} s  {run['img_s']:6.2f} img/s  "
                    f"first commit {run.get('first_commit_s') or float('nan'):5.2f} s  "
                    f"peak {run['peak_rss_mb']:6.0f} MB",
                    flush=True,
                )

        print(f"building an index of {args.vectors} synthetic vectors …", flush=True)
        qindex, vecs = build_query_index(work / "query-index", args.vectors, args.model)
        if datadir is not None:
            rclip_synthetic(datadir, rclip_folder, vecs[: max(0, args.vectors - rclip_photos)])
        query_runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for r in range(args.query_runs):
            text = QUERIES[r % len(QUERIES)]
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for variant in order:
                if variant == "rclip":
                    assert datadir is not None and rclip is not None
                    run = run_child(
                        [rclip, "-n", "-t", "10", "-f", text], rclip_env(datadir), cwd=rclip_folder
                    )
                else:
                    cmd = [*mmsearch_command(), "query", text, "--index", str(qindex), "--local", "-k", "10"]
                    run = run_child(cmd, child_env(variant == "onnx"))
                run.pop("stdout")
                query_runs[variant].append({k: round(v, 3) for k, v in run.items()})
                print(
                    f"query  {variant:5s} run {r + 1}: {run['wall_s']:5.2f} s  peak {run['peak_rss_mb']:5.0f} MB",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.query_only:  # every index figure as the previous file has it
        assert previous is not None
        index_runs = {v: previous["index_runs"][v] for v in variants}
        # The run that measured them: the previous file's, or the one that file kept them from.
        earlier_index = previous.get("carried_over", {}).get("index_runs")
        result["carried_over"] = {
            "index_runs": earlier_index
            if isinstance(earlier_index, dict)
            else {
                "loadavg_at_start": previous["machine"].get("loadavg_at_start"),
                "loadavg_at_end": previous["machine"].get("loadavg_at_end"),
            }
        }
    medians = {
        v: {
            "index_img_s": summary(index_runs[v], "img_s"),
            "index_wall_s": summary(index_runs[v], "wall_s"),
            "first_commit_s": summary(index_runs[v], "first_commit_s"),
            "index_peak_rss_mb": summary(index_runs[v], "peak_rss_mb"),
            "index_cpu_s": summary(index_runs[v], "cpu_s"),
            "cold_query_s": summary(query_runs[v], "wall_s"),
            "query_peak_rss_mb": summary(query_runs[v], "peak_rss_mb"),
            "cold_query_cpu_s": summary(query_runs[v], "cpu_s"),
        }
        for v in variants
    }
    if carried:  # measured by an earlier run of this benchmark: kept as it wrote them
        assert previous is not None
        for v in carried:
            index_runs[v], query_runs[v] = previous["index_runs"][v], previous["query_runs"][v]
            medians[v] = previous["medians"][v]
        earlier = previous.get("carried_over", {})
        result["carried_over"] = {
            **result.get("carried_over", {}),
            "variants": carried,
            # The run that measured them: the previous file's, or the one that file kept them from.
            "from_run": earlier["from_run"]
            if set(carried) <= set(earlier.get("variants", ()))
            else {
                "loadavg_at_start": previous["machine"].get("loadavg_at_start"),
                "loadavg_at_end": previous["machine"].get("loadavg_at_end"),
                "versions": previous["machine"].get("versions"),
            },
        }
    onnx, torch_ = medians["onnx"], medians["torch"]
    result["index_runs"], result["query_runs"], result["medians"] = index_runs, query_runs, medians
    result["onnx_vs_torch"] = {
        "index_img_s": round(onnx["index_img_s"] / torch_["index_img_s"], 2),
        "first_commit": round(torch_["first_commit_s"] / onnx["first_commit_s"], 2),
        "index_peak_rss": round(onnx["index_peak_rss_mb"] / torch_["index_peak_rss_mb"], 2),
        "cold_query": round(torch_["cold_query_s"] / onnx["cold_query_s"], 2),
    }
    measured = {
        "first_commit_s": onnx["first_commit_s"],
        "index_peak_rss_gb": round(onnx["index_peak_rss_mb"] / 1024, 3),
        "cold_query_median_s": onnx["cold_query_s"],
    }
    if "rclip" in medians:
        measured["index_vs_rclip_img_s"] = round(onnx["index_img_s"] / medians["rclip"]["index_img_s"], 2)
    at_least = {"index_vs_rclip_img_s"}  # the others are ceilings
    goals = {
        name: {
            "goal": GOALS[name],
            "measured": value,
            "met": value is not None and (value >= GOALS[name] if name in at_least else value <= GOALS[name]),
        }
        for name, value in measured.items()
    }
    if "torch" in carried:  # onnx measured now, torch by the earlier run: another machine load
        result["onnx_vs_torch"]["across_runs"] = True
    if "rclip" in carried:
        goals["index_vs_rclip_img_s"]["across_runs"] = True
    result["goals"] = goals
    if args.skip_quality:
        assert previous is not None
        result["demo_quality"] = previous["demo_quality"]
        result.setdefault("carried_over", {})["demo_quality"] = True
    else:
        print("measuring demo retrieval: torch fp32 towers vs torch-free int8 towers …", flush=True)
        result["demo_quality"] = demo_quality(args.demo_images)
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    result["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps({"medians": medians, "onnx_vs_torch": result["onnx_vs_torch"], "goals": goals}, indent=1)
    )
    print("demo quality:", json.dumps(result["demo_quality"], indent=1))
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
