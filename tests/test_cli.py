"""The command line, in-process (CliRunner) and as a real subprocess: output, --json, exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmsearch.cli import app
from tests.conftest import TINY_MODEL, solid

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    for name, color in (("red", "red"), ("blue", "blue")):
        solid(root / "media" / f"{name}.png", color)
        (root / "media" / f"{name}.txt").write_text(f"a {name} thing")
    (root / "media" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return root


@pytest.fixture(scope="module")
def built(folder: Path) -> Path:
    result = runner.invoke(
        app,
        [
            "index",
            str(folder / "media"),
            "--index",
            str(folder / "idx"),
            "--model",
            TINY_MODEL,
            "--pretrained",
            "random",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    run = payload["runs"][0]
    assert run["images_embedded"] == 2 and run["captions_added"] == 2
    assert [s["path"] for s in run["skipped"]] == [str(folder / "media" / "broken.jpg")]
    return folder / "idx"


def mmsearch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmsearch", *args], capture_output=True, text=True, timeout=300
    )


def test_query_json_in_process(built: Path) -> None:
    result = runner.invoke(
        app, ["query", "a red thing", "--index", str(built), "--target", "captions", "--json", "-k", "1"]
    )
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)["hits"]
    assert (
        hits[0]["text"] == "a red thing"
        and hits[0]["path"].endswith("red.png")
        and hits[0]["kind"] == "caption"
    )


def test_query_table_and_status_as_subprocess(built: Path, folder: Path) -> None:
    table = mmsearch("query", "a blue thing", "--index", str(built), "-t", "texts", "-k", "2")
    assert table.returncode == 0, table.stderr
    assert "a blue thing" in table.stdout and "blue.png" in table.stdout
    image_query = mmsearch(
        "query", "--image", str(folder / "media" / "red.png"), "--index", str(built), "--json"
    )
    assert image_query.returncode == 0 and json.loads(image_query.stdout)["target"] == "texts"
    status = mmsearch("status", "--index", str(built), "--json")
    data = json.loads(status.stdout)
    assert data["files"] == {"image_ok": 2, "image_skipped": 1} and data["vectors"] == {
        "caption": 2,
        "image": 2,
    }
    assert data["skipped"][0]["path"].endswith("broken.jpg")
    human = mmsearch("status", "--index", str(built))
    assert "broken.jpg" in human.stdout and human.returncode == 0


def test_reindex_subprocess_is_incremental(built: Path, folder: Path) -> None:
    again = mmsearch("index", str(folder / "media"), "--index", str(built), "--json")
    assert again.returncode == 0, again.stderr
    run = json.loads(again.stdout)["runs"][0]
    assert run["unchanged"] == 3 and run["images_embedded"] == 0


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["query"], "exactly one of", 2),
        (["query", "x", "--image", "y.png"], "exactly one of", 2),
        (["query", "x", "--target", "videos"], "unknown --target", 2),
        (["query", "--image", "/no/such.png"], "query image not found", 1),
        (["query", "--audio", "/no/such.wav"], "query audio not found", 1),
        (["query", "   "], "empty", 1),
        (["query", "x", "-k", "0"], "", 2),
        (["index", "/no/such/folder"], "not a folder", 1),
        (["query", "x", "--model", "ViT-B-32"], "was built with", 1),
    ],
)
def test_bad_command_lines_give_one_clear_line(built: Path, args: list[str], message: str, code: int) -> None:
    result = mmsearch(*args, "--index", str(built))
    assert result.returncode == code
    assert "Traceback" not in result.stderr + result.stdout
    assert message in result.stderr + result.stdout


def test_missing_index_and_missing_weights(tmp_path: Path, folder: Path) -> None:
    result = mmsearch("query", "x", "--index", str(tmp_path / "nothing"))
    assert (
        result.returncode == 1 and "no mmsearch index" in result.stderr and "Traceback" not in result.stderr
    )
    # The default model's weights cannot be downloaded here: a clear message naming --checkpoint.
    result = mmsearch("index", str(folder / "media"), "--index", str(tmp_path / "new"))
    assert result.returncode == 1 and "--checkpoint" in result.stderr and "Traceback" not in result.stderr
