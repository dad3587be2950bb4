"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder ``checkpoint/`` with ``state.safetensors`` (adapter + optimiser tensors),
``history.jsonl`` (the log of every step so far), ``rng-<rank>.json`` (random states of each process) and,
written last, ``state.json`` (step, optimiser param groups, scheduler state, what the caller adds, e.g. the run
config, and the sha256 of every other file). It is written into a temporary folder, fsynced and swapped in with
renames; the previous checkpoint stays beside it as ``.checkpoint.old`` until the next one is whole, so a crash
or a damaged file at any moment leaves a checkpoint to resume from.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import BaraError

NAME = "checkpoint"
STATE, HISTORY = "state.json", "history.jsonl"


def _rng_state() -> dict:
    """Every random state a process draws from: torch's CPU generator, each CUDA device's (when there are any),
    Python's and numpy's."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {"torch": torch.get_rng_state().tolist(), "python": [version, list(state), gauss],
           "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        rng["cuda"] = [state.tolist() for state in torch.cuda.get_rng_state_all()]
    return rng


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    if rng.get("cuda") and torch.cuda.is_available():
        if len(rng["cuda"]) != torch.cuda.device_count():
            raise BaraError(f"the checkpoint holds the random states of {len(rng['cuda'])} CUDA devices, this machine "
                            f"has {torch.cuda.device_count()}; fix: resume on as many devices (CUDA_VISIBLE_DEVICES)")
        torch.cuda.set_rng_state_all([torch.tensor(state, dtype=torch.uint8) for state in rng["cuda"]])
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors = {f"optimizer.{index}.{key}": value.detach().clone().contiguous()
               for index, slots in state["state"].items() for key, value in slots.items()}
    return tensors, {"param_groups": state["param_groups"]}


def fsync(path: Path) -> None:
    """Flush a file or a folder (its entries: a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write, user_error: bool = True) -> None:
    """``write(tmp_path)``, fsync, then rename, so readers (and a power cut) never see a half-written file: every
    output of bara (files of a run, plots, reports) is written this way. A failed write leaves the old file; with
    ``user_error`` its OSError becomes a BaraError naming the fix (a library function such as a plot keeps the
    OSError)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are for others to read too
        fsync(Path(tmp))
        os.replace(tmp, path)
        fsync(path.parent)
    except (OSError, SafetensorError) as err:  # a full disk, a file size limit: the file before it is kept
        if not user_error:
            raise
        raise BaraError(f"cannot write {path} ({err}); fix: free some disk space (or raise the file size "
                        "limit) and run the command again") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    fsync(path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(output_dir: Path, step: int, adapter: dict[str, torch.Tensor], optimizer, scheduler,
         rank: int = 0, is_main: bool = True, barrier=lambda: None, history: list[dict] | None = None,
         extra: dict | None = None) -> Path:
    """Write the checkpoint of ``step``; every process calls this (each saves its own random state).
    ``extra``: JSON values stored in state.json beside the step (the run config, time spent)."""
    final, tmp, old = output_dir / NAME, output_dir / f".{NAME}.tmp", output_dir / f".{NAME}.old"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    _write(tmp / f"rng-{rank}.json", json.dumps(_rng_state()))
    barrier()
    if is_main:
        try:
            _write_state(tmp, step, adapter, optimizer, scheduler, history, extra)
        except (OSError, SafetensorError) as err:  # a full disk: the checkpoints before it stay as they were
            shutil.rmtree(tmp, ignore_errors=True)
            raise BaraError(f"cannot write the checkpoint of step {step} into {output_dir} ({err}); the previous "
                            "checkpoint is kept; fix: free some disk space and rerun with --resume") from None
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)  # kept until the next checkpoint is whole
        os.replace(tmp, final)
        fsync(output_dir)
    barrier()
    return final


def _write_state(tmp: Path, step: int, adapter: dict[str, torch.Tensor], optimizer, scheduler,
                 history: list[dict] | None, extra: dict | None) -> None:
    """The main process's files of a checkpoint, each fsynced; state.json last, with the sha256 of the others."""
    tensors, opt_meta = _optimizer_tensors(optimizer)
    tensors.update({f"adapter.{k}": v.contiguous() for k, v in adapter.items()})
    save_file(tensors, tmp / "state.safetensors")
    fsync(tmp / "state.safetensors")
    _write(tmp / HISTORY, "".join(json.dumps(h) + "\n" for h in history or []))
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
    meta = {**(extra or {}), "step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
            "files": files}
    _write(tmp / STATE, json.dumps(meta))  # last: a folder without it is never taken for a checkpoint
    fsync(tmp)


class Damaged(Exception):
    """A checkpoint folder whose files are missing, truncated or altered."""


def read(path: Path) -> dict:
    """The state.json of the checkpoint in ``path``, after checking every file against its sha256."""
    try:
        meta = json.loads((path / STATE).read_text())
    except (OSError, ValueError) as err:
        raise Damaged(f"{path / STATE} is unreadable ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise Damaged(f"{path / STATE} has no step")
    for name, digest in meta.get("files", {}).items():  # checkpoints before bara 0.x have no hashes
        if not (path / name).is_file() or _sha256(path / name) != digest:
            raise Damaged(f"{path / name} is missing or not the file that was written")
    return meta


def candidates(output_dir: Path) -> list[Path]:
    """Checkpoint folders in ``output_dir``, newest first, whole or not."""
    return [p for p in (output_dir / NAME, output_dir / f".{NAME}.old") if p.is_dir()]


def find(output_dir: Path) -> Path | None:
    """The newest checkpoint folder in ``output_dir`` that has a state.json, whole or not (None if none)."""
    return next((p for p in candidates(output_dir) if (p / STATE).exists()), None)


def newest_whole(output_dir: Path, damaged: list[str] | None = None) -> Path | None:
    """The newest whole checkpoint in ``output_dir`` (None if there is none); why others were passed over
    is appended to ``damaged``."""
    for candidate in candidates(output_dir):
        try:
            read(candidate)
            return candidate
        except Damaged as err:
            if damaged is not None:
                damaged.append(str(err))
    return None


def load(path: Path, optimizer, scheduler, rank: int = 0) -> tuple[int, dict[str, torch.Tensor], list[dict]]:
    """Restore optimiser, scheduler and random states; return the step, the adapter tensors and the history."""
    meta = read(path)
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
    return meta["step"], adapter, read_history(path)


def read_history(folder: Path) -> list[dict]:
    """The step log ``folder/history.jsonl`` (a checkpoint's or a finished run's), empty where there is none."""
    history_file = folder / HISTORY
    return [json.loads(line) for line in history_file.read_text().splitlines()] if history_file.exists() else []
