"""Stage 12: train a small model on a published split with each objective, score it, record it with the split's data version.

``evaluate_split`` reads the tars of the split's latest published version (``_exports/{split}/v{N}/``,
``realsyn.export.published_split_path``), trains one model per objective from random weights
(``realsyn.evaluation``) and scores each on the held-out set. It writes ``evaluations/{split}/g-*/``:
``evaluation.json`` (per objective the metrics, with the split's version and data version),
``curve.parquet`` (objective, step, loss, lr) and ``curve.png``; appends the record to
``_history/evaluations/{split}.jsonl`` (outside any generation), so evaluations of two versions of a
split stay side by side after the next one; and rewrites that version's data card with the results
(``realsyn.datacard.write_card``).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import pyarrow as pa

from realsyn import layout
from realsyn.io import join_path
from realsyn.storage import MissingOutputError, Storage

METRIC_COLUMNS = (
    "zeroshot_acc1",
    "zeroshot_acc5",
    "text_retrieval_recall@1",
    "text_retrieval_recall@5",
    "image_retrieval_recall@1",
    "image_retrieval_recall@5",
    "final_loss",
)


class PublishedSplit:
    """The latest published version of a split (``realsyn.export.published_split_path``: ``_exports/{split}/v{N}/``).

    Its ``data_version`` is the export's content hash from the version's ``manifest.json`` (equal for
    byte-identical exports); ``version`` is N. The folder is never changed by a later publish, so
    training reads a fixed set of tars even while the next version is written.
    """

    def __init__(self, storage: Storage, split: str):
        from realsyn.export import published_split_path

        try:
            uri = published_split_path(storage, split)
        except FileNotFoundError as e:
            raise MissingOutputError(f"{e}; published: {published_split_names(storage)}") from None
        self.split, self.fs, self.uri = split, storage.fs, uri
        self.path = storage.fs._strip_protocol(uri)  # the folder as a path of the storage filesystem
        manifest = json.loads(self.fs.cat_file(join_path(self.fs, self.path, layout.PUBLISHED_MANIFEST_FILE)))
        self.version, self.data_version = int(manifest["version"]), str(manifest["data_version"])
        self.generation = manifest.get("generation")
        sizes = json.loads(self.fs.cat_file(join_path(self.fs, self.path, layout.SIZES_FILE)))
        self.sizes: dict[str, int] = {k: int(v) for k, v in sizes.items()}
        self.tar_paths = [join_path(self.fs, self.path, name) for name in sorted(self.sizes)]

    @property
    def samples(self) -> int:
        return sum(self.sizes.values())


def published_split_names(storage: Storage) -> list[str]:
    """Splits with a published version (a ``latest.json`` under ``_exports/{split}/``)."""
    base = storage.path(layout.PUBLISHED_EXPORTS_DIR)
    if not storage.fs.exists(base):
        return []
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in storage.fs.ls(base, detail=False)]
    return sorted(n for n in names if storage.fs.exists(join_path(storage.fs, base, n, layout.PUBLISHED_LATEST_FILE)))


def evaluate_split(
    storage: Storage,
    split: str,
    settings: Any,
    *,
    objectives: Sequence[str],
    heldout: str,
    heldout_dataset: str | None = None,
) -> dict[str, Any]:
    """Train and score ``objectives`` on ``split`` (settings: ``realsyn.evaluation.train.TrainSettings``); the record written."""
    from realsyn.evaluation.data import TrainingStream
    from realsyn.evaluation.heldout import load_heldout
    from realsyn.evaluation.objectives import OBJECTIVES
    from realsyn.evaluation.train import TrainSettings, train_and_evaluate
    from realsyn.runtime import resolve_device

    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown or not objectives:
        raise ValueError(f"objectives {list(objectives)}: choose one or more of {', '.join(OBJECTIVES)}")
    started = time.perf_counter()
    data = PublishedSplit(storage, split)
    if data.samples == 0:  # nothing to train on: recorded as skipped, not an error (a strict sampler may choose nothing)
        return _commit_skipped(storage, data, heldout, started)
    # a batch never holds the same sample twice: contrastive losses would count it as its own negative
    run_settings = TrainSettings(**{**asdict(settings), "batch_size": min(settings.batch_size, data.samples)})
    run_settings.device = resolve_device(run_settings.device)
    held = load_heldout(heldout, heldout_dataset, storage_options=None)
    runs, counts = train_and_evaluate(
        list(objectives),
        lambda draft_size: TrainingStream(data.fs, data.tar_paths, seed=run_settings.seed, draft_size=draft_size),
        held,
        run_settings,
    )
    record = {
        "split": split,
        "data_version": data.data_version,
        "split_version": data.version,
        "exported_splits_generation": data.generation,
        "split_uri": data.uri,
        "samples": data.samples,
        "tar_shards": len(data.sizes),
        "heldout": heldout if heldout_dataset is None else f"{heldout}#{heldout_dataset}",
        "heldout_images": held.size,
        "settings": asdict(run_settings),
        "objectives": {
            o: {**r.metrics, "train_seconds": r.train_seconds, "eval_seconds": r.eval_seconds, "samples_seen": r.samples_seen}
            for o, r in runs.items()
        },
        "counts": counts,
        "evaluated_at": time.time(),
    }
    curve = pa.table(
        {
            "objective": pa.array([o for o, r in runs.items() for _ in r.curve], pa.string()),
            "step": pa.array([p["step"] for r in runs.values() for p in r.curve], pa.int32()),
            "loss": pa.array([p["loss"] for r in runs.values() for p in r.curve], pa.float32()),
            "lr": pa.array([p["lr"] for r in runs.values() for p in r.curve], pa.float32()),
        }
    )
    record["seconds"] = time.perf_counter() - started
    with storage.writer(layout.EVALUATIONS, split) as w:
        w.write_json(layout.EVALUATION_FILE, record)
        w.write_parquet(layout.TRAINING_CURVE_FILE, curve)
        w.write_bytes(layout.TRAINING_CURVE_PLOT, curve_png(runs, title=f"{split} ({data.data_version})"))
        w.commit(info={"data_version": data.data_version, "split_version": data.version})
    _append_history(storage, split, record)
    from realsyn import datacard

    # the published version's card (README.md, datacard.json) now carries the evaluation; data files untouched
    datacard.write_card(data.path, evaluation=card_evaluation(record), filesystem=storage.fs)
    return record


def _commit_skipped(storage: Storage, data: PublishedSplit, heldout: str, started: float) -> dict[str, Any]:
    record = {
        "split": data.split,
        "split_version": data.version,
        "data_version": data.data_version,
        "split_uri": data.uri,
        "samples": 0,
        "heldout": heldout,
        "skipped": "no samples in the split",
        "objectives": {},
        "evaluated_at": time.time(),
        "seconds": time.perf_counter() - started,
    }
    with storage.writer(layout.EVALUATIONS, data.split) as w:
        w.write_json(layout.EVALUATION_FILE, record)
        w.commit(info={"data_version": data.data_version, "split_version": data.version, "skipped": record["skipped"]})
    _append_history(storage, data.split, record)
    return record


def card_evaluation(record: dict[str, Any]) -> dict[str, Any]:
    """What the data card shows of an evaluation: the setup, and per objective the headline metrics."""
    settings = record["settings"]
    return {
        "model": settings["model"],
        "steps": settings["steps"],
        "batch_size": settings["batch_size"],
        "heldout": record["heldout"],
        "data_version": record["data_version"],
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record["evaluated_at"])),
        "objectives": {
            o: {m: round(float(v[m]), 4) for m in METRIC_COLUMNS if v.get(m) is not None} for o, v in record["objectives"].items()
        },
    }


def curve_png(runs: dict[str, Any], title: str = "") -> bytes:
    """Training loss per step, one line per objective (the losses differ in scale: one panel each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 2.6), squeeze=False)
    for ax, (objective, run) in zip(axes[0], runs.items()):
        ax.plot([p["step"] for p in run.curve], [p["loss"] for p in run.curve], lw=1.2)
        ax.set_title(objective, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("training loss", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def _history_file(split: str) -> str:
    return f"{layout.EVALUATION_HISTORY_DIR}/{split}.jsonl"


def _append_history(storage: Storage, split: str, record: dict[str, Any]) -> None:
    """One line per evaluation of ``split`` (one writer per split partition at a time, as Dagster runs them)."""
    rel = _history_file(split)
    old = storage.read_file(rel) if storage.exists(rel) else b""
    storage.write_file(rel, old + json.dumps(record, sort_keys=True).encode() + b"\n")


def evaluation_history(storage: Storage, split: str) -> list[dict[str, Any]]:
    """Every evaluation of ``split`` recorded under this storage root, oldest first."""
    rel = _history_file(split)
    if not storage.exists(rel):
        return []
    return [json.loads(line) for line in storage.read_file(rel).decode().splitlines() if line.strip()]


def evaluation_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (record, objective): split, data version, objective and the metrics of ``METRIC_COLUMNS``."""
    rows = []
    for rec in records:
        for objective, metrics in rec["objectives"].items():
            rows.append(
                {
                    "split": rec["split"],
                    "version": rec.get("split_version"),
                    "data_version": rec["data_version"],
                    "samples": rec["samples"],
                    "objective": objective,
                    **{m: metrics.get(m) for m in METRIC_COLUMNS},
                }
            )
    return rows


def comparison_records(storage: Storage, split: str, versions: int = 3) -> list[dict[str, Any]]:
    """The current evaluation of every evaluated split, plus up to ``versions`` earlier data versions of ``split``."""
    records = []
    for name in storage.partitions(layout.EVALUATIONS):
        records.append(storage.reader(layout.EVALUATIONS, name).read_json(layout.EVALUATION_FILE))
    current = {r["split"]: r["data_version"] for r in records}
    earlier: dict[str, dict[str, Any]] = {}
    for rec in evaluation_history(storage, split):
        if rec["data_version"] != current.get(split):
            earlier[rec["data_version"]] = rec  # the last evaluation of each earlier version
    return records + list(earlier.values())[-versions:]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of ``evaluation_rows`` as a Markdown table (metrics to 3 decimals)."""
    head = ["split", "version", "data_version", "samples", "objective", *METRIC_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row[h]:.3f}" if isinstance(row[h], float) else ("" if row[h] is None else str(row[h])) for h in head]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
