"""Row files of the text curation commands: Parquet or JSONL, local or s3://.

Inputs are streamed (Parquet through ``iter_batches``, JSONL line by line); outputs are written
whole or not at all (a temporary file renamed, or uploaded in one piece).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realsyn.io import MALFORMED, filesystem_for, iter_jsonl, json_default
from realsyn.stats import StepStats

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json")


def is_parquet(uri: str) -> bool:
    return uri.lower().endswith(".parquet")


def check_format(uri: str) -> None:
    if not (is_parquet(uri) or uri.lower().endswith(JSONL_SUFFIXES)):
        raise ValueError(f"{uri}: expected a .parquet or .jsonl file")


def split_extension(uri: str) -> tuple[str, str]:
    """``out.jsonl.gz`` -> (``out``, ``.jsonl.gz``); an unknown extension is ('uri', '')."""
    lower = uri.lower()
    for ext in (".parquet", *JSONL_SUFFIXES):
        if lower.endswith(ext):
            return uri[: -len(ext)], uri[-len(ext) :]
    return uri, ""


def sibling_path(uri: str, suffix: str) -> str:
    """``out.jsonl`` -> ``out.<suffix>`` beside it."""
    return f"{split_extension(uri)[0]}.{suffix}"


def infix_path(uri: str, infix: str) -> str:
    """``out.parquet`` -> ``out.<infix>.parquet`` (same format as ``uri``)."""
    base, ext = split_extension(uri)
    return f"{base}.{infix}{ext}"


# ---------------------------------------------------------------------------- reading


def iter_jsonl_records(uri: str, stats: StepStats) -> Iterator[dict[str, Any] | None]:
    """Per non-blank line, its JSON object, or None where the line is none (counted:
    ``bad_json``, ``not_an_object``). ``.gz`` files are decompressed."""
    for record in iter_jsonl(uri):
        if record is MALFORMED:
            stats.drop("bad_json")
            yield None
        elif not isinstance(record, dict):
            stats.drop("not_an_object")
            yield None
        else:
            yield record


def iter_text_batches(uri: str, text_column: str, batch_size: int, stats: StepStats) -> Iterator[list[Any]]:
    """Texts of one column in row order, in batches. Parquet via iter_batches; JSONL line by line
    (blank lines are not rows; a bad line or a missing field is a row with no text, counted)."""
    check_format(uri)
    if is_parquet(uri):
        fs, path = filesystem_for(uri)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if text_column not in pf.schema_arrow.names:
                raise ValueError(f"{uri}: no column {text_column!r}; columns: {pf.schema_arrow.names}")
            for batch in pf.iter_batches(batch_size=batch_size, columns=[text_column]):
                yield batch.column(0).to_pylist()
        return
    batch: list[Any] = []
    for record in iter_jsonl_records(uri, stats):
        if record is None:
            batch.append(None)
        else:
            if text_column not in record:
                stats.drop("missing_text_field")
            batch.append(record.get(text_column))
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class RowBatch:
    """Rows of one input batch: a pyarrow Table (Parquet input, schema kept) or dicts (JSONL input)."""

    def __init__(self, rows: pa.Table | list[dict[str, Any]]):
        self.rows = rows

    @property
    def is_arrow(self) -> bool:
        return isinstance(self.rows, pa.Table)

    def __len__(self) -> int:
        return self.rows.num_rows if self.is_arrow else len(self.rows)

    def column(self, name: str) -> list[Any]:
        """Values of ``name`` per row (None where a JSONL row lacks the field)."""
        if self.is_arrow:
            return self.rows.column(name).to_pylist()
        return [row.get(name) for row in self.rows]

    def arrow_column(self, name: str) -> pa.ChunkedArray | None:
        """The column as Arrow (Parquet input only), else None."""
        return self.rows.column(name) if self.is_arrow else None

    def filter(self, mask: np.ndarray) -> RowBatch:
        if self.is_arrow:
            return RowBatch(self.rows.filter(pa.array(np.asarray(mask, dtype=bool))))
        return RowBatch([row for row, keep in zip(self.rows, mask) if keep])

    def with_column(self, name: str, values: Sequence[Any], arrow_type: pa.DataType) -> RowBatch:
        """A copy with ``name`` set (replaced if present, else appended) to ``values``."""
        if self.is_arrow:
            array = pa.array(values, type=arrow_type)
            names = self.rows.column_names
            if name in names:
                return RowBatch(self.rows.set_column(names.index(name), name, array))
            return RowBatch(self.rows.append_column(name, array))
        return RowBatch([{**row, name: value} for row, value in zip(self.rows, values)])

    def records(self) -> list[dict[str, Any]]:
        return self.rows.to_pylist() if self.is_arrow else self.rows


def iter_row_batches(
    uri: str,
    batch_size: int,
    stats: StepStats,
    required_columns: Sequence[str] = (),
    columns: Sequence[str] | None = None,
) -> Iterator[RowBatch]:
    """Whole rows in order, ``batch_size`` at a time. Parquet: only ``columns`` if given. JSONL: lines
    that are not JSON objects are skipped (counted); a required field must be in the first row, and a
    later row without it is counted (``rows_missing_<field>``) and kept with the field null."""
    check_format(uri)
    if is_parquet(uri):
        fs, path = filesystem_for(uri)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            missing = [c for c in required_columns if c not in names]
            if missing:
                raise ValueError(f"{uri}: no column {', '.join(map(repr, missing))}; columns: {names}")
            for batch in pf.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None):
                yield RowBatch(pa.Table.from_batches([batch]))
        return
    rows: list[dict[str, Any]] = []
    first = True
    for record in iter_jsonl_records(uri, stats):
        if record is None:
            continue
        missing = [c for c in required_columns if c not in record]
        if missing and first:
            raise ValueError(f"{uri}: the first row has no field {', '.join(map(repr, missing))}; fields: {sorted(record)}")
        for c in missing:
            stats.add(f"rows_missing_{c}")
        first = False
        rows.append(record)
        if len(rows) >= batch_size:
            yield RowBatch(rows)
            rows = []
    if rows:
        yield RowBatch(rows)


# ---------------------------------------------------------------------------- writing


class RowWriter:
    """Writes RowBatches to a local file as JSONL (gzip if ``uri`` ends in .gz) or Parquet.

    Parquet from Arrow batches keeps their schema. Parquet from JSONL rows infers the schema, waiting
    (up to ``schema_rows`` rows) until no field is all-null; a later row whose values do not fit it is
    dropped (``parquet_schema_mismatch``) and fields it has beyond the schema are counted
    (``rows_with_fields_outside_schema``).
    """

    def __init__(self, local_path: str, uri: str, stats: StepStats, schema_rows: int = 65536):
        self.local_path = local_path
        self.parquet = is_parquet(uri)
        self.stats = stats
        self.schema_rows = schema_rows
        self.rows_written = 0
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._pending: list[dict[str, Any]] = []
        self._file = None
        if not self.parquet:
            opener = gzip.open if uri.lower().endswith(".gz") else open
            self._file = opener(local_path, "wt", encoding="utf-8")

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # the output is discarded: release the file without finishing it
            for handle in (self._file, self._writer):
                try:
                    if handle is not None:
                        handle.close()
                except Exception:
                    pass

    def write(self, batch: RowBatch) -> None:
        if not self.parquet:
            lines = [json.dumps(r, ensure_ascii=False, default=json_default) + "\n" for r in batch.records()]
            self._file.writelines(lines)
            self.rows_written += len(lines)
        elif batch.is_arrow:
            self._write_table(batch.rows)
        elif self._writer is not None:
            self._write_records(batch.rows)
        else:
            self._pending.extend(batch.rows)
            schema = self._infer_schema(self._pending)
            if len(self._pending) >= self.schema_rows or not any(pa.types.is_null(f.type) for f in schema):
                self._open(schema)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            return
        if self._writer is None:
            self._open(self._infer_schema(self._pending))
        self._writer.close()

    def _open(self, schema: pa.Schema) -> None:
        self._schema = schema
        self._writer = pq.ParquetWriter(self.local_path, schema)
        pending, self._pending = self._pending, []
        self._write_records(pending)

    def _write_table(self, table: pa.Table) -> None:
        if self._writer is None:
            self._schema = table.schema
            self._writer = pq.ParquetWriter(self.local_path, table.schema)
        elif table.schema != self._schema:
            table = table.cast(self._schema)
        self._writer.write_table(table)
        self.rows_written += table.num_rows

    def _write_records(self, records: list[dict[str, Any]]) -> None:
        names = set(self._schema.names)
        outside = sum(1 for r in records if not names.issuperset(r))
        if outside:
            self.stats.add("rows_with_fields_outside_schema", outside)
        try:
            table = pa.Table.from_pylist(records, schema=self._schema)
        except (pa.ArrowException, TypeError, ValueError):
            fitting = []
            for record in records:  # find the rows that do not fit, one by one
                try:
                    pa.Table.from_pylist([record], schema=self._schema)
                    fitting.append(record)
                except (pa.ArrowException, TypeError, ValueError):
                    self.stats.drop("parquet_schema_mismatch")
            table = pa.Table.from_pylist(fitting, schema=self._schema)
        self._writer.write_table(table)
        self.rows_written += table.num_rows

    @staticmethod
    def _infer_schema(records: list[dict[str, Any]]) -> pa.Schema:
        """Every field seen (first-seen order), typed over all its values; a field of mixed types
        takes the type of its first value Arrow can type."""
        fields = []
        for key in dict.fromkeys(k for r in records for k in r):
            values = [r.get(key) for r in records]
            try:
                fields.append(pa.field(key, pa.array(values).type))
                continue
            except (pa.ArrowException, TypeError, ValueError):
                pass
            for value in values:
                if value is None:
                    continue
                try:
                    fields.append(pa.field(key, pa.array([value]).type))
                    break
                except (pa.ArrowException, TypeError, ValueError):
                    continue
            else:
                fields.append(pa.field(key, pa.null()))
        return pa.schema(fields)
