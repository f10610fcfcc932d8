"""The demo CLIP: its training script still trains, and the shipped weights load and retrieve correctly.

Both go through the loading contract the engine uses: ``open_clip.add_model_config(json)``,
``create_model_and_transforms("mmsearch-demo", pretrained=None)``, the safetensors state dict cast to the
model's dtype, the eval transform and ``open_clip.get_tokenizer("mmsearch-demo")``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from mmsearch.demo import train, world

WEIGHTS = Path(train.__file__).parent / "weights"


def _load_by_contract(json_path: Path, weights_path: Path):
    open_clip.add_model_config(json_path)
    model, _, preprocess = open_clip.create_model_and_transforms("mmsearch-demo", pretrained=None)
    dtype = next(model.parameters()).dtype
    state = {k: v.to(dtype) for k, v in load_file(str(weights_path)).items()}
    model.load_state_dict(state)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer("mmsearch-demo")


def test_multi_positive_mask_follows_the_relevance_rule() -> None:
    imgs = [
        world.Attributes("red", "circle", "small", 2, "white"),
        world.Attributes("blue", "circle", "large", 1, "gray"),
    ]
    caps = [
        world.describe(imgs[0], phrasing="bare", stated=()),  # "red circles": only the first image
        world.Caption("a circle", {"shape": "circle"}, "bare"),  # both
        world.describe(imgs[1], phrasing="on_background"),  # every attribute of the second
    ]
    mask = train.positive_mask(
        torch.tensor([train.attribute_codes(a) for a in imgs]),
        torch.tensor([train.stated_codes(dict(c.stated)) for c in caps]),
    )
    expected = [[world.matches(c.stated, a) for c in caps] for a in imgs]
    assert mask.tolist() == expected == [[True, True, False], [False, True, True]]


def test_training_script_runs_loss_falls_and_output_loads(tmp_path: Path) -> None:
    out = tmp_path / "run"
    log = train.main(
        [
            "--out",
            str(out),
            "--config",
            "tiny",
            "--seed",
            "0",
            "--steps",
            "30",
            "--batch-size",
            "48",
            "--per-combo",
            "1",
            "--lr",
            "0.003",
            "--warmup",
            "3",
            "--eval-images",
            "48",
        ]
    )
    losses = log["losses"]
    assert log["steps_done"] == 30 and len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
    assert json.loads((out / "mmsearch-demo.json").read_text()) == train.TINY_CONFIG  # nothing else in it
    assert set(json.loads((out / "train_log.json").read_text())["eval"]) == {
        "t2i_p1",
        "i2t_r1",
        "t2i_p5_colour_shape",
    }
    model, preprocess, tokenizer = _load_by_contract(
        out / "mmsearch-demo.json", out / "mmsearch-demo.safetensors"
    )
    assert preprocess.transforms[0].size == 32
    # The same seed reproduces the run: a 3-step rerun with the same schedule start gives the same losses.
    again = train.main(
        [
            "--out",
            str(tmp_path / "again"),
            "--config",
            "tiny",
            "--seed",
            "0",
            "--steps",
            "3",
            "--batch-size",
            "48",
            "--per-combo",
            "1",
            "--lr",
            "0.003",
            "--warmup",
            "3",
            "--eval-images",
            "8",
            "--threads",
            "1",
        ]
    )
    assert again["losses"] == losses[:3]


@pytest.fixture(scope="module")
def shipped():
    json_path, weights_path = WEIGHTS / "mmsearch-demo.json", WEIGHTS / "mmsearch-demo.safetensors"
    assert weights_path.stat().st_size <= 15 * 1024 * 1024
    assert set(json.loads(json_path.read_text())) <= {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
    return _load_by_contract(json_path, weights_path)


def test_shipped_weights_find_the_obvious_images(shipped) -> None:
    model, preprocess, tokenizer = shipped
    rng = random.Random(123)  # pictures the model never saw in training
    attrs = [
        world.Attributes("red", "circle", "large", 1, "white"),
        world.Attributes("blue", "square", "small", 2, "gray"),
        world.Attributes("green", "triangle", "large", 3, "black"),
        world.Attributes("yellow", "star", "small", 1, "white"),
        world.Attributes("red", "square", "large", 2, "black"),
        world.Attributes("blue", "circle", "small", 3, "white"),
    ]
    pixels = torch.stack([preprocess(world.render(a, rng)) for a in attrs])
    img = train.embed_images(model, pixels)
    queries = [
        "a red circle",
        "blue squares",
        "A green triangle.",
        "an image with a yellow star",
        "two large red squares on a black background",
    ]
    txt = train.embed_texts(model, tokenizer, queries)
    assert (txt @ img.T).argmax(1).tolist() == [0, 1, 2, 3, 4]
    # Image → text: each picture's own full caption beats the others'.
    captions = [world.held_out_caption(a).text for a in attrs]
    cap = train.embed_texts(model, tokenizer, captions)
    assert (img @ cap.T).argmax(1).tolist() == list(range(len(attrs)))
