"""Finished synthetic captions keyed by (image_id, prompt_sha), so a rerun never regenerates them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from realsyn.generation.prompts import prompt_sha

CACHE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("prompt_sha", pa.string()),
        ("synthetic_caption", pa.string()),
        ("model", pa.string()),
    ]
)


class CaptionCache:
    """In-memory view of the cache table; the caller persists ``to_table()`` (atomically, via storage)."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], tuple[str, str]] = {}

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

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._rows

    def to_table(self) -> pa.Table:
        keys = list(self._rows)
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


def generate_with_cache(
    items: Sequence[tuple[str, list[dict]]],
    backend: Any,
    cache: CaptionCache,
    model_id: str | None,
    params: Mapping[str, Any],
    batch_size: int = 8,
) -> tuple[list[str], int, int]:
    """Captions for (image_id, messages) items, generating only those the cache lacks.

    ``params`` holds ``max_new_tokens`` and ``temperature`` (and anything else that changes the
    output; all of it enters the prompt hash). Empty outputs are returned but not cached, so a
    rerun tries them again. Returns (captions in item order, n_cached, n_generated).
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
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        outputs = backend.generate([items[todo[k][0]][1] for k in chunk], max_new_tokens=max_new_tokens, temperature=temperature)
        if len(outputs) != len(chunk):
            raise RuntimeError(f"backend {model_id!r} returned {len(outputs)} captions for {len(chunk)} prompts")
        for key, text in zip(chunk, outputs):
            text = text if isinstance(text, str) else ""
            for i in todo[key]:
                captions[i] = text
            if text.strip():
                cache.put(key[0], key[1], text, model_id)
    return [c if c is not None else "" for c in captions], n_cached, len(keys)
