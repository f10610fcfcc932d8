"""Walk a media folder: find images and audio, pair caption text with images, note what cannot be read.

Captions come from two places:

* a sidecar text file with the image's stem (``photo.txt`` beside ``photo.jpg``, or ``photo.jpg.txt``);
  each non-empty line is one caption;
* a manifest at the folder root, ``captions.jsonl`` (``{"path": ..., "caption": ...}`` per line) or
  ``captions.csv`` (columns ``path,caption``; a header row is optional), paths relative to the root.

Symbolic links. A link (to a file or a folder) whose real target lies inside the indexed folder is followed;
folders are walked once each, so a loop or a second link to the same folder ends there. A link whose target
resolves outside the indexed folder is not followed unless the caller asks for it (``follow_links=True``):
anyone who can put a link in an indexed folder could otherwise pull a file from elsewhere (a private photo)
into the index, whose server then serves it. Such a link is listed in ``problems`` with
:data:`OUTSIDE_LINK_REASON`. Only link entries cost a ``realpath``: a folder without links is scanned at the
same speed. Hard links cannot be told from ordinary files and are indexed like them.

What is left out on purpose is listed in ``excluded`` with why (rules in :mod:`mmsearch.ignore`):
folders named in :data:`~mmsearch.ignore.CACHE_FOLDERS` (``@eaDir``, ``.git``, ``__MACOSX``...), always;
hidden folders (a name starting with ``.``) unless ``include_hidden``; folders and media files that a
``.mmsearchignore`` file or an ``exclude`` pattern names (gitignore rules). An excluded folder is not walked
at all, so, as in git, a file cannot be re-included (``!pattern``) if a folder above it is excluded: write
``raw/*`` and ``!raw/keep.jpg``, not ``raw/`` and ``!raw/keep.jpg``. Hidden files are left out like hidden
folders, counted in ``hidden_files`` when named like media rather than listed. A caption file or manifest
that a rule names is not read.

What could not be seen is reported, never guessed: unreadable folders and broken links are listed in
``problems``; folders that are mount points and folders holding nothing are listed in ``mount_points`` and
``empty_folders`` (an unplugged drive looks like an empty folder), so that the caller can keep what its
catalog holds under them instead of forgetting it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mmsearch import sidecars
from mmsearch.constants import AUDIO_SUFFIXES, IMAGE_SUFFIXES, LIVE_PHOTO_VIDEO_SUFFIXES, VIDEO_SUFFIXES
from mmsearch.ignore import (
    CACHE_FOLDER_REASON,
    HIDDEN_FOLDER_REASON,
    IGNORE_FILE,
    RuleSet,
    decide,
    exclude_rules,
    is_cache_folder,
    read_ignore_file,
)

log = logging.getLogger(__name__)

CAPTION_SUFFIX = ".txt"
MANIFESTS = ("captions.jsonl", "captions.csv")
MAX_CAPTION_FILE_BYTES = 1 << 20
INDEX_MARKER = "mmsearch.json"  # a folder holding this file is an index: never scanned as media
OUTSIDE_LINK_REASON = "symlink points outside the indexed folder (use --follow-links to index it)"
BROKEN_LINK_REASON = "broken symlink"
LIVE_PHOTO_REASON = "Live Photo video, part of the photo"  # followed by the photo's name
UNREADABLE_FOLDER_REASON = "unreadable folder"  # followed by ": <why>"


@dataclass(frozen=True)
class FoundFile:
    path: Path  # absolute, symlinks in the folder part kept as the user sees them
    kind: str  # "image" | "audio" | "video"
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Caption:
    text: str
    source: str  # the sidecar's or manifest's path, so an edited source re-embeds only its captions


@dataclass
class ScanResult:
    root: Path
    files: list[FoundFile] = field(default_factory=list)
    captions: dict[Path, list[Caption]] = field(default_factory=dict)
    problems: list[tuple[Path, str]] = field(default_factory=list)
    # Walked folders on another device than their parent folder (the root counts when it is one).
    mount_points: list[Path] = field(default_factory=list)
    # Walked folders with no visible entry at all (the root included): an unmounted drive looks like this.
    empty_folders: list[Path] = field(default_factory=list)
    # Folders and media files left out on purpose, with why (see the module docstring); caption files left
    # out by a rule are not listed.
    excluded: list[tuple[Path, str]] = field(default_factory=list)
    # Hidden files named like media that were left out: counted, not listed (a Mac leaves a "._name" file
    # beside every file it copies to a foreign drive).
    hidden_files: int = 0
    # Image path -> its metadata sidecars (XMP, Takeout JSON) with their change times: read with the image
    # (see mmsearch.sidecars, mmsearch.photo_meta), not on every run.
    sidecars: dict[str, list[sidecars.Sidecar]] = field(default_factory=dict)


def kind_of(path: Path) -> str | None:
    return kind_of_name(path.name)


def kind_of_name(name: str) -> str | None:
    suffix = os.path.splitext(name)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in AUDIO_SUFFIXES:
        return "audio"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return None


def scan(
    root: str | Path,
    *,
    follow_links: bool = False,
    exclude: Iterable[str] = (),
    include_hidden: bool = False,
) -> ScanResult:
    """Scan ``root`` recursively. Never raises for a bad entry: it is listed in ``problems``.

    ``follow_links``: also follow links whose target lies outside ``root`` (see the module docstring).
    ``exclude``: patterns with ``.gitignore`` meaning, relative to ``root``, of what to leave out; they win
    over ``.mmsearchignore`` files. ``include_hidden``: walk hidden entries too (cache folders stay out).
    Raises :class:`~mmsearch.errors.ConfigError` for an invalid ``exclude`` pattern.
    """
    root = Path(os.path.abspath(root))
    excluding = exclude_rules(exclude)
    result = ScanResult(root=root)
    texts: list[str] = []
    metadata_files: list[sidecars.Sidecar] = []
    outside_texts: set[str] = set()  # caption-named links not followed: reported only if an image wants them
    inside = None if follow_links else _inside_test(root)
    walk = _walk(
        root, result, inside, outside_texts, () if excluding is None else (excluding,), include_hidden
    )
    for path, st in walk:
        kind = kind_of_name(path)
        if kind is not None:
            result.files.append(FoundFile(Path(path), kind, st.st_size, st.st_mtime_ns))
        else:
            suffix = os.path.splitext(path)[1].lower()
            if suffix == CAPTION_SUFFIX:
                texts.append(path)
            elif suffix in sidecars.SIDECAR_SUFFIXES:
                metadata_files.append((path, max(st.st_mtime_ns, st.st_ctime_ns)))
    # Pairing works on path strings: a no-op re-index of a large folder spends most of its time here,
    # and pathlib's hashing and with_suffix() cost several times more than str operations.
    images = {str(f.path): f.path for f in result.files if f.kind == "image"}
    _pair_sidecars(texts, images, result)
    if metadata_files:
        result.sidecars = sidecars.pair(metadata_files, set(images))
    _report_outside_sidecars(outside_texts, images, result)
    left_out = {str(p) for p, _ in result.excluded}
    for name in MANIFESTS:
        manifest = root / name
        if str(manifest) in left_out:
            continue
        if inside is not None and manifest.is_symlink() and not inside(str(manifest)):
            result.problems.append((manifest, OUTSIDE_LINK_REASON))
        elif manifest.is_file():
            _read_manifest(manifest, images, result, left_out, include_hidden)
    _fold_live_photos(result)
    result.files.sort(key=lambda f: os.fsencode(f.path))
    return result


def _fold_live_photos(result: ScanResult) -> None:
    """A video beside a still of the same name (``IMG_1.MOV`` and ``IMG_1.HEIC``: a Live Photo) is part of
    the photo: left out, with that reason, instead of indexed as an unrelated video."""
    stills = {os.path.splitext(str(f.path))[0]: f.path.name for f in result.files if f.kind == "image"}
    if not stills:
        return
    kept = []
    for f in result.files:
        stem, suffix = os.path.splitext(str(f.path))
        if f.kind == "video" and suffix.lower() in LIVE_PHOTO_VIDEO_SUFFIXES and stem in stills:
            result.excluded.append((f.path, f"{LIVE_PHOTO_REASON} {stills[stem]}"))
        else:
            kept.append(f)
    result.files = kept


def _inside_test(root: Path) -> Callable[[str], bool]:
    """A test of whether a link's real target is ``root``'s real folder or lies under it."""
    real_root = os.path.realpath(root)
    prefix = real_root.rstrip(os.sep) + os.sep

    def inside(link: str) -> bool:
        real = os.path.realpath(link)
        return real == real_root or real.startswith(prefix)

    return inside


def _walk(
    root: Path,
    result: ScanResult,
    inside: Callable[[str], bool] | None,
    outside_texts: set[str],
    exclude: tuple[RuleSet, ...],
    include_hidden: bool,
) -> Iterator[tuple[str, os.stat_result]]:
    """Yield (path, stat) of regular files; follow directory symlinks once, never around a loop, and only
    those ``inside`` accepts (all of them if it is None). Leave out what :mod:`mmsearch.ignore` says."""
    problems = result.problems
    seen_dirs: set[tuple[int, int]] = set()
    # (folder, its parent folder's st_dev, its path relative to root ending in "/", its ignore files' rules)
    stack: list[tuple[Path, int | None, str, tuple[RuleSet, ...]]] = [(root, None, "", ())]
    while stack:
        folder, parent_dev, rel, layers = stack.pop()
        try:
            st = folder.stat()
        except OSError as e:
            problems.append((folder, f"{UNREADABLE_FOLDER_REASON}: {e.strerror or e}"))
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            continue  # symlink loop or a second link to a folder already walked
        seen_dirs.add(key)
        if parent_dev is None:
            parent_dev = _parent_dev(folder)
        if parent_dev is not None and st.st_dev != parent_dev:
            result.mount_points.append(folder)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: os.fsencode(e.name))
        except OSError as e:
            problems.append((folder, f"{UNREADABLE_FOLDER_REASON}: {e.strerror or e}"))
            continue
        # Looked up in the listing, not with a stat: in a folder we may not search, stat raises EACCES.
        if folder != root and any(e.name == INDEX_MARKER for e in entries):
            continue
        if any(e.name == IGNORE_FILE for e in entries):
            layers = _with_ignore_file(folder, rel, layers, result)
        # Rules are matched only when some apply: a folder without them costs what it did before them.
        rules = layers + exclude
        subdirs = []
        visible = 0
        for entry in entries:
            name = entry.name
            hidden = not include_hidden and name.startswith(".")
            if hidden:
                _skip_hidden(entry, result)
                continue
            visible += 1
            try:
                if entry.is_dir(follow_symlinks=True):
                    why = CACHE_FOLDER_REASON if is_cache_folder(name) else None
                    if why is None and rules:
                        why = _excluded_by(rules, f"{rel}{name}/")
                    if why is not None:
                        result.excluded.append((Path(entry.path), why))
                    elif inside is not None and entry.is_symlink() and not inside(entry.path):
                        problems.append((Path(entry.path), OUTSIDE_LINK_REASON))
                    else:
                        subdirs.append((Path(entry.path), st.st_dev, f"{rel}{name}/", layers))
                    continue
                if rules and _excluded_file(entry, rel, rules, result):
                    continue
                est = entry.stat(follow_symlinks=True)
            except FileNotFoundError:
                if entry.is_symlink():
                    problems.append((Path(entry.path), BROKEN_LINK_REASON))
                continue
            except OSError as e:
                problems.append((Path(entry.path), f"cannot stat: {e.strerror or e}"))
                continue
            # is_symlink() reads the listing's file type: only links pay for a realpath.
            if inside is not None and entry.is_symlink() and not inside(entry.path):
                if kind_of_name(name) is not None:
                    problems.append((Path(entry.path), OUTSIDE_LINK_REASON))
                elif os.path.splitext(name)[1].lower() == CAPTION_SUFFIX:
                    outside_texts.add(entry.path)
                continue
            if stat.S_ISREG(est.st_mode):
                yield entry.path, est
            elif kind_of_name(name) is not None:
                # A FIFO, socket or device named like media: reading it could block forever.
                problems.append((Path(entry.path), "not a regular file"))
        if not visible:
            result.empty_folders.append(folder)
        stack.extend(reversed(subdirs))


def _skip_hidden(entry: os.DirEntry[str], result: ScanResult) -> None:
    """A hidden entry left out: a folder is listed; a file is counted if named like media."""
    try:
        is_dir = entry.is_dir(follow_symlinks=True)
    except OSError:
        is_dir = False
    if is_dir:
        reason = CACHE_FOLDER_REASON if is_cache_folder(entry.name) else HIDDEN_FOLDER_REASON
        result.excluded.append((Path(entry.path), reason))
    elif kind_of_name(entry.name) is not None:
        result.hidden_files += 1


def _with_ignore_file(
    folder: Path, rel: str, layers: tuple[RuleSet, ...], result: ScanResult
) -> tuple[RuleSet, ...]:
    """``layers`` with the rules of ``folder``'s ignore file after them; what cannot be applied is a problem."""
    path = os.path.join(folder, IGNORE_FILE)
    rules, why = read_ignore_file(path, str(folder), rel)
    result.problems.extend((Path(path), reason) for reason in why)
    return layers if rules is None else (*layers, rules)


def _excluded_by(rules: tuple[RuleSet, ...], rel: str) -> str | None:
    excluded, why = decide(rules, rel)
    return why if excluded else None


def _excluded_file(entry: os.DirEntry[str], rel: str, rules: tuple[RuleSet, ...], result: ScanResult) -> bool:
    """Whether the rules leave out this file. Only the names a scan uses are matched (media, caption files,
    the root's manifests); excluded media files and manifests are listed, caption files are not."""
    name = entry.name
    listed = kind_of_name(name) is not None or (not rel and name in MANIFESTS)
    if not listed and os.path.splitext(name)[1].lower() != CAPTION_SUFFIX:
        return False
    why = _excluded_by(rules, rel + name)
    if why is None:
        return False
    if listed:
        result.excluded.append((Path(entry.path), why))
    return True


def _parent_dev(folder: Path) -> int | None:
    try:
        return os.stat(folder.parent).st_dev
    except OSError:
        return None  # the root's parent may not be searchable: then the root is not known as a mount point


def _read_text(path: str | Path) -> str:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > MAX_CAPTION_FILE_BYTES:
            raise ValueError(f"caption file larger than {MAX_CAPTION_FILE_BYTES} bytes")
        raw = f.read(MAX_CAPTION_FILE_BYTES + 1)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # old caption files are often Windows-1252/latin-1; never fail on them


def _pair_sidecars(texts: list[str], images: dict[str, Path], result: ScanResult) -> None:
    by_stem: dict[str, list[str]] = {}
    for image in images:
        by_stem.setdefault(os.path.splitext(image)[0], []).append(image)
    for text_path in texts:
        stem = os.path.splitext(text_path)[0]
        owners = by_stem.get(stem, [])  # photo.txt -> photo.jpg / photo.png
        if stem in images and stem not in owners:  # photo.jpg.txt -> photo.jpg
            owners = [*owners, stem]
        if not owners:
            continue  # a text file that belongs to no image: not ours to index
        try:
            lines = [line.strip() for line in _read_text(text_path).splitlines()]
        except (OSError, ValueError) as e:
            result.problems.append((Path(text_path), f"unreadable caption file: {e}"))
            continue
        for owner in owners:
            result.captions.setdefault(images[owner], []).extend(
                Caption(line, text_path) for line in lines if line
            )


def _report_outside_sidecars(texts: set[str], images: dict[str, Path], result: ScanResult) -> None:
    """A caption file that is a link to outside the folder is not read; say so when an image would use it."""
    if not texts:
        return
    stems = {os.path.splitext(image)[0] for image in images}
    for text_path in sorted(texts, key=os.fsencode):
        stem = os.path.splitext(text_path)[0]
        if stem in images or stem in stems:  # photo.jpg.txt or photo.txt beside photo.jpg
            result.problems.append((Path(text_path), OUTSIDE_LINK_REASON))


def _read_manifest(
    manifest: Path, images: dict[str, Path], result: ScanResult, left_out: set[str], include_hidden: bool
) -> None:
    try:
        content = _read_text(manifest)
    except (OSError, ValueError) as e:
        result.problems.append((manifest, f"unreadable caption manifest: {e}"))
        return
    rows = _jsonl_rows(content, manifest, result) if manifest.suffix == ".jsonl" else _csv_rows(content)
    for line_no, rel, text in rows:
        path = os.path.normpath(os.path.join(result.root, rel))
        image = images.get(path)
        if image is None:
            if not _left_out(path, str(result.root), left_out, include_hidden):
                result.problems.append((manifest, f"line {line_no}: no indexed image at '{rel}'"))
        elif text.strip():
            result.captions.setdefault(image, []).append(Caption(text.strip(), str(manifest)))


def _left_out(path: str, root: str, left_out: set[str], include_hidden: bool) -> bool:
    """Whether ``path`` (under ``root``) was left out on purpose: a manifest's row for it is no problem."""
    while path != root and len(path) > len(root):
        if path in left_out or (not include_hidden and os.path.basename(path).startswith(".")):
            return True
        path = os.path.dirname(path)
    return False


def _jsonl_rows(content: str, manifest: Path, result: ScanResult) -> Iterator[tuple[int, str, str]]:
    for line_no, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rel = row.get("path") or row.get("file") or row.get("image")
            text = row.get("caption") if "caption" in row else row.get("text")
            if not isinstance(rel, str) or not isinstance(text, str):
                raise ValueError("needs string fields 'path' and 'caption'")
        except (ValueError, AttributeError) as e:
            result.problems.append((manifest, f"line {line_no}: {e}"))
            continue
        yield line_no, rel, text


def _csv_rows(content: str) -> Iterator[tuple[int, str, str]]:
    for line_no, row in enumerate(csv.reader(io.StringIO(content)), 1):
        if len(row) < 2:
            continue
        if line_no == 1 and row[0].strip().lower() in ("path", "file", "image", "filename"):
            continue
        yield line_no, row[0].strip(), row[1]
