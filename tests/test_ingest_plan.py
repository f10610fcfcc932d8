"""The pure plan of an indexing run (ingest.plan_run): no model, no database, no file system."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmsearch import db, ingest
from mmsearch.ingest import EMPTY_MOUNT_REASON, ROOT_EMPTY_REASON, hash_chunks, plan_run
from mmsearch.scan import BROKEN_LINK_REASON, UNREADABLE_FOLDER_REASON, FoundFile, ScanResult

ROOT = Path("/photos")


def found(path: str, size: int = 10, mtime_ns: int = 1, kind: str = "image") -> FoundFile:
    return FoundFile(ROOT / path, kind, size, mtime_ns)


def row(
    path: str | Path,
    size: int = 10,
    mtime_ns: int = 1,
    *,
    status: str = "ok",
    reason: str | None = None,
    root: Path = ROOT,
) -> db.FileRow:
    key = db.path_key(root / path)
    return db.FileRow(abs(hash(key)) % 10**9, key, "image", size, mtime_ns, "ab" * 32, 1, status, reason)


def rows(*rs: db.FileRow) -> dict[bytes, db.FileRow]:
    return {r.path_key: r for r in rs}


def test_only_new_and_changed_files_are_hashed() -> None:
    scan = ScanResult(ROOT, files=[found("same.jpg"), found("new.jpg"), found("touched.jpg", mtime_ns=2)])
    plan = plan_run(scan, rows(row("same.jpg"), row("touched.jpg")), set())
    assert [f.path.name for f in plan.to_hash] == ["new.jpg", "touched.jpg"]
    assert plan.unchanged == 1
    assert plan.to_delete == [] and plan.problems == {} and plan.unavailable == []


def test_files_gone_from_the_folder_are_deleted_and_other_folders_untouched() -> None:
    other = row("elsewhere.jpg", root=Path("/music"))
    sibling = row("x.jpg", root=Path("/photos2"))  # a name that starts like the root is not under it
    gone = row("gone.jpg")
    scan = ScanResult(ROOT, files=[found("kept.jpg")])
    plan = plan_run(scan, rows(row("kept.jpg"), gone, other, sibling), set())
    assert plan.to_delete == [gone]
    assert plan.to_hash == [] and plan.unchanged == 1


def test_files_of_an_unreadable_folder_are_kept_unless_pruned() -> None:
    locked = [row("locked/a.jpg"), row("locked/deep/b.jpg")]
    gone = row("gone.jpg")
    problems = [(ROOT / "locked", f"{UNREADABLE_FOLDER_REASON}: permission denied")]
    scan = ScanResult(ROOT, files=[found("ok.jpg")], problems=problems)
    plan = plan_run(scan, rows(row("ok.jpg"), gone, *locked), set())
    assert plan.unavailable == problems
    assert plan.kept == (db.path_key(ROOT / "locked") + b"/",)
    assert plan.kept_unavailable == 2
    assert plan.to_delete == [gone]
    assert plan.problems == {db.path_key(ROOT / "locked"): problems[0]}  # listed by status

    pruned = plan_run(scan, rows(row("ok.jpg"), gone, *locked), set(), prune=True)
    assert pruned.unavailable == [] and pruned.kept_unavailable == 0
    assert sorted(r.path_key for r in pruned.to_delete) == sorted(r.path_key for r in [gone, *locked])


def test_an_empty_root_or_mount_point_keeps_its_files() -> None:
    held = row("a.jpg")
    plan = plan_run(ScanResult(ROOT, empty_folders=[ROOT]), rows(held), set())
    assert plan.unavailable == [(ROOT, ROOT_EMPTY_REASON)] and plan.to_delete == []
    assert plan.kept_unavailable == 1

    drive = row("drive/b.jpg")
    scan = ScanResult(ROOT, files=[found("a.jpg")], empty_folders=[ROOT / "drive"])
    assert plan_run(scan, rows(held, drive), set()).to_delete == [drive]  # a deleted folder: forgotten
    plan = plan_run(scan, rows(held, drive), {db.path_key(ROOT / "drive")})
    assert plan.unavailable == [(ROOT / "drive", EMPTY_MOUNT_REASON)] and plan.to_delete == []


def test_problems_become_skipped_rows_written_once() -> None:
    link = ROOT / "dangling.jpg"
    scan = ScanResult(ROOT, problems=[(link, BROKEN_LINK_REASON)])
    first = plan_run(scan, {}, set())
    assert first.problems == {db.path_key(link): (link, BROKEN_LINK_REASON)}
    # The next run finds the row it wrote: nothing to write, and the row is not gone.
    recorded = row("dangling.jpg", -1, -1, status="skipped", reason=BROKEN_LINK_REASON)
    again = plan_run(scan, rows(recorded), set())
    assert again.problems == {} and again.to_delete == []


def test_an_indexed_file_behind_a_broken_link_keeps_its_row() -> None:
    indexed = row("dangling.jpg")
    scan = ScanResult(ROOT, problems=[(ROOT / "dangling.jpg", BROKEN_LINK_REASON)])
    plan = plan_run(scan, rows(indexed), set())
    assert plan.unavailable == [(ROOT / "dangling.jpg", BROKEN_LINK_REASON)]
    assert plan.problems == {} and plan.to_delete == [] and plan.kept_unavailable == 1


def test_a_problem_about_a_found_file_is_not_a_row_of_its_own() -> None:
    f = found("odd.jpg")
    scan = ScanResult(ROOT, files=[f], problems=[(f.path, "some caption file unreadable")])
    plan = plan_run(scan, {}, set())
    assert plan.problems == {} and plan.to_hash == [f]


def test_a_run_hashes_a_few_files_before_its_first_images_then_chunks() -> None:
    todo = [found("a.mp3", kind="audio"), found("1.jpg"), found("b.txt", kind="other"), found("2.jpg")]
    todo += [found(f"{i}.png") for i in range(3, 10)]
    chunks = hash_chunks(todo)
    assert [f.path.name for f in chunks[0]] == ["a.mp3", "1.jpg", "b.txt", "2.jpg"]  # up to the second image
    assert [f for chunk in chunks for f in chunk] == todo
    assert hash_chunks(todo, whole=True) == [todo] and hash_chunks([]) == []
    assert hash_chunks(todo[:3]) == [todo[:3]]  # one image: one chunk


def test_chunks_after_the_first_hold_hash_chunk_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest, "HASH_CHUNK", 4)
    todo = [found(f"{i}.jpg") for i in range(12)]
    assert [len(c) for c in hash_chunks(todo)] == [2, 4, 4, 2]
