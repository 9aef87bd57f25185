"""Input shards: discovery, partition keys, streaming OBELICS documents (ObelicsReader), malformed rows counted."""

from __future__ import annotations

import gzip
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from realsyn.readers import Document, NoShardsError, list_input_shards, shard_key
from realsyn.readers.obelics import ObelicsReader
from realsyn.stats import StepStats
from tests.s3_server import moto_s3


def _touch(path, data: bytes = b"") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_list_input_shards_finds_supported_files_recursively_sorted(tmp_path):
    for rel in [
        "b.parquet",
        "a.jsonl",
        "sub/deep/c.jsonl.gz",
        "notes.txt",
        "x.json",
        "_SUCCESS",
        "_tmp/y.parquet",
        ".cache/z.jsonl",
        "sub/_part.parquet",
    ]:
        _touch(os.path.join(tmp_path, rel))
    assert list_input_shards(str(tmp_path)) == [
        os.path.join(tmp_path, "a.jsonl"),
        os.path.join(tmp_path, "b.parquet"),
        os.path.join(tmp_path, "sub/deep/c.jsonl.gz"),
    ]


def test_list_input_shards_single_file_and_errors(tmp_path):
    shard = _touch(os.path.join(tmp_path, "only.parquet"))
    assert list_input_shards(shard) == [shard]
    assert list_input_shards(f"file://{shard}") == [shard]
    with pytest.raises(NoShardsError, match="not a"):
        list_input_shards(_touch(os.path.join(tmp_path, "readme.txt")))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(NoShardsError, match="no \\*.parquet"):
        list_input_shards(str(tmp_path / "empty"))
    with pytest.raises(NoShardsError, match="does not exist"):
        list_input_shards(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "shard, root, key",
    [
        ("/data/in/part-00000.parquet", "/data/in", "part-00000"),
        ("/data/in/sub/part-1.jsonl", "/data/in", "sub__part-1"),
        ("/data/in/sub/part-1.jsonl", "/data/in/", "sub__part-1"),
        ("/data/in/a/b/c.jsonl.gz", "/data/in", "a__b__c"),
        ("/data/in/v1.2_x.parquet", "/data/in", "v1.2_x"),
        ("/data/in/only.parquet", "/data/in/only.parquet", "only"),
        ("s3://bucket/prefix/sub/part-7.parquet", "s3://bucket/prefix", "sub__part-7"),
    ],
)
def test_shard_key_relative_path_without_suffix(shard, root, key):
    assert shard_key(shard, root) == key


def test_shard_key_unsafe_characters_are_replaced_and_hashed_to_stay_unique():
    a = shard_key("/in/my file.parquet", "/in")
    b = shard_key("/in/my_file.parquet", "/in")
    c = shard_key("/in/my+file.parquet", "/in")
    assert b == "my_file"
    assert re.fullmatch(r"my_file-[0-9a-f]{8}", a) and re.fullmatch(r"my_file-[0-9a-f]{8}", c)
    assert len({a, b, c}) == 3
    assert a == shard_key("/in/my file.parquet", "/in")  # stable
    long = shard_key("/in/" + "x" * 300 + ".jsonl", "/in")
    assert len(long) == 120 and re.fullmatch(r"[A-Za-z0-9_.-]+", long)
    with pytest.raises(ValueError, match="not under"):
        shard_key("/other/part.parquet", "/in")


def _write_parquet(path, rows, schema):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def test_obelics_parquet_skips_and_counts_malformed_rows(tmp_path):
    schema = pa.schema(
        [("id", pa.string()), ("images", pa.list_(pa.string())), ("texts", pa.list_(pa.string())), ("general_metadata", pa.string())]
    )
    rows = [
        {"id": "d0", "images": [None, "http://127.0.0.1:1/a.jpg"], "texts": ["Hello there.", None], "general_metadata": '{"lang": "en"}'},
        {"id": "d1", "images": [None, None], "texts": ["Only text."], "general_metadata": None},  # unequal lengths
        {"id": "d2", "images": None, "texts": ["No image list."], "general_metadata": None},  # missing list
        {"id": None, "images": ["pics/b.png"], "texts": [None], "general_metadata": "not json"},  # fallback id
        {"id": "d4", "images": ["", "/abs/c.jpg"], "texts": [None, None], "general_metadata": None},
    ]
    shard = _write_parquet(tmp_path / "part-3.parquet", rows, schema)
    stats = StepStats("documents")
    docs = list(ObelicsReader(batch_size=2).iter_documents(shard, stats))  # several batches
    assert [d.doc_id for d in docs] == ["d0", "part-3-3", "d4"]
    assert docs[0] == Document(
        "d0", [None, "http://127.0.0.1:1/a.jpg"], ["Hello there.", None], {"id": "d0", "general_metadata": {"lang": "en"}}
    )
    assert docs[1].images == [os.path.join(tmp_path, "pics/b.png")]  # relative path: beside the shard
    assert docs[1].metadata["general_metadata"] == "not json"
    assert docs[2].images == [None, "/abs/c.jpg"]  # empty reference is no image
    assert stats.counts["documents_in"] == 5
    assert stats.dropped == {"malformed_document": 2}
    assert (stats.counts["malformed_length_mismatch"], stats.counts["malformed_missing_images"]) == (1, 1)


def test_obelics_parquet_inline_bytes_and_id_from_url(tmp_path):
    schema = pa.schema([("url", pa.string()), ("images", pa.list_(pa.binary())), ("texts", pa.list_(pa.string()))])
    rows = [
        {"url": "https://example.org/p/1", "images": [b"\x89PNG-ish", None], "texts": [None, "Caption."]},
        {"url": "https://example.org/p/1", "images": [None], "texts": ["Same url again."]},
    ]
    stats = StepStats("documents")
    docs = list(ObelicsReader().iter_documents(_write_parquet(tmp_path / "s.parquet", rows, schema), stats))
    assert [d.doc_id for d in docs] == ["https://example.org/p/1", "https://example.org/p/1~1"]
    assert docs[0].images == [b"\x89PNG-ish", None]
    assert stats.counts["renamed_duplicate_doc_id"] == 1
    assert stats.dropped == {}


JSONL_LINES = [
    json.dumps({"doc_id": "a", "images": [None, "data:image/png;base64,AAAA"], "texts": ["First.", None], "source": "x"}).encode(),
    b"",  # blank lines are not rows
    b'{"doc_id": "broken", "images": [',  # bad JSON
    b"[1, 2, 3]",  # not an object
    json.dumps({"document_id": "c", "images": [None], "texts": [42]}).encode(),  # text is not a string
    b'{"id": "\xff\xfe", "images": [], "texts": []}',  # not UTF-8
    json.dumps({"images": ["s3://bucket/k.jpg", None], "texts": [None, "Last one."]}).encode(),
]


def _check_jsonl_docs(docs, stats, stem):
    assert [d.doc_id for d in docs] == ["a", f"{stem}-5"]  # row index among non-blank lines
    assert docs[0].images == [None, "data:image/png;base64,AAAA"] and docs[0].metadata == {"doc_id": "a", "source": "x"}
    assert docs[1].images == ["s3://bucket/k.jpg", None] and docs[1].texts == [None, "Last one."]
    assert stats.counts["documents_in"] == 6
    assert stats.dropped == {"malformed_document": 4}
    assert {k: v for k, v in stats.counts.items() if k.startswith("malformed_")} == {
        "malformed_bad_json": 2,  # broken JSON and bad UTF-8
        "malformed_not_an_object": 1,
        "malformed_bad_texts_slot": 1,
    }


def test_obelics_jsonl_and_gz(tmp_path):
    body = b"\n".join(JSONL_LINES) + b"\n"
    stats = StepStats("documents")
    _check_jsonl_docs(list(ObelicsReader().iter_documents(_touch(tmp_path / "s.jsonl", body), stats)), stats, "s")
    stats = StepStats("documents")
    _check_jsonl_docs(list(ObelicsReader().iter_documents(_touch(tmp_path / "t.jsonl.gz", gzip.compress(body)), stats)), stats, "t")


def test_obelics_is_lazy_and_rejects_unknown_format(tmp_path):
    lines = [json.dumps({"id": str(i), "images": [None], "texts": [f"Text {i}."]}) for i in range(3)]
    stats = StepStats("documents")
    it = ObelicsReader().iter_documents(_touch(tmp_path / "lazy.jsonl", "\n".join(lines).encode()), stats)
    assert next(it).doc_id == "0"
    assert stats.counts["documents_in"] == 1  # nothing read ahead beyond what was asked
    with pytest.raises(ValueError, match="unsupported shard format"):
        list(ObelicsReader().iter_documents(_touch(tmp_path / "x.csv", b"a,b"), StepStats("documents")))


def test_shards_on_s3_are_listed_and_read():
    with moto_s3(("corpus",)):
        import s3fs

        fs = s3fs.S3FileSystem()
        table = pa.Table.from_pylist([{"id": "s3doc", "images": ["img/one.jpg"], "texts": [None]}])
        with fs.open("corpus/in/sub/part-0.parquet", "wb") as f:
            pq.write_table(table, f)
        fs.pipe_file("corpus/in/part-1.jsonl", b'{"id": "j", "images": [null], "texts": ["Hi there."]}\n')
        fs.pipe_file("corpus/in/_SUCCESS", b"")
        shards = list_input_shards("s3://corpus/in")
        assert shards == ["s3://corpus/in/part-1.jsonl", "s3://corpus/in/sub/part-0.parquet"]
        assert [shard_key(s, "s3://corpus/in") for s in shards] == ["part-1", "sub__part-0"]
        stats = StepStats("documents")
        docs = list(ObelicsReader().iter_documents(shards[1], stats))
        assert docs[0].doc_id == "s3doc" and docs[0].images == ["s3://corpus/in/sub/img/one.jpg"]
        assert list(ObelicsReader().iter_documents(shards[0], stats))[0].texts == ["Hi there."]
        assert stats.counts["documents_in"] == 2


def test_shard_keys_are_always_safe_names():
    from realsyn.storage import validate_name

    for rel in ["-x.jsonl", "_x.jsonl", "a..b.jsonl", "..x.parquet", "x/..y.jsonl", ".-..jsonl", "sub/-/a.jsonl", "\u00e9t\u00e9.jsonl"]:
        key = shard_key(f"/in/{rel}", "/in")
        assert validate_name(key, "shard key") == key and ".." not in key, rel
    assert shard_key("/in/a..b.jsonl", "/in") != shard_key("/in/a_b.jsonl", "/in")
    assert re.fullmatch(r"x-[0-9a-f]{8}", shard_key("/in/-x.jsonl", "/in"))


def _doc_ids(tmp_path, ids, name="ids.jsonl"):
    lines = [json.dumps({"id": i, "images": [None], "texts": ["Some text here."]}) for i in ids]
    stats = StepStats("documents")
    docs = list(ObelicsReader().iter_documents(_touch(tmp_path / name, "\n".join(lines).encode()), stats))
    return [d.doc_id for d in docs], stats


def test_doc_ids_are_unique_by_construction(tmp_path):
    # a renamed duplicate never collides with a real id, earlier or later
    ids, stats = _doc_ids(tmp_path, ["x", "x~2", "x"])
    assert ids == ["x", "x~2", "x~2.2"] and stats.counts["renamed_duplicate_doc_id"] == 1
    ids, stats = _doc_ids(tmp_path, ["x", "x", "x~1", "x~1"], "later.jsonl")
    assert ids == ["x", "x~1", "x~1~2", "x~1~3"] and stats.counts["renamed_duplicate_doc_id"] == 3
    ids, _ = _doc_ids(tmp_path, ["x"] * 50, "many.jsonl")
    assert len(set(ids)) == 50


def test_reader_errors_and_invalid_unicode_are_counted_drops(tmp_path):
    lines = [
        json.dumps({"id": "ok", "images": [None], "texts": ["Fine."]}),
        '{"id": "t", "images": [null], "texts": ["bad \\ud800 text"]}',  # a lone surrogate in a text
        '{"id": "\\udc00", "images": [null], "texts": ["Bad id."]}',  # ... in an id
        '{"id": "r", "images": ["http://127.0.0.1:1/\\ud83d.jpg"], "texts": [null]}',  # ... in an image reference
        '{"id": "bad-json", "images": [',
    ]
    shard = _touch(tmp_path / "u.jsonl", "\n".join(lines).encode())
    stats = StepStats("documents")
    docs = list(ObelicsReader().iter_documents(shard, stats))
    assert [d.doc_id for d in docs] == ["ok"]
    assert stats.dropped == {"invalid_text": 3, "malformed_document": 1} and stats.counts["documents_in"] == 5

    def explode(row, index, shard):
        if row["id"] == "boom":
            raise KeyError("surprise")
        return Document(shard.doc_id(row, index), [None], ["x"])

    from realsyn.readers.document import stream_documents

    rows = [json.dumps({"id": i}) for i in ("a", "boom", "b")]
    stats = StepStats("documents")
    docs = list(stream_documents(_touch(tmp_path / "e.jsonl", "\n".join(rows).encode()), stats, explode))
    assert [d.doc_id for d in docs] == ["a", "b"] and stats.counts["malformed_reader_error_KeyError"] == 1


def test_a_shard_with_the_wrong_layout_is_a_failure_not_an_empty_shard(tmp_path):
    from realsyn.readers import ShardSchemaError
    from realsyn.readers.mmc4 import Mmc4Reader

    # Parquet: the schema says it before any row is read
    table = pa.table({"id": ["a"], "text_list": [["Words."]], "image_info": [[]]})
    pq.write_table(table, tmp_path / "mmc4.parquet")
    with pytest.raises(
        ShardSchemaError,
        match=r"no column 'images', 'texts', which the obelics reader needs; its columns are \['id', 'text_list', 'image_info'\]",
    ):
        list(ObelicsReader().iter_documents(str(tmp_path / "mmc4.parquet"), StepStats("d")))
    # JSONL: every row malformed, nothing yielded
    rows = [json.dumps({"id": str(i), "text_list": ["Words."], "image_info": []}) for i in range(3)]
    shard = _touch(tmp_path / "mmc4.jsonl", "\n".join(rows).encode())
    with pytest.raises(ShardSchemaError, match=r"none of its 3 rows is a document for the obelics reader \(missing_images x3\)"):
        list(ObelicsReader().iter_documents(shard, StepStats("d")))
    assert len(list(Mmc4Reader().iter_documents(shard, StepStats("d")))) == 3  # the right reader reads it
    # a shard whose only rows have bad values (not a bad layout) is just empty: one bad document never fails a shard
    only_bad = ['{"id": "s", "images": [null], "texts": ["x \\ud800"]}', json.dumps({"id": "l", "images": [None, None], "texts": ["a"]})]
    stats = StepStats("d")
    assert list(ObelicsReader().iter_documents(_touch(tmp_path / "only-bad.jsonl", "\n".join(only_bad).encode()), stats)) == []
    assert stats.dropped == {"invalid_text": 1, "malformed_document": 1}
    # an empty shard is just empty; a shard with one good row among bad ones is fine
    assert list(ObelicsReader().iter_documents(_touch(tmp_path / "empty.jsonl", b"\n"), StepStats("d"))) == []
    mixed = _touch(tmp_path / "mixed.jsonl", "\n".join([*rows, json.dumps({"images": [None], "texts": ["T."]})]).encode())
    assert len(list(ObelicsReader().iter_documents(mixed, StepStats("d")))) == 1
