"""Filters in SQL: which files pass a :class:`~mmsearch.filters.Filters`, and which embeddings that lets a
search return.

Every condition is a SQLAlchemy expression over bound values taken from the validated filters: no SQL is
built from user strings. An item passes when a live file holding it passes: a caption through its own
file, an image or a transcript segment through any live file of its content (media), which several files
may share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, Connection, Select, and_, func, or_, select, union_all
from sqlalchemy.sql import FromClause

from mmsearch.catalog import DISTANCE_FUNCTION, Catalog
from mmsearch.errors import BadQueryError
from mmsearch.filters import EARTH_RADIUS_KM, Filters
from mmsearch.schema import (
    FILES_CHANGES_META,
    ITEM_COLUMNS,
    REF_COLUMNS,
    TAGS_CHANGES_META,
    VECTOR_KINDS,
    captions,
    embeddings,
    files,
    frames,
    media,
    meta,
    segments,
    tags,
)

_NS = 1_000_000_000


_INT64 = 2**63 - 1


def _ns(seconds: float) -> int:
    """Unix seconds as nanoseconds (``files.mtime_ns``), exact for the decimal the user wrote; clamped to
    SQLite's integers (a date past 2262 is later than every mtime_ns)."""
    return max(-_INT64, min(_INT64, int(Decimal(repr(float(seconds))) * _NS)))


def file_passes(filters: Filters | None, f: FromClause = files) -> ColumnElement[bool]:
    """The condition on a row of ``files`` (or an alias of it) that the file is live and passes."""
    conds: list[ColumnElement[bool]] = [f.c.status == "ok"]
    if filters is None:
        return conds[0]
    if filters.paths:
        conds.append(or_(*(f.c.path.op("GLOB")(p) for p in filters.paths)))
    if filters.exts:
        by_length: dict[int, list[str]] = {}
        for ext in filters.exts:
            by_length.setdefault(len(ext), []).append(ext)
        # The path's last characters, lower-cased (ASCII, as extensions are): one IN per length.
        conds.append(or_(*(func.lower(func.substr(f.c.path, -n)).in_(e) for n, e in by_length.items())))
    if filters.kinds:
        conds.append(f.c.kind.in_(filters.kinds))
    if filters.after is not None:
        conds.append(f.c.mtime_ns >= _ns(filters.after))
    if filters.before is not None:
        conds.append(f.c.mtime_ns < _ns(filters.before))
    if filters.min_duration is not None or filters.max_duration is not None:
        lasting: list[ColumnElement[bool]] = []  # (a NULL duration compares to nothing)
        if filters.min_duration is not None:
            lasting.append(media.c.duration >= filters.min_duration)
        if filters.max_duration is not None:
            lasting.append(media.c.duration <= filters.max_duration)
        conds.append(select(media.c.id).where(media.c.id == f.c.media_id, *lasting).exists())
    if filters.tags:
        tagged = func.lower(tags.c.tag).in_(filters.tags)  # through ix_tags_tag
        conds.append(
            or_(
                f.c.id.in_(select(tags.c.file_id).where(tagged, tags.c.file_id.is_not(None))),
                f.c.media_id.in_(select(tags.c.media_id).where(tagged, tags.c.media_id.is_not(None))),
            )
        )
    if filters.taken_after is not None or filters.taken_before is not None:
        # A photo's date taken, else its file time (a recording has no date taken).
        taken = func.coalesce(f.c.taken_at, f.c.mtime_ns / float(_NS))
        if filters.taken_after is not None:
            conds.append(taken >= filters.taken_after)
        if filters.taken_before is not None:
            conds.append(taken < filters.taken_before)
    if filters.near is not None:
        conds.append(_near(filters.near, f))
    return and_(*conds)


_KM_PER_DEGREE = math.pi * EARTH_RADIUS_KM / 180


def _near(near: tuple[float, float, float], f: FromClause) -> ColumnElement[bool]:
    """Within ``km`` of a place: a bounding box SQLite can check cheaply, then the exact distance."""
    lat, lon, km = near
    d_lat = km / _KM_PER_DEGREE
    conds: list[ColumnElement[bool]] = [f.c.lat.between(lat - d_lat, lat + d_lat), f.c.lon.is_not(None)]
    cos_lat = math.cos(math.radians(min(90.0, abs(lat) + d_lat)))  # the box's widest latitude
    if cos_lat > 1e-9:
        d_lon = km / (_KM_PER_DEGREE * cos_lat)
        if lon - d_lon >= -180 and lon + d_lon <= 180:  # else the box crosses the antimeridian: no lon test
            conds.append(f.c.lon.between(lon - d_lon, lon + d_lon))
    conds.append(getattr(func, DISTANCE_FUNCTION)(f.c.lat, f.c.lon, lat, lon) <= km)
    return and_(*conds)


def item_of(kind: str, e: FromClause = embeddings) -> tuple[ColumnElement[bool], Any]:
    """(condition, column): an embedding row is of ``kind``, and the column naming its item. The condition
    also says the item columns before it in ix_embeddings_items are NULL (as they are for that kind), so
    that SQLite seeks that index to the item (model, kind, item) instead of reading every embedding of the
    kind: embedding rows hold their vectors, and reading a million of them reads gigabytes."""
    ref = REF_COLUMNS[kind]
    before = ITEM_COLUMNS[: ITEM_COLUMNS.index(ref)]
    return and_(e.c.kind == kind, *(getattr(e.c, col).is_(None) for col in before)), getattr(e.c, ref)


def _passing_items(kind: str, passing: Any) -> Select[Any]:
    """The item ids of ``kind`` (media, caption or segment ids) held by the ``passing`` files (a selectable
    of their id and media_id): a caption by its own file, an image or a segment by any file of its media."""
    if kind == "image":
        return select(passing.c.media_id)
    if kind == "caption":  # through ix_captions_file_id (id included)
        return select(captions.c.id).where(captions.c.file_id.in_(select(passing.c.id)))
    if kind == "segment":
        return select(segments.c.id).where(segments.c.media_id.in_(select(passing.c.media_id)))
    if kind == "frame":
        return select(frames.c.id).where(frames.c.media_id.in_(select(passing.c.media_id)))
    raise ValueError(f"unknown vector kind {kind!r}")


def allowed_ids(catalog: Catalog, filters: Filters, kinds: Sequence[str], model: str) -> np.ndarray:
    """The sorted int64 ids of ``model``'s embeddings of ``kinds`` whose item passes ``filters``."""
    if not catalog.has_photo_meta and (
        filters.tags or filters.near or filters.taken_after or filters.taken_before
    ):
        raise BadQueryError(
            "this index's catalog predates tags, dates taken and places (it is open read-only and could not "
            "be upgraded): filter by path, extension, kind, file time or duration instead"
        )
    f = files.alias("pf")
    # The passing files, found once (one scan of files) for every kind.
    passing = (
        select(f.c.id, f.c.media_id)
        .where(file_passes(filters, f), f.c.media_id.is_not(None))
        .cte("passing")
        .prefix_with("MATERIALIZED")
    )
    parts = []
    for kind in VECTOR_KINDS:
        if kind == "frame" and not catalog.has_video:
            continue  # an older catalog opened read-only: no video
        if kind in kinds:
            is_kind, item = item_of(kind)
            parts.append(
                select(embeddings.c.id).where(
                    catalog.of_model(model), is_kind, item.in_(_passing_items(kind, passing))
                )
            )
    if not parts:
        return np.empty(0, np.int64)
    q = parts[0] if len(parts) == 1 else union_all(*parts)
    with catalog.read() as conn:
        ids = np.fromiter(conn.execute(q).scalars(), np.int64)
    ids.sort()
    return ids


def passing_rows(conn: Connection, content: str, filters: Filters) -> np.ndarray:
    """The sorted int64 ids of the rows of ``content`` ("captions", "segments" or "files") that a live file
    passing ``filters`` holds: a caption its own file, a segment any file of its media, a file itself (what
    the full-text index of each table may rank for a filtered query)."""
    f = files.alias("rf")
    if content == "files":
        q = select(f.c.id).where(file_passes(filters, f))
    elif content == "captions":
        q = select(captions.c.id).join(f, f.c.id == captions.c.file_id).where(file_passes(filters, f))
    elif content == "segments":
        passing = select(f.c.media_id).where(file_passes(filters, f), f.c.media_id.is_not(None))
        q = select(segments.c.id).where(segments.c.media_id.in_(passing))
    else:
        raise ValueError(f"no full-text rows in {content!r}")
    ids = np.fromiter(conn.execute(q).scalars(), np.int64)
    ids.sort()
    return ids


def catalog_version(catalog: Catalog) -> tuple[str, ...]:
    """A value that changes whenever what :func:`allowed_ids` reads may have changed: every change to
    embeddings bumps a generation (``generation.MODEL.KIND``), every change to files is counted
    (``FILES_CHANGES_META``), every change to tags too (``TAGS_CHANGES_META``); captions, segments and
    durations only change along with their embeddings. For caching allowed ids; one small read."""
    with catalog.read() as conn:
        return version_in(conn)


def version_in(conn: Connection) -> tuple[str, ...]:
    """:func:`catalog_version`, read on ``conn`` (e.g. in the read transaction of a query)."""
    q = select(meta.c.key, meta.c.value).where(
        or_(meta.c.key.like("generation.%"), meta.c.key.in_((FILES_CHANGES_META, TAGS_CHANGES_META)))
    )
    return tuple(sorted(f"{key}={value}" for key, value in conn.execute(q)))
