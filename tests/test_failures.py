"""Failures are data: a run that fails (GPU out of memory, NaN loss, a missing model) is recorded with
its status, error and a short error kind, appears in the tables and the report as failed, and the rest
of the study goes on.

Out of memory is simulated: ``LORA_BENCH_FAULT=train_step:oom`` raises ``torch.OutOfMemoryError`` (what
CUDA raises) after an optimizer step, so the CPU suite exercises the same path as a GPU.
"""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
import yaml
from reliability_helpers import mini_study, snakemake, trained_path

from lora_bench.cli import main
from lora_bench.config import ConfigError
from lora_bench.run.data import DataError
from lora_bench.run.record import failure_kind
from lora_bench.run.train import NonFiniteLoss

NAN = {"train": {"optimizer": "sgd", "lr": 1.0e30, "max_grad_norm": None}}
MISSING_MODEL = {"model": {"name": "no-such-config"}}


def _train(base: dict, overrides: dict, out, **labels) -> int:
    from lora_bench.config import deep_merge

    config = deep_merge(copy.deepcopy(base), overrides)
    return main(["train", "--config-json", json.dumps(config), "--label", json.dumps(labels), "--out", str(out)])


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory"),
        (RuntimeError("CUDA error: out of memory"), "out_of_memory"),
        (NonFiniteLoss("loss became nan at epoch 1, step 3"), "non_finite_loss"),
        (ConfigError("model.name: no such folder x"), "config"),
        (DataError("x.csv has no rows"), "data"),
        (OSError(28, "No space left on device"), "io"),
        (KeyError("labels"), "error"),
    ],
)
def test_failure_kinds(exc, kind):
    assert failure_kind(exc) == kind


def test_nan_loss_stops_the_run_early_with_a_clear_status(tiny_run, tmp_path):
    tiny_run["train"]["epochs"] = 3
    out = tmp_path / "nan.json"
    assert _train(tiny_run, NAN, out) == 0
    record = json.loads(out.read_text())
    assert record["status"] == "failed" and record["error_kind"] == "non_finite_loss"
    # It stopped inside the first epoch, at the step that went non-finite, not after three epochs.
    assert "NonFiniteLoss: loss became" in record["error"] and "at epoch 1," in record["error"]


def test_injected_out_of_memory_is_recorded_and_the_hook_removed(tiny_run, tmp_path, monkeypatch):
    from torch.optim.optimizer import _global_optimizer_post_hooks

    tiny_run["train"]["epochs"] = 1
    monkeypatch.setenv("LORA_BENCH_FAULT", "train_step:oom@oom")
    assert _train(tiny_run, {}, tmp_path / "oom.json") == 0
    record = json.loads((tmp_path / "oom.json").read_text())
    assert record["status"] == "failed" and record["error_kind"] == "out_of_memory"
    assert record["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert not _global_optimizer_post_hooks, "the fault hook outlived its run"
    # The same process, another run: the fault was for "oom" paths only, and nothing of it is left.
    assert _train(tiny_run, {}, tmp_path / "fine.json") == 0
    assert json.loads((tmp_path / "fine.json").read_text())["status"] == "ok"


def test_failed_runs_flow_through_tables_stats_figures_and_report(tiny_run, tmp_path, monkeypatch):
    """A small study by hand, with the CLI commands the workflow calls, in a results folder with spaces and
    unicode: one out-of-memory baseline seed, a NaN variant, and a family whose baseline never loads."""
    tiny_run["train"]["epochs"] = 1
    results = tmp_path / "résultats d'étude ü"
    monkeypatch.setenv("LORA_BENCH_FAULT", "train_step:oom@methods/lora/seed1")
    plan = [
        ("methods", "methods", "lora", 0, True, {}),
        ("methods", "methods", "lora", 1, True, {}),  # out of memory (injected)
        ("methods", "methods", "nan", 0, False, NAN),
        ("methods", "methods", "nan", 1, False, NAN),
        ("broken", "generic", "missing", 0, True, MISSING_MODEL),
        ("broken", "generic", "lora", 0, False, {}),
    ]
    for family, kind, variant, seed, baseline, overrides in plan:
        labels = {"family": family, "family_kind": kind, "variant": variant, "seed": seed, "is_baseline": baseline,
                  "study": "failures"}
        out = results / "runs" / family / variant / f"seed{seed}.json"
        assert _train({**tiny_run, "seed": seed}, overrides, out, **labels) == 0

    tables = results / "tables"
    assert main(["collect", "--records-dir", str(results / "runs"), "--out-dir", str(tables)]) == 0
    runs = pd.read_parquet(tables / "runs.parquet").set_index("run_id")
    assert runs["status"].to_dict() == {
        "broken/lora/seed0": "ok", "broken/missing/seed0": "failed", "methods/lora/seed0": "ok",
        "methods/lora/seed1": "failed", "methods/nan/seed0": "failed", "methods/nan/seed1": "failed"}
    assert runs.loc["methods/lora/seed1", "error_kind"] == "out_of_memory"
    assert runs.loc["methods/nan/seed0", "error_kind"] == "non_finite_loss"
    assert runs.loc["broken/missing/seed0", "error_kind"] == "config"
    assert "no-such-config" in runs.loc["broken/missing/seed0", "error"]

    assert main(["stats", "--tables", str(tables)]) == 0
    figures = results / "figures ü"
    assert main(["figures", "--tables", str(tables), "--out-dir", str(figures)]) == 0
    paper = tmp_path / "rapport final é"
    assert main(["report", "--tables", str(tables), "--figures", str(figures), "--out-dir", str(paper)]) == 0
    report = (paper / "report.md").read_text(encoding="utf-8")
    assert "(2 finished, 4 failed)" in report
    for run_id in ("methods/lora/seed1", "methods/nan/seed0", "methods/nan/seed1", "broken/missing/seed0"):
        assert f"`{run_id}`" in report, run_id
    assert "OutOfMemoryError" in report and "NonFiniteLoss" in report
    assert (paper / "report.html").stat().st_size > 0


@pytest.mark.slow
def test_failed_runs_in_a_workflow_with_keep_going(tmp_path):
    """The same through Snakemake, with results and report folders named with spaces and unicode."""
    workdir = tmp_path / "work dir"
    path = mini_study(workdir, results_dir="résultats avec espaces", report_dir="rapport ü")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    config["families"]["methods"]["variants"]["nan"] = NAN
    config["families"]["broken"] = {"baseline": "missing", "seeds": [0],
                                     "variants": {"missing": MISSING_MODEL, "lora": {}}}
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    oom = f"train_step:oom@{trained_path(path, 'methods', 'lora', 1)}"
    snakemake(workdir, "--cores", "2", "--keep-going", env={"LORA_BENCH_FAULT": oom})
    runs = pd.read_parquet(workdir / "résultats avec espaces/tables/runs.parquet")
    failed = runs[runs["status"] == "failed"].set_index("run_id")["error_kind"].to_dict()
    assert failed == {"broken/missing/seed0": "config", "methods/lora/seed1": "out_of_memory",
                      "methods/nan/seed0": "non_finite_loss", "methods/nan/seed1": "non_finite_loss"}
    report = (workdir / "rapport ü/report.md").read_text(encoding="utf-8")
    assert "4 failed" in report and "`methods/lora/seed1`" in report
