"""Safe image decoding: any supported file becomes an RGB PIL image of bounded size, or a BadMediaError."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from mmsearch.errors import BadMediaError

log = logging.getLogger(__name__)

# Pillow opens only the formats we index; anything else (EPS, PSD, ...) is never handed to a decoder.
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
# Decoded images are shrunk to this longest side before the model transform; CLIP inputs are 224-384 px,
# so this bounds memory for huge photos without changing what the model sees.
DEFAULT_MAX_SIDE = 1024

# Truncated files are errors, never silently half-decoded images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def load_image(
    path: str | Path, *, max_side: int = DEFAULT_MAX_SIDE, draft_size: int | None = None
) -> Image.Image:
    """Decode ``path`` to RGB with EXIF orientation applied and its longest side at most ``max_side``.

    JPEGs are decoded at reduced scale (Pillow draft mode) when far larger than ``draft_size``
    (default: ``max_side``). Pillow's decompression-bomb limit is kept and its warning is an error.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=PIL_FORMATS) as im:
                if im.format == "JPEG":
                    # draft() picks the largest DCT scale (1/2, 1/4, 1/8) that stays >= the requested size.
                    target = draft_size or max_side
                    im.draft("RGB", (target, target))
                im.seek(0)  # first frame of GIF / first page of TIFF
                im.load()
                oriented = ImageOps.exif_transpose(im) or im
                out = _to_rgb(oriented)
    except Image.DecompressionBombError as e:
        raise BadMediaError(f"decompression bomb: {e}") from e
    except Image.DecompressionBombWarning as e:
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
    if max(out.size) > max_side:
        out.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return out


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert every mode correctly: alpha onto white, 16-bit scaled (not clipped), CMYK via Pillow."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")
