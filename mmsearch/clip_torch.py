"""OpenCLIP image/text embedder on torch: the only module that loads a model with torch and open_clip.

Used the first time a model is used (to export its ONNX towers), when the user asks for the torch tower
(``--image-tower torch``), on a GPU, and by training and benchmarks. Once a model's towers are exported,
:func:`mmsearch.model.load_embedder` runs it without torch (:mod:`mmsearch.onnx_embedder`).

Weights come from one of three places:

* an OpenCLIP pretrained tag (``--model ViT-B-32 --pretrained laion2b_s34b_b79k``), downloaded on first use
  and cached by huggingface_hub;
* a local checkpoint file (``--checkpoint PATH``, ``.safetensors`` or a ``weights_only`` torch file), with the
  architecture given by name or by an OpenCLIP model-config JSON;
* the demo model shipped in this package (``--model demo``), which is just a local checkpoint.

``pretrained="random"`` gives seeded random weights: plumbing tests and speed benchmarks use it.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image

from mmsearch.constants import hub_offline
from mmsearch.errors import MmsearchError, WeightsUnavailableError
from mmsearch.identity import RANDOM, ModelSpec, describe_identity, sha256_file

log = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt"}


def _split_tensor_tail(preprocess: Any) -> tuple[list[Any], tuple[np.ndarray, np.ndarray] | None]:
    """(the steps before ToTensor, (mean, std) of the final Normalize) when the transform ends with
    ToTensor + Normalize, as OpenCLIP's do; else ([], None) and the whole transform runs as given."""
    from torchvision import transforms as tv

    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], tv.ToTensor) or type(steps[-1]) is not tv.Normalize:
        return [], None
    norm = steps[-1]
    shape = (-1, 1, 1)
    mean = np.asarray(norm.mean, np.float32).reshape(shape)
    std = np.asarray(norm.std, np.float32).reshape(shape)
    return steps[:-2], (mean, std)


def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _hub_reachable(timeout: float = 3.0) -> bool:
    # huggingface_hub retries for ~45 s before giving up when there is no network; one quick probe
    # lets us fail with a clear message instead.
    if hub_offline():
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _register_config(name: str) -> str:
    """Register an OpenCLIP model-config JSON given as a path; return the architecture name."""
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise MmsearchError(f"model config not found: {path}")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise MmsearchError(f"model config {path} is not valid JSON: {e}") from e
        if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
            raise MmsearchError(
                f"{path} is not an OpenCLIP model config (needs embed_dim, vision_cfg, text_cfg)"
            )
        open_clip.add_model_config(path)
        return path.stem
    if name not in open_clip.list_models():
        raise MmsearchError(
            f"unknown model architecture '{name}'; see `python -c 'import open_clip; print(open_clip.list_models())'`"
            " or pass an OpenCLIP model-config .json"
        )
    return name


def _cached_hub_file(hub_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    repo = hub_id.rstrip("/")
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


class ClipEmbedder:
    """Embeds images and texts into one L2-normalised space."""

    def __init__(self, spec: ModelSpec, device: str = "auto", batch_size: int = 32) -> None:
        self.device = pick_device(device)
        self.batch_size = batch_size
        name, pretrained, checkpoint = spec.resolved()
        arch = _register_config(name)
        kwargs: dict[str, Any] = {}
        checkpoint_hash: str | None = None
        if checkpoint is not None:
            ckpt = Path(checkpoint)
            if not ckpt.is_file():
                raise WeightsUnavailableError(f"checkpoint not found: {ckpt}")
            if ckpt.suffix not in _CHECKPOINT_SUFFIXES:
                raise MmsearchError(
                    f"unsupported checkpoint type '{ckpt.suffix}' (use .safetensors, .pt or .bin)"
                )
            load_from: str | None = str(ckpt)
            checkpoint_hash = sha256_file(ckpt)
        elif pretrained == RANDOM:
            load_from = None
            torch.manual_seed(0)  # seeded, so a reopened "random" index embeds queries consistently
        else:
            if pretrained is None:
                raise MmsearchError(f"model '{arch}' needs --pretrained TAG or --checkpoint PATH")
            load_from, kwargs = self._resolve_tag(arch, pretrained)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=load_from, device=self.device, **kwargs
            )
        except RuntimeError as e:
            if "Failed to download" in str(e):
                raise WeightsUnavailableError(
                    f"could not download weights for {arch}/{pretrained}: {e}. Pass --checkpoint PATH"
                ) from e
            raise MmsearchError(f"could not load {arch} weights from {load_from}: {e}") from e
        except (
            Exception
        ) as e:  # a user's file: unpickling refused (weights_only), wrong keys, not a checkpoint
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MmsearchError(
                f"could not load {arch} weights from {load_from}: {first_line} "
                "(only plain tensors are loaded: .safetensors, or a torch file loadable with weights_only=True)"
            ) from e
        model.eval()
        self.model = model
        self.preprocess = preprocess
        self._pil_steps, self._norm = _split_tensor_tail(preprocess)
        self.tokenizer = open_clip.get_tokenizer(arch)
        # The ONNX text tower once exported (see prepare_torch_free), and how to load it when a text comes.
        self._onnx_text: Any = None
        self._onnx_text_build: Callable[[], Any] | None = None
        self.dim = int(self._encode_texts(["probe"]).shape[1])
        self.identity: dict[str, Any] = {
            "name": spec.name,
            "arch": arch,
            "pretrained": pretrained,
            "checkpoint": spec.checkpoint,
            "checkpoint_sha256": checkpoint_hash,
            "dim": self.dim,
        }
        self._onnx_tower: Any = None
        size = getattr(model.visual, "image_size", 224)
        # The model's input side: JPEGs are decoded at the smallest DCT scale still at least this large.
        self.input_size = int(max(size) if isinstance(size, (tuple, list)) else size)
        log.info("loaded %s on %s (dim %d)", describe_identity(self.identity), self.device, self.dim)

    def use_onnx_image_tower(self, *, quantize: bool = True, cache_dir: Path | None = None) -> bool:
        """Embed images with the ONNX Runtime tower (CPU only): int8 dynamic quantisation, several times torch
        eager at cosine 0.9995 to fp32 (figures per machine: benchmarks/results/model_speed.json).
        False, with the reason logged, when unavailable; images then stay on torch.

        Also exports the text tower and writes the model's manifest (:meth:`prepare_torch_free`), so that the
        next process runs this model without torch; texts are then embedded by the ONNX text tower here
        too, so that this run's vectors are those of the later runs."""
        if self.device.type != "cpu":
            return False  # CUDA/MPS: torch with autocast is the fast path
        from mmsearch.accel import OnnxImageTower, default_cache_dir, tower_key

        cache_dir = cache_dir or default_cache_dir()
        try:
            self._onnx_tower = OnnxImageTower.build(
                self.model,
                self.model.visual.image_size,
                cache_dir,
                tower_key(self.identity),
                quantize=quantize,
            )
        except MmsearchError as e:  # missing onnxruntime/onnx, or an architecture that does not export
            log.warning("image embedding stays on torch: %s", e)
            return False
        # Information only: int8 and fp32 vectors of the same weights mix fine, so same_model ignores it.
        self.identity["image_tower"] = "onnx-int8" if quantize else "onnx-fp32"
        self.prepare_torch_free(quantize=quantize, cache_dir=cache_dir)
        return True

    def prepare_torch_free(self, *, quantize: bool, cache_dir: Path) -> bool:
        """Export the text tower and write the manifest that lets :mod:`mmsearch.onnx_embedder` run this model
        without torch (tokenizer and preprocessing settings, checked here against open_clip's own). False,
        with the reason logged, when the model needs torch (another tokenizer or transform, an export that
        fails its check); the image tower is unaffected."""
        from mmsearch import onnx_embedder
        from mmsearch.accel import tower_key
        from mmsearch.onnx_text import PROBE_TEXTS

        key = tower_key(self.identity)
        try:
            tokenizer = _torch_free_tokenizer(self.tokenizer)
            preprocess = _torch_free_preprocess(self.model, self.preprocess)
            probe = self.tokenizer(list(PROBE_TEXTS)).numpy()
            text_int8: bool | None = None
            if quantize:
                # An earlier export may have found that int8 does not hold for this model's texts.
                text_int8 = (onnx_embedder.read_manifest(cache_dir, key) or {}).get("text_int8")
                if text_int8 is not False:
                    text_int8 = self._attach_text_tower(probe, cache_dir, key, quantize=True)
            if not text_int8:
                self._attach_text_tower(probe, cache_dir, key, quantize=False)
        except MmsearchError as e:
            log.warning("%s will keep loading torch: %s", describe_identity(self.identity), e)
            return False
        onnx_embedder.write_manifest(
            cache_dir,
            key,
            {k: self.identity[k] for k in ("arch", "pretrained", "checkpoint_sha256", "dim")},
            preprocess=preprocess,
            tokenizer=tokenizer,
            text_int8=text_int8,
        )
        return True

    def _attach_text_tower(self, probe: np.ndarray, cache_dir: Path, key: str, *, quantize: bool) -> bool:
        """Embed texts with the ONNX text tower from now on, exporting it if it is not cached (a cached one
        is loaded when a text comes). False when the int8 export does not hold (fp32 raises instead)."""
        from mmsearch.onnx_text import OnnxTextTower, text_file

        build = functools.partial(OnnxTextTower.build, self.model, probe, cache_dir, key, quantize=quantize)
        if text_file(cache_dir, key, quantize).is_file():
            self._onnx_text, self._onnx_text_build = None, build
            return True
        try:
            self._onnx_text, self._onnx_text_build = build(), build
        except MmsearchError as e:
            if not quantize:
                raise
            log.warning("the int8 text tower of %s is not kept (%s); texts use the fp32 one", key, e)
            return False
        return True

    def _text_tower(self) -> Any:
        """The ONNX text tower if texts go through it (see :meth:`prepare_torch_free`), else None."""
        if self._onnx_text is None and self._onnx_text_build is not None:
            self._onnx_text = self._onnx_text_build()
        return self._onnx_text

    @staticmethod
    def _resolve_tag(arch: str, tag: str) -> tuple[str | None, dict[str, Any]]:
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        if not cfg:
            tags = ", ".join(t for a, t in open_clip.list_pretrained() if a == arch) or "none"
            raise MmsearchError(f"unknown pretrained tag '{tag}' for {arch} (known: {tags})")
        hub_id = cfg.get("hf_hub")
        if hub_id:
            cached = _cached_hub_file(hub_id)
            if cached is not None:
                # A local path loses the tag's preprocessing settings; pass them explicitly.
                return cached, {
                    "force_quick_gelu": bool(cfg.get("quick_gelu", False)),
                    "image_mean": cfg.get("mean"),
                    "image_std": cfg.get("std"),
                    "image_interpolation": cfg.get("interpolation"),
                    "image_resize_mode": cfg.get("resize_mode"),
                }
        if not _hub_reachable():
            raise WeightsUnavailableError(
                f"weights for {arch}/{tag} are not cached and the model hub cannot be reached (no network). "
                "Download them on a connected machine, or pass --checkpoint PATH to a local weights file "
                "(or use --model demo)."
            )
        return tag, {}

    def _autocast(self) -> Any:
        if self.device.type == "cuda":
            # bf16 only where the GPU has it natively (Ampere and later): on Turing/Volta it is emulated, slower
            # than fp16, yet is_bf16_supported() counts emulation by default.
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            dtype = torch.bfloat16 if native_bf16 else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return torch.autocast("cpu", enabled=False)  # fp32 on CPU: bf16 is slower on most CPUs

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """The model's own preprocessing; its last steps (to tensor, normalise) are done in numpy.

        torch would run them with its intra-op threads, whose OpenMP workers then spin waiting for more:
        from the decode threads of ingestion that doubled the CPU time of preprocessing (6.5 -> 12 ms per
        image here), CPU the model needed. numpy does the same arithmetic on the calling thread.
        """
        if self._norm is None:
            return self.preprocess(image)
        for step in self._pil_steps:
            image = step(image)
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            return self.preprocess.transforms[-1](self.preprocess.transforms[-2](image))
        mean, std = self._norm
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
        return torch.from_numpy((pixels - mean) / std)

    @torch.inference_mode()
    def embed_image_tensors(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """[B, 3, H, W] preprocessed pixels (a tensor or an array) → [B, dim] L2-normalised vectors."""
        if self._onnx_tower is not None:
            return np.asarray(self._onnx_tower(batch), np.float32)
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        if self.device.type == "cuda" and not batch.is_pinned():
            batch = batch.pin_memory()  # page-locked: the copy below then overlaps with the GPU's work
        batch = batch.to(self.device, non_blocking=True)
        with self._autocast():
            feats = self.model.encode_image(batch)
        return _normalise(feats)

    @property
    def has_onnx_image_tower(self) -> bool:
        """Whether images are embedded by the ONNX Runtime tower (see :meth:`use_onnx_image_tower`)."""
        return self._onnx_tower is not None

    @property
    def image_streams(self) -> int:
        """How many image batches :meth:`submit_image_tensors` runs at once (ONNX sessions; 1 on torch)."""
        return self._onnx_tower.streams if self._onnx_tower is not None else 1

    def submit_image_tensors(self, batch: torch.Tensor | np.ndarray) -> Future[np.ndarray]:
        """:meth:`embed_image_tensors` in the background when the ONNX tower has several sessions."""
        if self._onnx_tower is not None:
            return self._onnx_tower.submit(batch)
        done: Future[np.ndarray] = Future()
        done.set_result(self.embed_image_tensors(batch))  # torch uses every core for one batch already
        return done

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess_image(im) for im in images[i : i + self.batch_size]])
            out.append(self.embed_image_tensors(batch))
        return np.concatenate(out)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(texts), self.batch_size):
            out.append(self._encode_texts(texts[i : i + self.batch_size]))
        return np.concatenate(out)

    @torch.inference_mode()
    def _encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        onnx_text = self._text_tower()
        if onnx_text is not None:
            return np.asarray(onnx_text(self.tokenizer(list(texts)).numpy()), np.float32)
        tokens = self.tokenizer(list(texts)).to(self.device)
        with self._autocast():
            feats = self.model.encode_text(tokens)
        return _normalise(feats)


def _normalise(feats: torch.Tensor) -> np.ndarray:
    arr = feats.float().cpu().numpy()
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return (arr / np.maximum(norms, 1e-12)).astype(np.float32)


def _torch_free_tokenizer(tokenizer: Any) -> dict[str, Any]:
    """The settings of :class:`mmsearch.tokenizer.ClipTokenizer` that reproduce ``tokenizer`` (checked on
    test strings); :class:`MmsearchError` for another kind of tokenizer."""
    from open_clip import tokenizer as oc

    from mmsearch.onnx_text import PROBE_TEXTS
    from mmsearch.tokenizer import ClipTokenizer

    cleaners = {
        oc._clean_lower: "lower",
        oc._clean_whitespace: "whitespace",
        oc._clean_canonicalize: "canonicalize",
    }
    if (
        type(tokenizer) is not oc.SimpleTokenizer
        or tokenizer.reduction_fn is not None
        or len(tokenizer.all_special_ids) != 2
        or tokenizer.clean_fn not in cleaners
    ):
        raise MmsearchError(f"its tokenizer ({type(tokenizer).__name__}) has no torch-free version here")
    context_length, clean = int(tokenizer.context_length), cleaners[tokenizer.clean_fn]
    ours = ClipTokenizer(context_length=context_length, clean=clean)
    texts = [*PROBE_TEXTS, "Ünïcödé “quotes” &amp; emoji 😀", "<start_of_text> it's  WE'LL\tok"]
    if not np.array_equal(ours(texts), tokenizer(texts).numpy()):
        raise MmsearchError("the torch-free tokenizer does not reproduce its tokenizer")
    return {"kind": "clip-bpe", "context_length": context_length, "clean": clean}


def _torch_free_preprocess(model: Any, preprocess: Any) -> dict[str, Any]:
    """The settings of :class:`mmsearch.preprocess.ImagePreprocess` that reproduce ``preprocess`` (checked on
    images of several shapes and modes); :class:`MmsearchError` when they do not."""
    from mmsearch.preprocess import ImagePreprocess

    cfg = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    try:
        ours = ImagePreprocess.from_config(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise MmsearchError(
            f"its image preprocessing ({cfg or 'unknown'}) has no torch-free version here"
        ) from e
    rng = np.random.default_rng(0)
    probes = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
        for h, w in ((300, 400), (401, 223), (17, 9))
    ]
    probes += [probes[0].convert("L"), probes[1].convert("RGBA"), probes[0].convert("P")]
    for image in probes:
        if not np.array_equal(ours(image), preprocess(image).numpy()):
            raise MmsearchError(f"the torch-free image preprocessing does not reproduce {cfg}")
    return ours.config()


def load_embedder(spec: ModelSpec, device: str = "auto", batch_size: int = 32) -> ClipEmbedder:
    return ClipEmbedder(spec, device=device, batch_size=batch_size)


def export_towers(spec: ModelSpec, cache_dir: Path, *, quantize: bool = True) -> bool:
    """Export the ONNX towers and the manifest of ``spec``'s model into ``cache_dir``, as the first indexing
    run does; True when the model can then run without torch."""
    embedder = ClipEmbedder(spec, device="cpu")
    return (
        embedder.use_onnx_image_tower(quantize=quantize, cache_dir=cache_dir)
        and embedder._text_tower() is not None
    )


def _ship_demo() -> None:
    """Replace the demo model's shipped exports (``mmsearch/demo/weights/onnx``) with fresh ones."""
    from mmsearch.onnx_embedder import PACKAGED_EXPORTS

    PACKAGED_EXPORTS.mkdir(parents=True, exist_ok=True)
    for old in PACKAGED_EXPORTS.iterdir():
        old.unlink()
    if not export_towers(ModelSpec("demo"), PACKAGED_EXPORTS, quantize=True):
        raise SystemExit("the demo model could not be exported for torch-free use")
    print("\n".join(sorted(p.name for p in PACKAGED_EXPORTS.iterdir())))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Maintenance of the ONNX exports shipped in the package.")
    parser.add_argument("--ship-demo", action="store_true", help=_ship_demo.__doc__)
    if parser.parse_args().ship_demo:
        logging.basicConfig(level=logging.INFO)
        _ship_demo()
    else:
        parser.print_help()
