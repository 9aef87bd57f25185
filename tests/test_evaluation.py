"""Evaluation of a split: objectives (CLIP, SigLIP, SuperClass), metrics, the training stream, the stage and the asset."""

import hashlib
import io
import json
import math
import os
from argparse import Namespace

import dagster as dg
import numpy as np
import pytest
import torch
from PIL import Image

from realsyn import layout
from realsyn.evaluation.data import TrainingStream
from realsyn.evaluation.heldout import load_heldout
from realsyn.evaluation.metrics import recall_at_k, zeroshot_accuracy, zeroshot_classifier
from realsyn.evaluation.objectives import OnlineIDF, build_trainee, superclass_loss, superclass_targets
from realsyn.evaluation.train import TrainSettings, evaluate, train_objective
from realsyn.export import make_sample, write_webdataset
from realsyn.storage import MissingOutputError, Storage

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "purple": (140, 30, 160),
    "orange": (250, 140, 20),
}


def _jpeg(rgb, size=48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _samples():
    return [
        make_sample(f"img-{name}", _jpeg(rgb), "jpeg", [f"a {name} square"], [0.9], [f"a plain {name} picture"], 48, 48, f"doc-{name}")
        for name, rgb in COLORS.items()
    ]


def _publish(storage: Storage, splits: dict[str, list], per_tar: int = 3) -> dict[str, str]:
    """Each split published as the export publishes it: ``_exports/{split}/v{N}/`` with the tars, sizes.json,
    the data card and manifest.json, then latest.json; the export's summary names the splits. {split: folder}."""
    from realsyn import datacard
    from realsyn.export import claim_version, point_latest

    with storage.writer(layout.EXPORTED_SPLITS) as w:
        w.write_json(layout.SUMMARY_FILE, {s: {} for s in splits})
        w.commit()
    folders = {}
    for split, samples in splits.items():
        version = claim_version(storage, split)
        folder = storage.path(layout.PUBLISHED_EXPORTS_DIR, split, f"v{version}")
        sizes = write_webdataset(
            iter(samples), lambda name, f=folder: open(os.path.join(f, name), "wb"), samples_per_shard=per_tar, split=split
        )
        digest = hashlib.sha256(json.dumps(sizes, sort_keys=True).encode())
        for name in sorted(sizes):
            digest.update(open(os.path.join(folder, name), "rb").read())
        data_version = "sha256:" + digest.hexdigest()
        with open(os.path.join(folder, layout.SIZES_FILE), "w") as f:
            json.dump(sizes, f)
        facts = {"split": split, "version": version, "samples": sum(sizes.values()), "data_version": data_version}
        datacard.write_card(folder, facts, evaluation={}, filesystem=storage.fs)
        with open(os.path.join(folder, layout.PUBLISHED_MANIFEST_FILE), "w") as f:
            json.dump({"split": split, "version": version, "data_version": data_version, "samples": facts["samples"]}, f)
        point_latest(storage, split, version, data_version)
        folders[split] = folder
    return folders


def _tars(folder: str) -> list[str]:
    with open(os.path.join(folder, layout.SIZES_FILE)) as f:
        return [os.path.join(folder, name) for name in sorted(json.load(f))]


def _heldout_folder(path) -> str:
    (path / "images").mkdir(parents=True)
    names = list(COLORS)
    rows = []
    for i, name in enumerate(names):
        (path / "images" / f"{name}.png").write_bytes(_png(COLORS[name]))
        rows.append(json.dumps({"image": f"images/{name}.png", "label": i, "captions": [f"a {name} square"]}))
    (path / "samples.jsonl").write_text("\n".join(rows) + "\n")
    (path / "classnames.json").write_text(json.dumps({"colors": names, "other": ["x"]}))  # clip_benchmark: {dataset: names}
    (path / "templates.json").write_text(json.dumps({"colors": ["a {c} square.", "a photo of {c}."]}))
    return str(path)


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), rgb).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- objectives
def test_objective_inits_clip_and_siglip_temperature_and_bias():
    siglip = build_trainee("siglip").model
    assert siglip.logit_scale.item() == pytest.approx(math.log(10), abs=1e-6) and siglip.logit_bias.item() == -10.0
    assert siglip.logit_scale.exp().item() == pytest.approx(10.0, rel=1e-6)
    assert siglip.logit_scale.requires_grad and siglip.logit_bias.requires_grad  # learnable
    clip = build_trainee("clip").model
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-6) and getattr(clip, "logit_bias", None) is None
    superclass = build_trainee("superclass")
    assert not hasattr(superclass.model, "transformer") and superclass.model.head.out_features == 49408  # no text tower
    with pytest.raises(ValueError, match="unknown objective"):
        build_trainee("mae")


def _features(trainee, images, texts):
    with torch.no_grad():
        img = trainee.model.encode_image(images, normalize=True).double().numpy()
        txt = trainee.model.encode_text(trainee.tokenizer(texts), normalize=True).double().numpy()
    return img, txt


def _log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_clip_and_siglip_losses_equal_their_formulas():
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    texts = ["a red square", "a dog on grass", "the moon at night"]
    clip = build_trainee("clip")
    img, txt = _features(clip, images, texts)
    logits = math.exp(clip.model.logit_scale.item()) * img @ txt.T
    expected = -0.5 * (np.mean(np.diag(_log_softmax(logits, 1))) + np.mean(np.diag(_log_softmax(logits, 0))))
    with torch.no_grad():
        assert clip.loss(images, texts).item() == pytest.approx(expected, rel=1e-5)

    siglip = build_trainee("siglip")
    img, txt = _features(siglip, images, texts)
    logits = 10.0 * img @ txt.T - 10.0
    labels = 2 * np.eye(3) - 1
    expected = np.sum(np.log1p(np.exp(-labels * logits))) / 3  # -sum log sigmoid(z * logit) / n
    with torch.no_grad():
        assert siglip.loss(images, texts).item() == pytest.approx(expected, rel=1e-5)


def test_online_idf_counts_documents_as_batches_arrive():
    idf = OnlineIDF(5)
    idf.update(torch.tensor([[1.0, 1, 0, 0, 0], [1, 0, 1, 0, 0]]))
    assert idf.documents == 2 and idf.df.tolist() == [2, 1, 1, 0, 0]
    assert idf.weights().tolist() == pytest.approx([0.0, math.log(1.5), math.log(1.5), math.log(3), math.log(3)], abs=1e-6)
    idf.update(torch.tensor([[1.0, 0, 0, 1, 0]]))
    assert idf.documents == 3 and idf.df.tolist() == [3, 1, 1, 1, 0]
    assert idf.weights().tolist() == pytest.approx([0.0, math.log(2), math.log(2), math.log(2), math.log(4)], abs=1e-6)


def test_superclass_targets_and_idf_weighted_softmax_loss():
    # sot=7, eot=8, pad=0; a repeated subword counts once
    tokens = torch.tensor([[7, 2, 3, 2, 8, 0], [7, 1, 8, 0, 0, 0], [7, 4, 8, 0, 0, 0]])
    hot = superclass_targets(tokens, 9, {7, 8})
    assert hot.tolist() == [[0, 0, 1, 1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0, 0]]
    logits = torch.tensor([[0.0, 1, 2, 3, 0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0, 0, 0, 0, 0], [0.0] * 9])
    idf = torch.tensor([0.0, 0.5, 1.0, 3.0, 0.0, 0, 0, 0, 0])  # the third caption's only subword weighs 0: left out
    logp = _log_softmax(logits.double().numpy(), 1)
    row0 = -(1.0 * logp[0, 2] + 3.0 * logp[0, 3]) / 4.0
    row1 = -logp[1, 1]
    assert superclass_loss(logits, hot, idf).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert superclass_loss(logits, hot, torch.zeros(9)).item() == 0.0


# ------------------------------------------------------------------------------------------- metrics
def test_recall_at_k_on_constructed_scores():
    # 3 images, 4 texts: texts 0,1 describe image 0, text 2 image 1, text 3 image 2
    scores = np.array(
        [
            [0.1, 0.9, 0.5, 0.0],  # image 0: its text 1 is first
            [0.8, 0.1, 0.2, 0.7],  # image 1: its text 2 is third
            [0.3, 0.3, 0.9, 0.1],  # image 2: its text 3 is last
        ]
    )
    got = recall_at_k(scores, [0, 0, 1, 2], ks=(1, 2, 3))
    assert got["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert got["text_retrieval_recall@2"] == pytest.approx(1 / 3)
    assert got["text_retrieval_recall@3"] == pytest.approx(2 / 3)
    # text to image: text0 -> [1, 2, 0] (rank 3), text1 -> [0, ...] (1), text2 -> [2, 0, 1] (3), text3 -> [1, 2, 0] (2)
    assert got["image_retrieval_recall@1"] == pytest.approx(1 / 4)
    assert got["image_retrieval_recall@2"] == pytest.approx(2 / 4)
    assert got["image_retrieval_recall@3"] == pytest.approx(1.0)


def test_zeroshot_accuracy_and_classifier_on_constructed_features():
    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.5, 0.4], [0.6, 0.7, 0.1], [0.3, 0.3, 0.2]])
    got = zeroshot_accuracy(logits, [0, 2, 0, 1], ks=(1, 2, 5))
    # ranks of the true class: 1, 2, 2, 2 (a tie ranks the lower index first); no acc5 with 3 classes
    assert got == {"acc1": 0.25, "acc2": 1.0, "mean_per_class_recall": pytest.approx((0.5 + 0 + 0) / 3)}

    table = {"a cat.": [3.0, 0.0], "a photo of cat.": [1.0, 1.0], "a dog.": [0.0, 2.0], "a photo of dog.": [0.0, 5.0]}
    weights = zeroshot_classifier(lambda texts: np.array([table[t] for t in texts]), ["cat", "dog"], ["a {c}.", "a photo of {c}."])
    cat = np.array([1.0, 0.0]) + np.array([1.0, 1.0]) / math.sqrt(2)
    np.testing.assert_allclose(weights[:, 0], cat / np.linalg.norm(cat))
    np.testing.assert_allclose(weights[:, 1], [0.0, 1.0])
    raw = zeroshot_classifier(lambda texts: np.array([table[t] for t in texts]), ["cat"], ["a {c}.", "a photo of {c}."], normalize=False)
    np.testing.assert_allclose(raw[:, 0], [2.0, 0.5])


# ------------------------------------------------------------------------------------------- data
def test_training_stream_draws_real_and_synthetic_texts_and_skips_bad_samples(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    samples = _samples()[:4]
    tars = _tars(_publish(storage, {"s": samples}, per_tar=2)["s"])
    stream = TrainingStream(storage.fs, tars, seed=3)
    pairs = stream.pairs()
    drawn = [next(pairs) for _ in range(40)]  # ten epochs of four samples
    allowed = {t for s in samples for t in s["json"]["real_texts"] + s["json"]["synthetic_texts"]}
    assert {t for _, t in drawn} == allowed  # both kinds of every sample drawn over ten epochs
    assert stream.counts["drawn_real_text"] + stream.counts["drawn_synthetic_text"] == 40 == stream.counts["samples_read"]
    assert stream.counts["drawn_real_text"] > 0 and stream.counts["drawn_synthetic_text"] > 0
    assert all(im.mode == "RGB" and im.size == (48, 48) for im, _ in drawn)

    # a sample without any text and one whose image does not decode: skipped and counted; nothing usable is an error
    import webdataset as wds

    path = str(tmp_path / "bad.tar")
    with wds.TarWriter(path) as sink:
        sink.write({"__key__": "no-text", "jpg": _jpeg(COLORS["red"]), "json": {"real_texts": [], "synthetic_texts": []}})
        sink.write({"__key__": "bad-image", "jpg": b"not a jpeg", "txt": "a red square"})
    stream = TrainingStream(storage.fs, [path], seed=0)
    with pytest.raises(ValueError, match="no usable sample in 1 tar shards"):
        next(stream.pairs())
    assert stream.counts == {"skipped_no_image_or_text": 1, "skipped_UnidentifiedImageError": 1}


def test_open_clip_get_wds_dataset_reads_an_exported_split(tmp_path):
    import open_clip
    from open_clip_train.data import get_wds_dataset

    storage = Storage(str(tmp_path / "store"))
    folder = _publish(storage, {"s": _samples()}, per_tar=3)["s"]
    with open(os.path.join(folder, "sizes.json")) as f:
        sizes = json.load(f)
    assert sorted(sizes.values()) == [2, 3, 3]
    trainee = build_trainee("clip")
    args = Namespace(
        train_data="::".join(_tars(folder)),
        train_num_samples=None,  # from sizes.json beside the tars
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=2,
        workers=0,
        world_size=1,
    )
    data = get_wds_dataset(args, trainee.preprocess_train, is_train=True, tokenizer=open_clip.get_tokenizer("RealSyn-Tiny"))
    assert data.dataloader.num_samples == 8 and data.dataloader.num_batches == 4
    batches = list(data.dataloader)
    assert len(batches) == 4
    assert all(images.shape == (2, 3, 64, 64) and tokens.shape == (2, 77) for images, tokens in batches)
    tokenizer = open_clip.get_tokenizer("RealSyn-Tiny")
    seen = sorted(tuple(row.tolist()) for _, tokens in batches for row in tokens)
    assert seen == sorted(tuple(tokenizer([s["txt"]])[0].tolist()) for s in _samples())  # every sample once, its txt caption


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("objective", ["clip", "siglip", "superclass"])
def test_a_short_run_lowers_the_loss_on_a_tiny_split(tmp_path, objective):
    storage = Storage(str(tmp_path / "store"))
    tars = _tars(_publish(storage, {"s": _samples()})["s"])
    settings = TrainSettings(steps=24, batch_size=8, lr=2e-3, warmup_steps=2, seed=0)
    trainee = build_trainee(objective, seed=0)
    run = train_objective(trainee, TrainingStream(storage.fs, tars, seed=0).batches(8, trainee.preprocess_train), settings)
    losses = [p["loss"] for p in run.curve]
    assert len(losses) == 24 and run.samples_seen == 24 * 8
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    assert [p["lr"] for p in run.curve[:3]] == pytest.approx([1e-3, 2e-3, 2e-3])


def test_evaluate_scores_a_clip_benchmark_folder(tmp_path):
    held = load_heldout(_heldout_folder(tmp_path / "bench"), dataset="colors")
    assert held.size == 8 and held.classnames == list(COLORS) and held.templates == ["a {c} square.", "a photo of {c}."]
    with pytest.raises(ValueError, match="name one as the held-out dataset"):
        load_heldout(str(tmp_path / "bench"))
    metrics = evaluate(build_trainee("superclass"), held, batch_size=3)
    assert metrics["zeroshot_images"] == 8 and metrics["zeroshot_classes"] == 8 and metrics["retrieval_texts"] == 8
    for key in ("zeroshot_acc1", "zeroshot_acc5", "text_retrieval_recall@1", "image_retrieval_recall@5"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["zeroshot_acc5"] >= metrics["zeroshot_acc1"]


# ------------------------------------------------------------------------------------------- stage and asset
def _config(tmp_path, **extra):
    return {"steps": 2, "batch_size": 4, "heldout": _heldout_folder(tmp_path / "bench"), "heldout_dataset": "colors", **extra}


def test_evaluations_asset_records_metrics_curve_and_the_split_data_version(tmp_path):
    from assets.evaluate import SPLITS, evaluations, register_published_splits
    from resources import StorageResource

    root = str(tmp_path / "store")
    storage = Storage(root)
    folders = _publish(storage, {"a": _samples(), "b": _samples()[:5]})
    instance = dg.DagsterInstance.ephemeral()
    assert register_published_splits(instance, storage) == ["a", "b"] and instance.get_dynamic_partitions(SPLITS) == ["a", "b"]
    cfg = _config(tmp_path)

    def run(split):
        result = dg.materialize(
            [evaluations],
            partition_key=split,
            instance=instance,
            resources={"storage": StorageResource(root=root)},
            run_config={"ops": {"evaluations": {"config": cfg}}},
        )
        assert result.success
        return result.asset_materializations_for_node("evaluations")[0].metadata

    meta_a = run("a")
    with open(os.path.join(folders["a"], layout.PUBLISHED_MANIFEST_FILE)) as f:
        version_a = json.load(f)["data_version"]  # the export's content hash of the published version
    assert meta_a["split_data_version"].value == version_a and meta_a["split_version"].value == 1 and meta_a["split_samples"].value == 8
    assert {f"{o}/zeroshot_acc1" for o in ("clip", "siglip", "superclass")} <= set(meta_a)
    assert {f"{o}/image_retrieval_recall@5" for o in ("clip", "siglip", "superclass")} <= set(meta_a)
    assert meta_a["training_curve"].value.startswith("![training loss](data:image/png;base64,")
    assert meta_a["realsyn/data_version"].value

    record = storage.reader(layout.EVALUATIONS, "a").read_json(layout.EVALUATION_FILE)
    assert record["data_version"] == version_a and record["split_version"] == 1 and record["settings"]["batch_size"] == 4
    assert set(record["objectives"]) == {"clip", "siglip", "superclass"}
    curve = storage.reader(layout.EVALUATIONS, "a").read_parquet(layout.TRAINING_CURVE_FILE)
    assert curve.num_rows == 6 and curve.column("objective").to_pylist() == ["clip"] * 2 + ["siglip"] * 2 + ["superclass"] * 2
    assert storage.reader(layout.EVALUATIONS, "a").read_bytes(layout.TRAINING_CURVE_PLOT)[:4] == b"\x89PNG"
    # the published version's data card now carries the evaluation
    from realsyn import datacard

    card = datacard.read_card(folders["a"])
    assert card["evaluation"]["data_version"] == version_a
    assert card["evaluation"]["objectives"]["clip"]["zeroshot_acc1"] == round(record["objectives"]["clip"]["zeroshot_acc1"], 4)
    with open(os.path.join(folders["a"], "README.md")) as f:
        assert "objectives/superclass/zeroshot_acc1" in f.read()

    # split b (5 samples: the batch is capped at its size), then a new version of split a: side by side
    meta_b = run("b")
    assert storage.reader(layout.EVALUATIONS, "b").read_json(layout.EVALUATION_FILE)["settings"]["batch_size"] == 4
    table = meta_b["comparison"].value
    assert table.count("\n| a | 1 | ") == 3 and table.count("\n| b | 1 | ") == 3
    folders = _publish(storage, {"a": _samples()[:6], "b": _samples()[:5]})
    meta_a2 = run("a")
    version_a2 = meta_a2["split_data_version"].value
    assert version_a2 != version_a and meta_a2["split_version"].value == 2
    table = meta_a2["comparison"].value
    assert table.count(f"| a | 1 | {version_a} | 8 |") == 3 and table.count(f"| a | 2 | {version_a2} | 6 |") == 3
    from realsyn.stages.evaluate import evaluation_history

    assert [r["data_version"] for r in evaluation_history(storage, "a")] == [version_a, version_a2]


def test_evaluating_a_split_that_is_not_published_names_the_published_ones(tmp_path):
    from realsyn.stages.evaluate import evaluate_split

    storage = Storage(str(tmp_path / "store"))
    _publish(storage, {"a": _samples()})
    with pytest.raises(MissingOutputError, match=r"split 'zz' has not been published .*published: \['a'\]"):
        evaluate_split(storage, "zz", TrainSettings(steps=1), objectives=["clip"], heldout="embedded:sample-photos")
    with pytest.raises(ValueError, match="choose one or more of clip, siglip, superclass"):
        evaluate_split(storage, "a", TrainSettings(steps=1), objectives=["mae"], heldout="embedded:sample-photos")
    # a split its samplers left empty: recorded as skipped, nothing trained, not an error
    _publish(storage, {"empty": []})
    record = evaluate_split(storage, "empty", TrainSettings(steps=1), objectives=["clip"], heldout="embedded:sample-photos")
    assert record["skipped"] == "no samples in the split" and record["objectives"] == {} and record["samples"] == 0
    assert storage.reader(layout.EVALUATIONS, "empty").read_json(layout.EVALUATION_FILE)["skipped"] == "no samples in the split"


def test_published_splits_sensor_requests_one_evaluation_per_published_split(tmp_path):
    from dagster._core.definitions.partitions.context import partition_loading_context

    from assets.evaluate import published_splits_sensor
    from definitions import build_definitions

    root = str(tmp_path / "store")
    _publish(Storage(root), {"a": _samples()[:2], "b": _samples()[:3]})
    defs = build_definitions("local", input_uri=str(tmp_path / "in"), storage_root=root)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("splits", ["a", "b"])  # the test harness resolves run requests before partition requests
    instance.report_runless_asset_event(dg.AssetMaterialization("exported_splits"))
    ctx = dg.build_sensor_context(instance=instance, definitions=defs, resources={"storage": defs.resources["storage"]})
    with partition_loading_context(dynamic_partitions_store=instance):
        data = published_splits_sensor.evaluate_tick(ctx)
    assert [r.partition_key for r in data.run_requests] == ["a", "b"] and not data.dynamic_partitions_requests
    assert len({r.run_key for r in data.run_requests}) == 2
