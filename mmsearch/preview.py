"""Inline image previews for terminals (``mmsearch query --preview``): a thumbnail of each image hit drawn
in the terminal with the kitty graphics protocol, iTerm2's inline images, or sixel; nothing elsewhere.

Which protocol a terminal speaks is guessed from its environment (:func:`detect_protocol`); ``$MMSEARCH_PREVIEW``
(kitty, iterm2, sixel or none) overrides the guess. Inside tmux or screen no protocol is guessed: they
drop the sequences unless passthrough is configured, so only the override turns previews on there.

Thumbnails are decoded with :func:`mmsearch.images.load_image` under the indexing pixel budget, reduced to
at most :data:`PREVIEW_SIDE` pixels a side, and sent as PNG (kitty, iTerm2) or as sixels quantised to at
most :data:`SIXEL_COLORS` colours by Pillow (the sixel encoder is the small numpy one below).
Standard library, numpy and Pillow only.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from mmsearch import render
from mmsearch.errors import BadMediaError
from mmsearch.images import INDEX_MAX_PIXELS, load_image

PROTOCOLS = ("kitty", "iterm2", "sixel")
#: The environment switch that overrides detection: one of :data:`PROTOCOLS`, or ``none`` for no previews.
PREVIEW_ENV = "MMSEARCH_PREVIEW"
#: Longest side of a preview, in pixels.
PREVIEW_SIDE = 256
#: Most base64 bytes in one kitty graphics escape (the protocol's limit per chunk).
KITTY_CHUNK = 4096
#: Most palette registers a sixel image uses (xterm's and most sixel terminals' register count).
SIXEL_COLORS = 256

ESC = b"\x1b"
ST = ESC + b"\\"  # string terminator of kitty's APC and of sixel's DCS
BEL = b"\x07"

# Terminals that say who they are in TERM_PROGRAM and speak iTerm2's inline images (WezTerm, mintty and
# Konsole also speak others; iTerm2's is the one all of them share).
_ITERM2_PROGRAMS = frozenset({"iTerm.app", "WezTerm", "mintty"})
# TERM values of terminals that draw sixels.
_SIXEL_TERMS = frozenset({"foot", "foot-extra", "mlterm", "yaft-256color", "contour"})


def detect_protocol(env: Mapping[str, str]) -> str | None:
    """The image protocol the terminal described by ``env`` (an environment such as ``os.environ``) draws,
    or None for plain output. ``$MMSEARCH_PREVIEW`` decides when set."""
    forced = env.get(PREVIEW_ENV, "").strip().lower()
    if forced:
        return forced if forced in PROTOCOLS else None
    term, program = env.get("TERM", ""), env.get("TERM_PROGRAM", "")
    if env.get("TMUX") or term.startswith(("screen", "tmux")):
        return None
    if env.get("KITTY_WINDOW_ID") or term in ("xterm-kitty", "xterm-ghostty") or program == "ghostty":
        return "kitty"
    if program in _ITERM2_PROGRAMS or env.get("LC_TERMINAL") == "iTerm2" or env.get("KONSOLE_VERSION"):
        return "iterm2"
    if term in _SIXEL_TERMS or "sixel" in term:
        return "sixel"
    return None


def thumbnail(path: str | bytes | Path, side: int = PREVIEW_SIDE) -> Image.Image:
    """The image at ``path`` as RGB, its longest side at most ``side`` pixels; :class:`BadMediaError` if it
    cannot be decoded within the indexing pixel budget."""
    with open(path, "rb") as f:  # a bytes path opens any name, valid UTF-8 or not
        image = load_image(f, max_side=2 * side, draft_size=side, max_pixels=INDEX_MAX_PIXELS)
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    return image


def preview_bytes(path: str | bytes | Path, protocol: str, *, side: int = PREVIEW_SIDE) -> bytes:
    """The escape sequence that draws a thumbnail of the image at ``path`` with ``protocol`` (one of
    :data:`PROTOCOLS`). :class:`BadMediaError` if the image cannot be read; ValueError for an unknown
    protocol. The cursor ends after the image, on its last text row."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown preview protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")
    try:
        image = thumbnail(path, side)
    except OSError as e:
        raise BadMediaError(f"cannot open the image: {e.strerror or e}") from e
    if protocol == "sixel":
        return sixel(image)
    png = _png(image)
    return kitty(png) if protocol == "kitty" else iterm2(png)


def kitty(png: bytes) -> bytes:
    """kitty's graphics protocol: transmit and display (``a=T``) PNG data (``f=100``) sent directly
    (``t=d``) in base64 chunks of at most :data:`KITTY_CHUNK` bytes, ``m=1`` on every chunk but the last;
    ``q=2`` asks the terminal not to answer (an answer would arrive as input)."""
    data = base64.standard_b64encode(png)
    chunks = [data[i : i + KITTY_CHUNK] for i in range(0, len(data), KITTY_CHUNK)] or [b""]
    out = []
    for n, chunk in enumerate(chunks):
        more = b"1" if n < len(chunks) - 1 else b"0"
        keys = b"a=T,f=100,t=d,q=2,m=" + more if n == 0 else b"m=" + more
        out.append(ESC + b"_G" + keys + b";" + chunk + ST)
    return b"".join(out)


def iterm2(png: bytes) -> bytes:
    """iTerm2's inline image: ``OSC 1337 ; File=inline=1;size=N;preserveAspectRatio=1 : base64 BEL``."""
    head = f"\x1b]1337;File=inline=1;size={len(png)};preserveAspectRatio=1:".encode("ascii")
    return head + base64.standard_b64encode(png) + BEL


def sixel(image: Image.Image, colors: int = SIXEL_COLORS) -> bytes:
    """``image`` as a sixel stream: ``DCS P1;P2;P3 q``, raster attributes ``"1;1;W;H`` (square pixels, the
    image's size), one palette register per colour (``#n;2;r;g;b``, percentages), then per band of six
    rows, per colour present in it, ``#n`` and a character (63 + the bit of each row set) per column,
    run-length encoded as ``!count``; ``$`` returns to the band's start for the next colour, ``-`` starts
    the next band; ST ends it. P2=1: pixels a colour leaves unset keep what the previous colours drew."""
    rgb = image.convert("RGB")
    quantised = rgb.quantize(colors=colors, dither=Image.Dither.NONE)
    width, height = quantised.size
    pixels = np.asarray(quantised, dtype=np.uint8).reshape(height, width)
    palette = quantised.getpalette() or []
    used = int(pixels.max(initial=0)) + 1
    out = [ESC + b"P0;1;0q", f'"1;1;{width};{height}'.encode("ascii")]
    for n in range(used):
        r, g, b = palette[3 * n : 3 * n + 3]
        out.append(f"#{n};2;{_percent(r)};{_percent(g)};{_percent(b)}".encode("ascii"))
    bits = (1 << np.arange(6, dtype=np.uint8)).reshape(6, 1)
    for top in range(0, height, 6):
        band = pixels[top : top + 6]
        strings = []
        for colour in np.unique(band):
            mask = ((band == colour) * bits[: len(band)]).sum(axis=0).astype(np.uint8)
            strings.append(f"#{int(colour)}".encode("ascii") + _run_length(mask + 63))
        out.append(b"$".join(strings) + b"-")
    out.append(ST)
    return b"".join(out)


def write_previews(hits: Iterable[Mapping[str, Any]], protocol: str, out: BinaryIO) -> None:
    """``mmsearch query --preview`` on a terminal: per hit, its line (rank, score, kind, path, text, as
    :func:`mmsearch.render.hit_rows` makes it) and, for a hit on an image file (an image or its caption),
    its thumbnail; a thumbnail that cannot be made is replaced by a line saying why."""
    rows = [dict(h) for h in hits]
    for hit, row in zip(rows, render.hit_rows(rows), strict=True):
        out.write(("  ".join(cell for cell in row if cell) + "\n").encode("utf-8", "backslashreplace"))
        if hit.get("kind") not in ("image", "caption"):
            continue
        try:
            out.write(preview_bytes(_path_of(hit), protocol) + b"\n")
        except BadMediaError as e:
            out.write(f"  (no preview: {render.printable(str(e))})\n".encode("utf-8", "backslashreplace"))
    out.flush()


def _path_of(hit: Mapping[str, Any]) -> bytes:
    """The exact path bytes of a hit (``path_b64`` when present: ``path`` is the display form)."""
    if hit.get("path_b64"):
        return base64.standard_b64decode(hit["path_b64"])
    return os.fsencode(hit["path"])


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _percent(level: int) -> int:
    return round(level * 100 / 255)


def _run_length(chars: np.ndarray) -> bytes:
    """Sixel characters with runs longer than three written as ``!count`` + the character."""
    out = []
    starts = np.concatenate(([0], np.flatnonzero(chars[1:] != chars[:-1]) + 1))
    ends = np.append(starts[1:], len(chars))
    for start, end in zip(starts, ends):
        char, count = bytes([int(chars[start])]), int(end - start)
        out.append(b"!" + str(count).encode("ascii") + char if count > 3 else char * count)
    return b"".join(out)
