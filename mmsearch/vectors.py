"""FAISS vector indexes: one per item kind, derived from SQLite and rebuilt from it when in doubt.

This is the only module that imports :mod:`faiss`. FAISS ids are SQLite row ids (int64); every
vector is L2-normalised float32 and the score is the inner product (cosine similarity).

Index types (``spec``), chosen by collection size unless the caller forces one:

``flat``
    Exact search (``IndexIDMap2(IndexFlatIP)``); used below :data:`FLAT_MAX` vectors, where one
    query scans the whole collection in under ~10 ms on this class of CPU and recall is 1.
``ivf-sq8``
    The default above :data:`FLAT_MAX`: an inverted file with ``nlist ≈ 2·√n`` lists holding 8-bit
    scalar-quantised vectors (d + 8 bytes each). autofaiss and the FAISS guidelines say 4–16·√n;
    half of the low end halves k-means training and list assignment, which dominate the build on
    2 cores, and the tuned ``nprobe`` absorbs the longer lists. ``nprobe`` is tuned at build time,
    the autofaiss way: a sample of the collection's own vectors serves as queries (each one's
    self-match excluded) and the smallest ``nprobe`` (at least :data:`MIN_NPROBE`) reaching
    :data:`TUNE_RECALL` recall@10 against exact search is kept.
``compact``
    IVF with 128-byte product-quantisation codes (for 512-d) in RAM; the PQ shortlist is re-ranked with the exact
    float32 vectors, which live in the same file on disk and are read through ``np.memmap`` (the OS
    page cache, not the process heap). ``nprobe`` and the shortlist length are tuned as above.
``ivf-pq``
    The same IVF-PQ without re-ranking; kept for the benchmark as a reference, never chosen.

Filtered search (``search(queries, k, allowed=ids)``) happens inside FAISS, so a selective filter still
returns k hits: an ``IDSelector`` over the allowed ids (a bitmap, or a hash set for ids spread far apart)
goes in ``SearchParameters``; ``IndexIDMap2`` translates it for ``flat``. IVF types count, once per
selection, how many allowed ids each inverted list holds; a query then probes, in order of centroid
similarity, only lists holding some, until they hold :data:`FILTER_BUDGET` times the vectors an unfiltered
search scores (:data:`FAR_BUDGET` times when the lists holding allowed ids are all much farther from the
query than its nearest list, :data:`FAR_SCORE_RATIO`: the filter moved the neighbours away from the query,
where centroid order says less about where they are; scaled down for selections under
:data:`FAR_BUDGET_SELECTIVITY` by :data:`FAR_BUDGET_EXPONENT`, as a small selection's neighbours sit in fewer
lists). So the narrower the selection, the more lists
are probed, and lists holding none of it cost nothing. When the selection is so small that scoring its
vectors one by one is cheaper than testing the ids of the lists that probing would visit, those vectors
are scored directly: ``compact`` reads its exact vectors, the other
IVF types decode theirs through a FAISS direct map (id → list, offset) made on first use, and keep the
decoded vectors of the last read-only selection (as its selector is kept) until the index changes.

A forced IVF type given too few vectors to train (:data:`MIN_TRAIN`) falls back to ``flat``, and
:func:`needs_rebuild` says so once the collection is large enough. A ``VectorIndex`` is not
thread-safe: searches must not run concurrently with ``add``/``remove`` on the same object.

File format (one file, so one checksum and one atomic rename cover everything): the FAISS index
as written by ``faiss.write_index``, then for ``compact`` the sorted ids (int64) and the exact
vectors in id order (float32, page-aligned), then a JSON trailer, its length and a magic tag.
No pickle is involved; the file is only handed to FAISS after its sha256 matched the one the
caller recorded in SQLite, because FAISS loads many corrupted files without complaint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mmsearch.discovery import pid_alive
from mmsearch.errors import MissingDependencyError

log = logging.getLogger(__name__)

#: Below this many vectors the index is exact (flat); above it an IVF index is built.
FLAT_MAX = 50_000
#: A flat index is only re-chosen when the collection shrinks well below FLAT_MAX (hysteresis).
FLAT_MIN_FOR_IVF = FLAT_MAX // 2
#: Recall@10 the build-time tuning aims for; above the 0.95 target because real queries are not
#: drawn from the collection (e.g. text queries against image vectors).
TUNE_RECALL = 0.97
#: An IVF index is retrained once the collection grew this many times past its training size,
#: because its lists (nlist ≈ 2·√n) get too long and its nprobe was tuned for another size.
REGROW_FACTOR = 2.0
#: nprobe never goes below this: tuning uses the collection's own vectors, which sit near their
#: centroids; queries far from every centroid (measured: noise 3x the data's) lose 3-5 points of
#: recall@10 at nprobe 1-2 and under 1 point at 4, which costs little time.
MIN_NPROBE = 4
#: Dimensions per PQ sub-quantiser in compact mode: 512-d vectors get 128-byte codes (~150 B of RAM
#: per vector with ids). Measured on 200k clustered vectors: 64-byte codes needed a 100-candidate
#: shortlist for recall@10 0.97, 128-byte codes 40, and the re-ranking is most of the query time.
COMPACT_DIMS_PER_BYTE = 4

#: Filtered IVF search probes the nearest lists holding allowed ids until they hold this many times the
#: vectors an unfiltered search scores (nprobe lists of average length), or all of them. A random
#: selection of a fraction s of the index then probes about FILTER_BUDGET·nprobe/s lists, the "nprobe /
#: selectivity" rule; a selection gathered in a few lists (a folder of similar photos) probes only those.
#: Counting allowed ids exactly per list, recall@10 of random 50 % and 5 % selections on clustered data
#: was the same at 0.5, 1 and 2 (the 8-bit codes' own loss), while time grows with the factor: the
#: probed lists' ids are read and the allowed vectors are scattered across memory.
#: Figures: benchmarks/results/filters.json.
FILTER_BUDGET = 1.0
#: The budget, as FILTER_BUDGET, for a query far from the selection (FAR_SCORE_RATIO) when the selection
#: is FAR_BUDGET_SELECTIVITY of the index: its filtered neighbours' scores are mostly the vectors' own
#: offsets from their centroids, so they are spread over many lists that centroid order barely ranks.
#: Such queries cost this much more.
FAR_BUDGET = 12.0
FAR_BUDGET_SELECTIVITY = 0.5
#: A smaller selection (a fraction s of the index, s below FAR_BUDGET_SELECTIVITY) gets the far budget
#: FAR_BUDGET·(s / FAR_BUDGET_SELECTIVITY)^FAR_BUDGET_EXPONENT, at least FILTER_BUDGET: its neighbours
#: lie in fewer lists, so a smaller share of them is enough. Measured on contiguous ranges of 1M
#: clustered vectors (queries from the whole mixture), recall@10 by far budget: 5 % range ×5 0.959,
#: ×6 0.967, ×8 0.975, ×12 0.981; 50 % range ×6 0.925, ×8 0.943, ×12 0.959. Recall holding about
#: equal needs ×6 at 5 % and ×12 at 50 %, so ten times the selection needs twice the budget:
#: exponent log10(2) ≈ 0.3. With it, recall@10 of 1-50 % ranges was 0.948-0.986.
FAR_BUDGET_EXPONENT = 0.3
#: A query is far from the selection when the best centroid score among the lists holding allowed ids is
#: below this fraction of its best centroid score overall (which is positive).
FAR_SCORE_RATIO = 0.5
#: A bitmap selector is used when the allowed ids are at least this dense in [0, max id]: building it
#: costs about a byte per id of that span and testing an id is one memory read, whereas FAISS's
#: IDSelectorBatch (a hash set, for ids spread far apart) costs far more per allowed id to build.
BITMAP_MIN_DENSITY = 1 / 64
#: Cost of scoring one allowed vector directly instead of through FAISS's list scan, in units of the
#: scan testing one id of a probed list against the selector: reading a 2 KB exact vector of the compact
#: file (page cache) and its inner product, or for the other IVF types a direct-map lookup and a decode.
#: Scoring m vectors directly is chosen when m · cost < the ids a budgeted scan tests (filter_plan).
#: The ratios are measured: benchmarks/bench_filters.py times both methods around the switch.
SUBSET_ROW_COST = {"compact": 60.0, "ivf-sq8": 300.0, "ivf-pq": 300.0}

SPECS = ("flat", "ivf-sq8", "compact", "ivf-pq")
#: Fewest vectors each IVF type is trained on; a forced spec below this falls back to flat. PQ
#: needs ≥ 256 points for its 8-bit codebooks; more make them usable.
MIN_TRAIN = {"ivf-sq8": 100, "compact": 1000, "ivf-pq": 1000}

_SUBSET_BLOCK = 512  # vectors read (or decoded) and scored at a time by a filtered search's subset method
_MAGIC = b"MMSVIDX1"
_TRAILER = struct.Struct("<Q8s")  # JSON length, magic
_FORMAT_VERSION = 1
_PAGE = 4096
_NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
_SHORTLIST_STEPS = (40, 60, 100, 150, 250, 400)  # compact: candidates re-ranked for k = 10
_TUNE_QUERIES = 400
_TUNE_K = 10


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a hard dependency
        raise MissingDependencyError("faiss-cpu", "Vector search") from exc
    return faiss


def choose_spec(n: int) -> str:
    """Index type for a collection of ``n`` vectors."""
    return "flat" if n <= FLAT_MAX else "ivf-sq8"


def needs_rebuild(index: VectorIndex, n: int | None = None) -> bool:
    """Whether ``index`` should be rebuilt (by :meth:`VectorIndex.build` on all vectors) for ``n`` vectors.

    True when the collection crossed the flat/IVF threshold (with hysteresis on the way down) or an
    IVF index grew :data:`REGROW_FACTOR` times past the size it was trained and tuned on. An index
    built with a forced ``spec`` keeps its type (rebuild it with ``spec=index.forced_spec``) and is
    only retrained as it grows.
    """
    n = index.ntotal if n is None else n
    forced = index.forced_spec
    if forced is not None:
        if forced != index.spec:  # fell back to flat while too small to train
            return n >= MIN_TRAIN[forced]
        return forced != "flat" and n > REGROW_FACTOR * max(index.trained_n, 1)
    if index.spec == "flat":
        return n > FLAT_MAX
    return n < FLAT_MIN_FOR_IVF or n > REGROW_FACTOR * max(index.trained_n, 1)


def _as_ids(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)


def _as_vectors(vectors: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of shape [n, {dim}], got {x.shape}")
    return x


def _member(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mask of the ``ids`` found in ``sorted_ids`` (a binary search each: no sort of the large array)."""
    if not len(sorted_ids):
        return np.zeros(len(ids), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[pos] == ids


def _nlist_for(n: int) -> int:
    """nlist ≈ 2·√n rounded to a power of two, keeping ≥ 39 training points per list (faiss's minimum)."""
    nlist = 2 ** round(math.log2(max(2 * math.sqrt(n), 1)))
    return int(max(1, min(nlist, n // 39)))


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth, strict=True))
    return hits / max(1, int((truth >= 0).sum()))


class _ExactStore:
    """The exact vectors of a compact index, sorted by id: an array or read-only memmap, plus rows added since.

    Removed rows stay readable (FAISS no longer returns their ids, and :meth:`VectorIndex.save` only
    writes the rows whose id is still in the index); :meth:`held` leaves them out.
    """

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) > 1 and not np.all(ids[1:] > ids[:-1]):
            order = np.argsort(ids)
            ids, vectors = ids[order], vectors[order]
        self.ids = ids
        self.vectors = vectors
        self.extra: dict[int, np.ndarray] = {}  # rows added after build/load, keyed by id
        self.dropped = np.empty(0, np.int64)  # sorted ids of `ids` removed since build/load

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        for i, v in zip(ids.tolist(), vectors, strict=True):
            self.extra[i] = v.copy()

    def discard(self, ids: np.ndarray) -> None:
        """Mark ``ids`` removed from the index."""
        for i in ids.tolist():
            self.extra.pop(i, None)
        self.dropped = np.union1d(self.dropped, ids[_member(self.ids, ids)])

    def held(self, ids: np.ndarray) -> np.ndarray:
        """The ids among ``ids`` that the index holds (stored and not removed since)."""
        keep = _member(self.ids, ids) & ~_member(self.dropped, ids)
        if self.extra:
            keep |= np.fromiter((i in self.extra for i in ids.tolist()), bool, len(ids))
        return ids[keep]

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Rows for ``ids`` (each must have been stored); later additions win over older rows."""
        pos = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
        in_base = self.ids[pos] == ids if len(self.ids) else np.zeros(len(ids), bool)
        if not self.extra:
            if not in_base.all():  # pragma: no cover - FAISS returned an id never stored: a bug
                raise KeyError(f"no stored vector for ids {ids[~in_base][:5]}")
            return np.asarray(self.vectors[pos], dtype=np.float32)
        out = np.empty((len(ids), self.vectors.shape[1]), dtype=np.float32)
        for j, i in enumerate(ids.tolist()):
            row = self.extra.get(i)
            if row is not None:
                out[j] = row
            elif in_base[j]:
                out[j] = self.vectors[pos[j]]
            else:  # pragma: no cover
                raise KeyError(f"no stored vector for id {i}")
        return out


class _Selection:
    """A FAISS IDSelector over allowed ids, holding the numpy buffer it reads for as long as it lives, and
    the IVF search parameters made with it (per nprobe: the widest probe of a query batch)."""

    def __init__(self, allowed: np.ndarray) -> None:
        faiss = _faiss()
        self._ivf_params: dict[int, Any] = {}
        span = int(allowed.max()) + 1
        if len(allowed) >= BITMAP_MIN_DENSITY * span:
            dense = np.zeros(span, dtype=bool)
            dense[allowed] = True
            # FAISS reads bit (id % 8) of byte (id // 8), least significant bit first.
            self.buffer = np.packbits(dense, bitorder="little")
            self.selector = faiss.IDSelectorBitmap(len(self.buffer), faiss.swig_ptr(self.buffer))
            self.kind = "bitmap"
        else:
            self.buffer = allowed  # IDSelectorBatch copies the ids into its own hash set
            self.selector = faiss.IDSelectorBatch(len(allowed), faiss.swig_ptr(allowed))
            self.kind = "batch"
        self._allowed = allowed

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Mask of the ``ids`` (>= 0) this selection allows."""
        if self.kind == "bitmap":
            inside = ids < 8 * len(self.buffer)
            out = np.zeros(len(ids), bool)
            i = ids[inside]
            out[inside] = (self.buffer[i >> 3] >> (i & 7).astype(np.uint8)) & 1 == 1
            return out
        allowed = self._allowed
        if len(allowed) > 1 and not np.all(allowed[1:] >= allowed[:-1]):
            allowed = self._allowed = np.sort(allowed)
        return _member(allowed, ids)

    def ivf_params(self, nprobe: int) -> Any:
        """SearchParametersIVF with this selector (read-only in FAISS's search: shared by every query)."""
        params = self._ivf_params.get(nprobe)
        if params is None:
            params = _faiss().SearchParametersIVF(sel=self.selector, nprobe=nprobe)
            self._ivf_params[nprobe] = params
        return params


# The selector built for the last read-only `allowed` array, reused when the same array object comes
# again (a caller caching a filter's ids passes the same array to each kind's index and each query).
# A writable array might have changed since, so its selector is never reused.
_last_selection: tuple[np.ndarray, _Selection] | None = None


def _cached_selection(allowed: np.ndarray) -> _Selection | None:
    """The selection built for this very (read-only) array, if it is the last one."""
    last = _last_selection  # one read: another thread may replace it meanwhile
    return last[1] if last is not None and last[0] is allowed else None


def _selection(allowed: np.ndarray) -> _Selection:
    global _last_selection
    cached = _cached_selection(allowed)
    if cached is not None:
        return cached
    selection = _Selection(allowed)
    if not allowed.flags.writeable:
        _last_selection = (allowed, selection)
    return selection


def _as_allowed(allowed: np.ndarray) -> np.ndarray:
    """``allowed`` as a contiguous 1-d int64 array (the same object when it already is one)."""
    a = np.asarray(allowed)
    if a.dtype != np.int64 or a.ndim != 1 or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a.reshape(-1), dtype=np.int64)
    if len(a) and int(a.min()) < 0:
        raise ValueError("allowed ids must be >= 0")
    return a


def _no_hits(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


class VectorIndex:
    """One FAISS index over (id, vector) pairs; see the module docstring for the types."""

    def __init__(
        self,
        dim: int,
        index: Any,
        spec: str,
        params: dict[str, Any],
        *,
        trained_n: int,
        forced_spec: str | None = None,
        store: _ExactStore | None = None,
    ) -> None:
        self.dim = dim
        self.spec = spec
        #: The spec the caller forced at build time (None when it followed the collection size).
        self.forced_spec = forced_spec
        self.params = params
        self.trained_n = trained_n
        self._index = index
        self._store = store
        self._gpu_index: Any = None
        # IVF types, made on the first filtered search that scores a small selection directly: the ids
        # held, sorted (then kept up to date by add/remove), and a FAISS direct map (id -> list, offset).
        self._held: np.ndarray | None = None
        # The last subset search's read-only allowed ids, the held ids then, and its held ids and vectors.
        self._subset_cache: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        # IVF types, made on the first filtered search that probes lists: the centroids (fixed once trained),
        # the ids of every list (concatenated in list order, and where each list starts; made again after
        # add/remove), and for the last selection the lists holding allowed ids and how many each holds.
        self._centroids: np.ndarray | None = None
        self._layout: tuple[np.ndarray, np.ndarray] | None = None
        self._counts_cache: tuple[_Selection, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._lazy_lock = threading.Lock()
        self._apply_params()

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(cls, dim: int, ids: np.ndarray, vectors: np.ndarray, *, spec: str | None = None) -> VectorIndex:
        """New index over (ids int64 [n], vectors float32 [n, dim]).

        The type follows ``n`` (:func:`choose_spec`) unless ``spec`` forces one of :data:`SPECS`.
        IVF types are trained on a sample and their search parameters tuned on the data itself.
        """
        faiss = _faiss()
        ids = _as_ids(ids)
        x = _as_vectors(vectors, dim) if len(ids) else np.empty((0, dim), np.float32)
        if len(ids) != len(x):
            raise ValueError(f"{len(ids)} ids for {len(x)} vectors")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids")
        n = len(ids)
        forced_spec = spec
        spec = spec or choose_spec(n)
        if spec not in SPECS:
            raise ValueError(f"unknown index spec {spec!r}; expected one of {SPECS}")
        if spec != "flat" and n < MIN_TRAIN[spec]:
            log.info("%d vectors are too few to train %s; using flat", n, spec)
            spec = "flat"
        t0 = time.perf_counter()
        if spec == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
            if n:
                index.add_with_ids(x, ids)
            return cls(dim, index, spec, {}, trained_n=n, forced_spec=forced_spec)

        nlist = _nlist_for(n)
        quantizer = faiss.IndexFlatIP(dim)
        if spec == "ivf-sq8":
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        else:
            m = max(1, dim // COMPACT_DIMS_PER_BYTE)
            while dim % m:
                m -= 1
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
            # Polysemous training (on by default) reorders codes for Hamming filtering, which we do not
            # use, and costs minutes.
            index.do_polysemous_training = False
            # 256 centroids in 4 dimensions per sub-quantiser: small k-means where OpenMP barriers cost
            # more than they save (measured 4-10x slower with 2 threads on a busy 2-core machine), and
            # where 10 iterations on 128 points per centroid suffice because the shortlist is re-ranked.
            index.pq.cp.niter = 10
            index.pq.cp.max_points_per_centroid = 128
        index.cp.niter = 10  # 10 k-means iterations: the recall difference to 25 is negligible here
        rng = np.random.default_rng(0)
        # faiss asks for ≥ 39 points per list; autofaiss trains on 31–100 per list.
        n_train = min(n, max(40 * nlist, 10_000))
        sample = x if n_train == n else x[np.sort(rng.choice(n, n_train, replace=False))]
        _train_ivf(index, sample, single_thread_encoder=spec != "ivf-sq8")
        del sample
        train_s = time.perf_counter() - t0
        index.add_with_ids(x, ids)
        add_s = time.perf_counter() - t0 - train_s
        store = _ExactStore(ids, x) if spec == "compact" else None
        params: dict[str, Any] = {"nlist": nlist}
        vi = cls(dim, index, spec, params, trained_n=n, forced_spec=forced_spec, store=store)
        vi._tune(ids, x, rng)
        log.info(
            "built %s over %d vectors in %.1f s (train %.1f s on %d, add %.1f s, tune %.1f s): %s",
            spec,
            n,
            time.perf_counter() - t0,
            train_s,
            n_train,
            add_s,
            time.perf_counter() - t0 - train_s - add_s,
            vi.params,
        )
        return vi

    def _tune(self, ids: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> None:
        """Pick the cheapest nprobe (and shortlist) reaching TUNE_RECALL on the data's own vectors."""
        faiss = _faiss()
        n = len(ids)
        nq = min(_TUNE_QUERIES, n)
        qi = np.sort(rng.choice(n, nq, replace=False))
        q = x[qi]
        # Exact neighbours, excluding each query's self-match (it would inflate recall).
        _, truth_pos = faiss.knn(q, x, _TUNE_K + 1, faiss.METRIC_INNER_PRODUCT)
        truth = ids[truth_pos]
        truth = np.array([row[row != ids[j]][:_TUNE_K] for j, row in zip(qi, truth, strict=True)])
        nlist = self.params["nlist"]
        steps = [p for p in _NPROBE_STEPS if min(MIN_NPROBE, nlist) <= p < nlist] + [nlist]
        shortlists = _SHORTLIST_STEPS if self.spec == "compact" else (0,)
        # One thread, as queries are served one at a time; it also avoids OpenMP's spinning barriers,
        # which made these small batched searches ~20x slower on a busy 2-core machine.
        with _omp_threads(1):
            best, fallback = self._tune_grid(q, qi, ids, truth, steps, shortlists)
        if best is None:
            # Expected for ivf-pq (no re-ranking); a bug or odd data for the others.
            log.log(
                logging.INFO if self.spec == "ivf-pq" else logging.WARNING,
                "%s did not reach recall@10 %.2f (best %.3f); searching with the largest settings tried",
                self.spec,
                TUNE_RECALL,
                fallback["tuned_recall10"],
            )
            best = fallback
        best.pop("_s", None)
        if self.spec != "compact":
            best.pop("shortlist")
            self.params.pop("shortlist", None)
        self.params.update(best)
        self._apply_params()

    def _tune_grid(
        self,
        q: np.ndarray,
        qi: np.ndarray,
        ids: np.ndarray,
        truth: np.ndarray,
        steps: list[int],
        shortlists: tuple[int, ...],
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """For each shortlist length, the smallest nprobe reaching the target; of those, the fastest
        measured (autofaiss also chooses by measured speed). Returns (best or None, the settings with
        the highest recall seen, for when none reached the target).

        Longest shortlist first: it reaches the target at the smallest nprobe, which then bounds the
        nprobe tried with shorter ones. A curve that stopped rising (PQ's own error) is abandoned.
        """
        best: dict[str, Any] | None = None
        fallback = {"nprobe": steps[-1], "shortlist": max(shortlists), "tuned_recall10": 0.0}
        for shortlist in sorted(shortlists, reverse=True):
            history: list[float] = []
            for nprobe in steps:
                if best is not None and nprobe > best["nprobe"]:
                    break  # a shorter shortlist only pays if it needs no larger nprobe
                self.params.update(nprobe=nprobe, shortlist=shortlist)
                self._apply_params()
                t0 = time.perf_counter()
                _, found = self.search(q, _TUNE_K + 1)
                elapsed = time.perf_counter() - t0
                found = np.array([row[row != ids[j]][:_TUNE_K] for j, row in zip(qi, found, strict=True)])
                rec = _recall(found, truth)
                if rec > fallback["tuned_recall10"] + 0.001:
                    fallback = {"nprobe": nprobe, "shortlist": shortlist, "tuned_recall10": round(rec, 4)}
                history.append(rec)
                if rec >= TUNE_RECALL:
                    if best is None or elapsed < best["_s"]:
                        best = {"nprobe": nprobe, "shortlist": shortlist, "tuned_recall10": round(rec, 4)}
                        best["_s"] = elapsed
                    break
                if len(history) >= 3 and rec - history[-3] < 0.002:
                    break  # saturated below the target: more probes will not get there
            if self.spec != "compact" and best is not None:
                break
        return best, fallback

    def _apply_params(self) -> None:
        if "nprobe" in self.params:
            self._index.nprobe = int(self.params["nprobe"])
        self._gpu_index = None

    # ------------------------------------------------------------------ queries and updates

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        """All ids held (int64, in no particular order)."""
        faiss = _faiss()
        if self.spec == "flat":
            return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)
        invlists = self._index.invlists
        parts = []
        for list_no in range(invlists.nlist):
            size = invlists.list_size(list_no)
            if size:
                ptr = invlists.get_ids(list_no)
                parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                invlists.release_ids(list_no, ptr)
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray, *, above: int | None = None) -> None:
        """Add vectors under new ids; an id already held raises ValueError (remove it first).

        ``above``: no id held is larger than this (the caller knows it, e.g. ids are never reused), so
        ids above it are new without listing the index's ids (O(ntotal), milliseconds at a million).
        """
        ids = _as_ids(ids)
        if not len(ids):
            return
        x = _as_vectors(vectors, self.dim)
        if len(ids) != len(x):
            raise ValueError(f"{len(ids)} ids for {len(x)} vectors")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids: remove an id before adding it again")
        if (above is None or ids.min() <= above) and np.isin(ids, self.ids()).any():
            raise ValueError("duplicate ids: remove an id before adding it again")
        self._index.add_with_ids(x, ids)
        self._layout = None
        if self._store is not None:
            self._store.add(ids, x)
        if self._held is not None:
            new = np.sort(ids)
            if not len(self._held) or new[0] > self._held[-1]:
                self._held = np.concatenate([self._held, new])
            else:
                self._held = np.insert(self._held, np.searchsorted(self._held, new), new)
        self._gpu_index = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids (absent ones are ignored); returns how many were removed."""
        faiss = _faiss()
        ids = _as_ids(ids)
        if not len(ids):
            return 0
        if self.spec != "flat" and self._index.direct_map.type == faiss.DirectMap.Hashtable:
            # FAISS removes from an IVF index with a hash-table direct map only through an IDSelectorArray
            # (looked up one by one in the map, no scan of the lists).
            selector = faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))
        else:
            selector = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
        removed = int(self._index.remove_ids(selector))
        if removed:
            self._layout = None
        if self._store is not None:
            self._store.discard(ids)
        if self._held is not None and removed:
            self._held = np.delete(self._held, np.searchsorted(self._held, ids[_member(self._held, ids)]))
        self._gpu_index = None
        return removed

    def search(
        self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores [nq, k] float32, ids [nq, k] int64), best first; missing slots have id -1, score -inf.

        ``allowed``: only these ids (int64, sorted; ids this index does not hold are ignored) may be
        returned, and k are returned whenever the index holds at least k of them (see the module
        docstring for how). An empty ``allowed`` returns no hits.
        """
        q = _as_vectors(queries, self.dim)
        if k < 1:
            raise ValueError("k must be >= 1")
        if allowed is not None:
            # An array whose selector is cached was checked when the selector was built (read-only since).
            if _cached_selection(allowed) is None:
                allowed = _as_allowed(allowed)
            scores, ids = self._search_filtered(q, k, allowed)
        elif self.spec == "compact":
            scores, ids = self._search_compact(q, k)
        else:
            scores, ids = self._searcher().search(q, k)
        scores[ids < 0] = -np.inf
        return scores, ids

    def _search_filtered(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        if not len(allowed) or not self.ntotal:
            return _no_hits(len(q), k)
        # Always the CPU index: FAISS's GPU indexes do not take an IDSelector.
        plan = self.filter_plan(len(allowed))
        if plan["method"] == "subset":
            return self._search_subset(q, k, allowed)
        selection = _selection(allowed)
        if self.spec == "flat":
            # IndexIDMap2 wraps the selector in an IDSelectorTranslated (row -> id); the flat scan tests
            # each row's id and computes inner products for the allowed rows only.
            return self._index.search(q, k, params=faiss.SearchParameters(sel=selection.selector))
        if not len(self._allowed_lists(selection)[0]):  # the index holds none of the allowed ids
            return _no_hits(len(q), k)
        probe = self._probe(q, k, selection, plan)
        if self.spec == "compact":
            return self._search_compact(q, k, probe)
        return self._ivf_search(q, k, probe)

    def filter_plan(self, n_allowed: int) -> dict[str, Any]:
        """How a search restricted to ``n_allowed`` ids runs: ``method`` "selector" (FAISS scan with an
        IDSelector; for IVF types of the nearest lists holding ``budget`` allowed ids, ``far_budget`` for a
        query far from them) or "subset" (the allowed vectors scored one by one)."""
        if self.spec == "flat":
            return {"method": "selector"}
        per_probe = self.params["nprobe"] * self.ntotal / int(self.params["nlist"])
        # Vectors scored: FILTER_BUDGET times an unfiltered search's.
        budget = FILTER_BUDGET * per_probe
        # Probing a selection spread over the index tests about budget / selectivity ids (never more than
        # the whole index); scoring the selection directly costs SUBSET_ROW_COST each.
        scan_ids = min(float(self.ntotal), budget * self.ntotal / max(n_allowed, 1))
        if n_allowed * SUBSET_ROW_COST[self.spec] < scan_ids:
            return {"method": "subset"}
        # Far from the selection: a budget growing with the selection's size, capped at FAR_BUDGET.
        share = min(n_allowed / max(self.ntotal, 1), FAR_BUDGET_SELECTIVITY) / FAR_BUDGET_SELECTIVITY
        far = max(FILTER_BUDGET, FAR_BUDGET * share**FAR_BUDGET_EXPONENT)
        return {"method": "selector", "budget": int(budget), "far_budget": int(far * per_probe)}

    def _probe(
        self, q: np.ndarray, k: int, selection: _Selection, plan: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, Any]:
        """The lists each query probes (-1 pads), their centroid scores, and the search parameters: the
        nearest lists holding allowed ids, until they hold the plan's budget (and at least k) of them."""
        lists, counts = self._allowed_lists(selection)
        scores = self._centroid_scores(q)
        allowed_scores = scores[:, lists]
        nearest = scores.max(axis=1)
        far = (nearest > 0) & (allowed_scores.max(axis=1) < FAR_SCORE_RATIO * nearest)
        budget = np.maximum(np.where(far, plan["far_budget"], plan["budget"]), k)
        # Only the nearest lists are ranked: twice as many as the budget needs on average, then all of
        # them if those hold too few allowed ids.
        guess = int(2 * budget.max() * len(lists) / counts.sum()) + 16
        order = None
        if guess < len(lists):
            part = np.argpartition(-allowed_scores, guess - 1, axis=1)[:, :guess]
            order = np.take_along_axis(
                part,
                np.argsort(-np.take_along_axis(allowed_scores, part, axis=1), axis=1, kind="stable"),
                axis=1,
            )
            if (counts[order].sum(axis=1) < budget).any():
                order = None
        if order is None:
            order = np.argsort(-allowed_scores, axis=1, kind="stable")
        ranked = np.take_along_axis(allowed_scores, order, axis=1)
        held = np.cumsum(counts[order], axis=1)
        n_lists = np.minimum((held < budget[:, None]).sum(axis=1) + 1, len(lists))
        width = int(n_lists.max())
        used = np.arange(width) < n_lists[:, None]
        assign = np.where(used, lists[order[:, :width]], -1).astype(np.int64)
        dis = np.where(used, ranked[:, :width], 0).astype(np.float32)
        return np.ascontiguousarray(assign), np.ascontiguousarray(dis), selection.ivf_params(width)

    def _ivf_search(
        self, q: np.ndarray, k: int, probe: tuple[np.ndarray, np.ndarray, Any] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search of the IVF index: of the lists and with the parameters ``probe`` gives, if any."""
        if probe is None:
            return self._index.search(q, k)
        faiss = _faiss()
        assign, dis, params = probe
        scores = np.empty((len(q), k), dtype=np.float32)
        ids = np.empty((len(q), k), dtype=np.int64)
        self._index.search_preassigned_c(
            len(q),
            faiss.swig_ptr(q),
            k,
            faiss.swig_ptr(assign),
            faiss.swig_ptr(dis),
            faiss.swig_ptr(scores),
            faiss.swig_ptr(ids),
            False,
            params,
        )
        return scores, ids

    def _centroid_scores(self, q: np.ndarray) -> np.ndarray:
        """Inner products [nq, nlist] of the queries with the centroids, on this thread (FAISS's SIMD loop:
        a BLAS call may wake threads of its own, which cost far more than this product on a busy machine)."""
        faiss = _faiss()
        centroids = self._centroid_matrix()
        out = np.empty((len(q), len(centroids)), dtype=np.float32)
        for i in range(len(q)):
            faiss.fvec_inner_products_ny(
                faiss.swig_ptr(out[i]),
                faiss.swig_ptr(q[i]),
                faiss.swig_ptr(centroids),
                self.dim,
                len(centroids),
            )
        return out

    def _centroid_matrix(self) -> np.ndarray:
        """The IVF centroids [nlist, dim] (they do not change once trained)."""
        with self._lazy_lock:
            if self._centroids is None:
                quantizer = self._index.quantizer
                self._centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
            return self._centroids

    def _list_layout(self) -> tuple[np.ndarray, np.ndarray]:
        """The ids of every inverted list, concatenated in list order, and where each list starts
        (nlist + 1 offsets); listed once, then again after add/remove."""
        faiss = _faiss()
        with self._lazy_lock:
            if self._layout is None:
                invlists = self._index.invlists
                sizes = np.array([invlists.list_size(i) for i in range(invlists.nlist)], dtype=np.int64)
                starts = np.concatenate([[0], np.cumsum(sizes)])
                ids = np.empty(int(starts[-1]), dtype=np.int64)
                for list_no in np.flatnonzero(sizes).tolist():
                    ptr = invlists.get_ids(list_no)
                    ids[starts[list_no] : starts[list_no + 1]] = faiss.rev_swig_ptr(ptr, int(sizes[list_no]))
                    invlists.release_ids(list_no, ptr)
                self._layout = (ids, starts)
            return self._layout

    def _allowed_lists(self, selection: _Selection) -> tuple[np.ndarray, np.ndarray]:
        """The lists holding ids ``selection`` allows, and how many each holds; kept for the last selection
        while the lists stay the same (a cached filter's selection comes back for every query)."""
        layout = self._list_layout()
        last = self._counts_cache  # one read: another thread may replace it meanwhile
        if last is not None and last[0] is selection and last[1] is layout[0]:
            return last[2], last[3]
        ids, starts = layout
        held = np.concatenate([[0], np.cumsum(selection.contains(ids), dtype=np.int64)])
        counts = held[starts[1:]] - held[starts[:-1]]
        lists = np.flatnonzero(counts)
        self._counts_cache = (selection, ids, lists, counts[lists])
        return lists, counts[lists]

    def _search_subset(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score the allowed vectors the index holds one by one (few of them: see filter_plan)."""
        faiss = _faiss()
        if self._store is not None:  # compact: the exact vectors, read per block below
            held, decoded = self._store.held(allowed), None
        else:  # ivf-sq8 / ivf-pq: decoded, as their list scan scores them
            held, decoded = self._decoded_subset(allowed)
        best_scores, best_ids = _no_hits(len(q), k)
        # In blocks, so that the rows just read are scored while they are in the CPU cache.
        for s in range(0, len(held), _SUBSET_BLOCK):
            part = held[s : s + _SUBSET_BLOCK]
            rows = self._store.get(part) if decoded is None else decoded[s : s + _SUBSET_BLOCK]  # type: ignore[union-attr]
            scores, pos = faiss.knn(q, rows, min(k, len(part)), faiss.METRIC_INNER_PRODUCT)
            ids = np.where(pos >= 0, part[np.maximum(pos, 0)], -1)
            scores = np.concatenate([best_scores, scores], axis=1)
            ids = np.concatenate([best_ids, ids], axis=1)
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            best_scores = np.take_along_axis(scores, top, axis=1)
            best_ids = np.take_along_axis(ids, top, axis=1)
        return best_scores, best_ids

    def _decoded_subset(self, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The allowed ids this IVF index holds and their decoded vectors. Kept for the last read-only
        ``allowed`` array while the held ids stay the same array (add and remove replace it): decoding
        is most of a subset search, and a caller caching a filter's ids asks for the same ones again."""
        held_ids = self._held_ids()
        last = self._subset_cache  # one read: another thread may replace it meanwhile
        if last is not None and last[0] is allowed and last[1] is held_ids:
            return last[2], last[3]
        held = allowed[_member(held_ids, allowed)]
        decoded = np.empty((len(held), self.dim), dtype=np.float32)
        for s in range(0, len(held), _SUBSET_BLOCK):
            self._decode(held[s : s + _SUBSET_BLOCK], decoded[s : s + _SUBSET_BLOCK])
        if not allowed.flags.writeable:
            self._subset_cache = (allowed, held_ids, held, decoded)
        return held, decoded

    def _held_ids(self) -> np.ndarray:
        """The ids this IVF index holds, sorted; listed once, then kept up to date by add/remove."""
        with self._lazy_lock:
            if self._held is None:
                self._held = np.sort(self.ids())
            return self._held

    def _decode(self, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Decoded vectors of held ids into ``out``, through a hash-table direct map made on first use
        (~35 B/vector of RAM, kept up to date by FAISS on add/remove, not written to the file)."""
        faiss = _faiss()
        with self._lazy_lock:
            if self._index.direct_map.type != faiss.DirectMap.Hashtable:
                self._index.set_direct_map_type(faiss.DirectMap.Hashtable)
        return self._index.reconstruct_batch(ids, out)

    def _search_compact(
        self, q: np.ndarray, k: int, probe: tuple[np.ndarray, np.ndarray, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """IVF-PQ shortlist (from the lists ``probe`` gives, if any), re-ranked by exact inner products with
        the stored float32 vectors."""
        assert self._store is not None
        # The shortlist was tuned for k = 10; scale it for other k.
        shortlist = max(k, int(self.params.get("shortlist", 100) * max(k, _TUNE_K) / _TUNE_K))
        _, cand = self._ivf_search(q, shortlist, probe)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        out = np.full((len(q), k), -1, dtype=np.int64)
        step = max(1, 4096 // shortlist)  # bounds the gathered block to ~8 MB for 512-d
        for s in range(0, len(q), step):
            c = cand[s : s + step]
            ok = c >= 0
            rows = np.zeros((c.size, self.dim), dtype=np.float32)
            rows[ok.ravel()] = self._store.get(c[ok])
            exact = np.einsum("qsd,qd->qs", rows.reshape(*c.shape, self.dim), q[s : s + step])
            exact[~ok] = -np.inf
            top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
            top_scores = np.take_along_axis(exact, top, axis=1)
            top_ids = np.take_along_axis(c, top, axis=1)
            top_ids[np.isneginf(top_scores)] = -1
            scores[s : s + step, : top.shape[1]] = top_scores
            out[s : s + step, : top.shape[1]] = top_ids
        return scores, out

    def _searcher(self) -> Any:
        """For unfiltered searches: the CPU index, or a GPU copy when faiss-gpu and a GPU are present."""
        faiss = _faiss()
        if self._gpu_index is None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            try:  # pragma: no cover - no GPU on the machines this was written on
                self._gpu_res = faiss.StandardGpuResources()
                self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._index)
            except RuntimeError as exc:  # pragma: no cover
                log.warning("could not move the index to the GPU, searching on the CPU: %s", exc)
                self._gpu_index = False
        return self._gpu_index or self._index

    def describe(self) -> dict[str, Any]:
        """Type, FAISS factory-style string, tuned parameters and size."""
        nlist = self.params.get("nlist")
        pq_m = self._index.pq.M if self.spec in ("compact", "ivf-pq") else None
        factory = {
            "flat": "IDMap2,Flat",
            "ivf-sq8": f"IVF{nlist},SQ8",
            "ivf-pq": f"IVF{nlist},PQ{pq_m}",
            "compact": f"IVF{nlist},PQ{pq_m}+rerank(mmap)",
        }[self.spec]
        return {
            "type": self.spec,
            "factory": factory,
            "metric": "inner_product",
            "dim": self.dim,
            "ntotal": self.ntotal,
            "trained_n": self.trained_n,
            "forced_spec": self.forced_spec,
            **self.params,
        }

    # ------------------------------------------------------------------ persistence

    def save(self, path: Path) -> tuple[str, int]:
        """Write atomically (temp file in the same folder, fsync, rename, fsync the folder).

        Returns (sha256 hex of the file, ntotal), which the caller records in SQLite. On failure
        (e.g. disk full) the temp file is removed, the previous file at ``path`` is untouched and
        the OSError propagates.
        """
        faiss = _faiss()
        path = Path(path)
        folder = path.parent
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=folder)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as raw:
                out = _HashingWriter(raw)
                meta: dict[str, Any] = {
                    "version": _FORMAT_VERSION,
                    "spec": self.spec,
                    "dim": self.dim,
                    "ntotal": self.ntotal,
                    "trained_n": self.trained_n,
                    "forced_spec": self.forced_spec,
                    "params": self.params,
                }
                writer = faiss.PyCallbackIOWriter(out.write_counted)
                # The direct map is an in-memory aid of filtered search (see _decode): the file holds the
                # vectors only, so the map is dropped while writing and made again after.
                direct_map = self._index.direct_map.type if self.spec != "flat" else faiss.DirectMap.NoMap
                if direct_map != faiss.DirectMap.NoMap:
                    self._index.set_direct_map_type(faiss.DirectMap.NoMap)
                try:
                    faiss.write_index(self._index, writer)
                finally:
                    if direct_map != faiss.DirectMap.NoMap:
                        self._index.set_direct_map_type(direct_map)
                del writer  # it calls back synchronously; a failing write raises out of write_index
                meta["faiss_len"] = out.size
                if self._store is not None:
                    self._write_store(out, meta)
                trailer = json.dumps(meta, sort_keys=True).encode()
                out.write(trailer)
                out.write(_TRAILER.pack(len(trailer), _MAGIC))
                raw.flush()
                os.fsync(raw.fileno())
                digest = out.hexdigest()
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(folder)
        if self._store is not None:
            # Read the exact vectors from the file just written from now on: this drops the rows held
            # in RAM (the build input, later additions).
            self._store = _open_store(path, meta)
        return digest, meta["ntotal"]

    def _write_store(self, out: _HashingWriter, meta: dict[str, Any]) -> None:
        assert self._store is not None
        live = np.sort(self.ids())
        out.pad_to(8)
        meta["ids_offset"] = out.size
        out.write(live.tobytes())
        out.pad_to(_PAGE)
        meta["vectors_offset"] = out.size
        for s in range(0, len(live), 16384):  # chunked: never a second full copy in RAM
            out.write(np.ascontiguousarray(self._store.get(live[s : s + 16384]), dtype="<f4").tobytes())
        meta["store_rows"] = len(live)

    @classmethod
    def load(cls, path: Path, *, sha256: str, ntotal: int, dim: int) -> VectorIndex | None:
        """The index saved at ``path``, or None when it is missing, corrupt, stale or does not load.

        None tells the caller to rebuild from SQLite. Never raises for a bad file.
        """
        path = Path(path)
        try:
            return cls._load(path, sha256=sha256, ntotal=ntotal, dim=dim)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, MemoryError) as exc:
            log.warning("cannot load vector index %s (%s); it will be rebuilt", path, exc)
            return None

    @classmethod
    def _load(cls, path: Path, *, sha256: str, ntotal: int, dim: int) -> VectorIndex | None:
        faiss = _faiss()
        if not path.is_file():
            log.info("vector index %s is missing; it will be rebuilt", path)
            return None
        # Hashed and read through one open file: a writer's rename in between cannot swap it.
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            if _file_digest(f, path, _file_identity(st)) != sha256:
                log.warning("vector index %s does not match its recorded checksum; it will be rebuilt", path)
                return None
            size = st.st_size
            if size < _TRAILER.size:
                raise ValueError("file too short")
            f.seek(size - _TRAILER.size)
            meta_len, magic = _TRAILER.unpack(f.read(_TRAILER.size))
            if magic != _MAGIC or meta_len > size - _TRAILER.size:
                raise ValueError("not an mmsearch vector index")
            f.seek(size - _TRAILER.size - meta_len)
            meta = json.loads(f.read(meta_len))
            if meta.get("version") != _FORMAT_VERSION or meta["spec"] not in SPECS:
                raise ValueError(f"unsupported index format {meta.get('version')}/{meta.get('spec')}")
            if meta["dim"] != dim or meta["ntotal"] != ntotal:
                log.warning(
                    "vector index %s holds %s×%s vectors, expected %s×%s; it will be rebuilt",
                    path,
                    meta["ntotal"],
                    meta["dim"],
                    ntotal,
                    dim,
                )
                return None
            f.seek(0)
            reader = faiss.PyCallbackIOReader(_bounded_reader(f, int(meta["faiss_len"])))
            index = faiss.read_index(reader)
            del reader
            if index.ntotal != ntotal or index.d != dim:
                raise ValueError("FAISS index size differs from its trailer")
            store = _open_store(f, meta) if meta["spec"] == "compact" else None  # the file hashed
        return cls(
            dim,
            index,
            meta["spec"],
            dict(meta["params"]),
            trained_n=int(meta["trained_n"]),
            forced_spec=meta.get("forced_spec"),
            store=store,
        )


def _train_ivf(index: Any, sample: np.ndarray, *, single_thread_encoder: bool) -> None:
    """Train the coarse quantizer with every thread, then the encoder (SQ or PQ codebooks).

    ``IndexIVF.train`` skips the coarse k-means when the quantizer already holds nlist centroids,
    which lets the PQ codebooks be trained with one thread (see ``build``).
    """
    faiss = _faiss()
    clus = faiss.Clustering(index.d, index.nlist, index.cp)
    index.quantizer.reset()
    clus.train(sample, index.quantizer)
    index.quantizer.is_trained = True
    with _omp_threads(1) if single_thread_encoder else contextlib.nullcontext():
        index.train(sample)


@contextlib.contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    """Run FAISS with ``n`` OpenMP threads, restoring the previous setting afterwards."""
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


# ---------------------------------------------------------------------- file helpers

# Digests of saved files hashed ahead of their load by prefetch_digests: (path, file identity) -> sha256.
_digests: dict[tuple[str, tuple[int, ...]], Future[str]] = {}
_digests_lock = threading.Lock()


def _file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes whenever a file's bytes do: its inode (a rename puts another file there), size, and
    mtime and ctime (any write updates ctime, which no call can set back)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def prefetch_digests(paths: Iterable[Path]) -> None:
    """Hash the saved vector files at ``paths`` on a thread (sha256 runs without the GIL), for their next
    :meth:`VectorIndex.load` in this process: a cold query starts this before importing the engine.

    The load uses a digest computed here only if the file it opened is still the one hashed (same
    :func:`_file_identity`); otherwise it hashes the file again. Either way the whole file is checked against
    its record before FAISS reads it. Never raises: a file that cannot be hashed here is hashed by the load."""
    jobs: list[tuple[Path, tuple[int, ...], Future[str]]] = []
    with _digests_lock:
        for path in paths:
            try:
                with open(path, "rb") as f:
                    ident = _file_identity(os.fstat(f.fileno()))
            except OSError:
                continue
            key = (str(path), ident)
            if key not in _digests:
                _digests[key] = Future()
                jobs.append((Path(path), ident, _digests[key]))
    if not jobs:
        return

    def run() -> None:
        for path, ident, digest in jobs:
            try:
                with open(path, "rb") as f:
                    if _file_identity(os.fstat(f.fileno())) != ident:
                        raise OSError("changed since it was listed")
                    digest.set_result(_sha256_of(f))
            except BaseException as e:  # the load hashes it instead
                digest.set_exception(e)

    threading.Thread(target=run, name="mmsearch-vectors-digest", daemon=True).start()


def _file_digest(f: BinaryIO, path: Path, ident: tuple[int, ...]) -> str:
    """The sha256 of the open file ``f`` (at ``path``, with identity ``ident``): computed ahead by
    :func:`prefetch_digests` if it hashed this very file, else read now."""
    with _digests_lock:
        ahead = _digests.pop((str(path), ident), None)
        for stale in [key for key in _digests if key[0] == str(path)]:  # of the file before a change
            del _digests[stale]
    if ahead is not None and ahead.exception() is None:
        return ahead.result()
    return _sha256_of(f)


def _sha256_of(f: BinaryIO) -> str:
    """The sha256 of the whole file ``f``, read through one buffer (no allocation per block)."""
    f.seek(0)
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while n := f.readinto(buf):  # type: ignore[attr-defined]
        h.update(view[:n])
    return h.hexdigest()


def _open_store(source: Path | BinaryIO, meta: dict[str, Any]) -> _ExactStore:
    """The exact vectors of a compact file (a path, or the open file), mapped from it."""
    rows, dim = int(meta["store_rows"]), int(meta["dim"])
    ids = np.memmap(source, dtype="<i8", mode="r", offset=int(meta["ids_offset"]), shape=(rows,))
    vecs = np.memmap(source, dtype="<f4", mode="r", offset=int(meta["vectors_offset"]), shape=(rows, dim))
    # The ids are small (8 B/vector) and searched on every query: keep them in RAM.
    return _ExactStore(np.array(ids), vecs)


class _HashingWriter:
    """Writes to a file while computing its sha256 and size (no second read of a large file)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._raw.write(data)
        self._hash.update(data)
        self.size += len(data)

    def write_counted(self, data: bytes) -> int:
        self.write(data)
        return len(data)

    def pad_to(self, multiple: int) -> None:
        if self.size % multiple:
            self.write(b"\0" * (multiple - self.size % multiple))

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _bounded_reader(f: BinaryIO, limit: int) -> Callable[[int], bytes]:
    """A read callback for FAISS that cannot read past the FAISS part of the file."""
    remaining = [limit]

    def read(n: int) -> bytes:
        n = min(n, remaining[0])
        data = f.read(n)
        remaining[0] -= len(data)
        return data

    return read


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; some filesystems refuse fsync on a directory, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files left by a writer that was killed (its pid is gone) before its rename."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(tmp.name[len(f".{path.name}.tmp-") :].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid() or pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            log.info("removed stale temp file %s", tmp)
