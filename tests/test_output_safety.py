"""What the CLI prints about hostile file names, captions and transcripts (issue 11, items 6 and 7).

A name that is not UTF-8 must index, search and print under a strict stdout encoding; a control character in
a name or caption (terminal escape sequences, tab, newline) must never reach the terminal raw, in the plain,
the rich (terminal) and the JSON output. The commands run as real subprocesses on a real index (tiny model).
"""

from __future__ import annotations

import base64
import codecs
import json
import os
import re
import subprocess
import sys
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from mmsearch import cli, client, render
from mmsearch.search import Hit
from tests.conftest import TINY_MODEL
from tests.test_server import start

# The hostile names, as bytes: the folder itself holds ESC [2J and an undecodable byte, so every path does.
ROOT_NAME = b"media\x1b[2J\xff"
UNDECODABLE = b"ok\xff.png"  # with a caption sidecar holding escape sequences
CONTROLS = b"tab\there\nnl\x1b]0;t\x07.png"  # captioned by captions.jsonl, with C1 and line separators
BROKEN = b"broken\xff\x1b]0;x\x07.jpg"  # not an image: printed among the skipped files
SIDECAR_CAPTION = "a red \x1b]0;pwned\x07 thing \x1b[2J done"
MANIFEST_CAPTION = "blue\x9b2J\ttab\nline \x85 \u2028 end"
# How they must read once printed (render.printable's escapes), written out by hand.
ROOT_SHOWN = "media\\x1b[2J\ufffd"
SIDECAR_SHOWN = "a red \\x1b]0;pwned\\x07 thing \\x1b[2J done"
MANIFEST_SHOWN = "blue\\x9b2J\\ttab\\nline \\x85 \\u2028 end"
CONTROLS_SHOWN = "tab\\there\\nnl\\x1b]0;t\\x07.png"
BROKEN_SHOWN = "broken\ufffd\\x1b]0;x\\x07.jpg"

STRICT = {"PYTHONIOENCODING": "utf-8:strict"}
LOCALE = {"LC_ALL": "C.UTF-8"}  # a UTF-8 locale: stdout is strict UTF-8 without PYTHONIOENCODING
ASCII = {"PYTHONIOENCODING": "ascii:strict"}
TERMINAL = {**STRICT, "TTY_COMPATIBLE": "1", "COLUMNS": "400"}  # what rich (and cli) take for a terminal
# rich's own styling on a terminal: Select Graphic Rendition only (ESC [ ... m).
SGR = re.compile(rb"\x1b\[[0-9;]*m")


@dataclass
class Built:
    root: bytes  # the media folder, exact bytes
    index: Path
    run: subprocess.CompletedProcess[bytes]  # the `mmsearch index` that built it (plain output)


def mmsearch(*args: str | bytes, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONIOENCODING", "LC_ALL", "LANG", "FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR")
    }
    return subprocess.run(
        [sys.executable, "-m", "mmsearch", *args],
        capture_output=True,
        timeout=300,
        env={**base, **env},
    )


def hostile_folder(parent: Path) -> bytes:
    root = os.path.join(os.fsencode(parent), ROOT_NAME)
    os.makedirs(root)
    for name, color in ((UNDECODABLE, "red"), (CONTROLS, "blue")):
        Image.new("RGB", (64, 48), color).save(os.fsdecode(os.path.join(root, name)), format="PNG")
    with open(os.path.join(root, b"ok\xff.txt"), "wb") as f:
        f.write(SIDECAR_CAPTION.encode() + b"\n")
    with open(os.path.join(root, b"captions.jsonl"), "w") as f:
        f.write(json.dumps({"path": os.fsdecode(CONTROLS), "caption": MANIFEST_CAPTION}) + "\n")
    with open(os.path.join(root, BROKEN), "wb") as f:
        f.write(b"\xff\xd8 not really a JPEG")
    return root


def index_args(root: bytes, index: Path, *extra: str) -> list[str | bytes]:
    return ["index", root, "--index", str(index), "--model", TINY_MODEL, "--pretrained", "random", *extra]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    parent = tmp_path_factory.mktemp("hostile")
    root = hostile_folder(parent)
    index = parent / "idx"
    return Built(root, index, mmsearch(*index_args(root, index), env=STRICT))


def text_of(out: bytes, *, terminal: bool = False) -> str:
    """``out`` as text, checked: valid UTF-8, and no control character but newline (and tab, the plain
    output's column separator); on a terminal, rich's own SGR styling sequences are removed first."""
    if terminal:
        out = SGR.sub(b"", out)
    text = out.decode("utf-8")  # strict: a surrogate or stray byte fails here
    bad = sorted({c for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n"})
    assert not bad, f"raw control characters {bad!r} in {text!r}"
    assert "\u2028" not in text and "\u2029" not in text
    return text


def no_payload_in(stderr: bytes) -> None:
    """stderr of a terminal run may hold rich's cursor control (progress bar): never the files' sequences."""
    for payload in (b"\x1b]", b"\x07", b"\x1b[2J", b"\xc2\x9b"):
        assert payload not in stderr, stderr


# --- item 6 and 7 through the real command -------------------------------------------------------------
@pytest.mark.slow
def test_index_prints_every_hostile_name_escaped(built: Built) -> None:
    assert built.run.returncode == 0, built.run.stderr.decode("utf-8", "replace")
    out = text_of(built.run.stdout)
    text_of(built.run.stderr)
    assert f"indexed {os.fsdecode(os.path.dirname(built.root))}/{ROOT_SHOWN}:" in out
    assert "2 images embedded" in out and "1 skipped" in out
    assert f"  skipped {os.fsdecode(os.path.dirname(built.root))}/{ROOT_SHOWN}/{BROKEN_SHOWN}: " in out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["json", "terminal"])
def test_index_json_and_terminal_output(built: Built, tmp_path: Path, mode: str) -> None:
    if mode == "json":
        result = mmsearch(*index_args(built.root, tmp_path / "idx", "--json"), env=STRICT)
        assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
        assert result.stdout.isascii()
        run = json.loads(result.stdout)["runs"][0]
        broken = os.path.join(built.root, BROKEN).decode("utf-8", "replace")
        assert run["root"] == built.root.decode("utf-8", "replace")
        assert [s["path"] for s in run["skipped"]] == [broken]  # display form, no surrogate
        assert [base64.b64decode(s["path_b64"]) for s in run["skipped"]] == [os.path.join(built.root, BROKEN)]
        text_of(result.stderr)
    else:
        result = mmsearch(*index_args(built.root, tmp_path / "idx"), env=TERMINAL)
        assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
        out = text_of(result.stdout, terminal=True)
        assert f"{ROOT_SHOWN}/{BROKEN_SHOWN}: " in out
        no_payload_in(result.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("env", [STRICT, ASCII, TERMINAL], ids=["plain", "ascii", "terminal"])
def test_status_prints_skipped_names_escaped(built: Built, env: dict[str, str]) -> None:
    result = mmsearch("status", "--index", str(built.index), env=env)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    out = text_of(result.stdout, terminal=env is TERMINAL)
    if env is ASCII:
        # An ASCII stdout writes the replacement character as a backslash escape instead of failing.
        assert out.isascii() and f"{ROOT_SHOWN}/{BROKEN_SHOWN}".replace("\ufffd", "\\ufffd") in out
    else:
        assert f"{ROOT_SHOWN}/{BROKEN_SHOWN}: " in out
    text_of(result.stderr)


@pytest.mark.slow
def test_status_json_has_no_surrogates_and_no_raw_controls(built: Built) -> None:
    result = mmsearch("status", "--index", str(built.index), "--json", env=STRICT)
    assert result.returncode == 0 and result.stdout.isascii()
    skipped = json.loads(result.stdout)["skipped"]
    assert [s["path"] for s in skipped] == [os.path.join(built.root, BROKEN).decode("utf-8", "replace")]
    assert [base64.b64decode(s["path_b64"]) for s in skipped] == [
        os.path.join(built.root, BROKEN)
    ]  # exact bytes


@pytest.mark.slow
@pytest.mark.parametrize("env", [STRICT, LOCALE, ASCII], ids=["strict", "locale", "ascii"])
def test_plain_query_keeps_one_line_of_six_columns_per_hit(built: Built, env: dict[str, str]) -> None:
    result = mmsearch("query", "a thing", "-t", "all", "--index", str(built.index), env=env)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    out = text_of(result.stdout)
    lines = out.splitlines()
    assert len(lines) == 4  # two images and two captions: a newline in a name or caption adds no line
    assert all(line.count("\t") == 5 for line in lines)
    rows = {(kind, text) for _, _, _, kind, _, text in (line.split("\t") for line in lines)}
    paths = {line.split("\t")[4] for line in lines}
    if env is ASCII:
        assert out.isascii()
        return
    assert ("caption", SIDECAR_SHOWN) in rows and ("caption", MANIFEST_SHOWN) in rows
    assert {p.rsplit("/", 1)[1] for p in paths} == {"ok\ufffd.png", CONTROLS_SHOWN}
    assert all(p.rsplit("/", 2)[1] == ROOT_SHOWN for p in paths)
    text_of(result.stderr)


@pytest.mark.slow
def test_query_table_on_a_terminal_escapes_names_and_captions(built: Built) -> None:
    result = mmsearch("query", "a thing", "-t", "all", "--index", str(built.index), env=TERMINAL)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    out = text_of(result.stdout, terminal=True)
    assert "│" in out  # rich's table, not the plain output
    for shown in (SIDECAR_SHOWN, MANIFEST_SHOWN, CONTROLS_SHOWN, f"{ROOT_SHOWN}/ok\ufffd.png"):
        assert shown in out
    no_payload_in(result.stderr)


def check_query_json(built: Built, result: subprocess.CompletedProcess[bytes]) -> None:
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    assert result.stdout.isascii()  # control characters and U+FFFD as JSON escapes
    assert b"\\udc" not in result.stdout.lower()  # no surrogate escape
    hits = json.loads(result.stdout)["hits"]
    exact = {os.path.join(built.root, UNDECODABLE), os.path.join(built.root, CONTROLS)}
    assert {base64.b64decode(h["path_b64"], validate=True) for h in hits} == exact
    for h in hits:
        assert h["path"] == base64.b64decode(h["path_b64"]).decode("utf-8", "replace")
    # JSON carries the captions' control characters, escaped by json and intact once parsed.
    assert {h["text"] for h in hits if h["kind"] == "caption"} == {SIDECAR_CAPTION, MANIFEST_CAPTION}


@pytest.mark.slow
def test_query_json_carries_display_path_and_exact_bytes(built: Built) -> None:
    result = mmsearch("query", "a thing", "-t", "all", "--index", str(built.index), "--json", env=STRICT)
    check_query_json(built, result)
    text_of(result.stderr)


@pytest.fixture(scope="module")
def served(built: Built) -> Iterator[Path]:
    assert built.run.returncode == 0
    _, thread, stop = start(built.index)
    yield built.index
    stop.set()
    thread.join(30)


@pytest.mark.slow
def test_query_through_a_running_server(built: Built, served: Path) -> None:
    """The fast path (no typer) prints hostile names as safely; a server that fails is not fatal."""
    as_json = mmsearch("query", "a thing", "-t", "all", "--index", str(served), "--json", env=STRICT)
    check_query_json(built, as_json)
    # The server answered these names itself (no 500 and fallback to a local search).
    assert text_of(as_json.stderr) == ""
    plain = mmsearch("query", "a thing", "-t", "all", "--index", str(served), env=STRICT)
    assert plain.returncode == 0, plain.stderr.decode("utf-8", "replace")
    lines = text_of(plain.stdout).splitlines()
    assert len(lines) == 4 and all(line.count("\t") == 5 for line in lines)
    assert SIDECAR_SHOWN in text_of(plain.stdout)


# --- a failing server: searched locally instead ------------------------------------------------------
@pytest.mark.slow
def test_a_server_error_falls_back_to_searching_here(
    built: Built, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[str] = []

    def failing(url: str, **kwargs: object) -> dict[str, object]:
        asked.append(url)
        raise client.ServerError(f"the server at {url} failed (500): Internal Server Error")

    monkeypatch.setattr(client, "find_server", lambda *a, **kw: "http://127.0.0.1:9")
    monkeypatch.setattr(client, "query_server", failing)
    monkeypatch.setattr(cli, "_server_failed", False, raising=False)  # raising: absent in old code
    argv = ["mmsearch", "query", "a thing", "-t", "all", "--index", str(built.index), "--json"]
    monkeypatch.setattr(sys, "argv", argv)
    code: object = 0
    try:
        cli.main()  # the fast path now searches here itself and returns; the typer command exits
    except SystemExit as exited:
        code = exited.code
    captured = capsys.readouterr()
    assert code in (0, None), captured.err
    assert asked == ["http://127.0.0.1:9"]  # asked once: the search here did not ask again
    assert "failed (500)" in captured.err and "searching in this process" in captured.err
    assert len(json.loads(captured.out)["hits"]) == 4


# --- the pieces ---------------------------------------------------------------------------------------
def test_printable_escapes_controls_and_backslashes() -> None:
    assert render.printable("a\x1b]0;t\x07b\x1b[2J") == "a\\x1b]0;t\\x07b\\x1b[2J"
    assert render.printable("\t\n\r\x00\x7f\x85\x9b") == "\\t\\n\\r\\x00\\x7f\\x85\\x9b"
    assert render.printable("a\u2028b\u2029") == "a\\u2028b\\u2029"
    assert render.printable("C:\\x1b") == "C:\\\\x1b"  # the four characters, not an ESC
    assert render.printable("café 日本 🎉 ½") == "café 日本 🎉 ½"
    assert render.printable(os.fsdecode(b"a\xff\xe2\x82")) == b"a\xff\xe2\x82".decode("utf-8", "replace")
    assert render.printable("x\ud800y") == "x\ufffdy"  # a lone surrogate not from fsdecode


def test_printable_output_has_no_control_character_and_encodes_strictly() -> None:
    for cp in range(0x10000):
        out = render.printable(chr(cp))
        assert not any(unicodedata.category(c) == "Cc" for c in out), (cp, out)
        assert "\u2028" not in out and "\u2029" not in out
        out.encode("utf-8")  # strict


@given(st.text(alphabet=st.characters(max_codepoint=0xFF)))
def test_printable_reads_back_unambiguously(s: str) -> None:
    # Python's own escapes: unicode_escape reverses them (it reads other bytes as Latin-1).
    assert codecs.decode(render.printable(s).encode("latin-1"), "unicode_escape") == s


def test_hit_as_dict_is_json_safe_and_keeps_the_exact_bytes() -> None:
    raw = b"/m/\xff\xe2\x82x.png"
    hit = Hit(1, 0.5, "image", os.fsdecode(raw), None, None, None, 3, 4)
    d = hit.as_dict()
    assert d["path"] == raw.decode("utf-8", "replace") and "\ufffd" in str(d["path"])
    assert base64.b64decode(str(d["path_b64"])) == raw
    assert os.fsencode(hit.path) == raw  # the Python API keeps a path open() accepts
    json.dumps(d).encode("utf-8")  # no surrogate anywhere


def test_render_json_and_plain_rows() -> None:
    hit = {
        "rank": 1,
        "score": 0.5,
        "kind": "caption",
        "path": os.fsdecode(b"/m/a\tb\n\xff.png"),
        "text": "x\x1b[2J",
        "start": None,
        "end": None,
        "item_id": 1,
        "file_id": 1,
    }
    out = render.query_json("all", [hit], "heard\x1b]0;t\x07")
    assert out.isascii() and "\\udc" not in out
    parsed = json.loads(out)
    assert parsed["hits"][0]["path"] == "/m/a\tb\n\ufffd.png" and parsed["transcript"] == "heard\x1b]0;t\x07"
    assert "path_b64" not in parsed["hits"][0]  # a hit without the field: left out, no KeyError
    plain = render.plain_query([hit], "heard\x1b]0;t\x07")
    assert plain == "heard: heard\\x1b]0;t\\x07\n1\t0.500\t-\tcaption\t/m/a\\tb\\n\ufffd.png\tx\\x1b[2J\n"
