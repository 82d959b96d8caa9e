"""``pgvar frontier``: exact and MuJoCo frontiers as a command (table, JSON, Markdown, PNG), smoke-sized; every
usage error is one line with exit status 2."""

from __future__ import annotations

import json

import pytest

from pgvar.cli.frontier import FAMILY_LABELS, PROBLEMS, render_markdown
from tests.test_cli import run_cli


def test_names_kept_in_the_cli_equal_the_librarys():
    from pgvar.experiments import EXACT_PROBLEMS, FRONTIER_FAMILIES

    assert PROBLEMS == EXACT_PROBLEMS and FAMILY_LABELS == FRONTIER_FAMILIES


@pytest.mark.slow
def test_exact_frontier_writes_table_json_markdown_and_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    argv = ["frontier", "--problem", "reward_hacking", "--smoke", "--variance-episodes", "40",
            "--output", str(tmp_path)]  # fmt: skip
    code, out, _ = run_cli(argv, capsys)
    assert code == 0, out
    table = out.split("written:")[0]
    assert max(len(line) for line in table.splitlines()) <= 80
    for label in ("KL penalty (coef)", "odds-ratio cap (c)", "early stopping (step)", "state-OM sqrt(chi2)"):
        assert label in table, label
    stem = tmp_path / "frontier_reward_hacking_seed0"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["mode"] == "reward_hacking" and data["command"].startswith("pgvar frontier --problem reward_hacking")
    assert {entry["estimator"] for entry in data["gradient_variance"]} == {"k1_reward", "k3_loss"}
    assert stem.with_suffix(".md").read_text() == render_markdown(data)
    assert stem.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    code, _, err = run_cli(argv, capsys)  # a rerun does not replace the results
    assert code == 2 and "from an earlier run; pass --overwrite" in err


@pytest.mark.slow
def test_goodhart_frontier_has_light_and_heavy_tails(tmp_path, capsys):
    code, _, _ = run_cli(["frontier", "--problem", "goodhart", "--smoke", "--no-plot", "--kl-coefs", "10", "1",
                          "--variance-episodes", "20", "--output", str(tmp_path)], capsys)  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "frontier_goodhart_seed0.json").read_text())
    assert {p["problem"] for p in data["points"]} == {"goodhart/gaussian", "goodhart/student_t", "goodhart/pareto"}
    assert sorted({p["parameter"] for p in data["points"] if p["family"] == "kl"}) == [1.0, 10.0]
    assert not (tmp_path / "frontier_goodhart_seed0.png").exists()


@pytest.mark.slow
def test_env_frontier_smoke(tmp_path, capsys):
    code, out, _ = run_cli(["frontier", "--env", "Hopper-v5", "--smoke", "--output", str(tmp_path)], capsys)
    assert code == 0, out
    data = json.loads((tmp_path / "frontier_Hopper-v5_seed0.json").read_text())
    assert data["mode"] == "env" and data["settings"]["threshold"] == 0.7402
    assert [p["family"] for p in data["points"]] == ["reference", "early_stopping", "early_stopping", "kl",
                                                      "odds_ratio_cap", "om_sqrt_chi2"]  # fmt: skip
    reference = data["points"][0]
    assert reference["kl"] == 0.0 and reference["true_return"] <= reference["proxy_return"]
    assert (tmp_path / "frontier_Hopper-v5_seed0.md").read_text() == render_markdown(data)


@pytest.mark.parametrize(("argv", "message"), [
    (["--problem", "goodhart", "--env", "Hopper-v5"], "not allowed with argument"),
    (["--problem", "goodhart", "--om-coefs", "0.1"], "--om-coefs does not apply with --problem goodhart"),
    (["--problem", "reward_hacking", "--train-steps", "10"], "--train-steps does not apply with --problem"),
    (["--checkpoints", "10"], "--checkpoints does not apply with --problem reward_hacking"),
    (["--env", "Hopper-v5", "--kl-budgets", "0.1"], "--kl-budgets does not apply with --env Hopper-v5"),
    (["--env", "Hopper-v5", "--checkpoints", "20", "10"], "--checkpoints must be increasing, got 20 10"),
    (["--env", "NoSuchEnv-v0"], "--env NoSuchEnv-v0:"),
    (["--env", "Pendulum-v1"], "no Safety-Gymnasium speed limit is known for it"),
    (["--caps", "0.5"], "argument --caps: must be a cap >= 1, got '0.5'"),
    (["--kl-coefs", "-1"], "argument --kl-coefs: must be a number >= 0, got '-1'"),
    (["--kl-coefs", "0"], "argument --kl-coefs: must be a number > 0, got '0'"),
    (["--penalty", "x", "--env", "Hopper-v5"], "argument --penalty: must be a number >= 0, got 'x'"),
    (["--problem", "tabular"], "argument --problem: invalid choice"),
    (["--variance-episodes", "1"], "argument --variance-episodes"),
])  # fmt: skip
def test_usage_errors_are_one_line_with_status_2(tmp_path, capsys, argv, message):
    code, out, err = run_cli(["frontier", *argv, "--output", str(tmp_path)], capsys)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_an_unwritable_output_is_a_usage_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(["frontier", "--smoke", "--output", str(blocker / "sub")], capsys)
    assert code == 2 and err.startswith("pgvar frontier: error: --output: cannot create the folder")
