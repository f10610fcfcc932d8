"""Safe image decoding: any supported file becomes an RGB PIL image of bounded size, or a BadMediaError.

Pillow decodes JPEG, PNG, WebP, GIF, BMP and TIFF; AVIF through Pillow's own plugin; HEIC/HEIF through
pillow-heif, registered the first time such a file is met; camera RAW files (by suffix) through rawpy in
:mod:`mmsearch.raw`. Neither pillow-heif nor rawpy is imported before a file needs it, so a JPEG never pays
for them, and a missing one is a reason on that file only.

Memory is bounded before any pixel is decoded: the header's width x height is checked against a pixel
budget (:data:`INDEX_MAX_PIXELS` for indexing, :data:`QUERY_MAX_PIXELS` for query images), and the
pixels being decoded at once by all threads together are bounded too (:data:`PIXELS_IN_FLIGHT`).
Decoded images are shrunk while still 8-bit and single-layer, before alpha compositing, RGB conversion
and EXIF rotation, so those full-size copies are never made.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from mmsearch.constants import RAW_SUFFIXES
from mmsearch.errors import BadMediaError

log = logging.getLogger(__name__)

# Pillow opens only the formats we index; anything else (EPS, PSD, ...) is never handed to a decoder.
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")
# Tried first. The ISO-BMFF containers (AVIF, HEIF) are tried only when none of these recognises the file,
# which is when pillow-heif gets registered: a JPEG never loads it. AVIF comes before HEIF because both
# accept the generic 'mif1' brand and pillow-heif cannot decode AV1 (it fails instead of passing it on).
_CLASSIC_FORMATS = PIL_FORMATS[:6]
_CONTAINER_FORMATS = ("AVIF", "HEIF")
# The ftyp major brands of HEVC-coded HEIF files (pillow-heif's own list); AVIF's are "avif" and "avis".
_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
)
_HEIC_ONLY_BRANDS = _HEIF_BRANDS - {b"mif1", b"msf1"}  # 'mif1'/'msf1' may be AVIF too
# pillow-heif and Pillow's AVIF plugin read the whole file into memory before parsing its header.
MAX_CONTAINER_BYTES = 256 * 1024 * 1024
PHOTOS_HINT = "pip install 'mmsearch[photos]'"
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


def hold_pixels(pixels: int) -> contextlib.AbstractContextManager[None]:
    """Room for ``pixels`` being decoded, shared with every other decode of the process (waits for it)."""
    return _in_flight.hold(pixels)


_heif_lock = threading.Lock()
_heif_registered: bool | None = None  # None: not tried yet; False: pillow-heif is not installed


def _heif_available() -> bool:
    """Register pillow-heif's HEIF opener with Pillow, once per process; False if it is not installed."""
    global _heif_registered
    with _heif_lock:
        if _heif_registered is None:
            try:
                import pillow_heif
            except ImportError:
                _heif_registered = False
            else:
                # Depth maps and auxiliary images (portrait mattes, HDR gain maps) are never shown: not read.
                pillow_heif.register_heif_opener(depth_images=False, aux_images=False)
                _heif_registered = True
                log.debug("registered pillow-heif %s for HEIC/HEIF", pillow_heif.__version__)
        return _heif_registered


def load_image(
    path: str | Path | IO[bytes],
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    draft_size: int | None = None,
    max_pixels: int = INDEX_MAX_PIXELS,
    suffix: str | None = None,
) -> Image.Image:
    """Decode ``path`` to RGB with EXIF orientation applied and its longest side at most ``max_side``.

    An image whose header declares more than ``max_pixels`` pixels (see :func:`pixel_budget`) is refused
    before decoding. JPEGs are decoded at reduced scale (Pillow draft mode), and HEIC files from an embedded
    thumbnail, when far larger than ``draft_size`` (default: ``max_side``). Camera RAW files are recognised
    by their suffix: ``path``'s, else ``suffix`` (give it for an open file whose name is unknown, such as
    one from ``os.fdopen``), and decoded by :func:`mmsearch.raw.load_raw`. Safe to call from several threads.
    """
    if (suffix if suffix is not None else _suffix(path)).lower() in RAW_SUFFIXES:
        from mmsearch import raw  # rawpy is imported only when a RAW file is met

        return raw.load_raw(path, max_side=max_side, target=draft_size or max_side, max_pixels=max_pixels)
    try:
        with _open(path) as im:
            width, height = im.size
            budget = pixel_budget(max_pixels)
            # Checked here, not by turning Pillow's DecompressionBombWarning into an error: warning filters
            # are process-wide, and another thread's catch_warnings() could restore them mid-decode.
            if width * height > budget:
                raise BadMediaError(
                    f"image too large: {width}x{height} pixels ({width * height / 1e6:.1f} Mpx) is over the "
                    f"budget of {budget / 1e6:.1f} Mpx"
                )
            if im.format in ("JPEG", "HEIF"):
                # JPEG: the largest DCT scale (1/2, 1/4, 1/8) that stays >= the requested size. HEIF: the
                # smallest embedded thumbnail that is a scaled copy of the image and >= that size, if any.
                target = draft_size or max_side
                im.draft("RGB", (target, target))
            # What decoding costs: the drafted size, except for progressive JPEGs (see the budgets above)
            # and the formats that always decode at full size.
            cheap = im.format == "HEIF" or (im.format == "JPEG" and not im.info.get("progressive"))
            charged = im.width * im.height if cheap else width * height
            if im.format in _CONTAINER_FORMATS:
                charged *= 2  # libheif/libavif decode into their own buffer, which Pillow then copies
            with _in_flight.hold(charged):
                if im.format != "HEIF":  # a HEIF file opens on its primary image, not always the first
                    im.seek(0)  # first frame of GIF / first page of TIFF
                im.load()
                out = reduce_image(im, max_side)
    except Image.DecompressionBombError as e:  # over twice Pillow's limit: refused by Image.open itself
        raise BadMediaError(f"image too large (decompression bomb): {e}") from e
    except Image.DecompressionBombWarning as e:  # only if some caller turned Pillow's warning into an error
        raise BadMediaError(f"image too large (decompression-bomb limit): {e}") from e
    except UnidentifiedImageError as e:
        raise BadMediaError("not a supported image (unrecognised or corrupt data)") from e
    except (OSError, SyntaxError, ValueError, EOFError, RuntimeError) as e:
        # Pillow reports truncated/corrupt streams as OSError/SyntaxError/ValueError depending on the codec;
        # pillow-heif passes some libheif errors on as RuntimeError.
        raise BadMediaError(f"corrupt or truncated image: {str(e).strip()}") from e
    except MemoryError as e:
        raise BadMediaError("image too large to decode in memory") from e
    if out.width == 0 or out.height == 0:
        raise BadMediaError("image has no pixels")
    return out


def _suffix(path: str | Path | IO[bytes]) -> str:
    """The name suffix of a path, or of an open file's name when it has one."""
    name = path if isinstance(path, (str, Path)) else getattr(path, "name", None)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    return os.path.splitext(name)[1] if isinstance(name, (str, Path)) else ""


def _open(path: str | Path | IO[bytes]) -> ImageFile.ImageFile:
    """The image at ``path`` opened (header read) by one of :data:`PIL_FORMATS`: the classic formats first,
    then AVIF/HEIF, registering pillow-heif when the file is a HEIF container."""
    start = None if isinstance(path, (str, Path)) else path.tell()
    try:
        return Image.open(path, formats=_CLASSIC_FORMATS)
    except UnidentifiedImageError:
        if start is not None:
            path.seek(start)  # type: ignore[union-attr]
        prefix = _peek(path, 12)
        if prefix[4:8] != b"ftyp":
            raise
    brand = prefix[8:12]
    size = _file_size(path)
    if size > MAX_CONTAINER_BYTES:
        raise BadMediaError(
            f"HEIF/AVIF file of {size / 2**20:.0f} MiB is over the {MAX_CONTAINER_BYTES // 2**20} MiB limit"
        )
    heif = brand in _HEIF_BRANDS and _heif_available()
    if brand in _HEIC_ONLY_BRANDS and not heif:
        raise BadMediaError(f"HEIC/HEIF images need pillow-heif, which is not installed: {PHOTOS_HINT}")
    try:
        return Image.open(path, formats=_CONTAINER_FORMATS if heif else _CONTAINER_FORMATS[:1])
    except UnidentifiedImageError:
        if brand in (b"avif", b"avis") and not _avif_supported():
            raise BadMediaError(
                "AVIF images need a Pillow built with AVIF support (Pillow 11.3 or later)"
            ) from None
        if brand in _HEIF_BRANDS and not heif:
            raise BadMediaError(
                f"HEIF images need pillow-heif, which is not installed: {PHOTOS_HINT}"
            ) from None
        raise


def _peek(path: str | Path | IO[bytes], n: int) -> bytes:
    """The first ``n`` bytes of a file (an open file is left where it was)."""
    if isinstance(path, (str, Path)):
        with open(path, "rb") as f:
            return f.read(n)
    start = path.tell()
    try:
        return path.read(n)
    finally:
        path.seek(start)


def _file_size(path: str | Path | IO[bytes]) -> int:
    """Bytes from the start of the file (an open one: from where it is) to its end."""
    if isinstance(path, (str, Path)):
        return os.stat(path).st_size
    start = path.tell()
    try:
        return path.seek(0, os.SEEK_END) - start
    finally:
        path.seek(start)


def _avif_supported() -> bool:
    from PIL import features

    return bool(features.check("avif"))


def reduce_image(im: Image.Image, max_side: int, orientation: int | None = None) -> Image.Image:
    """The loaded ``im`` as a new RGB image, upright, its longest side at most ``max_side``.

    ``orientation`` is an EXIF orientation value (1-8); by default the one in ``im``'s EXIF.
    Every full-size step keeps at most one extra copy, 8-bit: deep greyscale is scaled strip by strip,
    and compositing, RGB conversion and rotation happen after shrinking.
    """
    if orientation is None:
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
