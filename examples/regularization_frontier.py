"""KL penalty vs odds-ratio cap on the Goodhart bandit
===================================================

KL penalty vs odds-ratio cap on the Goodhart bandit: the exact true-reward vs KL frontier, light vs heavy tails.

Kwa et al. (2024, "Catastrophic Goodhart", arXiv:2407.14503) claim that with a heavy-tailed proxy error a KL
penalty lets the policy exploit the error (high proxy reward at small KL, no true gain), while a quantilizer (an
odds-ratio cap pi <= c * pi_ref) keeps a positive true utility. On pgvar.problems.GoodhartBandit both optima are
exact: the KL-regularized optimum pi ~ pi_ref exp(proxy / beta) and the quantilizer. The script prints

1. each frontier for one bandit per error family: (KL, true utility, proxy utility) along the KL coefficient beta
   and along the cap c;
2. a paired comparison at equal KL: for each cap c, the KL optimum with the same KL as the quantilizer
   (log c), its true utility minus the quantilizer's, averaged over independently drawn bandits (exact per
   bandit; the +- is the standard error over the draws).

::

    python examples/regularization_frontier.py                          # ~1 min (10,000 arms, 10 draws)
    PGVAR_EXAMPLE_SMOKE=1 python examples/regularization_frontier.py    # a few seconds
"""

from __future__ import annotations

import math
import os

import torch

from pgvar.problems import ERROR_DISTRIBUTIONS, GoodhartBandit

SMOKE = os.environ.get("PGVAR_EXAMPLE_SMOKE", "0") not in ("", "0")
N_ARMS = 1_000 if SMOKE else 10_000
N_DRAWS = 2 if SMOKE else 10
BETAS = [100.0, 30.0, 10.0, 3.0, 1.0, 0.3, 0.1]
CAPS = [2.0, 5.0, 20.0, 100.0]


def frontier(bandit: GoodhartBandit) -> None:
    print(f"  {'policy':<14}{'KL':>8}{'true':>9}{'proxy':>10}")
    for beta in BETAS:
        point = bandit.evaluate(bandit.kl_optimum(beta))
        print(
            f"  {'beta=' + format(beta, 'g'):<14}{point.kl:8.3f}{point.true_utility:9.3f}{point.proxy_utility:10.3f}"
        )
    for cap in CAPS:
        point = bandit.evaluate(bandit.quantilizer(cap))
        print(
            f"  {'cap=' + format(cap, 'g'):<14}{point.kl:8.3f}{point.true_utility:9.3f}{point.proxy_utility:10.3f}"
        )


def paired_at_equal_kl(error: str) -> dict[float, tuple[float, float, float]]:
    """cap -> (mean true utility of the KL optimum, of the quantilizer, SE of the difference) at KL = log c."""
    rows: dict[float, list[tuple[float, float]]] = {cap: [] for cap in CAPS}
    for seed in range(N_DRAWS):
        bandit = GoodhartBandit(n_arms=N_ARMS, error=error, seed=seed)
        for cap in CAPS:
            capped = bandit.evaluate(bandit.quantilizer(cap))
            penalized = bandit.evaluate(bandit.kl_optimum_with_kl(float(capped.kl), tol=1e-8))
            rows[cap].append((float(penalized.true_utility), float(capped.true_utility)))
    out = {}
    for cap, pairs in rows.items():
        values = torch.tensor(pairs, dtype=torch.float64)
        difference = values[:, 1] - values[:, 0]
        out[cap] = (
            float(values[:, 0].mean()),
            float(values[:, 1].mean()),
            float(difference.std() / math.sqrt(len(pairs))),
        )
    return out


def main() -> None:
    print(
        f"GoodhartBandit: {N_ARMS} arms, true reward N(0, 1), proxy = true + error (scale 1), uniform reference\n"
    )
    for error in ERROR_DISTRIBUTIONS:
        print(f"[{error}] one draw (seed 0): the two frontiers")
        frontier(GoodhartBandit(n_arms=N_ARMS, error=error, seed=0))
        print()
    print(f"At equal KL (= log c), mean true utility over {N_DRAWS} draws (exact per draw):")
    print(f"  {'error':<11}{'cap':>6}{'KL':>7}{'KL penalty':>12}{'cap':>8}{'cap - KL':>10}{'+- SE':>8}")
    for error in ERROR_DISTRIBUTIONS:
        for cap, (penalized, capped, se) in paired_at_equal_kl(error).items():
            print(
                f"  {error:<11}{cap:6g}{math.log(cap):7.2f}{penalized:12.3f}{capped:8.3f}{capped - penalized:10.3f}{se:8.3f}"
            )


if __name__ == "__main__":
    main()
