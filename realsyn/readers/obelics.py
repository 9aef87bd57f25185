"""The OBELICS layout: each row holds parallel ``images`` / ``texts`` lists, one slot per entry.

``images[i]`` is a URL, a local/S3 path (relative ones resolve beside the shard), inline bytes or
None where the slot is text; ``texts[i]`` is the paragraph or None where the slot is an image. The
id comes from ``id`` / ``doc_id`` / ``document_id`` / ``url``; every other column goes into
``metadata`` (``metadata`` / ``general_metadata``, stored by OBELICS as JSON strings, are parsed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from realsyn.plugins.kinds import InputReader
from realsyn.readers.document import Document, ShardContext, stream_documents
from realsyn.stats import StepStats

# Columns OBELICS stores as JSON strings; parsed into the metadata dict when they parse.
JSON_METADATA_COLUMNS: tuple[str, ...] = ("metadata", "general_metadata")


def _slot_list_problem(row: dict[str, Any], column: str, allowed: tuple[type, ...]) -> str | None:
    """Why ``row[column]`` is not a list of ``allowed`` / None slots, or None when it is."""
    value = row.get(column)
    if value is None:
        return f"missing_{column}"
    if not isinstance(value, list):
        return f"{column}_not_a_list"
    if not all(v is None or isinstance(v, allowed) for v in value):
        return f"bad_{column}_slot"
    return None


def _parse_metadata(row: dict[str, Any]) -> dict[str, Any]:
    metadata = {}
    for key, value in row.items():
        if key in ("images", "texts"):
            continue
        if key in JSON_METADATA_COLUMNS and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass  # keep the raw string: metadata is informational
        metadata[key] = value
    return metadata


def obelics_document(row: dict[str, Any], index: int, shard: ShardContext) -> Document | str:
    """One OBELICS row as a Document, or why its slot lists are malformed (``missing_images``,
    ``texts_not_a_list``, ``bad_images_slot``, ``length_mismatch``, ...)."""
    problem = _slot_list_problem(row, "images", (str, bytes, bytearray, memoryview)) or _slot_list_problem(row, "texts", (str,))
    if problem:
        return problem
    images, texts = row["images"], row["texts"]
    if len(images) != len(texts):
        return "length_mismatch"
    return Document(
        doc_id=shard.doc_id(row, index),
        images=[shard.resolve(ref) for ref in images],
        texts=list(texts),
        metadata=_parse_metadata(row),
    )


class ObelicsReader(InputReader):
    """Input reader for OBELICS-layout shards (Parquet / JSONL / JSONL.gz, local or S3).

    ``batch_size``: Parquet rows decoded at a time (memory bound; JSONL is read line by line).
    """

    def __init__(self, batch_size: int = 256):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def iter_documents(self, shard_uri: str, stats: StepStats) -> Iterator[Document]:
        """Stream the documents of one shard; malformed rows are skipped and counted (see ``stream_documents``)."""
        return stream_documents(shard_uri, stats, obelics_document, self.batch_size, required_columns=("images", "texts"), layout="obelics")
