"""mmsearch: cross-modal semantic search over folders of images, captions and audio.

The public API is :class:`Index` (create/open an index, add folders, search by text, image or audio) and
the :class:`Hit` it returns; every expected failure is a :class:`MmsearchError`.

Names are imported on first use (PEP 562), so ``import mmsearch.client`` - the CLI's path to a warm server -
does not pay for numpy, SQLAlchemy and Pillow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mmsearch.errors import (
    BadMediaError,
    BadQueryError,
    IndexLockedError,
    IndexNotFoundError,
    MissingDependencyError,
    MmsearchError,
    ModelMismatchError,
    WeightsUnavailableError,
)

if TYPE_CHECKING:
    from mmsearch.api import Index, default_index_path, open_or_create
    from mmsearch.filters import Filters
    from mmsearch.ingest import IngestReport
    from mmsearch.query import SearchResult
    from mmsearch.search import TARGETS, Hit

_LAZY = {
    "Index": "mmsearch.api",
    "default_index_path": "mmsearch.api",
    "open_or_create": "mmsearch.api",
    "IngestReport": "mmsearch.ingest",
    "TARGETS": "mmsearch.search",
    "Hit": "mmsearch.search",
    "Filters": "mmsearch.filters",
    "SearchResult": "mmsearch.query",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mmsearch' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"
__all__ = [
    "TARGETS",
    "BadMediaError",
    "BadQueryError",
    "Filters",
    "Hit",
    "Index",
    "IndexLockedError",
    "IndexNotFoundError",
    "IngestReport",
    "MissingDependencyError",
    "MmsearchError",
    "ModelMismatchError",
    "SearchResult",
    "WeightsUnavailableError",
    "default_index_path",
    "open_or_create",
]
