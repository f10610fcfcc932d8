"""What a client is shown of a file and of a search hit, built from the catalog: shared by the HTTP routes and
the MCP server (which add their own links). No web framework here."""

from __future__ import annotations

from typing import Any

from mmsearch import db
from mmsearch.catalog import Catalog
from mmsearch.render import base_name
from mmsearch.search import Hit

#: Captions shown with each hit.
HIT_CAPTIONS = 5


def item_details(catalog: Catalog, file_id: int, max_segments: int) -> dict[str, Any] | None:
    """A live file's metadata, captions and (for a recording) transcript and first ``max_segments``
    segments; None unless the file is in the catalog and live."""
    row = db.file_details(catalog, file_id)
    if row is None:
        return None
    segments: list[dict[str, Any]] = []
    if row.kind in ("audio", "video"):
        segments = [
            {"start": a, "end": b, "text": t}
            for a, b, t in db.segments_of(catalog, row.media_id, max_segments)
        ]
    return {
        "id": row.id,
        "kind": row.kind,
        **db.path_json(row.path_key),
        "name": base_name(db.display_path(row.path_key)),
        "size": row.size,
        "width": row.width,
        "height": row.height,
        "duration": row.duration,
        "language": row.language,
        "transcript": row.transcript,
        "captions": [
            {"id": cid, "source": src, "text": txt}
            for cid, src, txt in catalog.captions_of([file_id]).get(file_id, [])
        ],
        "segments": segments,
        # A photo's date taken, camera, place, keywords and zero-shot tags.
        **db.photo_facts(catalog, row.id, row.media_id),
    }


def hits_with_files(catalog: Catalog, hits: list[Hit]) -> list[dict[str, Any]]:
    """Each hit as a dict (:meth:`Hit.as_dict`) with its file's ``name``, ``file_kind`` and first captions."""
    image_files = sorted({h.file_id for h in hits if h.kind != "segment"})
    caps = catalog.captions_of(image_files) if image_files else {}
    out = []
    for h in hits:
        d = h.as_dict()  # path in display form, path_b64 the exact bytes
        d["name"] = base_name(str(d["path"]))
        d["file_kind"] = h.file_kind or ("audio" if h.kind == "segment" else "image")
        d["captions"] = [txt for _, _, txt in caps.get(h.file_id, [])][:HIT_CAPTIONS]
        out.append(d)
    return out
