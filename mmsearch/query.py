"""The query layer: what a query asks for, how its parts are searched, and how their result lists become one.

A :class:`Query` holds the inputs (text, an image, a spoken query already heard as text, ``add`` and
``subtract`` terms, a weight per input), the search mode (words + meaning, meaning only, words only), the
filters, and the cut-offs. :func:`plan` turns it into a :class:`Plan` without touching the index (pure);
:func:`execute` searches a plan whose inputs were embedded by the caller, which lets the server batch the
text-tower passes of concurrent queries outside its index lock. The CLI, the server and the page only
translate their options into a Query.

How lists are combined:

- several inputs (``--image x --add blue --subtract red``): ``early`` fusion searches one vector, the
  weighted sum of the normalised input vectors (subtracted inputs with a negative weight); ``late`` fusion
  searches each input on its own and merges the ranked lists by reciprocal rank fusion, a subtracted input's
  list counting against the items it ranks;
- words and meaning (``hybrid``): the FTS5/BM25 list of the query's words and the vector list merged by
  reciprocal rank fusion (``rrf``, rank only) or by a weighted sum of scores normalised per list
  (``weighted``).

Every hit keeps its cosine similarity to the query vector as ``score`` (also for an item found by words
alone), the calibrated ``confidence`` of that score (:mod:`mmsearch.calibrate`), and how it was found
(``matched``). Hits below ``min_confidence`` or ``min_score`` are cut, except those that hold every word of
the query; nothing left means "no good match".
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsearch import db
from mmsearch.catalog import Catalog
from mmsearch.constants import (
    DEFAULT_COMBINE,
    DEFAULT_FUSION,
    DEFAULT_MODE,
    MAX_K,
    QUERY_COMBINES,
    QUERY_FUSIONS,
    QUERY_MODES,
    QUERY_ROLES,
    TARGETS,
    VIDEO_TARGET,
)
from mmsearch.errors import ActiveModelChanged, BadQueryError
from mmsearch.filters import Filters
from mmsearch.search import Hit, kinds_for
from mmsearch.store import Store

if TYPE_CHECKING:
    from mmsearch.calibrate import Calibration
    from mmsearch.catalog_words import WordHit

MODES, FUSIONS, COMBINES, ROLES = QUERY_MODES, QUERY_FUSIONS, QUERY_COMBINES, QUERY_ROLES
#: The constant of reciprocal rank fusion (Cormack et al. 2009): 1 / (RRF_K + rank).
RRF_K = 60
#: ``weighted`` fusion: the share of the vector list's normalised score (the words list gets the rest).
VECTOR_SHARE = 0.5
#: Most characters of one text input (CLIP reads 77 tokens; the words index reads them all).
MAX_TEXT_CHARS = 1000
#: Most add + subtract terms in one query.
MAX_TERMS = 16
#: Candidates past the first k whose vectors are read at once, when hits found by words need a cosine.
READ_AHEAD = 8
#: Worker threads running the vector side of hybrid and words queries (each query's in one, beside its
#: words search in the caller's thread).
SIDE_THREADS = 4


@dataclass(frozen=True)
class Query:
    """One search. ``text`` / ``image`` / ``heard`` (a spoken query's transcript) are the main inputs (at
    least one, or an ``add`` term); ``weights`` maps a role of :data:`ROLES` to its weight (default 1)."""

    text: str | None = None
    image: Any = None  # a PIL image, already decoded within the query budget by the caller
    heard: str | None = None
    add: tuple[str, ...] = ()
    subtract: tuple[str, ...] = ()
    weights: Mapping[str, float] | None = None
    mode: str = DEFAULT_MODE
    fusion: str = DEFAULT_FUSION
    combine: str = DEFAULT_COMBINE
    target: str | None = None
    k: int = 10
    filters: Filters = field(default_factory=Filters)
    min_confidence: float | None = None  # None: the calibrated default; 0: no cut
    min_score: float | None = None


@dataclass(frozen=True)
class Part:
    """One input to embed: its role, what it is (``text`` or ``image``), and its signed weight."""

    role: str
    modality: str
    value: Any
    weight: float


@dataclass(frozen=True)
class Plan:
    target: str
    kinds: tuple[str, ...]
    parts: tuple[Part, ...]
    words: str | None  # what the words index is asked (None: no words search)
    mode: str
    fusion: str
    combine: str
    k: int
    depth: int  # candidates fetched per list
    filters: Filters
    query_kind: str | None  # 'text' | 'image': which calibration applies (None: no calibrated confidence)
    min_confidence: float | None
    min_score: float | None

    @property
    def texts(self) -> list[str]:
        return [p.value for p in self.parts if p.modality == "text"]

    @property
    def images(self) -> list[Any]:
        return [p.value for p in self.parts if p.modality == "image"]


@dataclass
class SearchResult:
    """The answer to a :class:`Query`. ``no_match``: nothing in the collection passed the cut-offs."""

    hits: list[Hit]
    no_match: bool
    target: str
    mode: str
    transcript: str | None = None
    hypotheses: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "target": self.target,
            "mode": self.mode,
            "no_match": self.no_match,
            "hits": [h.as_dict() for h in self.hits],
        }
        if self.transcript is not None:
            out["transcript"] = self.transcript
        return out


def _clean(text: str | None, what: str) -> str | None:
    if text is None:
        return None
    text = text.strip()
    if not text:
        raise BadQueryError(f"the {what} is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise BadQueryError(f"the {what} is longer than {MAX_TEXT_CHARS} characters")
    return text


def plan(query: Query) -> Plan:
    """Check a query and decide how to search it (no index, no model: a pure function)."""
    if query.mode not in MODES:
        raise BadQueryError(f"unknown mode '{query.mode}' (choose from {', '.join(MODES)})")
    if query.fusion not in FUSIONS:
        raise BadQueryError(f"unknown fusion '{query.fusion}' (choose from {', '.join(FUSIONS)})")
    if query.combine not in COMBINES:
        raise BadQueryError(f"unknown combination '{query.combine}' (choose from {', '.join(COMBINES)})")
    if not 1 <= query.k <= MAX_K:
        raise BadQueryError(f"k must be between 1 and {MAX_K}")
    weights = dict(query.weights or {})
    for role, w in weights.items():
        if role not in ROLES:
            raise BadQueryError(f"unknown weight '{role}' (choose from {', '.join(ROLES)})")
        if not np.isfinite(w) or w < 0:
            raise BadQueryError(f"the weight of {role} must be a finite number >= 0")
    if len(query.add) + len(query.subtract) > MAX_TERMS:
        raise BadQueryError(f"at most {MAX_TERMS} add and subtract terms")
    if query.min_confidence is not None and not (
        np.isfinite(query.min_confidence) and 0 <= query.min_confidence <= 1
    ):
        raise BadQueryError("min_confidence must be between 0 and 1")
    if query.min_score is not None and not (np.isfinite(query.min_score) and -1 <= query.min_score <= 1):
        raise BadQueryError("min_score must be between -1 and 1 (a cosine similarity)")

    text = _clean(query.text, "query text")
    heard = _clean(query.heard, "transcript")
    add = tuple(t for t in (_clean(a, "added term") for a in query.add) if t)
    subtract = tuple(t for t in (_clean(s, "subtracted term") for s in query.subtract) if t)
    if text is None and heard is None and query.image is None and not add:
        raise BadQueryError("nothing to search for: give a text, an image, a spoken query or an added term")
    if text is not None and heard is not None:
        raise BadQueryError("give a text or a spoken query, not both")

    parts: list[Part] = []
    if text is not None:
        parts.append(Part("text", "text", text, weights.get("text", 1.0)))
    if heard is not None:
        parts.append(Part("audio", "text", heard, weights.get("audio", 1.0)))
    if query.image is not None:
        parts.append(Part("image", "image", query.image, weights.get("image", 1.0)))
    parts += [Part("add", "text", t, weights.get("add", 1.0)) for t in add]
    parts += [Part("subtract", "text", t, -weights.get("subtract", 1.0)) for t in subtract]
    if not any(p.weight > 0 for p in parts):
        raise BadQueryError("every input of the query has weight 0")

    main_text = text if text is not None else heard
    target = query.target or ("texts" if query.image is not None and main_text is None else "images")
    kinds = kinds_for(target)
    # Words reach the words index: the typed or heard text and the added terms (never the subtracted ones).
    word_texts = [t for t in (main_text, *add) if t]
    words = " ".join(word_texts) if word_texts and query.mode != "vector" else None
    if query.mode == "words" and words is None:
        raise BadQueryError("words mode needs words: a text, a spoken query or an added term")
    return Plan(
        target=target,
        kinds=kinds,
        parts=tuple(parts) if query.mode != "words" else (),
        words=words,
        mode=query.mode,
        fusion=query.fusion,
        combine=query.combine,
        k=query.k,
        depth=min(MAX_K, max(3 * query.k, 50)),
        # The video target is a video's frames and the segments of its own spoken track.
        filters=(
            dataclasses.replace(query.filters, kinds=("video",))
            if target == VIDEO_TARGET and not query.filters.kinds
            else query.filters
        ),
        # Which calibration reads the scores: a combined query's vector is neither a text's nor an image's.
        query_kind=None if len(parts) > 1 else "image" if query.image is not None else "text",
        min_confidence=query.min_confidence,
        min_score=query.min_score,
    )


# --- fusion (pure) --------------------------------------------------------------------------------------
def rrf(lists: Sequence[tuple[Sequence[int], float]], k: int = RRF_K) -> dict[int, float]:
    """Reciprocal rank fusion of ranked id lists, each with a signed weight: sum of weight / (k + rank)."""
    out: dict[int, float] = {}
    for ids, weight in lists:
        for rank, i in enumerate(ids, 1):
            out[i] = out.get(i, 0.0) + weight / (k + rank)
    return out


def _unit_scale(scores: Mapping[int, float]) -> dict[int, float]:
    """Min-max scaled to [0, 1] within one list (all 1 when the list has one value)."""
    if not scores:
        return {}
    lo, hi = min(scores.values()), max(scores.values())
    span = hi - lo
    return {i: (s - lo) / span if span > 0 else 1.0 for i, s in scores.items()}


def weighted(
    vector: Mapping[int, float], words: Mapping[int, float], share: float = VECTOR_SHARE
) -> dict[int, float]:
    """Weighted fusion of score-normalised lists: ``share`` of the vector list's scaled cosine plus the rest
    of the words list's scaled BM25 (an item missing from a list gets 0 from it)."""
    v, w = _unit_scale(vector), _unit_scale(words)
    return {i: share * v.get(i, 0.0) + (1 - share) * w.get(i, 0.0) for i in v.keys() | w.keys()}


def combined_vector(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Early fusion: the normalised, signed-weighted sum of L2-normalised input vectors."""
    v = np.asarray(vectors, np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    q = (np.asarray(weights, np.float32)[:, None] * v).sum(axis=0)
    norm = float(np.linalg.norm(q))
    if norm < 1e-6:
        raise BadQueryError("the added and subtracted inputs cancel out: nothing is left to search for")
    return (q / norm).astype(np.float32)


def _ranked(scores: Mapping[int, float]) -> list[int]:
    return sorted(scores, key=lambda i: (-scores[i], i))


# --- execution --------------------------------------------------------------------------------------------
_CALIBRATED_AS = {"segment": "caption", "frame": "image"}


@dataclass
class _VectorSide:
    """What the vector side of a query found: the query vector, a cosine per candidate (``scores``), the
    ranking of late fusion (None: ``scores`` rank) and the calibration."""

    query_vector: np.ndarray | None
    scores: dict[int, float]
    fused: dict[int, float] | None
    calibration: Calibration | None

    @property
    def ranking(self) -> dict[int, float]:
        return self.fused if self.fused is not None else self.scores


def _vector_side(store: Store, p: Plan, vectors: np.ndarray | None, model: str) -> _VectorSide:
    """Follow the catalog, search the vectors of ``p`` and read the calibration."""
    from mmsearch import calibrate

    active = store.refresh()
    if active != model:
        raise ActiveModelChanged(f"the index now searches model {active}, not {model}")
    allowed = None if p.filters.is_empty() else _allowed(store, p.filters, p.kinds, model)
    query_vector = None
    if p.parts:
        assert vectors is not None and len(vectors) == len(p.parts)
        if vectors.shape[1] != store.dim_of(model):
            raise BadQueryError(
                f"query vector has dimension {vectors.shape[1]}, the index {store.dim_of(model)}"
            )
        query_vector = combined_vector(vectors, [part.weight for part in p.parts])
    side = _VectorSide(query_vector, {}, None, calibrate.load(store, model))
    if query_vector is not None:
        assert vectors is not None
        if p.combine == "early" or len(p.parts) == 1:
            side.scores = _nearest(store, query_vector[None, :], p.kinds, p.depth, allowed, model)[0]
        else:
            per_part = _nearest(store, vectors, p.kinds, p.depth, allowed, model)
            weights = [part.weight for part in p.parts]
            side.fused = rrf([(_ranked(s), w) for s, w in zip(per_part, weights, strict=True)])
            for s in per_part:  # a cosine for each candidate comes below
                side.scores.update(s)
    return side


def execute(store: Store, p: Plan, vectors: np.ndarray | None, *, model: str) -> SearchResult:
    """Search ``p`` in ``store`` with its parts' vectors (rows in ``p.parts`` order, embedded by ``model``).

    :class:`ActiveModelChanged` when another model became active since ``model`` was read: the caller
    embeds again."""
    from mmsearch import calibrate

    found_by_words: list[WordHit] = []
    if p.words is None:
        side = _vector_side(store, p, vectors, model)
    else:
        # The vector side runs in a worker thread while this one searches the words (the longer side:
        # it starts at once), SQLite and FAISS releasing the GIL while they work. The vector side uses the
        # store: this thread waits for it whatever happens here.
        vector_side = _side_pool().submit(_vector_side, store, p, vectors, model)
        try:
            found_by_words = _words_side(store.catalog, p, model)
        finally:
            wait([vector_side])
        side = vector_side.result()
    query_vector, vector_scores, fused_vector = side.query_vector, side.scores, side.fused
    vector_rank, calibration = side.ranking, side.calibration

    word_hits: dict[int, float] = {}
    all_terms: set[int] = set()
    for w in found_by_words:
        word_hits[w.id] = w.score
        if w.all_terms:
            all_terms.add(w.id)

    # The ranking.
    if not word_hits:
        order = _ranked(vector_rank)
    elif not vector_rank:
        order = _ranked(word_hits)
    elif p.fusion == "rrf":
        order = _ranked(rrf([(_ranked(vector_rank), 1.0), (_ranked(word_hits), 1.0)]))
    else:
        order = _ranked(weighted(vector_rank, word_hits))
    # The candidates that may be shown: some are left out below (gone, cut), few of them in practice.
    order = order[: 4 * p.k + 8]

    # Cosine of every candidate to the query vector: FAISS gave it, except for an item found by words alone
    # and for late fusion, whose lists scored each input on its own. Those vectors are read as the hits are
    # built, a few candidates ahead (most queries show the first k candidates).
    cosines = dict(vector_scores) if fused_vector is None else {}
    if query_vector is not None:  # the words side read the vectors of its first hits
        for w in found_by_words:
            if w.vector is not None and w.id not in cosines:
                cosines[w.id] = float(w.vector @ query_vector)
    read_before = 0  # the candidates before this position in `order` have their cosine, if any

    def cosine_of(pos: int, item_id: int) -> float | None:
        nonlocal read_before
        if item_id not in cosines and query_vector is not None and pos >= read_before:
            ahead = [i for i in order[pos : pos + p.k + READ_AHEAD] if i not in cosines]
            for i, vector in store.catalog.vectors_for(ahead).items():
                cosines[i] = float(vector @ query_vector)
            read_before = pos + p.k + READ_AHEAD
        return cosines.get(item_id)

    threshold = p.min_confidence
    if threshold is None:
        threshold = calibrate.DEFAULT_MIN_CONFIDENCE if calibration is not None else 0.0

    rows = db.resolve_items(store.catalog, order, p.kinds, filters=p.filters)
    hits: list[Hit] = []
    # One result per video: its best moment; the others that pass are folded under it (by hit index).
    video_hit: dict[int, int] = {}
    moments: dict[int, list[dict[str, Any]]] = {}
    for pos, item_id in enumerate(order):
        row = rows.get(item_id)
        if row is None:
            continue
        cosine = cosine_of(pos, item_id)
        confidence = None
        if cosine is not None and calibration is not None and p.query_kind is not None:
            # A segment is text embedded by the text tower like a caption: an image's cosine to either is
            # the same modality pair, read by the image→caption calibration. A keyframe is an image.
            confidence = calibration.confidence(p.query_kind, _CALIBRATED_AS.get(row.kind, row.kind), cosine)
        by_words = item_id in word_hits
        by_vector = item_id in vector_scores
        exact_words = item_id in all_terms
        if not exact_words:
            if confidence is not None and confidence < threshold:
                continue
            if p.min_score is not None and cosine is not None and cosine < p.min_score:
                continue
        score = cosine if cosine is not None else word_hits.get(item_id, 0.0)
        if row.file_kind == "video" and row.file_id in video_hit:
            moments[video_hit[row.file_id]].append(
                {
                    "kind": row.kind,
                    "start": row.start,
                    "end": row.end,
                    "score": round(float(score), 6),
                    "item_id": item_id,
                }
            )
            continue
        if row.file_kind == "video":
            video_hit[row.file_id] = len(hits)
            moments[len(hits)] = []
        hits.append(
            Hit.of(
                row,
                len(hits) + 1,
                score,
                confidence=None if confidence is None else round(float(confidence), 4),
                matched="both" if by_words and by_vector else "words" if by_words else "vector",
            )
        )
        if len(hits) == p.k:
            break
    hits = [
        dataclasses.replace(h, moments=tuple(moments[i])) if moments.get(i) else h for i, h in enumerate(hits)
    ]
    return SearchResult(hits=hits, no_match=not hits, target=p.target, mode=p.mode)


def _words_side(catalog: Catalog, p: Plan, model: str) -> list[WordHit]:
    """The words list of ``p``, its first hits with their vectors when a query vector will need their
    cosines: a hit ranked n-th by words comes n-th or later in either fusion, so the first k + READ_AHEAD
    candidates hold no other hit found by words alone."""
    from mmsearch.catalog_words import word_hits

    assert p.words is not None
    vectors = p.k + READ_AHEAD if p.parts else 0
    return word_hits(catalog, p.words, p.kinds, model, p.depth, filters=p.filters, vectors=vectors)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _side_pool() -> ThreadPoolExecutor:
    """The threads that run the vector side of concurrent queries beside their words search."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=SIDE_THREADS, thread_name_prefix="mmsearch-vectors")
        return _pool


def _nearest(
    store: Store,
    queries: np.ndarray,
    kinds: Sequence[str],
    depth: int,
    allowed: np.ndarray | None,
    model: str,
) -> list[dict[int, float]]:
    """Per query row: the ``depth`` nearest items over ``kinds`` (id -> cosine), within ``allowed``."""
    out: list[dict[int, float]] = [{} for _ in range(len(queries))]
    q = np.ascontiguousarray(queries, np.float32)
    for kind in kinds:
        index = store.vectors(kind, model)
        if index.ntotal == 0:
            continue
        scores, ids = index.search(q, min(index.ntotal, depth), allowed=allowed)
        for row in range(len(q)):
            found = out[row]
            for s, i in zip(scores[row], ids[row], strict=True):
                if i >= 0:
                    found[int(i)] = float(s)
    for row, found in enumerate(out):  # keep the best `depth` over all kinds
        if len(found) > depth:
            out[row] = dict(sorted(found.items(), key=lambda kv: -kv[1])[:depth])
    return out


# Allowed ids of recent filters, per open catalog, by (filters, kinds, model, catalog version): a user who
# refines one query asks for the same selection again and again. Weak keys: a closed catalog's entries go
# with it (an id() of a dead catalog could be reused by another index's).
_ALLOWED_CACHE: weakref.WeakKeyDictionary[Catalog, dict[tuple[Any, ...], np.ndarray]] = (
    weakref.WeakKeyDictionary()
)
_ALLOWED_CACHE_SIZE = 8


def _allowed(store: Store, filters: Filters, kinds: Sequence[str], model: str) -> np.ndarray:
    from mmsearch.catalog_filters import allowed_ids, catalog_version

    cache = _ALLOWED_CACHE.setdefault(store.catalog, {})
    key = (filters, tuple(kinds), model, catalog_version(store.catalog))
    hit = cache.get(key)
    if hit is None:
        hit = allowed_ids(store.catalog, filters, kinds, model)
        hit.setflags(write=False)  # vectors.py reuses the selector built for the same read-only array
        if len(cache) >= _ALLOWED_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = hit
    return hit


__all__ = [
    "COMBINES",
    "DEFAULT_COMBINE",
    "DEFAULT_FUSION",
    "DEFAULT_MODE",
    "FUSIONS",
    "MODES",
    "TARGETS",
    "Filters",
    "Plan",
    "Query",
    "SearchResult",
    "combined_vector",
    "execute",
    "plan",
    "rrf",
    "weighted",
]
