"""Which metadata sidecar files belong to which photo: XMP sidecars and Google Takeout JSON files.

* XMP (written by Lightroom, darktable, digiKam, RawTherapee): ``IMG_1.xmp`` or ``IMG_1.CR2.xmp`` beside
  ``IMG_1.CR2``;
* Google Takeout: ``IMG_1.jpg.json``, or ``IMG_1.jpg.supplemental-metadata.json`` (newer exports); a
  duplicate name ``IMG_1(1).jpg`` has its number after the extension: ``IMG_1.jpg(1).json``.

Pure string work on paths found by :mod:`mmsearch.scan`; reading them is :mod:`mmsearch.photo_meta`'s.
Each sidecar comes with a change time (the later of its mtime and ctime, in ns): an archive extracted
later keeps old mtimes, but its files' ctime is when they were written, so a sidecar that appears or
changes is seen as newer than the catalog's row of its photo.
"""

from __future__ import annotations

import os
import re

#: Suffixes (lower case) of the files this module pairs.
SIDECAR_SUFFIXES = (".xmp", ".json")
_TAKEOUT_TAILS = (".supplemental-metadata.json", ".json")
# "IMG_1.jpg(1).json" -> ("IMG_1", ".jpg", "(1)"): Takeout's name for the JSON of "IMG_1(1).jpg".
_NUMBERED = re.compile(r"^(?P<stem>.+?)(?P<ext>\.[^.()]+)(?P<n>\(\d+\))\.json$", re.IGNORECASE)

Sidecar = tuple[str, int]  # (path, change time ns)


def pair(candidates: list[Sidecar], images: set[str]) -> dict[str, list[Sidecar]]:
    """image path -> its sidecars among ``candidates`` (paths ending in one of :data:`SIDECAR_SUFFIXES`),
    for the ``images`` (paths) found; a sidecar of no image is left out."""
    by_stem: dict[str, list[str]] = {}
    for image in images:
        by_stem.setdefault(os.path.splitext(image)[0], []).append(image)
    out: dict[str, list[Sidecar]] = {}
    for path, changed in candidates:
        for owner in owners(path, images, by_stem):
            out.setdefault(owner, []).append((path, changed))
    for found in out.values():
        found.sort()
    return out


def owners(path: str, images: set[str], by_stem: dict[str, list[str]]) -> list[str]:
    """The images ``path`` is a sidecar of (several only for an XMP named by stem: ``IMG_1.xmp`` beside
    ``IMG_1.CR2`` and ``IMG_1.JPG``, as Lightroom shares it)."""
    lower = path.lower()
    if lower.endswith(".xmp"):
        full = path[: -len(".xmp")]
        return [full] if full in images else by_stem.get(full, [])
    for tail in _TAKEOUT_TAILS:
        if lower.endswith(tail):
            image = path[: -len(tail)]
            if image in images:
                return [image]
    folder, name = os.path.split(path)
    m = _NUMBERED.match(name)
    if m:
        image = os.path.join(folder, f"{m['stem']}{m['n']}{m['ext']}")
        if image in images:
            return [image]
    return []
