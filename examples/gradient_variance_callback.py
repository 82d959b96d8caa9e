"""Gradient variance of SB3's PPO while it learns
==============================================

Watch the policy-gradient variance of SB3's own PPO while it learns CartPole, with GradientVarianceCallback.

The callback writes ``pgvar/...`` keys to SB3's logger; here a CSV logger collects them and the script plots
four of them against the timesteps into ``callback_variance.png`` in the current directory (the tracked figure
of the docs, ``docs/_static/callback_variance.png``, only with ``PGVAR_UPDATE_DOCS_IMAGES=1``).

::

    python examples/gradient_variance_callback.py                          # 2-4 minutes (60 updates)
    PGVAR_UPDATE_DOCS_IMAGES=1 python examples/gradient_variance_callback.py   # the same, for the docs' figure
    PGVAR_EXAMPLE_SMOKE=1 python examples/gradient_variance_callback.py    # seconds; plots into a temp dir
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.logger import configure  # noqa: E402

from pgvar.callbacks import GradientVarianceCallback  # noqa: E402

SMOKE = os.environ.get("PGVAR_EXAMPLE_SMOKE") == "1"
SEED = 0
N_STEPS = 128 if SMOKE else 1024
TOTAL_TIMESTEPS = 2 * N_STEPS if SMOKE else 60 * N_STEPS
# A full run replaces the figure the docs show (docs/_static/callback_variance.png) only when asked to.
UPDATE_DOCS_IMAGES = os.environ.get("PGVAR_UPDATE_DOCS_IMAGES") == "1"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pgvar_callback_") as tmp:
        if SMOKE:
            out_dir = Path(tmp)
        elif UPDATE_DOCS_IMAGES:
            out_dir = Path(__file__).resolve().parents[1] / "docs" / "_static"
        else:
            out_dir = Path.cwd()
        run(log_dir=Path(tmp), out_dir=out_dir)


def run(log_dir: Path, out_dir: Path) -> Path:
    torch.set_num_threads(1)  # a 64x64 MLP gains nothing from more threads, and loses much on a busy machine
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=N_STEPS, batch_size=64, seed=SEED, device="cpu")
    model.set_logger(configure(str(log_dir), ["csv"]))
    # Measure every update, on at most 2048 samples of the rollout; compare 4 minibatch gradients.
    callback = GradientVarianceCallback(every_n_updates=1, max_samples=2048, n_minibatches=4)
    model.learn(TOTAL_TIMESTEPS, callback=callback)

    with open(log_dir / "progress.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [(float(r["time/total_timesteps"]), float(r[key])) for r in rows if r.get(key, "") != ""]
        return [x for x, _ in points], [y for _, y in points]

    fig, axes = plt.subplots(2, 2, figsize=(8, 5), dpi=100, sharex=True)
    ax = axes[0, 0]
    ax.plot(*series("pgvar/pg_grad_var_at_batch"), marker=".")
    ax.set_yscale("log")
    ax.set_title("variance at batch size 64 (tr Cov / 64)", fontsize=9)
    ax = axes[0, 1]
    ax.plot(*series("pgvar/pg_grad_snr"), marker=".", label="SNR")
    ax.plot(*series("pgvar/pg_grad_snr_debiased"), marker=".", label="debiased SNR")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_title("signal-to-noise ratio of a minibatch gradient", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(*series("pgvar/minibatch_cosine_to_batch"), marker=".", label="minibatch vs full batch")
    ax.plot(*series("pgvar/minibatch_pairwise_cosine"), marker=".", label="minibatch vs minibatch")
    ax.set_title("cosine similarity of gradients", fontsize=9)
    ax.legend(fontsize=8)
    ax.set_xlabel("timesteps")
    ax = axes[1, 1]
    ax.plot(*series("pgvar/grad_norm_before_clip"), marker=".", label="mean over steps")
    ax.plot(*series("pgvar/grad_norm_before_clip_max"), marker=".", label="max")
    ax.axhline(
        model.max_grad_norm, color="red", lw=0.8, ls="--", label=f"max_grad_norm = {model.max_grad_norm}"
    )
    ax.set_yscale("log")
    ax.set_title("total-loss gradient norm before clipping", fontsize=9)
    ax.legend(fontsize=8)
    ax.set_xlabel("timesteps")
    fig.suptitle(f"SB3 PPO on CartPole-v1 (seed {SEED}) with pgvar.GradientVarianceCallback", fontsize=10)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "callback_variance.png"
    fig.savefig(path)
    # The figure stays open: the docs' example gallery (sphinx-gallery) shows the open figures of a script.

    last = callback.last_values
    print(f"{len(rows)} updates logged; plot written to {path}")
    for key in (
        "pgvar/pg_grad_cov_trace",
        "pgvar/pg_grad_snr",
        "pgvar/pg_grad_snr_debiased",
        "pgvar/pg_grad_norm",
    ):
        assert math.isfinite(last[key]), key
        print(f"  last {key} = {last[key]:.4g}")
    return path


if __name__ == "__main__":
    main()
