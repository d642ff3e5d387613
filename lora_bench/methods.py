"""Finetuning methods as a registry: each decides which parameters train.

Adding a method is one function plus one entry in ``METHODS`` (QLoRA registers itself the same
way). Every method leaves the model with ``requires_grad`` set exactly on what trains, so the
exact trainable-parameter count is simply ``count_parameters(model)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from .config import MethodConfig
from .lora import Architecture, LoRASpec, apply_lora, architecture_of, head_pattern
from .quant import nf4_wrap_for, quantize_remaining_linears, select_backend


def lora_spec(method: MethodConfig) -> LoRASpec:
    lora = method.lora
    return LoRASpec(
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
        scaling=lora.scaling,
        targets=tuple(lora.targets),
        layers=tuple(lora.layers) if lora.layers is not None else None,
        patterns=tuple(lora.target_patterns) if lora.target_patterns else None,
    )


def method_architecture(model: nn.Module, method: MethodConfig) -> Architecture:
    """The model's name map, with the config's explicit head / LoRA target patterns taken into account."""
    return architecture_of(model, head_patterns=method.head_patterns, target_patterns=method.lora.target_patterns)


def _set_trainable_by_pattern(model: nn.Module, pattern: str) -> list[str]:
    regex = re.compile(pattern)
    names = []
    for name, module in model.named_modules():
        # Match on module names; a LoRA-wrapped head trains its base layer ("<name>.base_layer").
        if regex.fullmatch(name) and isinstance(module, nn.Linear):
            for p in module.parameters():
                p.requires_grad_(True)
            names.append(name)
    return names


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _with_lora(model: nn.Module, method: MethodConfig, wrap=None) -> dict:
    arch = method_architecture(model, method)
    spec = lora_spec(method)
    wrapped = apply_lora(model, spec, wrap=wrap, arch=arch)
    unfrozen = []
    if method.train_classifier:
        if arch.classifier is None:
            raise ValueError(f"method.train_classifier is true but the {arch.name} model has no known "
                             "classification layer; give method.head_patterns or set train_classifier: false")
        unfrozen = _set_trainable_by_pattern(model, rf"{arch.classifier}(?:\.base_layer)?")
    return {"lora_modules": wrapped, "fully_trained": unfrozen, "architecture": arch.name}


def prepare_lora(model: nn.Module, method: MethodConfig, device: torch.device) -> dict:
    """Frozen base, LoRA on the covered layers; the final classifier trains if ``train_classifier``."""
    return _with_lora(model, method)


def prepare_qlora(model: nn.Module, method: MethodConfig, device: torch.device) -> dict:
    """QLoRA: every linear layer of the base model stored in 4-bit NF4, LoRA on the covered ones.

    The classification head stays in full precision (bitsandbytes' loaders skip it too); the backend
    is bitsandbytes on CUDA when installed, else lora_bench's own NF4 (``method.quant.backend``).
    """
    arch = method_architecture(model, method)
    quant = method.quant
    backend = select_backend(device, None if quant.backend == "auto" else quant.backend).name
    layout = {"block_size": quant.block_size, "double_quant": quant.double_quant}
    info = _with_lora(model, method, wrap=nf4_wrap_for(device, backend, **layout))
    head = re.compile(head_pattern(arch))
    info["quantized_frozen"] = quantize_remaining_linears(
        model, lambda name: bool(head.fullmatch(name)), device, backend, **layout
    )
    info["quant_backend"] = backend
    return info


def prepare_last_layers(model: nn.Module, method: MethodConfig, device: torch.device) -> dict:
    """Everything frozen except all the classification head's linear layers, whatever its shape
    (pre_classifier + classifier, dense + out_proj, pooler + classifier)."""
    arch = method_architecture(model, method)
    freeze_all(model)
    unfrozen = _set_trainable_by_pattern(model, head_pattern(arch))
    if not unfrozen:
        raise ValueError(f"last_layers found no head layers in this {arch.name} model")
    return {"fully_trained": unfrozen, "architecture": arch.name}


def prepare_full(model: nn.Module, method: MethodConfig, device: torch.device) -> dict:
    """Every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)
    return {"fully_trained": ["<all>"]}


METHODS: dict[str, Callable[[nn.Module, MethodConfig, torch.device], dict]] = {
    "lora": prepare_lora,
    "qlora": prepare_qlora,
    "last_layers": prepare_last_layers,
    "full": prepare_full,
}


def prepare_model(model: nn.Module, method: MethodConfig, device: torch.device | str = "cpu") -> dict:
    """Apply ``method`` to ``model`` (already on ``device``) in place; returns what it did, for the record."""
    if method.name not in METHODS:
        raise ValueError(f"unknown method {method.name!r}; registered: {sorted(METHODS)}")
    return METHODS[method.name](model, method, torch.device(device))
