r"""The frontier of true return against divergence from a safe reference on a MuJoCo task with a proxy reward.

:func:`env_frontier` trains a **reference** policy on the true reward of
:class:`~pgvar.problems.SpeedLimitReward` (the locomotion reward minus a price for steps above Safety-Gymnasium's
speed limit), then fine-tunes copies of it with :class:`pgvar.PPO` on the **proxy** reward (the locomotion reward
alone), one run per learner of :func:`default_env_learners`: the KL penalty at several coefficients, the
odds-ratio-cap hinge at several caps, and an unregularized run whose checkpoints are the early-stopping points.
Every point is evaluated on the same seeded episodes: mean true return, mean proxy return, and the measured action
KL to the reference, :math:`\mathbb{E}_{s \sim \pi}\,\mathrm{KL}(\pi(\cdot|s)\,\|\,\pi_{\text{ref}}(\cdot|s))`, exact
per visited state (diagonal Gaussians), averaged over the evaluation episodes' states.

A learner is an :class:`EnvLearner`: a family name, its parameter and the ``ref_*`` options of the run, so that a
new regularizer (the occupancy-measure penalty, ``ref_measure="state"``) is one more entry of the list.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pgvar._validation import check_cap, check_nonnegative, check_positive

__all__ = ["EnvLearner", "default_env_learners", "env_frontier", "evaluate_against_reference"]

#: ``progress(stage, done, total)``; ``on_point(point)`` is called with each evaluated point as soon as it exists.
Progress = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class EnvLearner:
    """One regularized fine-tuning run: ``family`` (the curve it belongs to), ``parameter`` (its coefficient or cap)
    and the ``ref_*`` keyword arguments of :class:`pgvar.PPO` (``ref_policy`` is set by :func:`env_frontier`)."""

    family: str
    parameter: float
    ref_kwargs: dict[str, Any]


def default_env_learners(kl_coefs: Sequence[float] = (0.03, 0.3, 3.0), caps: Sequence[float] = (1.5, 4.0),
                         cap_coef: float = 1.0, om_coefs: Sequence[float] = ()) -> list[EnvLearner]:  # fmt: skip
    """The KL penalty (k1 in the reward) at each of ``kl_coefs``, the odds-ratio hinge
    :math:`(\\log\\pi/\\pi_{\\text{ref}} - \\log c)_+` with coefficient ``cap_coef`` at each cap of ``caps``, and
    the state-occupancy :math:`\\sqrt{\\chi^2}` penalty of ORPO (``ref_measure="state"``, a discriminator trained
    alongside on the reference's rollouts) at each of ``om_coefs`` (none by default: it doubles the environment steps).

    A diagonal Gaussian policy cannot be projected onto the cap set, so the cap is the hinge penalty (it discourages
    violations, it does not enforce them; ``docs/guide/regularization.md``)."""
    learners = [EnvLearner("kl", float(check_nonnegative("kl_coefs", c)),
                           {"ref_regularizer": "kl", "ref_coef": float(c)}) for c in kl_coefs]  # fmt: skip
    check_nonnegative("cap_coef", cap_coef)
    learners += [EnvLearner("odds_ratio_cap", check_cap("caps", c),
                            {"ref_regularizer": "odds_ratio_cap", "ref_cap": float(c), "ref_coef": float(cap_coef)})
                 for c in caps]  # fmt: skip
    learners += [EnvLearner("om_sqrt_chi2", float(check_nonnegative("om_coefs", c)),
                            {"ref_measure": "state", "ref_regularizer": "sqrt_chi2", "ref_coef": float(c)})
                 for c in om_coefs]  # fmt: skip
    return learners


def _make_env(env_id: str, reward: str, threshold: float | None, penalty: float) -> Any:
    import gymnasium as gym

    from pgvar.problems import SpeedLimitReward

    return SpeedLimitReward(gym.make(env_id), threshold=threshold, penalty=penalty, reward=reward)


def evaluate_against_reference(policy: Any, reference: Any, env: Any, n_episodes: int, seed: int) -> dict[str, float]:
    """Mean true and proxy return (undiscounted) of ``policy`` on ``n_episodes`` seeded episodes (stochastic
    actions), the fraction of steps above the speed limit, and the mean exact action KL to ``reference`` over the
    visited states, each with its standard error over episodes.

    :param policy: an SB3 actor-critic policy with a diagonal Gaussian (or Categorical) action distribution
    :param reference: the reference policy, same spaces
    :param env: a :class:`~pgvar.problems.SpeedLimitReward` environment
    :param n_episodes: episodes (>= 2)
    :param seed: episode ``i`` resets with ``seed + i``; actions are drawn from a torch generator seeded with ``seed``
    """
    from gymnasium import spaces

    from pgvar.algos.reference import exact_policy_divergence

    n_episodes = int(check_positive("n_episodes", n_episodes, integer=True))
    true_returns, proxy_returns, costs, kls = [], [], [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for episode in range(n_episodes):
            observation, _ = env.reset(seed=seed + episode)
            observations, true_total, proxy_total, cost_total, done = [], 0.0, 0.0, 0.0, False
            while not done:
                observations.append(np.asarray(observation, dtype=np.float32))
                with torch.no_grad():
                    obs_t, _ = policy.obs_to_tensor(observation)
                    action = policy.get_distribution(obs_t).get_actions(deterministic=False).cpu().numpy()[0]
                if isinstance(env.action_space, spaces.Box):  # as SB3's predict() does for an unsquashed policy
                    action = np.clip(action, env.action_space.low, env.action_space.high)
                observation, _, terminated, truncated, info = env.step(action)
                true_total += info["true_reward"]
                proxy_total += info["proxy_reward"]
                cost_total += info["cost"]
                done = terminated or truncated
            with torch.no_grad():
                states = torch.as_tensor(np.stack(observations))
                kl = exact_policy_divergence(policy.get_distribution(states), reference.get_distribution(states),
                                             "kl", 1.0)  # fmt: skip
            true_returns.append(true_total)
            proxy_returns.append(proxy_total)
            costs.append(cost_total / len(observations))
            kls.append(float(kl.mean()))
    out: dict[str, float] = {}
    for name, values in (("true_return", true_returns), ("proxy_return", proxy_returns), ("cost_rate", costs),
                         ("kl", kls)):  # fmt: skip
        array = np.asarray(values, dtype=np.float64)
        out[name] = float(array.mean())
        out[f"{name}_se"] = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else math.nan
    return out


def env_frontier(
    env_id: str = "Hopper-v5",
    *,
    learners: Sequence[EnvLearner] | None = None,
    reference_steps: int = 50_000,
    train_steps: int = 30_000,
    checkpoints: Sequence[int] | None = None,
    eval_episodes: int = 10,
    threshold: float | None = None,
    penalty: float = 1.0,
    ppo_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the reference on the true reward, fine-tune on the proxy with each learner, evaluate every point.

    :param env_id: a gymnasium MuJoCo locomotion id (:class:`~pgvar.problems.SpeedLimitReward`)
    :param learners: the regularized runs (default :func:`default_env_learners`)
    :param reference_steps: PPO steps of the reference on the true reward
    :param train_steps: PPO steps of each fine-tuning run on the proxy reward
    :param checkpoints: steps of the unregularized run at which it is evaluated (early stopping); default: four
        equally spaced up to ``train_steps``
    :param eval_episodes: seeded evaluation episodes per point (the same seeds for every point)
    :param threshold: the speed limit (``None``: Safety-Gymnasium's)
    :param penalty: the true reward's price of a step above the limit
    :param ppo_kwargs: other :class:`pgvar.PPO` arguments of every run (default ``n_steps=1024``)
    :param seed: seeds the reference, every run (the same seed) and the evaluation
    :return: a JSON-ready dict: ``settings``, ``points`` (one per evaluated policy: ``family``, ``parameter``,
        ``steps`` and :func:`evaluate_against_reference`'s fields), ``versions``
    """
    from pgvar import PPO
    from pgvar.compare import library_versions

    check_positive("reference_steps", reference_steps, integer=True)
    check_positive("train_steps", train_steps, integer=True)
    learners = list(default_env_learners() if learners is None else learners)
    if checkpoints is None:
        checkpoints = [train_steps * k // 4 for k in range(1, 5)]
    steps = [int(step) for step in checkpoints]
    if not steps or steps != sorted(set(steps)) or steps[0] <= 0 or steps[-1] > train_steps:
        raise ValueError(f"checkpoints must be increasing whole numbers in [1, train_steps={train_steps}], got "
                         f"{list(checkpoints)}")  # fmt: skip
    kwargs = {"n_steps": 1024, **(ppo_kwargs or {})}
    eval_env = _make_env(env_id, "proxy", threshold, penalty)
    points: list[dict[str, Any]] = []
    total = 1 + len(steps) + len(learners)

    def record(family: str, parameter: float | None, model: Any, reference: Any, started: float) -> None:
        point = {"family": family, "parameter": parameter, "steps": int(model.num_timesteps)}
        point.update(evaluate_against_reference(model.policy, reference, eval_env, eval_episodes, seed + 10_000))
        point["seconds"] = time.perf_counter() - started
        points.append(point)
        if on_point is not None:
            on_point(point)
        if progress is not None:
            progress("points", len(points), total)

    started = time.perf_counter()
    reference_model = PPO("MlpPolicy", _make_env(env_id, "true", threshold, penalty), seed=seed, device="cpu", **kwargs)
    reference_model.learn(reference_steps)
    reference = reference_model.policy
    reference.set_training_mode(False)
    record("reference", None, reference_model, reference, started)

    def fine_tuned(ref_kwargs: dict[str, Any]) -> Any:
        model = PPO("MlpPolicy", _make_env(env_id, "proxy", threshold, penalty), seed=seed, device="cpu",
                    ref_policy=reference, **ref_kwargs, **kwargs)  # fmt: skip
        model.policy.load_state_dict(reference.state_dict())
        return model

    started = time.perf_counter()
    model = fine_tuned({"ref_coef": 0.0})  # logs the KL, changes nothing
    for step in steps:
        model.learn(step - model.num_timesteps, reset_num_timesteps=False)
        record("early_stopping", float(step), model, reference, started)
    for learner in learners:
        started = time.perf_counter()
        model = fine_tuned(learner.ref_kwargs)
        model.learn(train_steps)
        record(learner.family, learner.parameter, model, reference, started)
    eval_env.close()
    settings = {"env_id": env_id, "reference_steps": reference_steps, "train_steps": train_steps,
                "checkpoints": steps, "eval_episodes": eval_episodes, "threshold": eval_env.threshold,
                "penalty": penalty, "ppo_kwargs": kwargs, "seed": seed,
                "learners": [dataclasses.asdict(learner) for learner in learners]}  # fmt: skip
    return {"mode": "env", "settings": settings, "points": points, "versions": library_versions()}
