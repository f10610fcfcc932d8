"""Models run without torch once exported: the tokenizer, the preprocessing and the towers reproduce open_clip,
and a whole `mmsearch index` + `mmsearch query --local` finishes with torch never imported.

Real open_clip (the reference), real torch.onnx export and ONNX Runtime, real CLI processes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.transform import image_transform
from PIL import Image

from mmsearch.accel import cosines
from mmsearch.clip_torch import ClipEmbedder
from mmsearch.demo import world
from mmsearch.errors import MmsearchError
from mmsearch.identity import ModelSpec, registered
from mmsearch.model import TORCH_FREE_ENV, load_embedder
from mmsearch.onnx_embedder import PACKAGED_EXPORTS, OnnxEmbedder, find_exported, manifest_path, read_manifest
from mmsearch.preprocess import ImagePreprocess
from mmsearch.tokenizer import ClipTokenizer, _basic_clean
from tests.conftest import TINY_MODEL

# Hostile and ordinary texts: unicode of several scripts, emoji, combining marks, HTML entities, mojibake,
# control characters, special-token look-alikes, and texts far longer than any context.
TEXTS = [
    "",
    " ",
    "a red circle",
    "A RED Circle!!",
    "two small red circles over a white background",
    "It's  DON'T we'll they're I'm you've he'd",
    "Ünïcödé — “curly quotes” ‘single’ and … ellipsis",
    "日本語のテキストと中文文本",
    "Здравствуй, мир",
    "مرحبا بالعالم",
    "emoji 😀🎉👩‍👩‍👧 flags 🇫🇷",
    "e\u0301 combining vs é precomposed",
    "fi ﬁ ligature, full-width ＡＢＣ１２３",
    "&amp; &lt;b&gt; &amp;amp;lt; &#39;entities&#39; &nbsp;",
    "â€œmojibakeâ€\x9d cafÃ©",
    "tab\tnew\nline\r\nreturn\x00nul\x1bescape\x7fdel",
    "<start_of_text> <end_of_text> inside <|endoftext|>",
    "numbers 3.14159 2024-06-01 1,000,000 #42 @user",
    "x " * 200,
    "supercalifragilisticexpialidocious " * 30,
    "a" * 500,
]


@pytest.fixture(scope="module")
def open_clip_tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def ours() -> ClipTokenizer:
    return ClipTokenizer(context_length=77)


# --- tokenizer ------------------------------------------------------------------------------------
def test_token_ids_equal_open_clips(open_clip_tokenizer, ours: ClipTokenizer) -> None:  # type: ignore[no-untyped-def]
    got = ours(TEXTS)
    assert got.dtype == np.int64 and got.shape == (len(TEXTS), 77)
    np.testing.assert_array_equal(got, open_clip_tokenizer(TEXTS).numpy())
    long = got[TEXTS.index("x " * 200)]
    assert long[-1] == ours.eot and long[0] == ours.sot  # truncated with the end token last
    for n in (16, 32, 100):  # other context lengths (the tiny and demo models use 16 and 32)
        np.testing.assert_array_equal(ours(TEXTS, n), open_clip_tokenizer(TEXTS, n).numpy())


def test_no_two_merges_make_the_same_piece(ours: ClipTokenizer, open_clip_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """What lets ClipTokenizer give a merged piece the id 512 + the rank of its merge, as open_clip's table does."""
    pieces = [m.replace(" ", "") for m in ours.merges]
    assert len(set(pieces)) == len(pieces)
    assert all(open_clip_tokenizer.encoder[p] == 512 + r for r, p in enumerate(pieces))
    assert (ours.sot, ours.eot) == (open_clip_tokenizer.sot_token_id, open_clip_tokenizer.eot_token_id)


@pytest.mark.parametrize("clean", ["whitespace", "canonicalize"])
def test_other_cleanings_equal_open_clips(clean: str) -> None:
    reference = open_clip.tokenizer.SimpleTokenizer(context_length=77, clean=clean)
    np.testing.assert_array_equal(ClipTokenizer(clean=clean)(TEXTS), reference(TEXTS).numpy())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=120), min_size=1, max_size=4))
def test_token_ids_equal_open_clips_on_random_unicode(texts: list[str]) -> None:
    np.testing.assert_array_equal(_OURS(texts), _OPEN_CLIP(texts).numpy())


_OURS = ClipTokenizer(context_length=77)
_OPEN_CLIP = open_clip.get_tokenizer("ViT-B-32")


def test_plain_ascii_skips_ftfy_without_changing_anything() -> None:
    import html

    import ftfy

    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"]
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert _basic_clean(text) == html.unescape(html.unescape(ftfy.fix_text(text))).strip()


# --- preprocessing --------------------------------------------------------------------------------
def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    noise = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
        for h, w in ((480, 640), (301, 171), (20, 13))
    ]
    return [
        *noise,
        noise[0].convert("L"),
        noise[1].convert("RGBA"),
        noise[0].convert("P"),
        Image.new("RGB", (64, 64), (10, 200, 30)),  # already the target size
    ]


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [64, (48, 80)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_preprocessing_equals_open_clips_transform(resize_mode: str, size, interpolation: str) -> None:  # type: ignore[no-untyped-def]
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    kwargs = dict(mean=mean, std=std, resize_mode=resize_mode, interpolation=interpolation, fill_color=7)
    reference = image_transform(size, is_train=False, **kwargs)
    ours = ImagePreprocess(size if isinstance(size, tuple) else (size, size), **kwargs)
    for image in _images():
        np.testing.assert_array_equal(ours(image), reference(image).numpy())


# --- the exported model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[ClipEmbedder, Path]:
    """The tiny model loaded with torch and exported (int8 and fp32) into a fresh cache."""
    cache = tmp_path_factory.mktemp("cache")
    torch_emb = ClipEmbedder(ModelSpec(TINY_MODEL, pretrained="random"), device="cpu")
    assert torch_emb.use_onnx_image_tower(quantize=False, cache_dir=cache)
    assert torch_emb.use_onnx_image_tower(quantize=True, cache_dir=cache)
    return torch_emb, cache


def _inputs() -> tuple[list[Image.Image], list[str]]:
    images = [im for _, im in world.generate(12, seed=5)] + _images()
    return images, TEXTS + ["a photo of a dog", "two blue squares"]


@pytest.mark.parametrize("tower", ["onnx-int8", "onnx-fp32"])
def test_exported_model_loads_without_torch_and_matches_it(exported, tower: str) -> None:  # type: ignore[no-untyped-def]
    torch_emb, cache = exported
    spec = ModelSpec(TINY_MODEL, pretrained="random")
    emb = load_embedder(spec, device="cpu", image_tower=tower, cache_dir=cache)
    assert isinstance(emb, OnnxEmbedder) and emb.image_tower == tower
    assert registered(emb.identity) == registered(torch_emb.identity)  # what an index records
    # From an index's recorded identity (nothing hashed) too.
    again = load_embedder(registered(torch_emb.identity), device="auto", image_tower=tower, cache_dir=cache)
    assert isinstance(again, OnnxEmbedder) and again.identity == emb.identity
    images, texts = _inputs()
    fresh = ClipEmbedder(spec, device="cpu")  # torch alone: the reference
    image_cos = cosines(emb.embed_images(images), fresh.embed_images(images))
    text_cos = cosines(emb.embed_texts(texts), fresh.embed_texts(texts))
    if tower == "onnx-fp32":
        assert image_cos.min() > 0.9999 and text_cos.min() > 0.9999
    else:  # measured 0.9998 / 0.9995 on this model
        assert image_cos.min() > 0.999 and text_cos.min() > 0.995
    assert emb.embed_texts([]).shape == (0, emb.dim) and emb.embed_images([]).shape == (0, emb.dim)
    # A text's vector does not depend on the texts embedded with it (int8 activations are scaled per run).
    np.testing.assert_array_equal(emb.embed_texts(texts[:3])[1], emb.embed_texts(texts[1:2])[0])
    # After the export the torch embedder embeds through the same towers: one run's vectors are the next's.
    torch_emb.use_onnx_image_tower(quantize=tower == "onnx-int8", cache_dir=cache)
    np.testing.assert_allclose(torch_emb.embed_texts(texts), emb.embed_texts(texts), atol=1e-6)
    np.testing.assert_allclose(torch_emb.embed_images(images), emb.embed_images(images), atol=1e-6)


def test_torch_is_loaded_when_asked_for_or_not_exported(exported, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    torch_emb, cache = exported
    spec = ModelSpec(TINY_MODEL, pretrained="random")
    assert isinstance(load_embedder(spec, device="cpu", image_tower="torch", cache_dir=cache), ClipEmbedder)
    assert isinstance(load_embedder(spec, device="cpu", cache_dir=cache), ClipEmbedder)  # the default
    assert isinstance(
        load_embedder(spec, device="cpu", image_tower="onnx-int8", cache_dir=tmp_path), ClipEmbedder
    )
    monkeypatch.setenv(TORCH_FREE_ENV, "0")
    assert isinstance(
        load_embedder(spec, device="cpu", image_tower="onnx-int8", cache_dir=cache), ClipEmbedder
    )
    monkeypatch.delenv(TORCH_FREE_ENV)
    # Another weights hash, or a manifest that names other weights: never used for this model.
    other = {**registered(torch_emb.identity), "pretrained": None, "checkpoint_sha256": "0" * 64}
    assert find_exported(other, quantize=True, cache_dirs=[cache]) is None


def test_a_damaged_cached_tower_says_what_to_do(exported, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, cache = exported
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    for path in copy.glob("*.text-int8.onnx"):
        path.write_bytes(path.read_bytes()[:1000])
    emb = load_embedder(ModelSpec(TINY_MODEL, pretrained="random"), image_tower="onnx-int8", cache_dir=copy)
    with pytest.raises(MmsearchError, match="cannot be loaded.*delete it"):
        emb.embed_texts(["a red circle"])
    assert emb.embed_images([Image.new("RGB", (40, 30))]).shape == (1, emb.dim)  # the image tower is intact


def test_a_model_whose_int8_text_does_not_hold_keeps_fp32_texts(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from mmsearch import onnx_text

    monkeypatch.setitem(onnx_text.PROBE_MIN_COSINE, True, 1.01)  # no int8 export can pass
    torch_emb = ClipEmbedder(ModelSpec(TINY_MODEL, pretrained="random"), device="cpu")
    assert torch_emb.use_onnx_image_tower(quantize=True, cache_dir=tmp_path)
    key = json.loads(next(tmp_path.glob("*.model.json")).read_text())["key"]
    assert read_manifest(tmp_path, key)["text_int8"] is False  # type: ignore[index]
    assert not list(tmp_path.glob("*.text-int8.onnx")) and list(tmp_path.glob("*.text-fp32.onnx"))
    emb = load_embedder(
        ModelSpec(TINY_MODEL, pretrained="random"), image_tower="onnx-int8", cache_dir=tmp_path
    )
    assert isinstance(emb, OnnxEmbedder) and emb._text_path.name.endswith(".text-fp32.onnx")
    assert manifest_path(tmp_path, key).is_file()


def test_the_shipped_demo_export_is_current() -> None:
    """The demo model's int8 towers ship in the package; a retrained demo needs
    `python -m mmsearch.clip_torch --ship-demo` (its weights hash names the export)."""
    identity = ModelSpec("demo").expected_identity()
    assert find_exported(identity, quantize=True, cache_dirs=[PACKAGED_EXPORTS]) is not None
    emb = load_embedder(ModelSpec("demo"), image_tower="onnx-int8", cache_dir=Path("/nonexistent"))
    assert isinstance(emb, OnnxEmbedder)
    reference = ClipEmbedder(ModelSpec("demo"), device="cpu")
    assert registered(emb.identity) == registered(reference.identity)
    images, texts = _inputs()
    # int8 activations are quantised per batch: the noise images here are the worst case (0.997 measured).
    assert cosines(emb.embed_images(images), reference.embed_images(images)).min() > 0.995
    assert cosines(emb.embed_texts(texts), reference.embed_texts(texts)).min() > 0.995


# --- whole processes --------------------------------------------------------------------------------
DRIVER = textwrap.dedent(
    """
    import json, sys
    from mmsearch.cli import main
    sys.argv = ["mmsearch", *sys.argv[1:]]
    try:
        main()
    except SystemExit as e:
        if e.code:
            raise
    loaded = sorted(m for m in ("torch", "open_clip", "torchvision", "onnxruntime") if m in sys.modules)
    print("MODULES " + json.dumps(loaded))
    """
)


def _mmsearch(*args: str, env: dict[str, str]) -> tuple[dict, list[str]]:  # type: ignore[type-arg]
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    body, _, modules = out.stdout.rpartition("MODULES ")
    return json.loads(body), json.loads(modules)


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMSEARCH_")}
    # An empty user cache: the demo model's towers come from the package.
    return {**env, "MMSEARCH_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}


def test_index_and_query_never_import_torch(tmp_path: Path, cli_env: dict[str, str]) -> None:
    media = tmp_path / "media"
    media.mkdir()
    shapes = {}
    for i, (attrs, image) in enumerate(world.generate(24, seed=21)):
        image.save(media / f"{i:02d}.jpg", quality=92)
        shapes[str(media / f"{i:02d}.jpg")] = attrs
    (media / "00.txt").write_text("a note about the first picture\n")
    index = str(tmp_path / "index")

    report, modules = _mmsearch(
        "index", str(media), "--index", index, "--model", "demo", "--json", env=cli_env
    )
    assert report["runs"][0]["images_embedded"] == 24 and report["runs"][0]["captions_embedded"] == 1
    assert modules == ["onnxruntime"]  # the ONNX towers ran; torch, open_clip, torchvision never loaded

    red_circles = [p for p, a in shapes.items() if world.matches({"colour": "red", "shape": "circle"}, a)]
    answer, modules = _mmsearch(
        "query",
        "a red circle",
        "--index",
        index,
        "--local",
        "-k",
        "3",
        "--min-confidence",
        "0",
        "--json",
        env=cli_env,
    )
    assert modules == ["onnxruntime"]
    if red_circles:  # semantic, not just "returns something"
        assert answer["hits"][0]["path"] in red_circles
    answer, modules = _mmsearch(
        "query",
        "--image",
        str(media / "03.jpg"),
        "--target",
        "images",
        "--index",
        index,
        "--local",
        "--min-confidence",
        "0",
        "--json",
        env=cli_env,
    )
    assert modules == ["onnxruntime"] and answer["hits"][0]["path"] == str(media / "03.jpg")


@pytest.mark.slow
def test_first_use_exports_then_the_next_run_is_torch_free(tmp_path: Path, cli_env: dict[str, str]) -> None:
    media = tmp_path / "media"
    media.mkdir()
    for i, (_, image) in enumerate(world.generate(6, seed=3)):
        image.save(media / f"{i}.png")
    index = str(tmp_path / "index")
    first, modules = _mmsearch(
        "index",
        str(media),
        "--index",
        index,
        "--model",
        TINY_MODEL,
        "--pretrained",
        "random",
        "--json",
        env=cli_env,
    )
    assert first["runs"][0]["images_embedded"] == 6 and "torch" in modules  # exported here
    _, extra = world.generate(1, seed=99)[0]
    extra.save(media / "extra.png")
    (media / "extra.txt").write_text("a caption added later\n")
    second, modules = _mmsearch("index", str(media), "--index", index, "--json", env=cli_env)
    assert second["runs"][0]["images_embedded"] == 1 and second["runs"][0]["captions_embedded"] == 1
    assert modules == ["onnxruntime"]
    # Texts embedded by the first run (torch process) and the second (torch-free) come from the same tower.
    answer, modules = _mmsearch(
        "query",
        "a caption added later",
        "--target",
        "captions",
        "--index",
        index,
        "--local",
        "--min-confidence",
        "0",
        "--json",
        env=cli_env,
    )
    assert modules == ["onnxruntime"] and answer["hits"][0]["text"].strip() == "a caption added later"
    assert answer["hits"][0]["score"] > 0.999


def test_a_cold_query_takes_the_text_session_and_file_digest_it_prefetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`query --local` starts the text tower's session and the vector files' hashing before it imports the
    engine; the search then uses both (the prediction names the files the search opens) and makes neither
    again."""
    import mmsearch
    from mmsearch import cli, onnx_text, vectors

    monkeypatch.setenv("MMSEARCH_CACHE_DIR", str(tmp_path / "cache"))  # the demo towers from the package
    media = tmp_path / "media"
    media.mkdir()
    for i, (_, image) in enumerate(world.generate(6, seed=4)):
        image.save(media / f"{i}.jpg")
    with mmsearch.Index.create(tmp_path / "index", model="demo") as idx:
        idx.add_folder(media)
    sessions: list[tuple[str, str]] = []  # (file name, thread name)
    hashed: list[tuple[str, str]] = []
    real_session, real_sha = onnx_text.ort_session, vectors._sha256_of

    def session(path: Path, *args: Any, **kwargs: Any) -> Any:
        sessions.append((path.name, threading.current_thread().name))
        return real_session(path, *args, **kwargs)

    def sha(f: Any) -> str:
        hashed.append((Path(f.name).name, threading.current_thread().name))
        return real_sha(f)

    monkeypatch.setattr(onnx_text, "ort_session", session)
    monkeypatch.setattr(vectors, "_sha256_of", sha)

    a = cli._query_argparser().parse_args(["a red circle", "--local", "-k", "3", "--json"])
    asked = cli._Asked(a.text, None, None, "images", 3, cli._args_options(a), as_json=True)
    cli._search_here(tmp_path / "index", None, None, None, "auto", asked)
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 3
    # Each made once, on the prefetching threads, and used by the search.
    assert len(sessions) == 1 and sessions[0][0].endswith(".text-int8.onnx")
    assert sessions[0][1] == "onnx-text-prefetch"
    assert hashed == [("image.faiss", "mmsearch-vectors-digest")]
    assert not onnx_text._prefetched and not vectors._digests  # both taken


@pytest.mark.parametrize("config", ['{"model": {"arch": ["x"], "name": 5}}', '{"model": 3}', "{", ""])
def test_prefetching_for_an_odd_index_folder_never_raises(tmp_path: Path, config: str) -> None:
    from mmsearch import cli

    (tmp_path / "mmsearch.json").write_text(config)
    cli._prefetch_local_search(tmp_path, "auto", "images", True)
    cli._prefetch_local_search(tmp_path / "missing", "auto", "all", True)
