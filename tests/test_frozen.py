"""Frozen work computed once (``train.frozen_prefix``, lora_bench/run/frozen.py): the cached path gives the losses and
metrics of the uncached one with the frozen prefix in eval mode, on every architecture with a known split; the
cache is shared across seeds' learning rates and variants with the same cut, and invalidated when the model,
the data or the cut changes; anything without a known split falls back, with a note, to what it did before."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import write_sentiment_csv

from lora_bench.config import ConfigError, RunConfig
from lora_bench.faults import ENV, InjectedFault
from lora_bench.run.frozen import SPLITS, FrozenPrefixModel, attach_frozen_prefix, cache_key, find_cut
from lora_bench.run.methods import prepare_model
from lora_bench.run.tasks import ClassificationTask
from lora_bench.run.train import run_training

ATOL = 1e-5
LAST_BLOCK_LORA = {"name": "lora", "lora": {"rank": 4, "alpha": 8, "layers": [1], "dropout": 0.1}}


def _run(tiny_run: dict, mode: str, method: dict | None = None, **train) -> tuple:
    cfg = copy.deepcopy(tiny_run)
    cfg["train"].update(frozen_prefix=mode, **train)
    if method is not None:
        cfg["method"] = method
    result = run_training(RunConfig.from_dict(cfg))
    return result, result.method_info["frozen_prefix"]


def _assert_same_numbers(a, b, atol: float = ATOL) -> None:
    """Every per-epoch loss and metric, the selected epoch's numbers and the training-loss curve agree."""
    assert len(a.metrics["epochs"]) == len(b.metrics["epochs"])
    for x, y in zip(a.metrics["epochs"] + [a.metrics["final"]], b.metrics["epochs"] + [b.metrics["final"]]):
        assert x.keys() == y.keys()
        for key in x:
            assert math.isclose(x[key], y[key], abs_tol=atol), (key, x[key], y[key])
    assert a.metrics["selected_epoch"] == b.metrics["selected_epoch"]
    assert [s for s, _ in a.metrics["train_loss_curve"]] == [s for s, _ in b.metrics["train_loss_curve"]]
    for (_, x), (_, y) in zip(a.metrics["train_loss_curve"], b.metrics["train_loss_curve"]):
        assert math.isclose(x, y, abs_tol=atol)


def test_last_layers_cached_equals_uncached_in_eval_mode_and_repeats(tiny_run):
    tiny_run["train"]["lr"] = 5.0e-2  # enough to move the head: the epochs differ
    uncached, eval_info = _run(tiny_run, "eval", {"name": "last_layers"})
    missed, miss_info = _run(tiny_run, "cache", {"name": "last_layers"})
    hit, hit_info = _run(tiny_run, "cache", {"name": "last_layers"})
    plain, plain_info = _run(tiny_run, "train", {"name": "last_layers"})
    _assert_same_numbers(missed, uncached)
    # Same seed, same numbers, whether the features were computed or read back (CPU: bit for bit).
    assert hit.metrics == missed.metrics
    assert (eval_info["applied"], miss_info["applied"], plain_info) == ("eval", "cache", {"mode": "train",
                                                                                          "applied": "train"})
    assert (miss_info["cache"], hit_info["cache"]) == ("miss", "hit")
    # tiny-bert has 2 blocks; nothing in them trains, so the cut is above the last one and only [CLS] is kept.
    assert (miss_info["cut"], miss_info["blocks"], miss_info["stored"]) == (2, 2, "first_token")
    assert miss_info["eval_mode"] == ["bert.embeddings", "bert.encoder.layer.0-1"]
    assert miss_info["cache_examples"] == sum(missed.data_info["sizes"].values())
    assert Path(miss_info["cache_file"]).is_file() and miss_info["cache_s"] >= 0
    assert missed.params == uncached.params == plain.params  # the same parameters train
    assert not missed.notes and not hit.notes


def test_lora_on_the_last_block_caches_the_blocks_below_with_grouped_batches_and_one_test_pass(tiny_run):
    tiny_run["train"].update(epochs=3, lr=5.0e-2, length_grouping=True, test_every_epoch=False)
    uncached, _ = _run(tiny_run, "eval", LAST_BLOCK_LORA)
    cached, info = _run(tiny_run, "cache", LAST_BLOCK_LORA)
    plain, _ = _run(tiny_run, "train", LAST_BLOCK_LORA)
    _assert_same_numbers(cached, uncached)
    assert (info["applied"], info["cut"], info["stored"]) == ("cache", 1, "sequence")
    assert cached.params == plain.params
    assert cached.method_info["lora_modules"] == plain.method_info["lora_modules"]
    # Test was evaluated once, at the selected epoch, with that epoch's weights restored (BestEpoch).
    assert [e["epoch"] for e in cached.metrics["epochs"] if "test_accuracy" in e] == [cached.metrics["selected_epoch"]]


def _arch_setup(name: str, method: dict, tmp_path):
    csv = tmp_path / "s.csv"
    write_sentiment_csv(csv, n_per_class=12)
    cfg = RunConfig.from_dict({"model": {"source": "random", "name": name},
                               "data": {"source": "local", "name": str(csv), "max_length": 24,
                                        "cache_dir": str(tmp_path / "cache")},
                               "method": method, "train": {"device": "cpu", "frozen_prefix": "cache"}})
    torch.manual_seed(0)
    task = ClassificationTask(cfg, torch.device("cpu"))
    loaded, splits, _ = task.load()
    prepare_model(loaded.model, cfg.method, "cpu")
    return cfg, task, loaded.model, splits


@pytest.mark.parametrize("method", [{"name": "last_layers"}, LAST_BLOCK_LORA], ids=["last_layers", "lora-last"])
@pytest.mark.parametrize("name", ["tiny-bert", "tiny-roberta", "tiny-distilbert", "tiny-electra", "tiny-mpnet"])
def test_every_known_split_gives_the_eval_mode_logits_in_train_and_eval_mode(name, method, tmp_path):
    cfg, task, model, splits = _arch_setup(name, method, tmp_path)
    cached, info = attach_frozen_prefix(model, cfg, task, splits, torch.device("cpu"))
    assert info["applied"] == "cache" and isinstance(cached, FrozenPrefixModel)
    uncached = FrozenPrefixModel(model, SPLITS[model.config.model_type], info["cut"])
    batch = task.collate([splits["train"][i] for i in range(8)])
    inputs = {k: v for k, v in batch.items() if k in task.accepted}
    for mode in (False, True):  # eval, then training mode: dropout above the cut must draw the same numbers
        cached.train(mode), uncached.train(mode)
        torch.manual_seed(1)
        want = uncached(**inputs).logits
        torch.manual_seed(1)
        got = cached(**inputs).logits
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # The wrapper restores the model it lends its blocks to: the plain model still runs end to end.
    assert model(**inputs).logits.shape == want.shape


def _key(tiny_run, tmp_path, method=None, **changes) -> str:
    cfg = copy.deepcopy(tiny_run)
    for section, values in changes.items():
        cfg[section].update(values)
    return _run(cfg, "cache", method or {"name": "last_layers"})[1]["cache_key"]


def test_the_cache_is_shared_across_learning_rates_and_variants_and_invalidated_by_model_data_and_cut(
        tiny_run, tmp_path):
    base = _key(tiny_run, tmp_path)
    # Shared: another learning rate, schedule or epoch count; another LoRA setting with the same cut.
    assert _key(tiny_run, tmp_path, train={"lr": 3.0e-2, "epochs": 1, "schedule": "constant"}) == base
    last_block = _key(tiny_run, tmp_path, LAST_BLOCK_LORA)
    other_rank = {**LAST_BLOCK_LORA, "lora": {**LAST_BLOCK_LORA["lora"], "rank": 2, "targets": ["query", "key"]}}
    assert _key(tiny_run, tmp_path, other_rank) == last_block
    # Invalidated: the cut, max_length, the data, the model (random weights come from the seed; another config).
    assert last_block != base
    other_csv = tmp_path / "other.csv"
    write_sentiment_csv(other_csv, seed=1)
    changed = [_key(tiny_run, tmp_path, data={"max_length": 16}),
               _key(tiny_run, tmp_path, data={"name": str(other_csv)}),
               _key({**tiny_run, "seed": 1}, tmp_path),
               _key(tiny_run, tmp_path, model={"name": "tiny-roberta"})]
    assert len({base, last_block, *changed}) == 2 + len(changed)


def test_the_key_reads_the_frozen_weights_only(tiny_run, tmp_path):
    cfg, task, model, splits = _arch_setup("tiny-bert", LAST_BLOCK_LORA, tmp_path)
    split = SPLITS["bert"]
    cut = find_cut(model, split)
    rows = [bytes([i]) for i in range(4)]

    def key():
        return cache_key(cfg, model, split, cut, rows, "sequence", torch.device("cpu"))

    before = key()
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.query.lora.A.add_(1.0)  # trains: a seed's init
        model.bert.encoder.layer[1].output.dense.weight.add_(1.0)  # above the cut
    assert key() == before
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.add_(1e-3)  # below the cut
    assert key() != before
    assert cache_key(cfg, model, split, cut, rows[:3], "sequence", torch.device("cpu")) != key()


@pytest.mark.parametrize("name", ["tiny-albert", "tiny-deberta-v2"])
def test_an_architecture_without_a_known_split_falls_back_with_a_note(tiny_run, name):
    tiny_run["model"]["name"] = name
    cached, info = _run(tiny_run, "cache", {"name": "last_layers"})
    plain, _ = _run(tiny_run, "train", {"name": "last_layers"})
    assert info["applied"] == "train" and "no known block split" in info["notes"][0]
    assert cached.notes == info["notes"]
    assert cached.metrics == plain.metrics and cached.params == plain.params


def test_full_finetuning_has_no_frozen_prefix(tiny_run):
    full, info = _run(tiny_run, "cache", {"name": "full"}, epochs=1)
    plain, _ = _run(tiny_run, "train", {"name": "full"}, epochs=1)
    assert info["applied"] == "train" and "the embeddings train" in info["notes"][0]
    assert full.metrics == plain.metrics


def test_an_unreadable_cache_file_is_computed_again(tiny_run):
    first, info = _run(tiny_run, "cache", {"name": "last_layers"})
    Path(info["cache_file"]).write_bytes(b"not a tensor file")
    again, again_info = _run(tiny_run, "cache", {"name": "last_layers"})
    assert again_info["cache"] == "miss" and "unreadable" in again.notes[0]
    assert again.metrics == first.metrics
    assert _run(tiny_run, "cache", {"name": "last_layers"})[1]["cache"] == "hit"


def test_a_killed_cached_run_resumes_with_the_metrics_of_an_uninterrupted_one(tiny_run, tmp_path, monkeypatch):
    tiny_run["train"].update(epochs=3, checkpoint="epoch", frozen_prefix="cache")
    tiny_run["method"] = LAST_BLOCK_LORA
    cfg = RunConfig.from_dict(tiny_run)
    whole = run_training(cfg)
    path = tmp_path / ".ckpt.pt"
    monkeypatch.setenv(ENV, "checkpoint_saved:error@#epoch1")
    with pytest.raises(InjectedFault):
        run_training(cfg, path)
    monkeypatch.delenv(ENV)
    resumed = run_training(cfg, path)
    assert "resumed from the checkpoint saved after epoch 1" in resumed.notes
    assert resumed.metrics == whole.metrics


def test_frozen_prefix_is_validated_and_left_out_of_the_resolved_config_at_its_default():
    assert "frozen_prefix" not in RunConfig.from_dict({}).to_dict()["train"]
    assert RunConfig.from_dict({"train": {"frozen_prefix": "cache"}}).to_dict()["train"]["frozen_prefix"] == "cache"
    with pytest.raises(ConfigError, match="frozen_prefix"):
        RunConfig.from_dict({"train": {"frozen_prefix": "yes"}})
