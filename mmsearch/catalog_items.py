"""Reads of the catalog's items: what a search hit, a file's page and a rerun of a model or of speech need."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    bindparam,
    case,
    func,
    literal,
    null,
    or_,
    select,
    union_all,
)
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

from mmsearch.catalog import Catalog, FileRow, _chunks
from mmsearch.catalog_filters import file_passes
from mmsearch.constants import EMBEDDED_SOURCE
from mmsearch.filters import Filters
from mmsearch.schema import (
    VECTOR_KINDS,
    captions,
    embeddings,
    files,
    frames,
    media,
    segments,
    tags,
)


@dataclass(frozen=True)
class ItemRow:
    """What a search hit shows: the embedding's item and the (first live) file it belongs to."""

    id: int
    kind: str
    file_id: int
    path_key: bytes
    text: str | None
    start: float | None
    end: float | None
    media_id: int | None
    # The file's kind (image, audio, video), then what it says of itself (a photo's date taken, camera and
    # place; None when unknown).
    file_kind: str | None = None
    taken_at: float | None = None
    camera: str | None = None
    lat: float | None = None
    lon: float | None = None


def resolve_items(
    catalog: Catalog,
    ids: Sequence[int],
    kinds: Sequence[str] = VECTOR_KINDS,
    filters: Filters | None = None,
) -> dict[int, ItemRow]:
    """The items of these embedding ids that are of one of ``kinds`` (the kinds searched: an id found in
    one kind's index is never shown as an item of another). An image or segment shows the lowest-id live
    file of its content that passes ``filters`` (left out when none does); a caption shows its own file.

    Every query resolves its hits, so the fixed cost counts: the statement is built with SQLAlchemy once
    per (kinds, filters, catalog features), compiled and kept, and run as plain SQL on the driver's
    connection with the ids as one JSON array (as :mod:`mmsearch.catalog_words` maps its rows)."""
    if filters is not None and filters.is_empty():
        filters = None
    searched = tuple(k for k in VECTOR_KINDS if k in kinds and (k != "frame" or catalog.has_video))
    if not searched or not len(ids):
        return {}
    sql, order = _compiled_resolve(searched, filters, catalog.has_photo_meta)
    given = json.dumps([int(i) for i in ids])
    params = [given if name == "ids" else value for name, value in order]
    with catalog.read() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        return {int(row[0]): ItemRow(*row) for row in raw.execute(sql, params)}


def _resolve_statement(kinds: tuple[str, ...], filters: Filters | None, photo_meta: bool) -> Any:
    """resolve_items' statement over the embedding ids ``:ids`` (a JSON array), one part per kind."""
    e, f, c, s, fr = embeddings, files, captions, segments, frames
    f2 = files.alias("f2")
    wanted = select(func.json_each(bindparam("ids", "[]")).table_valued("value").c.value)

    def first_file(media_id_col: Any) -> Any:
        # The lowest live (and passing) file id of this media, looked up through the files.media_id index
        # per row, instead of grouping the whole files table on every query (seconds at 100k files).
        return (
            select(func.min(f2.c.id))
            .where(f2.c.media_id == media_id_col, file_passes(filters, f2))
            .scalar_subquery()
        )

    # (An older catalog opened read-only, not migrated, has none of them.)
    photo = (
        (f.c.kind, f.c.taken_at, f.c.camera, f.c.lat, f.c.lon) if photo_meta else (f.c.kind,) + (null(),) * 4
    )
    parts = {
        "image": select(e.c.id, e.c.kind, f.c.id, f.c.path_key, null(), null(), null(), e.c.media_id, *photo)
        .select_from(e)
        .join(f, f.c.id == first_file(e.c.media_id))
        .where(e.c.id.in_(wanted), e.c.kind == "image"),
        "caption": select(
            e.c.id, e.c.kind, f.c.id, f.c.path_key, c.c.text, null(), null(), f.c.media_id, *photo
        )
        .join(c, c.c.id == e.c.caption_id)
        .join(f, f.c.id == c.c.file_id)
        .where(e.c.id.in_(wanted), e.c.kind == "caption"),
        "segment": select(
            e.c.id, e.c.kind, f.c.id, f.c.path_key, s.c.text, s.c.start, s.c.end, s.c.media_id, *photo
        )
        .select_from(e)
        .join(s, s.c.id == e.c.segment_id)
        .join(f, f.c.id == first_file(s.c.media_id))
        .where(e.c.id.in_(wanted), e.c.kind == "segment"),
        # a keyframe: its video's time (start = end)
        "frame": select(
            e.c.id, e.c.kind, f.c.id, f.c.path_key, null(), fr.c.time, fr.c.time, fr.c.media_id, *photo
        )
        .select_from(e)
        .join(fr, fr.c.id == e.c.frame_id)
        .join(f, f.c.id == first_file(fr.c.media_id))
        .where(e.c.id.in_(wanted), e.c.kind == "frame"),
    }
    chosen = [parts[k] for k in kinds]
    return chosen[0] if len(chosen) == 1 else union_all(*chosen)


#: (kinds, filters, photo columns) -> resolve_items' statement compiled: SQL, and its parameters in order
#: ("ids" given per call, the filters' values bound here). Most recent last.
_COMPILED: dict[tuple[tuple[str, ...], Filters | None, bool], tuple[str, list[tuple[str, Any]]]] = {}
_COMPILED_SIZE = 64
_compiled_lock = threading.Lock()


def _compiled_resolve(
    kinds: tuple[str, ...], filters: Filters | None, photo_meta: bool
) -> tuple[str, list[tuple[str, Any]]]:
    key = (kinds, filters, photo_meta)
    with _compiled_lock:
        hit = _COMPILED.get(key)
    if hit is None:
        compiled = _resolve_statement(kinds, filters, photo_meta).compile(
            dialect=sqlite_dialect(), compile_kwargs={"render_postcompile": True}
        )
        assert compiled.positiontup is not None
        bound = compiled.params
        hit = (
            compiled.string,
            [(name, None if name == "ids" else bound[name]) for name in compiled.positiontup],
        )
        with _compiled_lock:
            if len(_COMPILED) >= _COMPILED_SIZE:
                _COMPILED.pop(next(iter(_COMPILED)))
            _COMPILED[key] = hit
    return hit


# --- item details: what the server shows of one file --------------------------------------------------
@dataclass(frozen=True)
class FileDetails:
    """A live file and its content's metadata: what the server shows, and checks before serving it."""

    id: int
    path_key: bytes  # the exact path bytes
    path: str  # display form
    kind: str  # image | audio | video
    size: int
    mtime_ns: int
    media_id: int
    sha256: str  # of the content
    width: int | None
    height: int | None
    duration: float | None
    language: str | None
    transcript: str | None


def file_details(catalog: Catalog, file_id: int) -> FileDetails | None:
    """File ``file_id`` with its content's metadata, or None unless it is in the catalog and live."""
    f, m = files, media
    q = (
        select(f.c.id, f.c.path_key, f.c.path, f.c.kind, f.c.size, f.c.mtime_ns, f.c.media_id, m.c.sha256)
        .add_columns(m.c.width, m.c.height, m.c.duration, m.c.language, m.c.transcript)
        .join(m, m.c.id == f.c.media_id)
        .where(f.c.id == file_id, f.c.status == "ok")
    )
    with catalog.read() as conn:
        row = conn.execute(q).first()
    return None if row is None else FileDetails(*row)


def segments_of(catalog: Catalog, media_id: int, limit: int) -> list[tuple[float, float, str]]:
    """The first ``limit`` transcript segments of content ``media_id`` in time order: (start, end, text)."""
    s = segments
    q = (
        select(s.c.start, s.c.end, s.c.text)
        .where(s.c.media_id == media_id)
        .order_by(s.c.start, s.c.idx)
        .limit(limit)
    )
    with catalog.read() as conn:
        return [(start, end, said) for start, end, said in conn.execute(q)]


def live_files_of(catalog: Catalog, media_ids: Sequence[int]) -> dict[int, list[FileRow]]:
    """media id -> its live files (lowest id first): where content is read from again."""
    out: dict[int, list[FileRow]] = {}
    cols = [files.c.id, files.c.path_key, files.c.kind, files.c.size, files.c.mtime_ns, files.c.sha256]
    cols += [files.c.media_id, files.c.status, files.c.reason]
    with catalog.read() as conn:
        for chunk in _chunks(list(media_ids), 900):
            q = select(*cols).where(files.c.media_id.in_(chunk), files.c.status == "ok").order_by(files.c.id)
            for row in conn.execute(q):
                out.setdefault(int(row.media_id), []).append(FileRow(*row))
    return out


def texts_of(catalog: Catalog, kind: str, ids: Sequence[int]) -> dict[int, str]:
    """Caption or segment id -> its text."""
    table = captions if kind == "caption" else segments
    out: dict[int, str] = {}
    with catalog.read() as conn:
        for chunk in _chunks(list(ids), 900):
            for i, txt in conn.execute(select(table.c.id, table.c.text).where(table.c.id.in_(chunk))):
                out[int(i)] = txt
    return out


def recordings_not_by(catalog: Catalog, speech: str) -> list[int]:
    """The recordings (audio or video content with a live file) whose transcript other speech settings made."""
    live = select(files.c.id).where(files.c.media_id == media.c.id, files.c.status == "ok").exists()
    q = (
        select(media.c.id)
        .where(
            media.c.kind.in_(("audio", "video")),
            live,
            (media.c.speech.is_(None)) | (media.c.speech != speech),
        )
        .order_by(media.c.id)
    )
    with catalog.read() as conn:
        return [int(i) for i in conn.execute(q).scalars()]


def live_texts(catalog: Catalog) -> Iterator[str]:
    """The captions of live files and the transcript segments of their recordings (not the whole short
    transcripts stored beside their segments, idx -1, which would count their words twice)."""
    live = files.c.status == "ok"
    query = union_all(
        select(captions.c.text).where(captions.c.file_id.in_(select(files.c.id).where(live))),
        select(segments.c.text).where(
            segments.c.idx >= 0, segments.c.media_id.in_(select(files.c.media_id).where(live))
        ),
    )
    with catalog.read() as conn:
        for (text,) in conn.execution_options(yield_per=2048).execute(query):
            yield text


# --- what photos say of themselves: for status -------------------------------------------------------
def _caption_origin() -> Any:
    """SQL naming where a caption came from, by its source: inside the file (exif, iptc, xmp), a Takeout
    .json, an .xmp sidecar, a captions manifest or a text sidecar."""
    src = captions.c.source
    return case(
        (src.like(f"{EMBEDDED_SOURCE}%"), func.substr(src, len(EMBEDDED_SOURCE) + 1)),
        (func.lower(src).like("%.json"), literal("takeout")),
        (func.lower(src).like("%.xmp"), literal("xmp sidecar")),
        (or_(src.like("%/captions.jsonl"), src.like("%/captions.csv")), literal("manifest")),
        else_=literal("text sidecar"),
    )


def photo_summary(catalog: Catalog) -> dict[str, Any]:
    """Captions by origin, and how many live files have a date taken (by where it was read), a place, a
    camera and keywords. An older catalog opened read-only (schema < 7) counts its captions only."""
    origin = _caption_origin().label("origin")
    out: dict[str, Any] = {}
    with catalog.read() as conn:
        q = select(origin, func.count()).group_by(origin)
        out["caption_sources"] = dict(
            sorted(((str(o), int(n)) for o, n in conn.execute(q)), key=lambda x: -x[1])
        )
        if not catalog.has_photo_meta:
            return out
        live = files.c.status == "ok"
        q = select(files.c.taken_source, func.count()).where(live, files.c.taken_source.is_not(None))
        out["taken"] = {str(s): int(n) for s, n in conn.execute(q.group_by(files.c.taken_source))}
        out["placed"] = conn.execute(select(func.count()).where(live, files.c.lat.is_not(None))).scalar_one()
        out["cameras"] = conn.execute(
            select(func.count(func.distinct(files.c.camera))).where(live, files.c.camera.is_not(None))
        ).scalar_one()
        out["with_keywords"] = conn.execute(
            select(func.count(func.distinct(tags.c.file_id))).where(tags.c.file_id.is_not(None))
        ).scalar_one()
    return out


def photo_facts(catalog: Catalog, file_id: int, media_id: int) -> dict[str, Any]:
    """What file ``file_id`` says of itself (date taken and where it was read, camera, place), its keywords
    (with where each was read) and its content's zero-shot tags (with their confidence)."""
    if not catalog.has_photo_meta:
        return {}
    f, t = files, tags
    with catalog.read() as conn:
        row = conn.execute(
            select(f.c.taken_at, f.c.taken_source, f.c.camera, f.c.lat, f.c.lon).where(f.c.id == file_id)
        ).first()
        keywords = conn.execute(
            select(t.c.tag, t.c.source).where(t.c.file_id == file_id).order_by(t.c.id)
        ).all()
        zero_shot = conn.execute(
            select(t.c.tag, t.c.score).where(t.c.media_id == media_id).order_by(t.c.score.desc())
        ).all()
    out: dict[str, Any] = dict(row._mapping) if row is not None else {}
    out["keywords"] = [{"tag": tag, "source": source} for tag, source in keywords]
    out["tags"] = [{"tag": tag, "confidence": score} for tag, score in zero_shot]
    return out


# --- a video's keyframes: what the server shows of a moment ---------------------------------------------
def frame_at(catalog: Catalog, media_id: int, seconds: float) -> tuple[int, float] | None:
    """The keyframe of content ``media_id`` on screen at ``seconds``: the last one at or before it (the first
    one if none is), as (idx, time); None if the content has no keyframes."""
    fr = frames
    cols = (fr.c.idx, fr.c.time)
    with catalog.read() as conn:
        row = conn.execute(
            select(*cols)
            .where(fr.c.media_id == media_id, fr.c.time <= seconds)
            .order_by(fr.c.time.desc(), fr.c.idx.desc())
            .limit(1)
        ).first()
        if row is None:
            row = conn.execute(
                select(*cols).where(fr.c.media_id == media_id).order_by(fr.c.time, fr.c.idx).limit(1)
            ).first()
    return None if row is None else (int(row[0]), float(row[1]))


def frame_times(catalog: Catalog, media_id: int, limit: int) -> list[float]:
    """The times (seconds) of the first ``limit`` keyframes of content ``media_id``, in time order."""
    fr = frames
    q = select(fr.c.time).where(fr.c.media_id == media_id).order_by(fr.c.time, fr.c.idx).limit(limit)
    with catalog.read() as conn:
        return [float(t) for t in conn.execute(q).scalars()]


def frames_of(catalog: Catalog, frame_ids: Sequence[int]) -> dict[int, list[tuple[int, float]]]:
    """media id -> its keyframes among ``frame_ids``: (frame id, time), in time order."""
    out: dict[int, list[tuple[int, float]]] = {}
    with catalog.read() as conn:
        for chunk in _chunks(list(frame_ids), 900):
            q = select(frames.c.media_id, frames.c.id, frames.c.time).where(frames.c.id.in_(chunk))
            for mid, fid, t in conn.execute(q):
                out.setdefault(int(mid), []).append((int(fid), float(t)))
    for stored in out.values():
        stored.sort(key=lambda x: x[1])
    return out
