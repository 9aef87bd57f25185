"""Input readers as plug-ins: the MMC4 layout (images placed right before their matched paragraph),
its malformed rows, S3 shards, and MMC4 / OBELICS twins giving identical documents and DB rows."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from realsyn.image_db import FetchPolicy, ImageFetcher, build_image_table, build_sentence_table
from realsyn.plugins import PluginConfigError, build_plugin, plugin_class
from realsyn.plugins.kinds import InputReader
from realsyn.readers import Document
from realsyn.readers.mmc4 import Mmc4Reader
from realsyn.readers.obelics import ObelicsReader
from realsyn.stats import StepStats
from realsyn.text.sentences import SentenceSplitter
from tests.s3_server import moto_s3


def _encode(size, fmt, color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


PNG = _encode((96, 64), "PNG", (200, 30, 60))
JPEG = _encode((64, 120), "JPEG", (10, 160, 90))
B64_PNG = base64.b64encode(PNG).decode()
B64_JPEG = base64.b64encode(JPEG).decode()

PARAS = ["A cat sat on the mat. It purred.", "The mat was red.", "Then it slept."]


def _img(name, url=None, index=None, sim=0.3, **extra):
    info = {"image_name": name, "raw_url": url, "matched_text_index": index, "matched_sim": sim}
    info.update(extra)
    return info


# One well-formed document exercising every placement rule (JSONL: inline bytes are base64).
M0 = {
    "url": "https://example.org/cats",
    "text_list": PARAS,
    "image_info": [
        _img("a.jpg", "http://127.0.0.1:1/a.jpg", 1, 0.31),
        _img("b.png", None, 1, 0.29, image_bytes=B64_PNG),  # second image on paragraph 1: keeps order
        _img("c.jpg", "http://127.0.0.1:1/ignored.jpg", 0, 0.25, base64=B64_JPEG),  # inline wins over raw_url
        _img("d.jpg", "http://127.0.0.1:1/d.jpg", 7, 0.22),  # out of range: appended
        _img("e.jpg", "pics/e.jpg"),  # no matched_text_index: appended; relative path beside the shard
    ],
    "similarity_matrix": [[0.1, 0.31, 0.0], [0.2, 0.29, 0.1]],
    "could_have_url_duplicate": 0,
}


def _m0_expected(shard_dir, doc_id="https://example.org/cats", metadata=None):
    return Document(
        doc_id,
        [JPEG, None, "http://127.0.0.1:1/a.jpg", PNG, None, None, "http://127.0.0.1:1/d.jpg", os.path.join(shard_dir, "pics/e.jpg")],
        [None, PARAS[0], None, None, PARAS[1], PARAS[2], None, None],
        metadata
        if metadata is not None
        else {"url": "https://example.org/cats", "similarity_matrix": M0["similarity_matrix"], "could_have_url_duplicate": 0},
    )


JSONL_ROWS = [
    json.dumps(M0).encode(),
    b"",  # blank: not a row
    b'{"url": "broken", "text_list": [',  # 1: bad JSON
    b'["not", "an", "object"]',  # 2
    json.dumps({"url": "u3", "text_list": ["ok", 5], "image_info": []}).encode(),  # 3: text is not a string
    json.dumps({"url": "u4", "text_list": ["ok"], "image_info": ["x.jpg"]}).encode(),  # 4: image_info entry not an object
    json.dumps({"url": "u5", "text_list": ["ok"], "image_info": [_img("n.jpg", None, 0)]}).encode(),  # 5: no usable ref
    json.dumps({"url": "u6", "text_list": ["ok"], "image_info": [_img("z.png", None, 0, image_bytes="%%not base64%%")]}).encode(),  # 6
    json.dumps({"url": "u7", "image_info": []}).encode(),  # 7: no text_list
    json.dumps({"url": "u8", "text_list": ["ok"], "image_info": None}).encode(),  # 8: image_info not a list
    json.dumps({"document_id": 42, "url": "ignored", "text_list": ["Text only."], "image_info": []}).encode(),  # 9
    json.dumps(
        {"text_list": [], "image_info": [_img("f.jpg", "s3://bkt/f.jpg", 0), _img("g.png", None, None, bytes="data:image/png;base64,AAAA")]}
    ).encode(),  # 10
    json.dumps(
        {"url": "https://example.org/cats", "text_list": ["Again."], "image_info": [_img("h.jpg", "http://127.0.0.1:1/h.jpg", True)]}
    ).encode(),  # 11
]


def _check_jsonl(docs, stats, shard_dir, stem):
    assert [d.doc_id for d in docs] == ["https://example.org/cats", "42", f"{stem}-10", "https://example.org/cats~11"]
    assert docs[0] == _m0_expected(shard_dir)
    assert docs[1] == Document("42", [None], ["Text only."], {"document_id": 42, "url": "ignored"})
    # no paragraphs: every image is unmatched, appended in image_info order; data: URIs stay as they are
    assert docs[2].images == ["s3://bkt/f.jpg", "data:image/png;base64,AAAA"] and docs[2].texts == [None, None]
    assert docs[2].metadata == {}
    # a bool is not a paragraph index: the image goes after the last paragraph
    assert docs[3].images == [None, "http://127.0.0.1:1/h.jpg"] and docs[3].texts == ["Again.", None]
    assert stats.counts["documents_in"] == 12
    assert stats.counts["renamed_duplicate_doc_id"] == 1
    assert stats.dropped == {"malformed_document": 8}


def _touch(path, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_mmc4_jsonl_and_gz_place_images_before_their_paragraph(tmp_path):
    body = b"\n".join(JSONL_ROWS) + b"\n"
    for name, data in (("m.jsonl", body), ("sub/n.jsonl.gz", gzip.compress(body))):
        shard = _touch(tmp_path / name, data)
        stats = StepStats("documents")
        docs = list(Mmc4Reader().iter_documents(shard, stats))
        _check_jsonl(docs, stats, os.path.dirname(shard), name.rsplit("/", 1)[-1].split(".")[0])


MMC4_PARQUET_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("text_list", pa.list_(pa.string())),
        (
            "image_info",
            pa.list_(
                pa.struct(
                    [
                        ("image_name", pa.string()),
                        ("raw_url", pa.string()),
                        ("matched_text_index", pa.int64()),
                        ("matched_sim", pa.float64()),
                        ("image_bytes", pa.binary()),
                    ]
                )
            ),
        ),
        ("similarity_matrix", pa.list_(pa.list_(pa.float64()))),
        ("could_have_url_duplicate", pa.int64()),
    ]
)


def _parquet_m0():
    row = dict(M0)
    row["image_info"] = [
        {"image_name": "a.jpg", "raw_url": "http://127.0.0.1:1/a.jpg", "matched_text_index": 1, "matched_sim": 0.31, "image_bytes": None},
        {"image_name": "b.png", "raw_url": None, "matched_text_index": 1, "matched_sim": 0.29, "image_bytes": PNG},
        {
            "image_name": "c.jpg",
            "raw_url": "http://127.0.0.1:1/ignored.jpg",
            "matched_text_index": 0,
            "matched_sim": 0.25,
            "image_bytes": JPEG,
        },
        {"image_name": "d.jpg", "raw_url": "http://127.0.0.1:1/d.jpg", "matched_text_index": 7, "matched_sim": 0.22, "image_bytes": None},
        {"image_name": "e.jpg", "raw_url": "pics/e.jpg", "matched_text_index": None, "matched_sim": 0.3, "image_bytes": None},
    ]
    return row


def test_mmc4_parquet_raw_bytes_in_small_batches(tmp_path):
    rows = [
        _parquet_m0(),
        {"url": None, "text_list": None, "image_info": [], "similarity_matrix": None, "could_have_url_duplicate": 1},  # 1: malformed
        {"url": None, "text_list": ["Only words."], "image_info": [], "similarity_matrix": [], "could_have_url_duplicate": 0},
        {  # 3: an image with nothing to fetch
            "url": "u3",
            "text_list": ["x"],
            "image_info": [{"image_name": "q.jpg", "raw_url": "  ", "matched_text_index": 0, "matched_sim": 0.2, "image_bytes": b""}],
            "similarity_matrix": None,
            "could_have_url_duplicate": 0,
        },
    ]
    shard = str(tmp_path / "part-7.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=MMC4_PARQUET_SCHEMA), shard)
    stats = StepStats("documents")
    docs = list(Mmc4Reader(batch_size=1).iter_documents(shard, stats))
    assert docs[0] == _m0_expected(str(tmp_path))
    assert docs[1] == Document("part-7-2", [None], ["Only words."], {"url": None, "similarity_matrix": [], "could_have_url_duplicate": 0})
    assert len(docs) == 2
    assert stats.counts["documents_in"] == 4 and stats.dropped == {"malformed_document": 2}


def test_mmc4_is_lazy_and_images_dir_uses_image_name(tmp_path):
    lines = [
        json.dumps({"id": str(i), "text_list": [f"Text {i}."], "image_info": [_img(f"{i}.jpg", f"http://127.0.0.1:1/{i}.jpg", 0)]})
        for i in range(3)
    ]
    shard = _touch(tmp_path / "corpus" / "lazy.jsonl", "\n".join(lines).encode())
    stats = StepStats("documents")
    it = Mmc4Reader().iter_documents(shard, stats)
    assert next(it).images == ["http://127.0.0.1:1/0.jpg", None]
    assert stats.counts["documents_in"] == 1  # nothing read ahead
    local = list(Mmc4Reader(images_dir="images").iter_documents(shard, StepStats("documents")))
    assert [d.images[0] for d in local] == [os.path.join(tmp_path, "corpus", "images", f"{i}.jpg") for i in range(3)]
    absolute = list(Mmc4Reader(images_dir="s3://bkt/mmc4-images").iter_documents(shard, StepStats("documents")))
    assert absolute[2].images == ["s3://bkt/mmc4-images/2.jpg", None]
    with pytest.raises(ValueError, match="unsupported shard format"):
        list(Mmc4Reader().iter_documents(_touch(tmp_path / "x.csv", b"a,b"), StepStats("documents")))


def test_readers_are_input_reader_plugins(tmp_path):
    assert plugin_class("input_reader", "mmc4") is Mmc4Reader and plugin_class("input_reader", "obelics") is ObelicsReader
    shard = _touch(tmp_path / "m.jsonl", b"\n".join(JSONL_ROWS) + b"\n")
    reader = build_plugin("input_reader", {"name": "mmc4", "params": {}})
    assert isinstance(reader, Mmc4Reader) and isinstance(reader, InputReader)
    stats = StepStats("documents")
    _check_jsonl(list(reader.iter_documents(shard, stats)), stats, str(tmp_path), "m")
    built = build_plugin("input_reader", {"name": "mmc4", "params": {"batch_size": "8", "images_dir": "imgs"}})
    assert built.batch_size == 8 and built.images_dir == "imgs"
    assert build_plugin("input_reader", "obelics").batch_size == 256
    with pytest.raises(PluginConfigError, match="batch_size"):
        build_plugin("input_reader", {"name": "mmc4", "params": {"batch_size": "many"}})
    with pytest.raises(PluginConfigError, match="nope"):
        build_plugin("input_reader", {"name": "obelics", "params": {"nope": 1}})
    with pytest.raises(PluginConfigError, match="batch_size must be >= 1"):
        build_plugin("input_reader", {"name": "obelics", "params": {"batch_size": 0}})


def test_mmc4_shards_on_s3():
    with moto_s3(("corpus",)):
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.pipe_file("corpus/mmc4/part-0.jsonl.gz", gzip.compress(b"\n".join(JSONL_ROWS) + b"\n"))
        with fs.open("corpus/mmc4/sub/part-1.parquet", "wb") as f:
            pq.write_table(pa.Table.from_pylist([_parquet_m0()], schema=MMC4_PARQUET_SCHEMA), f)
        reader = build_plugin("input_reader", {"name": "mmc4", "params": {"batch_size": 1}})
        stats = StepStats("documents")
        _check_jsonl(list(reader.iter_documents("s3://corpus/mmc4/part-0.jsonl.gz", stats)), stats, "s3://corpus/mmc4", "part-0")
        stats = StepStats("documents")
        docs = list(reader.iter_documents("s3://corpus/mmc4/sub/part-1.parquet", stats))
        assert docs == [_m0_expected("s3://corpus/mmc4/sub")]
        assert docs[0].images[-1] == "s3://corpus/mmc4/sub/pics/e.jpg"  # relative raw_url: beside the shard, on S3
        assert stats.counts["documents_in"] == 1 and stats.dropped == {}


# An MMC4 document and its OBELICS twin: the same slots, the same id, the same other fields.
DATA_PNG, DATA_JPEG = f"data:image/png;base64,{B64_PNG}", f"data:image/jpeg;base64,{B64_JPEG}"
TWIN_MMC4 = {
    "url": "https://example.org/twin",
    "source": "web",
    "text_list": ["First paragraph. Two sentences.", "Second paragraph.", "Third one here."],
    "image_info": [
        _img("p.png", None, 2, image_bytes=DATA_PNG),
        _img("j.jpg", None, 0, bytes=DATA_JPEG),
        _img("f.png", "files/f.png", 0),
        _img("x.jpg", "http://127.0.0.1:1/x.jpg", 9),
    ],
}
TWIN_OBELICS = {
    "url": "https://example.org/twin",
    "source": "web",
    "images": [DATA_JPEG, "files/f.png", None, None, DATA_PNG, None, "http://127.0.0.1:1/x.jpg"],
    "texts": [None, None, "First paragraph. Two sentences.", "Second paragraph.", None, "Third one here.", None],
}


def _db_rows(doc, root):
    fetcher = ImageFetcher(timeout_s=2.0, retries=0, policy=FetchPolicy(local_roots=(str(root),)))  # local files of the corpus
    images = build_image_table([doc], "twin", fetcher, StepStats("i"), workers=1).to_pylist()
    sentences = build_sentence_table([doc], "twin", SentenceSplitter(), StepStats("s")).to_pylist()
    return images, sentences


def test_mmc4_document_equals_its_obelics_twin_and_gives_the_same_db_rows(tmp_path):
    _touch(tmp_path / "files" / "f.png", _encode((50, 40), "PNG", (1, 2, 3)))
    (mmc4_doc,) = Mmc4Reader().iter_documents(_touch(tmp_path / "m.jsonl", json.dumps(TWIN_MMC4).encode()), StepStats("m"))
    (obelics_doc,) = ObelicsReader().iter_documents(_touch(tmp_path / "o.jsonl", json.dumps(TWIN_OBELICS).encode()), StepStats("o"))
    assert mmc4_doc == obelics_doc
    assert mmc4_doc.doc_id == "https://example.org/twin" and mmc4_doc.metadata == {"url": "https://example.org/twin", "source": "web"}
    assert mmc4_doc.images[1] == os.path.join(tmp_path, "files/f.png")

    images, sentences = _db_rows(mmc4_doc, tmp_path)
    assert (images, sentences) == _db_rows(obelics_doc, tmp_path)
    assert [(r["image_id"], r["position"], r["source"], r["status"], r["width"], r["height"], r["format"]) for r in images] == [
        ("twin/https://example.org/twin#0", 0, "inline", "ok", 64, 120, "jpeg"),
        ("twin/https://example.org/twin#1", 1, os.path.join(tmp_path, "files/f.png"), "ok", 50, 40, "png"),
        ("twin/https://example.org/twin#4", 4, "inline", "ok", 96, 64, "png"),
        ("twin/https://example.org/twin#6", 6, "http://127.0.0.1:1/x.jpg", "fetch_refused", None, None, None),  # loopback: default deny
    ]
    assert [(r["sentence_id"], r["position"], r["text"]) for r in sentences] == [
        ("twin/https://example.org/twin#2.0", 2, "First paragraph."),
        ("twin/https://example.org/twin#2.1", 2, "Two sentences."),
        ("twin/https://example.org/twin#3.0", 3, "Second paragraph."),
        ("twin/https://example.org/twin#5.0", 5, "Third one here."),
    ]

    # Raw bytes on both sides: MMC4 base64 in JSONL, OBELICS a binary image column in Parquet.
    raw_mmc4 = dict(TWIN_MMC4, image_info=[_img("p.png", None, 2, image_bytes=B64_PNG), _img("j.jpg", None, 0, base64=B64_JPEG)])
    (raw_mmc4_doc,) = Mmc4Reader().iter_documents(_touch(tmp_path / "raw-m.jsonl", json.dumps(raw_mmc4).encode()), StepStats("m"))
    raw_obelics = dict(
        TWIN_OBELICS,
        images=[JPEG, None, None, PNG, None],
        texts=[None, "First paragraph. Two sentences.", "Second paragraph.", None, "Third one here."],
    )
    schema = pa.schema([("url", pa.string()), ("source", pa.string()), ("images", pa.list_(pa.binary())), ("texts", pa.list_(pa.string()))])
    pq.write_table(pa.Table.from_pylist([raw_obelics], schema=schema), tmp_path / "raw-o.parquet")
    (raw_obelics_doc,) = ObelicsReader().iter_documents(str(tmp_path / "raw-o.parquet"), StepStats("o"))
    assert raw_mmc4_doc == raw_obelics_doc and raw_mmc4_doc.images == [JPEG, None, None, PNG, None]
    assert _db_rows(raw_mmc4_doc, tmp_path) == _db_rows(raw_obelics_doc, tmp_path)
    # decoded bytes and data: URIs of the same images give the same image rows
    # decoded bytes and data: URIs of the same images give the same image content rows
    content = ("source", "image_bytes", "sha256", "width", "height", "format", "status")
    assert [[r[k] for k in content] for r in _db_rows(raw_mmc4_doc, tmp_path)[0]] == [
        [r[k] for k in content] for r in images if r["source"] == "inline"
    ]
