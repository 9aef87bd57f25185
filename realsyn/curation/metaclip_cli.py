"""``realsyn metaclip match|balance``: MetaCLIP substring matching and balancing from the command line.

Inputs and outputs are local paths or URLs (s3://...); outputs are written whole or not at all
(a temporary file renamed, or uploaded in one piece). Bad input exits 2 (``realsyn.cli.run_cli``).
Run as ``realsyn metaclip`` or ``python -m realsyn.curation.metaclip_cli``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realsyn.cli import positive_int, run_cli
from realsyn.curation.metaclip import (
    MetaClipMatcher,
    StreamingBalancer,
    distribution_table,
    head_tail_summary,
    lists_to_csr,
    load_metadata,
    plot_cumulative,
)
from realsyn.curation.textio import check_format, is_parquet, iter_text_batches, sibling_path
from realsyn.io import atomic_local_file, filesystem_for, iter_jsonl
from realsyn.stats import StepStats

# ---------------------------------------------------------------------------- reading


def iter_match_batches(uri: str, batch_size: int = 65536) -> Iterator[tuple[np.ndarray, list[list[int]]]]:
    """(row ids, entry id lists) from a matches file: ours (row, entry_ids) or MetaCLIP-style JSONL
    (idx, matched_entry_ids); a row without an index gets its line number."""
    check_format(uri)
    if is_parquet(uri):
        fs, path = filesystem_for(uri)
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["row", "entry_ids"]):
                rows = batch.column(0).to_numpy(zero_copy_only=False).astype(np.int64)
                yield rows, [ids or [] for ids in batch.column(1).to_pylist()]
        return
    rows: list[int] = []
    ids: list[list[int]] = []
    for line_no, record in enumerate(iter_jsonl(uri, strict=True)):  # blank lines are not rows
        entry_ids = record.get("entry_ids", record.get("matched_entry_ids"))
        if entry_ids is None:
            raise ValueError(f"{uri}: line {line_no + 1} has neither 'entry_ids' nor 'matched_entry_ids'")
        rows.append(int(record.get("row", record.get("idx", line_no))))
        ids.append(sorted(set(int(i) for i in entry_ids)))
        if len(rows) >= batch_size:
            yield np.asarray(rows, dtype=np.int64), ids
            rows, ids = [], []
    if rows:
        yield np.asarray(rows, dtype=np.int64), ids


# ---------------------------------------------------------------------------- writing


class MatchesWriter:
    """Rows of (row, entry_ids) as JSONL lines or a Parquet file (row int64, entry_ids list<int32>)."""

    SCHEMA = pa.schema([("row", pa.int64()), ("entry_ids", pa.list_(pa.int32()))])

    def __init__(self, local_path: str, parquet: bool, gzipped: bool = False):
        self.parquet = parquet
        if parquet:
            self._file = None
        else:
            self._file = gzip.open(local_path, "wt", encoding="utf-8") if gzipped else open(local_path, "w", encoding="utf-8")
        self._writer = pq.ParquetWriter(local_path, self.SCHEMA) if parquet else None

    def write(self, rows: np.ndarray, offsets: np.ndarray, entry_ids: np.ndarray) -> None:
        if self._writer is not None:
            ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(entry_ids.astype(np.int32)))
            self._writer.write_table(pa.Table.from_arrays([pa.array(rows.astype(np.int64)), ids], schema=self.SCHEMA))
            return
        flat = [str(i) for i in entry_ids.tolist()]
        offs = offsets.tolist()
        lines = [f'{{"row": {r}, "entry_ids": [{", ".join(flat[a:b])}]}}\n' for r, a, b in zip(rows.tolist(), offs, offs[1:])]
        self._file.writelines(lines)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        else:
            self._file.close()


# ---------------------------------------------------------------------------- commands


def cmd_match(args: argparse.Namespace) -> int:
    stats = StepStats("metaclip_match")
    check_format(args.input)
    check_format(args.output)
    with stats.timed():
        start = time.perf_counter()
        metadata = load_metadata(args.metadata)
        matcher = MetaClipMatcher(metadata)
        built = time.perf_counter() - start
        row = 0
        with atomic_local_file(args.output) as tmp:
            writer = MatchesWriter(tmp, is_parquet(args.output), gzipped=args.output.endswith(".gz"))
            try:
                for texts in iter_text_batches(args.input, args.text_column, args.batch_size, stats):
                    offsets, ids = matcher.match_batch_csr(texts)
                    rows = np.arange(row, row + len(texts), dtype=np.int64)
                    writer.write(rows, offsets, ids)
                    row += len(texts)
                    stats.add("rows", len(texts))
                    stats.add("rows_without_text", sum(1 for t in texts if not isinstance(t, str)))
                    stats.add("rows_matched", int((np.diff(offsets) > 0).sum()))
                    stats.add("matches", len(ids))
            finally:
                writer.close()
    summary = {"metadata_entries": len(metadata), "automaton_build_seconds": round(built, 3), **stats.as_dict()}
    print(json.dumps(summary, sort_keys=True))
    return 0


def cmd_balance(args: argparse.Namespace) -> int:
    stats = StepStats("metaclip_balance")
    check_format(args.output)
    with stats.timed():
        metadata = load_metadata(args.metadata) if args.metadata else None
        counts = np.zeros(len(metadata) if metadata is not None else 0, dtype=np.int64)
        for _, lists in iter_match_batches(args.matches):  # pass 1: per-entry counts over the whole pool
            _, flat = lists_to_csr(lists)
            if len(flat) and flat.min() < 0:
                raise ValueError(f"{args.matches}: negative entry id")
            if len(flat) and flat.max() >= len(counts):
                if metadata is not None:
                    raise ValueError(f"{args.matches}: entry id {int(flat.max())} is outside the {len(metadata)}-entry metadata")
                counts = np.concatenate([counts, np.zeros(int(flat.max()) + 1 - len(counts), np.int64)])
            counts += np.bincount(flat, minlength=len(counts))
        balancer = StreamingBalancer(counts, args.t, args.seed, args.epoch)
        counts_after = np.zeros_like(counts)
        with atomic_local_file(args.output) as tmp:
            writer = MatchesWriter(tmp, is_parquet(args.output), gzipped=args.output.endswith(".gz"))
            try:
                for rows, lists in iter_match_batches(args.matches):  # pass 2: draws in row order
                    offsets, flat = lists_to_csr(lists)
                    keep = balancer.keep_csr(offsets, flat)
                    lengths = np.diff(offsets)
                    kept_flat = flat[np.repeat(keep, lengths)]
                    kept_offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
                    np.cumsum(lengths[keep], out=kept_offsets[1:])
                    writer.write(rows[keep], kept_offsets, kept_flat)
                    counts_after += np.bincount(kept_flat, minlength=len(counts))
                    stats.add("texts", len(rows))
                    stats.add("texts_matched", int((lengths > 0).sum()))
                    stats.add("texts_kept", int(keep.sum()))
            finally:
                writer.close()
        if metadata is not None:
            table = distribution_table(counts, counts_after, metadata, args.t)
            with atomic_local_file(sibling_path(args.output, "distribution.parquet")) as tmp:
                pq.write_table(table, tmp)
        if args.plot:
            plot_cumulative(counts, counts_after, args.t, args.plot)
    summary = {"t": args.t, "seed": args.seed, "epoch": args.epoch, **head_tail_summary(counts, counts_after, args.t), **stats.as_dict()}
    print(json.dumps(summary, sort_keys=True))
    return 0


def _add_subcommands(sub: Any) -> None:
    match = sub.add_parser("match", help="per input row, the sorted ids of the metadata entries its text matches")
    match.add_argument("--metadata", required=True, help="JSON list of entries (entry id = position)")
    match.add_argument("--input", required=True, help="Parquet or JSONL file (local or s3://)")
    match.add_argument("--text-column", required=True, help="column / field holding the text")
    match.add_argument("--output", required=True, help="JSONL ({row, entry_ids} per line) or .parquet")
    match.add_argument("--batch-size", type=positive_int, default=8192)
    match.set_defaults(func=cmd_match)

    bal = sub.add_parser("balance", help="MetaCLIP balancing of a matches file: keep rows, print head/tail counts")
    bal.add_argument("--matches", required=True, help="output of `metaclip match` (JSONL or Parquet)")
    bal.add_argument("--t", type=positive_int, required=True, help="head/tail threshold (paper: 20000 for 400M pairs)")
    bal.add_argument("--seed", type=int, required=True)
    bal.add_argument("--epoch", type=int, default=None, help="fresh draw per epoch (online curation)")
    bal.add_argument("--output", required=True, help="kept rows: JSONL or .parquet")
    bal.add_argument("--metadata", help="also write <output>.distribution.parquet (per-entry counts before/after)")
    bal.add_argument("--plot", help="also write the cumulative-count plot (PNG) here")
    bal.set_defaults(func=cmd_balance)


def add_metaclip_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``metaclip match`` and ``metaclip balance`` to a CLI's subparsers."""
    parser = subparsers.add_parser("metaclip", help="MetaCLIP substring matching and balancing")
    _add_subcommands(parser.add_subparsers(dest="metaclip_command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m realsyn.curation.metaclip_cli", description=__doc__)
    _add_subcommands(parser.add_subparsers(dest="metaclip_command", required=True))
    return run_cli(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
