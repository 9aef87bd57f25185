"""Stage 2: the image DB and the sentence DB of one shard, as pyarrow tables.

Every image slot of every document becomes one image row, fetched and probed, with a status
(``ok`` / ``fetch_failed`` / ``undecodable``) instead of an exception; every paragraph becomes
sentence rows that keep their document and position.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import requests
import urllib3
from PIL import Image

from realsyn.io import batched, filesystem_for
from realsyn.readers import Document
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

STATUS_OK, STATUS_FETCH_FAILED, STATUS_UNDECODABLE = "ok", "fetch_failed", "undecodable"
INLINE_SOURCE = "inline"
_CHUNK_BYTES = 64 * 1024
_ROWS_PER_BATCH = 256
_MAX_ERROR_CHARS = 300
_FSSPEC_SCHEMES = ("file://", "s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://", "memory://")
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


class FetchError(Exception):
    """An image could not be obtained; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class UndecodableImageError(ValueError):
    """Image bytes that Pillow cannot decode (garbage, truncated, decompression bomb); the one such
    error of the package (``probe_image`` here, ``realsyn.export.normalize_image`` at export)."""


class ImageFetcher:
    """Fetch image bytes from inline bytes, ``data:`` URIs, http(s), local paths / ``file://``, ``s3://``.

    Failures raise ``FetchError`` with reason ``too_large``, ``http_<code>``, ``timeout``,
    ``unreachable``, ``not_found``, ``forbidden``, ``read_error``, ``bad_data_uri``,
    ``invalid_url`` or ``unsupported_scheme``. Transient HTTP failures (timeout, unreachable,
    429, 5xx) are retried ``retries`` times. Thread-safe: each thread has its own HTTP session.
    """

    def __init__(
        self,
        timeout_s: float = 10.0,
        max_bytes: int = 20_000_000,
        user_agent: str = "realsyn/0.1",
        retries: int = 1,
        total_timeout_s: float | None = None,
    ):
        self.timeout_s = float(timeout_s)
        self.max_bytes = int(max_bytes)
        self.user_agent = user_agent
        self.retries = max(0, int(retries))
        # The read timeout bounds each socket read; this bounds a slow-drip body as a whole.
        self.total_timeout_s = float(total_timeout_s) if total_timeout_s is not None else 3 * self.timeout_s
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_local")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

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
        if "://" not in ref or lower.startswith(_FSSPEC_SCHEMES):
            return self._fetch_fsspec(ref)
        raise FetchError("unsupported_scheme", ref[:80])

    def _capped(self, data: bytes) -> bytes:
        if len(data) > self.max_bytes:
            raise FetchError("too_large", f"{len(data)} bytes > {self.max_bytes}")
        return data

    # ------------------------------------------------------------------ files (local, s3, ...)
    def _fetch_fsspec(self, ref: str) -> bytes:
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
        except FileNotFoundError as e:
            raise FetchError("not_found", ref[:200]) from e
        except PermissionError as e:
            raise FetchError("forbidden", ref[:200]) from e
        except Exception as e:  # any storage backend error: count it, never crash the shard
            raise FetchError("read_error", f"{type(e).__name__}: {e}"[:200]) from e
        return self._capped(data)

    # ------------------------------------------------------------------ http(s)
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = self.user_agent
            self._local.session = session
        return session

    def _fetch_http(self, url: str) -> bytes:
        for attempt in range(self.retries + 1):
            try:
                return self._fetch_http_once(url)
            except FetchError as e:
                transient = e.reason in ("timeout", "unreachable", "http_429") or e.reason.startswith("http_5")
                if not transient or attempt == self.retries:
                    raise
        raise AssertionError("unreachable code")  # pragma: no cover

    def _fetch_http_once(self, url: str) -> bytes:
        started = time.monotonic()
        try:
            with self._session().get(url, stream=True, timeout=(self.timeout_s, self.timeout_s)) as response:
                if not 200 <= response.status_code < 300:
                    raise FetchError(f"http_{response.status_code}", url[:200])
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise FetchError("too_large", f"Content-Length {declared} > {self.max_bytes}")
                body = bytearray()
                for chunk in _body_chunks(response):
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise FetchError("too_large", f"body over {self.max_bytes} bytes")
                    if time.monotonic() - started > self.total_timeout_s:
                        raise FetchError("timeout", f"body not complete after {self.total_timeout_s:.0f}s")
                return bytes(body)
        except FetchError:
            raise
        except (requests.exceptions.Timeout, urllib3.exceptions.ReadTimeoutError, TimeoutError) as e:
            raise FetchError("timeout", str(e)[:200]) from e
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema) as e:
            raise FetchError("invalid_url", str(e)[:200]) from e
        except requests.exceptions.ConnectionError as e:
            # requests reports a read timeout during streaming as a ConnectionError.
            if e.args and isinstance(e.args[0], urllib3.exceptions.ReadTimeoutError):
                raise FetchError("timeout", str(e)[:200]) from e
            raise FetchError("unreachable", str(e)[:200]) from e
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            raise FetchError("unreachable", f"{type(e).__name__}: {e}"[:200]) from e


def _body_chunks(response: requests.Response) -> Iterator[bytes]:
    """Decoded body chunks, each from at most one socket read where urllib3 allows it (read1).

    ``iter_content`` blocks until a whole chunk has arrived, so a slow-drip server could hold a
    fetch far past the deadline that is checked between chunks.
    """
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:  # urllib3 < 2
        yield from response.iter_content(_CHUNK_BYTES)
        return
    while chunk := read1(_CHUNK_BYTES, decode_content=True):
        yield chunk


def _decode_data_uri(ref: str) -> bytes:
    header, sep, payload = ref.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise FetchError("bad_data_uri", "only base64 data URIs are supported")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FetchError("bad_data_uri", str(e)[:200]) from e


def probe_image(data: bytes, max_pixels: int | None = None) -> tuple[int, int, str]:
    """(width, height, lower-case format) of fully decoded image bytes.

    Raises ``UndecodableImageError`` for garbage, truncated data, or more than ``max_pixels``
    pixels (PIL's decompression-bomb limit by default), checked before decoding.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if limit and width * height > limit:
                    raise UndecodableImageError(f"decompression_bomb: {width}x{height} > {limit} pixels")
                fmt = (img.format or "").lower()
                img.load()  # decodes the pixels, so truncated files fail here rather than later
    except UndecodableImageError:
        raise
    except Exception as e:  # PIL raises many types on bad input (OSError, SyntaxError, ValueError, ...)
        message = _OBJECT_REPR.sub("data", f"{type(e).__name__}: {e}")  # no memory addresses: reruns agree
        raise UndecodableImageError(message[:_MAX_ERROR_CHARS]) from e
    if width <= 0 or height <= 0 or not fmt:
        raise UndecodableImageError(f"no usable size/format: {width}x{height} {fmt!r}")
    return width, height, fmt


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
        row.update(status=STATUS_FETCH_FAILED, error=str(e)[:_MAX_ERROR_CHARS], _fetch_reason=e.reason)
        return row
    row["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        width, height, fmt = probe_image(data)
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
    Counts ``images_in``, ``images_<status>`` and ``fetch_error_<reason>``.
    """
    names = IMAGE_DB_SCHEMA.names
    batches = []
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        for slots in batched(_image_slots(docs), _ROWS_PER_BATCH):
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
    """One row per sentence of every paragraph (SENTENCE_DB_SCHEMA). Counts ``paragraphs_in``, ``sentences_out``."""
    columns: dict[str, list[Any]] = {n: [] for n in SENTENCE_DB_SCHEMA.names}
    for doc in docs:
        for position, paragraph in enumerate(doc.texts):
            if paragraph is None:
                continue
            stats.add("paragraphs_in")
            sentences = splitter.split(paragraph)
            if not sentences:
                stats.add("paragraphs_empty")
            for index, sentence in enumerate(sentences):
                columns["sentence_id"].append(f"{doc.doc_id}#{position}.{index}")
                columns["shard"].append(shard)
                columns["doc_id"].append(doc.doc_id)
                columns["position"].append(position)
                columns["sentence_index"].append(index)
                columns["text"].append(sentence)
            stats.add("sentences_out", len(sentences))
    return pa.Table.from_pydict(columns, schema=SENTENCE_DB_SCHEMA)
