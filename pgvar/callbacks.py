r"""SB3 callback that logs the variance of the policy-gradient estimate during training.

:class:`GradientVarianceCallback` works on any SB3 on-policy algorithm (SB3's ``PPO`` and ``A2C``,
sb3-contrib's ``TRPO``, pgvar's subclasses) and writes ``pgvar/...`` keys to the algorithm's logger, so they
reach stdout, CSV and TensorBoard like SB3's own ``train/...`` keys. It measures, with :mod:`pgvar.measure`:
the per-sample policy-gradient terms of the coming update at ``on_rollout_end`` (trace, SNR, noise scale, mean
GSNR, minibatch cosines); the total-loss gradient norm before ``clip_grad_norm_`` during ``train()`` (parameter
and optimizer hooks: SB3 has no callback hook inside ``train()``); and after ``train()``, the clipped-surrogate
gradient the last epoch sees and the trust-region diagnostics of the update.

See ``docs/guide/callback.md`` for the table of keys and how to read them.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from torch import Tensor, nn

from pgvar._sb3_policy import actor_parameter_names, buffer_rows, log_prob_loss, policy_log_prob
from pgvar._validation import check_choice, check_positive
from pgvar.estimators import normalize_advantages
from pgvar.measure import (
    GradientMoments,
    GradientStatistics,
    clipped_surrogate_loss,
    flatten,
    gradient_moments,
    gradient_noise_scale,
    norm_test,
    pairwise_cosine,
    trust_region_diagnostics,
)

__all__ = ["GradientVarianceCallback", "actor_parameter_names"]

METHODS = ("auto", "norms", "vmap")

# The keys this callback writes (documented in docs/guide/callback.md).
KEY_COV_TRACE = "pgvar/pg_grad_cov_trace"
KEY_VAR_AT_BATCH = "pgvar/pg_grad_var_at_batch"
KEY_SNR = "pgvar/pg_grad_snr"
KEY_SNR_DEBIASED = "pgvar/pg_grad_snr_debiased"
KEY_NORM = "pgvar/pg_grad_norm"
KEY_COSINE_TO_BATCH = "pgvar/minibatch_cosine_to_batch"
KEY_PAIRWISE_COSINE = "pgvar/minibatch_pairwise_cosine"
KEY_N_SAMPLES = "pgvar/pg_grad_n_samples"
KEY_BATCH_SIZE = "pgvar/pg_grad_batch_size"
KEY_CLIP_NORM_MEAN = "pgvar/grad_norm_before_clip"
KEY_CLIP_NORM_MAX = "pgvar/grad_norm_before_clip_max"
KEY_CLIP_FRACTION = "pgvar/grad_clip_fraction"
KEY_NOISE_SCALE = "pgvar/noise_scale"
KEY_NORM_TEST_BATCH_SIZE = "pgvar/norm_test_batch_size"
KEY_ESS = "pgvar/ess"
KEY_MAX_RATIO = "pgvar/max_ratio"
KEY_KL_K1 = "pgvar/kl_k1"
KEY_KL_K3 = "pgvar/kl_k3"
KEY_RATIO_CLIP_FRACTION = "pgvar/clip_fraction"
KEY_MEAN_GSNR = "pgvar/mean_gsnr"
#: Prefix of the keys of the gradient measured after the update (``measure_after_update``).
AFTER_UPDATE_PREFIX = "pgvar/after_update/"
KEY_COSINE_TO_FIRST_STEP = AFTER_UPDATE_PREFIX + "cosine_to_first_step"

#: The norm test's default tolerance, :func:`pgvar.measure.norm_test`'s own.
DEFAULT_NORM_TEST_THETA: float = inspect.signature(norm_test).parameters["theta"].default


class GradientVarianceCallback(BaseCallback):
    r"""Log gradient statistics of each update's policy-gradient estimate to the SB3 logger (``pgvar/...`` keys).

    Every ``every_n_updates`` updates (an update is one ``train()`` call, i.e. one rollout; PPO's epochs count
    once), at ``on_rollout_end`` the callback draws the update's minibatches from the rollout buffer the way the
    algorithm does (random, without replacement, of the algorithm's batch size :math:`B`), normalizes the
    advantages as the algorithm does, keeps at most ``max_samples`` samples :math:`i = 1..N`, and measures the
    per-sample policy-gradient terms

    .. math::
        G_i = -\tilde A_i\, \nabla_\theta \log \pi_\theta(a_i \mid s_i), \qquad
        m = \frac1N \sum_i G_i, \qquad
        \operatorname{tr}\widehat\Sigma = \frac{1}{N-1} \sum_i \|G_i - m\|^2,

        \mathrm{Var}_B = \frac{\operatorname{tr}\widehat\Sigma}{B}, \qquad
        \mathrm{SNR} = \frac{\|m\|^2}{\mathrm{Var}_B}, \qquad
        \mathrm{SNR}_{\text{debiased}} = \frac{\|m\|^2 - \operatorname{tr}\widehat\Sigma / N}{\mathrm{Var}_B}

    over the actor parameters (:func:`actor_parameter_names`), at the parameters the update starts from. At
    ratio 1 this is the gradient of PPO's clipped surrogate and of A2C's and TRPO's policy loss; the entropy
    bonus and the value loss are left out. :math:`\|m\|^2` carries the noise :math:`\operatorname{tr}\Sigma/N`
    in expectation, hence the debiased SNR (which can be negative). The per-sample terms of one rollout are
    correlated in time, so :math:`\mathrm{Var}_B` is the variance of a batch of :math:`B` *independent*
    samples.

    The algorithm's layout (batch size :math:`B` and normalization) is read from the model
    (:meth:`actor_update_layout`): PPO-like (``n_epochs`` and ``batch_size``): :math:`B` = ``batch_size``,
    normalized per minibatch; TRPO-like (``sub_sampling_factor``): one batch of
    ``ceil(buffer / sub_sampling_factor)`` samples, normalized over it; anything else (A2C): the whole buffer.
    ``model.normalize_advantage`` (SB3's bool) switches that normalization on or off; the strings
    ``"minibatch"``, ``"batch"`` and ``"none"`` are understood too. Advantages that the rollout buffer has already
    standardized (pgvar's ``normalize_advantage="batch"`` does it in ``compute_returns_and_advantage``, before
    ``on_rollout_end``) are measured as stored.

    Cosines: with several minibatches per update (PPO), the first ``n_minibatches`` of them; with one batch
    (A2C, TRPO), ``n_minibatches`` disjoint equal parts of the :math:`N` samples. Each minibatch gradient
    :math:`m_b` is compared with :math:`m` (``minibatch_cosine_to_batch``, the mean over :math:`b`; the
    minibatch is part of the batch, which raises the cosine when there are few parts) and with the other
    minibatch gradients (``minibatch_pairwise_cosine``, Ilyas et al. 2020, arXiv:1811.02553).

    Gradient norm before clipping (PPO, A2C: ``model.max_grad_norm > 0``): the norm of the **total** loss's
    gradient at every optimizer step of the measured update, as ``clip_grad_norm_`` computes it; its mean, max
    and the fraction of clipped steps are logged at the next ``on_rollout_end`` (TRPO does not clip).

    Batch size and GSNR: the noise scale :math:`B_{\text{simple}}` (``noise_scale``,
    :func:`pgvar.measure.gradient_noise_scale`), the norm test's batch size at ``norm_test_theta``
    (``norm_test_batch_size``, :func:`pgvar.measure.norm_test`) and Cockpit's mean GSNR (``mean_gsnr``, from the
    per-coordinate moments of :func:`pgvar.measure.gradient_moments`).

    After the update (next ``on_rollout_start``, or ``on_training_end``): the trust-region diagnostics of the
    whole rollout (``ess``, ``max_ratio``, ``kl_k1``, ``kl_k3``, ``clip_fraction``,
    :func:`pgvar.measure.trust_region_diagnostics`) and, with ``measure_after_update``, on the same :math:`N`
    samples and normalized advantages, the statistics of PPO's clipped surrogate
    (:func:`pgvar.measure.clipped_surrogate_loss`, unclipped without a ``clip_range``) at the updated policy,
    the gradient the last epoch sees, under ``pgvar/after_update/...``.

    Cost: one batched forward and backward over :math:`N` samples (``method="norms"``, the squared-norm trick)
    or a chunked ``vmap`` (``method="vmap"``), plus one backward per compared minibatch, and one more pass after
    the update. The global RNGs are not touched: training with and without the callback gives the same
    parameters.

    :param every_n_updates: measure at the first update and then every ``every_n_updates`` updates
    :param max_samples: at most this many samples per measurement (bounds the cost); ``N`` is rounded down to
        whole minibatches of the algorithm
    :param n_minibatches: how many minibatch gradients to compare with the full-batch gradient (``>= 1``; the
        pairwise cosine needs ``>= 2``)
    :param method: ``"auto"`` (the squared-norm trick, falling back to ``vmap`` when the policy has a layer the
        trick cannot handle), ``"norms"`` or ``"vmap"``
    :param norm_test_theta: the norm test's tolerance :math:`\theta` (> 0) for ``norm_test_batch_size``
    :param measure_after_update: also measure the clipped-surrogate gradient at the updated policy (one more
        pass like the first, ``pgvar/after_update/...`` keys)
    :param seed: seed of the callback's own generator for drawing minibatches; ``None``: the model's seed
    :param verbose: 0 silent, 1 warnings about skipped measurements, 2 also a line per measurement
    :raises TypeError: at the start of ``learn()``, for a model that is not an on-policy algorithm (SAC, DQN, ...:
        there is no rollout buffer to measure)

    .. code-block:: python

        from stable_baselines3 import PPO
        from pgvar.callbacks import GradientVarianceCallback

        model = PPO("MlpPolicy", "CartPole-v1", tensorboard_log="runs")
        model.learn(50_000, callback=GradientVarianceCallback(every_n_updates=5))
    """

    def __init__(
        self,
        every_n_updates: int = 1,
        max_samples: int = 2048,
        n_minibatches: int = 4,
        method: str = "auto",
        seed: int | None = None,
        verbose: int = 0,
        norm_test_theta: float = DEFAULT_NORM_TEST_THETA,
        measure_after_update: bool = True,
    ) -> None:
        super().__init__(verbose=verbose)
        self.every_n_updates = int(check_positive("every_n_updates", every_n_updates, integer=True))
        self.max_samples = int(check_positive("max_samples", max_samples, integer=True))
        if self.max_samples < 2:
            raise ValueError(
                f"max_samples must be an integer >= 2 (a covariance needs two samples), got {max_samples!r}"
            )
        self.n_minibatches = int(check_positive("n_minibatches", n_minibatches, integer=True))
        self.method = check_choice("method", method, METHODS)
        self.norm_test_theta = float(check_positive("norm_test_theta", norm_test_theta))
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0
        ):
            raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
        self.seed = seed
        if not isinstance(measure_after_update, bool):
            raise ValueError(f"measure_after_update must be True or False, got {measure_after_update!r}")
        self.measure_after_update = measure_after_update
        #: Values written to the logger by the latest measurement (key -> float).
        self.last_values: dict[str, float] = {}
        self._n_rollouts = 0
        self._rng: np.random.Generator | None = None
        self._resolved_method: str | None = None if method == "auto" else method
        self._handles: list[Any] = []
        self._pending_norms: dict[int, Tensor] = {}
        self._step_norms: list[Tensor] = []
        self._capture_max_grad_norm = 0.0
        self._rollout_snapshot: tuple[Tensor, Tensor, tuple[Tensor, ...]] | None = None
        self._measured: tuple[tuple[Tensor, ...], np.ndarray, Tensor, int] | None = None
        self._after_update_inputs: tuple[tuple[Tensor, ...], Tensor, int] | None = None

    # ------------------------------------------------------------------------------------------ SB3 hooks
    def _init_callback(self) -> None:
        self._check_on_policy(self.model)
        seed = self.seed if self.seed is not None else getattr(self.model, "seed", None)
        self._rng = np.random.default_rng(seed)

    def _on_step(self) -> bool:
        return True

    @staticmethod
    def _check_on_policy(model: Any) -> None:
        """Raise ``TypeError`` unless ``model`` is an on-policy algorithm (it measures its rollout buffer)."""
        from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

        off_policy = isinstance(model, OffPolicyAlgorithm)
        if off_policy or getattr(model, "rollout_buffer", None) is None:
            kind = "an off-policy algorithm (replay buffer)" if off_policy else "a model without a rollout_buffer"
            raise TypeError(
                f"GradientVarianceCallback measures the policy gradient of an on-policy algorithm's rollout buffer "
                f"(SB3's PPO and A2C, sb3-contrib's TRPO, pgvar's on-policy classes); got {type(model).__name__}, "
                f"{kind}"
            )

    def _on_rollout_end(self) -> None:
        self._n_rollouts += 1
        self._finish_grad_norm_capture()
        if (self._n_rollouts - 1) % self.every_n_updates != 0:
            return
        values = self.measure_policy_gradient()
        self._record(values)
        self._snapshot_rollout()
        max_grad_norm = getattr(self.model, "max_grad_norm", None)
        if isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0:
            self._start_grad_norm_capture(float(max_grad_norm))

    def _on_rollout_start(self) -> None:
        self._record({**self.measure_gradient_after_update(), **self.measure_trust_region()})

    def _on_training_end(self) -> None:
        self._finish_grad_norm_capture()
        self._record({**self.measure_gradient_after_update(), **self.measure_trust_region()})

    # ------------------------------------------------------------------------------ layout and sampling
    def actor_update_layout(self, model: Any) -> tuple[int, str]:
        """Return ``(batch_size, normalization)`` of the model's actor update; override for a custom algorithm.

        ``batch_size`` is the number of samples in one gradient estimate of the update; ``normalization`` is
        ``"minibatch"`` (over each batch of ``batch_size``), ``"batch"`` (over the whole rollout) or ``"none"``.

        :param model: the SB3 on-policy algorithm
        :return: ``(batch_size, normalization)``
        """
        buffer = model.rollout_buffer
        n_total = int(buffer.buffer_size * buffer.n_envs)
        if getattr(model, "sub_sampling_factor", None) is not None and not hasattr(model, "n_epochs"):
            batch_size = math.ceil(n_total / int(model.sub_sampling_factor))  # TRPO: rollout[::factor]
        elif hasattr(model, "n_epochs") and getattr(model, "batch_size", None) is not None:
            batch_size = min(int(model.batch_size), n_total)  # PPO
        else:
            batch_size = n_total  # A2C
        normalize = getattr(model, "normalize_advantage", False)
        if isinstance(normalize, str):
            mode = check_choice("model.normalize_advantage", normalize, ("minibatch", "batch", "none"))
        else:
            mode = "minibatch" if normalize else "none"
        return batch_size, mode

    def _draw_minibatches(self, n_total: int, batch_size: int) -> tuple[np.ndarray, int]:
        """Return ``(minibatches [K, batch_size] of flat buffer indices, N kept)``; ``N <= max_samples``.

        Like SB3's ``RolloutBuffer.get``: a random permutation cut into minibatches. With ``batch_size >
        max_samples`` one minibatch is drawn (its advantages are normalized over all of it) and its first
        ``max_samples`` entries are kept.
        """
        assert self._rng is not None
        permutation = self._rng.permutation(n_total)
        if batch_size <= self.max_samples:
            n_batches = max(1, min(self.max_samples // batch_size, n_total // batch_size))
            n_kept = n_batches * batch_size
            return permutation[:n_kept].reshape(n_batches, batch_size), n_kept
        return permutation[:batch_size].reshape(1, batch_size), self.max_samples

    # --------------------------------------------------------------------------------------- measurement
    def measure_policy_gradient(self) -> dict[str, float]:
        """Measure the statistics of the coming update's policy-gradient estimate on the current rollout buffer.

        Called by ``on_rollout_end``; public so that it can be called on a filled buffer outside ``learn``.

        :return: key -> value (the ``pgvar/pg_grad_*`` and ``pgvar/minibatch_*`` keys)
        """
        model: Any = self.model  # an OnPolicyAlgorithm (BaseAlgorithm has no rollout_buffer)
        policy = model.policy
        buffer = model.rollout_buffer
        n_total = int(buffer.buffer_size * buffer.n_envs)
        batch_size, mode = self.actor_update_layout(model)
        minibatches, n_kept = self._draw_minibatches(n_total, batch_size)
        if n_kept < 2:
            if self.verbose >= 1:
                warnings.warn(
                    f"GradientVarianceCallback: skipped, only {n_kept} sample(s) in the rollout", stacklevel=2
                )
            return {}

        device = policy.device
        advantages = torch.as_tensor(buffer_rows(buffer, "advantages"), device=device).reshape(n_total)
        drawn = torch.as_tensor(minibatches.reshape(-1), device=device)
        if mode == "batch":
            normalized = normalize_advantages(advantages, "batch")[drawn]
        else:
            flat = advantages[drawn]
            if mode == "minibatch":
                rows = torch.arange(flat.numel(), device=device).reshape(minibatches.shape)
                flat = normalize_advantages(flat, "minibatch", minibatch_indices=list(rows))
            normalized = flat
        kept = minibatches.reshape(-1)[:n_kept]
        inputs = (normalized[:n_kept], *self._policy_inputs(buffer, kept, device))
        names = actor_parameter_names(policy)
        loss_fn = log_prob_loss(_observation_keys(buffer))

        with torch.enable_grad():
            moments = self._moments(policy, loss_fn, inputs, names)
            minibatch_grads = self._minibatch_gradients(
                policy, loss_fn, inputs, names, minibatches.shape, n_kept
            )
        stats = moments.statistics()
        self._measured = (inputs, kept, stats.mean, batch_size)
        trace, n = stats.covariance_trace, stats.n
        values = {
            **self._gradient_values(stats, moments, batch_size),
            KEY_N_SAMPLES: float(n),
            KEY_BATCH_SIZE: float(batch_size),
        }
        if minibatch_grads is not None:
            values[KEY_COSINE_TO_BATCH] = float(np.mean([stats.cosine_to(g) for g in minibatch_grads]))
            if minibatch_grads.shape[0] >= 2:
                values[KEY_PAIRWISE_COSINE] = float(pairwise_cosine(minibatch_grads))
        if self.verbose >= 2:
            print(
                f"GradientVarianceCallback: update {self._n_rollouts}, N={n}, B={batch_size}, "
                f"normalization={mode}, method={self._resolved_method}, tr={trace:.4g}, SNR={values[KEY_SNR]:.4g}"
            )
        return values

    def _gradient_values(self, stats: GradientStatistics, moments: GradientMoments, batch_size: int) -> dict:
        """The ``pgvar/...`` statistics of one measured gradient, at the algorithm's batch size ``B``."""
        trace, mean_sq = stats.covariance_trace, stats.mean_norm**2
        var_at_batch = trace / batch_size
        return {
            KEY_COV_TRACE: trace,
            KEY_VAR_AT_BATCH: var_at_batch,
            KEY_SNR: _ratio(mean_sq, var_at_batch),
            KEY_SNR_DEBIASED: _ratio(mean_sq - trace / stats.n, var_at_batch),
            KEY_NORM: stats.mean_norm,
            KEY_NOISE_SCALE: gradient_noise_scale(stats).b_simple,
            KEY_NORM_TEST_BATCH_SIZE: norm_test(stats, theta=self.norm_test_theta).batch_size,
            KEY_MEAN_GSNR: moments.mean_gsnr(),
        }

    def _snapshot_rollout(self) -> None:
        """Keep the rollout's actions, observations and behaviour log-probs for :meth:`measure_trust_region`, and
        the measured samples for :meth:`measure_gradient_after_update` (``RolloutBuffer.reset`` at the next
        rollout start discards the buffer)."""
        model: Any = self.model
        buffer = model.rollout_buffer
        device = model.policy.device
        n_total = int(buffer.buffer_size * buffer.n_envs)
        actions, *observations = self._policy_inputs(buffer, np.arange(n_total), device)
        old_log_prob = torch.as_tensor(buffer_rows(buffer, "log_probs"), device=device).reshape(n_total)
        self._rollout_snapshot = (old_log_prob, actions, tuple(observations))
        if self.measure_after_update and self._measured is not None:
            (advantages, *rest), kept, first_mean, batch_size = self._measured
            index = torch.as_tensor(kept, device=device)
            self._after_update_inputs = ((advantages, old_log_prob[index], *rest), first_mean, batch_size)
        self._measured = None

    def measure_gradient_after_update(self) -> dict[str, float]:
        """Statistics of the clipped-surrogate gradient at the updated policy (``pgvar/after_update/...`` keys).

        On the samples, normalized advantages and behaviour log-probs of the latest measured update, kept at
        ``on_rollout_end``; used once. Called by ``on_rollout_start`` and ``on_training_end`` when
        ``measure_after_update`` is on.

        :return: key -> value; empty when nothing is kept
        """
        if self._after_update_inputs is None:
            return {}
        inputs, first_mean, batch_size = self._after_update_inputs
        self._after_update_inputs = None
        model: Any = self.model
        policy = model.policy
        keys = _observation_keys(model.rollout_buffer)
        clip_range = _clip_range(model)
        loss_fn = _clipped_surrogate_loss_fn(keys, clip_range)
        advantages, old_log_prob, actions, *observations = inputs
        was_training = policy.training
        policy.set_training_mode(False)  # as at on_rollout_end, where the first step was measured
        try:
            with torch.enable_grad():
                moments = self._moments(policy, loss_fn, inputs, actor_parameter_names(policy))
            with torch.no_grad():
                obs: Any = dict(zip(keys, observations)) if keys is not None else observations[0]
                log_prob = policy_log_prob(policy, obs, actions)
        finally:
            policy.set_training_mode(was_training)
        stats = moments.statistics()
        values = {
            **self._gradient_values(stats, moments, batch_size),
            **self._trust_values(log_prob, old_log_prob, clip_range),
        }
        after = {AFTER_UPDATE_PREFIX + key[len("pgvar/") :]: value for key, value in values.items()}
        after[KEY_COSINE_TO_FIRST_STEP] = stats.cosine_to(first_mean)
        return after

    def measure_trust_region(self) -> dict[str, float]:
        """Trust-region diagnostics of the latest measured update on its rollout (``pgvar/ess`` ... keys).

        One no-grad forward pass of the current (updated) policy over the rollout kept at ``on_rollout_end``;
        the kept rollout is used once. Called by ``on_rollout_start`` and ``on_training_end``.

        :return: key -> value; empty when no rollout is kept
        """
        if self._rollout_snapshot is None:
            return {}
        old_log_prob, actions, observations = self._rollout_snapshot
        self._rollout_snapshot = None
        model: Any = self.model
        policy = model.policy
        keys = _observation_keys(model.rollout_buffer)
        obs: Any = dict(zip(keys, observations)) if keys is not None else observations[0]
        was_training = policy.training
        policy.set_training_mode(False)  # as in collect_rollouts, which computed the behaviour log-probs
        try:
            with torch.no_grad():
                log_prob = policy_log_prob(policy, obs, actions)
        finally:
            policy.set_training_mode(was_training)
        return self._trust_values(log_prob, old_log_prob, _clip_range(model))

    @staticmethod
    def _trust_values(log_prob: Tensor, old_log_prob: Tensor, clip_range: float | None) -> dict[str, float]:
        diagnostics = trust_region_diagnostics(log_prob, old_log_prob, clip_range=clip_range)
        values = {
            KEY_ESS: diagnostics.effective_sample_size,
            KEY_MAX_RATIO: diagnostics.max_ratio,
            KEY_KL_K1: diagnostics.kl_k1,
            KEY_KL_K3: diagnostics.kl_k3,
        }
        if diagnostics.clip_fraction is not None:
            values[KEY_RATIO_CLIP_FRACTION] = diagnostics.clip_fraction
        return values

    def _policy_inputs(self, buffer: Any, kept: np.ndarray, device: torch.device) -> tuple[Tensor, ...]:
        """``(actions, *observation tensors)`` of the kept flat indices, as the algorithm's ``train()`` sees them."""
        actions = torch.as_tensor(buffer_rows(buffer, "actions", kept), device=device)
        observations = buffer.observations
        if isinstance(observations, dict):
            parts = [buffer_rows(buffer, "observations", kept, key=key) for key in observations]
        else:
            parts = [buffer_rows(buffer, "observations", kept)]
        return (actions, *(torch.as_tensor(part, device=device) for part in parts))

    def _moments(
        self, policy: nn.Module, loss_fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], names: list[str]
    ) -> GradientMoments:
        if self._resolved_method in (None, "norms"):
            try:
                moments = gradient_moments(policy, loss_fn, inputs, params=names, method="norms")
                self._resolved_method = "norms"
                return moments
            except ValueError as error:
                if self._resolved_method == "norms":
                    raise
                self._resolved_method = "vmap"
                if self.verbose >= 1:
                    warnings.warn(
                        f"GradientVarianceCallback: the squared-norm trick does not apply to this policy ({error}); "
                        "using vmap per-sample gradients",
                        stacklevel=2,
                    )
        return gradient_moments(policy, loss_fn, inputs, params=names, method="vmap")

    def _minibatch_gradients(
        self,
        policy: nn.Module,
        loss_fn: Callable[..., Tensor],
        inputs: tuple[Tensor, ...],
        names: list[str],
        layout: tuple[int, ...],
        n_kept: int,
    ) -> Tensor | None:
        """``[K, P]`` float64 mean gradients of K minibatches (flattened in sorted name order), or ``None``."""
        n_batches, batch_size = layout
        if n_batches >= 2:
            k = min(self.n_minibatches, n_batches)
            groups = [slice(b * batch_size, (b + 1) * batch_size) for b in range(k)]
        else:
            size = n_kept // self.n_minibatches
            if size < 1:
                return None
            groups = [slice(b * size, (b + 1) * size) for b in range(self.n_minibatches)]
        named = dict(policy.named_parameters())
        params = [named[name] for name in names]
        rows = []
        for group in groups:
            part = tuple(x[group] for x in inputs)
            loss = loss_fn(policy, *part) / part[0].shape[0]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            rows.append(
                flatten(
                    {
                        n: (g if g is not None else torch.zeros_like(p))
                        for n, g, p in zip(names, grads, params)
                    }
                )
            )
        return torch.stack(rows).double()

    # ----------------------------------------------------------------------------- gradient norm capture
    def _start_grad_norm_capture(self, max_grad_norm: float) -> None:
        self._remove_handles()
        policy = self.model.policy
        self._capture_max_grad_norm = max_grad_norm
        self._pending_norms.clear()
        self._step_norms.clear()
        for param in policy.parameters():
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(self._record_param_grad_norm))
        self._handles.append(policy.optimizer.register_step_pre_hook(self._close_optimizer_step))

    def _record_param_grad_norm(self, param: Tensor) -> None:
        # Fires after backward() has accumulated param.grad, i.e. before clip_grad_norm_ rescales it. Keeping the
        # latest norm per parameter (not a running sum) stays right if several backward calls accumulate.
        if param.grad is not None:
            self._pending_norms[id(param)] = torch.linalg.vector_norm(param.grad.detach())

    def _close_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._pending_norms:
            # clip_grad_norm_'s total norm: the 2-norm of the per-parameter 2-norms.
            self._step_norms.append(torch.linalg.vector_norm(torch.stack(list(self._pending_norms.values()))))
            self._pending_norms.clear()

    def _finish_grad_norm_capture(self) -> None:
        if not self._handles:
            return
        self._remove_handles()
        if self._step_norms:
            norms = torch.stack(self._step_norms).double()
            self._record(
                {
                    KEY_CLIP_NORM_MEAN: float(norms.mean()),
                    KEY_CLIP_NORM_MAX: float(norms.max()),
                    KEY_CLIP_FRACTION: float((norms > self._capture_max_grad_norm).double().mean()),
                }
            )
        self._pending_norms.clear()
        self._step_norms.clear()

    def _remove_handles(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            exclude = "tensorboard" if key in (KEY_N_SAMPLES, KEY_BATCH_SIZE) else None
            self.logger.record(key, value, exclude=exclude)
        self.last_values.update(values)


# ------------------------------------------------------------------------------------------------ helpers
def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return math.inf if numerator > 0 else math.nan


def _clip_range(model: Any) -> float | None:
    """The algorithm's PPO clip range at the current progress (SB3 keeps a schedule), or ``None`` without one."""
    clip = getattr(model, "clip_range", None)
    if callable(clip):
        clip = clip(getattr(model, "_current_progress_remaining", 1.0))
    if isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip > 0:
        return float(clip)
    return None


def _clipped_surrogate_loss_fn(keys: list[str] | None, clip_range: float | None) -> Callable[..., Tensor]:
    """``loss_fn(module, advantages, old_log_prob, actions, *observations)``: the summed clipped surrogate."""

    def loss_fn(module: Any, advantages: Tensor, old_log_prob: Tensor, actions: Tensor, *observations: Tensor) -> Tensor:
        obs: Any = dict(zip(keys, observations)) if keys is not None else observations[0]
        log_prob = policy_log_prob(module, obs, actions)
        return clipped_surrogate_loss(log_prob, old_log_prob, advantages, clip_range=clip_range).sum()

    return loss_fn


def _observation_keys(buffer: Any) -> list[str] | None:
    return list(buffer.observations) if isinstance(buffer.observations, dict) else None
