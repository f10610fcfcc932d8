"""Turn benchmarks/results/*.json into one markdown table (benchmarks/results/SUMMARY.md) for the README.

python benchmarks/report.py            # after any of the bench_*.py scripts ran
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _demo(d: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        ("demo text→image P@1", f"{d['text_to_image_p1']:.3f}", "≥ 0.95"),
        ("demo image→text R@1", f"{d['image_to_text_r1']:.3f}", "≥ 0.90"),
        ("demo spoken query→image P@5", f"{d['speech_to_image_p5']:.3f}", "≥ 0.85"),
    ]


def _ingest(d: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (
            "ingestion end-to-end / model alone",
            f"{d['e2e_over_model']:.2f}"
            + (
                f" (CPU-bound ceiling {d['cpu_bound_ceiling_e2e_over_model']:.2f}: decode "
                f"{d['cpu_ms_per_image']['decode_and_preprocess']} ms vs model "
                f"{d['cpu_ms_per_image']['model_alone']} ms CPU per image)"
                if "cpu_bound_ceiling_e2e_over_model" in d
                else ""
            ),
            "≥ 0.90",
        ),
        (
            "ingestion images/s (× rclip reference)",
            f"{d['end_to_end_img_s']} ({d['e2e_over_rclip_reference']}×"
            + (
                f"; {d['e2e_over_rclip_model_bound']}× rclip's model alone in the same run"
                if "e2e_over_rclip_model_bound" in d
                else ""
            )
            + ")",
            "≥ 1.5×",
        ),
    ]


def _model_speed(d: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for arch, a in d.get("archs", {}).items():
        v = a["variants"].get("ort_int8")
        if v:
            rows.append(
                (
                    f"{arch} ONNX int8 vs torch eager (wall)",
                    f"{v['vs_torch_eager_wall']}× (cos {v['cosine_mean']})",
                    "faster, quality kept",
                )
            )
    return rows


def _ann(d: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for r in d.get("results", []):
        per_vec = r.get("ram_bytes_per_vector_serialized")
        rows.append(
            (
                f"ANN {r['config']} ({d['setup']['n']:,} vectors)",
                f"p50 {r['p50_ms']} ms, recall@10 {r['recall_at_10']}, {per_vec} B/vector",
                "p50 ≤ 1 ms @ 0.95; compact ≤ 300 B",
            )
        )
    return rows


def _reindex(d: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = [(f"no-op re-index of {d['n_images']:,} images", f"{d['noop_reindex_s']} s", "seconds")]
    if "rename_reindex_s" in d:  # results written before the rename step existed lack it
        rows.append(
            (
                f"re-index after renaming {d['renamed_folder_images']} captioned images",
                f"{d['rename_reindex_s']} s, model loaded: {d['rename_model_loaded']}",
                "no model work",
            )
        )
    return rows


def _speech(d: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (
            f"speech {r['backend']}, {r['settings']}",
            f"RTF {r['rtf']}, WER {r['wer']}",
            "≤ 0.03" if r["settings"] == "mmsearch default" and r["backend"].startswith("faster") else "",
        )
        for r in d.get("rows", [])
    ]


def _server(d: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (
            f"server load test, {d['requests']} requests / {d['threads']} threads",
            f"{d['server_errors_5xx']} 5xx, p50 {d['p50_ms']} ms, p95 {d['p95_ms']} ms",
            "no 5xx",
        )
    ]


def _live_reads(d: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = {r["mode"]: r for r in d["results"]}
    out = []
    for mode, label in (("follow", "readers follow commits"), ("rebuild", "readers rebuild (before)")):
        r = rows.get(mode)
        if r is not None:
            out.append(
                (
                    f"query while a run commits every {d['setup'].get('interval_s', 1.0)} s, "
                    f"{d['setup']['n']:,} vectors, {label}",
                    f"p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, worst refresh {r['worst_refresh_ms']} ms, "
                    f"{r['qps']} queries/s",
                    "readers stay fast" if mode == "follow" else "",
                )
            )
    return out


def _terminal(d: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (
            "terminal query warm / cold (median)",
            f"{d['warm_median_s']} s / {d['cold_median_s']} s",
            "≤ 1.0 s warm",
        )
    ]


def _run_all(d: dict[str, Any]) -> list[tuple[str, str, str]]:
    steps = ", ".join(f"{s['name']} {s['seconds'] / 60:.1f}" for s in d["steps"])
    return [
        (
            "all benchmarks, default sizes (`run_all.py`)",
            f"{d['total_seconds'] / 60:.1f} min ({steps})",
            "< 15 min",
        )
    ]


SECTIONS: list[tuple[str, Callable[[dict[str, Any]], list[tuple[str, str, str]]]]] = [
    ("demo_quality", _demo),
    ("ingest", _ingest),
    ("model_speed", _model_speed),
    ("ann", _ann),
    ("reindex", _reindex),
    ("speech", _speech),
    ("live_reads", _live_reads),
    ("server", _server),
    ("terminal_query", _terminal),
    ("run_all", _run_all),
]


def build() -> str:
    lines = ["| benchmark | figure | target | source |", "|---|---|---|---|"]
    for name, rows in SECTIONS:
        data = _load(name)
        if data is None:
            lines.append(f"| {name} | not run | | |")
            continue
        for what, figure, target in rows(data):
            lines.append(f"| {what} | {figure} | {target} | results/{name}.json |")
    return "\n".join(lines) + "\n"


def main() -> None:
    table = build()
    out = RESULTS / "SUMMARY.md"
    out.write_text(table)
    print(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
