"""Hostile input end to end: one folder of bad, odd and huge files through the real `mmsearch index`.

The run must finish (exit 0, a summary), index what is valid (odd modes, animations, non-UTF-8 names),
record every file it skipped with its reason (`mmsearch status --json`), and keep memory bounded.

Unreadable files: the tests run as root, for whom ``chmod 000`` stops nothing. The index run is started
under ``setpriv`` with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH removed from its bounding set, so the
kernel's permission checks apply to it as to any user: a ``chmod 000`` file and folder really are
unreadable to it. A FIFO named like an image is also there (reading it would block forever).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import wave
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import mmsearch
from tests.conftest import TINY_MODEL, solid
from tests.test_crash import Zygote
from tests.test_ingest import assert_consistent

ROOT = Path(__file__).resolve().parents[1]
HUGE_SIDE = 9000  # 81 Mpx: under Pillow's 89.5 Mpx bomb limit, so a valid image to decode at reduced size
LONG_AUDIO_S = 2 * 3600  # 2 h: 460 MB as float32 PCM at 16 kHz if it were ever decoded whole
# The hostile run may use at most this much more memory than a run over a benign folder that loads the
# same models (image tower and Whisper): the huge files must not add more than their reduced decodes.
RSS_MARGIN_MB = 400


def _png_bomb(path: Path, side: int = 60000) -> None:
    """A few hundred bytes claiming side×side pixels (3.6 Gpx): a PNG header with a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _wav(path: Path, seconds: float, rate: int = 16000, tone: bool = False) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        if tone:
            t = np.arange(int(seconds * rate)) / rate
            w.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())
        else:
            w.writeframes(b"\0\0" * int(seconds * rate))


def _long_silent_wav(path: Path, seconds: int) -> None:
    """8 kHz unsigned 8-bit silence (0x80): 28.8 MB per hour, written without building it in memory."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        block = b"\x80" * 8000 * 60
        for _ in range(seconds // 60):
            w.writeframesraw(block)


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch /tmp/mmsearch-pickle-was-loaded",))


def build_hostile_folder(m: Path) -> tuple[set[bytes], dict[str, str]]:
    """Returns (keys of files that must be indexed, {name: expected reason fragment} of skipped ones)."""
    m.mkdir(parents=True)
    ok: set[str] = set()
    solid(m / "good.png", "red")
    (m / "good.txt").write_text("a good caption")
    ok.add("good.png")
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8))
    for fmt, name in (("JPEG", "truncated.jpg"), ("PNG", "truncated.png")):
        buf = io.BytesIO()
        noisy.save(buf, format=fmt)
        (m / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (m / "empty.jpg").write_bytes(b"")
    (m / "garbage.png").write_bytes(rng.bytes(5000))
    (m / "text.jpg").write_text("I am a text file with an image name\n")
    (m / "pickle.png").write_bytes(pickle.dumps(_Evil()))
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, format="ICO")  # a format we never decode, under .png
    (m / "icon.png").write_bytes(buf.getvalue())
    _png_bomb(m / "bomb.png")
    # Odd but valid images.
    Image.new("L", (HUGE_SIDE, HUGE_SIDE), 90).save(m / "huge.jpg", quality=30)
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(m / "cmyk.jpg")
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(m / "deep16.png")
    pal = Image.new("P", (30, 30), 0)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 15, 30))
    pal.save(m / "palette_alpha.png", transparency=0)
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "green", "blue")]
    frames[0].save(m / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    frames[2].save(m / "pages.tiff", save_all=True, append_images=frames[:2])
    ok |= {"huge.jpg", "cmyk.jpg", "deep16.png", "palette_alpha.png", "anim.gif", "pages.tiff"}
    # A non-UTF-8 name, with its caption.
    raw = os.path.join(os.fsencode(m), b"caf\xe9-\xff.png")
    solid(Path(os.fsdecode(raw)), "blue")
    with open(os.path.join(os.fsencode(m), b"caf\xe9-\xff.txt"), "wb") as f:
        f.write("latin-1 caption: caf\xe9".encode("latin-1"))
    # Links: a loop back to the root, a second link to a folder, a dangling link.
    solid(m / "sub" / "inner.png", "green")
    ok.add("sub/inner.png")
    os.symlink(m, m / "sub" / "loop")
    os.symlink(m / "sub", m / "sub-again")
    os.symlink(m / "nowhere.png", m / "dangling.png")
    # Unreadable: a file and a folder with mode 000 (see the module docstring), and a FIFO.
    solid(m / "secret.png", "black")
    os.chmod(m / "secret.png", 0)
    solid(m / "locked" / "hidden.png", "white")
    os.chmod(m / "locked", 0)
    os.mkfifo(m / "pipe.jpg")
    # Audio: garbage, empty, silent, very long (silent) and not speech.
    (m / "garbage.wav").write_bytes(rng.bytes(20000))
    (m / "empty.mp3").write_bytes(b"")
    _wav(m / "silence.wav", 5.0)
    _long_silent_wav(m / "long.wav", LONG_AUDIO_S)
    keys = {os.fsencode(m / name) for name in ok} | {raw}
    skipped = {
        "truncated.jpg": "corrupt",
        "truncated.png": "corrupt",
        "empty.jpg": "empty file",
        "garbage.png": "not a supported image",
        "text.jpg": "not a supported image",
        "pickle.png": "not a supported image",
        "icon.png": "not a supported image",
        "bomb.png": "decompression bomb",
        "dangling.png": "broken symlink",
        "secret.png": "Permission denied",
        "locked": "unreadable folder",
        "pipe.jpg": "not a regular file",
        "garbage.wav": "",
        "empty.mp3": "empty file",
        "silence.wav": "no speech",
        "long.wav": "no speech",
    }
    return keys, skipped


def _run(args: list[str], *, drop_dac: bool = False, timeout: float = 900) -> tuple[int, str, str, float]:
    """Run `python -m mmsearch ARGS`; returns (exit code, stdout, stderr, the process's peak RSS in MB)."""
    cmd = [sys.executable, "-m", "mmsearch", *args]
    if drop_dac:
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *cmd]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        # wait4 gives this child's own peak RSS (setpriv execs python: same process).
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(cmd)
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        # surrogateescape: a non-UTF-8 file name printed by the CLI comes back as the same bytes.
        text = [f.read().decode("utf-8", "surrogateescape") for f in (out, err)]
        return proc.returncode, text[0], text[1], usage.ru_maxrss / 1024


@pytest.mark.slow
def test_hostile_folder_end_to_end(tmp_path: Path) -> None:
    # Baseline: a benign folder through the same models (the image tower and Whisper get loaded). It also
    # exports the tiny model's ONNX tower into the session cache, so that one-time cost is in neither run.
    benign = tmp_path / "benign"
    benign.mkdir()
    Image.new("RGB", (64, 48), "red").save(benign / "a.png")
    (benign / "a.txt").write_text("a red picture")
    _wav(benign / "quiet.wav", 5.0)
    code, _, err, baseline_mb = _run(
        [
            "index",
            str(benign),
            "--index",
            str(tmp_path / "benign-idx"),
            "--model",
            TINY_MODEL,
            "--pretrained",
            "random",
        ]
    )
    assert code == 0, err
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to make files unreadable to a root process")
    marker = Path("/tmp/mmsearch-pickle-was-loaded")
    marker.unlink(missing_ok=True)
    media, index = tmp_path / "media", tmp_path / "idx"
    must_index, must_skip = build_hostile_folder(media)
    try:
        code, out, err, peak_mb = _run(
            ["index", str(media), "--index", str(index), "--model", TINY_MODEL, "--pretrained", "random"],
            drop_dac=True,
        )
        assert code == 0, err
        assert "Traceback" not in err, err
        assert out.startswith(f"indexed {media}:") and f"{len(must_skip)} skipped" in out, out
        # With an 81 Mpx JPEG and 2 h of audio in the folder:
        assert peak_mb < baseline_mb + RSS_MARGIN_MB, (peak_mb, baseline_mb)
        print(f"hostile run: peak RSS {peak_mb:.0f} MB (benign baseline {baseline_mb:.0f} MB)")
        code, status_out, err, _ = _run(["status", "--index", str(index), "--json"])
    finally:
        os.chmod(media / "locked", 0o755)
        os.chmod(media / "secret.png", 0o644)
    assert code == 0, err
    status = json.loads(status_out)
    recorded = {os.fsencode(s["path"]): s["reason"] for s in status["skipped"]}
    for name, fragment in must_skip.items():
        reason = recorded.get(os.fsencode(media / name), "<not recorded>")
        assert fragment in reason, (name, reason)
    assert len(recorded) == len(must_skip), recorded
    assert status["files"]["image_ok"] == len(must_index)
    assert not marker.exists()  # the pickle in pickle.png was never loaded

    with mmsearch.Index.open(index) as idx:
        assert_consistent(idx)
        q = np.ones(idx.store.dim, np.float32) / np.sqrt(idx.store.dim)
        found = {os.fsencode(h.path) for h in idx.search_vector(q, target="images", k=100)}
        captions = {h.text for h in idx.search_vector(q, target="captions", k=100)}
    assert found == must_index  # the non-UTF-8 name among them, byte for byte; no folder walked twice
    assert captions == {"a good caption", "latin-1 caption: caf\xe9"}


@pytest.mark.slow
def test_huge_image_and_long_audio_are_decoded_in_bounded_memory(tmp_path: Path) -> None:
    """Peak RSS of a process decoding a 81 Mpx JPEG (243 MB as RGB) and streaming 2 h of audio."""
    Image.new("L", (HUGE_SIDE, HUGE_SIDE), 90).save(tmp_path / "huge.jpg", quality=30)
    _long_silent_wav(tmp_path / "long.wav", LONG_AUDIO_S)
    script = f"""
import resource, sys
sys.path.insert(0, {str(ROOT)!r})
from mmsearch.images import load_image
from mmsearch.audio import iter_pcm_chunks
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = peak()
im = load_image({str(tmp_path / "huge.jpg")!r})
image_mb = peak() - base
base = peak()
seconds = sum(c.size for c in iter_pcm_chunks({str(tmp_path / "long.wav")!r}, 600.0)) / 16000
print(im.size[0], im.size[1], image_mb, peak() - base, seconds)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    w, h, image_mb, audio_mb, seconds = done.stdout.split()
    assert max(int(w), int(h)) <= 1024
    assert float(image_mb) < 100, image_mb  # a full decode needs 243 MB
    assert float(seconds) == pytest.approx(LONG_AUDIO_S, abs=1)
    assert float(audio_mb) < 150, audio_mb  # decoded whole it would be 460 MB


@pytest.mark.slow
def test_bad_command_lines_and_query_files(tmp_path: Path) -> None:
    """One clear line and a non-zero exit, never a traceback (more cases in test_cli.py)."""
    zygote = Zygote()
    try:
        media, index = tmp_path / "m", tmp_path / "idx"
        solid(media / "a.png")
        (tmp_path / "garbage.png").write_bytes(b"\x89PNG garbage")
        (tmp_path / "noise.wav").write_bytes(os.urandom(4000))
        (tmp_path / "a-folder.png").mkdir()
        out = str(tmp_path / "job")
        first = zygote.start(
            kind="cli",
            argv=[
                "index",
                str(media),
                "--index",
                str(index),
                "--model",
                TINY_MODEL,
                "--pretrained",
                "random",
            ],
            out=out,
        )
        assert first.wait() == 0, first.file(".stderr")
        cases = [
            (["index"], 2, "Missing argument"),
            (["index", str(media), "--workers", "0"], 2, "workers"),
            (["frobnicate"], 2, "No such command"),
            (["query", "x", "-k", "many"], 2, "Usage:"),
            (["query", "--image", str(tmp_path / "garbage.png")], 1, "cannot read query image"),
            (["query", "--image", str(tmp_path / "a-folder.png")], 1, "query image not found"),
            (["query", "--audio", str(tmp_path / "noise.wav")], 1, "cannot read query audio"),
            (["status", "--index", str(tmp_path / "nothing")], 1, "no mmsearch index"),
        ]
        for argv, code, message in cases:
            if "--index" not in argv:
                argv = [*argv, "--index", str(index)]
            job = zygote.start(kind="cli", argv=argv, out=out)
            rc = job.wait()
            text = job.file(".stderr") + job.file(".stdout")
            assert rc == code, (argv, rc, text)
            assert message in text and "Traceback" not in text, (argv, text)
            if code == 1:
                assert len(job.file(".stderr").strip().splitlines()) == 1, (argv, text)
    finally:
        zygote.close()


@pytest.mark.timeout(120)  # reading a FIFO as a file would never end
def test_a_file_swapped_for_a_fifo_or_a_device_after_the_scan_is_skipped(tmp_path: Path) -> None:
    """Between the scan (which keeps regular files only) and the hashing, someone with write access to the
    folder replaces files with a FIFO and a link to /dev/zero: each is skipped with its reason, at once, and
    the other images are indexed."""
    media = tmp_path / "m"
    for i, color in enumerate(["red", "green", "blue", "yellow", "purple", "orange"]):
        solid(media / f"{i}.png", color)

    def swap(stage: str, done: int, total: int) -> None:
        if stage == "hash" and done == 0 and not (media / "4.png").is_symlink():
            (media / "3.png").unlink()
            os.mkfifo(media / "3.png")
            (media / "4.png").unlink()
            (media / "4.png").symlink_to("/dev/zero")

    with mmsearch.Index.create(tmp_path / "idx", model=TINY_MODEL, pretrained="random") as idx:
        report = idx.add_folder(media, progress=swap)
        assert report.images_embedded == 4
        assert sorted(report.skipped) == [
            (str(media / "3.png"), "unreadable: not a regular file"),
            (str(media / "4.png"), "unreadable: not a regular file"),
        ]
        assert_consistent(idx)
