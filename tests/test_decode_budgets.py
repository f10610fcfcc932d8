"""Decoding budgets against hostile files (issue 11, items 3, 4, 13, 15): sample rates, spoken-query
length, wall-clock time per file, pixels per image, and the bomb check under threads.

Every hostile file is generated here. No Whisper model is loaded: transcription budgets are exercised
through the window loop both backends share, with a stand-in for the model call.
"""

from __future__ import annotations

import inspect
import io
import struct
import subprocess
import sys
import threading
import time
import warnings
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmsearch import audio, images
from mmsearch import transcribe as tr
from mmsearch.audio import (
    QUERY_MAX_AUDIO_SECONDS,
    TimeBudget,
    iter_pcm_chunks,
    load_pcm,
    probe_duration,
)
from mmsearch.errors import BadMediaError
from mmsearch.images import INDEX_MAX_PIXELS, QUERY_MAX_PIXELS, load_image

ROOT = Path(__file__).resolve().parent.parent
DEEP_SIDE = 9400  # the 16-bit PNG: 88.4 Mpx, under the index budget, over the query budget
ROUNDS = 150  # per thread, half of them bombs: the old check let 1-5 through in 4 of 5 runs
BOMB_SIDE = 9500  # 90.25 Mpx: over Pillow's default limit (89.5 Mpx) but under twice it, where Pillow
#                   itself raises: only a warning stood between it and a full decode


def write_wav(path: Path, seconds: float, rate: int = 8000, tone: bool = False) -> Path:
    """Unsigned 8-bit mono: silence (0x80), or a loud square wave if ``tone``."""
    frames = int(seconds * rate)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(rate)
        period = bytes([0x20] * 10 + [0xE0] * 10) if tone else b"\x80"
        minute = (period * (60 * rate // len(period) + 1))[: 60 * rate]
        for start in range(0, frames, len(minute)):
            w.writeframes(minute[: frames - start])
    return path


def decoders(**kw: object) -> dict[str, object]:
    return {
        "load_pcm": lambda p: load_pcm(p, **kw),
        "iter_pcm_chunks": lambda p: list(iter_pcm_chunks(p, 30.0, **kw)),
    }


# ---------------------------------------------------------------------------------------------- sample rate


def test_a_wav_declaring_1_hz_is_refused_at_open(tmp_path: Path) -> None:
    """The issue's 244-byte WAV: 200 samples at 1 Hz decoded to 200 s of 16 kHz audio (16,000x)."""
    path = tmp_path / "one_hz.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(1)
        w.writeframes(b"\x80" * 200)
    assert path.stat().st_size == 244
    for call in (probe_duration, *decoders().values()):
        with pytest.raises(BadMediaError, match="sample rate of 1 Hz is outside 8-192 kHz"):
            call(path)  # type: ignore[operator]


@pytest.mark.parametrize("rate, ok", [(4000, False), (8000, True), (192000, True), (384000, False)])
def test_sample_rates_outside_8_to_192_khz_are_refused(tmp_path: Path, rate: int, ok: bool) -> None:
    path = write_wav(tmp_path / f"r{rate}.wav", 0.5, rate=rate)
    if ok:
        assert load_pcm(path).size == pytest.approx(8000, abs=16)
    else:
        with pytest.raises(BadMediaError, match=f"{rate} Hz"):
            load_pcm(path)


# ---------------------------------------------------------------------------------------------- query length


def test_a_spoken_query_longer_than_the_cap_is_refused_not_truncated(tmp_path: Path) -> None:
    cap = QUERY_MAX_AUDIO_SECONDS
    assert cap == 60.0
    under = write_wav(tmp_path / "under.wav", cap - 0.5)
    assert load_pcm(under, max_seconds=cap).size == int((cap - 0.5) * 16000)
    exact = write_wav(tmp_path / "exact.wav", cap)
    assert sum(c.size for c in iter_pcm_chunks(exact, 30.0, max_seconds=cap)) == int(cap * 16000)
    over = write_wav(tmp_path / "over.wav", cap + 1)
    for call in decoders(max_seconds=cap).values():
        with pytest.raises(BadMediaError, match="audio longer than the 60 s limit"):
            call(over)  # type: ignore[operator]


def test_a_two_hour_query_stops_decoding_at_the_cap(tmp_path: Path) -> None:
    """An "endless" query: 2 h of audio (460 MB of PCM) is refused after decoding ~60 s of it."""
    path = write_wav(tmp_path / "long.wav", 2 * 3600)
    budget = TimeBudget(600.0)
    started = time.monotonic()
    with pytest.raises(BadMediaError, match="60 s limit"):
        for _ in iter_pcm_chunks(path, 600.0, max_seconds=QUERY_MAX_AUDIO_SECONDS, budget=budget):
            pass
    assert budget.audio_seconds < QUERY_MAX_AUDIO_SECONDS + 1
    assert time.monotonic() - started < 5.0


def test_a_header_claiming_hours_is_not_trusted(tmp_path: Path) -> None:
    """A WAV whose data chunk claims 4 GB but holds 10 s: the cap counts what decodes, not the header."""
    path = write_wav(tmp_path / "liar.wav", 10.0)
    data = bytearray(path.read_bytes())
    at = data.index(b"data") + 4
    data[at : at + 4] = struct.pack("<I", 0xFFFFFFF0)
    data[4:8] = struct.pack("<I", 0xFFFFFFF8)
    path.write_bytes(bytes(data))
    assert load_pcm(path, max_seconds=QUERY_MAX_AUDIO_SECONDS).size == 10 * 16000


# ---------------------------------------------------------------------------------------------- time budget


def test_the_deadline_is_checked_between_packets(tmp_path: Path) -> None:
    """20 minutes of WAV decode in about a second here: a 50 ms budget stops it part-way, with the reason."""
    path = write_wav(tmp_path / "twenty_minutes.wav", 20 * 60)
    budget = TimeBudget(0.05)
    with pytest.raises(BadMediaError, match=r"^decoding took longer than 0\.05 s$"):
        for _ in iter_pcm_chunks(path, 60.0, budget=budget):
            pass
    assert 0 < budget.audio_seconds < 20 * 60  # it started, and it stopped before the end
    with pytest.raises(BadMediaError, match="decoding took longer than"):
        load_pcm(path, budget=TimeBudget(0.0))
    with pytest.raises(BadMediaError, match="decoding took longer than"):
        # A WAV's duration is in its header: decoding is then only the first packets, but budgeted too.
        probe_duration(path, budget=TimeBudget(0.0))


def test_the_default_budget_grows_with_the_audio_decoded() -> None:
    budget = TimeBudget.default()
    assert budget.allowed() == audio.FILE_TIME_BUDGET_SECONDS
    budget.add_audio(100.0)
    assert budget.allowed() == audio.FILE_TIME_BUDGET_SECONDS + 100.0 * audio.TIME_BUDGET_PER_AUDIO_SECOND
    budget.check()  # well inside


class SlowModel:
    """Stands in for a Whisper call: every window takes ``seconds`` and hears one word."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    def __call__(self, pcm: np.ndarray) -> tuple[int, list[tr.RawSegment], str | None]:
        self.calls += 1
        time.sleep(self.seconds)
        return 0, [(0.0, pcm.size / 16000, "word")], "en"


@pytest.fixture
def short_windows(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(tr, "WINDOW_SECONDS", 2.0)
    return 2.0


def test_transcription_time_counts_against_the_budget(tmp_path: Path, short_windows: float) -> None:
    path = write_wav(tmp_path / "tone.wav", 20.0, tone=True)  # ten 2 s windows, none silent
    whole = tr._transcribe_windows(path, SlowModel(0.0), time_budget=60.0)
    assert len(whole.segments) == 10 and whole.duration == pytest.approx(20.0)
    model = SlowModel(0.2)
    with pytest.raises(BadMediaError, match=r"^decoding and transcription took longer than 0\.5 s$"):
        tr._transcribe_windows(path, model, time_budget=0.5)
    assert 2 <= model.calls <= 4  # stopped at the first window after the budget ran out


def test_the_default_budget_applies_when_none_is_given(
    tmp_path: Path, short_windows: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``time_budget=None``: FILE_TIME_BUDGET_SECONDS + TIME_BUDGET_PER_AUDIO_SECOND x audio decoded.

    Shrunk here so that a model taking 0.2 s per 2 s window (RTF 0.1) exceeds RTF 0.05 plus 0.1 s."""
    path = write_wav(tmp_path / "tone.wav", 20.0, tone=True)
    monkeypatch.setattr(audio, "FILE_TIME_BUDGET_SECONDS", 0.1)
    monkeypatch.setattr(audio, "TIME_BUDGET_PER_AUDIO_SECOND", 0.05)
    with pytest.raises(BadMediaError, match="decoding and transcription took longer than .* per second"):
        tr._transcribe_windows(path, SlowModel(0.2))
    monkeypatch.setattr(audio, "TIME_BUDGET_PER_AUDIO_SECOND", 0.5)  # RTF 0.1 is inside RTF 0.5
    assert len(tr._transcribe_windows(path, SlowModel(0.2)).segments) == 10


def test_transcribers_take_the_query_cap(tmp_path: Path, short_windows: float) -> None:
    """``max_seconds`` reaches the decoder through the shared window loop, before any model call."""
    path = write_wav(tmp_path / "long_question.wav", QUERY_MAX_AUDIO_SECONDS + 5, tone=True)
    model = SlowModel(0.0)
    with pytest.raises(BadMediaError, match="60 s limit"):
        tr._transcribe_windows(path, model, max_seconds=QUERY_MAX_AUDIO_SECONDS)
    for cls in (tr.Transcriber, tr._FasterWhisper, tr._OpenAIWhisper):  # every backend takes the options
        params = inspect.signature(cls.transcribe).parameters
        assert all(
            params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in ("max_seconds", "time_budget")
        )


# ---------------------------------------------------------------------------------------------- pixels


def _peak_rss_script(path: Path, max_pixels: int) -> str:
    return f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from mmsearch.images import load_image
from mmsearch.errors import BadMediaError
def mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
base = mb("VmRSS")
try:
    im = load_image({str(path)!r}, max_pixels={max_pixels})
    outcome = "%dx%d:%d" % (im.size[0], im.size[1], im.getpixel((500, 500))[0])
except BadMediaError as e:
    outcome = "refused:" + str(e).replace(" ", "_")
print(outcome, mb("VmHWM") - base)
"""


def _decode_in_fresh_process(path: Path, max_pixels: int) -> tuple[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", _peak_rss_script(path, max_pixels)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    outcome, peak = done.stdout.split()
    return outcome, float(peak)


def test_the_16_bit_9400_px_png_decodes_in_bounded_memory_and_is_refused_as_a_query(tmp_path: Path) -> None:
    """The issue's 167 KB 16-bit PNG: decoded through float64 it took +2.4 GB here; now ~3 bytes per pixel
    for indexing (the 16-bit pixels and their 8-bit copy), and nothing as a query."""
    path = tmp_path / "deep.png"
    deep = np.full((DEEP_SIDE, DEEP_SIDE), 40000, dtype=np.uint16)
    deep[:300, :300] = 1000
    Image.fromarray(deep).save(path, compress_level=9)
    del deep
    assert path.stat().st_size < 400_000
    outcome, peak_mb = _decode_in_fresh_process(path, INDEX_MAX_PIXELS)
    assert peak_mb < 400, peak_mb  # 16-bit pixels 177 MB + their 8-bit copy 88 MB
    assert outcome == f"1024x1024:{40000 >> 8}", outcome  # scaled by a shift, not clipped at 255
    outcome, peak_mb = _decode_in_fresh_process(path, QUERY_MAX_PIXELS)
    assert outcome == "refused:image_too_large:_9400x9400_pixels_(88.4_Mpx)_is_over_the_budget_of_50.0_Mpx"
    assert peak_mb < 30, peak_mb


def test_the_pixel_budget_is_checked_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (600, 400), "green").save(path)
    with pytest.raises(BadMediaError, match=r"600x400 pixels \(0\.2 Mpx\) is over the budget of 0\.2 Mpx"):
        load_image(path, max_pixels=239_999)
    # JPEG draft mode would decode it at 75x50, but what is checked is what the file holds (a progressive
    # JPEG's coefficient buffers are full size whatever the draft scale).
    with pytest.raises(BadMediaError, match="600x400"):
        load_image(path, max_side=64, max_pixels=100_000)
    assert load_image(path, max_pixels=240_000).size == (600, 400)


def test_a_lower_pillow_limit_still_lowers_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "img.png"
    Image.new("L", (100, 100), 3).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 9_999)
    assert images.pixel_budget(INDEX_MAX_PIXELS) == 9_999
    with pytest.raises(BadMediaError, match="over the budget"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # disabling Pillow's check does not lift ours
    assert images.pixel_budget(QUERY_MAX_PIXELS) == QUERY_MAX_PIXELS


def test_concurrent_decodes_are_bounded_by_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = []
    for i in range(16):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (400, 250), (i, 2 * i, 3 * i)).save(paths[-1])  # 100,000 pixels each

    class Recorder(images._PixelsInFlight):
        peak = 0

        def hold(self, pixels: int):  # type: ignore[no-untyped-def]
            outer = super().hold(pixels)

            class Held:
                def __enter__(_) -> None:  # noqa: N805
                    outer.__enter__()
                    Recorder.peak = max(Recorder.peak, self.used)
                    time.sleep(0.01)  # long enough for the other threads to pile up

                def __exit__(_, *exc: object) -> None:  # noqa: N805
                    outer.__exit__(*exc)

            return Held()

    monkeypatch.setattr(images, "_in_flight", Recorder(250_000))
    with ThreadPoolExecutor(8) as pool:
        decoded = list(pool.map(load_image, paths))
    assert [im.getpixel((0, 0)) for im in decoded] == [(i, 2 * i, 3 * i) for i in range(16)]
    assert Recorder.peak == 200_000  # two at a time: a third would be over 250,000


# ---------------------------------------------------------------------------------------------- threads


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("L", (BOMB_SIDE, BOMB_SIDE), 7).save(path)  # 90 Mpx, ~110 KB
    return path


def test_a_90_mpx_png_is_refused_by_its_header(bomb: Path) -> None:
    assert bomb.stat().st_size < 200_000
    assert BOMB_SIDE**2 > Image.MAX_IMAGE_PIXELS >= INDEX_MAX_PIXELS  # type: ignore[operator]
    started = time.monotonic()
    with pytest.raises(BadMediaError, match="too large"):
        load_image(bomb)
    assert time.monotonic() - started < 1.0  # refused before decoding


def test_the_bomb_is_refused_while_another_thread_leaves_catch_warnings(bomb: Path) -> None:
    """The interleaving of the issue, made deterministic: another thread that entered
    ``warnings.catch_warnings()`` before this decode leaves it while Pillow opens the bomb, restoring the
    process-wide filters as they were before this decode's own ``catch_warnings()`` turned the warning
    into an error."""
    leave, left = threading.Event(), threading.Event()

    def other_thread() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            leave.wait(10)
        left.set()

    class Hooked(io.BytesIO):
        """The bomb's bytes; the first read (inside Image.open) lets the other thread leave."""

        first = True

        def read(self, *args: object) -> bytes:  # type: ignore[override]
            if self.first:
                self.first = False
                leave.set()
                left.wait(10)
            return super().read(*args)  # type: ignore[arg-type]

    helper = threading.Thread(target=other_thread)
    helper.start()
    time.sleep(0.05)  # the other thread is inside catch_warnings before the decode starts
    try:
        with pytest.raises(BadMediaError, match="too large"):
            load_image(Hooked(bomb.read_bytes()))
    finally:
        leave.set()
        helper.join()


def test_the_bomb_is_always_refused_among_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 threads x 150 rounds of bombs and normal images. Pillow's limit is lowered to 1 Mpx so that a bomb
    that slips through costs a 1.1 Mpx decode, not a 90 Mpx one."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    small_bomb = tmp_path / "bomb.png"
    Image.new("L", (1100, 1000), 7).save(small_bomb)  # over the lowered limit, under twice it
    normal = tmp_path / "normal.png"
    Image.new("RGB", (64, 48), "red").save(normal)
    decoded_bombs = []

    def worker(seed: int) -> int:
        refused = 0
        for i in range(ROUNDS):
            if (i + seed) % 2:
                assert load_image(normal).size == (64, 48)
                continue
            try:
                load_image(small_bomb)
                decoded_bombs.append(seed)
            except BadMediaError:
                refused += 1
        return refused

    # Switch threads every microsecond instead of every 5 ms: interleavings that are rare otherwise happen.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(8) as pool:
            refused = sum(pool.map(worker, range(8)))
    finally:
        sys.setswitchinterval(previous)
    assert not decoded_bombs, f"{len(decoded_bombs)} bombs decoded, {refused} refused"
    assert refused == 8 * ROUNDS // 2


@pytest.mark.speech
@pytest.mark.parametrize("backend", ["faster-whisper", "openai-whisper"])
def test_real_transcribers_refuse_a_query_over_the_cap(backend: str) -> None:
    from tests._speech import speech_wav, transcriber

    clip = speech_wav("The quick brown fox jumps over the lazy dog.")
    model = transcriber(backend)
    with pytest.raises(BadMediaError, match="audio longer than the 1 s limit"):
        model.transcribe(clip, max_seconds=1.0)
    with pytest.raises(BadMediaError, match="decoding and transcription took longer than"):
        model.transcribe(clip, time_budget=0.0)
    heard = model.transcribe(clip, max_seconds=QUERY_MAX_AUDIO_SECONDS, time_budget=120.0)
    assert "fox" in heard.text.lower()
