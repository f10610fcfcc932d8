"""Calibrated confidence of a hit, per index, per model and per (query kind, target kind).

A raw cosine says little on its own: each model, and each modality pair of one model, has its own range
(text → image cosines sit far below image → image ones). So each index measures, for its model, what a
*known match* scores: the cosine between each captioned image and its caption (its sidecar text). A hit's
confidence is how its score compares with those matches, through a normal fit of their scores (median
``m``, spread ``s`` = interquartile range / 1.349, robust to a few bad captions):

    confidence(score) = min(1, 2 * Phi((score - m) / s))

1 for a hit that scores at least like the median known match, 0.5 where a quarter of known matches score
lower, 0.1 where one in twenty does. A query whose top hit is below ``DEFAULT_MIN_CONFIDENCE``
scores lower than almost every real match of this collection: "no good match".

Calibrated pairs: text → image and image → caption (the cosine of a pair is the same both ways; a spoken
query is searched as its transcript, a text query). The other pairs (image → image, text → caption,
text → segment, image → segment), and both pairs in a collection with fewer than ``MIN_PAIRS`` captioned
images, have no known matches to learn from: :meth:`Calibration.confidence` gives None for them and the
cut is off.

Why matches and not answer-less queries: a null distribution (each caption's best image among those
that are not its answer, an answer being an image whose caption says the same) depended on how much the
captions say. On three subsets of the demo world with the same model its median was 0.72 (captions state
every attribute), 0.78 (a random part: images captioned differently still answer each other) and 0.57
(colour and shape only), so no one quantile of it separated present from absent queries in all three,
while the known matches' median stayed within 0.784-0.795 (benchmarks/results/no_match.json).

The fit reads a sample of at most ``SAMPLE_IMAGES`` images (more, up to ``MAX_SAMPLE_IMAGES``, when few
are captioned) with their captions' stored vectors: well under a second at 100k items. It is kept in
catalog meta under ``calibration.<model key>`` with the vector counts it was fit on:
:func:`ensure_calibrated` (the writer, after indexing or a model change) fits again only when the number
of image or caption vectors moved by more than ``REFIT_CHANGE``; :func:`load` (any reader) only reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from mmsearch import db
from mmsearch.store import Store

log = logging.getLogger(__name__)

#: What a query is embedded as (a spoken query is searched as its transcript: 'text').
QUERY_KINDS = ("text", "image")
#: What a hit is.
TARGET_KINDS: tuple[str, ...] = db.VECTOR_KINDS
#: The pairs the caption ↔ image matches calibrate.
PAIRED: tuple[tuple[str, str], ...] = (("text", "image"), ("image", "caption"))
#: A top hit below this confidence means "no good match": it scores like the lowest ~4% of the
#: collection's known matches. Chosen from benchmarks/bench_no_match.py (benchmarks/results/no_match.json).
DEFAULT_MIN_CONFIDENCE = 0.08
#: Catalog meta key prefix: ``calibration.<model key>``.
META_PREFIX = "calibration"
#: Bumped when the method changes: a calibration of another version is fit again.
VERSION = 1
#: Images sampled for the fit, and how many at most when few of them are captioned.
SAMPLE_IMAGES = 4000
MAX_SAMPLE_IMAGES = 20_000
#: Enough caption ↔ image pairs: no further images are sampled.
ENOUGH_PAIRS = 1000
#: Fewest pairs the fit is made from (fewer: the pairs stay uncalibrated).
MIN_PAIRS = 20
#: The vector kinds the fit reads; a count of one moving by more than REFIT_CHANGE makes it stale.
FIT_KINDS = ("image", "caption")
REFIT_CHANGE = 0.10
#: Smallest spread of a fit (identical scores would make every other score 0 or 1).
MIN_SPREAD = 1e-3
_IQR_PER_SIGMA = 1.349  # the interquartile range of a normal distribution, in standard deviations


@dataclass(frozen=True)
class MatchFit:
    """Known matches' scores: ``n`` of them, their ``median`` and ``spread`` (the normal fit), and their
    0th, 5th, ..., 100th percentiles (for reports)."""

    n: int
    median: float
    spread: float
    percentiles: tuple[float, ...]

    @classmethod
    def of(cls, scores: np.ndarray) -> MatchFit:
        q1, median, q3 = np.quantile(scores, [0.25, 0.5, 0.75])
        spread = max(float(q3 - q1) / _IQR_PER_SIGMA, MIN_SPREAD)
        percentiles = tuple(float(x) for x in np.quantile(scores, np.linspace(0.0, 1.0, 21)))
        return cls(int(len(scores)), float(median), spread, percentiles)

    def confidence(self, score: float) -> float:
        if not np.isfinite(score):
            return 0.0
        return min(1.0, 2.0 * NormalDist(self.median, self.spread).cdf(score))

    def score_at(self, confidence: float) -> float:
        """The score whose confidence is ``confidence`` (the median at 1)."""
        if confidence >= 1.0:
            return self.median
        return NormalDist(self.median, self.spread).inv_cdf(max(confidence, 1e-12) / 2.0)


@dataclass(frozen=True)
class Calibration:
    """One model's calibration in one index; ``fit_on``: its vectors per kind when it was fit."""

    model: str
    pairs: Mapping[tuple[str, str], MatchFit]
    fit_on: Mapping[str, int]
    seconds: float = 0.0
    fitted_at: float = field(default_factory=time.time)

    def confidence(self, query_kind: str, target_kind: str, score: float) -> float | None:
        """The confidence in [0, 1] of a hit of ``target_kind`` scoring ``score`` for a ``query_kind``
        query; None when the pair is not calibrated (then do not cut)."""
        fit = self.pairs.get(_check_pair(query_kind, target_kind))
        return None if fit is None else fit.confidence(float(score))

    def score_at(self, query_kind: str, target_kind: str, confidence: float) -> float | None:
        """The raw score at which a hit of the pair reaches ``confidence`` (None: pair not calibrated)."""
        fit = self.pairs.get(_check_pair(query_kind, target_kind))
        return None if fit is None else fit.score_at(confidence)

    def as_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "model": self.model,
            "method": "caption-image matches, normal fit: min(1, 2 Phi((score - median) / spread))",
            "fit_on": dict(self.fit_on),
            "seconds": self.seconds,
            "fitted_at": self.fitted_at,
            "pairs": {
                f"{q}>{t}": {
                    "n": fit.n,
                    "median": fit.median,
                    "spread": fit.spread,
                    "percentiles": fit.percentiles,
                }
                for (q, t), fit in self.pairs.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        pairs = {}
        for name, fit in data["pairs"].items():
            q, t = name.split(">", 1)
            pairs[(q, t)] = MatchFit(
                int(fit["n"]),
                float(fit["median"]),
                float(fit["spread"]),
                tuple(map(float, fit["percentiles"])),
            )
        return cls(
            model=str(data["model"]),
            pairs=pairs,
            fit_on={k: int(v) for k, v in data["fit_on"].items()},
            seconds=float(data.get("seconds", 0.0)),
            fitted_at=float(data.get("fitted_at", 0.0)),
        )


def meta_key(model: str) -> str:
    return f"{META_PREFIX}.{model}"


def load(store: Store, model: str) -> Calibration | None:
    """The stored calibration of ``model`` (None if never fit, or fit by another version); never writes."""
    data = store.catalog.get_meta(meta_key(model))
    if not data or data.get("version") != VERSION:
        return None
    return Calibration.from_json(data)


def ensure_calibrated(store: Store, model: str) -> Calibration:
    """The calibration of ``model``, fit and stored first when there is none, it is of another version, or
    the number of image or caption vectors moved by more than ``REFIT_CHANGE`` since. For the writer (it
    writes catalog meta); any model the index holds vectors of, active or not."""
    stored = load(store, model)
    if stored is not None and not is_stale(stored, vector_counts(store, model)):
        return stored
    calibration = fit(store, model)
    store.catalog.set_meta(meta_key(model), calibration.as_json())
    return calibration


def forget(store: Store, model: str) -> None:
    """Drop the calibration of a model the index no longer holds."""
    store.catalog.delete_meta(meta_key(model))


def vector_counts(store: Store, model: str) -> dict[str, int]:
    """How many vectors of each kind ``model`` has in the index."""
    if store.catalog.has_models:
        counts = store.catalog.coverage().get(model, {})
        return {kind: int(counts.get(kind, 0)) for kind in TARGET_KINDS}
    return {kind: store.vectors(kind, model).ntotal for kind in TARGET_KINDS}


def is_stale(calibration: Calibration, counts: Mapping[str, int]) -> bool:
    """Whether ``calibration`` no longer describes a collection with these vector counts."""
    for kind in FIT_KINDS:
        old, new = calibration.fit_on.get(kind, 0), counts.get(kind, 0)
        if (old == 0) != (new == 0) or abs(new - old) > REFIT_CHANGE * old:
            return True
    return False


def fit(store: Store, model: str, *, seed: int = 0) -> Calibration:
    """Fit ``model``'s calibration from the index's captioned images (see the module docstring); stores
    nothing."""
    started = time.perf_counter()
    counts = vector_counts(store, model)
    scores = matched_scores(store, model, np.random.default_rng(seed)) if counts["caption"] else np.empty(0)
    pairs: dict[tuple[str, str], MatchFit] = {}
    if len(scores) >= MIN_PAIRS:
        match = MatchFit.of(scores)
        pairs = {pair: match for pair in PAIRED}
    seconds = time.perf_counter() - started
    log.info("calibrated model %s from %d caption-image pairs in %.2f s", model, len(scores), seconds)
    return Calibration(model, pairs, counts, seconds=seconds)


def matched_scores(store: Store, model: str, rng: np.random.Generator) -> np.ndarray:
    """The cosine of each sampled image with each distinct caption of its (first live) file."""
    ids = store.vectors("image", model).ids()
    rng.shuffle(ids)
    dim = store.dim_of(model)
    scores: list[float] = []
    start, size = 0, SAMPLE_IMAGES
    while start < min(len(ids), MAX_SAMPLE_IMAGES) and len(scores) < ENOUGH_PAIRS:
        batch = np.sort(ids[start : start + size]).tolist()
        start, size = start + size, MAX_SAMPLE_IMAGES - SAMPLE_IMAGES
        rows = db.resolve_items(store.catalog, batch, ("image",))
        captions = store.catalog.captions_of(sorted({row.file_id for row in rows.values()}))
        texts = {i: sorted({txt for _, _, txt in captions.get(row.file_id, [])}) for i, row in rows.items()}
        texts = {i: ts for i, ts in texts.items() if ts}
        if not texts:
            continue
        images = store.catalog.vectors_for(sorted(texts))
        said = store.catalog.caption_vectors([t for ts in texts.values() for t in ts], dim, model)
        scores += [
            float(np.dot(images[i], said[t]))
            for i, ts in texts.items()
            if i in images
            for t in ts
            if t in said
        ]
    return np.asarray(scores, np.float64)


def _check_pair(query_kind: str, target_kind: str) -> tuple[str, str]:
    if query_kind not in QUERY_KINDS:
        raise ValueError(f"unknown query kind {query_kind!r} (one of {', '.join(QUERY_KINDS)})")
    if target_kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {target_kind!r} (one of {', '.join(TARGET_KINDS)})")
    return query_kind, target_kind
