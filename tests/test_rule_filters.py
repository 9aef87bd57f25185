"""Rule filters of stages 3 and 5a,b: exact reason per case, boundaries included."""

from __future__ import annotations

import pytest

from realsyn.filters.base import apply_filters
from realsyn.filters.image_rules import ImageRuleFilter
from realsyn.filters.sentence_rules import SentenceRuleFilter, count_words
from realsyn.plugins import build_plugin


def _img(status="ok", width=None, height=None):
    return {"status": status, "width": width, "height": height}


IMAGE_CASES = [
    (_img("fetch_failed"), "fetch_failed"),
    (_img("fetch_failed", 500, 500), "fetch_failed"),
    (_img("undecodable"), "undecodable"),
    (_img("ok", None, 200), "undecodable"),
    (_img("ok", 0, 200), "undecodable"),
    (_img("weird", 300, 300), "undecodable"),
    (_img("ok", 100, 100), None),  # short side exactly 100: kept
    (_img("ok", 99, 200), "short_side"),
    (_img("ok", 250, 99), "short_side"),
    (_img("ok", 60, 600), "short_side"),  # both rules fail: the first one names it
    (_img("ok", 300, 100), None),  # ratio exactly 3.0: kept
    (_img("ok", 100, 300), None),  # ratio exactly 1/3: kept
    (_img("ok", 301, 100), "aspect_ratio"),
    (_img("ok", 100, 301), "aspect_ratio"),
    (_img("ok", 600, 150), "aspect_ratio"),
    (_img("ok", 640, 427), None),
]


def test_image_rules_reasons():
    rows, expected = zip(*IMAGE_CASES)
    assert ImageRuleFilter().reasons(list(rows)) == list(expected)


def test_image_rules_thresholds_are_configurable_and_validated():
    f = ImageRuleFilter(min_short_side=50, max_aspect_ratio=2.0)
    assert f.reasons([_img("ok", 60, 60), _img("ok", 49, 60), _img("ok", 120, 60), _img("ok", 121, 60)]) == [
        None,
        "short_side",
        None,
        "aspect_ratio",
    ]
    with pytest.raises(ValueError):
        ImageRuleFilter(max_aspect_ratio=0.5)


def _words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


SENTENCE_CASES = [
    ("A cat sits on a mat.", None),
    ("I love this photo \U0001f600 so much.", "emoji"),  # emoticons
    ("The rocket \U0001f680 lifts off.", "emoji"),  # transport
    ("Greetings from Paris \U0001f1eb\U0001f1f7 today.", "emoji"),  # flag
    ("Task is done \u2705 for now.", "emoji"),  # check mark button
    ("Cut along the line \u2702 carefully.", "emoji"),  # dingbat scissors
    ("Sunny weather \u2600 all week.", "emoji"),  # misc symbols
    ("Press key 1\ufe0f\u20e3 to start.", "emoji"),  # keycap sequence
    ("Copyright \u00a9 2024 Acme Corp.", None),  # plain (c) sign is not an emoji
    ("Copyright \u00a9\ufe0f 2024 Acme Corp.", "emoji"),  # ... unless shown as emoji
    ("Wait \u2014 really?! Yes, \u201cquoted\u201d text\u2026", None),  # punctuation
    ("\u732b\u304c \u597d\u304d \u3067\u3059\u3002", None),  # CJK text: 3 words, no emoji
    ("Read it at https://example.com/a?b=1 now.", "url"),
    ("Old link http://127.0.0.1:8080/x works.", "url"),
    ("Go to www.example.org for details.", "url"),
    ("Photos on example.com/gallery every week.", "url"),
    ("Write to me at someone@example.co.uk please.", "url"),
    ("Birds, e.g. parrots, can talk.", None),  # abbreviation, not a domain
    ("It costs 3.5 dollars, i.e. cheap.", None),  # decimal, not a domain
    ("Version 2.0.1 of node.js is out.", None),  # js is not a known TLD
    ("The U.S. economy grew fast.", None),
    ("It ended.Then it began again.", None),  # missing space before a capital: no TLD
    ("Wow.", "too_few_words"),
    ("Simply gorgeous!", "too_few_words"),  # 2 words
    ("-- \u2014 !!", "too_few_words"),  # 0 words: tokens without letters or digits
    ("Three small words", None),  # exactly 3
    ("Gorgeous photo \U0001f60d", "emoji"),  # emoji comes before word count
    (_words(81), None),  # exactly 81
    (_words(82), "too_many_words"),
    (_words(80) + " - -", None),  # dashes are not words
    ("", "too_few_words"),
]


def test_sentence_rules_reasons():
    texts, expected = zip(*SENTENCE_CASES)
    got = SentenceRuleFilter().reasons(list(texts))
    assert [(t[:40], g) for t, g in zip(texts, got)] == [(t[:40], e) for t, e in zip(texts, expected)]


def test_count_words():
    assert count_words("Hello, world - it's 2024 !") == 4
    assert count_words("  ") == 0


def test_sentence_rules_configurable_and_via_plugins():
    f = build_plugin("sentence_filter", {"name": "rules", "params": {"min_words": 2, "max_words": 4}})
    assert f.name == "sentence_rules"
    assert f.reasons(["One", "One two", "one two three four", "one two three four five"]) == ["too_few_words", None, None, "too_many_words"]
    g = build_plugin("image_filter", "rules")
    assert g.name == "image_rules" and g.reasons([_img("ok", 99, 99)]) == ["short_side"]
    with pytest.raises(ValueError):
        SentenceRuleFilter(min_words=5, max_words=4)


def test_filters_chain_with_apply_filters():
    keep, reasons = apply_filters([SentenceRuleFilter()], ["A fine sentence here.", "Hi.", "See www.example.com now."])
    assert keep.tolist() == [True, False, False]
    assert reasons == [None, "too_few_words", "url"]
