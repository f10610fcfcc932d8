"""Image decoding: every mode to correct RGB, orientation, frames and pages, and hostile files refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmsearch.errors import BadMediaError
from mmsearch.images import load_image


def pixel(im: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return tuple(im.getpixel(xy))  # type: ignore[arg-type]


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(p)  # pure red in CMYK
    im = load_image(p)
    assert im.mode == "RGB"
    r, g, b = pixel(im, (10, 10))
    assert r > 200 and g < 60 and b < 60


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    p = tmp_path / "deep.png"
    arr = np.full((10, 10), 32768, dtype=np.uint16)  # mid grey in 16 bits
    Image.fromarray(arr).save(p)
    im = load_image(p)
    assert im.mode == "RGB"
    assert all(120 <= v <= 135 for v in pixel(im))


def test_palette_with_transparency_goes_onto_white(tmp_path: Path) -> None:
    p = tmp_path / "pal.png"
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0: black but transparent; 1: blue
    pal.paste(1, (0, 0, 5, 10))
    pal.save(p, transparency=0)
    assert Image.open(p).mode == "P"
    im = load_image(p)
    assert im.mode == "RGB"
    assert pixel(im, (2, 5)) == (0, 0, 255)
    assert pixel(im, (8, 5)) == (255, 255, 255)  # transparent black shows as white, not black


def test_rgba_and_la_alpha_composited_on_white(tmp_path: Path) -> None:
    p = tmp_path / "rgba.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(p)  # fully transparent red
    assert pixel(load_image(p)) == (255, 255, 255)
    p2 = tmp_path / "la.png"
    Image.new("LA", (4, 4), (0, 255)).save(p2)
    assert pixel(load_image(p2)) == (0, 0, 0)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    p = tmp_path / "rotated.jpg"
    im = Image.new("RGB", (40, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    im.save(p, exif=exif)
    assert load_image(p).size == (20, 40)


def test_animated_gif_first_frame_and_multipage_tiff_first_page(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in ("red", "green", "blue")]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert pixel(load_image(gif))[0] > 200
    tif = tmp_path / "pages.tiff"
    frames[2].save(tif, save_all=True, append_images=frames[:2])
    assert pixel(load_image(tif))[2] > 200


def test_huge_jpeg_is_decoded_at_reduced_size(tmp_path: Path) -> None:
    p = tmp_path / "big.jpg"
    Image.new("RGB", (6000, 4000), "green").save(p, quality=50)
    im = load_image(p, max_side=512)
    assert max(im.size) == 512
    assert im.size[0] / im.size[1] == pytest.approx(1.5, rel=0.01)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "not a supported image"),
        (b"this is a text file, not a jpeg\n", "not a supported image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "corrupt|not a supported image"),
    ],
)
def test_garbage_is_refused(tmp_path: Path, content: bytes, reason: str) -> None:
    p = tmp_path / "x.jpg"
    p.write_bytes(content)
    with pytest.raises(BadMediaError, match=reason):
        load_image(p)


def test_truncated_jpeg_and_png_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8))
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        noisy.save(buf, format=fmt)
        p = tmp_path / f"cut.{fmt.lower()}"
        p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        with pytest.raises(BadMediaError):
            load_image(p)


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    # A tiny PNG whose header claims 20000 x 20000 pixels: over Pillow's limit, which we keep.
    p = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(p, optimize=True)
    assert p.stat().st_size < 200_000
    assert Image.MAX_IMAGE_PIXELS is not None
    with pytest.raises(BadMediaError, match="decompression|too large"):
        load_image(p)


def test_formats_we_do_not_index_are_never_decoded(tmp_path: Path) -> None:
    p = tmp_path / "icon.png"
    Image.new("RGB", (16, 16), "red").save(p, format="ICO")  # a real ICO under a .png name
    with pytest.raises(BadMediaError, match="not a supported image"):
        load_image(p)


def test_large_alpha_image_is_shrunk_then_composited_on_white(tmp_path: Path) -> None:
    p = tmp_path / "big.png"
    im = Image.new("RGBA", (3000, 2000), (0, 0, 0, 0))  # transparent black on the left
    im.paste((0, 0, 255, 255), (1500, 0, 3000, 2000))  # opaque blue on the right
    im.save(p)
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (1024, 683)
    assert pixel(out, (100, 300)) == (255, 255, 255)
    assert pixel(out, (900, 300)) == (0, 0, 255)


def test_orientation_is_applied_after_shrinking(tmp_path: Path) -> None:
    p = tmp_path / "wide.jpg"
    im = Image.new("RGB", (3000, 1000), "white")
    im.paste((255, 0, 0), (0, 0, 300, 1000))  # red at the left edge: at the top once turned upright
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    im.save(p, exif=exif)
    out = load_image(p)
    assert out.size == (341, 1024)
    r, g, b = pixel(out, (170, 20))
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize(
    "mode, value, expected",
    [("I", 200, 200), ("I", 40000, 40000 >> 8), ("I", -5, 0), ("F", 100.7, 100), ("F", 65535.0, 255)],
)
def test_deep_modes_are_scaled_to_8_bits(tmp_path: Path, mode: str, value: float, expected: int) -> None:
    p = tmp_path / "deep.tiff"
    Image.new(mode, (1200, 30), value).save(p)
    out = load_image(p, max_side=600)
    assert out.size == (600, 15)
    assert pixel(out, (300, 7)) == (expected,) * 3
