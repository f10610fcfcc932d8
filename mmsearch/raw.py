"""Camera RAW files (DNG, CR2, CR3, NEF, ARW, RAF, ORF, RW2) as RGB images, through rawpy (LibRaw).

Two ways in, the cheap one first:

- the preview the camera embedded (a JPEG, sometimes a bitmap), when its shorter side is at least the size
  asked for: a JPEG preview is decoded by :func:`mmsearch.images.load_image` like any JPEG, under the same
  budgets, at reduced scale;
- else the sensor data, demosaiced at half size (LibRaw's ``half_size``: each 2x2 Bayer block becomes one
  pixel, no interpolation), once ``raw.sizes`` has been checked against the pixel budget.

Orientation: LibRaw turns demosaiced output upright itself (``sizes.flip``). A JPEG preview carries its own
EXIF orientation (LibRaw writes one from ``flip`` when the camera's JPEG has no EXIF block); a bitmap preview
and a JPEG whose EXIF has no orientation are turned here by ``flip``.

Every failure is a :class:`BadMediaError` with the reason; rawpy is imported only when a RAW file is met.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmsearch import images
from mmsearch.errors import BadMediaError

log = logging.getLogger(__name__)

# An open file (not a path) is handed to LibRaw as one buffer, so it is read whole first; RAW files of
# today's cameras are 10-250 MB.
MAX_RAW_BYTES = 512 * 1024 * 1024
# Memory of a half-size demosaic per sensor pixel: the unpacked 16-bit mosaic (2 bytes), LibRaw's 4 x 16-bit
# half-size working image (2 bytes), its 8-bit RGB output and our copy: about twice the worst Pillow decode,
# so a RAW is charged twice its pixels in the decoders' shared budget.
_DEMOSAIC_CHARGE = 2
# LibRaw's flip (dcraw's) -> the EXIF orientation it stands for (dcraw's "12435867").
_FLIP_TO_ORIENTATION = {0: 1, 1: 2, 2: 4, 3: 3, 4: 5, 5: 8, 6: 6, 7: 7}


def load_raw(
    source: str | Path | IO[bytes], *, max_side: int, target: int, max_pixels: int = images.INDEX_MAX_PIXELS
) -> Image.Image:
    """The RAW file ``source`` as an upright RGB image, its longest side at most ``max_side``, from the
    embedded preview when its shorter side is at least ``target`` pixels, else demosaiced at half size
    (refused first if the sensor has more than ``max_pixels`` pixels, see :func:`images.pixel_budget`)."""
    rawpy = _rawpy()
    raw = rawpy.RawPy()
    try:
        _open(raw, source)
        flip = raw.sizes.flip
        image = _from_preview(raw, rawpy, flip, target=target, max_side=max_side, max_pixels=max_pixels)
        if image is None:
            image = _demosaic(raw, max_side=max_side, max_pixels=max_pixels)
    except (rawpy.LibRawError, rawpy.NotSupportedError) as e:
        raise BadMediaError(f"unreadable RAW file: {_message(e)}") from e
    except MemoryError as e:
        raise BadMediaError("RAW image too large to decode in memory") from e
    except (OSError, ValueError) as e:
        raise BadMediaError(f"cannot read RAW file: {e}") from e
    finally:
        raw.close()
    if image.width == 0 or image.height == 0:
        raise BadMediaError("image has no pixels")
    return image


def _rawpy() -> ModuleType:
    try:
        import rawpy
    except ImportError as e:
        raise BadMediaError(f"RAW files need rawpy, which is not installed: {images.PHOTOS_HINT}") from e
    return rawpy


def _message(e: BaseException) -> str:
    """rawpy's errors carry LibRaw's message as bytes."""
    arg = e.args[0] if e.args else str(e)
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


def _open(raw: Any, source: str | Path | IO[bytes]) -> None:
    """Open ``source`` in ``raw`` (headers only: nothing is unpacked yet)."""
    if isinstance(source, (str, Path)):
        path = os.fspath(source)
        try:
            path.encode("utf-8")  # rawpy passes paths to LibRaw as UTF-8
        except UnicodeEncodeError:  # an undecodable name (surrogate escapes): hand over its bytes instead
            with open(path, "rb") as f:
                _open_buffer(raw, f)
        else:
            raw.open_file(path)
        return
    _open_buffer(raw, source)


def _open_buffer(raw: Any, f: IO[bytes]) -> None:
    start = f.tell()
    size = f.seek(0, os.SEEK_END) - start
    f.seek(start)
    if size > MAX_RAW_BYTES:
        raise BadMediaError(
            f"RAW file of {size / 2**20:.0f} MiB is over the {MAX_RAW_BYTES // 2**20} MiB limit"
        )
    raw.open_buffer(f)


def _from_preview(
    raw: Any, rawpy: ModuleType, flip: int, *, target: int, max_side: int, max_pixels: int
) -> Image.Image | None:
    """The embedded preview, if there is one large enough that decodes; else None (demosaic instead)."""
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawError, rawpy.NotSupportedError, OSError) as e:  # none, unsupported or damaged
        log.debug("no usable RAW preview (%s): demosaicing", _message(e))
        return None
    orientation = _FLIP_TO_ORIENTATION.get(flip, 1)
    if thumb.format == rawpy.ThumbFormat.JPEG:
        return _jpeg_preview(thumb.data, orientation, target=target, max_side=max_side, max_pixels=max_pixels)
    if thumb.format == rawpy.ThumbFormat.BITMAP:
        return _bitmap_preview(thumb.data, orientation, target=target, max_side=max_side)
    return None


def _jpeg_preview(
    data: bytes, orientation: int, *, target: int, max_side: int, max_pixels: int
) -> Image.Image | None:
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as head:  # header only: size and orientation
            size = head.size
            has_orientation = head.getexif().get(0x0112) is not None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError):
        log.debug("RAW preview is not a readable JPEG: demosaicing")
        return None
    if min(size) < target:
        return None
    try:
        image = images.load_image(
            io.BytesIO(data), max_side=max_side, draft_size=target, max_pixels=max_pixels, suffix=".jpg"
        )
    except BadMediaError as e:
        log.debug("RAW preview unusable (%s): demosaicing", e)
        return None
    return image if has_orientation else images.reduce_image(image, max_side, orientation)


def _bitmap_preview(data: np.ndarray, orientation: int, *, target: int, max_side: int) -> Image.Image | None:
    if data.ndim not in (2, 3) or min(data.shape[:2]) < target:
        return None
    if data.dtype != np.uint8:  # 16-bit previews keep their top 8 bits
        data = np.right_shift(data.astype(np.uint16, copy=False), 8).astype(np.uint8)
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    if data.ndim == 3 and data.shape[2] != 3:
        return None
    return images.reduce_image(Image.fromarray(np.ascontiguousarray(data)), max_side, orientation)


def _demosaic(raw: Any, *, max_side: int, max_pixels: int) -> Image.Image:
    sizes = raw.sizes
    pixels = max(sizes.raw_width * sizes.raw_height, sizes.width * sizes.height)
    budget = images.pixel_budget(max_pixels)
    if pixels > budget:
        raise BadMediaError(
            f"RAW image too large: {sizes.raw_width}x{sizes.raw_height} sensor pixels ({pixels / 1e6:.1f} Mpx) "
            f"is over the budget of {budget / 1e6:.1f} Mpx"
        )
    if pixels == 0:
        raise BadMediaError("image has no pixels")
    with images.hold_pixels(_DEMOSAIC_CHARGE * pixels):
        rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
        # Already upright: LibRaw applies the file's flip to its output.
        return images.reduce_image(Image.fromarray(rgb), max_side, orientation=1)
