"""Finetuning methods as a registry: each decides which parameters train.

Adding a method is one function plus one entry in ``METHODS`` (QLoRA registers itself the same
way). Every method leaves the model with ``requires_grad`` set exactly on what trains, so the
exact trainable-parameter count is simply ``count_parameters(model)``.

``method.impl`` picks whose layers: ``IMPLEMENTATIONS["ours"]`` is ``METHODS``; ``IMPLEMENTATIONS["peft"]``
runs Hugging Face peft's ``get_peft_model`` on the same model (bitsandbytes 4-bit base layers for QLoRA), with
the layers our name map covers given to peft by their exact names and the same head in ``modules_to_save``, so
both implementations train the same parameters and a cost family can put them side by side.

QLoRA (both implementations) takes a random model whose weights are still on the meta device
(``LAYER_BY_LAYER``) and materializes, initialises and quantizes one linear layer at a time, so the 16-bit model
is never whole on the device; what is left (embeddings, norms, head) is materialized afterwards by the caller
(``models.materialize``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from lora_bench.adapters.lora import (
    PEFT_SEQ_CLS_HEAD_NAMES,
    Architecture,
    LinearWithLoRA,
    LoRALayer,
    LoRASpec,
    apply_lora,
    architecture_of,
    find_targets,
    head_pattern,
    linear_layer_names,
    peft_head_modules,
)
from lora_bench.adapters.quant import nf4_wrap_for, quantize_remaining_linears, select_backend
from lora_bench.config import ConfigError, MethodConfig
from lora_bench.run.models import materialize, on_meta


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
    full_precision = _full_precision_rule(model, arch)
    # The wrap sees only the layer, not its name: recognise the head's layers by identity.
    head_layers = {id(m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and full_precision(name)}
    nf4 = nf4_wrap_for(device, backend, **layout)
    ready = _ready(model, device)

    def wrap(linear: nn.Linear, spec: LoRASpec) -> nn.Module:
        if id(linear) in head_layers:
            return LinearWithLoRA(ready(linear), spec)
        return nf4(ready(linear), spec)

    info = _with_lora(model, method, wrap=wrap)
    info["quantized_frozen"] = quantize_remaining_linears(model, full_precision, device, backend, **layout,
                                                          prepare=ready)
    info["quant_backend"] = backend
    return info


def _ready(model: nn.Module, device: torch.device) -> Callable[[nn.Module], nn.Module]:
    """A linear layer of ``model`` with real weights on ``device``: a layer still on the meta device is
    materialized and initialised alone, just before it is quantized (see ``models.materialize``)."""
    return lambda layer: materialize(model, device, part=layer) if on_meta(layer) else layer


def _full_precision_rule(model: nn.Module, arch: Architecture) -> Callable[[str], bool]:
    """Which linear layers QLoRA leaves unquantized: the head's (the name map's head kind and what peft trains
    whole), as bitsandbytes' loaders do."""
    head = re.compile(head_pattern(arch))
    peft_head = peft_head_modules(model)
    return lambda name: bool(head.fullmatch(name)) or any(name == m or name.startswith(m + ".") for m in peft_head)


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


# ----------------------------------------------------------------------------------------------------
# method.impl peft: Hugging Face peft's layers on the same model, covering the same layers

# Our scaling rule -> (peft's lora_alpha, use_rslora) giving the same scale; peft has no plain-alpha rule, and
# alpha/r with lora_alpha = alpha * r is it.
PEFT_SCALING: dict[str, Callable[[float, int], tuple[float, bool]]] = {
    "alpha/r": lambda alpha, rank: (alpha, False),
    "rslora": lambda alpha, rank: (alpha, True),
    "alpha": lambda alpha, rank: (alpha * rank, False),
}


def _head_modules(model: nn.Module, method: MethodConfig, arch: Architecture) -> list[str]:
    """The modules ``train_classifier`` trains whole, as ``_train_head`` picks them, for peft's modules_to_save."""
    if not method.train_classifier:
        return []
    if method.head == "last_linear" or method.head_patterns:
        rule = arch.classifier if method.head == "last_linear" else head_pattern(arch)
        if rule is None:
            raise ValueError(f"method.train_classifier is true but the {arch.name} model has no known "
                             "classification layer; give method.head_patterns or set train_classifier: false")
        return [name for name in linear_layer_names(model) if re.fullmatch(rule, name)]
    return peft_head_modules(model)


def _with_peft(model: nn.Module, method: MethodConfig, arch: Architecture) -> dict:
    """``peft.get_peft_model`` on ``model``: LoRA on exactly the layers our name map covers, the head in
    ``modules_to_save``. peft injects its layers into ``model`` itself (the returned ``PeftModel`` only wraps it),
    so the training loop goes on with ``model``; a head peft's suffix matching would widen is a named error."""
    try:
        import peft
    except ImportError as exc:
        raise ConfigError("method.impl peft needs the peft package: pip install peft") from exc
    spec = lora_spec(method)
    targets = find_targets(model, spec, arch)
    head = _head_modules(model, method, arch)
    alpha, rslora = PEFT_SCALING[spec.scaling](spec.alpha, spec.rank)
    config = peft.LoraConfig(
        r=spec.rank, lora_alpha=alpha, use_rslora=rslora, lora_dropout=spec.dropout, bias="none",
        # A string is matched with re.fullmatch against every module name: exactly our layers, nothing by suffix.
        target_modules="|".join(re.escape(name) for name in targets),
        modules_to_save=head or None,
    )
    peft.get_peft_model(model, config)
    saved = [name for name, module in model.named_modules() if isinstance(module, peft.utils.ModulesToSaveWrapper)]
    if saved != head:
        raise ValueError(f"peft's modules_to_save matched {saved}, not the head {head} that impl ours trains "
                         "(it matches names by suffix); use method.impl ours for this head")
    return {"lora_modules": targets, "head": method.head if head else None, "head_modules": head,
            "fully_trained": head, "architecture": arch.name, "impl": "peft", "peft_version": peft.__version__}


def prepare_lora_peft(model: nn.Module, method: MethodConfig, device: torch.device) -> dict:
    """LoRA by peft, covering and training what ``prepare_lora`` does."""
    return _with_peft(model, method, method_architecture(model, method))


def prepare_qlora_peft(model: nn.Module, method: MethodConfig, device: torch.device) -> dict:
    """QLoRA by peft + bitsandbytes: every linear layer but the head's becomes bitsandbytes' NF4 ``Linear4bit``
    (double-quantized, block 64, as ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True)`` gives), one layer at a time, then peft puts its 4-bit LoRA layers on the
    covered ones. CUDA only (the config refuses the CPU; here ``device: auto`` without a GPU is the same error)."""
    arch = method_architecture(model, method)
    try:
        backend = select_backend(device, "bitsandbytes").name
    except RuntimeError as exc:
        raise ConfigError(f"method qlora with impl peft needs bitsandbytes' 4-bit layers: {exc}; use impl ours "
                          "(lora_bench's own NF4 runs anywhere)") from exc
    quantized = quantize_remaining_linears(model, _full_precision_rule(model, arch), device, backend,
                                           prepare=_ready(model, device))
    info = _with_peft(model, method, arch)
    return {**info, "quantized_frozen": quantized, "quant_backend": backend}


METHODS: dict[str, Callable[[nn.Module, MethodConfig, torch.device], dict]] = {
    "lora": prepare_lora,
    "qlora": prepare_qlora,
    "last_layers": prepare_last_layers,
    "full": prepare_full,
}

# method.impl -> its registry; peft has LoRA layers only (config.PEFT_METHODS names the same methods).
IMPLEMENTATIONS: dict[str, dict[str, Callable[[nn.Module, MethodConfig, torch.device], dict]]] = {
    "ours": METHODS,
    "peft": {"lora": prepare_lora_peft, "qlora": prepare_qlora_peft},
}

# Methods that take a random model with its weights still on the meta device and materialize it layer by layer
# (the caller materializes what they leave); every other method gets the model whole on its device.
LAYER_BY_LAYER = frozenset({"qlora"})


def builds_layer_by_layer(method: MethodConfig) -> bool:
    """Whether ``method`` wants the model with its weights still on the meta device (see ``LAYER_BY_LAYER``)."""
    return method.name in LAYER_BY_LAYER


def prepare_model(model: nn.Module, method: MethodConfig, device: torch.device | str = "cpu") -> dict:
    """Apply ``method`` to ``model`` (on ``device``, or on the meta device for ``LAYER_BY_LAYER`` methods) in
    place; returns what it did, for the record."""
    registry = IMPLEMENTATIONS[method.impl]
    if method.name not in registry:
        raise ValueError(f"unknown method {method.name!r} for impl {method.impl!r}; registered: {sorted(registry)}")
    return registry[method.name](model, method, torch.device(device))
