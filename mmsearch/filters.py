"""Search filters: which files a hit may come from (path globs, extensions, file kinds, file time, duration,
tags, date taken, place).

Standard library only: the CLI's fast path to a running server imports this without numpy or SQLAlchemy.
:meth:`Filters.parse` turns user strings (CLI options, query parameters, API keyword arguments) into a
validated, canonical :class:`Filters`; :meth:`Filters.as_params` turns it back. The SQL lives in
:mod:`mmsearch.catalog_filters`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from mmsearch.errors import BadQueryError

#: The file kinds a filter may name (``files.kind``).
FILE_KINDS = ("image", "audio", "video")
#: Most path patterns (and extensions, kinds) one query may give.
MAX_PATTERNS = 32
#: Longest path pattern, in characters.
MAX_PATTERN_LENGTH = 1024
#: Longest extension, in characters (with its dot).
MAX_EXT_LENGTH = 32
#: Longest tag a filter may name, in characters.
MAX_TAG_LENGTH = 200
#: Half the Earth's circumference: no two places are farther apart (km).
MAX_RADIUS_KM = 20_038.0
#: The mean Earth radius (km) of :func:`distance_km`.
EARTH_RADIUS_KM = 6371.0088

Scalar = str | float | int | None
Many = str | Iterable[str] | None


@dataclass(frozen=True)
class Filters:
    """Which files a hit may come from; every field that is set must pass (an empty field passes all).

    An item passes when at least one live file holding it passes: image and segment items belong to
    content that several files may share, a caption belongs to one file. Instances from :meth:`parse` are
    canonical (sorted, without duplicates), so equal filters compare and hash equal (a cache key).
    """

    paths: tuple[str, ...] = ()  # GLOB patterns over the full path; any may match ('*' crosses '/')
    exts: tuple[str, ...] = ()  # lower-case with a leading dot ('.jpg')
    kinds: tuple[str, ...] = ()  # file kinds: 'image', 'audio'
    after: float | None = None  # file mtime >= after (unix seconds)
    before: float | None = None  # file mtime < before
    min_duration: float | None = None  # media duration (seconds) >=; files without one never pass
    max_duration: float | None = None  # media duration <=; files without one never pass
    tags: tuple[str, ...] = ()  # lower-cased; a file passes with any of them (a keyword or a zero-shot tag)
    taken_after: float | None = None  # date taken (else file mtime) >= taken_after (unix seconds)
    taken_before: float | None = None  # date taken (else file mtime) < taken_before
    near: tuple[float, float, float] | None = None  # (latitude, longitude, km): files without a place fail

    def is_empty(self) -> bool:
        return self == Filters()

    @classmethod
    def parse(
        cls,
        *,
        path: Many = (),
        ext: Many = (),
        kind: Many = (),
        after: Scalar | Sequence[str] = None,
        before: Scalar | Sequence[str] = None,
        min_duration: Scalar | Sequence[str] = None,
        max_duration: Scalar | Sequence[str] = None,
        tag: Many = (),
        taken_after: Scalar | Sequence[str] = None,
        taken_before: Scalar | Sequence[str] = None,
        near: str | Sequence[str] | None = None,
    ) -> Filters:
        """Filters from user input. ``ext`` and ``kind`` values may hold several, comma-separated; dates
        are ISO 8601 (``2024-05-01``, ``2024-05-01T10:00``, with an optional UTC offset or ``Z``; without
        one, local time) or unix seconds; durations are seconds. A scalar may come as a one-element list
        (a query parameter). ``tag`` values may hold several, comma-separated, and match case-insensitively;
        ``taken_after``/``taken_before`` compare the date a photo was taken (its file time when it says
        none); ``near`` is ``LAT,LON,KM`` (decimal degrees, south and west negative). Raises
        :class:`BadQueryError` saying what is wrong."""
        paths = tuple(sorted(set(_patterns(_strings(path, "path")))))
        exts = tuple(sorted({_ext(e) for e in _split(_strings(ext, "ext"))}))
        kinds = tuple(sorted({_kind(k) for k in _split(_strings(kind, "kind"))}))
        for name, values in (("path", paths), ("ext", exts), ("kind", kinds)):
            if len(values) > MAX_PATTERNS:
                raise BadQueryError(f"too many {name} filters ({len(values)}; at most {MAX_PATTERNS})")
        start, end = _time(_one(after, "after"), "after"), _time(_one(before, "before"), "before")
        if start is not None and end is not None and not start < end:
            raise BadQueryError(f"after ({_show(start)}) must be earlier than before ({_show(end)})")
        low = _duration(_one(min_duration, "min_duration"), "min_duration")
        high = _duration(_one(max_duration, "max_duration"), "max_duration")
        if low is not None and high is not None and low > high:
            raise BadQueryError(f"min_duration ({low:g}) is larger than max_duration ({high:g})")
        tags = tuple(sorted({_tag(t) for t in _split(_strings(tag, "tag"))}))
        if len(tags) > MAX_PATTERNS:
            raise BadQueryError(f"too many tag filters ({len(tags)}; at most {MAX_PATTERNS})")
        t_start = _time(_one(taken_after, "taken_after"), "taken_after")
        t_end = _time(_one(taken_before, "taken_before"), "taken_before")
        if t_start is not None and t_end is not None and not t_start < t_end:
            raise BadQueryError(
                f"taken_after ({_show(t_start)}) must be earlier than taken_before ({_show(t_end)})"
            )
        return cls(paths, exts, kinds, start, end, low, high, tags, t_start, t_end, _near(_one(near, "near")))

    def as_params(self) -> dict[str, list[str]]:
        """The query-parameter form (``parse(**as_params())`` gives these filters back); unset fields are
        left out."""
        out: dict[str, list[str]] = {}
        for name, values in (("path", self.paths), ("ext", self.exts), ("kind", self.kinds)):
            if values:
                out[name] = list(values)
        for name, value in (
            ("after", self.after),
            ("before", self.before),
            ("min_duration", self.min_duration),
            ("max_duration", self.max_duration),
            ("taken_after", self.taken_after),
            ("taken_before", self.taken_before),
        ):
            if value is not None:
                out[name] = [repr(float(value))]
        if self.tags:
            out["tag"] = list(self.tags)
        if self.near is not None:
            out["near"] = [",".join(repr(float(v)) for v in self.near)]
        return out


#: The keyword arguments of :meth:`Filters.parse` (and of ``Index.search``) that make a filter.
FILTER_FIELDS = tuple(inspect.signature(Filters.parse).parameters)


def _strings(value: Many, name: str) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        if not isinstance(item, str):
            raise BadQueryError(f"{name}: expected text, got {type(item).__name__}")
        if "\x00" in item:
            raise BadQueryError(f"{name}: a NUL character is not allowed")
    return items


def _split(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _patterns(values: list[str]) -> list[str]:
    for pattern in values:
        if not pattern:
            raise BadQueryError("path: empty pattern")
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise BadQueryError(f"path: pattern longer than {MAX_PATTERN_LENGTH} characters")
        _check_brackets(pattern)
    # Paths are stored absolute: a relative pattern ("photos/*", "IMG_*.jpg") matches at any depth.
    return [p if p.startswith(("/", "*")) else f"*/{p}" for p in values]


def _check_brackets(pattern: str) -> None:
    """SQLite GLOB matches nothing with an unclosed ``[``: say so instead of silently finding nothing."""
    i = 0
    while i < len(pattern):
        if pattern[i] == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] == "^":
                j += 1
            if j < len(pattern) and pattern[j] == "]":  # a ']' first in the set is a literal
                j += 1
            close = pattern.find("]", j)
            if close < 0:
                raise BadQueryError(f"path: unclosed '[' in pattern {pattern!r}")
            i = close
        i += 1


def _ext(value: str) -> str:
    ext = "." + value.lstrip(".").lower() if value else ""
    if ext == "." or len(ext) > MAX_EXT_LENGTH or any(c in ext for c in "/\\*?["):
        raise BadQueryError(f"ext: {value!r} is not a file extension (e.g. jpg or .jpg)")
    return ext


def _kind(value: str) -> str:
    kind = value.lower()
    if kind not in FILE_KINDS:
        raise BadQueryError(f"kind: {value!r} is not one of {', '.join(FILE_KINDS)}")
    return kind


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """The great-circle distance between two places (haversine on a sphere: within 0.5 % of the
    ellipsoid)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    h = (
        math.sin((p2 - p1) / 2) ** 2
        + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def _tag(value: str) -> str:
    if len(value) > MAX_TAG_LENGTH:
        raise BadQueryError(f"tag: longer than {MAX_TAG_LENGTH} characters")
    return value.lower()


def _near(value: Scalar) -> tuple[float, float, float] | None:
    """(latitude, longitude, km) from ``LAT,LON,KM``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = str(value).split(",")
    if len(parts) != 3:
        raise BadQueryError(f"near: {value!r} is not LAT,LON,KM (e.g. 48.8584,2.2945,5)")
    numbers = [_number(p.strip(), "near") for p in parts]
    if None in numbers:
        raise BadQueryError(f"near: {value!r} is not LAT,LON,KM (e.g. 48.8584,2.2945,5)")
    lat, lon, km = (float(n) for n in numbers if n is not None)
    if not -90 <= lat <= 90:
        raise BadQueryError(f"near: latitude {lat:g} is not between -90 and 90")
    if not -180 <= lon <= 180:
        raise BadQueryError(f"near: longitude {lon:g} is not between -180 and 180")
    if not 0 < km <= MAX_RADIUS_KM:
        raise BadQueryError(f"near: the radius must be more than 0 and at most {MAX_RADIUS_KM:g} km")
    return (lat, lon, km)


def _one(value: Scalar | Sequence[str], name: str) -> Scalar:
    if isinstance(value, str | float | int) or value is None:
        return value
    values = list(value)
    if len(values) > 1:
        raise BadQueryError(f"{name} given {len(values)} times")
    return values[0] if values else None


def _number(value: Scalar, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise BadQueryError(f"{name}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadQueryError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise BadQueryError(f"{name}: {value!r} is not a finite number")
    return number


def _time(value: Scalar, name: str) -> float | None:
    """Unix seconds from unix seconds or an ISO 8601 date or date and time."""
    if isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            return _number(text, name)
        except BadQueryError:
            pass
        if text[-1:] in "zZ":
            text = text[:-1] + "+00:00"  # Python 3.10's fromisoformat does not read 'Z'
        try:
            when = datetime.fromisoformat(text)
            return when.timestamp()  # naive: local time
        except (ValueError, OverflowError, OSError):
            raise BadQueryError(
                f"{name}: {value!r} is neither an ISO 8601 date (2024-05-01, 2024-05-01T10:00) "
                "nor unix seconds"
            ) from None
    return _number(value, name)


def _duration(value: Scalar, name: str) -> float | None:
    seconds = _number(value, name)
    if seconds is not None and seconds < 0:
        raise BadQueryError(f"{name}: a duration cannot be negative ({seconds:g})")
    return seconds


def _show(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        return f"{seconds:g}"
