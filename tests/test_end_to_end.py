"""The whole graph on the bundled sample corpus, through Dagster, locally and on moto's S3."""

import collections
import glob
import os

import dagster as dg
import pytest
import yaml

from assets.runner import run_graph
from realsyn import layout
from realsyn.decisions import reason_counts
from realsyn.readers import list_input_shards, shard_key
from realsyn.sample_corpus import build_sample_corpus
from realsyn.stages.common import read_retrievals
from realsyn.storage import Storage
from tests.s3_server import moto_s3

pytestmark = pytest.mark.slow

CAPS = {"cap2": 2, "cap3": 3, "cap5": 5}


def _config(path) -> str:
    cfg = {
        "assets": {
            "sentence_clusters": {"n_clusters": 6},
            "image_clusters": {"n_clusters": 4},
            "synthetic_captions": {"max_new_tokens": 12, "batch_size": 8},
            "sampled_splits": {
                "splits": [{"name": n, "samplers": [{"name": "cluster_cap", "params": {"cap": c}}]} for n, c in CAPS.items()]
                + [
                    # MetaCLIP balancing after the RealSyn cap, on the real texts; POINTS on its own
                    {
                        "name": "metaclip",
                        "samplers": [
                            {"name": "cluster_cap", "params": {"cap": 5}},
                            {
                                "name": "metaclip",
                                "params": {"t": 1, "metadata_path": "embedded:visual-concepts", "text_columns": ["real_texts"]},
                            },
                        ],
                    },
                    {"name": "points", "samplers": [{"name": "points_perplexity", "params": {"keep_fraction": 0.5}}]},
                ]
            },
            "exported_shards": {"samples_per_shard": 4},
        },
        "resources": {},
    }
    p = os.path.join(path, "run.yaml")
    with open(p, "w") as f:
        yaml.safe_dump(cfg, f)
    return p


def _reasons(storage: Storage, asset: str, shards) -> collections.Counter:
    out = collections.Counter()
    for s in shards:
        out.update(reason_counts(storage.reader(asset, s).read_parquet(layout.DECISIONS_FILE)))
    return out


def _check_outputs(storage: Storage, shards, planted):
    # stage 3: the planted bad images are dropped with their reasons
    assert sum(storage.reader("image_db", s).read_parquet("images.parquet").num_rows for s in shards) == planted["image_slots"]
    image_drops = _reasons(storage, "filtered_images", shards)
    assert image_drops == {
        "short_side": planted["tiny_images"],
        "aspect_ratio": planted["extreme_aspect_images"],
        "undecodable": 1,
        "fetch_refused": 1,  # the planted loopback link: refused by the fetch policy
    }
    # stage 4: exact copies and re-encoded/resized copies collapse to one representative each
    dedup = storage.reader("image_dedup")
    decisions = [dedup.read_parquet(layout.decisions_file(s)).to_pylist() for s in shards]
    reasons = collections.Counter(d["reason"] for ds in decisions for d in ds if not d["kept"])
    assert reasons == {"exact_duplicate": planted["exact_duplicate_images"], "perceptual_duplicate": planted["near_duplicate_images"]}
    kept_images = [d["id"] for ds in decisions for d in ds if d["kept"]]
    assert len(kept_images) == planted["photos"]  # one survivor per distinct photo; random weights never merge distinct ones
    # stage 5: planted bad sentences are dropped with their reasons; no duplicate survives
    sentence_drops = _reasons(storage, "sentence_candidates", shards)
    for reason, key in [
        ("emoji", "emoji_sentences"),
        ("url", "url_sentences"),
        ("too_few_words", "too_short_sentences"),
        ("too_many_words", "too_long_sentences"),
    ]:
        assert sentence_drops[reason] == planted[key], reason
    assert sentence_drops["below_c1"] + sentence_drops["no_action"] > 0
    kept_sentences = set()
    texts = {}
    for s in shards:
        t = storage.reader("filtered_sentences", s).read_parquet("sentences.parquet")
        texts.update(zip(t.column("sentence_id").to_pylist(), t.column("text").to_pylist()))
        kept = storage.reader("sentence_dedup").read_parquet(layout.decisions_file(s))
        kept_sentences.update(i for i, k in zip(kept.column("id").to_pylist(), kept.column("kept").to_pylist()) if k)
    kept_texts = [texts[i] for i in kept_sentences]
    assert len(kept_texts) == len(set(kept_texts))
    # stage 7: k = 3 real texts per image, ranked, all from the kept sentences
    retrieved = 0
    for s in shards:
        for row in read_retrievals(storage, s).to_pylist():
            assert len(row["texts"]) == 3 and set(row["sentence_ids"]) <= kept_sentences
            assert row["scores"] == sorted(row["scores"], reverse=True)
            retrieved += 1
    assert retrieved == planted["photos"]
    # stage 8: one non-empty synthetic caption per image
    captions = [
        c
        for s in shards
        for c in storage.reader("synthetic_captions", s).read_parquet("captions.parquet").column("synthetic_caption").to_pylist()
    ]
    assert len(captions) == planted["photos"] and all(c.strip() for c in captions)
    # stage 10: caps respected; clusters under the cap kept whole
    clusters = {}
    for s in shards:
        t = storage.reader("image_clusters").read_parquet(f"assignments/{s}.parquet")
        clusters.update(zip(t.column("image_id").to_pylist(), t.column("cluster").to_pylist()))
    sizes = collections.Counter(clusters.values())
    splits = storage.reader("sampled_splits")
    for split, cap in CAPS.items():
        chosen = [i for s in shards for i in splits.read_parquet(f"{split}/{s}.parquet").column("image_id").to_pylist()]
        per_cluster = collections.Counter(clusters[i] for i in chosen)
        assert per_cluster == {c: min(n, cap) for c, n in sizes.items()}, split
    # the plug-in samplers: MetaCLIP keeps a subset of the cap-5 split, each kept sample matching an
    # entry; POINTS keeps exactly the lower half by perplexity
    from realsyn.curation.metaclip import MetaClipMatcher, load_metadata

    def chosen(split):
        return [i for s in shards for i in splits.read_parquet(f"{split}/{s}.parquet").column("image_id").to_pylist()]

    matcher = MetaClipMatcher(load_metadata("embedded:visual-concepts"))
    real = {}
    for s in shards:
        for row in read_retrievals(storage, s).to_pylist():
            real[row["image_id"]] = row["texts"]
    meta_split = chosen("metaclip")
    assert set(meta_split) <= set(chosen("cap5")) and len(meta_split) < len(chosen("cap5"))
    assert all(any(matcher.match(t) for t in real[i]) for i in meta_split)
    # each dropped sample names the sampler of the chain that dropped it (detail) and that sampler's own reason
    dropped = [d for s in shards for d in splits.read_parquet(layout.split_decisions_file("metaclip", s)).to_pylist() if not d["kept"]]
    excluded = collections.Counter(d["detail"] for d in dropped)
    assert {d["reason"] for d in dropped if d["detail"] == "cluster_cap"} == {"over_cap"}
    assert {d["reason"] for d in dropped if d["detail"] == "metaclip"} <= {"balanced_out", "no_metadata_match"}
    assert excluded["cluster_cap"] == planted["photos"] - len(chosen("cap5")) and excluded["metaclip"] == len(chosen("cap5")) - len(
        meta_split
    )
    assert any(f.startswith("metaclip/report-1-") and f.endswith(".png") for f in splits.files)
    assert len(chosen("points")) == int(0.5 * planted["photos"] + 0.5)  # POINTS rounds half up

    # stage 11: tar shards readable by webdataset, sizes.json adds up
    import webdataset as wds

    export = storage.reader("exported_splits")
    for split in [*CAPS, "metaclip", "points"]:
        sizes_json = export.read_json(f"{split}/sizes.json")
        # one folder per split: the tars of every shard ({split}-{shard}-NNNNNN.tar) and the --train-data list of them
        assert all(name.startswith(f"{split}-") and name.endswith(".tar") for name in sizes_json)
        assert export.read_bytes(f"{split}/train_data.txt").decode() == "::".join(export.uri(f"{split}/{name}") for name in sizes_json)
        local = []
        for name in sizes_json:
            with export.open(f"{split}/{name}") as src:
                local.append(src.read())
        samples = []
        for i, blob in enumerate(local):
            path = os.path.join(os.environ["E2E_TMP"], f"{split}-{i}.tar")
            with open(path, "wb") as f:
                f.write(blob)
            samples += list(wds.WebDataset(path, shardshuffle=False).decode("pil").to_tuple("jpg;png;webp", "txt", "json"))
        assert (
            len(samples)
            == sum(sizes_json.values())
            == len([i for s in shards for i in splits.read_parquet(f"{split}/{s}.parquet").column("image_id").to_pylist()])
        )
        for image, txt, meta in samples:
            assert min(image.size) >= 100 and txt.strip() and len(meta["real_texts"]) == 3 and meta["synthetic_texts"] == [txt]


def _run(input_uri, storage_root, tmp_path, instance, force=False):
    report = run_graph(
        input_uri, storage_root, config_path=_config(str(tmp_path)), env="local", instance=instance, log=lambda *_: None, force=force
    )
    assert report.success, [str(f) for f in report.failures]
    return report


def test_whole_graph_locally_and_rerun_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("E2E_TMP", str(tmp_path))
    corpus = tmp_path / "corpus"
    planted = build_sample_corpus(str(corpus))
    instance = dg.DagsterInstance.ephemeral()
    # a shard registered from another input location must not enter this dataset's global steps
    instance.add_dynamic_partitions("shards", ["from-another-input"])
    report = _run(str(corpus), str(tmp_path / "store"), tmp_path, instance)
    shards = sorted(shard_key(u, str(corpus)) for u in list_input_shards(str(corpus)))
    assert report.shards == shards and len(shards) == planted["n_shards"]
    storage = Storage(str(tmp_path / "store"))
    _check_outputs(storage, shards, planted)

    # every asset materialized in the Dagster instance with metadata
    mat = instance.fetch_materializations(dg.AssetKey("filtered_images"), limit=10).records
    assert len(mat) == len(shards) and mat[0].asset_materialization.metadata["dagster/row_count"].value > 0
    # the asset checks of the last run passed
    for check in ("sentence_clusters_are_usable", "sampled_splits_respect_caps", "exported_splits_match_sizes"):
        asset = {
            "sentence_clusters_are_usable": "sentence_clusters",
            "sampled_splits_respect_caps": "sampled_splits",
            "exported_splits_match_sizes": "exported_splits",
        }[check]
        records = instance.event_log_storage.get_asset_check_execution_history(dg.AssetCheckKey(dg.AssetKey(asset), check), limit=1)
        assert records and records[0].status.value == "SUCCEEDED", check
    first = {s: storage.reader("sampled_splits").read_parquet(f"cap3/{s}.parquet").column("image_id").to_pylist() for s in shards}

    # a rerun with nothing changed runs nothing: every partition is fresh
    generations = {s: storage.reader("synthetic_captions", s).generation for s in shards}
    again = _run(str(corpus), str(tmp_path / "store"), tmp_path, instance)
    assert again.runs == 0 and again.ran == {} and again.fresh_runs > 0
    assert {s: storage.reader("synthetic_captions", s).generation for s in shards} == generations
    assert len(glob.glob(str(tmp_path / "store" / "retrievals" / "_global" / "g-*"))) == 1

    # a forced rerun replaces every partition cleanly and regenerates no caption (cache by image and prompt)
    _run(str(corpus), str(tmp_path / "store"), tmp_path, instance, force=True)
    caps = instance.fetch_materializations(dg.AssetKey("synthetic_captions"), limit=20).records
    latest = caps[: len(shards)]
    assert sum(r.asset_materialization.metadata["generated"].value for r in latest) == 0
    assert sum(r.asset_materialization.metadata["cached"].value for r in latest) == planted["photos"]
    again = {
        s: Storage(str(tmp_path / "store")).reader("sampled_splits").read_parquet(f"cap3/{s}.parquet").column("image_id").to_pylist()
        for s in shards
    }
    assert again == first
    # the superseded generation stays for readers that resolved it (retention 2); _CURRENT.json names the current one
    assert len(glob.glob(str(tmp_path / "store" / "retrievals" / "_global" / "g-*"))) == 2


def test_whole_graph_on_s3(tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setenv("E2E_TMP", str(tmp_path))
    corpus = tmp_path / "corpus"
    planted = build_sample_corpus(str(corpus))
    with moto_s3(("realsyn",)):
        fs = s3fs.S3FileSystem(use_listings_cache=False)
        fs.put(str(corpus) + "/", "realsyn/corpus/", recursive=True)
        _run("s3://realsyn/corpus", "s3://realsyn/store", tmp_path, dg.DagsterInstance.ephemeral())
        storage = Storage("s3://realsyn/store")
        shards = sorted(shard_key(u, "s3://realsyn/corpus") for u in list_input_shards("s3://realsyn/corpus"))
        _check_outputs(storage, shards, planted)
        assert fs.exists("realsyn/store/exported_splits/_global/_CURRENT.json")


def test_cli_finishes_the_good_shards_and_names_the_failed_one(tmp_path, capsys, monkeypatch):
    import json
    import re

    from assets.cli import main

    home = tmp_path / "dagster_home"  # not created: the CLI makes the persistent instance itself
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("E2E_TMP", str(tmp_path))
    corpus = tmp_path / "corpus"
    planted = build_sample_corpus(str(corpus))
    # one shard in another layout (MMC4 rows for the OBELICS reader): nothing in it is a document
    (corpus / "zz-wrong-layout.jsonl").write_text(json.dumps({"url": "u", "text_list": ["Words here."], "image_info": []}) + "\n")
    code = main(["run", "--input", str(corpus), "--storage", str(tmp_path / "store"), "--config", _config(str(tmp_path))])
    out, err = capsys.readouterr()
    assert code == 1
    assert re.search(
        r"FAILED: asset '\w+' failed for shard zz-wrong-layout \(job prepare_shards\): .*none of its 1 rows is a document", err
    ), err
    assert "realsyn run: 1 of 5 shards failed and were left out: zz-wrong-layout" in err
    assert "the other 4 shards went through every job, the global steps over them" in err
    assert "asset check" not in err  # every check passed over the good shards
    # the bad-input summary names the planted malformed row (wrong lengths) of the JSONL shard
    assert re.search(r"  part-00003: 1 of \d+ rows dropped \(malformed_document 1; length_mismatch 1\)", out), out
    # the good shards went through the whole graph: the same outputs as a run without the bad shard
    storage = Storage(str(tmp_path / "store"))
    shards = sorted(shard_key(u, str(corpus)) for u in list_input_shards(str(corpus)) if "zz-" not in u)
    assert storage.reader("exported_splits").info["shards"] == shards and not storage.has("image_db", "zz-wrong-layout")
    _check_outputs(storage, shards, planted)
    # the persistent instance holds the runs, the failed one included
    runs = dg.DagsterInstance.from_config(str(home)).get_runs()
    assert sum(r.job_name == "prepare_shards" and r.status == dg.DagsterRunStatus.FAILURE for r in runs) == 1
    assert sum(r.job_name == "caption_shards" and r.status == dg.DagsterRunStatus.SUCCESS for r in runs) == 4
    assert main(["run", "--input", str(tmp_path / "empty"), "--storage", str(tmp_path / "store")]) == 2
