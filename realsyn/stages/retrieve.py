"""Stage 7: the top-k real sentences of every kept image, in one global pass over the sentence bank.

Reads every shard's kept images (image_embeddings + image_dedup decisions) and the cluster-ordered
bank of sentence_clusters (``bank/part-*.npy|.parquet``, ``clusters.parquet``), runs
``realsyn.retrieval.cluster_ordered_search`` (each image assigned once to its probed clusters, the
bank streamed once in cluster order, one product per cluster) and writes one generation holding
``shards/{shard}.parquet`` (RETRIEVAL_SCHEMA, rows in the shard's kept-image order) for every shard.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from realsyn import layout
from realsyn.progress import track
from realsyn.stages.common import dedup_kept_mask, kept_image_embeddings, kept_image_ids, require_partitions
from realsyn.stats import StepStats
from realsyn.storage import Storage


class SentenceBank:
    """The cluster-ordered sentence bank of sentence_clusters: centroids, layout, parts on demand."""

    def __init__(self, storage: Storage):
        from realsyn.retrieval import BankLayout

        self.reader = storage.reader(layout.SENTENCE_CLUSTERS)
        self.centroids = np.asarray(self.reader.read_numpy(layout.CENTROIDS_FILE), dtype=np.float32)
        table = self.reader.read_parquet(layout.CLUSTER_LAYOUT_FILE, columns=["cluster", "part", "start", "end"])
        cluster = table.column("cluster").to_numpy()
        if len(cluster) != len(self.centroids) or not np.array_equal(np.sort(cluster), np.arange(len(self.centroids))):
            raise ValueError(f"{layout.CLUSTER_LAYOUT_FILE} does not list each of the {len(self.centroids)} clusters once")
        order = np.argsort(cluster)
        self.layout = BankLayout(*(table.column(c).to_numpy()[order] for c in ("part", "start", "end")))
        self.parts_read = 0

    def load_part(self, part: int) -> np.ndarray:
        self.parts_read += 1
        return self.reader.read_numpy(layout.bank_part_file(part, "npy"))  # the search takes float32 or float16 as stored

    def texts_of_part(self, part: int, local_rows: np.ndarray) -> tuple[pa.Array, pa.Array]:
        """(sentence_id, text) of rows ``local_rows`` (any order, repeats allowed) of one bank part."""
        tab = self.reader.read_parquet(layout.bank_part_file(part, "parquet"), columns=["sentence_id", "text"])
        tab = tab.take(pa.array(local_rows))
        return tab.column("sentence_id").combine_chunks(), tab.column("text").combine_chunks()


class RetrievedTextSpill:
    """The retrieved (sentence_id, text) of every result slot, regrouped from bank order to shard order.

    Each bank part's texts are read once; the slots it answers go to a local Arrow IPC file with one
    record batch per shard, so writing a shard reads only its own batches. Memory: one part's texts
    and one shard's slots, never the texts of the whole result.
    """

    SCHEMA = pa.schema([("slot", pa.int64()), ("sentence_id", pa.string()), ("text", pa.string())])

    def __init__(self, bank: SentenceBank, row_ids: np.ndarray, shard_bounds: np.ndarray):
        import tempfile

        self.dir = tempfile.TemporaryDirectory(prefix="realsyn-retrieved-texts-")
        self.n_shards = len(shard_bounds) - 1
        k = row_ids.shape[1]
        flat = row_ids.ravel()
        slots = np.flatnonzero(flat >= 0)  # slot = image * k + rank
        rows = flat[slots]
        part_of = np.searchsorted(bank.layout.part_base, rows, side="right") - 1
        order = np.argsort(part_of, kind="stable")  # slots stay ascending within a part
        part_cuts = np.searchsorted(part_of[order], np.arange(bank.layout.n_parts + 1))
        self.parts: list[str] = []
        for p in range(bank.layout.n_parts):
            sel = order[part_cuts[p] : part_cuts[p + 1]]
            if not len(sel):
                continue
            part_slots = slots[sel]
            unique, inverse = np.unique(rows[sel] - bank.layout.part_base[p], return_inverse=True)
            ids, texts = bank.texts_of_part(p, unique)
            take = pa.array(inverse)
            table = pa.table([pa.array(part_slots), ids.take(take), texts.take(take)], schema=self.SCHEMA)
            shard_cuts = np.searchsorted(part_slots, shard_bounds * k)
            path = f"{self.dir.name}/part-{p}.arrow"
            with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, self.SCHEMA) as writer:
                for i in range(self.n_shards):
                    a, b = int(shard_cuts[i]), int(shard_cuts[i + 1])
                    writer.write_batch(table.slice(a, b - a).combine_chunks().to_batches(max_chunksize=None)[0] if b > a else self._empty())
            self.parts.append(path)
            del table, ids, texts

    def _empty(self) -> pa.RecordBatch:
        return pa.RecordBatch.from_pylist([], schema=self.SCHEMA)

    def shard(self, i: int) -> pa.Table:
        """Shard ``i``'s slots (ascending: image then rank) with their sentence_id and text."""
        batches = []
        for path in self.parts:
            with pa.OSFile(path, "rb") as source:
                batch = pa.ipc.open_file(source).get_batch(i)
                if batch.num_rows:
                    batches.append(batch)
        table = pa.Table.from_batches(batches, schema=self.SCHEMA)
        return table.take(pa.array(np.argsort(table.column("slot").to_numpy(), kind="stable")))

    def close(self) -> None:
        self.dir.cleanup()


def _lists(offsets: np.ndarray, values: pa.Array, value_type: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values.cast(value_type))


def retrieve_all(
    storage: Storage,
    shards: Sequence[str],
    *,
    k: int = 3,
    n_probe: int = 1,
    threads: int = 0,
    max_image_gb: float | None = None,
) -> StepStats:
    """Top-k real sentences, best first, for the kept images of every shard, in one pass over the bank.

    ``threads``: 0 = every core. ``max_image_gb``: None holds every kept image embedding in memory
    once; a number bounds the gathered image embeddings per round of bank parts (images are read
    twice: to assign them, then to spill each round's vectors to local disk). The retrieved texts are
    regrouped per shard through a local spill (``RetrievedTextSpill``), so the texts of all images are
    never held. The result does not depend on the order of ``shards``.
    """
    from realsyn.clustering import CentroidIndex
    from realsyn.retrieval import cluster_ordered_search

    stats = StepStats(layout.RETRIEVALS)
    with stats.timed():
        shards = require_partitions(storage, layout.IMAGE_EMBEDDINGS, sorted(shards))
        counts = [int(dedup_kept_mask(storage, layout.IMAGE_DEDUP, s).sum()) for s in shards]
        bank = SentenceBank(storage)

        def image_batches() -> Iterator[np.ndarray]:
            for shard, n in track(
                list(zip(shards, counts)), f"{layout.RETRIEVALS}: kept images", total=sum(counts), unit="images", size=lambda sn: sn[1]
            ):
                if n:
                    yield kept_image_embeddings(storage, shard)[1]

        max_bytes = None if max_image_gb is None else int(max_image_gb * 2**30)
        result = cluster_ordered_search(
            image_batches,
            CentroidIndex.load(bank.reader, bank.centroids),  # through the tree of sentence_clusters, as the bank was assigned
            bank.layout,
            bank.load_part,
            n_probe=n_probe,
            k=k,
            threads=threads,
            max_image_bytes=max_bytes,
        )
        row_ids, scores = result.row_ids, result.scores
        if len(row_ids) != sum(counts):
            raise RuntimeError(f"retrievals: {len(row_ids)} results for {sum(counts)} kept images")
        valid = row_ids >= 0
        bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        spill = RetrievedTextSpill(bank, row_ids, bounds)
        try:
            with storage.writer(layout.RETRIEVALS) as w:
                for i, shard in enumerate(shards):
                    a, b = int(bounds[i]), int(bounds[i + 1])
                    ok = valid[a:b]
                    offsets = np.concatenate([[0], np.cumsum(ok.sum(axis=1))])
                    found = spill.shard(i)
                    if len(found) != int(ok.sum()):
                        raise RuntimeError(f"retrievals: shard {shard} has {len(found)} retrieved texts for {int(ok.sum())} results")
                    table = pa.table(
                        {
                            "image_id": pa.array(kept_image_ids(storage, shard) if b > a else [], pa.string()),
                            "sentence_ids": _lists(offsets, found.column("sentence_id").combine_chunks(), pa.string()),
                            "texts": _lists(offsets, found.column("text").combine_chunks(), pa.string()),
                            "scores": _lists(offsets, pa.array(scores[a:b][ok]), pa.float32()),
                        },
                        schema=layout.RETRIEVAL_SCHEMA,
                    )
                    w.write_parquet(layout.retrievals_file(shard), table)
                    del found, table
                stats.add("shards", len(shards))
                stats.add("images", len(row_ids))
                stats.add("texts_retrieved", int(valid.sum()))
                stats.add("images_with_fewer_than_k", int((valid.sum(axis=1) < k).sum()) if len(row_ids) else 0)
                stats.add("bank_parts_read", bank.parts_read)
                stats.add("image_rounds", result.stats["rounds"])
                stats.add("probed_pairs", result.stats["pairs"])
                stats.add("distances", result.stats["distances"])
                summary = {key: v for key, v in stats.as_dict().items() if key != "seconds"}  # still timing here
                w.write_json(layout.SUMMARY_FILE, {**summary, "pass_seconds": {n: round(v, 3) for n, v in result.seconds.items()}})
        finally:
            spill.close()
    return stats
