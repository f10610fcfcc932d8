"""An honest "no good match": calibrated confidence against the raw cosine cut, on the shipped demo model.

    python benchmarks/bench_no_match.py [--seed 777] [--images 600] [--no-speech] [--fit-sizes 100000]

Each *collection* is a subset of the demo world (some colours, some shapes), generated from a seed training
never used, captioned in the phrasing training never saw, plus a few Piper-spoken recordings that read
captions aloud (transcript segments). It is indexed with the demo model through the public API
(``Index.create`` / ``add_folder``), then calibrated (``calibrate.ensure_calibrated``).

Queries, labelled by the world's relevance rule (an image answers a text when it has every attribute the
text states):

* *present*: at least one indexed image (for image queries: one indexed caption) answers it;
* *absent*: it names a colour or a shape the collection does not have ("an image with a purple star");
* *near miss*: colour and shape are there but not the combination of the other attributes asked (shown,
  no goal: whether "two small red circles" should be cut when only three large ones exist is a matter of
  taste).

Pairs: text → image (held-out captions stating colour + shape, + size, + background, + count, or all),
image → caption (a fresh rendering of every attribute combination), spoken → image (Piper speaks a
colour + shape query, or one with a size or background, the index's query transcriber hears it, the
transcript is searched as text). Each query's top hit is the best of the target kind's vector index (what
``mode=vector`` ranks first); the query is answered "no good match" when that hit's calibrated confidence
is below the threshold, or, for the raw cut, when its cosine is below ``min_score``.

Reported per collection and pair, and pooled: the share of absent queries answered "no good match" (goal
>= 0.9) and the share of present queries wrongly cut (goal <= 0.05), at ``DEFAULT_MIN_CONFIDENCE`` and
over a sweep of confidences and raw scores. Also, per collection, the percentiles of the known matches the
calibration is fit on (each caption with its image) beside those of a null it is not fit on (each
caption's best image that is not its answer), which moves with how much the captions say; and the fit's
run time on the demo collections and on synthetic indexes (``--fit-sizes``). Prints a table and writes
``benchmarks/results/no_match.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _machine import cpu_model, package_versions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mmsearch  # noqa: E402
from mmsearch import calibrate, db  # noqa: E402
from mmsearch.demo import world  # noqa: E402
from mmsearch.store import Store  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "no_match.json"
GOALS = {"absent_cut_min": 0.9, "present_cut_max": 0.05}
CONFIDENCE_SWEEP = (0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5)
SCORE_SWEEP = (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
# Pair name -> (query kind, target kind) for the calibration.
PAIRS = {
    "text→image": ("text", "image"),
    "image→caption": ("image", "caption"),
    "spoken→image": ("text", "image"),
}
RECORDINGS = 4  # spoken files per collection, each reading three captions
SYNTHETIC_DIM = 512


@dataclass(frozen=True)
class Collection:
    """A subset of the world: the colours and shapes it has, and how much its captions state."""

    name: str
    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    captions: str  # "full": every attribute stated; "partial": a random subset; "minimal": colour + shape

    def has(self, stated: dict[str, Any]) -> bool:
        return stated["colour"] in self.colours and stated["shape"] in self.shapes


COLLECTIONS = (
    Collection(
        "A: 4 colours x 3 shapes, full captions",
        ("red", "green", "blue", "yellow"),
        ("circle", "square", "triangle"),
        "full",
    ),
    Collection(
        "B: 3 colours x 4 shapes, partial captions",
        ("purple", "orange", "red"),
        ("circle", "square", "triangle", "star"),
        "partial",
    ),
    Collection(
        "C: 4 colours x 2 shapes, minimal captions",
        ("green", "blue", "orange", "purple"),
        ("square", "star"),
        "minimal",
    ),
)


@dataclass(frozen=True)
class Query:
    label: str  # present | absent | near_miss
    score: float  # the top hit's cosine
    confidence: float | None
    said: str = ""
    heard: str = ""


def machine() -> dict[str, Any]:
    versions = package_versions(
        ("torch", "open_clip_torch", "faiss-cpu", "faster-whisper", "ctranslate2", "piper-tts", "numpy")
    )
    return {
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        **versions,
    }


# --- the collection ---------------------------------------------------------------------------------------
def write_collection(
    root: Path, spec: Collection, n: int, seed: int, speech: bool
) -> tuple[dict[str, world.Attributes], list[world.Caption]]:
    """Images of ``spec``'s colours and shapes (drawn from ``n`` generated ones) with a held-out caption
    each, and with ``speech`` a few recordings reading captions; returns path -> attributes and the
    captions."""
    media = root / "media"
    (media / "images").mkdir(parents=True)
    rng = random.Random(f"bench-no-match-{seed}")
    truth: dict[str, world.Attributes] = {}
    captions: list[world.Caption] = []
    for i, (attrs, img) in enumerate(world.generate(n, seed)):
        if attrs.colour not in spec.colours or attrs.shape not in spec.shapes:
            continue
        path = media / "images" / f"{i:04d}.png"
        img.save(path)
        stated = {
            "full": list(world.OPTIONAL_ATTRIBUTES),
            "partial": [a for a in world.OPTIONAL_ATTRIBUTES if rng.random() < 0.5],
            "minimal": [],
        }[spec.captions]
        caption = world.held_out_caption(attrs, stated=stated)
        path.with_suffix(".txt").write_text(caption.text + "\n", encoding="utf-8")
        truth[str(path.resolve())] = attrs
        captions.append(caption)
    if speech:
        from mmsearch.tts import synthesize

        (media / "podcast").mkdir()
        for r in range(RECORDINGS):
            said = " ".join(c.text[:1].upper() + c.text[1:] + "." for c in captions[3 * r : 3 * r + 3])
            synthesize(said, media / "podcast" / f"episode_{r}.wav")
    return truth, captions


def label(spec: Collection, stated: dict[str, Any], answers: int) -> str:
    if answers:
        return "present"
    return "near_miss" if spec.has(stated) else "absent"


# --- the queries ------------------------------------------------------------------------------------------
def text_queries() -> list[world.Caption]:
    """Held-out captions of every attribute combination, stating colour + shape and nothing, size,
    background, count, or everything."""
    out: list[world.Caption] = []
    for stated in ((), ("size",), ("background",), ("count",), world.OPTIONAL_ATTRIBUTES):
        out += [world.held_out_caption(a, stated=stated) for a in world.all_attributes()]
    return world.distinct_captions(out)


def spoken_queries(seed: int, extra: int) -> list[world.Caption]:
    """Colour + shape for every pair of the world, and ``extra`` with a size or a background."""
    rng = random.Random(f"bench-no-match-spoken-{seed}")
    bare = world.distinct_captions(world.held_out_caption(a, stated=()) for a in world.all_attributes())
    more = [
        world.held_out_caption(a, stated=[rng.choice(["size", "background"])]) for a in world.all_attributes()
    ]
    rng.shuffle(more)
    return bare + world.distinct_captions(more)[:extra]


def top_scores(store: Store, kind: str, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = store.vectors(kind).search(np.asarray(vectors, np.float32), 1)
    return scores[:, 0], ids[:, 0]


def run_text(
    idx: Any,
    cal: calibrate.Calibration,
    spec: Collection,
    truth: dict[str, world.Attributes],
    queries: Sequence[world.Caption],
    heard: Sequence[str] | None = None,
) -> list[Query]:
    texts = list(heard) if heard is not None else [q.text for q in queries]
    scores, _ = top_scores(idx.store, "image", idx.embedder.embed_texts(texts))
    out = []
    for j, q in enumerate(queries):
        answers = sum(world.matches(q.stated, a) for a in truth.values())
        conf = cal.confidence("text", "image", float(scores[j]))
        out.append(Query(label(spec, dict(q.stated), answers), float(scores[j]), conf, q.text, texts[j]))
    return out


def run_images(
    idx: Any, cal: calibrate.Calibration, spec: Collection, captions: Sequence[world.Caption], seed: int
) -> list[Query]:
    rng = random.Random(f"bench-no-match-images-{seed}")
    combos = world.all_attributes()
    images = [world.render(a, rng) for a in combos]
    scores, _ = top_scores(idx.store, "caption", idx.embedder.embed_images(images))
    out = []
    for j, attrs in enumerate(combos):
        answers = sum(world.matches(c.stated, attrs) for c in captions)
        conf = cal.confidence("image", "caption", float(scores[j]))
        out.append(Query(label(spec, attrs.as_dict(), answers), float(scores[j]), conf, str(attrs.as_dict())))
    return out


def run_spoken(
    idx: Any,
    cal: calibrate.Calibration,
    spec: Collection,
    truth: dict[str, world.Attributes],
    queries: Sequence[world.Caption],
    work: Path,
) -> list[Query]:
    from mmsearch.tts import synthesize

    heard = []
    for i, q in enumerate(queries):
        wav = synthesize(q.text, work / f"q{i:03d}.wav")
        heard.append(idx.transcribe_query(wav))
    return run_text(idx, cal, spec, truth, queries, heard)


# --- the figures ------------------------------------------------------------------------------------------
def rates(queries: Sequence[Query], cut: Any) -> dict[str, Any]:
    """Share of each label's queries that ``cut`` answers "no good match"."""
    out: dict[str, Any] = {}
    for name in ("absent", "present", "near_miss"):
        group = [q for q in queries if q.label == name]
        out[f"{name}_cut"] = round(sum(map(cut, group)) / len(group), 4) if group else None
        out[f"n_{name}"] = len(group)
    return out


def conf_cut(threshold: float) -> Any:
    return lambda q: q.confidence is not None and q.confidence < threshold


def score_cut(threshold: float) -> Any:
    return lambda q: q.score < threshold


def meets(r: dict[str, Any]) -> bool:
    return (r["absent_cut"] or 0) >= GOALS["absent_cut_min"] and (r["present_cut"] or 0) <= GOALS[
        "present_cut_max"
    ]


def figures(queries: Sequence[Query]) -> dict[str, Any]:
    return {
        "default": {
            "min_confidence": calibrate.DEFAULT_MIN_CONFIDENCE,
            **rates(queries, conf_cut(calibrate.DEFAULT_MIN_CONFIDENCE)),
        },
        "confidence_sweep": {str(t): rates(queries, conf_cut(t)) for t in CONFIDENCE_SWEEP},
        "score_sweep": {str(t): rates(queries, score_cut(t)) for t in SCORE_SWEEP},
        "score_quantiles": {
            name: [
                round(float(x), 3)
                for x in np.quantile([q.score for q in queries if q.label == name], [0, 0.05, 0.5, 0.95, 1])
            ]
            for name in ("absent", "present", "near_miss")
            if any(q.label == name for q in queries)
        },
    }


def matches_and_null(store: Store) -> dict[str, list[float]]:
    """Percentiles 5, 50, 95 of the known matches (each caption with its image) and of the null the
    calibration does not use: each caption's best image among those that are not its answer (not its own
    image, and no caption of the image says all that it says or the reverse)."""
    model, dim = store.model, store.dim
    cids, cv = store.catalog.load_vectors("caption", dim, model)
    iids, iv = store.catalog.load_vectors("image", dim, model)
    caps = db.resolve_items(store.catalog, cids.tolist(), ("caption",))
    imgs = db.resolve_items(store.catalog, iids.tolist(), ("image",))
    words = {caps[c].media_id: content_words(caps[c].text or "") for c in cids.tolist()}
    image_media = [imgs[i].media_id for i in iids.tolist()]
    scores = cv @ iv.T
    own, null = [], []
    for row, c in enumerate(cids.tolist()):
        mine = caps[c].media_id
        said = content_words(caps[c].text or "")
        own += [float(scores[row, j]) for j, m in enumerate(image_media) if m == mine]
        for j in np.argsort(-scores[row]):
            other = words.get(image_media[j], frozenset())
            if image_media[j] != mine and not (other and (said <= other or other <= said)):
                null.append(float(scores[row, j]))
                break
    return {
        "matches_p5_p50_p95": [round(float(x), 3) for x in np.quantile(own, [0.05, 0.5, 0.95])],
        "null_p5_p50_p95": [round(float(x), 3) for x in np.quantile(null, [0.05, 0.5, 0.95])],
    }


_FUNCTION_WORDS = frozenset(["a", "an", "the", "of", "on", "in", "at", "to", "over", "with", "and"])


def content_words(text: str) -> frozenset[str]:
    words = (w for w in text.lower().replace(",", " ").replace(".", " ").split() if w not in _FUNCTION_WORDS)
    return frozenset(w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words)


# --- fit time on large synthetic indexes ---------------------------------------------------------------------
def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def noise(rng: np.random.Generator, shape: tuple[int, ...], spread: float) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32) * np.float32(spread / np.sqrt(shape[-1]))


def insert_captioned_images(
    conn: Any, model: str, images: np.ndarray, captions: np.ndarray, first: int
) -> None:
    """Rows of images numbered from ``first`` (content, file, vector) and of one caption each (text, vector),
    each table filled by one executemany."""

    def last_ids(table: Any, count: int) -> list[int]:  # AUTOINCREMENT: the rows just inserted, in order
        q = table.select().with_only_columns(table.c.id).order_by(table.c.id.desc()).limit(count)
        return list(conn.execute(q).scalars().all())[::-1]

    m = len(images)
    conn.execute(db.media.insert(), [{"sha256": f"{first + i:064x}", "kind": "image"} for i in range(m)])
    media_ids = last_ids(db.media, m)
    paths = [f"/synthetic/{first + i:08d}.jpg" for i in range(m)]
    conn.execute(
        db.files.insert(),
        [
            {
                "path_key": p.encode(),
                "path": p,
                "kind": "image",
                "size": 1,
                "mtime_ns": 0,
                "sha256": f"{first + i:064x}",
                "media_id": mid,
                "status": "ok",
                "updated_at": 0.0,
            }
            for i, (p, mid) in enumerate(zip(paths, media_ids, strict=True))
        ],
    )
    file_ids = last_ids(db.files, m)
    texts = [
        {"file_id": f, "source": "sidecar", "text": f"caption {(first + i) // 2}"}
        for i, f in enumerate(file_ids)
    ]
    conn.execute(db.captions.insert(), texts)
    caption_ids = last_ids(db.captions, m)
    conn.execute(
        db.embeddings.insert(),
        [
            {"kind": "image", "model": model, "vector": v.tobytes(), "media_id": i}
            for v, i in zip(images, media_ids, strict=True)
        ],
    )
    conn.execute(
        db.embeddings.insert(),
        [
            {"kind": "caption", "model": model, "vector": v.tobytes(), "caption_id": i}
            for v, i in zip(captions, caption_ids, strict=True)
        ],
    )


def synthetic_fit_time(folder: Path, n: int) -> dict[str, Any]:
    """``n`` images with one caption each (vectors: clustered unit vectors; a caption is its image's vector
    plus noise; one text in two shared with another image), inserted in bulk into a real catalog, then fit."""
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((256, SYNTHETIC_DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t0 = time.perf_counter()
    store = Store.create(folder, {"model": {"name": "synthetic", "dim": SYNTHETIC_DIM}})
    store.lock_for_writing()
    with store.catalog.begin() as conn:
        for s in range(0, n, 20_000):
            m = min(20_000, n - s)
            x = unit(centres[rng.integers(0, len(centres), m)] + noise(rng, (m, SYNTHETIC_DIM), 1.0))
            insert_captioned_images(conn, store.model, x, unit(x + noise(rng, x.shape, 1.2)), s)
        for kind in ("image", "caption"):
            db.bump_generation(conn, kind, store.model)
    store.save_vectors()
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cal = calibrate.ensure_calibrated(store, store.model)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = calibrate.ensure_calibrated(store, store.model)
    check_s = time.perf_counter() - t0
    store.close()
    return {
        "vectors": dict(cal.fit_on),
        "build_s": round(build_s, 1),
        "fit_s": round(fit_s, 2),
        "unchanged_check_s": round(check_s, 3),
        "refit_when_unchanged": again.fitted_at != cal.fitted_at,
        "pairs": sorted(f"{q}>{t}" for q, t in cal.pairs),
    }


# --- main ---------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=777, help="image seed (training used 0..)")
    parser.add_argument("--images", type=int, default=600, help="generated per collection, before the subset")
    parser.add_argument("--extra-spoken", type=int, default=8, help="spoken queries beyond colour + shape")
    parser.add_argument("--no-speech", action="store_true", help="no recordings and no spoken queries")
    parser.add_argument("--fit-sizes", default="100000", help="synthetic index sizes to time the fit at")
    parser.add_argument("--work", type=Path, default=None, help="keep the folders and indexes here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-no-match-"))
    started = time.perf_counter()
    facts = machine()
    per_collection: dict[str, Any] = {}
    pooled: dict[str, list[Query]] = {pair: [] for pair in PAIRS}
    examples: dict[str, Any] = {}
    for c, spec in enumerate(COLLECTIONS):
        root = work / f"collection{c}"
        seed = args.seed + c
        truth, captions = write_collection(root, spec, args.images, seed, not args.no_speech)
        t0 = time.perf_counter()
        idx = mmsearch.Index.create(root / "index", model="demo", device="cpu")
        idx.add_folder(root / "media")
        index_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cal = calibrate.ensure_calibrated(idx.store, idx.store.model)
        fit_s = time.perf_counter() - t0
        results = {
            "text→image": run_text(idx, cal, spec, truth, text_queries()),
            "image→caption": run_images(idx, cal, spec, captions, seed),
        }
        if not args.no_speech:
            (root / "queries").mkdir()
            spoken = spoken_queries(seed, args.extra_spoken)
            results["spoken→image"] = run_spoken(idx, cal, spec, truth, spoken, root / "queries")
            examples[spec.name] = [
                {
                    "said": q.said,
                    "heard": q.heard,
                    "label": q.label,
                    "score": round(q.score, 3),
                    "confidence": None if q.confidence is None else round(q.confidence, 3),
                }
                for q in results["spoken→image"][:: max(1, len(spoken) // 8)]
            ]
        per_collection[spec.name] = {
            "images": len(truth),
            "vectors": dict(cal.fit_on),
            "index_s": round(index_s, 1),
            "fit_s": round(fit_s, 3),
            "calibration": {
                f"{q}>{t}": {
                    "n": fit.n,
                    "median": round(fit.median, 3),
                    "spread": round(fit.spread, 4),
                    "score_at_default": round(fit.score_at(calibrate.DEFAULT_MIN_CONFIDENCE), 3),
                }
                for (q, t), fit in sorted(cal.pairs.items())
            },
            "text_to_image_scores": matches_and_null(idx.store),
            "pairs": {pair: figures(queries) for pair, queries in results.items()},
        }
        for pair, queries in results.items():
            pooled[pair] += queries
        idx.close()

    pooled_figures = {pair: figures(queries) for pair, queries in pooled.items() if queries}
    # The largest swept confidence at which every pair keeps present cuts within the goal, pooled.
    ok = [
        t
        for t in CONFIDENCE_SWEEP
        if all(
            f["confidence_sweep"][str(t)]["present_cut"] <= GOALS["present_cut_max"]
            for f in pooled_figures.values()
        )
    ]
    fit_sizes = {}
    for n in (int(x) for x in args.fit_sizes.split(",") if x):
        fit_sizes[str(n)] = synthetic_fit_time(work / f"synthetic{n}", n)

    results_json = {
        "benchmark": "no_match",
        "model": "demo (mmsearch/demo/weights, loaded by Index.create(model='demo'))",
        "method": "calibrate.py: leave-answer-out null per (query kind, target kind), empirical CDF",
        "path": "Index.create / add_folder / transcribe_query; calibrate.ensure_calibrated; top hit = the target "
        "kind's vector index top 1 (mode=vector)",
        "image_seed": args.seed,
        "goals": GOALS,
        "default_min_confidence": calibrate.DEFAULT_MIN_CONFIDENCE,
        "largest_swept_confidence_within_present_goal": max(ok) if ok else None,
        "pooled": pooled_figures,
        "collections": per_collection,
        "spoken_examples": examples,
        "fit_time_synthetic": fit_sizes,
        "total_s": round(time.perf_counter() - started, 1),
        "machine": facts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results_json, indent=2, ensure_ascii=False) + "\n")
    print_table(results_json)
    print(f"wrote {args.out}")


def print_table(results: dict[str, Any]) -> None:
    d = results["default_min_confidence"]
    print(f"no good match — demo model, held-out seed {results['image_seed']}, min_confidence {d}")
    print(f"{'collection / pair':<52}{'absent cut':>11}{'present cut':>12}{'near miss cut':>14}  n abs/pres")
    rows = [("pooled", results["pooled"])] + [(n, c["pairs"]) for n, c in results["collections"].items()]
    for name, pairs in rows:
        for pair, f in pairs.items():
            r = f["default"]
            near = "-" if r["near_miss_cut"] is None else f"{r['near_miss_cut']:.3f}"
            mark = "" if meets(r) else "  (misses a goal)"
            print(
                f"{name[:36] + ' ' + pair:<52}{r['absent_cut']:>11.3f}{r['present_cut']:>12.3f}{near:>14}"
                f"  {r['n_absent']}/{r['n_present']}{mark}"
            )
    print("\nsweep (pooled): absent cut / present cut")
    for kind, sweep in (("confidence", "confidence_sweep"), ("raw score", "score_sweep")):
        thresholds = list(next(iter(results["pooled"].values()))[sweep])
        print(f"{kind:<16}" + "".join(f"{t:>11}" for t in thresholds))
        for pair, f in results["pooled"].items():
            cells = "".join(
                f"{f[sweep][t]['absent_cut']:>5.2f}/{f[sweep][t]['present_cut']:<5.2f}" for t in thresholds
            )
            print(f"{pair:<16}{cells}")
    for n, r in results["fit_time_synthetic"].items():
        print(
            f"fit at {n} images + {n} captions: {r['fit_s']} s (unchanged check {r['unchanged_check_s']} s)"
        )


if __name__ == "__main__":
    main()
