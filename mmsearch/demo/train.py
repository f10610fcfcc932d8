"""Train the small demo CLIP on the generated world, on CPU.

    python -m mmsearch.demo.train --out DIR --seed 0     # the defaults are the shipped model's settings

writes ``DIR/mmsearch-demo.json`` (a plain OpenCLIP model config) and ``DIR/mmsearch-demo.safetensors``
(float16 state dict), loadable exactly as the engine loads them: ``open_clip.add_model_config(json)``,
``open_clip.create_model_and_transforms("mmsearch-demo")``, ``load_state_dict``. Images are fed through
the eval transform that call returns, so training sees what the engine will feed the model. The run is
reproducible from ``--seed`` as long as ``--minutes`` does not cut it short (the schedule is in steps).

The loss is CLIP's symmetric contrastive loss with *several* positives: a caption that leaves attributes
out ("a red circle") is a correct caption for every red-circle image in the batch, so the targets spread
over every pair that :func:`mmsearch.demo.world.matches` accepts instead of only the diagonal. Batches pair
each sampled image with a sibling that differs in exactly one attribute, which gives hard negatives.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mmsearch.demo import world

logger = logging.getLogger(__name__)

MODEL_NAME = "mmsearch-demo"

# A small ModifiedResNet (open_clip's "RN" tower) at 64 px: on this CPU budget a ViT of the same cost
# (64 px, 16 px patches) learnt colour, size, count and background but left shape near chance after 700
# steps, while the conv net learns shape within ~300. ~4.7 M parameters, 9.4 MB in float16; most of the
# text side is the 49408 x 64 token embedding the standard tokenizer forces on us.
DEFAULT_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {
        "image_size": 64,
        "layers": [1, 1, 1, 1],
        "width": 16,
        "head_width": 64,
        "patch_size": None,
    },
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
# For tests: trains a few steps in seconds.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
CONFIGS = {"default": DEFAULT_CONFIG, "tiny": TINY_CONFIG}

_ATTR_VALUES: dict[str, list[Any]] = {
    "colour": list(world.COLOURS),
    "shape": list(world.SHAPES),
    "size": list(world.SIZES),
    "count": list(world.COUNTS),
    "background": list(world.BACKGROUNDS),
}


@dataclass
class Settings:
    steps: int = 500  # length of the cosine schedule
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 40
    weight_decay: float = 0.1
    seed: int = 0
    per_combo: int = 24  # images rendered per attribute combination for the training pool
    token_noise: float = 0.15  # chance to insert one random vocabulary token into a caption
    minutes: float = 30.0  # wall-clock cap; the run stops early (and says so) when it is reached
    # Stop after this many steps (0 = run the whole schedule), keeping the schedule of `steps`. The shipped
    # model is the full 500-step schedule: 818 s of training on this 2-core machine while it was shared.
    stop_after: int = 0
    eval_images: int = 432
    threads: int = 1  # torch CPU threads; 0 = torch's default. One is faster on a busy machine (see train)
    aux_weight: float = 0.5  # weight of the attribute-prediction heads (training only; see _AttributeHeads)
    eval_every: int = 100  # also evaluate on 216 held-out images every this many steps; 0 = never


def attribute_codes(attrs: world.Attributes) -> list[int]:
    return [_ATTR_VALUES[name].index(getattr(attrs, name)) for name in world.ATTRIBUTE_NAMES]


def stated_codes(stated: dict[str, Any]) -> list[int]:
    """Attribute codes of a caption, -1 where the caption says nothing."""
    return [_ATTR_VALUES[n].index(stated[n]) if n in stated else -1 for n in world.ATTRIBUTE_NAMES]


def positive_mask(image_codes: torch.Tensor, text_codes: torch.Tensor) -> torch.Tensor:
    """``[images, texts]`` bool: the image has every attribute the text states (see ``world.matches``)."""
    t = text_codes[None, :, :]
    return ((t == -1) | (t == image_codes[:, None, :])).all(-1)


def multi_positive_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    logits = logit_scale * image_features @ text_features.T
    target = mask.float()
    loss_i2t = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    loss_t2i = -(target / target.sum(0, keepdim=True) * F.log_softmax(logits, 0)).sum(0).mean()
    return (loss_i2t + loss_t2i) / 2


def build(config_path: Path) -> tuple[torch.nn.Module, Any, Any]:
    """Model, eval transform and tokenizer, made exactly the way the engine makes them."""
    open_clip.add_model_config(config_path)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=None)
    return model, preprocess, open_clip.get_tokenizer(MODEL_NAME)


def render_pool(
    preprocess: Any, per_combo: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Pre-render ``per_combo`` images of every attribute combination through the eval transform."""
    rng = random.Random(f"mmsearch-demo-train-pool-{seed}")
    combos = world.all_attributes()
    tensors: list[torch.Tensor] = []
    codes: list[list[int]] = []
    by_combo: list[list[int]] = []
    for attrs in combos:
        by_combo.append([])
        for _ in range(per_combo):
            by_combo[-1].append(len(tensors))
            tensors.append(preprocess(world.render(attrs, rng)).half())
            codes.append(attribute_codes(attrs))
    return torch.stack(tensors), torch.tensor(codes), by_combo


def _sample_batch(
    rng: random.Random, by_combo: list[list[int]], batch_size: int
) -> tuple[list[int], list[world.Attributes]]:
    combos = world.all_attributes()
    index = {a: i for i, a in enumerate(combos)}
    picked: list[world.Attributes] = []
    while len(picked) < batch_size:
        anchor = rng.choice(combos)
        name = rng.choice(world.ATTRIBUTE_NAMES)
        other = rng.choice([v for v in _ATTR_VALUES[name] if v != getattr(anchor, name)])
        sibling = world.Attributes(**(anchor.as_dict() | {name: other}))
        picked += [anchor, sibling]
    picked = picked[:batch_size]
    return [rng.choice(by_combo[index[a]]) for a in picked], picked


def _add_token_noise(tokens: torch.Tensor, rng: random.Random, p: float, eot: int) -> torch.Tensor:
    """Insert a random vocabulary token into some captions, so words never seen in training (and Whisper's
    stray words) are learnt to be ignorable rather than left as untrained embeddings."""
    tokens = tokens.clone()
    for row in tokens:
        if rng.random() >= p:
            continue
        end = int((row == eot).nonzero()[0])
        if end + 1 >= row.numel():
            continue
        pos = rng.randint(1, end)
        row[pos + 1 : end + 2] = row[pos : end + 1].clone()
        row[pos] = rng.randrange(300, eot - 1)
    return tokens


class _AttributeHeads(torch.nn.Module):
    """Linear probes that predict each attribute from the image embedding and each *stated* attribute (or
    "not stated") from the text embedding. Training-only: they are not saved. Their loss gives every
    attribute a direct gradient, which makes the small model learn the finer ones (count, size) in far
    fewer CPU steps than the contrastive loss alone."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        sizes = [len(_ATTR_VALUES[n]) for n in world.ATTRIBUTE_NAMES]
        self.image = torch.nn.ModuleList(torch.nn.Linear(dim, n) for n in sizes)
        self.text = torch.nn.ModuleList(torch.nn.Linear(dim, n + 1) for n in sizes)

    def loss(
        self, img_f: torch.Tensor, txt_f: torch.Tensor, img_codes: torch.Tensor, txt_codes: torch.Tensor
    ) -> torch.Tensor:
        # Features are unit-length; the factor gives the probes a usable logit range from the start.
        parts = [F.cross_entropy(head(img_f * 10), img_codes[:, i]) for i, head in enumerate(self.image)]
        parts += [F.cross_entropy(head(txt_f * 10), txt_codes[:, i] + 1) for i, head in enumerate(self.text)]
        return torch.stack(parts).mean()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Gains, biases, embeddings and the temperature are not decayed (as in open_clip's trainer).
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or "class_embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def embed_images(model: Any, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    out = [
        model.encode_image(pixels[i : i + batch].float(), normalize=True)
        for i in range(0, len(pixels), batch)
    ]
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model: Any, tokenizer: Any, texts: Sequence[str], batch: int = 256) -> torch.Tensor:
    out = [
        model.encode_text(tokenizer(list(texts[i : i + batch])), normalize=True)
        for i in range(0, len(texts), batch)
    ]
    return torch.cat(out)


@torch.no_grad()
def evaluate(
    model: Any, preprocess: Any, tokenizer: Any, n_images: int = 432, seed: int = 1000
) -> dict[str, float]:
    """Held-out seed, held-out phrasing: the same three retrieval figures as the benchmark, text-only.

    t2i_p1: each distinct full caption (all five attributes) → top image must match it.
    i2t_r1: each image → top caption among the distinct full captions must match it.
    t2i_p5_colour_shape: "an image with a red circle" style queries, precision of the top five.
    """
    model.eval()
    data = world.generate(n_images, seed)
    attrs = [a for a, _ in data]
    img = embed_images(model, torch.stack([preprocess(im) for _, im in data]))
    captions = world.distinct_captions(world.held_out_caption(a) for a in attrs)
    txt = embed_texts(model, tokenizer, [c.text for c in captions])
    sims = txt @ img.T
    top_img = sims.argmax(1).tolist()
    t2i = sum(world.matches(c.stated, attrs[i]) for c, i in zip(captions, top_img)) / len(captions)
    top_txt = sims.argmax(0).tolist()
    i2t = sum(world.matches(captions[j].stated, a) for a, j in zip(attrs, top_txt)) / len(attrs)
    partial = world.distinct_captions(world.held_out_caption(a, stated=()) for a in attrs)
    ptxt = embed_texts(model, tokenizer, [c.text for c in partial])
    top5 = (ptxt @ img.T).topk(5, dim=1).indices.tolist()
    p5 = sum(world.matches(c.stated, attrs[i]) for c, row in zip(partial, top5) for i in row) / (
        5 * len(partial)
    )
    return {"t2i_p1": t2i, "i2t_r1": i2t, "t2i_p5_colour_shape": p5}


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    # float16 halves the file (the token embedding dominates); the loader casts back to the model dtype.
    state = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(path), metadata=metadata)


def train(out: Path, config: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Train, save the two files into ``out`` and return a log (losses, evaluation, timings)."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / f"{MODEL_NAME}.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if settings.threads:
        # On a busy machine one thread beats two: OpenMP workers wait on each other when descheduled.
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = random.Random(f"mmsearch-demo-train-{settings.seed}")
    model, preprocess, tokenizer = build(config_path)
    pixels, codes, by_combo = render_pool(preprocess, settings.per_combo, settings.seed)
    logger.info("rendered %d training images in %.0fs", len(pixels), time.monotonic() - started)

    heads = _AttributeHeads(config["embed_dim"])
    groups = _param_groups(model, settings.weight_decay)
    groups[1]["params"] += list(heads.parameters())
    opt = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return settings.lr * (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return settings.lr * 0.5 * (1 + math.cos(math.pi * progress))

    eot = tokenizer.eot_token_id
    losses: list[float] = []
    evals: list[dict[str, float]] = []
    deadline = started + settings.minutes * 60
    model.train()
    step = 0
    for step in range(settings.steps):
        if settings.stop_after and step >= settings.stop_after:
            break
        if time.monotonic() > deadline:
            logger.warning(
                "time cap of %.1f min reached after %d of %d steps", settings.minutes, step, settings.steps
            )
            break
        idx, attrs = _sample_batch(rng, by_combo, settings.batch_size)
        images = pixels[idx].float()
        flip = torch.tensor([rng.random() < 0.5 for _ in idx])
        images[flip] = images[flip].flip(-1)  # a mirrored image shows the same attributes
        captions = [world.training_caption(a, rng) for a in attrs]
        tokens = _add_token_noise(tokenizer([c.text for c in captions]), rng, settings.token_noise, eot)
        txt_codes = torch.tensor([stated_codes(dict(c.stated)) for c in captions])
        mask = positive_mask(codes[idx], txt_codes)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        img_f, txt_f, scale = model(images, tokens)[:3]
        loss = multi_positive_clip_loss(img_f, txt_f, scale, mask)
        if settings.aux_weight:
            loss = loss + settings.aux_weight * heads.loss(img_f, txt_f, codes[idx], txt_codes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            cast(torch.Tensor, model.logit_scale).clamp_(0, math.log(100))
        losses.append(loss.item())
        if settings.eval_every and step and step % settings.eval_every == 0:
            metrics = evaluate(model, preprocess, tokenizer, n_images=216, seed=settings.seed + 2000)
            evals.append({"step": step, **metrics})
            logger.info("step %d held-out evaluation: %s", step, metrics)
            model.train()
        if step % 25 == 0 or step == settings.steps - 1:
            logger.info(
                "step %d/%d loss %.4f (%.0fs)", step, settings.steps, losses[-1], time.monotonic() - started
            )
    steps_done = len(losses)
    train_seconds = time.monotonic() - started
    metrics = evaluate(model, preprocess, tokenizer, n_images=settings.eval_images, seed=settings.seed + 1000)
    logger.info("held-out evaluation: %s", metrics)
    log = {
        "settings": asdict(settings),
        "steps_done": steps_done,
        "train_seconds": round(train_seconds, 1),
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "losses": losses,
        "eval": metrics,
        "evals_during_training": evals,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    meta = {k: str(log[k]) for k in ("steps_done", "train_seconds", "final_loss", "torch", "open_clip")}
    meta["seed"] = str(settings.seed)
    save_weights(model, out / f"{MODEL_NAME}.safetensors", meta)
    return log


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m mmsearch.demo.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the config, weights and log")
    parser.add_argument("--config", default="default", help="'default', 'tiny' or a path to a config JSON")
    defaults = Settings()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = CONFIGS[args.config] if args.config in CONFIGS else json.loads(Path(args.config).read_text())
    settings = Settings(**{name: getattr(args, name) for name in asdict(defaults)})
    log = train(args.out, config, settings)
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


if __name__ == "__main__":
    main()
