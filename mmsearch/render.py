"""The text `mmsearch query` prints, as plain strings: no typer, no rich, nothing printed here.

Both ways the command answers - the typer command, and the fast path of :func:`mmsearch.cli.main` that
sends the query to a running server without importing typer - format through these functions, so their
output is the same byte for byte. Only the table for a terminal is drawn by rich (in the CLI), from
:func:`hit_rows`.

File names, captions and transcripts are anyone's text. Whatever reaches a terminal goes through
:func:`printable` (no control character arrives raw: no escape sequence, no tab or newline that would
break the tab-separated, line-based plain output), and JSON goes through :func:`to_json` (valid UTF-8
only: a name that is not carries its display form in ``path`` and its exact bytes in ``path_b64``).
Standard library only: the fast path imports this module.
"""

from __future__ import annotations

import json
import re
from typing import Any

# path_b64: the hit's exact path bytes, base64 (``path`` is for display: undecodable bytes replaced).
# confidence: the calibrated score (None without a calibration); matched: vector | words | both.
HIT_FIELDS = (
    "rank",
    "score",
    "confidence",
    "matched",
    "kind",
    "path",
    "path_b64",
    "text",
    "start",
    "end",
    "item_id",
    "file_id",
    "file_kind",
    "moments",
    "taken_at",
    "camera",
    "lat",
    "lon",
)
COLUMNS = ("#", "score", "conf", "kind", "path", "text")
#: What a query that nothing in the collection answers well prints.
NO_MATCH = "no good match"
SNIPPET_CHARS = 120

# What printable() escapes: the C0 controls (tab and newline too), DEL, the C1 controls (Unicode category
# Cc), the two Unicode line separators (str.splitlines and some viewers break lines there), and the
# backslash itself, so that every backslash printed starts an escape and the output reads back unambiguously
# (a name holding the four characters \x1b prints as \\x1b, one holding ESC as \x1b).
_SHORT_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\\\\]")
# Lone surrogates: os.fsdecode's stand-ins for undecodable bytes (U+DC80-U+DCFF), or any other from
# JSON's "\ud800". No strict encoder writes them.
_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_FSDECODE_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def display(s: str) -> str:
    """``s`` as valid Unicode: a file name decoded by Python with surrogate escapes gets its undecodable
    bytes replaced by U+FFFD, exactly as :func:`mmsearch.db.display_path` does with the name's bytes."""
    if not _SURROGATE.search(s):
        return s
    s = _NOT_FSDECODE_SURROGATE.sub("\ufffd", s)
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    short = _SHORT_ESCAPES.get(c)
    if short is not None:
        return short
    code = ord(c)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(s: str) -> str:
    """``s`` safe to print on a terminal and in line-based, tab-separated output: :func:`display` form,
    with every control character escaped as Python writes it (``\\x1b``, ``\\t``, ``\\n``, ``\\u2028``)
    and each backslash doubled, so the escapes cannot be confused with a name's own characters."""
    return _UNPRINTABLE.sub(_escape_char, display(s))


def json_safe(value: Any) -> Any:
    """``value`` (JSON-like) with every string, keys included, in :func:`display` form."""
    if isinstance(value, str):
        return display(value)
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def to_json(payload: Any) -> str:
    # ensure_ascii (the default) writes any other character, control characters included, as an escape:
    # the output is ASCII whatever the terminal or stdout encoding.
    return json.dumps(json_safe(payload), indent=2) + "\n"


def query_json(target: str, hits: list[dict[str, Any]], heard: str | None, no_match: bool = False) -> str:
    """``--json``: the target, whether nothing matched well, the hits with :data:`HIT_FIELDS` only, and the
    transcript of a voice query."""
    payload: dict[str, Any] = {
        "target": target,
        "no_match": no_match,
        # A field a hit lacks is left out rather than failing the whole answer.
        "hits": [{f: h[f] for f in HIT_FIELDS if f in h} for h in hits],
    }
    if heard is not None:
        payload["transcript"] = heard
    return to_json(payload)


def hit_rows(hits: list[dict[str, Any]]) -> list[tuple[str, str, str, str, str, str]]:
    """One row of :data:`COLUMNS` per hit, each cell :func:`printable`; a transcript segment's text starts
    with its time span."""
    rows = []
    for h in hits:
        snippet = h["text"] or ""
        if h["kind"] == "frame" and h["start"] is not None:
            snippet = f"[{clock(h['start'])}] {snippet}".rstrip()
        elif h["start"] is not None and h["end"] is not None:
            snippet = f"[{clock(h['start'])}–{clock(h['end'])}] {snippet}"
        if h.get("moments"):  # the other moments of the same video, folded under its best one
            snippet += f" (+{len(h['moments'])} more: " + ", ".join(
                clock(m["start"]) for m in h["moments"][:5]
            )
            snippet += ", …)" if len(h["moments"]) > 5 else ")"
        rows.append(
            (
                str(h["rank"]),
                f"{h['score']:.3f}",
                "-" if h.get("confidence") is None else f"{h['confidence']:.2f}",
                printable(h["kind"]),
                printable(h["path"]),
                shorten(printable(snippet), SNIPPET_CHARS),
            )
        )
    return rows


def plain_hits(hits: list[dict[str, Any]], no_match: bool = False) -> str:
    """Output to a pipe or a file: one tab-separated line per hit, never wrapped, so paths survive grep/cut."""
    if not hits:
        return f"{NO_MATCH}\n" if no_match else "no results\n"
    return "".join("\t".join(row) + "\n" for row in hit_rows(hits))


def plain_query(hits: list[dict[str, Any]], heard: str | None, no_match: bool = False) -> str:
    """A query's output to a pipe or a file: what a voice query was heard as, then :func:`plain_hits`."""
    return (f"heard: {printable(heard)}\n" if heard is not None else "") + plain_hits(hits, no_match)


def base_name(path: str) -> str:
    """The last component of a path written with either kind of slash."""
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def shorten(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"
