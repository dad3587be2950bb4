"""bara: Bayesian parameter-efficient fine-tuning (BaRA, BLoB and the LoRA baselines) on transformers models.

    import bara
    model = bara.get_model(hf_model, bara.BaraConfig(r=8))
    bara.Trainer(model=model, args=training_args, train_dataset=data).train()
    probs = model.predict(**inputs, samples=10)

See :mod:`bara.api`. The names below load on first use, so the ``bara`` command does not import transformers'
Trainer to print its help.
"""

from importlib import import_module, metadata

try:
    __version__ = metadata.version("bara-peft")
except metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0.0.0+unknown"

_EXPORTS = {
    "BaraConfig": "bara.methods.bara", "BlobConfig": "bara.methods.blob", "BaraError": "bara.errors",
    "get_method": "bara.methods", "BaraModel": "bara.api", "Trainer": "bara.api", "get_model": "bara.api",
    "from_pretrained": "bara.api",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bara' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
