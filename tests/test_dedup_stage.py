"""The global dedup stage over several shards: semantic duplicates across shards, reasons, random-weight guard."""

import numpy as np
import pyarrow as pa

from realsyn import layout
from realsyn.layout import IMAGE_DEDUP, IMAGE_EMBEDDINGS
from realsyn.stages.common import dedup_kept_mask
from realsyn.stages.dedup import dedup_images
from realsyn.storage import Storage


def _write_shard(storage, shard, ids, emb, sha, phash, pixels, random_weights=False):
    emb = np.asarray(emb, np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    with storage.writer(IMAGE_EMBEDDINGS, shard) as w:
        w.write_numpy("embeddings.npy", emb)
        w.write_parquet(
            "index.parquet",
            pa.table({"image_id": ids, "sha256": sha, "phash": pa.array(phash, pa.uint64()), "pixels": pa.array(pixels, pa.int64())}),
        )
        w.write_json("model.json", {"model_id": "test", "dim": emb.shape[1], "random_weights": random_weights})


def _corpus(storage, random_weights=False):
    # a0 ~ b1 semantically (cosine 0.995), a1 == b0 byte-identical, a2 and b2 distinct
    _write_shard(
        storage,
        "a",
        ["a0", "a1", "a2"],
        [[1, 0.1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]],
        ["s0", "s1", "s2"],
        [0x0, 0xFFFF, 0xFF00FF],
        [100, 50, 10],
        random_weights,
    )
    _write_shard(
        storage,
        "b",
        ["b0", "b1", "b2"],
        [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]],
        ["s1", "s4", "s5"],
        [0xFFFF, 0xFFFFFFFF00000000, 0xF0F0F0F0F0F0F0F0],
        [50, 400, 10],
        random_weights,
    )


def _decisions(storage, shard):
    # the decision record's detail names the representative
    return {
        r["id"]: (r["kept"], r["detail"], r["reason"])
        for r in storage.reader(IMAGE_DEDUP).read_parquet(layout.decisions_file(shard)).to_pylist()
    }


def test_semantic_and_exact_duplicates_across_shards(tmp_path):
    storage = Storage(str(tmp_path))
    _corpus(storage)
    stats = dedup_images(storage, ["a", "b"], semantic_threshold=0.95)
    a, b = _decisions(storage, "a"), _decisions(storage, "b")
    # the larger image (b1, 400 px) represents the semantic pair; a1 (first) represents the exact pair
    assert a["a0"] == (False, "b1", "semantic_duplicate")
    assert b["b1"] == (True, "b1", None)
    assert a["a1"] == (True, "a1", None) and b["b0"] == (False, "a1", "exact_duplicate")
    assert a["a2"][0] and b["b2"][0]
    assert stats.dropped == {"exact_duplicate": 1, "semantic_duplicate": 1}
    assert list(dedup_kept_mask(storage, IMAGE_DEDUP, "a")) == [False, True, True]


def test_random_weight_embeddings_never_merge_distinct_images(tmp_path):
    storage = Storage(str(tmp_path))
    _corpus(storage, random_weights=True)
    stats = dedup_images(storage, ["a", "b"], semantic_threshold=0.95)
    assert stats.dropped == {"exact_duplicate": 1}
    assert _decisions(storage, "a")["a0"] == (True, "a0", None)
    # an explicit opt-in applies the threshold anyway
    assert dedup_images(storage, ["a", "b"], semantic_threshold=0.95, semantic_on_random_weights=True).dropped == {
        "exact_duplicate": 1,
        "semantic_duplicate": 1,
    }


def test_perceptual_duplicates_by_hamming_distance(tmp_path):
    storage = Storage(str(tmp_path))
    _write_shard(storage, "a", ["x", "y", "z"], [[1, 0], [0, 1], [1, 1]], ["1", "2", "3"], [0b1111, 0b1110, 0xFF00], [10, 20, 30])
    stats = dedup_images(storage, ["a"], semantic_threshold=None, perceptual_max_distance=1)
    d = _decisions(storage, "a")
    assert d["x"] == (False, "y", "perceptual_duplicate") and d["y"][0] and d["z"][0]
    assert stats.dropped == {"perceptual_duplicate": 1}
