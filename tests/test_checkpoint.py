"""bara.checkpoint: whole or refused, the previous one kept until the next is whole, history and extras kept."""

from __future__ import annotations

import json

import pytest
import torch

from bara import checkpoint


def _state(seed: int = 0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return layer, optimizer, scheduler


def test_save_keeps_the_previous_checkpoint_and_loads_back(tmp_path):
    layer, optimizer, scheduler = _state()
    adapter = {"weight": layer.weight.detach().clone()}
    checkpoint.save(tmp_path, 5, adapter, optimizer, scheduler, history=[{"step": 1, "loss": 0.5}],
                    extra={"run": {"lr": 0.1}})
    checkpoint.save(tmp_path, 10, adapter, optimizer, scheduler, history=[{"step": 1, "loss": 0.5}] * 2)
    assert [p.name for p in checkpoint.candidates(tmp_path)] == ["checkpoint", ".checkpoint.old"]
    assert checkpoint.read(tmp_path / ".checkpoint.old")["run"] == {"lr": 0.1}
    meta = checkpoint.read(tmp_path / "checkpoint")
    assert sorted(meta["files"]) == ["history.jsonl", "rng-0.json", "state.safetensors"] and "run" not in meta
    _, optimizer2, scheduler2 = _state(seed=1)
    step, tensors, history = checkpoint.load(tmp_path / "checkpoint", optimizer2, scheduler2)
    assert step == 10 and history == [{"step": 1, "loss": 0.5}] * 2
    assert torch.equal(tensors["weight"], adapter["weight"])
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert not (tmp_path / ".checkpoint.tmp").exists()


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete", "empty state.json"])
def test_a_damaged_checkpoint_is_passed_over(tmp_path, damage):
    layer, optimizer, scheduler = _state()
    for step in (5, 10):
        checkpoint.save(tmp_path, step, {"weight": layer.weight.detach()}, optimizer, scheduler)
    newest = tmp_path / "checkpoint"
    target = newest / ("state.json" if damage == "empty state.json" else "state.safetensors")
    data = target.read_bytes()
    if damage == "flip a byte":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        target.unlink()
    else:
        target.write_text("")
    with pytest.raises(checkpoint.Damaged):
        checkpoint.read(newest)
    damaged: list[str] = []
    assert checkpoint.newest_whole(tmp_path, damaged) == tmp_path / ".checkpoint.old"
    assert len(damaged) == 1 and str(newest) in damaged[0]


def test_a_checkpoint_without_hashes_is_taken_on_trust(tmp_path):
    layer, optimizer, scheduler = _state()
    checkpoint.save(tmp_path, 3, {"weight": layer.weight.detach()}, optimizer, scheduler)
    state = tmp_path / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    del meta["files"]  # as written before checkpoints carried hashes
    state.write_text(json.dumps(meta))
    (tmp_path / "checkpoint" / "history.jsonl").unlink()
    assert checkpoint.newest_whole(tmp_path) == tmp_path / "checkpoint"
    assert checkpoint.load(tmp_path / "checkpoint", optimizer, scheduler)[0::2] == (3, [])


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from bara.errors import BaraError

    layer, optimizer, scheduler = _state()
    checkpoint.save(tmp_path, 5, {"weight": layer.weight.detach()}, optimizer, scheduler)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(BaraError, match="cannot write the checkpoint of step 10 .*No space left.*previous checkpoint "
                                        "is kept; fix: free some disk space and rerun with --resume"):
        checkpoint.save(tmp_path, 10, {"weight": layer.weight.detach()}, optimizer, scheduler)
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
