"""The catalog: SQLite through SQLAlchemy 2 Core, the index's source of truth.

It holds the files seen (with size, mtime and content hash), the distinct media contents, captions,
transcript segments, every embedding vector, the model identity and the schema version. The FAISS files are
derived from the ``embeddings`` table and can always be rebuilt from it.

Schema changes are numbered migrations (``MIGRATIONS``); ``meta.schema_version`` says how many ran.

This module is the catalog's one public name (``from mmsearch import db``); its parts, the only modules
besides it and :mod:`mmsearch.store` that speak SQL:

- :mod:`mmsearch.schema`: tables, triggers, migrations, meta keys, how paths are stored;
- :mod:`mmsearch.catalog`: :class:`Catalog` (opening, transactions, meta, reads, vector deltas);
- :mod:`mmsearch.catalog_errors`: a full disk or failing device turned into one clear message;
- :mod:`mmsearch.catalog_writes`: the named writes run inside a caller's transaction;
- :mod:`mmsearch.catalog_items`: reads of items and files (search hits, file details, texts).
"""

from __future__ import annotations

from mmsearch.catalog import (
    PRIVATE_FILE_MODE,
    Catalog,
    FileRow,
    VectorDelta,
    VectorState,
    missing_query,
)
from mmsearch.catalog_errors import disk_full_message, storage_errors
from mmsearch.catalog_items import (
    FileDetails,
    ItemRow,
    file_details,
    live_files_of,
    photo_facts,
    photo_summary,
    recordings_not_by,
    resolve_items,
    segments_of,
    texts_of,
)
from mmsearch.catalog_writes import (
    active_model,
    add_captions,
    add_embeddings,
    add_image_media,
    add_transcript,
    bump_generation,
    caption_ids_of,
    delete_embeddings,
    forget_model,
    inserted_id,
    mark_transcribed,
    media_of_kind,
    remove_captions,
    remove_files,
    remove_orphan_media,
    replace_transcript,
    set_active,
    set_target,
    target_in,
    write_file,
)
from mmsearch.schema import (
    ACTIVE_META,
    MIGRATION_MODEL,
    MIGRATIONS,
    MODELS_META,
    PHOTO_META_VERSION,
    READABLE_FROM,
    REF_COLUMNS,
    SCHEMA_VERSION,
    SPEECH_TARGET_META,
    TARGET_META,
    VECTOR_KINDS,
    captions,
    deletions,
    display_path,
    embeddings,
    files,
    media,
    meta,
    metadata,
    path_json,
    path_key,
    register_model,
    segments,
    storable,
    tags,
    vector_counts,
)

__all__ = [
    "ACTIVE_META",
    "MIGRATIONS",
    "MIGRATION_MODEL",
    "MODELS_META",
    "PHOTO_META_VERSION",
    "PRIVATE_FILE_MODE",
    "READABLE_FROM",
    "REF_COLUMNS",
    "SCHEMA_VERSION",
    "SPEECH_TARGET_META",
    "TARGET_META",
    "VECTOR_KINDS",
    "Catalog",
    "FileDetails",
    "FileRow",
    "ItemRow",
    "VectorDelta",
    "VectorState",
    "active_model",
    "add_captions",
    "add_embeddings",
    "add_image_media",
    "add_transcript",
    "bump_generation",
    "caption_ids_of",
    "captions",
    "deletions",
    "delete_embeddings",
    "disk_full_message",
    "display_path",
    "embeddings",
    "file_details",
    "files",
    "forget_model",
    "inserted_id",
    "live_files_of",
    "photo_facts",
    "photo_summary",
    "mark_transcribed",
    "media",
    "media_of_kind",
    "meta",
    "metadata",
    "missing_query",
    "path_json",
    "path_key",
    "recordings_not_by",
    "register_model",
    "remove_captions",
    "remove_files",
    "remove_orphan_media",
    "replace_transcript",
    "resolve_items",
    "segments",
    "segments_of",
    "set_active",
    "set_target",
    "storable",
    "tags",
    "storage_errors",
    "target_in",
    "texts_of",
    "vector_counts",
    "write_file",
]
