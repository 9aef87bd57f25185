"""Stages 6 and 10: sentence K-means with a cluster-ordered sentence bank; image K-means of the kept pairs.

Memory is bounded independently of the corpus size: K-means trains on a preallocated reservoir of
at most ``sample_rows`` rows (``realsyn.clustering``), every shard is assigned on its own through
one ``CentroidIndex``, and the bank is laid out by an external sort (``SentenceBankBuilder``): one
pass over the shards writes each shard's kept sentences sorted by cluster as a spill run, then a
merge in cluster order writes bank parts of at most ``bank_part_rows`` rows. So the peak is the
sample (while training), or one shard plus one bank part, plus the centroids and O(k) counters.

Outputs (``sentence_clusters/_global``): ``centroids.npy``, with the tree of a two-level training
(``coarse_centroids.npy``, ``centroid_cells.npy``: ``realsyn.clustering.CentroidTree``) through which
every row is assigned and retrieval probes; ``assignments/{shard}.parquet``
(sentence_id, cluster, score, in the shard's row order); ``bank/part-{p:05d}.npy`` and
``.parquet`` (sentence_id, text, cluster), rows ordered by cluster, then shard (in the order
given), then row; ``clusters.parquet`` (cluster, part, start, end: rows start..end of that part);
``summary.json``. Retrieval loads one part at a time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from realsyn import layout
from realsyn.bank_encoding import BANK_DTYPES, encode_bank
from realsyn.io import is_local, join_path
from realsyn.progress import track
from realsyn.stages.common import dedup_kept_mask, require_partitions
from realsyn.stats import StepStats
from realsyn.storage import PartitionWriter, Storage

if TYPE_CHECKING:
    from realsyn.clustering import CentroidTree

RUNS_DIR = "runs"  # spill runs inside the writer's generation, never in its manifest, removed before commit
RUN_ROW_GROUP = 8192  # rows per Parquet row group of a run: a merge step reads whole row groups
IMAGE_BLOCK_ROWS = 16_384  # image embedding rows read per step while image_clusters fills its sample


# ----------------------------------------------------------------------------- spill files
def _spill_path(writer: PartitionWriter, name: str) -> str:
    """A path inside the writer's generation folder that is not recorded in its manifest."""
    return join_path(writer.fs, writer.gen_dir, RUNS_DIR, name)


def _spill_open(writer: PartitionWriter, name: str, mode: str = "rb"):
    path = _spill_path(writer, name)
    if "w" in mode and is_local(writer.fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return writer.fs.open(path, mode)


def _read_npy_rows(f, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a 2-D C-order .npy file opened for reading; reads only those bytes."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran, dtype = read_header(f)
    if fortran or len(shape) != 2:
        raise ValueError(f"expected a 2-D C-order array, got shape {shape}, fortran={fortran}")
    row_bytes = int(shape[1]) * dtype.itemsize
    f.seek(f.tell() + start * row_bytes)
    data = f.read((stop - start) * row_bytes)
    return np.frombuffer(data, dtype=dtype).reshape(stop - start, int(shape[1]))


def _read_parquet_rows(f, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    pf = pq.ParquetFile(f)
    counts = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    first = int(np.searchsorted(bounds, start, side="right")) - 1
    last = int(np.searchsorted(bounds, stop, side="left"))
    table = pf.read_row_groups(list(range(first, last)), columns=columns)
    # a slice would keep the whole row groups alive; take() copies just the rows (a merge holds one slice per run)
    return table.take(pa.array(np.arange(start - int(bounds[first]), stop - int(bounds[first]), dtype=np.int64)))


# ----------------------------------------------------------------------------- the bank
class SentenceBankBuilder:
    """External sort of the sentence bank into cluster-ordered parts, in one pass over the shards.

    ``add_shard`` assigns a shard's kept sentences through ``index`` (nearest centroid), writes
    ``assignments/{shard}.parquet`` and a spill run (``runs/{i}.npy`` + ``.parquet``) sorted by
    cluster (stable, so rows of a cluster keep their shard order). ``finish`` cuts parts of at most
    ``part_rows`` rows (``bank_part_bounds``) and merges the runs part by part: each run's rows of
    a part are one contiguous slice (runs are sorted), read by byte range (``.npy``) or row group
    (``.parquet``, ``run_row_group`` rows each) and scattered straight to their place in the part,
    so a merge step holds one part (vectors and texts) plus one run's slice. Besides, ``finish``
    keeps a (runs x parts) table of slice offsets and O(k) counters. The runs are deleted before
    the caller commits (and were never in the manifest).
    """

    def __init__(self, writer: PartitionWriter, index, part_rows: int, *, run_row_group: int = RUN_ROW_GROUP, bank_dtype: str = "float32"):
        if part_rows <= 0:
            raise ValueError(f"bank_part_rows must be positive, got {part_rows}")
        if bank_dtype not in BANK_DTYPES:
            raise ValueError(f"bank_dtype must be one of {BANK_DTYPES}, got {bank_dtype!r}")
        self.bank_dtype = bank_dtype
        self.w, self.index, self.part_rows, self.run_row_group = writer, index, int(part_rows), int(run_row_group)
        self.k, self.dim = index.k, index.dim
        self.sizes = np.zeros(self.k, np.int64)
        self.runs: list[tuple[str, int]] = []  # (run name, rows) in shard order
        self.n_parts = 0

    def add_shard(self, shard: str, emb: np.ndarray, texts: pa.Table) -> None:
        """One shard's kept embeddings (n, D) and their (sentence_id, text) rows."""
        if len(emb) != texts.num_rows:
            raise ValueError(f"shard {shard}: {len(emb)} embeddings but {texts.num_rows} sentences")
        ids, scores = self.index.search(emb, 1)
        cl = ids[:, 0]
        if len(cl) and cl.min() < 0:
            raise ValueError(f"shard {shard}: {int((cl < 0).sum())} sentences got no cluster (non-finite embeddings?)")
        self.sizes += np.bincount(cl, minlength=self.k)
        cl32 = cl.astype(np.int32)
        self.w.write_parquet(
            layout.assignments_file(shard),
            pa.table({"sentence_id": texts.column("sentence_id"), "cluster": pa.array(cl32), "score": pa.array(scores[:, 0])}),
        )
        if not len(cl):
            return
        order = np.argsort(cl32, kind="stable")
        name = f"{len(self.runs)}"
        with _spill_open(self.w, f"{name}.npy", "wb") as f:
            np.save(f, np.ascontiguousarray(emb[order], dtype=np.float32), allow_pickle=False)
        run = texts.select(["sentence_id", "text"]).take(pa.array(order)).append_column("cluster", pa.array(cl32[order]))
        with _spill_open(self.w, f"{name}.parquet", "wb") as f:
            pq.write_table(run, f, row_group_size=self.run_row_group, compression="zstd")
        self.runs.append((name, len(cl)))

    def _run_offsets(self, bounds: np.ndarray) -> np.ndarray:
        """(runs, parts + 1): where each part's clusters start in each run (one read of each run's cluster column)."""
        out = np.zeros((len(self.runs), len(bounds)), np.int64)
        for i, (name, _) in enumerate(self.runs):
            with _spill_open(self.w, f"{name}.parquet") as f:
                cl = pq.read_table(f, columns=["cluster"]).column("cluster").to_numpy()
            out[i] = np.searchsorted(cl, bounds, side="left")
        return out

    def finish(self) -> int:
        """Merge the runs into ``bank/part-*.npy|.parquet`` and ``clusters.parquet``; returns the number of parts."""
        from realsyn.clustering import bank_part_bounds

        bounds = bank_part_bounds(self.sizes, self.part_rows)
        offsets = self._run_offsets(bounds)
        cum = np.zeros(self.k + 1, np.int64)
        np.cumsum(self.sizes, out=cum[1:])
        for p in range(len(bounds) - 1):
            lo, hi = int(bounds[p]), int(bounds[p + 1])
            rows = int(cum[hi] - cum[lo])
            out = np.empty((rows, self.dim), np.float16 if self.bank_dtype == "float16" else np.float32)
            cursor = cum[lo:hi] - cum[lo]  # next free row of each cluster of the part
            tables, dests = [], []
            for i, (name, _) in enumerate(self.runs):
                a, b = int(offsets[i, p]), int(offsets[i, p + 1])
                if a == b:
                    continue
                with _spill_open(self.w, f"{name}.parquet") as f:
                    tab = _read_parquet_rows(f, a, b, ["sentence_id", "text", "cluster"])
                c = tab.column("cluster").to_numpy().astype(np.int64) - lo  # sorted within the slice
                rank = np.arange(len(c), dtype=np.int64) - np.searchsorted(c, c, side="left")
                dest = cursor[c] + rank
                cursor += np.bincount(c, minlength=hi - lo)
                with _spill_open(self.w, f"{name}.npy") as f:
                    out[dest] = encode_bank(_read_npy_rows(f, a, b), self.bank_dtype)  # float16: rounded (and checked) per slice
                tables.append(tab)
                dests.append(dest)
            inverse = np.empty(rows, np.int64)
            inverse[np.concatenate(dests) if dests else np.zeros(0, np.int64)] = np.arange(rows, dtype=np.int64)
            part = pa.concat_tables(tables).take(pa.array(inverse)) if tables else _empty_bank_table()
            self.w.write_numpy(layout.bank_part_file(p, "npy"), out)
            self.w.write_parquet(layout.bank_part_file(p, "parquet"), part)
            del out, tables, part
        n_parts = len(bounds) - 1
        part_of = np.repeat(np.arange(n_parts, dtype=np.int64), np.diff(bounds))
        start = cum[:-1] - cum[bounds[part_of]]
        self.w.write_parquet(
            layout.CLUSTER_LAYOUT_FILE,
            pa.table({"cluster": np.arange(self.k, dtype=np.int64), "part": part_of, "start": start, "end": start + self.sizes}),
        )
        self.remove_runs()
        self.n_parts = n_parts
        return n_parts

    def remove_runs(self) -> None:
        path = join_path(self.w.fs, self.w.gen_dir, RUNS_DIR)
        if self.w.fs.exists(path):
            self.w.fs.rm(path, recursive=True)


def _empty_bank_table() -> pa.Table:
    return pa.table({"sentence_id": pa.array([], pa.string()), "text": pa.array([], pa.string()), "cluster": pa.array([], pa.int32())})


# ----------------------------------------------------------------------------- training
def train_on_sample(
    batches,
    n_rows: int,
    k: int,
    dim: int,
    *,
    sample_rows: int,
    max_points_per_centroid: int,
    two_level_above: int,
    niter: int,
    seed: int,
) -> tuple[np.ndarray, CentroidTree | None, dict[str, int]]:
    """Centroids trained on a reservoir sample of the embedding ``batches`` (an iterable of (n, D) arrays, e.g. one per shard).

    The reservoir holds ``sample_capacity(n_rows, k, sample_rows, max_points_per_centroid)`` rows,
    preallocated, and is normalised in place; no copy of the sample is made. Returns (centroids,
    their ``CentroidTree`` (None: flat training), facts for the summary: sample rows, coarse cells (0 = flat training)).
    """
    from realsyn.clustering import ReservoirSample, fit_centroids, normalize_rows_inplace, sample_capacity

    sample = ReservoirSample(sample_capacity(n_rows, k, sample_rows, max_points_per_centroid), dim, seed=seed)
    for batch in batches:
        sample.add(batch)
    if len(sample) == 0:
        raise ValueError("no finite embedding to train K-means on")
    rows = normalize_rows_inplace(sample.array())
    centroids, tree = fit_centroids(
        rows, k, two_level_above=two_level_above, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid, normalized=True
    )
    n_coarse = 0 if tree is None else len(tree.coarse)
    facts = {"training_rows": len(sample), "coarse_clusters": n_coarse, "skipped_nonfinite": sample.skipped_nonfinite}
    return centroids, tree, facts


# ----------------------------------------------------------------------------- sentences
def _kept_embeddings(storage: Storage, shard: str, mask: np.ndarray | None = None) -> np.ndarray:
    if mask is None:
        mask = dedup_kept_mask(storage, layout.SENTENCE_DEDUP, shard)
    return np.asarray(storage.reader(layout.SENTENCE_EMBEDDINGS, shard).read_numpy(layout.EMBEDDINGS_FILE))[mask].astype(
        np.float32, copy=False
    )


def _kept_sentences(storage: Storage, shard: str) -> tuple[np.ndarray, pa.Table]:
    """Embeddings and (sentence_id, text) of one shard's sentences that survived dedup."""
    mask = dedup_kept_mask(storage, layout.SENTENCE_DEDUP, shard)
    texts = (
        storage.reader(layout.FILTERED_SENTENCES, shard)
        .read_parquet(layout.SENTENCES_FILE, columns=["sentence_id", "text"])
        .filter(pa.array(mask))
    )
    return _kept_embeddings(storage, shard, mask), texts


def _n_clusters(n: int, n_clusters: int | None, per_cluster: int) -> int:
    return max(1, min(n, n_clusters or round(n / per_cluster)))


def cluster_sentences(
    storage: Storage,
    shards: Sequence[str],
    *,
    n_clusters: int | None = None,
    sentences_per_cluster: int = 420,
    sample_rows: int = 4_000_000,
    max_points_per_centroid: int = 256,
    two_level_above: int = 1024,
    niter: int = 20,
    seed: int = 0,
    bank_part_rows: int = 1_000_000,
    bank_dtype: str = "float32",
) -> StepStats:
    """K-means on a bounded sample, assignment of every kept sentence, and the cluster-ordered bank (external sort)."""
    from realsyn.clustering import CentroidIndex

    stats = StepStats(layout.SENTENCE_CLUSTERS)
    with stats.timed():
        shards = require_partitions(storage, layout.SENTENCE_EMBEDDINGS, shards)
        n_kept = sum(int(dedup_kept_mask(storage, layout.SENTENCE_DEDUP, s).sum()) for s in shards)
        if n_kept == 0:
            raise ValueError("sentence_clusters: no sentence survived filtering and dedup; nothing to cluster")
        # paper: 840M sentences into 2M clusters, i.e. ~420 sentences per cluster
        k = _n_clusters(n_kept, n_clusters, sentences_per_cluster)
        dim = int(storage.reader(layout.SENTENCE_EMBEDDINGS, shards[0]).read_json(layout.MODEL_FILE)["dim"])
        centroids, tree, facts = train_on_sample(
            (_kept_embeddings(storage, s) for s in track(shards, f"{layout.SENTENCE_CLUSTERS}: sample read", unit="shards")),
            n_kept,
            k,
            dim,
            sample_rows=sample_rows,
            max_points_per_centroid=max_points_per_centroid,
            two_level_above=two_level_above,
            niter=niter,
            seed=seed,
        )
        index = CentroidIndex(centroids, tree=tree)
        with storage.writer(layout.SENTENCE_CLUSTERS) as w:
            w.write_numpy(layout.CENTROIDS_FILE, centroids)
            if tree is not None:
                tree.save(w)  # retrieval probes through the same tree (CentroidIndex.load)
            del centroids  # the index holds its own copy (k x D floats)
            bank = SentenceBankBuilder(w, index, bank_part_rows, bank_dtype=bank_dtype)
            try:
                for s in track(shards, f"{layout.SENTENCE_CLUSTERS}: bank laid out", unit="shards"):
                    bank.add_shard(s, *_kept_sentences(storage, s))
                n_parts = bank.finish()
            finally:
                bank.remove_runs()
            stats.add("sentences", n_kept)
            stats.add("clusters", index.k)
            stats.add("bank_parts", n_parts)
            stats.add("largest_cluster", int(bank.sizes.max()))
            stats.add("empty_clusters", int((bank.sizes == 0).sum()))
            for key, value in facts.items():
                stats.add(key, value)
            w.write_json(layout.SUMMARY_FILE, stats.as_dict())
    return stats


# ----------------------------------------------------------------------------- images
def _kept_pair_ids(storage: Storage, shard: str) -> pa.Array:
    """Image ids whose pair passed the similarity band, as one Arrow string array (no Python objects)."""
    d = storage.reader(layout.FILTERED_PAIRS, shard).read_parquet(layout.DECISIONS_FILE, columns=["id", "kept"])
    return d.column("id").filter(d.column("kept")).combine_chunks()


def _n_kept_pairs(storage: Storage, shard: str) -> int:
    d = storage.reader(layout.FILTERED_PAIRS, shard).read_parquet(layout.DECISIONS_FILE, columns=["kept"])
    return int(pc.sum(d.column("kept")).as_py() or 0)


def _kept_image_rows(storage: Storage, shard: str, image_ids: pa.Array) -> tuple[np.ndarray, int]:
    """(rows of ``image_ids`` in the shard's image embeddings, found by Arrow ``index_in``, int64; rows of that file)."""
    reader = storage.reader(layout.IMAGE_EMBEDDINGS, shard)
    all_ids = reader.read_parquet(layout.EMBEDDING_INDEX_FILE, columns=["image_id"]).column("image_id")
    pos = pc.index_in(image_ids, value_set=all_ids)
    if pos.null_count:
        missing = image_ids.filter(pc.is_null(pos))[0].as_py()
        raise KeyError(f"image_clusters: {pos.null_count} kept images of shard {shard} have no embedding (e.g. {missing!r})")
    return pos.to_numpy(zero_copy_only=False).astype(np.int64, copy=False), len(all_ids)


def _embeddings_of(storage: Storage, shard: str, image_ids: pa.Array) -> np.ndarray:
    """Embeddings (n, D) float32 of ``image_ids``, in that order."""
    rows, _ = _kept_image_rows(storage, shard, image_ids)
    return np.asarray(storage.reader(layout.IMAGE_EMBEDDINGS, shard).read_numpy(layout.EMBEDDINGS_FILE))[rows].astype(
        np.float32, copy=False
    )


def _kept_image_blocks(storage: Storage, shard: str, block_rows: int = IMAGE_BLOCK_ROWS):
    """The kept pairs' image embeddings of one shard in file order, ``block_rows`` file rows read at a time (byte ranges, no memory map)."""
    rows, n_file = _kept_image_rows(storage, shard, _kept_pair_ids(storage, shard))
    kept = np.zeros(n_file, bool)
    kept[rows] = True
    with storage.reader(layout.IMAGE_EMBEDDINGS, shard).open(layout.EMBEDDINGS_FILE) as f:
        for start in range(0, n_file, block_rows):
            stop = min(start + block_rows, n_file)
            if kept[start:stop].any():
                f.seek(0)
                yield _read_npy_rows(f, start, stop)[kept[start:stop]].astype(np.float32, copy=False)


def cluster_images(
    storage: Storage,
    shards: Sequence[str],
    *,
    n_clusters: int | None = None,
    images_per_cluster: int = 168,
    sample_rows: int = 4_000_000,
    max_points_per_centroid: int = 256,
    two_level_above: int = 1024,
    niter: int = 20,
    seed: int = 0,
) -> StepStats:
    """K-means of the kept pairs' image embeddings (paper: 168M images into 1M centres), same bounded sample as the sentences.

    Writes ``centroids.npy`` (with ``coarse_centroids.npy`` and ``centroid_cells.npy`` when trained two-level:
    every image is assigned through that tree), ``assignments/{shard}.parquet`` (image_id, cluster, in the
    order of the shard's filtered_pairs decisions) and ``counts.npy``. The sample is filled from the
    embedding files ``IMAGE_BLOCK_ROWS`` rows at a time; ids stay Arrow arrays (no per-row Python objects).
    """
    from realsyn.clustering import CentroidIndex

    stats = StepStats(layout.IMAGE_CLUSTERS)
    with stats.timed():
        shards = require_partitions(storage, layout.FILTERED_PAIRS, shards)
        n = sum(_n_kept_pairs(storage, s) for s in shards)
        if n == 0:
            raise ValueError("image_clusters: no image-text pair survived the similarity filter")
        k = _n_clusters(n, n_clusters, images_per_cluster)
        dim = int(storage.reader(layout.IMAGE_EMBEDDINGS, shards[0]).read_json(layout.MODEL_FILE)["dim"])
        centroids, tree, facts = train_on_sample(
            (
                block
                for s in track(shards, f"{layout.IMAGE_CLUSTERS}: sample read", unit="shards")
                for block in _kept_image_blocks(storage, s)
            ),
            n,
            k,
            dim,
            sample_rows=sample_rows,
            max_points_per_centroid=max_points_per_centroid,
            two_level_above=two_level_above,
            niter=niter,
            seed=seed,
        )
        index = CentroidIndex(centroids, tree=tree)
        counts = np.zeros(index.k, np.int64)
        with storage.writer(layout.IMAGE_CLUSTERS) as w:
            w.write_numpy(layout.CENTROIDS_FILE, centroids)
            if tree is not None:
                tree.save(w)
            del centroids  # the index holds its own copy (k x D floats)
            for s in track(shards, f"{layout.IMAGE_CLUSTERS}: assigned", unit="shards"):
                image_ids = _kept_pair_ids(storage, s)
                cluster = index.search(_embeddings_of(storage, s, image_ids), 1)[0][:, 0].astype(np.int32)
                counts += np.bincount(cluster, minlength=index.k)
                w.write_parquet(
                    layout.assignments_file(s), pa.table({"image_id": image_ids.cast(pa.string()), "cluster": pa.array(cluster)})
                )
                del image_ids, cluster
            w.write_numpy(layout.CLUSTER_COUNTS_FILE, counts)
            stats.add("images", n)
            stats.add("clusters", index.k)
            stats.add("largest_cluster", int(counts.max()))
            for key, value in facts.items():
                stats.add(key, value)
            w.write_json(layout.SUMMARY_FILE, stats.as_dict())
    return stats
