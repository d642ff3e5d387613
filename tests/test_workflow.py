"""The Snakemake DAG: lint, dry runs of every shipped config and profile, and (slow) the whole
smallest study end to end with its resumability guarantees."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

# Training jobs a dry run of .test/config.yaml plans (the sweep's re-runs and the tuned methods family's runs come
# later, from their checkpoints): one per distinct resolved config. Its 46 runs (6 of them tuning runs) share 31
# planned configs (e.g. the rank/alpha baseline is also the coverage, variance and sweep baseline); every run still
# gets its own labelled record.
TEST_STUDY_TRAIN_JOBS = 31
TEST_STUDY_RUNS = 46


def _env():
    env = dict(os.environ)
    # Rules call `python -m lora_bench`: make that the interpreter running the tests.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def snakemake(*args, cwd=ROOT, check=True):
    result = subprocess.run([*SNAKEMAKE, *args], cwd=cwd, env=_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def planned_jobs(output: str) -> dict[str, int]:
    """Job counts per rule from a dry run's 'Job stats' table."""
    counts = {}
    table = output.split("Job stats:")[-1]
    for line in table.splitlines():
        match = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


@pytest.fixture
def clean_checkout(tmp_path):
    """The workflow's files without any results: what the working tree has computed must not hide jobs."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("Snakefile", "workflow", "config", ".test", "profiles", "envs"):
        (checkout / name).symlink_to(ROOT / name)
    # The committed converged reference, which the default study's report reads.
    (checkout / "results/reference").mkdir(parents=True)
    (checkout / "results/reference/tables").symlink_to(ROOT / "results/reference/tables")
    return checkout


def test_lint_is_clean():
    result = snakemake("--lint")
    assert "Congratulations" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "train_jobs", "runs"),
    [
        ((), 36, 45),
        (("--configfile", ".test/config.yaml"), TEST_STUDY_TRAIN_JOBS, TEST_STUDY_RUNS),
        (("--configfile", "config/paper.yaml"), 374, 443),
        (("--configfile", "config/gpu_memory.yaml"), 33, 33),
        (("--configfile", "config/gpu_smoke.yaml"), 28, 28),
        (("--configfile", "config/instruct.yaml"), 27, 63),
        (("--configfile", "config/llm.yaml"), 24, 24),
        (("--configfile", "config/cpu_more.yaml"), 70, 108),
        (("--configfile", "config/cpu_more3.yaml"), 67, 105),
        (("--configfile", "config/cpu_variants.yaml"), 20, 35),
        (("--configfile", "config/cpu_full.yaml"), 16, 28),
        (("--profile", "profiles/workstation-gpu"), 36, 45),
        (("--profile", "profiles/slurm", "--configfile", "config/paper.yaml"), 374, 443),
    ],
    ids=["default", "test", "paper", "gpu-memory", "gpu-smoke", "instruct", "llm", "cpu-more", "cpu-more3",
         "cpu-variants", "cpu-full", "workstation-gpu", "slurm"],
)
def test_dry_run_of_every_config_and_profile(args, train_jobs, runs, clean_checkout):
    result = snakemake("-n", *args, cwd=clean_checkout)
    jobs = planned_jobs(result.stdout)
    assert jobs["train"] == train_jobs and jobs["label_run"] == runs
    assert jobs["report"] == 1 and jobs["collect"] == 1


def test_families_sharing_a_config_train_it_once_and_renaming_retrains_nothing(tmp_path):
    from reliability_helpers import jobs_run, mini_study
    from reliability_helpers import snakemake as run_in

    workdir = tmp_path / "shared"
    path = mini_study(workdir)
    config = yaml.safe_load(path.read_text())
    # A second family whose baseline is the methods family's baseline: one config, two families.
    config["families"]["coverage"] = {"baseline": "query+value", "seeds": [0],
                                      "variants": {"query+value": {}, "all": {"method": {"lora": {
                                          "targets": ["query", "key", "value", "projection", "mlp"]}}}}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    first = run_in(workdir, "--cores", "2", "results/tables/runs.parquet")
    assert jobs_run(first)["train"] == 5 and jobs_run(first)["label_run"] == 6
    runs = pd.read_parquet(workdir / "results/tables/runs.parquet").set_index("run_id")
    shared = runs.loc[["methods/lora/seed0", "coverage/query+value/seed0"]]
    assert shared["trained_from"].nunique() == 1 and shared["family"].tolist() == ["methods", "coverage"]
    metrics = pd.read_parquet(workdir / "results/tables/metrics.parquet")
    final = metrics[(metrics["metric"] == "accuracy") & (metrics["stage"] == "final")].set_index("run_id")
    assert final.loc["methods/lora/seed0", "value"].tolist() == final.loc["coverage/query+value/seed0",
                                                                           "value"].tolist()
    # Renaming a family (and with it its variants' records) labels again but trains nothing.
    config["families"]["coverage_renamed"] = config["families"].pop("coverage")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    renamed = jobs_run(run_in(workdir, "-n", "results/tables/runs.parquet"))
    assert "train" not in renamed and renamed["label_run"] == 2


def test_a_family_on_new_data_is_prepared_and_trained_in_one_invocation(tmp_path):
    """A study that gains a family on data it has not prepared yet: one invocation prepares only that data and
    trains only the new runs. (With one study-wide data marker, Snakemake 9 re-made the marker, reported the study
    done and left every new run to a second invocation: snakemake/snakemake#4166.)"""
    from reliability_helpers import jobs_run, mini_study
    from reliability_helpers import snakemake as run_in

    workdir = tmp_path / "grow"
    path = mini_study(workdir)
    assert jobs_run(run_in(workdir, "--cores", "2", "results/tables/runs.parquet"))["prepare_data"] == 1
    config = yaml.safe_load(path.read_text())
    # Data seed 0 is the methods family's data (and lora-data0 its lora runs); data seed 1 is new.
    config["families"]["variance"] = {"kind": "variance", "baseline": "lora", "seeds": [0, 1], "data_seeds": [0, 1],
                                      "variants": {"lora": {}}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    grown = jobs_run(run_in(workdir, "--cores", "2", "results/tables/runs.parquet"))
    assert grown == {"prepare_data": 1, "train": 2, "label_run": 4, "collect": 1}
    runs = pd.read_parquet(workdir / "results/tables/runs.parquet")
    assert len(runs) == 8 and (runs["status"] == "ok").all()
    assert "Nothing to be done" in run_in(workdir, "-n", "results/tables/runs.parquet").stdout


def test_prepare_data_cli_writes_the_markers_the_workflow_reads(tmp_path):
    """`prepare-data --study ... --markers results/data` leaves what the prepare_data jobs leave, so a results
    folder whose markers are missing (one from before per-data markers) keeps its trainings."""
    from reliability_helpers import jobs_run, mini_study, trained_path
    from reliability_helpers import snakemake as run_in

    from lora_bench.cli import main
    from lora_bench.study import load_study

    workdir = tmp_path / "marked"
    path = mini_study(workdir)
    run_in(workdir, "--cores", "2", "results/tables/runs.parquet")
    markers = workdir / "results/data"
    keys = set(load_study(path).data_preparations())
    assert {p.name for p in markers.glob("*.done")} == {f"{k}.done" for k in keys}
    for marker in markers.glob("*.done"):
        marker.unlink()
    # One run to train again: without markers its data's preparation runs first, and Snakemake re-trains every
    # finished run that reads that data too...
    (workdir / "results" / trained_path(path, "methods", "lora", 0)).unlink()
    (workdir / "results/runs/methods/lora/seed0.json").unlink()
    record = "results/runs/methods/lora/seed0.json"
    assert jobs_run(run_in(workdir, "-n", record, "results/tables/runs.parquet"))["train"] == 4
    cwd = Path.cwd()
    try:
        os.chdir(workdir)  # the study's data paths are relative to its folder
        assert main(["prepare-data", "--study", str(path), "--markers", str(markers)]) == 0
    finally:
        os.chdir(cwd)
    # ...with the markers written by the CLI, only that run.
    assert {p.name for p in markers.glob("*.done")} == {f"{k}.done" for k in keys}
    assert jobs_run(run_in(workdir, "-n", record, "results/tables/runs.parquet"))["train"] == 1


def test_an_edited_variant_is_relabelled_without_snakemake_metadata(tmp_path):
    """A copied results folder (or lost .snakemake metadata) must not keep the record of a config since edited:
    Snakemake alone sees the new training's missing file as an intermediate and reruns nothing."""
    from reliability_helpers import jobs_run, mini_study
    from reliability_helpers import snakemake as run_in

    workdir = tmp_path / "edited"
    path = mini_study(workdir, seeds=[0])
    run_in(workdir, "--cores", "2", "results/tables/runs.parquet")
    config = yaml.safe_load(path.read_text())
    config["families"]["methods"]["variants"]["last_layers"]["train"] = {"lr": 3.0e-2}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.rmtree(workdir / ".snakemake")
    planned = jobs_run(run_in(workdir, "-n", "results/tables/runs.parquet"))
    assert planned.get("train") == 1 and planned.get("label_run") == 1
    run_in(workdir, "--cores", "2", "results/tables/runs.parquet")
    runs = pd.read_parquet(workdir / "results/tables/runs.parquet").set_index("variant")
    assert runs.loc["last_layers", "cfg.train.lr"] == 3.0e-2 and runs.loc["lora", "cfg.train.lr"] == 1.0e-2
    assert "labelled again" in (workdir / "results/stale/methods/last_layers/seed0").read_text()
    # Done in one pass: the marker stays an input, so the next invocation (with the metadata this one wrote)
    # finds the set of inputs unchanged and labels nothing again.
    assert "Nothing to be done" in run_in(workdir, "-n", "results/tables/runs.parquet").stdout


def test_a_new_family_is_one_config_block(tmp_path, clean_checkout):
    config = yaml.safe_load((ROOT / ".test/config.yaml").read_text())
    config["families"]["dropout"] = {
        "baseline": "p0",
        "variants": {"p0": {}, "p10": {"method": {"lora": {"dropout": 0.1}}}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    jobs = planned_jobs(snakemake("-n", "--configfile", str(path), cwd=clean_checkout).stdout)
    # p0 is the base config, trained already for the rank/alpha baseline: only p10's two seeds are new training.
    assert jobs["train"] == TEST_STUDY_TRAIN_JOBS + 2 and jobs["label_run"] == TEST_STUDY_RUNS + 2 * 2


def test_bad_config_stops_before_any_job(tmp_path):
    config = yaml.safe_load((ROOT / ".test/config.yaml").read_text())
    config["families"]["methods"]["variants"]["lora"] = {"train": {"learning_rate": 0.1}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = snakemake("-n", "--configfile", str(path), check=False)
    assert result.returncode != 0
    assert "learning_rate" in result.stdout + result.stderr


@pytest.mark.slow
def test_smallest_study_end_to_end_and_resume(tmp_path):
    workdir = tmp_path / "run dir"  # a space in the path on purpose
    workdir.mkdir()
    shutil.copy(ROOT / ".test/config.yaml", workdir / "study.yaml")
    common = ("-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "--configfile", str(workdir / "study.yaml"))
    snakemake("--cores", "2", *common)

    runs = pd.read_parquet(workdir / "results/tables/runs.parquet")
    metrics = pd.read_parquet(workdir / "results/tables/metrics.parquet")
    # The planned runs plus the sweep's top 2 re-run on 2 data seeds (derived from the select_sweep checkpoint)
    assert len(runs) == TEST_STUDY_RUNS + 4 and set(runs["status"]) == {"ok"}
    # The tuned methods family ran at the values its validation-only tuning chose.
    chosen = json.loads((workdir / "results/tune/methods/selection.json").read_text())["chosen"]
    methods = runs[runs["family"] == "methods"]
    assert all(lr == chosen[v] for v, lr in methods[["variant", "cfg.train.lr"]].itertuples(index=False))
    assert (runs["sweep_stage"] == "rerun").sum() == 4
    for table in ("variance_components", "sweep_reeval", "sweep_summary", "predictions", "item_tests", "item_pairs",
                  "item_ranks", "item_summary"):
        assert (workdir / f"results/tables/{table}.parquet").exists(), table
    # Every classification and closed-answer instruct run kept its test predictions; the methods family (2 seeds)
    # gets item-level tests and rank probabilities that sum to one per rank.
    predictions = pd.read_parquet(workdir / "results/tables/predictions.parquet")
    evaluated = runs[(runs["family_kind"] != "memory_time") & (runs["family_kind"] != "tune")]
    assert set(evaluated["run_id"]) <= set(predictions["run_id"])
    item_tests = pd.read_parquet(workdir / "results/tables/item_tests.parquet")
    assert set(item_tests.loc[item_tests["family"] == "methods", "variant"]) == {"last_layers", "full"}
    ranks = pd.read_parquet(workdir / "results/tables/item_ranks.parquet")
    assert ranks.groupby(["family", "rank"])["probability"].sum().to_numpy() == pytest.approx(1.0)
    assert (workdir / "results/figures/item_ranks.png").exists()
    assert {"zero_shot", "epoch", "final"} <= set(metrics.loc[metrics["family"] == "instruct", "stage"])
    for column in ("run_id", "family", "family_kind", "variant", "seed", "is_baseline", "status", "method",
                   "data_seed", "train_seed", "setting", "sweep_stage",
                   "trainable_params", "git_sha", "cfg.method.lora.rank", "cfg.train.optimizer",
                   "learned", "collapsed", "diverged", "plateaued", "trained", "trained_from", "tune_value"):
        assert column in runs.columns, column
    for column in ("metric", "split", "epoch", "stage", "value", "unit", "higher_is_better"):
        assert column in metrics.columns, column
    assert (workdir / "paper/report.html").stat().st_size > 0
    assert (workdir / "results/tables/tests.parquet").exists()
    report_md = (workdir / "paper/report.md").read_text(encoding="utf-8")
    assert "Figure missing" not in report_md and "## This study vs the converged reference" in report_md
    # Every output has the mode a plain open() gives (lora_bench.atomic), so colleagues can read it.
    umask = os.umask(0)
    os.umask(umask)
    outputs = [p for folder in ("results", "paper") for p in (workdir / folder).rglob("*")
               if p.is_file() and not p.name.startswith(".")]
    assert len(outputs) > 50
    assert {str(p.relative_to(workdir)) for p in outputs if stat.S_IMODE(p.stat().st_mode) != 0o666 & ~umask} == set()

    # Nothing to do on a second call.
    assert "Nothing to be done" in snakemake("-n", *common).stdout + snakemake("-n", *common).stderr
    # Deleting one run's record labels it again from its training.
    (workdir / "results/runs/methods/full/seed1.json").unlink()
    jobs = planned_jobs(snakemake("-n", *common).stdout)
    assert "train" not in jobs and jobs["label_run"] == 1
    # A training record is an intermediate: with the run's record in place, deleting it alone re-runs nothing;
    # with both gone, that run trains again (and only it).
    run_record = workdir / "results/runs/optimizer/sgd-cosine/seed0.json"
    (workdir / "results/trained" / yaml.safe_load(run_record.read_text())["trained_from"]).unlink()
    run_record.unlink()
    jobs = planned_jobs(snakemake("-n", *common).stdout)
    assert jobs["train"] == 1 and jobs["label_run"] == 2
    snakemake("--cores", "2", *common)
    # Changing one family's parameters re-runs only its jobs.
    config = yaml.safe_load((workdir / "study.yaml").read_text())
    config["families"]["optimizer"]["variants"]["sgd-cosine"]["train"]["lr"] = 0.02
    (workdir / "study.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert planned_jobs(snakemake("-n", *common).stdout)["train"] == 2


@pytest.mark.slow
def test_own_three_class_csv_through_the_workflow_to_the_report(tmp_path):
    from conftest import write_topics_csv

    workdir = tmp_path / "byo"
    workdir.mkdir()
    # String labels, sorted by class: the study must infer the 3 labels and split with shuffling.
    write_topics_csv(workdir / "topics.csv", n_per_class=40)
    config = yaml.safe_load((ROOT / ".test/config.yaml").read_text())
    config["families"].pop("instruct")  # this test is about classification on one's own file
    config["base"]["model"] = {"source": "random", "name": "tiny-bert"}
    config["base"]["data"] = {"source": "local", "name": str(workdir / "topics.csv"), "text_column": "sentence",
                              "label_column": "topic", "max_length": 32}
    (workdir / "study.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake("--cores", "2", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
              "--configfile", str(workdir / "study.yaml"))

    runs = pd.read_parquet(workdir / "results/tables/runs.parquet")
    metrics = pd.read_parquet(workdir / "results/tables/metrics.parquet")
    # The .test study without its 8 instruct runs, plus the sweep's 4 re-runs.
    assert len(runs) == TEST_STUDY_RUNS - 8 + 4 and set(runs["status"]) == {"ok"}
    assert {"accuracy", "macro_f1"} <= set(metrics["metric"])
    record = yaml.safe_load((workdir / "results/runs/methods/lora/seed0.json").read_text())
    assert record["data"]["label_names"] == ["cooking", "science", "sport"]
    assert record["data"]["class_counts"]["test"] == [8, 8, 8]
    assert record["model"]["num_labels"] == 3
    assert (workdir / "paper/report.html").stat().st_size > 0
