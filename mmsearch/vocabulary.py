"""The index's own words, for hearing spoken queries: the most distinctive words of its captions and
transcripts, kept in the catalog and given to Whisper as a prompt (see :mod:`mmsearch.spoken`).

A word earns its place in the prompt when queries are likely to say it and Whisper is likely to miss it
unaided. The first grows with the number of the collection's texts that hold it (document frequency, df);
the second with how rare the word is in text at large. That rarity is read off the GPT-2 byte-pair encoding
that Whisper's English models decode into, with no word list: byte-pair merges are learned in order of
frequency, so a piece's id follows its frequency rank, and by Zipf's law -log P(piece) ~ log(rank). A word's
*surprisal* sums that over its pieces: " green" (one piece, id 4077) 8.3, " triangle" (22950) 10.0,
" Kubernetes" (four pieces) 29.4. Its score is ``log(1 + df) * surprisal``: a name that four texts say
(1.6 x 29.4) outranks a colour that fifty say (3.9 x 8.3). Stop words (``catalog_words.STOP_WORDS``),
contractions, numbers and one-letter words are left out. Each word keeps its most common spelling, lower
case when the collection ever writes it so (a capital at the start of a sentence says nothing).

The words, best first, are capped so that the prompt made of them (:func:`prompt`) fits
``PROMPT_TOKENS``: Whisper reads at most 223 tokens of prompt and drops the oldest beyond that.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mmsearch.catalog import Catalog
from mmsearch.catalog_items import live_texts
from mmsearch.catalog_words import STOP_WORDS
from mmsearch.errors import MissingDependencyError
from mmsearch.store import Store

#: Catalog meta key of the stored vocabulary (see :func:`refresh`).
META_KEY = "vocabulary"
#: Whisper reads at most n_text_ctx // 2 - 1 = 223 prompt tokens; the prompt keeps a margin under that
#: for tokenizers that split words more finely than GPT-2's (the multilingual models').
PROMPT_TOKENS = 200
#: Changes whenever the choice of words changes, so a stored vocabulary made another way is recomputed.
METHOD = 1
_PROMPT_HEAD = "Vocabulary:"
# A word: letters and digits, with apostrophes inside ("O'Brien", "don't") but not a possessive "'s"
# ("Kubernetes's" is "Kubernetes"); hyphens, dots and other signs split words.
_WORD = re.compile(r"[^\W_]+(?:'(?!s\b)[^\W_]+)*")
# English contractions ("don't", "we'll"): function words, never distinctive.
_CONTRACTION = re.compile(r"'(t|re|ve|m|ll|d)$")


def distinctive_words(texts: Iterable[str], budget_tokens: int = PROMPT_TOKENS) -> list[str]:
    """The most distinctive words of ``texts``, best first, as many as fit a prompt of ``budget_tokens``
    tokens; ties go to the word seen first. A word's df counts the texts holding it once per spelling
    (a text saying "Green" and "green" counts twice: rare, and cheaper than folding every word)."""
    written: Counter[str] = Counter()  # word as written -> texts holding it so
    for text in texts:
        written.update(set(_WORD.findall(text)))
    df: Counter[str] = Counter()
    spelling: dict[str, tuple[bool, int, str]] = {}  # lower-cased word -> its best spelling
    for word, count in written.items():
        key = word.lower()
        df[key] += count
        best = (word == key, count, word)  # lower case when ever written so, else the most common
        if key not in spelling or best > spelling[key]:
            spelling[key] = best
    scored = []
    for order, (key, count) in enumerate(df.items()):
        if _is_candidate(key):
            word = spelling[key][2]
            scored.append((-math.log1p(count) * _surprisal(word), order, word))
    scored.sort()
    return cap([word for _, _, word in scored], budget_tokens)


def prompt(words: Sequence[str]) -> str:
    """The prompt Whisper is given for ``words`` (best first): "Vocabulary: red, circle, ...", with the
    words that do not fit ``PROMPT_TOKENS`` left out. Empty when there are no words."""
    kept = cap(words)
    return f"{_PROMPT_HEAD} {', '.join(kept)}." if kept else ""


def cap(words: Sequence[str], budget_tokens: int = PROMPT_TOKENS) -> list[str]:
    """The first of ``words`` whose prompt fits ``budget_tokens`` tokens."""
    encoding = _encoding()
    used = len(encoding.encode(_PROMPT_HEAD)) + 1  # the final "."
    kept: list[str] = []
    for word in words:
        cost = len(encoding.encode(" " + word)) + (1 if kept else 0)  # a comma before all but the first
        if used + cost > budget_tokens:
            break
        used += cost
        kept.append(word)
    return kept


def prompt_tokens(text: str) -> int:
    """Tokens of ``text`` for Whisper's English models (GPT-2's byte-pair encoding)."""
    return len(_encoding().encode(text))


# ---------------------------------------------------------------------------------------------- catalog


def refresh(store: Store) -> list[str]:
    """The vocabulary of the collection, recomputed and stored in the catalog when its texts changed since
    it was computed (or it was computed another way); else the stored one. For the process that writes
    the index (after adding folders or retranscribing)."""
    source = _source(store.catalog)
    kept = store.catalog.get_meta(META_KEY)
    if isinstance(kept, dict) and kept.get("from") == source:
        return list(kept.get("words", []))
    texts = 0

    def counted() -> Iterator[str]:
        nonlocal texts
        for text in live_texts(store.catalog):
            texts += 1
            yield text

    words = distinctive_words(counted())
    store.catalog.set_meta(
        META_KEY, {"words": words, "from": source, "texts": texts, "budget_tokens": PROMPT_TOKENS}
    )
    return words


def load(store: Store) -> list[str]:
    """The stored vocabulary (best first), whether or not the collection changed since; ``[]`` when none
    was computed. Never writes."""
    kept = store.catalog.get_meta(META_KEY)
    return list(kept.get("words", [])) if isinstance(kept, dict) else []


def _source(catalog: Catalog) -> dict[str, Any]:
    """What a vocabulary is computed from: every change to captions or transcript segments changes their
    embeddings, which bumps the active model's generation of that kind."""
    return {
        "method": METHOD,
        "model": catalog.active_model(),
        "caption_generation": catalog.generation("caption"),
        "segment_generation": catalog.generation("segment"),
    }


# ---------------------------------------------------------------------------------------------- rarity


def _is_candidate(key: str) -> bool:
    return (
        len(key) > 1
        and key not in STOP_WORDS
        and not key.replace("'", "").isdigit()
        and not _CONTRACTION.search(key)
    )


def _surprisal(word: str) -> float:
    """-log P(word) under a Zipf model of GPT-2's byte-pair pieces: the sum of log(rank) of its pieces."""
    return sum(math.log(piece + 2) for piece in _encoding().encode(" " + word))


@functools.cache
def _encoding() -> Any:
    """GPT-2's byte-pair encoding from openai-whisper's own copy, read with tiktoken (without importing
    whisper, which imports torch)."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("openai-whisper", "The spoken-query vocabulary")
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / "gpt2.tiktoken"
    try:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
    except ImportError as exc:
        raise MissingDependencyError("tiktoken", "The spoken-query vocabulary") from exc
    return tiktoken.Encoding(
        name="gpt2",
        # openai-whisper's tokenizer pattern (whisper/tokenizer.py)
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=load_tiktoken_bpe(str(path)),
        special_tokens={},
    )
