"""Search filters: parsing and validation (mmsearch.filters), the embeddings they let through
(mmsearch.catalog_filters.allowed_ids) and the file a hit shows (resolve_items). Catalogs are real SQLite
catalogs written through mmsearch.catalog_writes, as ingest writes them."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from mmsearch import db
from mmsearch.catalog_filters import allowed_ids, catalog_version
from mmsearch.errors import BadQueryError
from mmsearch.filters import MAX_PATTERN_LENGTH, MAX_PATTERNS, Filters

MODEL = "test-model-0123456789"
OTHER_MODEL = "other-model-9876543210"
ALL = db.VECTOR_KINDS
DAY = 86_400
T0 = 1_700_000_000  # unix seconds: the mtime of the files below, plus days


# --- a catalog written as ingest writes it ------------------------------------------------------------
@dataclass
class Item:
    """The rows written for one image or recording: media, files (by path), captions and embeddings."""

    media: int
    files: dict[str, int] = field(default_factory=dict)
    captions: dict[str, int] = field(default_factory=dict)  # caption text -> caption id
    segments: list[int] = field(default_factory=list)
    image: int | None = None  # image embedding id
    caption_vectors: dict[str, int] = field(default_factory=dict)  # caption text -> embedding id
    segment_vectors: list[int] = field(default_factory=list)


def new_catalog(path: Path) -> db.Catalog:
    catalog = db.Catalog(path)
    with catalog.begin() as conn:
        for key in (MODEL, OTHER_MODEL):
            db.register_model(conn, key, {"name": key})
        db.set_active(conn, MODEL)
    return catalog


def _vectors(n: int) -> np.ndarray:
    return np.full((n, 4), 0.5, np.float32)


def _sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _file_ids(conn: object, paths: Sequence[str]) -> dict[str, int]:
    from sqlalchemy import select

    q = select(db.files.c.path, db.files.c.id).where(db.files.c.path.in_(list(paths)))
    return {p: int(i) for p, i in conn.execute(q)}  # type: ignore[attr-defined]


def add_image(
    catalog: db.Catalog,
    paths: Sequence[str],
    captions: Sequence[str] = (),
    *,
    days: Sequence[float] | None = None,
    model: str = MODEL,
) -> Item:
    """One image content held by ``paths`` (file i modified at T0 + days[i]); each caption belongs to the
    first file; the image and every caption get a vector of ``model``."""
    with catalog.begin() as conn:
        mid = db.add_image_media(conn, _sha(paths[0]))
        for i, p in enumerate(paths):
            mtime = int((T0 + (days[i] if days else i) * DAY) * 1e9)
            db.write_file(
                conn, Path(p), kind="image", size=1, mtime_ns=mtime, sha256=_sha(paths[0]), media_id=mid
            )
        item = Item(mid, _file_ids(conn, paths))
        (item.image,) = db.add_embeddings(conn, "image", _vectors(1), [mid], model)
        cids = db.add_captions(conn, [(item.files[paths[0]], "txt", c) for c in captions])
        item.captions = dict(zip(captions, cids))
        eids = db.add_embeddings(conn, "caption", _vectors(len(cids)), cids, model)
        item.caption_vectors = dict(zip(captions, eids))
    return item


def add_recording(
    catalog: db.Catalog,
    paths: Sequence[str],
    said: Sequence[str],
    *,
    duration: float = 60.0,
    days: Sequence[float] | None = None,
    model: str = MODEL,
) -> Item:
    """One recording held by ``paths``, its transcript segments ``said`` (each with a vector)."""
    with catalog.begin() as conn:
        spans = [(i, 5.0 * i, 5.0 * i + 5, s) for i, s in enumerate(said)]
        mid, sids = db.add_transcript(
            conn, _sha(paths[0]), duration=duration, language="en", text=" ".join(said), spans=spans
        )
        for i, p in enumerate(paths):
            mtime = int((T0 + (days[i] if days else i) * DAY) * 1e9)
            db.write_file(
                conn, Path(p), kind="audio", size=1, mtime_ns=mtime, sha256=_sha(paths[0]), media_id=mid
            )
        item = Item(mid, _file_ids(conn, paths), segments=sids)
        item.segment_vectors = db.add_embeddings(conn, "segment", _vectors(len(sids)), sids, model)
    return item


def mark_skipped(catalog: db.Catalog, path: str) -> None:
    """The file is still in the catalog but not live (as when it became unreadable)."""
    with catalog.begin() as conn:
        db.write_file(
            conn,
            Path(path),
            kind="image",
            size=1,
            mtime_ns=0,
            sha256=None,
            media_id=None,
            reason="unreadable",
        )


@pytest.fixture
def catalog(tmp_path: Path) -> db.Catalog:
    cat = new_catalog(tmp_path / "catalog.sqlite")
    yield cat
    cat.close()


def allowed(catalog: db.Catalog, kinds: Sequence[str] = ALL, model: str = MODEL, **given: object) -> set[int]:
    ids = allowed_ids(catalog, Filters.parse(**given), kinds, model)  # type: ignore[arg-type]
    assert ids.dtype == np.int64 and list(ids) == sorted(ids)
    return set(ids.tolist())


# --- parsing -------------------------------------------------------------------------------------------
def test_parse_normalises_and_is_canonical() -> None:
    f = Filters.parse(path=["/b/*", "/a/*", "/a/*"], ext=["JPG", ".png", "jpg,.Webp"], kind="Image, audio")
    assert f.paths == ("/a/*", "/b/*")
    assert f.exts == (".jpg", ".png", ".webp")
    assert f.kinds == ("audio", "image")
    # Equal filters given in another order are equal and hash equal (a cache key).
    g = Filters.parse(path=["/a/*", "/b/*"], ext=[".webp", ".PNG", "jpg"], kind=["audio", "image"])
    assert f == g and hash(f) == hash(g)
    assert Filters.parse().is_empty() and Filters().is_empty() and not f.is_empty()
    assert Filters.parse(after="", min_duration=None, path=()).is_empty()


def test_parse_reads_iso_dates_and_unix_seconds() -> None:
    utc = Filters.parse(after="2024-05-01T00:00:00Z", before="2024-05-02T00:00+02:00")
    assert utc.after == datetime(2024, 5, 1, tzinfo=timezone.utc).timestamp()
    assert utc.before == datetime(2024, 5, 1, 22, tzinfo=timezone.utc).timestamp()
    local = Filters.parse(after="2024-05-01")  # no offset: local time
    assert local.after == datetime(2024, 5, 1).timestamp()
    assert Filters.parse(after="1714521600").after == 1714521600.0
    assert Filters.parse(after=1714521600.5, before=["1714521601"]).before == 1714521601.0
    assert Filters.parse(min_duration="2.5", max_duration=10).min_duration == 2.5


def test_as_params_round_trips() -> None:
    f = Filters.parse(
        path=["/x/*.png", "*/[ab]?/*"],
        ext="jpg",
        kind="audio",
        after="2024-05-01T10:00:00.25Z",
        before=1800000000,
        min_duration=0,
        max_duration=3.5,
    )
    params = f.as_params()
    assert all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in params.values())
    assert Filters.parse(**params) == f  # type: ignore[arg-type]
    assert Filters().as_params() == {}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"path": [""]}, "empty pattern"),
        ({"path": ["/a/[bc"]}, "unclosed"),
        ({"path": ["/a/\x00"]}, "NUL"),
        ({"path": ["x" * (MAX_PATTERN_LENGTH + 1)]}, "longer than"),
        ({"path": [f"/{i}/*" for i in range(MAX_PATTERNS + 1)]}, "too many path"),
        ({"path": [3]}, "expected text"),
        ({"ext": ["."]}, "not a file extension"),
        ({"ext": ["*.jpg"]}, "not a file extension"),
        ({"ext": ["a/b"]}, "not a file extension"),
        ({"kind": ["document"]}, "not one of image, audio, video"),
        ({"after": "yesterday"}, "neither an ISO 8601 date"),
        ({"after": "2024-13-01"}, "neither an ISO 8601 date"),
        ({"before": float("nan")}, "finite"),
        ({"after": "inf"}, "neither an ISO 8601 date"),
        ({"min_duration": "inf"}, "finite"),
        ({"after": ["1", "2"]}, "given 2 times"),
        ({"after": "2024-05-02", "before": "2024-05-01"}, "must be earlier"),
        ({"after": 5, "before": 5}, "must be earlier"),
        ({"min_duration": -1}, "cannot be negative"),
        ({"max_duration": "ten"}, "not a number"),
        ({"min_duration": 10, "max_duration": 5}, "larger than"),
        ({"min_duration": True}, "expected a number"),
    ],
)
def test_invalid_input_is_a_bad_query(given: dict[str, object], message: str) -> None:
    with pytest.raises(BadQueryError, match=message):
        Filters.parse(**given)  # type: ignore[arg-type]


def test_brackets_that_close_are_valid_globs() -> None:
    for pattern in ("/a/[]]x", "/a/[^]]*", "/a/[abc]/*", "/a/*]"):
        assert Filters.parse(path=pattern).paths == (pattern,)


# --- allowed ids ---------------------------------------------------------------------------------------
def test_each_field_selects_the_items_of_the_files_that_pass(catalog: db.Catalog) -> None:
    photo = add_image(catalog, ["/lib/photos/2024/Beach.JPG"], ["sand and sea"], days=[10])
    shot = add_image(catalog, ["/lib/shots/screen.png"], ["a terminal"], days=[20])
    talk = add_recording(catalog, ["/lib/talks/keynote.mp3"], ["hello", "world"], duration=1800, days=[30])
    memo = add_recording(catalog, ["/lib/memos/memo.wav"], ["note"], duration=20, days=[40])
    p_ids = {photo.image, *photo.caption_vectors.values()}
    s_ids = {shot.image, *shot.caption_vectors.values()}
    t_ids, m_ids = set(talk.segment_vectors), set(memo.segment_vectors)

    assert allowed(catalog) == p_ids | s_ids | t_ids | m_ids
    # Globs match the full path, '*' crosses '/', case matters.
    assert allowed(catalog, path="/lib/photos/*") == p_ids
    assert allowed(catalog, path="*/2024/*") == p_ids
    assert allowed(catalog, path="*beach*") == set()
    assert allowed(catalog, path=["*.mp3", "/lib/shots/*"]) == t_ids | s_ids
    assert allowed(catalog, path="/lib/[st]*/*") == s_ids | t_ids
    # Extensions ignore the path's case.
    assert allowed(catalog, ext="jpg") == p_ids
    assert allowed(catalog, ext=["png", "wav"]) == s_ids | m_ids
    assert allowed(catalog, ext="jpeg") == set()
    assert allowed(catalog, kind="audio") == t_ids | m_ids
    # after <= mtime < before
    assert allowed(catalog, after=T0 + 20 * DAY) == s_ids | t_ids | m_ids
    assert allowed(catalog, before=T0 + 20 * DAY) == p_ids
    assert allowed(catalog, after=T0 + 15 * DAY, before=T0 + 30 * DAY) == s_ids
    day = datetime.fromtimestamp(T0 + 30 * DAY, timezone.utc).isoformat()
    assert allowed(catalog, after=day) == t_ids | m_ids
    # Durations: images have none and never pass a duration filter.
    assert allowed(catalog, min_duration=60) == t_ids
    assert allowed(catalog, max_duration=60) == m_ids
    assert allowed(catalog, min_duration=20, max_duration=20) == m_ids
    assert allowed(catalog, min_duration=0) == t_ids | m_ids
    # Fields combine with AND.
    assert allowed(catalog, kind="audio", ext="mp3", min_duration=10) == t_ids
    assert allowed(catalog, kind="image", ext="wav") == set()
    # Only the kinds asked for.
    assert allowed(catalog, kinds=("caption",), path="/lib/photos/*") == set(photo.caption_vectors.values())
    assert allowed(catalog, kinds=("image", "segment"), path="/lib/photos/*") == {photo.image}
    assert allowed(catalog, kinds=()) == set()


def test_content_shared_by_several_files_passes_through_any_of_them(catalog: db.Catalog) -> None:
    # One image content under two names; its caption belongs to the first file only.
    both = add_image(catalog, ["/a/one.png", "/b/two.jpg"], ["a shared picture"], days=[0, 50])
    rec = add_recording(catalog, ["/a/rec.wav", "/b/rec.mp3"], ["spoken"], days=[0, 50])
    caption = both.caption_vectors["a shared picture"]
    assert allowed(catalog, path="/b/*") == {both.image, *rec.segment_vectors}
    assert allowed(catalog, ext="jpg") == {both.image}
    assert allowed(catalog, path="/a/*") == {both.image, caption, *rec.segment_vectors}
    assert allowed(catalog, after=T0 + 10 * DAY) == {both.image, *rec.segment_vectors}
    # The hit shows the lowest-id file that passes.
    rows = db.resolve_items(catalog, [both.image, caption, rec.segment_vectors[0]])
    assert rows[both.image].file_id == both.files["/a/one.png"]
    assert rows[rec.segment_vectors[0]].file_id == rec.files["/a/rec.wav"]
    only_b = Filters.parse(path="/b/*")
    rows = db.resolve_items(catalog, [both.image, caption, rec.segment_vectors[0]], filters=only_b)
    assert rows[both.image].file_id == both.files["/b/two.jpg"]
    assert rows[both.image].path_key == b"/b/two.jpg"
    assert rows[rec.segment_vectors[0]].file_id == rec.files["/b/rec.mp3"]
    assert rows[caption].file_id == both.files["/a/one.png"]  # a caption shows its own file
    # An item with no passing file is left out.
    assert set(db.resolve_items(catalog, [both.image], filters=Filters.parse(path="/c/*"))) == set()


def test_files_that_are_not_live_pass_nothing(catalog: db.Catalog) -> None:
    both = add_image(catalog, ["/a/one.png", "/b/two.png"], ["first file's caption"])
    alone = add_image(catalog, ["/c/three.png"], ["third"])
    mark_skipped(catalog, "/a/one.png")
    mark_skipped(catalog, "/c/three.png")
    # The content of /a/one.png lives on in /b/two.png; the caption of a dead file is gone from results.
    assert allowed(catalog) == {both.image}
    assert allowed(catalog, path="/a/*") == set()
    rows = db.resolve_items(catalog, [both.image], filters=Filters())
    assert rows[both.image].file_id == both.files["/b/two.png"]
    assert alone.image not in allowed(catalog, kinds=("image",))


def test_only_the_model_asked_for(catalog: db.Catalog) -> None:
    mine = add_image(catalog, ["/a/x.png"], ["one"])
    theirs = add_image(catalog, ["/a/y.png"], ["two"], model=OTHER_MODEL)
    assert allowed(catalog, path="/a/*") == {mine.image, mine.caption_vectors["one"]}
    assert allowed(catalog, model=OTHER_MODEL, path="/a/*") == {theirs.image, theirs.caption_vectors["two"]}


def test_filter_values_are_data_never_sql(catalog: db.Catalog) -> None:
    quote = add_image(catalog, ['/a/it\'s "quoted"; DROP TABLE files; --.png'], ["q"])
    add_image(catalog, ["/a/plain.png"], ["p"])
    assert allowed(catalog, path='*\'s "quoted"; DROP TABLE files; --*') == {
        quote.image,
        quote.caption_vectors["q"],
    }
    assert allowed(catalog, ext="png' OR 1=1 --") == set()
    assert len(allowed(catalog)) == 4  # the files table is still there


def test_dates_far_from_now_and_fractions_are_exact(catalog: db.Catalog) -> None:
    with catalog.begin() as conn:
        mid = db.add_image_media(conn, _sha("frac"))
        db.write_file(
            conn,
            Path("/f.png"),
            kind="image",
            size=1,
            mtime_ns=1_500_000_000_250_000_000,
            sha256=None,
            media_id=mid,
        )
        (eid,) = db.add_embeddings(conn, "image", _vectors(1), [mid], MODEL)
    assert allowed(catalog, after="1500000000.25") == {eid}
    assert allowed(catalog, after="1500000000.250001") == set()
    assert allowed(catalog, before="1500000000.25") == set()
    assert allowed(catalog, after=0, before=math.ldexp(1, 40)) == {eid}


def test_catalog_version_changes_with_files_and_embeddings(catalog: db.Catalog) -> None:
    item = add_image(catalog, ["/a/x.png"])
    first = catalog_version(catalog)
    assert first == catalog_version(catalog)
    with catalog.begin() as conn:  # a file moved: no embedding changes, a path filter's selection does
        db.write_file(
            conn, Path("/b/x.png"), kind="image", size=1, mtime_ns=1, sha256=None, media_id=item.media
        )
        db.remove_files(conn, [item.files["/a/x.png"]])
    second = catalog_version(catalog)
    assert second != first
    add_image(catalog, ["/c/y.png"])
    assert catalog_version(catalog) != second
