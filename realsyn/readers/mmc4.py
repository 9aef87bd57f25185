"""The MMC4 layout: paragraphs in ``text_list``, images in ``image_info`` matched to a paragraph.

One MMC4 row::

    {"url": ..., "text_list": ["para 0", "para 1", ...],
     "image_info": [{"image_name": "b9.jpg", "raw_url": "https://...", "matched_text_index": 1,
                     "matched_sim": 0.27, "image_bytes": <bytes or base64 str>?}, ...],
     "similarity_matrix": [[...]], "could_have_url_duplicate": 0, ...}

becomes the same ``Document`` the OBELICS reader yields (parallel ``images`` / ``texts`` slots):
the paragraphs in order, each image in its own slot placed **right before** the paragraph its
``matched_text_index`` names (several images matched to one paragraph keep their ``image_info``
order). An image whose ``matched_text_index`` is missing, not an integer or out of range is
appended after the last paragraph, again in ``image_info`` order.

An image's reference, first that applies: inline bytes (``image_bytes`` / ``bytes`` / ``base64`` /
``image_base64``: raw bytes, a base64 string or a ``data:`` URI); with ``images_dir`` set, the file
``{images_dir}/{image_name}`` (the MMC4 release ships images apart, named by ``image_name``); else
``raw_url`` (a URL, or a local/S3 path, a relative one resolved beside the shard as in OBELICS).

The id comes from ``id`` / ``doc_id`` / ``document_id`` / ``url`` (unique within the shard, as in
OBELICS); every other document field except ``text_list`` / ``image_info`` goes into ``metadata``.
A row is malformed (skipped, counted as ``dropped_malformed_document`` and ``malformed_<why>``) when
it is not an object, ``text_list`` is not a list of strings (``missing_text_list``,
``text_list_not_a_list``, ``bad_text_list_slot``), ``image_info`` is not a list of objects
(``missing_image_info``, ``image_info_not_a_list``, ``bad_image_info_entry``), or an image has no
usable reference (``no_image_reference``: none given, or inline bytes that do not decode).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from numbers import Integral
from typing import Any

from realsyn.plugins.kinds import InputReader
from realsyn.readers.document import Document, ShardContext, resolve_image_ref, stream_documents
from realsyn.stats import StepStats

INLINE_BYTES_FIELDS: tuple[str, ...] = ("image_bytes", "bytes", "base64", "image_base64")
LAYOUT_FIELDS: tuple[str, ...] = ("text_list", "image_info")
_NO_REF = object()  # an image with nothing usable: the row is malformed


def _inline_bytes(info: dict[str, Any]) -> Any:
    """Inline image content of one image_info entry: bytes, a data: URI, None (none given) or _NO_REF."""
    for name in INLINE_BYTES_FIELDS:
        value = info.get(name)
        if value is None:
            continue
        if isinstance(value, (bytes, bytearray, memoryview)):
            if len(value):
                return bytes(value)
            continue
        if not isinstance(value, str):
            return _NO_REF
        value = value.strip()
        if not value:
            continue
        if value[:5].lower() == "data:":
            return value
        try:
            return base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            return _NO_REF
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


class Mmc4Reader(InputReader):
    """Input reader for MMC4-layout shards (Parquet / JSONL / JSONL.gz, local or S3).

    ``batch_size``: Parquet rows decoded at a time (memory bound; JSONL is read line by line).
    ``images_dir``: folder holding image files named by ``image_name`` (relative: beside the
    shard; may be ``s3://...``); when set it wins over ``raw_url`` for images that name a file.
    Images go right *before* their matched paragraph (see the module docstring).
    """

    def __init__(self, batch_size: int = 256, images_dir: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.images_dir = images_dir.strip() if images_dir and images_dir.strip() else None

    def iter_documents(self, shard_uri: str, stats: StepStats) -> Iterator[Document]:
        """Stream the documents of one shard; malformed rows are skipped and counted (see ``stream_documents``)."""
        return stream_documents(shard_uri, stats, self.document, self.batch_size, required_columns=LAYOUT_FIELDS, layout="mmc4")

    # ------------------------------------------------------------------ one row
    def _image_ref(self, info: dict[str, Any], shard: ShardContext) -> Any:
        inline = _inline_bytes(info)
        if inline is not None:
            return inline
        name = _text(info.get("image_name"))
        if self.images_dir is not None and name is not None:
            return resolve_image_ref(name, shard.resolve(self.images_dir))
        raw_url = info.get("raw_url")
        if raw_url is not None and not isinstance(raw_url, str):
            return _NO_REF
        ref = shard.resolve(raw_url)
        return _NO_REF if ref is None else ref

    def document(self, row: dict[str, Any], index: int, shard: ShardContext) -> Document | str:
        """One MMC4 row as a Document, or why it is malformed (see the module docstring)."""
        paragraphs, infos = row.get("text_list"), row.get("image_info")
        if paragraphs is None:
            return "missing_text_list"
        if not isinstance(paragraphs, list):
            return "text_list_not_a_list"
        if not all(isinstance(p, str) for p in paragraphs):
            return "bad_text_list_slot"
        if infos is None:
            return "missing_image_info"
        if not isinstance(infos, list):
            return "image_info_not_a_list"
        if not all(isinstance(i, dict) for i in infos):
            return "bad_image_info_entry"
        before: list[list[Any]] = [[] for _ in paragraphs]  # images placed before paragraph i
        trailing: list[Any] = []  # unmatched images, after the last paragraph
        for info in infos:
            ref = self._image_ref(info, shard)
            if ref is _NO_REF:
                return "no_image_reference"
            target = info.get("matched_text_index")
            if isinstance(target, Integral) and not isinstance(target, bool) and 0 <= target < len(paragraphs):
                before[int(target)].append(ref)
            else:
                trailing.append(ref)
        images: list[Any] = []
        texts: list[Any] = []
        for paragraph, refs in zip(paragraphs, before):
            images += refs
            texts += [None] * len(refs)
            images.append(None)
            texts.append(paragraph)
        images += trailing
        texts += [None] * len(trailing)
        return Document(
            doc_id=shard.doc_id(row, index),
            images=images,
            texts=texts,
            metadata={k: v for k, v in row.items() if k not in LAYOUT_FIELDS},
        )
