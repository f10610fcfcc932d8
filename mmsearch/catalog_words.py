"""Search by words: BM25 over the full-text indexes of captions, transcript segments and file names
(schema 6, see :mod:`mmsearch.schema`), mapped to the embeddings a search returns.

A caption reaches its own embedding and the image of its file; a segment its embedding; a file name the
image of an image file, the first segment of a recording, or the first keyframe of a video. User text is never read as FTS5 syntax: it is
split into words here, stop words dropped, each word quoted, and the words ORed (BM25 ranks the texts that
hold more of them, and rarer ones, first).

FTS5's bm25 first counts the rows holding each word of the query, a pass over the word's whole list, then
reads the length of every row it scores: a query costs about as much as the rows holding its words. So,
as Lucene's CommonTermsQuery does, each index ranks with FTS5 the rows of the rarest words of a query only
(:func:`_tiers`): the rarest words until their rows are enough for the hits asked, then, if those leave too
few hits (filters, dead files), the rarer words held by at most ``MAX_RANKED`` rows together. The other
words add their part of BM25 to the ranked rows that hold them too, scored by FTS5 on those rows alone
(:func:`_ranked_with`; words held by at most ``MAX_BOOSTING`` rows, as counting them is the cost), so a
text holding every word comes first. A row holding commoner words only is left out while rarer ones give
enough rows: BM25's idf ranks it lower unless it says a commoner word several times (how often the first
hits differ from ranking every row, ``exact=True``, is measured by benchmarks/bench_query.py). When the
rarer words give too few hits, or every word is common, the newest rows holding any word, ``MAX_RANKED`` at
a time (at most ``MAX_WINDOWS`` times), are scored here by the same BM25 formula, its counts taken in that
window.

A query runs a few small statements per index, so their fixed cost counts: they are plain SQL on the
driver's connection (its statement cache keeps them prepared), and the statement mapping ranked rows to
embeddings (through their live, passing files) is built with SQLAlchemy once per index and filters, then
compiled and kept (:func:`_compiled_reach`); the rows it maps are passed as one JSON array.

A filtered query ranks the rows its filters allow, not the rows the filters would drop after ranking: each
index's allowed rows (:func:`mmsearch.catalog_filters.passing_rows`) are kept per filter and catalog
version, the rarer words' ranking keeps only them, and the windows of newest rows are read inside the id
ranges (spans) that hold them, so a folder's old rows are reached however many newer rows the collection
holds. Rows scattered over more than ``MAX_SPANS`` ranges are read as for an unfiltered query and the
filters drop them afterwards.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import unicodedata
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache, partial
from itertools import islice
from typing import Any

import numpy as np
from sqlalchemy import Connection, Select, and_, bindparam, func, select, union_all
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

from mmsearch.catalog import Catalog
from mmsearch.catalog_filters import file_passes, item_of, passing_rows, version_in
from mmsearch.filters import Filters
from mmsearch.schema import FTS_FROM, captions, embeddings, files, frames, segments

#: English words too common to say what a query is about: dropped from word queries.
STOP_WORDS = frozenset(
    """a about above after again all am an and any are as at be been before being below between both but
    by can could did do does doing down during each few for from further had has have having he her here
    hers him his how i if in into is it its itself just me more most my no nor not of off on once only or
    other our ours out over own same she should so some such than that the their theirs them then there
    these they this those through to too under until up very was we were what when where which while who
    whom why will with would you your yours""".split()  # noqa: SIM905
)
#: Most words of one query that are searched (the rest are ignored).
MAX_TERMS = 32
#: Most rows one full-text index ranks by BM25 for one query (see the module's docstring).
MAX_RANKED = 1024
#: Most rows holding a word for it to add its part of BM25 to the rows ranked for rarer words (see
#: :func:`_ranked_with`): FTS5 counts the rows holding each word it scores, a pass over as many rows.
MAX_BOOSTING = 16 * MAX_RANKED
#: Most windows of newest rows ranked when every word of the query is common.
MAX_WINDOWS = 4
#: A filtered query reads only its allowed rows when they lie in at most this many id ranges (spans).
MAX_SPANS = 64
#: A run of ASCII letters and digits (the runs of _split, for ASCII text).
_ASCII_WORD = re.compile(r"[A-Za-z0-9]+")
#: BM25's parameters, as FTS5's bm25 uses them.
_K1, _B = 1.2, 0.75
#: How many more ranked rows than hits are mapped to embeddings at first; more while filters drop them.
_FIRST_MAP = 4
_GROWTH = 4


@dataclass(frozen=True)
class WordHit:
    """An embedding reached by words: ``score`` is -BM25 of its best text (higher is better);
    ``all_terms``: a text or name reaching it holds every query word; ``vector``: the embedding's vector,
    when asked for (see :func:`word_hits`)."""

    id: int
    score: float
    all_terms: bool
    vector: np.ndarray | None = field(default=None, compare=False, repr=False)


def _split(text: str) -> list[str]:
    """Runs of letters, digits, marks and private-use characters: what the unicode61 tokenizer may keep
    in a token (it splits the runs further where it must, inside a quoted term)."""
    if text.isascii():
        return _ASCII_WORD.findall(text)
    out: list[str] = []
    start = None
    for i, ch in enumerate(text):
        keep = unicodedata.category(ch)[0] in "LNM" or unicodedata.category(ch) == "Co"
        if keep and start is None:
            start = i
        elif not keep and start is not None:
            out.append(text[start:i])
            start = None
    if start is not None:
        out.append(text[start:])
    return out


def words(text: str) -> list[str]:
    """The words of ``text`` folded as the index folds them: lower-cased, combining marks removed (the
    same on a query term and on a text, to tell whether the text holds the term)."""
    if text.isascii():
        return _ASCII_WORD.findall(text.lower())
    decomposed = unicodedata.normalize("NFD", text)
    folded = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _split(unicodedata.normalize("NFC", folded).lower())


def query_terms(text: str) -> list[str]:
    """The terms of ``text`` searched, as given (lower-cased): without stop words or repeats (terms equal
    once folded), at most MAX_TERMS. FTS5 tokenizes each one itself, as it tokenized the texts."""
    out: list[str] = []
    seen: set[tuple[str, ...]] = set()
    for chunk in _split(unicodedata.normalize("NFC", text)):
        key = tuple(words(chunk))
        if key and key not in seen and not (len(key) == 1 and key[0] in STOP_WORDS):
            seen.add(key)
            out.append(chunk.lower())
    return out[:MAX_TERMS]


def _match(terms: Sequence[str]) -> str:
    """An FTS5 query ORing the terms, each a quoted string (so never read as FTS5 syntax)."""
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


def word_hits(
    catalog: Catalog,
    text: str,
    kinds: Sequence[str],
    model: str,
    limit: int,
    filters: Filters | None = None,
    *,
    vectors: int = 0,
    exact: bool = False,
) -> list[WordHit]:
    """The embeddings of ``model`` of ``kinds`` reached by the words of ``text``, best first, at most
    ``limit``, each through a live file that passes ``filters``; the first ``vectors`` hits with their
    vector, read in the same snapshot. Empty for a catalog without full-text indexes (older than schema 6,
    opened read-only) and for text of stop words only.

    ``exact``: each index ranks the rows holding any word by FTS5's BM25 of the whole query (its first
    MAX_RANKED rows), the ranking the rarer words' approximate (see the module's docstring), at the cost of
    a pass over all those rows."""
    terms = query_terms(text)
    if not terms or limit <= 0 or catalog.schema_version < FTS_FROM:
        return []
    if not catalog.has_video:
        kinds = [k for k in kinds if k != "frame"]  # (no keyframes before schema 8)
    best: dict[int, tuple[float, bool]] = {}
    if filters is not None and filters.is_empty():
        filters = None
    with catalog.snapshot() as conn:
        # The statements below are plain SQL run on the driver's connection, whose statement cache keeps
        # them prepared: SQLAlchemy's per-statement work would cost more than SQLite's for these reads.
        raw = conn.connection.driver_connection
        assert raw is not None
        version = version_in(conn) if filters is not None else ()
        for source in _sources(kinds):
            allowed = None if filters is None else _allowed_rows(catalog, conn, version, source, filters)
            found = _read_source(raw, source, terms, limit, model, filters, allowed, exact)
            for eid, (score, whole) in found.items():
                old = best.get(eid)
                best[eid] = (score, whole) if old is None else (max(old[0], score), old[1] or whole)
        ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))[:limit]
        hits = [WordHit(eid, score, whole) for eid, (score, whole) in ranked]
        if vectors > 0 and hits:
            vector_of = _vectors(raw, [h.id for h in hits[:vectors]])
            hits[:vectors] = [
                WordHit(h.id, h.score, h.all_terms, vector_of.get(h.id)) for h in hits[:vectors]
            ]
    return hits


def _vectors(raw: sqlite3.Connection, ids: list[int]) -> dict[int, np.ndarray]:
    """Embedding id -> its vector, for ``ids``."""
    sql = "SELECT id, vector FROM embeddings WHERE id IN (SELECT value FROM json_each(?))"
    return {int(eid): np.frombuffer(blob, np.float32) for eid, blob in raw.execute(sql, (json.dumps(ids),))}


# --- from full-text rows to embeddings ------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    fts: str  # the full-text index
    content: str  # the table whose rows the index's rows are (same id)
    text: str  # its column holding the text indexed (files: the path, of which the name is indexed)
    reach: tuple[str, ...]  # the item kinds its rows reach (see _reach_statement)

    @property
    def names(self) -> bool:
        return self.content == "files"


def _sources(kinds: Sequence[str]) -> Iterator[_Source]:
    """The full-text indexes to read for ``kinds``, each with the item kinds its rows reach."""
    if "caption" in kinds or "image" in kinds:
        yield _Source(
            "captions_fts", "captions", "text", tuple(k for k in ("caption", "image") if k in kinds)
        )
    if "segment" in kinds:
        yield _Source("segments_fts", "segments", "text", ("segment",))
    named = tuple(k for k in ("image", "segment", "frame") if k in kinds)
    if named:
        yield _Source("files_fts", "files", "path", named)


def _reach_statement(source: _Source, filters: Filters | None) -> Select[Any]:
    """(full-text row, its text, embedding id) of the embeddings of the model ``:model`` that the rows
    ``:rows`` (a JSON array) reach through a live file that passes ``filters``: a caption its own
    embedding and the image of its file; a segment its embedding; a file name the image of an image file,
    the first segment of a recording (segments are stored in time order), or the first keyframe of a video. Each embedding is found
    through ix_embeddings_items (see :func:`item_of`)."""
    rows = select(func.json_each(bindparam("rows", "[]")).table_valued("value").c.value)
    f, e = files.alias("wf"), embeddings.alias("we")

    def embedding_of(kind: str, item: Any) -> Any:
        is_kind, column = item_of(kind, e)
        return and_(e.c.model == bindparam("model", ""), is_kind, column == item)

    parts = []
    if source.content == "captions":
        c = captions
        for kind in source.reach:  # the caption's own embedding, the image of the file it describes
            item: Any = c.c.id if kind == "caption" else f.c.media_id
            parts.append(
                select(c.c.id, c.c.text, e.c.id)
                .select_from(c.join(f, f.c.id == c.c.file_id).join(e, embedding_of(kind, item)))
                .where(c.c.id.in_(rows), file_passes(filters, f))
            )
    elif source.content == "segments":
        s = segments
        live = select(f.c.id).where(f.c.media_id == s.c.media_id, file_passes(filters, f)).exists()
        parts.append(
            select(s.c.id, s.c.text, e.c.id)
            .select_from(s.join(e, embedding_of("segment", s.c.id)))
            .where(s.c.id.in_(rows), live)
        )
    else:
        s2, fr = segments.alias("s2"), frames.alias("fr")
        for kind in source.reach:
            if kind == "image":
                file_kind, item = "image", f.c.media_id
            elif kind == "frame":
                file_kind = "video"
                item = select(func.min(fr.c.id)).where(fr.c.media_id == f.c.media_id).scalar_subquery()
            else:
                file_kind = "audio"
                item = select(func.min(s2.c.id)).where(s2.c.media_id == f.c.media_id).scalar_subquery()
            parts.append(
                select(f.c.id, f.c.path, e.c.id)
                .select_from(f.join(e, embedding_of(kind, item)))
                .where(f.c.id.in_(rows), f.c.kind == file_kind, file_passes(filters, f))
            )
    return parts[0] if len(parts) == 1 else union_all(*parts)  # type: ignore[return-value]


#: (source, filters) -> the reach statement compiled: SQL, and its parameters in order ("rows" and
#: "model" given per query, the filters' values bound here). Most recent last.
_COMPILED: dict[tuple[_Source, Filters | None], tuple[str, list[tuple[str, Any]]]] = {}
_COMPILED_SIZE = 64
_compiled_lock = threading.Lock()
_PER_QUERY = ("rows", "model")


def _compiled_reach(source: _Source, filters: Filters | None) -> tuple[str, list[tuple[str, Any]]]:
    key = (source, filters)
    with _compiled_lock:
        hit = _COMPILED.get(key)
    if hit is None:
        compiled = _reach_statement(source, filters).compile(
            dialect=sqlite_dialect(), compile_kwargs={"render_postcompile": True}
        )
        assert compiled.positiontup is not None
        bound = compiled.params
        order = [(name, None if name in _PER_QUERY else bound[name]) for name in compiled.positiontup]
        hit = (compiled.string, order)
        with _compiled_lock:
            if len(_COMPILED) >= _COMPILED_SIZE:
                _COMPILED.pop(next(iter(_COMPILED)))
            _COMPILED[key] = hit
    return hit


def _file_name(path: str) -> str:
    """The name files_fts indexes (see schema._file_name_sql): the base name without its extension."""
    name = path[path.rfind("/") + 1 :]
    return name[: name.rfind(".")] if name.find(".") > 0 else name


def _holds_all(terms: list[str]) -> Callable[[str], bool]:
    """Whether a text found by FTS5 for ``terms`` holds each of their words (as :func:`words` splits and
    folds both). Every text found for a one-word query holds it."""
    wanted = {word for term in terms for word in words(term)}
    if len(wanted) <= 1:
        return lambda said: True
    return lambda said: wanted <= set(words(said))


def _read_source(
    raw: sqlite3.Connection,
    source: _Source,
    terms: list[str],
    limit: int,
    model: str,
    filters: Filters | None,
    allowed: _Allowed | None = None,
    exact: bool = False,
) -> dict[int, tuple[float, bool]]:
    """Embedding id -> (score of its best row, whether a row reaching it holds every term), from one
    full-text index: its ranked rows (of the ``allowed`` ones, if given) are mapped best first, in growing
    batches, until ``limit`` embeddings are reached (filters may drop many rows) or the rows run out."""
    reached: dict[int, tuple[float, bool]] = {}
    holds_all = _holds_all(terms)
    sql, order = _compiled_reach(source, filters)
    holds: dict[int, bool] = {}  # row -> whether its text holds every term
    mapped: set[int] = set()  # (a later ranking holds the rows of an earlier one: mapped once)
    if exact:
        rankings: Iterator[_Ranking] = iter([_tier_ranking(raw, source.fts, terms, [], allowed)])
    else:
        rankings = _rankings(raw, source, terms, limit + _FIRST_MAP, allowed)
    for ranking in rankings:
        start, batch = 0, limit + _FIRST_MAP
        while len(reached) < limit:
            part = ranking.head(start + batch)[start:]
            if not part:
                break
            start += batch
            batch *= _GROWTH
            score_of = {row: score for row, score in part if row not in mapped}
            if not score_of:
                continue
            mapped.update(score_of)
            given = {"rows": json.dumps(list(score_of)), "model": model}
            params = [given.get(name, value) for name, value in order]
            for row, said, eid in raw.execute(sql, params):
                whole = holds.get(row)
                if whole is None:
                    whole = holds[row] = holds_all(_file_name(said) if source.names else said)
                score = score_of[row]
                old = reached.get(eid)
                reached[eid] = (score, whole) if old is None else (max(old[0], score), old[1] or whole)
        if len(reached) >= limit:
            break
    return reached


# --- the rows a filter allows ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Allowed:
    """The rows of one full-text index that a filter allows: sorted ids, and the id ranges holding them
    (``spans``, newest first) that the windows read; a span holds about as many allowed rows as others."""

    rows: np.ndarray
    spans: tuple[tuple[int, int], ...]

    def holds(self, rows: Sequence[int]) -> list[bool]:
        ids = np.asarray(rows, np.int64)
        pos = np.minimum(np.searchsorted(self.rows, ids), max(len(self.rows) - 1, 0))
        return (self.rows[pos] == ids).tolist() if len(self.rows) else [False] * len(ids)

    def only(self, ranked: list[tuple[int, float]]) -> list[tuple[int, float]]:
        """The allowed rows of a ranking, in its order."""
        keep = self.holds([row for row, _ in ranked])
        return [pair for pair, ok in zip(ranked, keep, strict=True) if ok]

    def count(self, lo: int, hi: int) -> int:
        """How many allowed rows lie in [lo, hi]."""
        return int(np.searchsorted(self.rows, hi, "right") - np.searchsorted(self.rows, lo, "left"))


def _spans(rows: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    """The id ranges (newest first) holding ``rows`` (sorted): runs of consecutive ids, a run joined to the
    range before it when the gap between them is at most the allowed rows that range holds (so a range
    holds at most about as many other rows as allowed ones). None when more than MAX_SPANS ranges."""
    if not len(rows):
        return ()
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.concatenate([[0], breaks])].tolist()
    ends = rows[np.concatenate([breaks - 1, [len(rows) - 1]])].tolist()
    spans: list[tuple[int, int]] = []
    lo, hi, held = starts[0], ends[0], ends[0] - starts[0] + 1
    for a, b in zip(starts[1:], ends[1:], strict=True):
        if a - hi - 1 <= held:
            hi, held = b, held + b - a + 1
            continue
        spans.append((lo, hi))
        if len(spans) >= MAX_SPANS:
            return None
        lo, hi, held = a, b, b - a + 1
    spans.append((lo, hi))
    return tuple(reversed(spans)) if len(spans) <= MAX_SPANS else None


#: Per open catalog: (full-text index, filters) -> (catalog version, its allowed rows or None when they
#: are too scattered); the last few filters (a user refining one query asks for the same again).
_ALLOWED: weakref.WeakKeyDictionary[Catalog, dict[tuple[str, Filters], tuple[tuple[str, ...], Any]]] = (
    weakref.WeakKeyDictionary()
)
_ALLOWED_SIZE = 16
_allowed_lock = threading.Lock()


def _allowed_rows(
    catalog: Catalog, conn: Connection, version: tuple[str, ...], source: _Source, filters: Filters
) -> _Allowed | None:
    """The rows of ``source``'s index that ``filters`` allow (None: too scattered to read by ranges)."""
    key = (source.fts, filters)
    with _allowed_lock:
        hit = _ALLOWED.setdefault(catalog, {}).get(key)
    if hit is not None and hit[0] == version:
        return hit[1]
    rows = passing_rows(conn, source.content, filters)
    spans = _spans(rows)
    allowed = None if spans is None else _Allowed(rows, spans)
    with _allowed_lock:
        entries = _ALLOWED.setdefault(catalog, {})
        entries.pop(key, None)
        if len(entries) >= _ALLOWED_SIZE:
            entries.pop(next(iter(entries)))
        entries[key] = (version, allowed)
    return allowed


# --- ranking -------------------------------------------------------------------------------------------
class _Ranking:
    """(row, score) pairs, best first, at most MAX_RANKED: a list, or FTS5's ranking read only as far as
    asked. FTS5 scores every matching row either way, but returning its whole sorted ranking costs about as
    much again as the first rows; SQLite's sort keeps ties in the same order whatever the LIMIT, so the
    first n rows of a short read are the first n of a long one."""

    def __init__(
        self, rows: list[tuple[int, float]], fetch: Callable[[int], list[tuple[int, float]]] | None = None
    ) -> None:
        self._rows = rows
        self._fetch = fetch  # the first n rows, read from SQLite (None: ``rows`` is the whole ranking)

    def head(self, n: int) -> list[tuple[int, float]]:
        """The first ``n`` rows (fewer when the ranking has fewer)."""
        if n > len(self._rows) and self._fetch is not None:
            # The first read is what is asked; a second one reads the whole ranking.
            want = min(MAX_RANKED, n if not self._rows else MAX_RANKED)
            self._rows = self._fetch(want)
            if len(self._rows) < want or want >= MAX_RANKED:
                self._fetch = None
        return self._rows[:n]


def _rankings(
    raw: sqlite3.Connection,
    source: _Source,
    terms: list[str],
    needed: int,
    allowed: _Allowed | None = None,
) -> Iterator[_Ranking]:
    """Rankings of (row, score) of ``source``'s index, each best first, each of at most MAX_RANKED rows
    (see the module's docstring), read only while the caller asks for more: the rows holding the rarest
    terms (:func:`_tiers`), then windows of the newest rows holding any; only ``allowed`` rows, if given."""
    fts = source.fts
    held = _held(raw, fts, terms)
    present = sorted((t for t in terms if held[t]), key=lambda t: held[t])
    # (A filter keeps an unknown share of the rows: then every rarer word is ranked at once.)
    tiers = _tiers(present, held, needed if allowed is None else MAX_RANKED)
    for tier in tiers:
        # The other terms held by not too many rows add their part of BM25 to the tier's rows holding them.
        boost = [t for t in present if t not in tier and held[t] <= MAX_BOOSTING]
        yield _tier_ranking(raw, fts, tier, boost, allowed)
    if not present or (tiers and len(tiers[-1]) == len(present)):
        return
    newest, stats = _newest(raw, source, _match(present), allowed), None
    for _ in range(MAX_WINDOWS):
        window = dict(islice(newest, MAX_RANKED))
        if not window:
            return
        docs = {row: words(_file_name(said) if source.names else said) for row, said in window.items()}
        if stats is None:
            lo, hi = min(window), max(window)
            span = hi - lo + 1 if allowed is None else allowed.count(lo, hi)
            stats = _window_stats(docs, present, span=span)
        yield _Ranking(_scored(docs, present, *stats))
        if len(window) < MAX_RANKED:
            return


def _tier_ranking(
    raw: sqlite3.Connection, fts: str, tier: list[str], boost: list[str], allowed: _Allowed | None
) -> _Ranking:
    """The rows holding a ``tier`` term, ranked by :func:`_ranked_with` as far as asked; with ``allowed``,
    all of them (at most MAX_RANKED) are ranked, then the allowed ones kept."""
    if allowed is None:
        return _Ranking([], partial(_ranked_with, raw, fts, tier, boost))
    whole = cache(lambda: allowed.only(_ranked_with(raw, fts, tier, boost, MAX_RANKED)))
    return _Ranking([], lambda n: whole())


def _held(raw: sqlite3.Connection, fts: str, terms: list[str]) -> dict[str, int]:
    """How many rows of ``fts`` hold each term, counted up to MAX_BOOSTING + 1 (a read of as many rows)."""
    one = f"(SELECT count(*) FROM (SELECT rowid FROM {fts} WHERE {fts} MATCH ? LIMIT {MAX_BOOSTING + 1}))"
    counts = raw.execute(f"SELECT {', '.join([one] * len(terms))}", [_match([t]) for t in terms]).fetchone()
    return {t: int(n) for t, n in zip(terms, counts, strict=True)}


def _tiers(present: list[str], held: dict[str, int], needed: int) -> list[list[str]]:
    """The terms whose rows FTS5 ranks, in turn (``present``: the terms held by some row, rarest first):
    the rarest terms until their rows reach ``needed``, then, when more are asked for, every term of the
    rarest that hold at most MAX_RANKED rows together. (A rare term's BM25 outweighs a commoner one's;
    ranking fewer rows is what makes a query cheap.)"""
    widest, total = 0, 0
    first = None
    for i, term in enumerate(present):
        if total + held[term] > MAX_RANKED:
            break
        total += held[term]
        widest = i + 1
        if first is None and total >= needed:
            first = widest
    tiers = [present[:first]] if first is not None else []
    if widest and widest != first:
        tiers.append(present[:widest])
    return tiers


def _newest(
    raw: sqlite3.Connection, source: _Source, match: str, allowed: _Allowed | None
) -> Iterator[tuple[int, str]]:
    """(row, text) of the rows of ``source``'s index matching ``match``, newest first (only ``allowed``
    rows, read span by span, if given), read MAX_RANKED at a time."""
    fts = source.fts
    sql = (
        f"SELECT {fts}.rowid, {source.content}.{source.text} FROM {fts} "
        f"JOIN {source.content} ON {source.content}.id = {fts}.rowid "
        f"WHERE {fts} MATCH ? AND {fts}.rowid BETWEEN ? AND ? ORDER BY {fts}.rowid DESC LIMIT ?"
    )
    spans = [(-(2**63), 2**63 - 1)] if allowed is None else allowed.spans
    for lo, hi in spans:
        while hi >= lo:
            page = [(int(row), said) for row, said in raw.execute(sql, (match, lo, hi, MAX_RANKED))]
            if allowed is not None:
                keep = allowed.holds([row for row, _ in page])
                yield from (row_text for row_text, ok in zip(page, keep, strict=True) if ok)
            else:
                yield from page
            if len(page) < MAX_RANKED:
                break
            hi = page[-1][0] - 1


def _ranked(raw: sqlite3.Connection, fts: str, match: str, n: int) -> list[tuple[int, float]]:
    """(row, -BM25) of the first ``n`` rows of ``fts`` matching ``match``, best first. (bm25() named and
    sorted by SQLite: ``ORDER BY rank`` gives the same order through FTS5's own sorter, a nested statement
    prepared per query, which costs more.)"""
    q = f"SELECT rowid, bm25({fts}) AS score FROM {fts} WHERE {fts} MATCH ? ORDER BY score LIMIT ?"
    return [(int(row), -float(rank)) for row, rank in raw.execute(q, (match, n))]


def _ranked_with(
    raw: sqlite3.Connection, fts: str, ranked: list[str], boost: list[str], n: int
) -> list[tuple[int, float]]:
    """(row, -BM25) of the first ``n`` rows of ``fts`` holding a ``ranked`` term, best first, BM25 counting
    the ``boost`` terms as well. A row holding ranked and boost terms is scored by FTS5 over both (its
    bm25 sums a part per term, each term's idf counted on its own, so the scores compare); it can only
    rise, so the first n rows are among the first n by the ranked terms and the rows holding both."""
    match = _match(ranked)
    head = _ranked(raw, fts, match, n)
    if not boost:
        return head
    both = dict(_ranked(raw, fts, f"({match}) AND ({_match(boost)})", MAX_RANKED))
    if not both:
        return head
    scores = dict(head) | both
    return sorted(scores.items(), key=lambda kv: -kv[1])[:n]


def _window_stats(docs: dict[int, list[str]], terms: list[str], span: int) -> tuple[list[float], float]:
    """BM25's statistics taken in the first window, for every window of a query (so that their scores
    compare): each term's idf, counting the rows holding it among ``docs`` and taking the collection to
    be the ``span`` rows they were found in, and the mean length of the texts."""
    idfs = []
    for term in terms:
        tw = words(term)
        n = sum(1 for ws in docs.values() if tw and all(w in ws for w in tw))
        idfs.append(max(1e-6, math.log((span - n + 0.5) / (n + 0.5))))
    return idfs, (sum(len(ws) for ws in docs.values()) / len(docs)) or 1.0


def _scored(
    docs: dict[int, list[str]], terms: list[str], idfs: list[float], avg: float
) -> list[tuple[int, float]]:
    """(row, BM25) of these texts (their words), best first: FTS5's formula with these statistics."""
    scores: dict[int, float] = {}
    for term, idf in zip(terms, idfs):
        tw = words(term)
        for row, ws in docs.items():
            f = min(ws.count(w) for w in tw) if tw else 0
            if f:
                norm = f * (_K1 + 1) / (f + _K1 * (1 - _B + _B * len(ws) / avg))
                scores[row] = scores.get(row, 0.0) + idf * norm
    return sorted(scores.items(), key=lambda kv: (-kv[1], -kv[0]))
