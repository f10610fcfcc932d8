"""The MCP server (mmsearch.mcp_server) run as an assistant runs it: `python -m mmsearch.mcp_server` spawned
by the official SDK's stdio client, over a demo index (real OpenCLIP demo model, SQLite, FAISS). Relevance is
judged by the demo world's attributes, not by "returns something"."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from PIL import Image

import mmsearch
from mmsearch.constants import SERVER_MAX_K
from mmsearch.demo import world

ROOT = Path(__file__).resolve().parents[1]
ODD_NAME = b"red\xff\x1b[31m circle.png"  # not UTF-8, with an escape sequence in it
TOOLS = {"search_text", "search_image", "search_audio", "item", "status"}
# The tests of the `answers` fixture share one spawned server process, which imports torch and loads the
# model: 10-30 s before the first answer.
stdio = pytest.mark.slow


def server_params(index: Path) -> StdioServerParameters:
    # The stdio client passes only a few variables (HOME, PATH...) on: name what the server needs.
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for name in ("MMSEARCH_CACHE_DIR", "OMP_NUM_THREADS", "HF_HOME", "XDG_CACHE_HOME", "TMPDIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    return StdioServerParameters(
        command=sys.executable, args=["-m", "mmsearch.mcp_server", "--index", str(index)], env=env, cwd=ROOT
    )


def in_session(index: Path, scenario: Callable[[ClientSession], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        with open(os.devnull, "w") as quiet:  # the server's log (stderr)
            async with (
                stdio_client(server_params(index), errlog=quiet) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                return await scenario(session)

    return asyncio.run(run())


def answer(result: Any) -> dict[str, Any]:
    """A tool's JSON answer (its text content, and its structured content: the same)."""
    assert not result.is_error, result.content
    data = json.loads(result.content[0].text)
    assert result.structured_content == data
    return data


def exact(hit: dict[str, Any]) -> str:
    """A hit's path as the file system knows it (``path`` is the display form)."""
    return os.fsdecode(base64.b64decode(hit["path_b64"]))


def error(result: Any) -> str:
    assert result.is_error
    text = result.content[0].text
    assert "Traceback" not in text and 'File "' not in text
    return text


@pytest.fixture(scope="module")
def demo(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[world.DemoFolder, Path, dict[str, world.Attributes]]:
    """24 demo images (no speech), one more red circle (its own content) under a name that is not UTF-8,
    and the index."""
    root = tmp_path_factory.mktemp("mcp")
    folder = world.write_demo_folder(root / "demo", n_images=24, seed=7, speech=False)
    attrs = {str(im.path): im.attributes for im in folder.images}
    red = next(
        im for im in folder.images if world.matches({"colour": "red", "shape": "circle"}, im.attributes)
    )
    odd = os.path.join(os.fsencode(folder.media_dir / "shapes"), ODD_NAME)
    with Image.open(red.path) as im:
        changed = im.convert("RGB")
    changed.putpixel((0, 0), (1, 2, 3))
    changed.save(os.fsdecode(odd), "PNG")
    attrs[os.fsdecode(odd)] = red.attributes
    with mmsearch.Index.create(root / "index", model="demo") as idx:
        report = idx.add_folder(folder.media_dir)
    assert report.images_embedded == 25 and not report.skipped
    return folder, root / "index", attrs


@pytest.fixture(scope="module")
def answers(demo) -> dict[str, Any]:
    """One server process answering every call of this module's tests (a process loads the model once)."""
    folder, index, _ = demo
    missing = str(folder.root / "no-such.png")

    async def scenario(s: ClientSession) -> dict[str, Any]:
        out: dict[str, Any] = {"tools": (await s.list_tools()).tools}
        out["red"] = await s.call_tool("search_text", {"query": "a red circle", "target": "images", "k": 5})
        out["all"] = await s.call_tool("search_text", {"query": "a red circle", "target": "all", "k": 40})
        out["captions"] = await s.call_tool("search_text", {"query": "a blue square", "target": "captions"})
        out["jpg"] = await s.call_tool(
            "search_text", {"query": "a red circle", "k": 5, "filters": {"ext": ["jpg"]}, "min_confidence": 0}
        )
        query_image = str(folder.image_query)
        out["image"] = await s.call_tool("search_image", {"path": query_image, "target": "images", "k": 3})
        out["image_texts"] = await s.call_tool("search_image", {"path": query_image, "k": 3})
        out["status"] = await s.call_tool("status", {})
        first = answer(out["red"])["hits"][0]["file_id"]
        out["item"] = await s.call_tool("item", {"file_id": first})
        out["no_item"] = await s.call_tool("item", {"file_id": 999_999})
        out["big_k"] = await s.call_tool("search_text", {"query": "red", "k": SERVER_MAX_K + 1})
        out["empty"] = await s.call_tool("search_text", {"query": ""})
        out["bad_target"] = await s.call_tool("search_text", {"query": "red", "target": "videos"})
        out["no_image"] = await s.call_tool("search_image", {"path": missing})
        out["not_image"] = await s.call_tool("search_image", {"path": str(folder.images[0].caption_path)})
        out["no_audio"] = await s.call_tool("search_audio", {"path": missing.replace(".png", ".wav")})
        out["after"] = await s.call_tool("status", {})  # still answering after the errors
        return out

    return in_session(index, scenario)


@stdio
def test_tools_are_listed_read_only(answers) -> None:
    tools = {t.name: t for t in answers["tools"]}
    assert set(tools) == TOOLS
    assert all(t.annotations.read_only_hint and not t.annotations.destructive_hint for t in tools.values())
    k = tools["search_text"].input_schema["properties"]["k"]
    assert k["maximum"] == SERVER_MAX_K and k["minimum"] == 1


@stdio
def test_text_search_finds_red_circles(answers, demo) -> None:
    _, _, attrs = demo
    red = answer(answers["red"])
    assert red["input"] == "text" and red["target"] == "images" and not red["no_match"]
    top = red["hits"][0]
    assert top["kind"] == "image" and top["file_kind"] == "image"
    assert world.matches({"colour": "red", "shape": "circle"}, attrs[exact(top)])
    assert top["captions"]  # the image's caption file


@stdio
def test_paths_out_are_display_safe(answers, demo) -> None:
    """The file whose name is not UTF-8 comes back in display form, its exact bytes in path_b64."""
    hits = answer(answers["all"])["hits"]
    odd = [h for h in hits if base64.b64decode(h["path_b64"]).endswith(ODD_NAME)]
    assert odd, "the red circle under the odd name is among a red circle's hits"
    assert odd[0]["path"].endswith("red\ufffd\x1b[31m circle.png")
    assert all(h["path"].encode("utf-8") for h in hits)


@stdio
def test_caption_and_image_queries(answers, demo) -> None:
    folder, _, attrs = demo
    blue_square = {"colour": "blue", "shape": "square"}
    captions = answer(answers["captions"])["hits"]
    assert captions[0]["kind"] == "caption" and world.matches(blue_square, attrs[exact(captions[0])])
    image = answer(answers["image"])
    assert image["input"] == "image" and image["query"] == str(folder.image_query)
    assert world.matches(blue_square, attrs[exact(image["hits"][0])])
    texts = answer(answers["image_texts"])
    assert texts["target"] == "texts" and texts["hits"][0]["kind"] == "caption"
    assert world.matches(blue_square, attrs[exact(texts["hits"][0])])


@stdio
def test_filters_apply(answers) -> None:
    hits = answer(answers["jpg"])["hits"]
    assert len(hits) == 5 and all(h["path"].endswith(".jpg") for h in hits)


@stdio
def test_item_and_status(answers, demo) -> None:
    folder, index, _ = demo
    red = answer(answers["red"])["hits"][0]
    item = answer(answers["item"])
    assert item["id"] == red["file_id"] and item["path"] == red["path"] and item["kind"] == "image"
    caption_file = Path(red["path"]).with_suffix(".txt")
    assert [c["text"] for c in item["captions"]] == [caption_file.read_text().strip()]
    assert item["segments"] == [] and item["transcript"] is None
    status = answer(answers["status"])
    assert status["model"]["name"] == "demo" and status["index"] == str(index)
    assert status["vectors"]["image"] == 25 and status["captions"] == 24  # the odd one has no caption
    assert answer(answers["after"]) == status


@stdio
def test_errors_are_tool_errors(answers) -> None:
    assert "no item 999999" in error(answers["no_item"])
    assert str(SERVER_MAX_K) in error(answers["big_k"])
    assert "query" in error(answers["empty"])
    assert "unknown target" in error(answers["bad_target"])
    assert "query image not found" in error(answers["no_image"])
    assert "cannot read query image" in error(answers["not_image"])
    assert "query audio not found" in error(answers["no_audio"])


def test_in_process_search_and_error(demo) -> None:
    """The same tools through the SDK's in-process client: no subprocess, for the quick test subset."""
    from mcp import Client

    from mmsearch.mcp_server import create_server

    _, index, attrs = demo

    async def scenario() -> tuple[Any, Any]:
        with mmsearch.Index.open(index) as idx:
            async with Client(create_server(idx)) as client:
                found = await client.call_tool("search_text", {"query": "a red circle", "k": 3})
                missing = await client.call_tool("item", {"file_id": 424242})
                return found, missing

    found, missing = asyncio.run(scenario())
    assert world.matches({"colour": "red", "shape": "circle"}, attrs[exact(answer(found)["hits"][0])])
    assert "no item 424242" in error(missing)


def test_a_missing_index_exits_with_a_message(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "mmsearch.mcp_server", "--index", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=120, cwd=ROOT, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert "Traceback" not in done.stderr and str(tmp_path / "none") in done.stderr


@pytest.mark.speech
@pytest.mark.slow
def test_spoken_query(demo) -> None:
    from tests._speech import speech_wav

    _, index, attrs = demo
    wav = speech_wav("a red circle")

    async def scenario(s: ClientSession) -> Any:
        return await s.call_tool("search_audio", {"path": str(wav), "target": "images", "k": 3})

    result = answer(in_session(index, scenario))
    assert result["input"] == "audio" and "red circle" in result["transcript"].lower()
    assert world.matches({"colour": "red", "shape": "circle"}, attrs[exact(result["hits"][0])])


def test_the_tools_filters_are_the_search_filters() -> None:
    """The tools pass their filters to Index.search by field name: the names must be the search's."""
    from mmsearch.filters import FILTER_FIELDS
    from mmsearch.mcp_server import Filters

    assert tuple(Filters.model_fields) == FILTER_FIELDS
