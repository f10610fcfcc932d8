"""`index --ray`: the same catalog and the same answers as a local run, on a real Ray cluster of two raylets
started by the test on this machine (loopback addresses only), with a worker and a driver killed mid-run.

Vectors are compared exactly: both runs embed with the fp32 ONNX image tower, which is deterministic.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

import mmsearch
from mmsearch import db, ray_cluster
from mmsearch.cli import ray_address_argv
from mmsearch.demo.world import DemoFolder, write_demo_folder
from mmsearch.identity import sha256_file
from mmsearch.ray_ingest import RayOptions, RayWork, model_settings
from tests.test_crash import check_whole
from tests.test_ingest import assert_consistent

ROOT = Path(__file__).resolve().parents[1]
TOWER = "onnx-fp32"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with ray_cluster.local_cluster(nodes=2, cpus_per_node=1) as c:
        yield c


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoFolder:
    folder = write_demo_folder(
        tmp_path_factory.mktemp("ray") / "demo", n_images=24, seed=3, speech=True, videos=False
    )
    # Files a worker cannot read: skipped with their reason, as a local run skips them.
    (folder.media_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    png = next(folder.media_dir.glob("shapes/*.png")).read_bytes()
    (folder.media_dir / "truncated.png").write_bytes(png[: len(png) // 3])
    return folder


def _catalog(idx: mmsearch.Index) -> dict[str, Any]:
    """What an index holds, by content rather than by row id: files, captions, transcripts, vectors."""
    with idx.store.catalog.read() as conn:
        files = {
            r.path: (r.status, r.sha256, r.reason)
            for r in conn.execute(
                select(db.files.c.path, db.files.c.status, db.files.c.sha256, db.files.c.reason)
            )
        }
        image_rows = conn.execute(
            select(db.media.c.sha256, db.embeddings.c.id)
            .join(db.embeddings, db.embeddings.c.media_id == db.media.c.id)
            .where(db.embeddings.c.kind == "image")
        ).all()
        segment_rows = conn.execute(
            select(
                db.media.c.sha256,
                db.segments.c.idx,
                db.segments.c.start,
                db.segments.c.text,
                db.embeddings.c.id,
            )
            .join(db.segments, db.segments.c.media_id == db.media.c.id)
            .join(db.embeddings, db.embeddings.c.segment_id == db.segments.c.id)
        ).all()
        captions = sorted(
            (r.path, r.source, r.text)
            for r in conn.execute(
                select(db.files.c.path, db.captions.c.source, db.captions.c.text).join(
                    db.files, db.files.c.id == db.captions.c.file_id
                )
            )
        )
    vectors = idx.store.catalog.vectors_for([r[-1] for r in image_rows] + [r[-1] for r in segment_rows])
    return {
        "files": files,
        "captions": captions,
        "segments": sorted((r[0], r[1], round(r[2], 3), r[3]) for r in segment_rows),
        "image_vectors": {r[0]: vectors[r[-1]] for r in image_rows},
        "segment_vectors": {(r[0], r[1]): vectors[r[-1]] for r in segment_rows},
    }


def _top(idx: mmsearch.Index, demo: DemoFolder) -> list[list[tuple[str, float]]]:
    """The answers of a few queries in several directions, paths relative to the media folder."""
    base = str(demo.media_dir)
    runs = [idx.search_text(q, k=5) for q in ("a red circle", "two blue squares", "a green triangle")]
    runs.append(idx.search_text("a green triangle", target="audio", k=3))
    assert demo.image_query is not None
    runs.append(idx.search_image(demo.image_query, target="texts", k=5))
    return [[(h.path.removeprefix(base), round(h.score, 5)) for h in hits] for hits in runs]


@pytest.mark.slow
@pytest.mark.speech
def test_a_ray_run_builds_the_catalog_a_local_run_builds(
    cluster: Any, demo: DemoFolder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cluster hashes the files too (forced below: its nodes are all this machine).
    hashed_remotely: list[Path] = []
    hashes = RayWork.hashes

    def counted(self: RayWork, paths: list[Path]) -> dict[Path, str | OSError]:
        found = hashes(self, paths)
        hashed_remotely.extend(p for p in paths if isinstance(found[p], str))
        return found

    monkeypatch.setattr(RayWork, "hashes", counted)
    local = mmsearch.Index.create(tmp_path / "local", model="demo", image_tower=TOWER)
    on_ray = mmsearch.Index.create(tmp_path / "ray", model="demo", image_tower=TOWER)
    with local, on_ray:
        mine = local.add_folder(demo.media_dir)
        theirs = on_ray.add_folder(
            demo.media_dir, ray=RayOptions(address="auto", batch_size=8, remote_hashing=True)
        )
        for field in ("images_embedded", "audio_transcribed", "segments_embedded", "captions_added"):
            assert getattr(theirs, field) == getattr(mine, field), field
        assert theirs.images_embedded == len(demo.images) and theirs.audio_transcribed == len(demo.recordings)
        assert sorted(theirs.skipped) == sorted(mine.skipped)
        assert {Path(p).name for p, _ in theirs.skipped} == {"broken.jpg", "truncated.png"}
        assert len(hashed_remotely) == mine.files_seen

        a, b = _catalog(local), _catalog(on_ray)
        assert a["files"] == b["files"]
        assert a["captions"] == b["captions"]
        assert a["segments"] == b["segments"] and a["segments"]
        assert a["image_vectors"].keys() == b["image_vectors"].keys()
        for sha, v in a["image_vectors"].items():
            np.testing.assert_array_equal(v, b["image_vectors"][sha])
        assert a["segment_vectors"].keys() == b["segment_vectors"].keys()
        for key, v in a["segment_vectors"].items():
            np.testing.assert_allclose(v, b["segment_vectors"][key], atol=1e-6)
        assert _top(local, demo) == _top(on_ray, demo)
        # The workers' speech model is recorded as a local run records it.
        assert on_ray.store.config["speech"]["resolved"] == local.store.config["speech"]["resolved"]
        assert_consistent(on_ray)

        again = on_ray.add_folder(demo.media_dir, ray=RayOptions(address="auto"))  # nothing new: no work
        assert (again.images_embedded, again.audio_transcribed, again.unchanged) == (0, 0, mine.files_seen)


def _image_workers() -> list[int]:
    """The processes of the image embedding actors (Ray names them after the operators they run)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ImageTower" in cmdline:
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> DemoFolder:
    return write_demo_folder(
        tmp_path_factory.mktemp("many") / "demo", n_images=96, seed=5, speech=False, videos=False
    )


@pytest.mark.slow
def test_a_killed_actor_is_restarted_and_nothing_is_lost_or_doubled(
    cluster: Any, many_images: DemoFolder, tmp_path: Path
) -> None:
    killed: list[int] = []

    def kill_once(stage: str, done: int, total: int) -> None:
        if stage == "images" and done > 0 and not killed:
            killed.extend(_image_workers())
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    with mmsearch.Index.create(tmp_path / "ray", model="demo", image_tower=TOWER) as idx:
        report = idx.add_folder(
            many_images.media_dir, ray=RayOptions(address="auto", batch_size=8), progress=kill_once
        )
        assert killed, "no image actor was found to kill"
        assert report.images_embedded == len(many_images.images) and not report.skipped
        assert_consistent(idx)
    snapshot = check_whole(tmp_path / "ray")
    assert len(snapshot.media) == len(many_images.images)


_DRIVER = """
import sys, mmsearch
from mmsearch.identity import sha256_file
from mmsearch.ray_ingest import RayOptions, RayWork, model_settings

def tick(stage, done, total):
    if stage == "images" and done:
        print("committed", done, flush=True)

with mmsearch.Index.open(sys.argv[1], image_tower="onnx-fp32") as idx:
    idx.add_folder(sys.argv[2], ray=RayOptions(address=sys.argv[3], batch_size=8), progress=tick)
print("finished", flush=True)
"""


@pytest.mark.slow
def test_a_killed_driver_loses_only_what_it_had_not_committed(
    cluster: Any, many_images: DemoFolder, tmp_path: Path
) -> None:
    path = tmp_path / "ray"
    mmsearch.Index.create(path, model="demo", image_tower=TOWER).close()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(path), str(many_images.media_dir), cluster.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("committed"), line
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    before = check_whole(path)
    assert 0 < len(before.media) < len(many_images.images)
    time.sleep(0.5)  # the dead driver's lock is released with its process
    with mmsearch.Index.open(path, image_tower=TOWER) as idx:
        report = idx.add_folder(many_images.media_dir, ray=RayOptions(address="auto", batch_size=8))
        assert report.images_embedded == len(many_images.images) - len(before.media)
        assert_consistent(idx)
    after = check_whole(path)
    assert before.media <= after.media and len(after.media) == len(many_images.images)


# --- the command line -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["index", "photos", "--ray"], ["index", "photos", "--ray=local"]),
        (["index", "--ray", "photos"], ["index", "--ray=local", "photos"]),
        (["index", "--ray", "auto", "photos"], ["index", "--ray=auto", "photos"]),
        (["index", "--ray", "10.0.0.5:6379", "p"], ["index", "--ray=10.0.0.5:6379", "p"]),
        (["index", "--ray", "ray://head:10001", "p"], ["index", "--ray=ray://head:10001", "p"]),
        (["index", "--ray=auto", "p"], ["index", "--ray=auto", "p"]),
        (["index", "--", "--ray"], ["index", "--", "--ray"]),
    ],
)
def test_ray_takes_an_optional_address(argv: list[str], expected: list[str]) -> None:
    assert ray_address_argv(argv) == expected


def test_a_folder_named_like_an_address_is_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "auto").mkdir()
    assert ray_address_argv(["index", "--ray", "auto"]) == ["index", "--ray=local", "auto"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmsearch", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_an_unreachable_cluster_is_a_clear_error(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    from tests.conftest import solid

    solid(media / "a.png")
    started = time.monotonic()
    out = _cli(
        "index", str(media), "--index", str(tmp_path / "idx"), "--model", "demo", "--ray", "127.0.0.1:1"
    )
    assert out.returncode == 1
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert time.monotonic() - started < 60  # Ray alone retries for minutes


def test_without_ray_the_error_says_what_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from mmsearch import ray_cluster\n"
        "try:\n    ray_cluster.connect('auto')\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.stdout.startswith("MissingDependencyError")
    assert "pip install 'mmsearch[ray]'" in out.stdout


@pytest.mark.slow
def test_a_process_without_the_token_cannot_join_a_cluster_started_here(cluster: Any) -> None:
    """Another user of the machine can reach 127.0.0.1 but not the token (this process's environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    code = (
        f"import ray\ntry:\n    ray.init(address={cluster.address!r}, log_to_driver=False)\n"
        "    print('joined')\nexcept Exception as e:\n    print('refused', type(e).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("refused"), out.stdout + out.stderr[-500:]
    # ... while this process, holding it, runs work on the cluster.
    ray = ray_cluster.ray_module()
    assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42


@pytest.mark.slow
def test_a_cluster_on_this_machine_alone_leaves_hashing_to_the_driver(cluster: Any, tmp_path: Path) -> None:
    """Every raylet of the test's cluster is this machine: the driver's own reading beats one more job."""
    assert not ray_cluster.spans_machines()
    with mmsearch.Index.create(tmp_path / "i", model="demo") as idx:
        settings = model_settings(idx.model_identity, TOWER)
    work = RayWork(RayOptions("auto"), settings, {}, decode_budget=60.0)
    assert work.hashes([Path(__file__)]) == {}
    forced = RayWork(RayOptions("auto", remote_hashing=True), settings, {}, decode_budget=60.0)
    assert forced.hashes([Path(__file__)]) == {Path(__file__): sha256_file(Path(__file__))}
