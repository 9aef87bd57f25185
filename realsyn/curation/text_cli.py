"""``realsyn text perplexity|filter|points``: the text-only curation plug-ins from the command line.

Each command streams one Parquet or JSONL file (local or s3://), writes its output whole or not at
all, in the format its extension names, and prints a one-line JSON summary. Plug-ins are chosen and
configured as in run config (``{name, params}``, see ``realsyn.plugins``): ``--filter NAME`` or
``--filter 'NAME:{"param": value}'``, NAME a registered short name or ``package.module:Class``.
Bad input exits 2 (``realsyn.cli.run_cli``). Run as ``realsyn text`` or ``python -m realsyn.curation.text_cli``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from realsyn.cli import positive_int, run_cli
from realsyn.curation.perplexity import EMBEDDED_SCORER
from realsyn.curation.textio import RowBatch, RowWriter, check_format, infix_path, iter_row_batches
from realsyn.filters.base import apply_filters
from realsyn.filters.perplexity_band import PAPER_BAND, PerplexityBandFilter, default_band
from realsyn.io import atomic_local_file
from realsyn.plugins import build_plugin
from realsyn.stats import StepStats

# The band is a threshold on a stored score, set by its own flags, not a plug-in; it may stand
# anywhere among the --filter plug-ins under this name.
PERPLEXITY_BAND = "perplexity_band"
DEFAULT_FILTERS = ("rules", "cat", PERPLEXITY_BAND)
REASON_COLUMN = "reason"
_PARAMS_START = re.compile(r":\s*\{")


def _print_summary(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, sort_keys=True))


# ---------------------------------------------------------------------------- perplexity


def _score_values(scores: np.ndarray, arrow: bool) -> pa.Array | list[float | None]:
    """float32 scores as a column: null where nan (no text); JSON gets the shortest float32 decimal."""
    missing = np.isnan(scores)
    if arrow:
        return pa.array(scores.astype(np.float32), type=pa.float32(), mask=missing)
    return [None if m else float(str(s)) for s, m in zip(scores.astype(np.float32), missing)]


def cmd_perplexity(args: argparse.Namespace) -> int:
    stats = StepStats("text_perplexity")
    check_format(args.input)
    check_format(args.output)
    params = {"model": args.model, "device": args.device, "batch_size": args.batch_size, "max_length": args.max_length}
    scorer = build_plugin("perplexity_scorer", {"name": "causal_lm", "params": params})
    load_seconds = score_seconds = 0.0
    with stats.timed():
        with atomic_local_file(args.output) as tmp, RowWriter(tmp, args.output, stats) as writer:
            for batch in iter_row_batches(args.input, args.read_batch_rows, stats, required_columns=[args.text_column]):
                if not load_seconds:  # the model loads once the input proved readable; timed apart from scoring
                    start = time.perf_counter()
                    scorer.score([])
                    load_seconds = time.perf_counter() - start
                start = time.perf_counter()
                scores = scorer.score(batch.column(args.text_column))
                score_seconds += time.perf_counter() - start
                writer.write(batch.with_column(args.score_column, _score_values(scores, batch.is_arrow), pa.float32()))
                scored = int(np.isfinite(scores).sum())
                stats.add("rows", len(batch))
                stats.add("rows_scored", scored)
                stats.add("rows_without_score", len(batch) - scored)
    summary = {
        "model": scorer.model_id,
        "score_column": args.score_column,
        "output": args.output,
        "output_rows": writer.rows_written,
        "model_load_seconds": round(load_seconds, 3),
        "scored_rows_per_second": round(stats.counts["rows"] / score_seconds, 1) if score_seconds else None,
        **stats.as_dict(),
    }
    _print_summary(summary)
    return 0


# ---------------------------------------------------------------------------- filter


class _TextColumnFilter:
    """Shows a sentence filter (str items) the text of each row item."""

    def __init__(self, inner: Any, text_column: str):
        self.inner = inner
        self.name = getattr(inner, "name", "") or type(inner).__name__
        self.text_column = text_column

    def reasons(self, items: Sequence[dict[str, Any]]) -> list[str | None]:
        return self.inner.reasons([item.get(self.text_column) for item in items])


def _band(args: argparse.Namespace) -> tuple[float, float, str]:
    """(low, high, where they came from): --low/--high, else default_band(--band-model), else the paper's."""
    if args.band_model:
        low, high, source = *default_band(args.band_model), f"default_band({args.band_model})"
    else:
        low, high, source = *PAPER_BAND, "paper"
    if args.low is not None or args.high is not None:
        source = "flags" if args.low is not None and args.high is not None else f"flags+{source}"
    low = args.low if args.low is not None else low
    high = args.high if args.high is not None else high
    return float(low), float(high), source


def parse_plugin_spec(value: str) -> dict[str, Any]:
    """``NAME`` or ``NAME:{JSON params}`` as ``{"name", "params"}``; NAME may be ``package.module:Class``
    (the params start at the first ':' followed by '{')."""
    start = _PARAMS_START.search(value)
    name, raw = (value, None) if start is None else (value[: start.start()], value[start.start() + 1 :])
    name = name.strip()
    if not name:
        raise ValueError(f"--filter {value!r}: no plug-in name before the params")
    if raw is None:
        return {"name": name, "params": {}}
    try:
        params = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"--filter {value!r}: params are not a JSON object: {e}") from None
    return {"name": name, "params": params}


def build_sentence_filters(args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    """The ``--filter`` plug-ins (default: rules, cat, perplexity_band) in order, and the settings to report."""
    specs = [parse_plugin_spec(v) for v in args.filters] if args.filters else [{"name": n, "params": {}} for n in DEFAULT_FILTERS]
    filters: list[Any] = []
    settings: dict[str, Any] = {"filters": [spec["name"] for spec in specs]}
    for spec in specs:
        if spec["name"] == PERPLEXITY_BAND:
            if spec["params"]:
                raise ValueError(f"{PERPLEXITY_BAND} takes no params: set it with --low/--high/--band-model/--perplexity-column")
            low, high, source = _band(args)
            filters.append(PerplexityBandFilter(low=low, high=high, score_key=args.perplexity_column))
            settings.update(band=[low, high], band_source=source)
        else:  # a sentence_filter plug-in, shown the text of each row
            filters.append(_TextColumnFilter(build_plugin("sentence_filter", spec), args.text_column))
    return filters, settings


def cmd_filter(args: argparse.Namespace) -> int:
    stats = StepStats("text_filter")
    check_format(args.input)
    check_format(args.output)
    filters, settings = build_sentence_filters(args)
    uses_band = PERPLEXITY_BAND in settings["filters"]
    uses_text = any(isinstance(f, _TextColumnFilter) for f in filters)
    item_columns = ([args.text_column] if uses_text else []) + ([args.perplexity_column] if uses_band else [])
    excluded_uri = infix_path(args.output, "excluded")
    with stats.timed():
        with (
            atomic_local_file(args.output) as kept_tmp,
            atomic_local_file(excluded_uri) as excluded_tmp,
            RowWriter(kept_tmp, args.output, stats) as kept_writer,
            RowWriter(excluded_tmp, excluded_uri, stats) as excluded_writer,
        ):
            for batch in iter_row_batches(args.input, args.read_batch_rows, stats, required_columns=item_columns):
                columns = {c: batch.column(c) for c in item_columns}
                items = [dict(zip(columns, values)) for values in zip(*columns.values())] if columns else [{}] * len(batch)
                keep, reasons = apply_filters(filters, items)
                kept_writer.write(batch.filter(keep))
                dropped = [r for r in reasons if r is not None]
                excluded_writer.write(batch.filter(~keep).with_column(REASON_COLUMN, dropped, pa.string()))
                stats.drop_reasons(dropped)
                stats.add("rows", len(batch))
                stats.add("kept", int(keep.sum()))
    summary = {
        **settings,
        "output": args.output,
        "output_rows": kept_writer.rows_written,
        "excluded_output": excluded_uri,
        "excluded_output_rows": excluded_writer.rows_written,
        "dropped": stats.dropped,
        **stats.as_dict(),
    }
    _print_summary(summary)
    return 0


# ---------------------------------------------------------------------------- points


def _numeric_scores(batch: RowBatch, column: str, stats: StepStats | None) -> pa.Array | pa.ChunkedArray:
    """float64 scores; null where missing or not a number (counted as ``scores_not_a_number`` in ``stats``)."""
    arrow = batch.arrow_column(column)
    if arrow is not None and (pa.types.is_floating(arrow.type) or pa.types.is_integer(arrow.type)):
        return arrow.cast(pa.float64())
    values: list[float | None] = []
    for value in batch.column(column):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values.append(float(value))
        else:
            if value is not None and stats is not None:
                stats.add("scores_not_a_number")
            values.append(None)
    return pa.array(values, type=pa.float64())


def _key_table(batch: RowBatch, first_row: int, args: argparse.Namespace, stats: StepStats | None) -> pa.Table:
    """The two columns POINTS reads: ``score`` and ``id`` (``--id-column`` as text, else the row index)."""
    if args.id_column:
        ids = [None if v is None else str(v) for v in batch.column(args.id_column)]
    else:
        ids = [str(i) for i in range(first_row, first_row + len(batch))]
    return pa.table({"score": _numeric_scores(batch, args.score_column, stats), "id": pa.array(ids, type=pa.string())})


def cmd_points(args: argparse.Namespace) -> int:
    stats = StepStats("text_points")
    check_format(args.input)
    check_format(args.output)
    params = {"keep_fraction": args.keep_fraction, "score_column": "score", "id_column": "id"}
    sampler = build_plugin("sampler", {"name": "points_perplexity", "params": params})
    required = [args.score_column] + ([args.id_column] if args.id_column else [])

    def key_tables(read_stats: StepStats, columns: list[str] | None, score_stats: StepStats | None):
        row = 0
        for batch in iter_row_batches(args.input, args.read_batch_rows, read_stats, required_columns=required, columns=columns):
            yield batch, _key_table(batch, row, args, score_stats)
            row += len(batch)

    with stats.timed():
        # Pass 1 reads only the score and id columns (Parquet); its reading counts repeat pass 2's.
        state = sampler.fit(keys for _, keys in key_tables(StepStats("points_fit"), required, None))
        with atomic_local_file(args.output) as tmp, RowWriter(tmp, args.output, stats) as writer:
            for batch, keys in key_tables(stats, None, stats):
                keep = sampler.select(keys, state)
                writer.write(batch.filter(keep))
                stats.add("rows", len(batch))
                stats.add("kept", int(keep.sum()))
    stats.merge(sampler.stats)
    threshold = float(state["threshold_perplexity"][0])
    summary = {
        "keep_fraction": args.keep_fraction,
        "score_column": args.score_column,
        "id_column": args.id_column,
        "keep_count": int(state["keep_count"][0]),
        "rows_with_score": int(state["n_valid"][0]),
        "threshold_score": None if np.isnan(threshold) else threshold,
        "output": args.output,
        "output_rows": writer.rows_written,
        **stats.as_dict(),
    }
    _print_summary(summary)
    return 0


# ---------------------------------------------------------------------------- parser


def _add_io(parser: argparse.ArgumentParser, output_help: str) -> None:
    parser.add_argument("--input", required=True, help="Parquet or JSONL file (local or s3://)")
    parser.add_argument("--output", required=True, help=output_help + "; .parquet or .jsonl[.gz] (local or s3://)")
    parser.add_argument("--read-batch-rows", type=positive_int, default=4096, help="rows read and written at a time")


def _add_subcommands(sub: Any) -> None:
    ppl = sub.add_parser("perplexity", help="every row plus its text's perplexity under a causal LM (float column)")
    _add_io(ppl, "every input row plus the score column (null where the text is empty or not text)")
    ppl.add_argument("--text-column", required=True, help="column / field holding the text")
    ppl.add_argument("--model", default=EMBEDDED_SCORER, help="embedded:smollm2-135m-instruct, or a Hugging Face causal LM name or path")
    ppl.add_argument("--batch-size", type=positive_int, default=16, help="texts per forward pass")
    ppl.add_argument("--max-length", type=int, default=128, help="tokens scored per text (start token included)")
    ppl.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ppl.add_argument("--score-column", default="perplexity", help="name of the added column (replaced if present)")
    ppl.set_defaults(func=cmd_perplexity)

    flt = sub.add_parser("filter", help="RealSyn sentence filters in order; kept rows to --output, dropped rows with a reason beside it")
    _add_io(flt, "kept rows; dropped rows go to the same name with .excluded before the extension, with a 'reason' column")
    flt.add_argument("--text-column", required=True, help="column / field holding the sentence")
    flt.add_argument(
        "--filter",
        dest="filters",
        action="append",
        metavar="NAME[:{JSON}]",
        help="a sentence_filter plug-in, repeatable, applied in order: a registered name (rules, cat) or package.module:Class, "
        "optionally with params as a JSON object, e.g. 'rules:{\"min_words\": 2}'; the name perplexity_band places the "
        f"band set by --low/--high/--band-model (default: {' '.join(DEFAULT_FILTERS)})",
    )
    flt.add_argument(
        "--perplexity-column", default="perplexity", help="perplexity_band: the stored score column (from `realsyn text perplexity`)"
    )
    band_help = (
        "perplexity_band: lower band edge (inclusive). The scorer's own band cannot be read from a file: without "
        f"--low/--high the band is the paper's {list(PAPER_BAND)} (valid for the paper's model only), or that of --band-model"
    )
    flt.add_argument("--low", type=float, help=band_help)
    flt.add_argument("--high", type=float, help="perplexity_band: upper band edge (inclusive); see --low")
    flt.add_argument(
        "--band-model",
        help=f"perplexity_band: use the band measured for the scorer that wrote the column (e.g. {EMBEDDED_SCORER}: "
        f"{list(default_band(EMBEDDED_SCORER))})",
    )
    flt.set_defaults(func=cmd_filter)

    pts = sub.add_parser("points", help="POINTS: keep the --keep-fraction of rows with the lowest score, in input order")
    _add_io(pts, "kept rows in input order")
    pts.add_argument("--score-column", default="perplexity", help="stored score (lower is kept); null or non-numeric is never kept")
    pts.add_argument("--keep-fraction", type=float, default=0.2, help="kept = round-half-up(fraction x rows with a score)")
    pts.add_argument("--id-column", help="row id breaking score ties (default: the row index)")
    pts.set_defaults(func=cmd_points)


def add_text_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``text perplexity``, ``text filter`` and ``text points`` to a CLI's subparsers."""
    parser = subparsers.add_parser("text", help="text-only curation: perplexity scores, sentence filters, POINTS selection")
    _add_subcommands(parser.add_subparsers(dest="text_command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m realsyn.curation.text_cli", description=__doc__)
    _add_subcommands(parser.add_subparsers(dest="text_command", required=True))
    return run_cli(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
