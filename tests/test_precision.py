"""--dtype: a half-precision base with a float32 adapter; --mixed-precision: bfloat16 matrix products under autocast
with float32 weights and logits; checkpoints keep every device's random state."""

from __future__ import annotations

import pytest
import torch

from bara import bench, checkpoint, runs
from bara.errors import BaraError
from bara.heads import Classifier
from bara.models import load_model
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


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_mixed_precision_rounds_the_body_not_the_output_layer(tiny_bert, tiny_llama, kind):
    model = tiny_bert if kind == "bert" else tiny_llama
    labels = ["yes", "no", "maybe"]
    torch.manual_seed(0)
    exact = Classifier(load_model(model, 3), labels, 24)
    torch.manual_seed(0)
    mixed = Classifier(load_model(model, 3), labels, 24, autocast=torch.bfloat16)
    mixed.load_state_dict(exact.state_dict())
    exact.eval(), mixed.eval()
    batch = exact.encode(type("S", (), {"texts": ["a b c", "d e f g h"], "labels": [0, 1], "choices": None})(), [0, 1])
    def output_layer(classifier):
        return classifier.backbone.get_submodule("classifier") if kind == "bert" \
            else classifier.backbone.get_output_embeddings()

    seen = {"exact": [], "mixed": []}
    for name, classifier in (("exact", exact), ("mixed", mixed)):
        output_layer(classifier).register_forward_hook(lambda m, a, o, name=name: seen[name].append((a[0].dtype,
                                                                                                  o.dtype)))
    with torch.no_grad():
        want = exact(batch["input_ids"], batch["attention_mask"])
        got = mixed(batch["input_ids"], batch["attention_mask"])
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the whole model under autocast rounds the logits too
            rounded = exact(batch["input_ids"], batch["attention_mask"])
    assert got.dtype == torch.float32 and got.shape == want.shape == (2, 3)
    assert not torch.equal(got, want)  # the body ran in bfloat16 ...
    assert torch.allclose(got, want, atol=0.05, rtol=0.02)  # ... to bfloat16's precision
    # The mixed classifier's output layer saw float32 inputs with autocast off; without the hooks it is bfloat16.
    assert seen["mixed"] == [(torch.float32, torch.float32)] and seen["exact"][-1][1] == torch.bfloat16
    assert rounded.dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")  # the hooks left autocast as they found it


# Every method of the multiple-choice track, which trains under bf16: Laplace's Kronecker factors and TFB's search
# run through the same autocast classifier.
@pytest.mark.parametrize("method", ["blob", "bara", "laplace", "tfb", "temperature", "mcdropout", "monteclora"])
def test_mixed_precision_trains_evaluates_and_is_checked(tiny_llama, toy_choices, tmp_path, method):
    with pytest.raises(BaraError, match="--mixed-precision must be one of no, bf16, got 'fp8'; fix: "):
        RunConfig(mixed_precision="fp8").validate()
    default = RunConfig(data="trec")
    legacy = RunConfig.from_dict({k: v for k, v in default.to_dict().items() if k != "mixed_precision"})
    assert legacy.mixed_precision == "no" and bench.run_hash(legacy) == bench.run_hash(default)
    options = {"target_modules": ["q_proj", "v_proj"]}
    if method in ("blob", "bara", "laplace", "tfb"):
        options["r"] = 4
    mixed = RunConfig(model=tiny_llama, data=toy_choices, method=method, mixed_precision="bf16",
                      method_options=options,
                      train=TrainConfig(steps=3, batch_size=4, lr=5e-3, max_length=48, eval_batch_size=8))
    assert bench.run_hash(mixed) != bench.run_hash(RunConfig(**{**mixed.__dict__, "mixed_precision": "no"}))
    out = tmp_path / "run"
    metrics = runs.run_train(mixed, out, progress_bar=False)
    assert metrics["config"]["mixed_precision"] == "bf16" and metrics["nll"] > 0
    classifier, _, loaded = runs.load_adapter(out)
    assert loaded.mixed_precision == "bf16" and classifier.autocast == torch.bfloat16
    assert {p.dtype for p in classifier.parameters()} == {torch.float32}
    assert 0 <= metrics["accuracy"] <= 1 and metrics["ece"] >= 0
    torch.manual_seed(0)
    again = runs.run_eval(out, progress_bar=False)  # evaluated under the autocast it was trained with
    assert again["nll"] == pytest.approx(metrics["nll"], abs=1e-6)


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
