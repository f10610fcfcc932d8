"""A small generated world of coloured shapes, its captions, and the demo folder built from it.

Every image shows ``count`` copies of one shape in one colour and size on a plain background. Captions
describe an image in one of several *phrasings* and may leave attributes out ("a red circle" says nothing
about size, count or background); :class:`Caption` records which attributes a text states, and
:func:`matches` decides whether an image agrees with them. That is the relevance rule of the quality
benchmark: a hit counts when the image has every attribute the query states.

One phrasing, :data:`HELD_OUT_PHRASING`, is never produced by :func:`training_caption`; it exists for
evaluation only. Everything is deterministic given a seed (``random.Random``, no global state).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

if TYPE_CHECKING:  # mmsearch.demo.videos imports this module
    from mmsearch.demo.videos import VideoTruth

logger = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 210, 30),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
COUNTS: tuple[int, ...] = (1, 2, 3)
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 248),
    "gray": (128, 128, 128),
    "black": (18, 18, 18),
}
ATTRIBUTE_NAMES: tuple[str, ...] = ("colour", "shape", "size", "count", "background")
# Attributes a caption may leave out; colour and shape are always said.
OPTIONAL_ATTRIBUTES: tuple[str, ...] = ("size", "count", "background")

IMAGE_SIZE = 256  # pixels of a generated image; the model's eval transform resizes it

# Ways of saying an attribute in training captions. Whisper writes digits for some numbers and may spell
# "grey", so both appear; "a"/"the" before a noun say nothing about the count.
_COUNT_WORDS: dict[int, tuple[str, ...]] = {
    1: ("one", "1", "a single", "one single"),
    2: ("two", "2", "a pair of"),
    3: ("three", "3"),
}
_SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "white": ("white",),
    "gray": ("gray", "grey"),
    "black": ("black",),
}
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}

HELD_OUT_PHRASING = "image_with"
TRAINING_PHRASINGS: tuple[str, ...] = (
    "bare",
    "on_background",
    "picture_of",
    "background_with",
    "and_background",
    "comma_background",
)


@dataclass(frozen=True)
class Attributes:
    """What one generated image shows."""

    colour: str
    shape: str
    size: str
    count: int
    background: str

    def as_dict(self) -> dict[str, str | int]:
        return {name: getattr(self, name) for name in ATTRIBUTE_NAMES}


@dataclass(frozen=True)
class Caption:
    """A text about an image and the attributes it states (the relevance rule needs both)."""

    text: str
    stated: Mapping[str, str | int]
    phrasing: str


def matches(stated: Mapping[str, str | int], attributes: Attributes) -> bool:
    """True when the image has every attribute the query/caption states."""
    return all(getattr(attributes, name) == value for name, value in stated.items())


def sample_attributes(rng: random.Random) -> Attributes:
    return Attributes(
        colour=rng.choice(list(COLOURS)),
        shape=rng.choice(SHAPES),
        size=rng.choice(SIZES),
        count=rng.choice(COUNTS),
        background=rng.choice(list(BACKGROUNDS)),
    )


def all_attributes() -> list[Attributes]:
    """Every attribute combination of the world (432 of them)."""
    return [
        Attributes(c, s, z, n, b)
        for c in COLOURS
        for s in SHAPES
        for z in SIZES
        for n in COUNTS
        for b in BACKGROUNDS
    ]


# --------------------------------------------------------------------------------------------- captions


def _with_article(article: str, rest: str) -> str:
    if article == "a" and rest[:1] in "aeiou":
        article = "an"
    return f"{article} {rest}".strip()


def _noun_phrase(attrs: Attributes, stated: Iterable[str], rng: random.Random | None) -> str:
    """``[count] [size] colour shape(s)``; ``rng=None`` gives the canonical (held-out) wording."""
    stated = set(stated)
    pick: Callable[[tuple[str, ...]], str] = (lambda xs: xs[0]) if rng is None else rng.choice
    noun = attrs.shape if attrs.count == 1 else _PLURAL[attrs.shape]
    words = [attrs.colour, noun]
    if "size" in stated:
        words.insert(0, pick(_SIZE_WORDS[attrs.size]))
    rest = " ".join(words)
    if "count" in stated:
        return f"{pick(_COUNT_WORDS[attrs.count])} {rest}"
    if rng is None:
        article = "a" if attrs.count == 1 else ""
    else:
        article = rng.choice(("a", "a", "", "the")) if attrs.count == 1 else rng.choice(("", "", "the"))
    return _with_article(article, rest)


def _phrase(phrasing: str, np: str, bg: str | None, rng: random.Random | None) -> str:
    def pick(*options: str) -> str:
        return options[0] if rng is None else rng.choice(options)

    if phrasing == HELD_OUT_PHRASING:
        return f"an image with {np}" + (f" over a {bg} background" if bg else "")
    if phrasing == "bare":
        return np if bg is None else f"{np} {pick('on', 'in')} {bg}"
    if phrasing == "on_background":
        tail = f" on {pick('a ', '', 'the ')}{bg} background" if bg else ""
        return np + tail
    if phrasing == "picture_of":
        head = pick("a picture of", "picture of", "a photo of", "an image of", "the picture of", "image of")
        tail = f" on {pick('a ', '', 'the ')}{bg} background" if bg else ""
        return f"{head} {np}{tail}"
    if phrasing == "background_with":
        if bg is None:
            return f"{pick('with', 'showing', 'there is')} {np}"
        return f"{pick('a ', '', 'the ')}{bg} background with {np}"
    if phrasing == "and_background":
        return np if bg is None else f"{np} and {pick('a ', '', 'the ')}{bg} background"
    if phrasing == "comma_background":
        return np if bg is None else f"{np}, {bg} background"
    raise ValueError(f"unknown phrasing {phrasing!r}")


def describe(
    attrs: Attributes,
    *,
    phrasing: str,
    stated: Iterable[str] = OPTIONAL_ATTRIBUTES,
    rng: random.Random | None = None,
) -> Caption:
    """Caption ``attrs`` in ``phrasing``, stating colour, shape and the optional attributes in ``stated``.

    With ``rng`` the wording varies (synonyms, digits, articles, punctuation); without it the wording is
    canonical, which is what evaluation and the demo folder use.
    """
    extra = [name for name in OPTIONAL_ATTRIBUTES if name in set(stated)]
    np = _noun_phrase(attrs, extra, rng)
    bg = None
    if "background" in extra:
        words = _BACKGROUND_WORDS[attrs.background]
        bg = words[0] if rng is None else rng.choice(words)
    text = _phrase(phrasing, np, bg, rng)
    if rng is not None:
        # Whisper capitalises and punctuates; the tokenizer lower-cases, but the full stop is a token.
        if rng.random() < 0.4:
            text += "."
        if rng.random() < 0.3:
            text = text[:1].upper() + text[1:]
    stated_map = {"colour": attrs.colour, "shape": attrs.shape} | {n: getattr(attrs, n) for n in extra}
    return Caption(text=text, stated=stated_map, phrasing=phrasing)


# Whisper tiny.en hears a sentence-initial "an"/"a" as "and"/"and the", and loses little words.
_SPOKEN_PREFIXES = ("and", "and the", "the", "so")
_FUNCTION_WORDS = {"a", "an", "the", "on", "of", "with", "and", "in"}


def training_caption(attrs: Attributes, rng: random.Random) -> Caption:
    """A random training caption: a training phrasing, a random subset of optional attributes, and
    sometimes the slips speech recognition makes (a stray leading "and", a dropped article)."""
    stated = [name for name in OPTIONAL_ATTRIBUTES if rng.random() < 0.6]
    caption = describe(attrs, phrasing=rng.choice(TRAINING_PHRASINGS), stated=stated, rng=rng)
    text = caption.text
    if rng.random() < 0.15:
        text = f"{rng.choice(_SPOKEN_PREFIXES)} {text[:1].lower()}{text[1:]}"
    if rng.random() < 0.1:
        words = text.split(" ")
        droppable = [i for i, w in enumerate(words) if w.lower() in _FUNCTION_WORDS]
        if droppable and len(words) > 2:
            del words[rng.choice(droppable)]
            text = " ".join(words)
    return Caption(text=text, stated=caption.stated, phrasing=caption.phrasing)


def held_out_caption(attrs: Attributes, stated: Iterable[str] = OPTIONAL_ATTRIBUTES) -> Caption:
    """The evaluation-only phrasing, canonical wording."""
    return describe(attrs, phrasing=HELD_OUT_PHRASING, stated=stated)


#: The optional attributes a held-out query states (:func:`held_out_queries`): none, one, or all of them.
QUERY_STATED: tuple[tuple[str, ...], ...] = ((), ("size",), ("count",), ("background",), OPTIONAL_ATTRIBUTES)


def held_out_queries(present: Iterable[Attributes]) -> list[Caption]:
    """The distinct held-out captions of the ``present`` attribute sets, each stating none, one or all of the
    optional attributes (:data:`QUERY_STATED`): the text queries of a retrieval measurement."""
    shown = set(present)
    return distinct_captions(
        held_out_caption(a, stated) for a in all_attributes() if a in shown for stated in QUERY_STATED
    )


def distinct_captions(captions: Iterable[Caption]) -> list[Caption]:
    """Captions with distinct texts, in first-seen order."""
    seen: dict[str, Caption] = {}
    for caption in captions:
        seen.setdefault(caption.text, caption)
    return list(seen.values())


# --------------------------------------------------------------------------------------------- images


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        half = r * 0.85
        pts = [(x * half, y * half) for x, y in corners]
    elif shape == "triangle":
        rr = r * 1.1
        pts = [(rr * math.sin(a), -rr * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
        cy += r * 0.15  # a triangle's centroid sits low; centre it visually in its slot
    elif shape == "star":
        outer, inner = r * 1.15, r * 0.5
        pts = [
            (
                (outer if i % 2 == 0 else inner) * math.sin(i * math.pi / 5),
                -(outer if i % 2 == 0 else inner) * math.cos(i * math.pi / 5),
            )
            for i in range(10)
        ]
    else:
        raise ValueError(shape)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)
    return (r, g, b)


def render(attrs: Attributes, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``attrs`` as an RGB image; ``rng`` decides positions, exact radii, rotation and tints."""
    img = Image.new("RGB", (size, size), _jitter(BACKGROUNDS[attrs.background], rng, 8))
    draw = ImageDraw.Draw(img)
    colour = _jitter(COLOURS[attrs.colour], rng, 18)
    lo, hi = (0.08, 0.10) if attrs.size == "small" else (0.155, 0.175)
    radius = rng.uniform(lo, hi) * size
    margin = radius * 1.2 + 2
    centres: list[tuple[float, float]] = []
    while len(centres) < attrs.count:
        centres = []
        for _ in range(200):
            c = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
            if all(math.dist(c, o) > 2.5 * radius for o in centres):
                centres.append(c)
                if len(centres) == attrs.count:
                    break
    for cx, cy in centres:
        if attrs.shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
        else:
            angle = math.radians(rng.uniform(-12, 12))
            draw.polygon(_shape_points(attrs.shape, cx, cy, radius, angle), fill=colour)
    return img


def generate(n: int, seed: int) -> list[tuple[Attributes, Image.Image]]:
    """``n`` random images with their attributes, the same for the same seed."""
    rng = random.Random(f"mmsearch-demo-images-{seed}")
    out = []
    for _ in range(n):
        attrs = sample_attributes(rng)
        out.append((attrs, render(attrs, rng)))
    return out


# --------------------------------------------------------------------------------------------- folder


@dataclass(frozen=True)
class DemoImage:
    path: Path
    caption_path: Path
    attributes: Attributes
    caption: Caption


@dataclass(frozen=True)
class SpokenFile:
    path: Path
    text: str


@dataclass
class DemoFolder:
    """What :func:`write_demo_folder` wrote."""

    root: Path
    media_dir: Path
    queries_dir: Path
    images: list[DemoImage]
    recordings: list[SpokenFile] = field(default_factory=list)
    text_query: str = "a red circle"
    text_query_stated: Mapping[str, str | int] = field(default_factory=dict)
    image_query: Path | None = None
    image_query_attributes: Attributes | None = None
    image_query_caption: str = ""
    audio_query: Path | None = None
    audio_query_text: str = "a green triangle"
    audio_query_stated: Mapping[str, str | int] = field(default_factory=dict)
    videos: list[VideoTruth] = field(default_factory=list)
    video_query_text: str = "a green triangle"
    video_query_stated: Mapping[str, str | int] = field(default_factory=dict)

    def relevant_images(self, stated: Mapping[str, str | int]) -> list[DemoImage]:
        return [im for im in self.images if matches(stated, im.attributes)]

    def moments(self, stated: Mapping[str, str | int]) -> list[tuple[Path, float]]:
        """Each (video, second) at which a scene agreeing with ``stated`` starts."""
        return [
            (video.path, scene.start)
            for video in self.videos
            for scene in video.scenes
            if scene.attributes is not None and matches(stated, scene.attributes)
        ]


# The demo queries, and images guaranteed to be in the folder so that each query has answers.
_TEXT_QUERY = ("a red circle", {"colour": "red", "shape": "circle"})
_AUDIO_QUERY = ("a green triangle", {"colour": "green", "shape": "triangle"})
_VIDEO_QUERY = _AUDIO_QUERY  # appears 4 s into videos/shapes_1.mp4 (mmsearch.demo.videos.DEMO_VIDEOS)
_IMAGE_QUERY = Attributes("blue", "square", "large", 1, "white")
_GUARANTEED = [
    Attributes("red", "circle", "large", 1, "white"),
    Attributes("red", "circle", "small", 2, "gray"),
    Attributes("red", "circle", "large", 3, "black"),
    Attributes("green", "triangle", "large", 1, "white"),
    Attributes("green", "triangle", "small", 3, "black"),
    Attributes("green", "triangle", "large", 2, "gray"),
    Attributes("blue", "square", "large", 1, "white"),
    Attributes("blue", "square", "small", 2, "gray"),
]


def write_demo_folder(
    dest: Path,
    *,
    n_images: int = 48,
    seed: int = 0,
    speech: bool = True,
    videos: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> DemoFolder:
    """Write a demo media folder and demo queries under ``dest`` and describe what was written.

    ``dest/media/`` gets images (PNG in ``shapes/``, JPEG in ``photos/``), one caption ``name.txt`` per
    image, with ``speech`` a few ``podcast/*.wav`` recordings that read captions aloud, and with ``videos``
    the short videos of :data:`mmsearch.demo.videos.DEMO_VIDEOS` in ``videos/`` (narrated with ``speech``).
    ``dest/queries/`` (outside the media folder) gets an image to query with and, with ``speech``, a
    spoken query. Speech comes from :func:`mmsearch.tts.synthesize`.
    """
    if n_images < len(_GUARANTEED):
        raise ValueError(f"n_images must be at least {len(_GUARANTEED)}")
    dest = Path(dest)
    media, queries = dest / "media", dest / "queries"
    for sub in (media / "shapes", media / "photos", queries):
        sub.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"mmsearch-demo-folder-{seed}")
    attrs_list = list(_GUARANTEED) + [sample_attributes(rng) for _ in range(n_images - len(_GUARANTEED))]
    rng.shuffle(attrs_list)

    images: list[DemoImage] = []
    for i, attrs in enumerate(attrs_list):
        caption = describe(
            attrs,
            phrasing=TRAINING_PHRASINGS[i % len(TRAINING_PHRASINGS)],
            stated=[n for n in OPTIONAL_ATTRIBUTES if rng.random() < 0.7],
        )
        stem = f"{i:03d}_{attrs.colour}_{attrs.shape}"
        path = media / "photos" / f"{stem}.jpg" if i % 3 == 2 else media / "shapes" / f"{stem}.png"
        img = render(attrs, rng)
        if path.suffix == ".jpg":
            img.save(path, quality=92)
        else:
            img.save(path)
        caption_path = path.with_suffix(".txt")
        caption_path.write_text(caption.text + "\n", encoding="utf-8")
        images.append(DemoImage(path, caption_path, attrs, caption))
        if progress:
            progress("images", i + 1, n_images)

    query_image = queries / "blue_square.png"
    render(_IMAGE_QUERY, random.Random(f"mmsearch-demo-query-{seed}")).save(query_image)
    folder = DemoFolder(
        root=dest,
        media_dir=media,
        queries_dir=queries,
        images=images,
        text_query=_TEXT_QUERY[0],
        text_query_stated=dict(_TEXT_QUERY[1]),
        image_query=query_image,
        image_query_attributes=_IMAGE_QUERY,
        image_query_caption=describe(_IMAGE_QUERY, phrasing="bare", stated=()).text,
        audio_query_text=_AUDIO_QUERY[0],
        audio_query_stated=dict(_AUDIO_QUERY[1]),
        video_query_text=_VIDEO_QUERY[0],
        video_query_stated=dict(_VIDEO_QUERY[1]),
    )
    if speech:
        _write_speech(folder, progress)
    if videos:
        from mmsearch.demo.videos import DEMO_VIDEOS, write_demo_videos  # PyAV; imports this module

        folder.videos = write_demo_videos(media, narrate=speech, seed=seed)
        if progress:
            progress("videos", len(DEMO_VIDEOS), len(DEMO_VIDEOS))
    return folder


def _write_speech(folder: DemoFolder, progress: Callable[[str, int, int], None] | None) -> None:
    from mmsearch.tts import synthesize  # the TTS backend is optional; import only when speaking

    podcast = folder.media_dir / "podcast"
    podcast.mkdir(exist_ok=True)
    # Each episode reads three captions as separate sentences, so Whisper gives time-coded segments.
    episodes = [folder.images[i : i + 3] for i in range(0, min(9, len(folder.images)), 3)]
    total = len(episodes) + 1
    for n, episode in enumerate(episodes, start=1):
        text = " ".join(im.caption.text[:1].upper() + im.caption.text[1:] + "." for im in episode)
        path = synthesize(text, podcast / f"episode_{n}.wav")
        folder.recordings.append(SpokenFile(Path(path), text))
        if progress:
            progress("speech", n, total)
    folder.audio_query = Path(synthesize(folder.audio_query_text, folder.queries_dir / "green_triangle.wav"))
    if progress:
        progress("speech", total, total)
