"""What a trained adapter costs to ship and to serve: its file size, and the latency of serving it unmerged.

Two costs users weigh when they choose a LoRA variant, measured at the end of every run that has LoRA layers:

- ``adapter_bytes``: the size of the saved adapter, i.e. the trainable tensors only (LoRA factors, DoRA's
  magnitudes, a trained head), serialised as safetensors exactly as peft's ``adapter_model.safetensors``
  holds them: 8-byte header length + JSON header + the raw tensors. Exact and deterministic.
- ``inference_overhead``: forward latency per example of the model with the adapter unmerged (as trained:
  base output plus the low-rank path, and DoRA's norm) divided by that of the merged model (one dense weight
  per layer; for 4-bit layers the dense merged copy), on the run's device. The base model without any
  adapter is timed alongside. Each mode runs a warm-up batch, then the same few batches from the validation
  split, modes interleaved batch by batch so a busy machine slows all three alike; the median per-example
  time of each mode is reported. It is a clock measurement: on a shared CPU expect noise of several percent.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lora_bench.adapters.lora import LoRAWrapper, adapters_replaced, lora_modules

# Batches timed per mode after WARMUP_BATCHES untimed ones, of at most MAX_BATCH_EXAMPLES examples: a few
# seconds on a CPU at most, so every LoRA run can afford it.
TIMED_BATCHES = 3
WARMUP_BATCHES = 1
MAX_BATCH_EXAMPLES = 32


def adapter_bytes(model: nn.Module) -> int:
    """Bytes of the safetensors file holding the model's trainable tensors (the saved adapter)."""
    from safetensors.torch import save

    tensors = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}
    return len(save(tensors))


def serving_batches(split: Sequence, collate: Callable[[list], dict], batch_size: int) -> list[dict]:
    """Up to ``WARMUP_BATCHES + TIMED_BATCHES`` batches of the first examples of ``split`` (fewer if it is small)."""
    size = max(1, min(batch_size, MAX_BATCH_EXAMPLES))
    n = min(len(split), size * (WARMUP_BATCHES + TIMED_BATCHES))
    return [collate([split[i] for i in range(start, min(start + size, n))]) for start in range(0, n, size)]


def _examples(batch: dict) -> int:
    return len(next(iter(batch.values())))


def inference_latency(model: nn.Module, forward: Callable[[nn.Module, dict], object], batches: list[dict],
                      device: torch.device) -> dict:
    """Median seconds per example of ``forward`` unmerged, merged and without the adapter, and their ratio.

    The model is put back exactly as it was (layers, weights, train/eval mode).
    """
    merged = {id(layer): layer.merged_linear() for layer in model.modules() if isinstance(layer, LoRAWrapper)}
    modes: dict[str, Callable[[LoRAWrapper], nn.Module] | None] = {
        "unmerged": None,
        "merged": lambda layer: merged[id(layer)],
        "base": lambda layer: layer.base_layer,
    }
    warmup = min(WARMUP_BATCHES, len(batches) - 1)
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                order = list(modes)[index % 3:] + list(modes)[: index % 3]  # no mode always goes first
                for mode in order:
                    replacement = modes[mode]
                    with adapters_replaced(model, replacement) if replacement else contextlib.nullcontext():
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        start = time.perf_counter()
                        forward(model, batch)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        elapsed = time.perf_counter() - start
                    if index >= warmup:
                        seconds[mode].append(elapsed / _examples(batch))
    finally:
        model.train(was_training)
    out = {f"inference_{mode}_s": statistics.median(values) for mode, values in seconds.items()}
    out["inference_overhead"] = out["inference_unmerged_s"] / out["inference_merged_s"]
    out["inference_timed_batches"] = len(seconds["unmerged"])
    return out


def serving_costs(model: nn.Module, forward: Callable[[nn.Module, dict], object], batches: list[dict],
                  device: torch.device) -> tuple[dict, dict]:
    """(memory part, timing part) of the run record: ``adapter_bytes``, and the inference latencies.

    Both empty when the model has no LoRA layer (last-layer and full finetuning ship the whole model).
    """
    if next(iter(lora_modules(model)), None) is None:
        return {}, {}
    timing = inference_latency(model, forward, batches, device) if batches else {}
    return {"adapter_bytes": adapter_bytes(model)}, timing


__all__ = ["adapter_bytes", "inference_latency", "serving_batches", "serving_costs"]
