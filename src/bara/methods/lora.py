"""LoRA through peft: the maximum-likelihood baseline (``lora``) and LoRA with weight decay (``map``)."""

from __future__ import annotations

from dataclasses import dataclass

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
        classifier.backbone = get_peft_model(classifier.backbone, peft_config, adapter_name=adapter_name)
    except ValueError as err:
        raise BaraError(f"cannot place the adapter: {err}; fix: pass --target-modules with this model's "
                        "linear layer names") from None


class Lora(Method):
    """Standard LoRA (Hu et al., 2021), trained by maximum likelihood."""

    name = "lora"
    config_class = LoraConfig

    def wrap(self, classifier: Classifier) -> None:
        from peft import LoraConfig as PeftLoraConfig

        c = self.config
        peft_wrap(classifier, PeftLoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.lora_dropout,
                                             target_modules=target_modules(c, classifier)))


@dataclass
class MapConfig(LoraConfig):
    weight_decay: float = option(0.01, "decoupled (AdamW) weight decay on the adapter: a Gaussian prior, MAP")


class Map(Lora):
    """LoRA with weight decay on the adapter: the maximum-a-posteriori estimate under a Gaussian prior."""

    name = "map"
    config_class = MapConfig

    def param_groups(self, classifier, lr, weight_decay):
        return super().param_groups(classifier, lr, self.config.weight_decay)
