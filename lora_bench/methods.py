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
from .lora import (
    PEFT_SEQ_CLS_HEAD_NAMES,
    Architecture,
    LinearWithLoRA,
    LoRALayer,
    LoRASpec,
    apply_lora,
    architecture_of,
    head_pattern,
    peft_head_modules,
)
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
        init=lora.init,
        dora=lora.dora,
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


def _train_whole(model: nn.Module, module_names: list[str]) -> list[str]:
    """Unfreeze every parameter of the named modules (weights, biases, any norm inside), as peft's
    ``modules_to_save`` does; returns the names of the submodules holding those parameters, for the record.
    LoRA adapters inside are left out of the list (they are in ``lora_modules``), not out of training."""
    holders = []
    for outer in module_names:
        for name, module in model.get_submodule(outer).named_modules(prefix=outer):
            if isinstance(module, LoRALayer):
                continue
            own = list(module.parameters(recurse=False))
            for p in own:
                p.requires_grad_(True)
            if own and name not in holders:
                holders.append(name)
    return holders


def _train_head(model: nn.Module, method: MethodConfig, arch: Architecture) -> dict:
    """Unfreeze the classification head as ``method.head`` says; returns what trains, for the record.

    ``peft`` (default): the whole module(s) peft's ``task_type="SEQ_CLS"`` puts in ``modules_to_save``
    (``peft_head_modules``), so a LoRA run here trains exactly the parameters a peft LoRA run trains; with
    ``method.head_patterns`` the user has named the head instead, and all of its linear layers train.
    ``last_linear``: only the final output layer (``arch.classifier``), leaving e.g. RoBERTa's freshly
    initialised ``classifier.dense`` frozen at random; kept to reproduce runs made that way.
    """
    if method.head == "last_linear":
        if arch.classifier is None:
            raise ValueError(f"method.train_classifier is true but the {arch.name} model has no known "
                             "classification layer; give method.head_patterns or set train_classifier: false")
        # A LoRA-wrapped head (target kind head) trains its base layer ("<name>.base_layer").
        trained = _set_trainable_by_pattern(model, rf"{arch.classifier}(?:\.base_layer)?")
        return {"head": "last_linear", "head_modules": trained, "fully_trained": trained}
    if method.head_patterns:
        trained = _set_trainable_by_pattern(model, rf"(?:{head_pattern(arch)})(?:\.base_layer)?")
        return {"head": "peft", "head_modules": trained, "fully_trained": trained}
    modules = peft_head_modules(model)
    if not modules:
        raise ValueError(f"method.train_classifier is true but no module of this {arch.name} model is named like "
                         f"peft's sequence-classification head (a name ending in {' or '.join(PEFT_SEQ_CLS_HEAD_NAMES)}"
                         "); give method.head_patterns or set train_classifier: false")
    return {"head": "peft", "head_modules": modules, "fully_trained": _train_whole(model, modules)}


def _with_lora(model: nn.Module, method: MethodConfig, wrap=None) -> dict:
    arch = method_architecture(model, method)
    spec = lora_spec(method)
    wrapped = apply_lora(model, spec, wrap=wrap, arch=arch)
    head = _train_head(model, method, arch) if method.train_classifier else {"fully_trained": []}
    return {"lora_modules": wrapped, **head, "architecture": arch.name}


def prepare_lora(model: nn.Module, method: MethodConfig, device: torch.device) -> dict:
    """Frozen base, LoRA on the covered layers; the classification head trains if ``train_classifier``
    (the whole head module peft trains, or only its last linear layer with ``method.head: last_linear``)."""
    return _with_lora(model, method)


def prepare_qlora(model: nn.Module, method: MethodConfig, device: torch.device) -> dict:
    """QLoRA: every linear layer of the base model stored in 4-bit NF4, LoRA on the covered ones.

    The classification head stays in full precision (bitsandbytes' loaders skip it too): the linear layers of
    the name map's ``head`` kind and of the module(s) peft trains whole (``peft_head_modules``), so the head
    trains exactly as under ``lora`` (a 4-bit layer is frozen by construction); a head layer covered by LoRA
    (target kind ``head``) gets a 16/32-bit ``LinearWithLoRA``. The backend is bitsandbytes on CUDA when
    installed, else lora_bench's own NF4 (``method.quant.backend``).
    """
    arch = method_architecture(model, method)
    quant = method.quant
    backend = select_backend(device, None if quant.backend == "auto" else quant.backend).name
    layout = {"block_size": quant.block_size, "double_quant": quant.double_quant}
    head = re.compile(head_pattern(arch))
    peft_head = peft_head_modules(model)

    def full_precision(name: str) -> bool:
        return bool(head.fullmatch(name)) or any(name == m or name.startswith(m + ".") for m in peft_head)

    # The wrap sees only the layer, not its name: recognise the head's layers by identity.
    head_layers = {id(m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and full_precision(name)}
    nf4 = nf4_wrap_for(device, backend, **layout)

    def wrap(linear: nn.Linear, spec: LoRASpec) -> nn.Module:
        if id(linear) in head_layers:
            return LinearWithLoRA(linear, spec)
        return nf4(linear, spec)

    info = _with_lora(model, method, wrap=wrap)
    info["quantized_frozen"] = quantize_remaining_linears(model, full_precision, device, backend, **layout)
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
