"""Where bara keeps what it converts or downloads once (the embedded models as safetensors, BIG-bench's tasks):
``$BARA_CACHE``, default ``~/.cache/bara``. A module of its own so that the data code never imports the model code."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("BARA_CACHE", Path.home() / ".cache" / "bara"))
