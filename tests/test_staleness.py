"""Staleness-aware reruns on the sample corpus, counting real work: after a change only what is stale runs.

One base run (three of the four shards) is copied for each test: the storage root, the caption cache
and the Dagster instance (SQLite) travel together. Every stage function, every backend prompt and
every embedder call is counted while the rerun goes; a test fails if any extra work happens.
"""

import collections
import os
import shutil

import dagster as dg
import pytest
import yaml

from assets.runner import run_graph
from realsyn import layout
from realsyn.sample_corpus import build_sample_corpus
from realsyn.storage import Storage

pytestmark = pytest.mark.slow

HELD_SHARD = "part-00001"  # left out of the base run; test 3 adds it (its sentences are nobody's nearest: some prompts stay)
STAGE_FUNCTIONS = {
    "realsyn.stages.ingest": ["ingest_shard"],
    "realsyn.stages.filter": ["filter_images", "filter_sentence_candidates", "score_sentence_perplexity", "filter_sentences_by_perplexity"],
    "realsyn.stages.embed": ["embed_images", "embed_sentences"],
    "realsyn.stages.dedup": ["dedup_images", "dedup_sentences"],
    "realsyn.stages.cluster": ["cluster_sentences", "cluster_images"],
    "realsyn.stages.retrieve": ["retrieve_all"],
    "realsyn.stages.caption": ["generate_captions", "filter_pairs"],
    "realsyn.stages.sample": ["sample_splits"],
    "realsyn.stages.export": ["export_shard", "publish_splits"],
}
PER_SHARD = {"ingest_shard", "filter_images", "filter_sentence_candidates", "score_sentence_perplexity"}
PER_SHARD |= {"filter_sentences_by_perplexity", "embed_images", "embed_sentences", "generate_captions", "filter_pairs", "export_shard"}


def _config() -> dict:
    cfg = {
        "assets": {
            # one sentence cluster: retrieval is exact, so a new shard changes only the top-k its sentences enter
            "sentence_clusters": {"n_clusters": 1},
            "image_clusters": {"n_clusters": 4},
            "synthetic_captions": {"max_new_tokens": 12, "batch_size": 8},
            "sampled_splits": {
                "splits": [{"name": n, "samplers": [{"name": "cluster_cap", "params": {"cap": c}}]} for n, c in (("cap2", 2), ("cap3", 3))]
            },
            "exported_shards": {"samples_per_shard": 4},
        },
        "resources": {},
    }
    if "evaluations" in layout.STAGE_OF:  # the per-split evaluation below the export: as small as it goes
        cfg["assets"]["evaluations"] = {"objectives": ["clip"], "steps": 1}
    return cfg


def _below(asset: str) -> set[str]:
    """The asset and everything downstream of it in the graph."""
    from definitions import build_definitions

    graph = build_definitions("local", input_uri="/tmp/in", storage_root="/tmp/out", resource_overrides={}).resolve_asset_graph()
    out, todo = set(), [dg.AssetKey(asset)]
    while todo:
        key = todo.pop()
        if key.to_user_string() not in out:
            out.add(key.to_user_string())
            todo.extend(graph.get(key).child_keys)
    return out


def _assert_ran(report, expected: set[str], shards: list[str]) -> None:
    """Exactly ``expected`` ran: the per-shard ones for every shard, the global ones once."""
    assert set(report.ran) == expected, sorted(report.ran)
    for asset, partitions in report.ran.items():
        if layout.STAGE_OF[asset] in (layout.DEDUP, layout.CLUSTER, layout.RETRIEVE, layout.SAMPLE) or asset == layout.EXPORTED_SPLITS:
            assert partitions == [None], asset
        elif asset in {layout.FILTERED_PAIRS, layout.SYNTHETIC_CAPTIONS, layout.EXPORTED_SHARDS}:
            assert partitions == shards, asset


def _write_config(path, cfg: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def _instance(home) -> dg.DagsterInstance:
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(home, "dagster.yaml"), "w") as f:
        f.write("telemetry:\n  enabled: false\n")
    return dg.DagsterInstance.from_config(str(home))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The sample corpus less one shard, materialized once (persistent instance under home/)."""
    root = tmp_path_factory.mktemp("staleness-base")
    planted = build_sample_corpus(str(root / "corpus"))
    (held,) = [f for f in os.listdir(root / "corpus") if f.startswith(HELD_SHARD + ".")]
    os.makedirs(root / "held")
    shutil.move(str(root / "corpus" / held), str(root / "held" / held))
    instance = _instance(root / "home")
    report = run_graph(
        str(root / "corpus"),
        str(root / "store"),
        config_path=_write_config(root / "run.yaml", _config()),
        instance=instance,
        log=lambda *_: None,
    )
    assert report.success, [str(f) for f in report.failures]
    assert report.runs > 0 and report.fresh_runs == 0  # a first run: nothing was fresh
    instance.dispose()
    return root, planted, held


@pytest.fixture
def workspace(base, tmp_path):
    root, planted, held = base
    work = tmp_path / "w"
    shutil.copytree(root, work)
    instance = _instance(work / "home")
    yield work, instance, held
    instance.dispose()


class Work:
    """Counts stage calls (with their shard), backend prompts and embedder calls by the stage they ran in."""

    def __init__(self):
        self.calls: collections.Counter = collections.Counter()
        self.shards: dict[str, set] = collections.defaultdict(set)
        self.prompts = 0
        self.embedder: collections.Counter = collections.Counter()  # (stage, method) -> calls
        self.stage: str | None = None

    def stage_wrapper(self, name, fn):
        def wrapped(*args, **kwargs):
            self.calls[name] += 1
            if name in PER_SHARD:
                self.shards[name].add(args[1])
            outer, self.stage = self.stage, name
            try:
                return fn(*args, **kwargs)
            finally:
                self.stage = outer

        return wrapped

    def counting(self, what, fn):
        def wrapped(obj, items, *args, **kwargs):
            if what == "prompts":
                self.prompts += len(items)
            else:
                self.embedder[(self.stage, what)] += 1
            return fn(obj, items, *args, **kwargs)

        return wrapped


@pytest.fixture
def work(monkeypatch):
    import importlib

    from realsyn.plugins import REGISTRY

    counter = Work()
    for module_name, names in STAGE_FUNCTIONS.items():
        module = importlib.import_module(module_name)
        for name in names:
            monkeypatch.setattr(module, name, counter.stage_wrapper(name, getattr(module, name)))

    def cls(kind, name):
        module, attr = REGISTRY[kind][name].split(":")
        return getattr(importlib.import_module(module), attr)

    backend = cls("generation_backend", "transformers")
    monkeypatch.setattr(backend, "generate", counter.counting("prompts", backend.generate))
    embedder = cls("embedder", "open_clip")
    for method in ("embed_images", "embed_texts"):
        monkeypatch.setattr(embedder, method, counter.counting(method, getattr(embedder, method)))
    return counter


def _rerun(work_dir, instance, cfg: dict | None = None):
    path = _write_config(work_dir / "run.yaml", cfg) if cfg is not None else str(work_dir / "run.yaml")
    report = run_graph(str(work_dir / "corpus"), str(work_dir / "store"), config_path=path, instance=instance, log=lambda *_: None)
    assert report.success, [str(f) for f in report.failures]
    return report


def _shards(work_dir) -> list[str]:
    return sorted(f.split(".")[0] for f in os.listdir(work_dir / "corpus") if f.startswith("part-"))


def _dagster_stale(work_dir, instance, cfg: dict) -> dict[str, set]:
    """Dagster's own stale status (what the UI's staleStatus answers) per asset: the set of statuses over its partitions."""
    from assets.versions import dagster_stale_status
    from definitions import build_definitions

    defs = build_definitions(
        "local",
        input_uri=str(work_dir / "corpus"),
        storage_root=str(work_dir / "store"),
        resource_overrides={},
        asset_configs=cfg["assets"],
    )
    out: dict[str, set] = collections.defaultdict(set)
    for (asset, _), status in dagster_stale_status(defs, instance).items():
        out[asset].add(status)
    return dict(out)


def test_nothing_changed_runs_nothing(workspace, work):
    work_dir, instance, _ = workspace
    report = _rerun(work_dir, instance)
    assert report.runs == 0 and report.ran == {} and report.fresh_runs >= 3 * 3 + 3  # every job of every shard skipped
    assert work.calls == {} and work.prompts == 0 and work.embedder == {}


def test_changed_cosine_band_reruns_only_the_similarity_step_and_below(workspace, work):
    work_dir, instance, _ = workspace
    shards = _shards(work_dir)
    storage = Storage(str(work_dir / "store"))
    sims = sorted(
        v
        for s in shards
        for v in storage.reader(layout.FILTERED_PAIRS, s).read_parquet(layout.SIMILARITY_FILE).column("similarity").to_pylist()
    )
    cfg = _config()
    cfg["assets"]["filtered_pairs"] = {"low": float(sims[len(sims) // 2]), "high": 1.0}  # the lower half leaves the band

    # the UI: the similarity step and everything below it are stale, nothing above it
    stale = _dagster_stale(work_dir, instance, cfg)
    below = _below(layout.FILTERED_PAIRS)
    assert {layout.FILTERED_PAIRS, layout.IMAGE_CLUSTERS, layout.SAMPLED_SPLITS, layout.EXPORTED_SHARDS, layout.EXPORTED_SPLITS} <= below
    assert layout.SYNTHETIC_CAPTIONS not in below
    assert {a for a, st in stale.items() if "STALE" in st} == below
    assert all(st == {"FRESH"} for a, st in stale.items() if a not in below), stale

    report = _rerun(work_dir, instance, cfg)
    _assert_ran(report, below, shards)
    assert work.calls == {"filter_pairs": 3, "cluster_images": 1, "sample_splits": 1, "export_shard": 3, "publish_splits": 1}
    # no embedding, retrieval or generation call: the similarity step re-judges its committed scores
    assert work.prompts == 0 and not work.embedder, work.embedder
    dropped = sum(
        reason == "similarity_below_band"
        for s in shards
        for reason in storage.reader(layout.FILTERED_PAIRS, s).read_parquet(layout.DECISIONS_FILE).column("reason").to_pylist()
    )
    assert dropped == sum(v < sims[len(sims) // 2] for v in sims) > 0
    assert _dagster_stale(work_dir, instance, cfg) == {a: {"FRESH"} for a in stale}  # and now the UI shows everything fresh


def test_changed_cap_reruns_only_sampling_and_export(workspace, work):
    work_dir, instance, _ = workspace
    shards = _shards(work_dir)
    cfg = _config()
    cfg["assets"]["sampled_splits"]["splits"][1]["samplers"][0]["params"]["cap"] = 1
    report = _rerun(work_dir, instance, cfg)
    _assert_ran(report, _below(layout.SAMPLED_SPLITS), shards)
    assert layout.IMAGE_CLUSTERS not in report.ran
    assert work.calls == {"sample_splits": 1, "export_shard": 3, "publish_splits": 1}
    assert work.prompts == 0 and work.embedder == {}
    storage = Storage(str(work_dir / "store"))
    clusters = collections.Counter()
    for s in shards:
        chosen = storage.reader(layout.SAMPLED_SPLITS).read_parquet(layout.split_selection_file("cap3", s)).column("cluster").to_pylist()
        clusters.update(chosen)
    assert clusters and max(clusters.values()) == 1  # the new cap holds


def test_added_shard_runs_its_shard_steps_the_global_steps_and_only_changed_prompts(workspace, work):
    work_dir, instance, held = workspace
    old_shards = _shards(work_dir)
    storage = Storage(str(work_dir / "store"))

    def snapshot(shards):
        captions = {
            s: set(
                zip(
                    *(
                        storage.reader(layout.SYNTHETIC_CAPTIONS, s).read_parquet(layout.CAPTIONS_FILE).column(c).to_pylist()
                        for c in ("image_id", "prompt_sha")
                    )
                )
            )
            for s in shards
        }
        reads = {
            s: (
                storage.reader(layout.RETRIEVALS).read_bytes(layout.retrievals_file(s)),
                storage.reader(layout.IMAGE_DEDUP).read_bytes(layout.decisions_file(s)),
            )
            for s in shards
        }
        return captions, reads

    def slices(asset):
        (record,) = instance.fetch_materializations(dg.AssetKey(asset), limit=1).records
        return record.asset_materialization.metadata["realsyn/slice_versions"].value

    before_captions, before_reads = snapshot(old_shards)
    before_slices = {a: slices(a) for a in (layout.SAMPLED_SPLITS, layout.RETRIEVALS)}
    shutil.move(str(work_dir / "held" / held), str(work_dir / "corpus" / held))
    report = _rerun(work_dir, instance)
    shards = _shards(work_dir)
    new = HELD_SHARD
    after_captions, after_reads = snapshot(shards)

    # the new shard's per-shard steps, and only its
    for name in (
        "ingest_shard",
        "filter_images",
        "filter_sentence_candidates",
        "score_sentence_perplexity",
        "embed_images",
        "embed_sentences",
    ):
        assert work.shards[name] == {new} and work.calls[name] == 1, name
    # every global step once
    for name in (
        "dedup_images",
        "dedup_sentences",
        "cluster_sentences",
        "retrieve_all",
        "cluster_images",
        "sample_splits",
        "publish_splits",
    ):
        assert work.calls[name] == 1, name
    # captions only for the shards whose retrieved texts or kept images changed (and the new one)
    changed = {s for s in old_shards if before_reads[s] != after_reads[s]} | {new}
    assert work.shards["generate_captions"] == changed and work.shards["filter_pairs"] == changed
    # ... and of those, the backend saw only the prompts the cache could not answer
    new_prompts = sum(len(after_captions[s] - before_captions.get(s, set())) for s in shards)
    assert work.prompts == new_prompts > 0
    assert sum(len(after_captions[s]) for s in changed) > new_prompts  # the cache answered the unchanged prompts
    # the export of a shard reruns when its selection, its texts or its captions changed
    after_slices = {a: slices(a) for a in (layout.SAMPLED_SPLITS, layout.RETRIEVALS)}
    moved = {s for s in shards if any(before_slices[a].get(s) != after_slices[a][s] for a in after_slices)}
    assert work.shards["export_shard"] == moved | changed
    assert set(report.ran[layout.IMAGE_DB]) == {new} and report.ran[layout.RETRIEVALS] == [None]
    # image embeddings computed only in the new shard's embedding step
    assert {stage for stage, method in work.embedder if method == "embed_images"} == {"embed_images"}


def test_each_partition_carries_its_own_counts_and_generation_folder(base):
    from realsyn.decisions import reason_counts

    root, _, _ = base
    instance = dg.DagsterInstance.from_config(str(root / "home"))
    storage = Storage(str(root / "store"))
    try:
        for asset, table in ((layout.FILTERED_IMAGES, layout.IMAGES_FILE), (layout.SYNTHETIC_CAPTIONS, layout.CAPTIONS_FILE)):
            records = instance.fetch_materializations(dg.AssetKey(asset), limit=10).records
            by_shard = {r.partition_key: r.asset_materialization.metadata for r in records}
            assert len(records) == len(by_shard) == 3
            for shard, meta in by_shard.items():
                reader = storage.reader(asset, shard)
                assert meta["dagster/row_count"].value == reader.read_parquet(table).num_rows  # this shard's rows, not the run's
                assert meta["dagster/uri"].value == reader.uri("") and meta["dagster/uri"].value.rstrip("/").endswith(
                    f"g-{reader.generation}"
                )
                assert meta["realsyn/generation"].value == reader.generation
            assert len({m["dagster/row_count"].value for m in by_shard.values()}) > 1, asset  # shards differ in size
        # each shard's drop reasons are its own decisions
        seen = 0
        for r in instance.fetch_materializations(dg.AssetKey(layout.FILTERED_IMAGES), limit=10).records:
            meta = r.asset_materialization.metadata
            dropped = {
                k.removeprefix("dropped_"): v.value for k, v in meta.items() if k.startswith("dropped_") and k != "dropped_by_reason"
            }
            decisions = storage.reader(layout.FILTERED_IMAGES, r.partition_key).read_parquet(layout.DECISIONS_FILE)
            assert dropped == dict(reason_counts(decisions))
            seen += sum(dropped.values())
        assert seen > 0
    finally:
        instance.dispose()


def test_a_multi_shard_run_records_each_shard_on_its_own_event(workspace):
    """A backfill in one run (a partition range): each shard's event has its own counts, folder and data version."""
    from definitions import build_definitions

    work_dir, instance, _ = workspace
    shards = _shards(work_dir)
    defs = build_definitions(
        "local",
        input_uri=str(work_dir / "corpus"),
        storage_root=str(work_dir / "store"),
        resource_overrides={},
        asset_configs=_config()["assets"],
    )
    result = defs.resolve_job_def("prepare_shards").execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey(layout.FILTERED_IMAGES)],
        tags={"dagster/asset_partition_range_start": shards[0], "dagster/asset_partition_range_end": shards[-1]},
    )
    assert result.success
    events = {e.partition: e.metadata for e in result.asset_materializations_for_node(layout.FILTERED_IMAGES)}
    assert sorted(events) == shards
    storage = Storage(str(work_dir / "store"))
    from realsyn.versions import partition_version

    for shard, meta in events.items():
        reader = storage.reader(layout.FILTERED_IMAGES, shard)
        assert meta["dagster/row_count"].value == reader.read_parquet(layout.IMAGES_FILE).num_rows
        assert meta["dagster/uri"].value == reader.uri("")
        assert meta["realsyn/data_version"].value == partition_version(storage, layout.FILTERED_IMAGES, shard)["data_version"]
    assert len({m["realsyn/data_version"].value for m in events.values()}) == len(shards)
    # the rerun wrote the same content: the data versions did not change, so nothing below is stale
    report = _rerun(work_dir, instance)
    assert report.runs == 0
