"""The command line, in-process (CliRunner) and as a real subprocess: output, --json, exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmsearch import cli, render
from mmsearch.cli import app
from tests.conftest import TINY_MODEL, solid
from tests.test_server import start

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


@pytest.mark.slow
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
        (["query"], "give TEXT, --image PATH, --audio PATH or --add TEXT", 2),
        (["query", "x", "--image", "y.png"], "query image not found", 1),  # text + image: a combined query
        (["query", "x", "--audio", "y.wav"], "--audio goes alone", 2),
        (["query", "x", "--mode", "fuzzy"], "unknown mode", 1),
        (["query", "x", "--weight", "image"], "ROLE=NUMBER", 1),
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


@pytest.mark.slow
def test_missing_index_and_missing_weights(tmp_path: Path, folder: Path) -> None:
    result = mmsearch("query", "x", "--index", str(tmp_path / "nothing"))
    assert (
        result.returncode == 1 and "no mmsearch index" in result.stderr and "Traceback" not in result.stderr
    )
    # The default model's weights cannot be downloaded here: a clear message naming --checkpoint.
    result = mmsearch("index", str(folder / "media"), "--index", str(tmp_path / "new"))
    assert result.returncode == 1 and "--checkpoint" in result.stderr and "Traceback" not in result.stderr


# --- the fast path: `mmsearch query` answered by a running server without importing typer ----------------
@pytest.fixture(scope="module")
def served(folder: Path) -> Iterator[Path]:
    """Another index of the same media, with a server for it running in this process."""
    index = folder / "served"
    result = runner.invoke(
        app,
        [
            "index",
            str(folder / "media"),
            "--index",
            str(index),
            "--model",
            TINY_MODEL,
            "--pretrained",
            "random",
        ],
    )
    assert result.exit_code == 0, result.output
    _, thread, stop = start(index)
    yield index
    stop.set()
    thread.join(30)


# The typer command alone, as it answers when the fast path hands over.
TYPER_ONLY = "import sys; from mmsearch import cli; sys.argv[0] = 'mmsearch'; cli._typer_app()()"


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


QUERIES = [
    ["a red thing", "--json"],
    ["a red thing"],
    ["a blue thing", "-t", "texts", "-k", "3"],
    ["--target=all", "-k3", "--json", "a blue thing"],
    ["--image", "{media}/red.png"],
    ["--image", "{media}/blue.png", "--json", "-t", "images"],
]


@pytest.mark.parametrize("args", QUERIES)
def test_fast_path_prints_what_the_typer_command_prints(served: Path, folder: Path, args: list[str]) -> None:
    args = [a.format(media=folder / "media") for a in args] + ["--index", str(served)]
    fast = run(["-m", "mmsearch", "query", *args])
    typer_path = run(["-c", TYPER_ONLY, "query", *args])
    assert fast.returncode == typer_path.returncode == 0, fast.stderr + typer_path.stderr
    assert fast.stdout and fast.stdout == typer_path.stdout
    assert fast.stderr == typer_path.stderr == ""
    # The same query searched in this process (no server involved) prints the same again.
    local = runner.invoke(app, ["query", *args, "--local"])
    assert local.exit_code == 0, local.output
    assert local.stdout == fast.stdout


def test_fast_path_draws_the_same_table_on_a_terminal(served: Path) -> None:
    args = ["query", "a red thing", "-t", "all", "-k", "4", "--index", str(served)]
    tty = {"TTY_COMPATIBLE": "1", "COLUMNS": "120"}  # what rich takes for a terminal
    fast = run(["-m", "mmsearch", *args], **tty)
    typer_path = run(["-c", TYPER_ONLY, *args], **tty)
    assert fast.returncode == typer_path.returncode == 0, fast.stderr + typer_path.stderr
    assert "│" in fast.stdout and "red.png" in fast.stdout and fast.stdout == typer_path.stdout


WHICH_MODULES = """
import json, sys
from mmsearch import cli
sys.argv = ["mmsearch", *sys.argv[1:]]
try:
    cli.main()
finally:
    heavy = ("typer", "click", "rich", "numpy", "torch", "sqlalchemy", "PIL", "fastapi")
    print(json.dumps(sorted(m for m in heavy if m in sys.modules)), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args, loaded",
    [
        (["--json"], []),
        ([], []),
        # --local: searched here, still without typer (its start-up costs more than a search)
        (["--local", "--json"], ["numpy", "sqlalchemy"]),
        (["--device", "cpu"], ["numpy"]),  # a device chosen on the command line: here too
        (["--help"], ["typer"]),
        (["-k", "200", "--json"], []),  # the server's own cap (client.SERVER_MAX_K)
        (["-k", "201", "--json"], ["numpy"]),  # above it: answered here, not refused by the server
    ],
)
@pytest.mark.slow
def test_fast_path_imports_neither_typer_nor_the_engine(
    served: Path, args: list[str], loaded: list[str]
) -> None:
    result = run(["-c", WHICH_MODULES, "query", "a red thing", "--index", str(served), *args])
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stderr.strip().splitlines()[-1])
    assert set(loaded) <= set(modules)
    assert ("typer" in modules) == ("--help" in args)
    assert "red.png" in result.stdout or "--help" in args
    if not loaded:
        assert modules == []


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["x", "--bogus"], "No such option: --bogus", 2),
        (["-5"], "No such option: -5", 2),
        (["x", "-k", "0"], "-k", 2),
        (["x", "-k", "many"], "-k", 2),
        (["x", "--json=yes"], "--json", 2),
        (["x", "y"], "unexpected extra argument", 2),
        (["--jso", "x"], "No such option: --jso", 2),
        ([], "give TEXT, --image PATH, --audio PATH or --add TEXT", 2),
        (["x", "--audio", "y.wav"], "--audio goes alone", 2),
        (["x", "--mode", "fuzzy"], "unknown mode", 1),
        (["x", "--kind", "video-game"], "kind", 1),
        (["x", "--target", "videos"], "unknown --target", 2),
        (["   "], "empty", 1),
        (["--image", "/no/such.png"], "query image not readable", 1),
    ],
)
def test_bad_query_lines_with_a_server_up_give_one_clear_line(
    served: Path, args: list[str], message: str, code: int
) -> None:
    result = mmsearch("query", *args, "--index", str(served))
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert message in result.stderr and result.stdout == ""


def test_fast_path_parser_has_the_options_of_the_typer_command() -> None:
    import typer.main

    from mmsearch.search import MAX_K

    command = typer.main.get_command(app).commands["query"]  # type: ignore[attr-defined]
    declared = {
        p.name: (sorted(p.opts + p.secondary_opts), p.default, not getattr(p, "is_flag", False))
        for p in command.params
    }
    fast = {
        a.dest: (sorted(a.option_strings or [a.dest]), a.default, a.nargs != 0)
        for a in cli._query_argparser()._actions
    }
    assert fast == declared
    assert cli.MAX_K == MAX_K


def test_plain_output_of_a_voice_query_and_a_segment() -> None:
    hit = {"rank": 1, "score": 0.5, "kind": "segment", "path": "/a/talk.wav", "text": "hello"}
    hits = [{**hit, "start": 61.5, "end": 3725.0, "item_id": 7, "file_id": 3}]
    assert render.plain_query(hits, "hello there") == (
        "heard: hello there\n1\t0.500\t-\tsegment\t/a/talk.wav\t[1:01–1:02:05] hello\n"
    )
    assert render.plain_query([{**hits[0], "confidence": 0.8765}], None).startswith("1\t0.500\t0.88\tsegment")
    assert render.plain_query([], None) == "no results\n"
    assert render.plain_query([], None, no_match=True) == "no good match\n"
    assert json.loads(render.query_json("audio", hits, "hi"))["transcript"] == "hi"


def test_an_interrupt_inside_sqlalchemys_pool_is_not_printed_as_a_traceback() -> None:
    """A Ctrl-C landing while SQLAlchemy resets a pooled connection is logged by it with a traceback (seen
    once in test_crash's Ctrl-C rounds); the CLI's one line says it instead. Other records still print."""
    import logging

    from mmsearch import cli

    def record(name: str, exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            info = sys.exc_info()
        return logging.LogRecord(
            name, logging.ERROR, __file__, 1, "Exception during reset or similar", None, info
        )

    assert not cli._not_a_pool_interrupt(record("sqlalchemy.pool.impl.QueuePool", KeyboardInterrupt()))
    assert cli._not_a_pool_interrupt(record("sqlalchemy.pool.impl.QueuePool", OSError("disk I/O error")))
    assert cli._not_a_pool_interrupt(record("mmsearch.ingest", KeyboardInterrupt()))


AT_EXIT = """
import atexit, sys
atexit.register(lambda: print("atexit handlers ran", file=sys.stderr))
from mmsearch.cli import run
sys.argv = ["mmsearch", *sys.argv[1:]]
run()
print("not reached: run() ends the process", file=sys.stderr)
"""


def test_the_command_ends_after_a_local_query_with_its_output_whole(built: Path) -> None:
    """`mmsearch query` ends its process without the interpreter's teardown once answered (cli.run): the
    answer is flushed whole, the atexit handlers run, the status is 0, and a failed query still says why."""
    args = ["query", "a thing", "--index", str(built), "--local", "--target", "all", "-k", "4", "--json"]
    ended = subprocess.run(
        [sys.executable, "-c", AT_EXIT, *args], capture_output=True, text=True, timeout=300
    )
    assert ended.returncode == 0, ended.stderr
    assert ended.stderr == "atexit handlers ran\n"
    in_process = runner.invoke(app, args)
    assert in_process.exit_code == 0 and ended.stdout == in_process.stdout
    assert len(json.loads(ended.stdout)["hits"]) == 4
    missing = subprocess.run(
        [
            sys.executable,
            "-c",
            AT_EXIT,
            "query",
            "a thing",
            "--index",
            str(built.parent / "nowhere"),
            "--local",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 1 and missing.stderr.startswith("error: ")
    assert "atexit handlers ran" in missing.stderr and "Traceback" not in missing.stderr
