"""What every input reader shares: the ``Document``, shard discovery and keys, and row streaming.

A document is two parallel lists: ``images[i]`` (URL, local/S3 path, bytes, or None where the
slot is text) and ``texts[i]`` (paragraph, or None where the slot is an image). Shards are
Parquet, JSONL or gzipped JSONL, on a local disk or S3. A relative image path is resolved
against the shard's own folder, so a corpus can ship its image files beside its shards.

A reader (``realsyn.readers.obelics``, ``realsyn.readers.mmc4``) only says how one row becomes a
``Document`` (or why it cannot); ``stream_documents`` does the rest, one bad row never failing the
shard: rows one batch / line at a time (never the whole shard), ``documents_in`` counted per row;
a row that is not JSON, not an object, that the reader rejects or that raises is skipped and
counted as ``dropped_malformed_document`` plus ``malformed_<why>`` (``bad_json``, ``not_an_object``,
``missing_images``, ``length_mismatch``, ...); a document whose id, texts or image references are
not valid Unicode (a lone surrogate such as ``\ud800``, which no file format can store) is counted
as ``dropped_invalid_text``. Doc ids are unique within the shard by construction. A shard in the
wrong layout (no ``images`` / ``texts`` columns; no row a JSON object with them) raises
``ShardSchemaError``: that is a failed shard, not an empty one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from realsyn.stats import StepStats
from realsyn.storage import filesystem_for, validate_name

SHARD_SUFFIXES: tuple[str, ...] = (".parquet", ".jsonl.gz", ".jsonl")
ID_COLUMNS: tuple[str, ...] = ("id", "doc_id", "document_id", "url")
MALFORMED_DOCUMENT = "malformed_document"
INVALID_TEXT = "invalid_text"
MALFORMED_PREFIX = "malformed_"  # stats key of each reason a row was malformed: malformed_<why>
MAX_KEY_LENGTH = 120
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass
class Document:
    doc_id: str
    images: list  # str reference, bytes, or None per slot
    texts: list  # str paragraph or None per slot
    metadata: dict = field(default_factory=dict)


def image_id(shard: str, doc_id: str, position: int) -> str:
    """``{shard}/{doc_id}#{position}``: unique across the dataset by construction (shard keys are unique
    and hold no ``/``; doc ids are unique within their shard; the position follows the last ``#``)."""
    return f"{shard}/{doc_id}#{position}"


def sentence_id(shard: str, doc_id: str, position: int, index: int) -> str:
    """``{shard}/{doc_id}#{position}.{index}``: sentence ``index`` of the paragraph at ``position``."""
    return f"{shard}/{doc_id}#{position}.{index}"


class NoShardsError(FileNotFoundError):
    """The input location holds no readable shard."""


class ShardSchemaError(ValueError):
    """A shard whose rows cannot be documents for this reader at all (wrong layout, missing columns)."""


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
    be replaced (or the key is too long, starts with ``.``/``-``/``_`` or holds ``..``) a short hash
    of the relative path keeps keys unique. Every key passes ``realsyn.storage.validate_name``.
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
    if key != stem.replace("/", "__") or len(key) > MAX_KEY_LENGTH or not _SAFE_KEY.fullmatch(key) or ".." in key:
        digest = hashlib.sha1(rel.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        head = re.sub(r"\.\.+", "_", key[: MAX_KEY_LENGTH - 9]).lstrip("._-")
        key = f"{head}-{digest}" if head else digest
    return validate_name(key, "shard key")


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
        """The first non-empty id column, else ``{stem}-{index}`` (``stream_documents`` makes it unique)."""
        return next((str(row[c]) for c in columns if row.get(c) not in (None, "")), f"{self.stem}-{index}")

    def unique_id(self, doc_id: str, index: int) -> str:
        """``doc_id``, or a new id if the shard already has it; records the id it returns.

        image_id / sentence_id embed the doc id, so a repeated id becomes ``{id}~{index}`` (counted as
        ``renamed_duplicate_doc_id``), or ``{id}~{index}.{k}`` if even that is taken. Every id given
        out is recorded, renamed ones included, so a later row whose own id equals an earlier renamed
        one is renamed in turn: ids ``x``, ``x``, ``x~1`` become ``x``, ``x~1``, ``x~1~2``.
        """
        unique = doc_id
        if unique in self.seen_ids:
            unique, k = f"{doc_id}~{index}", 1
            while unique in self.seen_ids:
                k += 1
                unique = f"{doc_id}~{index}.{k}"
            self.stats.add("renamed_duplicate_doc_id")
        self.seen_ids.add(unique)
        return unique


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


def _raw_rows(shard_uri: str, batch_size: int) -> tuple[Iterator[Any], list[str] | None]:
    """(rows with ``_MALFORMED`` for lines that are not JSON, the Parquet column names or None for JSONL)."""
    fs, path = filesystem_for(shard_uri)
    suffix = shard_suffix(path)
    if suffix is None:
        raise ValueError(f"unsupported shard format: {shard_uri} (expected .parquet, .jsonl or .jsonl.gz)")
    if suffix == ".parquet":
        with fs.open(path, "rb") as f:
            columns = list(pq.ParquetFile(f).schema_arrow.names)
        return _iter_parquet_rows(fs, path, batch_size), columns
    return _iter_jsonl_rows(fs, path, suffix == ".jsonl.gz"), None


def iter_shard_rows(shard_uri: str, batch_size: int = 256) -> Iterator[Any]:
    """The raw rows of one shard, streamed: Parquet ``batch_size`` rows at a time, JSONL line by line.

    Blank JSONL lines are not rows; a line that is not JSON (or not UTF-8) comes out as ``None``.
    """
    rows, _ = _raw_rows(shard_uri, batch_size)
    for row in rows:
        yield None if row is _MALFORMED else row


# A converter answers a Document, or why the row is malformed (a short reason; None: no reason given).
RowConverter = Callable[[dict[str, Any], int, ShardContext], "Document | str | None"]


def _invalid_unicode(value: Any) -> bool:
    """A str that cannot be stored as UTF-8 (lone surrogates: JSON "\\ud800" decodes to one)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _has_invalid_text(doc: Document) -> bool:
    return _invalid_unicode(doc.doc_id) or any(_invalid_unicode(t) for t in doc.texts) or any(_invalid_unicode(ref) for ref in doc.images)


def _is_layout_reason(reason: str) -> bool:
    """A reason that says the shard is not in this reader's layout (as opposed to one bad value)."""
    return reason in ("bad_json", "not_an_object") or reason.startswith("missing_") or reason.endswith("_not_a_list")


def _malformed_reason(row: Any, index: int, shard: ShardContext, convert: RowConverter) -> Document | str:
    if row is _MALFORMED:
        return "bad_json"
    if not isinstance(row, dict):
        return "not_an_object"
    try:
        doc = convert(row, index, shard)
    except Exception as e:  # a reader bug or an input it did not foresee: this row only
        return f"reader_error_{type(e).__name__}"
    if doc is None:
        return "rejected"
    return doc


def stream_documents(
    shard_uri: str,
    stats: StepStats,
    convert: RowConverter,
    batch_size: int = 256,
    required_columns: tuple[str, ...] = (),
    layout: str = "",
) -> Iterator[Document]:
    """Stream the documents of one shard: ``convert(row, row_index, shard)`` turns a dict row into a
    ``Document`` or returns why it is malformed (a reason string, or None). Counts ``documents_in``
    for every row, ``dropped_malformed_document`` and ``malformed_<why>`` for rows that are not JSON,
    not objects, rejected by ``convert`` or that make it raise, and ``dropped_invalid_text`` for
    documents with text that is not valid Unicode. Doc ids are made unique within the shard.

    ``required_columns`` of a Parquet shard are checked against its schema before any row is read;
    a shard with rows but not one document, every row dropped for its layout (not JSON, not an
    object, a missing or non-list column), raises ``ShardSchemaError`` naming the reasons. A shard
    whose only documents are dropped for their values (invalid text, wrong lengths) is just empty.
    """
    rows, columns = _raw_rows(shard_uri, batch_size)
    name = f"the {layout} reader" if layout else "this reader"
    if columns is not None:
        missing = [c for c in required_columns if c not in columns]
        if missing:
            raise ShardSchemaError(
                f"{shard_uri}: no column {', '.join(map(repr, missing))}, which {name} needs; its columns are {columns}"
                " (wrong layout? choose the input reader in config: shard_source.reader)"
            )
    shard = ShardContext(shard_uri, stats)
    n_rows = n_docs = 0
    reasons: Counter = Counter()
    for index, row in enumerate(rows):
        n_rows += 1
        stats.add("documents_in")
        doc = _malformed_reason(row, index, shard, convert)
        if isinstance(doc, str):
            reasons[doc] += 1
            stats.drop(MALFORMED_DOCUMENT)
            stats.add(f"{MALFORMED_PREFIX}{doc}")
            continue
        if _has_invalid_text(doc):
            reasons[INVALID_TEXT] += 1
            stats.drop(INVALID_TEXT)
            continue
        doc.doc_id = shard.unique_id(doc.doc_id, index)
        n_docs += 1
        yield doc
    if n_rows and not n_docs and all(_is_layout_reason(r) for r in reasons):
        why = ", ".join(f"{r} x{n}" for r, n in reasons.most_common(5))
        raise ShardSchemaError(f"{shard_uri}: none of its {n_rows} rows is a document for {name} ({why}); wrong layout or a broken shard?")
