"""Determinism: the same config and seeds give bit-identical metrics on CPU, run after run and with
``snakemake --cores 1`` or ``--cores 2``; every record says whether its numbers are expected to repeat.

Tables are compared without the columns a clock or the host decides (see tests/reliability_helpers.py).
"""

from __future__ import annotations

import json
import shutil

import pytest
from reliability_helpers import ROOT, RUN_TABLES, TABLE_TARGETS, assert_same_tables, mini_study, snakemake

from lora_bench.cli import main
from lora_bench.run.record import determinism_state


def test_cpu_record_says_deterministic_algorithms_were_enforced(tiny_run, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_run))
    out = tmp_path / "run record.json"
    assert main(["train", "--config", str(config), "--set", "train.epochs=1", "--out", str(out)]) == 0
    state = json.loads(out.read_text())["determinism"]
    assert state["device_type"] == "cpu"
    assert state["deterministic_algorithms"] is True and state["bitwise_reproducible"] is True
    assert state["torch_threads"] == 1


def test_a_cuda_record_says_its_kernels_may_not_repeat():
    state = determinism_state("cuda:0 (NVIDIA H100 80GB HBM3)")
    assert state["device_type"] == "cuda" and state["bitwise_reproducible"] is False
    assert "not forced to be deterministic" in state["note"]


@pytest.mark.slow
def test_same_seeds_same_tables_with_one_or_two_cores(mini_reference, tmp_path):
    # Slow only by the default suite's budget (a second workflow run, 25-65 s here): the default kill-and-resume
    # test already compares an interrupted and resumed run's tables with the uninterrupted reference.
    # A second, independent run (own data cache, own records) with --cores 1 against the --cores 2 reference.
    workdir = tmp_path / "one core"
    mini_study(workdir)
    snakemake(workdir, "--cores", "1", *TABLE_TARGETS)
    assert_same_tables(mini_reference / "results/tables", workdir / "results/tables", RUN_TABLES)
    for record in (mini_reference / "results/runs").glob("**/*.json"):
        again = workdir / "results/runs" / record.relative_to(mini_reference / "results/runs")
        assert json.loads(record.read_text())["metrics"] == json.loads(again.read_text())["metrics"], record


@pytest.mark.slow
def test_the_test_workflow_is_bit_identical_across_runs_and_core_counts(tmp_path):
    # Each run downloads the corpus into its own relative data.cache_dir, so paths in the tables are equal too.
    workdirs = []
    for cores in ("1", "2"):
        workdir = tmp_path / f"cores{cores}"
        workdir.mkdir()
        shutil.copy(ROOT / ".test/config.yaml", workdir / "study.yaml")
        snakemake(workdir, "--cores", cores)
        workdirs.append(workdir)
    assert_same_tables(workdirs[0] / "results/tables", workdirs[1] / "results/tables")


def test_the_report_says_when_gpu_runs_are_not_bitwise_reproducible(tmp_path):
    from synthetic import make_tables

    from lora_bench.analysis import stats
    from lora_bench.report import render

    runs, metrics = make_tables(("methods",), n_seeds=3, n_epochs=1)
    tables = tmp_path / "tables"
    tables.mkdir()
    for not_bitwise in (0, 2):
        runs["bitwise_reproducible"] = [i >= not_bitwise for i in range(len(runs))]
        runs.to_parquet(tables / "runs.parquet")
        metrics.to_parquet(tables / "metrics.parquet")
        stats.run_stats(tables / "metrics.parquet", tables / "runs.parquet", tables)
        text, _ = render.render_markdown(render._read_tables(tables), tmp_path / "figures", tmp_path / "paper")
        sentence = "2 finished\n  runs used GPU kernels that are not bitwise deterministic"
        assert (sentence in text) == bool(not_bitwise), text[:3000]
