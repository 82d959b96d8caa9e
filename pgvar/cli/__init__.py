"""The ``pgvar`` console script: arguments in; tables, JSON, Markdown and PNG files out.

One module per command: :mod:`pgvar.cli.compare` (``pgvar compare``), :mod:`pgvar.cli.sweep` (``pgvar sweep`` and
``pgvar aggregate``), :mod:`pgvar.cli.decompose` (``pgvar decompose``),
:mod:`pgvar.cli.frontier` (``pgvar frontier``); what they share (number formatting,
tables, output files, plots) is in ``_render``, argument types in ``_args``. The commands parse, check, print and
draw; every number comes from the library (:mod:`pgvar.compare`, :mod:`pgvar.experiments`, :mod:`pgvar.rollouts`,
:mod:`pgvar.measure`), imported only when a command runs, so that ``pgvar --help`` answers at once.

Exit status: 0 done; 2 a usage error (a bad option, an unknown environment id, a missing file, an output location
that cannot be written or holds earlier results), printed as one line on stderr, never a traceback; 1 a failure
while running (e.g. a sweep unit that failed); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from pgvar import __version__
from pgvar.cli import compare, decompose, frontier, sweep
from pgvar.cli._args import flag_names

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with a usage error on one line (no usage block: ``--help`` shows it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``pgvar`` parser with every command (builds without importing torch)."""
    parser = _Parser(
        prog="pgvar",
        description="Measure and reduce the variance of policy-gradient estimators.",
        epilog="exit status: 0 done, 2 usage error (one line on stderr), 1 failure while running, 130 interrupted. "
        "'pgvar COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"pgvar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    compare.add_parser(commands)
    sweep.add_parsers(commands)
    decompose.add_parser(commands)
    frontier.add_parser(commands)
    return parser


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # argparse has no public accessor for its subparsers
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser  # pragma: no cover


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pgvar`` console script; returns the exit status (usage errors exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command_parser = _command_parser(parser, args.command)
    try:
        return int(args.run(args))
    except ValueError as error:  # bad input from the user (UsageError or a library check): one line, no traceback
        message = flag_names(" ".join(str(error).split()), command_parser, getattr(args, "library_names", None))
        command_parser.exit(2, f"pgvar {args.command}: error: {message}\n")
    except KeyboardInterrupt:
        command_parser.exit(130, f"pgvar {args.command}: interrupted\n")
    except BrokenPipeError:  # `pgvar ... | head`: the files are written; stop printing quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 1  # pragma: no cover - unreachable: exit() raises


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
