"""The Python API, shared by the CLI and the server: create or open an index, add folders, search.

>>> import mmsearch
>>> idx = mmsearch.Index.create("indexes/photos", model="demo")
>>> idx.add_folder("~/Pictures", progress=lambda stage, done, total: None)
>>> idx.search_text("a red circle", target="images", k=5)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmsearch import db
from mmsearch.errors import BadMediaError, BadQueryError, MmsearchError, ModelMismatchError
from mmsearch.identity import ModelSpec, describe_identity, same_model
from mmsearch.images import load_image
from mmsearch.ingest import IngestReport, Progress, ingest
from mmsearch.search import Hit, search_vector
from mmsearch.store import Store

log = logging.getLogger(__name__)

DEFAULT_INDEX = Path("indexes") / "default"
IMAGE_TOWERS = ("onnx-int8", "onnx-fp32", "torch")
DEFAULT_SPEECH = {"backend": "faster-whisper", "model": None, "language": None}


def default_index_path() -> Path:
    return Path(os.environ.get("MMSEARCH_INDEX", DEFAULT_INDEX))


class Index:
    """An index folder plus the models it needs, loaded lazily: opening and stats load no model."""

    def __init__(self, store: Store, *, device: str = "auto", image_tower: str | None = None) -> None:
        self.store = store
        self.device = device
        # How indexing embeds images on the CPU: "onnx-int8" (default, fastest), "onnx-fp32" or "torch".
        self.image_tower = image_tower or os.environ.get("MMSEARCH_IMAGE_TOWER", "onnx-int8")
        if self.image_tower not in IMAGE_TOWERS:
            raise MmsearchError(
                f"unknown image tower '{self.image_tower}' (choose from {', '.join(IMAGE_TOWERS)})"
            )
        self._embedder: Any = None
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
        """Create an empty index; loads the model once to record its identity and dimension."""
        from mmsearch.model import load_embedder

        embedder = load_embedder(ModelSpec(model, pretrained, checkpoint), device=device)
        speech = {"backend": speech_backend, "model": speech_model, "language": language}
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
    def embedder(self) -> Any:
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
        self, folder: str | Path, *, progress: Progress | None = None, workers: int = 2
    ) -> IngestReport:
        """Index ``folder`` incrementally (only new or changed content does model work)."""
        self.store.lock_for_writing()
        try:
            return ingest(
                self.store,
                Path(folder).expanduser(),
                embedder=self._indexing_embedder,
                transcriber=lambda: self.transcriber,
                progress=progress,
                workers=workers,
            )
        finally:
            self.store.unlock()

    def _indexing_embedder(self) -> Any:
        """The embedder, with the faster ONNX image tower when indexing on the CPU (queries keep torch:
        a one-off export costs far more than the few images a query embeds)."""
        embedder = self.embedder
        if self.image_tower != "torch" and embedder._onnx_tower is None:
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
                image = load_image(path)
            except BadMediaError as e:
                raise BadQueryError(f"cannot read query image {path}: {e}") from e
        return self.search_vector(self.embedder.embed_images([image.convert("RGB")])[0], target=target, k=k)

    def transcribe_query(self, audio: str | Path) -> str:
        """What the spoken query says (the text that :meth:`search_audio` searches with)."""
        path = Path(audio)
        if not path.is_file():
            raise BadQueryError(f"query audio not found: {path}")
        try:
            transcript = self.query_transcriber.transcribe(path)
        except BadMediaError as e:
            raise BadQueryError(f"cannot read query audio {path}: {e}") from e
        if not transcript.text.strip():
            raise BadQueryError(f"no speech recognised in {path}")
        return str(transcript.text.strip())

    def search_audio(self, audio: str | Path, *, target: str = "images", k: int = 10) -> list[Hit]:
        return self.search_text(self.transcribe_query(audio), target=target, k=k)

    # --- reporting ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        from sqlalchemy import func, select

        counts: dict[str, Any] = {}
        with self.store.catalog.read() as conn:
            by = conn.execute(
                select(db.files.c.kind, db.files.c.status, func.count()).group_by(
                    db.files.c.kind, db.files.c.status
                )
            ).all()
            counts["files"] = {f"{kind}_{status}": n for kind, status, n in by}
            for name, table in (("media", db.media), ("captions", db.captions), ("segments", db.segments)):
                counts[name] = conn.execute(select(func.count()).select_from(table)).scalar_one()
            vec = conn.execute(
                select(db.embeddings.c.kind, func.count()).group_by(db.embeddings.c.kind)
            ).all()
            counts["vectors"] = {kind: n for kind, n in vec}
        return {
            "index": str(self.path),
            "model": self.model_identity,
            "speech": self.store.config.get("speech"),
            "schema_version": self.store.config.get("schema_version"),
            **counts,
        }

    def skipped(self) -> list[dict[str, str]]:
        from sqlalchemy import select

        with self.store.catalog.read() as conn:
            rows = conn.execute(
                select(db.files.c.path, db.files.c.reason)
                .where(db.files.c.status == "skipped")
                .order_by(db.files.c.path)
            ).all()
        return [{"path": p, "reason": r} for p, r in rows]


def open_or_create(path: str | Path, **kwargs: Any) -> Index:
    """Open the index at ``path`` (checking the model if one is named), or create it."""
    path = Path(path)
    if Store.exists(path):
        open_kwargs = {
            k: kwargs[k]
            for k in ("model", "pretrained", "checkpoint", "device", "image_tower")
            if k in kwargs
        }
        return Index.open(path, **open_kwargs)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return Index.create(path, **kwargs)


def _check_same_model(identity: dict[str, Any], spec: ModelSpec) -> None:
    """Compare what the user named with what the index holds, without loading any weights."""
    asked = spec.expected_identity()
    if not same_model(asked, identity):
        raise ModelMismatchError(
            f"this index was built with {describe_identity(identity)}, but {describe_identity(asked)} "
            "was asked for; an index is searched with its own model (omit --model, or build a new index)"
        )
