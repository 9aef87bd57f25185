"""Helpers shared by the stage runners: which shards a global step reads, and what survived dedup."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from realsyn import layout
from realsyn.decisions import kept_mask
from realsyn.storage import Storage


class MissingShardsError(RuntimeError):
    pass


def require_partitions(storage: Storage, asset: str, shards: Sequence[str]) -> list[str]:
    """The shards of ``asset`` a global step reads; every one must be committed."""
    missing = [s for s in shards if not storage.has(asset, s)]
    if missing:
        head = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MissingShardsError(
            f"{asset}: {len(missing)} of {len(shards)} shards not materialized yet: {head} (shards whose per-shard steps "
            "failed are left out with the run tag realsyn/excluded_shards, a JSON list; `realsyn run` sets it)"
        )
    if not shards:
        raise MissingShardsError(f"{asset}: no shards registered")
    return list(shards)


def dedup_kept_mask(storage: Storage, dedup_asset: str, shard: str) -> np.ndarray:
    """Per row of the shard's embeddings: did it survive the global dedup?"""
    return kept_mask(storage.reader(dedup_asset).read_parquet(layout.decisions_file(shard), columns=["kept"]))


def kept_image_embeddings(storage: Storage, shard: str) -> tuple[list[str], np.ndarray]:
    """(image ids, float32 embeddings) of the shard's images that survived dedup."""
    mask = dedup_kept_mask(storage, layout.IMAGE_DEDUP, shard)
    reader = storage.reader(layout.IMAGE_EMBEDDINGS, shard)
    ids = reader.read_parquet(layout.EMBEDDING_INDEX_FILE, columns=["image_id"]).column("image_id").filter(pa.array(mask)).to_pylist()
    return ids, np.asarray(reader.read_numpy(layout.EMBEDDINGS_FILE), dtype=np.float32)[mask]


def kept_image_ids(storage: Storage, shard: str) -> list[str]:
    """Ids of the shard's images that survived dedup, in embedding row order (without reading the embeddings)."""
    mask = dedup_kept_mask(storage, layout.IMAGE_DEDUP, shard)
    index = storage.reader(layout.IMAGE_EMBEDDINGS, shard).read_parquet(layout.EMBEDDING_INDEX_FILE, columns=["image_id"])
    return index.column("image_id").filter(pa.array(mask)).to_pylist()


def read_retrievals(storage: Storage, shard: str, columns: list[str] | None = None) -> pa.Table:
    """The retrievals of one shard's kept images (RETRIEVAL_SCHEMA) from the one global retrieval pass."""
    return storage.reader(layout.RETRIEVALS).read_parquet(layout.retrievals_file(shard), columns=columns)


def write_retrievals(storage: Storage, tables: dict[str, pa.Table]) -> None:
    """Commit retrievals as one global generation, one file per shard (what the retrievals asset writes)."""
    with storage.writer(layout.RETRIEVALS) as w:
        for shard, table in tables.items():
            w.write_parquet(layout.retrievals_file(shard), table)


def kept_pair_ids(storage: Storage, shard: str) -> list[str]:
    """Image ids whose pair passed the similarity band."""
    from realsyn.decisions import kept_ids

    return kept_ids(storage.reader(layout.FILTERED_PAIRS, shard).read_parquet(layout.DECISIONS_FILE, columns=["id", "kept"]))
