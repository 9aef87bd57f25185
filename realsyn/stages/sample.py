"""Stage 11a: semantic balanced splits, each a chain of pluggable samplers fitted on compact per-shard tables."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from realsyn import layout
from realsyn.decisions import decision_table
from realsyn.plugins import PluginSpec, build_plugin
from realsyn.plugins.kinds import PerplexityScorer, Sampler
from realsyn.stages.common import read_retrievals, require_partitions
from realsyn.stats import StepStats
from realsyn.storage import Storage


@dataclass
class SplitSpec:
    """A split is a chain of samplers: each one is fitted on what the previous ones kept."""

    name: str
    samplers: list[PluginSpec] = field(default_factory=list)


class _Candidates:
    """Per-shard candidate tables for the samplers: the image clusters' assignments (image_id, cluster)
    joined with the columns the samplers need: ``real_texts`` (retrievals), ``synthetic_caption``
    (captions) and ``text_perplexity`` (scored with the scorer ``perplexity_scorer()`` builds).

    Each shard's table is built (read and joined) once per ``sample_splits`` call, with the columns
    every sampler of every split needs, and spilled to a local Arrow IPC file (zstd) under ``spill_dir``;
    each pass of a sampler chain memory-maps it back instead of re-reading and re-joining.
    """

    def __init__(
        self,
        storage: Storage,
        need: Sequence[str],
        spill_dir: str,
        perplexity_scorer: Callable[[], PerplexityScorer | None] | None = None,
    ):
        self.storage, self.need, self.spill_dir, self.scorer_factory = storage, set(need), spill_dir, perplexity_scorer
        self._spilled: dict[str, str] = {}
        self._scorer: PerplexityScorer | None = None

    def table(self, shard: str) -> pa.Table:
        path = self._spilled.get(shard)
        if path is None:
            path = os.path.join(self.spill_dir, f"{len(self._spilled)}.arrow")
            table = self._build(shard)
            with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema, options=_SPILL_OPTIONS) as writer:
                writer.write_table(table)
            self._spilled[shard] = path
            return table
        return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()

    def _build(self, shard: str) -> pa.Table:
        table = self.storage.reader(layout.IMAGE_CLUSTERS).read_parquet(layout.assignments_file(shard))
        ids = table.column("image_id").to_pylist()
        if "real_texts" in self.need:
            retr = read_retrievals(self.storage, shard, columns=["image_id", "texts"])
            rpos = {x: i for i, x in enumerate(retr.column("image_id").to_pylist())}
            table = table.append_column("real_texts", retr.column("texts").take(pa.array([rpos[i] for i in ids], pa.int64())))
        if "synthetic_caption" in self.need or "text_perplexity" in self.need:
            caps = self.storage.reader(layout.SYNTHETIC_CAPTIONS, shard).read_parquet(
                layout.CAPTIONS_FILE, columns=["image_id", "synthetic_caption"]
            )
            cpos = {x: i for i, x in enumerate(caps.column("image_id").to_pylist())}
            table = table.append_column(
                "synthetic_caption", caps.column("synthetic_caption").take(pa.array([cpos[i] for i in ids], pa.int64()))
            )
        if "text_perplexity" in self.need:
            if self._scorer is None:
                self._scorer = self.scorer_factory() if self.scorer_factory else None
                if self._scorer is None:
                    raise ValueError("a sampler needs text_perplexity but no perplexity scorer is configured")
            scores = np.asarray(self._scorer.score(table.column("synthetic_caption").to_pylist()), np.float32)
            table = table.append_column("text_perplexity", pa.array(scores))
        return table


_SPILL_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


class _SplitRun:
    """One split's sampler chain over the shards, in ``len(samplers) + 1`` passes.

    Pass 0 fits the first sampler; pass ``k`` decides shard by shard with sampler ``k - 1`` (its own
    reason for every row it drops, detail = its name) and feeds what is still alive to sampler ``k``'s
    fit; the last pass decides with the last sampler and writes each shard's selection and decisions.
    A sampler's ``reasons`` thus sees exactly the batches its ``fit`` saw, in the same order.

    Per row the run keeps one int32 code (0: alive, else 1 + an index into ``vocab``, the distinct
    (reason, sampler name) pairs), spilled per shard next to the candidate tables: no per-row state
    is held for the whole corpus.
    """

    def __init__(self, w, split: SplitSpec, samplers: list[Sampler], shards: Sequence[str], cands: _Candidates, stats: StepStats):
        self.w, self.split, self.samplers, self.shards, self.cands, self.stats = w, split, samplers, shards, cands, stats
        self.vocab: list[tuple[str, str]] = []  # code - 1 -> (reason, name of the sampler that gave it)
        self._code_of: dict[tuple[int, str], int] = {}
        self._codes: dict[str, str] = {}  # shard -> its spilled codes (.npy)
        self.states: list[dict[str, np.ndarray]] = []

    def run(self) -> None:
        for position, sampler in enumerate(self.samplers):
            batches = self._pass(position - 1)
            state = sampler.fit(batches)
            for _ in batches:  # decisions of the previous sampler on shards this fit did not read
                pass
            self._save(position, sampler, state)
        for shard, table in zip(self.shards, self._pass(len(self.samplers) - 1, alive_only=False)):
            codes = self._load(shard)
            reason_of = np.array([None] + [r for r, _ in self.vocab], dtype=object)  # the vocabulary grows as samplers decide
            name_of = np.array([None] + [n for _, n in self.vocab], dtype=object)
            keep = codes == 0
            self.w.write_parquet(
                layout.split_selection_file(self.split.name, shard), table.select(["image_id", "cluster"]).filter(pa.array(keep))
            )
            self.w.write_parquet(
                layout.split_decisions_file(self.split.name, shard),
                decision_table(table.column("image_id"), reason_of[codes].tolist(), name_of[codes].tolist()),
            )
            self.stats.add("rows_in", table.num_rows)
            self.stats.add("rows_out", int(keep.sum()))
            for code, count in enumerate(np.bincount(codes, minlength=len(reason_of))):
                if code and count:
                    self.stats.drop(reason_of[code], int(count))

    def _pass(self, decide_with: int, alive_only: bool = True) -> Iterator[pa.Table]:
        """Per shard: sampler ``decide_with`` decides (none when -1), then the rows still alive (or all)."""
        for shard in self.shards:
            table = self.cands.table(shard)
            if shard not in self._codes:
                self._store(shard, np.zeros(table.num_rows, dtype=np.int32))
            if decide_with >= 0:
                self._decide(decide_with, shard, table)
            if alive_only:
                table = table.filter(pa.array(self._load(shard) == 0))
            yield table

    def _store(self, shard: str, codes: np.ndarray) -> None:
        path = self._codes.get(shard)
        if path is None:
            path = self._codes[shard] = os.path.join(self.cands.spill_dir, f"codes-{id(self)}-{len(self._codes)}.npy")
        np.save(path, codes)

    def _load(self, shard: str) -> np.ndarray:
        return np.load(self._codes[shard])

    def _decide(self, position: int, shard: str, table: pa.Table) -> None:
        spec, sampler = self.split.samplers[position], self.samplers[position]
        codes = self._load(shard)
        alive = codes == 0
        live = np.flatnonzero(alive)
        got = sampler.reasons(table.filter(pa.array(alive)), self.states[position])
        if len(got) != len(live):
            raise ValueError(f"sampler {spec.name!r} returned {len(got)} reasons for {len(live)} rows")
        local: dict[str | None, int] = {None: 0}

        def code(reason: str) -> int:
            key = (position, reason)
            if key not in self._code_of:
                self.vocab.append((reason, spec.name))
                self._code_of[key] = len(self.vocab)
            local[reason] = self._code_of[key]
            return local[reason]

        codes[live] = np.fromiter((local[r] if r in local else code(r) for r in got), dtype=np.int32, count=len(live))
        self._store(shard, codes)

    def _save(self, position: int, sampler: Sampler, state: dict[str, np.ndarray]) -> None:
        spec = self.split.samplers[position]
        self.states.append(state)
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in state.items()})
        self.w.write_bytes(f"{self.split.name}/state-{position}-{_file_safe(spec.name)}.npz", buf.getvalue())
        for name, blob in sampler.report(state).items():
            if isinstance(blob, pa.Table):
                self.w.write_parquet(f"{self.split.name}/report-{position}-{name}", blob)
            else:
                self.w.write_bytes(f"{self.split.name}/report-{position}-{name}", blob)


def sample_splits(
    storage: Storage,
    shards: Sequence[str],
    splits: Sequence[SplitSpec],
    *,
    perplexity_scorer: Callable[[], PerplexityScorer | None] | None = None,
) -> dict[str, StepStats]:
    """Fit each split's sampler chain on compact per-shard tables, then decide shard by shard.

    Each shard's candidate table is built once (see ``_Candidates``) and every split's chain runs in
    ``len(samplers) + 1`` passes over it (see ``_SplitRun``).
    """
    if not splits:
        raise ValueError("sampled_splits: no split configured")
    shards = require_partitions(storage, layout.FILTERED_PAIRS, shards)
    chains = [[build_plugin("sampler", spec) for spec in split.samplers] for split in splits]
    need = {column for chain in chains for sampler in chain for column in sampler.required_columns}
    all_stats: dict[str, StepStats] = {}
    with tempfile.TemporaryDirectory(prefix="realsyn-sample-") as spill_dir, storage.writer(layout.SAMPLED_SPLITS) as w:
        cands = _Candidates(storage, sorted(need), spill_dir, perplexity_scorer)
        summary = {}
        for split, samplers in zip(splits, chains):
            stats = StepStats(f"{layout.SAMPLED_SPLITS}:{split.name}")
            with stats.timed():
                _SplitRun(w, split, samplers, shards, cands, stats).run()
            all_stats[split.name] = stats
            summary[split.name] = {"samplers": [spec.model_dump() for spec in split.samplers], **stats.as_dict()}
        w.write_json(layout.SUMMARY_FILE, summary)
        w.commit(info={"shards": list(shards)})  # readers find each split's per-shard selections by name
    return all_stats


def _file_safe(name: str) -> str:
    """A dotted-path sampler name as a file-name part."""
    return name.replace(":", "-").replace("/", "-")
