"""The Python API, shared by the CLI and the server: create or open an index, add folders, search.

>>> import mmsearch
>>> idx = mmsearch.Index.create("indexes/photos", model="demo")
>>> idx.add_folder("~/Pictures", progress=lambda stage, done, total: None)
>>> idx.search_text("a red circle", target="images", k=5)
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from mmsearch import constants
from mmsearch.errors import BadMediaError, BadQueryError, ConfigError, ModelMismatchError
from mmsearch.identity import ModelSpec, describe_identity, same_model
from mmsearch.images import QUERY_MAX_PIXELS, load_image
from mmsearch.ingest import IngestReport, Progress, ingest, unavailable_summary
from mmsearch.search import Hit, search_vector
from mmsearch.store import Store

if TYPE_CHECKING:
    from mmsearch.model import ClipEmbedder

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


def default_index_path() -> Path:
    return constants.default_index_path()


class Index:
    """An index folder plus the models it needs, loaded lazily: opening and stats load no model."""

    def __init__(self, store: Store, *, device: str = "auto", image_tower: str | None = None) -> None:
        self.store = store
        self.device = check_device(device)
        # How indexing embeds images on the CPU: "onnx-int8" (default, fastest), "onnx-fp32" or "torch".
        self.image_tower = check_image_tower(image_tower)
        self._embedder: ClipEmbedder | None = None
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
        """Create an empty index; loads the model once to record its identity and dimension.

        Every setting is checked first (:class:`ConfigError`), before any model is loaded."""
        from mmsearch.model import load_embedder

        speech = check_speech_settings(speech_backend, speech_model, language)
        check_device(device)
        check_image_tower(image_tower)
        embedder = load_embedder(ModelSpec(model, pretrained, checkpoint), device=device)
        store = Store.create(Path(path), {"model": embedder.identity, "speech": speech})
        index = cls(store, device=device, image_tower=image_tower)
        index._embedder = embedder
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
    ) -> Index:
        """Open an index. If a model is named, it must be the one the index was built with."""
        store = Store.open(Path(path))
        if model is not None or checkpoint is not None:
            spec = ModelSpec(model or store.config["model"]["name"], pretrained, checkpoint)
            _check_same_model(store.config["model"], spec)
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
    def embedder(self) -> ClipEmbedder:
        if self._embedder is None:
            from mmsearch.model import load_embedder

            identity = self.store.config["model"]
            self._embedder = load_embedder(ModelSpec.from_identity(identity), device=self.device)
            if not same_model(identity, self._embedder.identity):
                raise ModelMismatchError(
                    f"the weights found for {identity['name']} differ from those the index was built with"
                )
        return self._embedder

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
    ) -> IngestReport:
        """Index ``folder`` incrementally (only new or changed content does model work).

        ``follow_links``: also index what links pointing outside ``folder`` lead to (not followed by
        default: see :mod:`mmsearch.scan`). ``prune``: forget the files of sub-folders (or of ``folder``
        itself) that cannot be seen now, e.g. an unplugged drive; by default they are kept and reported in
        ``IngestReport.unavailable``."""
        self.store.lock_for_writing()
        try:
            return ingest(
                self.store,
                Path(folder).expanduser(),
                embedder=self._indexing_embedder,
                transcriber=lambda: self.transcriber,
                progress=progress,
                workers=workers,
                follow_links=follow_links,
                prune=prune,
            )
        finally:
            self.store.unlock()

    def _indexing_embedder(self) -> ClipEmbedder:
        """The embedder, with the faster ONNX image tower when indexing on the CPU (queries keep torch:
        a one-off export costs far more than the few images a query embeds)."""
        embedder = self.embedder
        if self.image_tower != "torch" and not embedder.has_onnx_image_tower:
            embedder.use_onnx_image_tower(quantize=self.image_tower == "onnx-int8")
        return embedder

    # --- search -------------------------------------------------------------------------------
    def search_vector(self, vector: np.ndarray, *, target: str = "images", k: int = 10) -> list[Hit]:
        return search_vector(self.store, vector, target, k)

    def search_text(self, text: str, *, target: str = "images", k: int = 10) -> list[Hit]:
        text = text.strip()
        if not text:
            raise BadQueryError("the query text is empty")
        return self.search_vector(self.embedder.embed_texts([text])[0], target=target, k=k)

    def search_image(
        self, image: str | Path | Image.Image, *, target: str = "texts", k: int = 10
    ) -> list[Hit]:
        if not isinstance(image, Image.Image):
            path = Path(image)
            if not path.is_file():
                raise BadQueryError(f"query image not found: {path}")
            try:
                image = load_image(path, max_pixels=QUERY_MAX_PIXELS)
            except BadMediaError as e:
                raise BadQueryError(f"cannot read query image {path}: {e}") from e
        return self.search_vector(self.embedder.embed_images([image.convert("RGB")])[0], target=target, k=k)

    def transcribe_query(self, audio: str | Path) -> str:
        """What the spoken query says (the text that :meth:`search_audio` searches with). A recording longer
        than ``QUERY_MAX_AUDIO_SECONDS`` is refused, not cut: a query is a sentence, and decoding more is work
        an upload could make the server do for nothing."""
        from mmsearch.audio import QUERY_MAX_AUDIO_SECONDS  # PyAV: only when a spoken query comes

        path = Path(audio)
        if not path.is_file():
            raise BadQueryError(f"query audio not found: {path}")
        try:
            transcript = self.query_transcriber.transcribe(path, max_seconds=QUERY_MAX_AUDIO_SECONDS)
        except BadMediaError as e:
            raise BadQueryError(f"cannot read query audio {path}: {e}") from e
        if not transcript.text.strip():
            raise BadQueryError(f"no speech recognised in {path}")
        return str(transcript.text.strip())

    def search_audio(self, audio: str | Path, *, target: str = "images", k: int = 10) -> list[Hit]:
        return self.search_text(self.transcribe_query(audio), target=target, k=k)

    # --- reporting ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        counts = self.store.catalog.counts()
        return {
            "index": str(self.path),
            "model": self.model_identity,
            "speech": self.store.config.get("speech"),
            "schema_version": self.store.config.get("schema_version"),
            **counts,
            # Files kept because their folder could not be seen by the last run (see add_folder's prune).
            "unavailable": unavailable_summary(self.store),
        }

    def skipped(self) -> list[dict[str, str]]:
        return [{"path": p, "reason": r} for p, r in self.store.catalog.skipped()]


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
    from mmsearch.transcribe import BACKENDS

    if backend not in BACKENDS:
        raise ConfigError(f"unknown speech backend '{backend}' (choose from {', '.join(BACKENDS)})")
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


def _check_same_model(identity: dict[str, Any], spec: ModelSpec) -> None:
    """Compare what the user named with what the index holds, without loading any weights."""
    asked = spec.expected_identity()
    if not same_model(asked, identity):
        raise ModelMismatchError(
            f"this index was built with {describe_identity(identity)}, but {describe_identity(asked)} "
            "was asked for; an index is searched with its own model (omit --model, or build a new index)"
        )
