"""The Python API, shared by the CLI and the server: create or open an index, add folders, search.

>>> import mmsearch
>>> idx = mmsearch.Index.create("indexes/photos", model="demo")
>>> idx.add_folder("~/Pictures", progress=lambda stage, done, total: None)
>>> idx.search_text("a red circle", target="images", k=5)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsearch import calibrate, constants, db, tags, vocabulary
from mmsearch.errors import (
    ActiveModelChanged,
    BadMediaError,
    BadQueryError,
    ConfigError,
    MmsearchError,
    ModelMismatchError,
)
from mmsearch.filters import FILTER_FIELDS, Filters
from mmsearch.identity import ModelSpec, describe_identity, model_key, registered, same_model
from mmsearch.query import (
    DEFAULT_COMBINE,
    DEFAULT_FUSION,
    DEFAULT_MODE,
    Plan,
    Query,
    SearchResult,
    execute,
    plan,
)
from mmsearch.search import Hit, search_vector
from mmsearch.store import Store

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from PIL import Image
    from typing_extensions import TypeIs

    from mmsearch.ingest import IngestReport, Progress
    from mmsearch.model import Embedder
    from mmsearch.ray_ingest import RayOptions, RayWork
    from mmsearch.reembed import ReembedReport
    from mmsearch.retranscribe import RetranscribeReport

log = logging.getLogger(__name__)

IMAGE_TOWERS = ("onnx-int8", "onnx-fp32", "torch")
DEFAULT_SPEECH = {"backend": "faster-whisper", "model": None, "language": None}
# Devices a model can be put on: torch's names (pick_device) that faster-whisper also understands or
# maps to the CPU (WhisperModel).
_DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# The language codes both Whisper backends accept (whisper.tokenizer.LANGUAGES, faster-whisper's
# tokenizer): kept here so that checking a setting does not import either backend or torch.
# fmt: off
WHISPER_LANGUAGES = frozenset((
    "af", "am", "ar", "as", "az", "ba", "be", "bg", "bn", "bo", "br", "bs", "ca", "cs", "cy", "da", "de",
    "el", "en", "es", "et", "eu", "fa", "fi", "fo", "fr", "gl", "gu", "ha", "haw", "he", "hi", "hr", "ht",
    "hu", "hy", "id", "is", "it", "ja", "jw", "ka", "kk", "km", "kn", "ko", "la", "lb", "ln", "lo", "lt",
    "lv", "mg", "mi", "mk", "ml", "mn", "mr", "ms", "mt", "my", "ne", "nl", "nn", "no", "oc", "pa", "pl",
    "ps", "pt", "ro", "ru", "sa", "sd", "si", "sk", "sl", "sn", "so", "sq", "sr", "su", "sv", "sw", "ta",
    "te", "tg", "th", "tk", "tl", "tr", "tt", "uk", "ur", "uz", "vi", "yi", "yo", "zh", "yue",
))
# fmt: on
# open_or_create's keyword -> the speech setting it names in the index's configuration.
_SPEECH_OPTIONS = {"speech_backend": "backend", "speech_model": "model", "language": "language"}


# How many times a query is embedded again when the active model changed meanwhile (see _search_embedded).
SWITCH_RETRIES = 3


def default_index_path() -> Path:
    return constants.default_index_path()


class Index:
    """An index folder plus the models it needs, loaded lazily: opening and stats load no model."""

    def __init__(self, store: Store, *, device: str = "auto", image_tower: str | None = None) -> None:
        self.store = store
        self.device = check_device(device)
        # How indexing embeds images on the CPU: "onnx-int8" (default, fastest), "onnx-fp32" or "torch".
        self.image_tower = check_image_tower(image_tower)
        #: Loaded embedders by model key: the active model's, and a target's while re-embedding.
        self._embedders: dict[str, Embedder] = {}
        self._transcriber: Any = None
        self._query_transcriber: Any = None

    # --- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        model: str = "ViT-B-32",
        pretrained: str | None = None,
        checkpoint: str | None = None,
        speech_backend: str = "faster-whisper",
        speech_model: str | None = None,
        language: str | None = None,
        device: str = "auto",
        image_tower: str | None = None,
    ) -> Index:
        """Create an empty index, recording the model's identity and dimension: from its ONNX export when
        cached (no torch), else by loading it.

        Every setting is checked first (:class:`ConfigError`), before any model is loaded."""
        from mmsearch.model import load_embedder

        speech = check_speech_settings(speech_backend, speech_model, language)
        check_device(device)
        check_image_tower(image_tower)
        embedder = load_embedder(
            ModelSpec(model, pretrained, checkpoint),
            device=device,
            image_tower=check_image_tower(image_tower),
        )
        store = Store.create(Path(path), {"model": embedder.identity, "speech": speech})
        index = cls(store, device=device, image_tower=image_tower)
        index._embedders[store.model] = embedder
        return index

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        model: str | None = None,
        pretrained: str | None = None,
        checkpoint: str | None = None,
        device: str = "auto",
        image_tower: str | None = None,
        ray: str | None = None,
        shards: int | None = None,
    ) -> Index:
        """Open an index. If a model is named, it must be the one the index was built with.

        ``ray``: search vectors split into ``shards`` (default: one per node) held by actors of a Ray cluster
        (:mod:`mmsearch.shards`): ``"local"`` starts one here, ``"auto"`` joins this machine's, or an address.
        The catalog stays here; while this index writes (``add_folder``), it searches in-process indexes."""
        store = Store.open(Path(path))
        try:
            if model is not None or checkpoint is not None:
                spec = ModelSpec(model or store.config["model"]["name"], pretrained, checkpoint)
                _check_same_model(store.config["model"], spec)
            if ray is not None:
                from mmsearch.shards import ShardSet

                store.use_shards(ShardSet.connect(ray, shards))
            elif shards is not None:
                raise ConfigError("sharded search needs a Ray cluster, and none was named")
        except BaseException:
            store.close()
            raise
        return cls(store, device=device, image_tower=image_tower)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self.store.folder

    @property
    def model_identity(self) -> dict[str, Any]:
        return dict(self.store.config["model"])

    # --- models -------------------------------------------------------------------------------
    @property
    def _embedder(self) -> Embedder | None:
        """The active model's embedder if loaded."""
        return self._embedders.get(self.store.model)

    @property
    def embedder(self) -> Embedder:
        """The active model's embedder (it follows an activation by another process)."""
        return self.embedder_for(self.store.follow_active())

    def embedder_for(self, key: str) -> Embedder:
        """The embedder of a model registered in the index (loaded once; others but the active one and
        this one are let go)."""
        if key not in self._embedders:
            from mmsearch.model import load_recorded

            embedder = load_recorded(self.store.identity_of(key), self.device, self.image_tower)
            keep = {key, self.store.model}
            self._embedders = {k: e for k, e in self._embedders.items() if k in keep}
            self._embedders[key] = embedder
        return self._embedders[key]

    @property
    def transcriber(self) -> Any:
        """The index's speech model, tuned for transcribing whole files."""
        if self._transcriber is None:
            self._transcriber = self._load_transcriber(short_clips=False)
            speech = self._speech_settings()
            if "resolved" not in speech:
                self.store.update_config(speech={**speech, "resolved": self._transcriber.identity})
        return self._transcriber

    @property
    def query_transcriber(self) -> Any:
        """The same speech model for spoken queries: the one loaded for indexing if there is one, else one
        tuned for a few seconds of speech (see ``load_transcriber(short_clips=True)``)."""
        if self._transcriber is not None:
            return self._transcriber
        if self._query_transcriber is None:
            self._query_transcriber = self._load_transcriber(short_clips=True)
        return self._query_transcriber

    def _speech_settings(self) -> dict[str, Any]:
        return {**DEFAULT_SPEECH, **self.store.config.get("speech", {})}

    def _load_transcriber(self, *, short_clips: bool) -> Any:
        from mmsearch.transcribe import load_transcriber

        speech = self._speech_settings()
        return load_transcriber(
            speech["backend"],
            speech["model"],
            language=speech["language"],
            device=self.device,
            short_clips=short_clips,
        )

    # --- indexing -----------------------------------------------------------------------------
    def add_folder(
        self,
        folder: str | Path,
        *,
        progress: Progress | None = None,
        workers: int = 2,
        follow_links: bool = False,
        prune: bool = False,
        exclude: Iterable[str] = (),
        include_hidden: bool = False,
        ray: str | RayOptions | None = None,
    ) -> IngestReport:
        """Index ``folder`` incrementally (only new or changed content does model work).

        ``follow_links``: also index what links pointing outside ``folder`` lead to (not followed by
        default: see :mod:`mmsearch.scan`). ``prune``: forget the files of sub-folders (or of ``folder``
        itself) that cannot be seen now, e.g. an unplugged drive; by default they are kept and reported in
        ``IngestReport.unavailable``. ``exclude``: patterns (gitignore rules, relative to ``folder``) of
        what to leave out, besides the ``.mmsearchignore`` files; ``include_hidden``: also index hidden
        entries. What is left out is listed in ``IngestReport.excluded``, and what the index held there is
        forgotten (see :mod:`mmsearch.scan`).

        ``ray``: embed and transcribe new images and audio on a Ray cluster (see :mod:`mmsearch.ray_ingest`):
        ``"local"`` starts one on this machine, ``"auto"`` joins the running one, else its address, or
        :class:`~mmsearch.ray_ingest.RayOptions`. This process still plans, hashes and writes the index;
        every node must see ``folder`` at the same path."""
        from mmsearch.ingest import ingest
        from mmsearch.reembed import fill

        self.store.lock_for_writing()
        try:
            self.store.follow_active()
            remote = self._ray_work(ray) if ray is not None else None
            report = ingest(
                self.store,
                Path(folder).expanduser(),
                embedder=self._indexing_embedder,
                transcriber=lambda: self.transcriber,
                progress=progress,
                workers=workers,
                follow_links=follow_links,
                prune=prune,
                exclude=exclude,
                include_hidden=include_hidden,
                remote=remote,
            )
            speech = self._speech_settings()
            if remote is not None and remote.speech_identity is not None and "resolved" not in speech:
                self.store.update_config(speech={**speech, "resolved": remote.speech_identity})
            target = self.store.catalog.target_model()
            if target is not None:  # a model being embedded (see reembed): new content gets its vectors too
                done = fill(
                    self.store,
                    target,
                    lambda: self._indexing_embedder(target),
                    progress=progress,
                    workers=workers,
                )
                report.target_embedded = done.embedded
                report.skipped.extend(done.skipped)
            self._after_change()
            return report
        finally:
            self.store.unlock()

    def _ray_work(self, ray: str | RayOptions) -> RayWork:
        """The Ray side of an ``index`` run: the model's plain settings (its ONNX export is made here first
        when the model has none yet) and the cluster to run on."""
        from mmsearch import ingest as ingest_module
        from mmsearch.ray_ingest import RayOptions, RayWork, model_settings

        options = ray if isinstance(ray, RayOptions) else RayOptions(address=ray)
        identity = self.store.identity_of(self.store.model)
        try:
            settings = model_settings(identity, self.image_tower)
        except ConfigError:
            self._indexing_embedder()  # exports the model's towers and preprocessing, once
            settings = model_settings(identity, self.image_tower)
        return RayWork(
            options,
            settings,
            self._speech_settings(),
            decode_budget=ingest_module.IMAGE_DECODE_BUDGET_SECONDS,
        )

    def _after_change(self) -> None:
        """What a writer refreshes once the collection changed: the active model's score calibration (refit
        only when the collection changed enough, see :mod:`mmsearch.calibrate`) and the vocabulary spoken
        queries are decoded with (recomputed when captions or transcripts changed)."""
        calibrate.ensure_calibrated(self.store, self.store.follow_active())
        vocabulary.refresh(self.store)
        # Zero-shot tags: the labels last tagged with, applied again when the image vectors changed.
        model = self.store.model
        tags.refresh(self.store, model, lambda: self.embedder_for(model).embed_texts)

    def _indexing_embedder(self, key: str | None = None) -> Embedder:
        """The embedder of ``key`` (default: the active model), prepared for indexing (see
        :func:`mmsearch.model.prepare_for_indexing`)."""
        from mmsearch.model import prepare_for_indexing

        return prepare_for_indexing(self.embedder_for(key or self.store.model), self.image_tower)

    # --- model upgrades -----------------------------------------------------------------------
    def reembed(
        self,
        spec: ModelSpec,
        *,
        progress: Progress | None = None,
        keep_old: bool = False,
        workers: int = 2,
    ) -> ReembedReport:
        """Embed every image, caption and segment with the model ``spec`` names, then make it the active one.

        Resumable: the model is registered as the *target*, and its vectors are committed in batches, so
        running this again after an interruption embeds only what it lacks. Meanwhile searches answer from
        the active model; the switch is one transaction. ``keep_old``: keep the previous model's vectors,
        for :meth:`activate` (a rollback); otherwise they are deleted after the switch."""
        from mmsearch.model import load_embedder
        from mmsearch.reembed import activate, fill, start_target

        self.store.lock_for_writing()
        try:
            self.store.follow_active()
            key = model_key(spec.expected_identity())
            if key not in self._embedders:
                embedder = load_embedder(spec, device=self.device, image_tower=self.image_tower)
                key = model_key(embedder.identity)
                self._embedders[key] = embedder
            identity = registered(self._embedders[key].identity)
            started = start_target(self.store, key, identity)
            report = fill(
                self.store, key, lambda: self._indexing_embedder(key), progress=progress, workers=workers
            )
            report.started = started
            report.activated, report.removed_model = activate(self.store, key, keep_old=keep_old)
            if report.removed_model:
                calibrate.forget(self.store, report.removed_model)
            self._after_change()
            return report
        finally:
            self.store.unlock()

    def retranscribe(
        self,
        speech_model: str | None,
        *,
        speech_backend: str | None = None,
        language: str | None = None,
        progress: Progress | None = None,
    ) -> RetranscribeReport:
        """Transcribe every recording again with other speech settings (those not named stay the index's),
        swapping each recording's transcript and segment vectors in one transaction; resumable like
        :meth:`reembed`. The index's speech settings become the new ones once every recording is done."""
        from mmsearch.retranscribe import retranscribe
        from mmsearch.transcribe import load_transcriber

        current = self._speech_settings()
        settings = check_speech_settings(
            speech_backend or current["backend"], speech_model, language if language else current["language"]
        )
        loaded: list[Any] = []

        def transcriber() -> Any:
            if not loaded:
                loaded.append(
                    load_transcriber(
                        settings["backend"],
                        settings["model"],
                        language=settings["language"],
                        device=self.device,
                    )
                )
            return loaded[0]

        self.store.lock_for_writing()
        try:
            self.store.follow_active()
            models = [self.store.model, *filter(None, [self.store.catalog.target_model()])]
            embedders = {key: functools.partial(self.embedder_for, key) for key in models}
            report = retranscribe(self.store, settings, transcriber, embedders, progress=progress)
            if report.switched:
                self._transcriber = loaded[0] if loaded else None
                self._query_transcriber = None
            vocabulary.refresh(self.store)
            return report
        finally:
            self.store.unlock()

    def activate(self, spec: ModelSpec) -> str:
        """Make a model the index holds every vector of (kept by ``reembed(keep_old=True)``) the active
        one: instant, no model is loaded. Returns its key."""
        from mmsearch.reembed import activate

        key = model_key(spec.expected_identity())
        self.store.lock_for_writing()
        try:
            self.store.follow_active()
            if key not in self.store.catalog.models():
                raise ConfigError(
                    f"the index holds no vectors of {describe_identity(spec.expected_identity())}: "
                    "embed them first with reembed"
                )
            if not activate(self.store, key, keep_old=True)[0]:
                raise MmsearchError(
                    f"the index does not hold every vector of {describe_identity(spec.expected_identity())}: "
                    "run reembed with it to complete them"
                )
            self._after_change()
            return key
        finally:
            self.store.unlock()

    # --- zero-shot tags (see mmsearch.tags) ----------------------------------------------------
    def tag(
        self,
        labels: Sequence[str],
        *,
        min_confidence: float | None = None,
        raw: bool = False,
        progress: Progress | None = None,
    ) -> tags.TagReport:
        """Tag every image with those of ``labels`` it shows (CLIP zero-shot classification, calibrated
        confidence at least ``min_confidence``, default :data:`mmsearch.tags.DEFAULT_MIN_CONFIDENCE`),
        replacing earlier zero-shot tags of these labels; content indexed later is tagged with them too.
        ``raw``: embed each label as it is, without the prompt templates."""
        wanted = tags.clean_labels(labels)
        threshold = tags.check_min_confidence(min_confidence)
        self.store.lock_for_writing()
        try:
            model = self.store.follow_active()
            return tags.run(
                self.store,
                model,
                self.embedder_for(model).embed_texts,
                wanted,
                templates=tags.RAW_TEMPLATES if raw else tags.TEMPLATES,
                min_confidence=threshold,
                progress=progress,
            )
        finally:
            self.store.unlock()

    def clear_tags(self) -> int:
        """Delete every zero-shot tag (keywords read from files stay); returns how many went."""
        self.store.lock_for_writing()
        try:
            return tags.clear(self.store)
        finally:
            self.store.unlock()

    # --- search -------------------------------------------------------------------------------
    def search_vector(
        self, vector: np.ndarray, *, target: str = "images", k: int = 10, model: str | None = None
    ) -> list[Hit]:
        """Search with a vector of the active model (``model``: the key of the model that made it, checked
        against the active one, see :func:`search_vector`)."""
        return search_vector(self.store, vector, target, k, model=model)

    def _search_embedded(self, embed: Callable[[Embedder], np.ndarray], target: str, k: int) -> list[Hit]:
        """Embed a query with the active model and search that model's vectors: if another model becomes
        active in between, the query is embedded again by the new one (never searched across models)."""
        for _ in range(SWITCH_RETRIES):
            model = self.store.follow_active()
            vector = embed(self.embedder_for(model))
            try:
                return search_vector(self.store, vector, target, k, model=model)
            except ActiveModelChanged:
                continue
        raise MmsearchError("the index's active model keeps changing: try again")

    def search(
        self,
        text: str | None = None,
        *,
        image: str | Path | Image.Image | None = None,
        audio: str | Path | None = None,
        add: Sequence[str] = (),
        subtract: Sequence[str] = (),
        weights: Mapping[str, float] | None = None,
        mode: str = DEFAULT_MODE,
        fusion: str = DEFAULT_FUSION,
        combine: str = DEFAULT_COMBINE,
        target: str | None = None,
        k: int = 10,
        filters: Filters | None = None,
        path: Sequence[str] = (),
        ext: Sequence[str] = (),
        kind: Sequence[str] = (),
        after: str | float | None = None,
        before: str | float | None = None,
        min_duration: float | None = None,
        max_duration: float | None = None,
        tag: Sequence[str] = (),
        taken_after: str | float | None = None,
        taken_before: str | float | None = None,
        near: str | None = None,
        min_confidence: float | None = None,
        min_score: float | None = None,
    ) -> SearchResult:
        """The query layer (:mod:`mmsearch.query`): words and meaning together (``mode`` hybrid | vector |
        words), filters (a :class:`Filters` or the keywords ``path`` … ``near``), several inputs with
        ``add``/``subtract`` terms and ``weights`` per role (text, image, audio, add, subtract), and cut-offs
        (``min_confidence``, calibrated, default :data:`mmsearch.calibrate.DEFAULT_MIN_CONFIDENCE`;
        ``min_score``, raw cosine). ``result.no_match`` says nothing passed them.

        A spoken query (``audio``) is heard as several hypotheses, biased towards the index's own words;
        the next one is searched when the first finds no good match.
        """
        query = self.make_query(
            text,
            image=image,
            add=add,
            subtract=subtract,
            weights=weights,
            mode=mode,
            fusion=fusion,
            combine=combine,
            target=target,
            k=k,
            filters=filters,
            path=path,
            ext=ext,
            kind=kind,
            after=after,
            before=before,
            min_duration=min_duration,
            max_duration=max_duration,
            tag=tag,
            taken_after=taken_after,
            taken_before=taken_before,
            near=near,
            min_confidence=min_confidence,
            min_score=min_score,
        )
        return self.answer(query, self.hear_query(audio) if audio is not None else None)

    def make_query(
        self,
        text: str | None = None,
        *,
        image: str | Path | Image.Image | None = None,
        filters: Filters | None = None,
        add: Sequence[str] = (),
        subtract: Sequence[str] = (),
        **options: Any,
    ) -> Query:
        """A :class:`Query` from :meth:`search`'s arguments (no audio): the image decoded within the query
        budget, the filters (a :class:`Filters`, or :data:`FILTER_FIELDS` keywords) checked."""
        given = {name: options.pop(name) for name in FILTER_FIELDS if name in options}
        if filters is None:
            filters = Filters.parse(**given)
        elif any(v not in (None, (), []) for v in given.values()):
            raise BadQueryError("give filters or filter keywords, not both")
        if image is not None and not _is_pil_image(image):
            image = self._query_image(image)
        rgb = image.convert("RGB") if image is not None else None
        return Query(
            text=text, image=rgb, add=tuple(add), subtract=tuple(subtract), filters=filters, **options
        )

    def answer(
        self,
        query: Query,
        hypotheses: Sequence[str] | None = None,
        run: Callable[[Plan], SearchResult] | None = None,
    ) -> SearchResult:
        """Search ``query``; with ``hypotheses`` (what a spoken query may say, best first) as its spoken
        input, the next one searched while the previous found no good match. ``run`` searches one plan
        (default: embed and search here; the server batches)."""
        run = run or self._run
        if hypotheses is None:
            return run(plan(query))
        first: SearchResult | None = None
        for heard in hypotheses:
            result = run(plan(dataclasses.replace(query, heard=heard)))
            result.transcript, result.hypotheses = heard, list(hypotheses)
            if not result.no_match:
                return result
            first = first or result
        if first is None:
            raise BadQueryError("no speech recognised in the spoken query")
        return first

    def _run(self, p: Plan) -> SearchResult:
        """Embed a plan's inputs with the active model and search; embedded again by the new model if another
        one becomes active in between (never searched across models)."""
        for _ in range(SWITCH_RETRIES):
            model = self.store.follow_active()
            if p.parts:  # the vectors are read while the query is embedded
                self.store.preload(p.kinds, model)
            vectors = embed_parts(p, self.embedder_for(model)) if p.parts else None
            try:
                return execute(self.store, p, vectors, model=model)
            except ActiveModelChanged:
                continue
        raise MmsearchError("the index's active model keeps changing: try again")

    def _query_image(self, image: str | Path) -> Image.Image:
        from mmsearch.images import QUERY_MAX_PIXELS, load_image

        path = Path(image)
        if not path.is_file():
            raise BadQueryError(f"query image not found: {path}")
        try:
            return load_image(path, max_pixels=QUERY_MAX_PIXELS)
        except BadMediaError as e:
            raise BadQueryError(f"cannot read query image {path}: {e}") from e

    def hear_query(self, audio: str | Path) -> list[str]:
        """What a spoken query may say, best reading first: decoded with a prompt of the index's own
        vocabulary (:mod:`mmsearch.vocabulary`), then without, then the beam's other readings (see
        :func:`mmsearch.spoken.hear_query`). A recording longer than ``QUERY_MAX_AUDIO_SECONDS`` is refused,
        not cut: a query is a sentence, and decoding more is work an upload could make the server do for
        nothing."""
        from mmsearch.audio import QUERY_MAX_AUDIO_SECONDS  # PyAV: only when a spoken query comes
        from mmsearch.spoken import hear_query

        path = Path(audio)
        if not path.is_file():
            raise BadQueryError(f"query audio not found: {path}")
        try:
            readings = hear_query(
                self.query_transcriber,
                path,
                vocabulary=vocabulary.load(self.store),
                max_seconds=QUERY_MAX_AUDIO_SECONDS,
            )
        except BadMediaError as e:
            raise BadQueryError(f"cannot read query audio {path}: {e}") from e
        readings = [r.strip() for r in readings if r.strip()]
        if not readings:
            raise BadQueryError(f"no speech recognised in {path}")
        return readings

    def search_text(self, text: str, *, target: str = "images", k: int = 10) -> list[Hit]:
        text = text.strip()
        if not text:
            raise BadQueryError("the query text is empty")
        return self._search_embedded(lambda emb: emb.embed_texts([text])[0], target, k)

    def search_image(
        self, image: str | Path | Image.Image, *, target: str = "texts", k: int = 10
    ) -> list[Hit]:
        if not _is_pil_image(image):
            image = self._query_image(image)
        rgb = image.convert("RGB")
        return self._search_embedded(lambda emb: emb.embed_images([rgb])[0], target, k)

    def transcribe_query(self, audio: str | Path) -> str:
        """What the spoken query most likely says (the text :meth:`search_audio` searches with): the first of
        :meth:`hear_query`."""
        return self.hear_query(audio)[0]

    def search_audio(self, audio: str | Path, *, target: str = "images", k: int = 10) -> list[Hit]:
        return self.search_text(self.transcribe_query(audio), target=target, k=k)

    def warm_up(self, *, speech: bool = False) -> None:
        """Load the text tower and every vector index of the active model now (and the spoken-query
        transcriber with ``speech``), so that the first query is as fast as the rest."""
        self.embedder_for(self.store.follow_active()).embed_texts(["warm up"])
        for kind in db.VECTOR_KINDS:
            self.store.vectors(kind)
        if speech:
            self.query_transcriber  # noqa: B018 - loading is the point

    # --- reporting ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        from mmsearch.ingest import unavailable_summary

        self.store.follow_active()
        counts = self.store.catalog.counts()
        return {
            "index": str(self.path),
            "model": self.model_identity,
            "models": self.models(),
            "speech": self.store.config.get("speech"),
            # Speech settings a retranscription is bringing the transcripts to, if one is under way.
            "speech_target": self.store.catalog.get_meta(db.SPEECH_TARGET_META),
            "schema_version": self.store.config.get("schema_version"),
            **counts,
            # Files kept because their folder could not be seen by the last run (see add_folder's prune).
            "unavailable": unavailable_summary(self.store),
            # Contents per zero-shot tag (mmsearch tag).
            "zero_shot_tags": self.zero_shot_tags(),
            # Captions by origin; photos with a date taken, a place, a camera, keywords.
            "photos": db.photo_summary(self.store.catalog),
        }

    def zero_shot_tags(self) -> dict[str, int]:
        """How many image contents carry each zero-shot tag, most first."""
        from mmsearch import catalog_tags

        if not self.store.catalog.has_photo_meta:  # read-only on a full disk, not migrated: no tags table
            return {}
        with self.store.catalog.read() as conn:
            return catalog_tags.zero_shot_counts(conn)

    def models(self) -> list[dict[str, Any]]:
        """Each model the index holds vectors of: its key, identity, whether it is active (searched) or the
        target (being embedded), and its coverage: vectors per kind against the items of each kind."""
        catalog = self.store.catalog
        active, target = self.store.model, catalog.target_model()
        coverage, items = catalog.coverage(), catalog.item_counts()
        registry = catalog.models() or {active: self.model_identity}
        return [
            {
                "key": key,
                "name": describe_identity(identity),
                "identity": identity,
                "active": key == active,
                "target": key == target,
                "vectors": {kind: coverage.get(key, {}).get(kind, 0) for kind in items},
                "items": items,
            }
            for key, identity in registry.items()
        ]

    def skipped(self) -> list[dict[str, str]]:
        """Every file recorded as skipped: ``path`` (display form), ``path_b64`` (exact bytes), ``reason``."""
        return [{**db.path_json(key), "reason": r} for key, r in self.store.catalog.skipped()]


def embed_parts(p: Plan, embedder: Embedder) -> np.ndarray:
    """The vectors of a plan's inputs, one row per part in order (texts in one pass, images in one)."""
    texts = embedder.embed_texts(p.texts) if p.texts else None
    images = embedder.embed_images(p.images) if p.images else None
    rows, t, i = [], 0, 0
    for part in p.parts:
        if part.modality == "text":
            rows.append(texts[t])  # type: ignore[index]
            t += 1
        else:
            rows.append(images[i])  # type: ignore[index]
            i += 1
    return np.stack(rows).astype(np.float32)


def open_or_create(path: str | Path, **kwargs: Any) -> Index:
    """Open the index at ``path`` (checking the model if one is named), or create it.

    Speech settings (``speech_backend``, ``speech_model``, ``language``) are fixed when an index is
    created: naming different ones for an existing index raises :class:`ConfigError` rather than being
    ignored (``None`` means "not named")."""
    path = Path(path)
    if Store.exists(path):
        open_kwargs = {
            k: kwargs[k]
            for k in ("model", "pretrained", "checkpoint", "device", "image_tower")
            if k in kwargs
        }
        index = Index.open(path, **open_kwargs)
        try:
            _check_same_speech(index.store, kwargs)
        except ConfigError:
            index.close()
            raise
        return index
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return Index.create(path, **kwargs)


def check_device(device: str) -> str:
    if not _DEVICE_PATTERN.fullmatch(device):
        raise ConfigError(f"unknown device '{device}' (use auto, cpu, cuda, cuda:N or mps)")
    return device


def check_image_tower(image_tower: str | None) -> str:
    """The image tower to use: the one given, else $MMSEARCH_IMAGE_TOWER, else onnx-int8."""
    tower = image_tower or os.environ.get("MMSEARCH_IMAGE_TOWER", "onnx-int8")
    if tower not in IMAGE_TOWERS:
        raise ConfigError(f"unknown image tower '{tower}' (choose from {', '.join(IMAGE_TOWERS)})")
    return tower


def check_speech_settings(backend: str, model: str | None, language: str | None) -> dict[str, Any]:
    """The speech settings an index records, checked: a typo saved here would make every later run skip
    every recording."""
    backends = constants.SPEECH_BACKENDS  # not mmsearch.transcribe's: it imports PyAV
    if backend not in backends:
        raise ConfigError(f"unknown speech backend '{backend}' (choose from {', '.join(backends)})")
    if language is not None:
        code = _normalized("language", language)
        if code not in WHISPER_LANGUAGES:
            raise ConfigError(
                f"unknown spoken language '{language}': give a Whisper language code such as en, fr, de, "
                "es, zh, or none to detect the language"
            )
        language = code
    if model is not None and not model.strip():
        raise ConfigError("the speech model name is empty")
    return {"backend": backend, "model": model, "language": language}


def _normalized(option: str, value: str) -> str:
    return value.strip().lower() if option == "language" else value


def _check_same_speech(store: Store, asked: dict[str, Any]) -> None:
    """Speech options named for an existing index must be its own: its transcripts were made with them."""
    current = {**DEFAULT_SPEECH, **store.config.get("speech", {})}
    differ = [
        f"{option.replace('_', '-')} {asked[option]!r} (the index has {current[setting] or 'the default'!r})"
        for option, setting in _SPEECH_OPTIONS.items()
        if asked.get(option) is not None and _normalized(option, asked[option]) != current[setting]
    ]
    if differ:
        raise ConfigError(
            f"the index at {store.folder} was created with other speech settings: {'; '.join(differ)}. "
            "An index keeps the speech settings it was created with: leave these options out to use them, "
            "or create a new index with the new ones"
        )


def _is_pil_image(value: object) -> TypeIs[Image.Image]:
    # A PIL image exists only once PIL.Image is imported: a text query never imports it.
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(value, pil.Image)


def _check_same_model(identity: dict[str, Any], spec: ModelSpec) -> None:
    """Compare what the user named with what the index holds, without loading any weights."""
    asked = spec.expected_identity()
    if not same_model(asked, identity):
        raise ModelMismatchError(
            f"this index was built with {describe_identity(identity)}, but {describe_identity(asked)} "
            "was asked for; an index is searched with its own model (omit --model, or switch the index to the "
            "other one with `mmsearch reembed --model ...`)"
        )
