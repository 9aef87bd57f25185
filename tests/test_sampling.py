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
