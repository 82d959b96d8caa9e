"""Drop-in stable-baselines3 algorithms whose policy-gradient estimator is chosen by constructor arguments.

``pgvar.PPO``, ``pgvar.A2C`` and ``pgvar.TRPO`` take every argument of ``stable_baselines3.PPO``/``A2C`` and
``sb3_contrib.TRPO`` (same names, same defaults, same results bit for bit with the defaults) plus
``baseline`` (``"value"``, ``"none"``, ``"mean"``, ``"optimal"``) and the ``normalize_advantage`` modes
(``"minibatch"``/``True``, ``"batch"``, ``"none"``/``False``).
"""

from pgvar.algos._mixin import OnPolicyEstimatorMixin
from pgvar.algos._save import SaveLoadMixin
from pgvar.algos.a2c import A2C
from pgvar.algos.buffers import (
    BASELINES,
    EstimatorDictRolloutBuffer,
    EstimatorRolloutBuffer,
    QPropDictRolloutBuffer,
    QPropRolloutBuffer,
)
from pgvar.algos.ppo import PPO
from pgvar.algos.qprop import QPropPPO, QPropTRPO
from pgvar.algos.qprop_critic import QPropCritic
from pgvar.algos.soft_q import (
    EntropyPG,
    KLRegularizedDictRolloutBuffer,
    KLRegularizedRolloutBuffer,
    MultiInputSoftQPolicy,
    SoftQ,
    SoftQCnnPolicy,
    SoftQPolicy,
)
from pgvar.algos.trpo import TRPO

__all__ = [
    "A2C",
    "BASELINES",
    "EntropyPG",
    "KLRegularizedDictRolloutBuffer",
    "KLRegularizedRolloutBuffer",
    "MultiInputSoftQPolicy",
    "SoftQ",
    "SoftQCnnPolicy",
    "SoftQPolicy",
    "PPO",
    "QPropCritic",
    "QPropDictRolloutBuffer",
    "QPropPPO",
    "QPropRolloutBuffer",
    "QPropTRPO",
    "TRPO",
    "EstimatorDictRolloutBuffer",
    "EstimatorRolloutBuffer",
    "OnPolicyEstimatorMixin",
    "SaveLoadMixin",
]
