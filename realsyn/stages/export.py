"""Stage 11b: every split as WebDataset tar shards (+ sizes.json, as open_clip reads them) and Parquet,
published at a stable versioned path with its data card.

Two steps. ``export_shard`` (per input shard) reads the shard's filtered images once and writes
every split's samples of that shard: ``{split}/{split}-{shard}-NNNNNN.tar``, ``{split}/sizes.json``,
``{split}/parquet.parquet`` and ``{split}/facts.json`` (the shard's content hash and histograms for
the data card). ``publish_splits`` (global) then makes one folder per split that a trainer points
at: it copies the committed per-shard tars (a server-side copy on S3, no decode) into ``{split}/``
of its own generation with the split's merged ``sizes.json`` (open_clip's ``get_dataset_size`` reads
it beside the shards), ``train_data.txt`` (the tar URIs joined by ``::``, a ready ``--train-data``
value), the Parquet tables as ``{split}/parquet/{shard}.parquet`` and the data card (``README.md``,
also the Hugging Face dataset card, and ``datacard.json``; see ``realsyn.datacard``).

Publishing. Generations are swept after later commits, so a training job must not read one. Each
split is also published at ``{root}/_exports/{split}/v{N}/`` (``realsyn.export.published_split_path``),
outside every generation folder (the leading ``_``: never an asset, never swept): a new version is
written whole (files, card, then ``manifest.json`` last), then ``latest.json`` flips to it atomically.
The data version is a content hash (``data_version``): publishing content an existing version already
holds makes no new version, ``latest`` just points at that one. Versions are never deleted here.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from realsyn import layout
from realsyn.io import is_local
from realsyn.progress import track
from realsyn.stages.common import read_retrievals, require_partitions
from realsyn.stats import StepStats
from realsyn.storage import MissingOutputError, PartitionReader, PartitionWriter, Storage

IMAGE_COLUMNS = ["image_id", "image_bytes", "format", "width", "height", "doc_id", "source"]
IMAGE_BATCH_ROWS = 1024  # image rows in memory at once (~36 MB of 35 KB images; fewer per-batch Arrow calls than 256)
# per-split counters a shard's export reports and the publish step adds up
SHARD_COUNTS = ("samples_in", "samples_written", "reencoded_images", "reencoded_lossy")


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


class MixedExportFormatError(RuntimeError):
    """The shards of a publish were exported with different formats (a split must have one)."""


def export_format(
    image_format: str = "jpg", real_text_members: int = 3, jpeg_quality: int = 95, samples_per_shard: int | None = None
) -> dict[str, Any]:
    """The export settings a shard records and every shard of a published split must share."""
    from realsyn.export import DEFAULT_SAMPLES_PER_SHARD, check_image_format

    return {
        "image_extension": check_image_format(image_format),
        "real_text_members": int(real_text_members),
        "jpeg_quality": int(jpeg_quality),
        "samples_per_shard": int(samples_per_shard or DEFAULT_SAMPLES_PER_SHARD),
    }


def _similarities(storage: Storage, shard: str) -> pa.Table | None:
    """filtered_pairs' image-caption cosine of the shard's pairs (None where it is not there)."""
    try:
        reader = storage.reader(layout.FILTERED_PAIRS, shard)
    except MissingOutputError:
        return None
    return _read_parquet(reader, layout.SIMILARITY_FILE) if reader.has(layout.SIMILARITY_FILE) else None


def export_shard(
    storage: Storage,
    shard: str,
    *,
    samples_per_shard: int | None = None,
    image_format: str = "jpg",
    real_text_members: int = 3,
    jpeg_quality: int = 95,
) -> dict[str, StepStats]:
    """Every split's samples of ``shard``, in one pass over the shard's images: tars, sizes.json, Parquet, facts."""
    from realsyn.datacard import SIMILARITY_EDGES, histogram
    from realsyn.export import ShardSamples, SplitOutput

    fmt = export_format(image_format, real_text_members, jpeg_quality, samples_per_shard)
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
    outputs: dict[str, SplitOutput] = {}
    with storage.writer(layout.EXPORTED_SHARDS, shard) as w:
        if any(len(ids) for ids in selections.values()):
            t0 = time.perf_counter()
            with _parquet_file(storage.reader(layout.FILTERED_IMAGES, shard), layout.IMAGES_FILE) as images:
                retr = read_retrievals(storage, shard)
                caps = _read_parquet(
                    storage.reader(layout.SYNTHETIC_CAPTIONS, shard), layout.CAPTIONS_FILE, ["image_id", "synthetic_caption"]
                )
                samples = ShardSamples(
                    shard,
                    images.read(columns=["image_id"]).column("image_id"),
                    retr,
                    caps,
                    selections,
                    image_format=fmt["image_extension"],
                    real_text_members=fmt["real_text_members"],
                    jpeg_quality=fmt["jpeg_quality"],
                )
                outputs = {
                    split: SplitOutput(
                        lambda name, split=split: _output(w, f"{split}/{name}", gather=True),
                        lambda index, split=split: layout.export_tar_name(split, shard, index),
                        lambda split=split: _output(w, layout.export_shard_parquet_file(split)),
                        fmt["samples_per_shard"],
                        out[split],
                    )
                    for split in split_names
                    if samples.selected(split)
                }
                # image_db's sha256 of each image: the content hash need not hash the image bytes again
                columns = IMAGE_COLUMNS + (["sha256"] if "sha256" in images.schema_arrow.names else [])
                # streamed in batches of image rows when every split keeps image order (the samplers do),
                # so the images in memory are one batch, not the shard
                batches = (
                    images.iter_batches(batch_size=IMAGE_BATCH_ROWS, columns=columns) if samples.ordered else [images.read(columns=columns)]
                )
                rows = images.metadata.num_rows
                sizes = samples.write(track(batches, f"{layout.EXPORTED_SHARDS} {shard}", total=rows, unit="images", size=len), outputs)
            # one pass writes every split: its time is shared out by the samples each split chose
            chosen = sum(samples.selected(split) for split in split_names)
            for split in split_names:
                out[split].seconds += (time.perf_counter() - t0) * samples.selected(split) / chosen
        sims = _similarities(storage, shard) if outputs else None
        for split in split_names:
            split_sizes = sizes.get(split, {})
            w.write_json(layout.export_sizes_file(split), split_sizes)
            out[split].add("rows_out", sum(split_sizes.values()))
            out[split].add("tar_shards", len(split_sizes))
            facts: dict[str, Any] = {"content_sha256": None, "samples": sum(split_sizes.values())}
            if split in outputs:
                facts.update(outputs[split].facts.as_dict(), content_sha256=outputs[split].content_sha256)
                if sims is not None:
                    pos = pc.index_in(selections[split], value_set=sims.column("image_id"))
                    values = sims.column("similarity").take(pc.drop_null(pos)).to_numpy(zero_copy_only=False)
                    facts["synthetic_similarity"] = histogram(values, SIMILARITY_EDGES)
            w.write_json(layout.export_facts_file(split), facts)
        w.write_json(layout.SUMMARY_FILE, {split: st.as_dict() for split, st in out.items()})
        w.commit(info={"sampled_splits_generation": splits_reader.generation, "export": fmt})
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


def _link_or_copy(fs, sources: Sequence[str], targets: Sequence[str]) -> None:
    """Files into a published version: hard links on a local root (no bytes copied; the link outlives the
    generation's sweep), server-side copies on S3."""
    if not sources:
        return
    if not is_local(fs):
        fs.copy(list(sources), list(targets))
        return
    for src, dst in zip(sources, targets):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # another device, or links not supported
            fs.copy(src, dst)


def _reason_counts(storage: Storage, asset: str, partition: str | None, name: str) -> dict[str, int]:
    """{reason: dropped} of one decision record (``realsyn.decisions``); empty where there is none."""
    try:
        reader = storage.reader(asset, partition)
    except MissingOutputError:
        return {}
    if not reader.has(name):
        return {}
    with reader.open(name) as f:  # dictionary-encoded: counting reasons never builds a string per row
        reasons = pq.read_table(f, columns=["reason"], read_dictionary=["reason"]).column("reason")
    counts = pc.value_counts(pc.drop_null(reasons))
    return {r: int(n) for r, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())}


def _add_counts(into: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + int(v)


def _global_facts(storage: Storage, shards: Sequence[str]) -> dict[str, Any]:
    """What every split's card shares: counts and drop reasons at each stage, cluster sizes before capping,
    the models and bands used, licences, code versions. Anything not materialized is left out."""
    from realsyn.datacard import CLUSTER_SIZE_EDGES, code_versions, histogram
    from realsyn.stages.summary import stage_counts

    facts: dict[str, Any] = {"stage_counts": stage_counts(storage, shards), "code": code_versions()}
    drops: dict[str, dict[str, int]] = {}
    per_shard = (
        (layout.FILTERED_IMAGES, layout.DECISIONS_FILE),
        (layout.SENTENCE_CANDIDATES, layout.DECISIONS_FILE),
        (layout.FILTERED_SENTENCES, layout.DECISIONS_FILE),
        (layout.FILTERED_PAIRS, layout.DECISIONS_FILE),
    )
    for asset, name in per_shard:
        for s in shards:
            _add_counts(drops.setdefault(asset, {}), _reason_counts(storage, asset, s, name))
    for asset in (layout.IMAGE_DEDUP, layout.SENTENCE_DEDUP):
        for s in shards:
            _add_counts(drops.setdefault(asset, {}), _reason_counts(storage, asset, None, layout.decisions_file(s)))
    facts["drops"] = {k: v for k, v in drops.items() if v}
    config: dict[str, Any] = {}
    try:
        counts = np.asarray(storage.reader(layout.IMAGE_CLUSTERS).read_numpy(layout.CLUSTER_COUNTS_FILE))
        facts["clusters"] = {"k": int(len(counts)), "largest_before_cap": int(counts.max()) if len(counts) else 0}
        facts["cluster_counts"] = counts
        facts["before_cap"] = histogram(counts[counts > 0], CLUSTER_SIZE_EDGES)
    except (MissingOutputError, FileNotFoundError):
        pass
    for key, asset, name in (
        ("similarity_band", layout.FILTERED_PAIRS, layout.BAND_FILE),
        ("image_embedder", layout.IMAGE_EMBEDDINGS, layout.MODEL_FILE),
    ):
        for s in shards[:1]:
            try:
                reader = storage.reader(asset, s)
                if reader.has(name):
                    config[key] = reader.read_json(name)
            except MissingOutputError:
                pass
    facts["config"] = config
    # licences: only where ingest recorded them ({licence: documents} in image_db's manifest)
    licenses: dict[str, int] | None = None
    for s in shards:
        try:
            found = storage.reader(layout.IMAGE_DB, s).info.get("licenses")
        except MissingOutputError:
            found = None
        if found:
            licenses = licenses or {}
            _add_counts(licenses, found)
    facts["licenses"] = licenses
    return facts


def data_version(fmt: dict[str, Any], sizes: dict[str, int], content: dict[str, str]) -> str:
    """The content hash of a published split: its format, its tars (name -> samples) and each shard's
    content hash (the tar members, images by their sha256). Equal for byte-identical exports."""
    blob = json.dumps({"format": fmt, "tars": sizes, "content": content}, sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def publish_splits(storage: Storage, shards: Sequence[str], *, input_uri: str | None = None) -> dict[str, StepStats]:
    """One folder per split from the per-shard exports (copied tars + merged sizes.json, train_data.txt,
    Parquet, data card), then each split published at ``_exports/{split}/v{N}/`` (a new version only for
    new content) and ``latest.json`` flipped to it. ``input_uri`` is named in the card's sources."""
    from realsyn import datacard
    from realsyn.datacard import CLUSTER_SIZE_EDGES, histogram, merge_histograms
    from realsyn.export import claim_version, point_latest, published_split_path, published_versions

    shards = require_partitions(storage, layout.EXPORTED_SHARDS, shards)
    splits_reader = storage.reader(layout.SAMPLED_SPLITS)
    sampling = splits_reader.read_json(layout.SUMMARY_FILE)
    split_names = sorted(sampling)
    readers = {s: storage.reader(layout.EXPORTED_SHARDS, s) for s in shards}
    stale = [s for s, r in readers.items() if r.info.get("sampled_splits_generation") != splits_reader.generation]
    if stale:
        head = ", ".join(stale[:5]) + (" ..." if len(stale) > 5 else "")
        raise StaleExportError(
            f"{layout.EXPORTED_SHARDS}: {len(stale)} of {len(shards)} shards were exported from an older sampled_splits: {head}; "
            f"rematerialize {layout.EXPORTED_SHARDS} for them"
        )
    formats = {json.dumps(r.info.get("export", export_format()), sort_keys=True): s for s, r in readers.items()}
    if len(formats) > 1:
        raise MixedExportFormatError(
            f"{layout.EXPORTED_SHARDS}: shards were exported with different settings ({', '.join(f'{s}: {f}' for f, s in formats.items())}); "
            f"a split needs one image format and one set of members: rematerialize {layout.EXPORTED_SHARDS} with one config"
        )
    fmt = json.loads(next(iter(formats))) if formats else export_format()
    shard_summaries = {s: r.read_json(layout.SUMMARY_FILE) for s, r in readers.items()}
    shared = _global_facts(storage, shards)
    cluster_counts = shared.pop("cluster_counts", None)
    before_cap = shared.pop("before_cap", None)
    out: dict[str, StepStats] = {}
    published: dict[str, tuple[int, str]] = {}
    with storage.writer(layout.EXPORTED_SPLITS) as w:
        for split in split_names:
            stats = StepStats(f"{layout.EXPORTED_SPLITS}:{split}")
            with stats.timed():
                sizes: dict[str, int] = {}
                copies: list[tuple[PartitionReader, str, str]] = []
                content: dict[str, str] = {}
                shard_facts: dict[str, Any] = {}
                after_cap = np.zeros(len(cluster_counts) if cluster_counts is not None else 0, np.int64)
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
                    facts_s = reader.read_json(layout.export_facts_file(split)) if reader.has(layout.export_facts_file(split)) else {}
                    if facts_s.get("content_sha256") and shard_sizes:
                        content[s] = facts_s["content_sha256"]
                    for key, value in facts_s.items():
                        if key == "hosts":
                            _add_counts(shard_facts.setdefault("hosts", {}), value)
                        elif isinstance(value, dict) and "edges" in value:
                            shard_facts[key] = merge_histograms(shard_facts.get(key), value)
                    if cluster_counts is not None:
                        chosen = splits_reader.read_parquet(layout.split_selection_file(split, s), columns=["cluster"]).column("cluster")
                        after_cap += np.bincount(chosen.to_numpy(zero_copy_only=False).astype(np.int64), minlength=len(after_cap))[
                            : len(after_cap)
                        ]
                _copy_files(w, copies)
                w.write_json(layout.export_sizes_file(split), sizes)  # open_clip reads the sample counts from here
                urls = [w.uri(f"{split}/{name}") for name in sorted(sizes)]
                w.write_bytes(f"{split}/{layout.TRAIN_DATA_FILE}", "::".join(urls).encode())
                stats.add("rows_out", sum(sizes.values()))
                stats.add("tar_shards", len(sizes))

                version_of_content = data_version(fmt, sizes, content)
                existing = [n for n, m in published_versions(storage, split).items() if m.get("data_version") == version_of_content]
                version = existing[-1] if existing else claim_version(storage, split)
                facts = _split_facts(split, version, version_of_content, sizes, stats, fmt, shared, shard_facts, sampling.get(split, {}))
                facts["published_uri"] = _version_uri(storage, split, version)
                if cluster_counts is not None:
                    facts["cluster_sizes"] = {
                        "before_cap": before_cap,
                        "after_cap": histogram(after_cap[after_cap > 0], CLUSTER_SIZE_EDGES),
                        "largest_after_cap": int(after_cap.max()) if len(after_cap) else 0,
                    }
                facts["sources"] = {
                    "input": input_uri,
                    "input_shards": list(shards),
                    "domains": dict(sorted((shard_facts.get("hosts") or {}).items(), key=lambda x: (-x[1], x[0]))[:20]),
                    "note": "Image hosts: the 20 largest (each shard reports its 50 largest, so the counts are lower bounds).",
                }
                w.write_json(f"{split}/{datacard.DATACARD_FILE}", {"facts": facts, "evaluation": None})
                w.write_bytes(f"{split}/{datacard.README_FILE}", datacard.dataset_card(facts).encode())
                if any(dest.startswith(f"{split}/parquet/") for _, _, dest in copies):
                    w.write_bytes(f"{split}/{datacard.PARQUET_DIR}/{datacard.README_FILE}", datacard.parquet_dataset_card(facts).encode())
                if not existing:
                    _write_version(storage, w, split, version, facts, [dest for _, _, dest in copies])
                published[split] = (version, version_of_content)
                w.write_json(
                    f"{split}/published.json",
                    {"version": version, "data_version": version_of_content, "uri": published_split_path(storage, split, version)},
                )
                stats.add("published_version", version)
                stats.add("new_version", int(not existing))
            out[split] = stats
        w.write_json(layout.SUMMARY_FILE, {k: v.as_dict() for k, v in out.items()})
        w.commit(info={"shards": list(shards), "sampled_splits_generation": splits_reader.generation, "export": fmt})
    # after the commit: latest never names a version whose generation did not commit
    for split, (version, content_hash) in published.items():
        point_latest(storage, split, version, content_hash)
    return out


def _version_uri(storage: Storage, split: str, version: int) -> str:
    return storage.uri(layout.PUBLISHED_EXPORTS_DIR, split, f"v{version}")


def _split_facts(
    split: str,
    version: int,
    content_hash: str,
    sizes: dict[str, int],
    stats: StepStats,
    fmt: dict[str, Any],
    shared: dict[str, Any],
    shard_facts: dict[str, Any],
    sampling: dict[str, Any],
) -> dict[str, Any]:
    from realsyn.export import member_suffixes

    drops = dict(shared.get("drops", {}))
    sampled = {k.removeprefix("dropped_"): int(v) for k, v in sampling.items() if k.startswith("dropped_")}
    exported = {k.removeprefix("dropped_"): int(v) for k, v in stats.counts.items() if k.startswith("dropped_")}
    drops[f"{layout.SAMPLED_SPLITS}:{split}"] = sampled
    drops[f"{layout.EXPORTED_SHARDS}:{split}"] = exported
    counts = dict(shared.get("stage_counts", {}))
    counts.pop("splits", None)
    counts.pop("export_location", None)
    if "rows_in" in sampling:
        counts[f"{split}: candidates for sampling"] = int(sampling["rows_in"])
        counts[f"{split}: sampled"] = int(sampling.get("rows_out", 0))
    counts[f"{split}: exported"] = sum(sizes.values())
    return {
        "split": split,
        "version": version,
        "data_version": content_hash,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "samples": sum(sizes.values()),
        "tar_shards": len(sizes),
        "source_shards": int(stats.counts.get("source_shards", 0)),
        "format": {**fmt, "members": member_suffixes(fmt["image_extension"], fmt["real_text_members"])},
        "stage_counts": counts,
        "drops": drops,
        "text_length": {k: shard_facts[k] for k in ("synthetic_length", "real_length") if k in shard_facts},
        "similarity": {k: shard_facts[k] for k in ("synthetic_similarity", "real_score") if k in shard_facts},
        "licenses": shared.get("licenses"),
        "config": {**shared.get("config", {}), "samplers": sampling.get("samplers"), "export": fmt},
        "code": shared.get("code"),
        "clusters": shared.get("clusters"),
    }


def _write_version(storage: Storage, w: PartitionWriter, split: str, version: int, facts: dict[str, Any], data_files: list[str]) -> None:
    """Fill the claimed ``_exports/{split}/v{version}/`` from the generation's files of ``split``: data files
    (linked or copied), sizes.json, train_data.txt naming the version's own tars, the card, then manifest.json."""
    from realsyn import datacard
    from realsyn.io import atomic_write_bytes, join_path

    fs = storage.fs
    folder = storage.path(layout.PUBLISHED_EXPORTS_DIR, split, f"v{version}")
    rel = [d.removeprefix(f"{split}/") for d in data_files]
    _link_or_copy(fs, [w.path(d) for d in data_files], [join_path(fs, folder, r) for r in rel])
    sizes = w.read_json(layout.export_sizes_file(split))
    atomic_write_bytes(fs, join_path(fs, folder, layout.SIZES_FILE), json.dumps(sizes, indent=1, sort_keys=True).encode())
    urls = [storage.uri_of(join_path(fs, folder, name)) for name in sorted(sizes)]
    atomic_write_bytes(fs, join_path(fs, folder, layout.TRAIN_DATA_FILE), "::".join(urls).encode())
    datacard.write_card(folder, facts, evaluation={}, filesystem=fs)
    manifest = {
        "split": split,
        "version": version,
        "data_version": facts["data_version"],
        "samples": facts["samples"],
        "files": sorted([*rel, layout.SIZES_FILE, layout.TRAIN_DATA_FILE]),
        "created_at": time.time(),
        "generation": w.generation,
    }
    atomic_write_bytes(fs, join_path(fs, folder, layout.PUBLISHED_MANIFEST_FILE), json.dumps(manifest, indent=1).encode())


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
