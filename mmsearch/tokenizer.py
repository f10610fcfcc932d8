"""OpenCLIP's text tokenizer (``open_clip.SimpleTokenizer``: byte-level BPE) without torch.

The ONNX text tower takes token ids; this module produces the same ids as ``open_clip.get_tokenizer(arch)``
for the models whose text config names no Hugging Face tokenizer, reading the same merges file
(``bpe_simple_vocab_16e6.txt.gz``, shipped inside the open_clip package, located without importing it).
It returns a numpy array where open_clip returns a torch tensor. ``tests/test_torch_free.py`` compares the
two on many strings (unicode, HTML entities, mojibake, texts longer than the context).

Cleaning follows OpenCLIP: ``ftfy.fix_text``, HTML unescaped twice, then ``lower`` (whitespace collapsed,
lower-cased; the CLIP default), ``whitespace`` or ``canonicalize`` (punctuation removed as well).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import string
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from mmsearch.errors import MmsearchError

DEFAULT_CONTEXT_LENGTH = 77
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLEANERS = ("lower", "whitespace", "canonicalize")
_MERGES = 49152 - 256 - 2  # the merges OpenCLIP reads: the vocabulary is 49408 tokens
_SPECIAL = ("<start_of_text>", "<end_of_text>")
_NO_MERGE = 1 << 30  # the rank of a pair no merge makes


def default_bpe_path() -> Path:
    """The merges file inside the installed open_clip package (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / BPE_FILE
        if path.is_file():
            return path
    raise MmsearchError(f"the CLIP vocabulary ({BPE_FILE}) was not found: is open_clip_torch installed?")


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """Every byte as a printable character (the BPE works on these), as in OpenAI's CLIP."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


# Printable ASCII without "&": ftfy and HTML unescaping leave such a text as it is, so most queries skip
# importing ftfy (a fifth of a second). tests/test_torch_free.py checks the claim on random ASCII strings.
_PLAIN = frozenset(map(chr, range(0x20, 0x7F))) - {"&"}


def _basic_clean(text: str) -> str:
    if _PLAIN.issuperset(text):
        return text.strip()
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _clean(text: str, how: str) -> str:
    text = _basic_clean(text)
    if how == "lower":
        return _whitespace_clean(text).lower()
    if how == "whitespace":
        return _whitespace_clean(text)
    # canonicalize: OpenCLIP's canonicalize_text (big_vision's prompt engineering)
    return " ".join(text.replace("_", " ").translate(_PUNCTUATION).lower().split()).strip()


def _read_lines(path: Path, n: int) -> list[str]:
    """The first ``n`` lines of a gzipped UTF-8 file, decompressing no more than they need (OpenCLIP uses
    the first 48,895 of 262,146 merges)."""
    chunks: list[bytes] = []
    newlines = 0
    with gzip.open(path, "rb") as f:
        while newlines < n and (chunk := f.read(1 << 16)):
            chunks.append(chunk)
            newlines += chunk.count(b"\n")
    return b"".join(chunks).decode("utf-8").split("\n", n)[:n]


class ClipTokenizer:
    """Texts → ``[n, context_length]`` int64 token ids, padded with 0, truncated with the end token last.

    The vocabulary is byte characters (ids 0-255), the same ending a word (256-511), then one token per merge
    in merge order (512 + rank), then the start and end tokens. So the id of a merged piece is 512 + the
    rank of the merge that made it (the merges file makes no piece twice; the tests check it), and loading
    needs only the merge ranks, keyed by their line: a third of the time of building OpenCLIP's tables.
    """

    def __init__(
        self, bpe_path: Path | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH, clean: str = "lower"
    ) -> None:
        if clean not in CLEANERS:
            raise MmsearchError(f"unknown tokenizer cleaning '{clean}' (known: {', '.join(CLEANERS)})")
        import regex

        path = Path(bpe_path) if bpe_path is not None else default_bpe_path()
        merges = _read_lines(path, _MERGES + 1)[1:]  # the first line is a version comment
        #: Merges in rank order, each a line "first second" of the file; and the rank of each line.
        self.merges = merges
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.byte_encoder = _bytes_to_unicode()
        chars = list(self.byte_encoder.values())
        #: Ids of single characters, alone or ending a word, then of every merged piece met so far.
        self.piece_ids = {c: i for i, c in enumerate(chars)} | {
            c + "</w>": 256 + i for i, c in enumerate(chars)
        }
        self.sot, self.eot = 512 + len(merges), 513 + len(merges)
        self.cache: dict[str, list[int]] = {t: [i] for t, i in zip(_SPECIAL, (self.sot, self.eot))}
        self.pattern = regex.compile(
            "|".join(_SPECIAL) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.context_length = int(context_length)
        self.clean = clean

    def bpe(self, token: str) -> list[int]:
        """The ids of the BPE pieces of one pre-token (in byte characters), as OpenCLIP merges them."""
        cached = self.cache.get(token)
        if cached is not None:
            return cached
        word = [*token[:-1], token[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(word) > 1:
            best = min(ranks.get(f"{a} {b}", _NO_MERGE) for a, b in zip(word, word[1:]))
            if best == _NO_MERGE:
                break
            first, second = self.merges[best].split(" ")
            merged_id = 512 + best
            merged: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    self.piece_ids[first + second] = merged_id
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.piece_ids[piece] for piece in word]
        self.cache[token] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the start/end tokens and without truncation."""
        ids: list[int] = []
        for token in self.pattern.findall(_clean(text, self.clean)):
            ids.extend(self.bpe("".join(self.byte_encoder[b] for b in token.encode("utf-8"))))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = np.zeros((len(texts), n), np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > n:
                ids = ids[:n]
                ids[-1] = self.eot
            out[row, : len(ids)] = ids
        return out
