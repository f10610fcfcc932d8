"""The query layer (issue 12), measured: words + meaning, combined queries, and the latency of hybrid search.

    python benchmarks/bench_query.py                 # everything, 1M-vector latency (about 15 minutes)
    python benchmarks/bench_query.py --quick         # smaller sizes, a few minutes
    python benchmarks/bench_query.py --only rare,demo,edits,latency
    python benchmarks/bench_query.py --only latency --work DIR   # builds the 1M catalog and FAISS file in
                                                                 # DIR once; later runs reuse them

* ``rare``: recordings (Piper voice, transcribed by Whisper tiny.en) and image captions that each say a rare
  word or name; each word is a query. Recall@1 of the item that says it, for vector, hybrid (rrf and
  weighted) and words modes. The demo model never saw these words: what vector search finds for them is
  what a CLIP text tower does with a word it cannot read.
* ``demo``: the demo model's text→image precision@1 on held-out media (bench_demo_quality's set), per
  mode, with the images' captions indexed and without (images only: words then reach only file names).
* ``edits``: combined queries on held-out media: an image of a <colour> <shape> with ``add=[other colour]``
  and ``subtract=[colour]`` (and the same for shapes) must find images of the edited attributes; P@1 and
  P@5 for early and late fusion, with the image alone and the edited text alone as reference rows.
* ``latency``: a catalog of N transcript segments (synthetic sentences over a Zipf vocabulary, FTS5 over
  all of them) with N random 512-d vectors; p50/p95 of :func:`mmsearch.query.execute` for vector-only and
  hybrid text queries with the same query vectors (the text tower's time is the same for both and is
  measured apart), with and without a filter. The modes are interleaved query by query, so the ratio is
  measured under one load; the load averages before and after are recorded too. Then how the words list
  (BM25 of the rarer words' rows) agrees with ranking every row holding a word of the query.

Prints tables and writes ``benchmarks/results/query.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import cpu_model, package_versions

import mmsearch
from mmsearch import query as q
from mmsearch.demo import world

RESULTS = Path(__file__).parent / "results" / "query.json"
MODES = {
    "vector": {"mode": "vector"},
    "hybrid-rrf": {"mode": "hybrid", "fusion": "rrf"},
    "hybrid-weighted": {"mode": "hybrid", "fusion": "weighted"},
    "words": {"mode": "words"},
}

# Rare words and names for spoken segments (real words Whisper knows) and for captions.
SPOKEN_WORDS = [
    "kubernetes",
    "Shostakovich",
    "photosynthesis",
    "Tanzania",
    "Reykjavik",
    "mitochondria",
    "Beethoven",
    "Copenhagen",
    "Kilimanjaro",
    "saxophone",
    "Napoleon",
    "cathedral",
    "hurricane",
    "telescope",
    "dinosaur",
    "Portugal",
    "penguin",
    "volcano",
    "algebra",
    "chocolate",
    "Istanbul",
    "violin",
    "astronaut",
    "Shakespeare",
]
CAPTION_WORDS = [
    "Nakamura",
    "Okonkwo",
    "Dvorak",
    "XR-7731",
    "kubectl",
    "PostgreSQL",
    "Zanzibar",
    "Quetzalcoatl",
    "Hokusai",
    "Vermeer",
    "Tchaikovsky",
    "Ouagadougou",
    "Llewellyn",
    "Fitzgerald",
    "Kowalczyk",
    "Rasmussen",
    "Montgomery",
    "Valparaiso",
    "Bratislava",
    "Nairobi",
    "Saskatchewan",
    "Yamamoto",
    "Gutenberg",
    "Archimedes",
]
SENTENCES = [
    "In this part we talk about {w} for a while.",
    "My friend told me a long story about {w} yesterday.",
    "The next question is about {w} and why it matters.",
    "Everyone in the room was thinking about {w} again.",
]


def machine() -> dict[str, object]:
    versions = package_versions(("open_clip_torch", "faiss-cpu", "faster-whisper", "piper-tts", "sqlalchemy"))
    import sqlite3

    return {"cpu": cpu_model(), "nproc": os.cpu_count(), "sqlite": sqlite3.sqlite_version, **versions}


def _search(idx: mmsearch.Index, text: str | None, **kw: object) -> list[mmsearch.Hit]:
    return idx.search(text, min_confidence=0, **kw).hits  # type: ignore[arg-type]


# --- rare words -------------------------------------------------------------------------------------------
def bench_rare(work: Path, n_words: int) -> dict[str, object]:
    from mmsearch.tts import synthesize

    spoken, captioned = SPOKEN_WORDS[:n_words], CAPTION_WORDS[:n_words]
    media = work / "rare" / "media"
    (media / "talks").mkdir(parents=True)
    (media / "images").mkdir(parents=True)
    said_in: dict[str, Path] = {}
    for r in range(0, len(spoken), 4):
        words = spoken[r : r + 4]
        text = " ".join(SENTENCES[i % len(SENTENCES)].format(w=w) for i, w in enumerate(words))
        wav = synthesize(text, media / "talks" / f"talk{r // 4:02d}.wav")
        said_in.update({w: wav for w in words})
    rng = random.Random(5)
    captioned_in: dict[str, Path] = {}
    for i, (attrs, img) in enumerate(world.generate(max(48, 2 * len(captioned)), seed=4242)):
        path = media / "images" / f"{i:04d}.png"
        img.save(path)
        caption = world.held_out_caption(attrs).text
        if i < len(captioned):
            caption += (
                f", drawn by {captioned[i]}" if rng.random() < 0.5 else f", a sticker from {captioned[i]}"
            )
            captioned_in[captioned[i]] = path
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")

    idx = mmsearch.Index.create(work / "rare" / "index", model="demo", device="cpu")
    idx.add_folder(media)
    heard = {
        w: any(
            w.lower() in (s.text or "").lower() for s in _search(idx, w, mode="words", target="audio", k=50)
        )
        for w in spoken
    }
    out: dict[str, object] = {"spoken_words": len(spoken), "caption_words": len(captioned)}
    out["whisper_heard_the_word"] = sum(heard.values()) / len(spoken)
    for name, kw in MODES.items():
        seg_ok = 0
        for w in spoken:
            hits = _search(idx, w, target="audio", k=1, **kw)
            seg_ok += (
                bool(hits) and Path(hits[0].path) == said_in[w] and w.lower() in (hits[0].text or "").lower()
            )
        cap_ok = sum(
            bool(hits := _search(idx, w, target="images", k=1, **kw))
            and Path(hits[0].path) == captioned_in[w]
            for w in captioned
        )
        out[name] = {
            "segment_recall_at_1": round(seg_ok / len(spoken), 3),
            "caption_image_recall_at_1": round(cap_ok / len(captioned), 3),
        }
    idx.close()
    return out


# --- demo text→image P@1 and combined edits ----------------------------------------------------------------
def _eval_folder(root: Path, n: int, seed: int, captions: bool) -> dict[str, tuple[world.Attributes, str]]:
    media = root / "media"
    media.mkdir(parents=True)
    out = {}
    for i, (attrs, img) in enumerate(world.generate(n, seed)):
        path = media / f"{i:04d}.png"
        img.save(path)
        caption = world.held_out_caption(attrs).text
        if captions:
            path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        out[str(path.resolve())] = (attrs, caption)
    return out


def bench_demo(work: Path, n: int, seed: int) -> dict[str, object]:
    out: dict[str, object] = {"images": n, "seed": seed}
    for captions in (True, False):
        root = work / f"demo-{'captions' if captions else 'images'}"
        truth = _eval_folder(root, n, seed, captions)
        queries = {cap: attrs for attrs, cap in truth.values()}
        stated = {cap: world.held_out_caption(a).stated for cap, a in queries.items()}
        with mmsearch.Index.create(root / "index", model="demo", device="cpu") as idx:
            idx.add_folder(root / "media")
            row = {}
            for name, kw in MODES.items():
                if name == "words" and not captions:
                    continue
                good = 0
                for cap in queries:
                    hits = _search(idx, cap, target="images", k=1, **kw)
                    good += bool(hits) and world.matches(
                        stated[cap], truth[str(Path(hits[0].path).resolve())][0]
                    )
                row[name] = round(good / len(queries), 3)
        out["with_captions" if captions else "images_only"] = {"queries": len(queries), "p_at_1": row}
    return out


def bench_edits(work: Path, n: int, seed: int, n_edits: int) -> dict[str, object]:
    root = work / "edits"
    truth = _eval_folder(root, n, seed, captions=False)
    pool = [a for a, _ in truth.values()]
    rng = random.Random(17)
    edits = []
    for _ in range(n_edits):
        a = rng.choice(pool)
        if rng.random() < 0.5:
            new = rng.choice([c for c in world.COLOURS if c != a.colour])
            edits.append((a, {"colour": new, "shape": a.shape}, new, a.colour))
        else:
            new = rng.choice([s for s in world.SHAPES if s != a.shape])
            edits.append((a, {"colour": a.colour, "shape": new}, new, a.shape))
    edits = [e for e in edits if sum(world.matches(e[1], p) for p in pool) >= 5]
    rows: dict[str, dict[str, float]] = {}
    with mmsearch.Index.create(root / "index", model="demo", device="cpu") as idx:
        idx.add_folder(root / "media")

        def score(name: str, run: object) -> None:
            p1 = p5 = 0.0
            for i, (a, want, plus, minus) in enumerate(edits):
                image = world.render(a, random.Random(1000 + i))
                hits = run(image, want, plus, minus)  # type: ignore[operator]
                rel = [world.matches(want, truth[str(Path(h.path).resolve())][0]) for h in hits[:5]]
                p1 += rel[0] if rel else 0
                p5 += sum(rel) / 5
            rows[name] = {"p_at_1": round(p1 / len(edits), 3), "p_at_5": round(p5 / len(edits), 3)}

        score(
            "image alone",
            lambda im, w, p, m: _search(idx, None, image=im, target="images", k=5, mode="vector"),
        )
        score(
            "edited text alone",
            lambda im, w, p, m: _search(
                idx, f"a {w['colour']} {w['shape']}", target="images", k=5, mode="vector"
            ),
        )
        for combine in ("early", "late"):
            for sub in (1.0, 0.5):
                score(
                    f"{combine} fusion, subtract weight {sub}",
                    lambda im, w, p, m, c=combine, s=sub: _search(
                        idx,
                        None,
                        image=im,
                        add=[p],
                        subtract=[m],
                        target="images",
                        k=5,
                        mode="vector",
                        combine=c,
                        weights={"subtract": s},
                    ),
                )
    return {"images": n, "edits": len(edits), "rows": rows}


# --- latency at scale ---------------------------------------------------------------------------------------
def bench_latency(work: Path, n: int, n_queries: int) -> dict[str, object]:
    from _synthetic import insert_recordings
    from bench_ann import clustered

    from mmsearch.filters import Filters

    rng = np.random.default_rng(7)
    vocab = [f"w{i}x" for i in range(50_000)]
    ranks = np.arange(1, len(vocab) + 1)
    p = 1.0 / ranks**1.07
    p /= p.sum()
    t0 = time.perf_counter()
    folder = work / "latency" / f"index-{n}"
    # Embeddings are clustered (bench_ann's mixture); queries are fresh draws from it, as a text near
    # what the collection holds is.
    dim = 512
    centres = rng.standard_normal((1024, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    built = folder / "built"
    if built.exists():  # a completed earlier run with the same --work and --n: the same data
        build_catalog_s = None
        rng = np.random.default_rng(8)
    else:
        if folder.exists():
            shutil.rmtree(folder)
        idx = mmsearch.Index.create(folder, model="ViT-B-32", pretrained="random", device="cpu")
        assert idx.store.dim == dim
        batch = 20_000
        with idx.store.catalog.begin() as conn:
            for s in range(0, n, batch):
                m = min(batch, n - s)
                words = rng.choice(len(vocab), size=(m, 12), p=p)
                texts = [" ".join(vocab[w] for w in row) for row in words]
                insert_recordings(conn, texts, clustered(rng, centres, m, 1.0), s)
        build_catalog_s = round(time.perf_counter() - t0, 1)
        idx.close()
        rng = np.random.default_rng(8)  # the queries do not depend on whether the catalog was built now
    t0 = time.perf_counter()
    idx = mmsearch.Index.open(folder)
    if not built.exists():  # FAISS built from SQLite, saved for a later run with the same --work
        idx.store.lock_for_writing()
        idx.store.vectors("segment")
        idx.store.save_vectors()
        idx.store.unlock()
    idx.store.vectors("segment")
    build_faiss_s = time.perf_counter() - t0
    built.touch()
    load_at_start = os.getloadavg()
    model = idx.store.follow_active()
    queries = [" ".join(vocab[int(r)] for r in rng.integers(50, 5000, size=2)) for _ in range(n_queries)]
    qvecs = clustered(rng, centres, n_queries, 1.0)
    # The recordings named talk00000000-talk00009999: the first 2,000 (of n / 10), so the oldest 2 % of the
    # segments, which the newest rows holding a common word never reach.
    some_files = Filters.parse(path=[f"/synthetic/talk0000{d}*" for d in range(10)])

    def timed(modes: tuple[str, ...], filters: Filters) -> dict[str, dict[str, float]]:
        """p50/p95 per mode, the modes interleaved query by query (their order rotating), so that every mode
        is measured under the same load: separate passes let a change of load between them move the ratio."""
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for i, (text, v) in enumerate(zip(queries, qvecs, strict=True)):
            for j in range(len(modes)):
                mode = modes[(i + j) % len(modes)]
                plan = q.plan(
                    q.Query(text=text, mode=mode, target="audio", k=10, filters=filters, min_confidence=0)
                )
                t = time.perf_counter()
                q.execute(idx.store, plan, v[None, :] if plan.parts else None, model=model)
                times[mode].append((time.perf_counter() - t) * 1000)
        out = {}
        for mode, ms in times.items():
            ms.sort()
            out[mode] = {
                "p50_ms": round(statistics.median(ms), 3),
                "p95_ms": round(ms[int(0.95 * len(ms))], 3),
            }
        return out

    modes = ("vector", "hybrid", "words")
    timed(modes, Filters())  # warm-up pass, then the measured one
    rows = timed(modes, Filters())
    timed(modes[:2], some_files)
    rows.update({f"{mode} + path filter": row for mode, row in timed(modes[:2], some_files).items()})
    agreement = words_agreement(idx, model, queries)
    idx.close()
    return {
        "segments": n,
        "dim": dim,
        "queries": n_queries,
        "build_catalog_s": build_catalog_s,  # None: reused from an earlier run (--work)
        "build_faiss_s": round(build_faiss_s, 1),
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": os.getloadavg(),
        "timing": "modes interleaved query by query (order rotating), after one warm-up pass",
        "rows": rows,
        "hybrid_over_vector_p50": round(rows["hybrid"]["p50_ms"] / rows["vector"]["p50_ms"], 2),
        "words_vs_exact_bm25": agreement,
    }


def words_agreement(idx: mmsearch.Index, model: str, queries: list[str]) -> dict[str, object]:
    """How the words list of each query (BM25 of its rarer words' rows, :mod:`mmsearch.catalog_words`)
    agrees with the exact one (every row holding any word ranked by FTS5's BM25 of the whole query), over
    the first 10 hits: the share of the same items, the share of queries with the same scores in the same
    order (ties may hold other items), and with the same best score."""
    from mmsearch.catalog_words import word_hits

    plan = q.plan(q.Query(text=queries[0], mode="words", target="audio", k=10))
    overlap = same_scores = same_best = 0.0
    for text in queries:
        fast, exact = (
            word_hits(idx.store.catalog, text, plan.kinds, model, plan.depth, exact=e)[:10]
            for e in (False, True)
        )
        overlap += len({h.id for h in fast} & {h.id for h in exact}) / max(len(exact), 1)
        scores = [[round(h.score, 6) for h in hits] for hits in (fast, exact)]
        same_scores += scores[0] == scores[1]
        same_best += scores[0][:1] == scores[1][:1]
    n = len(queries)
    return {
        "queries": n,
        "top10_same_items": round(overlap / n, 3),
        "top10_same_scores": round(same_scores / n, 3),
        "top1_same_score": round(same_best / n, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="rare,demo,edits,latency")
    ap.add_argument("--n", type=int, default=None, help="segments for the latency part (default 1M)")
    ap.add_argument("--images", type=int, default=None, help="held-out images (default 432)")
    ap.add_argument(
        "--work", type=Path, default=None, help="work folder; a latency catalog built there is reused"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-query-"))
    n_images = args.images or (96 if args.quick else 432)
    parts = set(args.only.split(","))
    result: dict[str, object] = {"machine": machine(), "quick": args.quick}
    started = time.perf_counter()
    if "rare" in parts:
        result["rare_words"] = r = bench_rare(work, 8 if args.quick else 24)
        print(json.dumps(r, indent=2))
    if "demo" in parts:
        result["demo_text_to_image"] = r = bench_demo(work, n_images, 777)
        print(json.dumps(r, indent=2))
    if "edits" in parts:
        result["edits"] = r = bench_edits(work, n_images, 778, 20 if args.quick else 80)
        print(json.dumps(r, indent=2))
    if "latency" in parts:
        n = args.n or (100_000 if args.quick else 1_000_000)
        result["latency"] = r = bench_latency(work, n, 100 if args.quick else 300)
        print(json.dumps(r, indent=2))
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists():  # keep parts measured by an earlier --only run
        old = json.loads(args.out.read_text())
        result = {**old, **result}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
