"""Shared by the reliability tests: a smaller .test study on a local file, a Snakemake runner, and table
comparison that leaves out the columns a clock or the host decides.

What is left out when two runs' tables are compared, and why (README, "Guarantees"):
- runs table: ``wall_time_s`` and ``started_at`` (clock time) and ``git_sha`` (the checkout's commit and
  dirtiness: editing the code between two runs changes it without changing a number);
- metrics, summary and tests tables: the rows of ``TIMING_METRICS`` (wall, train and median step time,
  examples/s and tokens/s, the inference latencies and their ratio: clock time; ``peak_rss``: the process's
  allocator history, not the run).
Everything else, every accuracy, loss, macro-F1, parameter and byte count and every statistic built
from them, must be equal bit for bit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml
from conftest import write_sentiment_csv

ROOT = Path(__file__).resolve().parents[1]

TIMING_METRICS = ("wall_time", "train_time", "setup_time", "eval_time", "median_step_time", "p95_step_time",
                  "examples_per_second", "tokens_per_second", "peak_rss", "inference_latency_unmerged",
                  "inference_latency_merged", "inference_latency_base", "inference_overhead")
TIMING_RUN_COLUMNS = ("wall_time_s", "started_at", "git_sha")
TABLES = ("runs", "metrics", "summary", "tests")
# The default suite runs the smaller study to `collect` only (runs and metrics tables): each further step
# is another process of imports. The slow test of the whole .test study compares the statistics too.
TABLE_TARGETS = ("results/tables/runs.parquet",)
RUN_TABLES = ("runs", "metrics")


def mini_study(workdir: Path, **top) -> Path:
    """The .test study made smaller and local: random tiny BERT, a 96-row CSV, 2 variants x 2 seeds."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "sentiment.csv"
    write_sentiment_csv(data)
    config = {
        "name": "mini",
        "seeds": [0, 1],
        "threads": 1,
        "base": {
            "model": {"source": "random", "name": "tiny-bert"},
            # Relative to the working directory, so two workdirs' tables can be compared column for column.
            "data": {"source": "local", "name": data.name, "max_length": 32},
            "method": {"name": "lora", "lora": {"rank": 4, "alpha": 8}},
            "train": {"epochs": 1, "batch_size": 16, "lr": 1.0e-2, "device": "cpu"},
        },
        "families": {
            "methods": {"baseline": "lora",
                        "variants": {"lora": {}, "last_layers": {"method": {"name": "last_layers"}}}},
        },
        **top,
    }
    path = workdir / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def trained_path(study_path: Path, family: str, variant: str, seed: int) -> str:
    """Where the study's training job of this run writes (``trained/<config key>.json``): a fault's target."""
    from lora_bench.study import load_study

    return f"trained/{load_study(study_path).run_key(family, variant, seed)}.json"


def snakemake(workdir: Path, *args, env: dict | None = None, check: bool = True,
              configfile: str = "study.yaml") -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    full_env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{full_env.get('PYTHONPATH', '')}"
    full_env.pop("LORA_BENCH_FAULT", None)
    full_env.update(env or {})
    command = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(workdir / configfile), *args]
    # Its own session: a `killgroup` fault kills Snakemake and its jobs, never the test runner.
    result = subprocess.run(command, env=full_env, capture_output=True, text=True, start_new_session=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def jobs_run(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts per rule from the 'Job stats' table Snakemake prints before running (or dry-running)."""
    text = result.stdout + result.stderr
    if "Job stats:" not in text:
        return {}
    counts = {}
    for line in text.split("Job stats:")[1].split("\n\n", 1)[0].splitlines():
        match = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


def comparable(tables_dir: Path, names=TABLES) -> dict[str, pd.DataFrame]:
    """The tables without what a clock or the host decides, for exact comparison (row order included:
    collection sorts records by path, so it is part of what must repeat)."""
    out = {}
    for name in names:
        frame = pd.read_parquet(tables_dir / f"{name}.parquet")
        frame = frame.drop(columns=[c for c in TIMING_RUN_COLUMNS if c in frame.columns])
        if "metric" in frame.columns:
            frame = frame[~frame["metric"].isin(TIMING_METRICS)]
        frame = frame.reset_index(drop=True)
        out[name] = frame
    return out


def assert_same_tables(first: Path, second: Path, names=TABLES) -> None:
    a, b = comparable(first, names), comparable(second, names)
    for name in names:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=f"{name} table")


def record_mtimes(results: Path) -> dict[str, int]:
    return {str(p.relative_to(results)): p.stat().st_mtime_ns for p in sorted(results.glob("runs/**/*.json"))}
