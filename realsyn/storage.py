"""One storage root (local folder or s3://...) for every asset, with atomic partition commits.

Layout: ``{root}/{asset}/{partition}/g-{generation}/{files}`` plus ``{root}/{asset}/{partition}/_CURRENT.json``.
A writer fills a fresh generation folder that no reader looks at, checks that every file it wrote
is there, then flips ``_CURRENT.json`` (the manifest: generation, files, info, and the history of
the generations it superseded). So a reader never sees a half-written output, and rematerializing a
partition replaces it whole (files the new run did not write do not linger). Unpartitioned (global)
assets use the partition name ``_global``.

Concurrency. The flip is a compare-and-swap: locally under an exclusive ``flock`` of the partition's
``.lock`` file, on S3 a conditional PUT (``If-None-Match: *`` for the first commit, ``If-Match:
<etag>`` after that; a lost race re-reads and retries, so no commit drops another's history entry).
A commit never deletes what another writer or a reader may still use: it keeps the current
generation and the ``retention - 1`` it superseded last (readers that resolved an older pointer
keep their files), a superseded generation goes only once it has been superseded for ``grace_s``,
and a generation that was never committed (another writer still at work, or one killed) goes only
when it started more than ``grace_s`` ago and none of its files changed for ``grace_s``. The same
sweep is ``Storage.sweep``. Retention and grace come from ``Storage(retention=, grace_s=)`` or the
``REALSYN_STORAGE_RETENTION`` / ``REALSYN_STORAGE_GRACE_S`` environment variables (defaults 2 and
3600 s).

Pins. A generation something outside this root still refers to (a published dataset version, a
training run) is pinned: ``Storage.pin(asset, partition, generation, holder)`` writes
``{partition}/_pins/{holder}.json``, and no commit or sweep deletes a pinned generation, whatever
its age or the retention; ``unpin`` hands it back to the retention rule. Pin before reading a
generation for good (a generation is never deleted in the grace period after it was superseded).

Names. Every asset, partition and file-name component that becomes a path is checked by
``validate_name`` (``[A-Za-z0-9][A-Za-z0-9_.-]*``, no ``..``): nothing is written outside the root.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import io
import json
import os
import posixpath
import random
import re
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realsyn.io import atomic_write_bytes, filesystem_for, is_local, join_path
from realsyn.runtime import env_number

GLOBAL_PARTITION = "_global"
CURRENT_FILE = "_CURRENT.json"
PINS_DIR = "_pins"
LOCK_FILE = ".lock"
GENERATION_PREFIX = "g-"
DEFAULT_RETENTION = 2
DEFAULT_GRACE_S = 3600.0
MAX_NAME_LENGTH = 200
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_GENERATION_TIME = re.compile(r"(\d{8}T\d{6})\.(\d{9})-[0-9a-f]+")
_CAS_ATTEMPTS = 50


class MissingOutputError(FileNotFoundError):
    """An asset partition has never been committed under this storage root."""


class InvalidNameError(ValueError):
    """A name that would become a path is not a plain, safe name."""


class CommitError(RuntimeError):
    """A commit could not flip the pointer: files of its generation are gone, or the swap kept losing."""


def validate_name(name: Any, what: str = "name") -> str:
    """``name`` if it is safe as one path component: ``[A-Za-z0-9][A-Za-z0-9_.-]*``, no ``..``, <= 200 chars."""
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid {what} {name!r}: use letters, digits, '_', '.' and '-', starting with a letter or digit, "
            f"without '..', at most {MAX_NAME_LENGTH} characters"
        )
    return name


def validate_file_name(name: Any, what: str = "file name") -> str:
    """A relative file name inside a generation: ``/``-separated components, each a ``validate_name``."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError(f"invalid {what} {name!r}")
    for part in name.split("/"):
        validate_name(part, f"{what} component of {name!r}")
    return name


def _partition_name(partition: str | None) -> str:
    if partition is None or partition == GLOBAL_PARTITION:
        return GLOBAL_PARTITION
    return validate_name(partition, "partition (shard key)")


def generation_started(generation: str) -> float | None:
    """Start time (epoch seconds) encoded in a generation id, None for a name this module did not make."""
    m = _GENERATION_TIME.fullmatch(generation)
    if m is None:
        return None
    try:
        return calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%S")) + int(m.group(2)) / 1e9
    except ValueError:
        return None


def _new_generation() -> str:
    now = time.time_ns()
    # sortable by start time down to the nanosecond, unique by the random suffix
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now // 10**9))}.{now % 10**9:09d}-{uuid.uuid4().hex[:8]}"


class Storage:
    """The storage root shared by all assets."""

    def __init__(
        self,
        root: str,
        storage_options: dict[str, Any] | None = None,
        *,
        retention: int | None = None,
        grace_s: float | None = None,
    ):
        self.root_uri = root.rstrip("/")
        self.fs, self.root = filesystem_for(self.root_uri, storage_options)
        self.protocol = "file" if is_local(self.fs) else (self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol)
        self.retention = int(retention if retention is not None else env_number("REALSYN_STORAGE_RETENTION", DEFAULT_RETENTION))
        self.grace_s = float(grace_s if grace_s is not None else env_number("REALSYN_STORAGE_GRACE_S", DEFAULT_GRACE_S))
        if self.retention < 1:
            raise ValueError(f"retention must be >= 1 (the current generation), got {self.retention}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        self.conditional_writes = not is_local(self.fs)  # turned off if the S3 endpoint refuses them

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
        return self.path(validate_name(asset, "asset name"), _partition_name(partition))

    # ------------------------------------------------------------------ partitions
    def writer(self, asset: str, partition: str | None = None) -> PartitionWriter:
        return PartitionWriter(self, validate_name(asset, "asset name"), _partition_name(partition))

    def reader(self, asset: str, partition: str | None = None) -> PartitionReader:
        return PartitionReader(self, validate_name(asset, "asset name"), _partition_name(partition))

    def has(self, asset: str, partition: str | None = None) -> bool:
        return self.fs.exists(join_path(self.fs, self.partition_dir(asset, partition), CURRENT_FILE))

    def current_uri(self, asset: str, partition: str | None = None) -> str:
        """The URI of the committed generation folder of a partition: the only path users should read."""
        return self.reader(asset, partition).uri("")

    def partitions(self, asset: str) -> list[str]:
        """Committed partitions of an asset, sorted."""
        base = self.path(validate_name(asset, "asset name"))
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
        atomic_write_bytes(self.fs, self.path(*_cache_parts(rel)), data)

    def read_file(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(*_cache_parts(rel)))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(*_cache_parts(rel)))

    # ------------------------------------------------------------------ the pointer
    @contextlib.contextmanager
    def _pointer_lock(self, directory: str) -> Iterator[None]:
        """Locally: an exclusive flock of the partition's ``.lock`` (every process and thread of this host).
        On S3 nothing: the conditional PUT of ``_swap_pointer`` is the compare-and-swap."""
        if not is_local(self.fs):
            yield
            return
        import fcntl

        os.makedirs(directory, exist_ok=True)
        fd = os.open(join_path(self.fs, directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read_pointer(self, directory: str) -> tuple[dict[str, Any] | None, str | None]:
        """(manifest or None, the ETag it was read at on S3)."""
        path = join_path(self.fs, directory, CURRENT_FILE)
        try:
            token = None
            if self.conditional_writes:
                token = self.fs.info(path).get("ETag")
            return json.loads(self.fs.cat_file(path)), token
        except FileNotFoundError:
            return None, None

    def _swap_pointer(self, directory: str, manifest: dict[str, Any], token: str | None, existed: bool) -> bool:
        """Write the manifest if the pointer is still what was read; False when another commit landed first."""
        path = join_path(self.fs, directory, CURRENT_FILE)
        data = json.dumps(manifest).encode()
        if not self.conditional_writes:
            atomic_write_bytes(self.fs, path, data)  # locally under the flock: nobody else is between read and write
            return True
        try:
            if existed:
                if token is None:
                    return False
                self.fs.pipe_file(path, data, IfMatch=token)
            else:
                self.fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except NotImplementedError:  # an S3 endpoint without conditional writes: last writer wins
            self.conditional_writes = False
            atomic_write_bytes(self.fs, path, data)
            return True
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EEXIST) or "precondition" in str(e).lower() or "conflict" in str(e).lower():
                return False  # 412 PreconditionFailed / 409 ConditionalRequestConflict: re-read and retry
            raise

    # ------------------------------------------------------------------ retention
    def _kept_history(self, history: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        """The superseded generations still kept: the newest ``retention - 1``, and any superseded within ``grace_s``."""
        ordered = sorted(history, key=lambda h: h.get("superseded_at", 0.0), reverse=True)
        return [h for i, h in enumerate(ordered) if i < self.retention - 1 or now - float(h.get("superseded_at", 0.0)) < self.grace_s]

    def _newest_change(self, gen_dir: str) -> float:
        """Latest modification time of a generation folder and everything in it (epoch seconds)."""
        if is_local(self.fs):
            newest = os.stat(gen_dir).st_mtime
            for base, dirs, files in os.walk(gen_dir):
                for name in dirs + files:
                    with contextlib.suppress(FileNotFoundError):
                        newest = max(newest, os.stat(os.path.join(base, name)).st_mtime)
            return newest
        newest = 0.0
        for info in self.fs.find(gen_dir, detail=True).values():
            modified = info.get("LastModified") or info.get("mtime")
            if modified is not None:
                newest = max(newest, modified.timestamp() if hasattr(modified, "timestamp") else float(modified))
        return newest

    def _sweep_dir(self, directory: str, now: float | None = None) -> list[str]:
        """Delete the generations of one partition that nobody may use any more (see the module docstring)."""
        now = time.time() if now is None else now
        manifest, _ = self._read_pointer(directory)
        if manifest is None:
            return []

        def protected(m: dict[str, Any]) -> set[str]:
            kept = {m["generation"], *(h["generation"] for h in self._kept_history(m.get("history", []), now))}
            return kept | set(self._pins_in(directory).values())

        keep = protected(manifest)
        removed = []
        for entry in self.fs.ls(directory, detail=False):
            name = posixpath.basename(entry.rstrip("/"))
            if not name.startswith(GENERATION_PREFIX) or name[len(GENERATION_PREFIX) :] in keep:
                continue
            generation = name[len(GENERATION_PREFIX) :]
            started = generation_started(generation)
            if started is None or now - started < self.grace_s:
                continue  # not ours to judge, or young: may be another writer still at work
            with contextlib.suppress(FileNotFoundError):
                if now - self._newest_change(entry) < self.grace_s:
                    continue  # files changed recently: a writer is still at work
            # no lock on S3 (a slow writer may have committed it meanwhile) and pins take no lock anywhere:
            # look again right before deleting
            latest, _ = self._read_pointer(directory) if not is_local(self.fs) else (manifest, None)
            if latest is not None and generation in protected(latest):
                continue
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(entry, recursive=True)
            removed.append(name)
        return removed

    # ------------------------------------------------------------------ pins
    def _pins_in(self, directory: str) -> dict[str, str]:
        base = join_path(self.fs, directory, PINS_DIR)
        try:
            entries = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return {}
        out = {}
        for entry in entries:
            name = posixpath.basename(entry.rstrip("/"))
            if name.endswith(".json"):
                with contextlib.suppress(FileNotFoundError):
                    out[name[: -len(".json")]] = json.loads(self.fs.cat_file(entry))["generation"]
        return out

    def pin(self, asset: str, partition: str | None, generation: str, holder: str) -> None:
        """Keep ``generation`` of a partition until ``unpin(asset, partition, holder)``; one pin per holder
        (pinning again moves it). The generation must exist (committed, or still within its grace period)."""
        directory = self.partition_dir(asset, partition)
        gen_dir = join_path(self.fs, directory, f"{GENERATION_PREFIX}{validate_name(generation, 'generation')}")
        if not self.fs.exists(gen_dir):
            raise MissingOutputError(f"{asset}/{_partition_name(partition)}: generation {generation} does not exist under {self.root_uri}")
        path = join_path(self.fs, directory, PINS_DIR, f"{validate_name(holder, 'pin holder')}.json")
        # locally under the lock every sweep holds; on S3 a sweep looks at the pins again right before deleting
        with self._pointer_lock(directory):
            if is_local(self.fs):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_bytes(self.fs, path, json.dumps({"generation": generation, "pinned_at": time.time()}).encode())
            if not self.fs.exists(gen_dir):  # a sweep deleted it between the check and the pin
                self.fs.rm(path)
                raise MissingOutputError(f"{asset}/{_partition_name(partition)}: generation {generation} was swept while being pinned")

    def unpin(self, asset: str, partition: str | None, holder: str) -> None:
        """Remove ``holder``'s pin (nothing if it has none); the next commit or sweep applies the retention rule."""
        path = join_path(self.fs, self.partition_dir(asset, partition), PINS_DIR, f"{validate_name(holder, 'pin holder')}.json")
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path)

    def pins(self, asset: str, partition: str | None = None) -> dict[str, str]:
        """Holder -> pinned generation of one partition."""
        return self._pins_in(self.partition_dir(asset, partition))

    def sweep(self, asset: str | None = None) -> list[str]:
        """Delete unused generations (superseded beyond retention and grace, or uncommitted orphans older
        than the grace period) of every partition of ``asset`` (every asset when None); returns their paths."""
        assets = [validate_name(asset, "asset name")] if asset else []
        if asset is None and self.fs.exists(self.root):
            for entry in self.fs.ls(self.root, detail=False):
                name = posixpath.basename(entry.rstrip("/"))
                if _NAME.fullmatch(name) and ".." not in name:
                    assets.append(name)
        removed = []
        for a in sorted(assets):
            base = self.path(a)
            if not self.fs.exists(base):
                continue
            for entry in sorted(self.fs.ls(base, detail=False)):
                directory = entry.rstrip("/")
                if not self.fs.exists(join_path(self.fs, directory, CURRENT_FILE)):
                    continue
                with self._pointer_lock(directory):
                    removed += [join_path(self.fs, directory, n) for n in self._sweep_dir(directory)]
        return removed


def _cache_parts(rel: str) -> list[str]:
    """A plain file's path under the root (caches such as ``_cache/...``): a component may start with one ``_``."""
    parts = rel.split("/")
    for part in parts:
        validate_name(part[1:] if part.startswith("_") else part, f"path component of {rel!r}")
    return parts


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
        self.generation = _new_generation()
        self.dir = storage.partition_dir(asset, partition)
        self.gen_dir = join_path(self.fs, self.dir, f"{GENERATION_PREFIX}{self.generation}")
        self.files: list[str] = []
        self.committed = False

    def path(self, name: str) -> str:
        if name not in self.files:
            validate_file_name(name)
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

    def _missing_files(self) -> list[str]:
        if is_local(self.fs):
            return [n for n in self.files if not os.path.isfile(self.path(n))]
        prefix = self.gen_dir.rstrip("/") + "/"
        present = {p[len(prefix) :] for p in self.fs.find(self.gen_dir) if p.startswith(prefix)}
        return [n for n in self.files if n not in present]

    def commit(self, info: dict[str, Any] | None = None) -> str:
        """Check this generation's files, make it the current one (compare-and-swap), then sweep old generations."""
        if self.committed:
            raise CommitError(f"{self.asset}/{self.partition}: generation {self.generation} is already committed")
        if is_local(self.fs):
            os.makedirs(self.gen_dir, exist_ok=True)  # an output with no files still commits
        missing = self._missing_files()
        if missing:
            head = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise CommitError(
                f"{self.asset}/{self.partition}: {len(missing)} file(s) of generation {self.generation} are missing ({head}); not committed"
            )
        storage = self.storage
        for attempt in range(_CAS_ATTEMPTS):
            with storage._pointer_lock(self.dir):
                current, token = storage._read_pointer(self.dir)
                now = time.time()
                history = []
                if current is not None:
                    history = [{"generation": current["generation"], "committed_at": current.get("committed_at"), "superseded_at": now}]
                    history += current.get("history", [])
                manifest = {
                    "generation": self.generation,
                    "files": sorted(self.files),
                    "committed_at": now,
                    "info": info or {},
                    "history": storage._kept_history([h for h in history if h["generation"] != self.generation], now),
                }
                if storage._swap_pointer(self.dir, manifest, token, current is not None):
                    self.committed = True
                    try:
                        storage._sweep_dir(self.dir, now)
                    except Exception as e:  # the commit stands; what was not swept now goes at a later sweep
                        warnings.warn(
                            f"{self.asset}/{self.partition}: sweeping old generations failed: {type(e).__name__}: {e}", stacklevel=2
                        )
                    return self.generation
            time.sleep(random.uniform(0.01, 0.05) * (1 + attempt))  # another commit landed first: re-read, retry
        raise CommitError(f"{self.asset}/{self.partition}: the pointer kept changing; gave up after {_CAS_ATTEMPTS} attempts")

    def abort(self) -> None:
        """Remove this writer's uncommitted generation (a committed one is never removed here)."""
        if not self.committed and self.fs.exists(self.gen_dir):
            self.fs.rm(self.gen_dir, recursive=True)

    def __enter__(self) -> PartitionWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self.committed:
            self.commit()


class PartitionReader(_FileIO):
    """Reads the current generation of one asset partition (kept for readers through ``retention`` and ``grace_s``)."""

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
        self.committed_at: float | None = manifest.get("committed_at")
        self.gen_dir = join_path(self.fs, self.dir, f"{GENERATION_PREFIX}{self.generation}")

    def path(self, name: str) -> str:
        if name:  # "" is the generation folder itself
            validate_file_name(name)
        return join_path(self.fs, self.gen_dir, name)

    def has(self, name: str) -> bool:
        return name in self.files
