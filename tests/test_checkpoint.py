"""Per-epoch checkpoints: a run killed after an epoch resumes there and ends with the metrics of an
uninterrupted run (CPU, bit for bit); a checkpoint for another config or an unreadable one is ignored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_bench.config import RunConfig
from lora_bench.faults import ENV
from lora_bench.run.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from lora_bench.run.train import build_optimizer, build_schedule, run_training

ROOT = Path(__file__).resolve().parents[1]


def _checkpointed(tiny_run: dict, epochs: int = 3) -> dict:
    tiny_run["train"].update(epochs=epochs, checkpoint="epoch")
    tiny_run["method"]["lora"]["dropout"] = 0.1  # dropout draws must continue the same RNG sequence
    return tiny_run


def _train_cli(cfg: dict, out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(ENV, None)
    if fault:
        env[ENV] = fault
    return subprocess.run(
        [sys.executable, "-m", "lora_bench", "train", "--config-json", json.dumps(cfg), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow  # three training subprocesses; the in-process resume test below runs by default
def test_killed_after_epoch_two_resumes_with_identical_metrics(tiny_run, tmp_path):
    cfg = _checkpointed(tiny_run)
    whole = _train_cli(cfg, tmp_path / "whole" / "seed0.json")
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed" / "seed0.json"
    killed = _train_cli(cfg, out, fault="checkpoint_saved:kill@#epoch2")
    assert killed.returncode == -9, killed.stderr
    assert not out.exists() and checkpoint_path(out).exists()

    resumed = _train_cli(cfg, out)
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads(out.read_text())
    reference = json.loads((tmp_path / "whole" / "seed0.json").read_text())
    assert record["notes"] == ["resumed from the checkpoint saved after epoch 2"]
    assert record["metrics"] == reference["metrics"]  # every epoch's losses and accuracies, bit for bit
    assert record["timing"]["optimizer_steps"] == reference["timing"]["optimizer_steps"]
    assert not checkpoint_path(out).exists()  # removed once the record is written


def test_checkpoint_off_by_default_leaves_no_file(tiny_run, tmp_path):
    out = tmp_path / "seed0.json"
    assert _train_cli(tiny_run, out).returncode == 0
    assert not checkpoint_path(out).exists()
    assert json.loads(out.read_text())["notes"] == []


def _state(cfg: RunConfig):
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(list(model.parameters()), cfg.train)
    return {"model": model, "optimizer": optimizer, "scheduler": build_schedule(optimizer, cfg.train, 10),
            "scaler": torch.amp.GradScaler("cpu", enabled=False), "generator": torch.Generator().manual_seed(0)}


def test_checkpoint_for_another_config_or_unreadable_is_ignored_with_a_note(tiny_run, tmp_path):
    cfg = RunConfig.from_dict(tiny_run)
    path = tmp_path / ".seed0.checkpoint.pt"
    save_checkpoint(path, config=cfg.to_dict(), **_state(cfg), progress={"epoch": 1})

    progress, note = load_checkpoint(path, config=cfg.to_dict(), **_state(cfg))
    assert progress == {"epoch": 1} and note is None

    other = RunConfig.from_dict({**tiny_run, "seed": 1}).to_dict()
    progress, note = load_checkpoint(path, config=other, **_state(cfg))
    assert progress is None and "another run configuration" in note

    path.write_bytes(b"\x00not a checkpoint")
    progress, note = load_checkpoint(path, config=cfg.to_dict(), **_state(cfg))
    assert progress is None and "unreadable" in note and str(path) in note

    assert load_checkpoint(tmp_path / "missing.pt", config=cfg.to_dict(), **_state(cfg)) == (None, None)


def test_in_process_resume_restores_parameters(tiny_run, tmp_path):
    """The library call too: run_training with a checkpoint file resumes from it."""
    cfg = RunConfig.from_dict(_checkpointed(tiny_run, epochs=2))
    whole = run_training(cfg)  # no file given: no checkpoint, plain run
    path = tmp_path / ".ckpt.pt"
    first = run_training(cfg, path)
    assert not whole.notes and not first.notes and path.exists()
    # The file now holds the state after the last epoch: a second call resumes with nothing left to train.
    again = run_training(cfg, path)
    assert again.notes == ["resumed from the checkpoint saved after epoch 2"]
    assert again.metrics == first.metrics == whole.metrics
