"""Data: the Pang & Lee parser, seeded stratified splits, local files, and named errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest

from lora_bench.config import RunConfig
from lora_bench.run.data import DataError, load_examples, prepare_splits, read_pang_lee_csv, split_stratified
from lora_bench.run.models import tiny_tokenizer


def test_pang_lee_parser_handles_bom_multiline_and_labels(tmp_path):
    path = tmp_path / "polarity.csv"
    path.write_bytes('\ufeff"1","a ""quoted"" line\nspanning two lines . "\n"-1","dull . "\n'.encode())
    examples = read_pang_lee_csv(path)
    assert examples.labels == [1, 0]
    assert examples.texts[0].startswith('a "quoted" line\nspanning')


def test_pang_lee_parser_rejects_bad_rows(tmp_path):
    path = tmp_path / "polarity.csv"
    path.write_text('"0","neither label"\n', encoding="utf-8")
    with pytest.raises(DataError, match="row 1"):
        read_pang_lee_csv(path)


def test_split_is_seeded_stratified_and_disjoint():
    labels = [0] * 300 + [1] * 100  # sorted by class, as real corpora often are
    fractions = {"train": 0.7, "validation": 0.1, "test": 0.2}
    a = split_stratified(labels, fractions, seed=3)
    b = split_stratified(labels, fractions, seed=3)
    c = split_stratified(labels, fractions, seed=4)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert not np.array_equal(a["train"], c["train"])
    everything = np.concatenate(list(a.values()))
    assert len(everything) == len(set(everything.tolist())) == 400
    for split, idx in a.items():
        positives = np.asarray(labels)[idx].mean()
        assert positives == pytest.approx(0.25, abs=0.02), split


def _local(path, **data):
    return RunConfig.from_dict({"data": {"source": "local", "name": str(path), **data}}).data


def test_local_csv_loads_and_caches_tokenized(sentiment_csv, tmp_path):
    spec = _local(sentiment_csv, cache_dir=str(tmp_path / "cache"), max_length=16)
    first, info = prepare_splits(spec, tiny_tokenizer(), "tiny")
    again, info_again = prepare_splits(spec, tiny_tokenizer(), "tiny")
    assert not info["cached"] and info_again["cached"]
    assert sum(info["sizes"].values()) == 96
    assert max(len(ids) for ids in first["train"]["input_ids"]) <= 16
    assert first["test"]["labels"] == again["test"]["labels"]


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("", ".csv", "is empty"),
        ("words,label\nhi,1\nho,0\n", ".csv", r"no column 'text'.*\['words', 'label'\]"),
        ("text,label\na,1\nb,1\n", ".csv", "a single label value"),
        ("text,label\na,1\nb,\n", ".csv", "empty label"),
        ("text,label\n,1\nb,0\n", ".csv", "empty or non-text"),
        ("text\tlabel\n", ".xlsx", "unsupported file type"),
    ],
)
def test_bad_local_files_get_named_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        load_examples(_local(path))
    assert str(path) in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(_local(tmp_path / "absent.csv"))


def test_labels_minus_one_and_one_map_to_zero_and_one(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": -1}\n')
    assert load_examples(_local(path)).labels == [1, 0]
