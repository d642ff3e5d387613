"""Shared fixtures: a tiny, learnable local sentiment file and a tiny-model run config (CPU, seconds)."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, settings

# Property tests (tests/test_bad_input.py): few examples by default so `make test` stays fast; set
# HYPOTHESIS_PROFILE=thorough for a long, randomised search. The fast profile is derandomised so a CI
# run is reproducible: it tests the same examples every time and cannot pass or fail by chance.
# No deadline: the shared CI machine's timing varies.
settings.register_profile("fast", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

POSITIVE = ["good", "great", "fine", "superb", "lovely", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak"]


def write_sentiment_csv(path, n_per_class: int = 48, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = []
    for label, words in ((1, POSITIVE), (0, NEGATIVE)):
        for _ in range(n_per_class):
            filler = rng.choice(["the film was", "a movie so", "it felt", "plot is"])
            rows.append((f"{filler} {rng.choice(words)} and {rng.choice(words)}", label))
    rng.shuffle(rows)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("text,label\n")
        for text, label in rows:
            handle.write(f'"{text}",{label}\n')


@pytest.fixture
def sentiment_csv(tmp_path):
    path = tmp_path / "sentiment.csv"
    write_sentiment_csv(path)
    return path


@pytest.fixture
def tiny_run(sentiment_csv, tmp_path):
    """A run config dict: random tiny BERT on the local file, one short epoch."""
    return {
        "seed": 0,
        "model": {"source": "random", "name": "tiny-bert"},
        "data": {"source": "local", "name": str(sentiment_csv), "max_length": 32,
                 "cache_dir": str(tmp_path / "cache")},
        "method": {"name": "lora", "lora": {"rank": 4, "alpha": 8}},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1.0e-2, "device": "cpu", "threads": 1, "progress": "never"},
    }


TOPICS = {
    "sport": ["match", "goal", "team", "score", "coach"],
    "science": ["atom", "cell", "theory", "lab", "gene"],
    "cooking": ["oven", "salt", "recipe", "pasta", "sauce"],
}


def write_topics_csv(path, n_per_class: int = 30, seed: int = 0, sep: str = ",") -> None:
    """A 3-class file with string labels, sorted by class as real exports often are (no shuffling)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"sentence{sep}topic\n")
        for topic, words in TOPICS.items():
            for _ in range(n_per_class):
                handle.write(f'"the {rng.choice(words)} and {rng.choice(words)} today"{sep}{topic}\n')


@pytest.fixture
def topics_csv(tmp_path):
    path = tmp_path / "topics.csv"
    write_topics_csv(path)
    return path


@pytest.fixture(scope="session")
def mini_reference(tmp_path_factory):
    """The smaller .test study (tests/reliability_helpers.py) run once, uninterrupted, with --cores 2, to its tables."""
    from reliability_helpers import TABLE_TARGETS, mini_study, snakemake

    workdir = tmp_path_factory.mktemp("reference")
    mini_study(workdir)
    snakemake(workdir, "--cores", "2", *TABLE_TARGETS)
    return workdir
