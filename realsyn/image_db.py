"""Stage 2: the image DB and the sentence DB of one shard, as pyarrow tables.

Every image slot of every document becomes one image row, fetched (as far as the fetch policy,
``realsyn.fetch_policy``, allows) and probed (``realsyn.image_decode``), with a status instead of an
exception: ``ok``, ``fetch_refused`` (the policy forbids the reference), ``opted_out`` (X-Robots-Tag
noai and the like), ``fetch_failed`` or ``undecodable``. Every paragraph becomes sentence rows
that keep their document and position.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from realsyn.fetch_policy import (
    STATUS_FETCH_FAILED,
    STATUS_FETCH_REFUSED,
    STATUS_OPTED_OUT,
    FetchError,
    FetchOptedOut,
    FetchPolicy,
    FetchRefused,
    http_get,
    local_ref,
    object_ref,
)
from realsyn.image_decode import DEFAULT_MAX_PIXELS, UndecodableImageError, probe_image
from realsyn.io import batched, filesystem_for
from realsyn.net import Deadline
from realsyn.readers import Document
from realsyn.redact import redact
from realsyn.stats import StepStats

IMAGE_DB_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("shard", pa.string()),
        ("doc_id", pa.string()),
        ("position", pa.int32()),
        ("source", pa.string()),
        ("image_bytes", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("sha256", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)

SENTENCE_DB_SCHEMA = pa.schema(
    [
        ("sentence_id", pa.string()),
        ("shard", pa.string()),
        ("doc_id", pa.string()),
        ("position", pa.int32()),
        ("sentence_index", pa.int32()),
        ("text", pa.string()),
    ]
)

STATUS_OK, STATUS_UNDECODABLE = "ok", "undecodable"
STATUSES = (STATUS_OK, STATUS_FETCH_REFUSED, STATUS_OPTED_OUT, STATUS_FETCH_FAILED, STATUS_UNDECODABLE)
__all__ = [
    "IMAGE_DB_SCHEMA",
    "SENTENCE_DB_SCHEMA",
    "STATUSES",
    "FetchError",
    "FetchOptedOut",
    "FetchPolicy",
    "FetchRefused",
    "ImageFetcher",
    "UndecodableImageError",
    "build_image_table",
    "build_sentence_table",
    "probe_image",
]
INLINE_SOURCE = "inline"
_ROWS_PER_BATCH = 256
_MAX_ERROR_CHARS = 300


class ImageFetcher:
    """Fetch image bytes from inline bytes, ``data:`` URIs, http(s), local paths / ``file://``, ``s3://``,
    as far as ``policy`` (``realsyn.fetch_policy.FetchPolicy``, default deny) allows.

    Statuses and reasons (``FetchError.status`` / ``.reason``):

    - ``fetch_refused`` (``FetchRefused``): the policy forbids the reference; nothing was sent or
      read. ``refused_scheme``, ``refused_<address class>`` (``refused_loopback``,
      ``refused_private``, ``refused_link_local``, ...), ``refused_path`` (a local path outside the
      input root, whether or not it exists), ``refused_object_prefix``.
    - ``opted_out`` (``FetchOptedOut``): reason ``opted_out``, the server's X-Robots-Tag said noai etc.
    - ``fetch_failed`` (``FetchError``): ``too_large``, ``http_<code>``, ``timeout``, ``unreachable``,
      ``dns_error``, ``tls_error``, ``bad_response``, ``truncated``, ``too_many_redirects``,
      ``not_found`` (a local file or object inside the allowed places that is absent, a folder,
      or unreadable: one reason for all), ``read_error``, ``bad_data_uri``, ``invalid_url``,
      ``unsupported_encoding``, ``no_reference``.

    One wall-clock deadline, ``total_timeout_s`` (default ``3 * timeout_s``), covers a whole fetch:
    DNS, connect, TLS, headers, body, redirects and retries; ``timeout_s`` bounds each socket
    operation. Transient HTTP failures (timeout, unreachable, 429, 5xx) are retried ``retries``
    times within that deadline. ``max_pixels`` is the decode limit ``_image_row`` probes with.
    Thread-safe and picklable.
    """

    def __init__(
        self,
        timeout_s: float = 10.0,
        max_bytes: int = 20_000_000,
        user_agent: str = "realsyn/0.1",
        retries: int = 1,
        total_timeout_s: float | None = None,
        policy: FetchPolicy | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.timeout_s = float(timeout_s)
        self.max_bytes = int(max_bytes)
        self.user_agent = user_agent
        self.retries = max(0, int(retries))
        self.total_timeout_s = float(total_timeout_s) if total_timeout_s is not None else 3 * self.timeout_s
        self.policy = policy if policy is not None else FetchPolicy()
        self.max_pixels = int(max_pixels)

    # ------------------------------------------------------------------ dispatch
    def fetch(self, ref: Any) -> bytes:
        if isinstance(ref, (bytes, bytearray, memoryview)):
            return self._capped(bytes(ref))
        if not isinstance(ref, str) or not ref.strip():
            raise FetchError("no_reference", repr(ref)[:80])
        ref = ref.strip()
        lower = ref[:16].lower()
        if lower.startswith(("http://", "https://")):
            return self._fetch_http(ref)
        if lower.startswith("data:"):
            return self._capped(_decode_data_uri(ref))
        if local_ref(ref):
            return self._fetch_local(self.policy.check_local_path(ref))
        if object_ref(ref):
            return self._fetch_object(self.policy.check_object_uri(ref))
        raise FetchRefused("refused_scheme", ref[:80])

    def _capped(self, data: bytes) -> bytes:
        if len(data) > self.max_bytes:
            raise FetchError("too_large", f"{len(data)} bytes > {self.max_bytes}")
        return data

    # ------------------------------------------------------------------ local files
    def _fetch_local(self, path: str) -> bytes:
        """Read a checked real path: no symlink followed at the last step, never a FIFO or device."""
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except OSError as e:  # absent, a folder, a link, unreadable: one answer
            raise FetchError("not_found", path[:200]) from e
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise FetchError("not_found", f"{path[:200]} is not a file")
        with os.fdopen(fd, "rb") as f:
            if info.st_size > self.max_bytes:
                raise FetchError("too_large", f"{info.st_size} bytes > {self.max_bytes}")
            try:
                data = f.read(self.max_bytes + 1)
            except OSError as e:
                raise FetchError("read_error", f"{type(e).__name__}: {e}"[:200]) from e
        return self._capped(data)

    # ------------------------------------------------------------------ object stores (s3, ...)
    def _fetch_object(self, ref: str) -> bytes:
        try:
            fs, path = filesystem_for(ref)
            info = fs.info(path)
            if info.get("type") != "file":
                raise FetchError("not_found", f"{ref[:200]} is not a file")
            size = info.get("size")
            if size is not None and size > self.max_bytes:
                raise FetchError("too_large", f"{size} bytes > {self.max_bytes}")
            with fs.open(path, "rb") as f:
                data = f.read(self.max_bytes + 1)
        except FetchError:
            raise
        except (FileNotFoundError, PermissionError) as e:
            raise FetchError("not_found", ref[:200]) from e
        except Exception as e:  # any storage backend error: count it, never crash the shard
            raise FetchError("read_error", redact(f"{type(e).__name__}: {e}")[:200]) from e
        return self._capped(data)

    # ------------------------------------------------------------------ http(s)
    def _fetch_http(self, url: str) -> bytes:
        deadline = Deadline(self.total_timeout_s)
        for attempt in range(self.retries + 1):
            try:
                return http_get(url, self.policy, deadline, max_bytes=self.max_bytes, op_timeout=self.timeout_s, user_agent=self.user_agent)
            except FetchError as e:
                transient = e.reason in ("timeout", "unreachable", "http_429") or e.reason.startswith("http_5")
                if not transient or attempt == self.retries or deadline.expired():
                    raise
        raise AssertionError("unreachable code")  # pragma: no cover


def _decode_data_uri(ref: str) -> bytes:
    header, sep, payload = ref.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise FetchError("bad_data_uri", "only base64 data URIs are supported")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FetchError("bad_data_uri", str(e)[:200]) from e


def _source_of(ref: Any) -> str:
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return INLINE_SOURCE
    ref = str(ref)
    return INLINE_SOURCE if ref[:5].lower() == "data:" else ref


def _image_row(slot: tuple[str, str, int, Any], shard: str, fetcher: ImageFetcher) -> dict[str, Any]:
    doc_id, image_id, position, ref = slot
    row: dict[str, Any] = {
        "image_id": image_id,
        "shard": shard,
        "doc_id": doc_id,
        "position": position,
        "source": _source_of(ref),
        "image_bytes": None,
        "width": None,
        "height": None,
        "format": None,
        "sha256": None,
        "status": STATUS_OK,
        "error": None,
        "_fetch_reason": None,
    }
    try:
        data = fetcher.fetch(ref)
    except FetchError as e:
        row.update(status=e.status, error=str(e)[:_MAX_ERROR_CHARS], _fetch_reason=e.reason)
        return row
    row["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        width, height, fmt = probe_image(data, fetcher.max_pixels)
    except UndecodableImageError as e:
        row.update(status=STATUS_UNDECODABLE, error=str(e)[:_MAX_ERROR_CHARS])
        return row
    row.update(image_bytes=data, width=width, height=height, format=fmt)
    return row


def _image_slots(docs: Iterable[Document]) -> Iterator[tuple[str, str, int, Any]]:
    for doc in docs:
        for position, ref in enumerate(doc.images):
            if ref is not None:
                yield doc.doc_id, f"{doc.doc_id}#{position}", position, ref


def build_image_table(docs: Iterable[Document], shard: str, fetcher: ImageFetcher, stats: StepStats, workers: int = 8) -> pa.Table:
    """One row per image slot (IMAGE_DB_SCHEMA), in document order.

    Fetching runs on ``workers`` threads (network-bound); row order does not depend on it.
    Counts ``images_in``, ``images_<status>`` and ``fetch_error_<reason>``. Image ids hold the shard
    key (``realsyn.readers.image_id``): unique across shards.
    """
    from realsyn.readers import image_id

    names = IMAGE_DB_SCHEMA.names
    batches = []
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    slots_with_ids = ((doc_id, image_id(shard, doc_id, position), position, ref) for doc_id, _, position, ref in _image_slots(docs))
    try:
        for slots in batched(slots_with_ids, _ROWS_PER_BATCH):
            if pool is not None and any(not isinstance(s[3], (bytes, bytearray, memoryview)) for s in slots):
                rows = list(pool.map(lambda s: _image_row(s, shard, fetcher), slots))
            else:
                rows = [_image_row(s, shard, fetcher) for s in slots]
            for row in rows:
                stats.add("images_in")
                stats.add(f"images_{row['status']}")
                if row["_fetch_reason"]:
                    stats.add(f"fetch_error_{row['_fetch_reason']}")
            batches.append(pa.RecordBatch.from_pydict({n: [r[n] for r in rows] for n in names}, schema=IMAGE_DB_SCHEMA))
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return pa.Table.from_batches(batches, schema=IMAGE_DB_SCHEMA)


def build_sentence_table(docs: Iterable[Document], shard: str, splitter: Any, stats: StepStats) -> pa.Table:
    """One row per sentence of every paragraph (SENTENCE_DB_SCHEMA). Counts ``paragraphs_in``, ``sentences_out``.

    One paragraph never fails the shard: one the splitter fails on (``SentenceSplitError``: NLTK's
    regex time limit, or any error) is counted as ``dropped_sentence_split_failed``, one that is not
    valid Unicode (a lone surrogate) as ``dropped_invalid_text``. Sentence ids hold the shard key.
    """
    from realsyn.readers import sentence_id

    columns: dict[str, list[Any]] = {n: [] for n in SENTENCE_DB_SCHEMA.names}
    for doc in docs:
        for position, paragraph in enumerate(doc.texts):
            if paragraph is None:
                continue
            stats.add("paragraphs_in")
            try:
                paragraph.encode("utf-8")
                sentences = splitter.split(paragraph)
            except UnicodeEncodeError:
                stats.drop("invalid_text")
                continue
            except Exception:  # SentenceSplitError, or a custom splitter's own: this paragraph only
                stats.drop("sentence_split_failed")
                continue
            if not sentences:
                stats.add("paragraphs_empty")
            for index, sentence in enumerate(sentences):
                columns["sentence_id"].append(sentence_id(shard, doc.doc_id, position, index))
                columns["shard"].append(shard)
                columns["doc_id"].append(doc.doc_id)
                columns["position"].append(position)
                columns["sentence_index"].append(index)
                columns["text"].append(sentence)
            stats.add("sentences_out", len(sentences))
    return pa.Table.from_pydict(columns, schema=SENTENCE_DB_SCHEMA)
