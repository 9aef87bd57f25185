"""Asset checks: the blocking one guards retrieval and the GPU captioning steps, in a run and across runs; the others verify the outputs."""

import dagster as dg
import numpy as np

from realsyn import layout
from resources import StorageResource

# Requested with its asset by the nightly rebuild, so the steps below (`retrievals`) can go in the same
# run, where the failed check stops them; across runs they wait (all_deps_blocking_checks_passed).
CHECK_WITH_ITS_ASSET = dg.AutomationCondition.any_deps_match(dg.AutomationCondition.will_be_requested()).with_label("asset requested")


@dg.asset_check(
    asset=layout.SENTENCE_CLUSTERS,
    blocking=True,
    automation_condition=CHECK_WITH_ITS_ASSET,
    description="Centroids are finite and unit-norm and the bank holds every clustered sentence; blocks retrieval and GPU generation otherwise.",
)
def sentence_clusters_are_usable(storage: StorageResource) -> dg.AssetCheckResult:
    reader = storage.get().reader(layout.SENTENCE_CLUSTERS)
    centroids = np.asarray(reader.read_numpy(layout.CENTROIDS_FILE))
    bank_layout = reader.read_parquet(layout.CLUSTER_LAYOUT_FILE)
    summary = reader.read_json(layout.SUMMARY_FILE)
    bank_rows = int(np.sum(bank_layout.column("end").to_numpy() - bank_layout.column("start").to_numpy()))
    norms = np.linalg.norm(centroids, axis=1) if len(centroids) else np.zeros(0)
    ok = bool(
        len(centroids) > 0 and np.isfinite(centroids).all() and np.allclose(norms, 1.0, atol=1e-3) and bank_rows == summary["sentences"]
    )
    return dg.AssetCheckResult(passed=ok, metadata={"clusters": len(centroids), "bank_rows": bank_rows, "sentences": summary["sentences"]})


@dg.asset_check(asset=layout.SAMPLED_SPLITS, description="In every cluster_cap split, no image cluster holds more samples than its cap.")
def sampled_splits_respect_caps(storage: StorageResource) -> dg.AssetCheckResult:
    st = storage.get()
    reader = st.reader(layout.SAMPLED_SPLITS)
    summary = reader.read_json(layout.SUMMARY_FILE)
    worst: dict[str, int] = {}
    passed = True
    for split, info in summary.items():
        caps = [s["params"]["cap"] for s in info["samplers"] if s["name"] == "cluster_cap"]
        if not caps:
            continue
        names = [layout.split_selection_file(split, shard) for shard in reader.info["shards"]]
        clusters = np.concatenate([reader.read_parquet(f).column("cluster").to_numpy() for f in names]) if names else np.zeros(0, np.int32)
        largest = int(np.bincount(clusters).max()) if len(clusters) else 0
        worst[split] = largest
        passed &= largest <= min(caps)
    return dg.AssetCheckResult(passed=passed, metadata={f"{k}/largest_cluster": v for k, v in worst.items()})


@dg.asset_check(
    asset=layout.EXPORTED_SPLITS,
    description="Every tar in each split's sizes.json is in the split's folder, sizes.json adds up to the split's sample count, and exported plus dropped samples equal the samples sampled_splits chose.",
)
def exported_splits_match_sizes(storage: StorageResource) -> dg.AssetCheckResult:
    st = storage.get()
    reader = st.reader(layout.EXPORTED_SPLITS)
    splits = st.reader(layout.SAMPLED_SPLITS)
    summary = reader.read_json(layout.SUMMARY_FILE)
    passed, meta = True, {}
    for split, info in summary.items():
        sizes = reader.read_json(layout.export_sizes_file(split))
        present = {p.rstrip("/").rsplit("/", 1)[-1] for p in reader.fs.ls(reader.path(split), detail=False)} if sizes else set()
        missing = [name for name in sizes if name not in present]
        chosen = sum(
            splits.read_parquet(layout.split_selection_file(split, s), columns=["image_id"]).num_rows for s in reader.info.get("shards", [])
        )
        dropped = sum(int(v) for k, v in info.items() if k.startswith("dropped_"))
        passed &= not missing and sum(sizes.values()) == info.get("rows_out", 0) == chosen - dropped
        meta.update({f"{split}/samples": sum(sizes.values()), f"{split}/missing_tars": len(missing), f"{split}/chosen": chosen})
    return dg.AssetCheckResult(passed=passed, metadata=meta)
