import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from realsyn.export import make_sample, safe_key, samples_to_parquet_table, training_caption, write_webdataset
from realsyn.stats import StepStats

FORMATS = [("JPEG", "jpeg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp"), ("TIFF", "tiff")]


def _image(fmt: str, width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _samples() -> list[dict]:
    out = []
    for i, (pil_fmt, fmt) in enumerate(FORMATS):
        w, h = 40 + 3 * i, 30 + 2 * i
        synthetic = [f"synthetic caption {i}"] if i != 1 else []  # sample 1 falls back to its top real text
        out.append(
            make_sample(
                image_id=f"doc.{i}/x#{i}",
                image_bytes=_image(pil_fmt, w, h, i),
                image_format=fmt,
                real_texts=[f"real text {i} a", f"real text {i} b"],
                real_scores=[np.float32(0.5 - 0.01 * i), 0.25],
                synthetic_texts=synthetic,
                width=w,
                height=h,
                doc_id=f"doc.{i}",
                source=f"https://example.org/{i}.img",
            )
        )
    return out


def _write(tmp_path, samples, per_shard=2, stats=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_webdataset(samples, lambda name: open(tmp_path / name, "wb"), samples_per_shard=per_shard, stats=stats)


def test_safe_key_and_training_caption():
    key = safe_key("doc.1/x#2")
    assert "." not in key and "/" not in key and key.startswith("doc_1_x_2-") and len(key) == len("doc_1_x_2-") + 16
    assert safe_key("a.b") != safe_key("a_b")
    assert training_caption(["real"], ["synthetic"]) == "synthetic"
    assert training_caption(["real"], ["", " "]) == "real"
    assert training_caption([], []) is None


def test_webdataset_round_trip(tmp_path):
    samples = _samples()
    stats = StepStats("export")
    sizes = _write(tmp_path, samples, stats=stats)
    assert sizes == {"train-000000.tar": 2, "train-000001.tar": 2, "train-000002.tar": 1}
    assert stats.counts["samples_written"] == 5 and stats.counts["reencoded_jpeg"] == 2
    urls = [str(tmp_path / name) for name in sizes]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg;png;webp", "txt", "json")
    got = list(ds)
    assert [g[0] for g in got] == [s["key"] for s in samples]
    for (_key, image, txt, meta), sample in zip(got, samples):
        assert image.size == (meta["width"], meta["height"]) == (sample["json"]["width"], sample["json"]["height"])
        assert txt == sample["txt"]
        assert meta == json.loads(json.dumps(sample["json"], default=float))
    assert got[1][2] == "real text 1 a" and got[0][2] == "synthetic caption 0"
    assert got[0][3]["real_scores"] == [pytest.approx(0.5), 0.25]


def test_open_clip_pipeline_reads_image_and_text(tmp_path):
    sizes = _write(tmp_path, _samples())
    # The stages open_clip_train.data.get_wds_dataset applies to each sample.
    urls = [str(tmp_path / name) for name in sizes]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pilrgb").rename(image="jpg;png;jpeg;webp", text="txt").to_tuple("image", "text")
    pairs = list(ds)
    assert len(pairs) == sum(sizes.values()) == 5
    assert all(img.mode == "RGB" and isinstance(text, str) and text for img, text in pairs)


def test_member_layout_and_reencoding(tmp_path):
    samples = _samples()
    sizes = _write(tmp_path, samples, per_shard=10)
    assert sizes == {"train-000000.tar": 5}
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
        exts = {n.split(".", 1)[0]: n.split(".", 1)[1] for n in names if not n.endswith((".txt", ".json"))}
        assert [exts[s["key"]] for s in samples] == ["jpg", "png", "webp", "jpg", "jpg"]
        assert names[:3] == [f"{samples[0]['key']}.jpg", f"{samples[0]['key']}.json", f"{samples[0]['key']}.txt"]
        bmp_member = tar.extractfile(f"{samples[3]['key']}.jpg").read()
        jpeg_member = tar.extractfile(f"{samples[0]['key']}.jpg").read()
    assert Image.open(io.BytesIO(bmp_member)).format == "JPEG"
    assert jpeg_member == samples[0]["image_bytes"]  # passed through untouched


def test_rewrite_is_byte_identical(tmp_path):
    a = _write(tmp_path / "a", _samples())
    b = _write(tmp_path / "b", _samples())
    assert a == b
    for name in a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_bad_samples_are_skipped_and_counted(tmp_path):
    samples = _samples()[:2]
    broken = dict(samples[0], key=safe_key("broken"), image_format="gif", image_bytes=b"not an image")
    no_text = dict(samples[1], key=safe_key("no-text"), txt=None)
    no_image = dict(samples[1], key=safe_key("no-image"), image_bytes=None)
    stats = StepStats("export")
    sizes = _write(tmp_path, [broken, samples[0], no_text, no_image, samples[1]], per_shard=10, stats=stats)
    assert sizes == {"train-000000.tar": 2}
    assert stats.dropped == {"missing_image": 1, "missing_txt": 1, "undecodable_image": 1}
    assert _write(tmp_path / "empty", []) == {}
    with pytest.raises(ValueError):
        _write(tmp_path / "bad", [dict(samples[0], key="a.b")])


def test_transparent_image_is_flattened_on_white(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="TIFF")
    sample = make_sample("t", buf.getvalue(), "tiff", ["a real text"], [0.3], [], 20, 10, "d")
    table = samples_to_parquet_table([sample])
    decoded = np.asarray(Image.open(io.BytesIO(table.column("image_bytes")[0].as_py())))
    assert decoded.shape == (10, 20, 3) and decoded.min() > 245


def test_parquet_table(tmp_path):
    samples = _samples()
    table = samples_to_parquet_table(samples)
    pq.write_table(table, tmp_path / "split.parquet")
    back = pq.read_table(tmp_path / "split.parquet")
    assert back.num_rows == 5
    assert back.schema.field("real_texts").type == pa.list_(pa.string())
    assert back.column("image_format").to_pylist() == ["jpeg", "png", "webp", "jpeg", "jpeg"]
    assert back.column("real_texts").to_pylist()[2] == ["real text 2 a", "real text 2 b"]
    assert back.column("synthetic_texts").to_pylist()[1] == []
    assert back.column("txt").to_pylist()[1] == "real text 1 a"
    assert back.column("real_scores").to_pylist()[0] == [pytest.approx(0.5), 0.25]
    for row in back.to_pylist():
        assert Image.open(io.BytesIO(row["image_bytes"])).size == (row["width"], row["height"])
    assert back.column("doc_id").to_pylist()[0] == "doc.0"
