"""benchmarks/experiments/gate_evidence.py: the evidence of a label about each gate, gate by gate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bara import runs
from bara.runs import RunConfig
from bara.trainer import TrainConfig

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "experiments" / "gate_evidence.py"


def _script():
    spec = importlib.util.spec_from_file_location("gate_evidence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_factor_that_does_nothing_carries_no_evidence_and_the_others_some(tiny_bert, toy_data, tmp_path):
    out = tmp_path / "bara"
    config = RunConfig(model=tiny_bert, data=toy_data, method="bara", method_options={"r": 4},
                       train=TrainConfig(steps=6, batch_size=8, max_length=16, lr=5e-2))
    runs.run_train(config, out, progress_bar=False, validation=False)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = sorted(k for k in tensors if k.endswith("bara_B"))[0]
    tensors[first][:, 2] = 0.0  # the first layer's third factor no longer reaches the output
    save_file(tensors, weights)
    result = _script().gate_evidence(str(out), n=12)
    dl = result["dl"]
    layers = sum(k.endswith("bara_B") for k in tensors)
    assert dl.shape == (12, 4 * layers) and result["gates"] == 4 * layers
    assert torch.all(dl[:, 2] == 0)  # exactly the gate held: the others of that layer still move the likelihood
    assert dl[:, [0, 1, 3]].abs().max() > 0 and dl.abs().max() > 0
    for key in ("decided_trained_gate", "decided_given_label_elbo", "decided_given_label_tempered"):
        assert 0.0 <= result[key] <= 1.0
    assert result["abs_dl_max"] == dl.abs().max().item()
