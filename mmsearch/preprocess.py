"""OpenCLIP's evaluation image transform with Pillow and numpy only (no torch, no torchvision).

OpenCLIP builds it from the model's ``preprocess_cfg`` (``open_clip.transform.image_transform``):

* ``shortest`` (the default): resize so that the shorter side fits (Pillow resize, as torchvision does for a
  PIL image), then a centre crop;
* ``longest``: resize so that the longer side fits, then a centre crop that pads with ``fill_color``;
* ``squash``: resize to the target size, aspect ratio ignored;

then convert to RGB, scale to [0, 1] and normalise by ``mean``/``std``. The same Pillow calls as torchvision
make the same pixels: the ONNX export records the configuration and checks, on probe images of several
shapes and modes, that this module's output equals the torch transform's before the configuration is
used without torch (see :func:`mmsearch.clip_torch.torch_free_manifest`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # Pillow is imported when an image comes: a text query reads this module, never an image
    from PIL import Image

RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")  # names of PIL.Image.Resampling members


class ImagePreprocess:
    """A PIL image → ``[3, H, W]`` float32 array, normalised as the model expects."""

    def __init__(
        self,
        size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
        fill_color: int = 0,
    ) -> None:
        h, w = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if resize_mode not in RESIZE_MODES or interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unsupported preprocessing: resize {resize_mode!r}, interpolation {interpolation!r}"
            )
        self.size = (h, w)
        self._settings = {"mean": [float(x) for x in mean], "std": [float(x) for x in std]}
        self.mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(-1, 1, 1)
        self.interpolation = interpolation
        self.resize_mode = resize_mode
        self.fill_color = int(fill_color)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ImagePreprocess:
        return cls(
            cfg["size"],
            cfg["mean"],
            cfg["std"],
            cfg.get("interpolation", "bicubic"),
            cfg.get("resize_mode", "shortest"),
            cfg.get("fill_color", 0),
        )

    def config(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            **self._settings,
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "fill_color": self.fill_color,
        }

    @property
    def input_size(self) -> int:
        return max(self.size)

    def pil_steps(self, image: Image.Image) -> Image.Image:
        """Resize and crop (or pad), then RGB: everything before the conversion to numbers."""
        h, w = self.size
        if self.resize_mode == "squash":
            image = _resize(image, (h, w), self.interpolation)
        elif self.resize_mode == "shortest" and h == w:
            image = _resize(image, _shorter_side_to(image, h), self.interpolation)
            image = _center_crop(image, (h, w), 0)
        else:
            # open_clip's ResizeKeepRatio (bicubic whatever the configuration says for "shortest" on a
            # non-square target, as open_clip does), then CenterCrop / CenterCropOrPad.
            longest = 1.0 if self.resize_mode == "longest" else 0.0
            interpolation = self.interpolation if self.resize_mode == "longest" else "bicubic"
            image = _resize(image, _keep_ratio(image, (h, w), longest), interpolation)
            image = _center_crop(image, (h, w), self.fill_color if self.resize_mode == "longest" else 0)
        return image if image.mode == "RGB" else image.convert("RGB")

    def __call__(self, image: Image.Image) -> np.ndarray:
        pixels = np.asarray(self.pil_steps(image), dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
        return (pixels - self.mean) / self.std


def _resize(image: Image.Image, hw: tuple[int, int], interpolation: str) -> Image.Image:
    h, w = hw
    if image.size == (w, h):
        return image  # torchvision returns the image untouched when the size already matches
    from PIL import Image

    return image.resize((w, h), Image.Resampling[interpolation.upper()])


def _shorter_side_to(image: Image.Image, side: int) -> tuple[int, int]:
    """torchvision's output size for ``Resize(int)``: the shorter side becomes ``side``, the ratio kept."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(side * long / short)
    return (new_long, side) if w <= h else (side, new_long)


def _keep_ratio(image: Image.Image, target: tuple[int, int], longest: float) -> tuple[int, int]:
    w, h = image.size
    ratio_h, ratio_w = h / target[0], w / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(h / ratio), round(w / ratio)


def _center_crop(image: Image.Image, hw: tuple[int, int], fill: int) -> Image.Image:
    """torchvision's ``center_crop`` (pads with ``fill`` where the image is smaller), on a PIL image."""
    th, tw = hw
    w, h = image.size
    if tw > w or th > h:
        border = (
            (tw - w) // 2 if tw > w else 0,
            (th - h) // 2 if th > h else 0,
            (tw - w + 1) // 2 if tw > w else 0,
            (th - h + 1) // 2 if th > h else 0,
        )
        from PIL import ImageOps

        # torchvision's pad of a PIL image: ImageOps.expand, the palette of a "P" image kept.
        palette = image.getpalette() if image.mode == "P" else None
        image = ImageOps.expand(image, border=border, fill=_fill(image, fill))
        if palette is not None:
            image.putpalette(palette)
        w, h = image.size
        if w == tw and h == th:
            return image
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return image.crop((left, top, left + tw, top + th))


def _fill(image: Image.Image, fill: int) -> Any:
    bands = len(image.getbands())
    return fill if bands == 1 else (fill,) * bands
