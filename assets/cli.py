"""The installed ``realsyn`` command: the graph commands ``run`` and ``demo`` (Dagster), ``path``
(the committed folder of an asset) and ``sweep`` (old generations) on top of the core commands of
``realsyn.cli`` (sample corpus, MetaCLIP, text curation), under its error policy: bad input exits 2
with one line; a graph run with a failed shard, a failed global step or a failed asset check exits
1 and names them (the other shards and the global steps over them still complete). Every run ends
with the bad input: per shard, the rows dropped as malformed and why.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import resources as importlib_resources
from typing import Any

from realsyn.cli import CommandInputError, run_cli
from realsyn.cli import build_parser as build_core_parser


def _sample_run_config() -> str:
    return str(importlib_resources.files("realsyn") / "data" / "sample_run.yaml")


# Instance settings of a local instance: no telemetry, and no first-visit "community" dialog in the UI
# (dagster-webserver asks `shouldShowNux`, which is false when `nux: enabled: false`).
INSTANCE_SETTINGS = {"telemetry": {"enabled": False}, "nux": {"enabled": False}}


def write_instance_settings(home: str) -> str:
    """Merge ``INSTANCE_SETTINGS`` into ``{home}/dagster.yaml``: what the file already sets wins; a missing
    section is appended as text (the file's comments stay), a section without the key is merged."""
    import yaml

    os.makedirs(home, exist_ok=True)
    cfg = os.path.join(home, "dagster.yaml")
    text = open(cfg).read() if os.path.exists(cfg) else ""
    current = yaml.safe_load(text) or {}
    if not isinstance(current, dict):
        raise CommandInputError(f"{cfg} is not a YAML mapping")
    missing = {k: v for k, v in INSTANCE_SETTINGS.items() if k not in current}
    partial = {k: v for k, v in INSTANCE_SETTINGS.items() if isinstance(current.get(k), dict) and not set(v) <= set(current[k])}
    if partial:
        for section, values in partial.items():
            current[section] = {**values, **current[section]}
        text = yaml.safe_dump(current, sort_keys=False)
    if missing:
        text = text + ("" if not text or text.endswith("\n") else "\n") + yaml.safe_dump(missing, sort_keys=False)
    if missing or partial:
        with open(cfg, "w") as f:
            f.write(text)
    return cfg


def _ensure_dagster_home(home: str) -> str:
    home = os.path.abspath(home)
    write_instance_settings(home)
    os.environ["DAGSTER_HOME"] = home
    return home


def _print_bad_input(storage_root: str, shards: list[str], since: float) -> int:
    """The bad-input summary of a run (rows dropped as malformed, per shard and why); returns the shards listed."""
    from realsyn.stages.summary import bad_input, bad_input_lines
    from realsyn.storage import Storage

    try:
        bad = bad_input(Storage(storage_root), shards, since=since)  # this run's ingest outputs only
    except Exception as e:  # the summary never hides the run's own outcome
        print(f"bad input: could not be read back ({type(e).__name__}: {e})", file=sys.stderr)
        return 0
    if bad:
        print(f"\nBad input: {len(bad)} shard(s) lost rows (dropped and counted; see each shard's image_db / sentence_db metadata)")
        for line in bad_input_lines(bad):
            print(f"  {line}")
    return len(bad)


def _run(input_uri: str, storage_root: str, config: str | None, env: str | None, force: bool = False) -> int:
    from assets.runner import run_graph

    started, started_at = time.perf_counter(), time.time()
    try:
        report = run_graph(input_uri, storage_root, config_path=config, env=env, force=force)
    except Exception as e:  # the graph never started: a bad input location, config or plug-in
        raise CommandInputError(f"{type(e).__name__}: {e}") from e
    elapsed = time.perf_counter() - started
    lossy = _print_bad_input(storage_root, report.shards, started_at)
    if not report.success:
        for failure in report.failures:
            print(f"FAILED: {failure}", file=sys.stderr)
        if report.failed_shards:
            names = ", ".join(report.failed_shards)
            print(
                f"realsyn run: {len(report.failed_shards)} of {len(report.shards)} shards failed and were left out: {names}",
                file=sys.stderr,
            )
        if report.stopped_at:
            print(f"realsyn run: stopped at job {report.stopped_at}; the jobs after it did not run", file=sys.stderr)
        elif report.failed_shards:
            print(
                f"realsyn run: the other {len(report.good_shards)} shards went through every job, the global steps over them",
                file=sys.stderr,
            )
        print(f"realsyn run: {len(report.failures)} failure(s) after {report.runs} runs, {elapsed:.0f}s", file=sys.stderr)
        return 1
    note = f"; {lossy} shard(s) lost rows to bad input (above)" if lossy else ""
    ran = sum(len(parts) for parts in report.ran.values())
    print(
        f"realsyn run: every asset materialized for {len(report.shards)} shards in {report.runs} runs ({ran} stale or missing "
        f"asset partitions rematerialized, {report.fresh_runs} job runs fresh), {elapsed:.0f}s{note}"
    )
    return 0


def _print_summary(storage_root: str, shards: list[str]) -> dict:
    from realsyn.stages.summary import stage_counts
    from realsyn.storage import Storage

    counts = stage_counts(Storage(storage_root), shards)
    print("\nSummary")
    for key, value in counts.items():
        if key == "splits":
            for split, n in value.items():
                print(f"  pairs in split {split:<20} {n}")
        else:
            print(f"  {key:<28} {value}")
    return counts


def cmd_run(args: argparse.Namespace) -> int:
    if args.dagster_home or os.environ.get("DAGSTER_HOME"):
        _ensure_dagster_home(args.dagster_home or os.environ["DAGSTER_HOME"])
    return _run(args.input, args.storage, args.config, args.env, force=args.force)


def cmd_path(args: argparse.Namespace) -> int:
    """Print the committed generation folder of an asset partition (what ``_CURRENT.json`` names)."""
    from realsyn.storage import MissingOutputError, Storage

    try:
        print(Storage(args.storage).current_uri(args.asset, args.partition))
    except (MissingOutputError, ValueError) as e:
        raise CommandInputError(str(e)) from e
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Delete generations nobody may use (uncommitted orphans and superseded ones past retention and grace)."""
    from realsyn.storage import Storage

    try:
        storage = Storage(args.storage, retention=args.retention, grace_s=args.grace_s)
    except ValueError as e:
        raise CommandInputError(str(e)) from e
    removed = storage.sweep(args.asset)
    for path in removed:
        print(f"removed {storage.uri_of(path)}")
    print(f"realsyn sweep: {len(removed)} generation(s) removed (retention {storage.retention}, grace {storage.grace_s:.0f}s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from realsyn.sample_corpus import build_sample_corpus

    out = os.path.abspath(args.out)
    home = _ensure_dagster_home(args.dagster_home)
    corpus, storage = os.path.join(out, "corpus"), os.path.join(out, "storage")
    started = time.perf_counter()
    planted = build_sample_corpus(corpus)
    print(f"sample corpus: {corpus}\n  {json.dumps(planted, sort_keys=True)}")
    print(f"Dagster instance: {home} (make ui shows these runs)")
    code = _run(corpus, storage, args.config or _sample_run_config(), "local")
    if code == 0:
        from realsyn.readers import list_input_shards, shard_key

        shards = sorted(shard_key(u, corpus) for u in list_input_shards(corpus))
        counts = _print_summary(storage, shards)
        from realsyn.export import published_split_path

        # what a trainer reads: each split's latest published version (never deleted by a later run)
        print("\nPublished splits:")
        for split in sorted(counts.get("splits") or {}):
            try:
                print(f"  {split:<16} {published_split_path(storage, split)}")
            except FileNotFoundError:
                print(f"  {split:<16} (not published: empty)")
        print(f"demo wall time: {time.perf_counter() - started:.0f}s")
    return code


def add_graph_commands(sub: Any) -> None:
    """``run`` and ``demo`` (materialize the whole asset graph), ``path`` and ``sweep`` (committed and old generations)."""
    run = sub.add_parser("run", help="materialize the whole graph for every shard under --input")
    run.add_argument("--input", required=True, help="folder or s3://bucket/prefix of OBELICS-layout shards (*.parquet, *.jsonl)")
    run.add_argument("--storage", required=True, help="storage root: folder or s3://bucket/prefix (AWS_ENDPOINT_URL for MinIO/moto)")
    run.add_argument("--config", help="YAML with 'assets:' (step -> config) and 'resources:' (resource -> fields)")
    run.add_argument("--env", choices=["local", "production"], help="resource set (default: REALSYN_ENV or local)")
    run.add_argument("--dagster-home", help="persistent Dagster instance folder (default: DAGSTER_HOME, else a temporary instance)")
    run.add_argument("--force", action="store_true", help="rematerialize every asset, fresh or not (default: only stale and missing ones)")
    run.set_defaults(func=cmd_run)

    path = sub.add_parser("path", help="print the committed folder of an asset (what _CURRENT.json names; never glob g-*)")
    path.add_argument("--storage", required=True, help="storage root: folder or s3://bucket/prefix")
    path.add_argument("asset", nargs="?", default="exported_splits", help="asset key (default: exported_splits, the dataset)")
    path.add_argument("--partition", help="shard key of a per-shard asset (default: the global partition)")
    path.set_defaults(func=cmd_path)

    sweep = sub.add_parser("sweep", help="delete orphaned and superseded generations that nobody may use any more")
    sweep.add_argument("--storage", required=True, help="storage root: folder or s3://bucket/prefix")
    sweep.add_argument("--asset", help="only this asset (default: every asset)")
    sweep.add_argument("--retention", type=int, help="committed generations kept per partition (default: REALSYN_STORAGE_RETENTION or 2)")
    sweep.add_argument("--grace-s", type=float, help="age below which nothing is deleted (default: REALSYN_STORAGE_GRACE_S or 3600)")
    sweep.set_defaults(func=cmd_sweep)

    demo = sub.add_parser("demo", help="build the bundled sample corpus and run the whole graph on it")
    demo.add_argument("--out", default="demo_output", help="folder for the corpus and the storage root")
    demo.add_argument("--dagster-home", default=".dagster_home", help="persistent Dagster instance (shown by `make ui`)")
    demo.add_argument("--config", help="run config YAML (default: the sample corpus's own)")
    demo.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The full ``realsyn`` parser: run, demo, then the core commands."""
    return build_core_parser(add_graph_commands)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
