"""Argument types, options and input checks shared by the ``pgvar`` commands; library errors named by their flags.

Standard library only at module level (``pgvar --help`` imports this); the checks import gymnasium and SB3 when
they run.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pgvar.cli._render import UsageError

__all__ = [
    "add_output_options",
    "add_threads_option",
    "apply_threads",
    "check_env_id",
    "flag_names",
    "int_at_least",
    "load_model",
    "positive_int",
    "unit_interval",
]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number ``>= minimum`` (the message states exactly that rule)."""
    rule = "> 0" if minimum == 1 else f">= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number {rule}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number {rule}, got {text!r}")
        return value

    parse.__name__ = f"whole number {rule}"
    return parse


positive_int = int_at_least(1)


def unit_interval(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def add_output_options(parser: argparse.ArgumentParser, default: str, what: str) -> None:
    parser.add_argument(
        "--output", type=Path, default=Path(default), metavar="DIR", help=f"folder for {what} (default: ./{default})"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace result files of an earlier run (refused without it)"
    )


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int_at_least(0),
        default=None,
        metavar="N",
        help="torch threads of this process (default: 1, or torch's own default when OMP_NUM_THREADS is set; "
        "0: torch's default, one per core). pgvar's tensors are small: more threads are rarely faster and much "
        "slower on a busy machine",
    )


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op threads for a command: ``threads``, or 1 unless the user set ``OMP_NUM_THREADS``."""
    import torch

    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return
        threads = 1
    if threads > 0:
        torch.set_num_threads(threads)


def flag_names(message: str, parser: argparse.ArgumentParser, aliases: dict[str, str] | None = None) -> str:
    """Name the command's flags, not the library's arguments, in a library error message.

    ``gae_lambda must be in [0, 1]`` becomes ``--gae-lambda must be in [0, 1]``: argument names with an underscore
    are replaced wherever they appear as a word, other names only at the start of the message (where pgvar's
    errors name the argument); ``aliases`` maps library names that differ from the flag (``env_id`` -> ``--env``).
    """
    names: dict[str, str] = dict(aliases or {})
    for action in parser._actions:  # argparse keeps no public list of an existing parser's options
        long_flags = [flag for flag in action.option_strings if flag.startswith("--")]
        if long_flags and action.dest not in names:
            names[action.dest] = long_flags[0]
    for name, flag in sorted(names.items(), key=lambda item: -len(item[0])):
        if "_" in name:
            message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flag, message)
        elif message.startswith(f"{name} "):
            message = flag + message[len(name) :]
    return message


#: ``--algo`` names -> pgvar's classes (attributes of :mod:`pgvar`).
MODEL_CLASSES = {"ppo": "PPO", "a2c": "A2C", "trpo": "TRPO", "qproptrpo": "QPropTRPO", "qpropppo": "QPropPPO"}


def check_env_id(env_id: str, flag: str = "--env") -> None:
    """A clear one-line error for an id gymnasium does not know (or cannot build), before any work."""
    import gymnasium as gym

    try:
        gym.make(env_id).close()
    except gym.error.Error as error:
        raise UsageError(f"{flag} {env_id}: {error}") from None
    except ImportError as error:
        raise UsageError(f"{flag} {env_id}: a dependency is missing: {error}") from None


def load_model(path: Path, algo: str) -> Any:
    """Load ``path`` with pgvar's class for ``algo``; a missing or unreadable file is a :class:`UsageError`."""
    if not path.is_file():
        raise UsageError(f"--model: no such file: {str(path)!r}")
    import pgvar

    try:
        return getattr(pgvar, MODEL_CLASSES[algo]).load(path, device="cpu")
    except Exception as error:  # noqa: BLE001 - any failure to read a user's file is a usage error
        raise UsageError(
            f"--model: cannot load {str(path)!r} with --algo {algo}: {type(error).__name__}: {error}"
        ) from None
