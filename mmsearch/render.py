"""The text `mmsearch query` prints, as plain strings: no typer, no rich, nothing printed here.

Both ways the command answers - the typer command, and the fast path of :func:`mmsearch.cli.main` that
sends the query to a running server without importing typer - format through these functions, so their
output is the same byte for byte. Only the table for a terminal is drawn by rich (in the CLI), from
:func:`hit_rows`.
"""

from __future__ import annotations

import json
from typing import Any

HIT_FIELDS = ("rank", "score", "kind", "path", "text", "start", "end", "item_id", "file_id")
COLUMNS = ("#", "score", "kind", "path", "text")
SNIPPET_CHARS = 120


def to_json(payload: Any) -> str:
    return json.dumps(payload, indent=2) + "\n"


def query_json(target: str, hits: list[dict[str, Any]], heard: str | None) -> str:
    """``--json``: the target, the hits with :data:`HIT_FIELDS` only, and the transcript of a voice query."""
    payload: dict[str, Any] = {"target": target, "hits": [{f: h[f] for f in HIT_FIELDS} for h in hits]}
    if heard is not None:
        payload["transcript"] = heard
    return to_json(payload)


def hit_rows(hits: list[dict[str, Any]]) -> list[tuple[str, str, str, str, str]]:
    """One row of :data:`COLUMNS` per hit; a transcript segment's text starts with its time span."""
    rows = []
    for h in hits:
        snippet = h["text"] or ""
        if h["start"] is not None and h["end"] is not None:
            snippet = f"[{clock(h['start'])}–{clock(h['end'])}] {snippet}"
        rows.append(
            (str(h["rank"]), f"{h['score']:.3f}", h["kind"], h["path"], shorten(snippet, SNIPPET_CHARS))
        )
    return rows


def plain_hits(hits: list[dict[str, Any]]) -> str:
    """Output to a pipe or a file: one tab-separated line per hit, never wrapped, so paths survive grep/cut."""
    if not hits:
        return "no results\n"
    return "".join("\t".join(row) + "\n" for row in hit_rows(hits))


def plain_query(hits: list[dict[str, Any]], heard: str | None) -> str:
    """A query's output to a pipe or a file: what a voice query was heard as, then :func:`plain_hits`."""
    return (f"heard: {heard}\n" if heard is not None else "") + plain_hits(hits)


def clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def shorten(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"
