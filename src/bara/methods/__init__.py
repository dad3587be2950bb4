"""The registry of methods: ``get_method("lora", {"r": 8})``. A new method is a module with a :class:`Method`
subclass and one entry in ``METHODS`` below; nothing else in bara names it (docs/ARCHITECTURE.md)."""

from __future__ import annotations

from ..errors import BaraError
from .base import Method, MethodConfig, Progress
from .adalora import AdaLora
from .bara import Bara
from .blob import Blob
from .ensemble import Ensemble
from .laplace import Laplace
from .lora import Lora, Map
from .mcdropout import McDropout
from .monteclora import MonteCLora
from .temperature import Temperature
from .tfb import Tfb

DEFAULT_METHOD = "lora"  # what `bara train` and RunConfig use when no method is named
METHODS: dict[str, type[Method]] = {m.name: m for m in (Lora, Map, Bara, Blob, McDropout, Ensemble, Temperature,
                                                        AdaLora, Laplace, MonteCLora, Tfb)}


def get_method(name: str, options: dict | None = None) -> Method:
    if name not in METHODS:
        raise BaraError(f"unknown method '{name}'; fix: use one of {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    return cls(cls.config_class.from_dict(options or {}))


__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "MethodConfig", "Progress", "get_method"]
