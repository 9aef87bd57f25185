"""The held-out set an evaluation scores: labelled images for zero-shot classification, captioned ones for retrieval.

A folder (local or any fsspec URI) in the clip_benchmark layout of class names and templates:

- ``classnames.json``: a list of class names, or clip_benchmark's ``{dataset: [names]}`` (pick one with ``dataset``);
- ``templates.json``: prompt templates with ``{c}`` for the class name, a list or ``{dataset: [templates]}``;
- ``samples.jsonl``: one image a line, ``{"image": "relative/path.jpg", "label": 3, "captions": ["...", ...]}``;
  ``label`` (class index) makes it a zero-shot sample, ``captions`` a retrieval one (either may be absent).

``embedded:sample-photos`` is the bundled sample corpus's photos (realsyn.sample_corpus): one class
per photo, named by hand, and its human title and first sentence as captions. Those photos are also
in the demo's training data: the demo shows the mechanics, not a measurement.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

EMBEDDED_SAMPLE_PHOTOS = "embedded:sample-photos"

# one class name per bundled photo (realsyn/data/sample_paragraphs.json), as a person would label it
SAMPLE_PHOTO_CLASSES = {
    "astronaut": "astronaut",
    "camera": "cameraman",
    "chelsea": "tabby cat",
    "coffee": "cup of coffee",
    "coins": "coins",
    "rocket": "rocket",
    "hubble_deep_field": "galaxies",
    "immunohistochemistry": "stained tissue",
    "moon": "moon",
    "retina": "retina",
    "clock": "clock",
    "brick": "brick wall",
    "grass": "grass",
    "gravel": "gravel",
    "page": "book page",
    "text": "handwriting",
    "horse": "horse",
    "stereo_motorcycle": "motorcycle",
    "cell": "cell",
    "china": "pagoda",
    "flower": "dahlia",
}
# a few of clip_benchmark's generic zero-shot templates
SAMPLE_TEMPLATES = ["a photo of a {c}.", "a bad photo of a {c}.", "a close-up photo of the {c}.", "a picture of a {c}.", "itap of a {c}."]


@dataclass
class HeldOutSet:
    """Images (loaded on demand), zero-shot labels and retrieval captions."""

    name: str
    load_image: Callable[[int], Any]  # index -> PIL image (RGB)
    size: int
    labels: list[int | None] = field(default_factory=list)  # per image, None: not a zero-shot sample
    captions: list[list[str]] = field(default_factory=list)  # per image, []: not a retrieval sample
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)

    def __post_init__(self):
        if len(self.labels) != self.size or len(self.captions) != self.size:
            raise ValueError(
                f"held-out set {self.name!r}: {self.size} images, {len(self.labels)} labels, {len(self.captions)} caption lists"
            )
        bad = [y for y in self.labels if y is not None and not 0 <= y < len(self.classnames)]
        if bad:
            raise ValueError(f"held-out set {self.name!r}: labels {bad[:5]} outside the {len(self.classnames)} class names")
        if any(y is not None for y in self.labels) and not self.templates:
            raise ValueError(f"held-out set {self.name!r}: labelled images but no templates")


def load_heldout(location: str, dataset: str | None = None, storage_options: dict[str, Any] | None = None) -> HeldOutSet:
    """The held-out set at ``location`` (a folder URI) or ``embedded:sample-photos``."""
    if location == EMBEDDED_SAMPLE_PHOTOS:
        return sample_photos()
    if location.startswith("embedded:"):
        raise ValueError(f"unknown embedded held-out set {location!r}; known: {EMBEDDED_SAMPLE_PHOTOS}")
    from realsyn.io import filesystem_for

    fs, root = filesystem_for(location, storage_options)

    def read_json(name: str) -> Any:
        return json.loads(fs.cat_file(posixpath.join(root, name)))

    def pick(value: Any, what: str) -> list[str]:
        if isinstance(value, dict):
            if dataset is None or dataset not in value:
                raise ValueError(f"{location}/{what}.json holds datasets {sorted(value)[:10]}: name one as the held-out dataset")
            value = value[dataset]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{location}/{what}.json: expected a list of strings")
        return value

    classnames = pick(read_json("classnames.json"), "classnames")
    templates = pick(read_json("templates.json"), "templates")
    images, labels, captions = [], [], []
    for n, line in enumerate(fs.cat_file(posixpath.join(root, "samples.jsonl")).decode().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise ValueError(f"{location}/samples.jsonl line {n}: expected an object with an 'image' path")
        images.append(posixpath.join(root, row["image"]))
        labels.append(int(row["label"]) if row.get("label") is not None else None)
        captions.append([str(c) for c in row.get("captions") or []])

    def load(i: int):
        from PIL import Image

        with fs.open(images[i], "rb") as f:
            return Image.open(io.BytesIO(f.read())).convert("RGB")

    return HeldOutSet(dataset or posixpath.basename(root.rstrip("/")), load, len(images), labels, captions, classnames, templates)


def sample_photos() -> HeldOutSet:
    """The sample corpus's photos that load offline, each its own class, with its title and first sentence as captions."""
    from realsyn.sample_corpus import load_paragraphs, load_photos

    paragraphs = load_paragraphs()
    photos = load_photos(paragraphs)
    names = [n for n in paragraphs["photos"] if n in photos and n in SAMPLE_PHOTO_CLASSES]
    entries = [paragraphs["photos"][n] for n in names]
    captions = [[e["title"], e["paragraphs"][0][0]] for e in entries]
    return HeldOutSet(
        "sample-photos",
        lambda i: photos[names[i]].convert("RGB"),
        len(names),
        list(range(len(names))),
        captions,
        [SAMPLE_PHOTO_CLASSES[n] for n in names],
        list(SAMPLE_TEMPLATES),
    )
