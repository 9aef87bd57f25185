"""Stage 11b: every split as WebDataset tar shards (+ sizes.json, as open_clip reads them) and Parquet.

Two steps. ``export_shard`` (per input shard) reads the shard's filtered images once and writes
every split's samples of that shard: ``{split}/{split}-{shard}-NNNNNN.tar``, ``{split}/sizes.json``
and ``{split}/parquet.parquet``. ``publish_splits`` (global) then makes one folder per split that a
trainer points at: it copies the committed per-shard tars (a server-side copy on S3, no decode)
into ``{split}/`` of its own generation with the split's merged ``sizes.json`` (open_clip's
``get_dataset_size`` reads it beside the shards), ``train_data.txt`` (the tar URIs joined by
``::``, a ready ``--train-data`` value) and the Parquet tables as ``{split}/parquet/{shard}.parquet``.
Copies, not references: rematerializing one shard's export replaces that shard's generation, while
a published split stays whole until the next publish.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq

from realsyn import layout
from realsyn.io import is_local
from realsyn.stages.common import read_retrievals, require_partitions
from realsyn.stats import StepStats
from realsyn.storage import PartitionReader, PartitionWriter, Storage

IMAGE_COLUMNS = ["image_id", "image_bytes", "format", "width", "height", "doc_id", "source"]
IMAGE_BATCH_ROWS = 256  # image rows in memory at once (~9 MB of 35 KB images)
# per-split counters a shard's export reports and the publish step adds up
SHARD_COUNTS = ("samples_in", "samples_written", "reencoded_jpeg")


def _read_parquet(reader: PartitionReader, name: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file of a partition; memory-mapped on a local root (no Python file layer in between)."""
    if is_local(reader.fs):
        return pq.read_table(reader.path(name), columns=columns, memory_map=True)
    return reader.read_parquet(name, columns=columns)


@contextmanager
def _parquet_file(reader: PartitionReader, name: str) -> Iterator[pq.ParquetFile]:
    """A Parquet file of a partition to read column by column or in batches; memory-mapped on a local root."""
    if is_local(reader.fs):
        f = pq.ParquetFile(reader.path(name), memory_map=True)
        try:
            yield f
        finally:
            f.close()
    else:
        with reader.open(name) as raw:
            yield pq.ParquetFile(raw)


def _output(w: PartitionWriter, name: str, *, gather: bool = False):
    """A new file in the writer's generation. On a local root no Python file layer: a native Arrow file,
    or (``gather``) a file written with ``os.writev`` for tars assembled from many buffers."""
    if is_local(w.fs):
        from realsyn.export import GatherFile

        path = w.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return GatherFile(path) if gather else pa.OSFile(path, "wb")
    return w.open(name, "wb")


class StaleExportError(RuntimeError):
    """A shard's export was written from another sampled_splits generation than the current one."""


def export_shard(storage: Storage, shard: str, *, samples_per_shard: int = 1000) -> dict[str, StepStats]:
    """Every split's samples of ``shard``, in one pass over the shard's images: tars, sizes.json, Parquet."""
    from realsyn.export import ShardSamples, SplitOutput

    splits_reader = storage.reader(layout.SAMPLED_SPLITS)
    covered = splits_reader.info.get("shards")
    if covered is not None and shard not in covered:
        raise ValueError(f"sampled_splits does not cover shard {shard!r}: rematerialize sampled_splits first")
    split_names = sorted(splits_reader.read_json(layout.SUMMARY_FILE))
    selections = {
        split: splits_reader.read_parquet(layout.split_selection_file(split, shard), columns=["image_id"]).column("image_id")
        for split in split_names
    }
    out = {split: StepStats(f"{layout.EXPORTED_SHARDS}:{split}") for split in split_names}
    sizes: dict[str, dict[str, int]] = {}
    with storage.writer(layout.EXPORTED_SHARDS, shard) as w:
        if any(len(ids) for ids in selections.values()):
            t0 = time.perf_counter()
            with _parquet_file(storage.reader(layout.FILTERED_IMAGES, shard), layout.IMAGES_FILE) as images:
                retr = read_retrievals(storage, shard)
                caps = _read_parquet(
                    storage.reader(layout.SYNTHETIC_CAPTIONS, shard), layout.CAPTIONS_FILE, ["image_id", "synthetic_caption"]
                )
                samples = ShardSamples(shard, images.read(columns=["image_id"]).column("image_id"), retr, caps, selections)
                outputs = {
                    split: SplitOutput(
                        lambda name, split=split: _output(w, f"{split}/{name}", gather=True),
                        lambda index, split=split: layout.export_tar_name(split, shard, index),
                        lambda split=split: _output(w, layout.export_shard_parquet_file(split)),
                        samples_per_shard,
                        out[split],
                    )
                    for split in split_names
                    if samples.selected(split)
                }
                # streamed in batches of image rows when every split keeps image order (the samplers do),
                # so the images in memory are one batch, not the shard
                batches = (
                    images.iter_batches(batch_size=IMAGE_BATCH_ROWS, columns=IMAGE_COLUMNS)
                    if samples.ordered
                    else [images.read(columns=IMAGE_COLUMNS)]
                )
                sizes = samples.write(batches, outputs)
            # one pass writes every split: its time is shared out by the samples each split chose
            chosen = sum(samples.selected(split) for split in split_names)
            for split in split_names:
                out[split].seconds += (time.perf_counter() - t0) * samples.selected(split) / chosen
        for split in split_names:
            split_sizes = sizes.get(split, {})
            w.write_json(layout.export_sizes_file(split), split_sizes)
            out[split].add("rows_out", sum(split_sizes.values()))
            out[split].add("tar_shards", len(split_sizes))
        w.write_json(layout.SUMMARY_FILE, {split: st.as_dict() for split, st in out.items()})
        w.commit(info={"sampled_splits_generation": splits_reader.generation})
    return out


def _copy_files(w: PartitionWriter, pairs: Sequence[tuple[PartitionReader, str, str]]) -> None:
    """Copy (reader, name, name in w) files into w's generation: one batched call (concurrent server-side copies on S3)."""
    if not pairs:
        return
    sources = [reader.path(name) for reader, name, _ in pairs]
    targets = [w.path(dest) for _, _, dest in pairs]
    if is_local(w.fs):
        for d in sorted({os.path.dirname(t) for t in targets}):
            os.makedirs(d, exist_ok=True)
    w.fs.copy(sources, targets)


def publish_splits(storage: Storage, shards: Sequence[str]) -> dict[str, StepStats]:
    """One folder per split from the per-shard exports: copied tars + merged sizes.json, train_data.txt, Parquet."""
    shards = require_partitions(storage, layout.EXPORTED_SHARDS, shards)
    splits_reader = storage.reader(layout.SAMPLED_SPLITS)
    split_names = sorted(splits_reader.read_json(layout.SUMMARY_FILE))
    readers = {s: storage.reader(layout.EXPORTED_SHARDS, s) for s in shards}
    stale = [s for s, r in readers.items() if r.info.get("sampled_splits_generation") != splits_reader.generation]
    if stale:
        head = ", ".join(stale[:5]) + (" ..." if len(stale) > 5 else "")
        raise StaleExportError(
            f"{layout.EXPORTED_SHARDS}: {len(stale)} of {len(shards)} shards were exported from an older sampled_splits: {head}; "
            f"rematerialize {layout.EXPORTED_SHARDS} for them"
        )
    shard_summaries = {s: r.read_json(layout.SUMMARY_FILE) for s, r in readers.items()}
    out: dict[str, StepStats] = {}
    with storage.writer(layout.EXPORTED_SPLITS) as w:
        for split in split_names:
            stats = StepStats(f"{layout.EXPORTED_SPLITS}:{split}")
            with stats.timed():
                sizes: dict[str, int] = {}
                copies: list[tuple[PartitionReader, str, str]] = []
                for s in shards:
                    reader = readers[s]
                    shard_sizes = reader.read_json(layout.export_sizes_file(split))
                    for name, n in shard_sizes.items():
                        copies.append((reader, f"{split}/{name}", f"{split}/{name}"))
                        sizes[name] = int(n)
                    stats.add("source_shards", int(bool(shard_sizes)))
                    if reader.has(layout.export_shard_parquet_file(split)):
                        copies.append((reader, layout.export_shard_parquet_file(split), layout.export_parquet_file(split, s)))
                    counts = shard_summaries[s].get(split, {})
                    for key, value in counts.items():
                        if key in SHARD_COUNTS or key.startswith("dropped_"):
                            stats.add(key, int(value))
                _copy_files(w, copies)
                w.write_json(layout.export_sizes_file(split), sizes)  # open_clip reads the sample counts from here
                urls = [w.uri(f"{split}/{name}") for name in sorted(sizes)]
                w.write_bytes(f"{split}/{layout.TRAIN_DATA_FILE}", "::".join(urls).encode())
                stats.add("rows_out", sum(sizes.values()))
                stats.add("tar_shards", len(sizes))
            out[split] = stats
        w.write_json(layout.SUMMARY_FILE, {k: v.as_dict() for k, v in out.items()})
        w.commit(info={"shards": list(shards), "sampled_splits_generation": splits_reader.generation})
    return out


def export_splits_single_process(
    storage: Storage, shards: Sequence[str], *, samples_per_shard: int = 1000, asset: str
) -> dict[str, StepStats]:
    """The single-process export ``export_shard`` + ``publish_splits`` replaced, writing to ``asset``.

    Row at a time (``reference_samples``), every split re-reading every shard's images, tars cut
    across shards: the same samples in the same order within each shard. Kept as the oracle of the
    tests and the baseline of ``bench/bench_export.py``; no asset runs it.
    """
    from realsyn.export import reference_samples, samples_to_parquet_table, write_webdataset

    splits_reader = storage.reader(layout.SAMPLED_SPLITS)
    split_names = sorted(splits_reader.read_json(layout.SUMMARY_FILE))
    out: dict[str, StepStats] = {}
    with storage.writer(asset) as w:
        for split in split_names:
            stats = StepStats(f"{asset}:{split}")
            with stats.timed():

                def samples(split=split):
                    for s in shards:
                        chosen = splits_reader.read_parquet(layout.split_selection_file(split, s)).column("image_id").to_pylist()
                        if not chosen:
                            continue
                        imgs = storage.reader(layout.FILTERED_IMAGES, s).read_parquet(layout.IMAGES_FILE, columns=IMAGE_COLUMNS)
                        retr = read_retrievals(storage, s)
                        caps = storage.reader(layout.SYNTHETIC_CAPTIONS, s).read_parquet(
                            layout.CAPTIONS_FILE, columns=["image_id", "synthetic_caption"]
                        )
                        shard_samples = []
                        for sample in reference_samples(s, imgs, retr, caps, chosen):
                            shard_samples.append(sample)
                            yield sample
                        w.write_parquet(layout.export_parquet_file(split, s), samples_to_parquet_table(shard_samples))

                sizes = write_webdataset(
                    samples(),
                    lambda name, split=split: w.open(f"{split}/{name}", "wb"),
                    samples_per_shard=samples_per_shard,
                    split=split,
                    stats=stats,
                )
                w.write_json(layout.export_sizes_file(split), sizes)
                stats.add("rows_out", sum(sizes.values()))
                stats.add("tar_shards", len(sizes))
            out[split] = stats
        w.write_json(layout.SUMMARY_FILE, {k: v.as_dict() for k, v in out.items()})
    return out
