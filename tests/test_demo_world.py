"""The generated demo world: determinism, captions that agree with the pictures, the held-out phrasing."""

from __future__ import annotations

import random
import re

import numpy as np
from PIL import Image

from mmsearch.demo import world


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_same_seed_same_images_and_other_seed_differs() -> None:
    a, b, c = world.generate(6, seed=3), world.generate(6, seed=3), world.generate(6, seed=4)
    assert [x for x, _ in a] == [x for x, _ in b]
    assert all(np.array_equal(_pixels(p), _pixels(q)) for (_, p), (_, q) in zip(a, b))
    assert [x for x, _ in a] != [x for x, _ in c] or not all(
        np.array_equal(_pixels(p), _pixels(q)) for (_, p), (_, q) in zip(a, c)
    )


def test_captions_are_deterministic_by_seed() -> None:
    attrs = world.generate(20, seed=0)
    first = [world.training_caption(a, random.Random(7)).text for a, _ in attrs]
    again = [world.training_caption(a, random.Random(7)).text for a, _ in attrs]
    assert first == again


def _colour_share(img: Image.Image, rgb: tuple[int, int, int], tol: int = 40) -> float:
    px = _pixels(img)
    return float((np.abs(px - np.array(rgb)).max(-1) <= tol).mean())


def test_pictures_show_their_attributes() -> None:
    rng = random.Random(0)
    for attrs in world.all_attributes()[::11]:
        img = world.render(attrs, rng)
        assert img.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) and img.mode == "RGB"
        assert _colour_share(img, world.BACKGROUNDS[attrs.background]) > 0.5
        share = _colour_share(img, world.COLOURS[attrs.colour])
        # One small shape covers ~1-3 % of the picture, three large ones ~20 %.
        assert 0.005 < share < 0.35, (attrs, share)
        # Count: the shapes never touch, so connected blobs of the shape colour = count.
        mask = np.abs(_pixels(img) - np.array(world.COLOURS[attrs.colour])).max(-1) <= 40
        mask = mask.reshape(128, 2, 128, 2).any(axis=(1, 3))  # 2x2 max-pool: 4x less work, same blobs
        assert _blobs(mask) == attrs.count, attrs


def test_large_shapes_cover_more_than_small_ones() -> None:
    rng = random.Random(1)
    for colour, shape in [("red", "circle"), ("blue", "star"), ("green", "triangle"), ("purple", "square")]:
        small = world.render(world.Attributes(colour, shape, "small", 1, "white"), rng)
        large = world.render(world.Attributes(colour, shape, "large", 1, "white"), rng)
        assert _colour_share(large, world.COLOURS[colour]) > 2 * _colour_share(small, world.COLOURS[colour])


def _blobs(mask: np.ndarray) -> int:
    seen = np.zeros_like(mask)
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            # 8-connectivity: a polygon's thin tip may touch the rest of it only diagonally.
            for ny, nx in [(cy + dy, cx + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]:
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


_NUMBER = {"one": 1, "1": 1, "single": 1, "two": 2, "2": 2, "pair": 2, "three": 3, "3": 3}
_SIZE = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_BG = {"white": "white", "gray": "gray", "grey": "gray", "black": "black"}


def _read_caption(text: str) -> dict[str, object]:
    """An independent reading of a caption: which attributes its words state."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    stated: dict[str, object] = {}
    for i, w in enumerate(words):
        if w in world.COLOURS and not (i + 1 < len(words) and words[i + 1] == "background"):
            stated["colour"] = w
        if w.rstrip("s") in world.SHAPES:
            stated["shape"] = w.rstrip("s")
        if w in _NUMBER:
            stated["count"] = _NUMBER[w]
        if w in _SIZE:
            stated["size"] = _SIZE[w]
        if (
            w in _BG
            and i + 1 < len(words)
            and words[i + 1] == "background"
            or (w in _BG and i > 0 and words[i - 1] in ("on", "in"))
        ):
            stated["background"] = _BG[w]
    return stated


def test_captions_agree_with_attributes_and_state_what_they_say() -> None:
    rng = random.Random(5)
    for attrs, _ in world.generate(300, seed=2):
        for caption in (world.training_caption(attrs, rng), world.held_out_caption(attrs)):
            assert world.matches(caption.stated, attrs)
            assert _read_caption(caption.text) == dict(caption.stated), caption


def test_matches_is_the_relevance_rule() -> None:
    attrs = world.Attributes("red", "circle", "small", 2, "white")
    assert world.matches({"colour": "red", "shape": "circle"}, attrs)
    assert world.matches(attrs.as_dict(), attrs)
    assert not world.matches({"colour": "red", "shape": "circle", "count": 1}, attrs)
    assert not world.matches({"colour": "blue", "shape": "circle"}, attrs)


def test_held_out_phrasing_never_appears_in_training_captions() -> None:
    assert world.HELD_OUT_PHRASING not in world.TRAINING_PHRASINGS
    rng = random.Random(11)
    held_out = {
        world.held_out_caption(a, stated=s).text
        for a in world.all_attributes()
        for s in [(), ("size",), world.OPTIONAL_ATTRIBUTES]
    }
    for attrs in world.all_attributes():
        for _ in range(10):
            caption = world.training_caption(attrs, rng)
            assert caption.phrasing != world.HELD_OUT_PHRASING
            assert caption.text.lower().rstrip(".") not in held_out
            # The held-out construction "an image with ... over a ... background" is never generated.
            assert "image with" not in caption.text.lower() and " over " not in caption.text


def test_distinct_captions_keeps_first_of_each_text() -> None:
    attrs = [a for a, _ in world.generate(100, seed=0)]
    captions = world.distinct_captions(world.held_out_caption(a, stated=()) for a in attrs)
    texts = [c.text for c in captions]
    assert len(texts) == len(set(texts)) == len({(a.colour, a.shape, a.count > 1) for a in attrs})


def test_write_demo_folder_without_speech(tmp_path) -> None:
    seen: list[tuple[str, int, int]] = []
    folder = world.write_demo_folder(
        tmp_path / "demo", n_images=12, seed=1, speech=False, progress=lambda *a: seen.append(a)
    )
    assert ("images", 12, 12) in seen and seen[-1] == ("videos", 2, 2)
    assert len(folder.images) == 12
    media_files = sorted(p for p in folder.media_dir.rglob("*") if p.is_file())
    assert {p.suffix for p in media_files} == {".png", ".jpg", ".txt", ".mp4"}
    assert len({p.parent for p in media_files}) == 3  # shapes/, photos/, videos/
    # The videos are silent without speech; the video query's shapes appear in one at a known time.
    assert [v.path.name for v in folder.videos] == ["shapes_1.mp4", "shapes_2.mp4"]
    assert all(v.path.is_file() and v.audio_codec is None for v in folder.videos)
    assert folder.moments(folder.video_query_stated) == [(folder.media_dir / "videos" / "shapes_1.mp4", 4.0)]
    for im in folder.images:
        assert im.path.is_file() and im.caption_path == im.path.with_suffix(".txt")
        assert im.caption_path.read_text(encoding="utf-8").strip() == im.caption.text
        assert world.matches(im.caption.stated, im.attributes)
        with Image.open(im.path) as img:
            assert img.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    # The queries live outside the media folder and each one has answers in it.
    assert folder.queries_dir.resolve() not in folder.media_dir.resolve().parents
    assert folder.image_query is not None and folder.image_query.is_file()
    assert folder.image_query.parent == folder.queries_dir
    assert folder.relevant_images(folder.text_query_stated)
    assert folder.relevant_images(folder.audio_query_stated)
    assert folder.image_query_attributes is not None
    assert any(
        folder.image_query_caption == im.caption.text
        or world.matches(im.caption.stated, folder.image_query_attributes)
        for im in folder.images
    )
    assert folder.audio_query is None and folder.recordings == []
    # Same seed, same folder.
    again = world.write_demo_folder(tmp_path / "again", n_images=12, seed=1, speech=False)
    assert [(i.attributes, i.caption.text) for i in again.images] == [
        (i.attributes, i.caption.text) for i in folder.images
    ]


def test_write_demo_folder_with_speech(tmp_path) -> None:
    import wave

    folder = world.write_demo_folder(tmp_path / "demo", n_images=8, seed=2, speech=True)
    assert len(folder.recordings) == 3
    assert folder.audio_query == folder.queries_dir / "green_triangle.wav"
    for path in [r.path for r in folder.recordings] + [folder.audio_query]:
        assert path.is_file()
        with wave.open(str(path)) as w:
            seconds = w.getnframes() / w.getframerate()
        assert seconds > 0.8, path
    # Podcasts are media (indexed); the spoken query is not.
    assert all(folder.media_dir in r.path.parents for r in folder.recordings)
    assert folder.media_dir not in folder.audio_query.parents
    # Each episode reads the captions of three images, in order.
    first = folder.recordings[0].text.lower()
    assert all(im.caption.text.lower() in first for im in folder.images[:3])
    # The videos are narrated: each scene that shows shapes says so while it is shown.
    assert folder.videos and all(v.audio_codec is not None for v in folder.videos)
    for scene in (s for v in folder.videos for s in v.scenes if s.narration is not None):
        assert scene.speech_start is not None and scene.speech_end is not None
        assert scene.start <= scene.speech_start < scene.speech_end <= scene.end


def test_write_demo_folder_without_videos(tmp_path) -> None:
    folder = world.write_demo_folder(tmp_path / "demo", n_images=8, seed=2, speech=False, videos=False)
    assert folder.videos == [] and not (folder.media_dir / "videos").exists()
