"""Code versions, data versions and staleness: what `realsyn run` and the UI call stale.

Code version. Each asset's code version is its algorithm version (``ALGORITHM_VERSIONS``, bumped when
an algorithm's output changes), the run config and resource fields that change its output (not
threads, devices or batch sizes), and the code versions of its parents. The parents enter because
Dagster reports a changed code version only on the asset itself: with them, a changed knob marks
the asset and everything below it stale in the UI. The run config is part of the definitions
(``REALSYN_CONFIG`` or ``realsyn run --config``), so Dagster knows the code versions at load.

Data version. Each materialized partition records in its metadata what it holds and what it was
made from: ``realsyn/data_version`` (the content hash of the generation it committed,
``realsyn.versions``), ``realsyn/generation``, ``realsyn/input_versions`` (each parent's version as
read: a per-shard parent's partition, a global parent's slice for this shard, or for a global asset
the hash over every shard it covered) and, for global assets, ``realsyn/slice_versions``.

Stale. A partition is stale when it has no materialization or no committed output, when its code
version changed, when its committed generation is not the one recorded (replaced or deleted
behind Dagster's back), or when an input version differs from the one recorded. Dagster's own
stale status cannot see a shard added under a global asset once there are 100 or more shards
(``SKIP_PARTITION_DATA_VERSION_DEPENDENCY_THRESHOLD``), so `realsyn run` computes staleness here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from realsyn import layout
from realsyn.storage import Storage
from realsyn.versions import current_generation, partition_version, source_version, stable_hash

DATA_VERSION_KEY = "realsyn/data_version"
GENERATION_KEY = "realsyn/generation"
INPUT_VERSIONS_KEY = "realsyn/input_versions"
SLICE_VERSIONS_KEY = "realsyn/slice_versions"
CODE_VERSION_TAG = "dagster/code_version"

# Bump an asset's entry when its algorithm changes what it writes: that asset and everything below it go stale.
ALGORITHM_VERSIONS: dict[str, str] = {key: "1" for key in layout.STAGE_OF if key != layout.SOURCE_DOCUMENTS}
# 2: rows assigned through the tree of two-level training (coarse_centroids.npy, centroid_cells.npy written beside the centroids)
ALGORITHM_VERSIONS[layout.SENTENCE_CLUSTERS] = ALGORITHM_VERSIONS[layout.IMAGE_CLUSTERS] = "2"

# The op whose run config feeds an asset, where it is not the asset's own name (a multi-asset).
CONFIG_OP = {layout.IMAGE_DB: "document_databases", layout.SENTENCE_DB: "document_databases"}

# The resources (and their fields) that change an asset's output besides its own config.
OUTPUT_RESOURCES: dict[str, tuple[str, ...]] = {
    layout.IMAGE_DB: ("shard_source",),
    layout.SENTENCE_DB: ("shard_source",),
    layout.SENTENCE_PERPLEXITY: ("perplexity",),
    layout.FILTERED_SENTENCES: ("perplexity",),  # the default band is the scorer's
    layout.IMAGE_EMBEDDINGS: ("embedder",),
    layout.SENTENCE_EMBEDDINGS: ("embedder",),
    layout.SYNTHETIC_CAPTIONS: (
        "generator",
        "embedder",
        "captioner",
    ),  # the tagger embeds its vocabulary; the concise caption is in the prompt
    layout.FILTERED_PAIRS: ("embedder",),
    layout.SAMPLED_SPLITS: ("perplexity",),  # POINTS scores texts when a split asks for it
}
# Config fields that change how fast a step runs, not what it writes.
NON_OUTPUT_FIELDS: dict[str, frozenset[str]] = {
    layout.RETRIEVALS: frozenset({"threads", "max_image_gb"}),
    layout.SYNTHETIC_CAPTIONS: frozenset({"batch_size"}),  # the caption cache key leaves it out too
}
NON_OUTPUT_PARAMS = frozenset({"device", "batch_size", "max_concurrency", "timeout_s", "api_key_env"})
RESOURCE_FIELDS = {"shard_source": ("reader",), "perplexity": ("enabled", "name", "params")}


# ---------------------------------------------------------------------------------------- code versions
def _config_class(assets_def: dg.AssetsDefinition):
    import inspect

    from pydantic import BaseModel

    param = inspect.signature(assets_def.op.compute_fn.decorated_fn).parameters.get("config")
    cls = param.annotation if param is not None else None
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _resource_fingerprint(resource: Any, name: str) -> Any:
    """The fields of a resource that change outputs, as plain data (plug-in params without speed knobs)."""
    fields = RESOURCE_FIELDS.get(name, ("name", "params"))
    out = {}
    for f in fields:
        value = getattr(resource, f, None)
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        if f == "params" and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k not in NON_OUTPUT_PARAMS}
        if f == "reader" and isinstance(value, Mapping):
            value = {"name": value.get("name"), "params": value.get("params")}
        out[f] = value
    return out


def own_config(key: str, assets_def: dg.AssetsDefinition, asset_configs: Mapping[str, Any]) -> dict[str, Any]:
    """An asset's effective run config (defaults filled, speed-only fields left out)."""
    cls = _config_class(assets_def)
    if cls is None:
        return {}
    from pydantic import ValidationError

    op = CONFIG_OP.get(key, key)
    try:
        dumped = cls(**(asset_configs.get(op) or {})).model_dump(mode="json")
    except ValidationError as e:  # the same words as `realsyn run`'s config check
        errors = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"assets.{op}: {errors}") from e
    except (ValueError, TypeError) as e:
        raise ValueError(f"assets.{op}: {e}") from e
    return {k: v for k, v in dumped.items() if k not in NON_OUTPUT_FIELDS.get(key, frozenset())}


def code_versions(
    assets_defs: Iterable[dg.AssetsDefinition], asset_configs: Mapping[str, Any], resources: Mapping[str, Any]
) -> dict[str, str]:
    """Code version of every executable asset: ``{algorithm}-{hash of own config, resources, parents' code versions}``."""
    by_key: dict[str, dg.AssetsDefinition] = {}
    parents: dict[str, list[str]] = {}
    for ad in assets_defs:
        if not isinstance(ad, dg.AssetsDefinition) or not ad.is_executable:
            continue
        for spec in ad.specs:
            k = spec.key.to_user_string()
            by_key[k] = ad
            parents[k] = sorted(d.asset_key.to_user_string() for d in spec.deps)
    out: dict[str, str] = {}

    def version(k: str, seen: tuple = ()) -> str:
        if k in out:
            return out[k]
        if k in seen:
            raise ValueError(f"dependency cycle through {k}")
        algorithm = ALGORITHM_VERSIONS.get(k, "1")
        own = {
            "config": own_config(k, by_key[k], asset_configs),
            "resources": {r: _resource_fingerprint(resources[r], r) for r in OUTPUT_RESOURCES.get(k, ()) if r in resources},
            "parents": {p: version(p, (*seen, k)) for p in parents[k] if p in by_key},
        }
        out[k] = f"{algorithm}-{stable_hash([algorithm, own], 12)}"
        return out[k]

    for k in by_key:
        version(k)
    return out


def with_code_versions(assets_defs: Iterable[Any], versions: Mapping[str, str]) -> list[Any]:
    """The asset definitions with their code versions set (specs without one are left as they are)."""
    out = []
    for ad in assets_defs:
        if isinstance(ad, dg.AssetsDefinition) and ad.is_executable:
            ad = ad.map_asset_specs(lambda s: s.replace_attributes(code_version=versions.get(s.key.to_user_string(), s.code_version)))
        out.append(ad)
    return out


# ---------------------------------------------------------------------------------------- recorded versions
@dataclass
class Recorded:
    """What one materialization of a partition recorded about itself."""

    code_version: str | None
    data_version: str | None
    generation: str | None
    inputs: dict[str, Any] = field(default_factory=dict)
    slices: dict[str, str] = field(default_factory=dict)
    timestamp: float = 0.0


def _value(metadata: Mapping[str, Any], key: str) -> Any:
    v = metadata.get(key)
    return getattr(v, "value", v) if v is not None else None


def _recorded(record: Any) -> Recorded:
    mat = record.asset_materialization
    meta = mat.metadata or {}
    inputs, slices = _value(meta, INPUT_VERSIONS_KEY), _value(meta, SLICE_VERSIONS_KEY)
    return Recorded(
        code_version=(mat.tags or {}).get(CODE_VERSION_TAG),
        data_version=_value(meta, DATA_VERSION_KEY),
        generation=_value(meta, GENERATION_KEY),
        inputs=dict(inputs) if isinstance(inputs, Mapping) else {},
        slices=dict(slices) if isinstance(slices, Mapping) else {},
        timestamp=record.timestamp,
    )


class VersionIndex:
    """The latest materialization of every partition of an asset, read from the instance once per asset."""

    def __init__(self, instance: dg.DagsterInstance):
        self.instance = instance
        self._latest: dict[str, dict[str | None, Recorded]] = {}

    def invalidate(self, keys: Iterable[str] | None = None) -> None:
        if keys is None:
            self._latest.clear()
        for k in keys or ():
            self._latest.pop(k, None)

    def latest(self, key: str, partitioned: bool) -> dict[str | None, Recorded]:
        if key not in self._latest:
            self._latest[key] = self._load(dg.AssetKey(key), partitioned)
        return self._latest[key]

    def _load(self, key: dg.AssetKey, partitioned: bool) -> dict[str | None, Recorded]:
        if not partitioned:
            records = self.instance.fetch_materializations(key, limit=1).records
            return {None: _recorded(records[0])} if records else {}
        from dagster._core.events import DagsterEventType

        ids = self.instance.get_latest_storage_id_by_partition(key, DagsterEventType.ASSET_MATERIALIZATION)
        out: dict[str | None, Recorded] = {}
        wanted = sorted(ids.values())
        for start in range(0, len(wanted), 1000):
            chunk = wanted[start : start + 1000]
            flt = dg.AssetRecordsFilter(asset_key=key, storage_ids=chunk)
            for record in self.instance.fetch_materializations(flt, limit=len(chunk)).records:
                out[record.partition_key] = _recorded(record)
        return out


# ---------------------------------------------------------------------------------------- input versions
@dataclass(frozen=True)
class Parent:
    key: str
    kind: str  # "source" (input shards), "shard" (per-shard asset) or "global"


SOURCES = frozenset({layout.SOURCE_DOCUMENTS})


def parents_of(asset_graph: Any, key: str) -> list[Parent]:
    """An asset's parents and how it reads them. (Inside a run, assets outside the job look external
    too, so the input shards are named, not inferred.)"""
    out = []
    for pk in sorted(asset_graph.get(dg.AssetKey(key)).parent_keys, key=lambda k: k.to_user_string()):
        name = pk.to_user_string()
        kind = "source" if name in SOURCES else ("shard" if asset_graph.get(pk).is_partitioned else "global")
        out.append(Parent(name, kind))
    return out


def input_versions(
    index: VersionIndex,
    parents: list[Parent],
    partition: str | None,
    *,
    shards: list[str] | None = None,
    source_uri: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Each parent's current version as this partition reads it (``partition`` None: a global asset over ``shards``)."""
    out: dict[str, Any] = {}
    for p in parents:
        if p.kind == "source":
            keys = [partition] if partition is not None else list(shards or [])
            versions = {s: source_version(source_uri(s)) if source_uri else None for s in keys}
            out[p.key] = versions[partition] if partition is not None else stable_hash(sorted(versions.items()))
        elif p.kind == "shard":
            latest = index.latest(p.key, True)
            if partition is not None:
                rec = latest.get(partition)
                out[p.key] = rec.data_version if rec else None
            else:
                out[p.key] = stable_hash(sorted((s, latest[s].data_version if s in latest else None) for s in shards or []))
        else:
            rec = index.latest(p.key, False).get(None)
            if rec is None:
                out[p.key] = None
            elif partition is not None and partition in rec.slices:
                out[p.key] = rec.slices[partition]  # a per-shard consumer reads its shard's files only
            else:
                out[p.key] = rec.data_version
    return out


def stale_reason(
    index: VersionIndex,
    storage: Storage | None,
    key: str,
    partition: str | None,
    code_version: str | None,
    parents: list[Parent],
    *,
    shards: list[str] | None = None,
    source_uri: Callable[[str], str] | None = None,
) -> str | None:
    """Why a partition must be (re)materialized, or None when it is fresh."""
    rec = index.latest(key, partition is not None).get(partition)
    if rec is None:
        return "missing"
    committed = current_generation(storage, key, partition) if storage is not None else rec.generation
    if committed is None and storage is not None:
        return "missing output"
    if code_version is not None and rec.code_version != code_version:
        return "code version changed"
    if rec.data_version is None or rec.generation != committed:
        return "output replaced"
    now = input_versions(index, parents, partition, shards=shards, source_uri=source_uri)
    changed = sorted(k for k in set(now) | set(rec.inputs) if now.get(k) != rec.inputs.get(k))
    return f"new input {', '.join(changed)}" if changed else None


# ---------------------------------------------------------------------------------------- recording
def record_partition(
    context: dg.AssetExecutionContext,
    storage: Storage,
    key: str,
    partition: str | None,
    *,
    shards: list[str] | None = None,
    shard_source: Any = None,
    index: VersionIndex | None = None,
    shard_uris: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The version metadata of a partition just committed: its content hash, generation, folder and inputs.
    (``index`` and ``shard_uris`` are shared by the partitions of one step, so a backfill reads each once.)"""
    parents = parents_of(context.job_def.asset_layer.asset_graph, key)
    index = index or VersionIndex(context.instance)
    if shard_uris is None:
        shard_uris = shard_source.list_shards() if shard_source is not None and any(p.kind == "source" for p in parents) else {}
    inputs = input_versions(index, parents, partition, shards=shards, source_uri=shard_uris.get)
    version = partition_version(storage, key, partition, shards=shards if partition is None else None)
    meta: dict[str, Any] = {
        DATA_VERSION_KEY: version["data_version"],
        GENERATION_KEY: version["generation"],
        INPUT_VERSIONS_KEY: dg.MetadataValue.json(inputs),
        "dagster/uri": dg.MetadataValue.path(storage.current_uri(key, partition)),
    }
    if "slices" in version:
        meta[SLICE_VERSIONS_KEY] = dg.MetadataValue.json(version["slices"])
    return meta


def data_version_of(meta: Mapping[str, Any]) -> dg.DataVersion:
    return dg.DataVersion(str(meta[DATA_VERSION_KEY]))


# ---------------------------------------------------------------------------------------- Dagster's view
def dagster_stale_status(defs: dg.Definitions, instance: dg.DagsterInstance) -> dict[tuple[str, str | None], str]:
    """Dagster's stale status (``FRESH``, ``STALE``, ``MISSING``) of every asset partition: what the UI's
    ``staleStatus`` answers, from the same resolver the webserver uses."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._time import get_current_datetime

    graph = defs.resolve_asset_graph()
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None), instance=instance, asset_graph=graph
    )
    resolver = CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)
    out: dict[tuple[str, str | None], str] = {}
    for key in sorted(graph.materializable_asset_keys, key=lambda k: k.to_user_string()):
        partitions_def = graph.get(key).partitions_def
        for partition in partitions_def.get_partition_keys(dynamic_partitions_store=instance) if partitions_def else [None]:
            out[(key.to_user_string(), partition)] = resolver.get_status(key, partition).value
    return out
