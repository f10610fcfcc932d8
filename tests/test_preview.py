"""Terminal previews (mmsearch.preview): the escape sequences of each protocol read back to the thumbnail they
carry (kitty and iTerm2: PNG of the right size; sixel: decoded here pixel by pixel), and detection from the
environment."""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmsearch import preview
from mmsearch.errors import BadMediaError

KITTY_ESCAPE = re.compile(rb"\x1b_G([^;]*);([A-Za-z0-9+/=]*)\x1b\\")


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    """A 640x400 picture: a red disc and a blue bar on white (a thumbnail is 256x160, not a multiple of 6)."""
    im = Image.new("RGB", (640, 400), "white")
    draw = ImageDraw.Draw(im)
    draw.ellipse((40, 40, 360, 360), fill=(215, 35, 35))
    draw.rectangle((420, 60, 600, 340), fill=(35, 75, 215))
    path = tmp_path / "picture.png"
    im.save(path)
    return path


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return im.size


def test_kitty_sends_a_png_in_chunks(picture: Path) -> None:
    out = preview.preview_bytes(picture, "kitty")
    escapes = KITTY_ESCAPE.findall(out)
    assert b"".join(m.group(0) for m in KITTY_ESCAPE.finditer(out)) == out  # nothing else in between
    keys = [dict(kv.split(b"=") for kv in k.split(b",")) for k, _ in escapes]
    assert keys[0][b"a"] == b"T" and keys[0][b"f"] == b"100" and keys[0][b"q"] == b"2"
    assert [k[b"m"] for k in keys] == [b"1"] * (len(keys) - 1) + [b"0"]
    assert all(set(k) == {b"m"} for k in keys[1:])  # later chunks carry only m
    assert all(len(payload) <= preview.KITTY_CHUNK for _, payload in escapes)
    assert len(escapes) > 1  # a 256x160 PNG is more than one chunk
    assert png_size(base64.standard_b64decode(b"".join(p for _, p in escapes))) == (256, 160)


def test_iterm2_sends_a_png_with_its_size(picture: Path) -> None:
    out = preview.preview_bytes(picture, "iterm2")
    m = re.fullmatch(rb"\x1b\]1337;File=([^:]*):([A-Za-z0-9+/=]+)\x07", out)
    assert m is not None
    args = dict(kv.split(b"=") for kv in m.group(1).split(b";"))
    data = base64.standard_b64decode(m.group(2))
    assert args[b"inline"] == b"1" and int(args[b"size"]) == len(data)
    assert png_size(data) == (256, 160)


def decode_sixel(data: bytes) -> np.ndarray:
    """The RGB image (0-255) a sixel stream draws; every pixel must be drawn exactly once."""
    assert data.startswith(b"\x1bP0;1;0q") and data.endswith(b"\x1b\\")
    body = data[len(b"\x1bP0;1;0q") : -2].decode("ascii")
    raster = re.match(r'"1;1;(\d+);(\d+)', body)
    assert raster is not None
    width, height = int(raster.group(1)), int(raster.group(2))
    palette: dict[int, tuple[int, int, int]] = {}
    drawn = np.zeros((height, width), np.int32)
    image = np.zeros((height, width, 3), np.float64)
    x = top = 0
    colour = -1
    token = re.compile(r"#(\d+)(?:;2;(\d+);(\d+);(\d+))?|!(\d+)([?-~])|([?-~])|(\$)|(-)")
    at = raster.end()
    while at < len(body):
        m = token.match(body, at)
        assert m is not None, body[at : at + 20]
        at = m.end()
        reg, r, g, b, count, repeated, single, cr, nl = m.groups()
        if reg is not None:
            colour = int(reg)
            if r is not None:
                palette[colour] = (int(r), int(g), int(b))
            continue
        if cr:
            x = 0
            continue
        if nl:
            x, top = 0, top + 6
            continue
        char, n = (repeated, int(count)) if repeated else (single, 1)
        bits = ord(char) - 63
        for _ in range(n):
            for dy in range(6):
                if bits >> dy & 1:
                    drawn[top + dy, x] += 1
                    image[top + dy, x] = np.array(palette[colour]) * 255 / 100
            x += 1
    assert (drawn == 1).all()
    return image


def test_sixel_draws_the_thumbnail(picture: Path) -> None:
    out = preview.preview_bytes(picture, "sixel")
    decoded = decode_sixel(out)
    expected = np.asarray(preview.thumbnail(picture), np.float64)
    assert decoded.shape == expected.shape == (160, 256, 3)
    # 256 colours of a flat-coloured picture: close everywhere (edges are antialiased by the resize)
    assert np.abs(decoded - expected).mean() < 2.0
    assert out.count(b"-") == -(-160 // 6)  # one band per six rows, the last one partial


def test_sixel_of_a_tiny_odd_image() -> None:
    im = Image.new("RGB", (1, 7), (0, 255, 0))
    decoded = decode_sixel(preview.sixel(im))
    assert decoded.shape == (7, 1, 3) and np.allclose(decoded, [0, 255, 0])


def test_unreadable_images_and_protocols_are_refused(tmp_path: Path, picture: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(BadMediaError):
        preview.preview_bytes(broken, "kitty")
    with pytest.raises(BadMediaError, match="cannot open"):
        preview.preview_bytes(tmp_path / "gone.png", "iterm2")
    with pytest.raises(ValueError, match="unknown preview protocol"):
        preview.preview_bytes(picture, "vt340")


def test_a_large_image_is_decoded_within_the_side_budget(tmp_path: Path) -> None:
    path = tmp_path / "large.jpg"
    Image.new("RGB", (4000, 3000), "orange").save(path, quality=80)
    assert preview.thumbnail(path).size == (256, 192)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TERM": "xterm-kitty"}, "kitty"),
        ({"TERM": "xterm-256color", "KITTY_WINDOW_ID": "3"}, "kitty"),
        ({"TERM": "xterm-ghostty", "TERM_PROGRAM": "ghostty"}, "kitty"),
        ({"TERM": "xterm-256color", "TERM_PROGRAM": "iTerm.app"}, "iterm2"),
        ({"TERM": "xterm-256color", "TERM_PROGRAM": "WezTerm"}, "iterm2"),
        ({"TERM": "xterm-256color", "LC_TERMINAL": "iTerm2"}, "iterm2"),  # over ssh
        ({"TERM": "xterm-256color", "KONSOLE_VERSION": "230804"}, "iterm2"),
        ({"TERM": "foot"}, "sixel"),
        ({"TERM": "mlterm"}, "sixel"),
        ({"TERM": "xterm-256color"}, None),
        ({"TERM": "dumb"}, None),
        ({}, None),
        ({"TERM": "tmux-256color", "TERM_PROGRAM": "tmux", "KITTY_WINDOW_ID": "1"}, None),
        ({"TERM": "xterm-kitty", "TMUX": "/tmp/tmux-0/default,1,0"}, None),
        ({"TERM": "xterm-256color", "MMSEARCH_PREVIEW": "sixel"}, "sixel"),
        ({"TERM": "xterm-kitty", "MMSEARCH_PREVIEW": "none"}, None),
        ({"TERM": "xterm-kitty", "MMSEARCH_PREVIEW": "bogus"}, None),
        ({"TMUX": "x", "MMSEARCH_PREVIEW": " Kitty "}, "kitty"),
    ],
)
def test_detect_protocol(env: dict[str, str], expected: str | None) -> None:
    assert preview.detect_protocol(env) == expected


def test_write_previews_draws_image_hits_only(tmp_path: Path, picture: Path) -> None:
    broken = tmp_path / "broken\x1b[2J.png"
    broken.write_bytes(b"not an image")
    odd = tmp_path / os.fsdecode(b"odd\xff.png")
    odd.write_bytes(picture.read_bytes())

    def hit(rank: int, kind: str, path: Path, text: str | None = None, start: float | None = None) -> dict:
        raw = os.fsencode(path)
        return {
            "rank": rank,
            "score": 0.5,
            "confidence": None,
            "kind": kind,
            "path": raw.decode("utf-8", "replace"),
            "path_b64": base64.standard_b64encode(raw).decode(),
            "text": text,
            "start": start,
            "end": None if start is None else start + 2,
        }

    hits = [
        hit(1, "image", picture),
        hit(2, "segment", tmp_path / "talk.wav", "a red circle", 3.0),
        hit(3, "caption", odd, "a red disc"),
        hit(4, "image", broken),
    ]
    out = io.BytesIO()
    preview.write_previews(hits, "iterm2", out)
    data = out.getvalue()
    images = re.findall(rb"\x1b\]1337;File=[^:]*:([A-Za-z0-9+/=]+)\x07", data)
    assert len(images) == 2  # the image, and the captioned image whose name is not UTF-8 (read by its bytes)
    assert all(png_size(base64.standard_b64decode(i)) == (256, 160) for i in images)
    text = re.sub(rb"\x1b\]1337;[^\x07]*\x07", b"", data).decode()
    assert "\x1b" not in text  # the broken file's name is printed escaped, never as an escape
    assert "no preview" in text and "[0:03–0:05] a red circle" in text
    assert text.index("talk.wav") < text.index("a red disc") < text.index("no preview")
