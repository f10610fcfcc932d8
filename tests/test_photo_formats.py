"""Photo formats of issue 18: HEIC/HEIF (pillow-heif), AVIF (Pillow's plugin) and camera RAW (rawpy/LibRaw).

Every file is made here with the real encoders (pillow-heif, Pillow) or, for DNG, written by hand as a small
TIFF with the DNG tags LibRaw needs: a 16-bit RGGB mosaic of a picture, optionally with a preview in IFD 0
(JPEG or uncompressed RGB) and the raw image in a SubIFD, as cameras lay them out. All decoding is real.
"""

from __future__ import annotations

import io
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import mmsearch
from mmsearch import images, preview
from mmsearch.constants import IMAGE_SUFFIXES
from mmsearch.demo import world
from mmsearch.errors import BadMediaError
from mmsearch.images import load_image

pillow_heif = pytest.importorskip("pillow_heif")
rawpy = pytest.importorskip("rawpy")
pillow_heif.register_heif_opener()  # for writing .heic files here; load_image registers it on its own

RED, BLUE, GREEN = (220, 30, 30), (30, 30, 220), (30, 200, 30)

# ------------------------------------------------------------------------------------------------ writers

_BYTE, _ASCII, _SHORT, _LONG, _RATIONAL, _SRATIONAL = 1, 2, 3, 4, 5, 10
_PACK = {_BYTE: "B", _ASCII: "B", _SHORT: "H", _LONG: "I", _RATIONAL: "II", _SRATIONAL: "ii"}
# XYZ (D65) -> linear sRGB: as DNG's ColorMatrix1 it says "the camera's channels are linear sRGB".
_XYZ_TO_SRGB = (3.2406, -1.5372, -0.4986, -0.9689, 1.8758, 0.0415, 0.0557, -0.2040, 1.0570)

Tag = tuple[int, int, object]


def _ifd(tags: list[Tag], at: int) -> bytes:
    """A little-endian TIFF IFD placed at offset ``at``, its long values right after it; no next IFD."""
    tags = sorted(tags, key=lambda t: t[0])
    table = bytearray(struct.pack("<H", len(tags)))
    values = bytearray()
    values_at = at + 2 + 12 * len(tags) + 4
    for tag, kind, value in tags:
        if kind == _ASCII:
            data, count = str(value).encode() + b"\0", len(str(value)) + 1
        elif kind in (_RATIONAL, _SRATIONAL):
            pairs = list(value)  # type: ignore[call-overload]
            data, count = b"".join(struct.pack("<" + _PACK[kind], *p) for p in pairs), len(pairs)
        else:
            items = list(value)  # type: ignore[call-overload]
            data, count = struct.pack(f"<{len(items)}{_PACK[kind]}", *items), len(items)
        if len(data) <= 4:
            table += struct.pack("<HHI", tag, kind, count) + data.ljust(4, b"\0")
        else:
            table += struct.pack("<HHII", tag, kind, count, values_at + len(values))
            values += data + b"\0" * (len(data) % 2)
    return bytes(table + struct.pack("<I", 0) + values)


def write_dng(
    path: Path,
    picture: Image.Image,
    *,
    preview_image: Image.Image | None = None,
    preview_jpeg: bool = True,
    orientation: int = 1,
    declared: tuple[int, int] | None = None,
) -> Path:
    """A DNG whose 16-bit RGGB mosaic is sampled from ``picture`` (sRGB, linearised); ``declared`` makes its
    header claim another size than the data it holds."""
    width, height = picture.size
    linear = np.round((np.asarray(picture.convert("RGB"), dtype=np.float64) / 255.0) ** 2.2 * 65535)
    linear = linear.astype(np.uint16)
    mosaic = np.empty((height, width), dtype=np.uint16)
    mosaic[0::2, 0::2] = linear[0::2, 0::2, 0]
    mosaic[0::2, 1::2] = linear[0::2, 1::2, 1]
    mosaic[1::2, 0::2] = linear[1::2, 0::2, 1]
    mosaic[1::2, 1::2] = linear[1::2, 1::2, 2]
    sensor = mosaic.tobytes()
    w, h = declared or (width, height)
    dng: list[Tag] = [
        (271, _ASCII, "mmsearch"),
        (272, _ASCII, "test camera"),
        (274, _SHORT, [orientation]),
        (50706, _BYTE, [1, 4, 0, 0]),  # DNGVersion
        (50707, _BYTE, [1, 1, 0, 0]),  # DNGBackwardVersion
        (50708, _ASCII, "mmsearch test camera"),  # UniqueCameraModel
        (50721, _SRATIONAL, [(round(x * 10000), 10000) for x in _XYZ_TO_SRGB]),  # ColorMatrix1
        (50778, _SHORT, [21]),  # CalibrationIlluminant1: D65
        (50728, _RATIONAL, [(1, 1)] * 3),  # AsShotNeutral
    ]

    def raw_tags(data_at: int) -> list[Tag]:
        return [
            (254, _LONG, [0]),  # NewSubFileType: the main image
            (256, _LONG, [w]),
            (257, _LONG, [h]),
            (258, _SHORT, [16]),
            (259, _SHORT, [1]),
            (262, _SHORT, [32803]),  # PhotometricInterpretation: CFA
            (273, _LONG, [data_at]),
            (277, _SHORT, [1]),
            (278, _LONG, [h]),
            (279, _LONG, [len(sensor)]),
            (284, _SHORT, [1]),
            (33421, _SHORT, [2, 2]),  # CFARepeatPatternDim
            (33422, _BYTE, [0, 1, 1, 2]),  # CFAPattern: RGGB
            (50714, _LONG, [0]),  # BlackLevel
            (50717, _LONG, [65535]),  # WhiteLevel
        ]

    head = b"II*\0" + struct.pack("<I", 8)
    if preview_image is None:  # IFD 0 is the raw image
        size = len(_ifd(dng + raw_tags(0), 8))
        blob = head + _ifd(dng + raw_tags(8 + size), 8) + sensor
    else:  # IFD 0 the preview, SubIFD the raw image (the layout of camera DNGs)
        if preview_jpeg:
            buf = io.BytesIO()
            preview_image.save(buf, "JPEG", quality=92)
            pdata, compression, photometric = buf.getvalue(), 7, 6
        else:
            pdata, compression, photometric = preview_image.tobytes(), 1, 2
        pw, ph = preview_image.size

        def preview_tags(sub_at: int, data_at: int) -> list[Tag]:
            return dng + [
                (254, _LONG, [1]),  # NewSubFileType: reduced-resolution copy
                (256, _LONG, [pw]),
                (257, _LONG, [ph]),
                (258, _SHORT, [8, 8, 8]),
                (259, _SHORT, [compression]),
                (262, _SHORT, [photometric]),
                (273, _LONG, [data_at]),
                (277, _SHORT, [3]),
                (278, _LONG, [ph]),
                (279, _LONG, [len(pdata)]),
                (284, _SHORT, [1]),
                (330, _LONG, [sub_at]),  # SubIFDs
            ]

        ifd0_size = len(_ifd(preview_tags(0, 0), 8))
        sub_at = 8 + ifd0_size
        sub_size = len(_ifd(raw_tags(0), sub_at))
        pdata_at = sub_at + sub_size
        blob = (
            head
            + _ifd(preview_tags(sub_at, pdata_at), 8)
            + _ifd(raw_tags(pdata_at + len(pdata)), sub_at)
            + pdata
            + sensor
        )
    path.write_bytes(blob)
    return path


def two_marks(size: tuple[int, int] = (200, 120)) -> Image.Image:
    """A red disc on the left, a blue block on the right, on white: orientation is visible."""
    w, h = size
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    draw.ellipse((w * 0.05, h * 0.2, w * 0.4, h * 0.8), fill=RED)
    draw.rectangle((w * 0.6, h * 0.2, w * 0.95, h * 0.8), fill=BLUE)
    return im


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def share(im: Image.Image, rgb: tuple[int, int, int], box: tuple[float, float, float, float]) -> float:
    """Fraction of pixels within 60 of ``rgb`` in ``box`` (fractions of width/height)."""
    w, h = im.size
    crop = np.asarray(im.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h))), np.int16)
    return float((np.abs(crop - np.array(rgb)).max(-1) <= 60).mean())


def assert_upright_portrait(im: Image.Image) -> None:
    """``two_marks`` turned by EXIF orientation 6 (90 degrees clockwise): red on top, blue below."""
    assert im.height > im.width, im.size
    assert share(im, RED, (0, 0, 1, 0.45)) > 0.2 and share(im, BLUE, (0, 0.55, 1, 1)) > 0.2


# ------------------------------------------------------------------------------------------ HEIC and AVIF


def test_new_suffixes_are_indexed() -> None:
    for suffix in (".heic", ".heif", ".avif", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2"):
        assert suffix in IMAGE_SUFFIXES


def test_heic_and_avif_decode_upright(tmp_path: Path) -> None:
    """pillow-heif turns HEIC upright itself (irot) and resets EXIF orientation to 1; Pillow's AVIF plugin
    reports irot as EXIF orientation, which load_image applies: each turned exactly once."""
    picture = two_marks()
    for suffix in (".heic", ".avif"):
        path = tmp_path / f"turned{suffix}"
        picture.save(path, exif=exif_orientation(6), quality=90)
        assert_upright_portrait(load_image(path))
        plain = tmp_path / f"plain{suffix}"
        picture.save(plain, quality=90)
        out = load_image(plain)
        assert out.size == picture.size and out.mode == "RGB"
        assert share(out, RED, (0, 0, 0.45, 1)) > 0.2 and share(out, BLUE, (0.55, 0, 1, 1)) > 0.2


def test_heic_decodes_from_its_embedded_thumbnail_when_large_enough(tmp_path: Path) -> None:
    path = tmp_path / "thumbed.heic"
    two_marks((640, 480)).save(path, quality=80, thumbnails=[320])
    assert load_image(path, max_side=2000, draft_size=200).size == (320, 240)  # the thumbnail
    assert load_image(path, max_side=2000, draft_size=300).size == (640, 480)  # too small: the image


def test_heic_and_avif_from_open_files_and_terminal_previews(tmp_path: Path) -> None:
    """What the server's thumbnails and `query --preview` do: decode from an open file."""
    for suffix in (".heic", ".avif"):
        path = tmp_path / f"x{suffix}"
        two_marks().save(path, quality=90)
        with open(path, "rb") as f:
            fd_file = os.fdopen(os.dup(f.fileno()), "rb")  # no name, as the server's os.fdopen gives
        with fd_file:
            assert load_image(fd_file, max_side=512, draft_size=256).size == (200, 120)
        assert max(preview.thumbnail(path, side=64).size) == 64


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, at 89.5 Mpx
def test_heic_over_the_pixel_budget_is_refused_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "small.heic"
    two_marks().save(path, quality=90)
    with pytest.raises(BadMediaError, match="over the budget"):
        load_image(path, max_pixels=100 * 100)
    big = tmp_path / "claims_100mpx.heic"
    big.write_bytes(_claim_size(path.read_bytes(), 10_000, 10_000))
    with pytest.raises(BadMediaError, match=r"10000x10000 pixels \(100.0 Mpx\) is over the budget"):
        load_image(big)


def test_heif_and_avif_files_over_the_size_limit_are_not_read(tmp_path: Path, monkeypatch) -> None:
    """Both decoders read the whole file into memory before its header: its size is checked first."""
    monkeypatch.setattr(images, "MAX_CONTAINER_BYTES", 1000)
    for suffix in (".heic", ".avif"):
        path = tmp_path / f"x{suffix}"
        Image.effect_noise((128, 128), 60).convert("RGB").save(path, quality=95)
        assert path.stat().st_size > 1000
        with pytest.raises(BadMediaError, match="HEIF/AVIF file of 0 MiB is over the 0 MiB limit"):
            load_image(path)


def test_truncated_heic_is_an_error_not_half_an_image(tmp_path: Path) -> None:
    path = tmp_path / "noise.heic"
    Image.effect_noise((320, 240), 60).convert("RGB").save(path, quality=90)
    cut = tmp_path / "cut.heic"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BadMediaError, match="corrupt or truncated") as e:
        load_image(cut)
    assert "\n" not in str(e.value)


def test_missing_pillow_heif_is_a_reason_with_the_install_hint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "x.heic"
    two_marks().save(path, quality=90)
    monkeypatch.setattr(images, "_heif_registered", False)
    with pytest.raises(BadMediaError, match=r"HEIC/HEIF images need pillow-heif.*mmsearch\[photos\]"):
        load_image(path)


def test_a_jpeg_loads_neither_pillow_heif_nor_rawpy_and_others_load_them_on_demand(tmp_path: Path) -> None:
    """In a fresh process: a JPEG imports neither; then a HEIC (branded 'mif1', which Pillow's AVIF plugin
    claims first) registers pillow-heif, and a DNG imports rawpy."""
    two_marks().save(tmp_path / "x.jpg")
    two_marks().save(tmp_path / "x.heic", quality=90)
    heic = bytearray((tmp_path / "x.heic").read_bytes())
    assert heic[8:12] == b"heic"
    heic[8:12] = b"mif1"
    (tmp_path / "mif1.heic").write_bytes(heic)
    write_dng(tmp_path / "x.dng", two_marks())
    script = (
        "import sys\nfrom mmsearch.images import load_image\n"
        "def loaded(): return sorted(m for m in ('pillow_heif', 'rawpy') if m in sys.modules)\n"
        f"load_image({str(tmp_path / 'x.jpg')!r})\nprint(loaded())\n"
        f"print(load_image({str(tmp_path / 'mif1.heic')!r}).size, loaded())\n"
        f"print(load_image({str(tmp_path / 'x.dng')!r}).size, loaded())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.splitlines() == [
        "[]",
        "(200, 120) ['pillow_heif']",
        "(100, 60) ['pillow_heif', 'rawpy']",
    ]


def _claim_size(heic: bytes, width: int, height: int) -> bytes:
    """``heic`` with its image's 'ispe' (spatial extent) property claiming ``width`` x ``height``."""
    at = heic.find(b"ispe")
    assert at > 0
    data = bytearray(heic)
    data[at + 8 : at + 16] = struct.pack(">II", width, height)
    return bytes(data)


# ------------------------------------------------------------------------------------------------------ RAW


def test_dng_without_preview_is_demosaiced_at_half_size_with_its_colours(tmp_path: Path) -> None:
    path = write_dng(tmp_path / "plain.dng", two_marks((200, 120)))
    out = load_image(path)
    assert out.size == (100, 60) and out.mode == "RGB"
    assert share(out, RED, (0, 0, 0.45, 1)) > 0.2 and share(out, BLUE, (0.55, 0, 1, 1)) > 0.2
    assert share(out, (255, 255, 255), (0, 0, 1, 0.1)) > 0.9


def test_raw_orientation_is_applied_once_on_every_path(tmp_path: Path) -> None:
    picture = two_marks((200, 120))
    demosaiced = write_dng(tmp_path / "d.dng", picture, orientation=6)
    jpeg = write_dng(tmp_path / "j.dng", picture, preview_image=picture, orientation=6)
    bitmap = write_dng(tmp_path / "b.dng", picture, preview_image=picture, preview_jpeg=False, orientation=6)
    assert_upright_portrait(load_image(demosaiced))  # LibRaw turns its output
    assert_upright_portrait(load_image(jpeg, draft_size=100))  # the EXIF LibRaw gives the JPEG preview
    assert_upright_portrait(load_image(bitmap, draft_size=100))  # turned here by flip


def test_raw_preview_is_used_only_when_large_enough(tmp_path: Path) -> None:
    """The preview shows green, the sensor data red: the colour says which one was decoded."""
    picture = Image.new("RGB", (400, 300), RED)
    green = Image.new("RGB", (400, 300), GREEN)
    for jpeg in (True, False):
        path = write_dng(tmp_path / f"p{jpeg}.dng", picture, preview_image=green, preview_jpeg=jpeg)
        assert share(load_image(path, draft_size=224), GREEN, (0, 0, 1, 1)) > 0.9  # 300 >= 224: preview
        demosaiced = load_image(path, draft_size=400)  # the preview's 300 px are too few: demosaic
        assert demosaiced.size == (200, 150) and share(demosaiced, RED, (0, 0, 1, 1)) > 0.9


def test_raw_from_an_open_file_needs_its_suffix(tmp_path: Path) -> None:
    path = write_dng(tmp_path / "x.dng", two_marks((200, 120)))
    with open(path, "rb") as f, os.fdopen(os.dup(f.fileno()), "rb") as nameless:
        assert load_image(nameless, max_side=512, draft_size=256, suffix=".DNG").size == (100, 60)
    assert preview.thumbnail(path, side=50).size == (50, 30)  # an open file with a name: its suffix


def test_hostile_raw_files_are_reasons(tmp_path: Path) -> None:
    small = Image.new("RGB", (64, 48), "white")
    cases = {
        "declares_400mpx.dng": (
            write_dng(tmp_path / "declares_400mpx.dng", small, declared=(20_000, 20_000)),
            r"RAW image too large: 20000x20000 sensor pixels \(400.0 Mpx\) is over the budget",
        ),
        "declares_10gpx.dng": (
            write_dng(tmp_path / "declares_10gpx.dng", small, declared=(100_000, 100_000)),
            "unreadable RAW file",  # beyond LibRaw's own limits: refused when the header is read
        ),
        "random.nef": (_random_file(tmp_path / "random.nef"), "unreadable RAW file: Unsupported file format"),
        "tiff_100000.nef": (_tiff_claiming(tmp_path / "tiff_100000.nef", 100_000), "unreadable RAW file"),
        "empty.cr3": (_empty(tmp_path / "empty.cr3"), "unreadable RAW file"),
    }
    for path, reason in cases.values():
        with pytest.raises(BadMediaError, match=reason):
            load_image(path)


def test_missing_rawpy_is_a_reason_with_the_install_hint(tmp_path: Path, monkeypatch) -> None:
    path = write_dng(tmp_path / "x.dng", Image.new("RGB", (64, 48), "white"))
    monkeypatch.setitem(sys.modules, "rawpy", None)  # import rawpy now raises ImportError
    with pytest.raises(BadMediaError, match=r"RAW files need rawpy.*mmsearch\[photos\]"):
        load_image(path)


def _random_file(path: Path) -> Path:
    path.write_bytes(random.Random(18).randbytes(50_000))
    return path


def _tiff_claiming(path: Path, side: int) -> Path:
    """A bare TIFF header claiming ``side`` x ``side`` pixels and holding none."""
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + _ifd([(256, _LONG, [side]), (257, _LONG, [side])], 8))
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


# ------------------------------------------------------------------------------------------------- indexing


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_index_skips_hostile_photos_with_reasons_and_keeps_the_good_ones(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    two_marks().save(folder / "good.jpg")
    two_marks().save(folder / "good.heic", quality=90)
    two_marks().save(folder / "good.avif", quality=90)
    write_dng(folder / "good.dng", two_marks((240, 160)))
    heic = (folder / "good.heic").read_bytes()
    (folder / "truncated.heic").write_bytes(heic[: len(heic) // 2])
    (folder / "claims_100mpx.heic").write_bytes(_claim_size(heic, 10_000, 10_000))
    write_dng(folder / "declares_400mpx.dng", Image.new("RGB", (64, 48)), declared=(20_000, 20_000))
    _random_file(folder / "random.nef")
    _tiff_claiming(folder / "tiff_100000.nef", 100_000)
    with mmsearch.Index.create(tmp_path / "index", model="demo") as idx:  # the bundled model: no torch
        report = idx.add_folder(folder)
    skipped = {Path(p).name: reason for p, reason in report.skipped}
    assert report.images_embedded == 4, (report.images_embedded, skipped)
    assert set(skipped) == {
        "truncated.heic",
        "claims_100mpx.heic",
        "declares_400mpx.dng",
        "random.nef",
        "tiff_100000.nef",
    }
    assert "corrupt or truncated" in skipped["truncated.heic"]
    assert "over the budget" in skipped["claims_100mpx.heic"]
    assert "RAW image too large" in skipped["declares_400mpx.dng"]
    assert (
        "unreadable RAW file" in skipped["random.nef"] and "unreadable RAW file" in skipped["tiff_100000.nef"]
    )


def test_photo_formats_are_found_by_meaning_on_the_demo_model(tmp_path: Path) -> None:
    """A HEIC red circle, an AVIF green triangle and a DNG blue square among JPEG shapes of other colours
    and kinds: each is the first image hit of its own description."""
    rng = random.Random(18)
    folder = tmp_path / "photos"
    folder.mkdir()

    def draw(colour: str, shape: str) -> Image.Image:
        return world.render(world.Attributes(colour, shape, "large", 1, "white"), rng)

    draw("red", "circle").save(folder / "circle.heic", quality=90)
    draw("green", "triangle").save(folder / "triangle.avif", quality=90)
    # Twice the demo size, so that the half-size demosaic gives the demo's 256 px back.
    write_dng(folder / "square.dng", draw("blue", "square").resize((512, 512), Image.Resampling.BICUBIC))
    others = [
        ("yellow", "star"),
        ("purple", "square"),
        ("orange", "triangle"),
        ("purple", "circle"),
        ("yellow", "circle"),
        ("orange", "star"),
        ("green", "square"),
        ("blue", "star"),
    ]
    for n, (colour, shape) in enumerate(others):
        draw(colour, shape).save(folder / f"other{n}.jpg", quality=92)
    with mmsearch.Index.create(tmp_path / "index", model="demo") as idx:
        report = idx.add_folder(folder)
        assert report.images_embedded == 11 and not report.skipped
        for query, name in (
            ("a red circle", "circle.heic"),
            ("a green triangle", "triangle.avif"),
            ("a blue square", "square.dng"),
        ):
            hits = idx.search_text(query, target="images", k=3)
            assert Path(hits[0].path).name == name, (query, [Path(h.path).name for h in hits])
