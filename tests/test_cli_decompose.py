"""``pgvar decompose``: the Mirage decomposition as a command (table, JSON, Markdown, PNG), smoke-sized."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import run_cli


@pytest.mark.slow
def test_decompose_writes_a_table_json_markdown_and_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    argv = ["decompose", "--env", "Pendulum-v1", "--checkpoints", "0", "--states", "6", "--states-per-batch", "3",
            "--horizon", "5", "--output", str(tmp_path)]  # fmt: skip
    code, out, _ = run_cli(argv, capsys)
    assert code == 0
    table = out.split("written:")[0]
    assert max(len(line) for line in table.splitlines()) <= 80
    for term in ("Sigma_tau (trajectory)", "Sigma_a, no baseline", "Sigma_a, learned V", "Sigma_a, Monte Carlo V",
                 "Sigma_a, learned Q-Prop CV", "Sigma_s bound"):  # fmt: skip
        assert term in table, term
    data = json.loads((tmp_path / "decompose_Pendulum-v1_seed0.json").read_text())
    assert data["algo"] == "QPropTRPO" and data["n_states"] == 6
    (checkpoint,) = data["checkpoints"]
    assert checkpoint["timesteps"] == 0 and checkpoint["decomposition"]["n_states"] == 6
    assert set(checkpoint["decomposition"]["action"]) == {"none", "value", "mc_value", "qprop"}
    # The JSON and the Markdown name the command that reproduces them and the machine they ran on.
    command = "pgvar decompose --env Pendulum-v1 --algo qproptrpo --checkpoints 0 --states 6 --states-per-batch 3 " \
        "--horizon 5 --seed 0"
    assert data["command"] == command
    assert data["machine"]["torch_threads"] == 1 and data["machine"]["cpus"] >= 1
    markdown = (tmp_path / "decompose_Pendulum-v1_seed0.md").read_text()
    assert "Sigma_tau" in markdown and f"Command: `{command}`" in markdown and "Machine: cpus" in markdown
    assert (tmp_path / "decompose_Pendulum-v1_seed0.png").read_bytes().startswith(b"\x89PNG")
    # A rerun does not replace the results.
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "from an earlier run; pass --overwrite" in err


def test_decompose_of_a_saved_model_without_a_critic(tmp_path, capsys):
    from pgvar import PPO

    path = tmp_path / "ppo.zip"
    PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, seed=0, device="cpu").save(path)
    argv = ["decompose", "--env", "CartPole-v1", "--model", str(path), "--algo", "ppo", "--states", "4",
            "--horizon", "5", "--no-plot", "--output", str(tmp_path)]  # fmt: skip
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and "Q-Prop" not in out and "Sigma_a, learned V" in out
    assert not (tmp_path / "decompose_CartPole-v1_seed0.png").exists()
