"""realsyn.io: paths, atomic writes, JSON defaults, JSONL reading and batching, local and remote."""

import datetime
import decimal
import gzip
import json
import os

import fsspec
import numpy as np
import pytest

from realsyn.io import (
    MALFORMED,
    atomic_directory,
    atomic_local_file,
    atomic_write_bytes,
    batched,
    filesystem_for,
    is_local,
    iter_jsonl,
    join_path,
    json_default,
)


def test_local_and_remote_paths():
    local, path = filesystem_for("some/dir")
    assert is_local(local) and path == os.path.abspath("some/dir")
    memory = fsspec.filesystem("memory")
    assert not is_local(memory)
    assert join_path(local, "/a", "b", "c.txt") == os.path.join("/a", "b", "c.txt")
    assert join_path(memory, "bucket/a", "b") == "bucket/a/b"


def test_atomic_write_bytes_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    fs, _ = filesystem_for(str(tmp_path))
    target = str(tmp_path / "sub" / "f.json")
    atomic_write_bytes(fs, target, b"one")
    atomic_write_bytes(fs, target, b"two")
    assert open(target, "rb").read() == b"two" and os.listdir(tmp_path / "sub") == ["f.json"]
    memory = fsspec.filesystem("memory")
    atomic_write_bytes(memory, "/bucket/f.json", b"remote")
    assert memory.cat_file("/bucket/f.json") == b"remote"


def test_atomic_local_file_appears_only_if_the_block_succeeds(tmp_path):
    target = tmp_path / "out" / "rows.jsonl"
    with pytest.raises(RuntimeError):
        with atomic_local_file(str(target)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("interrupted")
    assert not target.exists() and os.listdir(tmp_path / "out") == []
    with atomic_local_file(str(target)) as tmp:
        open(tmp, "w").write("whole")
    assert target.read_text() == "whole" and os.listdir(tmp_path / "out") == ["rows.jsonl"]


def test_atomic_directory_renames_into_place_and_tolerates_a_finished_rival(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target, prefix=".converting-") as staging:
        (staging / "weights").write_text("w")
    assert (target / "weights").read_text() == "w" and sorted(os.listdir(tmp_path)) == ["model"]
    (target / "done").write_text("")  # a non-empty target: a second rename fails
    with atomic_directory(target, complete=lambda t: (t / "done").is_file()) as staging:
        (staging / "weights").write_text("other")
    assert (target / "weights").read_text() == "w" and sorted(os.listdir(tmp_path)) == ["model"]
    with pytest.raises(OSError):
        with atomic_directory(target, complete=lambda t: False) as staging:
            (staging / "weights").write_text("other")
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_json_default_covers_numpy_and_arrow_values():
    value = {
        "i": np.int64(3),
        "f": np.float32(0.5),
        "a": np.arange(3),
        "b": b"\x00\xff",
        "d": datetime.date(2024, 1, 2),
        "t": datetime.timedelta(seconds=90),
        "m": decimal.Decimal("1.10"),
    }
    assert json.loads(json.dumps(value, default=json_default)) == {
        "i": 3,
        "f": 0.5,
        "a": [0, 1, 2],
        "b": "AP8=",
        "d": "2024-01-02",
        "t": 90.0,
        "m": "1.10",
    }
    with pytest.raises(TypeError, match="cannot write a object as JSON"):
        json.dumps(object(), default=json_default)


def test_iter_jsonl_skips_blank_lines_and_marks_or_raises_on_bad_ones(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"a": 1}\n\n{not json\n[1, 2]\n')
    assert list(iter_jsonl(str(path))) == [{"a": 1}, MALFORMED, [1, 2]]
    with pytest.raises(ValueError):
        list(iter_jsonl(str(path), strict=True))


def test_batched_slices_sequences_and_chunks_iterables():
    assert list(batched([1, 2, 3, 4, 5], 2)) == [[1, 2], [3, 4], [5]]
    assert list(batched((i for i in range(5)), 2)) == [[0, 1], [2, 3], [4]]
    chunks = list(batched(np.arange(5), 3))
    assert all(isinstance(c, np.ndarray) for c in chunks) and [c.tolist() for c in chunks] == [[0, 1, 2], [3, 4]]
    assert list(batched([], 4)) == []
    with pytest.raises(ValueError):
        list(batched([1], 0))
