"""Open-set image tags by zero-shot matching of image embeddings against a tag vocabulary (RAM++'s role).

RealSyn extends the tagger's vocabulary with tags mined from the real sentences; ``mine_tags`` does
that by document frequency of noun-like words.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from importlib import resources

import numpy as np

from realsyn.plugins.kinds import Tagger

# Function words and common verbs/adjectives/adverbs that are never visual concepts.
STOPWORDS = frozenset(
    """
    a about above across after again against all almost along already also although always am among an and
    another any anyone anything are around as at away back be became because become been before being below
    best better between both but by came can cannot could day days did do does doing done down during each
    either else enough even ever every few first for from further get gets getting give given go goes going
    gone good got great had has have having he her here hers herself him himself his how however i if in
    including into is it its itself just know last least less let like made make makes making many may me
    might more most much must my myself near need never new next no nor not now of off often old on once one
    only or other others our ours ourselves out over own part per perhaps please put quite rather really
    right said same say see seen several shall she should show shown since so some something still such
    take than that the their theirs them themselves then there these they thing things this those though
    through thus time to today together too toward towards under until up upon us use used using very via
    want was way we well were what when where whether which while who whom whose why will with within without
    would year years yet you your yours yourself yourselves
    """.split()
)
_WORD = re.compile(r"[a-z]+")


def _parse_vocabulary(text: str) -> list[str]:
    return merge_vocabularies([line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")])


def load_default_vocabulary() -> list[str]:
    """The list of common visual concepts shipped in the package (realsyn/data/tags.txt), one tag a line."""
    return _parse_vocabulary(resources.files("realsyn").joinpath("data/tags.txt").read_text(encoding="utf-8"))


def load_vocabulary_file(path: str) -> list[str]:
    """Tags of a local UTF-8 text file, one a line (``#`` comments); a missing file is one-line ``ModelNotFoundError``."""
    from realsyn.models.paths import require_file

    local = require_file("tagger vocabulary", path, "tagger.params.vocabulary_path")
    return _parse_vocabulary(local.read_text(encoding="utf-8"))


def merge_vocabularies(*vocabularies: Iterable[str]) -> list[str]:
    """Lower-cased tags in first-seen order, duplicates dropped."""
    out: list[str] = []
    seen: set[str] = set()
    for vocabulary in vocabularies:
        for tag in vocabulary:
            tag = " ".join(str(tag).lower().split())
            if tag and tag not in seen:
                seen.add(tag)
                out.append(tag)
    return out


def mine_tags(
    sentences: Iterable[str],
    top_n: int = 4000,
    min_count: int = 2,
    min_length: int = 3,
    stopwords: frozenset[str] = STOPWORDS,
) -> list[str]:
    """Most frequent noun-like words by document frequency (ties: alphabetical), at most ``top_n``.

    A word is a lower-case alphabetic token of at least ``min_length`` letters, not a stopword, and
    not ending in -ly (adverbs); each sentence counts a word once.
    """
    df: Counter[str] = Counter()
    for sentence in sentences:
        if not isinstance(sentence, str):
            continue
        words = {w for w in _WORD.findall(sentence.lower()) if len(w) >= min_length and w not in stopwords and not w.endswith("ly")}
        df.update(words)
    ranked = sorted((w for w, c in df.items() if c >= min_count), key=lambda w: (-df[w], w))
    return ranked[: max(0, int(top_n))]


def _l2_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-normalised copy and a mask of rows that were finite and non-zero."""
    x = np.asarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], x, 0.0), axis=1)
    valid = finite & (norms > 0)
    out = np.zeros_like(x)
    out[valid] = x[valid] / norms[valid, None]
    return out, valid


class ClipVocabularyTagger(Tagger):
    """Top-k vocabulary tags per image by cosine of image and prompt-wrapped tag embeddings.

    The vocabulary is ``vocabulary`` (a list), else ``vocabulary_path`` (a local file, one tag a line;
    production: e.g. RAM++'s tag list under /models, read when the tagger is built, a missing file failing
    at once), else the list shipped in the package; ``extra_tags`` join it.
    """

    def __init__(
        self,
        vocabulary: Sequence[str] | None = None,
        top_k: int = 5,
        min_score: float | None = None,
        prompt: str = "a photo of {}",
        extra_tags: Sequence[str] = (),
        vocabulary_path: str | None = None,
    ):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if "{}" not in prompt:
            raise ValueError(f"prompt must contain '{{}}' for the tag, got {prompt!r}")
        if vocabulary is not None and vocabulary_path is not None:
            raise ValueError("give vocabulary or vocabulary_path, not both")
        if vocabulary is not None:
            base = vocabulary
        elif vocabulary_path is not None:
            base = load_vocabulary_file(vocabulary_path)
        else:
            base = load_default_vocabulary()
        self.vocabulary = merge_vocabularies(base, extra_tags)
        if not self.vocabulary:
            raise ValueError("the tag vocabulary is empty")
        self.top_k = int(top_k)
        self.min_score = min_score
        self.prompt = prompt
        self._text_emb: np.ndarray | None = None

    def fit(self, embed_texts: Callable[[list[str]], np.ndarray]) -> ClipVocabularyTagger:
        """Embed the vocabulary once with the same CLIP model as the images."""
        emb = np.asarray(embed_texts([self.prompt.format(t) for t in self.vocabulary]), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(self.vocabulary):
            raise ValueError(f"embed_texts returned shape {emb.shape} for {len(self.vocabulary)} tags")
        self._text_emb, valid = _l2_rows(emb)
        if not valid.all():
            raise ValueError(f"{int((~valid).sum())} tag embeddings are zero or non-finite")
        return self

    def scores(self, image_emb: np.ndarray) -> np.ndarray:
        """(N, V) cosine of each image with each tag; rows of invalid (zero/non-finite) images are nan."""
        if self._text_emb is None:
            raise RuntimeError("ClipVocabularyTagger.fit(embed_texts) must be called before tagging")
        img = np.asarray(image_emb, dtype=np.float32)
        if img.ndim != 2 or img.shape[1] != self._text_emb.shape[1]:
            raise ValueError(f"image embeddings of shape {img.shape} do not match tag dim {self._text_emb.shape[1]}")
        img, valid = _l2_rows(img)
        out = img @ self._text_emb.T
        out[~valid] = np.nan
        return out

    def tags(self, image_emb: np.ndarray) -> list[list[str]]:
        """Per image, up to top_k tags, best first (ties: vocabulary order); none for an invalid image."""
        scores = self.scores(image_emb)
        k = min(self.top_k, len(self.vocabulary))
        out: list[list[str]] = []
        for row in scores:
            if np.isnan(row).any():
                out.append([])
                continue
            order = np.argsort(-row, kind="stable")[:k]
            if self.min_score is not None:
                order = order[row[order] >= self.min_score]
            out.append([self.vocabulary[i] for i in order])
        return out
