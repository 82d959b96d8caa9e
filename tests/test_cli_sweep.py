"""``pgvar sweep`` and ``pgvar aggregate``: overrides, progress, the failure summary and exit status, the
Markdown table with its provenance, the JSON and the PNG."""

from __future__ import annotations

import json
import os
import types

import pytest

from pgvar.cli import sweep as sweep_cli
from tests.experiments.test_aggregate import write_synthetic_sweep
from tests.test_cli import run_cli

TINY = """
name = "tiny"
envs = ["CartPole-v1"]
seeds = [0]
total_timesteps = 64
checkpoint_every = 64

[learners.PPO]
algo = "PPO"
kwargs = { n_steps = 32, batch_size = 32, n_epochs = 1 }

[learners.broken]
algo = "PPO"
kwargs = { n_steps = 32, batch_size = 32, baseline = "nonsense" }
"""


@pytest.mark.slow
def test_sweep_reports_failed_units_with_their_error_and_exits_1_then_aggregates(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    results = tmp_path / "results"
    code, out, err = run_cli(["sweep", str(config), "--results", str(results), "--workers", "1"], capsys)
    assert code == 1
    assert "units 1/2 done, 0 running, 1 failed" in out
    assert ("FAILED broken/CartPole-v1/seed0: ValueError: baseline must be one of 'value', 'none', 'mean', "
            "'optimal', 'horizon'; got 'nonsense'") in out  # fmt: skip
    assert "units 0/2 done" in err  # the progress lines (stderr is not a terminal here)
    recorded = json.loads((results / "command.json").read_text())
    assert recorded["command"] == f"pgvar sweep {config} --results {results}"
    # A rerun skips the finished unit and fails the broken one again.
    code, out, _ = run_cli(["sweep", str(config), "--results", str(results), "--workers", "1"], capsys)
    assert code == 1 and "(1 already finished)" in out

    code, out, _ = run_cli(["aggregate", str(results)], capsys)
    assert code == 0
    assert "| CartPole-v1 | PPO | 1 |" in out and "Missing (failed or not finished): 1 units" in out
    assert f"Command: `pgvar sweep {config} --results {results}; pgvar aggregate {results}`" in out
    assert (results / "aggregate.md").read_text() in out
    assert json.loads((results / "aggregate.json").read_text())["rows"][0]["learner"] == "PPO"
    assert (results / "aggregate.png").read_bytes().startswith(b"\x89PNG")


def test_sweep_overrides_reduce_a_shipped_config(tmp_path, capsys, monkeypatch):
    seen = {}

    def fake_run_sweep(config, results, *, backend, workers, address, progress):
        seen.update(config=config, results=results, backend=backend, workers=workers)
        state = types.SimpleNamespace(total=3, done=3, skipped=0, failed=0, running=0, finished=3, eta_seconds=0.0,
                                      failures=[])  # fmt: skip
        progress(state)
        return state

    import pgvar.experiments

    monkeypatch.setattr(pgvar.experiments, "run_sweep", fake_run_sweep)
    argv = ["sweep", "mirage-qprop", "--envs", "HalfCheetah-v5", "--seeds", "2", "--total-timesteps", "3000",
            "--results", str(tmp_path), "--workers", "2"]  # fmt: skip
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and f"next: pgvar aggregate {tmp_path}" in out
    config = seen["config"]
    assert config.envs == ("HalfCheetah-v5",) and config.seeds == (0, 1) and config.total_timesteps == 3000
    assert len(config.learners) == 3 and seen["workers"] == 2 and seen["backend"] == "local"
    run_cli(["sweep", "mirage-qprop", "--seed-list", "3", "7", "--envs", "Walker2d-v5", "--results", str(tmp_path)], capsys)
    assert seen["config"].seeds == (3, 7) and seen["config"].envs == ("Walker2d-v5",)
    code, _, err = run_cli(["sweep", "mirage-qprop", "--total-timesteps", "0", "--results", str(tmp_path)], capsys)
    assert code == 2 and "--total-timesteps: must be a whole number > 0" in err


def test_progress_line():
    state = types.SimpleNamespace(total=12, done=4, skipped=1, failed=1, running=2, eta_seconds=250.0)
    assert sweep_cli.progress_line(state) == "units 4/12 done (1 already finished), 2 running, 1 failed, ETA 4m10s"
    state.eta_seconds = None
    assert sweep_cli.progress_line(state).endswith("ETA ?")


def test_aggregate_table_with_reference_refuses_to_overwrite(tmp_path, capsys):
    write_synthetic_sweep(tmp_path, {"a": [0.0, 0.0, 0.0, 10.0], "b": [1.0, 2.0, 3.0, 100.0]})
    output = tmp_path / "report"
    old = os.umask(0o022)
    try:
        code, out, _ = run_cli(["aggregate", str(tmp_path), "--reference", "--output", str(output), "--reps", "500"], capsys)
    finally:
        os.umask(old)
    assert code == 0
    assert "| env | learner | n | mean [95% CI] | IQM [95% CI] | reference mean ± SD |" in out
    assert "| Fake-v0 | a | 4 | 2.50 [0, 7.50] | 0 [0, 10.0] | 1.00 ± 0.500 |" in out  # 3 significant digits
    assert "P(row > column)" in out and "Versions: torch x." in out and "Machine: cpus 2." in out
    assert "Seeds: [0, 1, 2, 3]" in out
    for name in ("aggregate.md", "aggregate.json", "aggregate.png"):
        assert oct((output / name).stat().st_mode & 0o777) == oct(0o644), name
    code, _, err = run_cli(["aggregate", str(tmp_path), "--output", str(output)], capsys)
    assert code == 2 and "from an earlier run; pass --overwrite" in err
    assert run_cli(["aggregate", str(tmp_path), "--output", str(output), "--overwrite", "--no-plot"], capsys)[0] == 0
    assert "reference" not in (output / "aggregate.md").read_text().splitlines()[2]  # no --reference: no column


def test_aggregate_of_a_sweep_with_no_finished_unit_is_a_usage_error(tmp_path, capsys):
    config = write_synthetic_sweep(tmp_path, {"a": [1.0]})
    from pgvar.experiments.unit import unit_folder

    (unit_folder(tmp_path, config.units()[0]) / "result.json").unlink()
    code, _, err = run_cli(["aggregate", str(tmp_path)], capsys)
    assert code == 2 and "no unit has finished yet" in err
