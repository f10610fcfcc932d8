"""Photo formats (issue 18): what decoding a HEIC, AVIF or camera RAW (DNG) costs per image next to a JPEG of
the same picture, at the model's input size (what ingestion asks for) and at the 1024-px default.

    python benchmarks/bench_photos.py [--runs 5] [--quick]

Files, generated deterministically into a temporary folder: one natural-looking picture per size (smooth
gradients, a fine random texture, 60 filled shapes and lines, sensor-like noise, so the codecs do real work)
of 24 Mpx (6000x4000, 3:2 like a camera) and 12 Mpx (4032x3024, 4:3 like a phone), saved as

* JPEG, quality 90 (Pillow, baseline, 4:2:0): the reference of every ratio;
* HEIC, pillow-heif (x265, quality 60, preset ultrafast for a short run; about iPhone-sized files) with the
  320-px thumbnail iPhones embed (``thumbnails=[320]``: 320x240 at 4:3, 320x213 at 3:2);
* AVIF, Pillow's plugin (quality 75, speed 10);
* DNG, 12 Mpx only, written by the tests' hand-made writer (uncompressed 16-bit RGGB mosaic): with a full-size
  JPEG preview (as Canon/Nikon/Sony embed), with a 1024x768 one (Adobe DNG Converter's medium preview), with
  a 160x120 one (too small for the model: the preview is looked at, then the sensor demosaiced) and without.

Each file is decoded by :func:`mmsearch.images.load_image` as ingestion does
(``load_image(path, draft_size=emb.input_size)``) at 224 px (ViT-B-32, the default model) and 256 px
(ViT-B-32-256), and with ``draft_size=None`` (target = ``max_side`` = 1024: previews, query images). For
reference, ``full`` is a full-resolution decode with nothing reduced (and no resize to 1024, which is why
the JPEG's ``full`` can be quicker than its 1024 column): ``Image.open().load()`` for the JPEG and
LibRaw's full demosaic (``postprocess()``: AHD, camera white balance) for the DNG. HEIC and AVIF have no
separate ``full``: without a large enough thumbnail they always decode in full (the 1024 column).

Runs are interleaved (one warm-up round, then ``--runs`` rounds over every cell) so the load of the shared
machine falls on every format alike; the figures are the median wall ms and the median CPU ms of this
process (all decoder threads) per decode, and the ratios to the JPEG of the same size and column in the same
run (the table gives the median wall ms, then the wall and CPU ratios). A column whose decode path is the
same as another's for that file (same decoded size: the draft size only picks what is decoded) is measured
once and reported in both (``same_as``). ``decoded_from`` says which path was taken (DCT-scaled JPEG, HEIC thumbnail, RAW preview, demosaic).

Caveat: the DNGs are uncompressed, so the demosaic rows leave out the decompression of a camera's compressed
RAW (lossless JPEG / CR3 / NEF compression); the preview rows do not depend on it.

Writes ``benchmarks/results/photos.json`` (with ``os.getloadavg()`` before and after: the machine is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from _machine import cpu_model, package_versions
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsearch.images import DEFAULT_MAX_SIDE, load_image  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "photos.json"
SIZES = {"24mpx": (6000, 4000), "12mpx": (4032, 3024)}
#: Model input sizes measured: ViT-B-32 (the default model) and ViT-B-32-256.
INPUT_SIZES = (224, 256)
JPEG_QUALITY = 90
HEIC_QUALITY = 60
HEIC_THUMBNAIL = 320  # what iPhones embed
AVIF_QUALITY = 75
DNG_PREVIEW_JPEG_QUALITY = 92  # write_dng's


def natural(width: int, height: int, seed: int = 18) -> Image.Image:
    """A deterministic photo-like picture: low-frequency gradients, a fine texture, shapes and noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    field = rng.integers(0, 256, (height // 4, width // 4), dtype=np.uint8)
    texture = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    tex = (np.asarray(texture, np.float32) - 128) * 0.3
    rgb = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, p, q = rng.uniform(0.5, 3, 4)
        wave = 60 * np.sin(2 * np.pi * (a * x + p)) * np.cos(2 * np.pi * (b * y + q))
        rgb[..., c] = 120 + wave + 40 * (x - y) * (c - 1) + tex
    im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    del rgb, tex
    draw = ImageDraw.Draw(im)
    side = max(width, height)
    for _ in range(60):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(side // 60, side // 8))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + r, y0 + int(r * rng.uniform(0.3, 1.5))], fill=colour)
        else:
            end = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            draw.line([(x0, y0), end], fill=colour, width=max(2, r // 20))
    arr = np.asarray(im).astype(np.int16)
    arr += rng.normal(0, 3, arr.shape).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_files(folder: Path, sizes: list[str]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The test files, each a dict with its name, format, size key and path; seconds spent making each kind."""
    import pillow_heif

    from tests.test_photo_formats import write_dng

    pillow_heif.register_heif_opener()
    cases: list[dict[str, Any]] = []
    spent: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(kind: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        spent[kind] = round(spent.get(kind, 0.0) + time.perf_counter() - t, 2)

    for key in sizes:
        w, h = SIZES[key]
        with timed("picture"):
            picture = natural(w, h)
        jpg, heic, avif = folder / f"{key}.jpg", folder / f"{key}.heic", folder / f"{key}.avif"
        with timed("jpeg"):
            picture.save(jpg, quality=JPEG_QUALITY)
        with timed("heic"):
            picture.save(
                heic, quality=HEIC_QUALITY, thumbnails=[HEIC_THUMBNAIL], enc_params={"preset": "ultrafast"}
            )
        with timed("avif"):
            picture.save(avif, quality=AVIF_QUALITY, speed=10)
        cases += [
            {"name": f"JPEG {key}", "format": "JPEG", "size": key, "path": jpg},
            {"name": f"HEIC {key}", "format": "HEIC", "size": key, "path": heic},
            {"name": f"AVIF {key}", "format": "AVIF", "size": key, "path": avif},
        ]
        if key == "12mpx":
            previews = {
                "full-size preview": picture,
                "1024px preview": picture.resize((1024, 768), Image.Resampling.LANCZOS),
                "160px preview": picture.resize((160, 120), Image.Resampling.LANCZOS),
                "no preview": None,
            }
            for label, preview in previews.items():
                path = folder / f"{key}-{label.replace(' ', '_')}.dng"
                with timed("dng"):
                    write_dng(path, picture, preview_image=preview)
                cases.append(
                    {
                        "name": f"DNG {key}, {label}",
                        "format": "DNG",
                        "size": key,
                        "path": path,
                        "preview": label,
                    }
                )
    for case in cases:
        case["file_mb"] = round(case["path"].stat().st_size / 1e6, 2)
    return cases, spent


def decoded_from(case: dict[str, Any], target: int | None) -> str:
    """Which path load_image takes for this file and draft size (probed outside the timings)."""
    target = target or DEFAULT_MAX_SIDE
    path = case["path"]
    if case["format"] == "DNG":
        import rawpy

        with rawpy.imread(str(path)) as raw:
            try:
                thumb = raw.extract_thumb()
            except (rawpy.LibRawError, rawpy.NotSupportedError):
                return "half-size demosaic (no preview)"
            if thumb.format == rawpy.ThumbFormat.JPEG:
                data = bytes(thumb.data)
                with Image.open(io.BytesIO(data)) as p:
                    pw, ph = p.size
                if min(pw, ph) >= target:
                    with Image.open(io.BytesIO(data)) as p:
                        p.draft("RGB", (target, target))
                        return f"JPEG preview {pw}x{ph}, DCT-scaled to {p.size[0]}x{p.size[1]}"
                return f"half-size demosaic (preview {pw}x{ph} too small)"
            return "bitmap preview"
    with Image.open(path) as im:
        full = im.size
        im.draft("RGB", (target, target))
        if im.size == full:
            return f"full decode {full[0]}x{full[1]}"
        kind = "thumbnail" if case["format"] == "HEIC" else "DCT-scaled"
        return f"{kind} {im.size[0]}x{im.size[1]}"


def full_decode(case: dict[str, Any]) -> Callable[[], Any] | None:
    """The full-resolution reference decode, for the JPEG and the DNG without preview; None for the others."""
    path = case["path"]
    if case["format"] == "JPEG":

        def jpeg() -> Any:
            with Image.open(path) as im:
                im.load()
                return im.size

        return jpeg
    if case.get("preview") == "no preview":
        import rawpy

        def demosaic() -> Any:
            with rawpy.imread(str(path)) as raw:
                return raw.postprocess(use_camera_wb=True).shape

        return demosaic
    return None


def measure(
    cells: list[tuple[str, str, Callable[[], Any]]], runs: int
) -> dict[tuple[str, str], dict[str, Any]]:
    """Median wall and CPU ms per cell; rounds interleave the cells, the first round is a warm-up."""
    wall: dict[tuple[str, str], list[float]] = {(n, c): [] for n, c, _ in cells}
    cpu: dict[tuple[str, str], list[float]] = {(n, c): [] for n, c, _ in cells}
    for r in range(runs + 1):
        for name, column, fn in cells:
            t, c = time.perf_counter(), time.process_time()
            fn()
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if r:
                wall[name, column].append(dt * 1000)
                cpu[name, column].append(dc * 1000)
        print(f"  round {r}/{runs} done" + (" (warm-up)" if r == 0 else ""), flush=True)
    return {
        k: {
            "wall_ms": round(statistics.median(wall[k]), 1),
            "cpu_ms": round(statistics.median(cpu[k]), 1),
            "wall_ms_runs": [round(x, 1) for x in wall[k]],
        }
        for k in wall
    }


def column_name(target: int | None) -> str:
    return str(target) if target else f"none ({DEFAULT_MAX_SIDE})"


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = (
        ["file", "MB"]
        + [
            f"{c} px"
            if c[0].isdigit()
            else ("draft_size=None (1024 px)" if c.startswith("none") else "full-res decode")
            for c in columns
        ]
        + [f"decoded from, at {columns[0]} px"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["name"], f"{row['file_mb']:.1f}"]
        for c in columns:
            m = row["columns"].get(c)
            if m is None:
                cells.append("")
                continue
            ratio, cpu = m.get("x_jpeg_wall"), m.get("x_jpeg_cpu")
            times = f" ({ratio:.1f}×" + (f"; CPU {cpu:.1f}×)" if cpu else ")") if ratio is not None else ""
            cells.append(f"{m['wall_ms']:.0f} ms{times}")
        cells.append(row["columns"][columns[0]]["decoded_from"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="measured rounds per cell (median; default 5)")
    parser.add_argument("--quick", action="store_true", help="12 Mpx files only, 3 rounds")
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    sizes = ["12mpx"] if args.quick else ["24mpx", "12mpx"]
    load_before = os.getloadavg()
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="mmsearch-bench-photos-") as tmp:
        t = time.perf_counter()
        cases, spent = make_files(Path(tmp), sizes)
        made_s = time.perf_counter() - t
        print(f"made {len(cases)} files in {made_s:.1f} s: {spent}", flush=True)

        targets: list[int | None] = [*INPUT_SIZES, None]
        columns = [column_name(x) for x in targets] + ["full"]
        cells: list[tuple[str, str, Callable[[], Any]]] = []
        paths: dict[str, dict[str, str]] = {}
        # A column whose decode path is the same as an earlier column's (same file, same decoded size) does
        # the same work (the draft size only picks what is decoded; the output is reduced to max_side either
        # way): measured once, reported in both (``same_as``).
        same_as: dict[tuple[str, str], str] = {}
        for case in cases:
            name = case["name"]
            paths[name] = {}
            first_of: dict[str, str] = {}
            for target in targets:
                column = column_name(target)
                path_taken = paths[name][column] = decoded_from(case, target)
                if path_taken in first_of:
                    same_as[name, column] = first_of[path_taken]
                    continue
                first_of[path_taken] = column
                cells.append((name, column, functools.partial(load_image, case["path"], draft_size=target)))
            full = full_decode(case)
            if full is not None:
                cells.append((name, "full", full))
                paths[name]["full"] = (
                    "full demosaic (LibRaw AHD, full size)" if case["format"] == "DNG" else "full decode"
                )
        print(f"measuring {len(cells)} cells, {runs} rounds + 1 warm-up", flush=True)
        timings = measure(cells, runs)
        for (name, column), first in same_as.items():
            timings[name, column] = {**timings[name, first], "same_as": first}

    rows = []
    for case in cases:
        jpeg = f"JPEG {case['size']}"
        row: dict[str, Any] = {
            "name": case["name"],
            "format": case["format"],
            "size": case["size"],
            "pixels": "x".join(map(str, SIZES[case["size"]])),
            "file_mb": case["file_mb"],
            "columns": {},
        }
        if "preview" in case:
            row["preview"] = case["preview"]
        for column in columns:
            m = timings.get((case["name"], column))
            if m is None:
                continue
            ref = timings.get((jpeg, column))
            entry = {**m, "decoded_from": paths[case["name"]][column]}
            if ref is not None and case["name"] != jpeg:
                entry["x_jpeg_wall"] = round(m["wall_ms"] / ref["wall_ms"], 2)
                entry["x_jpeg_cpu"] = round(m["cpu_ms"] / ref["cpu_ms"], 2) if ref["cpu_ms"] else None
            row["columns"][column] = entry
        rows.append(row)

    import pillow_heif

    result: dict[str, Any] = {
        "benchmark": "photos",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "benchmarks/bench_photos.py", *sys.argv[1:]]),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "packages": package_versions(["pillow", "pillow-heif", "rawpy", "numpy"]),
            "libheif": pillow_heif.libheif_info().get("libheif"),
            "loadavg_before": [round(x, 2) for x in load_before],
        },
        "settings": {
            "runs": runs,
            "input_sizes": list(INPUT_SIZES),
            "max_side": DEFAULT_MAX_SIDE,
            "jpeg_quality": JPEG_QUALITY,
            "heic": {"quality": HEIC_QUALITY, "thumbnails": [HEIC_THUMBNAIL], "x265_preset": "ultrafast"},
            "avif": {"quality": AVIF_QUALITY, "speed": 10},
            "dng": "uncompressed 16-bit RGGB (tests/test_photo_formats.py write_dng), preview JPEG quality 92",
        },
        "generated_files_s": round(made_s, 1),
        "generated_by_kind_s": spent,
        "rows": rows,
    }
    result["markdown"] = markdown(rows, columns)
    result["total_s"] = round(time.perf_counter() - started, 1)
    result["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(result["markdown"])
    print()
    for row in rows:
        for column, m in row["columns"].items():
            cpu = f", CPU {m['cpu_ms']:.0f} ms" + (
                f" ({m['x_jpeg_cpu']:.1f}×)" if m.get("x_jpeg_cpu") else ""
            )
            print(f"{row['name']:32} {column:12} {m['wall_ms']:8.1f} ms{cpu}  [{m['decoded_from']}]")
    print(
        f"\nload average before {result['machine']['loadavg_before']}, after {result['machine']['loadavg_after']}"
    )
    print(f"total {result['total_s']} s; wrote {RESULTS}")


if __name__ == "__main__":
    main()
