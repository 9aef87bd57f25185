import hashlib

import numpy as np
import pyarrow as pa
import pytest

from realsyn.plugins import build_plugin
from realsyn.samplers import state_from_npz, state_to_npz, uniform_keys
from realsyn.samplers.cluster_cap import ClusterCapSampler


def _table(sizes: list[int], prefix: str = "img") -> pa.Table:
    clusters = np.repeat(np.arange(len(sizes)), sizes)
    ids = [f"{prefix}{i}" for i in range(len(clusters))]
    return pa.table({"image_id": ids, "cluster": pa.array(clusters, pa.int64())})


def _batches(table: pa.Table, size: int, seed: int) -> list[pa.Table]:
    """The rows shuffled, then cut into batches of ``size``."""
    perm = np.random.default_rng(seed).permutation(table.num_rows)
    shuffled = table.take(perm)
    return [shuffled.slice(s, size) for s in range(0, table.num_rows, size)]


def _selected_ids(sampler, batches, state) -> set[str]:
    out = set()
    for b in batches:
        mask = sampler.select(b, state)
        out |= {i for i, keep in zip(b.column("image_id").to_pylist(), mask) if keep}
    return out


def _per_cluster(table: pa.Table, ids: set[str], n: int) -> list[int]:
    by_id = dict(zip(table.column("image_id").to_pylist(), table.column("cluster").to_pylist()))
    return np.bincount([by_id[i] for i in ids], minlength=n).tolist()


def test_uniform_keys_are_hash_based_and_uniform():
    keys = uniform_keys(["a", "b"], seed=3)
    expected = (int.from_bytes(hashlib.blake2b(b"3:a", digest_size=8).digest(), "big") >> 11) / 2**53
    assert keys.dtype == np.float64 and keys[0] == expected
    many = uniform_keys([str(i) for i in range(20000)], seed=0)
    assert 0.0 <= many.min() and many.max() < 1.0
    assert abs(many.mean() - 0.5) < 0.01
    assert np.histogram(many, bins=10, range=(0, 1))[0].min() > 1800
    assert not np.array_equal(many[:100], uniform_keys([str(i) for i in range(100)], seed=1))


def test_cluster_cap_counts_are_exact():
    table = _table([50, 5, 20, 21])
    sampler = ClusterCapSampler(cap=20, seed=0)
    state = sampler.fit([table])
    assert state["counts"].tolist() == [50, 5, 20, 21]
    assert np.isinf(state["threshold"][[1, 2]]).all() and np.isfinite(state["threshold"][[0, 3]]).all()
    mask = sampler.select(table, state)
    assert mask.dtype == bool and mask.shape == (96,)
    chosen = {i for i, m in zip(table.column("image_id").to_pylist(), mask) if m}
    assert _per_cluster(table, chosen, 4) == [20, 5, 20, 20]
    # The kept rows of a big cluster are the cap smallest hash keys of that cluster.
    ids0 = [f"img{i}" for i in range(50)]
    smallest = {ids0[j] for j in np.argsort(uniform_keys(ids0, 0))[:20]}
    assert smallest == {i for i in chosen if int(i[3:]) < 50}


@pytest.mark.parametrize("batch_size", [1, 7, 33])
def test_selection_does_not_depend_on_batching_or_order(batch_size):
    table = _table([50, 5, 20, 21, 3, 64])
    whole = ClusterCapSampler(cap=20, seed=4)
    state = whole.fit([table])
    reference = _selected_ids(whole, [table], state)
    split = ClusterCapSampler(cap=20, seed=4)
    split_state = split.fit(_batches(table, batch_size, seed=batch_size))
    np.testing.assert_array_equal(split_state["threshold"], state["threshold"])
    np.testing.assert_array_equal(split_state["counts"], state["counts"])
    assert _selected_ids(split, _batches(table, 5, seed=99), split_state) == reference
    assert _per_cluster(table, reference, 6) == [20, 5, 20, 20, 3, 20]


def test_different_seeds_select_different_rows():
    table = _table([50])
    picks = []
    for seed in (0, 1):
        s = ClusterCapSampler(cap=20, seed=seed)
        picks.append(_selected_ids(s, [table], s.fit([table])))
    assert len(picks[0]) == len(picks[1]) == 20 and picks[0] != picks[1]


def test_each_row_of_a_big_cluster_is_equally_likely():
    # Cluster of 10 rows, cap 5: over many seeds each row is kept about half the time.
    table = _table([10])
    hits = np.zeros(10)
    for seed in range(300):
        s = ClusterCapSampler(cap=5, seed=seed)
        hits += s.select(table, s.fit([table]))
    assert np.abs(hits / 300 - 0.5).max() < 0.1


def test_bad_rows_are_dropped_and_counted():
    table = pa.table(
        {
            "image_id": ["a", None, "c", "d", "e"],
            "cluster": pa.array([0, 0, None, -1, 0], pa.int64()),
        }
    )
    sampler = ClusterCapSampler(cap=1, seed=0)
    state = sampler.fit([table])
    assert state["counts"].tolist() == [2]
    mask = sampler.select(table, state)
    assert mask.tolist()[1:4] == [False, False, False] and mask.sum() == 1
    unseen = pa.table({"image_id": ["z"], "cluster": pa.array([7], pa.int64())})
    assert sampler.select(unseen, state).tolist() == [False]
    assert sampler.stats.dropped == {"cluster_not_fitted": 1, "null_image_id_or_cluster": 3, "over_cap": 1}
    assert sampler.stats.counts["fit_invalid_rows"] == 3
    with pytest.raises(TypeError):
        sampler.fit([pa.table({"image_id": ["a"], "cluster": ["x"]})])


def test_state_round_trips_through_npz_without_pickle():
    table = _table([30, 2])
    sampler = ClusterCapSampler(cap=10, seed=2)
    state = sampler.fit([table])
    loaded = state_from_npz(state_to_npz(state))
    assert sorted(loaded) == ["counts", "threshold"]
    np.testing.assert_array_equal(loaded["threshold"], state["threshold"])
    assert sampler.select(table, loaded).sum() == 12


def test_registered_as_a_sampler_plugin():
    sampler = build_plugin("sampler", {"name": "cluster_cap", "params": {"cap": 3, "seed": 1}})
    assert isinstance(sampler, ClusterCapSampler) and sampler.required_columns == ("image_id", "cluster")
    empty = sampler.fit([])
    assert empty["threshold"].shape == (0,) and empty["counts"].shape == (0,)
    with pytest.raises(ValueError):
        ClusterCapSampler(cap=0)


# ---------------------------------------------------------------------------- one-pass fit equals a full sort


def _brute_force_state(keys: np.ndarray, clusters: np.ndarray, cap: int) -> dict[str, np.ndarray]:
    """The definition: per cluster, the cap-th smallest key when it has more than cap rows."""
    n = int(clusters.max()) + 1 if len(clusters) else 0
    counts = np.bincount(clusters, minlength=n).astype(np.int64)
    threshold = np.full(n, np.inf)
    for c in np.flatnonzero(counts > cap):
        threshold[c] = np.sort(keys[clusters == c])[cap - 1]
    return {"threshold": threshold, "counts": counts}


@pytest.mark.parametrize("max_held_rows", [None, 1, 7, 30])
@pytest.mark.parametrize("min_compaction", [1, 50, 1 << 16])
@pytest.mark.parametrize("quantise", [False, True])
def test_one_pass_fit_equals_a_sort_of_all_keys(monkeypatch, tmp_path, min_compaction, quantise, max_held_rows):
    import realsyn.samplers.cluster_cap as cluster_cap

    monkeypatch.setattr(cluster_cap, "_MIN_COMPACTION_ROWS", min_compaction)
    runs = []
    real_write = cluster_cap._Runs.write
    monkeypatch.setattr(cluster_cap._Runs, "write", lambda self, c, k: runs.append(len(c)) or real_write(self, c, k))
    if quantise:  # many equal keys: ties at the threshold
        monkeypatch.setattr(cluster_cap, "uniform_keys", lambda ids, seed: np.floor(uniform_keys(ids, seed) * 8) / 8)
    rng = np.random.default_rng(7)
    sizes = rng.integers(0, 60, size=40).tolist()  # empty, small, exactly-cap and big clusters
    sizes[3], sizes[4] = 12, 13
    table = _table(sizes)
    batches = _batches(table, 37, seed=3)
    sampler = ClusterCapSampler(cap=12, seed=2, max_held_rows=max_held_rows, spill_dir=str(tmp_path))
    state = sampler.fit(batches)
    # a small budget spills held rows as runs (merged at the end), a large one never does
    assert bool(runs) == (max_held_rows is not None and min_compaction < 1 << 16)
    assert list(tmp_path.iterdir()) == []  # the runs are removed
    keys = cluster_cap.uniform_keys(table.column("image_id").to_pylist(), 2)
    expected = _brute_force_state(keys, table.column("cluster").to_numpy().astype(np.int64), 12)
    np.testing.assert_array_equal(state["counts"], expected["counts"])
    np.testing.assert_array_equal(state["threshold"], expected["threshold"])
    assert np.isfinite(state["threshold"]).sum() == sum(1 for s in sizes if s > 12)
    kept = _selected_ids(sampler, batches, state)
    if not quantise:  # with ties every row at the threshold is kept
        assert _per_cluster(table, kept, len(sizes)) == [min(s, 12) for s in sizes]


# ---------------------------------------------------------------------------- the stage: one build, n + 1 passes


META_ENTRIES = ["dog", "cat", "red car", "tree"]
WORDS = ["a dog", "the cat", "red car", "tree", "nothing", "a red car and a dog", None]


class _LengthScorer:
    """Perplexity = the caption's length (nan without one)."""

    def score(self, texts):
        return np.array([np.nan if t is None else float(len(t)) for t in texts], dtype=np.float32)


def _stage_inputs(tmp_path):
    from realsyn import layout
    from realsyn.storage import Storage

    storage = Storage(str(tmp_path / "store"))
    rng = np.random.default_rng(11)
    shards = {"s0": 40, "s1": 3, "s2": 31}
    full, retrievals = {}, {}
    with storage.writer(layout.IMAGE_CLUSTERS) as w:
        for shard, n in shards.items():
            ids = [f"{shard}-img{i}" for i in range(n)]
            clusters = rng.integers(0, 4, size=n).astype(np.int32)
            texts = [[WORDS[j] for j in rng.integers(0, len(WORDS), size=rng.integers(0, 3))] for _ in range(n)]
            captions = [WORDS[j] for j in rng.integers(0, len(WORDS), size=n)]
            w.write_parquet(layout.assignments_file(shard), pa.table({"image_id": ids, "cluster": pa.array(clusters)}))
            order = rng.permutation(n)  # retrievals and captions in another row order than the assignments
            retrievals[shard] = pa.table(
                {"image_id": [ids[i] for i in order], "texts": pa.array([texts[i] for i in order], pa.list_(pa.string()))}
            )
            with storage.writer(layout.SYNTHETIC_CAPTIONS, shard) as cw:
                cw.write_parquet(
                    layout.CAPTIONS_FILE,
                    pa.table(
                        {
                            "image_id": [ids[i] for i in order[::-1]],
                            "synthetic_caption": pa.array([captions[i] for i in order[::-1]], pa.string()),
                        }
                    ),
                )
            with storage.writer(layout.FILTERED_PAIRS, shard):
                pass
            full[shard] = pa.table(
                {
                    "image_id": ids,
                    "cluster": pa.array(clusters),
                    "real_texts": pa.array(texts, pa.list_(pa.string())),
                    "synthetic_caption": pa.array(captions, pa.string()),
                    "text_perplexity": pa.array(_LengthScorer().score(captions)),
                }
            )
    from realsyn.stages.common import write_retrievals

    write_retrievals(storage, retrievals)  # one global generation, one file per shard
    meta = tmp_path / "meta.json"
    meta.write_text(__import__("json").dumps(META_ENTRIES))
    return storage, list(shards), full, str(meta)


def _reference_splits(full, shards, splits):
    """Each sampler fitted on everything the previous ones kept, then deciding shard by shard (the definition)."""
    out = {}
    for split in splits:
        reasons = {s: [None] * full[s].num_rows for s in shards}
        detail = {s: [None] * full[s].num_rows for s in shards}
        states = []
        for spec in split.samplers:
            sampler = build_plugin("sampler", spec)

            def alive(s, reasons=reasons):
                return full[s].filter(pa.array([r is None for r in reasons[s]]))

            state = sampler.fit([alive(s) for s in shards])
            states.append(state)
            for s in shards:
                live = [i for i, r in enumerate(reasons[s]) if r is None]
                for row, reason in zip(live, sampler.reasons(alive(s), state)):
                    if reason is not None:
                        reasons[s][row], detail[s][row] = reason, spec.name
        out[split.name] = (reasons, detail, states)
    return out


@pytest.mark.parametrize("spill", [False, True])
def test_sample_splits_builds_each_shard_once_and_decides_as_the_definition(tmp_path, monkeypatch, spill):
    from realsyn import layout
    from realsyn.samplers import cluster_cap
    from realsyn.samplers.metaclip import MetaClipSampler
    from realsyn.stages import sample as stage

    runs = []
    if spill:  # cluster_cap holds at most 2 rows: its fits go through spilled runs, with the same states and splits
        monkeypatch.setattr(cluster_cap, "MAX_HELD_ROWS", 2)
        monkeypatch.setattr(cluster_cap, "_MIN_COMPACTION_ROWS", 1)
        real_write = cluster_cap._Runs.write
        monkeypatch.setattr(cluster_cap._Runs, "write", lambda self, c, k: runs.append(len(c)) or real_write(self, c, k))

    storage, shards, full, meta = _stage_inputs(tmp_path)
    splits = [
        stage.SplitSpec("cap", [{"name": "cluster_cap", "params": {"cap": 3}}]),
        stage.SplitSpec(
            "chain",
            [
                {"name": "cluster_cap", "params": {"cap": 6, "seed": 1}},
                {"name": "metaclip", "params": {"metadata_path": meta, "t": 4, "seed": 2}},
                {"name": "points_perplexity", "params": {"keep_fraction": 0.6}},
            ],
        ),
        stage.SplitSpec("meta_only", [{"name": "metaclip", "params": {"metadata_path": meta, "t": 2, "text_columns": ["real_texts"]}}]),
        stage.SplitSpec("everything", []),
    ]
    splits = [stage.SplitSpec(s.name, [stage.PluginSpec(**spec) for spec in s.samplers]) for s in splits]
    builds, matched = [], []
    real_build, real_row_matches = stage._Candidates._build, MetaClipSampler.row_matches
    monkeypatch.setattr(stage._Candidates, "_build", lambda self, shard: builds.append(shard) or real_build(self, shard))
    monkeypatch.setattr(MetaClipSampler, "row_matches", lambda self, batch: matched.append(batch.num_rows) or real_row_matches(self, batch))
    scorers = []
    stats = stage.sample_splits(storage, shards, splits, perplexity_scorer=lambda: scorers.append(1) or _LengthScorer())

    assert builds == shards  # one read-and-join per shard for all splits and passes
    assert bool(runs) == spill
    assert len(scorers) == 1
    assert len(matched) == 2 * len(shards)  # the two MetaCLIP samplers match each shard once (in fit), never in reasons
    monkeypatch.setattr(MetaClipSampler, "row_matches", real_row_matches)
    expected = _reference_splits(full, shards, splits)
    reader = storage.reader(layout.SAMPLED_SPLITS)
    summary = reader.read_json(layout.SUMMARY_FILE)
    for split in splits:
        reasons, detail, states = expected[split.name]
        rows_out = 0
        for s in shards:
            decisions = reader.read_parquet(layout.split_decisions_file(split.name, s)).to_pydict()
            assert decisions["id"] == full[s].column("image_id").to_pylist()
            assert decisions["reason"] == reasons[s] and decisions["detail"] == detail[s]
            assert decisions["kept"] == [r is None for r in reasons[s]]
            selection = reader.read_parquet(layout.split_selection_file(split.name, s))
            keep = pa.array([r is None for r in reasons[s]])
            assert selection.equals(full[s].select(["image_id", "cluster"]).filter(keep))
            rows_out += selection.num_rows
        for position, (spec, state) in enumerate(zip(split.samplers, states)):
            saved = state_from_npz(reader.read_bytes(f"{split.name}/state-{position}-{spec.name}.npz"))
            assert sorted(saved) == sorted(state)
            for key in state:
                np.testing.assert_array_equal(saved[key], state[key])
        all_reasons = [r for s in shards for r in reasons[s] if r is not None]
        assert stats[split.name].counts["rows_in"] == sum(full[s].num_rows for s in shards)
        assert stats[split.name].counts["rows_out"] == rows_out
        assert stats[split.name].dropped == {r: all_reasons.count(r) for r in set(all_reasons)}
        assert summary[split.name]["rows_out"] == rows_out
    chain_reasons = {r for s in shards for r in expected["chain"][0][s]}
    assert {"over_cap", "balanced_out", "no_metadata_match", "perplexity_above_points_cut", None} <= chain_reasons
    assert any(f.startswith("chain/report-1-") and f.endswith(".png") for f in reader.files)


def test_sample_splits_without_text_samplers_reads_no_texts(tmp_path, monkeypatch):
    from realsyn import layout
    from realsyn.stages import sample as stage

    storage, shards, full, _ = _stage_inputs(tmp_path)
    read = []
    real_reader = storage.reader
    monkeypatch.setattr(storage, "reader", lambda asset, partition=None: read.append(asset) or real_reader(asset, partition))
    spec = stage.SplitSpec("cap", [stage.PluginSpec(name="cluster_cap", params={"cap": 2})])
    stage.sample_splits(storage, shards, [spec])
    assert layout.RETRIEVALS not in read and layout.SYNTHETIC_CAPTIONS not in read
    kept = [real_reader(layout.SAMPLED_SPLITS).read_parquet(layout.split_selection_file("cap", s)).num_rows for s in shards]
    assert sum(kept) == sum(min(2, n) for n in np.bincount(np.concatenate([full[s].column("cluster").to_numpy() for s in shards])))
