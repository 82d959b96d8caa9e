"""Published numbers cannot go stale: every generated block of README.md and docs/ equals the file it names, and
each such file equals what its command writes from the saved JSON beside it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _publish_module():
    spec = importlib.util.spec_from_file_location("publish_results", REPO / "benchmarks" / "publish_results.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_block_equals_its_file():
    publish = _publish_module()
    pages = [page for page in publish.PAGES if publish.BLOCK.search(page.read_text())]
    assert REPO / "README.md" in pages
    assert publish.stale_pages() == [], "run: python benchmarks/publish_results.py"


@pytest.mark.parametrize("results", sorted(path.parent for path in (REPO / "results").glob("*/aggregate.md")),
                         ids=lambda path: path.name)  # fmt: skip
def test_aggregate_tables_equal_what_pgvar_aggregate_writes_from_the_results(results, tmp_path, capsys):
    from pgvar.cli import main

    published = (results / "aggregate.md").read_text()
    reference = ["--reference"] if "reference mean" in published else []
    assert main(["aggregate", str(results), *reference, "--output", str(tmp_path), "--no-plot"]) == 0
    capsys.readouterr()
    regenerated = (tmp_path / "aggregate.md").read_text()
    # the command line names the results folder as given; compare the rest exactly
    assert regenerated.replace(str(results), results.relative_to(REPO).as_posix()) == published


@pytest.mark.parametrize("published", sorted((REPO / "results" / "frontier").glob("frontier_*.md")), ids=lambda p: p.stem)
def test_frontier_tables_equal_what_pgvar_frontier_renders_from_the_json(published):
    import json

    from pgvar.cli.frontier import render_markdown

    data = json.loads(published.with_suffix(".json").read_text())
    assert data.get("complete", True), f"{published.with_suffix('.json')} is a partial run"
    assert render_markdown(data) == published.read_text()
