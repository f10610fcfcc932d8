"""Model speed on CPU: what raises ViT-B-32 image-embedding throughput on this machine, and what it costs.

For ViT-B-32 (224 px) and ViT-B-32-256, random weights, batch ``--batch`` (32), the image tower alone on
ready preprocessed tensors, each variant is timed on the same batch:

* ``torch_eager``            — what ClipEmbedder does today (fp32, torch's default threads);
* ``torch_eager_1thread``    — ``torch.set_num_threads(1)``;
* ``torch_channels_last``    — model and input in channels-last memory format;
* ``torch_bf16_autocast``    — ``torch.autocast("cpu", torch.bfloat16)``: several times slower here (no
  native bf16 on AVX2), so it runs on the first 8 images of the batch and only in one timed round;
* ``torch_dynamic_int8``     — ``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear`` (deprecated API);
* ``torch_compile``          — ``torch.compile`` (inductor), only with ``--with-compile``: compiling takes
  minutes here;
* ``ort_fp32`` / ``ort_int8`` — :class:`mmsearch.accel.OnnxImageTower` as shipped: ONNX Runtime, the
  graph exported through :mod:`mmsearch.onnx_vit`, one single-threaded session per core each embedding a
  slice of the batch; ``ort_int8_1session`` one session using every core (spinning workers off, or on in
  ``ort_int8_1session_spin``), ``ort_int8_1thread`` one session on one thread, ``ort_int8_plain_graph``
  the same recipe on the graph torch exports unchanged.

Timing: one untimed warm-up round (its outputs give the cosines), then ``--rounds`` rounds in which every
variant runs once, in an order rotated each round, so all variants see the same machine load. Reported per
variant: images/s (wall, median round), images per CPU-second (process CPU time, all threads; on a shared
machine this is the steadier figure for one-thread runs), ratios to ``torch_eager`` from the same rounds,
the ratio to the fp32 ceiling the issue computed for its AVX2 machine (2 cores × 96 GFLOP/s ÷ 8.82 GFLOP per
224-px image = 21.8 img/s, scaled by the architecture's FLOPs for 256 px; int8, or an AVX-512 CPU, exceeds it), and the cosine of each embedding to
the torch fp32 one (mean/min over generated demo-world images).

With the demo model present (``mmsearch/demo/weights``), text→image retrieval on generated world images is
compared with the torch fp32 tower and the ONNX int8 tower: precision@1 and @5 under the world's own
relevance rule, and how often both pick the same top image.

Usage: python benchmarks/bench_model_speed.py [--rounds 3] [--batch 32] [--with-compile] [--archs ...]

Run time: 28 min with ``--with-compile`` while other jobs kept this 2-core machine at load 10-12 (each
variant got about a quarter of the CPU); without compile and on an idle machine, about 5 minutes. ONNX
exports go to the user cache (:func:`mmsearch.accel.default_cache_dir`), so they are paid once.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _machine import cpu_flags, cpu_model, package_versions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmsearch.accel import OnnxImageTower, default_cache_dir, tower_key  # noqa: E402
from mmsearch.demo import world  # noqa: E402
from mmsearch.identity import ModelSpec, demo_files  # noqa: E402
from mmsearch.model import ClipEmbedder, load_embedder  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "model_speed.json"
CEILING_224 = 21.8  # img/s: 2 cores x 96 GFLOP/s fp32 / 8.82 GFLOP per 224-px ViT-B-32 image (issue 5)

Variant = Callable[[torch.Tensor], np.ndarray]
SUBBATCH = {"torch_bf16_autocast": 8}  # images per timed run, where fewer than --batch


def machine_facts() -> dict[str, Any]:
    versions = package_versions(("torch", "open_clip_torch", "onnxruntime", "onnx", "numpy"))
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_at_start": os.getloadavg(),
    }


def vit_macs(image: int, patch: int = 32, width: int = 768, layers: int = 12) -> float:
    """Multiply-accumulates of a ViT image tower (patch embedding, attention, MLP)."""
    tokens = (image // patch) ** 2 + 1
    per_layer = tokens * 12 * width * width + 2 * tokens * tokens * width
    return tokens * 3 * patch * patch * width + layers * per_layer


def ceiling(image: int) -> float:
    return CEILING_224 * vit_macs(224) / vit_macs(image)


def world_batch(emb: ClipEmbedder, n: int, seed: int) -> tuple[list[world.Attributes], torch.Tensor]:
    items = world.generate(n, seed)
    return [a for a, _ in items], torch.stack([emb.preprocess_image(im) for _, im in items])


def torch_variants(emb: ClipEmbedder, with_compile: bool) -> dict[str, Variant]:
    visual = emb.model.visual

    def run(module: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return module(x).float().numpy()

    def one_thread(x: torch.Tensor) -> np.ndarray:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return run(visual, x)
        finally:
            torch.set_num_threads(before)

    channels_last = copy.deepcopy(visual).to(memory_format=torch.channels_last)

    def bf16(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return visual(x).float().numpy()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated; measured anyway
        dyn_int8 = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(visual), {torch.nn.Linear}, dtype=torch.qint8
        )
    out: dict[str, Variant] = {
        "torch_eager": lambda x: run(visual, x),
        "torch_eager_1thread": one_thread,
        "torch_channels_last": lambda x: run(channels_last, x.contiguous(memory_format=torch.channels_last)),
        "torch_bf16_autocast": bf16,
        "torch_dynamic_int8": lambda x: run(dyn_int8, x),
    }
    if with_compile:
        compiled = torch.compile(visual)
        out["torch_compile"] = lambda x: run(compiled, x)
    return out


def ort_variants(emb: ClipEmbedder, cache: Path) -> tuple[dict[str, Variant], dict[str, Any]]:
    size = emb.model.visual.image_size
    key = tower_key(emb.identity)
    fp32 = OnnxImageTower.build(emb.model, size, cache, key, quantize=False)
    int8 = OnnxImageTower.build(emb.model, size, cache, key, quantize=True)
    # The same int8 recipe on the graph torch exports as it is (no mmsearch.onnx_vit forward swap).
    from mmsearch import onnx_vit

    real = onnx_vit.applicable
    onnx_vit.applicable = lambda model: False
    try:
        plain = OnnxImageTower.build(emb.model, size, cache, key + "|plain-graph", quantize=True)
    finally:
        onnx_vit.applicable = real
    cpus = len(os.sched_getaffinity(0))
    variants: dict[str, Variant] = {
        "ort_fp32": fp32,
        "ort_int8": int8,  # the shipping default: one 1-thread session per core (default_streams)
        "ort_int8_1session": OnnxImageTower(int8.path, streams=1, threads=cpus),
        "ort_int8_1session_spin": OnnxImageTower(int8.path, streams=1, threads=cpus, spin=True),
        "ort_int8_1thread": OnnxImageTower(int8.path, streams=1, threads=1),
        "ort_int8_plain_graph": plain,
    }
    meta = {
        "fp32": fp32.meta,
        "int8": int8.meta,
        "int8_plain_graph": plain.meta,
        "int8_streams": int8.streams,
    }
    return variants, meta


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def bench_arch(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    print(f"\n== {arch}: loading (random weights) and exporting", flush=True)
    emb = load_embedder(ModelSpec(arch, pretrained="random"), device="cpu", batch_size=args.batch)
    _, batch = world_batch(emb, args.batch, seed=11)
    image = int(emb.model.visual.image_size[0])
    variants = torch_variants(emb, args.with_compile)
    started = time.monotonic()
    ort, export_meta = ort_variants(emb, args.cache)
    print(f"   ONNX towers ready in {time.monotonic() - started:.0f} s", flush=True)
    variants.update(ort)
    names = list(variants)

    # Warm-up round: first-call costs (allocations, compilation) and the outputs for the cosines.
    warm: dict[str, float] = {}
    outputs: dict[str, np.ndarray] = {}
    for name in names:
        t0 = time.perf_counter()
        outputs[name] = variants[name](batch[: SUBBATCH.get(name)])
        warm[name] = time.perf_counter() - t0
        print(f"   warm-up {name:22s} {warm[name]:7.1f} s", flush=True)
    reference = outputs["torch_eager"]

    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    once = set(SUBBATCH)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if name in once and wall[name]:
                continue
            c0, t0 = time.process_time(), time.perf_counter()
            variants[name](batch[: SUBBATCH.get(name)])
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(f"   round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.1f}", flush=True)

    ceil = ceiling(image)
    # Per-image times, so a variant run on a sub-batch compares with the rest.
    base_wall = statistics.median(wall["torch_eager"]) / args.batch
    base_cpu = sum(cpu["torch_eager"]) / len(cpu["torch_eager"]) / args.batch
    rows = {}
    for name in names:
        n = min(args.batch, SUBBATCH.get(name, args.batch))
        w = statistics.median(wall[name]) / n
        c = sum(cpu[name]) / len(cpu[name]) / n
        cos = cosines(outputs[name], reference[:n])
        rows[name] = {
            "images_per_run": n,
            "img_per_s": round(1 / w, 2),
            "img_per_cpu_s": round(1 / c, 2),
            "vs_torch_eager_wall": round(base_wall / w, 2),
            "vs_torch_eager_cpu": round(base_cpu / c, 2),
            "vs_fp32_ceiling": round(1 / w / ceil, 3),
            "cosine_mean": round(float(cos.mean()), 6),
            "cosine_min": round(float(cos.min()), 6),
            "wall_s_rounds": [round(x, 2) for x in wall[name]],
            "warmup_s": round(warm[name], 1),
        }
    return {
        "arch": arch,
        "image_size": image,
        "batch": args.batch,
        "fp32_ceiling_img_per_s": round(ceil, 1),
        "variants": rows,
        "onnx_export": export_meta,
    }


def demo_retrieval(args: argparse.Namespace) -> dict[str, Any]:
    """Text→image retrieval on generated world images: torch fp32 tower vs ONNX int8 tower."""
    _, weights = demo_files()
    if not weights.is_file():
        return {"skipped": f"demo weights not found at {weights}"}
    print("\n== demo model: retrieval with the fp32 and the int8 image tower", flush=True)
    emb = load_embedder(ModelSpec("demo"), device="cpu")
    attrs, pixels = world_batch(emb, args.demo_images, seed=2024)
    fp32 = np.concatenate([emb.embed_image_tensors(pixels[i : i + 64]) for i in range(0, len(pixels), 64)])
    int8_tower = OnnxImageTower.build(
        emb.model, emb.model.visual.image_size, args.cache, tower_key(emb.identity), quantize=True
    )
    int8 = np.concatenate([int8_tower(pixels[i : i + 64]) for i in range(0, len(pixels), 64)])
    captions = world.held_out_queries(attrs)
    texts = emb.embed_texts([c.text for c in captions])
    result: dict[str, Any] = {
        "images": len(attrs),
        "queries": len(captions),
        "phrasing": world.HELD_OUT_PHRASING,
    }
    top: dict[str, np.ndarray] = {}
    hit1: dict[str, np.ndarray] = {}
    for name, vecs in (("torch_fp32", fp32), ("onnx_int8", int8)):
        order = np.argsort(-(texts @ vecs.T), axis=1)[:, :5]
        top[name] = order[:, 0]
        hits = np.array([[world.matches(c.stated, attrs[j]) for j in row] for c, row in zip(captions, order)])
        hit1[name] = hits[:, 0]
        result[name] = {
            "precision_at_1": round(float(hits[:, 0].mean()), 4),
            "precision_at_5": round(float(hits.mean()), 4),
        }
    cos = cosines(int8, fp32)
    # A different top image is often an equally relevant one (many images fit "a red circle"); what
    # matters is whether relevance changes.
    result["same_top1"] = round(float((top["torch_fp32"] == top["onnx_int8"]).mean()), 4)
    result["top1_only_fp32_relevant"] = int((hit1["torch_fp32"] & ~hit1["onnx_int8"]).sum())
    result["top1_only_int8_relevant"] = int((hit1["onnx_int8"] & ~hit1["torch_fp32"]).sum())
    result["image_cosine_int8_vs_fp32"] = {
        "mean": round(float(cos.mean()), 6),
        "min": round(float(cos.min()), 6),
    }
    return result


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\n{result['arch']} ({result['image_size']} px), batch {result['batch']}, "
        f"fp32 ceiling {result['fp32_ceiling_img_per_s']} img/s"
    )
    head = f"{'variant':22s} {'img/s':>7s} {'img/cpu-s':>9s} {'x eager':>8s} {'x eager cpu':>11s}"
    print(head + f" {'/ceiling':>8s} {'cos mean':>9s} {'cos min':>9s}")
    for name, r in result["variants"].items():
        print(
            f"{name:22s} {r['img_per_s']:7.2f} {r['img_per_cpu_s']:9.2f} {r['vs_torch_eager_wall']:8.2f} "
            f"{r['vs_torch_eager_cpu']:11.2f} {r['vs_fp32_ceiling']:8.3f} {r['cosine_mean']:9.5f} "
            f"{r['cosine_min']:9.5f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="*", default=["ViT-B-32", "ViT-B-32-256"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--with-compile", action="store_true", help="also time torch.compile (minutes)")
    parser.add_argument("--demo-images", type=int, default=400)
    parser.add_argument("--cache", type=Path, default=default_cache_dir(), help="ONNX export cache")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    started = time.monotonic()
    out: dict[str, Any] = {"machine": machine_facts(), "settings": vars(args) | {"cache": str(args.cache)}}
    out["settings"]["out"] = str(args.out)
    out["archs"] = {}
    for arch in args.archs:
        out["archs"][arch] = bench_arch(arch, args)
        print_table(out["archs"][arch])
    out["demo_retrieval"] = demo_retrieval(args)
    print("\ndemo retrieval:", json.dumps(out["demo_retrieval"], indent=1))
    out["machine"]["loadavg_at_end"] = os.getloadavg()
    out["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
