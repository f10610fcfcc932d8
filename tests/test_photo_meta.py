"""photo_meta: captions, keywords, date, camera and place read from EXIF, IPTC, XMP and Takeout JSON.

Every file is built here: JPEG/PNG/WebP/TIFF written by Pillow with its own EXIF and XMP support, IPTC
injected as an APP13 Photoshop 8BIM block, Takeout JSON and XMP sidecars as bytes.
"""

from __future__ import annotations

import io
import json
import random
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image, ImageFile, TiffImagePlugin

from mmsearch import photo_meta as pm
from mmsearch.photo_meta import PhotoMeta, read_embedded, read_takeout, read_xmp_sidecar

R = TiffImagePlugin.IFDRational
SYDNEY = (-(33 + 51 / 60 + 35.4 / 3600), 151 + 12 / 60 + 30 / 3600)
MAY_1_1034_UTC = datetime(2023, 5, 1, 10, 34, 56, tzinfo=timezone.utc).timestamp()


# --- builders -----------------------------------------------------------------------------------------


def _exif(
    *,
    description: str | None = None,
    make: str | None = None,
    model: str | None = None,
    xp_comment: str | None = None,
    user_comment: bytes | None = None,
    taken: str | None = None,
    offset: str | None = None,
    subsec: str | None = None,
    gps: dict[int, object] | None = None,
) -> Image.Exif:
    exif = Image.Exif()
    for tag, value in ((0x010E, description), (0x010F, make), (0x0110, model)):
        if value is not None:
            exif[tag] = value
    if xp_comment is not None:
        exif[0x9C9C] = xp_comment.encode("utf-16-le") + b"\x00\x00"
    sub = exif.get_ifd(0x8769)
    for tag, value in ((0x9003, taken), (0x9011, offset), (0x9291, subsec), (0x9286, user_comment)):
        if value is not None:
            sub[tag] = value
    if gps is not None:
        exif.get_ifd(0x8825).update(gps)
    return exif


def _sydney_gps() -> dict[int, object]:
    return {1: "S", 2: (R(33, 1), R(51, 1), R(3540, 100)), 3: "E", 4: (R(151, 1), R(12, 1), R(30, 1))}


def _jpeg(
    path: Path, *, exif: Image.Exif | None = None, xmp: bytes | None = None, iptc: bytes | None = None
) -> Path:
    buf = io.BytesIO()
    kwargs: dict[str, object] = {}
    if exif is not None:
        kwargs["exif"] = exif
    if xmp is not None:
        kwargs["xmp"] = xmp
    Image.new("RGB", (32, 24), "red").save(buf, "JPEG", **kwargs)
    data = buf.getvalue()
    if iptc is not None:
        data = _with_app13(data, iptc)
    path.write_bytes(data)
    return path


def _iptc(*datasets: tuple[int, int, bytes]) -> bytes:
    """IPTC-IIM datasets: 0x1C, record, dataset number, 2-byte big-endian size, value."""
    return b"".join(b"\x1c" + bytes([r, d]) + len(v).to_bytes(2, "big") + v for r, d, v in datasets)


def _with_app13(jpeg: bytes, iptc: bytes) -> bytes:
    """``jpeg`` with an APP13 "Photoshop 3.0" segment holding one 8BIM 0x0404 (IPTC-NAA) resource."""
    resource = b"8BIM" + (0x0404).to_bytes(2, "big") + b"\x00\x00"  # id, empty Pascal name padded to even
    resource += len(iptc).to_bytes(4, "big") + iptc + b"\x00" * (len(iptc) % 2)
    payload = b"Photoshop 3.0\x00" + resource
    segment = b"\xff\xed" + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:2] + segment + jpeg[2:]


def _xmp(body: str = "", attrs: str = "") -> bytes:
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"'
        ' xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:exif="http://ns.adobe.com/exif/1.0/"'
        ' xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/"'
        f" {attrs}>{body}</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    ).encode()


def _alt(prop: str, *items: tuple[str, str]) -> str:
    lis = "".join(f'<rdf:li xml:lang="{lang}">{text}</rdf:li>' for lang, text in items)
    return f"<{prop}><rdf:Alt>{lis}</rdf:Alt></{prop}>"


def _bag(prop: str, *items: str) -> str:
    return f"<{prop}><rdf:Bag>{''.join(f'<rdf:li>{i}</rdf:li>' for i in items)}</rdf:Bag></{prop}>"


LIGHTROOM_XMP = _xmp(
    _alt("dc:description", ("fr", "Deux carrés bleus"), ("x-default", "Two blue squares on a table"))
    + _alt("dc:title", ("x-default", "Breakfast"))
    + _bag("dc:subject", "squares", "Blue", "table")
    + "<exif:GPSLatitude>51,30.5N</exif:GPSLatitude><exif:GPSLongitude>0,7.5W</exif:GPSLongitude>",
    attrs='exif:DateTimeOriginal="2023-05-01T12:34:56.5+02:00" xmp:CreateDate="2020-01-01T00:00:00Z"'
    ' tiff:Make="FUJIFILM" tiff:Model="X-T4"',
)


@pytest.fixture
def headers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding pixels fails the test: metadata must come from the headers alone."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# --- EXIF ---------------------------------------------------------------------------------------------


def test_jpeg_exif_captions_date_camera_gps(tmp_path: Path, headers_only: None) -> None:
    exif = _exif(
        description="A red kite over the hills",
        make="Canon",
        model="Canon EOS R5",
        xp_comment="Grandma's garden ✿",
        user_comment=b"ASCII\x00\x00\x00Picnic by the lake",
        taken="2023:05:01 12:34:56",
        offset="+02:00",
        subsec="25",
        gps=_sydney_gps(),
    )
    meta = read_embedded(_jpeg(tmp_path / "a.jpg", exif=exif))
    assert meta.captions == (
        ("embedded:exif", "A red kite over the hills"),
        ("embedded:exif", "Grandma's garden ✿"),
        ("embedded:exif", "Picnic by the lake"),
    )
    assert meta.taken_at == MAY_1_1034_UTC + 0.25
    assert meta.taken_source == "exif"
    assert meta.camera == "Canon EOS R5"
    assert meta.lat == pytest.approx(SYDNEY[0], abs=1e-6)
    assert meta.lon == pytest.approx(SYDNEY[1], abs=1e-6)
    assert meta.keywords == () and meta.problems == ()


def test_exif_date_without_offset_is_local_time(tmp_path: Path) -> None:
    meta = read_embedded(_jpeg(tmp_path / "a.jpg", exif=_exif(taken="2019:12:31 23:59:58")))
    assert meta.taken_at == datetime(2019, 12, 31, 23, 59, 58).timestamp()
    assert meta.taken_source == "exif"


def test_exif_unicode_user_comment_and_make_model_join(tmp_path: Path) -> None:
    # The byte order should be the EXIF block's (Pillow writes big-endian); writers using the other one
    # are recognised too.
    for codec in ("utf-16-be", "utf-16-le"):
        comment = b"UNICODE\x00" + "Über den Wolken".encode(codec)
        exif = _exif(user_comment=comment, make="Leica", model="M11")
        meta = read_embedded(_jpeg(tmp_path / "a.jpg", exif=exif))
        assert meta.captions == (("embedded:exif", "Über den Wolken"),), codec
        assert meta.camera == "Leica M11"


@pytest.mark.parametrize(
    "description",
    ["OLYMPUS DIGITAL CAMERA", "SONY DSC  ", "   ", "\x00\x00", "IMG_1234.JPG", "DSC01234", "NIKON D750"],
)
def test_exif_placeholders_are_not_captions(tmp_path: Path, description: str) -> None:
    exif = _exif(description=description, make="NIKON CORPORATION\x00", model="NIKON D750 ")
    meta = read_embedded(_jpeg(tmp_path / "a.jpg", exif=exif))
    assert meta.captions == ()
    assert meta.camera == "NIKON D750"


def test_exif_junk_dates_and_positions_are_dropped(tmp_path: Path) -> None:
    null_island = {2: (R(0, 1), R(0, 1), R(0, 1)), 4: (R(0, 1), R(0, 1), R(0, 1))}  # no refs
    meta = read_embedded(_jpeg(tmp_path / "a.jpg", exif=_exif(taken="0000:00:00 00:00:00", gps=null_island)))
    assert (meta.taken_at, meta.taken_source, meta.lat, meta.lon) == (None, None, None, None)
    out_of_range = {1: "N", 2: (R(95, 1), R(0, 1), R(0, 1)), 3: "E", 4: (R(10, 1), R(0, 1), R(0, 1))}
    meta = read_embedded(_jpeg(tmp_path / "b.jpg", exif=_exif(taken="1201:01:01 00:00:00", gps=out_of_range)))
    assert (meta.taken_at, meta.lat, meta.lon) == (None, None, None)
    zero_denominator = {1: "N", 2: (R(10, 0), R(0, 1), R(0, 1)), 3: "E", 4: (R(10, 1), R(0, 1), R(0, 1))}
    meta = read_embedded(_jpeg(tmp_path / "c.jpg", exif=_exif(gps=zero_denominator)))
    assert (meta.lat, meta.lon) == (None, None)


# --- IPTC ---------------------------------------------------------------------------------------------


def test_jpeg_iptc_utf8_caption_title_keywords(tmp_path: Path, headers_only: None) -> None:
    iptc = _iptc(
        (1, 90, b"\x1b%G"),  # coded character set: UTF-8
        (2, 5, "Frühstück".encode()),
        (2, 120, "Two blue squares — on a tablecloth".encode()),
        (2, 25, b"squares"),
        (2, 25, b"bleu"),
        (2, 25, b"Squares"),  # a duplicate in another case
    )
    meta = read_embedded(_jpeg(tmp_path / "a.jpg", iptc=iptc))
    assert meta.captions == (
        ("embedded:iptc", "Two blue squares — on a tablecloth"),
        ("embedded:iptc", "Frühstück"),
    )
    assert meta.keywords == (("iptc", "squares"), ("iptc", "bleu"))
    assert meta.problems == ()


def test_iptc_without_charset_falls_back_to_windows_latin(tmp_path: Path) -> None:
    iptc = _iptc((2, 120, "Café au lait".encode("latin-1")), (2, 25, "naïve".encode()))
    meta = read_embedded(_jpeg(tmp_path / "a.jpg", iptc=iptc))
    assert meta.captions == (("embedded:iptc", "Café au lait"),)
    assert meta.keywords == (("iptc", "naïve"),)  # valid UTF-8 is read as UTF-8


def test_iptc_truncated_block_keeps_what_it_has(tmp_path: Path) -> None:
    iptc = _iptc((2, 120, b"A kept caption")) + b"\x1c\x02\x19\x00\xff" + b"short"
    meta = read_embedded(_jpeg(tmp_path / "a.jpg", iptc=iptc))
    assert meta.captions == (("embedded:iptc", "A kept caption"),)
    assert meta.problems == ("IPTC block truncated",)


# --- XMP ----------------------------------------------------------------------------------------------


def test_jpeg_xmp_lightroom(tmp_path: Path, headers_only: None) -> None:
    meta = read_embedded(_jpeg(tmp_path / "a.jpg", xmp=LIGHTROOM_XMP))
    assert meta.captions == (("embedded:xmp", "Two blue squares on a table"), ("embedded:xmp", "Breakfast"))
    assert meta.keywords == (("xmp", "squares"), ("xmp", "Blue"), ("xmp", "table"))
    assert meta.taken_at == MAY_1_1034_UTC + 0.5
    assert meta.taken_source == "xmp"
    assert meta.camera == "FUJIFILM X-T4"
    assert meta.lat == pytest.approx(51 + 30.5 / 60, abs=1e-6)
    assert meta.lon == pytest.approx(-0.125, abs=1e-6)
    assert meta.problems == ()


def test_exif_wins_scalars_and_one_caption_per_text(tmp_path: Path) -> None:
    text = "Two blue squares on a table"
    exif = _exif(description=text, taken="2001:02:03 04:05:06", offset="Z", make="Canon", model="EOS 5D")
    iptc = _iptc((2, 120, text.encode()), (2, 25, b"SQUARES"), (2, 25, b"kitchen"))
    meta = read_embedded(_jpeg(tmp_path / "a.jpg", exif=exif, xmp=LIGHTROOM_XMP, iptc=iptc))
    assert meta.captions == (("embedded:xmp", text), ("embedded:xmp", "Breakfast"))
    assert meta.keywords == (("xmp", "squares"), ("xmp", "Blue"), ("xmp", "table"), ("iptc", "kitchen"))
    assert meta.taken_at == datetime(2001, 2, 3, 4, 5, 6, tzinfo=timezone.utc).timestamp()
    assert (meta.taken_source, meta.camera) == ("exif", "Canon EOS 5D")
    assert meta.lat == pytest.approx(51 + 30.5 / 60, abs=1e-6)  # EXIF had no position: XMP's


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:description><rdf:Alt>
<rdf:li xml:lang="x-default">&lol9;</rdf:li></rdf:Alt></dc:description></rdf:Description></rdf:RDF></x:xmpmeta>"""


def _external_entity(target: Path) -> bytes:
    return (
        f'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY secret SYSTEM "file://{target}">]>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title><rdf:Alt>'
        '<rdf:li xml:lang="x-default">&secret;</rdf:li></rdf:Alt></dc:title></rdf:Description></rdf:RDF></x:xmpmeta>'
    ).encode()


def test_xmp_bomb_in_jpeg_is_refused_and_exif_still_read(tmp_path: Path) -> None:
    meta = read_embedded(_jpeg(tmp_path / "a.jpg", exif=_exif(description="Still here"), xmp=BOMB))
    assert meta.captions == (("embedded:exif", "Still here"),)
    assert len(meta.problems) == 1 and meta.problems[0].startswith("XMP refused: DTDForbidden")


def test_xmp_external_entity_is_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    for meta in (
        read_xmp_sidecar(_external_entity(secret)),
        read_embedded(_jpeg(tmp_path / "a.jpg", xmp=_external_entity(secret))),
    ):
        assert meta.captions == ()
        assert "SECRET" not in repr(meta)
        assert meta.problems and meta.problems[0].startswith("XMP refused")


def test_oversized_and_malformed_xmp_are_problems(tmp_path: Path) -> None:
    padding = b" " * (pm.MAX_XMP_BYTES + 1)
    assert pm.parse_xmp(LIGHTROOM_XMP + padding).problems == (
        f"XMP too large: {len(LIGHTROOM_XMP) + len(padding)} bytes (limit {pm.MAX_XMP_BYTES})",
    )
    assert read_xmp_sidecar(b"x" * (pm.MAX_SIDECAR_BYTES + 1)).problems[0].startswith("XMP sidecar too large")
    assert read_xmp_sidecar(b"<x:xmpmeta><unclosed>").problems[0].startswith("XMP is not well-formed XML")
    assert read_xmp_sidecar(b"").problems[0].startswith("XMP is not well-formed XML")


def test_xmp_sidecar_darktable_style(tmp_path: Path) -> None:
    # darktable and digiKam write simple properties as attributes, and sometimes a bare text property.
    sidecar = _xmp(
        "<dc:description>Harbour at dawn\n\t with  fog</dc:description>" + _bag("dc:subject", "harbour", " "),
        attrs='exif:DateTimeOriginal="2018:07:14 06:00:00" photoshop:DateCreated="1999-01-01"'
        ' exif:GPSLatitude="43,17,45.5N" exif:GPSLongitude="5,22,12E"',
    )
    meta = read_xmp_sidecar(sidecar, source="/photos/harbour.jpg.xmp")
    assert meta.captions == (("/photos/harbour.jpg.xmp", "Harbour at dawn with fog"),)
    assert meta.keywords == (("xmp", "harbour"),)
    assert meta.taken_at == datetime(2018, 7, 14, 6, 0, 0).timestamp()
    assert meta.lat == pytest.approx(43 + 17 / 60 + 45.5 / 3600, abs=1e-6)
    assert meta.lon == pytest.approx(5 + 22 / 60 + 12 / 3600, abs=1e-6)
    assert read_xmp_sidecar(_xmp(_alt("dc:title", ("x-default", "Dawn")))).captions == (("sidecar", "Dawn"),)


def test_xmp_date_only_and_bad_coordinates() -> None:
    meta = pm.parse_xmp(
        _xmp(attrs='photoshop:DateCreated="1965-07-04" exif:GPSLatitude="91,0N" exif:GPSLongitude="10,0E"')
    )
    assert meta.taken_at == datetime(1965, 7, 4).timestamp()
    assert (meta.lat, meta.lon) == (None, None)
    meta = pm.parse_xmp(_xmp(attrs='exif:GPSLatitude="10,0E" exif:GPSLongitude="10,0E"'))  # E is no latitude
    assert (meta.lat, meta.lon) == (None, None)


# --- other containers ---------------------------------------------------------------------------------


def test_png_webp_avif_headers(tmp_path: Path, headers_only: None) -> None:
    exif = _exif(description="A lighthouse", taken="2023:05:01 12:34:56", offset="+02:00", gps=_sydney_gps())
    image = Image.new("RGB", (20, 10), "blue")
    image.save(tmp_path / "a.png", exif=exif, pnginfo=_png_xmp(LIGHTROOM_XMP))
    image.save(tmp_path / "a.webp", exif=exif, xmp=LIGHTROOM_XMP)
    names = ["a.png", "a.webp"]
    Image.init()
    if "AVIF" in Image.SAVE:  # Pillow's own AVIF plugin, registered by Pillow itself
        image.save(tmp_path / "a.avif", exif=exif, xmp=LIGHTROOM_XMP)
        names.append("a.avif")
    for name in names:
        meta = read_embedded(tmp_path / name)
        assert meta.captions == (
            ("embedded:xmp", "Two blue squares on a table"),
            ("embedded:xmp", "Breakfast"),
            ("embedded:exif", "A lighthouse"),
        ), name
        assert meta.keywords[0] == ("xmp", "squares"), name
        assert (meta.taken_at, meta.taken_source) == (MAY_1_1034_UTC, "exif"), name
        assert meta.lat == pytest.approx(SYDNEY[0], abs=1e-6), name
        assert meta.problems == (), name


def test_tiff_tags_xmp_and_iptc(tmp_path: Path, headers_only: None) -> None:
    # Pillow's TIFF writer keeps IFD0 tags but writes no Exif/GPS sub-IFDs: the date and place come from XMP.
    iptc = _iptc((2, 120, b"Harbour at dawn"), (2, 25, b"boats"))
    tags = {270: "A lighthouse", 271: "Canon", 272: "EOS 5D", 700: LIGHTROOM_XMP, 33723: iptc}
    Image.new("RGB", (20, 10), "blue").save(tmp_path / "a.tif", tiffinfo=tags)
    meta = read_embedded(tmp_path / "a.tif")
    assert meta.captions == (
        ("embedded:xmp", "Two blue squares on a table"),
        ("embedded:xmp", "Breakfast"),
        ("embedded:iptc", "Harbour at dawn"),
        ("embedded:exif", "A lighthouse"),
    )
    assert meta.keywords == (("xmp", "squares"), ("xmp", "Blue"), ("xmp", "table"), ("iptc", "boats"))
    assert (meta.taken_at, meta.taken_source, meta.camera) == (MAY_1_1034_UTC + 0.5, "xmp", "Canon EOS 5D")
    assert (meta.lat, meta.lon) == (pytest.approx(51 + 30.5 / 60, abs=1e-6), pytest.approx(-0.125, abs=1e-6))
    assert meta.problems == ()


def _png_xmp(xmp: bytes) -> object:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp.decode())
    return info


def test_files_that_are_not_images(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"not an image at all")
    assert read_embedded(tmp_path / "a.jpg").problems == ("metadata not read: not a supported image",)
    assert read_embedded(tmp_path / "missing.jpg").problems[0].startswith("metadata not read:")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.gif")
    assert read_embedded(tmp_path / "a.gif") == PhotoMeta()


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's own, when it looks for the DPI
def test_hostile_exif_block(tmp_path: Path) -> None:
    good = _jpeg(tmp_path / "good.jpg").read_bytes()
    for i, body in enumerate((b"garbage", b"II*\x00\xff\xff\xff\xff", b"MM\x00*\x00\x00\x00\x08\xff\xff")):
        payload = b"Exif\x00\x00" + body
        data = good[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + good[2:]
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(data)
        meta = read_embedded(path)
        assert meta.captions == () and meta.taken_at is None
        if i == 0:
            assert meta.problems == ("EXIF unreadable: ValueError: EXIF block is not TIFF-structured",)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_mutated_files_never_raise(tmp_path: Path) -> None:
    exif = _exif(
        description="x", taken="2023:05:01 12:34:56", gps=_sydney_gps(), user_comment=b"ASCII\x00\x00\x00y"
    )
    iptc = _iptc((2, 120, b"caption"), (2, 25, b"k"))
    good = _jpeg(tmp_path / "good.jpg", exif=exif, xmp=LIGHTROOM_XMP, iptc=iptc).read_bytes()
    rng = random.Random(18)
    path = tmp_path / "bad.jpg"
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(2, 2000)] = rng.randrange(256)
        path.write_bytes(bytes(data[: rng.randrange(2, len(data) + 1)]))
        assert isinstance(read_embedded(path), PhotoMeta)


# --- Takeout ------------------------------------------------------------------------------------------


def _takeout(**fields: object) -> bytes:
    doc: dict[str, object] = {
        "title": "IMG_20230501_123456.jpg",
        "description": "Grandma's 90th birthday\n",
        "imageViews": "3",
        "creationTime": {"timestamp": "1700000000", "formatted": "14 Nov 2023"},
        "photoTakenTime": {"timestamp": "1682937296", "formatted": "1 May 2023, 10:34:56 UTC"},
        "geoData": {"latitude": 48.8584, "longitude": 2.2945, "altitude": 35.0},
        "geoDataExif": {"latitude": 0.0, "longitude": 0.0, "altitude": 0.0},
        "people": [{"name": "Alice"}, {"name": "Bob"}, {"name": "alice"}],
    }
    doc.update(fields)
    return json.dumps(doc).encode()


def test_takeout_good() -> None:
    meta = read_takeout(_takeout(), source="/t/IMG_20230501_123456.jpg.json")
    assert meta.captions == (("/t/IMG_20230501_123456.jpg.json", "Grandma's 90th birthday"),)
    assert meta.keywords == (("takeout", "Alice"), ("takeout", "Bob"))
    assert (meta.taken_at, meta.taken_source) == (MAY_1_1034_UTC, "takeout")
    assert (meta.lat, meta.lon) == (48.8584, 2.2945)
    assert meta.problems == ()
    assert read_takeout(_takeout(title="Eiffel tower at night", description="")).captions == (
        ("sidecar", "Eiffel tower at night"),
    )


def test_takeout_zero_geo_is_unknown() -> None:
    meta = read_takeout(_takeout(geoData={"latitude": 0.0, "longitude": 0.0}))
    assert (meta.lat, meta.lon, meta.problems) == (None, None, ())
    meta = read_takeout(
        _takeout(geoData={"latitude": 0.0, "longitude": 0.0}, geoDataExif={"latitude": -1.5, "longitude": 2})
    )
    assert (meta.lat, meta.lon) == (-1.5, 2.0)


def test_takeout_wrong_types_keep_the_rest() -> None:
    meta = read_takeout(
        _takeout(
            description=["no"],
            photoTakenTime={"timestamp": "soon"},
            geoData={"latitude": "48", "longitude": 2},
            people="Alice",
        )
    )
    assert meta.captions == () and meta.keywords == ()
    assert (meta.taken_at, meta.lat) == (None, None)
    assert meta.problems == (
        "Takeout description is not a string",
        "Takeout people is not a list",
        "Takeout photoTakenTime.timestamp is not a valid time",
        "Takeout geoData is not a latitude/longitude pair",
    )


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"{not json", "Takeout JSON unreadable"),
        (b"\xff\xfe\x00garbage", "Takeout JSON unreadable"),
        (b"[" * 100_000, "Takeout JSON unreadable"),
        (b"[1, 2]", "Takeout JSON is not an object"),
        (b" " * (pm.MAX_SIDECAR_BYTES + 1), "Takeout JSON too large"),
    ],
)
def test_takeout_not_json(data: bytes, problem: str) -> None:
    meta = read_takeout(data)
    assert meta.problems[0].startswith(problem)
    assert meta.captions == () and meta.taken_at is None


# --- hygiene and merging ------------------------------------------------------------------------------


def test_text_hygiene_and_budgets() -> None:
    assert pm.clean_text("\ufeff a\x00b\x1b  c\r\n\td\u0085 ", 100) == "a b c d"
    long = "word " * 1000
    meta = pm.parse_xmp(
        _xmp(_alt("dc:description", ("x-default", long)) + _bag("dc:subject", *map(str, range(500))))
    )
    assert len(meta.captions[0][1]) <= pm.MAX_CAPTION_CHARS
    assert len(meta.keywords) == pm.MAX_KEYWORDS


def test_merged_self_wins_lists_concatenated() -> None:
    a = PhotoMeta(
        captions=(("embedded:xmp", "Same"),), keywords=(("xmp", "Sea"),), taken_at=1.0, taken_source="exif"
    )
    b = PhotoMeta(
        captions=(("x.json", "Same"), ("x.json", "Other")),
        keywords=(("takeout", "sea"), ("takeout", "Ann")),
        taken_at=2.0,
        taken_source="takeout",
        camera="Pixel 8",
        lat=1.0,
        lon=2.0,
        problems=("p",),
    )
    m = a.merged(b)
    assert m.captions == (("embedded:xmp", "Same"), ("x.json", "Other"))
    assert m.keywords == (("xmp", "Sea"), ("takeout", "Ann"))
    assert (m.taken_at, m.taken_source, m.camera, m.lat, m.lon, m.problems) == (
        1.0,
        "exif",
        "Pixel 8",
        1.0,
        2.0,
        ("p",),
    )
