"""A method added in one file plugs into every stage: ``bara train``, ``bara eval`` and a benchmark report, its
diagnostics, report column, plot and post-hoc line included, with no other file of bara touched (the registry
line is the test's ``monkeypatch.setitem``)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from bara import bench, cli
from bara.heads import Classifier
from bara.methods import METHODS, Method, MethodConfig
from bara.methods.base import option, seeds_of


@dataclass
class BitfitConfig(MethodConfig):
    bias_decay: float = option(0.0, "weight decay on the trained biases")


class Bitfit(Method):
    """BitFit (Ben Zaken et al., 2022): train only the biases of the pretrained body, and the fresh head."""

    name = "bitfit"
    config_class = BitfitConfig
    report_columns = (("bias_norm", "‖b‖"),)
    run_files = ("bias.png",)
    fit_note = "BitFit's ‖b‖: the norm of the trained biases."

    def wrap(self, classifier: Classifier) -> None:
        for name, p in classifier.backbone.named_parameters():
            head = name.split(".")[0] in classifier.head_names
            p.requires_grad_(head or name.endswith("bias"))

    def param_groups(self, classifier, lr, weight_decay):
        return super().param_groups(classifier, lr, self.config.bias_decay)

    def diagnostics(self, classifier: Classifier, batches) -> dict:
        biases = [p for n, p in classifier.backbone.named_parameters() if n.endswith("bias") and p.requires_grad]
        return {"bias_norm": torch.cat([b.detach().flatten() for b in biases]).norm().item()}

    def plots(self, classifier: Classifier, diagnostics: dict, output_dir, caption: str = "") -> list[str]:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        ax.bar([0], [diagnostics["bias_norm"]])
        ax.set_title(caption)
        fig.savefig(output_dir / "bias.png")
        plt.close(fig)
        return ["bias.png"]

    @classmethod
    def summary(cls, diagnostics: dict, validation: bool = False) -> dict:
        return {"bias_norm": diagnostics["bias_norm"]} if "bias_norm" in diagnostics else {}

    @classmethod
    def fit_summary(cls, rows: list[dict]) -> str | None:
        return f"‖b‖ = {', '.join(format(r['bias_norm'], '.3f') for r in rows)} (seeds {seeds_of(rows)})"


@pytest.fixture()
def bitfit(monkeypatch):
    monkeypatch.setitem(METHODS, Bitfit.name, Bitfit)  # the method's one registry line
    return Bitfit


def test_a_method_in_one_file_trains_evaluates_and_reports(bitfit, tiny_bert, toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--model", tiny_bert, "--data", toy_data, "--method", "bitfit", "--bias-decay", "0.1",
                     "--steps", "4", "--batch-size", "8", "--max-length", "24", "--lr", "1e-2", "--output", str(out),
                     "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "bitfit" and metrics["config"]["method_options"] == {"bias_decay": 0.1}
    assert metrics["diagnostics"]["bias_norm"] > 0 and (out / "bias.png").read_bytes()[:4] == b"\x89PNG"
    assert 0 < metrics["trainable_params"] < 5_000  # the biases and the head, not the body's ~1M weights

    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(out), "--output", str(tmp_path / "eval"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert again["nll"] == pytest.approx(metrics["nll"], abs=1e-6)
    assert "bias_norm" in capsys.readouterr().out

    preset = tmp_path / "bitfit.toml"
    preset.write_text(f"""
[bitfit]
model = {json.dumps(tiny_bert)}
seeds = [0, 1]
methods = ["lora", "bitfit"]
[bitfit.train]
steps = 3
batch_size = 8
eval_batch_size = 16
max_length = 24
[bitfit.lr]
default = 1e-2
[bitfit.datasets.toy]
data = {json.dumps(toy_data)}
""")
    bench_out = tmp_path / "bench"
    bench.run_bench(str(preset), bench_out, progress=False)
    rows = [json.loads(line) for line in (bench_out / "results.jsonl").read_text().splitlines()]
    norms = [r["bias_norm"] for r in rows if r["variant"] == "bitfit"]
    assert len(norms) == 2 and all(n > 0 for n in norms)
    assert all("bias_norm" not in r for r in rows if r["variant"] == "lora")
    results = (bench_out / "results.md").read_text()
    table = next(line for line in results.splitlines() if line.startswith("| variant | n | accuracy"))
    assert table.endswith("| ‖b‖ |")
    assert f"- bitfit: ‖b‖ = {norms[0]:.3f}, {norms[1]:.3f} (seeds 0, 1)" in results
    assert "Post-hoc fits on the validation split. BitFit's ‖b‖: the norm of the trained biases." in results
    assert (bench_out / "plots" / "bias-toy-bitfit.png").exists()
    assert not (bench_out / "plots" / "bias-toy-lora.png").exists()
