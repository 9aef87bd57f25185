"""CAT filter (stage 5c) and the offline POS tagger behind it."""

from __future__ import annotations

import os
import pickle

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from realsyn.filters.base import apply_filters
from realsyn.filters.cat import CatFilter, complexity, has_action, object_ties
from realsyn.plugins import build_plugin
from realsyn.text.pos_tagger import (
    DensePerceptronTagger,
    get_tagger,
    load_packaged_perceptron,
    nltk_tagger_available,
    tag_text,
    tokenize,
)


@pytest.fixture(scope="module")
def cat() -> CatFilter:
    # The packaged tagger, pinned: "auto" would switch to NLTK's data where it is installed.
    f = CatFilter(tagger="perceptron")
    assert f.tagger is not None  # load once for the module
    return f


# (sentence, expected reason): None keeps it.
CASES = [
    ("A man riding a brown horse on the beach.", None),
    ("A woman holding an umbrella in the rain.", None),
    ("Two dogs play in the snow.", None),
    ("The children are playing in the park.", None),
    ("A bowl of fresh fruit sits on the counter.", None),
    ("Kids doing homework at the kitchen table.", None),
    ("She rides a horse.", None),  # pronoun subject, noun object
    ("I love this dress!", None),
    ("Where can I buy a red dress?", None),  # a question with content
    ("A man is chased by a dog.", None),  # passive with an agent is an action
    ("A cat jumps out of the box.", None),  # two-word preposition
    ("A girl sitting close to the fire.", None),  # adjective + "to"
    ("The man who has a beard smiles.", None),  # relative clause
    ("Sunset.", "below_c1"),
    ("2019", "below_c1"),
    ("dogs cats birds", "below_c1"),  # a list of nouns: nothing tied
    ("cats and dogs", "below_c1"),
    ("Click here to subscribe", "below_c1"),  # action but no object
    ("Thank you for reading!", "below_c1"),
    ("Read more", "below_c1"),
    ("Home | About | Contact", "below_c1"),  # "|" is never an object
    ("Buy now and save 20% on shoes", "below_c1"),  # "%" is never an object
    ("You can download it for free.", "below_c1"),  # pronoun-only relation
    ("It is great to see you.", "below_c1"),
    ("Copyright 2020 Acme Inc. All rights reserved.", "below_c1"),  # a year is no count
    ("The man is a doctor.", "below_c1"),  # "be" alone links nothing
    ("", "below_c1"),
    ("The red car.", "no_action"),  # C1 by the attribute "red", no verb
    ("3 bedrooms", "no_action"),  # a number is an attribute
    ("The dog is brown.", "no_action"),  # copula only: C1, no action
    ("What is your favorite color?", "no_action"),
    ("The cup is on the table.", "no_action"),
    ("There is a cat on the sofa.", "no_action"),
    ("The car is parked in the garage.", "no_action"),  # stative passive, no agent
    ("Photo by John Smith", "no_action"),
    ("Free shipping on orders over $50", "no_action"),
    ("close-up of a ladybug on a leaf", "no_action"),
]


@pytest.mark.parametrize(("sentence", "reason"), CASES)
def test_cat_reason(cat: CatFilter, sentence: str, reason: str | None):
    assert cat.reasons([sentence]) == [reason]


def test_cat_batch_matches_single_and_skips_non_text(cat: CatFilter):
    items = [s for s, _ in CASES] + [None, 42]
    assert cat.reasons(items) == [r for _, r in CASES] + ["not_text", "not_text"]


def test_complexity_and_action_levels(cat: CatFilter):
    horse = cat.judge("A man riding a brown horse on the beach.")
    # horse: attribute "brown", relations to "man" and to "beach".
    assert (horse.complexity, horse.action) == (3, True)
    assert cat.judge("The red car.").complexity == 1
    assert cat.judge("dogs cats birds").complexity == 0


def test_thresholds_are_configurable(cat: CatFilter):
    sentences = ["The red car.", "A man riding a brown horse on the beach.", "Click here to subscribe"]
    strict = CatFilter(min_complexity=2, tagger="perceptron")
    assert strict.reasons(sentences) == ["below_c2", None, "below_c2"]
    no_action_needed = CatFilter(require_action=False, tagger="perceptron")
    assert no_action_needed.reasons(sentences) == [None, None, "below_c1"]
    action_only = CatFilter(min_complexity=0, tagger="perceptron")
    assert action_only.reasons(sentences) == ["no_action", None, None]
    with pytest.raises(ValueError):
        CatFilter(min_complexity=-1)


def test_plugin_and_apply_filters(cat: CatFilter):
    f = build_plugin("sentence_filter", {"name": "cat", "params": {"tagger": "perceptron"}})
    assert f.name == "cat"
    keep, reasons = apply_filters([f], ["Sunset.", "A woman holding an umbrella in the rain.", "The red car."])
    assert keep.tolist() == [False, True, False]
    assert reasons == ["below_c1", None, "no_action"]


# Rule tests on hand-written tags: independent of any tagger.
def _t(text: str) -> list[tuple[str, str]]:
    return [tuple(pair.rsplit("/", 1)) for pair in text.split()]


@pytest.mark.parametrize(
    ("tagged", "level", "action"),
    [
        ("the/DT dog/NN", 0, False),
        ("the/DT brown/JJ dog/NN", 1, False),
        ("the/DT other/JJ dog/NN", 0, False),  # determiner-like adjective
        ("our/PRP$ newsletter/NN", 0, False),  # a possessive pronoun is no attribute
        ("two/CD dogs/NNS run/VBP", 1, True),
        ("2020/CD Acme/NNP", 0, False),
        ("a/DT smiling/VBG woman/NN", 1, True),
        ("stop/VB selling/VBG cars/NNS", 0, True),  # participle without determiner: a verb
        ("the/DT dog/NN is/VBZ very/RB brown/JJ", 1, False),
        ("the/DT dog/NN 's/POS collar/NN", 1, False),
        ("the/DT dog/NN 's/POS red/JJ collar/NN", 2, False),
        ("a/DT man/NN riding/VBG a/DT horse/NN", 1, True),
        ("a/DT man/NN has/VBZ a/DT beard/NN", 1, False),  # relation, but "has" is no action
        ("kids/NNS doing/VBG homework/NN", 1, True),
        ("they/PRP did/VBD", 0, False),
        ("we/PRP love/VBP it/PRP", 0, True),  # pronoun-only relation
        ("the/DT cup/NN is/VBZ on/IN the/DT table/NN", 1, False),
        ("the/DT man/NN is/VBZ a/DT doctor/NN", 0, False),
        ("the/DT car/NN is/VBZ parked/VBN", 1, False),
        ("the/DT car/NN was/VBD hit/VBN by/IN a/DT truck/NN", 1, True),
        ("a/DT cup/NN of/IN coffee/NN on/IN the/DT table/NN", 2, False),
        ("the/DT man/NN that/IN left/VBD", 0, True),  # "that" opens a clause
        ("|/NN ,/, %/NN", 0, False),
    ],
)
def test_rules_on_tags(tagged: str, level: int, action: bool):
    tags = _t(tagged)
    assert complexity(tags) == level
    assert has_action(tags) is action


def test_object_ties_are_per_object():
    ties = object_ties(_t("a/DT man/NN riding/VBG a/DT brown/JJ horse/NN on/IN the/DT beach/NN"))
    assert ties == {
        1: {("relation", 5)},
        5: {("relation", 1), ("attribute", 4), ("relation", 8)},
        8: {("relation", 5)},
    }


# Tagger sanity.
def test_tokenizer_is_treebank():
    assert tokenize("Don't stop, it's 5 p.m.") == ["Do", "n't", "stop", ",", "it", "'s", "5", "p.m", "."]
    assert tokenize("   ") == []


def test_packaged_tagger_tags(cat: CatFilter):
    tagger = get_tagger("perceptron")
    assert tagger is cat.tagger  # one model per process
    assert tag_text("A man riding a brown horse on the beach.", tagger) == [
        ("A", "DT"),
        ("man", "NN"),
        ("riding", "VBG"),
        ("a", "DT"),
        ("brown", "JJ"),
        ("horse", "NN"),
        ("on", "IN"),
        ("the", "DT"),
        ("beach", "NN"),
        (".", "."),
    ]
    assert tagger.tag(["She", "quickly", "opened", "the", "old", "doors", "."]) == [
        ("She", "PRP"),
        ("quickly", "RB"),
        ("opened", "VBD"),
        ("the", "DT"),
        ("old", "JJ"),
        ("doors", "NNS"),
        (".", "."),
    ]
    assert tag_text("", tagger) == []


def test_tagger_names():
    with pytest.raises(ValueError):
        get_tagger("spacy")
    if nltk_tagger_available():
        assert get_tagger("nltk").tag(["the", "dog"]) == [("the", "DT"), ("dog", "NN")]
    else:
        with pytest.raises(LookupError):
            get_tagger("nltk")
        assert get_tagger("auto") is get_tagger("perceptron")


def test_loader_refuses_code_in_pickle(tmp_path):
    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps(os.system))  # a global other than set
    with pytest.raises(pickle.UnpicklingError):
        load_packaged_perceptron(evil)


def test_loader_reads_the_weights_layout(tmp_path):
    # A two-class model: "bias" prefers NN; a word feature turns "runs" into VBZ.
    model = ({"bias": {"NN": 1.0}, "i word runs": {"VBZ": 2.0}}, {"the": "DT"}, {"NN", "VBZ", "DT"})
    path = tmp_path / "tiny.pickle"
    path.write_bytes(pickle.dumps(model, protocol=2))
    tagger = load_packaged_perceptron(path)
    assert tagger.tag(["the", "dog", "runs"]) == [("the", "DT"), ("dog", "NN"), ("runs", "VBZ")]
    path.write_bytes(pickle.dumps(({"bias": {}}, {}), protocol=2))
    with pytest.raises(ValueError):
        load_packaged_perceptron(path)


def test_dense_decoding_equals_nltk_perceptron():
    from nltk.tag.perceptron import PerceptronTagger

    # Ties on purpose: "b" and "c" score equally on "bias"; NLTK keeps the larger label.
    weights = {
        "bias": {"b": 1.0, "c": 1.0, "a": 0.5},
        "i word x": {"a": 2.0},
        "i-1 tag a": {"b": 0.25, "c": -0.5},
        "i+1 word x": {"c": 0.75},
    }
    classes = {"a", "b", "c"}
    ref = PerceptronTagger(load=False)
    ref.model.weights, ref.tagdict, ref.classes, ref.model.classes = weights, {"the": "a"}, classes, classes
    dense = DensePerceptronTagger(weights, {"the": "a"}, classes)
    tokens = ["x", "y", "the", "z", "x", "x", "w"]
    assert DensePerceptronTagger.from_nltk(ref).tag(tokens) == dense.tag(tokens)
    assert (
        dense.tag(tokens)
        == ref.tag(tokens)
        == [
            ("x", "a"),
            ("y", "b"),
            ("the", "a"),
            ("z", "c"),
            ("x", "a"),
            ("x", "a"),
            ("w", "b"),
        ]
    )
