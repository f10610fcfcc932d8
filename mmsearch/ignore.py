"""What a scan leaves out: ``.mmsearchignore`` files, exclude patterns, hidden entries, cache folders.

Rules have git's ``.gitignore`` meaning, matched by the ``pathspec`` library (its gitignore flavour):
``*.psd``, ``!keep.psd`` (negation), ``/top-level-only``, ``folder-only/``, ``a/**/b``, ``#`` comments. A
``.mmsearchignore`` file's patterns are relative to the folder that holds it and apply to everything under
that folder; a deeper file's rules come after its parents' (so they can negate them), and within a file the
last matching pattern decides. Exclude patterns given by the caller (``--exclude``) are relative to the
scanned root and come last of all: a ``.mmsearchignore`` cannot re-include what the caller excluded, and
the caller's negation (``--exclude '!keep.jpg'``) re-includes what a ``.mmsearchignore`` left out.

Before any rule, and whatever the rules say: the folders of :data:`CACHE_FOLDERS` (thumbnails, version
control, recycle bins) are always left out, and hidden entries (a name starting with ``.``) unless the
caller asks for them (``include_hidden``). Rules can only leave out more: a negation undoes an earlier rule,
not these defaults (the common ``*`` / ``!*/`` / ``!*.jpg`` idiom would otherwise pull in every
``@eaDir/IMG_1.jpg/SYNOPHOTO_THUMB_XL.jpg``).

This module only compiles and evaluates rules; :mod:`mmsearch.scan` walks. ``pathspec`` is imported when a
rule is first compiled: a folder without rules never loads it.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mmsearch.errors import ConfigError

if TYPE_CHECKING:
    from pathspec import GitIgnoreSpec

IGNORE_FILE = ".mmsearchignore"
#: Larger ignore files are not applied (a problem is reported): reading one must stay cheap.
MAX_IGNORE_FILE_BYTES = 1 << 20
#: More patterns than this in one file and it is not applied: every file under the folder is matched against
#: each pattern (about half a microsecond apiece), so a hostile file must not make a scan take hours.
MAX_IGNORE_RULES = 1000
#: Folders of thumbnails, caches, version control and recycle bins that photo libraries and NAS boxes fill
#: (Synology, QNAP, macOS, Windows, freedesktop, git): never anyone's photos, skipped by default.
CACHE_FOLDERS = frozenset(
    {
        "@eaDir",  # Synology thumbnails and metadata
        "#recycle",  # Synology recycle bin
        "#snapshot",  # Synology snapshots (copies of the whole share)
        ".@__thumb",  # QNAP thumbnails
        "@Recycle",  # QNAP recycle bin
        "@Recently-Snapshot",  # QNAP snapshots
        ".thumbnails",  # freedesktop thumbnail cache
        ".cache",
        ".git",
        ".hg",
        ".svn",
        "__MACOSX",  # resource forks unpacked from zip archives made on a Mac
        ".Trashes",  # macOS trash on external drives
        ".Spotlight-V100",
        ".fseventsd",
        ".AppleDouble",
        "$RECYCLE.BIN",  # Windows recycle bin
        "System Volume Information",
    }
)
#: Name prefixes of cache folders: freedesktop's per-user trash on removable drives (``.Trash-1000``).
CACHE_FOLDER_PREFIXES = (".Trash-",)
HIDDEN_FOLDER_REASON = "hidden folder (use --include-hidden to index it)"
CACHE_FOLDER_REASON = "thumbnail or cache folder"


def is_cache_folder(name: str) -> bool:
    return name in CACHE_FOLDERS or name.startswith(CACHE_FOLDER_PREFIXES)


@dataclass(frozen=True)
class RuleSet:
    """Compiled patterns and where they apply: paths under ``base`` (relative to the scanned root, ``/``
    separated, ending in ``/``; empty for the root itself)."""

    base: str
    spec: GitIgnoreSpec
    reasons: tuple[str, ...]  # per compiled pattern: why a path it excludes is left out


def decide(rules: Sequence[RuleSet], rel: str) -> tuple[bool | None, str]:
    """What ``rules`` (weakest first) say of ``rel``, a path relative to the scanned root ending in ``/``
    for a folder: (True, reason) excluded, (False, "") re-included by a negation, (None, "") not named."""
    for rule in reversed(rules):
        found = rule.spec.check_file(rel[len(rule.base) :])
        if found.include is not None:
            return found.include, rule.reasons[found.index] if found.include else ""  # type: ignore[index]
    return None, ""


def exclude_rules(patterns: Iterable[str]) -> RuleSet | None:
    """The caller's exclude patterns (relative to the root) compiled, or None when there are none.

    Raises :class:`ConfigError` for an invalid pattern: a caller's setting is checked when given."""
    if isinstance(patterns, str):
        patterns = [patterns]  # one pattern, not one per character
    lines = [p for p in patterns if p.strip() and not p.startswith("#")]
    if not lines:
        return None
    compiled, bad = _compile(lines, lambda line: f"--exclude {line}")
    if bad:
        raise ConfigError(f"invalid exclude pattern {lines[bad[0]]!r}")
    return RuleSet("", *compiled)


def read_ignore_file(path: str, folder: str, base: str) -> tuple[RuleSet | None, list[str]]:
    """The rules of the ignore file at ``path`` in ``folder`` (relative to the root: ``base``), and the
    problems to report about it. Never raises: a file that cannot be applied gives (None, [why])."""
    try:
        # O_NONBLOCK: a FIFO named like an ignore file must not block the scan (it is refused below).
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None, ["ignore file not applied: not a regular file"]
            if st.st_size > MAX_IGNORE_FILE_BYTES:
                return None, [f"ignore file not applied: larger than {MAX_IGNORE_FILE_BYTES} bytes"]
            raw = f.read(MAX_IGNORE_FILE_BYTES + 1)
    except OSError as e:
        return None, [f"unreadable ignore file: {e.strerror or e}"]
    if len(raw) > MAX_IGNORE_FILE_BYTES:
        return None, [f"ignore file not applied: larger than {MAX_IGNORE_FILE_BYTES} bytes"]
    text = _decode(raw)
    if text is None:
        return None, ["ignore file not applied: not a text file"]
    numbered = [
        (n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.startswith("#")
    ]
    if len(numbered) > MAX_IGNORE_RULES:
        return None, [f"ignore file not applied: more than {MAX_IGNORE_RULES} patterns"]
    compiled, bad = _compile(
        [line for _, line in numbered], lambda line: f"{IGNORE_FILE} in {folder}: {line}"
    )
    problems = [f"line {numbered[i][0]}: invalid pattern {numbered[i][1]!r} (left out)" for i in bad]
    return (RuleSet(base, *compiled) if compiled[1] else None), problems


def _decode(raw: bytes) -> str | None:
    """Text of an ignore file, or None if it is not text. Bytes that are not UTF-8 are kept as the file
    system's names keep them (surrogate escapes), so a pattern matches the name it was written for."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16, as older Windows editors save text
        try:
            text = raw.decode("utf-16")
        except UnicodeDecodeError:
            return None
    else:
        text = raw.decode("utf-8-sig", "surrogateescape")
    return None if "\x00" in text else text


def _compile(
    lines: list[str], describe: Callable[[str], str]
) -> tuple[tuple[GitIgnoreSpec, tuple[str, ...]], list[int]]:
    """Compile each line on its own, so that one bad pattern is reported and left out, not the whole file;
    returns (spec, reason per pattern) and the indexes of the bad lines."""
    from pathspec import GitIgnoreSpec

    patterns: list[Any] = []
    reasons: list[str] = []
    bad: list[int] = []
    for i, line in enumerate(lines):
        try:
            one = GitIgnoreSpec.from_lines([line]).patterns
        except (ValueError, re.error):  # pathspec's GitIgnorePatternError is a ValueError
            bad.append(i)
            continue
        patterns.extend(one)
        reasons.extend(describe(line) for _ in one)
    return (GitIgnoreSpec(patterns), tuple(reasons)), bad
