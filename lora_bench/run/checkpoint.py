"""Per-epoch training checkpoints, so a killed long run resumes instead of starting over.

A checkpoint holds everything the training loop needs to continue exactly where an epoch ended:
the trainable parameters (frozen base weights are rebuilt from the model source, so a LoRA
checkpoint stays small), optimizer, schedule and gradient-scaler state, the data-order generator,
every global RNG state (Python, NumPy, torch CPU and CUDA: dropout draws continue the same
sequence) and the loop's own progress (per-epoch metrics, step counters, timings). On CPU a
resumed run therefore gives bit-identical metrics to an uninterrupted one (tested).

A checkpoint is only used for the run configuration it was written for: it stores that config,
and a checkpoint whose config differs (an edited variant) or that cannot be read is ignored with
a note, never half-applied. It is written atomically (temporary file, fsync, rename) so a kill
while saving leaves the previous epoch's checkpoint, and deleted once the run's record is written.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lora_bench.atomic import replace_atomically
from lora_bench.faults import fault_point

CHECKPOINT_VERSION = 1


def checkpoint_path(record_path: str | Path) -> Path:
    """Where the checkpoint of the run whose record goes to ``record_path`` lives (a hidden sibling)."""
    record_path = Path(record_path)
    return record_path.with_name(f".{record_path.stem}.checkpoint.pt")


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, *, config: dict, model: nn.Module, optimizer, scheduler, scaler,
                    generator: torch.Generator, progress: dict) -> None:
    """Atomically write the state at the end of an epoch; ``progress`` is the loop's own bookkeeping."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": CHECKPOINT_VERSION,
        "config": config,
        "trainable": _trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "generator": generator.get_state(),
        "rng": _rng_state(),
        "progress": progress,
    }
    replace_atomically(path, lambda tmp: torch.save(payload, tmp))
    fault_point("checkpoint_saved", f"{path}#epoch{progress.get('epoch')}")


def load_checkpoint(path: str | Path, *, config: dict, model: nn.Module, optimizer, scheduler, scaler,
                    generator: torch.Generator) -> tuple[dict | None, str | None]:
    """Restore the state saved at ``path`` into the given objects.

    Returns ``(progress, note)``: ``progress`` is None when there is nothing usable to resume from,
    and ``note`` says why a checkpoint that exists was not used (for the run record).
    """
    path = Path(path)
    if not path.exists():
        return None, None
    try:
        # weights_only=False: the payload holds RNG states (tuples, NumPy arrays) as well as tensors.
        # The file is one this suite wrote next to its own record, not downloaded input.
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint means "start over"
        return None, f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); started over"
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        return None, f"checkpoint {path} has another layout version; started over"
    if payload.get("config") != config:
        return None, f"checkpoint {path} was written for another run configuration; started over"
    parameters = dict(model.named_parameters())
    trainable = payload["trainable"]
    expected = {name for name, p in parameters.items() if p.requires_grad}
    if set(trainable) != expected:
        return None, f"checkpoint {path} holds other trainable parameters than this model; started over"
    with torch.no_grad():
        for name, value in trainable.items():
            parameters[name].copy_(value.to(parameters[name].device))
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    scaler.load_state_dict(payload["scaler"])
    generator.set_state(payload["generator"])
    _set_rng_state(payload["rng"])
    return payload["progress"], None


def remove_checkpoint(path: str | Path) -> None:
    Path(path).unlink(missing_ok=True)
