import json
import os

import numpy as np
import pyarrow as pa
import pytest

from realsyn.storage import CURRENT_FILE, MissingOutputError, Storage
from tests.s3_server import moto_s3


def _roundtrip(storage: Storage):
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    with storage.writer("asset_a", "shard-1") as w:
        w.write_parquet("t.parquet", table)
        w.write_numpy("v.npy", arr)
        w.write_json("meta.json", {"k": 1})
        w.write_parquet("nested/part.parquet", table)
    r = storage.reader("asset_a", "shard-1")
    assert r.read_parquet("t.parquet").equals(table)
    assert np.array_equal(np.asarray(r.read_numpy("v.npy")), arr)
    assert r.read_json("meta.json") == {"k": 1}
    assert r.read_parquet("nested/part.parquet").num_rows == 3
    assert sorted(r.files) == ["meta.json", "nested/part.parquet", "t.parquet", "v.npy"]
    first_gen = r.generation

    # a rerun replaces the partition whole: the file it no longer writes disappears
    with storage.writer("asset_a", "shard-1") as w:
        w.write_parquet("t.parquet", table.slice(0, 1))
    r2 = storage.reader("asset_a", "shard-1")
    assert r2.generation != first_gen
    assert r2.files == ["t.parquet"]
    assert r2.read_parquet("t.parquet").num_rows == 1
    gens = [
        p
        for p in storage.fs.ls(storage.partition_dir("asset_a", "shard-1"), detail=False)
        if os.path.basename(p.rstrip("/")).startswith("g-")
    ]
    assert len(gens) == 1

    # a writer that fails leaves the committed output untouched and no staging behind
    with pytest.raises(RuntimeError):
        with storage.writer("asset_a", "shard-1") as w:
            w.write_parquet("t.parquet", table)
            raise RuntimeError("boom")
    r3 = storage.reader("asset_a", "shard-1")
    assert r3.generation == r2.generation and r3.read_parquet("t.parquet").num_rows == 1
    gens = [
        p
        for p in storage.fs.ls(storage.partition_dir("asset_a", "shard-1"), detail=False)
        if os.path.basename(p.rstrip("/")).startswith("g-")
    ]
    assert len(gens) == 1

    with storage.writer("asset_a") as w:
        w.write_json("g.json", [1])
    assert storage.partitions("asset_a") == ["shard-1"]
    assert storage.has("asset_a") and storage.reader("asset_a").read_json("g.json") == [1]
    with pytest.raises(MissingOutputError):
        storage.reader("asset_a", "nope")

    storage.write_file("_cache/x.bin", b"abc")
    assert storage.read_file("_cache/x.bin") == b"abc"


def test_local_storage_atomic_generations(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    _roundtrip(storage)
    # uncommitted generations are invisible: the manifest names the only readable one
    manifest = json.loads((tmp_path / "root" / "asset_a" / "shard-1" / CURRENT_FILE).read_text())
    assert manifest["files"] == ["t.parquet"]
    assert not list((tmp_path / "root").rglob("*.tmp-*"))


def test_s3_storage_against_moto():
    with moto_s3():
        storage = Storage("s3://realsyn/prefix")
        assert storage.uri("a") == "s3://realsyn/prefix/a"
        _roundtrip(storage)


def test_concurrent_writer_keeps_its_generation(tmp_path):
    # a writer that started later is still filling its generation when an earlier one commits
    storage = Storage(str(tmp_path))
    early, late = storage.writer("a", "s"), storage.writer("a", "s")
    assert early.generation < late.generation
    late.write_json("x.json", {"who": "late"})
    early.write_json("x.json", {"who": "early"})
    early.commit()
    late.write_json("y.json", {"more": 1})
    late.commit()
    r = storage.reader("a", "s")
    assert r.read_json("x.json") == {"who": "late"} and r.read_json("y.json") == {"more": 1}
