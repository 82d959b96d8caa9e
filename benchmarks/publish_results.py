"""Copy generated result tables into README.md and docs pages, between markers.

A published table is written by a command from saved JSON (``pgvar aggregate``, ``benchmarks/variance_report.py``)
into a Markdown file; a page shows it between

    <!-- BEGIN GENERATED FROM path/to/table.md -->
    <!-- END GENERATED -->

This script replaces what stands between the markers with the file's text; ``tests/test_published_results.py``
fails when a page's block differs from its file, and when a file differs from what its command writes from the
JSON beside it.

Run: ``python benchmarks/publish_results.py`` (``--check``: exit 1 if a block is stale, write nothing).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(<!-- BEGIN GENERATED FROM (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- END GENERATED -->)", re.S)


def render(page: Path) -> str:
    """The page with every generated block replaced by its file's current text."""

    def fill(match: re.Match[str]) -> str:
        source = (REPO / match["path"]).read_text()
        return f"{match.group(1)}{source.rstrip()}\n{match.group(4)}"

    return BLOCK.sub(fill, page.read_text())


def stale_pages() -> list[Path]:
    return [page for page in PAGES if BLOCK.search(page.read_text()) and render(page) != page.read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a block is stale; write nothing")
    args = parser.parse_args(argv)
    stale = stale_pages()
    if args.check:
        for page in stale:
            print(f"stale generated block in {page.relative_to(REPO)}")
        return 1 if stale else 0
    for page in stale:
        page.write_text(render(page))
        print(f"updated {page.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
