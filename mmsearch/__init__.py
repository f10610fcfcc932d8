"""mmsearch: cross-modal semantic search over folders of images, captions and audio.

The public API is :class:`Index` (create/open an index, add folders, search by text, image or audio) and
the :class:`Hit` it returns; every expected failure is a :class:`MmsearchError`.
"""

from mmsearch.api import Index, default_index_path, open_or_create
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
from mmsearch.ingest import IngestReport
from mmsearch.search import TARGETS, Hit

__version__ = "0.1.0"
__all__ = [
    "TARGETS",
    "BadMediaError",
    "BadQueryError",
    "Hit",
    "Index",
    "IndexLockedError",
    "IndexNotFoundError",
    "IngestReport",
    "MissingDependencyError",
    "MmsearchError",
    "ModelMismatchError",
    "WeightsUnavailableError",
    "default_index_path",
    "open_or_create",
]
