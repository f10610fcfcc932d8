"""Safe image decoding: any supported file becomes an RGB PIL image of bounded size, or a BadMediaError.

Memory is bounded before any pixel is decoded: the header's width x height is checked against a pixel
budget (:data:`INDEX_MAX_PIXELS` for indexing, :data:`QUERY_MAX_PIXELS` for query images), and the
pixels being decoded at once by all threads together are bounded too (:data:`PIXELS_IN_FLIGHT`).
Decoded images are shrunk while still 8-bit and single-layer, before alpha compositing, RGB conversion
and EXIF rotation, so those full-size copies are never made.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from mmsearch.errors import BadMediaError

log = logging.getLogger(__name__)

# Pillow opens only the formats we index; anything else (EPS, PSD, ...) is never handed to a decoder.
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Decoded images are shrunk to this longest side before the model transform; CLIP inputs are 224-384 px,
# so this bounds memory for huge photos without changing what the model sees.
DEFAULT_MAX_SIDE = 1024

# Pixel budgets, compared with width x height from the file's header before decoding. The header size,
# not the reduced size JPEG draft mode decodes at, is what memory depends on: a progressive JPEG keeps
# full-size DCT coefficient buffers whatever the draft scale (an 81 Mpx one costs ~240 MB in draft mode,
# a baseline one ~25 MB). Indexing keeps what Pillow's decompression-bomb limit allowed before:
# its default Image.MAX_IMAGE_PIXELS, ~89.5 Mpx; the worst case there (16-bit greyscale) now peaks at
# ~3 bytes per pixel, ~0.27 GB. Query images come from anyone who can reach the server, so their budget is
# lower but still takes a photo straight from a 48 Mpx phone or a 45 Mpx camera.
INDEX_MAX_PIXELS = 89_478_485
QUERY_MAX_PIXELS = 50_000_000
# Pixels being decoded at once by every thread of the process together (ingest's decoder pool, the
# server's thumbnails and queries): two of the largest images the index budget allows. A decode waits
# for room; typical photos (JPEGs charged at their draft size) never do.
PIXELS_IN_FLIGHT = 2 * INDEX_MAX_PIXELS
_STRIP_PIXELS = 1 << 20  # 16/32-bit greyscale is scaled to 8 bits this many pixels at a time

# Truncated files are errors, never silently half-decoded images.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# EXIF orientation -> the transposition that shows the image upright (as ImageOps.exif_transpose does).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_RESIZABLE = ("RGB", "L", "RGBA", "LA", "CMYK")  # modes resized as they are (alpha premultiplied by Pillow)


def pixel_budget(max_pixels: int) -> int:
    """The budget actually applied: ``max_pixels``, or Pillow's ``Image.MAX_IMAGE_PIXELS`` if set lower.

    Lowering Pillow's limit still lowers ours, as it did when its warning was what refused an image;
    raising or disabling it does not lift our budgets.
    """
    limit = Image.MAX_IMAGE_PIXELS
    return max_pixels if limit is None else min(max_pixels, int(limit))


class _PixelsInFlight:
    """A counting semaphore weighted by pixels, shared by every thread that decodes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.capacity)  # one image alone always fits
        with self._cond:
            self._cond.wait_for(lambda: self.used + pixels <= self.capacity)
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


_in_flight = _PixelsInFlight(PIXELS_IN_FLIGHT)


def load_image(
    path: str | Path | IO[bytes],
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    draft_size: int | None = None,
    max_pixels: int = INDEX_MAX_PIXELS,
) -> Image.Image:
    """Decode ``path`` to RGB with EXIF orientation applied and its longest side at most ``max_side``.

    An image whose header declares more than ``max_pixels`` pixels (see :func:`pixel_budget`) is refused
    before decoding. JPEGs are decoded at reduced scale (Pillow draft mode) when far larger than
    ``draft_size`` (default: ``max_side``). Safe to call from several threads at once.
    """
    try:
        with Image.open(path, formats=PIL_FORMATS) as im:
            width, height = im.size
            budget = pixel_budget(max_pixels)
            # Checked here, not by turning Pillow's DecompressionBombWarning into an error: warning filters
            # are process-wide, and another thread's catch_warnings() could restore them mid-decode.
            if width * height > budget:
                raise BadMediaError(
                    f"image too large: {width}x{height} pixels ({width * height / 1e6:.1f} Mpx) is over the "
                    f"budget of {budget / 1e6:.1f} Mpx"
                )
            if im.format == "JPEG":
                # draft() picks the largest DCT scale (1/2, 1/4, 1/8) that stays >= the requested size.
                target = draft_size or max_side
                im.draft("RGB", (target, target))
            progressive = im.format == "JPEG" and bool(im.info.get("progressive"))
            charged = width * height if progressive or im.format != "JPEG" else im.width * im.height
            with _in_flight.hold(charged):
                im.seek(0)  # first frame of GIF / first page of TIFF
                im.load()
                out = _reduce(im, max_side)
    except Image.DecompressionBombError as e:  # over twice Pillow's limit: refused by Image.open itself
        raise BadMediaError(f"image too large (decompression bomb): {e}") from e
    except Image.DecompressionBombWarning as e:  # only if some caller turned Pillow's warning into an error
        raise BadMediaError(f"image too large (decompression-bomb limit): {e}") from e
    except UnidentifiedImageError as e:
        raise BadMediaError("not a supported image (unrecognised or corrupt data)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated/corrupt streams as OSError/SyntaxError/ValueError depending on the codec.
        raise BadMediaError(f"corrupt or truncated image: {e}") from e
    except MemoryError as e:
        raise BadMediaError("image too large to decode in memory") from e
    if out.width == 0 or out.height == 0:
        raise BadMediaError("image has no pixels")
    return out


def _reduce(im: Image.Image, max_side: int) -> Image.Image:
    """The loaded ``im`` as a new RGB image, upright, its longest side at most ``max_side``.

    Every full-size step keeps at most one extra copy, 8-bit: deep greyscale is scaled strip by strip,
    and compositing, RGB conversion and rotation happen after shrinking.
    """
    orientation = im.getexif().get(0x0112)  # read from the file's image: conversions drop its metadata
    out = _to_8bit(im)
    if out.width and out.height and max(out.size) > max_side:
        scale = max_side / max(out.size)
        size = (max(1, round(out.width * scale)), max(1, round(out.height * scale)))
        # reducing_gap: box-reduce by an integer factor first, as Image.thumbnail does; resize is a new image.
        out = out.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    out = _flatten(out)
    if orientation in _ORIENTATION:
        out = out.transpose(_ORIENTATION[orientation])
    # The file's own image object is closed (its pixels released) when load_image's ``with`` ends.
    return out.copy() if out is im else out


def _to_8bit(im: Image.Image) -> Image.Image:
    """``im`` in a mode Pillow resizes correctly: itself when it already is, else one converted copy."""
    mode = im.mode
    if mode in _RESIZABLE:
        return im
    if mode in _DEEP_MODES:
        return _deep_to_l(im)
    if mode == "P":
        return im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if mode in _ALPHA_MODES:
        return im.convert("RGBA")
    return im.convert("L" if mode == "1" else "RGB")


def _deep_to_l(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float greyscale as 8-bit L, scaled (not clipped) by integer shifts.

    16-bit data (the I;16 modes, or I/F holding values above 255) keeps its top 8 bits; 8-bit data held in
    a wider mode is kept as is. Rows are converted a strip at a time, so the only full-size array is the
    8-bit result (the whole image in float64 took 8 bytes per pixel, twice over).
    """
    width, height = im.size
    extrema = im.getextrema()
    high = float(extrema[1]) if isinstance(extrema[1], (int, float)) else 0.0
    sixteen = im.mode.startswith("I;16") or high > 255
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        strip = np.asarray(im.crop((0, top, width, bottom)))
        if im.mode == "F":
            strip = np.nan_to_num(strip, nan=0.0)
            scaled = np.clip(strip, 0.0, 65535.0) / 257.0 if sixteen else np.clip(strip, 0.0, 255.0)
            out[top:bottom] = scaled  # float -> uint8 truncates, as the conversion always did
        elif sixteen:
            out[top:bottom] = np.right_shift(np.clip(strip, 0, 65535), 8)
        else:
            out[top:bottom] = np.clip(strip, 0, 255)
    return Image.fromarray(out, "L")


def _flatten(im: Image.Image) -> Image.Image:
    """RGB, with any alpha composited onto white (transparent pixels show as white, not black)."""
    if im.mode in _ALPHA_MODES:
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return white
    return im if im.mode == "RGB" else im.convert("RGB")
