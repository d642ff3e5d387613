"""The task contract: every registered task implements ``Task`` with the signatures the training loop calls."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml

import lora_bench
from lora_bench.config import RunConfig
from lora_bench.run.tasks import TASKS
from lora_bench.run.tasks.base import Task, precision_autocast

# Members of the protocol that the loop calls (the rest are attributes it reads).
METHODS = sorted(name for name, value in vars(Task).items()
                 if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, staticmethod)))


def _signature(owner, name: str) -> list[tuple[str, object]]:
    """Parameter names and kinds as the caller sees them (``self`` included for instance methods)."""
    return [(p.name, p.kind) for p in inspect.signature(getattr(owner, name)).parameters.values()]


def test_the_protocol_names_what_the_loop_calls():
    assert METHODS == ["after_training", "evaluate", "load", "loss", "method", "prepare_data", "select",
                       "zero_shot_metrics"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_registered_task_implements_the_protocol(name):
    cls = TASKS[name]
    assert cls.name == name
    # Built as the loop builds it, before anything is loaded.
    task = cls(RunConfig.from_dict({"task": name}), torch.device("cpu"), lambda: precision_autocast(
        torch.device("cpu"), "fp32"))
    assert isinstance(task, Task)
    for method in METHODS:
        assert _signature(cls, method) == _signature(Task, method), f"{cls.__name__}.{method}"
        # Static in the protocol (callable without an instance, e.g. by `cli prepare-data`) means static here.
        assert isinstance(inspect.getattr_static(cls, method), staticmethod) == isinstance(
            inspect.getattr_static(Task, method), staticmethod), f"{cls.__name__}.{method}"
    assert [p for p in inspect.signature(cls.__init__).parameters][:4] == ["self", "cfg", "device", "autocast"]


def test_a_class_missing_a_member_is_not_a_task():
    class NoSelect:
        name, zero_shot, collate = "x", False, None

        def prepare_data(cfg): ...
        def load(self): ...
        def method(self, method): ...
        def zero_shot_metrics(self, compute): ...
        def loss(self, model, batch): ...
        def evaluate(self, model, split): ...
        def after_training(self, model): ...

    assert not isinstance(NoSelect(), Task)


def test_the_schema_offers_exactly_the_registered_tasks():
    schema = yaml.safe_load((Path(lora_bench.__file__).parent / "schemas/run.schema.yaml").read_text())
    assert sorted(schema["properties"]["task"]["enum"]) == sorted(TASKS)
