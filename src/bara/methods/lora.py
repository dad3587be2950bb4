"""LoRA through peft: the maximum-likelihood baseline (``lora``) and LoRA with weight decay (``map``)."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch

from ..errors import BaraError
from ..heads import Classifier
from .base import TARGET_MODULES, Method, MethodConfig, option


@dataclass
class LoraConfig(MethodConfig):
    r: int = option(8, "adapter rank (for BaRA and AdaLoRA: the maximum rank)")
    alpha: float = option(16.0, "LoRA scaling numerator: the update is (alpha / r) B A")
    lora_dropout: float = option(0.0, "dropout on the adapter's input")
    target_modules: list[str] = option([], "modules to adapt, comma-separated (default: query,value for BERT, "
                                           "q_proj,v_proj for Llama)")

    def validate(self) -> None:
        super().validate()
        if self.r < 1:
            raise BaraError(f"r must be >= 1, got {self.r}; fix: pass --r 8 (or any positive rank)")
        if not 0 <= self.lora_dropout < 1:
            raise BaraError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


def target_modules(config: LoraConfig, classifier: Classifier) -> list[str] | None:
    """The configured targets, else bara's default for the architecture, else peft's (GPT-2's c_attn, ...)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    model_type = classifier.backbone.config.model_type
    return list(config.target_modules) or TARGET_MODULES.get(model_type) or PEFT_TARGETS.get(model_type)


def peft_wrap(classifier: Classifier, peft_config, adapter_name: str = "default") -> None:
    """Inject ``peft_config`` with peft; the encoder's fresh classification head is trained in full."""
    from peft import get_peft_model

    if classifier.head_names:
        peft_config.modules_to_save = classifier.head_names
    try:
        with warnings.catch_warnings():
            # peft reads Llama's deprecated `is_gradient_checkpointing` (a FutureWarning per run, nothing to act on)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            classifier.backbone = get_peft_model(classifier.backbone, peft_config, adapter_name=adapter_name)
    except ValueError as err:
        raise BaraError(f"cannot place the adapter: {err}; fix: pass --target-modules with this model's "
                        "linear layer names") from None


class Lora(Method):
    """Standard LoRA (Hu et al., 2021), trained by maximum likelihood."""

    name = "lora"
    # Chosen on validation for MiniLM at 1,000 examples, on banking77, clinc150 and hwu64 alike:
    # benchmarks/results/standard/results.md, each intent set's "Learning rates ... chosen on the validation split".
    # On causal LMs (SmolLM2-135M, 400 steps): 3e-3, chosen on validation over 1e-3 and 1e-2 on all three BIG-bench
    # sets of multiple-choice (benchmarks/results/multiple-choice/results.md).
    default_lr = {"encoder": 5e-3, "causal": 3e-3}
    config_class = LoraConfig
    peft_root = "backbone."  # where the peft model sits in the classifier

    def wrap(self, classifier: Classifier) -> None:
        from peft import LoraConfig as PeftLoraConfig

        c = self.config
        peft_wrap(classifier, PeftLoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.lora_dropout,
                                             target_modules=target_modules(c, classifier)))

    # -- peft adapters --------------------------------------------------------------------------------
    def peft_model_of(self, classifier: Classifier):
        return classifier.backbone

    def adapter_names(self) -> list[str]:
        return ["default"]

    def peft_name(self, name: str) -> tuple[str, str] | None:
        """(adapter, the tensor's name in peft's saved file) for a tensor of :meth:`adapter_state`; None for one of
        bara's own. peft saves a model's names without the adapter's name and modules_to_save's wrapper."""
        if not name.startswith(self.peft_root):
            return None
        parts = name[len(self.peft_root):].split(".")
        adapter = next((a for a in self.adapter_names() if a in parts), None)
        if adapter is None:
            return None
        return adapter, ".".join(p for p in parts if p not in (adapter, "modules_to_save"))

    def merged(self, classifier: Classifier) -> torch.nn.Module:
        return self.peft_model_of(classifier).merge_and_unload()  # peft folds B A into W, the head replaces the base's

    def saved_peft_config(self, classifier: Classifier, adapter: str):
        """The peft config written beside the adapter's tensors (as ``PeftModel.save_pretrained`` writes it)."""
        config = copy.deepcopy(self.peft_model_of(classifier).peft_config[adapter])
        config.inference_mode = True
        return config

    def peft_adapters(self, classifier: Classifier) -> dict[str, tuple[object, dict[str, torch.Tensor]]]:
        files = {}
        for adapter in self.adapter_names():
            tensors = {}
            for name, value in self.adapter_state(classifier).items():
                found = self.peft_name(name)
                if found is not None and found[0] == adapter:
                    tensors[found[1]] = value
            files["" if adapter == "default" else adapter] = (self.saved_peft_config(classifier, adapter), tensors)
        return files

    def from_peft_names(self, classifier: Classifier,
                        files: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ours = {found: name for name in self.adapter_state(classifier) if (found := self.peft_name(name)) is not None}
        state = {}
        for folder, tensors in files.items():
            adapter = folder or "default"
            for key, value in tensors.items():
                if (adapter, key) not in ours:
                    raise BaraError(f"the peft adapter {folder or '.'}/ holds {key}, which this model does not have; "
                                    "fix: load it with the base model and method it was trained with")
                state[ours[adapter, key]] = value
        return state


@dataclass
class MapConfig(LoraConfig):
    weight_decay: float = option(0.01, "decoupled (AdamW) weight decay on the adapter: a Gaussian prior, MAP")


class Map(Lora):
    """LoRA with weight decay on the adapter: the maximum-a-posteriori estimate under a Gaussian prior."""

    name = "map"
    # Chosen on validation for MiniLM at 1,000 examples, on banking77, clinc150 and hwu64 alike:
    # benchmarks/results/standard/results.md, each intent set's "Learning rates ... chosen on the validation split".
    # On causal LMs LoRA's 3e-3 likewise (no benchmark runs MAP on one yet).
    default_lr = {"encoder": 5e-3, "causal": 3e-3}
    config_class = MapConfig

    def param_groups(self, classifier, lr, weight_decay):
        return super().param_groups(classifier, lr, self.config.weight_decay)
