"""The export as its users load it: published versions (_exports/{split}/v{N}/ + latest.json), the data
card beside the data, and the real Hugging Face ``datasets`` library reading both forms offline."""

import collections
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from realsyn import datacard, layout
from realsyn.export import JSON_MEMBER_FEATURES, published_split_path, published_versions
from realsyn.stages import export as export_stage
from realsyn.storage import Storage
from tests.test_export import SHARDS, _fixture_storage, _sample


def _export_all(storage, **fmt):
    for s in SHARDS:
        export_stage.export_shard(storage, s, samples_per_shard=4, **fmt)
    return export_stage.publish_splits(storage, list(SHARDS), input_uri="/data/in")


def _storage(tmp_path, **kw) -> Storage:
    _fixture_storage(tmp_path / "store", SHARDS)
    return Storage(str(tmp_path / "store"), **kw)


def test_publish_versions_by_content_and_keeps_old_versions_through_sweeps(tmp_path):
    # retention 1, no grace: every commit deletes the superseded generation at once
    storage = _storage(tmp_path, retention=1, grace_s=0)
    first = _export_all(storage)
    assert [first[s].counts["published_version"] for s in ("cap_a", "cap_b", "empty")] == [1, 1, 1]
    v1 = published_split_path(storage, "cap_b")
    assert v1 == str(tmp_path / "store" / "_exports" / "cap_b" / "v1") == published_split_path(str(tmp_path / "store"), "cap_b", 1)
    manifest = json.loads((tmp_path / "store/_exports/cap_b/v1/manifest.json").read_text())
    assert manifest["samples"] == 17 and manifest["data_version"].startswith("sha256:")
    # a trainer reads v1 from its own train_data.txt: URIs inside the version folder
    urls = open(os.path.join(v1, layout.TRAIN_DATA_FILE)).read().split("::")
    assert urls and all(u.startswith(v1 + "/cap_b-") for u in urls)
    sizes = json.load(open(os.path.join(v1, "sizes.json")))
    assert sum(sizes.values()) == 17 and sorted(os.path.basename(u) for u in urls) == sorted(sizes)
    v1_bytes = {u: open(u, "rb").read() for u in urls}

    # the same content again (shards re-exported, published again): no new version
    again = _export_all(storage)
    assert again["cap_b"].counts["published_version"] == 1 and again["cap_b"].counts["new_version"] == 0
    assert sorted(published_versions(storage, "cap_b")) == [1]

    # a new sampling: new content, a new version; latest flips to it, v1 stays whole
    _sample(storage, SHARDS, np.random.default_rng(1))
    third = _export_all(storage)
    assert third["cap_b"].counts["published_version"] == 2 and third["cap_b"].counts["new_version"] == 1
    assert published_split_path(storage, "cap_b") == str(tmp_path / "store/_exports/cap_b/v2")
    assert json.loads((tmp_path / "store/_exports/cap_b/latest.json").read_text())["version"] == 2
    storage.sweep()
    assert len(list((tmp_path / "store" / layout.EXPORTED_SPLITS / "_global").glob("g-*"))) == 1  # old generations gone
    assert {u: open(u, "rb").read() for u in urls} == v1_bytes  # published v1 untouched
    v1_data_version = published_versions(storage, "cap_b")[1]["data_version"]
    assert published_versions(storage, "cap_b")[2]["data_version"] != v1_data_version

    # back to the first sampling's content: latest points at v1 again, no v3
    storage.reader(layout.SAMPLED_SPLITS)  # (sanity: readable)
    _sample(storage, SHARDS, np.random.default_rng(0))
    fourth = _export_all(storage)
    assert fourth["cap_b"].counts["published_version"] == 1 and sorted(published_versions(storage, "cap_b")) == [1, 2]
    assert published_split_path(storage, "cap_b") == v1


def test_published_split_path_refuses_what_is_not_published(tmp_path):
    storage = _storage(tmp_path)
    with pytest.raises(FileNotFoundError, match="split 'cap_a' has not been published"):
        published_split_path(storage, "cap_a")
    _export_all(storage)
    with pytest.raises(FileNotFoundError, match="no complete published version 7"):
        published_split_path(storage, "cap_a", 7)
    os.makedirs(tmp_path / "store/_exports/cap_a/v2")  # a publish that died before its manifest
    assert sorted(published_versions(storage, "cap_a")) == [1]
    with pytest.raises(FileNotFoundError, match="no complete published version 2"):
        published_split_path(storage, "cap_a", 2)
    with pytest.raises(ValueError, match="version must be a number"):
        published_split_path(storage, "cap_a", "v1")


def test_publish_refuses_shards_exported_in_different_formats(tmp_path):
    storage = _storage(tmp_path)
    for s in SHARDS:
        export_stage.export_shard(storage, s, samples_per_shard=4, image_format="png" if s == "b-1" else "jpg")
    with pytest.raises(export_stage.MixedExportFormatError, match="different settings"):
        export_stage.publish_splits(storage, list(SHARDS))


def test_data_card_facts_beside_the_data(tmp_path):
    storage = _storage(tmp_path)
    with storage.writer(layout.IMAGE_CLUSTERS) as w:  # every candidate's cluster sizes, before any cap
        w.write_numpy(layout.CLUSTER_COUNTS_FILE, np.array([30, 1, 4, 0, 9], np.int64))
    _export_all(storage)
    folder = published_split_path(storage, "cap_a")
    card = datacard.read_card(folder)
    facts = card["facts"]
    assert card["evaluation"] is None
    assert (
        facts["split"] == "cap_a" and facts["version"] == 1 and facts["samples"] == 46 and facts["tar_shards"] == 13
    )  # ceil(27/4) + ceil(14/4) + ceil(5/4)
    assert facts["format"]["members"] == ["jpg", "json", "real0.txt", "real1.txt", "real2.txt", "txt"]
    assert facts["drops"]["exported_shards:cap_a"] == {"missing_image": 4, "missing_txt": 1, "undecodable_image": 6}
    assert 46 + 4 + 1 + 6 == sum(len(storage.reader(layout.SAMPLED_SPLITS).read_parquet(f"cap_a/{s}.parquet")) for s in SHARDS)
    assert facts["stage_counts"]["cap_a: exported"] == 46
    # text lengths: one synthetic (or fallback) caption per sample, real texts as retrieved
    assert sum(facts["text_length"]["synthetic_length"]["counts"]) == 46
    rows = [
        r
        for f in sorted(os.listdir(os.path.join(folder, "parquet")))
        if f.endswith(".parquet")
        for r in pq.read_table(os.path.join(folder, "parquet", f)).to_pylist()
    ]
    scores = [s for r in rows for s in r["real_scores"] if s == s]  # NaN scores are in no bin
    assert sum(facts["similarity"]["real_score"]["counts"]) == len(scores) and len(rows) == 46
    # hosts of the image sources (every 6th image is inline: no URL)
    hosts = facts["sources"]["domains"]
    assert hosts["x.org"] + hosts.get("(no URL: inline or local)", 0) == 46
    assert facts["sources"]["input"] == "/data/in" and facts["sources"]["input_shards"] == list(SHARDS)
    assert facts["licenses"] is None and facts["code"]["realsyn"]
    # cluster sizes: before the cap from image_clusters' counts (empty clusters left out), after it from the split's choice
    clusters = facts["cluster_sizes"]
    assert clusters["before_cap"]["counts"] == [1, 0, 1, 0, 1, 1] + [0] * 9  # 1 | 4 in 3-4 | 9 in 9-16 | 30 in 17-32
    chosen = collections.Counter(
        c for s in SHARDS for c in storage.reader(layout.SAMPLED_SPLITS).read_parquet(f"cap_a/{s}.parquet").column("cluster").to_pylist()
    )
    assert sum(chosen.values()) == 57 and clusters["after_cap"] == datacard.histogram(list(chosen.values()), datacard.CLUSTER_SIZE_EDGES)
    assert sum(clusters["after_cap"]["counts"]) == 5 and clusters["largest_after_cap"] == max(chosen.values())
    readme = open(os.path.join(folder, "README.md")).read()
    assert readme.startswith("---\n") and "path: '*.tar'" in readme and "Not evaluated yet." in readme
    assert "## Drop reasons" in readme and "| exported_shards:cap_a | undecodable_image | 6 |" in readme

    # an evaluation lands: the card is rewritten, the data (and its data version) is not
    data_before = {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder) if f.endswith(".tar")}
    md = datacard.write_card(folder, evaluation={"zero_shot": {"imagenet_top1": 0.125}, "model": "RN50"})
    assert "| zero_shot/imagenet_top1 | 0.125 |" in md and "| model | RN50 |" in md
    assert datacard.read_card(folder)["evaluation"] == {"zero_shot": {"imagenet_top1": 0.125}, "model": "RN50"}
    assert "| zero_shot/imagenet_top1 | 0.125 |" in open(os.path.join(folder, "README.md")).read()
    assert {f: open(os.path.join(folder, f), "rb").read() for f in data_before} == data_before
    datacard.write_card(folder, facts=dict(facts, samples=46))  # new facts keep the evaluation
    assert datacard.read_card(folder)["evaluation"]["model"] == "RN50"
    # the generation's card says the same, and where the published version is
    gen = storage.reader(layout.EXPORTED_SPLITS)
    assert gen.read_json("cap_a/published.json")["uri"] == folder
    assert gen.read_json("cap_a/datacard.json")["facts"]["data_version"] == facts["data_version"]


def test_histograms_have_fixed_edges_and_add_up():
    a = datacard.histogram([0, 0.5, 19, 20, 25, 5000, float("nan")], datacard.TEXT_LENGTH_EDGES)
    assert a["counts"][:4] == [2, 1, 2, 0] and a["counts"][-1] == 1 and sum(a["counts"]) == 6
    b = datacard.histogram([1, 2, 3, 4, 5, 9, 100000], datacard.CLUSTER_SIZE_EDGES)
    assert b["counts"][:5] == [1, 1, 2, 1, 1] and b["counts"][-1] == 1
    assert datacard.merge_histograms(a, a)["counts"][:3] == [4, 2, 4]
    assert datacard.merge_histograms(None, a) == a
    with pytest.raises(ValueError, match="different edges"):
        datacard.merge_histograms(a, b)
    md = datacard.render_markdown({"split": "s", "cluster_sizes": {"before_cap": b}})
    assert "| 3-4 | 2 | 28.6% |" in md and "| >= 65537 | 1 |" in md


def test_datacard_imports_without_dagster():
    code = "import sys, realsyn.datacard, realsyn.export; assert 'dagster' not in sys.modules, 'dagster imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("image_format", ["jpg", "png"])
def test_hugging_face_datasets_loads_both_forms(tmp_path, monkeypatch, image_format):
    import datasets
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    storage = _storage(tmp_path)
    _export_all(storage, image_format=image_format)
    folder = published_split_path(storage, "cap_a")
    parquet_rows = [
        r
        for f in sorted(os.listdir(os.path.join(folder, "parquet")))
        if f.endswith(".parquet")
        for r in pq.read_table(os.path.join(folder, "parquet", f)).to_pylist()
    ]

    wds = datasets.load_dataset(folder, split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert wds.num_rows == 46 == len(parquet_rows)
    assert isinstance(wds.features[image_format], datasets.Image)
    assert set(wds.column_names) == {image_format, "json", "real0.txt", "real1.txt", "real2.txt", "txt", "__key__", "__url__"}
    by_key = {r["key"]: r for r in parquet_rows}
    for row in wds:
        want = by_key[row["__key__"]]
        assert row[image_format].size == (want["width"], want["height"])
        assert row["txt"] == want["txt"] and row["json"]["real_texts"] == want["real_texts"]
        assert [row[f"real{j}.txt"] for j in range(3)] == [(want["real_texts"] + ["", "", ""])[j] for j in range(3)]

    # the json member as written has exactly the fields the card declares
    tar = sorted(f for f in os.listdir(folder) if f.endswith(".tar"))[0]
    with tarfile.open(os.path.join(folder, tar)) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(".json"))
        assert list(json.loads(t.extractfile(member).read())) == list(JSON_MEMBER_FEATURES)

    table = datasets.load_dataset(os.path.join(folder, "parquet"), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert isinstance(table.features["image"], datasets.Image) and table.num_rows == 46
    first = table[0]
    assert first["image"].size == (first["width"], first["height"]) and first["image"].format == {"jpg": "JPEG", "png": "PNG"}[image_format]
    assert first["key"] == parquet_rows[0]["key"] and first["real_texts"] == parquet_rows[0]["real_texts"]


def test_publish_on_s3(tmp_path):
    from tests.s3_server import moto_s3

    with moto_s3(("realsyn",)):
        storage = _fixture_storage("s3://realsyn/store", SHARDS)
        _export_all(storage)
        folder = published_split_path("s3://realsyn/store", "cap_b")
        assert folder == "s3://realsyn/store/_exports/cap_b/v1" == published_split_path(storage, "cap_b", 1)
        sizes = json.loads(storage.fs.cat_file("realsyn/store/_exports/cap_b/v1/sizes.json"))
        urls = storage.fs.cat_file("realsyn/store/_exports/cap_b/v1/train_data.txt").decode().split("::")
        assert sum(sizes.values()) == 17 and sorted(u.rsplit("/", 1)[1] for u in urls) == sorted(sizes)
        assert all(u.startswith(folder + "/") and storage.fs.exists(u) for u in urls)
        assert datacard.read_card(folder)["facts"]["samples"] == 17
        datacard.write_card(folder, evaluation={"zero_shot": 0.5})
        assert "| zero_shot | 0.5 |" in storage.fs.cat_file("realsyn/store/_exports/cap_b/v1/README.md").decode()
        _export_all(storage)  # the same content: still v1 only
        assert sorted(published_versions(storage, "cap_b")) == [1]
