"""Model loading: local checkpoints (safetensors, weights-only torch files), no pickle, clear missing-weights errors."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mmsearch.clip_torch import load_embedder
from mmsearch.errors import MmsearchError, WeightsUnavailableError
from mmsearch.identity import ModelSpec
from tests.conftest import TINY_MODEL


@pytest.fixture(scope="module")
def random_tiny():  # type: ignore[no-untyped-def]
    return load_embedder(ModelSpec(TINY_MODEL, pretrained="random"))


def test_embeddings_are_unit_vectors_of_the_model_dimension(random_tiny) -> None:  # type: ignore[no-untyped-def]
    images = random_tiny.embed_images([Image.new("RGB", (50, 30), c) for c in ("red", "blue", "green")])
    texts = random_tiny.embed_texts(["a", "b"])
    assert images.shape == (3, 32) and texts.shape == (2, 32)
    assert images.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-5)
    assert random_tiny.embed_texts([]).shape == (0, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_safetensors_checkpoint_round_trip(random_tiny, tmp_path: Path, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in random_tiny.model.state_dict().items()}, str(path))
    loaded = load_embedder(ModelSpec(TINY_MODEL, checkpoint=str(path)))
    assert loaded.identity["checkpoint_sha256"] and loaded.identity["pretrained"] is None
    a = random_tiny.embed_texts(["a red circle", "two blue squares"])
    b = loaded.embed_texts(["a red circle", "two blue squares"])
    np.testing.assert_allclose(a, b, atol=1e-6 if dtype == torch.float32 else 5e-3)


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {os.environ['MMSEARCH_TEST_MARKER']}",))


def test_pickled_code_in_a_checkpoint_is_never_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MMSEARCH_TEST_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(MmsearchError):
        load_embedder(ModelSpec(TINY_MODEL, checkpoint=str(path)))
    assert not marker.exists()


def test_missing_checkpoint_and_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="checkpoint not found"):
        load_embedder(ModelSpec(TINY_MODEL, checkpoint=str(tmp_path / "nope.safetensors")))
    with pytest.raises(MmsearchError, match="unknown model architecture"):
        load_embedder(ModelSpec("ViT-Nope-99"))
    with pytest.raises(MmsearchError, match="unknown pretrained tag"):
        load_embedder(ModelSpec("ViT-B-32", pretrained="no_such_tag"))


@pytest.mark.parametrize("offline_flag", [True, False])
def test_uncached_pretrained_weights_fail_fast_and_say_what_to_do(
    monkeypatch: pytest.MonkeyPatch, offline_flag: bool
) -> None:
    # No network here: with or without HF_HUB_OFFLINE the error comes at once, not after the hub's retries.
    if offline_flag:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as err:
        load_embedder(ModelSpec("ViT-B-32", pretrained="laion2b_s34b_b79k"))
    assert time.monotonic() - start < 15
    assert "--checkpoint" in str(err.value) and "cannot be reached" in str(err.value)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (640, 480), (200, 30, 90)),  # landscape: resized, then centre-cropped
        Image.fromarray(
            np.random.default_rng(0).integers(0, 256, (300, 171, 3), np.uint8)
        ),  # noise, portrait
        Image.fromarray(
            np.random.default_rng(1).integers(0, 256, (64, 64), np.uint8), "L"
        ),  # grey: converted
        Image.new("RGBA", (100, 120), (10, 200, 30, 128)),
    ],
)
def test_preprocessing_in_numpy_equals_the_models_own_transform(random_tiny, image: Image.Image) -> None:  # type: ignore[no-untyped-def]
    """The numpy tail (to tensor, normalise) gives exactly the tensor OpenCLIP's transform gives."""
    assert random_tiny._norm is not None  # OpenCLIP's transforms end with ToTensor + Normalize
    ours, theirs = random_tiny.preprocess_image(image), random_tiny.preprocess(image)
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


def test_an_unusual_transform_runs_as_given(random_tiny, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from mmsearch.clip_torch import _split_tensor_tail

    plain = lambda im: torch.zeros(3, 8, 8)  # noqa: E731 - a transform without ToTensor + Normalize
    assert _split_tensor_tail(plain) == ([], None)
    monkeypatch.setattr(random_tiny, "preprocess", plain)
    monkeypatch.setattr(random_tiny, "_norm", None)
    assert torch.equal(random_tiny.preprocess_image(Image.new("RGB", (8, 8))), torch.zeros(3, 8, 8))
