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


def test_grid_cost_table_equals_what_its_command_writes_from_the_json():
    """benchmarks/results/grid-cost.md (shown in the sweeps and decomposition guides) is generated from the
    measured costs: ``python benchmarks/grid_cost.py --table``."""
    import json

    from benchmarks import grid_cost

    data = json.loads(grid_cost.JSON_PATH.read_text())
    assert grid_cost.TABLE_PATH.read_text() == grid_cost.render_table(data), "run: python benchmarks/grid_cost.py --table"
    names = {config["name"] for config in data["configs"]}
    assert {"mirage-qprop", "normalization", "horizon-aware"} <= names
    measured = {(unit["algo"], unit["env"]) for unit in data["units"]}
    assert {("PPO", "HalfCheetah-v5"), ("TRPO", "HalfCheetah-v5"), ("QPropTRPO", "HalfCheetah-v5")} <= measured
    for page in ("docs/guide/sweeps.md", "docs/guide/decomposition.md"):
        assert "<!-- BEGIN GENERATED FROM benchmarks/results/grid-cost.md -->" in (REPO / page).read_text(), page


def test_grid_costs_add_up_seeds_times_steps_times_cost_per_step():
    from benchmarks.grid_cost import grid_costs

    data = {
        "configs": [{"name": "g", "envs": ["A", "B"], "seeds": 3, "total_timesteps": 1_000_000,
                     "learners": {"x": "PPO", "y": "PPO", "z": "TRPO"}}],
        "units": [{"config": "g", "algo": "PPO", "env": "A", "cpu_seconds_per_step": 1e-3},
                  {"config": "g", "algo": "PPO", "env": "B", "cpu_seconds_per_step": 2e-3},
                  {"config": "g", "algo": "TRPO", "env": "A", "cpu_seconds_per_step": 1e-3},
                  {"config": "g", "algo": "TRPO", "env": "B", "cpu_seconds_per_step": 1e-3}],
    }  # fmt: skip
    (cost,) = grid_costs(data)
    # per seed: A: 2 x 1000 s + 1000 s, B: 2 x 2000 s + 1000 s = 8000 s; x 3 seeds
    assert cost.units == 18 and cost.cpu_hours == 3 * 8000 / 3600 and cost.unit_hours == 2000 / 3600
