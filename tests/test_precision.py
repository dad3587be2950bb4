"""--dtype: a half-precision base with a float32 adapter; checkpoints keep every device's random state."""

from __future__ import annotations

import pytest
import torch

from bara import bench, checkpoint, runs
from bara.errors import BaraError
from bara.methods.bara import BaraLinear
from bara.runs import RunConfig
from bara.trainer import TrainConfig


def config(model: str, data: str, method: str, dtype: str) -> RunConfig:
    return RunConfig(model=model, data=data, method=method, dtype=dtype, method_options={"r": 4},
                     train=TrainConfig(steps=3, batch_size=8, lr=5e-3, max_length=24, eval_batch_size=16))


@pytest.mark.parametrize("method", ["bara", "blob", "lora"])
def test_bfloat16_base_trains_with_a_float32_adapter(tiny_bert, toy_data, tmp_path, method):
    out = tmp_path / method
    metrics = runs.run_train(config(tiny_bert, toy_data, method, "bfloat16"), out, progress_bar=False)
    assert metrics["config"]["dtype"] == "bfloat16" and 0 <= metrics["accuracy"] <= 1 and metrics["nll"] > 0
    classifier, _, loaded = runs.load_adapter(out)
    assert loaded.dtype == "bfloat16"
    body = {p.dtype for n, p in classifier.named_parameters() if ".classifier." not in n and not p.requires_grad}
    trained = {p.dtype for p in classifier.parameters() if p.requires_grad}  # the adapter and the head
    assert body == {torch.bfloat16} and trained == {torch.float32}
    if method == "bara":
        assert any(isinstance(m, BaraLinear) for m in classifier.modules())
    again = runs.run_eval(out, progress_bar=False)
    assert again["nll"] == pytest.approx(metrics["nll"], abs=1e-6)


def test_dtype_is_checked_and_leaves_float32_run_hashes_as_they_were():
    with pytest.raises(BaraError, match="--dtype must be one of float32, bfloat16, float16.*fix: "):
        RunConfig(dtype="int8").validate()
    default = RunConfig(data="trec")
    legacy = RunConfig.from_dict({k: v for k, v in default.to_dict().items() if k != "dtype"})
    assert legacy.dtype == "float32" and bench.run_hash(legacy) == bench.run_hash(default)
    assert bench.run_hash(RunConfig(data="trec", dtype="bfloat16")) != bench.run_hash(default)


def test_checkpoint_keeps_the_cuda_random_states(monkeypatch):
    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda values: restored.extend(values))
    saved = checkpoint._rng_state()
    assert saved["cuda"] == [s.tolist() for s in states]
    checkpoint._set_rng_state(saved)
    assert [r.tolist() for r in restored] == saved["cuda"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(BaraError, match="2 CUDA devices, this machine has 1; fix: "):
        checkpoint._set_rng_state(saved)
