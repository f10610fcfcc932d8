"""Crash safety: kill -9 at random points, Ctrl-C, disk full, readers during a write, a second writer.

Index runs happen in separate processes. Starting a fresh Python that imports torch and open_clip takes
5-20 s here, so most runs are forked from a *zygote*: a helper process (``python -m tests.test_crash
--zygote``) that imports everything once, runs no torch code, and forks one child per job. Each child is
a separate process with its own memory that shares nothing with the test but the files on disk, and it
is what gets SIGKILLed. A few tests also run the real ``python -m mmsearch`` command end to end.

After every kill the index is checked as the next process would find it: SQLite integrity, no duplicate
or half-written item, FAISS ids equal to the live SQLite rows, and nothing that the killed run reported
as done (its progress lines, written after each commit) or that an earlier run committed is lost.
After every completed resume the catalog must equal the folder and the resume must have embedded only
what the killed run had not committed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select as sql_select

import mmsearch
from mmsearch import db
from mmsearch.errors import IndexLockedError
from tests.conftest import TINY_MODEL
from tests.test_ingest import assert_consistent

pytestmark = pytest.mark.slow  # kill -9 rounds and real subprocess runs

ROOT = Path(__file__).resolve().parents[1]
KILL_ROUNDS = 20  # SIGKILLs that must land inside a run (rounds where the run finished first do not count)


# --- the zygote: fork fresh worker processes without paying the torch import each time -------------
class Zygote:
    """A pre-imported helper process; :meth:`start` forks a child that runs one job and exits."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HYPOTHESIS_NO_PLUGINS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_crash", "--zygote"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._buf = b""
        assert self._read(120) == {"ready": True}

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"zygote said nothing for {timeout} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"zygote exited ({self.proc.wait()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def start(self, **job: Any) -> Job:
        out = Path(job["out"])
        for suffix in (".progress", ".stdout", ".stderr", ".report"):
            out.with_name(out.name + suffix).unlink(missing_ok=True)
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        return Job(self, self._read(60)["pid"], out, time.monotonic())

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Job:
    zygote: Zygote
    pid: int
    out: Path
    started: float
    rc: int | None = None
    seconds: float = 0.0

    def wait(self, timeout: float = 300) -> int:
        if self.rc is None:
            msg = self.zygote._read(timeout)
            assert msg["exit"] == self.pid
            self.rc = int(msg["rc"])
            self.seconds = time.monotonic() - self.started
        return self.rc

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):  # a zombie until the zygote reaps it: never reused
            os.kill(self.pid, sig)

    def file(self, suffix: str) -> str:
        p = self.out.with_name(self.out.name + suffix)
        return p.read_text(errors="replace") if p.exists() else ""

    def progress(self) -> list[tuple[str, int, int]]:
        lines = [ln.split() for ln in self.file(".progress").splitlines()]
        return [(s, int(d), int(t)) for s, d, t in (ln for ln in lines if len(ln) == 3)]

    def report(self) -> dict[str, Any]:
        return json.loads(self.file(".report"))


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote()
    try:
        yield z
    finally:
        z.close()


def _zygote_main() -> None:
    """Runs in the zygote: import everything, then fork one child per job line read from stdin."""
    import mmsearch.model  # noqa: F401  (torch, open_clip): imported, never run, so forking is safe
    import mmsearch.vectors
    from mmsearch.cli import app  # noqa: F401  (builds the typer app: typer and rich imported)

    mmsearch.vectors._faiss()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for pytest must not kill the helper
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(job)  # never returns
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": pid, "rc": os.waitstatus_to_exitcode(status)}), flush=True)


def _child(job: dict[str, Any]) -> None:
    rc = 99
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        out = job["out"]
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, suffix in ((1, ".stdout"), (2, ".stderr")):
            f = os.open(out + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        for fault in job.get("faults", []):
            _inject(fault, job)
        rc = _run_cli(job["argv"]) if job["kind"] == "cli" else _run_index(job)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(rc)


def _run_cli(argv: list[str]) -> int:
    from mmsearch import cli

    sys.argv = ["mmsearch", *argv]
    try:
        cli.main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def _run_index(job: dict[str, Any]) -> int:
    with open(job["out"] + ".progress", "w", buffering=1) as progress:

        def tick(stage: str, done: int, total: int) -> None:
            progress.write(f"{stage} {done} {total}\n")  # line-buffered: on disk before the next step

        if job.get("create"):
            idx = mmsearch.Index.create(job["index"], model=TINY_MODEL, pretrained="random")
        else:
            idx = mmsearch.Index.open(job["index"])
        with idx:
            report = idx.add_folder(job["folder"], progress=tick)
    Path(job["out"] + ".report").write_text(json.dumps(report.as_dict()))
    return 0


def _inject(fault: str, job: dict[str, Any]) -> None:
    """Test-only failures, installed in the forked child before it runs."""
    if fault == "faiss_enospc":  # the FAISS file write fails half way, as on a full disk
        from mmsearch import vectors

        real_write = vectors._HashingWriter.write

        def write(self: Any, data: bytes) -> None:
            real_write(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        vectors._HashingWriter.write = write  # type: ignore[method-assign]
    elif fault == "sqlite_full":  # SQLite may not grow the catalog: it reports SQLITE_FULL, as on a full disk
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        @event.listens_for(Engine, "connect")
        def _cap(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            pages = cur.execute("PRAGMA page_count").fetchone()[0]
            cur.execute(f"PRAGMA max_page_count = {max(pages, 1)}")
            cur.close()

    elif fault == "fill_disk_before_save":  # a real ENOSPC (tmpfs) arriving just before the FAISS save
        from mmsearch.store import Store

        real_save = Store.save_vectors

        def save_vectors(self: Any) -> None:
            fill_disk(Path(job["ballast"]))
            real_save(self)

        Store.save_vectors = save_vectors  # type: ignore[method-assign]
    elif fault.startswith(("kill_at_begin:", "kill_before_commit:")):
        # SIGKILL at the start of the N-th catalog transaction (every commit before it done, and whatever
        # the run did in between, e.g. a FAISS file written), or inside it just before its COMMIT.
        from contextlib import contextmanager

        from mmsearch.db import Catalog

        where, n = fault.split(":")
        real_begin = Catalog.begin
        seen = [0]

        @contextmanager
        def begin(self: Any) -> Iterator[Any]:
            seen[0] += 1
            if where == "kill_at_begin" and seen[0] == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
            with real_begin(self) as conn:
                yield conn
                if where == "kill_before_commit" and seen[0] == int(n):
                    os.kill(os.getpid(), signal.SIGKILL)

        Catalog.begin = begin  # type: ignore[method-assign]
    else:
        raise ValueError(fault)


def fill_disk(ballast: Path) -> None:
    """Write ``ballast`` until the filesystem is full (ENOSPC at page granularity)."""
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 20, 1 << 16, 4096, 512):
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


# --- a folder that changes between runs ------------------------------------------------------------
@dataclass
class World:
    """A media folder of small PNGs with caption sidecars; every image has distinct content."""

    root: Path
    rng: random.Random
    counter: int = 0
    names: list[str] = field(default_factory=list)

    def _pixels(self) -> Image.Image:
        self.counter += 1
        arr = np.random.default_rng(self.counter + 1000 * self.rng.randrange(10**6)).integers(
            0, 256, (12, 16, 3), dtype=np.uint8
        )
        return Image.fromarray(arr, "RGB")

    def _caption(self, name: str) -> None:
        lines = [f"{name} caption {self.rng.randrange(10**6)}" for _ in range(self.rng.randint(0, 2))]
        (self.root / f"{name}.txt").write_text("\n".join(lines))

    def add(self, n: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            name = f"img{self.counter:04d}"
            sub = self.root / f"s{self.rng.randrange(3)}"
            sub.mkdir(exist_ok=True)
            rel = f"s{sub.name[1:]}/{name}"
            self._pixels().save(self.root / f"{rel}.png")
            self._caption(rel)
            self.names.append(rel)

    def modify(self) -> None:
        rel = self.rng.choice(self.names)
        self._pixels().save(self.root / f"{rel}.png")
        st = (self.root / f"{rel}.png").stat()
        os.utime(self.root / f"{rel}.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))

    def delete(self) -> None:
        rel = self.names.pop(self.rng.randrange(len(self.names)))
        (self.root / f"{rel}.png").unlink()
        (self.root / f"{rel}.txt").unlink(missing_ok=True)

    def rename(self) -> None:
        i = self.rng.randrange(len(self.names))
        old, new = self.names[i], f"s{self.rng.randrange(3)}/moved{self.counter}"
        self.counter += 1
        os.rename(self.root / f"{old}.png", self.root / f"{new}.png")
        if (self.root / f"{old}.txt").exists():
            os.rename(self.root / f"{old}.txt", self.root / f"{new}.txt")
        self.names[i] = new

    def edit_caption(self) -> None:
        self._caption(self.rng.choice(self.names))

    def duplicate(self) -> None:
        src = self.rng.choice(self.names)
        new = f"{src}-copy{self.counter}"
        self.counter += 1
        shutil.copyfile(self.root / f"{src}.png", self.root / f"{new}.png")
        self.names.append(new)

    def mutate(self, adds: int) -> None:
        self.add(adds)
        for op in (self.modify, self.delete, self.rename, self.edit_caption, self.duplicate):
            if self.rng.random() < 0.7:
                op()


# --- what the folder says and what the index holds --------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_truth(root: Path) -> tuple[dict[bytes, str], dict[bytes, list[str]]]:
    """(path key -> content sha256, path key -> sorted caption lines) of every PNG under ``root``."""
    shas: dict[bytes, str] = {}
    caps: dict[bytes, list[str]] = {}
    for png in sorted(root.rglob("*.png")):
        key = db.path_key(png)
        shas[key] = sha256(png)
        txt = png.with_suffix(".txt")
        lines = [ln.strip() for ln in txt.read_text().splitlines()] if txt.exists() else []
        caps[key] = sorted(ln for ln in lines if ln)
    return shas, caps


@dataclass
class Snapshot:
    media: set[str]  # sha256 of every image content with its vector
    captions: set[tuple[bytes, str]]  # (file, text) of every caption with its vector


def check_whole(index: Path) -> Snapshot:
    """What must hold after any kill: integrity, no duplicates, no half-written item, FAISS == SQLite."""
    con = sqlite3.connect(index / "catalog.sqlite")
    try:
        q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
        assert q("PRAGMA integrity_check") == [("ok",)]
        assert q("PRAGMA foreign_key_check") == []
        # One vector per item, and no item without its vector (a half-written item).
        assert (
            q(
                "SELECT kind, coalesce(media_id, caption_id, segment_id) r, count(*) c FROM embeddings "
                "GROUP BY kind, r HAVING c > 1"
            )
            == []
        )
        assert (
            q(
                "SELECT m.id FROM media m WHERE m.kind = 'image' "
                "AND (SELECT count(*) FROM embeddings e WHERE e.media_id = m.id AND e.kind = 'image') != 1"
            )
            == []
        )
        assert (
            q(
                "SELECT c.id FROM captions c "
                "WHERE (SELECT count(*) FROM embeddings e WHERE e.caption_id = c.id) != 1"
            )
            == []
        )
        assert q("SELECT count(*) FROM embeddings WHERE kind = 'image' AND media_id IS NULL") == [(0,)]
        assert q("SELECT path FROM files WHERE status = 'ok' AND media_id IS NULL") == []
        assert (
            q(
                "SELECT path FROM files WHERE status = 'ok' AND sha256 != (SELECT sha256 FROM media WHERE id = media_id)"
            )
            == []
        )
        assert q("SELECT path, reason FROM files WHERE status != 'ok'") == []  # no bad files in these folders
        snap = Snapshot(
            media={s for (s,) in q("SELECT sha256 FROM media WHERE kind = 'image'")},
            captions={
                (bytes(k), t)
                for k, t in q("SELECT f.path_key, c.text FROM captions c JOIN files f ON f.id = c.file_id")
            },
        )
    finally:
        con.close()
    # A fresh reader: FAISS files are checked and rebuilt if stale.
    with mmsearch.Index.open(index) as idx, idx.store.catalog.read() as conn:
        for kind in db.VECTOR_KINDS:
            rows = {
                int(i)
                for (i,) in conn.execute(sql_select(db.embeddings.c.id).where(db.embeddings.c.kind == kind))
            }
            assert set(idx.store.vectors(kind).ids().tolist()) == rows, kind
    return snap


def check_matches_folder(index: Path, root: Path) -> None:
    """After a completed run: the catalog is exactly the folder, and search agrees with the catalog."""
    shas, caps = folder_truth(root)
    con = sqlite3.connect(index / "catalog.sqlite")
    try:
        files = {bytes(k): s for k, s in con.execute("SELECT path_key, sha256 FROM files")}
        assert files == shas
        got: dict[bytes, list[str]] = {k: [] for k in shas}
        for k, t in con.execute("SELECT f.path_key, c.text FROM captions c JOIN files f ON f.id = c.file_id"):
            got[bytes(k)].append(t)
        assert {k: sorted(v) for k, v in got.items()} == caps
        assert {s for (s,) in con.execute("SELECT sha256 FROM media")} == set(shas.values())
    finally:
        con.close()
    with mmsearch.Index.open(index) as idx:
        assert_consistent(idx)
        for kind in db.VECTOR_KINDS:  # the saved FAISS files are current: no rebuild needed on open
            record = idx.store.catalog.get_meta(f"faiss.{idx.store.model}.{kind}")
            assert record["generation"] == idx.store.catalog.generation(kind), kind
        q = np.random.default_rng(0).standard_normal(idx.store.dim).astype(np.float32)
        hits = idx.search_vector(q / np.linalg.norm(q), target="all", k=50)
        assert bool(hits) == bool(shas) and all(db.path_key(h.path) in shas for h in hits)


def assert_nothing_lost(before: Snapshot, after: Snapshot, root: Path) -> None:
    """Content and captions committed earlier and still in the folder are still in the index."""
    shas, caps = folder_truth(root)
    wanted_caps = {(k, t) for k, ts in caps.items() for t in ts}
    assert (before.media & set(shas.values())) <= after.media
    assert (before.captions & wanted_caps) <= after.captions


def assert_progress_committed(job: Job, index: Path, start: Snapshot, after: Snapshot) -> None:
    """What the killed run reported done (progress is reported after each commit) is in the index."""
    images = [d for s, d, _ in job.progress() if s == "images"]
    if images:
        assert len(after.media - start.media) >= images[-1], (images, job.progress())
    caption_chunks = [d for s, d, _ in job.progress() if s == "captions"]
    if caption_chunks:  # "captions i n" is written before chunk i: the i captions before it are committed
        assert len(after.captions - start.captions) >= caption_chunks[-1]
    if ("save", 1, 1) in job.progress():
        con = sqlite3.connect(index / "catalog.sqlite")
        try:
            meta = dict(con.execute("SELECT key, value FROM meta"))
        finally:
            con.close()
        model = json.loads(meta["model.active"])
        for kind in db.VECTOR_KINDS:
            assert json.loads(meta[f"faiss.{model}.{kind}"])["generation"] == json.loads(
                meta.get(f"generation.{model}.{kind}", "0")
            )


def run_to_end(zygote: Zygote, index: Path, media: Path, out: Path, create: bool = False) -> Job:
    job = zygote.start(kind="index", index=str(index), folder=str(media), out=str(out), create=create)
    rc = job.wait()
    assert rc == 0, job.file(".stderr")
    return job


# --- kill -9 ---------------------------------------------------------------------------------------
def test_sigkill_at_random_points_then_resume(zygote: Zygote, tmp_path: Path) -> None:
    rng = random.Random(20240601)
    media, index, out = tmp_path / "media", tmp_path / "idx", tmp_path / "job"
    world = World(media, rng)
    world.add(30)
    durations = [run_to_end(zygote, index, media, out, create=True).seconds]
    snap = check_whole(index)
    check_matches_folder(index, media)
    killed = attempts = resumes = 0
    landed: Counter[str] = Counter()  # the last stage each killed run reported
    modes = ["time", "time", "hash", "images", "captions", "save"]
    while killed < KILL_ROUNDS:
        attempts += 1
        assert attempts < 2 * KILL_ROUNDS, f"only {killed} of {attempts} kills landed inside a run"
        world.mutate(adds=rng.randint(6, 14))
        job = zygote.start(kind="index", index=str(index), folder=str(media), out=str(out))
        mode = modes[attempts % len(modes)]
        if mode == "time":  # anywhere in the run, start-up included
            time.sleep(rng.uniform(0.0, 1.2 * float(np.median(durations))))
        else:  # just after the run reached a stage: inside its transactions or the FAISS save
            deadline = time.monotonic() + 120
            while not any(s == mode for s, _, _ in job.progress()) and time.monotonic() < deadline:
                if _exited(job):
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.03))
        job.kill()
        rc = job.wait()
        if rc == -signal.SIGKILL:
            killed += 1
            progress = job.progress()
            landed[progress[-1][0] if progress else "start-up"] += 1
        else:
            assert rc == 0, job.file(".stderr")
            durations.append(job.seconds)
        after = check_whole(index)
        assert_nothing_lost(snap, after, media)
        assert_progress_committed(job, index, snap, after)
        snap = after
        if rc == -signal.SIGKILL and killed % 4 == 0:
            # Resume: a new run finishes, and embeds only what the killed run had not committed.
            shas, _ = folder_truth(media)
            missing = set(shas.values()) - after.media
            resume = run_to_end(zygote, index, media, out)
            durations.append(resume.seconds)
            assert resume.report()["images_embedded"] == len(missing)
            check_matches_folder(index, media)
            snap = check_whole(index)
            resumes += 1
    resume = run_to_end(zygote, index, media, out)
    check_matches_folder(index, media)
    assert resume.report()["images_embedded"] == len(set(folder_truth(media)[0].values()) - snap.media)
    print(f"kills landed after stage: {dict(landed)}")
    assert killed >= KILL_ROUNDS and resumes >= 4
    # Kills landed in start-up, hashing, embedding, captions and the FAISS save, not all in one place.
    assert len(landed) >= 4, landed


def test_sigkill_at_every_transaction_boundary(zygote: Zygote, tmp_path: Path) -> None:
    """Deterministic kills: at the start of, and just before the COMMIT of, each transaction of a run.

    Random kills rarely land in the microseconds between two commits; this sweep lands in each one.
    """
    rng = random.Random(99)
    media, index, out = tmp_path / "media", tmp_path / "idx", tmp_path / "job"
    world = World(media, rng)
    world.add(12)
    run_to_end(zygote, index, media, out, create=True)
    snap = check_whole(index)
    kills = 0
    for where in ("kill_at_begin", "kill_before_commit"):
        for n in range(1, 40):
            world.mutate(adds=rng.randint(4, 8))
            job = zygote.start(
                kind="index", index=str(index), folder=str(media), out=str(out), faults=[f"{where}:{n}"]
            )
            rc = job.wait()
            after = check_whole(index)
            assert_nothing_lost(snap, after, media)
            assert_progress_committed(job, index, snap, after)
            snap = after
            if rc == 0:
                break  # the run has fewer than n transactions: every boundary was hit
            assert rc == -signal.SIGKILL, job.file(".stderr")
            kills += 1
        else:
            raise AssertionError("a run with 40 transactions: the sweep never finished")
    resume = run_to_end(zygote, index, media, out)
    assert resume.report()["images_embedded"] == len(set(folder_truth(media)[0].values()) - snap.media)
    check_matches_folder(index, media)
    assert kills >= 12


def _exited(job: Job) -> bool:
    # The zygote reports the exit on its pipe; peek without blocking.
    fd = job.zygote.proc.stdout.fileno()  # type: ignore[union-attr]
    if b"\n" in job.zygote._buf or select.select([fd], [], [], 0)[0]:
        job.wait(5)
        return True
    return False


# --- Ctrl-C ----------------------------------------------------------------------------------------
def _wait_for_first_commit(index: Path, job_alive: Any, media_before: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job_alive():
        with contextlib.suppress(sqlite3.Error):
            con = sqlite3.connect(index / "catalog.sqlite", timeout=1)
            try:
                n = con.execute("SELECT count(*) FROM media").fetchone()[0]
            finally:
                con.close()
            if n > media_before:
                return
        time.sleep(0.01)


def _media_count(index: Path) -> int:
    con = sqlite3.connect(index / "catalog.sqlite")
    try:
        return int(con.execute("SELECT count(*) FROM media").fetchone()[0])
    finally:
        con.close()


def test_ctrl_c_exits_cleanly_and_the_next_run_resumes(zygote: Zygote, tmp_path: Path) -> None:
    rng = random.Random(7)
    media, index, out = tmp_path / "media", tmp_path / "idx", tmp_path / "job"
    world = World(media, rng)
    world.add(10)
    run_to_end(zygote, index, media, out, create=True)
    for delay in (0.0, 0.05, 0.3):
        # Enough batches of 32 that even the 0.3 s delay interrupts the run (150 took ~0.6 s on 2 cores).
        world.mutate(adds=600)
        before = _media_count(index)
        job = zygote.start(kind="cli", argv=["index", str(media), "--index", str(index)], out=str(out))
        _wait_for_first_commit(index, lambda j=job: not _exited(j), before)
        time.sleep(delay)
        job.kill(signal.SIGINT)
        assert job.wait() == 130, job.file(".stderr")
        stderr = job.file(".stderr")
        assert "interrupted" in stderr and "Traceback" not in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1, stderr
        check_whole(index)
        assert not list((index / "vectors").glob(".*tmp*"))  # no temp file left by an interrupted save
        resume = zygote.start(
            kind="cli", argv=["index", str(media), "--index", str(index), "--json"], out=str(out)
        )
        assert resume.wait() == 0, resume.file(".stderr")
        check_matches_folder(index, media)


def test_real_command_interrupted_then_resumed(tmp_path: Path) -> None:
    """The real `python -m mmsearch index`, not a forked worker: SIGINT mid-run, then a resume."""
    media, index = tmp_path / "media", tmp_path / "idx"
    World(media, random.Random(3)).add(400)
    cmd = [sys.executable, "-m", "mmsearch", "index", str(media), "--index", str(index)]
    proc = subprocess.Popen(
        [*cmd, "--model", TINY_MODEL, "--pretrained", "random"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (index / "catalog.sqlite").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    _wait_for_first_commit(index, lambda: proc.poll() is None, 0, timeout=300)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == [
        "interrupted: work committed so far is kept; run the same command again to resume"
    ]
    committed = check_whole(index)
    assert 0 < len(committed.media) < 400
    resumed = subprocess.run([*cmd, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["runs"][0]["images_embedded"] == 400 - len(committed.media)
    check_matches_folder(index, media)


# --- disk full -------------------------------------------------------------------------------------
def _fails_with_disk_full(job: Job) -> None:
    assert job.wait() == 1, job.file(".stderr")
    lines = job.file(".stderr").strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: disk full while writing the index"), lines


def _still_answers(index: Path, n_images: int) -> None:
    with mmsearch.Index.open(index) as idx:
        assert_consistent_without_disk(idx)
        q = np.ones(idx.store.dim, np.float32) / np.sqrt(idx.store.dim)
        hits = idx.search_vector(q, target="images", k=1000)
        assert len({h.path for h in hits}) >= n_images


def assert_consistent_without_disk(idx: mmsearch.Index) -> None:
    """FAISS ids == live SQLite rows (the in-memory rebuild: nothing is written on a full disk)."""
    with idx.store.catalog.read() as conn:
        for kind in db.VECTOR_KINDS:
            rows = {
                int(i)
                for (i,) in conn.execute(sql_select(db.embeddings.c.id).where(db.embeddings.c.kind == kind))
            }
            assert set(idx.store.vectors(kind).ids().tolist()) == rows


@pytest.mark.parametrize("fault", ["faiss_enospc", "sqlite_full"])
def test_disk_full_is_one_clear_line_and_the_index_survives(
    zygote: Zygote, tmp_path: Path, fault: str
) -> None:
    """A patched write: the FAISS file write or the SQLite catalog hits ENOSPC/SQLITE_FULL mid-run."""
    media, index, out = tmp_path / "media", tmp_path / "idx", tmp_path / "job"
    world = World(media, random.Random(11))
    world.add(12)
    run_to_end(zygote, index, media, out, create=True)
    before = check_whole(index)
    world.mutate(adds=40)
    job = zygote.start(
        kind="cli", argv=["index", str(media), "--index", str(index)], out=str(out), faults=[fault]
    )
    _fails_with_disk_full(job)
    after = check_whole(index)
    assert_nothing_lost(before, after, media)
    if fault == "faiss_enospc":
        assert len(after.media) > len(before.media)  # the SQLite commits before the save are kept
    assert not list((index / "vectors").glob(".*tmp*"))
    _still_answers(index, 12)
    rerun = zygote.start(kind="cli", argv=["index", str(media), "--index", str(index)], out=str(out))
    assert rerun.wait() == 0, rerun.file(".stderr")
    check_matches_folder(index, media)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        # Only root with CAP_SYS_ADMIN may mount; the patched-write test above covers both paths anyway.
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_real_disk_full_on_a_tiny_tmpfs(zygote: Zygote, tmp_path: Path, tiny_tmpfs: Path) -> None:
    """A real full filesystem, first during the FAISS save, then during SQLite commits."""
    media, index, out, ballast = (
        tmp_path / "media",
        tiny_tmpfs / "idx",
        tmp_path / "job",
        tiny_tmpfs / "ballast",
    )
    world = World(media, random.Random(5))
    world.add(12)
    run_to_end(zygote, index, media, out, create=True)
    cli = ["index", str(media), "--index", str(index)]

    # 1. The disk fills up just before the FAISS files are written: the SQLite commits stand.
    world.mutate(adds=30)
    job = zygote.start(
        kind="cli", argv=cli, out=str(out), faults=["fill_disk_before_save"], ballast=str(ballast)
    )
    _fails_with_disk_full(job)
    _still_answers(index, 12)  # opened and searched while the disk is still full
    ballast.unlink()
    assert zygote.start(kind="cli", argv=cli, out=str(out)).wait() == 0
    check_matches_folder(index, media)

    # 2. The disk is full before the run starts: the first SQLite commit fails.
    n = len(list(media.rglob("*.png")))
    world.mutate(adds=30)
    fill_disk(ballast)
    _fails_with_disk_full(zygote.start(kind="cli", argv=cli, out=str(out)))
    _still_answers(index, n - 2)
    ballast.unlink()
    assert zygote.start(kind="cli", argv=cli, out=str(out)).wait() == 0
    check_matches_folder(index, media)


# --- readers during a write, and a second writer ---------------------------------------------------
def test_readers_see_a_consistent_index_while_a_run_writes(zygote: Zygote, tmp_path: Path) -> None:
    media, index, out = tmp_path / "media", tmp_path / "idx", tmp_path / "job"
    world = World(media, random.Random(17))
    world.add(20)
    run_to_end(zygote, index, media, out, create=True)
    world.add(250)
    for _ in range(5):
        world.modify()
        world.edit_caption()
    rng = np.random.default_rng(0)
    job = zygote.start(kind="index", index=str(index), folder=str(media), out=str(out))
    searches, sizes = 0, set()
    with mmsearch.Index.open(index) as reader:
        # A second writer fails at once, naming the running one.
        while not any(s == "images" for s, _, _ in job.progress()) and not _exited(job):
            time.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(IndexLockedError, match=f"pid {job.pid}"), mmsearch.Index.open(index) as second:
            second.add_folder(media)
        assert time.monotonic() - t0 < 5
        while not _exited(job):
            q = rng.standard_normal(reader.store.dim).astype(np.float32)
            q /= np.linalg.norm(q)
            for target in ("images", "captions", "all"):
                hits = reader.search_vector(q, target=target, k=20)
                assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
                assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
                vectors = reader.store.catalog.vectors_for([h.item_id for h in hits])
                for h in hits:
                    assert os.path.exists(h.path), h  # nothing is deleted in this run
                    if h.item_id in vectors:  # the score is this item's own vector, not a reused id's
                        assert abs(float(vectors[h.item_id] @ q) - h.score) < 1e-4, h
                searches += 1
            sizes.add(reader.store.vectors("image").ntotal)
    assert job.wait() == 0, job.file(".stderr")
    assert searches >= 10 and len(sizes) >= 3, (searches, sizes)  # the reader really ran during the write
    check_matches_folder(index, media)


if __name__ == "__main__" and sys.argv[1:] == ["--zygote"]:
    _zygote_main()
