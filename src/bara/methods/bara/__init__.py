"""BaRA: Bayesian Adaptive Rank Allocation. ``config.py`` (hyper-parameters), ``layer.py`` (the gated
layer), ``variants.py`` (the ablation switches as strategies), ``model.py`` (injection, objective, prediction,
diagnostics)."""

from .config import BaraConfig
from .layer import BaraLinear
from .model import Bara

__all__ = ["Bara", "BaraConfig", "BaraLinear"]
