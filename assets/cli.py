"""The installed ``realsyn`` command: the graph commands ``run`` and ``demo`` (Dagster) on top of the
core commands of ``realsyn.cli`` (sample corpus, MetaCLIP, text curation), under its error policy:
bad input exits 2 with one line, a graph run with failed steps exits 1.
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


def _ensure_dagster_home(home: str) -> str:
    home = os.path.abspath(home)
    os.makedirs(home, exist_ok=True)
    cfg = os.path.join(home, "dagster.yaml")
    if not os.path.exists(cfg):
        with open(cfg, "w") as f:
            f.write("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = home
    return home


def _run(input_uri: str, storage_root: str, config: str | None, env: str | None) -> int:
    from assets.runner import run_graph

    started = time.perf_counter()
    try:
        report = run_graph(input_uri, storage_root, config_path=config, env=env)
    except Exception as e:  # the graph never started: a bad input location, config or plug-in
        raise CommandInputError(f"{type(e).__name__}: {e}") from e
    elapsed = time.perf_counter() - started
    if not report.success:
        for failure in report.failures:
            print(f"FAILED: {failure}", file=sys.stderr)
        print(f"realsyn run: {len(report.failures)} failure(s) after {report.runs} runs, {elapsed:.0f}s", file=sys.stderr)
        return 1
    print(f"realsyn run: every asset materialized for {len(report.shards)} shards in {report.runs} runs, {elapsed:.0f}s")
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
    return _run(args.input, args.storage, args.config, args.env)


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
        print(f"\nExported dataset: {counts.get('export_location')}")
        print(f"demo wall time: {time.perf_counter() - started:.0f}s")
    return code


def add_graph_commands(sub: Any) -> None:
    """``run`` and ``demo``: materialize the whole asset graph."""
    run = sub.add_parser("run", help="materialize the whole graph for every shard under --input")
    run.add_argument("--input", required=True, help="folder or s3://bucket/prefix of OBELICS-layout shards (*.parquet, *.jsonl)")
    run.add_argument("--storage", required=True, help="storage root: folder or s3://bucket/prefix (AWS_ENDPOINT_URL for MinIO/moto)")
    run.add_argument("--config", help="YAML with 'assets:' (step -> config) and 'resources:' (resource -> fields)")
    run.add_argument("--env", choices=["local", "production"], help="resource set (default: REALSYN_ENV or local)")
    run.add_argument("--dagster-home", help="persistent Dagster instance folder (default: DAGSTER_HOME, else a temporary instance)")
    run.set_defaults(func=cmd_run)

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
