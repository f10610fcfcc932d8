"""Shared fixtures. Tests run on real SQLite, real FAISS and real OpenCLIP code.

The tiny OpenCLIP config in tests/data has seeded random weights: it proves plumbing, not semantics
(tests about meaning use the bundled demo model).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

import mmsearch

TINY_MODEL = str(Path(__file__).parent / "data" / "tiny-clip.json")

# trio (pulled in by selenium) registers a Hypothesis plugin that breaks with this Hypothesis release.
os.environ.setdefault("HYPOTHESIS_NO_PLUGINS", "1")
# Exported ONNX image towers go to a per-run cache, never to the user's ~/.cache.
os.environ.setdefault("MMSEARCH_CACHE_DIR", tempfile.mkdtemp(prefix="mmsearch-test-cache-"))
# Never let a test reach for the network: model hubs fail fast and clearly instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def solid(
    path: Path,
    color: str | tuple[int, int, int] = "red",
    size: tuple[int, int] = (64, 48),
    fmt: str | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


@pytest.fixture
def tiny_index(tmp_path: Path) -> Iterator[mmsearch.Index]:
    idx = mmsearch.Index.create(tmp_path / "index", model=TINY_MODEL, pretrained="random")
    try:
        yield idx
    finally:
        idx.close()
