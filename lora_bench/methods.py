"""Finetuning methods as a registry: each decides which parameters train.

Adding a method is one function plus one entry in ``METHODS`` (QLoRA registers itself the same
way). Every method leaves the model with ``requires_grad`` set exactly on what trains, so the
exact trainable-parameter count is simply ``count_parameters(model)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from .config import MethodConfig
from .lora import LoRASpec, apply_lora, architecture_of


def lora_spec(method: MethodConfig) -> LoRASpec:
    lora = method.lora
    return LoRASpec(
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
        scaling=lora.scaling,
        targets=tuple(lora.targets),
        layers=tuple(lora.layers) if lora.layers is not None else None,
    )


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
    arch = architecture_of(model)
    spec = lora_spec(method)
    wrapped = apply_lora(model, spec, wrap=wrap)
    unfrozen = []
    if method.train_classifier:
        unfrozen = _set_trainable_by_pattern(model, rf"{arch.classifier}(?:\.base_layer)?")
    return {"lora_modules": wrapped, "fully_trained": unfrozen, "architecture": arch.name}


def prepare_lora(model: nn.Module, method: MethodConfig) -> dict:
    """Frozen base, LoRA on the covered layers; the final classifier trains if ``train_classifier``."""
    return _with_lora(model, method)


def prepare_last_layers(model: nn.Module, method: MethodConfig) -> dict:
    """Everything frozen except the classification head's linear layers (e.g. pre_classifier + classifier)."""
    arch = architecture_of(model)
    freeze_all(model)
    unfrozen = _set_trainable_by_pattern(model, arch.kinds["head"])
    if not unfrozen:
        raise ValueError(f"last_layers found no head layers in this {arch.name} model")
    return {"fully_trained": unfrozen, "architecture": arch.name}


def prepare_full(model: nn.Module, method: MethodConfig) -> dict:
    """Every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)
    return {"fully_trained": ["<all>"]}


METHODS: dict[str, Callable[[nn.Module, MethodConfig], dict]] = {
    "lora": prepare_lora,
    "last_layers": prepare_last_layers,
    "full": prepare_full,
}


def prepare_model(model: nn.Module, method: MethodConfig) -> dict:
    """Apply ``method`` to ``model`` in place; returns what it did, for the run record."""
    if method.name not in METHODS:
        raise ValueError(f"unknown method {method.name!r}; registered: {sorted(METHODS)}")
    return METHODS[method.name](model, method)
