"""A model run by ONNX Runtime alone: image tower, text tower, tokenizer and preprocessing without torch.

The first time a model is used for indexing on the CPU, :class:`mmsearch.clip_torch.ClipEmbedder` exports
both towers to the per-user cache (:func:`mmsearch.accel.default_cache_dir`) and writes the model's
*manifest* beside them: the identity the towers were exported from (architecture, weights hash or tag,
dimension), the image preprocessing and the tokenizer settings, each checked against open_clip's own
before it is written. From then on :func:`mmsearch.model.load_embedder` finds the manifest and the towers
and builds an :class:`OnnxEmbedder`: no torch or open_clip import (5 s and ~0.9 GB), no second copy of the
weights, and ONNX Runtime sessions made only when something is embedded (an image session per stream for
indexing, one text session for queries and captions).

The manifest is written last, after every file it names, so a reader that finds it finds the towers too.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from mmsearch.accel import (
    OnnxImageTower,
    cache_file_name,
    default_cache_dir,
    default_streams,
    temp_path,
    tower_key,
)
from mmsearch.errors import MmsearchError
from mmsearch.onnx_text import OnnxTextTower, prefetch_session, text_file
from mmsearch.preprocess import ImagePreprocess
from mmsearch.tokenizer import ClipTokenizer

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)
T = TypeVar("T")

MANIFEST_VERSION = 1
#: Exports shipped with the package (the demo model's int8 towers), laid out like the user cache.
#: Made by ``python -m mmsearch.clip_torch --ship-demo``; tests/test_torch_free.py checks they are current.
PACKAGED_EXPORTS = Path(__file__).resolve().parent / "demo" / "weights" / "onnx"
IDENTITY_FIELDS = ("arch", "pretrained", "checkpoint_sha256", "dim")


def manifest_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / cache_file_name(key, None, recipe=MANIFEST_VERSION)


def write_manifest(
    cache_dir: Path,
    key: str,
    identity: dict[str, Any],
    *,
    preprocess: dict[str, Any],
    tokenizer: dict[str, Any],
    text_int8: bool | None,
) -> Path:
    """Record what runs the model ``key`` without torch (written atomically). ``text_int8``: whether its int8
    text tower is kept (None: not tried yet; an earlier manifest's answer is kept)."""
    path = manifest_path(cache_dir, key)
    if text_int8 is None:
        text_int8 = (read_manifest(cache_dir, key) or {}).get("text_int8")
    manifest = {
        "key": key,
        "version": MANIFEST_VERSION,
        "identity": {k: identity[k] for k in IDENTITY_FIELDS},
        "preprocess": preprocess,
        "tokenizer": tokenizer,
        "text_int8": text_int8,
    }
    tmp = temp_path(path, ".tmp")
    try:
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_manifest(cache_dir: Path, key: str) -> dict[str, Any] | None:
    path = manifest_path(cache_dir, key)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring the damaged model manifest %s: %s", path, e)
        return None
    if (
        not isinstance(manifest, dict)
        or manifest.get("key") != key
        or manifest.get("version") != MANIFEST_VERSION
    ):
        return None
    return manifest


def find_exported(
    identity: dict[str, Any], *, quantize: bool, cache_dirs: Sequence[Path]
) -> tuple[dict[str, Any], Path, Path] | None:
    """(manifest, image tower file, text tower file) of the model ``identity`` names, from the first of
    ``cache_dirs`` that holds all three (the user cache, then the exports shipped in the package)."""
    for cache_dir in cache_dirs:
        found = _find_in(identity, quantize, Path(cache_dir))
        if found is not None:
            return found
    return None


def prefetch_text_tower(identity: dict[str, Any], device: str = "auto") -> Path | None:
    """Start making the ONNX Runtime session of the text tower that :func:`mmsearch.model.load_embedder`
    picks for the model ``identity`` (an index's, as it recorded it) and ``device``, with the image tower
    setting of ``$MMSEARCH_IMAGE_TOWER``; see :func:`mmsearch.onnx_text.prefetch_session`. Returns its file,
    or None when that embedder would not run on ONNX Runtime (nothing is started)."""
    from mmsearch.model import ONNX_TOWERS, TORCH_FREE_ENV, runs_on_cpu

    # As mmsearch.api.check_image_tower and load_embedder decide (tests/test_torch_free.py checks the file
    # started here is the one a query then uses).
    quantize = ONNX_TOWERS.get(os.environ.get("MMSEARCH_IMAGE_TOWER") or "onnx-int8")
    if quantize is None or os.environ.get(TORCH_FREE_ENV, "1") == "0" or not runs_on_cpu(device):
        return None
    found = find_exported(identity, quantize=quantize, cache_dirs=[default_cache_dir(), PACKAGED_EXPORTS])
    if found is None:
        return None
    prefetch_session(found[2])
    return found[2]


def _find_in(
    identity: dict[str, Any], quantize: bool, cache_dir: Path
) -> tuple[dict[str, Any], Path, Path] | None:
    key = tower_key(identity)
    manifest = read_manifest(cache_dir, key)
    if manifest is None:
        return None
    recorded = manifest["identity"]
    if any(identity.get(k) != recorded.get(k) for k in ("arch", "checkpoint_sha256")) or (
        identity.get("dim") is not None and identity["dim"] != recorded.get("dim")
    ):
        return None  # a key collision, or a manifest from other weights: not this model
    if manifest.get("tokenizer", {}).get("kind") != "clip-bpe":
        return None
    text_int8 = quantize and manifest.get("text_int8")
    if quantize and text_int8 is None:
        return None  # int8 text never tried for this model: the torch side decides (and records) it
    image = Path(cache_dir) / cache_file_name(key, quantize)
    text = text_file(cache_dir, key, bool(text_int8))
    if not (image.is_file() and text.is_file()):
        return None
    return manifest, image, text


class OnnxEmbedder:
    """Embeds images and texts into one L2-normalised space with ONNX Runtime only (see the module doc).

    It offers what ingestion and the API use of :class:`mmsearch.clip_torch.ClipEmbedder`, with the same
    identity: an index cannot tell which of the two embedded its vectors (int8 towers stay within the
    cosines their export checked)."""

    def __init__(
        self,
        identity: dict[str, Any],
        manifest: dict[str, Any],
        image_path: Path,
        text_path: Path,
        *,
        batch_size: int = 32,
    ) -> None:
        self.identity = {**identity, "dim": int(manifest["identity"]["dim"])}
        #: Information only (int8 and fp32 vectors of the same weights mix), not part of the identity.
        self.image_tower = "onnx-int8" if image_path.name.endswith(".int8.onnx") else "onnx-fp32"
        self.dim = int(manifest["identity"]["dim"])
        self.batch_size = batch_size
        self.preprocess = ImagePreprocess.from_config(manifest["preprocess"])
        #: The model's input side: JPEGs are decoded at the smallest DCT scale still at least this large.
        self.input_size = self.preprocess.input_size
        self._tokenizer_settings = manifest["tokenizer"]
        self._image_path, self._text_path = image_path, text_path
        self._image: OnnxImageTower | None = None
        self._text: OnnxTextTower | None = None
        self._tokenizer: ClipTokenizer | None = None
        self._image_loading: _Loading | None = None
        self._lock = threading.Lock()  # sessions are made once, whichever thread asks first

    # --- what ClipEmbedder offers ---------------------------------------------------------------
    @property
    def has_onnx_image_tower(self) -> bool:
        return True

    def use_onnx_image_tower(self, *, quantize: bool = True, cache_dir: Path | None = None) -> bool:
        return True  # it is the only tower this embedder has

    @property
    def image_streams(self) -> int:
        """How many image batches :meth:`submit_image_tensors` runs at once (one ONNX session each).

        Ingestion asks this before it starts decoding: the sessions are then made in the background, while
        the first images decode, rather than after them."""
        with self._lock:
            if self._image is None and self._image_loading is None:
                self._image_loading = _Loading(lambda: _opened(OnnxImageTower, self._image_path))
            return self._image.streams if self._image is not None else default_streams()[0]

    @property
    def _onnx_tower(self) -> OnnxImageTower:
        """The image tower, its sessions made on first use (one per stream)."""
        with self._lock:
            if self._image is None:
                loading, self._image_loading = self._image_loading, None
                self._image = (
                    loading.result() if loading is not None else _opened(OnnxImageTower, self._image_path)
                )
            return self._image

    @_onnx_tower.setter
    def _onnx_tower(self, tower: OnnxImageTower) -> None:
        with self._lock:
            self._image, self._image_loading = tower, None

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        """The model's own preprocessing (OpenCLIP's transform, in Pillow and numpy)."""
        return self.preprocess(image)

    def embed_image_tensors(self, batch: Any) -> np.ndarray:
        """[B, 3, H, W] preprocessed pixels → [B, dim] L2-normalised vectors."""
        return np.asarray(self._onnx_tower(batch), np.float32)

    def submit_image_tensors(self, batch: Any) -> Future[np.ndarray]:
        return self._onnx_tower.submit(batch)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(images), self.batch_size):
            batch = np.stack([self.preprocess(im) for im in images[i : i + self.batch_size]])
            out.append(self.embed_image_tensors(batch))
        return np.concatenate(out)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = [np.zeros((0, self.dim), np.float32)]
        if texts:
            tokenizer, tower = self._text_model()
            for i in range(0, len(texts), self.batch_size):
                out.append(tower(tokenizer(list(texts[i : i + self.batch_size]))))
        return np.concatenate(out)

    def _text_model(self) -> tuple[ClipTokenizer, OnnxTextTower]:
        with self._lock:
            if self._text is None or self._tokenizer is None:
                settings = self._tokenizer_settings
                self._tokenizer = ClipTokenizer(
                    context_length=settings["context_length"], clean=settings["clean"]
                )
                self._text = _opened(OnnxTextTower, self._text_path)
            return self._tokenizer, self._text


def _opened(tower: Callable[[Path], T], path: Path) -> T:
    """``tower(path)``; a cached file ONNX Runtime cannot load (damaged, or from a newer release) raises an
    error that says how to get a fresh one."""
    try:
        return tower(path)
    except MmsearchError:
        raise
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MmsearchError(
            f"the cached model file {path} cannot be loaded ({reason}): "
            "delete it, and the next `mmsearch index` exports it again (meanwhile MMSEARCH_IMAGE_TOWER=torch "
            "runs the model with torch)"
        ) from e


class _Loading:
    """A call run on its own thread; :meth:`result` waits for it and returns or raises its outcome.

    Not a daemon thread: an exit (Ctrl-C) waits for the session being made, as ONNX Runtime aborts the
    process when it is torn down in the middle of making one."""

    def __init__(self, call: Callable[[], OnnxImageTower]) -> None:
        self._call = call
        self._outcome: Future[OnnxImageTower] = Future()
        threading.Thread(target=self._run, name="onnx-tower-load", daemon=False).start()

    def _run(self) -> None:
        try:
            self._outcome.set_result(self._call())
        except BaseException as e:  # handed to whoever waits for the tower
            self._outcome.set_exception(e)

    def result(self) -> OnnxImageTower:
        return self._outcome.result()
