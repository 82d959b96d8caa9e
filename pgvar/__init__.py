"""pgvar: measure and reduce the variance of policy-gradient estimators, as drop-in SB3 algorithms.

``from pgvar import PPO`` instead of ``from stable_baselines3 import PPO``. The algorithm classes and the
callback are imported on first use, so ``import pgvar.estimators`` stays a torch-only import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it (imported lazily: they pull in stable-baselines3).
_LAZY = {
    "PPO": "pgvar.algos",
    "A2C": "pgvar.algos",
    "TRPO": "pgvar.algos",
    "EntropyPG": "pgvar.algos",
    "SoftQ": "pgvar.algos",
    "QPropPPO": "pgvar.algos",
    "QPropTRPO": "pgvar.algos",
    "GradientVarianceCallback": "pgvar.callbacks",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from pgvar.algos import A2C as A2C
    from pgvar.algos import PPO as PPO
    from pgvar.algos import TRPO as TRPO
    from pgvar.algos import EntropyPG as EntropyPG
    from pgvar.algos import QPropPPO as QPropPPO
    from pgvar.algos import QPropTRPO as QPropTRPO
    from pgvar.algos import SoftQ as SoftQ
    from pgvar.callbacks import GradientVarianceCallback as GradientVarianceCallback


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pgvar' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
