"""Which embedder runs a model: ONNX Runtime alone when the model's towers are exported, else torch.

:func:`load_embedder` is the one entry point. It imports neither torch nor open_clip unless it has to:

* with an ONNX image tower asked for (``onnx-int8``, the default, or ``onnx-fp32``), on the CPU, and the
  model's export in the cache (:mod:`mmsearch.onnx_embedder`): an :class:`OnnxEmbedder`, in a fraction of a
  second and without torch;
* otherwise (first use of a model, ``--image-tower torch``, a GPU, a model whose tokenizer or preprocessing
  has no torch-free version): :class:`mmsearch.clip_torch.ClipEmbedder`, which loads the weights with
  open_clip. Indexing with it exports the towers (``use_onnx_image_tower``), so the next run is torch-free.

``from mmsearch.model import ClipEmbedder`` still works; it imports torch at that moment.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mmsearch.identity import ModelSpec

ONNX_TOWERS = {"onnx-int8": True, "onnx-fp32": False}  # image tower setting -> int8 quantisation
#: Set to 0 to load every model with torch, as before torch-free loading existed (the ONNX image tower is
#: still used for indexing): an escape hatch, and the "torch path" that benchmarks/bench_startup.py compares.
TORCH_FREE_ENV = "MMSEARCH_TORCH_FREE"
# Device files of an accelerator torch would pick for device="auto" (CUDA, ROCm); Apple silicon has MPS.
_ACCELERATOR_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")


class Embedder(Protocol):
    """What the API and ingestion use of a model, whichever runs it."""

    identity: dict[str, Any]
    dim: int
    batch_size: int
    input_size: int

    @property
    def has_onnx_image_tower(self) -> bool: ...
    @property
    def image_streams(self) -> int: ...
    def use_onnx_image_tower(self, *, quantize: bool = True, cache_dir: Path | None = None) -> bool: ...
    def preprocess_image(self, image: Any) -> Any: ...
    def embed_image_tensors(self, batch: Any) -> np.ndarray: ...
    def submit_image_tensors(self, batch: Any) -> Future[np.ndarray]: ...
    def embed_images(self, images: Sequence[Any]) -> np.ndarray: ...
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def load_embedder(
    model: ModelSpec | Mapping[str, Any],
    device: str = "auto",
    batch_size: int = 32,
    image_tower: str | None = None,
    cache_dir: Path | None = None,
) -> Embedder:
    """The embedder of ``model``: a :class:`ModelSpec` (what the user named; a checkpoint is hashed, not
    loaded) or the identity an index recorded (its weights hash names the export; nothing is hashed).

    ``image_tower``: ``onnx-int8`` / ``onnx-fp32`` use the exported towers when cached (both towers then run
    on ONNX Runtime, texts int8 too where the export kept it); ``torch`` or None load the torch model."""
    if isinstance(model, ModelSpec):
        spec, identity = model, None
    else:
        identity = dict(model)
        spec = ModelSpec.from_identity(identity)
    quantize = ONNX_TOWERS.get(image_tower or "torch")
    if quantize is not None and runs_on_cpu(device) and os.environ.get(TORCH_FREE_ENV, "1") != "0":
        found = _torch_free(spec, identity, quantize, cache_dir, batch_size)
        if found is not None:
            return found
    from mmsearch.clip_torch import ClipEmbedder

    return ClipEmbedder(spec, device=device, batch_size=batch_size)


def _torch_free(
    spec: ModelSpec, identity: dict[str, Any] | None, quantize: bool, cache_dir: Path | None, batch_size: int
) -> Embedder | None:
    from mmsearch.accel import default_cache_dir
    from mmsearch.onnx_embedder import PACKAGED_EXPORTS, OnnxEmbedder, find_exported

    if identity is None:
        identity = spec.expected_identity()
        if identity["checkpoint_sha256"] == "missing":
            return None  # the torch path raises the error that says so
    found = find_exported(
        identity, quantize=quantize, cache_dirs=[cache_dir or default_cache_dir(), PACKAGED_EXPORTS]
    )
    if found is None:
        return None
    manifest, image, text = found
    keep = ("name", "arch", "pretrained", "checkpoint", "checkpoint_sha256")
    return OnnxEmbedder({k: identity.get(k) for k in keep}, manifest, image, text, batch_size=batch_size)


def load_recorded(identity: Mapping[str, Any], device: str, image_tower: str | None) -> Embedder:
    """The embedder of the model an index recorded, checked to be that model (same architecture and weights):
    :class:`ModelMismatchError` when the weights found here differ."""
    from mmsearch.errors import ModelMismatchError
    from mmsearch.identity import same_model

    embedder = load_embedder(identity, device=device, image_tower=image_tower)
    if not same_model(dict(identity), embedder.identity):
        raise ModelMismatchError(
            f"the weights found for {identity.get('name')} differ from those the index was built with"
        )
    return embedder


def prepare_for_indexing(embedder: Embedder, image_tower: str | None) -> Embedder:
    """``embedder`` with the faster ONNX image tower when indexing on the CPU (``image_tower`` other than
    "torch"): a model loaded with torch is exported here, once, so that later runs (queries too) go without
    torch. Queries never export: a one-off export costs far more than a query."""
    if image_tower != "torch" and not embedder.has_onnx_image_tower:
        embedder.use_onnx_image_tower(quantize=image_tower == "onnx-int8")
    return embedder


def runs_on_cpu(device: str) -> bool:
    """Whether ``device`` means the CPU, decided without torch: "auto" is the CPU unless an accelerator that
    torch would pick is present (then the torch path decides, as before)."""
    if device == "cpu":
        return True
    if device != "auto":
        return False
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return False  # MPS
    return not any(Path(p).exists() for p in _ACCELERATOR_FILES)


def __getattr__(name: str) -> Any:
    # The torch embedder and its helpers, imported (with torch) only when asked for by name.
    if name in {"ClipEmbedder", "pick_device", "_split_tensor_tail"}:
        from mmsearch import clip_torch

        return getattr(clip_torch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
