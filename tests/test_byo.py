"""Bring your own data and model: any label set and columns, RoBERTa/DeBERTa-v2/ELECTRA/ALBERT/MPNet through
every method and coverage, explicit module patterns, and the named errors raised before any training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lora_bench.adapters.lora import LoRASpec, apply_lora, architecture_of, count_parameters, find_targets
from lora_bench.cli import main
from lora_bench.config import ConfigError, ModelConfig, RunConfig
from lora_bench.run.data import DataError, load_examples, prepare_splits, split_stratified
from lora_bench.run.methods import prepare_model
from lora_bench.run.models import load_model, load_tokenizer, tiny_tokenizer
from lora_bench.run.tasks.classification import accepted_inputs
from lora_bench.run.train import run_training

ARCHITECTURES = ["tiny-roberta", "tiny-deberta-v2", "tiny-electra", "tiny-albert", "tiny-mpnet"]
COVERAGE = {"query+value": ["query", "value"], "all": ["query", "key", "value", "projection", "mlp"]}
# hidden 32, FFN 64, 2 blocks (ALBERT: one shared block), 3 labels.
HEAD_PARAMS = {  # every linear layer of each head: what last_layers trains
    "tiny-roberta": (32 * 32 + 32) + (32 * 3 + 3),
    "tiny-deberta-v2": (32 * 32 + 32) + (32 * 3 + 3),
    "tiny-electra": (32 * 32 + 32) + (32 * 3 + 3),
    "tiny-albert": (32 * 32 + 32) + (32 * 3 + 3),
    "tiny-mpnet": (32 * 32 + 32) + (32 * 3 + 3),
}
CLASSIFIER_PARAMS = 32 * 3 + 3
# What lora's train_classifier trains by default (method.head: peft): the whole module peft's SEQ_CLS trains, so
# RoBERTa, ELECTRA and MPNet's classifier.dense + classifier.out_proj; DeBERTa-v2 and ALBERT have one classifier
# layer (their poolers stay frozen). Was CLASSIFIER_PARAMS for all five (the output layer only).
LORA_HEAD_PARAMS = {
    "tiny-roberta": HEAD_PARAMS["tiny-roberta"],
    "tiny-deberta-v2": CLASSIFIER_PARAMS,
    "tiny-electra": HEAD_PARAMS["tiny-electra"],
    "tiny-albert": CLASSIFIER_PARAMS,
    "tiny-mpnet": HEAD_PARAMS["tiny-mpnet"],
}
RANK = 4
LORA_PER_BLOCK = {
    "query+value": 2 * RANK * (32 + 32),
    "all": 4 * RANK * (32 + 32) + 2 * RANK * (32 + 64),
}


def _model(name, num_labels=3):
    torch.manual_seed(0)
    return load_model(ModelConfig("random", name, "float32"), num_labels).model.eval()


def _inputs():
    ids = torch.randint(5, 80, (3, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _method(name, targets, **extra):
    return RunConfig.from_dict({"method": {"name": name, "lora": {"rank": RANK, "alpha": 8, "targets": targets},
                                           **extra}}).method


@pytest.mark.parametrize("coverage", sorted(COVERAGE))
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_lora_on_each_architecture_keeps_outputs_and_counts(name, coverage):
    model = _model(name)
    inputs = _inputs()
    before = model(**inputs).logits
    info = prepare_model(model, _method("lora", COVERAGE[coverage]))
    torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)
    blocks = 1 if name == "tiny-albert" else 2  # ALBERT's one block of weights serves every layer
    assert count_parameters(model)[0] == blocks * LORA_PER_BLOCK[coverage] + LORA_HEAD_PARAMS[name]
    assert len(info["lora_modules"]) == blocks * len(COVERAGE[coverage]) + (blocks if coverage == "all" else 0)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_last_layers_trains_the_whole_head_and_full_trains_everything(name):
    model = _model(name)
    info = prepare_model(model, _method("last_layers", ["query", "value"]))
    assert count_parameters(model)[0] == HEAD_PARAMS[name]
    assert len(info["fully_trained"]) == 2
    full = _model(name)
    prepare_model(full, _method("full", ["query", "value"]))
    trainable, total = count_parameters(full)
    assert trainable == total


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_short_run_on_three_string_classes(name, topics_csv, tmp_path):
    result = run_training(RunConfig.from_dict({
        "model": {"source": "random", "name": name},
        "data": {"source": "local", "name": str(topics_csv), "text_column": "sentence", "label_column": "topic",
                 "max_length": 24, "cache_dir": str(tmp_path / "cache")},
        "method": {"name": "lora", "lora": {"rank": 2, "alpha": 4}},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "threads": 1, "progress": "never"},
    }))
    assert result.model_info["num_labels"] == 3
    assert result.data_info["label_names"] == ["cooking", "science", "sport"]
    final = result.metrics["final"]
    assert {"test_accuracy", "test_macro_f1", "validation_macro_f1", "train_macro_f1"} <= set(final)
    assert 0.0 <= final["test_macro_f1"] <= 1.0


@pytest.mark.parametrize("method", ["lora", "last_layers", "full"])
def test_each_method_runs_with_three_classes_and_records_counts(method, topics_csv, tmp_path):
    run = {
        "model": {"source": "random", "name": "tiny-roberta"},
        "data": {"source": "local", "name": str(topics_csv), "text_column": "sentence", "label_column": "topic",
                 "max_length": 24, "cache_dir": str(tmp_path / "cache")},
        "method": {"name": method},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "threads": 1, "progress": "never"},
    }
    config = tmp_path / "run.json"
    config.write_text(json.dumps(run))
    out = tmp_path / "record.json"
    assert main(["train", "--config", str(config), "--out", str(out), "--strict"]) == 0
    record = json.loads(out.read_text())
    data = record["data"]
    assert data["label_names"] == ["cooking", "science", "sport"]
    # 30 per class, split 0.7 / 0.1 / 0.2 within each class.
    assert data["class_counts"] == {"train": [21, 21, 21], "validation": [3, 3, 3], "test": [6, 6, 6]}
    assert record["model"]["num_labels"] == 3


def test_sorted_file_is_split_shuffled_and_stratified(topics_csv, tmp_path):
    spec = RunConfig.from_dict({"data": {"source": "local", "name": str(topics_csv), "text_column": "sentence",
                                         "label_column": "topic", "cache_dir": str(tmp_path)}}).data
    splits, info = prepare_splits(spec, tiny_tokenizer(), "tiny")
    train_labels = splits["train"]["labels"]
    assert sorted(train_labels) != train_labels  # not in file order
    assert info["class_counts"]["test"] == [6, 6, 6]


def _local(path, **data):
    return RunConfig.from_dict({"data": {"source": "local", "name": str(path), **data}}).data


def test_label_order_given_in_config_and_unknown_label_named(topics_csv):
    examples = load_examples(_local(topics_csv, text_column="sentence", label_column="topic",
                                    labels=["sport", "science", "cooking"]))
    assert examples.label_names == ["sport", "science", "cooking"]
    assert examples.labels[0] == 0 and examples.labels[-1] == 2
    with pytest.raises(DataError, match=r"label value\(s\) \['sport'\] are not in data.labels"):
        load_examples(_local(topics_csv, text_column="sentence", label_column="topic",
                             labels=["science", "cooking"]))


def test_many_integer_classes_sort_numerically(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 12}) + "\n" for i in range(120)))
    examples = load_examples(_local(path))
    assert examples.label_names == [str(i) for i in range(12)]  # 10 after 9, not after 1
    assert examples.labels[:12] == list(range(12))


def test_split_column_and_text_pairs(tmp_path):
    path = tmp_path / "pairs.tsv"
    rows = ["premise\thypothesis\tlabel\tsplit"]
    for i in range(36):
        split = ["train"] * 8 + ["validation", "test"]
        rows.append(f"a cat sat {i}\tit sat {i % 3}\t{['yes', 'no', 'maybe'][i % 3]}\t{split[i % 10]}")
    path.write_text("\n".join(rows) + "\n")
    spec = _local(path, text_column="premise", text_pair_column="hypothesis", split_column="split",
                  cache_dir=str(tmp_path / "cache"), max_length=32)
    splits, info = prepare_splits(spec, tiny_tokenizer(), "tiny")
    assert info["sizes"] == {"train": 30, "validation": 3, "test": 3}
    assert info["label_names"] == ["maybe", "no", "yes"]
    assert 1 in splits["train"][0]["token_type_ids"]  # the second segment is marked
    # RoBERTa has one segment embedding: the pair's segment ids must not reach it; BERT takes them.
    assert "token_type_ids" not in accepted_inputs(_model("tiny-roberta"))
    assert "token_type_ids" in accepted_inputs(_model("tiny-bert"))
    assert "token_type_ids" not in accepted_inputs(_model("tiny-distilbert"))


def test_explicit_patterns_replace_the_name_map():
    model = _model("tiny-electra")
    method_raw = {
        "name": "lora", "head_patterns": [r"classifier\..*"],
        "lora": {"rank": RANK, "target_patterns": [r".*layer\.(?P<layer>\d+)\.attention\.self\.key"], "layers": [1]},
    }
    method = RunConfig.from_dict({"method": method_raw}).method
    info = prepare_model(model, method)
    assert info["lora_modules"] == ["electra.encoder.layer.1.attention.self.key"]
    # Named head layers all train by default (method.head: peft); last_linear trains the last, the output layer.
    assert info["fully_trained"] == ["classifier.dense", "classifier.out_proj"]
    last = RunConfig.from_dict({"method": {**method_raw, "head": "last_linear"}}).method
    assert prepare_model(_model("tiny-electra"), last)["fully_trained"] == ["classifier.out_proj"]


class _Unknown(torch.nn.Module):
    class config:  # noqa: N801 - mimics a Hugging Face config object
        model_type = "mystery"

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
        self.score_head = torch.nn.Linear(4, 3)


def test_unknown_architecture_error_lists_linears_and_shows_patterns():
    with pytest.raises(ValueError) as err:
        architecture_of(_Unknown())
    message = str(err.value)
    assert "blocks.0, blocks.1, score_head" in message
    assert "target_patterns:" in message and "head_patterns:" in message
    model = _Unknown()
    method = RunConfig.from_dict({"method": {"name": "last_layers", "head_patterns": ["score_head"]}}).method
    assert prepare_model(model, method)["fully_trained"] == ["score_head"]
    lora = RunConfig.from_dict({"method": {"name": "lora", "head_patterns": ["score_head"],
                                           "lora": {"target_patterns": [r"blocks\.\d+"]}}}).method
    assert prepare_model(_Unknown(), lora)["lora_modules"] == ["blocks.0", "blocks.1"]


def test_albert_refuses_layer_restriction():
    with pytest.raises(ValueError, match="shares one set of block weights"):
        find_targets(_model("tiny-albert"), LoRASpec(layers=(0,)))


def test_patterns_without_layer_group_refuse_layers():
    with pytest.raises(ValueError, match=r"\(\?P<layer>"):
        apply_lora(_model("tiny-roberta"), LoRASpec(patterns=(r".*query",), layers=(0,)))


def test_bad_pattern_is_a_config_error():
    with pytest.raises(ConfigError, match="method.head_patterns"):
        RunConfig.from_dict({"method": {"head_patterns": ["classifier("]}})


# --- errors before any training ---------------------------------------------------------------------------

def test_missing_local_model_folder(tmp_path):
    with pytest.raises(ConfigError, match=f"no such folder {tmp_path / 'absent'}"):
        load_tokenizer(ModelConfig("local", str(tmp_path / "absent"), "float32"))


def test_hub_source_with_a_missing_path_says_no_such_folder(tmp_path):
    with pytest.raises(ConfigError, match="no such folder") as err:
        load_model(ModelConfig("hub", str(tmp_path / "models" / "mine"), "float32"), 2)
    assert "repo id" not in str(err.value).lower()
    with pytest.raises(ConfigError, match="no such folder"):
        load_tokenizer(ModelConfig("hub", "./not/here", "float32"))


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="not a Hugging Face model folder.*config.json"):
        load_tokenizer(ModelConfig("local", str(tmp_path), "float32"))


@pytest.mark.parametrize("key", ["text_column", "label_column", "text_pair_column", "split_column"])
def test_missing_column_lists_the_columns(topics_csv, key):
    data = {"text_column": "sentence", "label_column": "topic", key: "nope"}
    with pytest.raises(DataError, match=rf"no column 'nope' \(data.{key}\); the columns are \['sentence', 'topic'\]"):
        load_examples(_local(topics_csv, **data))


def test_class_too_small_to_split_is_named():
    labels = [0] * 50 + [1] * 50 + [2] * 3
    with pytest.raises(DataError, match=r"class 'rare' has 3 example\(s\).*at least \d+"):
        split_stratified(labels, {"train": 0.7, "validation": 0.1, "test": 0.2}, 0, ["a", "b", "rare"])


def test_empty_text_is_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"fine",a\n"  ",b\n')
    with pytest.raises(DataError, match=r"empty or non-text 'text' \(data.text_column\), first at row 1"):
        load_examples(_local(path))


def test_max_length_longer_than_positions_fails_before_training(topics_csv, tmp_path):
    cfg = RunConfig.from_dict({
        "model": {"source": "random", "name": "tiny-roberta"},
        "data": {"source": "local", "name": str(topics_csv), "text_column": "sentence", "label_column": "topic",
                 "max_length": 256, "cache_dir": str(tmp_path)},
        "train": {"device": "cpu"},
    })
    with pytest.raises(ConfigError, match=r"data.max_length 256 .* \(129 positions.*data.max_length <= 129"):
        run_training(cfg)


def test_split_fractions_keep_every_class_everywhere():
    labels = np.repeat(np.arange(40), 10).tolist()  # 40 classes of 10, sorted
    parts = split_stratified(labels, {"train": 0.7, "validation": 0.1, "test": 0.2}, 0)
    for idx in parts.values():
        assert len(set(np.asarray(labels)[idx].tolist())) == 40


def test_readme_example_study_and_pattern_snippet_validate():
    from pathlib import Path

    from lora_bench.config import parse_yaml
    from lora_bench.study import resolve_base_from, study_from_dict

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme.split("## Run the study on your own data and model")[1].split("\n## ")[0]
    blocks = [b.split("```")[0] for b in section.split("```yaml\n")[1:]]
    study = study_from_dict(parse_yaml(blocks[0]), "README.md")
    assert study.run_config("methods", "lora", 0).data.label_column == "queue"
    # The base_from example, as if it sat beside config/config.yaml.
    more = study_from_dict(resolve_base_from(parse_yaml(blocks[1]), root / "config", "README.md"), "README.md")
    run = more.run_config("dropout", "p0.1", 0)
    assert run.train.epochs == 2 and run.method.lora.dropout == 0.1 and run.model.name == "minilm-l6"
    snippet = RunConfig.from_dict(parse_yaml(blocks[2]), "README.md").method
    assert snippet.lora.target_patterns and snippet.head_patterns


def test_bert_pair_run_passes_segment_ids(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("a,b,label\n" + "".join(f"cat {i},sat {i % 2},{i % 2}\n" for i in range(40)))
    result = run_training(RunConfig.from_dict({
        "model": {"source": "random", "name": "tiny-bert"},
        "data": {"source": "local", "name": str(path), "text_column": "a", "text_pair_column": "b",
                 "max_length": 16, "cache_dir": str(tmp_path / "cache")},
        "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "threads": 1, "progress": "never"},
    }))
    assert result.data_info["label_names"] == ["0", "1"]
