"""The clean-up every generation backend applies to raw model output (the contract: ``realsyn.plugins.kinds``)."""

from __future__ import annotations

import re

_PREFIX = re.compile(
    r"^\s*(?:here\s+is\s+(?:the|a|my)\s+(?:\w+\s+)?(?:caption|description)\s*[:.\-]?"
    r"|(?:the\s+)?(?:synthetic\s+|fused\s+|final\s+|image\s+)?(?:caption|description)\s*(?:is\s*)?[:\-])\s*",
    re.IGNORECASE,
)
# Opening quote -> its closing quote.
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}


def _unquote(text: str) -> str:
    """Remove one pair of quotes around the whole text (not quotes around a part of it)."""
    if len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        inner = text[1:-1]
        if text[0] not in inner and text[-1] not in inner:
            return inner.strip()
    return text


def clean_caption(text: str | None) -> str:
    """Strip "Caption:"-style prefixes, surrounding quotes and whitespace; cut at the first blank line."""
    if not isinstance(text, str):
        return ""
    text = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0]
    previous = None
    while previous != text:
        previous = text
        text = _PREFIX.sub("", text, count=1).strip()
        text = _unquote(text)
    return " ".join(text.split())


class PartialBatchError(RuntimeError):
    """A batch failed after some of its prompts completed: ``completed`` maps batch position to text,
    so the caller can keep (cache) every finished completion before the error propagates."""

    def __init__(self, completed: dict[int, str], cause: BaseException):
        super().__init__(f"{len(completed)} prompts of the batch completed before it failed: {cause}")
        self.completed = completed
        self.cause = cause
