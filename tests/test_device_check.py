"""benchmarks/device_check.py: what a lent GPU machine runs (issue 19), exercised here on CPU before any lease.

A device lease is 15 minutes in all, so the script must work the first time: these tests run it end to end on
the tiny mini study (random tiny BERT, a local CSV), in the study's own folder as on the device, and check what
comes back under ``--out``; a study it cannot run faithfully (a tuned family) is refused by name.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from reliability_helpers import mini_study

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.py"


def _device_check(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--study", "study.yaml", *args], cwd=workdir,
                          capture_output=True, text=True, env={**os.environ, "OUT": ""})


@pytest.mark.slow
def test_device_check_trains_every_run_then_returns_records_and_tables(tmp_path):
    workdir = tmp_path / "device"
    path = mini_study(workdir)
    config = yaml.safe_load(path.read_text())
    config["families"]["memory_time"] = {"kind": "memory_time", "baseline": "lora", "seeds": [0],
                                         "base": {"train": {"max_steps": 3, "evaluate": False}},
                                         "variants": {"lora": {}, "full": {"method": {"name": "full"}}}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "out"
    done = _device_check(workdir, "--out", str(out), "--parallel", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 runs in" in done.stdout and "not ok: []" in done.stdout
    # At most 8 files come back from the device: the records travel as one tar file.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["cost_summary.csv", "log.txt", "metrics.csv", "records.tar.gz", "runs.csv", "summary.csv", "tests.csv",
         "timings.json"])
    with tarfile.open(out / "records.tar.gz") as tar:
        records = sorted(name for name in tar.getnames() if name.endswith(".json"))
    assert records == ["runs/memory_time/full/seed0.json", "runs/memory_time/lora/seed0.json",
                       *(f"runs/methods/{v}/seed{s}.json" for v in ("last_layers", "lora") for s in (0, 1))]
    runs = list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))
    assert len(runs) == 6 and {r["status"] for r in runs} == {"ok"}
    timings = json.loads((out / "timings.json").read_text())
    # The memory/time runs go first and one at a time, so their step times are not shared with other runs.
    assert [t["run"] for t in timings["runs"][:2]] == ["memory_time/lora/seed0", "memory_time/full/seed0"]
    # Run again on the same results: every record is kept, nothing trains twice.
    again = _device_check(workdir, "--out", str(tmp_path / "again"))
    assert again.returncode == 0 and "not ok: []" in again.stdout
    kept = json.loads((tmp_path / "again" / "timings.json").read_text())["runs"]
    assert {t["status"] for t in kept} == {"kept"}


def test_device_check_refuses_a_study_whose_runs_hang_on_a_selection(tmp_path):
    """A tuned family's runs use the value its select_tune checkpoint chose; run without Snakemake they would
    train at the base value, silently. The script names the family and trains nothing."""
    workdir = tmp_path / "tuned"
    path = mini_study(workdir)
    config = yaml.safe_load(path.read_text())
    config["families"]["methods"]["tune"] = {"key": "train.lr", "values": [1.0e-3, 1.0e-2], "seeds": [100]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = _device_check(workdir, "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "families ['methods'] are tuned or sweeps" in done.stderr and "config/gpu_smoke.yaml" in done.stderr
    assert not (workdir / "results").exists() and not (tmp_path / "out").exists()


def test_the_gpu_smoke_study_is_one_device_check_can_run():
    """The study the device runs states its learning rates (no tune block, no sweep)."""
    from lora_bench.study import load_study

    study = load_study(ROOT / "config" / "gpu_smoke.yaml")
    assert not study.tuned_families() and not study.sweep_families()
