"""What not to index: .mmsearchignore files (gitignore rules), --exclude, hidden entries, cache folders; and
an exclusion added later forgetting what the index held there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mmsearch
from mmsearch.cli import app
from mmsearch.errors import ConfigError
from mmsearch.ignore import (
    CACHE_FOLDER_REASON,
    HIDDEN_FOLDER_REASON,
    IGNORE_FILE,
    MAX_IGNORE_FILE_BYTES,
    MAX_IGNORE_RULES,
)
from mmsearch.scan import ScanResult, scan
from tests.conftest import TINY_MODEL, solid
from tests.test_ingest import assert_consistent


def touch(*paths: Path) -> None:
    """The scan reads no pixels: a byte is enough for a file named like an image."""
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def found(result: ScanResult) -> list[str]:
    return sorted(str(f.path.relative_to(result.root)) for f in result.files)


def excluded(result: ScanResult) -> dict[str, str]:
    return {str(p.relative_to(result.root)): reason for p, reason in result.excluded}


def test_ignore_files_nest_and_negate_like_gitignore(tmp_path: Path) -> None:
    names = [
        "a.jpg",
        "edit.psd.png",
        "raw/x.jpg",
        "raw/keep.jpg",
        "cache.jpg/t.jpg",  # a folder: "*.jpg/" names folders only, not a.jpg
        "sub/c.png",
        "sub/d.png",
        "sub/top.jpg",
        "sub/deep/e.jpg",
        "sub/deep/f.png",
        "top.jpg",
        "trips/2020/rome/cover.jpg",
        "trips/2020/rome/day1.jpg",
    ]
    touch(*(tmp_path / n for n in names))
    (tmp_path / IGNORE_FILE).write_text(
        "# comment\n\nraw/*\n!raw/keep.jpg\n*.png\n/top.jpg\n*.jpg/\ntrips/**/cover.jpg\n"
    )
    (tmp_path / "sub" / IGNORE_FILE).write_text("!d.png\n")  # a deeper file negates its parent's rule
    (tmp_path / "sub" / "deep" / IGNORE_FILE).write_text("!*.png\n*.jpg\n")
    result = scan(tmp_path)
    assert found(result) == [
        "a.jpg",
        "raw/keep.jpg",
        "sub/d.png",
        "sub/deep/f.png",
        "sub/top.jpg",  # "/top.jpg" is anchored to the folder of its ignore file
        "trips/2020/rome/day1.jpg",
    ]
    root_file = f"{IGNORE_FILE} in {tmp_path}"
    assert excluded(result) == {
        "cache.jpg": f"{root_file}: *.jpg/",
        "edit.psd.png": f"{root_file}: *.png",
        "raw/x.jpg": f"{root_file}: raw/*",
        "sub/c.png": f"{root_file}: *.png",
        "sub/deep/e.jpg": f"{IGNORE_FILE} in {tmp_path / 'sub' / 'deep'}: *.jpg",
        "top.jpg": f"{root_file}: /top.jpg",
        "trips/2020/rome/cover.jpg": f"{root_file}: trips/**/cover.jpg",
    }
    assert result.problems == []


def test_an_excluded_folder_is_not_walked_so_nothing_under_it_comes_back(tmp_path: Path) -> None:
    touch(tmp_path / "exports" / "1.jpg", tmp_path / "exports" / "keep" / "2.jpg", tmp_path / "ok.jpg")
    (tmp_path / IGNORE_FILE).write_text("exports/\n!exports/keep/2.jpg\n")
    # Were the folder walked, its own ignore file's bad pattern would be reported.
    (tmp_path / "exports" / IGNORE_FILE).write_text("!\n")
    result = scan(tmp_path)
    assert found(result) == ["ok.jpg"]
    assert excluded(result) == {"exports": f"{IGNORE_FILE} in {tmp_path}: exports/"}
    assert result.problems == []


def test_cache_folders_and_hidden_entries(tmp_path: Path) -> None:
    touch(
        tmp_path / "album" / "IMG_1.jpg",
        tmp_path / "album" / "@eaDir" / "IMG_1.jpg" / "SYNOPHOTO_THUMB_XL.jpg",
        tmp_path / "@eaDir" / "x" / "SYNOPHOTO_THUMB_M.jpg",
        tmp_path / ".git" / "objects" / "a.png",
        tmp_path / "__MACOSX" / "album" / "._IMG_1.jpg",
        tmp_path / ".Trash-1000" / "files" / "old.jpg",
        tmp_path / "$RECYCLE.BIN" / "gone.jpg",
        tmp_path / ".thumbnails" / "large" / "t.png",
        tmp_path / ".private" / "secret.jpg",
        tmp_path / "album" / "._IMG_1.jpg",  # AppleDouble file a Mac leaves on foreign drives
        tmp_path / "album" / ".DS_Store",
    )
    result = scan(tmp_path)
    assert found(result) == ["album/IMG_1.jpg"]
    assert excluded(result) == {
        ".Trash-1000": CACHE_FOLDER_REASON,
        ".git": CACHE_FOLDER_REASON,
        ".private": HIDDEN_FOLDER_REASON,
        ".thumbnails": CACHE_FOLDER_REASON,
        "$RECYCLE.BIN": CACHE_FOLDER_REASON,
        "@eaDir": CACHE_FOLDER_REASON,
        "__MACOSX": CACHE_FOLDER_REASON,
        "album/@eaDir": CACHE_FOLDER_REASON,
    }
    assert result.hidden_files == 1  # ._IMG_1.jpg is named like media; .DS_Store is not counted
    assert result.empty_folders == []

    # include_hidden walks hidden names; cache folders stay out even when their name is hidden.
    shown = scan(tmp_path, include_hidden=True)
    assert found(shown) == [".private/secret.jpg", "album/._IMG_1.jpg", "album/IMG_1.jpg"]
    assert set(excluded(shown)) == set(excluded(result)) - {".private"}
    assert shown.hidden_files == 0


def test_exclude_patterns_are_relative_to_the_root_and_win_over_ignore_files(tmp_path: Path) -> None:
    touch(*(tmp_path / n for n in ("a.png", "keep.png", "top.jpg", "sub/top.jpg", "sub/b.jpg", "c.jpg")))
    (tmp_path / IGNORE_FILE).write_text("!a.png\nc.jpg\n")
    result = scan(tmp_path, exclude=["*.png", "/top.jpg", "sub/*", "!sub/b.jpg", "!keep.png", "!c.jpg"])
    assert found(result) == ["c.jpg", "keep.png", "sub/b.jpg"]  # the caller's "!c.jpg" wins too
    assert excluded(result) == {
        "a.png": "--exclude *.png",  # the ignore file's "!a.png" cannot undo the caller's exclusion
        "sub/top.jpg": "--exclude sub/*",
        "top.jpg": "--exclude /top.jpg",
    }
    assert found(scan(tmp_path, exclude="*.png")) == ["sub/b.jpg", "sub/top.jpg", "top.jpg"]


@pytest.mark.parametrize("pattern", ["!", "\\", "[z-a].jpg"])
def test_an_invalid_exclude_pattern_is_a_config_error(tmp_path: Path, pattern: str) -> None:
    with pytest.raises(ConfigError, match="invalid exclude pattern"):
        scan(tmp_path, exclude=["*.png", pattern])


def test_ignore_files_that_cannot_be_applied_are_problems_not_crashes(tmp_path: Path) -> None:
    for name in ("big", "binary", "many", "partly", "utf16", "latin1", "fifo"):
        touch(tmp_path / name / "a.png", tmp_path / name / "b.jpg")
    (tmp_path / "big" / IGNORE_FILE).write_bytes(b"*.png\n" + b"#" * MAX_IGNORE_FILE_BYTES)
    (tmp_path / "binary" / IGNORE_FILE).write_bytes(b"*.png\x00\x01\x02")
    (tmp_path / "many" / IGNORE_FILE).write_text("".join(f"x{i}\n" for i in range(MAX_IGNORE_RULES + 1)))
    (tmp_path / "partly" / IGNORE_FILE).write_text("!\n*.png\n[z-a]\n")  # bad lines left out, not the rest
    (tmp_path / "utf16" / IGNORE_FILE).write_text("*.png\n", encoding="utf-16")
    # Patterns in bytes that are not UTF-8 match the names they were written for.
    raw_name = os.path.join(os.fsencode(tmp_path / "latin1"), b"caf\xe9.jpg")
    Path(os.fsdecode(raw_name)).write_bytes(b"x")
    (tmp_path / "latin1" / IGNORE_FILE).write_bytes(b"caf\xe9.jpg\n")
    os.mkfifo(tmp_path / "fifo" / IGNORE_FILE)  # opening it must not block the scan
    done: list[ScanResult] = []
    worker = threading.Thread(target=lambda: done.append(scan(tmp_path)), daemon=True)
    worker.start()
    worker.join(30)
    assert done, "the scan blocked on a FIFO"
    result = done[0]
    assert found(result) == [
        "big/a.png",
        "big/b.jpg",
        "binary/a.png",
        "binary/b.jpg",
        "fifo/a.png",
        "fifo/b.jpg",
        "latin1/a.png",
        "latin1/b.jpg",
        "many/a.png",
        "many/b.jpg",
        "partly/b.jpg",
        "utf16/b.jpg",
    ]
    assert (
        Path(os.fsdecode(raw_name)),
        f"{IGNORE_FILE} in {tmp_path / 'latin1'}: caf\udce9.jpg",
    ) in result.excluded
    problems = sorted((str(p.relative_to(tmp_path)), r) for p, r in result.problems)
    assert problems == [
        (f"big/{IGNORE_FILE}", f"ignore file not applied: larger than {MAX_IGNORE_FILE_BYTES} bytes"),
        (f"binary/{IGNORE_FILE}", "ignore file not applied: not a text file"),
        (f"fifo/{IGNORE_FILE}", "ignore file not applied: not a regular file"),
        (f"many/{IGNORE_FILE}", f"ignore file not applied: more than {MAX_IGNORE_RULES} patterns"),
        (f"partly/{IGNORE_FILE}", "line 1: invalid pattern '!' (left out)"),
        (f"partly/{IGNORE_FILE}", "line 3: invalid pattern '[z-a]' (left out)"),
    ]


def test_rules_apply_to_caption_files_and_manifests(tmp_path: Path) -> None:
    touch(tmp_path / "a.png", tmp_path / "drafts" / "b.png", tmp_path / ".hidden" / "c.png")
    (tmp_path / "a.txt").write_text("a caption nobody should index")
    rows = [{"path": p, "caption": "from the manifest"} for p in ("a.png", "drafts/b.png", ".hidden/c.png")]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / IGNORE_FILE).write_text("*.txt\ndrafts/\n")
    result = scan(tmp_path)
    # Rows for images left out on purpose are not "no indexed image" problems.
    assert result.problems == []
    assert [c.text for c in result.captions[tmp_path / "a.png"]] == ["from the manifest"]
    (tmp_path / IGNORE_FILE).write_text("*.txt\ndrafts/\ncaptions.jsonl\n")
    result = scan(tmp_path)
    assert result.captions == {}
    assert excluded(result)["captions.jsonl"] == f"{IGNORE_FILE} in {tmp_path}: captions.jsonl"


def test_an_exclusion_added_later_forgets_files_captions_and_vectors(
    tiny_index: mmsearch.Index, tmp_path: Path
) -> None:
    media = tmp_path / "m"
    for rel, color in (("a/one.png", "red"), ("b/two.png", "green"), ("b/three.png", "blue")):
        solid(media / rel, color)
        (media / rel).with_suffix(".txt").write_text(f"caption of {rel}")
    solid(media / ".private" / "four.png", "yellow")
    r = tiny_index.add_folder(media, include_hidden=True)
    assert r.images_embedded == 4 and r.captions_added == 3 and r.excluded == []
    assert tiny_index.stats()["vectors"] == {"image": 4, "caption": 3}

    (media / IGNORE_FILE).write_text("b/\n")
    r = tiny_index.add_folder(media)  # .private is hidden again, b is ignored: both forgotten
    assert dict(r.excluded) == {
        str(media / ".private"): HIDDEN_FOLDER_REASON,
        str(media / "b"): f"{IGNORE_FILE} in {media}: b/",
    }
    assert (r.files_removed, r.captions_removed, r.images_embedded) == (3, 2, 0)
    assert tiny_index.stats()["vectors"] == {"image": 1, "caption": 1}
    hits = tiny_index.search_text("caption of b/two.png", target="all", k=50)
    assert {h.path for h in hits} == {str(media / "a" / "one.png")}
    assert_consistent(tiny_index)

    r = tiny_index.add_folder(media)  # nothing changed: nothing to do
    assert (r.unchanged, r.files_removed, r.images_embedded) == (1, 0, 0)

    r = tiny_index.add_folder(media, exclude=["*.png"])
    assert r.files_removed == 1 and not any(tiny_index.stats()["vectors"].values())
    assert_consistent(tiny_index)

    (media / IGNORE_FILE).unlink()  # lifted: the files come back
    r = tiny_index.add_folder(media)
    assert r.images_embedded == 3 and r.captions_added == 3
    assert_consistent(tiny_index)


def test_cli_exclude_and_include_hidden(tmp_path: Path) -> None:
    media = tmp_path / "m"
    solid(media / "keep.png", "red")
    solid(media / "drop.png", "green")
    solid(media / ".hidden" / "h.png", "blue")
    solid(media / "@eaDir" / "keep.png" / "SYNOPHOTO_THUMB_XL.jpg", "red")
    runner = CliRunner()
    common = ["--index", str(tmp_path / "idx"), "--model", TINY_MODEL, "--pretrained", "random"]
    result = runner.invoke(
        app, ["index", str(media), *common, "--exclude", "drop.png", "--exclude", "*.gif", "--json"]
    )
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)["runs"][0]
    assert run["images_embedded"] == 1
    assert {(e["path"], e["reason"]) for e in run["excluded"]} == {
        (str(media / ".hidden"), HIDDEN_FOLDER_REASON),
        (str(media / "@eaDir"), CACHE_FOLDER_REASON),
        (str(media / "drop.png"), "--exclude drop.png"),
    }

    result = runner.invoke(app, ["index", str(media), *common, "--include-hidden", "--exclude", "drop.png"])
    assert result.exit_code == 0, result.output
    assert "images embedded" in result.stdout and "1 images embedded" in result.stdout
    assert "excluded 2: 1 thumbnail/cache folders, 1 by --exclude" in result.stdout
    assert f"excluded {media / '@eaDir'}: {CACHE_FOLDER_REASON}" in result.stdout

    # Checked before any index is opened or created.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmsearch",
            "index",
            str(media),
            "--index",
            str(tmp_path / "new"),
            "--exclude",
            "!",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "invalid exclude pattern '!'" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "new").exists()
