"""Collection: records -> tidy tables with the documented columns; failed runs become rows."""

from __future__ import annotations

import json

import pytest
import torch

from lora_bench.analysis.tables import collect, write_tables
from lora_bench.cli import main


@pytest.fixture
def two_records(tiny_run, tmp_path):
    records = tmp_path / "runs"
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_run))
    labels = {"family": "methods", "family_kind": "methods", "variant": "lora", "seed": 0, "is_baseline": True}
    assert main(["train", "--config", str(config), "--label", json.dumps(labels), "--out",
                 str(records / "ok.json")]) == 0
    tiny_run["model"]["name"] = "missing-model"
    config.write_text(json.dumps(tiny_run))
    labels.update(variant="broken", is_baseline=False)
    assert main(["train", "--config", str(config), "--label", json.dumps(labels), "--out",
                 str(records / "failed.json")]) == 0
    return records


def test_collect_documented_columns_and_failed_rows(two_records, tmp_path):
    runs, metrics = collect(sorted(two_records.glob("*.json")))
    assert sorted(runs["status"]) == ["failed", "ok"]
    failed = runs[runs["status"] == "failed"].iloc[0]
    assert "missing-model" in failed["error"] and failed["run_id"] == "methods/broken/seed0"
    for column in ("run_id", "family", "family_kind", "variant", "seed", "is_baseline", "status", "error", "method",
                   "trainable_params", "total_params", "wall_time_s", "device", "cpu_capability", "cpu_id", "git_sha",
                   "cfg.method.lora.rank", "cfg.method.lora.targets", "versions.torch"):
        assert column in runs.columns, column
    assert runs.loc[runs["status"] == "ok", "cfg.method.lora.targets"].iloc[0] == "query+value"
    assert runs.loc[runs["status"] == "ok", "cpu_capability"].iloc[0] == torch.backends.cpu.get_cpu_capability()
    final_test = metrics.query("metric == 'accuracy' and split == 'test' and stage == 'final'")
    assert len(final_test) == 1 and 0.0 <= final_test["value"].iloc[0] <= 1.0
    per_epoch = metrics.query("metric == 'accuracy' and split == 'validation' and stage == 'epoch'")
    assert sorted(per_epoch["epoch"]) == [1, 2]
    units = dict(zip(metrics["metric"], metrics["unit"]))
    assert units["accuracy"] == "fraction" and units["peak_rss"] == "bytes"
    assert set(metrics["run_id"]) == {"methods/lora/seed0"}
    written = write_tables(runs, metrics, tmp_path / "tables")
    assert {p.name for p in written} == {"runs.parquet", "runs.csv", "metrics.parquet", "metrics.csv"}


def test_collect_refuses_a_record_of_another_version(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema_version": 0, "status": "ok"}))
    with pytest.raises(ValueError, match="schema_version 0"):
        collect([path])


def test_cpu_identity_names_the_first_processors_vendor_family_model_and_stepping(tmp_path):
    from lora_bench.run.record import cpu_identity

    block = ("processor\t: {n}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: {model}\n"
             "model name\t: Intel(R) Xeon(R) Platinum 8480+\nstepping\t: 8\n\n")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(block.format(n=0, model=143) + block.format(n=1, model=999))
    assert cpu_identity(cpuinfo) == {"cpu_model": "Intel(R) Xeon(R) Platinum 8480+",
                                     "cpu_id": "GenuineIntel family 6 model 143 stepping 8"}
    assert cpu_identity(tmp_path / "absent") == {}
