"""Stage 11b: every split as WebDataset tar shards (+ sizes.json, as open_clip reads them) and Parquet."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from realsyn import layout
from realsyn.stats import StepStats
from realsyn.storage import Storage


def export_splits(storage: Storage, shards: Sequence[str], *, samples_per_shard: int = 1000) -> dict[str, StepStats]:
    """Each split as WebDataset tar shards (+ sizes.json, as open_clip reads them) and Parquet."""
    from realsyn.export import make_sample, samples_to_parquet_table, write_webdataset

    splits_reader = storage.reader(layout.SAMPLED_SPLITS)
    split_names = sorted(splits_reader.read_json(layout.SUMMARY_FILE))
    out: dict[str, StepStats] = {}
    with storage.writer(layout.EXPORTED_SPLITS) as w:
        for split in split_names:
            stats = StepStats(f"{layout.EXPORTED_SPLITS}:{split}")
            with stats.timed():

                def samples(split=split) -> Iterator[dict]:
                    for s in shards:
                        chosen = splits_reader.read_parquet(layout.split_selection_file(split, s)).column("image_id").to_pylist()
                        if not chosen:
                            continue
                        imgs = storage.reader(layout.FILTERED_IMAGES, s).read_parquet(
                            layout.IMAGES_FILE, columns=["image_id", "image_bytes", "format", "width", "height", "doc_id", "source"]
                        )
                        retr = storage.reader(layout.RETRIEVALS, s).read_parquet(layout.RETRIEVALS_FILE)
                        caps = storage.reader(layout.SYNTHETIC_CAPTIONS, s).read_parquet(
                            layout.CAPTIONS_FILE, columns=["image_id", "synthetic_caption"]
                        )
                        ipos = {x: i for i, x in enumerate(imgs.column("image_id").to_pylist())}
                        rpos = {x: i for i, x in enumerate(retr.column("image_id").to_pylist())}
                        cpos = {x: i for i, x in enumerate(caps.column("image_id").to_pylist())}
                        shard_samples = []
                        for image_id in chosen:
                            img = imgs.slice(ipos[image_id], 1).to_pylist()[0]
                            r = retr.slice(rpos[image_id], 1).to_pylist()[0]
                            synthetic = caps.column("synthetic_caption")[cpos[image_id]].as_py()
                            sample = make_sample(
                                image_id,
                                img["image_bytes"],
                                img["format"],
                                r["texts"],
                                r["scores"],
                                [synthetic],
                                img["width"],
                                img["height"],
                                img["doc_id"],
                                img["source"],
                            )
                            sample["json"].update(real_sentence_ids=r["sentence_ids"], shard=s)
                            shard_samples.append(sample)
                            yield sample
                        w.write_parquet(f"{split}/parquet/{s}.parquet", samples_to_parquet_table(shard_samples))

                sizes = write_webdataset(
                    samples(),
                    lambda name, split=split: w.open(f"{split}/{name}", "wb"),
                    samples_per_shard=samples_per_shard,
                    split=split,
                    stats=stats,
                )
                w.write_json(f"{split}/{layout.SIZES_FILE}", sizes)  # open_clip reads the sample counts from here
                stats.add("rows_out", sum(sizes.values()))
                stats.add("tar_shards", len(sizes))
            out[split] = stats
        w.write_json(layout.SUMMARY_FILE, {k: v.as_dict() for k, v in out.items()})
    return out
