"""Turn a backbone into a classifier with class logits, whatever its architecture.

- encoder: the sequence-classification head's logits.
- causal LM (the protocol of BLoB and Laplace-LoRA): the prompt ends in "Answer:"; the logits of the last
  position restricted to the label tokens (" A", " B", ...) are the class logits.

The classifier also tokenizes, so every method, the trainer and the evaluator feed it the same way.
"""

from __future__ import annotations

import contextlib
import string

import torch
from torch import nn

from .data import Split
from .errors import BaraError
from .models import LoadedModel

LETTERS = string.ascii_uppercase


def prompt(text: str, choices: list[str]) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"Question: {text}\n{options}\nAnswer:"


def label_token_ids(tokenizer, num_labels: int) -> list[int]:
    if num_labels > len(LETTERS):
        raise BaraError(f"a causal LM scores at most {len(LETTERS)} labels by letter, the task has {num_labels}; "
                        "fix: use an encoder model (e.g. --model minilm) for this dataset")
    ids = []
    for letter in LETTERS[:num_labels]:
        tokens = tokenizer.encode(" " + letter, add_special_tokens=False)
        if len(tokens) != 1:
            raise BaraError(f"the tokenizer splits ' {letter}' into {len(tokens)} tokens; fix: use a model whose "
                            "tokenizer has single-token letters")
        ids.append(tokens[0])
    return ids


def float32_inputs(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: a float32 module's floating-point inputs in float32."""
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def exact_output(module: nn.Module) -> None:
    """Run ``module`` with autocast off and its inputs in its own dtype, so that the logits it makes are not rounded
    to bfloat16 under mixed precision (the body's matrix products are; the output layer is a small part of the
    cost). torch.autocast has no per-module switch, so a forward pre-hook enters ``autocast(enabled=False)`` and a
    forward hook that runs even when the forward raises leaves it."""
    entered: list[contextlib.AbstractContextManager] = []

    def enter(module: nn.Module, args: tuple) -> tuple:
        weight = next(module.parameters())
        entered.append(torch.autocast(weight.device.type, enabled=False))
        entered[-1].__enter__()
        return tuple(a.to(weight.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def leave(module: nn.Module, args: tuple, output):
        entered.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


class Classifier(nn.Module):
    """``forward(input_ids, attention_mask) -> logits [batch, num_labels]`` for encoders and causal LMs.

    A causal LM without labels (``label_names`` and ``label_ids`` None: the Python API's language model) returns the
    next-token logits ``[batch, vocab]`` at the last real token, or ``[batch, tokens, vocab]`` at every position
    while ``all_positions`` is set (training on token labels).

    ``autocast``: a lower-precision dtype (bfloat16) in which the backbone's matrix products run under
    ``torch.autocast`` in training and prediction alike (mixed precision, as accelerate's ``mixed_precision``, which
    covers training only); the weights, the adapter and the output layer (the class head or the LM head, see
    :func:`exact_output`) stay in their own dtype, and the logits are float32."""

    def __init__(self, loaded: LoadedModel, label_names: list[str] | None, max_length: int = 64,
                 label_ids: list[int] | None = None, autocast: torch.dtype | None = None):
        super().__init__()
        self.backbone = loaded.backbone
        self.autocast = autocast
        self.tokenizer = loaded.tokenizer
        self.kind = loaded.kind
        self.label_names = list(label_names) if label_names is not None else None
        self.max_length = max_length
        self.all_positions = False
        ids = None
        if self.kind == "causal" and (label_names is not None or label_ids is not None):
            ids = torch.tensor(label_ids if label_ids is not None
                               else label_token_ids(self.tokenizer, len(label_names)))
        self.register_buffer("label_ids", ids, persistent=False)
        for name in self.head_names:  # trained in full: float32 on a half-precision base, as peft keeps its adapters
            head = self.backbone.get_submodule(name)
            if any(p.dtype in (torch.float16, torch.bfloat16) for p in head.parameters()):
                head.float()
                head.register_forward_pre_hook(float32_inputs)
        if autocast is not None:
            outputs = [self.backbone.get_submodule(n) for n in self.head_names] if self.kind == "encoder" \
                else [self.backbone.get_output_embeddings()]
            for module in outputs:
                exact_output(module)

    @property
    def head_names(self) -> list[str]:
        """The top-level modules of a classification model outside its pretrained body (BERT's ``classifier``,
        Llama's ``score``): the fresh head, trained in full by every method."""
        if self.kind != "encoder":
            return []
        body = getattr(self.backbone, "base_model_prefix", "")
        return [n for n, m in self.backbone.named_children() if n != body and any(True for _ in m.parameters())]

    def texts(self, split: Split, index: list[int]) -> list[str]:
        if self.kind == "encoder":
            if split.choices is not None:
                return [prompt(split.texts[i], split.choices[i]) for i in index]
            return [split.texts[i] for i in index]
        choices = split.choices
        return [prompt(split.texts[i], choices[i] if choices is not None else self.label_names) for i in index]

    def encode(self, split: Split, index: list[int]) -> dict[str, torch.Tensor]:
        """Tokenize instances ``index`` of ``split``; returns input_ids, attention_mask and labels."""
        batch = self.tokenizer(self.texts(split, index), padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        out["labels"] = torch.tensor([split.labels[i] for i in index])
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.autocast is None:
            return self._logits(input_ids, attention_mask)
        with torch.autocast(input_ids.device.type, dtype=self.autocast):
            return self._logits(input_ids, attention_mask).float()

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "encoder":
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask).logits
        # Positions count from the first real token.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # Left padding (bara's tokenizers) puts the last real token last; right padding needs every position.
        last_is_real = bool(attention_mask[:, -1].all())
        keep = 0 if self.all_positions or not last_is_real else 1
        logits = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               logits_to_keep=keep).logits
        if self.all_positions:
            return logits
        last = logits[:, -1, :] if last_is_real else \
            logits[torch.arange(len(logits)), attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)]
        return last if self.label_ids is None else last.index_select(-1, self.label_ids)
