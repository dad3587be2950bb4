"""bara as a library: any transformers model, wrapped in one call, trained by ``transformers.Trainer``, saved and
loaded as an adapter, peft-style::

    model = bara.get_model(hf_model, bara.BaraConfig(r=8))   # freezes the base, injects the adapter
    bara.Trainer(model=model, args=TrainingArguments(...), train_dataset=data).train()
    probs = model.predict(input_ids=ids, attention_mask=mask, samples=10)   # samples=0: one pass
    model.save_pretrained("adapter")
    model = bara.from_pretrained(fresh_base, "adapter")

The model is the same classifier and method object that ``bara train`` builds (:class:`bara.heads.Classifier`,
:mod:`bara.methods`): one code path for the CLI and the library.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer as HfTrainer
from transformers import TrainerCallback, TrainingArguments
from transformers.modeling_outputs import CausalLMOutput, SequenceClassifierOutput

from .errors import BaraError
from .heads import Classifier
from .methods import METHODS, Method, MethodConfig, Progress, get_method
from .methods.base import to_device
from .models import LoadedModel, load_model
from .runs import (ADAPTER_WEIGHTS, check_adapter_size, has_weights, meta_file, read_adapter, trained_options,
                   versions, write_adapter)

# Keyword arguments of a transformers forward that change nothing here (HF Trainer and generate pass some of them).
IGNORED_KWARGS = ("return_dict", "num_items_in_batch", "use_cache", "output_attentions", "output_hidden_states")


def method_of(config: MethodConfig | str | None) -> Method:
    """The method whose config class ``config`` is (``BaraConfig`` -> BaRA), or the method named ``config``."""
    if config is None or isinstance(config, str):
        return get_method(config or "bara")
    found = [m for m in METHODS.values() if type(config) is m.config_class]
    if not found:
        raise BaraError(f"{type(config).__name__} is not the config of a bara method; fix: pass bara.BaraConfig(...), "
                        f"bara.BlobConfig(...) or a method name ({', '.join(sorted(METHODS))})")
    config.validate()
    return found[0](config)


def model_kind(model: nn.Module) -> str:
    """"encoder" for a model with a sequence-classification head (any architecture), "causal" for a causal LM."""
    if type(model).__name__.endswith("ForSequenceClassification"):
        return "encoder"
    if callable(getattr(model, "can_generate", None)) and model.can_generate():
        return "causal"
    raise BaraError(f"{type(model).__name__} is neither a sequence classifier nor a causal LM; fix: load the model "
                    "with AutoModelForSequenceClassification or AutoModelForCausalLM")


def base_model_name(model: nn.Module) -> str | None:
    """What the saved adapter records as its base: an absolute path for a local folder, else the hub id (None for a
    model built from a config)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not name:
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


class BaraModel(nn.Module):
    """A transformers model with a bara method's adapter (made by :func:`get_model` or :func:`from_pretrained`).

    ``forward(input_ids, attention_mask, labels)`` returns a transformers output with ``.logits`` and, given labels,
    ``.loss``. In training mode with labels it is the method's training objective for one minibatch: for BaRA the
    data term of one stochastic pass plus the tempered local KL (and any global KL the method keeps in the loss);
    :meth:`kl_step` then does the method's separate update after the optimiser step. In eval mode, or without
    labels, the logits are the log-probabilities of the one-pass prediction (``predict(samples=0)``).

    A classifier's labels are class indices ``[batch]``; a causal LM wrapped without ``label_tokens`` is a language
    model, whose labels are token ids ``[batch, tokens]`` (shifted inside, -100 ignored) as in transformers."""

    accepts_loss_kwargs = False  # the loss is a minibatch mean: HF Trainer scales it for gradient accumulation
    main_input_name = "input_ids"

    def __init__(self, classifier: Classifier, method: Method, base_model: str | None = None):
        super().__init__()
        self.classifier = classifier
        self.method = method
        self.base_model_name = base_model
        self.progress: Progress | None = None
        self.logs: dict = {}  # the numbers of the last training loss (nll, kl_local, ...)

    @property
    def config(self):
        """The base model's transformers config."""
        return self.classifier.backbone.config

    @property
    def is_language_model(self) -> bool:
        return self.classifier.kind == "causal" and self.classifier.label_ids is None

    # -- training -------------------------------------------------------------------------------------
    def start_training(self, total_steps: int, num_train: int, batch_size: int = 1, step: int = 0) -> None:
        """Where training stands, for the method's KL warm-up, its dataset-size scaling of the KL (N = ``num_train``)
        and its KL step's schedule. :class:`Trainer` calls this; a hand-written loop calls it once before the first
        step."""
        for name, value, low in (("total_steps", total_steps, 1), ("num_train", num_train, 1),
                                 ("batch_size", batch_size, 1), ("step", step, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BaraError(f"{name} must be a whole number >= {low}, got {value!r}; fix: pass e.g. "
                                f"{name}={max(low, 1)}")
        self.progress = Progress(step, total_steps, num_train, batch_size)

    def kl_step(self) -> None:
        """The method's own update after each optimiser step, before the gradients are zeroed: BaRA's and BLoB's SGD
        step on KL(q(A) || p(A)) and sigma_A, and BaRA's SVI step of q(pi); AdaLoRA's rank allocation; nothing for
        LoRA. :class:`Trainer` calls it."""
        progress = self._progress()
        self.progress = dataclasses.replace(progress, step=progress.step + 1)
        self.method.on_step_end(self.classifier, self.progress)

    def _progress(self) -> Progress:
        if self.progress is None:
            raise BaraError("the model does not know the length of training (its KL terms are scaled by the dataset "
                            "size); fix: train with bara.Trainer, or call model.start_training(total_steps=..., "
                            "num_train=...) before the first step")
        return self.progress

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None, **kwargs):
        batch = self._batch(input_ids, attention_mask, token_type_ids, kwargs)
        if labels is None or not self.training:
            with self._positions(self.is_language_model):
                logits = self._log_probs(batch, 0, as_trained=True)
            loss = None if labels is None else self._data_loss(logits, labels)
        else:
            loss, logits = self._training_loss(batch, labels)
        output = CausalLMOutput if self.is_language_model else SequenceClassifierOutput
        return output(loss=loss, logits=logits)

    def _batch(self, input_ids, attention_mask, token_type_ids, kwargs) -> dict:
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in IGNORED_KWARGS)
        if unknown:
            raise BaraError(f"unexpected input(s) {', '.join(unknown)}; fix: pass input_ids, attention_mask and labels")
        if token_type_ids is not None and bool(token_type_ids.any()):
            # The method's passes feed input_ids and attention_mask only (one text per input).
            raise BaraError("token_type_ids other than 0 (sentence pairs) are not supported; fix: join the pair into "
                            "one text")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return to_device({"input_ids": input_ids, "attention_mask": attention_mask}, self._device())

    def _device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    @contextmanager
    def _positions(self, every: bool):
        """A language model's logits at every position (token labels) instead of the last one only."""
        self.classifier.all_positions = every
        try:
            yield
        finally:
            self.classifier.all_positions = False

    def _log_probs(self, batch: dict, samples: int, as_trained: bool = False) -> torch.Tensor:
        """log of the method's predictive (averaged over ``samples``), the classifier's train/eval mode kept.
        ``as_trained``: a post-hoc method not fitted yet gives the trained model's prediction (what ``bara train``
        scores on validation during training, and what a Trainer's evaluation during training gets) instead of
        raising."""
        was_training = self.classifier.training
        try:
            if as_trained and not self.method.is_fitted():
                probs = self.method.training_predict(self.classifier, batch).mean(0)
            else:
                probs = self.method.predict(self.classifier, batch, samples).mean(0)
        finally:
            self.classifier.train(was_training)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

    def _data_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(logits.device)
        if self.is_language_model:  # predict token t + 1 from the tokens up to t; -100 is ignored (transformers')
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return F.cross_entropy(logits.float(), labels)

    def _training_loss(self, batch: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The method's objective for one minibatch (:meth:`Method.loss`, as ``bara train`` computes it), and the
        logits of its pass ([batch, ...]; the log of the mixture when the method draws several samples a step)."""
        progress, lm = self._progress(), self.is_language_model
        self.classifier.train()
        seen = {}

        def run(input_ids, attention_mask):
            logits = self.classifier(input_ids, attention_mask)
            seen["logits"] = logits
            return logits[:, :-1].flatten(0, 1) if lm else logits  # a language model: one row per predicted token

        labels = labels.to(self._device())
        batch = {**batch, "labels": labels[:, 1:].flatten() if lm else labels}
        with self._positions(lm):
            loss, self.logs = self.method.loss(run, batch, progress)
        return loss, per_input(seen["logits"], len(labels))

    # -- prediction -----------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, samples: int | None = None,
                token_type_ids: torch.Tensor | None = None, labels=None, **kwargs) -> torch.Tensor:
        """Predictive probabilities ``[batch, classes]`` averaged over ``samples`` Monte-Carlo samples (default: the
        method's own, 10 for BaRA and BLoB); ``samples=0`` is the one-pass prediction. A classifier's classes are its
        labels, or the label tokens it was wrapped with; a language model's are the vocabulary, for the token after
        the last real one. ``labels`` (a whole batch may be passed) are not used."""
        if samples is None:
            samples = self.method.default_samples
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise BaraError(f"samples must be a whole number >= 0 (0: one pass), got {samples!r}; fix: pass samples=10")
        return self._log_probs(self._batch(input_ids, attention_mask, token_type_ids, kwargs), samples).exp()

    def diagnostics(self, batches=None, **inputs) -> dict:
        """The method's diagnostics (BaRA: effective ranks per layer and jointly, whether the gate is decided and
        input-dependent, each beside its null) on ``batches`` (dicts of input_ids, attention_mask and labels) or on
        one batch given as keyword arguments."""
        prepared = self._labelled([inputs] if batches is None else batches, "diagnostics",
                                  "the shuffle test scores the NLL")
        was_training = self.classifier.training
        try:
            return self.method.diagnostics(self.classifier, prepared)
        finally:
            self.classifier.train(was_training)

    def _labelled(self, batches, what: str, why: str) -> list[dict]:
        """``batches`` (dicts of input_ids, attention_mask and labels) on the model's device, checked."""
        batches = list(batches)
        if not batches or any("labels" not in b for b in batches):
            raise BaraError(f"{what} need labelled batches ({why}); fix: pass dicts of input_ids, attention_mask "
                            "and labels")
        device = self._device()
        return [to_device({"input_ids": b["input_ids"],
                           "attention_mask": b.get("attention_mask", torch.ones_like(b["input_ids"])),
                           "labels": b["labels"]}, device) for b in batches]

    def fit_posthoc(self, train, validation) -> "BaraModel":
        """After training, fit a post-hoc method's step as ``bara train`` does: temperature scaling's T on the
        ``validation`` batches; Laplace's posterior on the ``train`` batches and its prior precision (with
        ``prior_fit="val"``) on ``validation``. Batches are dicts of input_ids, attention_mask and labels. A method
        without a post-hoc step has nothing to fit (a no-op). Until it is fitted such a method's :meth:`predict`
        raises; its forward in eval mode (a Trainer's evaluation during training) gives the trained model's
        prediction."""
        train = self._labelled(train, "fit_posthoc", "the training batches fit Laplace's posterior")
        validation = self._labelled(validation, "fit_posthoc", "temperature scaling fits T on validation")
        was_training = self.classifier.training
        try:
            self.method.fit_posthoc(self.classifier, train, validation)
        finally:
            self.classifier.train(was_training)
        return self

    def prune(self, threshold: float | None = None) -> dict[str, int]:
        """BaRA: remove the factors with E[pi] below ``threshold`` (the config's ``prune_threshold``) for good;
        returns the rank kept per layer. An optimiser built before pruning must be built again."""
        if not callable(getattr(self.method, "prune", None)):
            raise BaraError(f"{self.method.name} has no global gate to prune factors by; fix: prune a BaRA model")
        return self.method.prune(threshold)

    # -- adapters -------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the adapter into ``directory`` as ``bara train`` does: bara's config (the method, every option,
        the base model's name or absolute path, the labels) and every tensor the adapter adds or trains; the
        LoRA-family methods as a peft adapter (``peft.PeftModel.from_pretrained`` loads it) with bara's config in
        bara_config.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        label_ids = self.classifier.label_ids
        meta = {"method": self.method.name, "method_config": self.method.config.to_dict(),
                "base_model": self.base_model_name, "base_kind": self.classifier.kind,
                "label_names": self.classifier.label_names,
                "label_token_ids": label_ids.tolist() if label_ids is not None else None,
                "bara_version": versions()["bara-peft"]}
        write_adapter(self.classifier, self.method, meta, directory)


def per_input(logits: torch.Tensor, n: int) -> torch.Tensor:
    """Logits of ``n`` inputs from a pass over K copies of them (``[K * n, ...]``): the log of the mixture
    (1/K) sum_k softmax(logits_k); the logits themselves when K = 1."""
    if logits.shape[0] == n:
        return logits
    k = logits.shape[0] // n
    log_probs = F.log_softmax(logits.float().view(k, n, *logits.shape[1:]), -1)
    return torch.logsumexp(log_probs, 0) - math.log(k)


def get_model(model: nn.Module, config: MethodConfig | str | None = None, *, label_tokens: list[int] | None = None,
              tokenizer=None) -> BaraModel:
    """Wrap a transformers ``model`` with a bara method, in place: the base is frozen, every module of
    ``config.target_modules`` (default: the architecture's usual attention projections) that is an ``nn.Linear`` or
    transformers' ``Conv1D`` gets the adapter, and a classification head is trained in full.

    ``model``: a sequence classifier (``AutoModelForSequenceClassification``) or a causal LM
    (``AutoModelForCausalLM``). ``config``: ``bara.BaraConfig(...)``, ``bara.BlobConfig(...)``, another method's
    config, or a method name (default BaRA). ``label_tokens``: a causal LM becomes a classifier over these token ids
    at the last position (the multiple-choice protocol: the prompt ends in "Answer:", the labels are " A", " B",
    ...); without them it stays a language model. The adapter is fp32 whatever the base's dtype (as peft does)."""
    method = method_of(config)
    kind = model_kind(model)
    if label_tokens is not None and kind != "causal":
        raise BaraError("label_tokens apply to a causal LM; fix: drop label_tokens for a sequence classifier")
    if label_tokens is not None and (len(label_tokens) < 2 or not all(isinstance(t, int) for t in label_tokens)):
        raise BaraError(f"label_tokens must be 2 or more token ids, got {label_tokens!r}; fix: pass e.g. "
                        "tokenizer.convert_tokens_to_ids(['ĠA', 'ĠB'])")
    if kind == "encoder":
        label_names = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    else:
        label_names = None if label_tokens is None else [str(t) for t in label_tokens]
    device = next(model.parameters()).device
    classifier = Classifier(LoadedModel(model, tokenizer, kind, base_model_name(model) or ""), label_names,
                            label_ids=label_tokens)
    for p in classifier.parameters():
        p.requires_grad_(False)
    method.wrap(classifier)
    classifier.to(device)  # the adapter where the base is; its dtype stays float32
    return BaraModel(classifier, method, base_model_name(model))


def from_pretrained(base_model: nn.Module | str | None, directory: str | Path, tokenizer=None) -> BaraModel:
    """The adapter saved in ``directory`` (by :meth:`BaraModel.save_pretrained` or ``bara train``) on
    ``base_model``: a transformers model (wrapped in place, as :func:`get_model`), a model name or folder, or None
    for the base the adapter records. Reads JSON and safetensors only."""
    directory = Path(directory)
    config_file = meta_file(directory)
    if not config_file.exists() or not has_weights(directory):
        raise BaraError(f"{directory} has no {config_file.name} + {ADAPTER_WEIGHTS}; fix: point at a folder written "
                        "by model.save_pretrained or 'bara train'")
    try:
        meta = json.loads(config_file.read_text())
        name, labels = meta["method"], meta["label_names"]
        options = trained_options(meta, name)
        if options is None:
            raise ValueError(f"no options recorded for method {name!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise BaraError(f"{config_file} is not a valid adapter config ({type(err).__name__}: {err}); fix: save the "
                        "adapter again") from None
    if base_model is None or isinstance(base_model, (str, Path)):
        loaded = load_model(str(base_model or meta.get("base_model") or ""), len(labels or ()) or 2)
        base_model, tokenizer = loaded.backbone, tokenizer or loaded.tokenizer
    label_tokens = meta.get("label_token_ids")
    if model_kind(base_model) == "causal" and labels is not None and label_tokens is None:
        from .heads import label_token_ids

        if tokenizer is None:
            raise BaraError(f"{directory} scores a causal LM on the letters of its {len(labels)} labels; fix: pass "
                            "tokenizer= (the base model's)")
        label_tokens = label_token_ids(tokenizer, len(labels))
    if model_kind(base_model) == "encoder" and labels is not None and base_model.config.num_labels != len(labels):
        raise BaraError(f"the adapter has {len(labels)} labels, the base model's head {base_model.config.num_labels}; "
                        f"fix: load the base with num_labels={len(labels)}")
    config = METHODS[name].config_class.from_dict(options)
    tensors = _checked_tensors(base_model, config, label_tokens, tokenizer, directory)
    model = get_model(base_model, config, label_tokens=label_tokens, tokenizer=tokenizer)
    model.method.load_adapter_state(model.classifier, tensors)
    if labels is not None:
        model.classifier.label_names = list(labels)  # the names the adapter was trained with
    return model.eval()


def _checked_tensors(base_model: nn.Module, config: MethodConfig, label_tokens, tokenizer, directory: Path
                     ) -> dict[str, torch.Tensor]:
    """The saved tensors, read once the adapter size the config implies is checked against them and the base model
    (:func:`bara.runs.check_adapter_size`, as ``bara eval``), on a copy of the base on the meta device: nothing is
    allocated before."""
    with torch.device("meta"):
        shadow = type(base_model)(base_model.config)
    dry = get_model(shadow, config, label_tokens=label_tokens, tokenizer=tokenizer)
    tensors = read_adapter(directory, dry.classifier, dry.method)
    check_adapter_size({n: p for n, p in dry.classifier.named_parameters() if p.requires_grad},
                       sum(p.numel() for p in base_model.parameters()), tensors, directory)
    return tensors


class MethodSteps(TrainerCallback):
    """Tells the model how long training is, and runs the method's update after every optimiser step (HF Trainer
    calls ``on_optimizer_step`` after ``optimizer.step()``, before the gradients are zeroed)."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        try:
            num_train = len(self.trainer.train_dataset)
        except TypeError:
            raise BaraError("bara.Trainer needs a train_dataset with a length (the KL terms are scaled by the "
                            "dataset size); fix: pass a map-style dataset (datasets.Dataset or a list)") from None
        batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.trainer.model.start_training(state.max_steps, num_train, batch_size, state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.model.kl_step()


class Trainer(HfTrainer):
    """``transformers.Trainer`` for a model from :func:`get_model`: the optimiser gets the method's parameter groups
    (BaRA: the gate network at ``gate_lr``; sigma_A outside AdamW, stepped by the KL step) with the optimiser
    ``args`` name, and :meth:`BaraModel.kl_step` runs after every optimiser step. ``save_model`` and checkpoints
    write the adapter (:meth:`BaraModel.save_pretrained`), which ``train(resume_from_checkpoint=...)`` reads back."""

    def __init__(self, model: BaraModel | None = None, args=None, *positional, **kwargs):
        if not isinstance(model, BaraModel):
            raise BaraError(f"bara.Trainer trains a model from bara.get_model, got {type(model).__name__}; fix: "
                            "model = bara.get_model(hf_model, bara.BaraConfig())")
        super().__init__(model, args, *positional, **kwargs)
        self.add_callback(MethodSteps(self))
        own = type(model.method).default_lr.get(model.classifier.kind)
        if self.args.learning_rate == TrainingArguments.learning_rate and own and own != self.args.learning_rate:
            # transformers' default is a full fine-tuning rate: an adapter trained at it is far from converged.
            warnings.warn(f"bara.Trainer: learning_rate is transformers' default {self.args.learning_rate:g}, but "
                          f"{model.method.name}'s own rate for this kind of model is {own:g} (the benchmark's "
                          f"validation choice, as 'bara train' uses without --lr); fix: TrainingArguments("
                          f"learning_rate={own:g}), or any other rate you chose", UserWarning, stacklevel=2)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            bara_model = self.model
            groups = bara_model.method.param_groups(bara_model.classifier, self.args.learning_rate,
                                                    self.args.weight_decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, bara_model)
            self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # The adapter that _save wrote (HF Trainer looks for the whole model's or a PeftModel's weights).
        folder = Path(resume_from_checkpoint)
        self.model.method.load_adapter_state(self.model.classifier,
                                             read_adapter(folder, self.model.classifier, self.model.method))

    def _load_best_model(self) -> None:
        # load_best_model_at_end: the adapter _save wrote into the best checkpoint, as a resume reads it.
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # The adapter, not the frozen base's weights (HF Trainer would save the whole state dict).
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            self.model.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
