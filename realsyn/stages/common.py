"""Helpers shared by the stage runners."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from realsyn.storage import MissingOutputError, Storage


class MissingShardsError(RuntimeError):
    pass


def require_partitions(storage: Storage, asset: str, shards: Sequence[str]) -> list[str]:
    """The shards of ``asset`` a global step reads; every one must be committed."""
    missing = [s for s in shards if not storage.has(asset, s)]
    if missing:
        head = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MissingShardsError(f"{asset}: {len(missing)} of {len(shards)} shards not materialized yet: {head}")
    if not shards:
        raise MissingShardsError(f"{asset}: no shards registered")
    return list(shards)


def table_or_empty(storage: Storage, asset: str, shard: str | None, name: str, schema: pa.Schema | None = None) -> pa.Table:
    try:
        return storage.reader(asset, shard).read_parquet(name)
    except MissingOutputError:
        if schema is None:
            raise
        return schema.empty_table()


def batched(seq: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def empty_embeddings(dim: int) -> np.ndarray:
    return np.zeros((0, dim), dtype=np.float32)
