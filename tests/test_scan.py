"""Scanning and caption pairing: the pairing is what clip-retrieval once broke without a test noticing."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mmsearch.ignore import HIDDEN_FOLDER_REASON
from mmsearch.scan import Caption, scan
from tests.conftest import solid


def captions_by_name(root: Path) -> dict[str, list[str]]:
    result = scan(root)
    return {str(p.relative_to(root)): [c.text for c in cs] for p, cs in result.captions.items()}


def test_sidecar_pairs_by_stem_in_the_same_folder_only(tmp_path: Path) -> None:
    solid(tmp_path / "a" / "photo.jpg")
    solid(tmp_path / "b" / "photo.jpg")
    (tmp_path / "a" / "photo.txt").write_text("caption of a")
    (tmp_path / "b" / "photo.txt").write_text("caption of b")
    assert captions_by_name(tmp_path) == {"a/photo.jpg": ["caption of a"], "b/photo.jpg": ["caption of b"]}


def test_names_with_dots_spaces_and_unicode(tmp_path: Path) -> None:
    solid(tmp_path / "my.holiday.v2.png")
    (tmp_path / "my.holiday.v2.txt").write_text("dots")
    solid(tmp_path / "my holiday.png")
    (tmp_path / "my holiday.txt").write_text("spaces")
    solid(tmp_path / "café 東京.jpg")
    (tmp_path / "café 東京.txt").write_text("unicode ✓")
    solid(tmp_path / "x.jpeg")
    (tmp_path / "x.jpeg.txt").write_text("full-name sidecar")
    assert captions_by_name(tmp_path) == {
        "my.holiday.v2.png": ["dots"],
        "my holiday.png": ["spaces"],
        "café 東京.jpg": ["unicode ✓"],
        "x.jpeg": ["full-name sidecar"],
    }


def test_several_captions_per_image_from_sidecar_lines_and_manifests(tmp_path: Path) -> None:
    solid(tmp_path / "dog.png")
    solid(tmp_path / "sub" / "cat.png")
    (tmp_path / "dog.txt").write_text("a dog\n\n  on a beach  \n")
    rows = [{"path": "dog.png", "caption": "from jsonl"}, {"path": "sub/cat.png", "caption": "a cat"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    (tmp_path / "captions.csv").write_text('path,caption\nsub/cat.png,"a cat, sleeping"\nmissing.png,ghost\n')
    result = scan(tmp_path)
    dog, cat = tmp_path / "dog.png", tmp_path / "sub" / "cat.png"
    assert [c.text for c in result.captions[dog]] == ["a dog", "on a beach", "from jsonl"]
    assert [c.text for c in result.captions[cat]] == ["a cat", "a cat, sleeping"]
    assert result.captions[dog][0] == Caption("a dog", str(tmp_path / "dog.txt"))
    reasons = [r for _, r in result.problems]
    assert any("line 3" in r for r in reasons)  # the bad JSON line
    assert any("missing.png" in r for r in reasons)  # a manifest row for no image


def test_text_files_without_an_image_are_ignored(tmp_path: Path) -> None:
    solid(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not a caption")
    result = scan(tmp_path)
    assert [f.path.name for f in result.files] == ["a.png"]
    assert result.captions == {}


def test_latin1_caption_file_is_read(tmp_path: Path) -> None:
    solid(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert captions_by_name(tmp_path) == {"a.png": ["café"]}


def test_kinds_hidden_folders_and_nested_indexes(tmp_path: Path) -> None:
    solid(tmp_path / "a.PNG")
    (tmp_path / "talk.MP3").write_bytes(b"x")
    (tmp_path / "doc.pdf").write_bytes(b"x")
    solid(tmp_path / ".hidden" / "b.png")
    solid(tmp_path / "idx" / "c.png")
    (tmp_path / "idx" / "mmsearch.json").write_text("{}")
    result = scan(tmp_path)
    assert sorted((f.path.name, f.kind) for f in result.files) == [("a.PNG", "image"), ("talk.MP3", "audio")]
    # A hidden folder is listed with its reason; a nested index is not media, not an exclusion.
    assert result.excluded == [(tmp_path / ".hidden", HIDDEN_FOLDER_REASON)]


def test_symlink_loop_ends_and_broken_symlink_is_reported(tmp_path: Path) -> None:
    solid(tmp_path / "d" / "a.png")
    os.symlink(tmp_path / "d", tmp_path / "d" / "loop")
    os.symlink(tmp_path, tmp_path / "d" / "up")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "broken.png")
    result = scan(tmp_path)
    assert [f.path.name for f in result.files] == ["a.png"]
    assert (tmp_path / "broken.png", "broken symlink") in result.problems


def test_non_utf8_file_names_are_found(tmp_path: Path) -> None:
    raw = os.path.join(os.fsencode(tmp_path), b"bad-\xff-name.png")
    solid(Path(os.fsdecode(raw)))
    with open(os.path.join(os.fsencode(tmp_path), b"bad-\xff-name.txt"), "wb") as f:
        f.write(b"caption of a badly named file")
    result = scan(tmp_path)
    assert [os.fsencode(f.path) for f in result.files] == [raw]
    assert [c.text for c in result.captions[Path(os.fsdecode(raw))]] == ["caption of a badly named file"]
