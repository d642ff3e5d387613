"""Kill and resume: SIGKILL a training job during training, while it writes its record, and during
collection, in real ``snakemake`` runs; afterwards no partial record exists, only the killed jobs run
again, and the tables equal those of an uninterrupted run.

The kills are deterministic: ``LORA_BENCH_FAULT`` (lora_bench/faults.py) makes the job kill itself with
SIGKILL at a named point, in the process Snakemake started, as an out-of-memory killer or a power cut would.
"""

from __future__ import annotations

import json

import pytest
from reliability_helpers import (
    RUN_TABLES,
    TABLE_TARGETS,
    assert_same_tables,
    jobs_run,
    mini_study,
    record_mtimes,
    snakemake,
    trained_path,
)

from lora_bench.run.record import read_record

KILLED_IN_TRAINING = ("methods", "lora", 0)
KILLED_WRITING = "methods/last_layers/seed1"
POWER_CUT_RECORD = "methods/lora/seed0"


def _assert_only_whole_records(results):
    """Every file named like a record is a complete, readable record; nothing else is a .json."""
    for path in results.glob("runs/**/*.json"):
        record = read_record(path)
        assert record["status"] == "ok" and record["metrics"]["final"], path


def test_sigkill_in_training_in_record_writing_and_in_collection_then_resume(mini_reference, tmp_path):
    workdir = tmp_path / "killed"
    study = mini_study(workdir)
    results = workdir / "results"

    # 1. One training job is killed after its first optimizer step; another run's record is killed halfway
    # through its writing (in its label job: its training finished and stays).
    faults = f"train_step@{trained_path(study, *KILLED_IN_TRAINING)},record_write@{KILLED_WRITING}"
    first = snakemake(workdir, "--cores", "2", "--keep-going", *TABLE_TARGETS, env={"LORA_BENCH_FAULT": faults},
                      check=False)
    assert first.returncode != 0
    assert jobs_run(first)["train"] == 4
    _assert_only_whole_records(results)
    assert set(record_mtimes(results)) == {"runs/methods/lora/seed1.json", "runs/methods/last_layers/seed0.json"}
    # The record kill really hit mid-write: half a record lies in a temporary file, never under the record's name.
    halves = list((results / "runs/methods/last_layers").glob(".seed1.json.*.tmp"))
    assert len(halves) == 1
    with pytest.raises(json.JSONDecodeError):
        json.loads(halves[0].read_text())
    assert not (results / "tables/runs.parquet").exists()
    survivors = record_mtimes(results)

    # 2. Re-run: only the run killed in training trains again, and the two missing records are written; this
    # time collection is killed between two table files.
    second = snakemake(workdir, "--cores", "2", *TABLE_TARGETS, env={"LORA_BENCH_FAULT": "tables_write"}, check=False)
    assert second.returncode != 0
    assert jobs_run(second).get("train") == 1 and jobs_run(second).get("label_run") == 2
    after_second = record_mtimes(results)
    assert len(after_second) == 4
    assert {k: after_second[k] for k in survivors} == survivors, "a finished run was trained again"
    _assert_only_whole_records(results)
    assert not halves[0].exists(), "the killed writer's temporary file was not cleaned up"
    # Snakemake removes the outputs of the killed collect job: no table of mixed age is left to be trusted.
    assert not (results / "tables/runs.parquet").exists() and not (results / "tables/metrics.parquet").exists()

    # 3. Re-run: no training at all, collection and stats only; tables equal an uninterrupted run's.
    third = snakemake(workdir, "--cores", "2", *TABLE_TARGETS)
    assert "train" not in jobs_run(third) and jobs_run(third)["collect"] == 1
    assert record_mtimes(results) == after_second
    assert_same_tables(mini_reference / "results/tables", results / "tables", RUN_TABLES)
    nothing = snakemake(workdir, "-n", *TABLE_TARGETS)
    assert "Nothing to be done" in nothing.stdout + nothing.stderr


@pytest.mark.slow
def test_power_cut_of_snakemake_and_every_job_then_resume(mini_reference, tmp_path):
    """SIGKILL to Snakemake and all its jobs at once, in the worst moment: just after a record was renamed into
    place, before Snakemake learnt that its job finished. Nothing on disk is partial; Snakemake then refuses
    to trust that record (it is marked incomplete) until asked to re-run it, as the shipped profiles do, and
    keeps its lock until `snakemake --unlock`."""
    workdir = tmp_path / "power cut"
    mini_study(workdir)
    results = workdir / "results"
    cut = snakemake(workdir, "--cores", "2", *TABLE_TARGETS, check=False,
                    env={"LORA_BENCH_FAULT": f"record_written:killgroup@{POWER_CUT_RECORD}"})
    assert cut.returncode == -9  # Snakemake itself was killed
    _assert_only_whole_records(results)
    assert (results / f"runs/{POWER_CUT_RECORD}.json").exists()

    refused = snakemake(workdir, "--cores", "2", *TABLE_TARGETS, check=False)
    assert refused.returncode != 0 and "incomplete" in (refused.stdout + refused.stderr).lower()
    assert f"{POWER_CUT_RECORD}.json" in refused.stdout + refused.stderr

    # Snakemake's lock outlives it too: a dead Snakemake is told apart from a running one only by a person.
    locked = snakemake(workdir, "--cores", "2", "--rerun-incomplete", *TABLE_TARGETS, check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    snakemake(workdir, "--unlock")
    resumed = snakemake(workdir, "--cores", "2", "--rerun-incomplete", *TABLE_TARGETS)
    assert jobs_run(resumed)["label_run"] >= 1 and jobs_run(resumed).get("train", 0) <= 4
    _assert_only_whole_records(results)
    assert_same_tables(mini_reference / "results/tables", results / "tables", RUN_TABLES)


def test_only_temporary_files_of_dead_writers_on_this_host_are_cleaned(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from lora_bench.run.record import write_json_atomic

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, host = int(finished.stdout), socket.gethostname().replace(".", "_")
    folder = tmp_path / "odd [name] ü"
    folder.mkdir()
    for writer in (f"{host}-{dead}", f"{host}-{os.getpid()}", f"node7-{dead}"):
        (folder / f".seed0.json.{writer}.x1.tmp").write_text("half a record")
    write_json_atomic({"schema_version": 1, "status": "ok"}, folder / "seed0.json")
    left = sorted(p.name for p in folder.iterdir())
    # The killed local writer's file is gone; a live writer's and another node's are not ours to judge.
    expected = [f".seed0.json.{host}-{os.getpid()}.x1.tmp", f".seed0.json.node7-{dead}.x1.tmp", "seed0.json"]
    assert left == sorted(expected)
