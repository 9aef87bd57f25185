import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from realsyn.export import make_sample, normalize_image, safe_key, samples_to_parquet_table, training_caption, write_webdataset
from realsyn.image_db import UndecodableImageError
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
    # one extension for every sample: png, webp, bmp and tiff re-encoded as JPEG (the lossy re-encoding, counted)
    assert stats.counts["samples_written"] == 5 and stats.counts["reencoded_images"] == 4 and stats.counts["reencoded_lossy"] == 4
    urls = [str(tmp_path / name) for name in sizes]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    got = list(ds)
    reals = list(wds.WebDataset(urls, shardshuffle=False).decode().to_tuple("real0.txt", "real1.txt", "real2.txt"))
    assert reals[3] == ("real text 3 a", "real text 3 b", "")  # every sample has 3 real members: empty where fewer
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
        assert [exts[s["key"]] for s in samples] == ["jpg"] * 5
        key = samples[0]["key"]
        assert names[:6] == [f"{key}.jpg", f"{key}.json", f"{key}.real0.txt", f"{key}.real1.txt", f"{key}.real2.txt", f"{key}.txt"]
        assert len(names) == 6 * 5
        bmp_member = tar.extractfile(f"{samples[3]['key']}.jpg").read()
        jpeg_member = tar.extractfile(f"{samples[0]['key']}.jpg").read()
    assert Image.open(io.BytesIO(bmp_member)).format == "JPEG"
    assert jpeg_member == samples[0]["image_bytes"]  # passed through untouched


@pytest.mark.parametrize("target", ["png", "webp"])
def test_lossless_targets_keep_every_pixel(tmp_path, target):
    samples = _samples()
    stats = StepStats("export")
    sizes = write_webdataset(samples, lambda name: open(tmp_path / name, "wb"), samples_per_shard=10, stats=stats, image_format=target)
    assert sizes == {"train-000000.tar": 5}
    assert stats.counts["reencoded_images"] == 4 and "reencoded_lossy" not in stats.counts
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        images = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith("." + target)}
    assert len(images) == 5
    for sample in samples:
        got = Image.open(io.BytesIO(images[sample["key"]]))
        assert got.format == target.upper()
        want = np.asarray(Image.open(io.BytesIO(sample["image_bytes"])).convert("RGB"))
        assert np.array_equal(np.asarray(got.convert("RGB")), want)  # the decoded pixels, exactly


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
    decoded = np.asarray(Image.open(io.BytesIO(table.column("image")[0].as_py()["bytes"])))
    assert decoded.shape == (10, 20, 3) and decoded.min() > 245


def test_parquet_table(tmp_path):
    samples = _samples()
    table = samples_to_parquet_table(samples)
    pq.write_table(table, tmp_path / "split.parquet")
    back = pq.read_table(tmp_path / "split.parquet")
    assert back.num_rows == 5
    assert back.schema.field("real_texts").type == pa.list_(pa.string())
    assert back.column("image_format").to_pylist() == ["jpeg"] * 5
    assert back.column("image").to_pylist()[1]["path"] == samples[1]["key"] + ".jpg"
    assert back.column("real_texts").to_pylist()[2] == ["real text 2 a", "real text 2 b"]
    assert back.column("synthetic_texts").to_pylist()[1] == []
    assert back.column("txt").to_pylist()[1] == "real text 1 a"
    assert back.column("real_scores").to_pylist()[0] == [pytest.approx(0.5), 0.25]
    for row in back.to_pylist():
        assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (row["width"], row["height"])
    assert back.column("doc_id").to_pylist()[0] == "doc.0"


# ------------------------------------------------------------------------------------------------
# Column-wise per-shard export (ShardSamples) and the per-shard + publish stages.

from realsyn import layout  # noqa: E402
from realsyn.export import (  # noqa: E402
    PARQUET_SCHEMA,
    GatherFile,
    ShardSamples,
    SplitOutput,
    TarStream,
    _add_member,
    header_blocks,
    member_headers,
    reference_samples,
    tar_header,
    tar_member,
)
from realsyn.stages import export as export_stage  # noqa: E402
from realsyn.stages.common import write_retrievals  # noqa: E402
from realsyn.storage import Storage  # noqa: E402

SHARD_FORMATS = [("JPEG", "jpeg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp"), ("JPEG", "jpg")]


def _shard_tables(shard: str, n: int, seed: int) -> tuple[pa.Table, pa.Table, pa.Table]:
    """One shard's filtered images, retrievals and captions, with every kind of bad row planted."""
    rows = []
    for i in range(n):
        pil_fmt, fmt = SHARD_FORMATS[(i + seed) % len(SHARD_FORMATS)]
        data = _image(pil_fmt, 32 + i % 5, 24 + i % 3, seed * 1000 + i)
        if i % 11 == 5:
            fmt, data = "gif", b"not an image"  # undecodable_image
        if i % 13 == 7:
            data = b""  # missing_image
        source = f"https://x.org/{shard}/{i}.img" if i % 6 else None  # inline images have no source
        rows.append((f'{shard}/doc.{i // 3}#{i}"q"\t', data, fmt, 32 + i % 5, 24 + i % 3, f"{shard}/doc.{i // 3}", source))
    cols = list(zip(*rows))
    images = pa.table(
        {
            "image_id": pa.array(cols[0], pa.string()),
            "image_bytes": pa.array(cols[1], pa.binary()),
            "format": pa.array(cols[2], pa.string()),
            "width": pa.array(cols[3], pa.int32()),
            "height": pa.array(cols[4], pa.int32()),
            "doc_id": pa.array(cols[5], pa.string()),
            "source": pa.array(cols[6], pa.string()),
        }
    )
    ids = list(cols[0])
    order = np.random.default_rng(seed).permutation(n)  # retrievals and captions in another row order
    texts = [[f"real é {i} a", f"real {i} b", f"real {i} c"] if i % 7 != 3 else [" ", ""] for i in range(n)]
    retrievals = pa.table(
        {
            "image_id": pa.array([ids[j] for j in order], pa.string()),
            "sentence_ids": pa.array([[f"s{j}a", f"s{j}b"] for j in order], pa.list_(pa.string())),
            "texts": pa.array([texts[j] for j in order], pa.list_(pa.string())),
            "scores": pa.array([[0.5 - 0.001 * j, 0.1 + 1 / 3 if j % 9 else float("nan")] for j in order], pa.list_(pa.float32())),
        }
    )
    # no caption (empty) for every 4th image: the caption falls back to the top real text, or none at all
    captions = pa.table(
        {
            "image_id": pa.array([ids[j] for j in order[::-1]], pa.string()),
            "synthetic_caption": [f"synthétique {j}" if j % 4 else "" for j in order[::-1]],
        }
    )
    return images, retrievals, captions


class _Capture(io.BytesIO):
    def __init__(self, store: dict, name: str):
        super().__init__()
        self.store, self.name = store, name

    def close(self):
        if not self.closed:
            self.store[self.name] = self.getvalue()
        super().close()


def _members(blob: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


@pytest.mark.parametrize("sizes", [[0, 1, 511], [512, 513, 10240], [7] * 40])
def test_tar_stream_is_byte_identical_to_tarfile(sizes):
    members = [(f"k{i}-{'x' * (i % 90)}.bin".encode(), bytes([i % 256]) * n) for i, n in enumerate(sizes)]
    ours, theirs = {}, io.BytesIO()
    stream = TarStream(_Capture(ours, "a"), flush_bytes=1000)
    for name, data in members:
        stream.write(tar_member(name, data))
    stream.close()
    with tarfile.open(fileobj=theirs, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            _add_member(tar, name.decode(), data)
    assert ours["a"] == theirs.getvalue()


def test_member_headers_equal_tar_header_one_by_one_and_refuse_names_over_100_bytes():
    keys = [b"a", b"k" * 90, safe_key("doc.1/x#2").encode()]
    suffixes = ["jpg", "json", "real0.txt", "txt"]
    sizes = np.array([[0, 1, 511, 512], [35_000, 8**11 - 1, 0, 7], [1, 2, 3, 10_240]])
    want = [tar_header(k + b"." + s.encode(), int(sizes[i, j])) for i, k in enumerate(keys) for j, s in enumerate(suffixes)]
    assert member_headers(keys, suffixes, sizes) == b"".join(want)
    blocks = header_blocks(keys, suffixes, sizes)  # the same headers, those of one suffix contiguous
    assert blocks.shape == (len(suffixes), len(keys), 512) and blocks.transpose(1, 0, 2).tobytes() == b"".join(want)
    assert len(b"k" * 90 + b".real0.txt") == 100  # the longest name a plain ustar header holds: written as is
    # one byte more needs a pax header, which the column-wise writer does not write: it refuses (safe_key's
    # keys are at most 81 bytes, so an export never gets there); write_webdataset (tarfile) writes one
    with pytest.raises(ValueError, match="needs a pax header"):
        member_headers([b"k" * 91], ["real0.txt"], np.array([[1]]))
    with pytest.raises(ValueError, match="needs a pax header"):
        member_headers([b"k"], ["json"], np.array([[8**11]]))
    assert member_headers([], suffixes, np.zeros((0, 4))) == b""


def _tar_members(paths) -> list[tuple[str, bytes]]:
    out = []
    for path in paths:
        with tarfile.open(path) as tar:
            out += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return out


def _wds_samples(paths) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in wds.WebDataset([str(p) for p in paths], shardshuffle=False)]


def test_shard_samples_tars_read_back_with_tarfile_and_webdataset(tmp_path):
    images, retrievals, captions = _shard_tables("s1", 30, seed=4)
    chosen = images.column("image_id").to_pylist()[::2]
    texts, sentence_ids = retrievals.column("texts").to_pylist(), retrievals.column("sentence_ids").to_pylist()
    row = retrievals.column("image_id").to_pylist().index
    texts[row(chosen[0])], sentence_ids[row(chosen[1])] = [None, "a real text after a null"], None  # a null text, no sentence ids
    retrievals = retrievals.set_column(1, "sentence_ids", pa.array(sentence_ids, pa.list_(pa.string())))
    retrievals = retrievals.set_column(2, "texts", pa.array(texts, pa.list_(pa.string())))
    sizes, tars, _, stats = _export(images, retrievals, captions, {"a": pa.array(chosen, pa.string())}, 8)["a"]
    paths = []
    for name, blob in tars.items():
        (tmp_path / name).write_bytes(blob)
        paths.append(tmp_path / name)
    # what the members must be: the reference samples through make_sample, one member at a time
    ref = {s["json"]["image_id"]: s for s in reference_samples("s1", images, retrievals, captions, chosen)}
    want = []
    kept = []
    for image_id in chosen:
        sample = ref[image_id]
        try:
            image, _ = normalize_image(sample["image_bytes"], sample["image_format"])
        except UndecodableImageError:
            continue
        if not sample["image_bytes"] or not sample["txt"]:
            continue
        key, meta, real = sample["key"], sample["json"], sample["json"]["real_texts"]
        members = {
            "jpg": image,
            "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode(),
            **{f"real{j}.txt": (real[j] or "").encode() if j < len(real) else b"" for j in range(3)},
            "txt": sample["txt"].encode(),
        }
        want += [(f"{key}.{suffix}", data) for suffix, data in members.items()]
        kept.append(dict(members, __key__=key))
    assert sum(sizes.values()) == len(kept) == stats.counts["samples_written"] == 12 and len(sizes) == 3
    assert ref[chosen[0]]["json"]["real_texts"][0] is None and ref[chosen[1]]["json"]["real_sentence_ids"] is None
    assert (
        kept[0]["real0.txt"] == b""
        and kept[0]["real1.txt"] == b"a real text after a null"
        and b'"real_sentence_ids": null' in kept[1]["json"]
    )
    assert _tar_members(paths) == want  # Python's tarfile: every member, its name and bytes, in order
    assert _wds_samples(paths) == kept  # webdataset: the same samples, grouped by key
    with tarfile.open(paths[0]) as tar:
        assert all(m.isreg() and m.mode == 0o644 and m.mtime == 0 and m.uid == m.gid == 0 for m in tar.getmembers())


def test_webdataset_writer_keeps_a_key_over_100_bytes_in_a_pax_header(tmp_path):
    sample = dict(_samples()[0], key="k" * 120)  # f"{key}.real0.txt" is 130 bytes: more than a ustar name holds
    sizes = _write(tmp_path, [sample], per_shard=10)
    members = _tar_members([tmp_path / name for name in sizes])
    assert [name for name, _ in members] == [f"{'k' * 120}.{s}" for s in ("jpg", "json", "real0.txt", "real1.txt", "real2.txt", "txt")]
    (got,) = _wds_samples([tmp_path / name for name in sizes])
    assert got["__key__"] == "k" * 120 and got["jpg"] == sample["image_bytes"] and got["txt"] == sample["txt"].encode()
    assert got["real1.txt"] == b"real text 0 b" and got["real2.txt"] == b""


def test_gather_file_writes_every_buffer_in_order_and_finishes_short_writes(tmp_path, monkeypatch):
    parts = [bytes([i % 251]) * (i % 7) for i in range(3000)] + [memoryview(b"tail")]  # more buffers than one writev takes
    with GatherFile(str(tmp_path / "a")) as f:
        f.writev(parts)
    assert (tmp_path / "a").read_bytes() == b"".join(parts)
    real = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: real(fd, [bytes(b)[:3] for b in bufs[:1]]))  # 3 bytes per call at most
    with GatherFile(str(tmp_path / "b")) as f:
        f.write(b"0123456789")
        f.writev([b"ab", b"cdef"])
    assert (tmp_path / "b").read_bytes() == b"0123456789abcdef"


def _rows(table: pa.Table) -> list[dict]:
    """Rows with scores as text, so NaN scores compare equal."""
    return [dict(r, real_scores=[repr(x) for x in r["real_scores"]]) for r in table.to_pylist()]


def _export(images, retrievals, captions, selections, batch_rows, **fmt):
    """ShardSamples over ``images`` in batches of ``batch_rows``: {split: (sizes, tars, parquet bytes, stats)}."""
    samples = ShardSamples("s1", images.column("image_id"), retrievals, captions, selections, **fmt)
    files: dict = {}
    outputs = {
        split: SplitOutput(
            lambda name, f=files: _Capture(f, name),
            lambda i, split=split: f"{split}-s1-{i:06d}.tar",
            (lambda split=split: _Capture(files, f"{split}.parquet")) if len(chosen) else None,
            4,
            StepStats(split),
        )
        for split, chosen in selections.items()
    }
    sizes = samples.write(images.to_batches(max_chunksize=batch_rows), outputs)
    return {
        split: (sizes[split], {k: v for k, v in files.items() if k.startswith(f"{split}-")}, files.get(f"{split}.parquet"), out.stats)
        for split, out in outputs.items()
    }


def _reference(images, retrievals, captions, split, chosen, **fmt):
    """The same split through make_sample + write_webdataset / samples_to_parquet_table: (sizes, tars, table, stats)."""
    files, stats = {}, StepStats("old")
    ref = list(reference_samples("s1", images, retrievals, captions, chosen))
    sizes = write_webdataset(
        ref,
        lambda name: _Capture(files, name),
        samples_per_shard=4,
        shard_pattern="{split}-s1-{index:06d}.tar",
        split=split,
        stats=stats,
        **fmt,
    )
    return sizes, files, samples_to_parquet_table(ref, image_format=fmt.get("image_format", "jpg")), stats


@pytest.mark.parametrize(
    "ordered, batch_rows, fmt", [(True, 7, {}), (True, 1000, {"image_format": "png", "real_text_members": 2}), (False, 1000, {})]
)
def test_shard_samples_write_the_reference_samples_byte_for_byte(ordered, batch_rows, fmt):
    images, retrievals, captions = _shard_tables("s1", 60, seed=1)
    ids = images.column("image_id").to_pylist()
    rng = np.random.default_rng(0)
    big = rng.permutation(60)[:45]
    selections = {"big": [ids[i] for i in (np.sort(big) if ordered else big)], "small": [ids[i] for i in range(0, 60, 4)], "none": []}
    got = _export(images, retrievals, captions, {k: pa.array(v, pa.string()) for k, v in selections.items()}, batch_rows, **fmt)
    for split, chosen in selections.items():
        sizes, tars, parquet, stats = got[split]
        want_sizes, want_tars, want_table, want_stats = _reference(images, retrievals, captions, split, chosen, **fmt)
        assert sizes == want_sizes and tars == want_tars  # whole tars identical, byte for byte
        assert stats.counts == want_stats.counts
        if split == "big":
            assert len(sizes) == 10 and sum(sizes.values()) == 38
            assert want_stats.dropped == {"missing_image": 2, "missing_txt": 2, "undecodable_image": 3}
            # jpg: the 23 PNG, WebP and BMP samples re-encoded (lossy); png: all but the 8 PNG ones (lossless)
            png = fmt.get("image_format") == "png"
            assert want_stats.counts["reencoded_images"] == (30 if png else 23)
            assert want_stats.counts["reencoded_lossy"] == (0 if png else 23)
        if chosen:
            table = pq.read_table(io.BytesIO(parquet))
            assert table.schema == PARQUET_SCHEMA and _rows(table) == _rows(want_table)
        else:
            assert parquet is None and sizes == {}


def test_shard_samples_stream_only_rows_in_image_order():
    images, retrievals, captions = _shard_tables("s1", 12, seed=2)
    ids = images.column("image_id").to_pylist()
    samples = ShardSamples("s1", images.column("image_id"), retrievals, captions, {"a": [ids[3], ids[1]]})
    assert not samples.ordered
    out = {"a": SplitOutput(lambda name: io.BytesIO(), lambda i: f"a-{i}.tar", None)}
    with pytest.raises(ValueError, match="not in ascending order: pass the whole image table as one batch"):
        samples.write(images.to_batches(max_chunksize=5), out)
    with pytest.raises(ValueError, match="the batches held 5 image rows, the shard has 12"):
        ShardSamples("s1", images.column("image_id"), retrievals, captions, {"a": [ids[1]]}).write(images.slice(0, 5).to_batches(), out)


def test_shard_samples_name_a_chosen_image_without_retrieval():
    images, retrievals, captions = _shard_tables("s1", 6, seed=2)
    ids = images.column("image_id")
    with pytest.raises(ValueError, match="1 chosen images have no row in the retrievals"):
        ShardSamples("s1", ids, retrievals.slice(1), captions, {"a": ids.to_pylist()})
    with pytest.raises(ValueError, match="no row in the images: 'nope'"):
        ShardSamples("s1", ids, retrievals, captions, {"a": ["nope"]})


# -------------------------------------------------------------------------- stage: per shard + publish

SPLITS = {"cap_a": 0.8, "cap_b": 0.3, "empty": 0.0}


def _fixture_storage(root, shards: dict[str, int], seed: int = 0, ordered: bool = True) -> Storage:
    storage = Storage(str(root))
    rng = np.random.default_rng(seed)
    retrievals = {}
    for k, (shard, n) in enumerate(shards.items()):
        images, retrievals[shard], captions = _shard_tables(shard, n, seed=k + 3)
        with storage.writer(layout.FILTERED_IMAGES, shard) as w:
            w.write_parquet(layout.IMAGES_FILE, images)
        with storage.writer(layout.SYNTHETIC_CAPTIONS, shard) as w:
            w.write_parquet(layout.CAPTIONS_FILE, captions)
    write_retrievals(storage, retrievals)  # one global generation, a file per shard
    _sample(storage, shards, rng, ordered)
    return storage


def _sample(storage: Storage, shards: dict[str, int], rng, ordered: bool = True) -> None:
    """A sampled_splits generation; ``ordered``: every selection in image order, as the samplers write them."""
    with storage.writer(layout.SAMPLED_SPLITS) as w:
        for split, fraction in SPLITS.items():
            for shard in shards:
                ids = (
                    storage.reader(layout.FILTERED_IMAGES, shard).read_parquet(layout.IMAGES_FILE, columns=["image_id"]).column("image_id")
                )
                keep = rng.permutation(len(ids))[: int(fraction * len(ids))]
                keep = np.sort(keep) if ordered else keep
                chosen = ids.take(pa.array(keep, pa.int64()))
                w.write_parquet(
                    layout.split_selection_file(split, shard), pa.table({"image_id": chosen, "cluster": pa.array(keep % 5, pa.int32())})
                )
        w.write_json(layout.SUMMARY_FILE, {split: {} for split in SPLITS})
        w.commit(info={"shards": list(shards)})


def _split_members(reader, split: str) -> list[tuple[str, bytes]]:
    sizes = reader.read_json(f"{split}/{layout.SIZES_FILE}")
    out = []
    for name, n in sizes.items():
        members = _members(reader.read_bytes(f"{split}/{name}"))
        assert len(members) == 6 * n  # image, json, real0..2.txt, txt
        out += members
    return out


SHARDS = {"a-0": 40, "b-1": 23, "c.2": 9}


@pytest.mark.parametrize("ordered, batch_rows", [(True, 7), (False, 256)])  # streamed in batches, or one batch
def test_per_shard_export_and_publish_match_the_old_single_process_export(tmp_path, monkeypatch, ordered, batch_rows):
    monkeypatch.setattr(export_stage, "IMAGE_BATCH_ROWS", batch_rows)
    storage = _fixture_storage(tmp_path / "store", SHARDS, ordered=ordered)
    old = export_stage.export_splits_single_process(storage, list(SHARDS), samples_per_shard=5, asset="old_export")
    shard_stats = {s: export_stage.export_shard(storage, s, samples_per_shard=5) for s in SHARDS}
    published = export_stage.publish_splits(storage, list(SHARDS))
    new_reader, old_reader = storage.reader(layout.EXPORTED_SPLITS), storage.reader("old_export")
    for split in SPLITS:
        # the same samples (every member, byte for byte), shard after shard, in the same order within each shard
        assert _split_members(new_reader, split) == _split_members(old_reader, split)
        sizes = new_reader.read_json(f"{split}/sizes.json")
        assert sum(sizes.values()) == sum(old_reader.read_json(f"{split}/sizes.json").values()) == published[split].counts["rows_out"]
        for shard in SHARDS:
            own = {k: v for k, v in sizes.items() if k.startswith(f"{split}-{shard}-")}
            per_shard = storage.reader(layout.EXPORTED_SHARDS, shard).read_json(f"{split}/sizes.json")
            assert own == per_shard and list(own) == [f"{split}-{shard}-{i:06d}.tar" for i in range(len(own))]
            assert all(n == 5 for n in list(own.values())[:-1])
            name = f"{split}/parquet/{shard}.parquet"
            assert new_reader.has(name) == old_reader.has(name)
            if old_reader.has(name):
                assert _rows(new_reader.read_parquet(name)) == _rows(old_reader.read_parquet(name))
        assert new_reader.read_bytes(f"{split}/train_data.txt").decode() == "::".join(new_reader.uri(f"{split}/{n}") for n in sizes)
        tar_counts = (
            "tar_shards",
            "source_shards",
            "shards_written",
            "published_version",
            "new_version",
        )  # tars are cut per shard now, across shards before
        assert {k: v for k, v in published[split].counts.items() if k not in tar_counts} == {
            k: v for k, v in old[split].counts.items() if k not in tar_counts
        }
        assert published[split].counts["source_shards"] == sum(1 for s in SHARDS if shard_stats[s][split].counts["rows_out"])
    assert [published[s].counts["rows_out"] for s in SPLITS] == [46, 17, 0]
    assert published["cap_a"].counts["tar_shards"] == 10  # per shard: ceil(27/5) + ceil(14/5) + ceil(5/5)
    assert new_reader.read_json("summary.json")["cap_a"]["rows_out"] == 46


def test_published_split_reads_like_open_clip_and_survives_a_shard_reexport(tmp_path):
    import webdataset as wds

    storage = _fixture_storage(tmp_path / "store", SHARDS)
    for s in SHARDS:
        export_stage.export_shard(storage, s, samples_per_shard=4)
    export_stage.publish_splits(storage, list(SHARDS))
    reader = storage.reader(layout.EXPORTED_SPLITS)
    urls = reader.read_bytes("cap_b/train_data.txt").decode().split("::")
    # open_clip_train.data.get_dataset_size: sizes.json in the folder of the shards, looked up by basename
    sizes = json.loads((tmp_path / os.path.dirname(urls[0]) / "sizes.json").read_text())
    assert sum(sizes[os.path.basename(u)] for u in urls) == 17
    # a shard exported again replaces its own generation; the published split keeps its copies
    export_stage.export_shard(storage, "a-0", samples_per_shard=4)
    pairs = list(
        wds.WebDataset(urls, shardshuffle=False).decode("pilrgb").rename(image="jpg;png;webp", text="txt").to_tuple("image", "text")
    )
    assert len(pairs) == 17 and all(img.mode == "RGB" and text.strip() for img, text in pairs)


def test_publish_refuses_shards_exported_from_an_older_sampling(tmp_path):
    storage = _fixture_storage(tmp_path / "store", SHARDS)
    for s in SHARDS:
        export_stage.export_shard(storage, s)
    _sample(storage, SHARDS, np.random.default_rng(1))  # a new sampled_splits generation
    export_stage.export_shard(storage, "b-1")
    with pytest.raises(export_stage.StaleExportError, match="2 of 3 shards were exported from an older sampled_splits: a-0, c.2"):
        export_stage.publish_splits(storage, list(SHARDS))
    for s in ("a-0", "c.2"):
        export_stage.export_shard(storage, s)
    published = export_stage.publish_splits(storage, list(SHARDS))
    assert [published[s].counts["rows_out"] for s in SPLITS] == [46, 14, 0]  # the new sampling's (the first gave 46, 17, 0)


def test_export_shard_refuses_a_shard_sampling_did_not_cover(tmp_path):
    storage = _fixture_storage(tmp_path / "store", SHARDS)
    with pytest.raises(ValueError, match="sampled_splits does not cover shard 'zzz'"):
        export_stage.export_shard(storage, "zzz")


def test_shard_samples_escape_json_like_json_dumps():
    """Texts, sentence ids, doc ids and sources with characters JSON escapes (quotes, backslashes, control
    characters) or nulls: the column-wise json member equals json.dumps' byte for byte."""
    images, retrievals, captions = _shard_tables("s1", 40, seed=2)
    tricky = ['say "hi"', "back\\slash", "tab\there", "line\nbreak", "\x01ctl\x1f", "é 字 \u2028\x7f", " ", ""]
    texts = [[tricky[i % 8], None, tricky[(i + 3) % 8]] if i % 6 else [tricky[i % 8]] for i in range(retrievals.num_rows)]
    sentence_ids = [[f's{i}"', None] if i % 4 else [] for i in range(retrievals.num_rows)]
    retrievals = retrievals.set_column(2, "texts", pa.array(texts, pa.list_(pa.string())))
    retrievals = retrievals.set_column(1, "sentence_ids", pa.array(sentence_ids, pa.list_(pa.string())))
    doc_ids = [None if i % 9 == 2 else f"d\\{i}\n" for i in range(images.num_rows)]
    sources = [None if i % 5 == 1 else f'https://x.org/"{i}"' for i in range(images.num_rows)]
    images = images.set_column(5, "doc_id", pa.array(doc_ids, pa.string())).set_column(6, "source", pa.array(sources, pa.string()))
    chosen = images.column("image_id").to_pylist()
    got = _export(images, retrievals, captions, {"all": pa.array(chosen, pa.string())}, 16)
    sizes, tars, _, stats = got["all"]
    want_sizes, want_tars, _, want_stats = _reference(images, retrievals, captions, "all", chosen)
    assert sizes == want_sizes and tars == want_tars and stats.counts == want_stats.counts
    assert any(b'\\"hi\\"' in t and b"\\u0001ctl\\u001f" in t for t in tars.values())


def test_json_string_values_equal_json_strings():
    from realsyn.export import _json_string_values, _json_strings

    values = ["a", 'say "hi"', "back\\slash", "tab\t", "nl\n", "\x00\x1f", "\x7f", "é 字 \u2028", None, "", " "]
    assert _json_string_values(pa.array(values, pa.string())).to_pylist() == _json_strings(values)
    assert _json_string_values(pa.array(values, pa.large_string())).to_pylist() == _json_strings(values)
    assert _json_string_values(pa.array(["plain", None], pa.string())).to_pylist() == ['"plain"', "null"]
    assert _json_string_values(pa.array([1, None], pa.int64())).to_pylist() == ["1", "null"]
