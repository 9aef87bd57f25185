"""`realsyn` command line, core part: the sample corpus and the text-only curation tools.

The graph commands (``realsyn run``, ``realsyn demo``) need Dagster and live in ``assets.cli``,
which builds on ``build_parser`` here; the installed ``realsyn`` command is ``assets.cli:main``.

One error policy for every subcommand (``run_cli``): bad input (a missing file, a bad value or
config, an unknown plug-in) prints one line ``realsyn <command>: error: <message>`` to stderr and
exits 2; a command that ran and failed (a graph run with failed steps) exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

CommandAdder = Callable[[Any], None]


class CommandInputError(ValueError):
    """Bad input that a command reports in its own words (wrapping an error that is not a ValueError)."""


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """What a subcommand raises for bad input: ValueError (``PluginConfigError`` included), OSError
    (a missing or unreadable file) and pyarrow's errors (a file that is not what it claims to be)."""
    import pyarrow as pa

    return (ValueError, OSError, pa.ArrowException)


def _leaf_commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that run a command (those without subcommands of their own), at any depth."""
    subparser_actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparser_actions:
        return [parser]
    leaves: list[argparse.ArgumentParser] = []
    for action in subparser_actions:
        for sub in dict.fromkeys(action.choices.values()):  # aliases share one parser
            leaves.extend(_leaf_commands(sub))
    return leaves


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand (its ``func`` default) under the one error policy.

    Bad input is one stderr line named after the subcommand (its ``prog``, e.g. ``realsyn text
    filter``) and exit 2; otherwise the command's own exit code. argparse's usage errors exit 2 too.
    """
    for leaf in _leaf_commands(parser):
        leaf.set_defaults(command_prog=leaf.prog)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except bad_input_errors() as e:
        print(f"{args.command_prog}: error: {e}", file=sys.stderr)
        return 2


def positive_int(value: str) -> int:
    """argparse type: an int above 0."""
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return n


# ---------------------------------------------------------------------------- core commands


def cmd_sample_corpus(args: argparse.Namespace) -> int:
    from realsyn.sample_corpus import build_sample_corpus

    print(json.dumps(build_sample_corpus(args.out), indent=1, sort_keys=True))
    return 0


def add_core_commands(sub: Any) -> None:
    """``sample-corpus``, ``metaclip match|balance`` and ``text perplexity|filter|points``."""
    corpus = sub.add_parser("sample-corpus", help="write the bundled sample corpus")
    corpus.add_argument("out")
    corpus.set_defaults(func=cmd_sample_corpus)

    try:
        from realsyn.curation.metaclip_cli import add_metaclip_commands

        add_metaclip_commands(sub)
    except ImportError as e:  # pragma: no cover - the module ships with the package
        print(f"warning: metaclip commands unavailable: {e}", file=sys.stderr)
    from realsyn.curation.text_cli import add_text_commands

    add_text_commands(sub)


def build_parser(*command_adders: CommandAdder) -> argparse.ArgumentParser:
    """The ``realsyn`` parser: the commands of each adder (called with the subparsers, in order), then the core ones."""
    parser = argparse.ArgumentParser(prog="realsyn", description=__doc__.split("\n\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in command_adders:
        add(sub)
    add_core_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The core commands only (no Dagster): ``python -m realsyn.cli``."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
