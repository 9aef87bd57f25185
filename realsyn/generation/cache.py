"""Finished synthetic captions keyed by (image_id, prompt_sha), so a rerun never regenerates them."""

from __future__ import annotations

import io
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from realsyn import layout
from realsyn.generation.base import PartialBatchError
from realsyn.generation.prompts import prompt_sha
from realsyn.storage import Storage

CACHE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("prompt_sha", pa.string()),
        ("synthetic_caption", pa.string()),
        ("model", pa.string()),
    ]
)


class CaptionCache:
    """In-memory view of the cache table; the caller persists ``to_table()`` or, appending, ``take_new()``
    (atomically, via storage: see ``CaptionCacheStore``)."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], tuple[str, str]] = {}
        self._new: dict[tuple[str, str], None] = {}  # keys put since the last take_new(), in order

    @classmethod
    def from_table(cls, table: pa.Table | None) -> CaptionCache:
        cache = cls()
        if table is None:
            return cache
        missing = [c for c in CACHE_SCHEMA.names if c not in table.column_names]
        if missing:
            raise ValueError(f"caption cache table lacks columns {missing}")
        columns = [table.column(c).to_pylist() for c in CACHE_SCHEMA.names]
        for image_id, sha, caption, model in zip(*columns):
            if image_id is not None and sha is not None and caption is not None:
                cache._rows[(image_id, sha)] = (caption, model or "")  # a later row wins
        return cache

    def get(self, image_id: str, prompt_sha: str) -> str | None:
        row = self._rows.get((image_id, prompt_sha))
        return None if row is None else row[0]

    def put(self, image_id: str, prompt_sha: str, synthetic_caption: str, model: str) -> None:
        self._rows[(image_id, prompt_sha)] = (synthetic_caption, model)
        self._new[(image_id, prompt_sha)] = None

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._rows

    def to_table(self) -> pa.Table:
        return self._table(list(self._rows))

    def take_new(self) -> pa.Table:
        """The rows put since the last call (their latest values), then forgets that they were new."""
        keys, self._new = list(self._new), {}
        return self._table(keys)

    def _table(self, keys: list[tuple[str, str]]) -> pa.Table:
        values = [self._rows[k] for k in keys]
        return pa.table(
            {
                "image_id": pa.array([k[0] for k in keys], pa.string()),
                "prompt_sha": pa.array([k[1] for k in keys], pa.string()),
                "synthetic_caption": pa.array([v[0] for v in values], pa.string()),
                "model": pa.array([v[1] for v in values], pa.string()),
            },
            schema=CACHE_SCHEMA,
        )


class CaptionCacheStore:
    """A shard's caption cache on storage, append-only: ``{CAPTION_CACHE_DIR}/{shard}/part-{n:06d}.parquet``.

    ``append`` writes the rows put since the last append as the next part (one atomic ``write_file``;
    nothing is ever rewritten in place), so persisting after every batch costs the batch, not the
    shard. ``load`` reads every part in number order (later rows win), after the single-file cache of
    earlier versions (``{CAPTION_CACHE_DIR}/{shard}.parquet``) if there is one. When there are more than
    ``max_parts`` parts, ``compact`` merges them into one new part (written atomically before any old
    one is deleted, and numbered after them, so a crash in between leaves a cache that loads the same).
    """

    PART = re.compile(r"^part-(\d{6,})\.parquet$")

    def __init__(self, storage: Storage, shard: str, max_parts: int = 64):
        if max_parts < 1:
            raise ValueError(f"max_parts must be >= 1, got {max_parts}")
        self.storage, self.shard, self.max_parts = storage, shard, int(max_parts)
        self.rel_dir = f"{layout.CAPTION_CACHE_DIR}/{shard}"
        self.legacy_rel = f"{layout.CAPTION_CACHE_DIR}/{shard}.parquet"
        self._next: int | None = None

    def part_rel(self, number: int) -> str:
        return f"{self.rel_dir}/part-{number:06d}.parquet"

    def parts(self) -> list[int]:
        """Part numbers on storage, ascending."""
        fs = self.storage.fs
        directory = self.storage.path(*self.rel_dir.split("/"))
        fs.invalidate_cache(directory)
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(directory, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(self.PART.match, names) if m)

    def load(self) -> CaptionCache:
        cache = CaptionCache.from_table(self.read_table())
        cache.take_new()
        return cache

    def read_table(self) -> pa.Table | None:
        """Every stored row, oldest first (the legacy file, then the parts); None when there is none."""
        for _ in range(3):  # a part deleted by a concurrent compaction between listing and reading: list again
            numbers = self.parts()
            rels = ([self.legacy_rel] if self.storage.exists(self.legacy_rel) else []) + [self.part_rel(n) for n in numbers]
            try:
                tables = [self._read(rel) for rel in rels]
            except FileNotFoundError:
                continue
            self._next = max(self._next or 0, numbers[-1] + 1 if numbers else 0)
            return pa.concat_tables(tables) if tables else None
        raise RuntimeError(f"caption cache of shard {self.shard!r} kept changing while being read")

    def _read(self, rel: str) -> pa.Table:
        table = pq.read_table(io.BytesIO(self.storage.read_file(rel)))
        missing = [c for c in CACHE_SCHEMA.names if c not in table.column_names]
        if missing:
            raise ValueError(f"caption cache file {rel} lacks columns {missing}")
        return table.select(CACHE_SCHEMA.names).cast(CACHE_SCHEMA)

    def append(self, cache: CaptionCache) -> int:
        """Persist the rows put since the last append as one new part; returns how many rows it holds."""
        table = cache.take_new()
        if not table.num_rows:
            return 0
        self._write_part(table)
        if len(self.parts()) > self.max_parts:
            self.compact()
        return table.num_rows

    def compact(self) -> None:
        """Merge the legacy file and every part into one part (the newest), then delete what it replaces."""
        numbers = self.parts()
        legacy = self.storage.exists(self.legacy_rel)
        if len(numbers) + legacy <= 1:
            return
        merged = CaptionCache.from_table(self.read_table()).to_table()
        self._write_part(merged)
        fs = self.storage.fs
        for rel in ([self.legacy_rel] if legacy else []) + [self.part_rel(n) for n in numbers]:
            fs.rm_file(self.storage.path(*rel.split("/")))

    def _write_part(self, table: pa.Table) -> None:
        if self._next is None:
            numbers = self.parts()
            self._next = numbers[-1] + 1 if numbers else 0
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.storage.write_file(self.part_rel(self._next), buf.getvalue())
        self._next += 1


class CaptionShardError(RuntimeError):
    """Generation of one shard's captions failed after the backend's retries; finished captions are cached.

    The message is one line: the shard, how many captions are cached and how many are missing, and the cause.
    """

    def __init__(self, shard: str, n_done: int, n_todo: int, cause: BaseException):
        super().__init__(
            f"caption shard {shard!r}: {n_done} of {n_todo} new captions generated and cached before the generation backend failed"
            f" ({n_todo - n_done} left; a rerun generates only those): {type(cause).__name__}: {cause}"
        )
        self.shard, self.n_done, self.n_todo, self.cause = shard, n_done, n_todo, cause


def generate_with_cache(
    items: Sequence[tuple[str, list[dict]]],
    backend: Any,
    cache: CaptionCache,
    model_id: str | None,
    params: Mapping[str, Any],
    batch_size: int = 8,
    *,
    on_batch: Callable[[], Any] | None = None,
    shard: str | None = None,
) -> tuple[list[str], int, int]:
    """Captions for (image_id, messages) items, generating only those the cache lacks.

    ``params`` holds ``max_new_tokens`` and ``temperature`` (and anything else that changes the
    output; all of it enters the prompt hash). Empty outputs are returned but not cached, so a
    rerun tries them again. Returns (captions in item order, n_cached, n_generated).

    A backend with ``generate_as_completed`` (the vLLM client) gets every missing prompt at once and
    keeps its own number of requests in flight; ``batch_size`` is then only how often ``on_batch``
    (persist the cache) is called, every ``batch_size`` completions. Other backends get
    ``batch_size`` prompts per ``generate`` call. With ``shard`` set, a failure is raised as
    ``CaptionShardError`` naming the shard (after the finished captions are put in the cache).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model_id = model_id or backend.model_id
    max_new_tokens = int(params["max_new_tokens"])
    temperature = float(params.get("temperature", 0.0))
    shas = [prompt_sha(messages, model_id, params) for _, messages in items]
    captions: list[str | None] = [cache.get(image_id, sha) for (image_id, _), sha in zip(items, shas)]
    n_cached = sum(c is not None for c in captions)
    # Identical (image, prompt) pairs in one call are generated once.
    todo: dict[tuple[str, str], list[int]] = {}
    for i, ((image_id, _), sha) in enumerate(zip(items, shas)):
        if captions[i] is None:
            todo.setdefault((image_id, sha), []).append(i)
    keys = list(todo)
    n_done = 0

    def finish(key: tuple[str, str], text: Any) -> None:
        nonlocal n_done
        text = text if isinstance(text, str) else ""
        for i in todo[key]:
            captions[i] = text
        if text.strip():
            cache.put(key[0], key[1], text, model_id)
        n_done += 1
        if on_batch is not None and n_done % batch_size == 0:
            on_batch()

    try:
        stream = getattr(backend, "generate_as_completed", None)
        if stream is not None:
            prompts = [items[todo[k][0]][1] for k in keys]
            for position, text in stream(prompts, max_new_tokens=max_new_tokens, temperature=temperature):
                finish(keys[position], text)
        else:
            for start in range(0, len(keys), batch_size):
                chunk = keys[start : start + batch_size]
                try:
                    outputs = backend.generate(
                        [items[todo[k][0]][1] for k in chunk], max_new_tokens=max_new_tokens, temperature=temperature
                    )
                except PartialBatchError as exc:
                    # keep what finished before the failure, then let the step fail (a retry generates only the rest)
                    for pos, text in exc.completed.items():
                        finish(chunk[pos], text)
                    raise
                if len(outputs) != len(chunk):
                    raise RuntimeError(f"backend {model_id!r} returned {len(outputs)} captions for {len(chunk)} prompts")
                for key, text in zip(chunk, outputs):
                    finish(key, text)
    except Exception as exc:
        if shard is None:
            raise
        raise CaptionShardError(shard, n_done, len(keys), exc) from exc
    return [c if c is not None else "" for c in captions], n_cached, len(keys)
