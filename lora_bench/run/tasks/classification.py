"""Sequence classification: a classification head on an encoder, cross-entropy on the labels, accuracy and
macro-F1 (the mean of per-class F1, so every class counts alike) per split.

The label set comes from the data, so ``ClassificationTask.load`` prepares the data first and sizes the head to
it. Batches are padded dynamically (to their own longest example), and only the inputs the model's ``forward``
accepts are passed (``accepted_inputs``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from lora_bench.config import ConfigError, MethodConfig, RunConfig
from lora_bench.run.data import SPLITS, macro_f1, prepare_splits
from lora_bench.run.diagnostics import prediction_shape
from lora_bench.run.methods import builds_layer_by_layer
from lora_bench.run.models import load_model, load_tokenizer, max_positions
from lora_bench.run.predictions import ITEMS_KEY, dataset_example_ids, item_block
from lora_bench.run.tasks.base import Autocast, precision_autocast


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
    """Accuracy, mean loss and macro-F1 (the mean of per-class F1, so every class counts alike)."""
    model.eval()
    loss_sum = 0.0
    predictions, truth, gold_logp = [], [], []
    for batch in loader:
        with precision_autocast(device, precision):
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

    Implements ``lora_bench.run.tasks.base.Task``. After ``load`` it also has ``accepted`` (the batch keys the
    model's ``forward`` takes), which the frozen-prefix cache (``run/frozen.py``) feeds the frozen layers with.
    """

    name = "classification"
    zero_shot = False  # a freshly initialised head has nothing to measure before training

    def __init__(self, cfg: RunConfig, device: torch.device, autocast: Autocast | None = None):
        self.cfg, self.device = cfg, device
        self.autocast = autocast or (lambda: precision_autocast(device, cfg.train.precision))
        self.collate = None
        self.eval_loaders: dict = {}

    @staticmethod
    def prepare_data(cfg: RunConfig) -> tuple[dict, dict]:
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
        with self.autocast():
            logits = model(**_model_inputs(batch, self.device, self.accepted)).logits.float()
        loss = nn.functional.cross_entropy(logits, labels)
        return loss, len(labels), len(labels), int(batch["attention_mask"].sum())

    def evaluate(self, model: nn.Module, split: str) -> dict:
        return evaluate(model, self.eval_loaders[split], self.device, self.cfg.train.precision, self.accepted)

    @staticmethod
    def select(record: dict) -> tuple:
        return (record["validation_accuracy"], -record["epoch"])

    def after_training(self, model: nn.Module) -> dict:
        return {}

    def zero_shot_metrics(self, compute: Callable[[], dict]) -> dict:
        return compute()
