"""One storage root (local folder or s3://...) for every asset, with atomic partition commits.

Layout: ``{root}/{asset}/{partition}/g-{generation}/{files}`` plus ``{root}/{asset}/{partition}/_CURRENT.json``.
A writer fills a fresh generation folder that no reader looks at, then flips ``_CURRENT.json``
in one atomic write (``os.replace`` locally, a single PUT on S3) and removes older generations.
So a reader never sees a half-written output, and rematerializing a partition replaces it whole
(files the new run did not write do not linger). Unpartitioned (global) assets use the partition
name ``_global``.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import time
import uuid
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realsyn.io import atomic_write_bytes, filesystem_for, is_local, join_path

GLOBAL_PARTITION = "_global"
CURRENT_FILE = "_CURRENT.json"


class MissingOutputError(FileNotFoundError):
    """An asset partition has never been committed under this storage root."""


class Storage:
    """The storage root shared by all assets."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        self.root_uri = root.rstrip("/")
        self.fs, self.root = filesystem_for(self.root_uri, storage_options)
        self.protocol = "file" if is_local(self.fs) else (self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol)

    def __repr__(self) -> str:
        return f"Storage({self.root_uri!r})"

    # ------------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        """Filesystem path (no protocol) under the root."""
        return join_path(self.fs, self.root, *parts)

    def uri(self, *parts: str) -> str:
        """Full URI (with protocol for remote roots), for users and for other libraries."""
        return self.uri_of(self.path(*parts))

    def uri_of(self, path: str) -> str:
        """The URI of a filesystem path of this root (the path itself when local)."""
        return path if is_local(self.fs) else f"{self.protocol}://{path}"

    def partition_dir(self, asset: str, partition: str | None) -> str:
        return self.path(asset, partition or GLOBAL_PARTITION)

    # ------------------------------------------------------------------ partitions
    def writer(self, asset: str, partition: str | None = None) -> PartitionWriter:
        return PartitionWriter(self, asset, partition or GLOBAL_PARTITION)

    def reader(self, asset: str, partition: str | None = None) -> PartitionReader:
        return PartitionReader(self, asset, partition or GLOBAL_PARTITION)

    def has(self, asset: str, partition: str | None = None) -> bool:
        return self.fs.exists(join_path(self.fs, self.partition_dir(asset, partition), CURRENT_FILE))

    def partitions(self, asset: str) -> list[str]:
        """Committed partitions of an asset, sorted."""
        base = self.path(asset)
        if not self.fs.exists(base):
            return []
        out = []
        for entry in self.fs.ls(base, detail=False):
            name = posixpath.basename(entry.rstrip("/"))
            if name != GLOBAL_PARTITION and self.fs.exists(posixpath.join(entry, CURRENT_FILE)):
                out.append(name)
        return sorted(out)

    # ------------------------------------------------------------------ plain files (caches)
    def write_file(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self.fs, self.path(rel), data)

    def read_file(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))


class _FileIO:
    """Typed reads and writes of the files of one generation folder."""

    storage: Storage
    fs: fsspec.AbstractFileSystem

    def path(self, name: str) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def uri(self, name: str) -> str:
        return self.storage.uri_of(self.path(name))

    def open(self, name: str, mode: str = "rb"):
        if "w" in mode and is_local(self.fs):
            os.makedirs(os.path.dirname(self.path(name)), exist_ok=True)
        return self.fs.open(self.path(name), mode)

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def read_parquet(self, name: str, columns: list[str] | None = None) -> pa.Table:
        with self.open(name) as f:
            return pq.read_table(f, columns=columns)

    def read_numpy(self, name: str) -> np.ndarray:
        if is_local(self.fs):
            return np.load(self.path(name), mmap_mode="r", allow_pickle=False)
        with self.open(name) as f:
            return np.load(io.BytesIO(f.read()), allow_pickle=False)

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))


class PartitionWriter(_FileIO):
    """Writes one asset partition into a fresh generation; nothing is visible until ``commit``."""

    def __init__(self, storage: Storage, asset: str, partition: str):
        self.storage, self.fs = storage, storage.fs
        self.asset, self.partition = asset, partition
        now = time.time_ns()
        # sortable by start time down to the nanosecond, unique by the random suffix
        self.generation = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now // 10**9))}.{now % 10**9:09d}-{uuid.uuid4().hex[:8]}"
        self.dir = storage.partition_dir(asset, partition)
        self.gen_dir = join_path(self.fs, self.dir, f"g-{self.generation}")
        self.files: list[str] = []
        self.committed = False

    def path(self, name: str) -> str:
        if name not in self.files:
            self.files.append(name)
        return join_path(self.fs, self.gen_dir, name)

    def write_bytes(self, name: str, data: bytes) -> str:
        with self.open(name, "wb") as f:
            f.write(data)
        return self.path(name)

    def write_parquet(self, name: str, table: pa.Table) -> str:
        with self.open(name, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        return self.path(name)

    def write_numpy(self, name: str, array: np.ndarray) -> str:
        with self.open(name, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        return self.path(name)

    def write_json(self, name: str, obj: Any) -> str:
        return self.write_bytes(name, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def commit(self, info: dict[str, Any] | None = None) -> str:
        """Make this generation the current one, then drop older generations."""
        manifest = {"generation": self.generation, "files": sorted(self.files), "committed_at": time.time(), "info": info or {}}
        if is_local(self.fs):
            os.makedirs(self.gen_dir, exist_ok=True)  # an output with no files still commits
        atomic_write_bytes(self.fs, join_path(self.fs, self.dir, CURRENT_FILE), json.dumps(manifest).encode())
        self.committed = True
        # only older generations go: a concurrent writer of the same partition that started later
        # is still filling its own (generation ids sort by start time)
        for entry in self.fs.ls(self.dir, detail=False):
            name = posixpath.basename(entry.rstrip("/"))
            if name.startswith("g-") and name < f"g-{self.generation}":
                self.fs.rm(entry, recursive=True)
        return self.generation

    def abort(self) -> None:
        if self.fs.exists(self.gen_dir):
            self.fs.rm(self.gen_dir, recursive=True)

    def __enter__(self) -> PartitionWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self.committed:
            self.commit()


class PartitionReader(_FileIO):
    """Reads the current generation of one asset partition."""

    def __init__(self, storage: Storage, asset: str, partition: str):
        self.storage, self.fs = storage, storage.fs
        self.asset, self.partition = asset, partition
        self.dir = storage.partition_dir(asset, partition)
        current = join_path(self.fs, self.dir, CURRENT_FILE)
        try:
            manifest = json.loads(self.fs.cat_file(current))
        except FileNotFoundError as e:
            raise MissingOutputError(f"asset {asset!r} partition {partition!r} has no committed output under {storage.root_uri}") from e
        self.generation: str = manifest["generation"]
        self.files: list[str] = manifest["files"]
        self.info: dict[str, Any] = manifest.get("info", {})
        self.gen_dir = join_path(self.fs, self.dir, f"g-{self.generation}")

    def path(self, name: str) -> str:
        return join_path(self.fs, self.gen_dir, name)

    def has(self, name: str) -> bool:
        return name in self.files
