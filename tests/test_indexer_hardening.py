"""Issue 11, indexer side: links out of the folder (5), unavailable drives (10), settings checked at
creation (14), a hung decode (15). Real SQLite, FAISS and OpenCLIP (tiny random model); real links, a real
tmpfs mount where the machine allows it; the only fake is the hang itself (a loader that blocks)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import mmsearch
from mmsearch import db, ingest
from mmsearch.api import WHISPER_LANGUAGES, open_or_create
from mmsearch.errors import ConfigError, MmsearchError
from mmsearch.scan import OUTSIDE_LINK_REASON, scan
from mmsearch.store import Store
from tests.conftest import TINY_MODEL, solid
from tests.test_ingest import assert_consistent

ROOT = Path(__file__).resolve().parents[1]


def faiss_matches_catalog(idx: mmsearch.Index) -> None:
    """The first half of assert_consistent, for an index that knowingly keeps files not on disk now."""
    idx.store.refresh()
    with idx.store.catalog.read() as conn:
        for kind in db.VECTOR_KINDS:
            rows = {
                int(i)
                for (i,) in conn.execute(select(db.embeddings.c.id).where(db.embeddings.c.kind == kind))
            }
            assert set(idx.store.vectors(kind).ids().tolist()) == rows, kind


def names(idx: mmsearch.Index) -> set[str]:
    return {os.fsdecode(k) for k, r in idx.store.catalog.files_by_key().items() if r.status == "ok"}


# --- 5: links that point outside the indexed folder ------------------------------------------------------
def _folder_with_links(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "private"
    solid(root / "photos" / "a.png", "red")
    solid(outside / "secret.png", "black")
    solid(outside / "album" / "b.png", "blue")
    (outside / "a.txt").write_text("a caption from outside")
    os.symlink(outside / "secret.png", root / "secret.png")  # a file link out of the folder
    os.symlink(outside / "album", root / "album")  # a folder link out of the folder
    os.symlink(outside / "a.txt", root / "photos" / "a.txt")  # a caption link out of the folder
    os.symlink(root / "photos" / "a.png", root / "same.png")  # links that stay inside: followed
    os.symlink(root / "photos", root / "photos-again")
    os.symlink(root / "secret.png", root / "chain.png")  # a link to a link that leaves
    return root, outside


def test_scan_does_not_follow_links_out_of_the_folder_unless_asked(tmp_path: Path) -> None:
    root, outside = _folder_with_links(tmp_path)
    result = scan(root)
    found = sorted(str(f.path.relative_to(root)) for f in result.files)
    assert found == ["photos/a.png", "same.png"]  # photos-again/ is photos/: walked once
    assert result.captions == {}
    refused = sorted(str(p.relative_to(root)) for p, r in result.problems if r == OUTSIDE_LINK_REASON)
    assert refused == ["album", "chain.png", "photos/a.txt", "secret.png"]

    result = scan(root, follow_links=True)
    found = sorted(str(f.path.relative_to(root)) for f in result.files)
    assert found == ["album/b.png", "chain.png", "photos/a.png", "same.png", "secret.png"]
    assert [c.text for c in result.captions[root / "photos" / "a.png"]] == ["a caption from outside"]
    assert not result.problems


def test_links_out_of_the_folder_stay_out_of_the_index(tiny_index: mmsearch.Index, tmp_path: Path) -> None:
    root, _ = _folder_with_links(tmp_path)
    report = tiny_index.add_folder(root)
    assert names(tiny_index) == {str(root / "photos" / "a.png"), str(root / "same.png")}
    recorded = {s["path"]: s["reason"] for s in tiny_index.skipped()}
    assert recorded[str(root / "secret.png")] == OUTSIDE_LINK_REASON
    assert recorded[str(root / "album")] == OUTSIDE_LINK_REASON
    assert (str(root / "secret.png"), OUTSIDE_LINK_REASON) in report.skipped
    assert tiny_index.stats()["vectors"] == {"image": 1}  # a.png and same.png: one content, no caption

    report = tiny_index.add_folder(root, follow_links=True)  # the user opts in
    assert report.images_embedded == 2 and report.captions_added == 1  # secret and b; a.png's caption
    assert str(root / "album" / "b.png") in names(tiny_index)
    assert not tiny_index.skipped()
    assert_consistent(tiny_index)

    # A later run without the opt-in keeps what the user asked for once (like an unplugged drive) ...
    report = tiny_index.add_folder(root)
    assert report.files_removed == 0 and report.kept_unavailable == 3
    assert {p for p, _ in report.unavailable} == {str(root / n) for n in ("album", "chain.png", "secret.png")}
    # (the caption read through a link is no longer read: a.png, which is seen, loses it)
    assert tiny_index.stats()["vectors"] == {"image": 3}
    # ... until pruned.
    report = tiny_index.add_folder(root, prune=True)
    assert names(tiny_index) == {str(root / "photos" / "a.png"), str(root / "same.png")}
    assert_consistent(tiny_index)


# --- 10: an unplugged drive does not erase its part of the index ------------------------------------------
def _drive_setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    root, drive = tmp_path / "root", tmp_path / "x" / "drive"
    for i, color in enumerate(("red", "green")):
        solid(root / "photos" / f"p{i}.png", color)
        (root / "photos" / f"p{i}.txt").write_text(f"photo caption {i}")
    for i, color in enumerate(("blue", "yellow")):
        solid(drive / f"d{i}.png", color)
        (drive / f"d{i}.txt").write_text(f"drive caption {i}")
    os.symlink(drive, root / "drive")
    return tmp_path / "index", root, drive


def test_dangling_drive_link_keeps_its_files_until_pruned(tmp_path: Path) -> None:
    index, root, drive = _drive_setup(tmp_path)
    with mmsearch.Index.create(index, model=TINY_MODEL, pretrained="random") as idx:
        first = idx.add_folder(root, follow_links=True)
        assert first.images_embedded == 4 and first.captions_added == 4
        full = idx.stats()["vectors"]
        assert full == {"image": 4, "caption": 4}

    drive.rename(drive.with_name("unplugged"))  # the link now dangles
    with mmsearch.Index.open(index) as idx:
        r = idx.add_folder(root, follow_links=True)
        assert r.files_removed == 0 and r.captions_removed == 0
        assert r.unavailable == [(str(root / "drive"), "broken symlink")] and r.kept_unavailable == 2
        assert idx.stats()["vectors"] == full  # vectors and captions kept, in SQLite and FAISS
        faiss_matches_catalog(idx)
        hits = idx.search_text("drive caption 1", target="captions", k=1)
        assert hits[0].path == str(root / "drive" / "d1.png")
        kept = idx.stats()["unavailable"]
        assert kept == [
            {
                "root": str(root),
                "files_kept": 2,
                "folders": [{"path": str(root / "drive"), "reason": "broken symlink"}],
            }
        ]

    drive.with_name("unplugged").rename(drive)  # plugged in again: nothing to redo
    with mmsearch.Index.open(index) as idx:
        r = idx.add_folder(root, follow_links=True)
        assert idx._embedder is None  # no model work at all
        assert (r.unchanged, r.images_embedded, r.linked, r.captions_added) == (4, 0, 0, 0)
        assert not r.unavailable and idx.stats()["unavailable"] == []
        assert_consistent(idx)

    drive.rename(drive.with_name("unplugged"))
    with mmsearch.Index.open(index) as idx:
        r = idx.add_folder(root, follow_links=True, prune=True)  # the user says the drive is gone
        assert r.files_removed == 2 and not r.unavailable
        assert idx.stats()["vectors"] == {"image": 2, "caption": 2}
        assert_consistent(idx)


def test_missing_or_empty_root_keeps_everything(tmp_path: Path) -> None:
    index, root = tmp_path / "index", tmp_path / "root"
    for i in range(3):
        solid(root / f"{i}.png", (80 * i, 0, 0))
    with mmsearch.Index.create(index, model=TINY_MODEL, pretrained="random") as idx:
        idx.add_folder(root)
        with pytest.raises(MmsearchError, match="not a folder"):
            idx.add_folder(tmp_path / "never-indexed")  # a typo is still an error

        stash = tmp_path / "stash"
        root.rename(stash)
        r = idx.add_folder(root)
        assert r.unavailable == [(str(root), "folder not found")] and r.kept_unavailable == 3
        assert idx.stats()["files"] == {"image_ok": 3}

        root.mkdir()  # an unmounted drive's mount point: there, but empty
        r = idx.add_folder(root)
        assert r.files_removed == 0 and r.kept_unavailable == 3
        assert r.unavailable == [(str(root), ingest.ROOT_EMPTY_REASON)]
        assert idx.stats()["vectors"] == {"image": 3}
        faiss_matches_catalog(idx)

        r = idx.add_folder(root, prune=True)
        assert r.files_removed == 3 and idx.stats()["files"] == {}
        assert idx.stats()["unavailable"] == []
        assert_consistent(idx)


def test_deleted_files_and_folders_are_still_forgotten(tiny_index: mmsearch.Index, tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in ("a/1.png", "b/2.png", "c/3.png", "c/4.png"):
        solid(root / name, (len(name) * 20, 0, 0))
    solid(root / "top.png", "blue")
    tiny_index.add_folder(root)
    shutil.rmtree(root / "a")  # a deleted folder (its parent is readable)
    (root / "b" / "2.png").unlink()  # the last file of a folder that stays, empty (not a mount point)
    (root / "c" / "3.png").unlink()  # one file among others
    r = tiny_index.add_folder(root)
    assert r.files_removed == 3 and not r.unavailable
    assert names(tiny_index) == {str(root / "c" / "4.png"), str(root / "top.png")}
    assert_consistent(tiny_index)


@pytest.fixture
def mounted(tmp_path: Path) -> Any:
    """A tmpfs mounted at root/disk (needs CAP_SYS_ADMIN, as the disk-full test in test_crash)."""
    point = tmp_path / "root" / "disk"
    point.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    state = {"mounted": True}

    def umount() -> None:
        subprocess.run(["umount", str(point)], check=True)
        state["mounted"] = False

    yield point, umount
    if state["mounted"]:
        subprocess.run(["umount", "-l", str(point)], check=True)


def test_unmounted_disk_keeps_its_files(tmp_path: Path, mounted: Any) -> None:
    point, umount = mounted
    root, index = point.parent, tmp_path / "index"
    solid(root / "home.png", "red")
    solid(point / "d1.png", "green")
    solid(point / "sub" / "d2.png", "blue")
    with mmsearch.Index.create(index, model=TINY_MODEL, pretrained="random") as idx:
        assert idx.add_folder(root).images_embedded == 3
        umount()  # the mount point is an empty folder now
        assert not any(point.iterdir())
        r = idx.add_folder(root)
        assert r.files_removed == 0 and r.kept_unavailable == 2
        assert r.unavailable == [(str(point), ingest.EMPTY_MOUNT_REASON)]
        assert idx.stats()["vectors"] == {"image": 3}
        r = idx.add_folder(root)  # still unplugged on the next run: still known as a mount point
        assert r.files_removed == 0 and r.kept_unavailable == 2
        r = idx.add_folder(root, prune=True)
        assert r.files_removed == 2
        assert_consistent(idx)


# --- 14: settings are checked when an index is created --------------------------------------------------
@pytest.mark.parametrize(
    ("setting", "bad"),
    [
        ("speech_backend", "faster-whipser"),
        ("language", "english"),
        ("language", "xx"),
        ("device", "gpu"),
        ("image_tower", "onnx-int4"),
    ],
)
def test_create_refuses_a_bad_setting_before_loading_anything(tmp_path: Path, setting: str, bad: str) -> None:
    # No such model: had it been loaded before the settings were checked, another error would come first.
    with pytest.raises(ConfigError, match=bad):
        mmsearch.Index.create(tmp_path / "idx", model="no-such-model", **{setting: bad})
    assert not Store.exists(tmp_path / "idx")  # nothing saved


def test_language_codes_are_whisper_s() -> None:
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    assert set(_LANGUAGE_CODES) == WHISPER_LANGUAGES


def test_a_language_is_saved_in_whisper_s_form(tmp_path: Path) -> None:
    with mmsearch.Index.create(
        tmp_path / "idx", model=TINY_MODEL, pretrained="random", language=" EN"
    ) as idx:
        assert idx.store.config["speech"]["language"] == "en"


def test_open_or_create_does_not_ignore_other_speech_settings(tmp_path: Path) -> None:
    path = tmp_path / "idx"
    with open_or_create(path, model=TINY_MODEL, pretrained="random", language="en") as idx:
        assert idx.store.config["speech"]["language"] == "en"
    for option, value in (
        ("speech_model", "small"),
        ("speech_backend", "openai-whisper"),
        ("language", "fr"),
    ):
        with pytest.raises(ConfigError, match=option.replace("_", "-")) as err:
            open_or_create(path, **{option: value})
        assert "new index" in str(err.value)
    # The index's own settings, or none: opened.
    with open_or_create(path, speech_backend="faster-whisper", speech_model=None, language="EN") as idx:
        assert idx.path == path
    with open_or_create(path, device="cpu"):
        pass


# --- 15: one hung decode does not stall the run ----------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_a_hung_decode_is_skipped_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    media = tmp_path / "m"
    for i in range(5):
        solid(media / f"{i}.png", (50 * i, 0, 0))
    solid(media / "hang.png", "white")
    release = threading.Event()
    hung = threading.Event()
    real_load = ingest.load_image

    def load_image(path: Any, **kw: Any) -> Any:
        if Path(path).name == "hang.png":  # the fake: a decode that never returns on its own
            hung.set()
            release.wait(120)
        return real_load(path, **kw)

    monkeypatch.setattr(ingest, "load_image", load_image)
    monkeypatch.setattr(ingest, "IMAGE_DECODE_BUDGET_SECONDS", 1.0, raising=False)
    result: dict[str, Any] = {}
    with mmsearch.Index.create(tmp_path / "idx", model=TINY_MODEL, pretrained="random") as idx:
        idx._indexing_embedder()  # the ONNX export is not part of what is timed
        runner = threading.Thread(target=lambda: result.update(r=idx.add_folder(media, workers=workers)))
        t0 = time.monotonic()
        runner.start()
        runner.join(30)
        try:
            assert not runner.is_alive(), "the run waited on the hung decode"
            assert hung.is_set() and time.monotonic() - t0 < 30
            r = result["r"]
            assert r.skipped == [(str(media / "hang.png"), "decoding took longer than 1 s")]
            assert r.images_embedded == 5
            hang = str(media / "hang.png")
            assert idx.skipped() == [
                {
                    "path": hang,
                    "path_b64": base64.b64encode(os.fsencode(hang)).decode(),
                    "reason": "decoding took longer than 1 s",
                }
            ]
            assert_consistent(idx)
        finally:
            release.set()
            runner.join(60)


def test_a_stuck_decode_thread_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    """ThreadPoolExecutor joins its threads at exit; the decode pool's threads must not hold the exit."""
    script = (
        "import threading\n"
        "from mmsearch.ingest import DecodePool, bounded_map\n"
        "pool = DecodePool(1)\n"
        "stuck = threading.Event()\n"
        "def decode(x):\n"
        "    if x == 1:\n"
        "        stuck.wait()\n"
        "    return x * 10\n"
        "out = list(bounded_map(decode, range(4), pool, 2, budget=0.5, on_timeout=lambda x: -x))\n"
        "pool.close()\n"
        "print(out)\n"
    )
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, -1, 20, 30]"
    assert time.monotonic() - t0 < 30
