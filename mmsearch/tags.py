"""Zero-shot tags: which of a set of labels each indexed image shows, by CLIP zero-shot classification.

Each label becomes a few prompts (:data:`TEMPLATES`, from the prompt templates of the CLIP paper, plus the
label as it is), embedded by the index's own text tower; their vectors are averaged and normalised (the
paper's prompt ensembling). An image's cosine with that vector is its *score* for the label.

A raw cosine is no threshold (each model has its own range), and the caption ↔ image calibration of
:mod:`mmsearch.calibrate` does not transfer: a one-word label scores well below a caption that describes
the whole image (on the demo model the matches' median is 0.79 for captions, 0.58 for colour and shape
labels: every label's calibrated confidence was 0). So the labels get a calibration of their own, made the
same way: the *known matches* of a label prompt are the captioned images whose caption names the label (as
a word, or its plural); the scores of those pairs, pooled over the labels, are fit like calibrate.py's
(median, spread from the interquartile range) and give

    calibrated(score) = min(1, 2 Phi((score - median) / spread)).

A label's score is also compared with the image's scores for the other labels, as zero-shot
classification does: a softmax over the labels, at the temperature ``1 / spread`` (a score one spread
above another is e times as likely; CLIP's own logit scale belongs to its training, e.g. 100 for OpenAI's
models, 16.8 for the demo model). A label scoring at least like the average share (``1 / number of
labels``) keeps its calibrated value; one below is scaled down in proportion:

    confidence = calibrated(score) * min(1, softmax share * number of labels).

Several labels can pass for one image (a red star is "red" and "star"): this is not a one-of-n choice.
The default threshold :data:`DEFAULT_MIN_CONFIDENCE` comes from benchmarks/bench_tags.py
(benchmarks/results/tags.json). When fewer than :data:`MIN_KNOWN_MATCHES` captioned images name one of
the labels, the caption ↔ image calibration is used instead (stricter: labels score below captions) and
the report says so; with neither, nothing is tagged.

The scoring is pure (arrays in, arrays out); :func:`run` applies it to an index, its SQL in
:mod:`mmsearch.catalog_tags`. New content is tagged by the next writer run (:func:`refresh`, called after
indexing and model changes): the labels last used are kept in catalog meta.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsearch.calibrate import MatchFit
from mmsearch.errors import BadQueryError

if TYPE_CHECKING:
    from mmsearch.ingest import Progress
    from mmsearch.store import Store

#: Prompts per label: the label as it is, and three templates of the CLIP paper's ImageNet ensemble.
#: Measured on the demo world: one to five prompts made the same ranking (mean AP 0.946-0.947).
TEMPLATES: tuple[str, ...] = ("{}", "a photo of a {}.", "a picture of a {}.", "an image of a {}.")
#: Only the label itself (``mmsearch tag --raw``): for labels that already are a description.
RAW_TEMPLATES: tuple[str, ...] = ("{}",)
#: Tags below this confidence are not stored. Chosen by benchmarks/bench_tags.py: the best F1 over the demo
#: world's colour and shape labels on images the calibration did not see (benchmarks/results/tags.json).
DEFAULT_MIN_CONFIDENCE = 0.1
#: Fewest known matches (captioned images naming a label) the label calibration is fit from.
MIN_KNOWN_MATCHES = 20
#: Limits of a label list.
MAX_LABELS = 1000
MAX_LABEL_CHARS = 200
MAX_LABELS_FILE_BYTES = 1 << 20
#: Catalog meta key: the labels last tagged with (re-applied to new content, see Index.tag).
META_KEY = "tags.zero_shot"


@dataclass
class TagReport:
    """What :meth:`mmsearch.Index.tag` did."""

    labels: list[str]
    images: int = 0
    #: Tags stored, per label (labels with none included).
    tagged: dict[str, int] = field(default_factory=dict)
    removed: int = 0
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    #: "labels" (known matches of the labels), "captions" (caption ↔ image matches) or None (nothing).
    calibration: str | None = None
    known_matches: int = 0
    #: Why nothing could be tagged, when that is so.
    reason: str | None = None
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.tagged.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "images": self.images,
            "tagged": self.tagged,
            "total": self.total,
            "removed": self.removed,
            "min_confidence": self.min_confidence,
            "calibration": self.calibration,
            "known_matches": self.known_matches,
            "reason": self.reason,
            "seconds": round(self.seconds, 3),
        }


# --- labels ---------------------------------------------------------------------------------------------
def clean_labels(labels: Iterable[str]) -> list[str]:
    """The labels stripped, blank ones dropped, duplicates (case-insensitive) dropped in first-seen order;
    :class:`BadQueryError` when none is left or one is too long, or there are too many."""
    out: dict[str, str] = {}
    for label in labels:
        label = " ".join(label.split())
        if not label:
            continue
        if len(label) > MAX_LABEL_CHARS:
            raise BadQueryError(f"label {label[:40]!r}... is longer than {MAX_LABEL_CHARS} characters")
        out.setdefault(label.casefold(), label)
    if not out:
        raise BadQueryError("no labels given")
    if len(out) > MAX_LABELS:
        raise BadQueryError(f"{len(out)} labels given; at most {MAX_LABELS}")
    return list(out.values())


def parse_labels(text: str) -> list[str]:
    """Labels of a labels file: one a line, ``#`` starts a comment, blank lines ignored."""
    return clean_labels(line.split("#", 1)[0] for line in text.splitlines())


def read_labels_file(path: Path) -> list[str]:
    """The labels of the file at ``path``; :class:`BadQueryError` saying why it cannot be used."""
    try:
        if not path.is_file():
            raise BadQueryError(f"labels file not found: {path}")
        if path.stat().st_size > MAX_LABELS_FILE_BYTES:
            raise BadQueryError(f"labels file {path} is larger than {MAX_LABELS_FILE_BYTES // 1024} KiB")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise BadQueryError(f"labels file {path} is not UTF-8 text") from None
    except OSError as e:
        raise BadQueryError(f"cannot read labels file {path}: {e.strerror or e}") from None
    try:
        return parse_labels(text)
    except BadQueryError as e:
        raise BadQueryError(f"labels file {path}: {e}") from None


# --- scoring --------------------------------------------------------------------------------------------
def prompts(label: str, templates: Sequence[str] = TEMPLATES) -> list[str]:
    return [t.format(label) for t in templates]


def label_vectors(
    embed_texts: Callable[[Sequence[str]], np.ndarray],
    labels: Sequence[str],
    templates: Sequence[str] = TEMPLATES,
) -> np.ndarray:
    """One unit vector per label: the mean of its prompts' vectors, normalised (one text-tower pass)."""
    texts = [p for label in labels for p in prompts(label, templates)]
    vectors = np.asarray(embed_texts(texts), np.float32).reshape(len(labels), len(templates), -1).mean(1)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def names(label: str, caption: str) -> bool:
    """Whether ``caption`` names ``label`` (as whole words, case-insensitive, the last one maybe plural)."""
    pattern = r"\b" + re.escape(label.casefold()) + r"(?:s|es)?\b"
    return re.search(pattern, caption.casefold()) is not None


def known_match_scores(
    scores: np.ndarray, labels: Sequence[str], captions: Sequence[Sequence[str]]
) -> np.ndarray:
    """The scores of the (image, label) pairs whose image has a caption naming the label; ``scores`` is
    images x labels, ``captions`` the caption texts of each image (empty: not captioned)."""
    out = [
        float(scores[i, j])
        for i, texts in enumerate(captions)
        if texts
        for j, label in enumerate(labels)
        if any(names(label, t) for t in texts)
    ]
    return np.asarray(out, np.float64)


def fit_labels(known: np.ndarray) -> MatchFit | None:
    """The label calibration from known matches' scores; None when there are too few."""
    return MatchFit.of(known) if len(known) >= MIN_KNOWN_MATCHES else None


def confidences(scores: np.ndarray, fit: MatchFit) -> np.ndarray:
    """images x labels confidences in [0, 1] (see the module docstring)."""
    z = (scores.astype(np.float64) - fit.median) / (fit.spread * math.sqrt(2.0))
    calibrated = np.minimum(1.0, 1.0 + _erf(z))  # 2 Phi(x) = 1 + erf(x / sqrt 2)
    return calibrated * share_factor(scores, 1.0 / fit.spread)


def share_factor(scores: np.ndarray, temperature: float) -> np.ndarray:
    """min(1, softmax share x number of labels), per image over its labels' scores."""
    z = temperature * scores.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    share = e / e.sum(axis=1, keepdims=True)
    return np.minimum(1.0, share * scores.shape[1])


_erf = np.vectorize(math.erf, otypes=[np.float64])


def passing(
    conf: np.ndarray, media_ids: Sequence[int], labels: Sequence[str], min_confidence: float
) -> list[tuple[int, str, float]]:
    """(media id, label, confidence) of every pair at or above ``min_confidence``."""
    rows, cols = np.nonzero(conf >= min_confidence)
    return [
        (int(media_ids[int(i)]), labels[int(j)], round(float(conf[i, j]), 4))
        for i, j in zip(rows, cols, strict=True)
    ]


def check_min_confidence(value: float | None) -> float:
    if value is None:
        return DEFAULT_MIN_CONFIDENCE
    if not 0.0 <= value <= 1.0:
        raise BadQueryError(f"min confidence {value} is not between 0 and 1")
    return float(value)


def describe_meta(
    labels: Sequence[str], templates: Sequence[str], min_confidence: float
) -> Mapping[str, Any]:
    return {"labels": list(labels), "templates": list(templates), "min_confidence": min_confidence}


# --- running on an index --------------------------------------------------------------------------------
def run(
    store: Store,
    model: str,
    embed_texts: Callable[[Sequence[str]], np.ndarray],
    labels: Sequence[str],
    *,
    templates: Sequence[str] = TEMPLATES,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    progress: Progress | None = None,
) -> TagReport:
    """Tag every image content of the index with ``labels`` using ``model``'s stored image vectors
    (``embed_texts``: that model's text tower), replacing the zero-shot tags of these labels, and record
    the labels in catalog meta (:data:`META_KEY`) so that :func:`refresh` re-applies them. The caller
    holds the write lock."""
    from mmsearch import calibrate, catalog_tags  # noqa: PLC0415 - the catalog side, only when run

    started = time.perf_counter()
    report = TagReport(labels=list(labels), min_confidence=min_confidence)
    generation = store.catalog.generation("image", model)
    ids, vectors = store.catalog.load_vectors("image", store.dim_of(model), model)
    with store.catalog.read() as conn:
        live = catalog_tags.image_media(conn, ids.tolist())
    keep = np.fromiter((int(i) in live for i in ids), bool, len(ids))
    ids, vectors = ids[keep], vectors[keep]
    media_ids = [live[int(i)][0] for i in ids]
    report.images = len(media_ids)
    if progress:
        progress("tag", 0, report.images)
    rows: list[tuple[int, str, float]] = []
    if report.images:
        scores = vectors @ label_vectors(embed_texts, labels, templates).T
        captions = store.catalog.captions_of(sorted({live[int(i)][1] for i in ids}))
        texts = [[t for _, _, t in captions.get(live[int(i)][1], [])] for i in ids]
        known = known_match_scores(scores, labels, texts)
        report.known_matches = len(known)
        fit = fit_labels(known)
        report.calibration = "labels" if fit is not None else None
        if fit is None:
            calibration = calibrate.load(store, model)
            fit = calibration.pairs.get(("text", "image")) if calibration else None
            report.calibration = "captions" if fit is not None else None
        if fit is None:
            report.reason = (
                f"no calibration: fewer than {MIN_KNOWN_MATCHES} captioned images name a label, and fewer than "
                f"{calibrate.MIN_PAIRS} images have a caption"
            )
        else:
            rows = passing(confidences(scores, fit), media_ids, labels, min_confidence)
    with store.write() as tx:
        report.removed = catalog_tags.replace_zero_shot(tx.conn, labels, rows)
    report.tagged = {label: 0 for label in labels} | dict(Counter(label for _, label, _ in rows))
    meta = describe_meta(labels, templates, min_confidence)
    store.catalog.set_meta(META_KEY, {**meta, "model": model, "generation": generation})
    if progress:
        progress("tag", report.images, report.images)
    report.seconds = time.perf_counter() - started
    return report


def refresh(
    store: Store, model: str, embed_texts: Callable[[], Callable[[Sequence[str]], np.ndarray]]
) -> TagReport | None:
    """Tag again with the labels last used (:data:`META_KEY`) when the image vectors changed since
    (content added or removed, another model active); None when there is nothing to do. ``embed_texts``
    gives the text tower, loaded only then."""
    recorded = store.catalog.get_meta(META_KEY)
    if not recorded or not recorded.get("labels"):
        return None
    if recorded.get("model") == model and recorded.get("generation") == store.catalog.generation(
        "image", model
    ):
        return None
    return run(
        store,
        model,
        embed_texts(),
        recorded["labels"],
        templates=tuple(recorded.get("templates") or TEMPLATES),
        min_confidence=float(recorded.get("min_confidence", DEFAULT_MIN_CONFIDENCE)),
    )


def clear(store: Store) -> int:
    """Delete every zero-shot tag and forget the labels; returns how many tags went."""
    from mmsearch import catalog_tags  # noqa: PLC0415

    with store.write() as tx:
        removed = catalog_tags.clear_zero_shot(tx.conn)
    store.catalog.delete_meta(META_KEY)
    return removed
