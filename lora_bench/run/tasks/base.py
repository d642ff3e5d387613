"""What a task is: the contract between the shared training loop (``run/train.py``) and the thing it trains.

The loop owns everything a task does not need to know about: device, seeding, optimizer, schedule, gradient
accumulation, precision scaling, the NaN stop, checkpoints, timing and the record. A task owns what differs
between "put a classification head on an encoder" and "finetune a causal LM on instructions": which model and
data to load, how a batch becomes a loss, how a split is evaluated and which epoch is the best. ``Task`` names
every member the loop (and ``cli prepare-data``, the frozen-prefix cache and the serving timer) calls, so a new
task is one class that satisfies it plus one entry in ``lora_bench.run.tasks.TASKS``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

from lora_bench.config import MethodConfig, RunConfig

if TYPE_CHECKING:
    from lora_bench.run.models import LoadedModel

# A zero-argument factory of the context a task's forward passes run in (the run's precision).
Autocast = Callable[[], AbstractContextManager]


def precision_autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The context of a forward pass at ``train.precision``: fp32 switches autocast off, bf16/fp16 turn it on."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


@runtime_checkable
class Task(Protocol):
    """One kind of finetuning, as the shared training loop sees it.

    A task is built as ``TaskClass(cfg, device, autocast)`` (``autocast``: an ``Autocast`` for the run's
    precision), once per run, before anything is loaded; the loop then calls ``load``, ``method``, optionally
    ``zero_shot_metrics``, then ``loss`` per micro-batch and ``evaluate`` per split and epoch, ``select`` to
    pick the reported epoch and ``after_training`` once at the end.
    """

    name: str
    """The run config's ``task`` value that selects this class (its key in ``TASKS``)."""

    zero_shot: bool
    """Whether an epoch-0 evaluation of the adapted but untrained model means something (a causal LM's zero-shot
    answers do; a freshly initialised classification head's do not)."""

    collate: Callable[[list[dict]], dict[str, torch.Tensor]] | None
    """Examples -> a padded batch; set by ``load`` (padding needs the tokenizer). The loop's training batches,
    the frozen-prefix cache and the serving timer all batch with it, so they see what ``loss`` sees."""

    @staticmethod
    def prepare_data(cfg: RunConfig) -> tuple[dict, dict]:
        """(tokenized splits, data info) for ``cfg``, cached on disk, without building the model.

        Static so that ``cli prepare-data`` can tokenize every (data, model) pair of a study up front.
        """

    def load(self) -> tuple[LoadedModel, dict, dict]:
        """(the model with its tokenizer and info, the splits, the data info), the model on the run's device (or
        still on the meta device when the method builds it layer by layer). Sets ``collate``."""

    def method(self, method: MethodConfig) -> MethodConfig:
        """The method config as this task's model needs it (a causal LM has no head to train, for example)."""

    def zero_shot_metrics(self, compute: Callable[[], dict]) -> dict:
        """The epoch-0 evaluation: ``compute()`` evaluates every split; a task may reuse an earlier identical
        result instead (the untrained adapted model is the same across LoRA variants and seeds)."""

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int, int, int]:
        """(mean loss of the micro-batch, its weight in the epoch's mean loss, examples, real tokens).

        The weight is what the mean is over (examples, or response tokens); examples and tokens feed throughput.
        """

    def evaluate(self, model: nn.Module, split: str) -> dict:
        """Metrics of ``split`` (``train``/``validation``/``test``) without training, e.g. loss and accuracy; a
        ``lora_bench.run.predictions.ITEMS_KEY`` entry carries per-example results."""

    @staticmethod
    def select(record: dict) -> tuple:
        """The sort key of an epoch's record (``validation_*`` metrics and ``epoch``): the largest is reported.

        Static because it reads validation only, so the best-epoch bookkeeping can call it on any record.
        """

    def after_training(self, model: nn.Module) -> dict:
        """Extra final metrics measured once on the trained model (e.g. an evaluation harness); ``{}`` if none."""
