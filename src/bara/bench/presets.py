"""Stage 1 of ``bara bench``: presets. A preset is a TOML table (format: the top of ``benchmarks/presets.toml``)
read by name from bara's own file or from a user's file, with ``extends`` resolved."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..errors import BaraError
from ..methods import METHODS


PRESET_KEYS = ("model", "seeds", "max_train", "max_eval", "mixed_precision", "methods", "train", "lr", "tune",
               "shared_options", "options", "datasets", "extends")


@dataclass
class Preset:
    name: str
    source: str  # the file it was read from
    values: dict  # its table, with `extends` resolved


def packaged_presets() -> dict[str, dict]:
    return _parse((resources.files("bara") / "benchmarks" / "presets.toml").read_text(), "bara's presets.toml")


def _parse(text: str, where: str) -> dict[str, dict]:
    try:
        presets = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise BaraError(f"{where} is not valid TOML ({err}); fix: correct the file") from None
    for name, table in presets.items():
        if not isinstance(table, dict):
            raise BaraError(f"{where}: top-level key '{name}' is not a preset table; fix: write [{name}] and its "
                            "keys below it")
    return presets


def load_preset(spec: str | Path) -> Preset:
    """A packaged preset by name (``standard``), the only preset of a TOML file (``my.toml``) or one of several
    (``my.toml:NAME``). A file's preset may extend another of the file or a packaged one."""
    text = str(spec)
    match = re.fullmatch(r"(.+\.toml)(?::([^/\\]+))?", text)
    if match:
        path, name = Path(match[1]), match[2]
        if not path.is_file():
            raise BaraError(f"preset file {path} not found; fix: give an existing .toml file, or a packaged preset "
                            f"({', '.join(packaged_presets())})")
        presets, source = _parse(path.read_text(), str(path)), str(path)
        if name is None:
            if len(presets) != 1:
                raise BaraError(f"{path} holds the presets {', '.join(presets) or '(none)'}; fix: pick one with "
                                f"--preset {path}:NAME")
            name = next(iter(presets))
        presets = {**packaged_presets(), **presets}  # the file's own names win
    else:
        presets, source, name = packaged_presets(), "bara/benchmarks/presets.toml", text
    if name not in presets:
        raise BaraError(f"unknown preset '{name}'; fix: use one of {', '.join(presets)}, or a file PATH.toml")
    return Preset(name, source, _resolve(presets, name, ()))


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def _resolve(presets: dict, name: str, chain: tuple) -> dict:
    """The preset's table with ``extends`` applied: tables merged key by key, ``methods`` and ``tune`` replaced, and
    ``datasets`` naming which of the parent's datasets run (their settings merged)."""
    if name in chain:
        raise BaraError(f"presets extend each other in a cycle: {' -> '.join(chain + (name,))}; fix: break it")
    table = presets[name]
    unknown = sorted(set(table) - set(PRESET_KEYS))
    if unknown:
        raise BaraError(f"preset '{name}': unknown key(s) {', '.join(unknown)}; fix: use {', '.join(PRESET_KEYS)}")
    parent = table.get("extends")
    if parent is None:
        return _check_own_rates(name, table, dict(table))
    if parent not in presets:
        raise BaraError(f"preset '{name}' extends '{parent}', which is neither in the same file nor a packaged "
                        f"preset; fix: use one of {', '.join(p for p in presets if p != name)}")
    base = _resolve(presets, parent, chain + (name,))
    merged = _merge(base, {k: v for k, v in table.items() if k not in ("extends", "methods", "tune", "datasets")})
    merged["methods"] = table.get("methods", base.get("methods"))
    if "tune" in table or "tune" in base:  # replaced as a whole: an empty [P.tune] drops the parent's option grids
        merged["tune"] = table.get("tune", base.get("tune"))
    if "datasets" in table:
        inherited = base.get("datasets", {})
        merged["datasets"] = {d: _merge(inherited.get(d, {}), s) if isinstance(s, dict) else s
                              for d, s in table["datasets"].items()}
    return _check_own_rates(name, table, merged)


def _check_own_rates(name: str, table: dict, resolved: dict) -> dict:
    """A preset's own learning rates may name only methods and its own variants (a typo would silently fall
    back to the default); rates it inherits for variants it does not run are simply unused."""
    methods = resolved.get("methods")
    names = {n for n in methods if isinstance(n, str)} if isinstance(methods, (list, dict)) else set()
    _check_lr_table(table.get("lr", {}), names, f"preset '{name}', [lr]")
    datasets = table.get("datasets")
    for dataset, settings in (datasets.items() if isinstance(datasets, dict) else ()):
        if isinstance(settings, dict) and "lr" in settings:
            _check_lr_table(settings["lr"], names, f"preset '{name}', dataset '{dataset}'")
    return resolved


def _check_lr_table(table, names: set, where: str) -> None:
    """A rate is a positive number, a grid (a list of distinct positive numbers, chosen from on validation) or
    the name of the variant whose chosen rate it takes (checked once the variants are known)."""
    if not isinstance(table, dict):
        table = {"default": table}
    for key, value in table.items():
        if key != "default" and key not in names and key not in METHODS:
            raise BaraError(f"{where}: lr for '{key}', which is neither a method nor a variant of this preset; "
                            f"fix: use default or one of {', '.join(sorted(names | set(METHODS)))}")
        grid = value if isinstance(value, list) else [value]
        if isinstance(value, str) or (grid and all(type(v) in (int, float) and v > 0 for v in grid)
                                      and len(set(grid)) == len(grid)):
            continue
        raise BaraError(f"{where}: lr {key} = {value!r} must be a positive number, a list of distinct positive "
                        f"numbers (a grid, chosen from on the validation split) or a variant's name; fix: e.g. "
                        f"{key} = 1e-3, {key} = [1e-3, 3e-3] or {key} = \"lora\"")
