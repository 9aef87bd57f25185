"""Stage 11a: semantic balanced splits, each a chain of pluggable samplers fitted on compact per-shard tables."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from realsyn import layout
from realsyn.decisions import decision_table
from realsyn.plugins import PluginSpec, build_plugin
from realsyn.plugins.kinds import PerplexityScorer
from realsyn.stages.common import require_partitions
from realsyn.stats import StepStats
from realsyn.storage import Storage


@dataclass
class SplitSpec:
    """A split is a chain of samplers: each one is fitted on what the previous ones kept."""

    name: str
    samplers: list[PluginSpec] = field(default_factory=list)


class _Candidates:
    """Per-shard candidate tables for the samplers: image_id, cluster, real_texts, synthetic_caption[, text_perplexity].

    ``text_perplexity`` is scored only when a sampler requires it, with the scorer ``perplexity_scorer()`` builds.
    """

    def __init__(self, storage: Storage, perplexity_scorer: Callable[[], PerplexityScorer | None] | None = None):
        self.storage, self.scorer_factory = storage, perplexity_scorer
        self._perplexity: dict[str, np.ndarray] = {}

    def table(self, shard: str, need: Sequence[str] = ()) -> pa.Table:
        assigned = self.storage.reader(layout.IMAGE_CLUSTERS).read_parquet(layout.assignments_file(shard))
        ids = assigned.column("image_id").to_pylist()
        retr = self.storage.reader(layout.RETRIEVALS, shard).read_parquet(layout.RETRIEVALS_FILE, columns=["image_id", "texts"])
        caps = self.storage.reader(layout.SYNTHETIC_CAPTIONS, shard).read_parquet(
            layout.CAPTIONS_FILE, columns=["image_id", "synthetic_caption"]
        )
        rpos = {x: i for i, x in enumerate(retr.column("image_id").to_pylist())}
        cpos = {x: i for i, x in enumerate(caps.column("image_id").to_pylist())}
        table = assigned.append_column("real_texts", retr.column("texts").take(pa.array([rpos[i] for i in ids], pa.int64())))
        table = table.append_column(
            "synthetic_caption", caps.column("synthetic_caption").take(pa.array([cpos[i] for i in ids], pa.int64()))
        )
        if "text_perplexity" in need:
            if shard not in self._perplexity:
                scorer = self.scorer_factory() if self.scorer_factory else None
                if scorer is None:
                    raise ValueError("a sampler needs text_perplexity but no perplexity scorer is configured")
                self._perplexity[shard] = np.asarray(scorer.score(table.column("synthetic_caption").to_pylist()), np.float32)
            table = table.append_column("text_perplexity", pa.array(self._perplexity[shard]))
        return table


def _fit_and_decide(
    w,
    split: str,
    position: int,
    spec: PluginSpec,
    shards: Sequence[str],
    cands: _Candidates,
    reasons: dict[str, np.ndarray],
    dropped_by: dict[str, np.ndarray],
) -> None:
    """Fit one sampler of the chain on what is still alive, then record its own reason for each row it drops."""
    sampler = build_plugin("sampler", spec)
    need = tuple(sampler.required_columns)

    def alive(s: str) -> np.ndarray:
        return np.array([r is None for r in reasons[s]], dtype=bool)

    def batches() -> Iterator[pa.Table]:
        for s in shards:
            yield cands.table(s, need).filter(pa.array(alive(s)))

    state = sampler.fit(batches())
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in state.items()})
    w.write_bytes(f"{split}/state-{position}-{_file_safe(spec.name)}.npz", buf.getvalue())
    for name, blob in sampler.report(state).items():
        if isinstance(blob, pa.Table):
            w.write_parquet(f"{split}/report-{position}-{name}", blob)
        else:
            w.write_bytes(f"{split}/report-{position}-{name}", blob)
    for s in shards:
        live = np.flatnonzero(alive(s))
        got = sampler.reasons(cands.table(s, need).filter(pa.array(alive(s))), state)
        if len(got) != len(live):
            raise ValueError(f"sampler {spec.name!r} returned {len(got)} reasons for {len(live)} rows")
        for row, reason in zip(live, got):
            if reason is not None:
                reasons[s][row] = reason
                dropped_by[s][row] = spec.name


def sample_splits(
    storage: Storage,
    shards: Sequence[str],
    splits: Sequence[SplitSpec],
    *,
    perplexity_scorer: Callable[[], PerplexityScorer | None] | None = None,
) -> dict[str, StepStats]:
    """Fit each split's sampler chain on compact per-shard tables, then decide shard by shard."""
    if not splits:
        raise ValueError("sampled_splits: no split configured")
    shards = require_partitions(storage, layout.FILTERED_PAIRS, shards)
    cands = _Candidates(storage, perplexity_scorer)
    all_stats: dict[str, StepStats] = {}
    with storage.writer(layout.SAMPLED_SPLITS) as w:
        summary = {}
        for split in splits:
            stats = StepStats(f"{layout.SAMPLED_SPLITS}:{split.name}")
            with stats.timed():
                base = {s: cands.table(s) for s in shards}
                reasons = {s: np.full(t.num_rows, None, dtype=object) for s, t in base.items()}
                dropped_by = {s: np.full(t.num_rows, None, dtype=object) for s, t in base.items()}
                for i, spec in enumerate(split.samplers):
                    _fit_and_decide(w, split.name, i, spec, shards, cands, reasons, dropped_by)
                for s, t in base.items():
                    keep = np.array([r is None for r in reasons[s]], dtype=bool)
                    w.write_parquet(layout.split_selection_file(split.name, s), t.select(["image_id", "cluster"]).filter(pa.array(keep)))
                    w.write_parquet(
                        layout.split_decisions_file(split.name, s),
                        decision_table(t.column("image_id"), list(reasons[s]), list(dropped_by[s])),
                    )
                    stats.add("rows_in", t.num_rows)
                    stats.add("rows_out", int(keep.sum()))
                    stats.drop_reasons(reasons[s])
            all_stats[split.name] = stats
            summary[split.name] = {"samplers": [spec.model_dump() for spec in split.samplers], **stats.as_dict()}
        w.write_json(layout.SUMMARY_FILE, summary)
        w.commit(info={"shards": list(shards)})  # readers find each split's per-shard selections by name
    return all_stats


def _file_safe(name: str) -> str:
    """A dotted-path sampler name as a file-name part."""
    return name.replace(":", "-").replace("/", "-")
