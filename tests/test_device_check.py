"""benchmarks/device_check.py: what a lent GPU machine runs (issue 19), exercised here on CPU before any lease.

A device lease is 15 minutes in all, so the script must work the first time: these tests run it end to end on
the tiny mini study (random tiny BERT, a local CSV), in the study's own folder as on the device, with each engine
(the workflow through Snakemake; the rules' commands in order without it), and check what comes back under
``--out``; a study the direct engine cannot run faithfully (a tuned family) is refused by name.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml
from benchmark_helpers import load_benchmark
from reliability_helpers import mini_study

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.py"


def _device_check(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """The script in ``workdir``, as on the device; its workflow's ``python`` is this interpreter."""
    return subprocess.run([sys.executable, str(SCRIPT), "--study", "study.yaml", *args], cwd=workdir,
                          capture_output=True, text=True, env={**os.environ, "OUT": ""})


def _study_with_memory_time(workdir: Path) -> Path:
    path = mini_study(workdir)
    config = yaml.safe_load(path.read_text())
    config["families"]["memory_time"] = {"kind": "memory_time", "baseline": "lora", "seeds": [0],
                                         "base": {"train": {"max_steps": 3, "evaluate": False}},
                                         "variants": {"lora": {}, "full": {"method": {"name": "full"}}}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


RECORDS = ["runs/memory_time/full/seed0.json", "runs/memory_time/lora/seed0.json",
           *(f"runs/methods/{v}/seed{s}.json" for v in ("last_layers", "lora") for s in (0, 1))]
OUT_FILES = ["cost_summary.csv", "log.txt", "metrics.csv", "records.tar.gz", "runs.csv", "summary.csv", "tests.csv",
             "timings.json"]


def _records(out: Path) -> list[str]:
    with tarfile.open(out / "records.tar.gz") as tar:
        return sorted(name for name in tar.getnames() if name.startswith("runs/") and name.endswith(".json"))


@pytest.mark.slow
def test_device_check_trains_every_run_then_returns_records_and_tables(tmp_path):
    """The direct engine (no Snakemake on the machine)."""
    workdir = tmp_path / "device"
    _study_with_memory_time(workdir)
    out = tmp_path / "out"
    done = _device_check(workdir, "--engine", "direct", "--out", str(out), "--parallel", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "engine: direct" in done.stdout
    assert "6 runs in" in done.stdout and "not ok: []" in done.stdout
    # At most 8 files come back from the device: the records travel as one tar file.
    assert sorted(p.name for p in out.iterdir()) == OUT_FILES
    assert _records(out) == RECORDS
    runs = list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))
    assert len(runs) == 6 and {r["status"] for r in runs} == {"ok"}
    timings = json.loads((out / "timings.json").read_text())
    # The memory/time runs go first and one at a time, so their step times are not shared with other runs.
    assert [t["run"] for t in timings["runs"][:2]] == ["memory_time/lora/seed0", "memory_time/full/seed0"]
    # Run again on the same results: every record is kept, nothing trains twice.
    again = _device_check(workdir, "--engine", "direct", "--out", str(tmp_path / "again"))
    assert again.returncode == 0 and "not ok: []" in again.stdout
    kept = json.loads((tmp_path / "again" / "timings.json").read_text())["runs"]
    assert {t["status"] for t in kept} == {"kept"}


def test_the_direct_engine_refuses_a_study_whose_runs_hang_on_a_selection(tmp_path):
    """A tuned family's runs use the value its select_tune checkpoint chose; run without Snakemake they would
    train at the base value, silently. The direct engine names the family and trains nothing."""
    workdir = tmp_path / "tuned"
    path = mini_study(workdir)
    config = yaml.safe_load(path.read_text())
    config["families"]["methods"]["tune"] = {"key": "train.lr", "values": [1.0e-3, 1.0e-2], "seeds": [100]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = _device_check(workdir, "--engine", "direct", "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "families ['methods'] are tuned or sweeps" in done.stderr and "--engine snakemake" in done.stderr
    assert not (workdir / "results").exists() and not (tmp_path / "out").exists()



@pytest.mark.slow
def test_device_check_runs_the_workflow_through_snakemake_serial_families_first(tmp_path):
    """The snakemake engine: the memory/time records in a pass of their own, one training job at a time, then the
    whole DAG (tuning, tables, tests, figures, report) with two jobs at once, then a dry run with nothing left."""
    workdir = tmp_path / "device"
    path = _study_with_memory_time(workdir)
    # A tuned family, which the direct engine refuses: its runs wait on Snakemake's select_tune checkpoint.
    config = yaml.safe_load(path.read_text())
    config["families"]["methods"]["tune"] = {"key": "train.lr", "values": [1.0e-3, 1.0e-2], "seeds": [100]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "out"
    done = _device_check(workdir, "--engine", "snakemake", "--out", str(out), "--parallel", "2", "--cores", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "engine: snakemake" in done.stdout and "10 runs in" in done.stdout and "not ok: []" in done.stdout
    # The printed tail carries the cost table, in case the files do not come back.
    assert "variant | memory (GiB) | median step (ms)" in done.stdout
    assert "memory_time/lora (" in done.stdout and "memory_time/full (" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == OUT_FILES
    tuning = [f"runs/methods_tune/{v}-lr{lr}/seed100.json" for v in ("last_layers", "lora") for lr in (0.001, 0.01)]
    assert _records(out) == sorted([*RECORDS, *tuning])
    with tarfile.open(out / "records.tar.gz") as tar:
        names = tar.getnames()
    assert {"report/report.md", "figures/methods.png", "figures/memory_time.png",
            "tune/methods/selection.json"} <= set(names)
    timings = json.loads((out / "timings.json").read_text())
    assert timings["engine"] == "snakemake" and timings["nothing_left"] is True
    assert [p["pass"] for p in timings["passes"]] == ["serial", "study"]
    assert {p["exit"] for p in timings["passes"]} == {0}
    log = (out / "log.txt").read_text()
    serial_log = log[log.index("== snakemake serial"):log.index("== snakemake study")]
    # The serial pass trained exactly the memory/time runs' configs, and nothing else.
    assert serial_log.count("lora_bench train") == 2 and "runs/methods/" not in serial_log
    # ... one job at a time: the study pass runs two at once, the serial pass never more than one.
    assert "Execute 1 jobs" in serial_log and not re.search(r"Execute ([2-9]|\d\d+) jobs", serial_log)
    assert {r["status"] for r in csv.DictReader(io.StringIO((out / "runs.csv").read_text()))} == {"ok"}
    again = _device_check(workdir, "--engine", "snakemake", "--out", str(tmp_path / "again"))
    assert again.returncode == 0
    kept = json.loads((tmp_path / "again" / "timings.json").read_text())
    assert {t["status"] for t in kept["runs"]} == {"kept"} and [p["pass"] for p in kept["passes"]] == ["study"]
    assert "lora_bench train" not in (tmp_path / "again" / "log.txt").read_text()



@pytest.mark.slow
def test_a_call_cut_at_its_deadline_returns_what_it_has_and_the_next_call_finishes(tmp_path):
    """--deadline-s comes before the lease's time limit: Snakemake is stopped, the script still writes its
    timings and log (saying it was cut) and exits 1; a rerun goes on from there and finishes."""
    workdir = tmp_path / "device"
    _study_with_memory_time(workdir)
    start = time.monotonic()
    cut = _device_check(workdir, "--engine", "snakemake", "--out", str(tmp_path / "cut"), "--deadline-s", "1",
                        "--grace-s", "60")
    assert cut.returncode == 1 and "cut at the deadline: run again to finish" in cut.stdout
    assert time.monotonic() - start < 60
    timings = json.loads((tmp_path / "cut" / "timings.json").read_text())
    assert timings["cut_at_deadline"] is True and timings["passes"][0]["cut_at_deadline"] is True
    assert "cut at the deadline" in (tmp_path / "cut" / "log.txt").read_text()
    # A call killed outright (the lease's limit, or the grace period running out) leaves Snakemake's lock behind.
    locks = workdir / ".snakemake" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    (locks / "0.output.lock").write_text("".join(f"results/{name}\n" for name in RECORDS))
    again = _device_check(workdir, "--engine", "snakemake", "--out", str(tmp_path / "again"), "--cores", "2")
    assert again.returncode == 0 and "not ok: []" in again.stdout, again.stdout[-2000:]
    finished = json.loads((tmp_path / "again" / "timings.json").read_text())
    assert finished["cut_at_deadline"] is False and finished["nothing_left"] is True
    assert _records(tmp_path / "again") == RECORDS



def test_the_direct_engine_starts_no_run_past_its_deadline(tmp_path):
    workdir = tmp_path / "device"
    mini_study(workdir)
    done = _device_check(workdir, "--engine", "direct", "--out", str(tmp_path / "out"), "--deadline-s", "0")
    assert done.returncode == 1 and "cut at the deadline" in done.stdout
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert timings["cut_at_deadline"] is True
    assert {t["status"] for t in timings["runs"]} == {"not started (deadline)"}
    assert not (workdir / "results" / "runs").exists()


def test_the_gpu_smoke_study_is_one_device_check_can_run():
    """The study the device runs states its learning rates (no tune block, no sweep)."""
    from lora_bench.study import load_study

    study = load_study(ROOT / "config" / "gpu_smoke.yaml")
    assert not study.tuned_families() and not study.sweep_families()


def _device_wheels():
    return load_benchmark("device_wheels")


def test_the_kit_carries_what_lora_bench_needs_beyond_the_image():
    """device_kit.sh's wheel lists come from the installed dependency tree, less the image's packages: Snakemake
    and its tree, without PuLP (the device runs the greedy scheduler) and without what the image has."""
    wheels = _device_wheels()
    part1 = wheels.wheels_to_carry(["jsonschema", "datasets"])
    part2 = wheels.wheels_to_carry(["lora-bench"], minus=["jsonschema", "datasets"], drop=["pulp"], deps_only=True)
    assert {"jsonschema", "datasets", "dill", "multiprocess"} <= set(part1)
    assert {"snakemake", "connection-pool", "sqlmodel", "pydantic-core", "snakemake-interface-common"} <= set(part2)
    assert not set(part1) & set(part2)
    image = wheels.image_packages()
    assert {"torch", "transformers", "peft", "pandas", "pyyaml"} <= image
    assert not (set(part1) | set(part2)) & (image | {"pulp", "lora-bench"})
    # A package the image lacked would be carried, with what it needs beyond the image.
    assert "pyyaml" in wheels.wheels_to_carry(["lora-bench"], image=image - {"pyyaml"}, deps_only=True)


def _fake_wheel(folder: Path, name: str, requires: list[str]) -> Path:
    import zipfile

    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    lines = ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0"] + [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{name}-1.0.dist-info/METADATA", "\n".join(lines) + "\n")
    return wheel


def test_the_kit_refuses_a_carried_wheel_that_needs_another_version_than_the_image_has(tmp_path):
    """The device installs the kit with --no-deps, so a wheel needing a newer huggingface-hub than the image's
    would fail only on the lease: the kit's check names it. Requirements for another Python, behind an extra or
    on a package whose image version is unknown are not judged."""
    wheels = _device_wheels()
    versions = wheels.image_versions()
    assert versions["transformers"] == "5.17.0" and versions["huggingface-hub"] == "1.33.0"
    assert "pandas" in wheels.image_packages() and "pandas" not in versions
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    _fake_wheel(good, "fine", ["numpy>=1.17", "huggingface-hub<3.0,>=1.31.0", "pandas>=99",
                               'transformers>=9; python_version < "3.12"', 'tokenizers>=9; extra == "fast"'])
    _fake_wheel(bad, "needy", ["huggingface_hub>=1.34"])
    requirements = {path.name: wheels.wheel_requirements(path) for path in [*good.glob("*.whl"), *bad.glob("*.whl")]}
    assert wheels.unmet_requirements(requirements, versions) == [
        "needy-1.0-py3-none-any.whl needs huggingface_hub>=1.34; the image has 1.33.0"]

    script = ROOT / "benchmarks" / "device_wheels.py"
    refused = subprocess.run([sys.executable, script, "--check", good, bad], capture_output=True, text=True)
    assert refused.returncode == 1 and "needy-1.0-py3-none-any.whl needs huggingface_hub>=1.34" in refused.stderr
    passed = subprocess.run([sys.executable, script, "--check", good], capture_output=True, text=True)
    assert passed.returncode == 0, passed.stderr


def test_what_the_kit_carries_accepts_the_image_versions_it_will_run_beside():
    """The packages the kit carries, at the versions installed here (those of its wheels), and lora-bench itself
    (but for its torch pin, the local CPU build) accept the image's known versions: a `make setup` that brings a
    datasets needing a newer huggingface-hub than the image's fails here, not on a lease."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement

    wheels = _device_wheels()
    carried = {**wheels.wheels_to_carry(["jsonschema", "datasets"]),
               **wheels.wheels_to_carry(["lora-bench"], drop=["pulp"], deps_only=True)}
    requirements = {name: [Requirement(text) for text in metadata.requires(name) or []] for name in carried}
    requirements["lora-bench"] = [Requirement(text) for text in metadata.requires("lora-bench") or []
                                  if wheels.normalize(Requirement(text).name) != "torch"]
    assert wheels.unmet_requirements(requirements, wheels.image_versions()) == []


def test_the_image_versions_rehearsal_keeps_the_local_torch_unless_asked_and_skips_what_is_not_installed():
    """`make test-image-versions` installs the image's versions over those `make setup` chose; torch only on
    request (PyPI's Linux torch is the 3 GB CUDA build), and never a package the venv does not have. No pip call
    is made here: each case is decided before one."""
    import importlib.metadata as metadata

    wheels = _device_wheels()
    pyyaml = metadata.version("pyyaml")
    outcomes = wheels.install_image_versions({"torch": "0.0.1", "pyyaml": pyyaml, "no-such-package-here": "1.0"})
    assert outcomes[0] == ("pyyaml", pyyaml, "as on the image")
    assert outcomes[1][:2] == ("torch", "0.0.1") and outcomes[1][2].startswith(f"kept at {metadata.version('torch')}")
    assert len(outcomes) == 2
