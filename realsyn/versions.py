"""Content versions: what an asset partition holds, as a hash of what it committed (never a timestamp).

A partition's data version is a hash over (file name, content hash) of the files of its committed
generation. Run summaries (``summary.json``: counts and seconds of the run) are left out: they say
how the run went, not what it wrote, and their timings differ on every run.

A global asset that writes one file per shard (``decisions/{shard}.parquet``, ``shards/{shard}.parquet``,
``{split}/{shard}.parquet``) also has a *slice* version per shard: the hash of the files named for that
shard. A per-shard consumer reads only its shard's files, so it depends on its slice, not on the whole.

Content hashes: local files are read and hashed (sha256); objects on S3 use their ETag and size (the
store's own content hash), so versioning a large output costs no read.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

from realsyn import layout
from realsyn.io import filesystem_for, is_local
from realsyn.storage import MissingOutputError, Storage

UNVERSIONED_FILES = frozenset({layout.SUMMARY_FILE})
_CHUNK = 1 << 20


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short sha256 of the canonical JSON of ``obj`` (sorted keys; the same value always hashes the same)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_content_hash(fs: Any, path: str) -> str:
    """sha256 of a local file's bytes; on an object store the object's ETag and size (no read)."""
    if not is_local(fs):
        info = fs.info(path)
        etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
        if etag:
            return f"etag:{str(etag).strip(chr(34))}:{info.get('size')}"
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_version(uri: str) -> str:
    """The version of an input shard: the content hash of the file."""
    fs, path = filesystem_for(uri)
    return stable_hash(file_content_hash(fs, path))


def shard_of_file(name: str, shards: set[str]) -> str | None:
    """The shard a global asset's file belongs to (``.../{shard}.parquet`` or a ``{shard}/`` folder), else None."""
    parts = name.split("/")
    stem = posixpath.splitext(parts[-1])[0]
    if stem in shards:
        return stem
    for part in parts[:-1]:
        if part in shards:
            return part
    return None


def current_generation(storage: Storage, asset: str, partition: str | None = None) -> str | None:
    """The committed generation of a partition, None when it has none."""
    try:
        return storage.reader(asset, partition).generation
    except MissingOutputError:
        return None


def partition_version(storage: Storage, asset: str, partition: str | None = None, shards: list[str] | None = None) -> dict[str, Any]:
    """What one committed partition holds: ``{generation, data_version, slices}``.

    ``slices`` (only when ``shards`` is given, for a global asset) maps each shard to the hash of the
    files named for it; a shard without files gets the hash of nothing.
    """
    reader = storage.reader(asset, partition)
    hashes = {name: file_content_hash(reader.fs, reader.path(name)) for name in sorted(reader.files) if name not in UNVERSIONED_FILES}
    out: dict[str, Any] = {"generation": reader.generation, "data_version": stable_hash(sorted(hashes.items()))}
    if shards is not None:
        wanted = set(shards)
        by_shard: dict[str, list] = {s: [] for s in shards}
        for name, digest in hashes.items():
            shard = shard_of_file(name, wanted)
            if shard is not None:
                by_shard[shard].append((name, digest))
        out["slices"] = {s: stable_hash(items) for s, items in by_shard.items()}
    return out
