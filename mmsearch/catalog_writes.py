"""The catalog's named writes, each run inside the caller's transaction (``with catalog.begin() as conn``)."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from sqlalchemy import (
    Connection,
    bindparam,
    select,
    text,
)

from mmsearch.catalog import _chunks, _media_in_use
from mmsearch.errors import MmsearchError
from mmsearch.schema import (
    ACTIVE_META,
    MODELS_META,
    PHOTO_META_VERSION,
    REF_COLUMNS,
    TARGET_META,
    VECTOR_KINDS,
    _get_meta,
    _set_meta,
    captions,
    deletions,
    display_path,
    embeddings,
    files,
    frames,
    media,
    meta,
    path_key,
    segments,
    storable,
    tags,
)


def inserted_id(result: Any) -> int:
    """The row id of a single-row INSERT."""
    key = result.inserted_primary_key
    if key is None:  # only for executemany/INSERT..SELECT, which we never use for this
        raise RuntimeError("INSERT returned no primary key")
    return int(key[0])


def add_embeddings(
    conn: Connection, kind: str, vectors: np.ndarray, refs: Sequence[int], model: str | None = None
) -> list[int]:
    """Insert vectors of one kind made by ``model`` (default: the active one); ``refs`` are media, caption
    or segment ids. Returns the new ids."""
    ref_col = REF_COLUMNS[kind]
    model = model or active_model(conn)
    rows = [
        {
            "kind": kind,
            "model": model,
            "vector": np.ascontiguousarray(vec, np.float32).tobytes(),
            ref_col: ref,
        }
        for vec, ref in zip(vectors, refs, strict=True)
    ]
    if not rows:
        return []
    # One statement for the batch, ids returned in the rows' order (SQLAlchemy's "insertmanyvalues"): built
    # once per call shape, where a statement built per row with literal values cost more than running it.
    result = conn.execute(_INSERT_EMBEDDINGS, rows)
    ids = [int(i) for i in result.scalars()]
    bump_generation(conn, kind, model)
    return ids


_INSERT_EMBEDDINGS = embeddings.insert().returning(embeddings.c.id, sort_by_parameter_order=True)


def active_model(conn: Connection) -> str:
    key = _get_meta(conn, ACTIVE_META)
    if key is None:
        raise MmsearchError("the catalog has no active model")
    return str(json.loads(key))


def bump_generation(conn: Connection, kind: str, model: str) -> None:
    key = f"generation.{model}.{kind}"
    row = conn.execute(select(meta.c.value).where(meta.c.key == key)).first()
    _set_meta(conn, key, json.dumps(int(json.loads(row[0])) + 1 if row else 1))


def delete_embeddings(conn: Connection, where: Any) -> dict[str, list[int]]:
    """Delete the embeddings matching ``where``; returns their ids by kind (to remove from FAISS)."""
    removed: dict[str, list[int]] = {}
    slots: set[tuple[str, str]] = set()
    for eid, kind, model in conn.execute(
        select(embeddings.c.id, embeddings.c.kind, embeddings.c.model).where(where)
    ):
        removed.setdefault(kind, []).append(int(eid))
        slots.add((model, kind))
    for ids in removed.values():
        for chunk in _chunks(ids, 900):
            conn.execute(embeddings.delete().where(embeddings.c.id.in_(chunk)))
    for model, kind in slots:
        bump_generation(conn, kind, model)
    return removed


# --- writes of an indexing run (each inside the caller's transaction) ----------------------------------


@dataclass(frozen=True)
class FileRecord:
    """A file as an indexing run records it: seen (``reason`` None) or skipped (why), with what it says of
    itself (``photo``: its date taken, camera, place and keywords; none if None)."""

    path: Path
    kind: str
    size: int
    mtime_ns: int
    sha256: str | None
    media_id: int | None
    reason: str | None = None
    photo: PhotoFacts | None = None


def write_files(conn: Connection, records: Sequence[FileRecord]) -> None:
    """Record files, each replacing any row of the same path (a path given twice keeps its last row), and
    their photos' keywords. One statement for all the rows and one for their old keywords: a run records
    thousands of files per transaction, and a statement per file was most of its driver's time."""
    if not records:
        return
    now = time.time()
    values = [_file_values(row, now) for row in records]
    conn.execute(_upsert_file(), values)
    conn.execute(_DELETE_FILE_TAGS, [{"key": v["path_key"]} for v in values])
    last = {v["path_key"]: row for v, row in zip(values, records, strict=True)}
    keywords = {key: row.photo.keywords for key, row in last.items() if row.photo and row.photo.keywords}
    if not keywords:
        return
    file_ids: dict[bytes, int] = {}
    for chunk in _chunks(list(keywords), 500):
        for key, fid in conn.execute(select(files.c.path_key, files.c.id).where(files.c.path_key.in_(chunk))):
            file_ids[key] = fid
    conn.execute(
        tags.insert(),
        [
            {"file_id": file_ids[key], "tag": storable(word), "source": src}
            for key, words in keywords.items()
            for src, word in words
        ],
    )


def write_file(
    conn: Connection,
    path: Path,
    *,
    kind: str,
    size: int,
    mtime_ns: int,
    sha256: str | None,
    media_id: int | None,
    reason: str | None = None,
    photo: PhotoFacts | None = None,
) -> None:
    """Record one file (see :func:`write_files`)."""
    write_files(conn, [FileRecord(path, kind, size, mtime_ns, sha256, media_id, reason, photo)])


def _file_values(row: FileRecord, now: float) -> dict[str, Any]:
    key = path_key(row.path)
    photo = row.photo
    return {
        "path_key": key,
        "path": display_path(key),
        "kind": row.kind,
        "size": row.size,
        "mtime_ns": row.mtime_ns,
        "sha256": row.sha256,
        "media_id": row.media_id,
        "status": "skipped" if row.reason else "ok",
        "reason": None if row.reason is None else storable(row.reason),  # may quote a non-UTF-8 name
        "updated_at": now,
        "taken_at": photo.taken_at if photo else None,
        "taken_source": photo.taken_source if photo else None,
        "camera": storable(photo.camera) if photo and photo.camera else None,
        "lat": photo.lat if photo else None,
        "lon": photo.lon if photo else None,
        "meta_version": PHOTO_META_VERSION if photo else None,
    }


@functools.cache
def _upsert_file() -> Any:
    """INSERT of a file row that replaces the row of the same path: built once (the SQLite dialect's
    statement is imported on first use), every run of it given its values as parameters."""
    from sqlalchemy.dialects.sqlite import insert

    stmt = insert(files)
    return stmt.on_conflict_do_update(
        index_elements=[files.c.path_key],
        set_={c.name: stmt.excluded[c.name] for c in files.columns if c.name != "id"},
    )


_FILE_ID = select(files.c.id).where(files.c.path_key == bindparam("key"))
_DELETE_FILE_TAGS = tags.delete().where(tags.c.file_id == _FILE_ID.scalar_subquery())


class PhotoFacts(Protocol):
    """What :func:`write_file` records of a photo (a :class:`mmsearch.photo_meta.PhotoMeta` is one)."""

    @property
    def taken_at(self) -> float | None: ...
    @property
    def taken_source(self) -> str | None: ...
    @property
    def camera(self) -> str | None: ...
    @property
    def lat(self) -> float | None: ...
    @property
    def lon(self) -> float | None: ...
    @property
    def keywords(self) -> Sequence[tuple[str, str]]: ...


# Built once: asked for every file hashed, and building the statement cost five times running it.
_MEDIA_OF_KIND = select(media.c.id).where(
    media.c.sha256 == bindparam("sha"), media.c.kind == bindparam("kind")
)


def media_of_kind(conn: Connection, sha256: str, kind: str) -> int | None:
    """The id of the content with this hash if the catalog holds it as ``kind``."""
    row = conn.execute(_MEDIA_OF_KIND, {"sha": sha256, "kind": kind}).first()
    return int(row[0]) if row else None


def add_image_media(conn: Connection, sha256: str) -> int:
    """Record an image's content; returns its media id."""
    return add_image_medias(conn, [sha256])[0]


def add_image_medias(conn: Connection, shas: Sequence[str]) -> list[int]:
    """Record the contents of a batch of images in one statement; returns their media ids, in order."""
    if not shas:
        return []
    result = conn.execute(_INSERT_MEDIA, [{"sha256": sha, "kind": "image"} for sha in shas])
    return [int(i) for i in result.scalars()]


_INSERT_MEDIA = media.insert().returning(media.c.id, sort_by_parameter_order=True)


def _add_media(conn: Connection, sha256: str, kind: str, **values: Any) -> int:
    return inserted_id(conn.execute(media.insert(), {"sha256": sha256, "kind": kind, **values}))


def add_transcript(
    conn: Connection,
    sha256: str,
    *,
    duration: float,
    language: str | None,
    text: str,
    spans: Sequence[tuple[int, float, float, str]],
    speech: str | None = None,
) -> tuple[int, list[int]]:
    """Record a recording's content and its transcript segments ``(idx, start, end, text)`` made by the
    speech settings ``speech`` (a speech_key); returns the media id and the segment ids, in the order of
    ``spans``."""
    mid = _add_media(
        conn, sha256, "audio", duration=duration, language=language, transcript=text, speech=speech
    )
    return mid, _add_segments(conn, mid, spans)


def add_video(
    conn: Connection,
    sha256: str,
    *,
    duration: float,
    width: int | None,
    height: int | None,
    keyframes: Sequence[tuple[int, float, str]],
    language: str | None = None,
    text: str | None = None,
    spans: Sequence[tuple[int, float, float, str]] = (),
    speech: str | None = None,
) -> tuple[int, list[int], list[int]]:
    """Record a video's content, its keyframes ``(idx, time, reason)`` and its spoken track's transcript
    segments ``(idx, start, end, text)``; returns the media id, the frame ids and the segment ids, in order."""
    mid = _add_media(
        conn,
        sha256,
        "video",
        duration=duration,
        width=width,
        height=height,
        language=language,
        transcript=text,
        speech=speech,
    )
    frame_ids = [
        inserted_id(conn.execute(frames.insert().values(media_id=mid, idx=idx, time=t, reason=reason)))
        for idx, t, reason in keyframes
    ]
    return mid, frame_ids, _add_segments(conn, mid, spans)


def _add_segments(conn: Connection, mid: int, spans: Sequence[tuple[int, float, float, str]]) -> list[int]:
    seg_ids = []
    for idx, start, end, seg_text in spans:
        r = conn.execute(segments.insert().values(media_id=mid, idx=idx, start=start, end=end, text=seg_text))
        seg_ids.append(inserted_id(r))
    return seg_ids


def replace_transcript(
    conn: Connection,
    media_id: int,
    *,
    duration: float,
    language: str | None,
    text: str,
    spans: Sequence[tuple[int, float, float, str]],
    speech: str,
) -> tuple[dict[str, list[int]], list[int]]:
    """Replace a recording's transcript and segments (their vectors of every model deleted); returns the
    embedding ids deleted, by kind, and the new segment ids."""
    old = select(segments.c.id).where(segments.c.media_id == media_id)
    removed = delete_embeddings(conn, embeddings.c.segment_id.in_(old))
    conn.execute(segments.delete().where(segments.c.media_id == media_id))
    conn.execute(
        media.update()
        .where(media.c.id == media_id)
        .values(duration=duration, language=language, transcript=text, speech=speech)
    )
    return removed, _add_segments(conn, media_id, spans)


def mark_transcribed(conn: Connection, media_id: int, speech: str) -> None:
    """Record that ``speech`` settings were tried on a recording (its transcript kept as it was)."""
    conn.execute(media.update().where(media.c.id == media_id).values(speech=speech))


def add_captions(conn: Connection, rows: Sequence[tuple[int, str, str]]) -> list[int]:
    """Record captions ``(file id, source, text)``; returns their ids, in order."""
    return [
        inserted_id(conn.execute(captions.insert().values(file_id=fid, source=source, text=txt)))
        for fid, source, txt in rows
    ]


def remove_captions(conn: Connection, caption_ids: Sequence[int]) -> dict[str, list[int]]:
    """Delete captions and their embeddings; returns the embedding ids deleted, by kind."""
    removed = delete_embeddings(conn, embeddings.c.caption_id.in_(caption_ids))
    conn.execute(captions.delete().where(captions.c.id.in_(caption_ids)))
    return removed


def remove_files(conn: Connection, file_ids: Sequence[int]) -> dict[str, list[int]]:
    """Forget files with their captions (their content stays: see :func:`remove_orphan_media`); returns
    the embedding ids deleted, by kind."""
    cap_ids = select(captions.c.id).where(captions.c.file_id.in_(file_ids))
    removed = delete_embeddings(conn, embeddings.c.caption_id.in_(cap_ids))
    conn.execute(captions.delete().where(captions.c.file_id.in_(file_ids)))
    conn.execute(tags.delete().where(tags.c.file_id.in_(file_ids)))
    conn.execute(files.delete().where(files.c.id.in_(file_ids)))
    return removed


def remove_orphan_media(conn: Connection) -> tuple[dict[str, list[int]], set[str]]:
    """Delete the content no file refers to any more, with its segments and embeddings; returns the
    embedding ids deleted (by kind) and the content hashes that went."""
    orphans, shas = [], set()
    q = select(media.c.id, media.c.sha256).where(media.c.id.not_in(_media_in_use()))
    for mid, sha in conn.execute(q):
        orphans.append(int(mid))
        shas.add(sha)
    removed: dict[str, list[int]] = {}
    if orphans:
        seg_ids = select(segments.c.id).where(segments.c.media_id.in_(orphans))
        frame_ids = select(frames.c.id).where(frames.c.media_id.in_(orphans))
        for more in (
            delete_embeddings(conn, embeddings.c.media_id.in_(orphans)),
            delete_embeddings(conn, embeddings.c.segment_id.in_(seg_ids)),
            delete_embeddings(conn, embeddings.c.frame_id.in_(frame_ids)),
        ):
            for kind, ids in more.items():
                removed.setdefault(kind, []).extend(ids)
        conn.execute(segments.delete().where(segments.c.media_id.in_(orphans)))
        conn.execute(frames.delete().where(frames.c.media_id.in_(orphans)))
        conn.execute(tags.delete().where(tags.c.media_id.in_(orphans)))
        conn.execute(media.delete().where(media.c.id.in_(orphans)))
    return removed, shas


# --- models: several in one index while it changes model (see mmsearch.reembed) ------------------------


def set_target(conn: Connection, key: str | None) -> None:
    """Name the model being embedded for every item (None: no model is)."""
    if key is None:
        conn.execute(meta.delete().where(meta.c.key == TARGET_META))
    else:
        _set_meta(conn, TARGET_META, json.dumps(key))


def set_active(conn: Connection, key: str) -> None:
    """Make ``key`` the model searched: readers switch to it after this transaction commits."""
    _set_meta(conn, ACTIVE_META, json.dumps(key))


def forget_model(conn: Connection, key: str) -> dict[str, list[int]]:
    """Delete a model's vectors and its registration; returns the embedding ids deleted, by kind."""
    removed = delete_embeddings(conn, embeddings.c.model == key)
    # Its deletion-log rows go too (no file of it will be saved to prune them); a reader still following
    # it is sent back to a saved file or a rebuild (generations stay: they only ever grow).
    seq = conn.execute(text("SELECT seq FROM sqlite_sequence WHERE name = 'deletions'")).scalar()
    conn.execute(deletions.delete().where(deletions.c.model == key))
    for kind in VECTOR_KINDS:
        _set_meta(conn, f"deletions_pruned.{key}.{kind}", json.dumps(int(seq or 0)))
    models = json.loads(_get_meta(conn, MODELS_META) or "{}")
    models.pop(key, None)
    _set_meta(conn, MODELS_META, json.dumps(models))
    conn.execute(meta.delete().where(meta.c.key.like(f"faiss.{key}.%")))
    return removed


def caption_ids_of(conn: Connection, file_ids: Sequence[int]) -> list[int]:
    """The ids of the captions of these files."""
    return [
        int(i) for i in conn.execute(select(captions.c.id).where(captions.c.file_id.in_(file_ids))).scalars()
    ]


def target_in(conn: Connection) -> str | None:
    """The target model's key as this transaction sees it."""
    value = _get_meta(conn, TARGET_META)
    return None if value is None else str(json.loads(value))
