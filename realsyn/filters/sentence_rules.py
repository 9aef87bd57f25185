"""RealSyn sentence filter (stage 5a,b): drop sentences with an emoji or a URL, or too few / many words."""

from __future__ import annotations

import re
from collections.abc import Sequence

from realsyn.plugins.kinds import SentenceFilter

# Code points that are emoji or pictographs (Unicode Emoji_Presentation / Extended_Pictographic,
# minus the Latin-1 and punctuation-like ones such as (c), (R), TM, !! and arrows, which count
# only when followed by the emoji presentation selector U+FE0F, itself listed here).
_EMOJI_RANGES: tuple[tuple[int, int], ...] = (
    (0x20E3, 0x20E3),  # combining enclosing keycap (1-0 keycaps)
    (0x231A, 0x231B),  # watch, hourglass
    (0x2328, 0x2328),  # keyboard
    (0x23CF, 0x23CF),  # eject
    (0x23E9, 0x23F3),  # media controls, alarm clock, timer
    (0x23F8, 0x23FA),  # pause, stop, record
    (0x24C2, 0x24C2),  # circled M
    (0x25AA, 0x25AB),  # small squares
    (0x25B6, 0x25B6),  # play button
    (0x25C0, 0x25C0),  # reverse button
    (0x25FB, 0x25FE),  # medium squares
    (0x2600, 0x27BF),  # Miscellaneous Symbols and Dingbats
    (0x2934, 0x2935),  # curved arrows
    (0x2B05, 0x2B07),  # heavy arrows
    (0x2B1B, 0x2B1C),  # large squares
    (0x2B50, 0x2B50),  # star
    (0x2B55, 0x2B55),  # heavy circle
    (0x3030, 0x3030),  # wavy dash
    (0x303D, 0x303D),  # part alternation mark
    (0x3297, 0x3297),  # circled ideograph congratulation
    (0x3299, 0x3299),  # circled ideograph secret
    (0xFE0F, 0xFE0F),  # variation selector-16: "show the preceding character as emoji"
    (0x1F000, 0x1FAFF),  # mahjong .. emoticons, transport, flags (regional indicators), skin tones, pictographs
    (0x1FC00, 0x1FFFD),  # reserved for future pictographs (Extended_Pictographic)
    (0xE0020, 0xE007F),  # tag characters of subdivision flags
)
_EMOJI = re.compile("[" + "".join(f"\\U{lo:08X}-\\U{hi:08X}" for lo, hi in _EMOJI_RANGES) + "]")

# Top-level domains recognised in bare domains ("example.com/path"). Two-letter ones that are also
# English words ("in", "it", "at", "be", "me", "us", "no", "to", "so") are left out: after a period
# with a missing space they are far more often text than a domain.
_TLDS = (
    "com|org|net|edu|gov|mil|int|info|biz|name|pro|io|ai|app|dev|co|tv|ly|gl|fm|cc|gg|xyz|online|site|"
    "store|shop|blog|news|tech|club|top|live|uk|de|fr|es|nl|ru|cn|jp|kr|au|ca|br|ch|se|eu|pl|cz|dk|fi|pt|"
    "gr|ie|nz|za|mx|ar|tw|hk|sg|ua|tr|ro|hu|sk|il|ir|vn|th|id|my|ph|cl|pe|ve"
)
_URL = re.compile(
    r"(?i:\b(?:https?|ftp)://\S+)"  # scheme URLs
    r"|(?i:\bwww\d{0,3}\.[a-z0-9-]+\.[a-z0-9.-]+)"  # www. hosts
    # bare domains: labels + lower-case known TLD, not glued to a longer word, optional path
    rf"|(?<![\w.-])(?:[A-Za-z0-9](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?\.)+(?:{_TLDS})(?![A-Za-z0-9-])(?:[/:?#]\S*)?"
)


def has_emoji(text: str) -> bool:
    return _EMOJI.search(text) is not None


def has_url(text: str) -> bool:
    return _URL.search(text) is not None


def count_words(text: str) -> int:
    """Whitespace-separated tokens that contain at least one letter or digit."""
    return sum(1 for token in text.split() if any(ch.isalnum() for ch in token))


class SentenceRuleFilter(SentenceFilter):
    """Reasons, first match wins: ``emoji``, ``url``, ``too_few_words`` (< min), ``too_many_words`` (> max)."""

    name = "sentence_rules"

    def __init__(self, min_words: int = 3, max_words: int = 81):
        if min_words < 0 or max_words < min_words:
            raise ValueError(f"need 0 <= min_words <= max_words, got {min_words}, {max_words}")
        self.min_words = min_words
        self.max_words = max_words

    def reason(self, text: str) -> str | None:
        if not isinstance(text, str):
            text = ""
        if has_emoji(text):
            return "emoji"
        if has_url(text):
            return "url"
        words = count_words(text)
        if words < self.min_words:
            return "too_few_words"
        if words > self.max_words:
            return "too_many_words"
        return None

    def reasons(self, items: Sequence[str]) -> list[str | None]:
        return [self.reason(text) for text in items]
