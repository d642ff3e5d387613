"""The training loop: one seeded run from a ``RunConfig`` to a metrics dictionary.

One seed controls everything that is random in a run (head and LoRA initialisation, data order,
dropout) so that, on CPU, the same config and seed give identical metrics. Validation and test
accuracy and macro-F1 are measured after every epoch; the run's reported ("final") numbers are those of the
epoch with the best validation accuracy, which is what evaluating the best-validation checkpoint
on test (the reference recipe) gives, without storing checkpoints. With ``train.checkpoint: epoch`` the
loop saves its whole state after every epoch (``checkpoint.py``) and a re-started run continues from
there, with the metrics an uninterrupted run gives.

The loop is shared by every task (``TASKS``: classification here, instruction finetuning of a causal LM in
``causal.py``): the task supplies the model, batches, loss and evaluation (and, for causal LMs, an epoch-0
zero-shot evaluation); the loop owns optimizer, schedule, accumulation, precision, the NaN stop and the records.
"""

from __future__ import annotations

import inspect
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
from lora_bench.config import ConfigError, MethodConfig, RunConfig, TrainConfig
from lora_bench.run.causal import InstructTask
from lora_bench.run.checkpoint import load_checkpoint, save_checkpoint
from lora_bench.run.data import SPLITS, macro_f1, prepare_splits
from lora_bench.run.diagnostics import LOSS_POINTS_PER_EPOCH, diagnose, prediction_shape
from lora_bench.run.frozen import attach_frozen_prefix
from lora_bench.run.methods import builds_layer_by_layer, prepare_model
from lora_bench.run.models import load_model, load_tokenizer, materialize, max_positions, on_meta
from lora_bench.run.predictions import ITEMS_KEY, dataset_example_ids, item_block, predictions_section, take_items
from lora_bench.warm import IN_WORKER_ENV, PROCESS_STARTED_ENV

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
    try:
        with open("/proc/self/stat") as stat:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


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


def make_collate(pad_id: int):
    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        # Dynamic padding: each batch is padded only to its own longest example.
        longest = max(len(example["input_ids"]) for example in batch)
        input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, example in enumerate(batch):
            ids = example["input_ids"]
            input_ids[row, : len(ids)] = torch.as_tensor(ids)
            attention_mask[row, : len(ids)] = 1
        labels = torch.as_tensor([example["labels"] for example in batch], dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "token_type_ids" in batch[0]:
            # Sentence pairs: segment ids, padded with 0 like the first segment.
            token_types = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, example in enumerate(batch):
                token_types[row, : len(example["token_type_ids"])] = torch.as_tensor(example["token_type_ids"])
            out["token_type_ids"] = token_types
        return out

    return collate


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


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def _by_length(split):
    lengths = [len(ids) for ids in split["input_ids"]]
    return split.select(sorted(range(len(lengths)), key=lengths.__getitem__))


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


def accepted_inputs(model: nn.Module) -> frozenset[str]:
    """The batch keys ``model.forward`` takes: DistilBERT, MPNet and Llama have no ``token_type_ids``, and
    RoBERTa/DeBERTa take them but have fewer than two segment embeddings, so segment 1 would not exist."""
    names = set(inspect.signature(model.forward).parameters)
    if getattr(model.config, "type_vocab_size", 2) < 2:
        names.discard("token_type_ids")
    return frozenset(names & {"input_ids", "attention_mask", "token_type_ids"})


def _model_inputs(batch: dict, device: torch.device, accepted: frozenset[str] | None = None) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k != "labels" and (accepted is None or k in accepted)}


@torch.no_grad()
def evaluate(model, loader, device, precision, accepted: frozenset[str] | None = None) -> dict:
    """Accuracy, mean loss and macro-F1 (the mean of per-class F1, so every class counts alike)."""
    model.eval()
    loss_sum = 0.0
    predictions, truth, gold_logp = [], [], []
    for batch in loader:
        with _autocast(device, precision):
            logits = model(**_model_inputs(batch, device, accepted)).logits.float()
        labels = batch["labels"].to(device)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        predictions.append(logits.argmax(-1).cpu())
        truth.append(labels.cpu())
        gold_logp.append(torch.log_softmax(logits, -1).gather(1, labels[:, None])[:, 0].cpu())
    predicted, actual = torch.cat(predictions).numpy(), torch.cat(truth).numpy()
    out = {"accuracy": float((predicted == actual).mean()), "loss": loss_sum / len(actual),
           "macro_f1": macro_f1(actual, predicted), **prediction_shape(actual, predicted)}
    ids = dataset_example_ids(loader.dataset)  # the loader does not shuffle: its rows are the dataset's, in order
    if ids is not None:
        out[ITEMS_KEY] = item_block(ids, actual, predicted, torch.cat(gold_logp).numpy())
    return out


def check_max_length(cfg: RunConfig, model: nn.Module) -> None:
    """``data.max_length`` must fit the model's position embeddings, or long inputs would index past them."""
    limit = max_positions(model.config)
    if limit is not None and cfg.data.max_length > limit:
        raise ConfigError(
            f"{cfg.source}: data.max_length {cfg.data.max_length} is longer than model {cfg.model.name!r} "
            f"accepts ({limit} positions, from its max_position_embeddings); set data.max_length <= {limit}"
        )


class ClassificationTask:
    """A sequence-classification head on the model, cross-entropy on the labels, accuracy and macro-F1.

    A task gives the shared training loop in ``run_training`` its model, batches, loss and evaluation; the
    loop keeps everything else (optimizer, schedule, accumulation, precision, NaN stop, per-epoch records).
    """

    name = "classification"
    zero_shot = False  # a freshly initialised head has nothing to measure before training

    def __init__(self, cfg: RunConfig, device: torch.device, autocast=None):
        self.cfg, self.device = cfg, device
        self.eval_loaders: dict = {}

    @staticmethod
    def prepare_data(cfg: RunConfig):
        tokenizer_id = f"{cfg.model.source}:{cfg.model.name}"
        return prepare_splits(cfg.data, load_tokenizer(cfg.model), tokenizer_id)

    def load(self):
        # The label set comes from the data, so the data is prepared first and the head sized to it.
        splits, data_info = self.prepare_data(self.cfg)
        loaded = load_model(self.cfg.model, num_labels=len(data_info["label_names"]), device=self.device,
                            defer=builds_layer_by_layer(self.cfg.method))
        check_max_length(self.cfg, loaded.model)
        self.accepted = accepted_inputs(loaded.model)
        pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        self.collate = make_collate(pad_id)
        # Evaluation order does not change accuracy, so sort by length: batches of similar lengths pad less.
        self.eval_loaders = {
            name: torch.utils.data.DataLoader(_by_length(splits[name]), batch_size=self.cfg.train.eval_batch_size,
                                              collate_fn=self.collate)
            for name in SPLITS
        }
        return loaded, splits, data_info

    def method(self, method: MethodConfig) -> MethodConfig:
        return method

    def loss(self, model: nn.Module, batch: dict):
        """(mean loss, its weight in the epoch's mean, examples, tokens) of one micro-batch."""
        labels = batch["labels"].to(self.device)
        with _autocast(self.device, self.cfg.train.precision):
            logits = model(**_model_inputs(batch, self.device, self.accepted)).logits.float()
        loss = nn.functional.cross_entropy(logits, labels)
        return loss, len(labels), len(labels), int(batch["attention_mask"].sum())

    def evaluate(self, model: nn.Module, split: str) -> dict:
        return evaluate(model, self.eval_loaders[split], self.device, self.cfg.train.precision, self.accepted)

    @staticmethod
    def select(record: dict):
        return (record["validation_accuracy"], -record["epoch"])

    def after_training(self, model: nn.Module) -> dict:
        return {}

    def zero_shot_metrics(self, compute):
        return compute()


# Task name (the run config's `task`) -> what the shared loop trains and how it is evaluated.
TASKS = {"classification": ClassificationTask, "instruct": InstructTask}


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


def run_training(cfg: RunConfig, checkpoint_file: str | Path | None = None) -> RunResult:
    """Train and evaluate one run as ``cfg`` says.

    ``checkpoint_file``: where per-epoch checkpoints go when ``cfg.train.checkpoint`` is ``epoch``; a
    checkpoint already there for the same config is resumed from.
    """
    started = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    seed_everything(cfg.seed)

    task = TASKS[cfg.task](cfg, device, lambda: _autocast(device, cfg.train.precision))
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

    generator = torch.Generator().manual_seed(cfg.seed)
    loader = train_loader(splits["train"], cfg.train, generator, task.collate)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(optimizer_groups(model, cfg.train.lr, cfg.train.lora_plus_ratio), cfg.train)
    steps_per_epoch = math.ceil(len(loader) / cfg.train.grad_accum)
    total_steps = steps_per_epoch * cfg.train.epochs
    scheduler = build_schedule(optimizer, cfg.train, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")

    epochs, notes, loss_curve = [], [], []
    notes += method_info["frozen_prefix"].get("notes", [])
    # Per optimizer step: seconds, examples, real tokens, padded tokens (throughput leaves out warm-up steps).
    steps: dict[str, list] = {"seconds": [], "examples": [], "tokens": [], "padded": []}
    train_seconds = eval_seconds = 0.0
    first_step_at = None
    step = 0
    first_epoch = 1
    checkpointing = cfg.train.checkpoint == "epoch" and checkpoint_file is not None
    state = {"config": cfg.to_dict(), "model": model, "optimizer": optimizer, "scheduler": scheduler,
             "scaler": scaler, "generator": generator}
    resumed, note = load_checkpoint(checkpoint_file, **state) if checkpointing else (None, None)
    notes += [note] if note else []
    if resumed:
        epochs, step, loss_curve = resumed["epochs"], resumed["step"], resumed.get("loss_curve", [])
        steps = resumed.get("steps") or {"seconds": resumed["step_times"], "examples": [], "tokens": [],
                                         "padded": []}
        train_seconds, first_epoch = resumed["train_seconds"], resumed["epoch"] + 1
        eval_seconds = resumed.get("eval_seconds", 0.0)
        notes.append(f"resumed from the checkpoint saved after epoch {resumed['epoch']}")
    elif task.zero_shot and cfg.train.evaluate:
        # Epoch 0: the adapted but untrained model (LoRA's B is zero, so it computes what the base model does).
        eval_start = time.perf_counter()
        zero_shot = task.zero_shot_metrics(lambda: _evaluate_splits(task, model, cfg.train))
        # A cached zero-shot result holds every split; a run that must not see the test split drops it.
        epochs.append({"epoch": 0, **{k: v for k, v in zero_shot.items()
                                      if cfg.train.evaluate_test or not k.startswith("test_")}})
        eval_seconds += time.perf_counter() - eval_start
    if device.type == "cuda":
        # Peak memory of training, not of loading the dense model before quantizing it.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    # Per-epoch test passes are kept when a family asks for test curves, and with checkpoints (a resumed run has
    # no copy of an earlier epoch's weights).
    test_once = cfg.train.evaluate_test and not cfg.train.test_every_epoch and not checkpointing
    best_epoch = BestEpoch(task, model, cfg.train) if cfg.train.evaluate and test_once else None
    epoch_splits = tuple(s for s in SPLITS if s != "test" or (cfg.train.evaluate_test and not test_once))
    max_steps = cfg.train.max_steps or total_steps
    for epoch in range(first_epoch, cfg.train.epochs + 1):
        if step >= max_steps:
            break
        model.train()
        loss_sum, loss_count = 0.0, 0
        epoch_start = time.perf_counter()
        step_start = time.perf_counter()
        examples = tokens = padded = 0
        # The training loss at LOSS_POINTS_PER_EPOCH evenly spaced steps (mean since the previous point), for the
        # plateau diagnostic: the epoch's mean alone says nothing about the slope at the end of a one-epoch run.
        epoch_first_step = step
        epoch_steps = min(steps_per_epoch, max_steps - step)
        point_sum, point_count, points_logged = 0.0, 0, 0
        for micro_step, batch in enumerate(_progress(loader, cfg.train, f"epoch {epoch}", len(loader))):
            loss, weight, n_examples, n_tokens = task.loss(model, batch)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"loss became {loss.item()} at epoch {epoch}, step {step + 1}")
            scaler.scale(loss / cfg.train.grad_accum).backward()
            loss_value = loss.item()
            loss_sum += loss_value * weight
            loss_count += weight
            point_sum += loss_value * weight
            point_count += weight
            examples += n_examples
            tokens += n_tokens
            padded += batch["input_ids"].numel() if "input_ids" in batch else n_tokens
            last_micro = micro_step + 1 == len(loader)
            if (micro_step + 1) % cfg.train.grad_accum and not last_micro:
                continue
            if cfg.train.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            point = (step - epoch_first_step) * LOSS_POINTS_PER_EPOCH // max(1, epoch_steps)
            if point > points_logged:
                loss_curve.append([step, point_sum / point_count])
                point_sum, point_count, points_logged = 0.0, 0, point
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            first_step_at = first_step_at or time.time()
            for key, value in (("seconds", now - step_start), ("examples", examples), ("tokens", tokens),
                               ("padded", padded)):
                steps[key].append(value)
            step_start, examples, tokens, padded = now, 0, 0, 0
            if step >= max_steps:
                break
        train_seconds += time.perf_counter() - epoch_start
        record = {"epoch": epoch, "train_loss": loss_sum / loss_count}
        if cfg.train.evaluate:
            eval_start = time.perf_counter()
            record.update(_evaluate_splits(task, model, cfg.train, epoch_splits))
            eval_seconds += time.perf_counter() - eval_start
            if best_epoch:
                best_epoch.after_epoch(record)
        epochs.append(record)
        if checkpointing:
            save_checkpoint(checkpoint_file, **state, progress={
                "epoch": epoch, "epochs": epochs, "step": step, "steps": steps, "step_times": steps["seconds"],
                "loss_curve": loss_curve,
                "train_seconds": train_seconds, "eval_seconds": eval_seconds})

    trained = [r for r in epochs if r["epoch"] >= 1]
    if best_epoch:
        eval_start = time.perf_counter()
        best_epoch.evaluate_test(trained[-1]["epoch"])
        eval_seconds += time.perf_counter() - eval_start
    items = {record["epoch"]: take_items(record) for record in epochs}  # only the selected epoch's are kept
    best = max(trained, key=task.select) if cfg.train.evaluate else trained[-1]
    final = {k: v for k, v in best.items() if k != "epoch"}
    final.update(task.after_training(model))
    memory = {"peak_rss": peak_rss_bytes(), **state_bytes(model, optimizer)}
    if device.type == "cuda":
        memory["peak_cuda_allocated"] = torch.cuda.max_memory_allocated(device)
        memory["peak_cuda_reserved"] = torch.cuda.max_memory_reserved(device)
    # After the peaks are read: the merged copies timed here are not part of training's memory.
    shipped, served = serving_costs(model, task.loss, serving_batches(splits["validation"], task.collate,
                                                                      cfg.train.batch_size), device)
    memory.update(shipped)
    device_name = str(device)
    if device.type == "cuda":
        device_name += f" ({torch.cuda.get_device_name(device)})"
    timing = {
        "wall_time_s": time.perf_counter() - started,
        # Process start (interpreter, imports, model and data loading) to the end of the first optimizer step.
        "setup_s": first_step_at - process_started() if first_step_at else None,
        # Forked from a warm worker that had imported torch and transformers already (lora_bench.warm).
        "warm_worker": IN_WORKER_ENV in os.environ,
        "train_time_s": train_seconds,
        "eval_s": eval_seconds,
        "optimizer_steps": step,
        **step_throughput(steps),
        **served,
        "threads": torch.get_num_threads(),
        # Per optimizer step, in order (data loading + forward + backward + update): throughput and percentiles
        # over any window can be recomputed, e.g. by benchmarks/bench_peer.py.
        "step_times_s": steps["seconds"],
        **({"step_examples": steps["examples"]} if len(steps["examples"]) == len(steps["seconds"]) else {}),
    }
    return RunResult(
        metrics={"epochs": epochs, "selected_epoch": best["epoch"], "final": final, "train_loss_curve": loss_curve},
        diagnostics=diagnose(best, loss_curve, best["epoch"], trained[-1]["epoch"],
                             [e.get("validation_loss") for e in trained]) if cfg.train.evaluate else {},
        params={"trainable": trainable, "total": total, "trainable_fraction": trainable / total},
        timing=timing,
        memory=memory,
        model_info=loaded.info,
        data_info=data_info,
        method_info=method_info,
        device=device_name,
        notes=notes,
        predictions=predictions_section(best["epoch"], items[best["epoch"]]),
    )
