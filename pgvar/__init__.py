"""pgvar: measure and reduce the variance of policy-gradient estimators, as drop-in SB3 algorithms."""

__version__ = "0.1.0"
