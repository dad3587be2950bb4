"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder ``checkpoint/`` with ``state.safetensors`` (adapter + optimiser tensors),
``state.json`` (step, optimiser param groups, scheduler state) and ``rng-<rank>.json`` (random states of
each process). It is written into a temporary folder and swapped in with renames, so a crash at any
moment leaves either the previous or the new checkpoint, never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

NAME = "checkpoint"


def _rng_state() -> dict:
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "python": [version, list(state), gauss],
            "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors = {f"optimizer.{index}.{key}": value.detach().clone().contiguous()
               for index, slots in state["state"].items() for key, value in slots.items()}
    return tensors, {"param_groups": state["param_groups"]}


def save(output_dir: Path, step: int, adapter: dict[str, torch.Tensor], optimizer, scheduler,
         rank: int = 0, is_main: bool = True, barrier=lambda: None) -> Path:
    """Write the checkpoint of ``step``; every process calls this (each saves its own random state)."""
    final, tmp, old = output_dir / NAME, output_dir / f".{NAME}.tmp", output_dir / f".{NAME}.old"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    (tmp / f"rng-{rank}.json").write_text(json.dumps(_rng_state()))
    if is_main:
        tensors, opt_meta = _optimizer_tensors(optimizer)
        tensors.update({f"adapter.{k}": v.contiguous() for k, v in adapter.items()})
        save_file(tensors, tmp / "state.safetensors")
        meta = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict()}
        (tmp / "state.json").write_text(json.dumps(meta))
    barrier()
    if is_main:
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def find(output_dir: Path) -> Path | None:
    for candidate in (output_dir / NAME, output_dir / f".{NAME}.old"):  # .old survives a crash mid-swap
        if (candidate / "state.json").exists():
            return candidate
    return None


def load(path: Path, optimizer, scheduler, rank: int = 0) -> tuple[int, dict[str, torch.Tensor]]:
    """Restore optimiser, scheduler and random states; return the step and the adapter tensors."""
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(path / "state.safetensors")
    adapter = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, slot = key.split(".", 2)
            opt_state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": opt_state, **meta["optimizer"]})
    scheduler.load_state_dict(meta["scheduler"])
    rng_file = path / f"rng-{rank}.json"
    if rng_file.exists():
        _set_rng_state(json.loads(rng_file.read_text()))
    return meta["step"], adapter
