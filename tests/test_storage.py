"""Storage: atomic generations, retention and grace, compare-and-swap commits, orphan sweeps, safe names."""

import json
import multiprocessing
import os
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from realsyn.storage import (
    CURRENT_FILE,
    CommitError,
    InvalidNameError,
    MissingOutputError,
    Storage,
    generation_started,
    validate_file_name,
    validate_name,
)
from tests.s3_server import moto_s3

HOUR = 3600.0


def _gens(storage: Storage, asset="asset_a", partition="shard-1") -> list[str]:
    return sorted(
        os.path.basename(p.rstrip("/"))
        for p in storage.fs.ls(storage.partition_dir(asset, partition), detail=False)
        if os.path.basename(p.rstrip("/")).startswith("g-")
    )


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

    # a rerun replaces the partition whole: the file it no longer writes disappears from the current one;
    # the superseded generation is kept for readers that resolved it (retention 2)
    with storage.writer("asset_a", "shard-1") as w:
        w.write_parquet("t.parquet", table.slice(0, 1))
    r2 = storage.reader("asset_a", "shard-1")
    assert r2.generation != first_gen
    assert r2.files == ["t.parquet"]
    assert r2.read_parquet("t.parquet").num_rows == 1
    assert _gens(storage) == sorted([f"g-{first_gen}", f"g-{r2.generation}"])
    assert r.read_parquet("t.parquet").num_rows == 3  # the earlier reader still reads its generation

    # a writer that fails leaves the committed output untouched and no staging behind
    with pytest.raises(RuntimeError):
        with storage.writer("asset_a", "shard-1") as w:
            w.write_parquet("t.parquet", table)
            raise RuntimeError("boom")
    r3 = storage.reader("asset_a", "shard-1")
    assert r3.generation == r2.generation and r3.read_parquet("t.parquet").num_rows == 1
    assert len(_gens(storage)) == 2

    # a third commit: with no grace period the first generation (beyond retention) goes
    with storage.writer("asset_a", "shard-1") as w:
        w.write_json("x.json", [3])
    r4 = storage.reader("asset_a", "shard-1")
    assert _gens(storage) == sorted([f"g-{r2.generation}", f"g-{r4.generation}"])
    manifest = json.loads(storage.fs.cat_file(storage.path("asset_a", "shard-1", CURRENT_FILE)))
    assert [h["generation"] for h in manifest["history"]] == [r2.generation]

    with storage.writer("asset_a") as w:
        w.write_json("g.json", [1])
    assert storage.partitions("asset_a") == ["shard-1"]
    assert storage.has("asset_a") and storage.reader("asset_a").read_json("g.json") == [1]
    with pytest.raises(MissingOutputError):
        storage.reader("asset_a", "nope")

    storage.write_file("_cache/x.bin", b"abc")
    assert storage.read_file("_cache/x.bin") == b"abc"
    assert storage.current_uri("asset_a", "shard-1").rstrip("/").endswith(f"asset_a/shard-1/g-{r4.generation}")


def test_local_storage_atomic_generations(tmp_path):
    storage = Storage(str(tmp_path / "root"), grace_s=0)
    _roundtrip(storage)
    # uncommitted generations are invisible: the manifest names the only readable one
    manifest = json.loads((tmp_path / "root" / "asset_a" / "shard-1" / CURRENT_FILE).read_text())
    assert manifest["files"] == ["x.json"]
    assert not list((tmp_path / "root").rglob("*.tmp-*"))


def test_s3_storage_against_moto():
    with moto_s3():
        storage = Storage("s3://realsyn/prefix", grace_s=0)
        assert storage.uri("a") == "s3://realsyn/prefix/a"
        _roundtrip(storage)
        assert storage.conditional_writes  # moto honours If-None-Match / If-Match


def test_later_writer_committing_first_keeps_the_earlier_writers_folder(tmp_path):
    # two runs on one root: the writer that started later commits first while the earlier one is still
    # writing; the earlier one's folder must survive, and its commit must land whole
    storage = Storage(str(tmp_path))
    early, late = storage.writer("a", "s"), storage.writer("a", "s")
    assert early.generation < late.generation
    early.write_json("x.json", {"who": "early"})
    late.write_json("x.json", {"who": "late"})
    late.commit()
    assert os.path.isfile(early.path("x.json"))
    early.write_json("y.json", {"more": 1})
    early.commit()
    r = storage.reader("a", "s")
    assert r.generation == early.generation
    assert r.read_json("x.json") == {"who": "early"} and r.read_json("y.json") == {"more": 1}
    assert _gens(storage, "a", "s") == sorted([f"g-{early.generation}", f"g-{late.generation}"])


def test_commit_verifies_its_files_before_flipping_the_pointer(tmp_path):
    storage = Storage(str(tmp_path))
    with storage.writer("a", "s") as w:
        w.write_json("x.json", 1)
    before = storage.reader("a", "s").generation
    w = storage.writer("a", "s")
    w.write_json("x.json", 2)
    w.write_json("y.json", 2)
    os.remove(w.path("y.json"))  # e.g. swept by someone else
    with pytest.raises(CommitError, match=r"1 file\(s\) of generation .* are missing \(y.json\)"):
        w.commit()
    assert storage.reader("a", "s").generation == before and storage.reader("a", "s").read_json("x.json") == 1


def test_an_error_after_commit_never_removes_the_committed_generation(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path))
    with pytest.raises(RuntimeError, match="after"):
        with storage.writer("a", "s") as w:
            w.write_json("x.json", 1)
            w.commit()
            raise RuntimeError("after the commit")
    assert storage.reader("a", "s").read_json("x.json") == 1

    def broken_sweep(self, directory, now=None):
        raise PermissionError("read-only folder")

    monkeypatch.setattr(Storage, "_sweep_dir", broken_sweep)
    with pytest.warns(UserWarning, match="sweeping old generations failed: PermissionError"):
        with storage.writer("a", "s") as w:
            w.write_json("x.json", 2)
    assert storage.reader("a", "s").read_json("x.json") == 2


def test_reader_keeps_its_generation_while_commits_land(tmp_path):
    storage = Storage(str(tmp_path), grace_s=0)
    with storage.writer("a", "s") as w:
        w.write_json("x.json", 0)
    reader = storage.reader("a", "s")
    with storage.writer("a", "s") as w:
        w.write_json("x.json", 1)
    assert reader.read_json("x.json") == 0  # retention 2: the superseded generation stays
    # retention 1 keeps a superseded generation for the grace period only
    one = Storage(str(tmp_path), retention=1, grace_s=HOUR)
    reader = one.reader("a", "s")
    with one.writer("a", "s") as w:
        w.write_json("x.json", 2)
    assert reader.read_json("x.json") == 1
    none = Storage(str(tmp_path), retention=1, grace_s=0)
    reader = none.reader("a", "s")
    with none.writer("a", "s") as w:
        w.write_json("x.json", 3)
    with pytest.raises(FileNotFoundError):  # no retention and no grace: the documented opt-out
        reader.read_json("x.json")
    assert _gens(none, "a", "s") == [f"g-{none.reader('a', 's').generation}"]


def _age(path, generation_seconds_ago: float, suffix: str) -> str:
    """Rename a generation folder so that its id says it started that long ago, and date its files back."""
    when = time.time() - generation_seconds_ago
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(when))
    new = os.path.join(os.path.dirname(path), f"g-{stamp}.000000000-{suffix}")
    os.rename(path, new)
    for base, dirs, files in os.walk(new):
        for name in dirs + files:
            os.utime(os.path.join(base, name), (when, when))
    os.utime(new, (when, when))
    return os.path.basename(new)


def test_orphans_are_swept_only_after_the_grace_period(tmp_path):
    storage = Storage(str(tmp_path))  # grace 1 h
    with storage.writer("a", "s") as w:
        w.write_json("x.json", 1)
    killed = storage.writer("a", "s")  # a writer killed during export: a truncated tar, no manifest entry
    killed.write_bytes("split/split-000000.tar", b"truncated")
    young = storage.writer("a", "s")
    young.write_bytes("part.bin", b"still writing")
    old_name = _age(killed.gen_dir, 2 * HOUR, "deadbeef")
    # an old generation id whose files changed recently: a slow writer still at work
    slow = storage.writer("a", "s")
    slow.write_bytes("part.bin", b"slow")
    slow_name = _age(slow.gen_dir, 2 * HOUR, "5107")
    os.utime(os.path.join(tmp_path, "a", "s", slow_name, "part.bin"))  # touched now
    assert generation_started(old_name[2:]) < time.time() - 1.9 * HOUR
    with storage.writer("a", "s") as w:
        w.write_json("x.json", 2)
    gens = _gens(storage, "a", "s")
    assert old_name not in gens  # orphan older than the grace period, untouched for as long: swept
    assert f"g-{young.generation}" in gens and slow_name in gens
    assert len(gens) == 4  # current, previous (retained), young, slow
    # the current and retained generations are never swept, however old
    current, previous = storage.reader("a", "s").generation, [g for g in gens if g not in (f"g-{young.generation}", slow_name)]
    assert f"g-{current}" in previous
    assert storage.sweep("a") == []
    # Storage.sweep with no grace: the uncommitted ones go, the current and the retained one stay
    assert sorted(os.path.basename(p) for p in Storage(str(tmp_path), grace_s=0).sweep()) == sorted([f"g-{young.generation}", slow_name])
    assert _gens(storage, "a", "s") == sorted(previous)
    assert storage.reader("a", "s").read_json("x.json") == 2


def test_concurrent_commits_never_lose_a_generation_or_break_a_reader(tmp_path):
    storage = Storage(str(tmp_path))  # retention 2, grace 1 h: every superseded generation stays in the history
    with storage.writer("a", "s") as w:
        w.write_json("n.json", -1)
    errors: list[BaseException] = []
    stop = threading.Event()

    def write(k: int) -> None:
        try:
            for i in range(5):
                with storage.writer("a", "s") as w:
                    w.write_json("n.json", k * 10 + i)
                    w.write_bytes("blob.bin", os.urandom(1000))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    def read() -> None:
        try:
            while not stop.is_set():
                r = storage.reader("a", "s")
                r.read_json("n.json")
                assert len(r.read_bytes("blob.bin")) in (1000,) or r.read_json("n.json") == -1
        except FileNotFoundError as e:
            if "blob.bin" not in str(e):  # the very first generation has no blob
                errors.append(e)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    manifest = json.loads((tmp_path / "a" / "s" / CURRENT_FILE).read_text())
    assert len(manifest["history"]) == 20  # 21 commits: every one superseded exactly one other (compare-and-swap)
    assert len({h["generation"] for h in manifest["history"]} | {manifest["generation"]}) == 21
    assert len(_gens(storage, "a", "s")) == 21


def _commit_many(root: str, k: int, n: int) -> None:
    storage = Storage(root)
    for i in range(n):
        with storage.writer("a", "s") as w:
            w.write_json("n.json", [k, i])


def test_two_processes_on_one_local_root(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # two fresh interpreters, as two `realsyn run` would be
    procs = [ctx.Process(target=_commit_many, args=(str(tmp_path), k, 6)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    storage = Storage(str(tmp_path))
    manifest = json.loads((tmp_path / "a" / "s" / CURRENT_FILE).read_text())
    assert len(manifest["history"]) == 11
    assert storage.reader("a", "s").read_json("n.json")[1] == 5
    assert all(
        os.path.isdir(tmp_path / "a" / "s" / f"g-{g}") for g in [manifest["generation"], *(h["generation"] for h in manifest["history"])]
    )


def test_s3_commit_is_a_compare_and_swap(monkeypatch):
    with moto_s3():
        storage = Storage("s3://realsyn/root")
        with storage.writer("a", "s") as w:
            w.write_json("n.json", 0)
        first = storage.reader("a", "s").generation
        # another process commits between this writer's read of the pointer and its conditional PUT
        writer = storage.writer("a", "s")
        writer.write_json("n.json", 2)
        rival = storage.writer("a", "s")
        rival.write_json("n.json", 1)
        real_read, calls = Storage._read_pointer, []

        def racing_read(self, directory):
            out = real_read(self, directory)
            calls.append(1)
            if len(calls) == 1:
                rival.commit()  # lands after this read: the If-Match PUT must fail and retry
            return out

        monkeypatch.setattr(Storage, "_read_pointer", racing_read)
        writer.commit()
        monkeypatch.setattr(Storage, "_read_pointer", real_read)
        manifest = json.loads(storage.fs.cat_file(storage.path("a", "s", CURRENT_FILE)))
        assert manifest["generation"] == writer.generation
        assert [h["generation"] for h in manifest["history"]] == [rival.generation, first]
        assert storage.reader("a", "s").read_json("n.json") == 2
        # a first commit is an If-None-Match create: the loser of a race retries on top of the winner
        a, b = storage.writer("a", "fresh"), storage.writer("a", "fresh")
        a.write_json("n.json", "a")
        b.write_json("n.json", "b")
        assert not storage._swap_pointer(storage.partition_dir("a", "fresh"), {"generation": "x"}, None, True)
        a.commit()
        assert not storage._swap_pointer(storage.partition_dir("a", "fresh"), {"generation": "x"}, None, False)
        b.commit()
        m = json.loads(storage.fs.cat_file(storage.path("a", "fresh", CURRENT_FILE)))
        assert m["generation"] == b.generation and [h["generation"] for h in m["history"]] == [a.generation]
        # an orphan on S3 (a killed writer) is swept once older than the grace period, the retained ones never
        orphan = storage.writer("a", "s")
        orphan.write_bytes("t.tar", b"truncated")
        assert Storage("s3://realsyn/root").sweep("a") == []
        swept = Storage("s3://realsyn/root", grace_s=0).sweep("a")  # the first generation is beyond retention 2 too
        assert sorted(os.path.basename(p) for p in swept) == sorted([f"g-{orphan.generation}", f"g-{first}"])
        assert _gens(storage, "a", "s") == sorted([f"g-{writer.generation}", f"g-{rival.generation}"])
        assert storage.reader("a", "s").read_json("n.json") == 2


@pytest.mark.parametrize(
    "name", ["../../../../ESCAPED", "..", ".", "", "a/b", "/etc", "a..b", "_hidden", "-x", "x y", "x\x00", "é", "a" * 201, None, 3]
)
def test_names_that_become_paths_are_validated(tmp_path, name):
    storage = Storage(str(tmp_path / "root"))
    with pytest.raises(InvalidNameError):
        validate_name(name)
    with pytest.raises(InvalidNameError):
        storage.writer("asset", name) if name not in (None, "") else validate_name(name)
    with pytest.raises(InvalidNameError):
        storage.writer(name, "shard")
    with pytest.raises(InvalidNameError):
        storage.reader(name, "shard")
    assert not (tmp_path / "ESCAPED").exists() and not list(tmp_path.glob("*ESCAPED*"))


def test_file_names_inside_a_generation_are_validated(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    assert validate_name("cap20") == "cap20" and validate_name("v1.2_x-3") == "v1.2_x-3"
    assert validate_file_name("cap20/decisions/part-0.parquet") == "cap20/decisions/part-0.parquet"
    with storage.writer("a", "s") as w:
        for bad in ["../../../../ESCAPED/x.tar", "split/../../x", "/etc/passwd", "a//b", "report-1-../x.png", "a/", ""]:
            with pytest.raises(InvalidNameError):
                w.write_bytes(bad, b"x")
        w.write_bytes("ok/report-1-plot.png", b"x")
    assert storage.reader("a", "s").files == ["ok/report-1-plot.png"]
    with pytest.raises(InvalidNameError):
        storage.reader("a", "s").read_bytes("../../x")
    with pytest.raises(InvalidNameError):
        storage.write_file("_cache/../../x", b"x")
    assert not list(tmp_path.glob("*x")) and not (tmp_path / "ESCAPED").exists()


def test_retention_and_grace_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("REALSYN_STORAGE_RETENTION", "3")
    monkeypatch.setenv("REALSYN_STORAGE_GRACE_S", "0")
    storage = Storage(str(tmp_path))
    assert (storage.retention, storage.grace_s) == (3, 0.0)
    for i in range(5):
        with storage.writer("a", "s") as w:
            w.write_json("n.json", i)
    assert len(_gens(storage, "a", "s")) == 3
    with pytest.raises(ValueError, match="retention"):
        Storage(str(tmp_path), retention=0)
    monkeypatch.setenv("REALSYN_STORAGE_GRACE_S", "soon")
    with pytest.raises(ValueError, match="REALSYN_STORAGE_GRACE_S"):
        Storage(str(tmp_path))


def _commit(storage: Storage, value, asset="a", partition="s") -> str:
    with storage.writer(asset, partition) as w:
        w.write_json("n.json", value)
    return w.generation


def _keep_last_n_and_pins(storage: Storage):
    """Retention 3, no grace: the last 3 generations stay; a pinned older one stays through commits and sweeps."""
    gens = [_commit(storage, i) for i in range(5)]
    assert _gens(storage, "a", "s") == [f"g-{g}" for g in gens[2:]]
    manifest = json.loads(storage.fs.cat_file(storage.path("a", "s", CURRENT_FILE)))
    assert [h["generation"] for h in manifest["history"]] == [gens[3], gens[2]]

    # a published version refers to gens[2]: pinned, it outlives the retention rule
    storage.pin("a", "s", gens[2], "train-v1")
    assert storage.pins("a", "s") == {"train-v1": gens[2]}
    later = [_commit(storage, i) for i in range(5, 8)]
    assert storage.sweep("a") == []
    assert _gens(storage, "a", "s") == sorted([f"g-{gens[2]}", *(f"g-{g}" for g in later)])
    assert storage.partitions("a") == ["s"]  # the pins folder is not a partition or a generation
    # the pinned files read as they were (a consumer outside the pointer keeps its data)
    pinned = storage.fs.cat_file(storage.path("a", "s", f"g-{gens[2]}", "n.json"))
    assert json.loads(pinned) == 2

    # the current generation never goes, pinned or not; a pin on a deleted generation is refused
    with pytest.raises(MissingOutputError):
        storage.pin("a", "s", gens[0], "train-v0")
    with pytest.raises(InvalidNameError):
        storage.pin("a", "s", gens[2], "../x")
    # unpinned: the next sweep applies the rule again
    storage.unpin("a", "s", "train-v1")
    storage.unpin("a", "s", "train-v1")  # twice is fine
    assert [os.path.basename(p) for p in storage.sweep("a")] == [f"g-{gens[2]}"]
    assert _gens(storage, "a", "s") == [f"g-{g}" for g in later]
    assert storage.reader("a", "s").read_json("n.json") == 7


def test_keep_last_n_generations_and_pinned_ones_locally(tmp_path):
    _keep_last_n_and_pins(Storage(str(tmp_path / "root"), retention=3, grace_s=0))


def test_keep_last_n_generations_and_pinned_ones_on_s3():
    with moto_s3():
        _keep_last_n_and_pins(Storage("s3://realsyn/pins", retention=3, grace_s=0))


def test_storage_resource_sets_the_retention(tmp_path, monkeypatch):
    from resources import StorageResource

    resource = StorageResource(root=str(tmp_path / "r1"), retention=5)
    assert resource.get().retention == 5
    monkeypatch.setenv("REALSYN_STORAGE_RETENTION", "4")
    assert StorageResource(root=str(tmp_path / "r2")).get().retention == 4  # unset: the environment, else 2
    with pytest.raises(Exception, match="retention"):
        StorageResource(root=str(tmp_path / "r3"), retention=0)
