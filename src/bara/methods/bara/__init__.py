"""BaRA: Bayesian Adaptive Rank Allocation. ``config.py`` (hyper-parameters), ``layer.py`` (the gated
layer), ``model.py`` (injection, objective, prediction, diagnostics)."""

from .config import BaraConfig
from .layer import BaraLinear
from .model import Bara

__all__ = ["Bara", "BaraConfig", "BaraLinear"]
