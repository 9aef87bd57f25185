"""Storage-side I/O helpers shared by the whole package: filesystems for local paths and URLs
(s3://...), path joins, atomic writes, JSON of numpy and Arrow values, JSONL reading, batching.

Everything here works the same on a local folder and on an object store; what differs (``os.path``
vs ``posixpath``, rename vs a single PUT) is decided by ``is_local``.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import os
import posixpath
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

# ---------------------------------------------------------------------------- filesystems


def s3_storage_options() -> dict[str, Any]:
    """s3fs options from the standard AWS variables; AWS_ENDPOINT_URL selects MinIO/moto."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # other pods write the same prefixes: never trust a cached listing
    options: dict[str, Any] = {"use_listings_cache": False}
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def filesystem_for(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for a local path or a URL such as s3://bucket/key."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a") and not options:
        options = s3_storage_options()
    fs = fsspec.filesystem(protocol, **options)
    path = fs._strip_protocol(uri)
    if protocol == "file":
        path = os.path.abspath(path)
    return fs, path


def is_local(fs: Any) -> bool:
    """Whether ``fs`` is the local filesystem (paths are OS paths, renames are atomic)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def join_path(fs: Any, base: str, *parts: str) -> str:
    """``base/parts...``: ``os.path.join`` on the local filesystem, ``posixpath.join`` on any other."""
    return os.path.join(base, *parts) if is_local(fs) else posixpath.join(base, *parts)


# ---------------------------------------------------------------------------- atomic writes


def _local_temp_path(path: str) -> str:
    """A hidden, unique temporary name beside local ``path`` (same folder, so a rename is atomic)."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")


@contextmanager
def _replacing(path: str) -> Iterator[str]:
    """A temporary path beside local ``path`` that replaces it (``os.replace``) if the block succeeds."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _local_temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see either the old file or the whole new one."""
    if is_local(fs):
        with _replacing(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    else:
        # An S3 object becomes visible only when its PUT completes: atomic by construction.
        fs.pipe_file(path, data)


@contextmanager
def atomic_local_file(uri: str) -> Iterator[str]:
    """A local temporary path that becomes ``uri`` only if the block succeeds (rename, or one upload)."""
    fs, path = filesystem_for(uri)
    if is_local(fs):
        with _replacing(path) as tmp:
            yield tmp
        return
    fd, tmp = tempfile.mkstemp(suffix=posixpath.basename(path))
    os.close(fd)
    try:
        yield tmp
        fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_directory(
    target: str | os.PathLike, complete: Callable[[Path], bool] | None = None, prefix: str = ".staging-"
) -> Iterator[Path]:
    """A fresh local staging folder beside ``target`` that is renamed to ``target`` if the block succeeds.

    If the rename fails because another writer put ``target`` in place first, the error is ignored
    when ``complete(target)`` says that folder is whole. The staging folder never outlives the block.
    """
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield staging
        try:
            os.replace(staging, target)
        except OSError:
            if complete is None or not complete(target):  # not a concurrent writer winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------- JSON


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for the numpy and Arrow values json does not know; others raise TypeError.

    numpy scalars -> Python numbers, arrays -> lists, bytes -> base64 text, dates and times -> ISO
    text, durations -> seconds, decimals -> text.
    """
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


# ---------------------------------------------------------------------------- JSONL


class _Malformed:
    """What ``iter_jsonl`` yields for a line that is not JSON (bad syntax or bad UTF-8)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MALFORMED"


MALFORMED = _Malformed()


def iter_jsonl(uri: str, strict: bool = False) -> Iterator[Any]:
    """Per non-blank line of a JSONL file (local or URL; ``.gz`` is decompressed), its JSON value.

    A line that is not JSON raises its ``ValueError`` when ``strict``; otherwise ``MALFORMED`` stands
    in for it, so the caller counts it and goes on.
    """
    fs, path = filesystem_for(uri)
    with fs.open(path, "rb", compression="infer") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:  # bad JSON or bad UTF-8
                if strict:
                    raise
                value = MALFORMED
            yield value


# ---------------------------------------------------------------------------- batching


def batched(items: Iterable[Any], size: int) -> Iterator[Any]:
    """Consecutive chunks of at most ``size`` items, the last one shorter.

    A sequence (anything with ``len`` and slicing, numpy arrays included) is sliced, so each chunk
    has its type; any other iterable is consumed lazily into lists.
    """
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    if hasattr(items, "__len__") and hasattr(items, "__getitem__") and not isinstance(items, dict):
        for start in range(0, len(items), size):
            yield items[start : start + size]
        return
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
