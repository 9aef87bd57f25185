"""CAT sentence filter (RealSyn stage 5c; Radenovic et al. 2023, "Complexity, Action, Text-spotting").

Keeps a sentence only if its complexity is at least C1 and it contains an action. The paper reads
both off a scene-graph parse; here part-of-speech tags (Penn Treebank, see
``realsyn.text.pos_tagger``) approximate the parse with these rules:

Objects: a run of nouns (NN, NNS, NNP, NNPS; the last one is the head, "coffee cup" is one object)
or a personal pronoun (PRP). A token without a letter ("|", "%", "2020") is never an object.

Attribute of a noun object (ties the object to an attribute):
- a modifier before it in its noun phrase: an adjective (JJ, JJR, JJS) other than determiner-like
  ones ("other", "same", "such", ...), a number (CD) before a common noun ("two dogs", not "2020
  Acme"), or a participle after a determiner or adjective ("a smiling woman", "the parked car");
  possessive pronouns ("our newsletter") are determiners, not attributes;
- a predicate adjective or participle after a form of "be" or a linking verb ("the dog is brown",
  "the sky looks blue").

Relation between two objects, at least one of them a noun (pronoun-only ties such as "you can
download it" are not a scene):
- a preposition, optionally after a verb group: "a cup on the table", "a man sitting on a bench",
  "the cup is on the table";
- a verb other than "be": "a man riding a horse", "she rides a horse", "a man who has a beard";
- a possessive: "the dog's collar".
"be" alone links nothing ("the man is a doctor").

Complexity is the largest number of distinct ties (attributes and relations) on any one object:
0 is C0, 1 or more is at least C1, 2 or more at least C2.

Action: a verb (VB, VBD, VBG, VBN, VBP, VBZ) that is not a form of "be" (copula or auxiliary), not
"have/has/had" and not "do/does/did" (auxiliaries, or possession and ellipsis, which are states);
"having", "doing" and "done" count ("kids doing homework"). A past participle right after a form
of "be" ("the car is parked", "the table is covered with food") is a state, not an action, unless
an agent with "by" follows ("a man is chased by a dog"). So "The dog is brown." has no action.
Linking verbs other than "be" ("looks", "seems") count as actions: tags cannot tell "looks happy"
from "looks at the camera".

Drop reasons, checked in this order: ``below_c1`` (complexity below ``min_complexity``; named
``below_c<k>`` for another ``min_complexity=k``), then
``no_action`` (when ``require_action``); ``not_text`` for an item that is not a string.

Measured with the packaged tagger: 68% of 1,195 COCO captions are kept (29% have no verb, e.g. "A
large oval Stop sign near some trees."), 22% of 10,000 web alt-texts (mostly product titles), and
about 1,200 sentences/s on one core (tokenizing 2,600/s, tagging 3,200/s, rules 8,500/s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from realsyn.plugins.kinds import SentenceFilter

NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
COMMON_NOUN_TAGS = frozenset({"NN", "NNS"})
VERB_TAGS = frozenset({"VB", "VBD", "VBG", "VBN", "VBP", "VBZ"})
ADJ_TAGS = frozenset({"JJ", "JJR", "JJS"})
ADV_TAGS = frozenset({"RB", "RBR", "RBS"})
PARTICIPLE_TAGS = frozenset({"VBN", "VBG"})
# Tokens that may stand before a noun inside its noun phrase.
PREMODIFIER_TAGS = frozenset({"DT", "PDT", "PRP$", "CD"}) | ADJ_TAGS | ADV_TAGS | PARTICIPLE_TAGS
# A participle is adjectival only after one of these inside the noun phrase ("a smiling woman").
DETERMINER_LIKE_TAGS = frozenset({"DT", "PDT", "PRP$", "CD"}) | ADJ_TAGS

BE_FORMS = frozenset({"be", "is", "are", "was", "were", "been", "being", "am", "'s", "'re", "'m", "ai"})
HAVE_FORMS = frozenset({"have", "has", "had", "'ve", "'d"})
DO_FORMS = frozenset({"do", "does", "did"})
LINKING_VERBS = frozenset(
    {
        "look", "looks", "looked", "looking",
        "seem", "seems", "seemed", "seeming",
        "appear", "appears", "appeared", "appearing",
        "become", "becomes", "became", "becoming",
        "remain", "remains", "remained", "remaining",
        "feel", "feels", "felt", "feeling",
        "stay", "stays", "stayed", "staying",
    }
)  # fmt: skip
# Adjectives that only determine or order ("other people", "the same day"): no visual attribute.
NON_DESCRIPTIVE_ADJECTIVES = frozenset(
    {"other", "such", "same", "own", "certain", "various", "only", "next", "last", "previous", "following", "further"}
)
# Subordinating conjunctions tagged IN: they open a clause, they do not relate two objects.
SUBORDINATORS = frozenset({"that", "because", "if", "whether", "although", "though", "unless", "while", "whereas", "so", "than", "once"})

REASON_NO_ACTION = "no_action"
REASON_NOT_TEXT = "not_text"


def _is_word(token: str) -> bool:
    return any(ch.isalnum() for ch in token)


def _has_letter(token: str) -> bool:
    return any(ch.isalpha() for ch in token)


@dataclass(frozen=True)
class _Object:
    start: int  # first token of the noun run (== head for a pronoun)
    head: int
    is_noun: bool


def _objects(words: Sequence[str], tags: Sequence[str]) -> dict[int, _Object]:
    """Objects keyed by head index: runs of nouns (head = last) and personal pronouns."""
    found: dict[int, _Object] = {}
    i, n = 0, len(tags)
    while i < n:
        if tags[i] in NOUN_TAGS and _has_letter(words[i]):
            j = i
            while j + 1 < n and tags[j + 1] in NOUN_TAGS and _has_letter(words[j + 1]):
                j += 1
            found[j] = _Object(i, j, True)
            i = j + 1
        else:
            if tags[i] == "PRP" and _has_letter(words[i]):
                found[i] = _Object(i, i, False)
            i += 1
    return found


def _premodifier_attribute(words: Sequence[str], tags: Sequence[str], obj: _Object) -> int | None:
    """Index of an attribute modifying ``obj`` from inside its noun phrase, or None."""
    span = []
    j = obj.start - 1
    while j >= 0 and tags[j] in PREMODIFIER_TAGS and _is_word(words[j]):
        span.append(j)
        j -= 1
    span.reverse()  # left to right
    for pos, k in enumerate(span):
        tag, word = tags[k], words[k].lower()
        if tag in ADJ_TAGS and word not in NON_DESCRIPTIVE_ADJECTIVES and _has_letter(word):
            return k
        if tag == "CD" and tags[obj.start] in COMMON_NOUN_TAGS:
            return k
        if tag in PARTICIPLE_TAGS and any(tags[m] in DETERMINER_LIKE_TAGS for m in span[:pos]):
            return k
    return None


def _predicate_attribute(words: Sequence[str], tags: Sequence[str], obj: _Object) -> int | None:
    """Index of a predicate adjective after a copula or linking verb ("the dog is brown"), or None."""
    k, n = obj.head + 1, len(tags)
    linked = False
    while k < n:
        word = words[k].lower()
        if tags[k] in VERB_TAGS and (word in BE_FORMS or word in LINKING_VERBS):
            linked = True
        elif not (tags[k] in ADV_TAGS or tags[k] == "MD"):
            break
        k += 1
    if not (linked and k < n and _has_letter(words[k])):
        return None
    if tags[k] in ADJ_TAGS:
        return k
    if tags[k] == "VBN" and "by" not in (w.lower() for w in words[k + 1 :]):
        return k  # "the car is parked": a state; with an agent ("hit by a truck") it is an action
    return None


def _noun_phrase_head(words: Sequence[str], tags: Sequence[str], start: int, heads_by_start: dict[int, int]) -> int | None:
    """Head index of the object that a noun phrase starting at ``start`` ends in, or None."""
    k, n = start, len(tags)
    while k < n and tags[k] in PREMODIFIER_TAGS and _is_word(words[k]):
        k += 1
    return heads_by_start.get(k)


def _is_preposition(words: Sequence[str], tags: Sequence[str], k: int) -> bool:
    return k < len(tags) and tags[k] in ("IN", "TO") and words[k].lower() not in SUBORDINATORS


def _relation_target(words: Sequence[str], tags: Sequence[str], obj: _Object, heads_by_start: dict[int, int]) -> int | None:
    """Head index of the object that ``obj`` relates to through a possessive, verb or preposition."""
    k, n = obj.head + 1, len(tags)
    if k >= n:
        return None
    if tags[k] == "POS":
        return _noun_phrase_head(words, tags, k + 1, heads_by_start) if obj.is_noun else None
    relating_verb = False  # a verb other than "be": a relation by itself ("a man riding a horse")
    seen_verb = False
    if tags[k] in ("WDT", "WP"):  # relative clause: "a man who rides a horse"
        k += 1
    while k < n:
        tag, word = tags[k], words[k].lower()
        if tag in VERB_TAGS:
            seen_verb = True
            relating_verb = relating_verb or word not in BE_FORMS
        elif tag in ADV_TAGS or tag == "MD":
            pass
        elif tag == "RP" and seen_verb:  # "sign up for"
            pass
        elif tag == "TO" and seen_verb and k + 1 < n and tags[k + 1] == "VB":  # "wants to ride"
            pass
        else:
            break
        k += 1
    if k + 1 < n and tags[k] in ADJ_TAGS and _is_preposition(words, tags, k + 1):
        k += 1  # "next to", "close to"
    if _is_preposition(words, tags, k):
        k += 1
        if _is_preposition(words, tags, k):
            k += 1  # "out of", "because of"
        return _noun_phrase_head(words, tags, k, heads_by_start)
    if relating_verb:
        return _noun_phrase_head(words, tags, k, heads_by_start)
    return None


def object_ties(tagged: Sequence[tuple[str, str]]) -> dict[int, set[tuple[str, int]]]:
    """Per object head index, its distinct ties: ("attribute", token) and ("relation", other head)."""
    words = [w for w, _ in tagged]
    tags = [t for _, t in tagged]
    objects = _objects(words, tags)
    heads_by_start = {obj.start: head for head, obj in objects.items()}
    ties: dict[int, set[tuple[str, int]]] = {head: set() for head in objects}
    for head, obj in objects.items():
        if obj.is_noun:
            for attribute in (_premodifier_attribute(words, tags, obj), _predicate_attribute(words, tags, obj)):
                if attribute is not None:
                    ties[head].add(("attribute", attribute))
        target = _relation_target(words, tags, obj, heads_by_start)
        if target is not None and target != head and (obj.is_noun or objects[target].is_noun):
            ties[head].add(("relation", target))
            ties[target].add(("relation", head))
    return ties


def complexity(tagged: Sequence[tuple[str, str]]) -> int:
    """Largest number of distinct attribute/relation ties on one object (0 = C0, >= 1 = C1, ...)."""
    return max((len(t) for t in object_ties(tagged).values()), default=0)


def has_action(tagged: Sequence[tuple[str, str]]) -> bool:
    """True if some verb describes an action (see the module docstring for the rule)."""
    words = [w.lower() for w, _ in tagged]
    tags = [t for _, t in tagged]
    for i, (word, tag) in enumerate(zip(words, tags)):
        if tag not in VERB_TAGS or not _has_letter(word):
            continue
        if word in BE_FORMS or word in HAVE_FORMS or word in DO_FORMS:
            continue
        if tag == "VBN" and _after_be(words, tags, i) and "by" not in words[i + 1 :]:
            continue  # stative passive: "the car is parked"
        return True
    return False


def _after_be(words: Sequence[str], tags: Sequence[str], i: int) -> bool:
    j = i - 1
    while j >= 0 and tags[j] in ADV_TAGS:
        j -= 1
    return j >= 0 and words[j] in BE_FORMS


@dataclass(frozen=True)
class CatVerdict:
    tagged: list[tuple[str, str]]
    complexity: int
    action: bool
    reason: str | None


class CatFilter(SentenceFilter):
    """CAT filter over sentences (str items): drops ``below_c1``, then ``no_action``."""

    name = "cat"

    def __init__(self, require_action: bool = True, min_complexity: int = 1, tagger: str = "auto"):
        if min_complexity < 0:
            raise ValueError(f"min_complexity must be >= 0, got {min_complexity}")
        self.require_action = bool(require_action)
        self.min_complexity = int(min_complexity)
        self.tagger_name = tagger
        self.below_reason = f"below_c{self.min_complexity}"  # "below_c1" at the paper's default
        self._tagger = None

    @property
    def tagger(self):
        # Loaded on first use: building the filter from config must not load a model.
        if self._tagger is None:
            from realsyn.text.pos_tagger import get_tagger

            self._tagger = get_tagger(self.tagger_name)
        return self._tagger

    def judge(self, text: str) -> CatVerdict:
        from realsyn.text.pos_tagger import tokenize

        tokens = tokenize(text)
        tagged = self.tagger.tag(tokens) if tokens else []
        level = complexity(tagged)
        action = has_action(tagged)
        if level < self.min_complexity:
            reason = self.below_reason
        elif self.require_action and not action:
            reason = REASON_NO_ACTION
        else:
            reason = None
        return CatVerdict(tagged, level, action, reason)

    def reasons(self, items: Sequence[object]) -> list[str | None]:
        return [self.judge(item).reason if isinstance(item, str) else REASON_NOT_TEXT for item in items]
