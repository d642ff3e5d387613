"""The training loop: one seeded run from a ``RunConfig`` to a metrics dictionary.

One seed controls everything that is random in a run (head and LoRA initialisation, data order,
dropout) so that, on CPU, the same config and seed give identical metrics. Validation and test
accuracy and macro-F1 are measured after every epoch; the run's reported ("final") numbers are those of the
epoch with the best validation accuracy, which is what evaluating the best-validation checkpoint
on test (the reference recipe) gives, without storing checkpoints. With ``train.checkpoint: epoch`` the
loop saves its whole state after every epoch (``checkpoint.py``) and a re-started run continues from
there, with the metrics an uninterrupted run gives.

The loop is shared by every task (``lora_bench.run.tasks``: classification, instruction finetuning of a causal
LM; the contract is ``tasks.base.Task``): the task supplies the model, batches, loss and evaluation (and, for
causal LMs, an epoch-0 zero-shot evaluation); the loop owns optimizer, schedule, accumulation, precision, the NaN
stop and the records. ``run_training`` reads as its parts: ``set_up`` (device, seeds, task, model, method,
optimizer, schedule), ``resume_or_start`` (a checkpoint's progress, or the zero-shot epoch 0), ``train_epoch``
(the step loop of one epoch) and its evaluation, then ``collect_result`` (selection, memory, timing, the record).
"""

from __future__ import annotations

import math
import os
import random
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lora_bench.adapters.lora import count_parameters, optimizer_groups
from lora_bench.adapters.serving import serving_batches, serving_costs
from lora_bench.config import RunConfig, TrainConfig
from lora_bench.run.checkpoint import load_checkpoint, save_checkpoint
from lora_bench.run.data import SPLITS
from lora_bench.run.diagnostics import LOSS_POINTS_PER_EPOCH, diagnose
from lora_bench.run.frozen import attach_frozen_prefix
from lora_bench.run.methods import prepare_model
from lora_bench.run.models import LoadedModel, materialize, on_meta
from lora_bench.run.predictions import predictions_section, take_items
from lora_bench.run.tasks import TASKS, Task
from lora_bench.run.tasks.base import precision_autocast
from lora_bench.warm import IN_WORKER_ENV, PROCESS_STARTED_ENV, own_start_time

# Steps excluded from step times and throughput: the first ones pay for allocator warm-up and lazy init.
WARMUP_STEPS = 3
# Length-grouped batching sorts within buckets of this many batches: enough neighbours of similar length to
# cut padding, few enough that a batch still mixes examples from across the shuffled epoch.
LENGTH_BUCKET_BATCHES = 50


def process_started() -> float:
    """``time.time()`` at which this run's command started (Linux: /proc), else when this module was imported.

    ``timing.setup_s`` counts from here, so interpreter start and imports are part of a run's set-up cost. A
    run forked by a warm worker (lora_bench.warm) counts from the start of the command that handed it over.
    """
    if PROCESS_STARTED_ENV in os.environ:
        return float(os.environ[PROCESS_STARTED_ENV])
    return own_start_time(fallback=_IMPORTED_AT)


_IMPORTED_AT = time.time()


class TrainingFailed(RuntimeError):
    """The run could not finish (e.g. the loss became NaN); the message says where."""


class NonFiniteLoss(TrainingFailed):
    """The training loss became NaN or infinite: the run stops at that step (its record says ``non_finite_loss``)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(train: TrainConfig) -> torch.device:
    if train.device == "cuda" and not torch.cuda.is_available():
        raise TrainingFailed("train.device is cuda but no CUDA device is available")
    if train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(train.device)


def build_optimizer(params: list[nn.Parameter] | list[dict], train: TrainConfig) -> torch.optim.Optimizer:
    builders = {
        "adamw": lambda: torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay),
        "sgd": lambda: torch.optim.SGD(params, lr=train.lr, momentum=train.momentum,
                                       weight_decay=train.weight_decay),
    }
    return builders[train.optimizer]()


SCHEDULES = {
    "constant": lambda progress: 1.0,
    "linear": lambda progress: max(0.0, 1.0 - progress),
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))),
}


def build_schedule(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    warmup = int(round(train.warmup_ratio * total_steps))
    decay = SCHEDULES[train.schedule]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return decay((step - warmup) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of similar length, reproducible per seed: shuffle, cut into buckets of
    ``LENGTH_BUCKET_BATCHES`` batches, sort each bucket by length, cut it into batches, shuffle the batches.

    Every draw comes from ``generator`` (the run's data-order generator, saved in checkpoints), so a seed gives
    the same batches on every machine and a resumed run continues the same order.
    """

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator):
        self.lengths, self.batch_size, self.generator = lengths, batch_size, generator

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        bucket = self.batch_size * LENGTH_BUCKET_BATCHES
        batches = []
        for start in range(0, len(order), bucket):
            # A stable sort: ties keep their shuffled order, so equal lengths still mix.
            chunk = sorted(order[start : start + bucket], key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        return iter([batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()])


def train_loader(split, train: TrainConfig, generator: torch.Generator, collate) -> torch.utils.data.DataLoader:
    """The training batches: shuffled per seed, or length-grouped (``train.length_grouping``) to pad less."""
    if train.length_grouping:
        lengths = [len(ids) for ids in split["input_ids"]]
        return torch.utils.data.DataLoader(split, batch_sampler=LengthGroupedBatches(lengths, train.batch_size,
                                                                                     generator), collate_fn=collate)
    return torch.utils.data.DataLoader(split, batch_size=train.batch_size, shuffle=True, generator=generator,
                                       collate_fn=collate)


def _evaluate_splits(task, model: nn.Module, train_cfg: TrainConfig, splits=SPLITS) -> dict:
    record = {}
    for name in splits:
        if name == "train" and not train_cfg.eval_train:
            continue
        record.update({f"{name}_{key}": value for key, value in task.evaluate(model, name).items()})
    return record


class BestEpoch:
    """Test evaluated once, at the epoch selection picks, instead of after every epoch (``train.test_every_epoch:
    false``): the trainable weights of the best epoch so far are kept (a copy of the adapters, or of the whole
    model for full finetuning) and put back for the one test pass, which gives the numbers a per-epoch test
    pass would have given at that epoch. Selection reads validation only, so nothing else changes.
    """

    def __init__(self, task, model: nn.Module, train_cfg: TrainConfig):
        self.task, self.model, self.train_cfg = task, model, train_cfg
        self.best: dict | None = None
        self.weights: dict[str, torch.Tensor] = {}

    def after_epoch(self, record: dict) -> None:
        if self.best is None or self.task.select(record) > self.task.select(self.best):
            self.best = record
            self.weights = {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()
                            if p.requires_grad}

    def evaluate_test(self, last_epoch: int) -> None:
        """Test metrics into the best epoch's record, with the weights it had (restored if training went on)."""
        if self.best["epoch"] != last_epoch:
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    if name in self.weights:
                        param.copy_(self.weights[name])
        self.best.update(_evaluate_splits(self.task, self.model, self.train_cfg, splits=("test",)))


# The LoRA factors' parameter names: ours (<layer>.lora.A / .B) and peft's (<layer>.lora_A.default.weight).
ADAPTER_PARAMETER = re.compile(r"\.lora(?:_[AB])?\.")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Exact bytes of weights (parameters + buffers, incl. 4-bit packed codes and scales), gradients,
    optimizer state, their sum, and the stored base weights (everything but the LoRA factors).

    On CPU this is the memory figure that does not depend on the allocator; activations are not in it.
    """
    weights = sum(_nbytes(p) for p in model.parameters()) + sum(_nbytes(b) for b in model.buffers())
    adapters = sum(_nbytes(p) for name, p in model.named_parameters() if ADAPTER_PARAMETER.search(f".{name}"))
    grads = sum(_nbytes(p) for p in model.parameters() if p.requires_grad)
    opt_state = sum(
        _nbytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    )
    return {"weights": weights, "gradients": grads, "optimizer_state": opt_state,
            "state": weights + grads + opt_state, "base_weights": weights - adapters}


def peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def step_throughput(steps: dict[str, list]) -> dict:
    """Step times (median, p95) and examples/s, tokens/s over the timed steps: every optimizer step after the
    first ``WARMUP_STEPS`` (all of them when a run has no more), and the share of padding in its batches.

    Warm-up steps pay for allocator growth and lazy initialisation; counting them would make a run with a
    costlier first step (e.g. 4-bit dequantisation kernels compiling) look faster or slower than it is.
    """
    seconds = steps["seconds"]
    warmup = WARMUP_STEPS if len(seconds) > WARMUP_STEPS else 0
    timed = slice(warmup, None)
    timed_seconds = sum(seconds[timed])
    out = {"warmup_steps": warmup, "timed_steps": len(seconds) - warmup,
           "median_step_s": statistics.median(seconds[timed]) if seconds else None,
           "p95_step_s": float(np.percentile(seconds[timed], 95)) if seconds else None,
           "examples_per_s": None, "tokens_per_s": None, "padding_fraction": None}
    if timed_seconds > 0 and len(steps["examples"]) == len(seconds):
        out["examples_per_s"] = sum(steps["examples"][timed]) / timed_seconds
        out["tokens_per_s"] = sum(steps["tokens"][timed]) / timed_seconds
    if sum(steps["padded"]):
        out["padding_fraction"] = 1 - sum(steps["tokens"]) / sum(steps["padded"])
    return out


@dataclass
class RunResult:
    metrics: dict
    params: dict
    timing: dict
    memory: dict
    model_info: dict
    data_info: dict
    method_info: dict
    device: str
    diagnostics: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # The selected epoch's per-example results (lora_bench.run.predictions), for the record's ``predictions``.
    predictions: dict = field(default_factory=dict)


def _progress(iterable, cfg: TrainConfig, desc: str, total: int):
    show = cfg.progress == "always" or (cfg.progress == "auto" and sys.stderr.isatty())
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


@dataclass
class Setup:
    """A run ready for its first step: the task, the adapted model on its device, and what updates it.

    Built by ``set_up`` in a fixed order (seed, load, re-seed, adapt, then the data order and the optimizer), which
    is what makes a seed give the same run; ``checkpoint_file`` is None unless per-epoch checkpoints are on.
    """

    cfg: RunConfig
    device: torch.device
    task: Task
    loaded: LoadedModel
    splits: dict
    data_info: dict
    model: nn.Module
    method_info: dict
    trainable: int
    total: int
    generator: torch.Generator
    loader: torch.utils.data.DataLoader
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    total_steps: int
    checkpoint_file: str | Path | None

    @property
    def checkpointing(self) -> bool:
        return self.checkpoint_file is not None

    def checkpoint_state(self) -> dict:
        """What a checkpoint saves and restores besides the loop's progress."""
        return {"config": self.cfg.to_dict(), "model": self.model, "optimizer": self.optimizer,
                "scheduler": self.scheduler, "scaler": self.scaler, "generator": self.generator}


@dataclass
class Progress:
    """The loop's bookkeeping so far; checkpoints save it (``saved``) but for the notes and the first step's clock."""

    epochs: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    loss_curve: list = field(default_factory=list)
    # Per optimizer step: seconds, examples, real tokens, padded tokens (throughput leaves out warm-up steps).
    steps: dict = field(default_factory=lambda: {"seconds": [], "examples": [], "tokens": [], "padded": []})
    step: int = 0
    first_epoch: int = 1
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    first_step_at: float | None = None

    @property
    def trained(self) -> list[dict]:
        """The records of trained epochs (without a zero-shot epoch 0)."""
        return [record for record in self.epochs if record["epoch"] >= 1]

    def resume(self, saved: dict) -> None:
        """Continue from a checkpoint's progress (older checkpoints kept only the step times)."""
        self.epochs, self.step, self.loss_curve = saved["epochs"], saved["step"], saved.get("loss_curve", [])
        self.steps = saved.get("steps") or {"seconds": saved["step_times"], "examples": [], "tokens": [],
                                            "padded": []}
        self.train_seconds, self.first_epoch = saved["train_seconds"], saved["epoch"] + 1
        self.eval_seconds = saved.get("eval_seconds", 0.0)
        self.notes.append(f"resumed from the checkpoint saved after epoch {saved['epoch']}")

    def saved(self, epoch: int) -> dict:
        """The progress a checkpoint written after ``epoch`` holds."""
        return {"epoch": epoch, "epochs": self.epochs, "step": self.step, "steps": self.steps,
                "step_times": self.steps["seconds"], "loss_curve": self.loss_curve,
                "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds}

    def count_step(self, seconds: float, examples: int, tokens: int, padded: int) -> None:
        self.first_step_at = self.first_step_at or time.time()
        for key, value in (("seconds", seconds), ("examples", examples), ("tokens", tokens), ("padded", padded)):
            self.steps[key].append(value)


def _load_and_adapt(cfg: RunConfig, device: torch.device) -> tuple:
    """(task, loaded, splits, data info, the model to train, method info, trainable and total parameter counts)."""
    seed_everything(cfg.seed)
    task = TASKS[cfg.task](cfg, device, lambda: precision_autocast(device, cfg.train.precision))
    loaded, splits, data_info = task.load()
    model = loaded.model
    # Re-seed after loading so the LoRA init and data order do not depend on how many random
    # draws the model constructor happened to make.
    seed_everything(cfg.seed)
    # Models are built on the device (models.materialize); a pretrained one loaded on the CPU moves first, then is
    # adapted: QLoRA quantizes on the target device, and bitsandbytes only on CUDA. A random model for QLoRA is
    # still on the meta device: QLoRA materializes and quantizes it layer by layer, and the rest is materialized
    # after it (the 16-bit model is never whole on the device).
    if not on_meta(model):
        model.to(device)
    method_info = prepare_model(model, task.method(cfg.method), device)
    if on_meta(model):
        materialize(model, device)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise TrainingFailed(f"method {cfg.method.name!r} left no trainable parameter")
    # train.frozen_prefix: the frozen layers below the first trainable block in eval mode, their outputs cached.
    model, method_info["frozen_prefix"] = attach_frozen_prefix(model, cfg, task, splits, device)
    return task, loaded, splits, data_info, model, method_info, trainable, total


def set_up(cfg: RunConfig, checkpoint_file: str | Path | None = None) -> Setup:
    """Device, threads and determinism, the task's model and data, the method, data order, optimizer, schedule."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    task, loaded, splits, data_info, model, method_info, trainable, total = _load_and_adapt(cfg, device)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = train_loader(splits["train"], cfg.train, generator, task.collate)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(optimizer_groups(model, cfg.train.lr, cfg.train.lora_plus_ratio), cfg.train)
    steps_per_epoch = math.ceil(len(loader) / cfg.train.grad_accum)
    total_steps = steps_per_epoch * cfg.train.epochs
    return Setup(
        cfg=cfg, device=device, task=task, loaded=loaded, splits=splits, data_info=data_info, model=model,
        method_info=method_info, trainable=trainable, total=total, generator=generator, loader=loader,
        params=params, optimizer=optimizer, scheduler=build_schedule(optimizer, cfg.train, total_steps),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16"),
        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        checkpoint_file=checkpoint_file if cfg.train.checkpoint == "epoch" else None,
    )


def resume_or_start(run: Setup) -> Progress:
    """The progress to start from: a checkpoint's, else none, with the zero-shot epoch 0 when the task has one."""
    cfg, task = run.cfg, run.task
    progress = Progress(notes=list(run.method_info["frozen_prefix"].get("notes", [])))
    resumed, note = (load_checkpoint(run.checkpoint_file, **run.checkpoint_state()) if run.checkpointing
                     else (None, None))
    progress.notes += [note] if note else []
    if resumed:
        progress.resume(resumed)
    elif task.zero_shot and cfg.train.evaluate:
        # Epoch 0: the adapted but untrained model (LoRA's B is zero, so it computes what the base model does).
        eval_start = time.perf_counter()
        zero_shot = task.zero_shot_metrics(lambda: _evaluate_splits(task, run.model, cfg.train))
        # A cached zero-shot result holds every split; a run that must not see the test split drops it.
        progress.epochs.append({"epoch": 0, **{k: v for k, v in zero_shot.items()
                                               if cfg.train.evaluate_test or not k.startswith("test_")}})
        progress.eval_seconds += time.perf_counter() - eval_start
    if run.device.type == "cuda":
        # Peak memory of training, not of loading the dense model before quantizing it.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(run.device)
    return progress


def _optimizer_step(run: Setup) -> None:
    """Clip (if asked), step, update the fp16 loss scale, clear the gradients, advance the schedule."""
    if run.cfg.train.max_grad_norm is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.params, run.cfg.train.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()


def train_epoch(run: Setup, progress: Progress, epoch: int, max_steps: int) -> dict:
    """One pass over the training batches (or until ``max_steps``): the epoch's record, with its mean train loss.

    Gradients accumulate over ``train.grad_accum`` micro-batches (the last one of the epoch always steps). The
    training loss is also logged at ``LOSS_POINTS_PER_EPOCH`` evenly spaced steps (mean since the previous point),
    for the plateau diagnostic: the epoch's mean alone says nothing about the slope at the end of a one-epoch run.
    """
    cfg, model, loader = run.cfg.train, run.model, run.loader
    model.train()
    loss_sum, loss_count = 0.0, 0
    epoch_start = step_start = time.perf_counter()
    examples = tokens = padded = 0
    epoch_first_step = progress.step
    epoch_steps = min(run.steps_per_epoch, max_steps - progress.step)
    point_sum, point_count, points_logged = 0.0, 0, 0
    for micro_step, batch in enumerate(_progress(loader, cfg, f"epoch {epoch}", len(loader))):
        loss, weight, n_examples, n_tokens = run.task.loss(model, batch)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss.item()} at epoch {epoch}, step {progress.step + 1}")
        run.scaler.scale(loss / cfg.grad_accum).backward()
        loss_value = loss.item()
        loss_sum += loss_value * weight
        loss_count += weight
        point_sum += loss_value * weight
        point_count += weight
        examples += n_examples
        tokens += n_tokens
        padded += batch["input_ids"].numel() if "input_ids" in batch else n_tokens
        if (micro_step + 1) % cfg.grad_accum and micro_step + 1 != len(loader):
            continue
        _optimizer_step(run)
        progress.step += 1
        point = (progress.step - epoch_first_step) * LOSS_POINTS_PER_EPOCH // max(1, epoch_steps)
        if point > points_logged:
            progress.loss_curve.append([progress.step, point_sum / point_count])
            point_sum, point_count, points_logged = 0.0, 0, point
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        now = time.perf_counter()
        progress.count_step(now - step_start, examples, tokens, padded)
        step_start, examples, tokens, padded = now, 0, 0, 0
        if progress.step >= max_steps:
            break
    progress.train_seconds += time.perf_counter() - epoch_start
    return {"epoch": epoch, "train_loss": loss_sum / loss_count}


def run_training(cfg: RunConfig, checkpoint_file: str | Path | None = None) -> RunResult:
    """Train and evaluate one run as ``cfg`` says.

    ``checkpoint_file``: where per-epoch checkpoints go when ``cfg.train.checkpoint`` is ``epoch``; a
    checkpoint already there for the same config is resumed from.
    """
    started = time.perf_counter()
    run = set_up(cfg, checkpoint_file)
    progress = resume_or_start(run)
    # Per-epoch test passes are kept when a family asks for test curves, and with checkpoints (a resumed run has
    # no copy of an earlier epoch's weights).
    test_once = cfg.train.evaluate_test and not cfg.train.test_every_epoch and not run.checkpointing
    best_epoch = BestEpoch(run.task, run.model, cfg.train) if cfg.train.evaluate and test_once else None
    epoch_splits = tuple(s for s in SPLITS if s != "test" or (cfg.train.evaluate_test and not test_once))
    max_steps = cfg.train.max_steps or run.total_steps
    for epoch in range(progress.first_epoch, cfg.train.epochs + 1):
        if progress.step >= max_steps:
            break
        record = train_epoch(run, progress, epoch, max_steps)
        if cfg.train.evaluate:
            eval_start = time.perf_counter()
            record.update(_evaluate_splits(run.task, run.model, cfg.train, epoch_splits))
            progress.eval_seconds += time.perf_counter() - eval_start
            if best_epoch:
                best_epoch.after_epoch(record)
        progress.epochs.append(record)
        if run.checkpointing:
            save_checkpoint(run.checkpoint_file, **run.checkpoint_state(), progress=progress.saved(epoch))
    if best_epoch:
        eval_start = time.perf_counter()
        best_epoch.evaluate_test(progress.trained[-1]["epoch"])
        progress.eval_seconds += time.perf_counter() - eval_start
    return collect_result(run, progress, started)


def _memory(run: Setup) -> dict:
    """Peak memory of the process (and of CUDA), the exact state bytes, then the shipped adapter's bytes."""
    memory = {"peak_rss": peak_rss_bytes(), **state_bytes(run.model, run.optimizer)}
    if run.device.type == "cuda":
        memory["peak_cuda_allocated"] = torch.cuda.max_memory_allocated(run.device)
        memory["peak_cuda_reserved"] = torch.cuda.max_memory_reserved(run.device)
    return memory


def _timing(progress: Progress, started: float, served: dict) -> dict:
    steps = progress.steps
    return {
        "wall_time_s": time.perf_counter() - started,
        # Process start (interpreter, imports, model and data loading) to the end of the first optimizer step.
        "setup_s": progress.first_step_at - process_started() if progress.first_step_at else None,
        # Forked from a warm worker that had imported torch and transformers already (lora_bench.warm).
        "warm_worker": IN_WORKER_ENV in os.environ,
        "train_time_s": progress.train_seconds,
        "eval_s": progress.eval_seconds,
        "optimizer_steps": progress.step,
        **step_throughput(steps),
        **served,
        "threads": torch.get_num_threads(),
        # Per optimizer step, in order (data loading + forward + backward + update): throughput and percentiles
        # over any window can be recomputed, e.g. by benchmarks/bench_peer.py.
        "step_times_s": steps["seconds"],
        **({"step_examples": steps["examples"]} if len(steps["examples"]) == len(steps["seconds"]) else {}),
    }


def collect_result(run: Setup, progress: Progress, started: float) -> RunResult:
    """The run's record sections: the selected epoch's metrics, diagnostics, parameters, memory, timing, serving."""
    cfg, task, model, epochs = run.cfg, run.task, run.model, progress.epochs
    trained = progress.trained
    # The selected epoch's blocks are kept, and the test blocks of every epoch of a run that tested after each.
    items = {record["epoch"]: take_items(record) for record in epochs}
    best = max(trained, key=task.select) if cfg.train.evaluate else trained[-1]
    final = {k: v for k, v in best.items() if k != "epoch"}
    final.update(task.after_training(model))
    memory = _memory(run)
    # After the peaks are read: the merged copies timed here are not part of training's memory.
    shipped, served = serving_costs(model, task.loss, serving_batches(run.splits["validation"], task.collate,
                                                                      cfg.train.batch_size), run.device)
    memory.update(shipped)
    device_name = str(run.device)
    if run.device.type == "cuda":
        device_name += f" ({torch.cuda.get_device_name(run.device)})"
    return RunResult(
        metrics={"epochs": epochs, "selected_epoch": best["epoch"], "final": final,
                 "train_loss_curve": progress.loss_curve},
        diagnostics=diagnose(best, progress.loss_curve, best["epoch"], trained[-1]["epoch"],
                             [e.get("validation_loss") for e in trained]) if cfg.train.evaluate else {},
        params={"trainable": run.trainable, "total": run.total, "trainable_fraction": run.trainable / run.total},
        timing=_timing(progress, started, served),
        memory=memory,
        model_info=run.loaded.info,
        data_info=run.data_info,
        method_info=run.method_info,
        device=device_name,
        notes=progress.notes,
        predictions=predictions_section(best["epoch"], items[best["epoch"]], items),
    )
