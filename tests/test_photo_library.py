"""A photo library as people keep it, indexed end to end: captions written inside the files (EXIF, IPTC,
XMP) and beside them (XMP sidecars, Google Takeout JSON), dates taken, cameras, places and keywords, kept in
step as files and sidecars change, searchable and filterable; hostile metadata skipped with its reason.

Real files built by the tests (Pillow, hand-made IPTC blocks), real SQLite, FAISS and OpenCLIP code: the
tiny random model for plumbing, the bundled demo model where meaning is asserted."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select, update

import mmsearch
from mmsearch import db
from mmsearch.demo import world
from tests.conftest import TINY_MODEL, solid
from tests.test_ingest import assert_consistent
from tests.test_photo_meta import BOMB, LIGHTROOM_XMP, _exif, _iptc, _jpeg, _sydney_gps

SYDNEY = (-33.8598, 151.2083)


def rows(idx: mmsearch.Index) -> dict[str, dict[str, object]]:
    """File name -> its row's photo facts, captions (source origin, text) and keywords."""
    out: dict[str, dict[str, object]] = {}
    with idx.store.catalog.read() as conn:
        f = db.files
        for fid, path, taken, source, camera, lat, lon in conn.execute(
            select(f.c.id, f.c.path, f.c.taken_at, f.c.taken_source, f.c.camera, f.c.lat, f.c.lon)
        ):
            caps = conn.execute(
                select(db.captions.c.source, db.captions.c.text).where(db.captions.c.file_id == fid)
            ).all()
            words = conn.execute(select(db.tags.c.tag).where(db.tags.c.file_id == fid)).scalars().all()
            out[Path(path).name] = {
                "taken": taken,
                "source": source,
                "camera": camera,
                "place": None if lat is None else (round(lat, 4), round(lon, 4)),
                "captions": sorted((Path(s).name if "/" in s else s, t) for s, t in caps),
                "keywords": sorted(words),
            }
    return out


@pytest.fixture
def library(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    _jpeg(
        folder / "kite.jpg",
        exif=_exif(
            description="A red kite over the hills",
            make="Canon",
            model="Canon EOS R5",
            taken="2023:05:01 12:34:56",
            offset="+02:00",
            gps=_sydney_gps(),
        ),
        iptc=_iptc((1, 90, b"\x1b%G"), (2, 120, b"Two blue squares"), (2, 25, b"holiday")),
    )
    solid(folder / "raw_edit.jpg", "blue")
    (folder / "raw_edit.xmp").write_bytes(LIGHTROOM_XMP)
    solid(folder / "beach.jpg", "yellow")
    takeout = {
        "title": "beach.jpg",
        "description": "Grandpa at the beach",
        "photoTakenTime": {"timestamp": "1600000000"},
        "geoData": {"latitude": 48.8584, "longitude": 2.2945},
        "people": [{"name": "Grandpa"}],
    }
    (folder / "beach.jpg.json").write_text(json.dumps(takeout))
    solid(folder / "plain.png", "green")
    return folder


def test_captions_dates_places_and_keywords_from_files_and_sidecars(library: Path, tmp_path: Path) -> None:
    with mmsearch.Index.create(tmp_path / "index", model=TINY_MODEL, pretrained="random") as idx:
        report = idx.add_folder(library)
        assert report.images_embedded == 4 and not report.skipped and not report.metadata_problems
        got = rows(idx)
        assert got["kite.jpg"] == {
            "taken": 1682937296.0,  # 12:34:56 at +02:00
            "source": "exif",
            "camera": "Canon EOS R5",
            "place": SYDNEY,
            "captions": [
                ("embedded:exif", "A red kite over the hills"),
                ("embedded:iptc", "Two blue squares"),
            ],
            "keywords": ["holiday"],
        }
        assert got["raw_edit.jpg"]["captions"] == [
            ("raw_edit.xmp", "Breakfast"),
            ("raw_edit.xmp", "Two blue squares on a table"),
        ]
        assert got["raw_edit.jpg"]["source"] == "xmp" and got["raw_edit.jpg"]["camera"] == "FUJIFILM X-T4"
        assert got["raw_edit.jpg"]["keywords"] == ["Blue", "squares", "table"]
        assert got["beach.jpg"] == {
            "taken": 1600000000.0,
            "source": "takeout",
            "camera": None,
            "place": (48.8584, 2.2945),
            "captions": [("beach.jpg.json", "Grandpa at the beach")],
            "keywords": ["Grandpa"],
        }
        assert got["plain.png"]["captions"] == [] and got["plain.png"]["taken"] is None
        # status counts where captions came from and what photos said.
        photos = idx.stats()["photos"]
        assert photos["caption_sources"] == {"xmp sidecar": 2, "exif": 1, "iptc": 1, "takeout": 1}
        assert photos["taken"] == {"exif": 1, "xmp": 1, "takeout": 1}
        assert photos["placed"] == 3 and photos["with_keywords"] == 3
        assert_consistent(idx)


def test_filters_and_hits_use_what_photos_say(library: Path, tmp_path: Path) -> None:
    with mmsearch.Index.create(tmp_path / "index", model=TINY_MODEL, pretrained="random") as idx:
        idx.add_folder(library)

        def found(**filters: object) -> set[str]:
            result = idx.search("a photo", target="images", k=20, min_confidence=0, **filters)  # type: ignore[arg-type]
            return {Path(h.path).name for h in result.hits}

        assert found(near="-33.86,151.21,5") == {"kite.jpg"}
        assert found(near="48.86,2.29,1") == {"beach.jpg"}
        assert found(tag="GRANDPA") == {"beach.jpg"}
        assert found(tag="holiday,table") == {"kite.jpg", "raw_edit.jpg"}
        # Taken in 2020 (Takeout), 2023 (EXIF, XMP); plain.png has no date taken: its file time (now).
        assert found(taken_before="2021-01-01") == {"beach.jpg"}
        assert found(taken_after="2022-01-01", taken_before="2024-01-01") == {"kite.jpg", "raw_edit.jpg"}
        assert "plain.png" in found(taken_after=time.time() - 3600)
        hit = next(h for h in idx.search("a photo", near="-33.86,151.21,5", min_confidence=0).hits)
        assert (hit.camera, round(hit.lat or 0, 4), hit.taken_at) == ("Canon EOS R5", SYDNEY[0], 1682937296.0)


def test_metadata_follows_edits_renames_and_upgrades_without_model_work(
    library: Path, tmp_path: Path
) -> None:
    with mmsearch.Index.create(tmp_path / "index", model=TINY_MODEL, pretrained="random") as idx:
        idx.add_folder(library)
        again = idx.add_folder(library)
        assert again.captions_added == again.captions_removed == again.images_embedded == 0
        # A Takeout description edited (the photo untouched) is read again; its old caption goes.
        (library / "beach.jpg.json").write_text(json.dumps({"description": "Grandma at the lake"}))
        edited = idx.add_folder(library)
        assert (edited.captions_added, edited.captions_removed, edited.images_embedded) == (1, 1, 0)
        assert rows(idx)["beach.jpg"]["captions"] == [("beach.jpg.json", "Grandma at the lake")]
        # A sidecar removed takes its captions with it.
        os.remove(library / "raw_edit.xmp")
        idx.add_folder(library)
        assert rows(idx)["raw_edit.jpg"]["captions"] == []
        # A renamed photo keeps what it says (read again from the file, no model work).
        os.rename(library / "kite.jpg", library / "kite-2023.jpg")
        moved = idx.add_folder(library)
        assert moved.images_embedded == 0 and moved.linked == 1
        assert rows(idx)["kite-2023.jpg"]["keywords"] == ["holiday"]
        # A catalog made before photo metadata existed: the next run reads every image's, embedding nothing.
        with idx.store.catalog.begin() as conn:
            conn.execute(
                update(db.files).values(meta_version=None, taken_at=None, camera=None, lat=None, lon=None)
            )
            conn.execute(db.tags.delete())
        upgraded = idx.add_folder(library)
        assert upgraded.images_embedded == 0 and upgraded.captions_added == 0
        assert rows(idx)["kite-2023.jpg"]["camera"] == "Canon EOS R5"
        assert rows(idx)["kite-2023.jpg"]["keywords"] == ["holiday"]
        assert_consistent(idx)


def test_hostile_metadata_is_skipped_with_its_reason_and_the_photo_indexed(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    _jpeg(folder / "bomb.jpg", xmp=BOMB, exif=_exif(description="a kite", make="Canon", model="EOS"))
    solid(folder / "bad.jpg", "red")
    (folder / "bad.jpg.json").write_text("{this is not json")
    solid(folder / "bomb_sidecar.jpg", "blue")
    (folder / "bomb_sidecar.xmp").write_bytes(BOMB)
    solid(folder / "huge.jpg", "green")
    (folder / "huge.jpg.json").write_bytes(b" " * (2 << 20) + b"{}")
    with mmsearch.Index.create(tmp_path / "index", model=TINY_MODEL, pretrained="random") as idx:
        report = idx.add_folder(folder)
        assert report.images_embedded == 4 and not report.skipped
        problems = {Path(p).name: why for p, why in report.metadata_problems}
        assert set(problems) == {"bomb.jpg", "bad.jpg.json", "bomb_sidecar.xmp", "huge.jpg.json"}
        assert "JSON" in problems["bad.jpg.json"] and "too large" in problems["huge.jpg.json"]
        assert "entit" in problems["bomb.jpg"].lower() or "xml" in problems["bomb.jpg"].lower()
        # What could be read still is (the EXIF beside the bomb).
        assert rows(idx)["bomb.jpg"]["captions"] == [("embedded:exif", "a kite")]
        assert report.as_dict()["metadata_problems"][0]["reason"]


def test_an_embedded_caption_is_found_by_its_words_and_meaning_on_the_demo_model(tmp_path: Path) -> None:
    """The picture is a red circle; its IPTC caption says "two blue squares": the caption is what the text
    query finds (the picture's own look would have found a blue-squares image)."""
    rng = random.Random(18)
    folder = tmp_path / "photos"
    folder.mkdir()

    def draw(colour: str, shape: str, count: int = 1) -> Image.Image:
        return world.render(world.Attributes(colour, shape, "large", count, "white"), rng)

    draw("red", "circle").save(folder / "captioned.jpg", quality=92)
    data = (folder / "captioned.jpg").read_bytes()
    from tests.test_photo_meta import _with_app13

    (folder / "captioned.jpg").write_bytes(_with_app13(data, _iptc((2, 120, b"two blue squares"))))
    for n, (colour, shape) in enumerate([("yellow", "star"), ("green", "triangle"), ("purple", "circle")]):
        draw(colour, shape).save(folder / f"other{n}.jpg", quality=92)
    with mmsearch.Index.create(tmp_path / "index", model="demo") as idx:
        idx.add_folder(folder)
        for mode in ("hybrid", "vector", "words"):
            result = idx.search("two blue squares", target="all", mode=mode, k=3)
            assert result.hits and Path(result.hits[0].path).name == "captioned.jpg", mode
        # By meaning, the caption's own vector is the hit (words reach the image through its caption).
        assert idx.search("two blue squares", target="all", mode="vector", k=1).hits[0].kind == "caption"


def test_cli_photo_filters_and_bad_values(library: Path, tmp_path: Path) -> None:
    index = tmp_path / "index"
    with mmsearch.Index.create(index, model=TINY_MODEL, pretrained="random") as idx:
        idx.add_folder(library)
    base = [sys.executable, "-m", "mmsearch", "query", "a photo", "--index", str(index), "--local"]
    out = subprocess.run(
        [*base, "--near", "-33.86,151.21,5", "--json", "--min-confidence", "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    hits = json.loads(out.stdout)["hits"]
    assert {Path(h["path"]).name for h in hits} == {"kite.jpg"}
    assert hits[0]["camera"] == "Canon EOS R5" and hits[0]["taken_at"] == 1682937296.0
    bad = subprocess.run([*base, "--near", "91,0,5"], capture_output=True, text=True)
    assert bad.returncode != 0 and "latitude" in bad.stderr and "Traceback" not in bad.stderr
    status = subprocess.run(
        [sys.executable, "-m", "mmsearch", "status", "--index", str(index)], capture_output=True, text=True
    )
    assert "captions 2 xmp sidecar" in status.stdout and "3 placed" in status.stdout
