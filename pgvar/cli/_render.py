"""What every ``pgvar`` command shares: user errors, number formatting, text and Markdown tables, output files, plots.

Imports only the standard library at module level, so that ``pgvar --help`` stays fast; matplotlib is imported by
the plotting helpers when a plot is drawn.

Numbers are shown with 3 significant digits, and one column uses one notation: fixed point when all its values
lie in [0.001, 10000), otherwise scientific (``1.62e4``, ``3.1e-5`` style with a 3-digit mantissa).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = [
    "Column",
    "UsageError",
    "check_output_files",
    "format_column",
    "format_number",
    "format_with_error",
    "legend",
    "pyplot",
    "markdown_table",
    "plot_scale",
    "save_figure",
    "terminal_width",
    "text_table",
    "write_json",
    "write_text",
]


class UsageError(ValueError):
    """A mistake in the command line or its inputs: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------- numbers
def _is_fixed_range(values: Iterable[float]) -> bool:
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0.0]
    return all(1e-3 <= v < 1e4 for v in finite)


def format_number(value: float, digits: int = 3, *, fixed: bool | None = None) -> str:
    """``value`` with ``digits`` significant digits, fixed point (``fixed=True``) or scientific (``False``);
    ``None`` picks fixed point for magnitudes in [0.001, 10000). ``inf``, ``-inf`` and ``nan`` print as such.

    >>> format_number(0.017834), format_number(15.27), format_number(6.0), format_number(1906.0)
    ('0.0178', '15.3', '6.00', '1910')
    >>> format_number(16240.0), format_number(16240.0, fixed=True)
    ('1.62e4', '16200')
    >>> format_number(-3.1e-05), format_number(0.0), format_number(float("nan"))
    ('-3.10e-5', '0', 'nan')
    """
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0.0:
        return "0"
    if fixed is None:
        fixed = _is_fixed_range([value])
    if fixed:
        exponent = math.floor(math.log10(abs(float(f"{value:.{digits - 1}e}"))))
        if exponent >= digits:  # 16240 -> 16200: the digits beyond the significant ones are rounded away
            return f"{round(value, digits - 1 - exponent):.0f}"
        return f"{value:.{max(digits - 1 - exponent, 0)}f}"
    mantissa, exponent_text = f"{value:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exponent_text)}"


def format_column(values: Sequence[float], digits: int = 3) -> list[str]:
    """Format a column's numbers with one notation for all of them (see the module docstring).

    >>> format_column([0.162, 0.0992, 1.0])
    ['0.162', '0.0992', '1.00']
    >>> format_column([6.07, 0.00012])
    ['6.07e0', '1.20e-4']
    """
    fixed = _is_fixed_range(values)
    return [format_number(value, digits, fixed=fixed) for value in values]


def format_with_error(value: float, error: float, digits: int = 3) -> str:
    """``value ± error``, the error with as many decimals as the value (fixed point values only).

    >>> format_with_error(0.90912, 0.00487)
    '0.909±0.005'
    """
    text = format_number(value, digits, fixed=True)
    if not math.isfinite(error):
        return f"{text}±{format_number(error)}"
    decimals = len(text.split(".")[1]) if "." in text else 0
    return f"{text}±{error:.{decimals}f}"


# -------------------------------------------------------------------------------------------------- tables
def terminal_width(default: int = 80) -> int:
    """Columns to render for: ``$COLUMNS`` if set, else the terminal's width, else ``default`` (a pipe)."""
    return shutil.get_terminal_size((default, 24)).columns


@dataclass(frozen=True)
class Column:
    """One column of a text table: its header, alignment and priority (lowest left out first when too wide)."""

    header: str
    align: str = "right"
    priority: int = 0


def text_table(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int) -> tuple[str, list[str]]:
    """A plain-text table no wider than ``width`` (when it can be: two spaces between columns, else one, else the
    columns of the lowest priority are left out, never the first one).

    A row whose cells after the first are all empty is a continuation line (an annotation of the row above).

    :return: the table's text and the headers of the columns that were left out
    """
    keep = list(range(len(columns)))
    gap = 2
    full_rows = [row for row in rows if any(cell != "" for cell in row[1:])]  # continuation lines overflow freely
    while True:
        widths = {i: max([len(columns[i].header)] + [len(row[i]) for row in full_rows]) for i in keep}
        total = sum(widths.values()) + gap * (len(keep) - 1)
        if total <= width or len(keep) <= 2:
            break
        if gap == 2 and total - (len(keep) - 1) <= width:  # one space between columns is enough
            gap = 1
            continue
        drop = min(keep[1:], key=lambda i: (columns[i].priority, -i))
        keep.remove(drop)
    sep = " " * gap

    def line(cells: Sequence[str]) -> str:
        parts = []
        for i in keep:
            cell = cells[i]
            parts.append(cell.ljust(widths[i]) if columns[i].align == "left" else cell.rjust(widths[i]))
        return sep.join(parts).rstrip()

    lines = [line([column.header for column in columns]), sep.join("-" * widths[i] for i in keep)]
    for row in rows:
        if all(cell == "" for cell in row[1:]):
            lines.append(row[0])
        else:
            lines.append(line(row))
    left_out = [columns[i].header for i in range(len(columns)) if i not in keep]
    return "\n".join(lines), left_out


def legend(entries: Sequence[tuple[str, str]], width: int) -> str:
    """``term  explanation`` lines, the explanations aligned and wrapped to ``width``."""
    indent = max(len(term) for term, _ in entries) + 2
    lines = []
    for term, text in entries:
        wrapped = textwrap.wrap(text, width=max(width - indent, 20)) or [""]
        lines.append(term.ljust(indent) + wrapped[0])
        lines.extend(" " * indent + rest for rest in wrapped[1:])
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table (``align``: ``"left"`` or ``"right"`` per column)."""
    rule = ["---" if a == "left" else "---:" for a in align]
    escape = [[cell.replace("|", "\\|") for cell in row] for row in [list(headers), *rows]]
    lines = ["| " + " | ".join(escape[0]) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in escape[1:]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- files
def check_output_files(paths: Sequence[Path], *, overwrite: bool, flag: str = "--output") -> None:
    """Before a run: the folder of every path can be created and written, and no path exists (unless
    ``overwrite``). Raises :class:`UsageError` naming ``flag``; creates the folders."""
    for folder in dict.fromkeys(path.parent for path in paths):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"{flag}: cannot create the folder {str(folder)!r}: {error.strerror or error}") from None
        probe = folder / f".pgvar-write-check-{os.getpid()}"
        try:
            probe.write_bytes(b"")
        except OSError as error:
            raise UsageError(f"{flag}: cannot write to {str(folder)!r}: {error.strerror or error}") from None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    existing = [str(path) for path in paths if path.exists()]
    if existing and not overwrite:
        verb = "exists" if len(existing) == 1 else "exist"
        raise UsageError(
            f"{flag}: {' and '.join(existing)} {verb} from an earlier run; pass --overwrite to replace, or choose "
            f"another {flag}"
        )


def _atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    from pgvar._io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, atomically (:func:`pgvar._io.atomic_write`; mode as ``open()`` gives)."""
    text = json.dumps(data, indent=2, allow_nan=True)
    _atomic(path, lambda file: file.write(text.encode()))


def write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8), atomically."""
    _atomic(path, lambda file: file.write(text.encode("utf-8")))


def with_progress(work: Callable[[Callable[[str, int, int], None]], Any]) -> Any:
    """``work(progress)`` under a transient progress bar on stderr: ``progress(stage, done, total)`` draws one bar per
    stage."""
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        return work(progress)


def result_files(stem: Path, *, plot: bool) -> list[Path]:
    """The files of a measuring command: ``stem.json``, ``stem.md`` and, with ``plot``, ``stem.png``."""
    return [stem.with_suffix(".json"), stem.with_suffix(".md")] + ([stem.with_suffix(".png")] if plot else [])


def write_result_files(
    paths: Sequence[Path], data: Any, markdown: str, draw: Callable[[Path], None], table: str
) -> None:
    """Write the files of :func:`result_files` (each atomically; the plot only when ``paths`` names one), then print
    ``table`` and the paths written."""
    write_json(paths[0], data)
    write_text(paths[1], markdown)
    if len(paths) > 2:
        draw(paths[2])
    print(table)
    print(f"written: {', '.join(str(path) for path in paths)}")


# ------------------------------------------------------------------------------------------------- plots
def plot_scale(values: Iterable[float]) -> str:
    """``"log"`` for positive values spanning more than a decade, ``"symlog"`` for values of both signs spanning
    decades, else ``"linear"`` (negative values are drawn as they are, never clamped)."""
    finite = [v for v in values if math.isfinite(v)]
    nonzero = [abs(v) for v in finite if v != 0.0]
    if not nonzero or max(nonzero) / min(nonzero) <= 10.0:
        return "linear"
    return "log" if all(v > 0 for v in finite) else "symlog"


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path | IO[bytes]) -> None:
    """Save ``fig`` as a PNG (atomically when ``path`` is a path) and close it."""
    try:
        if isinstance(path, Path):
            _atomic(path, lambda file: fig.savefig(file, dpi=110, format="png"))
        else:
            fig.savefig(path, dpi=110, format="png")
    finally:
        pyplot().close(fig)
