"""What every input reader shares: the ``Document``, shard discovery and keys, and row streaming.

A document is two parallel lists: ``images[i]`` (URL, local/S3 path, bytes, or None where the
slot is text) and ``texts[i]`` (paragraph, or None where the slot is an image). Shards are
Parquet, JSONL or gzipped JSONL, on a local disk or S3. A relative image path is resolved
against the shard's own folder, so a corpus can ship its image files beside its shards.

A reader (``realsyn.readers.obelics``, ``realsyn.readers.mmc4``) only says how one row becomes a
``Document``; ``stream_documents`` does the rest: rows one batch / line at a time (never the
whole shard), ``documents_in`` counted per row, a row that is not a JSON object or that the reader
rejects skipped and counted as ``dropped_malformed_document``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from realsyn.stats import StepStats
from realsyn.storage import filesystem_for

SHARD_SUFFIXES: tuple[str, ...] = (".parquet", ".jsonl.gz", ".jsonl")
ID_COLUMNS: tuple[str, ...] = ("id", "doc_id", "document_id", "url")
MALFORMED_DOCUMENT = "malformed_document"
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


def shard_suffix(path: str) -> str | None:
    lower = path.lower()
    for suffix in SHARD_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return None


def protocol_prefix(uri: str) -> str:
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
    prefix = protocol_prefix(input_uri)
    if fs.isfile(root):
        if shard_suffix(root) is None:
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
        if shard_suffix(path) is not None:
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
    suffix = shard_suffix(rel)
    stem = rel[: -len(suffix)] if suffix else rel
    key = _KEY_UNSAFE.sub("_", stem.replace("/", "__"))
    if key != stem.replace("/", "__") or len(key) > MAX_KEY_LENGTH or not key:
        digest = hashlib.sha1(rel.encode()).hexdigest()[:8]
        key = f"{key[: MAX_KEY_LENGTH - 9]}-{digest}"
    return key


def _shard_stem(shard_path: str) -> str:
    name = posixpath.basename(shard_path)
    suffix = shard_suffix(name)
    return name[: -len(suffix)] if suffix else name


def resolve_image_ref(ref: Any, base_dir_uri: str) -> Any:
    """Normalize one image slot: bytes stay bytes, relative paths become paths under ``base_dir_uri``."""
    if ref is None or isinstance(ref, bytes):
        return ref
    if isinstance(ref, (bytearray, memoryview)):
        return bytes(ref)
    ref = ref.strip()
    if not ref:
        return None
    if _URL_SCHEME.match(ref) or ref.startswith("data:") or os.path.isabs(ref):
        return ref
    if "://" in base_dir_uri:
        return posixpath.join(base_dir_uri, ref)
    return os.path.normpath(os.path.join(base_dir_uri, ref))


class ShardContext:
    """One shard as a reader sees it while converting rows: its stem, folder, and the doc ids so far."""

    def __init__(self, shard_uri: str, stats: StepStats):
        prefix = protocol_prefix(shard_uri)
        _, path = filesystem_for(shard_uri)
        self.shard_uri = shard_uri
        self.stem = _shard_stem(path)
        self.shard_dir_uri = prefix + posixpath.dirname(path) if prefix else os.path.dirname(path)
        self.stats = stats
        self.seen_ids: set[str] = set()

    def resolve(self, ref: Any) -> Any:
        """An image reference with a relative path resolved beside the shard (see ``resolve_image_ref``)."""
        return resolve_image_ref(ref, self.shard_dir_uri)

    def doc_id(self, row: dict[str, Any], index: int, columns: tuple[str, ...] = ID_COLUMNS) -> str:
        """The first non-empty id column, else ``{stem}-{index}``; made unique within the shard.

        image_id / sentence_id embed the doc id, so a repeated id becomes ``{id}~{index}`` (counted
        as ``renamed_duplicate_doc_id``). Call it only for a row that becomes a document.
        """
        doc_id = next((str(row[c]) for c in columns if row.get(c) not in (None, "")), f"{self.stem}-{index}")
        if doc_id in self.seen_ids:
            doc_id = f"{doc_id}~{index}"
            self.stats.add("renamed_duplicate_doc_id")
        self.seen_ids.add(doc_id)
        return doc_id


_MALFORMED = object()


def _iter_parquet_rows(fs: Any, path: str, batch_size: int) -> Iterator[dict[str, Any]]:
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
            yield from batch.to_pylist()


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


def iter_shard_rows(shard_uri: str, batch_size: int = 256) -> Iterator[Any]:
    """The raw rows of one shard, streamed: Parquet ``batch_size`` rows at a time, JSONL line by line.

    Blank JSONL lines are not rows; a line that is not JSON (or not UTF-8) comes out as ``None``.
    """
    fs, path = filesystem_for(shard_uri)
    suffix = shard_suffix(path)
    if suffix is None:
        raise ValueError(f"unsupported shard format: {shard_uri} (expected .parquet, .jsonl or .jsonl.gz)")
    rows = _iter_parquet_rows(fs, path, batch_size) if suffix == ".parquet" else _iter_jsonl_rows(fs, path, suffix == ".jsonl.gz")
    for row in rows:
        yield None if row is _MALFORMED else row


RowConverter = Callable[[dict[str, Any], int, ShardContext], "Document | None"]


def stream_documents(shard_uri: str, stats: StepStats, convert: RowConverter, batch_size: int = 256) -> Iterator[Document]:
    """Stream the documents of one shard: ``convert(row, row_index, shard)`` turns a dict row into a
    ``Document`` or returns None for a malformed one. Counts ``documents_in`` for every row and
    ``dropped_malformed_document`` for rows that are not objects or that ``convert`` rejects.
    """
    shard = ShardContext(shard_uri, stats)
    for index, row in enumerate(iter_shard_rows(shard_uri, batch_size)):
        stats.add("documents_in")
        doc = convert(row, index, shard) if isinstance(row, dict) else None
        if doc is None:
            stats.drop(MALFORMED_DOCUMENT)
            continue
        yield doc
