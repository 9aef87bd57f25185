"""One contract per plug-in kind. A plug-in subclasses its kind and declares its typed parameters
in its ``__init__`` signature (annotated keyword arguments with defaults); config validates against
that signature (see ``realsyn.plugins.params_model``), so no hand mapping exists anywhere.

Filters and samplers answer per item: ``None`` keeps it, a short string names why it is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

    from realsyn.readers.document import Document
    from realsyn.stats import StepStats


class Plugin:
    """Base of every kind: ``kind`` names the registry section, ``required`` the methods a class must have
    (a class need not subclass its kind; it must have these methods and, where listed, the attributes).
    """

    kind: ClassVar[str] = ""
    required: ClassVar[tuple[str, ...]] = ()


class InputReader(Plugin):
    """Streams one input shard (a file, local or S3) as documents; malformed rows are counted in ``stats``."""

    kind = "input_reader"
    required = ("iter_documents",)

    def iter_documents(self, shard_uri: str, stats: StepStats) -> Iterator[Document]:
        raise NotImplementedError


class ImageFilter(Plugin):
    """Per image row (``status``, ``width``, ``height``, ``format``): None keeps, a string is the drop reason."""

    kind = "image_filter"
    required = ("reasons",)
    name: str = ""

    def reasons(self, images: Sequence[dict]) -> list[str | None]:
        raise NotImplementedError


class SentenceFilter(Plugin):
    """Per sentence text: None keeps, a string is the drop reason."""

    kind = "sentence_filter"
    required = ("reasons",)
    name: str = ""

    def reasons(self, texts: Sequence[str]) -> list[str | None]:
        raise NotImplementedError


class Embedder(Plugin):
    """Images (encoded bytes) and texts into one L2-normalised space; unembeddable rows come back as zeros."""

    kind = "embedder"
    required = ("embed_images", "embed_texts")
    model_id: str
    dim: int
    random_weights: bool = False

    def embed_images(self, images: Sequence[bytes | None]) -> np.ndarray:
        raise NotImplementedError

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError


class PerplexityScorer(Plugin):
    """Per-text perplexity (nan for what cannot be scored)."""

    kind = "perplexity_scorer"
    required = ("score",)
    model_id: str

    def score(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError


class Tagger(Plugin):
    """Open-set tags per image embedding, fitted once with the embedder's text tower."""

    kind = "tagger"
    required = ("fit", "tags")

    def fit(self, embed_texts: Callable[[list[str]], np.ndarray]) -> Tagger:
        raise NotImplementedError

    def tags(self, image_embeddings: np.ndarray) -> list[list[str]]:
        raise NotImplementedError


class GenerationBackend(Plugin):
    """One cleaned completion per chat (a list of ``{"role", "content"}`` messages), in order."""

    kind = "generation_backend"
    required = ("generate",)
    model_id: str

    def generate(self, batch: list[list[dict]], max_new_tokens: int, temperature: float) -> list[str]:
        raise NotImplementedError


class CaptionFailure(NamedTuple):
    """What a captioner answers for an image it could not caption: a short reason and its detail."""

    reason: str
    detail: str = ""


class Captioner(Plugin):
    """A concise caption per image (encoded bytes), in order: RealSyn stage 8, OFA's role.

    An entry is the caption or a ``CaptionFailure``; raising fails the whole call (the stage then asks
    again one image at a time). ``captioner_id`` names the model and every setting that changes its
    output: captions are cached per (image_id, captioner_id).
    """

    kind = "captioner"
    required = ("caption",)
    captioner_id: str
    model_id: str

    def caption(self, images: Sequence[bytes]) -> list[str | CaptionFailure]:
        raise NotImplementedError


class Sampler(Plugin):
    """A split sampler: a global ``fit`` that keeps compact numpy state, then per-shard ``reasons``.

    State is a dict of small numpy arrays (saved as .npz, no pickle), so one shard's decisions never
    need another shard. ``reasons`` gives the sampler's own reason per dropped row.
    """

    kind = "sampler"
    required = ("fit", "reasons")
    name: str = ""
    required_columns: tuple[str, ...] = ()

    def fit(self, batches: Iterable[pa.Table]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def reasons(self, batch: pa.Table, state: dict[str, np.ndarray]) -> list[str | None]:
        raise NotImplementedError

    def select(self, batch: pa.Table, state: dict[str, np.ndarray]) -> np.ndarray:
        """Bool keep-mask, one entry per row."""
        return np.array([r is None for r in self.reasons(batch, state)], dtype=bool)

    def report(self, state: dict[str, np.ndarray]) -> dict[str, Any]:
        """Transparency outputs by file name: a pyarrow Table (Parquet) or bytes (e.g. a PNG)."""
        return {}


KINDS: dict[str, type[Plugin]] = {
    k.kind: k for k in (InputReader, ImageFilter, SentenceFilter, Embedder, PerplexityScorer, Tagger, GenerationBackend, Captioner, Sampler)
}
