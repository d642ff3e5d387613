"""LoRA from scratch: the low-rank adapter, the wrapped linear layer, and model surgery.

This is the research object of the suite, so it is written to be read. A frozen linear map
``W x + b`` gains a trainable low-rank update ``scale * (x @ A @ B)`` with ``A`` (in x r) drawn at
random and ``B`` (r x out) zero, so a freshly wrapped model computes exactly what it did before.

Three scaling rules are supported because the literature uses all three and they change which
``alpha`` is "good":

- ``"alpha"``: ``alpha * x A B`` (the from-scratch tutorial behind the reference results),
- ``"alpha/r"``: ``alpha / r`` (Hu et al. 2021 and Hugging Face ``peft``),
- ``"rslora"``: ``alpha / sqrt(r)`` (rank-stabilised LoRA, Kalajdzievski 2023).

``apply_lora`` replaces the covered ``nn.Linear`` modules of a model, located through a
per-architecture name map (``ARCHITECTURES``), so one coverage spec means the same thing on
DistilBERT, BERT and Llama-style models.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

SCALING_RULES: dict[str, Callable[[float, int], float]] = {
    "alpha": lambda alpha, rank: float(alpha),
    "alpha/r": lambda alpha, rank: alpha / rank,
    "rslora": lambda alpha, rank: alpha / math.sqrt(rank),
}

COVERAGE_KINDS = ("query", "key", "value", "projection", "mlp", "head")


class LoRALayer(nn.Module):
    """The low-rank update ``scale * dropout(x) @ A @ B``.

    ``A`` starts as ``randn / sqrt(r)`` (the tutorial's init; the scale keeps ``x A`` of unit
    order whatever the rank) and ``B`` as zeros, so the update is exactly zero until trained.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.scale = scale
        self.A = nn.Parameter(torch.randn(in_features, rank) / math.sqrt(rank))
        self.B = nn.Parameter(torch.zeros(rank, out_features))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.A.dtype)
        return self.scale * (x @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight in ``nn.Linear`` layout (out x in)."""
        return self.scale * (self.A @ self.B).T


def make_lora(
    in_features: int,
    out_features: int,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    scaling: str = "alpha/r",
    device: torch.device | str | None = None,
) -> LoRALayer:
    """The adapter for an (in -> out) linear map, scaled by the named rule; shared by every LoRA layer kind."""
    if scaling not in SCALING_RULES:
        raise ValueError(f"unknown LoRA scaling rule {scaling!r}; choose one of {sorted(SCALING_RULES)}")
    layer = LoRALayer(in_features, out_features, rank, SCALING_RULES[scaling](alpha, rank), dropout)
    return layer.to(device=device) if device is not None else layer


class LinearWithLoRA(nn.Module):
    """A frozen ``nn.Linear`` (kept as ``base_layer``, as peft does) plus a trainable ``LoRALayer``."""

    def __init__(
        self,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        scaling: str = "alpha/r",
    ):
        super().__init__()
        self.lora = make_lora(linear.in_features, linear.out_features, rank, alpha, dropout, scaling,
                              linear.weight.device)
        self.base_layer = linear
        self.scaling = scaling
        self.alpha = alpha
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        # Some model code reads `.weight.dtype` / `.weight.device` of its linear layers.
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.lora(x).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (no inference overhead). Idempotent."""
        if self.merged:
            return
        merged = self.base_layer.weight + self.lora.delta_weight().to(self.base_layer.weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError("refusing to merge LoRA: the merged weight would contain NaN or Inf")
        self.base_layer.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``. Idempotent."""
        if not self.merged:
            return
        restored = self.base_layer.weight - self.lora.delta_weight().to(self.base_layer.weight.dtype)
        if not torch.isfinite(restored).all():
            raise ValueError("refusing to unmerge LoRA: the restored weight would contain NaN or Inf")
        self.base_layer.weight.copy_(restored)
        self.merged = False


@dataclass(frozen=True)
class Architecture:
    """Where each coverage kind lives in one model family.

    Patterns are regular expressions matched against the full module name with ``re.fullmatch``;
    ``layer`` captures the transformer-block index so a spec can restrict coverage to some layers.
    The ``head`` kind matches the classification head's linear layers (all trained by
    ``last_layers``; LoRA-covered when a spec includes ``head``); ``classifier`` matches only the
    final, freshly initialised output layer.
    """

    name: str
    model_types: tuple[str, ...]
    kinds: dict[str, str]
    classifier: str


_BERT_LAYER = r"(?:.*\.)?encoder\.layer\.(?P<layer>\d+)\."
_DISTILBERT_LAYER = r"(?:.*\.)?transformer\.layer\.(?P<layer>\d+)\."
_LLAMA_LAYER = r"(?:.*\.)?layers\.(?P<layer>\d+)\."

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            name="bert",
            model_types=("bert",),
            kinds={
                "query": _BERT_LAYER + r"attention\.self\.query",
                "key": _BERT_LAYER + r"attention\.self\.key",
                "value": _BERT_LAYER + r"attention\.self\.value",
                "projection": _BERT_LAYER + r"attention\.output\.dense",
                "mlp": _BERT_LAYER + r"(?:intermediate\.dense|output\.dense)",
                "head": r"(?:.*\.)?(?:pooler\.dense|classifier)",
            },
            classifier="classifier",
        ),
        Architecture(
            name="distilbert",
            model_types=("distilbert",),
            kinds={
                "query": _DISTILBERT_LAYER + r"attention\.q_lin",
                "key": _DISTILBERT_LAYER + r"attention\.k_lin",
                "value": _DISTILBERT_LAYER + r"attention\.v_lin",
                "projection": _DISTILBERT_LAYER + r"attention\.out_lin",
                "mlp": _DISTILBERT_LAYER + r"ffn\.(?:lin1|lin2)",
                "head": r"(?:pre_classifier|classifier)",
            },
            classifier="classifier",
        ),
        Architecture(
            name="llama",
            model_types=("llama", "mistral", "qwen2"),
            kinds={
                "query": _LLAMA_LAYER + r"self_attn\.q_proj",
                "key": _LLAMA_LAYER + r"self_attn\.k_proj",
                "value": _LLAMA_LAYER + r"self_attn\.v_proj",
                "projection": _LLAMA_LAYER + r"self_attn\.o_proj",
                "mlp": _LLAMA_LAYER + r"mlp\.(?:gate_proj|up_proj|down_proj)",
                "head": r"score",
            },
            classifier="score",
        ),
    )
}


def architecture_of(model: nn.Module) -> Architecture:
    """The name map for ``model``, found from its Hugging Face ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    raise ValueError(
        f"no LoRA name map for model_type {model_type!r}; known: "
        f"{sorted(t for a in ARCHITECTURES.values() for t in a.model_types)}. "
        f"Its linear layers are: {', '.join(linears[:40])}{' ...' if len(linears) > 40 else ''}"
    )


@dataclass(frozen=True)
class LoRASpec:
    """Which linear layers get LoRA, and its hyper-parameters.

    ``targets`` are coverage kinds from ``COVERAGE_KINDS``; ``layers`` restricts the per-block kinds
    (all but ``head``) to those transformer-block indices (``None`` = every block).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    scaling: str = "alpha/r"
    targets: tuple[str, ...] = ("query", "value")
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.targets) - set(COVERAGE_KINDS)
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {list(COVERAGE_KINDS)}")
        if not self.targets:
            raise ValueError("LoRA targets must name at least one kind")
        if self.scaling not in SCALING_RULES:
            raise ValueError(f"unknown LoRA scaling rule {self.scaling!r}; choose one of {sorted(SCALING_RULES)}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


def find_targets(model: nn.Module, spec: LoRASpec, arch: Architecture | None = None) -> list[str]:
    """Names of the ``nn.Linear`` modules that ``spec`` covers, in model order."""
    arch = arch or architecture_of(model)
    patterns = [(kind, re.compile(arch.kinds[kind])) for kind in spec.targets]
    layers = set(spec.layers) if spec.layers is not None else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        for kind, pattern in patterns:
            match = pattern.fullmatch(name)
            if match is None:
                continue
            if kind != "head" and layers is not None and int(match.group("layer")) not in layers:
                continue
            names.append(name)
            break
    if not names:
        raise ValueError(f"LoRA spec {spec} matched no linear layer of this {arch.name} model")
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(
    model: nn.Module,
    spec: LoRASpec,
    wrap: Callable[[nn.Linear, LoRASpec], nn.Module] | None = None,
) -> list[str]:
    """Freeze ``model`` and wrap every covered linear layer; returns the wrapped names.

    ``wrap`` builds the replacement for one ``nn.Linear`` (default: ``LinearWithLoRA``); QLoRA passes
    its own so the 4-bit layer sits beside the 16-bit one without branching here.
    """
    wrap = wrap or (lambda linear, s: LinearWithLoRA(linear, s.rank, s.alpha, s.dropout, s.scaling))
    names = find_targets(model, spec)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set_submodule(model, name, wrap(model.get_submodule(name), spec))
    return names


def lora_modules(model: nn.Module) -> Iterable[nn.Module]:
    """Every module carrying a ``LoRALayer`` (16-bit ``LinearWithLoRA`` and the 4-bit QLoRA layers)."""
    return (m for m in model.modules() if isinstance(getattr(m, "lora", None), LoRALayer))


def merge_lora(model: nn.Module) -> None:
    for module in lora_modules(model):
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    for module in lora_modules(model):
        module.unmerge()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


__all__ = [
    "ARCHITECTURES",
    "COVERAGE_KINDS",
    "SCALING_RULES",
    "Architecture",
    "LinearWithLoRA",
    "LoRALayer",
    "LoRASpec",
    "apply_lora",
    "architecture_of",
    "count_parameters",
    "find_targets",
    "lora_modules",
    "make_lora",
    "merge_lora",
    "unmerge_lora",
]
