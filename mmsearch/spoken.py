"""Hearing a spoken query: what it may say, best first, with decoding biased towards the index's own words.

Whisper decodes a few seconds of speech with no idea of what the collection holds, and a voice it hears
badly turns "an image with a green triangle" into "and image with a green try and go". Given the index's
vocabulary (:mod:`mmsearch.vocabulary`) as prompt, it leans towards those words. It can lean too far: a
query about something else may come back with a vocabulary word for one it misheard ("a cracked screen"
heard as "a gray screen"). ``benchmarks/bench_spoken_query.py`` measures both, per voice.

:func:`hear_query` returns several readings for the caller to search when the first matches poorly:

1. the best reading of a beam search with the vocabulary as prompt;
2. the best reading without the prompt (the query may say what the collection does not hold);
3. the next readings of the biased beam search (its n best: a different word, an article more or less).

Readings that differ only in case or punctuation count once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mmsearch import vocabulary as vocab
from mmsearch.transcribe import Transcriber, distinct_texts


def hear_query(
    transcriber: Transcriber,
    path: str | Path,
    *,
    vocabulary: Sequence[str] | None,
    max_seconds: float,
    n_best: int = 3,
) -> list[str]:
    """Up to ``n_best`` readings of the spoken query in ``path``, best first (see the module's docstring);
    ``[]`` when it holds no speech. ``vocabulary``: the index's words, best first (:func:`vocabulary.load`);
    empty or ``None`` decodes without a prompt. Raises :class:`BadMediaError` for audio that cannot be
    decoded or is longer than ``max_seconds``."""
    if n_best < 1:
        raise ValueError("n_best must be at least 1")
    prompt = vocab.prompt(vocabulary) if vocabulary else ""
    if not prompt:
        return transcriber.hypotheses(path, max_seconds=max_seconds, n=n_best)
    biased = transcriber.hypotheses(path, max_seconds=max_seconds, prompt=prompt, n=n_best)
    if not biased or n_best == 1:
        return biased[:n_best]
    plain = transcriber.hypotheses(path, max_seconds=max_seconds, n=1)
    return distinct_texts([biased[0], *plain, *biased[1:]])[:n_best]
