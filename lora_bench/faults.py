"""Fault injection for the reliability tests: kill or fail a process at a named point, on purpose.

The suite promises that a kill at any moment never leaves a partial run record or table behind and
that a failure is recorded as data (README, "Guarantees"). Promises like that are only worth what
their tests are, and a kill sent from outside lands at a random moment. So the code marks the points
where a kill does the most harm with ``fault_point(name, where)``, and the tests name one of them in
the environment variable ``LORA_BENCH_FAULT``; the point then kills its own process with SIGKILL
(or raises), deterministically, in a real ``snakemake`` run. Without the variable a fault point is
one dictionary lookup and does nothing.

``LORA_BENCH_FAULT`` is a comma-separated list of ``point[:action][@where]``:

- ``point``: ``train_step`` (after an optimizer step), ``record_write`` (half a record written to its
  temporary file, before the rename), ``record_written`` (just after the rename, before the process
  exits), ``tables_write`` (between two table files of ``collect``), ``checkpoint_saved`` (just after
  an epoch's checkpoint is saved; its ``where`` ends in ``#epoch<n>``);
- ``action``: ``kill`` (SIGKILL, the default), ``killgroup`` (SIGKILL to the whole process group: a
  power cut of Snakemake and every job, when Snakemake was started in its own session), ``oom``
  (raise ``torch.OutOfMemoryError``, what a GPU out of memory raises) or ``error`` (raise ``RuntimeError``);
- ``where``: only fire when this text occurs in the point's path (the record or tables folder), so
  one run of a study can be picked out, e.g. ``train_step@methods/lora/seed1``.
"""

from __future__ import annotations

import os
import signal

ENV = "LORA_BENCH_FAULT"
POINTS = ("train_step", "record_write", "record_written", "tables_write", "checkpoint_saved")
ACTIONS = ("kill", "killgroup", "oom", "error")


class InjectedFault(RuntimeError):
    """Raised by a fault point whose action is ``error``."""


def _specs() -> list[tuple[str, str, str | None]]:
    specs = []
    for part in filter(None, (p.strip() for p in os.environ.get(ENV, "").split(","))):
        head, _, where = part.partition("@")
        point, _, action = head.partition(":")
        action = action or "kill"
        if point not in POINTS or action not in ACTIONS:
            raise ValueError(f"{ENV}={os.environ[ENV]!r}: {part!r} is not point[:action][@where] with a point "
                             f"from {POINTS} and an action from {ACTIONS}")
        specs.append((point, action, where or None))
    return specs


def armed(point: str, where: str = "") -> str | None:
    """The action the environment asks for at ``point`` (for this ``where``), else None."""
    if ENV not in os.environ:
        return None
    for name, action, match in _specs():
        if name == point and (match is None or match in where):
            return action
    return None


def fault_point(point: str, where: str = "") -> None:
    """Do what ``LORA_BENCH_FAULT`` asks at ``point``: nothing unless it names this point."""
    action = armed(point, str(where))
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "killgroup":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    if action == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {ENV} at {point})")
    raise InjectedFault(f"injected failure at {point} ({ENV})")


def arm_training_faults(where: str):
    """Fire ``train_step`` after the first optimizer step of this process, if asked; returns a removable handle.

    An optimizer hook reaches inside the training loop without a line of it knowing about faults.
    """
    if armed("train_step", where) is None:
        return None
    from torch.optim.optimizer import register_optimizer_step_post_hook

    return register_optimizer_step_post_hook(lambda optimizer, args, kwargs: fault_point("train_step", where))
