"""How mmsearch.catalog_words ranks a query's words cheaply: FTS5 ranks the rows of the rarest words only,
the commoner words adding their part of BM25 to the rows that hold them too, with the full ranking
(``exact=True``: every row holding any word, ranked by FTS5's BM25 of the whole query) as the reference.
Real SQLite catalogs written as ingest writes them."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from mmsearch import catalog_words, db
from mmsearch.catalog_words import WordHit, _tiers, word_hits
from tests.test_filters import MODEL, add_recording, new_catalog

SEGMENT = ("segment",)


@pytest.fixture
def catalog(tmp_path: Path) -> db.Catalog:
    cat = new_catalog(tmp_path / "catalog.sqlite")
    yield cat
    cat.close()


def said(catalog: db.Catalog, name: str, lines: list[str]) -> list[int]:
    """A recording saying ``lines`` (one segment each); the segments' embedding ids."""
    return add_recording(catalog, [f"/talks/{name}.mp3"], lines).segment_vectors


def scored(hits: list[WordHit]) -> list[tuple[int, float]]:
    """(id, score) best first, ties by id (FTS5 may sum a row's parts in another order, so scores that tie
    are compared rounded)."""
    return sorted(((h.id, round(h.score, 9)) for h in hits), key=lambda pair: (-pair[1], pair[0]))


# --- which words FTS5 ranks (no catalog) -----------------------------------------------------------------
def test_tiers_rank_the_rarest_words_until_their_rows_are_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog_words, "MAX_RANKED", 100)
    held = {"rare": 3, "scarce": 20, "usual": 70, "common": 5000}
    present = sorted(held, key=held.get)
    # 3 + 20 rows reach 10: the two rarest first; then every word within 100 rows together, when asked for.
    assert _tiers(present, held, needed=10) == [["rare", "scarce"], ["rare", "scarce", "usual"]]
    # The rarest word's rows are enough: it alone first.
    assert _tiers(present, held, needed=3)[0] == ["rare"]
    # Never enough within MAX_RANKED rows: every word that fits, once.
    assert _tiers(present, held, needed=500) == [["rare", "scarce", "usual"]]
    # Every word more common than MAX_RANKED rows: none (the newest rows are read instead).
    assert _tiers(["common"], held, needed=10) == []


# --- what a query finds ----------------------------------------------------------------------------------
def test_a_rare_word_s_rows_come_first_and_those_holding_every_word_before_them(
    catalog: db.Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'platypus' is ranked by FTS5 alone ('common' is held by more than MAX_RANKED rows); 'common' adds its
    part to the rows holding both, which come first with the score the whole query gives them."""
    monkeypatch.setattr(catalog_words, "MAX_RANKED", 8)
    said(catalog, "many", [f"common words number {i}" for i in range(30)])
    said(catalog, "others", [f"other words number {i}" for i in range(60)])
    (rare,) = said(catalog, "rare", ["a platypus swims by today"])
    (both,) = said(catalog, "both", ["a common platypus swims by"])
    hits = word_hits(catalog, "common platypus", SEGMENT, MODEL, 2)
    assert [h.id for h in hits] == [both, rare]
    assert hits[0].all_terms and not hits[1].all_terms
    exact = word_hits(catalog, "common platypus", SEGMENT, MODEL, 2, exact=True)
    assert scored(hits) == scored(exact)


def test_when_the_rare_words_hold_fewer_rows_than_asked_commoner_rows_fill_k(
    catalog: db.Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog_words, "MAX_RANKED", 8)
    many = said(catalog, "many", [f"common words number {i}" for i in range(30)])
    (rare,) = said(catalog, "rare", ["a platypus swims by"])
    hits = word_hits(catalog, "platypus common", SEGMENT, MODEL, 5)
    assert len(hits) == 5 and hits[0].id == rare
    assert {h.id for h in hits[1:]} <= set(many)


def test_a_commoner_word_alone_is_left_out_while_the_rarer_word_gives_enough_rows(
    catalog: db.Catalog,
) -> None:
    """The approximation, stated: 'beta' said three times in a short text outranks one 'alpha' in BM25,
    but while the 'alpha' rows are enough for the hits asked, only they are ranked; the rows holding both
    still come first, scored as the whole query scores them."""
    said(catalog, "others", [f"other words number {i}" for i in range(100)])
    alphas = said(catalog, "alpha", [f"alpha and some other words {i}" for i in range(10)])
    said(catalog, "beta", [f"beta and some other words {i}" for i in range(20)])
    (loud,) = said(catalog, "loud", ["beta beta beta"])
    (both,) = said(catalog, "both", ["alpha and beta and other words"])
    exact = word_hits(catalog, "alpha beta", SEGMENT, MODEL, 3, exact=True)
    assert [h.id for h in exact[:2]] == [both, loud]  # the whole query's BM25
    hits = word_hits(catalog, "alpha beta", SEGMENT, MODEL, 3)  # 3 + 4 rows needed: 'alpha' has 11
    assert hits[0].id == both and hits[0].score == pytest.approx(exact[0].score)
    assert {h.id for h in hits[1:]} <= set(alphas) and loud not in {h.id for h in hits}
    # Asked for more than the 'alpha' rows hold, 'beta' is ranked as well, and its loud row is found.
    more = word_hits(catalog, "alpha beta", SEGMENT, MODEL, 20)
    assert scored(more) == scored(word_hits(catalog, "alpha beta", SEGMENT, MODEL, 20, exact=True))


def test_where_every_word_is_ranked_the_hits_are_the_full_query_s(catalog: db.Catalog) -> None:
    """Queries whose words' rows together are fewer than the hits asked (+ a few) are ranked by FTS5 over
    all of them: the same hits, scores and all_terms as the full query."""
    rng = random.Random(12)
    vocab = [f"{name}{i}" for name in ("otter", "heron", "maple", "quartz", "ember") for i in range(8)]
    for r in range(8):
        said(catalog, f"talk{r}", [" ".join(rng.choices(vocab, k=rng.randint(2, 9))) for _ in range(6)])
    for _ in range(40):
        query = " ".join(rng.sample(vocab, rng.randint(1, 3)))
        hits = word_hits(catalog, query, SEGMENT, MODEL, 50)
        exact = word_hits(catalog, query, SEGMENT, MODEL, 50, exact=True)
        assert scored(hits) == scored(exact), query
        assert {h.id for h in hits if h.all_terms} == {h.id for h in exact if h.all_terms}, query


def test_the_first_hits_carry_their_vectors_when_asked(catalog: db.Catalog) -> None:
    said(catalog, "talk", [f"otters swim {i}" for i in range(5)])
    hits = word_hits(catalog, "otters", SEGMENT, MODEL, 5, vectors=2)
    stored = catalog.vectors_for([h.id for h in hits])
    for h in hits[:2]:
        assert h.vector is not None and np.array_equal(h.vector, stored[h.id])
    assert all(h.vector is None for h in hits[2:])
    assert hits == word_hits(catalog, "otters", SEGMENT, MODEL, 5)  # (vectors do not compare)
