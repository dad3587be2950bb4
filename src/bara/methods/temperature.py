r"""Temperature scaling (Guo et al., 2017) on LoRA: train plain LoRA, then fit one temperature T on the
validation split and predict :math:`\mathrm{softmax}(f(x) / T)`.

T minimises the validation negative log-likelihood,

.. math:: T^\star = \arg\min_{T > 0} \; -\frac1N \sum_n \log \mathrm{softmax}\big(f(x_n) / T\big)_{y_n},

optimised over :math:`\log T` with L-BFGS on the collected validation logits. The NLL is convex in
:math:`1/T`, so the optimum (and T clamped towards 1) never has a higher validation NLL than T = 1.
T only rescales the logits: accuracy is unchanged.

T lives in the classifier as ``temperature_scaling.temperature``, a parameter the optimiser never sees
(``requires_grad=False``), so it is saved and loaded with the adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BaraError
from ..heads import Classifier
from .base import option, seeds_of
from .lora import Lora, LoraConfig

T_RANGE = (1e-2, 1e2)  # a validation split the model fits perfectly drives T -> 0; keep it finite


@dataclass
class TemperatureConfig(LoraConfig):
    lbfgs_iters: int = option(100, "L-BFGS iterations for fitting the temperature on the validation split")

    def validate(self) -> None:
        super().validate()
        if self.lbfgs_iters < 1:
            raise BaraError(f"lbfgs_iters must be >= 1, got {self.lbfgs_iters}; fix: pass --lbfgs-iters 100")


class TemperatureScaling(nn.Module):
    """Holds the fitted temperature T (1 until fitted); ``forward(logits) = logits / T``."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature.to(logits.dtype)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> tuple[float, float, float]:
    """The NLL-minimising temperature of ``logits [N, C]``; returns (T, NLL at T = 1, NLL at T)."""
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        t = float(log_t.exp().clamp(*T_RANGE)) if torch.isfinite(log_t) else 1.0
        before = F.cross_entropy(logits, labels).item()
        after = F.cross_entropy(logits / t, labels).item()
    if after > before:  # cannot happen at the optimum (convex in 1/T); guards a failed line search
        t, after = 1.0, before
    return t, before, after


class Temperature(Lora):
    """LoRA + temperature scaling fitted on the validation split after training."""

    name = "temperature"
    # LoRA's rate, which standard gives this post-hoc step on a LoRA fit (5e-3 on every intent set):
    # benchmarks/results/standard/results.md, each intent set's "Learning rates ... chosen on the validation split".
    # On causal LMs LoRA's 3e-3, which multiple-choice gives it on all three sets
    # (benchmarks/results/multiple-choice/results.md).
    default_lr = {"encoder": 5e-3, "causal": 3e-3}
    config_class = TemperatureConfig
    trains_as = "lora"  # the LoRA fit trains as `lora` does, then the post-hoc step

    def __init__(self, config: TemperatureConfig | None = None):
        super().__init__(config)
        self.fit_result: dict = {}  # validation NLL before and after scaling, once fitted in this process
        self.fitted = False  # T fitted by fit_posthoc, or loaded with the adapter

    def wrap(self, classifier: Classifier) -> None:
        super().wrap(classifier)
        classifier.temperature_scaling = TemperatureScaling()

    def adapter_state(self, classifier: Classifier) -> dict[str, torch.Tensor]:
        state = super().adapter_state(classifier)
        state["temperature_scaling.temperature"] = classifier.temperature_scaling.temperature.detach().clone()
        return state

    def merged(self, classifier: Classifier) -> nn.Module:
        raise BaraError("temperature scaling divides the logits by T after the model; a merged model would predict "
                        "without it; fix: use the adapter (bara eval), or merge the LoRA alone with peft: "
                        "peft.PeftModel.from_pretrained(base, ADAPTER).merge_and_unload()")

    @torch.no_grad()
    def fit_posthoc(self, classifier: Classifier, train_batches, validation_batches) -> None:
        classifier.eval()
        device = classifier.temperature_scaling.temperature.device
        logits, labels = [], []
        for batch in validation_batches:
            logits.append(classifier(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu())
            labels.append(batch["labels"])
        if not logits:
            raise BaraError("temperature scaling needs a validation split, the task has none; fix: give the data a "
                            "validation split (or use --method lora)")
        with torch.enable_grad():
            t, before, after = fit_temperature(torch.cat(logits), torch.cat(labels), self.config.lbfgs_iters)
        classifier.temperature_scaling.temperature.fill_(t)
        self.fit_result = {"validation_nll_unscaled": before, "validation_nll_scaled": after,
                           "n_validation": sum(len(y) for y in labels)}
        self.fitted = True

    def load_adapter_state(self, classifier: Classifier, state: dict[str, torch.Tensor]) -> None:
        super().load_adapter_state(classifier, state)
        self.fitted = True

    @torch.no_grad()
    def predict(self, classifier: Classifier, batch: dict, samples: int) -> torch.Tensor:
        self.check_fitted(self.is_fitted())
        classifier.eval()
        logits = classifier(batch["input_ids"], batch["attention_mask"]).float()
        return torch.softmax(classifier.temperature_scaling(logits), -1)[None]

    def training_predict(self, classifier: Classifier, batch: dict) -> torch.Tensor:
        return super().predict(classifier, batch, 0)  # the LoRA fit, unscaled

    def is_fitted(self) -> bool:
        return self.fitted

    fit_note = ("Temperature scaling's T: below 1 sharpens the LoRA fit's predictive (it was under-confident on "
                "validation), above 1 softens it.")

    @classmethod
    def summary(cls, diagnostics: dict, validation: bool = False) -> dict:
        return {"temperature": diagnostics["temperature"]} if not validation and "temperature" in diagnostics else {}

    @classmethod
    def fit_summary(cls, rows: list[dict]) -> str | None:
        if any(r.get("temperature") is None for r in rows):
            return None
        return f"T = {', '.join(format(r['temperature'], '.2f') for r in rows)} (seeds {seeds_of(rows)})"

    def diagnostics(self, classifier: Classifier, batches) -> dict:
        t = classifier.temperature_scaling.temperature.item()
        return {"temperature": t, "log_temperature": math.log(t), **self.fit_result}
