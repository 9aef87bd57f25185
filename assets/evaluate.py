"""Evaluate stage: per published split, a small model trained with each objective (CLIP, SigLIP, SuperClass) and scored.

Partitioned by split: the split names are the export's, known only once a publish ran, so the
partitions are dynamic (``splits``). ``realsyn run`` registers the published splits before the
``evaluate_splits`` job; in the UI the ``published_splits_sensor`` does, after every publish, and
requests one evaluation per split.
"""

import base64

import dagster as dg
from pydantic import Field, field_validator

from assets.configs import effective_config
from assets.execution import SHARD_BACKFILL
from assets.profiles import step_options
from assets.versions import data_version_of, record_partition
from realsyn import layout
from realsyn.stages import evaluate as stage
from resources import StorageResource

SPLITS = "splits"
split_partitions = dg.DynamicPartitionsDefinition(name=SPLITS)


class EvaluationConfig(dg.Config):
    """Embedded defaults: a tiny model for a few CPU steps on the sample photos (numbers mean nothing at that size).
    Production: a real open_clip config, thousands of steps on a GPU pod, a real held-out benchmark."""

    objectives: list[str] = Field(
        default_factory=lambda: ["clip", "siglip", "superclass"],
        description="Objectives, each trained from random weights: clip (ClipLoss), siglip (SigLipLoss, t'=log 10, b=-10), superclass (classifier over the vocabulary, online IDF).",
    )
    model: str = Field(default="RealSyn-Tiny", description="open_clip model config (random weights), e.g. ViT-B-32 in production.")
    steps: int = Field(default=20, ge=1, description="Optimizer steps per objective.")
    batch_size: int = Field(default=8, ge=1, description="Samples per step (capped at the split's size).")
    lr: float = Field(default=1e-3, gt=0, description="Peak AdamW learning rate (linear warmup, cosine decay).")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay on matrices (not on gains, biases, temperature).")
    warmup_steps: int = Field(default=3, ge=0, description="Linear warmup steps.")
    seed: int = Field(default=0, description="Weights, data order and per-step text draws.")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu or cuda.")
    heldout: str = Field(
        default="embedded:sample-photos",
        description="Held-out set: a folder (local or s3://) with classnames.json, templates.json (clip_benchmark format) and samples.jsonl, or embedded:sample-photos.",
    )
    heldout_dataset: str | None = Field(
        default=None, description="Dataset key when classnames.json/templates.json hold several (clip_benchmark's layout)."
    )
    eval_batch_size: int = Field(default=64, ge=1, description="Images per forward pass when scoring.")

    @field_validator("objectives")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        from realsyn.evaluation.objectives import OBJECTIVES

        unknown = [o for o in value if o not in OBJECTIVES]
        if unknown or not value:
            raise ValueError(f"objectives {value}: choose one or more of {', '.join(OBJECTIVES)}")
        return value

    def settings(self):
        from realsyn.evaluation.train import TrainSettings

        return TrainSettings(
            model=self.model,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            seed=self.seed,
            device=self.device,
            eval_batch_size=self.eval_batch_size,
        )


def published_splits(storage) -> list[str]:
    """The split names of the committed export (none before the first publish)."""
    if not storage.has(layout.EXPORTED_SPLITS):
        return []
    return sorted(storage.reader(layout.EXPORTED_SPLITS).read_json(layout.SUMMARY_FILE))


def register_published_splits(instance: dg.DagsterInstance, storage) -> list[str]:
    """Add the published splits as ``splits`` partitions (what the runner does before evaluate_splits); the published names."""
    names = published_splits(storage)
    known = set(instance.get_dynamic_partitions(SPLITS))
    new = [n for n in names if n not in known]
    if new:
        instance.add_dynamic_partitions(SPLITS, new)
    return names


def evaluation_metadata(record: dict, comparison: list[dict], curve_png: bytes, location: str) -> dict:
    """The UI's view of one evaluation: flat metrics (plotted across materializations), tables, the curve."""
    meta: dict = {
        "split_version": record["split_version"],
        "split_data_version": record["data_version"],
        "split_uri": dg.MetadataValue.path(record["split_uri"]),
        "split_samples": record["samples"],
        "model": record["settings"]["model"],
        "steps": record["settings"]["steps"],
        "heldout": record["heldout"],
        "seconds": round(record["seconds"], 2),
    }
    for objective, metrics in record["objectives"].items():
        for name in (*stage.METRIC_COLUMNS, "train_seconds"):
            if metrics.get(name) is not None:
                meta[f"{objective}/{name}"] = float(metrics[name])
    meta["evaluation"] = dg.MetadataValue.md(stage.markdown_table(stage.evaluation_rows([record])))
    meta["comparison"] = dg.MetadataValue.md(stage.markdown_table(stage.evaluation_rows(comparison)))
    png = base64.b64encode(curve_png).decode()
    meta["training_curve"] = dg.MetadataValue.md(f"![training loss](data:image/png;base64,{png})")
    meta["path"] = dg.MetadataValue.path(location)
    return meta


@dg.asset(
    name=layout.EVALUATIONS,
    deps=[layout.EXPORTED_SPLITS],
    partitions_def=split_partitions,
    group_name=layout.STAGE_OF[layout.EVALUATIONS],
    backfill_policy=SHARD_BACKFILL,  # a backfill over splits: up to N splits per run, as every partitioned step
    **step_options(layout.EVALUATIONS, "gpu"),  # trains models: the GPU profile (pool gpu); local runs ignore it
    description="Per split: a small open_clip model trained from random weights with CLIP, SigLIP and SuperClass objectives (one of a sample's real or synthetic texts per step), scored by zero-shot accuracy and retrieval recall@1/5 on a held-out set; the split's data version in the metadata.",
)
def evaluations(context: dg.AssetExecutionContext, config: EvaluationConfig, storage: StorageResource) -> dg.MaterializeResult:
    config = effective_config(context, config)
    store = storage.get()
    split = context.partition_key
    record = stage.evaluate_split(
        store, split, config.settings(), objectives=config.objectives, heldout=config.heldout, heldout_dataset=config.heldout_dataset
    )
    reader = store.reader(layout.EVALUATIONS, split)
    if record.get("skipped"):
        context.log.warning(f"split {split}: evaluation skipped ({record['skipped']})")
        meta = {"skipped": record["skipped"], "split_version": record["split_version"], "split_data_version": record["data_version"]}
    else:
        curve = reader.read_bytes(layout.TRAINING_CURVE_PLOT)
        meta = evaluation_metadata(record, stage.comparison_records(store, split), curve, reader.uri(""))
    versions = record_partition(context, store, layout.EVALUATIONS, split)
    return dg.MaterializeResult(metadata={**meta, **versions}, data_version=data_version_of(versions))


@dg.asset_sensor(
    asset_key=dg.AssetKey(layout.EXPORTED_SPLITS),
    job_name="evaluate_splits",
    default_status=dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds=60,
    description="After every publish of the export: its splits become partitions of evaluations, and one evaluation per split is requested.",
)
def published_splits_sensor(context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry, storage: StorageResource):
    names = published_splits(storage.get())
    known = set(context.instance.get_dynamic_partitions(SPLITS))
    new = [n for n in names if n not in known]
    run_key = f"publish-{asset_event.run_id}-{asset_event.timestamp:.3f}"  # one evaluation per split per publish
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"{run_key}-{n}", partition_key=n) for n in names],
        dynamic_partitions_requests=[split_partitions.build_add_request(new)] if new else [],
    )
