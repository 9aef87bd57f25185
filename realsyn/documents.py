"""Stage 1: find input shards and stream interleaved documents (OBELICS layout) out of them.

A document is two parallel lists: ``images[i]`` (URL, local/S3 path, bytes, or None where the
slot is text) and ``texts[i]`` (paragraph, or None where the slot is an image). Shards are
Parquet, JSONL or gzipped JSONL, on a local disk or S3. A relative image path is resolved
against the shard's own folder, so a corpus can ship its image files beside its shards.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from realsyn.stats import StepStats
from realsyn.storage import filesystem_for

SHARD_SUFFIXES: tuple[str, ...] = (".parquet", ".jsonl.gz", ".jsonl")
ID_COLUMNS: tuple[str, ...] = ("id", "doc_id", "document_id", "url")
# Columns OBELICS stores as JSON strings; parsed into the metadata dict when they parse.
JSON_METADATA_COLUMNS: tuple[str, ...] = ("metadata", "general_metadata")
MAX_KEY_LENGTH = 120
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass
class Document:
    doc_id: str
    images: list  # str reference, bytes, or None per slot
    texts: list  # str paragraph or None per slot
    metadata: dict = field(default_factory=dict)


class NoShardsError(FileNotFoundError):
    """The input location holds no readable shard."""


def _shard_suffix(path: str) -> str | None:
    lower = path.lower()
    for suffix in SHARD_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return None


def _protocol_prefix(uri: str) -> str:
    """``s3://`` for remote URIs, '' for local paths (``file://`` included)."""
    if "://" not in uri:
        return ""
    protocol = uri.split("://", 1)[0]
    return "" if protocol == "file" else f"{protocol}://"


def list_input_shards(input_uri: str) -> list[str]:
    """Every ``*.parquet`` / ``*.jsonl`` / ``*.jsonl.gz`` under ``input_uri`` (recursive, sorted).

    Files and folders whose name starts with ``.`` or ``_`` (``_SUCCESS``, ``.tmp``) are skipped.
    Returns full URIs (``s3://...`` for S3, absolute paths locally).
    """
    fs, root = filesystem_for(input_uri)
    prefix = _protocol_prefix(input_uri)
    if fs.isfile(root):
        if _shard_suffix(root) is None:
            raise NoShardsError(f"{input_uri} is not a *.parquet, *.jsonl or *.jsonl.gz file")
        return [prefix + root]
    if not fs.isdir(root):
        raise NoShardsError(f"input location {input_uri} does not exist")
    root = root.rstrip("/")
    shards = []
    for path in fs.find(root):
        rel = path[len(root) :].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if _shard_suffix(path) is not None:
            shards.append(prefix + path)
    if not shards:
        raise NoShardsError(f"no *.parquet, *.jsonl or *.jsonl.gz files under {input_uri}")
    return sorted(shards)


def shard_key(shard_uri: str, input_uri: str) -> str:
    """A stable Dagster partition key for a shard: its path relative to the input, suffix dropped.

    ``sub/part-1.jsonl`` -> ``sub__part-1``. Only ``[A-Za-z0-9_.-]`` survive; if anything had to
    be replaced (or the key is too long) a short hash of the relative path keeps keys unique.
    """
    _, shard_path = filesystem_for(shard_uri)
    _, root = filesystem_for(input_uri)
    shard_path, root = shard_path.rstrip("/"), root.rstrip("/")
    if shard_path == root:
        rel = posixpath.basename(shard_path)
    elif shard_path.startswith(root + "/"):
        rel = shard_path[len(root) + 1 :]
    else:
        raise ValueError(f"shard {shard_uri} is not under input {input_uri}")
    suffix = _shard_suffix(rel)
    stem = rel[: -len(suffix)] if suffix else rel
    key = _KEY_UNSAFE.sub("_", stem.replace("/", "__"))
    if key != stem.replace("/", "__") or len(key) > MAX_KEY_LENGTH or not key:
        digest = hashlib.sha1(rel.encode()).hexdigest()[:8]
        key = f"{key[: MAX_KEY_LENGTH - 9]}-{digest}"
    return key


def _shard_stem(shard_path: str) -> str:
    name = posixpath.basename(shard_path)
    suffix = _shard_suffix(name)
    return name[: -len(suffix)] if suffix else name


def _resolve_image_ref(ref: Any, shard_dir_uri: str) -> Any:
    """Normalize one image slot: bytes stay bytes, relative paths become paths beside the shard."""
    if ref is None or isinstance(ref, bytes):
        return ref
    if isinstance(ref, (bytearray, memoryview)):
        return bytes(ref)
    ref = ref.strip()
    if not ref:
        return None
    if _URL_SCHEME.match(ref) or ref.startswith("data:") or os.path.isabs(ref):
        return ref
    if "://" in shard_dir_uri:
        return posixpath.join(shard_dir_uri, ref)
    return os.path.normpath(os.path.join(shard_dir_uri, ref))


def _valid_slot_list(value: Any, allowed: tuple[type, ...]) -> bool:
    return isinstance(value, list) and all(v is None or isinstance(v, allowed) for v in value)


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


class _DocumentBuilder:
    """Turns raw rows of one shard into Documents; counts and skips malformed rows."""

    def __init__(self, shard_uri: str, stats: StepStats):
        prefix = _protocol_prefix(shard_uri)
        _, path = filesystem_for(shard_uri)
        self.stem = _shard_stem(path)
        self.shard_dir_uri = prefix + posixpath.dirname(path) if prefix else os.path.dirname(path)
        self.stats = stats
        self.row_index = 0
        self.seen_ids: set[str] = set()

    def build(self, row: Any) -> Document | None:
        index = self.row_index
        self.row_index += 1
        self.stats.add("documents_in")
        if not isinstance(row, dict):
            self.stats.drop("malformed_document")
            return None
        images, texts = row.get("images"), row.get("texts")
        if (
            not _valid_slot_list(images, (str, bytes, bytearray, memoryview))
            or not _valid_slot_list(texts, (str,))
            or len(images) != len(texts)
        ):
            self.stats.drop("malformed_document")
            return None
        doc_id = next((str(row[c]) for c in ID_COLUMNS if row.get(c) not in (None, "")), f"{self.stem}-{index}")
        if doc_id in self.seen_ids:
            # image_id / sentence_id embed the doc id, so it must be unique within the shard.
            doc_id = f"{doc_id}~{index}"
            self.stats.add("renamed_duplicate_doc_id")
        self.seen_ids.add(doc_id)
        return Document(
            doc_id=doc_id,
            images=[_resolve_image_ref(ref, self.shard_dir_uri) for ref in images],
            texts=list(texts),
            metadata=_parse_metadata(row),
        )


def _iter_parquet_rows(fs: Any, path: str, batch_size: int) -> Iterator[dict[str, Any]]:
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
            yield from batch.to_pylist()


_MALFORMED = object()


def _iter_jsonl_rows(fs: Any, path: str, gzipped: bool) -> Iterator[Any]:
    with fs.open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if gzipped else raw
        for line in stream:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError:  # bad JSON or bad UTF-8
                yield _MALFORMED


def iter_documents(shard_uri: str, stats: StepStats, batch_size: int = 256) -> Iterator[Document]:
    """Stream the documents of one shard; malformed rows are skipped and counted."""
    fs, path = filesystem_for(shard_uri)
    suffix = _shard_suffix(path)
    if suffix is None:
        raise ValueError(f"unsupported shard format: {shard_uri} (expected .parquet, .jsonl or .jsonl.gz)")
    rows = _iter_parquet_rows(fs, path, batch_size) if suffix == ".parquet" else _iter_jsonl_rows(fs, path, suffix == ".jsonl.gz")
    builder = _DocumentBuilder(shard_uri, stats)
    for row in rows:
        doc = builder.build(None if row is _MALFORMED else row)
        if doc is not None:
            yield doc
