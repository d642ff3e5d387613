"""The tasks the shared training loop can train, by the run config's ``task`` value.

The contract is ``base.Task``; adding a task is one module here that implements it, one entry in ``TASKS`` and
the name in ``run.schema.yaml``'s ``task`` enum (``tests/test_tasks.py`` checks all three agree).
"""

from __future__ import annotations

from lora_bench.run.tasks.base import Task
from lora_bench.run.tasks.classification import ClassificationTask
from lora_bench.run.tasks.instruct import InstructTask

# Task name (the run config's `task`) -> what the shared loop trains and how it is evaluated.
TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "instruct": InstructTask}

__all__ = ["TASKS", "ClassificationTask", "InstructTask", "Task"]
