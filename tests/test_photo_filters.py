"""Filters on what photos say of themselves (date taken, place) and on tags (keywords people wrote, zero-shot
tags), on real SQLite catalogs written through mmsearch.catalog_writes as ingest writes them; and the photo
facts a hit carries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from mmsearch import db
from mmsearch.catalog_filters import catalog_version
from mmsearch.catalog_items import resolve_items
from mmsearch.errors import BadQueryError
from mmsearch.filters import Filters, distance_km
from tests.test_filters import DAY, T0, add_image, allowed, new_catalog


@dataclass(frozen=True)
class Photo:
    """What write_file records of a photo (the PhotoFacts protocol)."""

    taken_at: float | None = None
    taken_source: str | None = None
    camera: str | None = None
    lat: float | None = None
    lon: float | None = None
    keywords: tuple[tuple[str, str], ...] = ()


PARIS = (48.8584, 2.2945)  # the Eiffel Tower
VERSAILLES = (48.8049, 2.1204)  # 14.1 km from it
LONDON = (51.5007, -0.1246)


@pytest.fixture
def catalog(tmp_path: Path) -> db.Catalog:
    cat = new_catalog(tmp_path / "catalog.sqlite")
    yield cat
    cat.close()


def photo(catalog: db.Catalog, path: str, facts: Photo, days: float = 0) -> int:
    """An image file (modified at T0 + days) with these facts; returns its image embedding id."""
    item = add_image(catalog, [path], days=[days])
    with catalog.begin() as conn:
        db.write_file(
            conn,
            Path(path),
            kind="image",
            size=1,
            mtime_ns=int((T0 + days * DAY) * 1e9),
            sha256=None,
            media_id=item.media,
            photo=facts,
        )
    assert item.image is not None
    return item.image


def test_distance_is_the_great_circle_one() -> None:
    assert distance_km(*PARIS, *VERSAILLES) == pytest.approx(14.06, abs=0.05)
    assert distance_km(*PARIS, *LONDON) == pytest.approx(340.5, abs=0.5)
    assert distance_km(0, 179.9, 0, -179.9) == pytest.approx(22.2, abs=0.1)  # across the antimeridian


def test_date_taken_passes_and_file_time_stands_in_when_there_is_none(catalog: db.Catalog) -> None:
    # Taken ten days before T0, modified at T0 (a copy made later): the date taken is what counts.
    old = photo(catalog, "/p/old.jpg", Photo(taken_at=T0 - 10 * DAY, taken_source="exif"))
    # No date taken: its file time (T0 + 5 days) stands in.
    undated = photo(catalog, "/p/scan.png", Photo(), days=5)
    assert allowed(catalog, kinds=("image",), taken_before=T0 - DAY) == {old}
    assert allowed(catalog, kinds=("image",), taken_after=T0 + 4 * DAY) == {undated}
    assert allowed(catalog, kinds=("image",), taken_after=T0 - 11 * DAY, taken_before=T0 + 6 * DAY) == {
        old,
        undated,
    }
    # The file-time filter still reads file times.
    assert allowed(catalog, kinds=("image",), before=T0 + DAY) == {old}


def test_near_keeps_photos_within_the_radius_and_never_those_without_a_place(catalog: db.Catalog) -> None:
    paris = photo(catalog, "/p/tower.jpg", Photo(lat=PARIS[0], lon=PARIS[1]))
    versailles = photo(catalog, "/p/palace.jpg", Photo(lat=VERSAILLES[0], lon=VERSAILLES[1]))
    photo(catalog, "/p/london.jpg", Photo(lat=LONDON[0], lon=LONDON[1]))
    photo(catalog, "/p/nowhere.jpg", Photo())
    near = f"{PARIS[0]},{PARIS[1]}"
    assert allowed(catalog, kinds=("image",), near=f"{near},5") == {paris}
    assert allowed(catalog, kinds=("image",), near=f"{near},15") == {paris, versailles}
    assert len(allowed(catalog, kinds=("image",), near=f"{near},400")) == 3
    # Near a corner of the 5 km search's bounding box, 6.2 km from its centre: outside the circle.
    corner = f"{PARIS[0] - 0.04},{PARIS[1] - 0.06}"
    assert allowed(catalog, kinds=("image",), near=f"{corner},5") == set()
    assert allowed(catalog, kinds=("image",), near=f"{corner},6.5") == {paris}


def test_near_across_the_antimeridian_and_at_a_pole(catalog: db.Catalog) -> None:
    fiji = photo(catalog, "/p/east.jpg", Photo(lat=-17.0, lon=179.95))
    photo(catalog, "/p/far.jpg", Photo(lat=-17.0, lon=170.0))
    assert allowed(catalog, kinds=("image",), near="-17.0,-179.95,20") == {fiji}
    pole = photo(catalog, "/p/pole.jpg", Photo(lat=89.99, lon=45.0))
    assert allowed(catalog, kinds=("image",), near="90,0,5") == {pole}


def test_tags_match_keywords_and_zero_shot_tags_case_insensitively(catalog: db.Catalog) -> None:
    beach = photo(catalog, "/p/beach.jpg", Photo(keywords=(("iptc", "Beach"), ("xmp", "Holiday 2024"))))
    item = add_image(catalog, ["/p/cat.jpg"])
    with catalog.begin() as conn:
        conn.execute(db.tags.insert().values(media_id=item.media, tag="cat", source="zero-shot", score=0.9))
    assert allowed(catalog, kinds=("image",), tag="beach") == {beach}
    assert allowed(catalog, kinds=("image",), tag="HOLIDAY 2024") == {beach}
    assert allowed(catalog, kinds=("image",), tag="Cat") == {item.image}
    assert allowed(catalog, kinds=("image",), tag=["cat", "beach"]) == {beach, item.image}
    assert allowed(catalog, kinds=("image",), tag="dog") == set()


def test_a_file_written_again_gets_the_keywords_it_has_now(catalog: db.Catalog) -> None:
    item = add_image(catalog, ["/p/a.jpg"])
    for keywords in ((("iptc", "old"),), (("xmp", "new"),)):
        with catalog.begin() as conn:
            db.write_file(
                conn,
                Path("/p/a.jpg"),
                kind="image",
                size=2,
                mtime_ns=1,
                sha256=None,
                media_id=item.media,
                photo=Photo(keywords=keywords),
            )
    assert allowed(catalog, kinds=("image",), tag="old") == set()
    assert allowed(catalog, kinds=("image",), tag="new") == {item.image}


def test_removing_files_and_content_removes_their_tags(catalog: db.Catalog) -> None:
    photo(catalog, "/p/a.jpg", Photo(keywords=(("iptc", "kept"),)))
    item = add_image(catalog, ["/p/b.jpg"])
    with catalog.begin() as conn:
        conn.execute(db.tags.insert().values(media_id=item.media, tag="cat", source="zero-shot", score=0.9))
        db.remove_files(
            conn, [int(i) for i in conn.execute(db.files.select().with_only_columns(db.files.c.id)).scalars()]
        )
        db.remove_orphan_media(conn)
    with catalog.read() as conn:
        assert conn.execute(db.tags.select()).all() == []


def test_a_tag_change_changes_the_catalog_version(catalog: db.Catalog) -> None:
    """Allowed ids are cached by catalog version: a zero-shot tag, which touches neither files nor
    embeddings, must still change it."""
    item = add_image(catalog, ["/p/b.jpg"])
    before = catalog_version(catalog)
    with catalog.begin() as conn:
        conn.execute(db.tags.insert().values(media_id=item.media, tag="cat", source="zero-shot", score=0.9))
    assert catalog_version(catalog) != before


def test_hits_carry_the_photo_facts(catalog: db.Catalog) -> None:
    image = photo(
        catalog,
        "/p/tower.jpg",
        Photo(taken_at=T0, taken_source="exif", camera="Apple iPhone 15", lat=PARIS[0], lon=PARIS[1]),
    )
    row = resolve_items(catalog, [image])[image]
    assert (row.taken_at, row.camera, row.lat, row.lon) == (T0, "Apple iPhone 15", *PARIS)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"near": "48.8,2.3"}, "LAT,LON,KM"),
        ({"near": "91,0,1"}, "latitude"),
        ({"near": "0,181,1"}, "longitude"),
        ({"near": "0,0,0"}, "radius"),
        ({"near": "0,0,-3"}, "radius"),
        ({"near": "a,b,c"}, "not a number"),
        ({"near": "nan,0,1"}, "finite"),
        ({"tag": "x" * 201}, "longer"),
        ({"taken_after": "2024-06-01", "taken_before": "2024-01-01"}, "earlier"),
        ({"taken_after": "yesterday"}, "ISO 8601"),
    ],
)
def test_bad_photo_filters_are_bad_queries(given: dict[str, str], message: str) -> None:
    with pytest.raises(BadQueryError, match=message):
        Filters.parse(**given)  # type: ignore[arg-type]


def test_photo_filters_round_trip_as_query_parameters() -> None:
    f = Filters.parse(tag="Beach, cat", taken_after="2024-01-01", near="48.8584, 2.2945, 5")
    assert f.tags == ("beach", "cat") and f.near == (48.8584, 2.2945, 5.0)
    assert Filters.parse(**f.as_params()) == f


def test_files_written_together_keep_each_paths_last_row_and_keywords(catalog: db.Catalog) -> None:
    """write_files records a batch in one statement per table, as one write_file per row in order would:
    a path given twice keeps its last row and that row's keywords (none if it has none)."""

    def record(path: str, keywords: tuple[tuple[str, str], ...], size: int) -> db.FileRecord:
        return db.FileRecord(Path(path), "image", size, 1, None, None, photo=Photo(keywords=keywords))

    with catalog.begin() as conn:
        db.write_files(
            conn,
            [
                record("/p/a.jpg", (("iptc", "alps"),), 1),
                record("/p/b.jpg", (("xmp", "beach"), ("xmp", "dog")), 1),
                record("/p/a.jpg", (("iptc", "lake"),), 2),  # a again: its second row counts
                record("/p/b.jpg", (), 2),  # b again, now without keywords
                db.FileRecord(Path("/p/c.jpg"), "image", 0, 1, None, None, reason="empty file"),
            ],
        )
    rows = catalog.files_by_key()
    assert {k: (r.size, r.status) for k, r in rows.items()} == {
        b"/p/a.jpg": (2, "ok"),
        b"/p/b.jpg": (2, "ok"),
        b"/p/c.jpg": (0, "skipped"),
    }
    with catalog.begin() as conn:
        stored = conn.execute(select(db.files.c.path, db.tags.c.tag).join(db.tags)).all()
    assert sorted(map(tuple, stored)) == [("/p/a.jpg", "lake")]
