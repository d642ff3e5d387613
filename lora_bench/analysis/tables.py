"""Run records -> the two tidy tables (``runs`` and long-form ``metrics``) of docs/tables.md.

Statistics, figures and the report read only these tables, so every number in the report can be
traced to a row here and from there to one run record. Failed runs are rows with their status and
error, never a reason for collection to stop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lora_bench import SCHEMA_VERSION
from lora_bench.atomic import write_table
from lora_bench.config import flatten
from lora_bench.faults import fault_point
from lora_bench.run.diagnostics import FLAGS, trained
from lora_bench.run.predictions import decode_block
from lora_bench.run.record import (
    READABLE_RECORD_VERSIONS,
    RecordError,
    check_version,
    read_record,
)

# metric name -> (unit, higher_is_better)
METRIC_INFO: dict[str, tuple[str, bool]] = {
    "accuracy": ("fraction", True),
    # mean of the per-class F1 scores (as scikit-learn's average="macro"): every class counts alike
    "macro_f1": ("fraction", True),
    "loss": ("nats", False),
    # instruct: exp of the mean response-token loss
    "perplexity": ("ratio", False),
    # instruct: accuracy at the selected epoch minus the same run's zero-shot accuracy (epoch 0, before training)
    "accuracy_gain": ("fraction", True),
    # instruct: a metric of the LM evaluation harness (split = its task), e.g. acc or exact_match
    "lm_eval": ("fraction", True),
    "trainable_params": ("count", False),
    "total_params": ("count", False),
    "wall_time": ("s", False),
    "train_time": ("s", False),
    # process start to the end of the first optimizer step (interpreter, imports, model and data loading)
    "setup_time": ("s", False),
    # evaluation passes over the splits, all epochs together
    "eval_time": ("s", False),
    "median_step_time": ("s", False),
    "p95_step_time": ("s", False),
    # share of the training batches' token positions that were padding
    "padding_fraction": ("fraction", False),
    "examples_per_second": ("1/s", True),
    "tokens_per_second": ("1/s", True),
    "peak_rss": ("bytes", False),
    "peak_cuda_allocated": ("bytes", False),
    "peak_cuda_reserved": ("bytes", False),
    "weights_bytes": ("bytes", False),
    "gradients_bytes": ("bytes", False),
    "optimizer_state_bytes": ("bytes", False),
    # weights + gradients + optimizer state, exact (memory_time families use it when there is no GPU)
    "state_bytes": ("bytes", False),
    # the stored frozen base weights, including 4-bit packed codes and their quantization scales
    "base_weight_bytes": ("bytes", False),
    # LoRA runs (lora_bench.adapters.serving): the saved adapter, i.e. the trainable tensors as a safetensors file
    "adapter_bytes": ("bytes", False),
    # LoRA runs: forward latency per example with the adapter unmerged / merged into the weights / absent
    "inference_latency_unmerged": ("s", False),
    "inference_latency_merged": ("s", False),
    "inference_latency_base": ("s", False),
    # LoRA runs: inference_latency_unmerged / inference_latency_merged (1 = serving unmerged costs nothing)
    "inference_overhead": ("ratio", False),
}

LABEL_COLUMNS = ["run_id", "family", "family_kind", "variant", "seed", "is_baseline", "status", "method",
                 "data_seed", "train_seed", "setting", "sweep_stage"]

# Run-level metrics: (metric name, section of the record, key in that section).
RUN_LEVEL = [
    ("trainable_params", "params", "trainable"),
    ("total_params", "params", "total"),
    ("wall_time", "timing", "wall_time_s"),
    ("train_time", "timing", "train_time_s"),
    ("setup_time", "timing", "setup_s"),
    ("eval_time", "timing", "eval_s"),
    ("median_step_time", "timing", "median_step_s"),
    ("p95_step_time", "timing", "p95_step_s"),
    ("padding_fraction", "timing", "padding_fraction"),
    ("examples_per_second", "timing", "examples_per_s"),
    ("tokens_per_second", "timing", "tokens_per_s"),
    ("peak_rss", "memory", "peak_rss"),
    ("peak_cuda_allocated", "memory", "peak_cuda_allocated"),
    ("peak_cuda_reserved", "memory", "peak_cuda_reserved"),
    ("weights_bytes", "memory", "weights"),
    ("gradients_bytes", "memory", "gradients"),
    ("optimizer_state_bytes", "memory", "optimizer_state"),
    ("state_bytes", "memory", "state"),
    ("base_weight_bytes", "memory", "base_weights"),
    ("adapter_bytes", "memory", "adapter_bytes"),
    ("inference_latency_unmerged", "timing", "inference_unmerged_s"),
    ("inference_latency_merged", "timing", "inference_merged_s"),
    ("inference_latency_base", "timing", "inference_base_s"),
    ("inference_overhead", "timing", "inference_overhead"),
]


def _labels(record: dict, path: Path) -> dict:
    run = record.get("run") or {}
    family = run.get("family", "adhoc")
    variant = run.get("variant", path.stem)
    config = record.get("config") or {}
    seed = run.get("seed", config.get("seed"))
    # Records written before data and train seeds were labelled: both are in the resolved config.
    data_seed = run.get("data_seed", (config.get("data") or {}).get("split_seed"))
    return {
        "run_id": f"{family}/{variant}/seed{seed}",
        "family": family,
        "family_kind": run.get("family_kind", "generic"),
        "variant": variant,
        "seed": seed,
        "is_baseline": bool(run.get("is_baseline", False)),
        "status": record.get("status"),
        "method": config.get("method", {}).get("name"),
        "data_seed": data_seed,
        "train_seed": run.get("train_seed", seed),
        # the variant before data-seed expansion (families with data_seeds, sweeps), else the variant
        "setting": run.get("setting", variant),
        # sweep families: "sweep" (the one-run-per-configuration stage) or "rerun"; else empty
        "sweep_stage": run.get("sweep_stage", ""),
    }


def _metric_row(labels: dict, metric: str, split: str, epoch: int | None, stage: str, value) -> dict:
    unit, higher = METRIC_INFO[metric]
    return {**labels, "metric": metric, "split": split, "epoch": epoch, "stage": stage,
            "value": float(value), "unit": unit, "higher_is_better": higher}


def record_rows(record: dict, path: Path) -> tuple[dict, list[dict]]:
    """One ``runs`` row and the ``metrics`` rows of one record."""
    labels = _labels(record, path)
    env = record.get("environment") or {}
    git = env.get("git") or {}
    hardware = env.get("hardware") or {}
    sha = git.get("sha") or ""
    params = record.get("params") or {}
    diagnostics = record.get("diagnostics") or {}
    run_row = {
        **labels,
        "error": record.get("error") or "",
        "trainable_params": params.get("trainable"),
        "total_params": params.get("total"),
        "wall_time_s": (record.get("timing") or {}).get("wall_time_s"),
        "device": record.get("device") or "",
        # the CPU that did the arithmetic: another one may round differently (records before 2026-11-29: empty)
        "cpu_capability": hardware.get("cpu_capability") or "",
        "cpu_id": hardware.get("cpu_id") or "",
        "git_sha": sha + ("+dirty" if git.get("dirty") else ""),
        "record_path": str(path),
        # the training record this run's record was labelled from: runs with the same name are one computation
        "trained_from": record.get("trained_from") or "",
        "started_at": record.get("started_at"),
        # Layout version of these tables (stats, figures and report refuse others by name).
        "schema_version": SCHEMA_VERSION,
        "error_kind": record.get("error_kind") or "",
        # None for records written before runs said whether their numbers repeat bit for bit.
        "bitwise_reproducible": (record.get("determinism") or {}).get("bitwise_reproducible"),
        # Did it learn (lora_bench.run.diagnostics)? None for records written before runs said so.
        **{flag: diagnostics.get(flag) for flag in FLAGS},
        "trained": trained(diagnostics) if diagnostics else None,
        "learned_p": diagnostics.get("learned_p"),
        "loss_decrease_last_fifth": diagnostics.get("loss_decrease_last_fifth"),
        "plateau_curve": diagnostics.get("plateau_curve") or "",
        "expect": (record.get("run") or {}).get("expect", ""),
        # tuning families (kind tune): the family tuned, the key, the value this run used, the selection metric
        **{k: (record.get("run") or {}).get(k, d) for k, d in (("tunes", ""), ("tune_key", ""), ("tune_value", None),
                                                                ("tune_metric", ""), ("tune_extension", False),
                                                                ("tune_tie_break", ""), ("tune_tie_margin", None),
                                                                ("tune_tie_seed", False))},
        **{f"versions.{k}": v for k, v in (env.get("versions") or {}).items()},
        **{f"cfg.{k}": v for k, v in flatten(record.get("config") or {}).items()},
        **{f"data.{k}": v for k, v in (record.get("data") or {}).items() if k in ("origin", "mean_tokens")},
        # examples each split used (after data.max_examples): what the report's setup table says was used
        **{f"data.size.{k}": v for k, v in ((record.get("data") or {}).get("sizes") or {}).items()},
    }
    rows: list[dict] = []
    metrics = record.get("metrics") or {}
    epochs = metrics.get("epochs") or []
    for entry in epochs:
        epoch = entry["epoch"]
        # Epoch 0 is the zero-shot evaluation of a causal LM before any training (task instruct).
        stage = "zero_shot" if epoch == 0 else "epoch"
        if "train_loss" in entry:
            rows.append(_metric_row(labels, "loss", "train", epoch, stage, entry["train_loss"]))
        for split in ("train", "validation", "test"):
            for metric in ("accuracy", "macro_f1"):
                if f"{split}_{metric}" in entry:
                    rows.append(_metric_row(labels, metric, split, epoch, stage, entry[f"{split}_{metric}"]))
            if f"{split}_loss" in entry and split != "train":
                rows.append(_metric_row(labels, "loss", split, epoch, stage, entry[f"{split}_loss"]))
            if f"{split}_perplexity" in entry:
                rows.append(_metric_row(labels, "perplexity", split, epoch, stage, entry[f"{split}_perplexity"]))
    final = metrics.get("final") or {}
    selected = metrics.get("selected_epoch")
    zero_shot = next((entry for entry in epochs if entry["epoch"] == 0), None)
    for split in ("train", "validation", "test"):
        for metric in ("accuracy", "macro_f1"):
            if f"{split}_{metric}" in final:
                rows.append(_metric_row(labels, metric, split, selected, "final", final[f"{split}_{metric}"]))
        if f"{split}_perplexity" in final:  # a causal LM's held-out response loss is a result in itself
            for metric in ("loss", "perplexity"):
                rows.append(_metric_row(labels, metric, split, selected, "final", final[f"{split}_{metric}"]))
        if zero_shot is not None:
            if f"{split}_accuracy" in final and f"{split}_accuracy" in zero_shot:
                gain = final[f"{split}_accuracy"] - zero_shot[f"{split}_accuracy"]
                rows.append(_metric_row(labels, "accuracy_gain", split, selected, "final", gain))
    harness = []
    for task_name, values in (final.get("lm_eval") or {}).items():
        for name, value in values.items():
            if name in ("acc", "acc_norm", "exact_match", "mc2"):
                rows.append(_metric_row(labels, "lm_eval", f"{task_name}:{name}", selected, "final", value))
                if name in ("acc", "exact_match", "mc2"):
                    harness.append(value)
    if harness:  # one number per run for the claims: the unweighted mean over the harness tasks
        rows.append(_metric_row(labels, "lm_eval", "mean", selected, "final", sum(harness) / len(harness)))
    last_epoch = epochs[-1]["epoch"] if epochs else None
    for metric, section, key in RUN_LEVEL:
        value = (record.get(section) or {}).get(key)
        if value is not None:
            rows.append(_metric_row(labels, metric, "none", last_epoch, "final", value))
    return run_row, rows


# The predictions table (docs/tables.md): one row per run x split x example, from the records' ``predictions``.
PREDICTION_LABELS = ["run_id", "family", "family_kind", "variant", "setting", "seed", "data_seed", "train_seed",
                     "is_baseline"]
PREDICTION_COLUMNS = [*PREDICTION_LABELS, "data_key", "split", "epoch", "stage", "example_id", "gold", "predicted",
                      "correct", "gold_logp", "gold_loglik", "schema_version"]


def data_key(record: dict) -> str:
    """What an ``example_id`` indexes: ``<data.source>:<data.name>`` (ids are rows of that source, whatever the
    split seed, caps or task), so two runs' examples pair only when their keys are equal."""
    data = (record.get("config") or {}).get("data") or {}
    return f"{data.get('source')}:{data.get('name')}"


def prediction_rows(record: dict, labels: dict) -> list[pd.DataFrame]:
    """The predictions rows of one record (none for failed runs and records without ``predictions``): stage
    ``final``, the selected epoch's validation and test blocks; stage ``epoch``, the test block after each epoch of
    a run that tested after every epoch (``predictions.epochs``), as the metrics table's stages."""
    section = record.get("predictions") or {}
    blocks = [("final", split, section.get("epoch"), block) for split, block in (section.get("splits") or {}).items()]
    blocks += [("epoch", split, int(epoch), block) for epoch, splits in (section.get("epochs") or {}).items()
               for split, block in splits.items()]
    frames = []
    for stage, split, epoch, block in blocks:
        columns = decode_block(block)
        n = len(columns["example_id"])
        frame = pd.DataFrame({
            **{key: [labels[key]] * n for key in PREDICTION_LABELS},
            "data_key": data_key(record), "split": split, "epoch": epoch, "stage": stage,
            "example_id": columns["example_id"].astype("int64"), "gold": columns["gold"].astype("int32"),
            "predicted": columns["predicted"].astype("int32"), "correct": columns["correct"],
            "gold_logp": columns["gold_logp"].astype("float32"),
            "gold_loglik": columns.get("gold_loglik", np.full(n, np.nan)).astype("float32"),
            "schema_version": SCHEMA_VERSION,
        })
        frames.append(frame)
    return frames


def collect(record_paths: list[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``runs`` and ``metrics`` tables of the records (``collect_all`` adds ``predictions``)."""
    return collect_all(record_paths, predictions=False)[:2]


def collect_all(record_paths: list[str | Path], predictions: bool = True
                ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The ``runs``, ``metrics`` and ``predictions`` tables, each record read once."""
    run_rows, metric_rows, prediction_frames = [], [], []
    for path in sorted(Path(p) for p in record_paths):
        record = read_record(path)
        run_row, rows = record_rows(record, path)
        run_rows.append(run_row)
        metric_rows.extend(rows)
        if predictions and record.get("status") == "ok":
            prediction_frames.extend(prediction_rows(record, run_row))
    runs = pd.DataFrame(run_rows)
    metrics = pd.DataFrame(metric_rows, columns=LABEL_COLUMNS + ["metric", "split", "epoch", "stage", "value",
                                                                 "unit", "higher_is_better"])
    if not runs.empty:
        duplicated = runs["run_id"][runs["run_id"].duplicated()].tolist()
        if duplicated:
            raise ValueError(f"duplicate run ids in the records: {duplicated[:5]}")
        metrics["epoch"] = metrics["epoch"].astype("Int64")
    table = (pd.concat(prediction_frames, ignore_index=True) if prediction_frames
             else pd.DataFrame({c: pd.Series(dtype=PREDICTION_DTYPES.get(c, "object")) for c in PREDICTION_COLUMNS}))
    return runs, metrics, table.reindex(columns=PREDICTION_COLUMNS)


PREDICTION_DTYPES = {"seed": "int64", "data_seed": "int64", "train_seed": "int64", "is_baseline": "bool",
                     "epoch": "int64", "example_id": "int64", "gold": "int32", "predicted": "int32", "correct": "bool",
                     "gold_logp": "float32", "gold_loglik": "float32", "schema_version": "int64"}


def write_tables(runs: pd.DataFrame, metrics: pd.DataFrame, out_dir: str | Path,
                 predictions: pd.DataFrame | None = None) -> list[Path]:
    """``runs`` and ``metrics`` as parquet + CSV; ``predictions`` (when given) as parquet only: one row per
    example per run is too many for a CSV to be worth reading by hand."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    frames = [("runs", runs, (".parquet", ".csv")), ("metrics", metrics, (".parquet", ".csv"))]
    if predictions is not None:
        frames.append(("predictions", predictions, (".parquet",)))
    for name, frame, suffixes in frames:
        for suffix in suffixes:
            path = out_dir / f"{name}{suffix}"
            write_table(frame, path)
            written.append(path)
            fault_point("tables_write", str(out_dir))
    return written


READABLE_TABLE_VERSIONS = READABLE_RECORD_VERSIONS


def check_tables(tables_dir: str | Path) -> None:
    """Refuse, by name and version, a ``runs`` table that this lora-bench did not write (or cannot read)."""
    import pyarrow.parquet as pq

    path = Path(tables_dir) / "runs.parquet"
    try:
        names = pq.read_schema(path).names
        versions = (pd.read_parquet(path, columns=["schema_version"])["schema_version"].dropna().unique().tolist()
                    if "schema_version" in names else [None])
    except (OSError, ValueError) as exc:
        raise RecordError(f"table {path} is missing or unreadable: {exc}; run `collect` (or snakemake) again") from exc
    for version in versions or [SCHEMA_VERSION]:
        check_version(int(version) if version is not None else None, READABLE_TABLE_VERSIONS, f"table {path}")
