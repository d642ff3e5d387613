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
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn

from .causal import InstructTask
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError, MethodConfig, RunConfig, TrainConfig
from .data import SPLITS, prepare_splits
from .lora import count_parameters
from .methods import prepare_model
from .models import load_model, load_tokenizer, max_positions

# Steps excluded from the median step time: the first ones pay for allocator warm-up and lazy init.
WARMUP_STEPS = 3


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


def build_optimizer(params: list[nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
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
    """Accuracy, mean loss and macro-F1 (scikit-learn; the mean of per-class F1, so every class counts alike)."""
    model.eval()
    loss_sum = 0.0
    predictions, truth = [], []
    for batch in loader:
        with _autocast(device, precision):
            logits = model(**_model_inputs(batch, device, accepted)).logits.float()
        labels = batch["labels"].to(device)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        predictions.append(logits.argmax(-1).cpu())
        truth.append(labels.cpu())
    predicted, actual = torch.cat(predictions).numpy(), torch.cat(truth).numpy()
    return {"accuracy": float((predicted == actual).mean()), "loss": loss_sum / len(actual),
            "macro_f1": float(f1_score(actual, predicted, average="macro", zero_division=0))}


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
        loaded = load_model(self.cfg.model, num_labels=len(data_info["label_names"]))
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


def _evaluate_splits(task, model: nn.Module, train_cfg: TrainConfig) -> dict:
    record = {}
    for name in SPLITS:
        if name == "train" and not train_cfg.eval_train:
            continue
        record.update({f"{name}_{key}": value for key, value in task.evaluate(model, name).items()})
    return record


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Exact bytes of weights (parameters + buffers, incl. 4-bit packed codes and scales), gradients,
    optimizer state, their sum, and the stored base weights (everything but the LoRA factors).

    On CPU this is the memory figure that does not depend on the allocator; activations are not in it.
    """
    weights = sum(_nbytes(p) for p in model.parameters()) + sum(_nbytes(b) for b in model.buffers())
    adapters = sum(_nbytes(p) for name, p in model.named_parameters() if ".lora." in f".{name}")
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
    notes: list[str] = field(default_factory=list)


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
    # Move first, then adapt: QLoRA quantizes on the target device, and bitsandbytes only on CUDA.
    model.to(device)
    method_info = prepare_model(model, task.method(cfg.method), device)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise TrainingFailed(f"method {cfg.method.name!r} left no trainable parameter")

    generator = torch.Generator().manual_seed(cfg.seed)
    micro_batch = cfg.train.batch_size
    train_loader = torch.utils.data.DataLoader(splits["train"], batch_size=micro_batch, shuffle=True,
                                               generator=generator, collate_fn=task.collate)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.train)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum)
    total_steps = steps_per_epoch * cfg.train.epochs
    scheduler = build_schedule(optimizer, cfg.train, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")

    epochs, notes, step_times, step_examples = [], [], [], []
    examples_seen = tokens_seen = 0
    train_seconds = 0.0
    step = 0
    first_epoch = 1
    checkpointing = cfg.train.checkpoint == "epoch" and checkpoint_file is not None
    state = {"config": cfg.to_dict(), "model": model, "optimizer": optimizer, "scheduler": scheduler,
             "scaler": scaler, "generator": generator}
    resumed, note = load_checkpoint(checkpoint_file, **state) if checkpointing else (None, None)
    notes += [note] if note else []
    if resumed:
        epochs, step_times, step = resumed["epochs"], resumed["step_times"], resumed["step"]
        # Checkpoints from before per-step example counts were kept have none: the lists then stay unequal
        # in length and ``timing.step_examples`` is left out.
        step_examples = resumed.get("step_examples", [])
        examples_seen, tokens_seen = resumed["examples_seen"], resumed["tokens_seen"]
        train_seconds, first_epoch = resumed["train_seconds"], resumed["epoch"] + 1
        notes.append(f"resumed from the checkpoint saved after epoch {resumed['epoch']}")
    elif task.zero_shot and cfg.train.evaluate:
        # Epoch 0: the adapted but untrained model (LoRA's B is zero, so it computes what the base model does).
        epochs.append({"epoch": 0, **task.zero_shot_metrics(lambda: _evaluate_splits(task, model, cfg.train))})
    if device.type == "cuda":
        # Peak memory of training, not of loading the dense model before quantizing it.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    max_steps = cfg.train.max_steps or total_steps
    for epoch in range(first_epoch, cfg.train.epochs + 1):
        if step >= max_steps:
            break
        model.train()
        loss_sum, loss_count = 0.0, 0
        epoch_start = time.perf_counter()
        step_start = time.perf_counter()
        examples_in_step = 0
        for micro_step, batch in enumerate(_progress(train_loader, cfg.train, f"epoch {epoch}", len(train_loader))):
            loss, weight, n_examples, n_tokens = task.loss(model, batch)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"loss became {loss.item()} at epoch {epoch}, step {step + 1}")
            scaler.scale(loss / cfg.train.grad_accum).backward()
            loss_sum += loss.item() * weight
            loss_count += weight
            examples_seen += n_examples
            examples_in_step += n_examples
            tokens_seen += n_tokens
            last_micro = micro_step + 1 == len(train_loader)
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
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            step_times.append(now - step_start)
            step_examples.append(examples_in_step)
            step_start = now
            examples_in_step = 0
            if step >= max_steps:
                break
        train_seconds += time.perf_counter() - epoch_start
        record = {"epoch": epoch, "train_loss": loss_sum / loss_count}
        if cfg.train.evaluate:
            record.update(_evaluate_splits(task, model, cfg.train))
        epochs.append(record)
        if checkpointing:
            save_checkpoint(checkpoint_file, **state, progress={
                "epoch": epoch, "epochs": epochs, "step": step, "step_times": step_times,
                "step_examples": step_examples,
                "examples_seen": examples_seen, "tokens_seen": tokens_seen, "train_seconds": train_seconds})

    trained = [r for r in epochs if r["epoch"] >= 1]
    best = max(trained, key=task.select) if cfg.train.evaluate else trained[-1]
    final = {k: v for k, v in best.items() if k != "epoch"}
    final.update(task.after_training(model))
    memory = {"peak_rss": peak_rss_bytes(), **state_bytes(model, optimizer)}
    if device.type == "cuda":
        memory["peak_cuda_allocated"] = torch.cuda.max_memory_allocated(device)
        memory["peak_cuda_reserved"] = torch.cuda.max_memory_reserved(device)
    measured = step_times[WARMUP_STEPS:] or step_times
    device_name = str(device)
    if device.type == "cuda":
        device_name += f" ({torch.cuda.get_device_name(device)})"
    return RunResult(
        metrics={"epochs": epochs, "selected_epoch": best["epoch"], "final": final},
        params={"trainable": trainable, "total": total, "trainable_fraction": trainable / total},
        timing={
            "wall_time_s": time.perf_counter() - started,
            "train_time_s": train_seconds,
            "optimizer_steps": step,
            "median_step_s": statistics.median(measured) if measured else None,
            "examples_per_s": examples_seen / train_seconds if train_seconds else None,
            "tokens_per_s": tokens_seen / train_seconds if train_seconds else None,
            "threads": torch.get_num_threads(),
            # Per optimizer step, in order (data loading + forward + backward + update): throughput and
            # percentiles over any window can be recomputed, e.g. by benchmarks/bench_peer.py.
            "step_times_s": step_times,
            **({"step_examples": step_examples} if len(step_examples) == len(step_times) else {}),
        },
        memory=memory,
        model_info=loaded.info,
        data_info=data_info,
        method_info=method_info,
        device=device_name,
        notes=notes,
    )
