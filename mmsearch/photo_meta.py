"""What photographers already wrote about a photo: captions, keywords, date taken, camera, GPS position.

Three readers, each returning a :class:`PhotoMeta` and never raising for bad input (what could not be read
is listed in ``PhotoMeta.problems``):

* :func:`read_embedded` — EXIF, IPTC and XMP inside an image file, read from its headers only (Pillow's
  ``Image.open`` is lazy; no pixel is decoded);
* :func:`read_xmp_sidecar` — an ``.xmp`` file written beside the photo by Lightroom, darktable, digiKam;
* :func:`read_takeout` — a Google Takeout ``photo.jpg.json`` supplemental-metadata file.

XML is parsed only with ``defusedxml`` and with DTDs forbidden (XMP never needs one), so an entity bomb
or an external entity is refused, not expanded. Every text passes :func:`clean_text` and the budgets below.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException
from PIL import Image, UnidentifiedImageError

from mmsearch.constants import EMBEDDED_SOURCE
from mmsearch.images import MAX_CONTAINER_BYTES, PIL_FORMATS

EXIF_SOURCE = EMBEDDED_SOURCE + "exif"
IPTC_SOURCE = EMBEDDED_SOURCE + "iptc"
XMP_SOURCE = EMBEDDED_SOURCE + "xmp"
# Captions read from a sidecar's bytes carry this source unless the caller names the sidecar (its path).
SIDECAR_SOURCE = "sidecar"

# Budgets. XMP inside a JPEG fits one 64 KiB segment; a sidecar with a long edit history stays far below
# 1 MiB; a Takeout JSON is about 1 KiB.
MAX_XMP_BYTES = 1 << 20
MAX_SIDECAR_BYTES = 1 << 20
MAX_CAPTION_CHARS = 2000
MAX_KEYWORD_CHARS = 100
MAX_KEYWORDS = 200
# Dates outside these years are clock junk (the first photograph is from 1826).
MIN_YEAR = 1826
MAX_YEAR = 2100
_MAX_PROBLEM_CHARS = 200

# Text cameras and phone firmware write into description fields by default: not captions.
_PLACEHOLDERS = frozenset(
    s.casefold()
    for s in (
        "OLYMPUS DIGITAL CAMERA",
        "SONY DSC",
        "DIGITAL CAMERA",
        "KONICA MINOLTA DIGITAL CAMERA",
        "MINOLTA DIGITAL CAMERA",
        "LEICA DIGITAL CAMERA",
        "SAMSUNG CAMERA PICTURES",
        "SAMSUNG DIGITAL CAMERA",
        "KODAK Digital Still Camera",
        "Exif_JPEG_PICTURE",
        "Exif_JPEG_420",
        "Exif_JPEG_422",
        "DCIM",
        "default",
        "image",
        "picture",
        "photo",
        "untitled",
        "no description",
        "description",
        "ASCII",
        "Created with GIMP",
        "Picasa",
        "Screenshot",
    )
)
_MEDIA_EXT = (
    "jpe?g|jpe|png|gif|webp|tiff?|bmp|heic|heif|avif|dng|cr2|cr3|nef|arw|raf|orf|rw2|mp4|mov|m4v|3gp|avi"
)
_FILE_NAME = re.compile(rf"[^/\\]{{1,255}}\.(?:{_MEDIA_EXT})", re.IGNORECASE)
# Camera and phone file stems: IMG_1234, DSC01234, _DSC1234, PXL_20230501_123456789, P1010001 ...
_CAMERA_STEM = re.compile(
    r"(?:IMG|DSC|DSCN|DSCF|_DSC|PXL|MVIMG|VID|DJI|GOPR|GH|GX|CIMG|PICT|SAM|WP|P|IMAG|PANO|HPIM|SDC)"
    r"[_\- ]?[\d_\-]{3,}(?:~\d+)?(?:\.\w+)?",
    re.IGNORECASE,
)

# XMP namespaces.
_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
_DC = "http://purl.org/dc/elements/1.1/"
_XMP = "http://ns.adobe.com/xap/1.0/"
_EXIF = "http://ns.adobe.com/exif/1.0/"
_TIFF = "http://ns.adobe.com/tiff/1.0/"
_PHOTOSHOP = "http://ns.adobe.com/photoshop/1.0/"
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_CONTAINERS = {f"{{{_RDF}}}Alt", f"{{{_RDF}}}Bag", f"{{{_RDF}}}Seq"}
_LI = f"{{{_RDF}}}li"

# EXIF / TIFF tag numbers.
_IMAGE_DESCRIPTION, _MAKE, _MODEL = 0x010E, 0x010F, 0x0110
_XP_TITLE, _XP_COMMENT = 0x9C9B, 0x9C9C
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DATE_ORIGINAL, _DATE_DIGITIZED = 0x9003, 0x9004
_OFFSET_ORIGINAL, _OFFSET_DIGITIZED = 0x9011, 0x9012
_SUBSEC_ORIGINAL, _SUBSEC_DIGITIZED = 0x9291, 0x9292
_USER_COMMENT = 0x9286
_TIFF_IPTC = 33723
_PHOTOSHOP_IPTC = 0x0404
_IFD0_TAGS = frozenset({_IMAGE_DESCRIPTION, _MAKE, _MODEL, _XP_TITLE, _XP_COMMENT, _EXIF_IFD, _GPS_IFD})
_SUB_TAGS = frozenset(
    {
        _DATE_ORIGINAL,
        _DATE_DIGITIZED,
        _OFFSET_ORIGINAL,
        _OFFSET_DIGITIZED,
        _SUBSEC_ORIGINAL,
        _SUBSEC_DIGITIZED,
    }
    | {_USER_COMMENT}
)
_GPS_TAGS = frozenset({1, 2, 3, 4, 9})  # LatitudeRef, Latitude, LongitudeRef, Longitude, Status
# TIFF field types: (bytes per value, struct format of one value; "" keeps the bytes).
_TIFF_TYPES = {
    1: (1, ""),  # BYTE
    2: (1, ""),  # ASCII
    3: (2, "H"),  # SHORT
    4: (4, "I"),  # LONG
    5: (8, "II"),  # RATIONAL
    7: (1, ""),  # UNDEFINED
    9: (4, "i"),  # SLONG
    10: (8, "ii"),  # SRATIONAL
}
_OPTIONAL_FORMATS = ("HEIF", "AVIF")  # read when some module (images.py, pillow-heif) registered them

# "2023:05:01 12:34:56", "2023-05-01T12:34:56.25+02:00", "2023-05-01" (EXIF and XMP/ISO 8601 forms).
_DATETIME = re.compile(
    r"\s*(\d{4})[:\-](\d{2})[:\-](\d{2})"
    r"(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?)?"
    r"\s*(Z|[+\-]\d{2}:?\d{2})?\s*"
)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ufeff]")  # Unicode category Cc, and the BOM
_OFFSET = re.compile(r"\s*(Z)|\s*([+\-])(\d{2}):?(\d{2})\s*")
_XMP_COORD = re.compile(
    r"\s*(\d{1,3}(?:\.\d+)?)(?:,(\d{1,2}(?:\.\d+)?))?(?:,(\d{1,2}(?:\.\d+)?))?\s*([NSEW])\s*"
)


@dataclass(frozen=True)
class PhotoMeta:
    captions: tuple[tuple[str, str], ...] = ()  # (source, text), source e.g. "embedded:iptc"
    keywords: tuple[tuple[str, str], ...] = ()  # (source, keyword), source 'iptc' | 'xmp' | 'takeout'
    taken_at: float | None = None  # unix seconds (UTC)
    taken_source: str | None = None  # 'exif' | 'xmp' | 'takeout'
    camera: str | None = None
    lat: float | None = None
    lon: float | None = None
    problems: tuple[str, ...] = ()  # what could not be read (an XML bomb, bad JSON, ...)

    def merged(self, other: PhotoMeta) -> PhotoMeta:
        """Self's values win; captions, keywords and problems are concatenated (self's first).

        A caption text or a keyword (case-insensitive) already present is not repeated: the same
        description written to EXIF, IPTC and XMP is one caption, with the first source.
        """
        taken = (
            (self.taken_at, self.taken_source)
            if self.taken_at is not None
            else (other.taken_at, other.taken_source)
        )
        where = (
            (self.lat, self.lon) if self.lat is not None and self.lon is not None else (other.lat, other.lon)
        )
        return PhotoMeta(
            captions=_unique(self.captions + other.captions, key=lambda c: c[1]),
            keywords=_unique(self.keywords + other.keywords, key=lambda k: k[1].casefold())[:MAX_KEYWORDS],
            taken_at=taken[0],
            taken_source=taken[1],
            camera=self.camera if self.camera is not None else other.camera,
            lat=where[0],
            lon=where[1],
            problems=self.problems + other.problems,
        )


# --- public readers -----------------------------------------------------------------------------------


def read_embedded(path: Path) -> PhotoMeta:
    """EXIF, IPTC and XMP inside the image file at ``path``, from its headers (no pixel is decoded).

    Scalars prefer EXIF (date, camera, GPS) over XMP; captions prefer XMP (Unicode, what Lightroom and
    digiKam edit) over IPTC over EXIF when the same text is in several.
    """
    try:
        im = Image.open(path, formats=_formats(path))
    except Image.DecompressionBombError as e:
        return _problem(f"metadata not read: image too large ({e})")
    except UnidentifiedImageError:
        return _problem("metadata not read: not a supported image")
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return _problem(f"metadata not read: {e}")
    with im:
        exif = _guarded("EXIF", _from_exif, im)
        iptc = _guarded("IPTC", _from_iptc, im)
        xmp = _guarded("XMP", _from_embedded_xmp, im)
    scalars = exif.merged(xmp)
    return PhotoMeta(
        captions=_unique(xmp.captions + iptc.captions + exif.captions, key=lambda c: c[1]),
        keywords=_unique(xmp.keywords + iptc.keywords, key=lambda k: k[1].casefold())[:MAX_KEYWORDS],
        taken_at=scalars.taken_at,
        taken_source=scalars.taken_source,
        camera=scalars.camera,
        lat=scalars.lat,
        lon=scalars.lon,
        problems=exif.problems + iptc.problems + xmp.problems,
    )


def read_sidecar(path: Path, source: str) -> PhotoMeta:
    """A metadata sidecar file: XMP (``.xmp``) or Google Takeout JSON (anything else), read within
    :data:`MAX_SIDECAR_BYTES` (one byte more is read, so that a larger file is told from one at the limit);
    its captions get ``source``."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIDECAR_BYTES + 1)
    except OSError as e:
        return _problem(f"unreadable sidecar: {e.strerror or e}")
    if path.suffix.lower() == ".xmp":
        return read_xmp_sidecar(data, source=source)
    return read_takeout(data, source=source)


def read_xmp_sidecar(data: bytes, *, source: str = SIDECAR_SOURCE) -> PhotoMeta:
    """An ``.xmp`` sidecar's bytes; its captions get ``source`` (the caller passes the sidecar's path)."""
    if len(data) > MAX_SIDECAR_BYTES:
        return _problem(f"XMP sidecar too large: {len(data)} bytes (limit {MAX_SIDECAR_BYTES})")
    return parse_xmp(data, caption_source=source)


def read_takeout(data: bytes, *, source: str = SIDECAR_SOURCE) -> PhotoMeta:
    """A Google Takeout ``photo.jpg.json``'s bytes; its caption gets ``source`` (the JSON file's path)."""
    if len(data) > MAX_SIDECAR_BYTES:
        return _problem(f"Takeout JSON too large: {len(data)} bytes (limit {MAX_SIDECAR_BYTES})")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return _problem(f"Takeout JSON unreadable: {_short(e)}")
    if not isinstance(doc, dict):
        return _problem("Takeout JSON is not an object")
    problems: list[str] = []
    captions: list[tuple[str, str]] = []
    for key in ("description", "title"):
        value = doc.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            problems.append(f"Takeout {key} is not a string")
            continue
        # The title is usually the file's name, which _caption_text drops.
        if text := _caption_text(value):
            captions.append((source, text))
    keywords: list[tuple[str, str]] = []
    people = doc.get("people", [])
    if not isinstance(people, list):
        problems.append("Takeout people is not a list")
        people = []
    for person in people:
        name = person.get("name") if isinstance(person, dict) else None
        if isinstance(name, str) and (kw := clean_text(name, MAX_KEYWORD_CHARS)):
            keywords.append(("takeout", kw))
    taken_at = None
    taken = doc.get("photoTakenTime")
    if taken is not None:
        stamp = taken.get("timestamp") if isinstance(taken, dict) else None
        taken_at = _unix_seconds(stamp)
        if taken_at is None:
            problems.append("Takeout photoTakenTime.timestamp is not a valid time")
    lat = lon = None
    for key in ("geoData", "geoDataExif"):  # geoData holds a location edited in Google Photos
        geo = doc.get(key)
        if geo is None:
            continue
        pair, valid = _takeout_geo(geo)
        if not valid:
            problems.append(f"Takeout {key} is not a latitude/longitude pair")
        elif pair is not None and lat is None:
            lat, lon = pair
    return PhotoMeta(
        captions=_unique(captions, key=lambda c: c[1]),
        keywords=_unique(keywords, key=lambda k: k[1].casefold())[:MAX_KEYWORDS],
        taken_at=taken_at,
        taken_source="takeout" if taken_at is not None else None,
        lat=lat,
        lon=lon,
        problems=tuple(problems),
    )


def parse_xmp(data: bytes | str, *, caption_source: str = XMP_SOURCE) -> PhotoMeta:
    """An XMP packet: dc:description, dc:title and photoshop:Headline as captions, dc:subject as keywords
    (source 'xmp'), the date taken, tiff:Make/Model and exif:GPSLatitude/Longitude."""
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    if len(data) > MAX_XMP_BYTES:
        return _problem(f"XMP too large: {len(data)} bytes (limit {MAX_XMP_BYTES})")
    try:
        # Packets are often padded with NULs; expat would call them bad tokens.
        root = SafeET.fromstring(data.rstrip(b"\x00"), forbid_dtd=True)
    except DefusedXmlException as e:  # a DTD, an entity (bomb), an external reference
        return _problem(f"XMP refused: {type(e).__name__} (DTDs and entities are not allowed)")
    except (ParseError, ValueError) as e:
        return _problem(f"XMP is not well-formed XML: {_short(e)}")
    props = _xmp_properties(root)

    def first(*names: str) -> str | None:
        for name in names:
            for value in props.get(name, ()):
                if value.strip():
                    return value
        return None

    captions = []
    for name in (f"{_DC}description", f"{_DC}title", f"{_PHOTOSHOP}Headline"):
        value = first(name)
        if value and (text := _caption_text(value)):
            captions.append((caption_source, text))
    keywords = [
        ("xmp", kw) for v in props.get(f"{_DC}subject", ()) if (kw := clean_text(v, MAX_KEYWORD_CHARS))
    ]
    taken_at = None
    for name in (f"{_EXIF}DateTimeOriginal", f"{_PHOTOSHOP}DateCreated", f"{_XMP}CreateDate"):
        value = first(name)
        if value is not None and (taken_at := _parse_datetime(value)) is not None:
            break
    lat = _xmp_coord(first(f"{_EXIF}GPSLatitude"), "NS", 90.0)
    lon = _xmp_coord(first(f"{_EXIF}GPSLongitude"), "EW", 180.0)
    if lat is None or lon is None or (lat == 0.0 and lon == 0.0):
        lat = lon = None
    return PhotoMeta(
        captions=_unique(captions, key=lambda c: c[1]),
        keywords=_unique(keywords, key=lambda k: k[1].casefold())[:MAX_KEYWORDS],
        taken_at=taken_at,
        taken_source="xmp" if taken_at is not None else None,
        camera=_camera(first(f"{_TIFF}Make"), first(f"{_TIFF}Model")),
        lat=lat,
        lon=lon,
    )


def clean_text(text: str, limit: int) -> str:
    """``text`` with control characters dropped, whitespace collapsed, cut to ``limit`` characters."""
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text[:limit].rstrip() if len(text) > limit else text


# --- EXIF ---------------------------------------------------------------------------------------------


class _ExifTags(NamedTuple):
    ifd0: dict[int, Any]
    sub: dict[int, Any]  # the Exif IFD
    gps: dict[int, Any]
    endian: str  # "<" or ">"


def _from_exif(im: Image.Image) -> PhotoMeta:
    tags = _exif_tags(im)
    if tags is None:
        return PhotoMeta()
    ifd0, sub = tags.ifd0, tags.sub
    make, model = _tiff_string(ifd0.get(_MAKE)), _tiff_string(ifd0.get(_MODEL))
    camera = _camera(make, model)
    texts = (
        _tiff_string(ifd0.get(_IMAGE_DESCRIPTION)),
        _xp_string(ifd0.get(_XP_COMMENT)),
        _xp_string(ifd0.get(_XP_TITLE)),
        _user_comment(sub.get(_USER_COMMENT), tags.endian),
    )
    # Some cameras write their own name as the description.
    junk = {s.casefold() for s in (make, model, camera) if s}
    captions = [
        (EXIF_SOURCE, text) for raw in texts if (text := _caption_text(raw)) and text.casefold() not in junk
    ]
    taken_at = None
    for date, offset, subsec in (
        (_DATE_ORIGINAL, _OFFSET_ORIGINAL, _SUBSEC_ORIGINAL),
        (_DATE_DIGITIZED, _OFFSET_DIGITIZED, _SUBSEC_DIGITIZED),
    ):
        value = _tiff_string(sub.get(date))
        if value and (
            taken_at := _parse_datetime(value, _tiff_string(sub.get(offset)), _tiff_string(sub.get(subsec)))
        ):
            break
    lat, lon = _exif_gps(tags.gps)
    return PhotoMeta(
        captions=tuple(captions),
        taken_at=taken_at,
        taken_source="exif" if taken_at is not None else None,
        camera=camera,
        lat=lat,
        lon=lon,
    )


def _exif_tags(im: Image.Image) -> _ExifTags | None:
    """The EXIF tags read here. A TIFF file's own IFDs go through Pillow; the EXIF block other formats
    carry (JPEG APP1, PNG eXIf, WebP, HEIF) is read by :func:`_read_tiff_block`, which decodes only the
    tags used (Pillow's get_ifd decodes every tag, most of the cost of a camera JPEG)."""
    if im.format == "TIFF":
        exif = im.getexif()
        return _ExifTags(dict(exif), exif.get_ifd(_EXIF_IFD), exif.get_ifd(_GPS_IFD), exif.endian or "<")
    raw = im.info.get("exif")
    if raw is None and isinstance(hexed := im.info.get("Raw profile type exif"), str):
        # ImageMagick's PNG text chunk: a header of three lines, then hex digits.
        raw = bytes.fromhex("".join(hexed.split("\n")[3:]))
    if not isinstance(raw, bytes) or not raw:
        return None
    return _read_tiff_block(raw.removeprefix(b"Exif\x00\x00"))


def _read_tiff_block(data: bytes) -> _ExifTags:
    """IFD0, the Exif IFD and the GPS IFD of a TIFF-structured EXIF block; out-of-bounds entries are
    skipped, a header that is not TIFF raises ValueError."""
    if data[:4] == b"II*\x00":
        endian = "<"
    elif data[:4] == b"MM\x00*":
        endian = ">"
    else:
        raise ValueError("EXIF block is not TIFF-structured")
    (first,) = struct.unpack_from(endian + "I", data, 4)
    ifd0 = _read_ifd(data, first, endian, _IFD0_TAGS)
    subs = []
    for pointer, wanted in ((_EXIF_IFD, _SUB_TAGS), (_GPS_IFD, _GPS_TAGS)):
        offset = ifd0.get(pointer)
        subs.append(_read_ifd(data, offset, endian, wanted) if isinstance(offset, int) else {})
    return _ExifTags(ifd0, subs[0], subs[1], endian)


def _read_ifd(data: bytes, offset: int, endian: str, wanted: frozenset[int]) -> dict[int, Any]:
    """The ``wanted`` tags of the IFD at ``offset``, decoded as Pillow does (ASCII as latin-1 text,
    BYTE/UNDEFINED as bytes, RATIONAL as floats, counts above one as tuples)."""
    if not 8 <= offset <= len(data) - 2:
        return {}
    (count,) = struct.unpack_from(endian + "H", data, offset)
    count = min(count, (len(data) - offset - 2) // 12)  # a truncated IFD keeps the entries it has
    out: dict[int, Any] = {}
    for i in range(count):
        tag, kind, n, inline = struct.unpack_from(endian + "HHI4s", data, offset + 2 + 12 * i)
        if tag not in wanted or kind not in _TIFF_TYPES:
            continue
        unit, fmt = _TIFF_TYPES[kind]
        size = unit * n
        if size <= 4:
            raw = inline[:size]
        else:
            (where,) = struct.unpack(endian + "I", inline)
            if where + size > len(data):
                continue
            raw = data[where : where + size]
        if kind == 2:
            value: Any = raw.split(b"\x00", 1)[0].decode("latin-1")
        elif not fmt:
            value = raw
        else:
            numbers = struct.unpack(f"{endian}{n * len(fmt)}{fmt[0]}", raw)
            if kind in (5, 10):
                numbers = tuple(a / b if b else math.nan for a, b in zip(numbers[::2], numbers[1::2]))
            value = numbers[0] if len(numbers) == 1 else numbers
        out[tag] = value
    return out


def _tiff_string(value: Any) -> str | None:
    """An EXIF ASCII value. Pillow decodes it as latin-1; most writers actually store UTF-8."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    with contextlib.suppress(UnicodeError):
        value = value.encode("latin-1").decode("utf-8")
    return value.replace("\x00", " ").strip() or None


def _xp_string(value: Any) -> str | None:
    """Windows XP* tags: UTF-16LE bytes (Pillow may give them as a tuple of byte values)."""
    if isinstance(value, tuple) and all(isinstance(b, int) and 0 <= b < 256 for b in value):
        value = bytes(value)
    if not isinstance(value, bytes):
        return None
    return value[: len(value) // 2 * 2].decode("utf-16-le", "replace").replace("\x00", " ")


def _user_comment(value: Any, endian: str | None) -> str | None:
    """EXIF UserComment: an 8-byte charset code ("ASCII", "UNICODE", "JIS", or NULs) then the text."""
    if isinstance(value, str):
        return value
    if not isinstance(value, bytes) or len(value) <= 8:
        return None
    code, body = value[:8], value[8:]
    if code.startswith(b"UNICODE"):
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            text = body.decode("utf-16", "replace")
        else:
            # The standard says the EXIF block's byte order; some writers ignore it. Latin text has its
            # NUL high bytes on one side, which tells the order actually used.
            high_first, high_last = body[0::2].count(0), body[1::2].count(0)
            big = high_first > high_last or (high_first == high_last and endian == ">")
            text = body[: len(body) // 2 * 2].decode("utf-16-be" if big else "utf-16-le", "replace")
    elif code.startswith(b"JIS"):
        text = body.decode("shift_jis", "replace")
    else:  # ASCII or undefined: UTF-8 in practice, else a Windows code page
        text = _decode_8bit(body)
    return text.replace("\x00", " ")


def _exif_gps(gps: dict[int, Any]) -> tuple[float | None, float | None]:
    if not gps or str(gps.get(9, "")).strip().upper().startswith("V"):  # GPSStatus V: measurement void
        return None, None
    lat, lon = _dms(gps.get(2)), _dms(gps.get(4))
    lat_ref, lon_ref = (str(gps.get(k, "")).strip("\x00 ").upper()[:1] for k in (1, 3))
    if lat is None or lon is None or lat > 90.0 or lon > 180.0 or (lat == 0.0 and lon == 0.0):
        return None, None
    # A missing reference is read as N/E; an invalid one means the writer is confused.
    if lat_ref not in ("", "N", "S") or lon_ref not in ("", "E", "W"):
        return None, None
    return (-lat if lat_ref == "S" else lat), (-lon if lon_ref == "W" else lon)


def _dms(value: Any) -> float | None:
    """Degrees from EXIF rationals (degrees, minutes, seconds); fewer components are allowed."""
    if not isinstance(value, tuple):
        value = (value,)
    if not 1 <= len(value) <= 3:
        return None
    try:
        parts = [float(v) for v in value]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if any(not math.isfinite(p) or p < 0 for p in parts) or any(p >= 60 for p in parts[1:]):
        return None
    return sum(p / 60**i for i, p in enumerate(parts))


# --- IPTC ---------------------------------------------------------------------------------------------


def _from_iptc(im: Image.Image) -> PhotoMeta:
    if im.format == "JPEG":
        data = (im.info.get("photoshop") or {}).get(_PHOTOSHOP_IPTC)
    elif im.format == "TIFF":
        # Photoshop declares this tag as LONGs; Pillow's own getiptcinfo reads the raw bytes the same way.
        data = getattr(getattr(im, "tag_v2", None), "_tagdata", {}).get(_TIFF_IPTC)
    else:
        data = None
    if not isinstance(data, bytes) or not data:
        return PhotoMeta()
    records, problem = _iptc_records(data)
    utf8 = any(b"\x1b%G" in v for v in records.get((1, 90), ()))

    def text(raw: bytes) -> str:
        return raw.decode("utf-8", "replace") if utf8 else _decode_8bit(raw)

    captions = []
    for key in ((2, 120), (2, 5), (2, 105)):  # Caption-Abstract, Object Name (title), Headline
        for raw in records.get(key, ())[:1]:
            if (t := _caption_text(text(raw))) is not None:
                captions.append((IPTC_SOURCE, t))
    keywords = [
        ("iptc", kw) for raw in records.get((2, 25), ()) if (kw := clean_text(text(raw), MAX_KEYWORD_CHARS))
    ]
    return PhotoMeta(
        captions=tuple(captions), keywords=tuple(keywords), problems=(problem,) if problem else ()
    )


def _iptc_records(data: bytes) -> tuple[dict[tuple[int, int], list[bytes]], str | None]:
    """IPTC-IIM datasets: 0x1C, record, dataset, 2-byte size (or an extended size of up to 4 bytes)."""
    records: dict[tuple[int, int], list[bytes]] = {}
    i = 0
    while i + 5 <= len(data):
        if data[i] != 0x1C:
            return records, None if not data[i:].strip(b"\x00") else "IPTC block malformed"
        key = (data[i + 1], data[i + 2])
        size = int.from_bytes(data[i + 3 : i + 5], "big")
        i += 5
        if size & 0x8000:
            n = size & 0x7FFF
            if n > 4 or i + n > len(data):
                return records, "IPTC block malformed"
            size = int.from_bytes(data[i : i + n], "big")
            i += n
        if i + size > len(data):
            return records, "IPTC block truncated"
        records.setdefault(key, []).append(data[i : i + size])
        i += size
    return records, None


# --- XMP ----------------------------------------------------------------------------------------------


def _from_embedded_xmp(im: Image.Image) -> PhotoMeta:
    data = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    if isinstance(data, tuple) and len(data) == 1:
        data = data[0]
    if not isinstance(data, (bytes, str)) or not data:
        return PhotoMeta()
    return parse_xmp(data, caption_source=XMP_SOURCE)


def _xmp_properties(root: Element) -> dict[str, list[str]]:
    """Every rdf:Description's simple properties (attributes or elements) and container items."""
    props: dict[str, list[str]] = {}
    for desc in root.iter(f"{{{_RDF}}}Description"):
        for name, value in desc.attrib.items():
            props.setdefault(name.lstrip("{").replace("}", ""), []).append(value)
        for child in desc:
            props.setdefault(child.tag.lstrip("{").replace("}", ""), []).extend(_xmp_values(child))
    return props


def _xmp_values(prop: Element) -> list[str]:
    for container in prop:
        if container.tag in _CONTAINERS:
            items = [li for li in container if li.tag == _LI]
            # rdf:Alt: the x-default language first.
            items.sort(key=lambda li: li.get(_XML_LANG, "").lower() != "x-default")
            return [li.text or "" for li in items]
    return [prop.text] if prop.text else []


def _xmp_coord(value: str | None, refs: str, limit: float) -> float | None:
    """XMP GPS coordinate: "DDD,MM.mmk" or "DDD,MM,SSk" with k the N/S or E/W reference."""
    if not value or not (m := _XMP_COORD.fullmatch(value)):
        return None
    ref = m.group(4).upper()
    if ref not in refs:
        return None
    deg, minutes, seconds = (float(g) if g else 0.0 for g in m.group(1, 2, 3))
    if minutes >= 60 or seconds >= 60:
        return None
    x = deg + minutes / 60 + seconds / 3600
    return None if x > limit else (-x if ref in "SW" else x)


# --- shared helpers -----------------------------------------------------------------------------------


def _formats(path: Path) -> tuple[str, ...]:
    """The formats images.py indexes that are registered now. HEIF/AVIF openers read the whole file before
    parsing its header, so they are left out for a file over the same byte budget images.py applies."""
    Image.init()  # registers Pillow's own plugins once (AVIF is one); never adds a third-party opener
    wanted = dict.fromkeys(PIL_FORMATS + _OPTIONAL_FORMATS)
    try:
        containers_ok = Path(path).stat().st_size <= MAX_CONTAINER_BYTES
    except OSError:
        containers_ok = False  # Image.open reports why
    return tuple(f for f in wanted if f in Image.OPEN and (containers_ok or f not in _OPTIONAL_FORMATS))


def _guarded(what: str, read: Callable[[Image.Image], PhotoMeta], im: Image.Image) -> PhotoMeta:
    try:
        return read(im)
    except Exception as e:  # Pillow's header parsers raise many types on hostile data (struct.error, ...)
        return _problem(f"{what} unreadable: {type(e).__name__}: {_short(e)}")


def _caption_text(value: str | None) -> str | None:
    """A cleaned caption, or None for empty text, camera placeholders and file names."""
    if value is None:
        return None
    text = clean_text(value, MAX_CAPTION_CHARS)
    if not any(ch.isalnum() for ch in text) or text.casefold() in _PLACEHOLDERS:
        return None
    if _FILE_NAME.fullmatch(text) or _CAMERA_STEM.fullmatch(text):
        return None
    return text


def _camera(make: str | None, model: str | None) -> str | None:
    make = clean_text(make, MAX_KEYWORD_CHARS) if make else ""
    model = clean_text(model, MAX_KEYWORD_CHARS) if model else ""
    if not model:
        return make or None
    # "Canon" + "Canon EOS R5"; "NIKON CORPORATION" + "NIKON D750": the model already names the maker.
    if not make or model.casefold().startswith(make.split()[0].casefold()):
        return model
    return f"{make} {model}"


def _decode_8bit(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp1252")  # latin-1 plus the printable characters Windows puts in 0x80-0x9F
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _parse_datetime(value: str, offset: str | None = None, subsec: str | None = None) -> float | None:
    """Unix seconds from an EXIF or ISO 8601 date; without a zone, the machine's local time."""
    m = _DATETIME.fullmatch(value.replace("\x00", ""))
    if not m:
        return None
    year, month, day, hour, minute, second = (int(g) if g else 0 for g in m.group(1, 2, 3, 4, 5, 6))
    fraction = m.group(7) or (subsec.strip() if subsec and subsec.strip().isdigit() else "")
    if not MIN_YEAR <= year <= MAX_YEAR:
        return None
    zone = _zone(m.group(8) or offset)
    try:
        when = datetime(year, month, day, hour, minute, second, tzinfo=zone)
        seconds = when.timestamp()
    except (ValueError, OverflowError, OSError):
        return None
    return seconds + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def _zone(offset: str | None) -> timezone | None:
    if not offset or not (m := _OFFSET.fullmatch(offset)):
        return None
    if m.group(1):
        return timezone.utc
    minutes = int(m.group(3)) * 60 + int(m.group(4))
    if minutes > 14 * 60 or int(m.group(4)) >= 60:
        return None
    return timezone(timedelta(minutes=-minutes if m.group(2) == "-" else minutes))


def _unix_seconds(value: Any) -> float | None:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if not _is_number(value) or value == 0:
        return None
    try:
        year = datetime.fromtimestamp(value, timezone.utc).year
    except (ValueError, OverflowError, OSError):
        return None
    return float(value) if MIN_YEAR <= year <= MAX_YEAR else None


def _takeout_geo(geo: Any) -> tuple[tuple[float, float] | None, bool]:
    """((lat, lon) or None when unknown — Takeout writes 0.0/0.0 then, is the value well-formed)."""
    if not isinstance(geo, dict):
        return None, False
    lat, lon = geo.get("latitude"), geo.get("longitude")
    if lat is None and lon is None:
        return None, True
    if not (_is_number(lat) and _is_number(lon)):
        return None, False
    if lat == 0 and lon == 0:
        return None, True
    if abs(lat) > 90 or abs(lon) > 180:
        return None, False
    return (float(lat), float(lon)), True


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _unique(
    items: Iterable[tuple[str, str]], key: Callable[[tuple[str, str]], str]
) -> tuple[tuple[str, str], ...]:
    seen: set[str] = set()
    out = []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            out.append(item)
    return tuple(out)


def _problem(text: str) -> PhotoMeta:
    return PhotoMeta(problems=(text,))


def _short(e: BaseException) -> str:
    text = str(e)
    return text if len(text) <= _MAX_PROBLEM_CHARS else text[:_MAX_PROBLEM_CHARS] + "..."
