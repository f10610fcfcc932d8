"""Search by words: BM25 over the full-text indexes of captions, transcript segments and file names
(schema 6, see :mod:`mmsearch.schema`), mapped to the embeddings a search returns.

A caption reaches its own embedding and the image of its file; a segment its embedding; a file name the
image of an image file, or the first segment of a recording. User text is never read as FTS5 syntax: it is
split into words here, stop words dropped, each word quoted, and the words ORed (BM25 ranks the texts that
hold more of them, and rarer ones, first).

FTS5's bm25 first counts the rows holding each word of the query, a pass over the word's whole list: a word
held by a large part of a big collection costs as much as reading all those rows. So each index ranks with
FTS5 only the rarer words of a query, those held by at most ``MAX_RANKED`` rows together (the rarest first).
When those do not reach enough hits, or every word is common, the newest rows holding any word,
``MAX_RANKED`` at a time (at most ``MAX_WINDOWS`` times), are scored here by the same BM25 formula, its
counts taken in that window.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, func, select

from mmsearch.catalog import Catalog, _chunks
from mmsearch.catalog_filters import file_passes, item_of
from mmsearch.filters import Filters
from mmsearch.schema import (
    FTS_FROM,
    captions,
    captions_fts,
    embeddings,
    files,
    files_fts,
    segments,
    segments_fts,
)

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
#: Most windows of newest rows ranked when every word of the query is common.
MAX_WINDOWS = 4
#: A run of ASCII letters and digits (the runs of _split, for ASCII text).
_ASCII_WORD = re.compile(r"[A-Za-z0-9]+")
#: BM25's parameters, as FTS5's bm25 uses them.
_K1, _B = 1.2, 0.75
#: How many more ranked rows than hits are mapped to embeddings at first; more while filters drop them.
_FIRST_MAP = 16
_GROWTH = 4


@dataclass(frozen=True)
class WordHit:
    """An embedding reached by words: ``score`` is -BM25 of its best text (higher is better);
    ``all_terms``: a text or name reaching it holds every query word."""

    id: int
    score: float
    all_terms: bool


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
) -> list[WordHit]:
    """The embeddings of ``model`` of ``kinds`` reached by the words of ``text``, best first, at most
    ``limit``, each through a live file that passes ``filters``. Empty for a catalog without full-text
    indexes (older than schema 6, opened read-only) and for text of stop words only."""
    terms = query_terms(text)
    if not terms or limit <= 0 or catalog.schema_version < FTS_FROM:
        return []
    best: dict[int, tuple[float, bool]] = {}
    with catalog.snapshot() as conn:
        for source in _sources(kinds, filters):
            for eid, (score, whole) in _read_source(
                conn, source, terms, limit, catalog.of_model(model)
            ).items():
                old = best.get(eid)
                best[eid] = (score, whole) if old is None else (max(old[0], score), old[1] or whole)
    ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))[:limit]
    return [WordHit(eid, score, whole) for eid, (score, whole) in ranked]


# --- from full-text rows to embeddings ------------------------------------------------------------------
#: Full-text rows -> (row, item kind, item id, words of its text) of the items they reach through a live
#: file that passes the filters.
Reach = Callable[[Connection, list[int]], list[tuple[int, str, int, list[str]]]]


@dataclass(frozen=True)
class _Source:
    fts: Table
    reach: Reach
    content: Table  # the table whose rows the index's rows are (same id)
    text: Any  # its column holding the text indexed (files: the path, of which the name is indexed)


def _sources(kinds: Sequence[str], filters: Filters | None) -> Iterator[_Source]:
    """The full-text indexes to read for ``kinds``, each with how its rows reach items."""
    c, s = captions, segments

    def caption_rows(conn: Connection, rows: list[int]) -> list[tuple[int, str, int, list[str]]]:
        f = files.alias("wf")
        q = (
            select(c.c.id, c.c.text, f.c.media_id)
            .join(f, f.c.id == c.c.file_id)
            .where(c.c.id.in_(rows), file_passes(filters, f))
        )
        out = []
        for cid, said, mid in conn.execute(q):
            if "caption" in kinds:  # the caption's own embedding
                out.append((cid, "caption", cid, words(said)))
            if "image" in kinds and mid is not None:  # the image of the file it describes
                out.append((cid, "image", mid, words(said)))
        return out

    def segment_rows(conn: Connection, rows: list[int]) -> list[tuple[int, str, int, list[str]]]:
        f = files.alias("wf")
        live = select(f.c.id).where(f.c.media_id == s.c.media_id, file_passes(filters, f)).exists()
        q = select(s.c.id, s.c.text).where(s.c.id.in_(rows), live)
        return [(sid, "segment", sid, words(said)) for sid, said in conn.execute(q)]

    def name_rows(conn: Connection, rows: list[int]) -> list[tuple[int, str, int, list[str]]]:
        f, s2 = files.alias("wf"), segments.alias("s2")
        # A recording's first segment (segments are stored in time order).
        first = select(func.min(s2.c.id)).where(s2.c.media_id == f.c.media_id).scalar_subquery()
        q = select(f.c.id, f.c.kind, f.c.path, f.c.media_id, first).where(
            f.c.id.in_(rows), file_passes(filters, f)
        )
        out = []
        for fid, kind, path, mid, seg in conn.execute(q):
            if kind == "image" and "image" in kinds and mid is not None:
                out.append((fid, "image", mid, words(_file_name(path))))
            elif kind == "audio" and "segment" in kinds and seg is not None:
                out.append((fid, "segment", seg, words(_file_name(path))))
        return out

    if "caption" in kinds or "image" in kinds:
        yield _Source(captions_fts, caption_rows, c, c.c.text)
    if "segment" in kinds:
        yield _Source(segments_fts, segment_rows, s, s.c.text)
    if "image" in kinds or "segment" in kinds:
        yield _Source(files_fts, name_rows, files, files.c.path)


def _file_name(path: str) -> str:
    """The name files_fts indexes (see schema._file_name_sql): the base name without its extension."""
    name = path[path.rfind("/") + 1 :]
    return name[: name.rfind(".")] if name.find(".") > 0 else name


def _read_source(
    conn: Connection, source: _Source, terms: list[str], limit: int, of_model: Any
) -> dict[int, tuple[float, bool]]:
    """Embedding id -> (score of its best row, whether a row reaching it holds every term), from one
    full-text index: its ranked rows are mapped best first, in growing batches, until ``limit`` embeddings
    are reached (filters may drop many rows) or the rows run out."""
    reached: dict[int, tuple[float, bool]] = {}
    wanted = {word for term in terms for word in words(term)}
    for ranked in _rankings(conn, source, terms):
        start, batch = 0, limit + _FIRST_MAP
        while start < len(ranked) and len(reached) < limit:
            part = ranked[start : start + batch]
            score_of = dict(part)
            items = [
                item for chunk in _chunks([row for row, _ in part], 900) for item in source.reach(conn, chunk)
            ]
            found = _embeddings_of(conn, [(kind, item) for _, kind, item, _ in items], of_model)
            for row, kind, item, said in items:
                score, whole = score_of[row], wanted <= set(said)
                for eid in found.get((kind, item), ()):
                    old = reached.get(eid)
                    reached[eid] = (score, whole) if old is None else (max(old[0], score), old[1] or whole)
            start += batch
            batch *= _GROWTH
        if len(reached) >= limit:
            break
    return reached


def _embeddings_of(
    conn: Connection, items: list[tuple[str, int]], of_model: Any
) -> dict[tuple[str, int], list[int]]:
    """(item kind, item id) -> the ids of its embeddings of the model ``of_model`` selects."""
    by_kind: dict[str, set[int]] = {}
    for kind, item in items:
        by_kind.setdefault(kind, set()).add(item)
    out: dict[tuple[str, int], list[int]] = {}
    for kind, ids in by_kind.items():
        is_kind, item_col = item_of(kind)
        for chunk in _chunks(sorted(ids), 900):
            q = select(embeddings.c.id, item_col).where(of_model, is_kind, item_col.in_(chunk))
            for eid, item in conn.execute(q):
                out.setdefault((kind, int(item)), []).append(int(eid))
    return out


# --- ranking -------------------------------------------------------------------------------------------
def _rankings(conn: Connection, source: _Source, terms: list[str]) -> Iterator[list[tuple[int, float]]]:
    """Lists of (row, score) of ``source``'s index, each best first, each of at most MAX_RANKED rows (see
    the module's docstring): the rows holding the rarer terms, then windows of the newest rows holding any
    (read only while the caller asks for more)."""
    fts = source.fts
    hidden = getattr(fts.c, fts.name)
    held = {}
    for term in terms:  # how many rows hold each term, counted up to MAX_RANKED + 1 (cost: as many rows)
        rows = select(fts.c.rowid).where(hidden.op("MATCH")(_match([term]))).limit(MAX_RANKED + 1).subquery()
        held[term] = int(conn.execute(select(func.count()).select_from(rows)).scalar_one())
    rare, total = [], 0
    for term in sorted(terms, key=lambda t: held[t]):
        if total + held[term] > MAX_RANKED:
            break
        rare.append(term)
        total += held[term]
    if rare:
        yield _ranked(conn, fts, _match(rare))
        if len(rare) == len(terms):
            return
    match, newer, stats = _match(terms), None, None
    name = source.content is files
    for _ in range(MAX_WINDOWS):
        q = (
            select(fts.c.rowid, source.text)
            .select_from(fts)
            .join(source.content, source.content.c.id == fts.c.rowid)
            .where(hidden.op("MATCH")(match))
        )
        if newer is not None:
            q = q.where(fts.c.rowid < newer)
        window = {
            int(row): _file_name(said) if name else said
            for row, said in conn.execute(q.order_by(fts.c.rowid.desc()).limit(MAX_RANKED))
        }
        if not window:
            return
        docs = {row: words(said) for row, said in window.items()}
        stats = stats or _window_stats(docs, terms, span=max(window) - min(window) + 1)
        yield _scored(docs, terms, *stats)
        if len(window) < MAX_RANKED:
            return
        newer = min(window)


def _ranked(conn: Connection, fts: Table, match: str) -> list[tuple[int, float]]:
    """(row, -BM25) of the rows of ``fts`` matching ``match``, best first."""
    hidden = getattr(fts.c, fts.name)
    q = (
        select(fts.c.rowid, fts.c.rank)
        .where(hidden.op("MATCH")(match))
        .order_by(fts.c.rank)
        .limit(MAX_RANKED)
    )
    return [(int(row), -float(rank)) for row, rank in conn.execute(q)]


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
