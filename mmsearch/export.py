"""``mmsearch export``: the active model's vectors and what each one is (path, kind, caption or transcript
text, time range, model identity), written in the layout clip-retrieval's inference writes and
embedding-reader / autofaiss read, so an index can move to another vector store.

clip-retrieval pairs row ``i`` of ``img_emb``, row ``i`` of ``text_emb`` and row ``i`` of ``metadata`` (an
image and its caption). An index's images and texts are not one-to-one (an image has any number of
captions, a recording's segments have no image), so each collection gets its own folder in that layout,
every metadata row describing the vector of the same row::

    OUT/export.json                          what was exported: model identity, dimension, dtype, counts
    OUT/images/img_emb/img_emb_0.npy         image vectors                     (format "npy")
    OUT/images/metadata/metadata_0.parquet   one row per image vector
    OUT/texts/text_emb/text_emb_0.npy        caption vectors, then transcript segment vectors
    OUT/texts/metadata/metadata_0.parquet    one row per text vector

With format ``parquet`` the vectors are an ``embedding`` column (fixed-size list) of the same rows, in
``OUT/images/img_emb/img_emb_0.parquet`` and ``OUT/texts/text_emb/text_emb_0.parquet``, and there is no
metadata folder (embedding-reader's ``parquet`` format; ``npy`` is its ``parquet_npy``). Shards hold at
most ``shard_rows`` rows and are numbered as clip-retrieval numbers them (zero-padded to the digits of the
shard count). Every parquet file carries the manifest under the schema metadata key ``mmsearch``.

Metadata columns: ``image_path`` (the image file, display form; null for segments), ``caption`` (the text of
a caption or segment row; for an image row its file's captions, one per line, or null), ``path`` (display
form) and ``path_b64`` (its exact bytes, base64), ``kind`` (image | caption | segment), ``start``/``end``
(seconds, segments only), ``item_id`` (the catalog's embedding id) and ``file_id``. An image vector is
described by the first live file holding that content; a vector with no live file is left out.

Vectors and items are read through the catalog (:meth:`mmsearch.catalog.Catalog.load_vectors`,
:func:`mmsearch.db.resolve_items`); nothing is embedded, no model is loaded. The folder is written beside
``OUT`` under a temporary name and renamed into place once complete; it is owner-only (0700), like the
index folder, since it names every file and holds every caption and transcript.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsearch import db
from mmsearch.errors import ActiveModelChanged, ConfigError, MissingDependencyError, MmsearchError

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError as e:  # pragma: no cover - depends on the installation
    raise MissingDependencyError(e.name or "pyarrow", "mmsearch export", extra="export") from e

if TYPE_CHECKING:
    from mmsearch.api import Index

FORMATS = ("parquet", "npy")
DTYPES = ("float32", "float16")
#: Rows per shard: clip-retrieval's default write batch size.
SHARD_ROWS = 1_000_000
MANIFEST = "export.json"
#: Schema metadata key of every parquet file written: the manifest, as JSON.
PARQUET_KEY = b"mmsearch"
#: collection -> (its embeddings folder and file prefix, the item kinds it holds in row order).
COLLECTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "images": ("img_emb", ("image",)),
    "texts": ("text_emb", ("caption", "segment")),
}
METADATA_COLUMNS = [
    ("image_path", pa.string()),
    ("caption", pa.string()),
    ("path", pa.string()),
    ("path_b64", pa.string()),
    ("kind", pa.string()),
    ("start", pa.float64()),
    ("end", pa.float64()),
    ("item_id", pa.int64()),
    ("file_id", pa.int64()),
]


@dataclass
class ExportReport:
    out: Path
    format: str
    dtype: str
    model: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)  # rows per collection
    skipped: int = 0  # vectors left out: no live file holds their item any more

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "format": self.format,
            "dtype": self.dtype,
            "model": self.model,
            "counts": self.counts,
            "skipped": self.skipped,
        }


@dataclass
class _Rows:
    """One collection: vectors and the metadata of each row, aligned."""

    vectors: np.ndarray
    columns: dict[str, list[Any]]

    def __len__(self) -> int:
        return len(self.vectors)


def export(
    index: Index,
    out: str | Path,
    format: str = "parquet",  # noqa: A002 - the word the CLI option and the issue use
    *,
    dtype: str = "float32",
    shard_rows: int = SHARD_ROWS,
) -> ExportReport:
    """Write the active model's vectors of ``index`` and their metadata to the new folder ``out`` (which
    must not exist, or be empty); see the module's description for the layout."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format '{format}' (choose from {', '.join(FORMATS)})")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown vector type '{dtype}' (choose from {', '.join(DTYPES)})")
    if shard_rows < 1:
        raise ConfigError("shard_rows must be at least 1")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MmsearchError(f"{out} exists and is not an empty folder: export to a new folder")

    store = index.store
    model = store.follow_active()
    identity, dim = store.identity_of(model), store.dim_of(model)
    report = ExportReport(out, format, dtype, identity)
    collections: dict[str, _Rows] = {}
    for name, (_, kinds) in COLLECTIONS.items():
        collections[name], skipped = _read(index, kinds, dim, model)
        report.counts[name] = len(collections[name])
        report.skipped += skipped
    if store.catalog.active_model() != model:
        raise ActiveModelChanged("another model became active during the export: export again")

    manifest = _manifest(report, model, dim, shard_rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(mode=0o700)  # owner-only, like the index folder: it names every file and caption
    try:
        for name, rows in collections.items():
            _write(partial / name, COLLECTIONS[name][0], rows, format, dtype, shard_rows, manifest)
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above): the rename below takes its place
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return report


def _read(index: Index, kinds: tuple[str, ...], dim: int, model: str) -> tuple[_Rows, int]:
    """The vectors of ``kinds`` (in that order, each by embedding id) whose item has a live file, with the
    metadata of each; and how many were left out."""
    catalog = index.store.catalog
    vectors: list[np.ndarray] = []
    columns: dict[str, list[Any]] = {name: [] for name, _ in METADATA_COLUMNS}
    skipped = 0
    for kind in kinds:
        ids, vecs = catalog.load_vectors(kind, dim, model)
        items = db.resolve_items(catalog, ids.tolist(), (kind,))
        keep = np.fromiter((int(i) in items for i in ids), bool, len(ids))
        skipped += int((~keep).sum())
        vectors.append(vecs[keep])
        rows = [items[int(i)] for i in ids[keep]]
        captions = catalog.captions_of(sorted({r.file_id for r in rows})) if kind == "image" else {}
        for r in rows:
            where = db.path_json(r.path_key)
            text = r.text
            if kind == "image":
                said = [txt for _, _, txt in sorted(captions.get(r.file_id, []))]
                text = "\n".join(said) if said else None
            columns["image_path"].append(where["path"] if kind != "segment" else None)
            columns["caption"].append(text)
            columns["path"].append(where["path"])
            columns["path_b64"].append(where["path_b64"])
            columns["kind"].append(kind)
            columns["start"].append(r.start)
            columns["end"].append(r.end)
            columns["item_id"].append(int(r.id))
            columns["file_id"].append(int(r.file_id))
    stacked = np.concatenate(vectors) if vectors else np.empty((0, dim), np.float32)
    return _Rows(stacked.reshape(-1, dim), columns), skipped


def _manifest(report: ExportReport, model: str, dim: int, shard_rows: int) -> dict[str, Any]:
    from mmsearch.discovery import VERSION

    collections = {}
    for name, (prefix, kinds) in COLLECTIONS.items():
        n = report.counts[name]
        shards = _shard_names(prefix, n, shard_rows, report.format)
        entry: dict[str, Any] = {
            "kinds": list(kinds),
            "count": n,
            "embeddings": [f"{name}/{prefix}/{s}" for s in shards],
        }
        if report.format == "npy":
            metadata = _shard_names("metadata", n, shard_rows, "parquet")
            entry["metadata"] = [f"{name}/metadata/{s}" for s in metadata]
        collections[name] = entry
    return {
        "mmsearch_export": 1,
        "mmsearch_version": VERSION,
        "format": report.format,
        "dtype": report.dtype,
        "dim": dim,
        "model_key": model,
        "model": report.model,
        "collections": collections,
    }


def _shard_names(prefix: str, n: int, shard_rows: int, suffix: str) -> list[str]:
    """``prefix_0.suffix`` …, zero-padded to the digits of the shard count as clip-retrieval pads them; no
    shard for no rows."""
    count = math.ceil(n / shard_rows)
    width = int(math.log10(count)) + 1 if count else 1
    return [f"{prefix}_{str(i).zfill(width)}.{suffix}" for i in range(count)]


def _write(
    folder: Path,
    prefix: str,
    rows: _Rows,
    format: str,  # noqa: A002
    dtype: str,
    shard_rows: int,
    manifest: dict[str, Any],
) -> None:
    (folder / prefix).mkdir(parents=True)
    if format == "npy":
        (folder / "metadata").mkdir()
    schema_metadata = {PARQUET_KEY: json.dumps(manifest).encode("utf-8")}
    vectors = rows.vectors.astype(dtype, copy=False)
    embeddings = _shard_names(prefix, len(rows), shard_rows, format)
    metadata = _shard_names("metadata", len(rows), shard_rows, "parquet")
    for n, (emb_name, meta_name) in enumerate(zip(embeddings, metadata, strict=True)):
        part = slice(n * shard_rows, (n + 1) * shard_rows)
        table = pa.table({name: pa.array(rows.columns[name][part], kind) for name, kind in METADATA_COLUMNS})
        if format == "npy":
            with open(folder / prefix / emb_name, "wb") as f:
                np.save(f, np.ascontiguousarray(vectors[part]))
            pq.write_table(table.replace_schema_metadata(schema_metadata), folder / "metadata" / meta_name)
        else:
            flat = pa.array(np.ascontiguousarray(vectors[part]).reshape(-1))
            column = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
            table = table.append_column("embedding", column).replace_schema_metadata(schema_metadata)
            pq.write_table(table, folder / prefix / emb_name)


def read_export(out: str | Path) -> dict[str, tuple[np.ndarray, list[dict[str, Any]]]]:
    """What an export holds, read back: collection -> (vectors as written, one metadata dict per row in
    the same order). For checking an export, and for small ones: it reads everything into memory."""
    out = Path(out)
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MmsearchError(f"{out} is not an mmsearch export: {e}") from e
    result = {}
    for name, entry in manifest["collections"].items():
        vectors: list[np.ndarray] = []
        metadata: list[dict[str, Any]] = []
        if manifest["format"] == "npy":
            for emb, meta in zip(entry["embeddings"], entry["metadata"], strict=True):
                vectors.append(np.load(out / emb, allow_pickle=False))
                metadata.extend(pq.read_table(out / meta).to_pylist())
        else:
            for emb in entry["embeddings"]:
                table = pq.read_table(out / emb)
                column = table.column("embedding").combine_chunks()
                vectors.append(column.values.to_numpy().reshape(len(table), -1))
                metadata.extend(table.drop_columns(["embedding"]).to_pylist())
        dim, dtype = manifest["dim"], np.dtype(manifest["dtype"])
        result[name] = (np.concatenate(vectors) if vectors else np.empty((0, dim), dtype), metadata)
    return result
