"""LoRA from scratch: the low-rank adapter, the wrapped linear layer, and model surgery.

This is the research object of the suite, so it is written to be read. A frozen linear map
``W x + b`` gains a trainable low-rank update ``scale * (x @ A @ B)`` with ``A`` (in x r) drawn at
random and ``B`` (r x out) zero, so a freshly wrapped model computes exactly what it did before.

Three scaling rules are supported because the literature uses all three and they change which
``alpha`` is "good":

- ``"alpha"``: ``alpha * x A B`` (the from-scratch tutorial behind the reference results),
- ``"alpha/r"``: ``alpha / r`` (Hu et al. 2021 and Hugging Face ``peft``),
- ``"rslora"``: ``alpha / sqrt(r)`` (rank-stabilised LoRA, Kalajdzievski 2023).

The variants practitioners compare against are options of the same layer, each checked against peft in
``tests/test_variants.py``: how ``A`` and ``B`` start (``LORA_INITS``: the tutorial's ``randn / sqrt(r)``,
peft's Kaiming-uniform, PiSSA's top-r singular vectors of ``W``), DoRA's trainable magnitude (``dora``), and
LoRA+'s larger learning rate for ``B`` (``optimizer_groups``). Every LoRA layer kind (16-bit here, 4-bit in
``quant.py``) is a ``LoRAWrapper``: the frozen ``base_layer`` plus the adapter, built from the spec whole.

``apply_lora`` replaces the covered ``nn.Linear`` modules of a model, located through a
per-architecture name map (``ARCHITECTURES``), so one coverage spec means the same thing on
BERT, DistilBERT, RoBERTa/XLM-R, DeBERTa-v2, ELECTRA, ALBERT, MPNet and Llama-style models. For any
other architecture a config gives the module names as regular expressions instead
(``method.lora.target_patterns``, ``method.head_patterns``); ``architecture_of`` then builds the map
from them, and without them its error lists the model's linear layers and shows how to write them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

SCALING_RULES: dict[str, Callable[[float, int], float]] = {
    "alpha": lambda alpha, rank: float(alpha),
    "alpha/r": lambda alpha, rank: alpha / rank,
    "rslora": lambda alpha, rank: alpha / math.sqrt(rank),
}

COVERAGE_KINDS = ("query", "key", "value", "projection", "mlp", "head")


def _randn_over_sqrt_rank(in_features: int, out_features: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The tutorial's init: the 1/sqrt(r) keeps x A of unit order whatever the rank.
    return torch.randn(in_features, rank) / math.sqrt(rank), torch.zeros(rank, out_features)


def _kaiming_uniform(in_features: int, out_features: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    # peft's default (and microsoft/LoRA's): nn.Linear's own init of a (rank x in) weight, uniform in
    # +-1/sqrt(in). Drawn in that layout, so the same generator state gives peft's tensor, transposed.
    a = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a.T.contiguous(), torch.zeros(rank, out_features)


def _zeros(in_features: int, out_features: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(in_features, rank), torch.zeros(rank, out_features)


@torch.no_grad()
def _pissa(lora: LoRALayer, weight: torch.Tensor) -> torch.Tensor:
    """PiSSA (Meng et al. 2024): A and B from the top-r singular triplets of ``W``, ``W`` replaced by the rest.

    With ``W = U S V^T`` (out x in), ``scale * B^T A^T = U_r S_r V_r^T``: both factors get ``sqrt(S_r / scale)``,
    as in peft's ``pissa_init``, so the wrapped layer computes what it did before (up to float rounding).
    Returns the residual ``W - U_r S_r V_r^T`` in ``weight``'s dtype.
    """
    w = weight.float()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = torch.sqrt(s[: lora.rank] / lora.scale)
    lora.A.copy_((root[:, None] * vh[: lora.rank]).T)  # (in x r)
    lora.B.copy_((u[:, : lora.rank] * root[None, :]).T)  # (r x out)
    return (w - lora.delta_weight().float()).to(weight.dtype)


@dataclass(frozen=True)
class LoRAInit:
    """How ``A`` and ``B`` start: ``draw(in, out, rank)`` before the base weight is seen; an init that needs
    the weight also has ``from_weight(lora, W)``, which sets the factors and returns the weight to keep instead."""

    draw: Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]
    from_weight: Callable[[LoRALayer, torch.Tensor], torch.Tensor] | None = None


# method.lora.init -> how A and B start. Every init keeps the wrapped layer's output as it was.
LORA_INITS: dict[str, LoRAInit] = {
    "tutorial": LoRAInit(_randn_over_sqrt_rank),
    "kaiming": LoRAInit(_kaiming_uniform),
    "pissa": LoRAInit(_zeros, _pissa),
}


@dataclass(frozen=True)
class LoRASpec:
    """Which linear layers get LoRA, and its hyper-parameters.

    ``targets`` are coverage kinds from ``COVERAGE_KINDS``; ``layers`` restricts the per-block kinds
    (all but ``head``) to those transformer-block indices (``None`` = every block). ``init`` names an entry
    of ``LORA_INITS``; ``dora`` adds DoRA's trainable magnitude (one number per output feature).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    scaling: str = "alpha/r"
    targets: tuple[str, ...] = ("query", "value")
    layers: tuple[int, ...] | None = None
    # Regexes of module names, used instead of ``targets`` when given.
    patterns: tuple[str, ...] | None = None
    init: str = "tutorial"
    dora: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.targets) - set(COVERAGE_KINDS)
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {list(COVERAGE_KINDS)}")
        if not self.targets:
            raise ValueError("LoRA targets must name at least one kind")
        if self.scaling not in SCALING_RULES:
            raise ValueError(f"unknown LoRA scaling rule {self.scaling!r}; choose one of {sorted(SCALING_RULES)}")
        if self.init not in LORA_INITS:
            raise ValueError(f"unknown LoRA init {self.init!r}; choose one of {sorted(LORA_INITS)}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


class LoRALayer(nn.Module):
    """The low-rank update ``scale * dropout(x) @ A @ B``, and DoRA's magnitude when there is one.

    ``A`` (in x r) and ``B`` (r x out) start as ``LORA_INITS[init]`` draws them; every init has ``B = 0`` or
    takes the update out of the base weight, so a freshly wrapped layer computes what it did before.
    ``magnitude`` (out) is ``None`` for plain LoRA; ``init_magnitude`` creates it for DoRA.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, dropout: float = 0.0,
                 init: str = "tutorial"):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.scale = scale
        self.init = init
        a, b = LORA_INITS[init].draw(in_features, out_features, rank)
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(b)
        self.magnitude: nn.Parameter | None = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.A.dtype)
        return self.scale * (x @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight in ``nn.Linear`` layout (out x in)."""
        return self.scale * (self.A @ self.B).T

    @torch.no_grad()
    def init_magnitude(self, weight: torch.Tensor) -> None:
        """DoRA: the magnitude starts as the row norms of ``W + scale B^T A^T``, so the output is unchanged."""
        self.magnitude = nn.Parameter(row_norm(weight.float(), self.delta_weight().float()).to(self.A.dtype))

    @property
    def dora(self) -> bool:
        return self.magnitude is not None


def row_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """DoRA's ``||W + dW||``, one L2 norm per output feature (a row of the ``nn.Linear`` weight).

    Always without gradient: the paper (section 4.3) and peft treat the norm as a constant, so only the
    magnitude and the direction's LoRA factors learn, and no (out x in) graph is kept for backward.
    """
    with torch.no_grad():
        return torch.linalg.norm(weight + delta, dim=1)


def make_lora(
    in_features: int,
    out_features: int,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    scaling: str = "alpha/r",
    device: torch.device | str | None = None,
    init: str = "tutorial",
) -> LoRALayer:
    """The adapter for an (in -> out) linear map, scaled by the named rule; shared by every LoRA layer kind.

    Drawn on the CPU and then moved, so a seed gives the same factors on every device.
    """
    if scaling not in SCALING_RULES:
        raise ValueError(f"unknown LoRA scaling rule {scaling!r}; choose one of {sorted(SCALING_RULES)}")
    layer = LoRALayer(in_features, out_features, rank, SCALING_RULES[scaling](alpha, rank), dropout, init)
    return layer.to(device=device) if device is not None else layer


class LoRAWrapper(nn.Module):
    """What every LoRA layer kind shares: a frozen ``base_layer`` (as peft keeps it) plus a ``LoRALayer``.

    A layer kind (16-bit ``LinearWithLoRA``, the 4-bit ones in ``quant.py``) only says how its base layer is
    built from the dense ``nn.Linear`` (``make_base``) and how the dense base weight is read back
    (``dense_weight``, for DoRA's norm and for merging). The spec is passed whole; keyword arguments override
    its fields (``LinearWithLoRA(linear, rank=4, alpha=8)``).

    Construction order: the adapter first (a bad scaling rule fails before a slow quantization; the factors
    are drawn before anything else uses the generator), then an init that needs the weight (PiSSA) on the
    dense weight, then the base layer from the (residual) weight, then DoRA's magnitude from the stored base.

    With DoRA (Liu et al. 2024) the layer computes ``m * (W + s B^T A^T) x / ||W + s B^T A^T|| + b``,
    written as the base output plus a correction as in peft: ``(m/n - 1) W x + (m/n) s x A B``, with the
    norm ``n`` detached (``row_norm``).
    """

    def __init__(self, linear: nn.Linear, spec: LoRASpec | None = None, *,
                 make_base: Callable[[nn.Linear], nn.Module] | None = None,
                 device: torch.device | str | None = None, **fields):
        super().__init__()
        spec = replace(spec or LoRASpec(), **fields)
        self.spec = spec
        self.lora = make_lora(linear.in_features, linear.out_features, spec.rank, spec.alpha, spec.dropout,
                              spec.scaling, device or linear.weight.device, spec.init)
        from_weight = LORA_INITS[spec.init].from_weight
        if from_weight is not None:
            # peft's PiSSA also rewrites the base weight in place; a 4-bit kind then quantizes the residual.
            linear.weight.data = from_weight(self.lora, linear.weight.detach())
        self.base_layer = make_base(linear) if make_base else linear
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        if spec.dora:
            self.lora.init_magnitude(self.dense_weight())
        self.merged = False
        self._merged_norm: torch.Tensor | None = None

    # Kept as attributes for code that reads them; the values live in the spec.
    @property
    def scaling(self) -> str:
        return self.spec.scaling

    @property
    def alpha(self) -> float:
        return self.spec.alpha

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def dense_weight(self) -> torch.Tensor:
        """The frozen base weight as a dense (out x in) tensor."""
        return self.base_layer.weight

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_output(x)
        if self.merged:
            return out
        if not self.lora.dora:
            return out + self.lora(x).to(out.dtype)
        return out + self._dora_correction(x, out).to(out.dtype)

    def _dora_correction(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        lora = self.lora
        weight = self.dense_weight()
        norm = row_norm(weight.to(lora.A.dtype), lora.delta_weight().detach())
        factor = lora.magnitude / norm
        dropped = lora.dropout(x).to(lora.A.dtype)
        if isinstance(lora.dropout, nn.Identity) or not self.training:
            # The dropped input is x itself: reuse the base output without its bias instead of a second matmul.
            base = out.to(lora.A.dtype) - (self.bias.to(lora.A.dtype) if self.bias is not None else 0)
        else:
            base = torch.nn.functional.linear(dropped, weight.to(lora.A.dtype))
        return (factor - 1) * base + factor * (lora.scale * (dropped @ lora.A @ lora.B))

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The dense weight that computes what the adapted layer computes (fp32), for merging and export."""
        weight = self.dense_weight().float()
        delta = self.lora.delta_weight().float()
        if not self.lora.dora:
            return weight + delta
        return (self.lora.magnitude.float() / row_norm(weight, delta))[:, None] * (weight + delta)

    @torch.no_grad()
    def merged_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A new dense ``nn.Linear`` computing base + update (for export, or to time the merged model)."""
        merged = self.merged_weight()
        if not torch.isfinite(merged).all():
            raise ValueError("refusing to merge LoRA: the merged weight would contain NaN or Inf")
        dtype = dtype or getattr(self.base_layer, "weight_dtype", None) or self.dense_weight().dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=merged.device,
                           dtype=dtype)
        linear.weight.copy_(merged)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (no inference overhead). Idempotent."""
        if self.merged:
            return
        weight = self.base_layer.weight
        if self.lora.dora:
            merged = self.merged_weight().to(weight.dtype)
        else:
            merged = weight + self.lora.delta_weight().to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError("refusing to merge LoRA: the merged weight would contain NaN or Inf")
        if self.lora.dora:
            # unmerge divides by the factor of the weight it was merged from, as peft caches it.
            self._merged_norm = row_norm(weight.float(), self.lora.delta_weight().float())
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``. Idempotent."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        if self.lora.dora:
            factor = self.lora.magnitude.float() / self._merged_norm
            restored = (weight.float() / factor[:, None] - self.lora.delta_weight().float()).to(weight.dtype)
        else:
            restored = weight - self.lora.delta_weight().to(weight.dtype)
        if not torch.isfinite(restored).all():
            raise ValueError("refusing to unmerge LoRA: the restored weight would contain NaN or Inf")
        weight.copy_(restored)
        self.merged = False
        self._merged_norm = None


class LinearWithLoRA(LoRAWrapper):
    """A frozen ``nn.Linear`` (kept as ``base_layer``, as peft does) plus a trainable ``LoRALayer``."""

    @property
    def weight(self) -> torch.Tensor:
        # Some model code reads `.weight.dtype` / `.weight.device` of its linear layers.
        return self.base_layer.weight


@dataclass(frozen=True)
class Architecture:
    """Where each coverage kind lives in one model family.

    Patterns are regular expressions matched against the full module name with ``re.fullmatch``;
    ``layer`` captures the transformer-block index so a spec can restrict coverage to some layers.
    The ``head`` kind matches the classification head's linear layers (all trained by
    ``last_layers``; LoRA-covered when a spec includes ``head``); ``classifier`` matches only the
    final, freshly initialised output layer (what ``train_classifier`` trains under ``method.head:
    last_linear``; the default ``peft`` trains the modules of ``peft_head_modules`` instead).
    """

    name: str
    model_types: tuple[str, ...]
    kinds: dict[str, str]
    classifier: str | None
    # ALBERT-style models run one set of block weights at every depth: there is no block to pick.
    shared_layers: bool = False


_BERT_LAYER = r"(?:.*\.)?encoder\.layer\.(?P<layer>\d+)\."
_ALBERT_LAYER = r"(?:.*\.)?encoder\.albert_layer_groups\.\d+\.albert_layers\.\d+\."
# RoBERTa, XLM-R, ELECTRA and MPNet share this head: dense (hidden -> hidden) then out_proj (-> labels).
_DENSE_OUT_HEAD = r"classifier\.(?:dense|out_proj)"
_DISTILBERT_LAYER = r"(?:.*\.)?transformer\.layer\.(?P<layer>\d+)\."
_LLAMA_LAYER = r"(?:.*\.)?layers\.(?P<layer>\d+)\."

# BERT's per-block layer names, reused unchanged by RoBERTa/XLM-R and ELECTRA (only their heads differ).
_BERT_BLOCK_KINDS = {
    "query": _BERT_LAYER + r"attention\.self\.query",
    "key": _BERT_LAYER + r"attention\.self\.key",
    "value": _BERT_LAYER + r"attention\.self\.value",
    "projection": _BERT_LAYER + r"attention\.output\.dense",
    "mlp": _BERT_LAYER + r"(?:intermediate\.dense|output\.dense)",
}

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            name="bert",
            model_types=("bert",),
            kinds={
                **_BERT_BLOCK_KINDS,
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
            name="roberta",
            model_types=("roberta", "xlm-roberta", "camembert"),
            kinds={
                **_BERT_BLOCK_KINDS,
                "head": _DENSE_OUT_HEAD,
            },
            classifier=r"classifier\.out_proj",
        ),
        Architecture(
            name="electra",
            model_types=("electra",),
            kinds={
                **_BERT_BLOCK_KINDS,
                "head": _DENSE_OUT_HEAD,
            },
            classifier=r"classifier\.out_proj",
        ),
        Architecture(
            name="deberta-v2",
            model_types=("deberta-v2",),
            kinds={
                # Never pos_key_proj / pos_query_proj: those project relative positions, not the tokens.
                "query": _BERT_LAYER + r"attention\.self\.query_proj",
                "key": _BERT_LAYER + r"attention\.self\.key_proj",
                "value": _BERT_LAYER + r"attention\.self\.value_proj",
                "projection": _BERT_LAYER + r"attention\.output\.dense",
                "mlp": _BERT_LAYER + r"(?:intermediate\.dense|output\.dense)",
                "head": r"(?:pooler\.dense|classifier)",
            },
            classifier="classifier",
        ),
        Architecture(
            name="albert",
            model_types=("albert",),
            kinds={
                "query": _ALBERT_LAYER + r"attention\.query",
                "key": _ALBERT_LAYER + r"attention\.key",
                "value": _ALBERT_LAYER + r"attention\.value",
                "projection": _ALBERT_LAYER + r"attention\.dense",
                "mlp": _ALBERT_LAYER + r"(?:ffn|ffn_output)",
                "head": r"(?:albert\.pooler|classifier)",
            },
            classifier="classifier",
            shared_layers=True,
        ),
        Architecture(
            name="mpnet",
            model_types=("mpnet",),
            kinds={
                "query": _BERT_LAYER + r"attention\.attn\.q",
                "key": _BERT_LAYER + r"attention\.attn\.k",
                "value": _BERT_LAYER + r"attention\.attn\.v",
                "projection": _BERT_LAYER + r"attention\.attn\.o",
                "mlp": _BERT_LAYER + r"(?:intermediate\.dense|output\.dense)",
                "head": _DENSE_OUT_HEAD,
            },
            classifier=r"classifier\.out_proj",
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


def linear_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _pattern_help(model_type, linears: list[str]) -> str:
    """How to write the patterns for an unknown architecture, with this model's own layer names."""
    shown = ", ".join(linears[:60]) + (f" ... ({len(linears)} in all)" if len(linears) > 60 else "")
    return (
        f"Its linear layers are: {shown}. Give their names as regular expressions (re.fullmatch) in the run "
        "config, for example:\n"
        "  method:\n"
        "    head_patterns: ['classifier(\\..*)?']  # every linear layer of the classification head\n"
        "    lora:\n"
        "      target_patterns: ['.*\\.layer\\.(?P<layer>\\d+)\\.attention\\.(query|value)']\n"
        f"or add an Architecture for model_type {model_type!r} to ARCHITECTURES in lora_bench/adapters/lora.py."
    )


def _either(patterns) -> str:
    return "|".join(f"(?:{p})" for p in patterns)


def architecture_of(model: nn.Module, head_patterns=None, target_patterns=None) -> Architecture:
    """The name map for ``model``, found from its Hugging Face ``config.model_type``.

    ``head_patterns`` (regexes) replace the map's ``head`` kind; the last matching linear layer in
    model order becomes the ``classifier``. With patterns, an architecture the map does not know gets
    a map holding only what the patterns say.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = next((a for a in ARCHITECTURES.values() if model_type in a.model_types), None)
    if arch is None and not (head_patterns or target_patterns):
        raise ValueError(
            f"no LoRA name map for model_type {model_type!r}; known: "
            f"{sorted(t for a in ARCHITECTURES.values() for t in a.model_types)}. "
            + _pattern_help(model_type, linear_layer_names(model))
        )
    if arch is None:
        arch = Architecture(name=f"custom:{model_type}", model_types=(model_type,), kinds={}, classifier=None)
    if head_patterns:
        head = _either(head_patterns)
        matched = [name for name in linear_layer_names(model) if re.fullmatch(head, name)]
        if not matched:
            raise ValueError(f"method.head_patterns {list(head_patterns)} match no linear layer. "
                             + _pattern_help(model_type, linear_layer_names(model)))
        arch = replace(arch, kinds={**arch.kinds, "head": head}, classifier=re.escape(matched[-1]))
    return arch


# Hugging Face peft (0.21, PeftModelForSequenceClassification) appends these to ``modules_to_save`` for
# task_type SEQ_CLS and trains every module whose full name *ends with* one of them, as a plain string suffix.
PEFT_SEQ_CLS_HEAD_NAMES = ("classifier", "score")


def peft_head_modules(model: nn.Module) -> list[str]:
    """The modules peft's ``task_type="SEQ_CLS"`` trains whole (its ``modules_to_save``), outermost first.

    peft's rule is ``name.endswith("classifier") or name.endswith("score")``, so per architecture:
    BERT/MiniLM, DeBERTa-v2, ALBERT ``classifier`` (one linear; the pooler stays frozen); DistilBERT
    ``pre_classifier`` and ``classifier`` (the suffix matches ``pre_classifier`` too); RoBERTa/XLM-R, ELECTRA,
    MPNet ``classifier`` = ``classifier.dense`` + ``classifier.out_proj``; Llama/Mistral/Qwen2 ``score``.
    A module inside one already listed is left out: the outer one trains all of it.
    """
    names: list[str] = []
    for name, _ in model.named_modules():
        if not name.endswith(PEFT_SEQ_CLS_HEAD_NAMES):
            continue
        if any(name.startswith(outer + ".") for outer in names):
            continue
        names.append(name)
    return names


def head_pattern(arch: Architecture) -> str:
    """The regex of the classification head's linear layers, or a named error when nobody said which."""
    if "head" not in arch.kinds:
        raise ValueError(f"the {arch.name} model has no known classification head; give method.head_patterns")
    return arch.kinds["head"]


def _kind_patterns(spec: LoRASpec, arch: Architecture) -> list[tuple[str, re.Pattern]]:
    if spec.patterns:
        return [("pattern", re.compile(p)) for p in spec.patterns]
    missing = [kind for kind in spec.targets if kind not in arch.kinds]
    if missing:
        raise ValueError(f"the {arch.name} name map has no LoRA target kind(s) {missing}; "
                         "give method.lora.target_patterns")
    return [(kind, re.compile(arch.kinds[kind])) for kind in spec.targets]


def find_targets(model: nn.Module, spec: LoRASpec, arch: Architecture | None = None) -> list[str]:
    """Names of the ``nn.Linear`` modules that ``spec`` covers, in model order."""
    if arch is None:
        arch = architecture_of(model, target_patterns=spec.patterns)
    patterns = _kind_patterns(spec, arch)
    layers = set(spec.layers) if spec.layers is not None else None
    if layers is not None and arch.shared_layers:
        raise ValueError(f"{arch.name} shares one set of block weights across all layers, so "
                         "method.lora.layers cannot pick blocks; set it to null")
    if layers is not None and spec.patterns:
        unrestricted = [p for _, p in patterns if "layer" not in p.groupindex]
        if unrestricted:
            raise ValueError(f"method.lora.layers needs a named group (?P<layer>\\d+) in every target pattern; "
                             f"{[p.pattern for p in unrestricted]} have none")
    names = []
    for name in linear_layer_names(model):
        for kind, pattern in patterns:
            match = pattern.fullmatch(name)
            if match is None:
                continue
            if kind != "head" and layers is not None and int(match.group("layer")) not in layers:
                continue
            names.append(name)
            break
    if not names:
        raise ValueError(f"LoRA spec {spec} matched no linear layer of this {arch.name} model. "
                         + _pattern_help(arch.model_types[0] if arch.model_types else None, linear_layer_names(model)))
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(
    model: nn.Module,
    spec: LoRASpec,
    wrap: Callable[[nn.Linear, LoRASpec], nn.Module] | None = None,
    arch: Architecture | None = None,
) -> list[str]:
    """Freeze ``model`` and wrap every covered linear layer; returns the wrapped names.

    ``wrap`` builds the replacement for one ``nn.Linear`` (default: ``LinearWithLoRA``); QLoRA passes
    its own so the 4-bit layer sits beside the 16-bit one without branching here.
    """
    wrap = wrap or LinearWithLoRA
    names = find_targets(model, spec, arch)
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


def optimizer_groups(model: nn.Module, lr: float, lora_plus_ratio: float | None = None) -> list[dict]:
    """The trainable parameters as optimizer parameter groups; with ``lora_plus_ratio``, LoRA+'s two.

    LoRA+ (Hayou et al. 2024) trains ``B`` at ``ratio x`` the learning rate of ``A``. The groups are
    peft's ``create_loraplus_optimizer``'s: ``B`` and every one-dimensional trainable tensor (biases,
    layer norms, DoRA's magnitude) at ``lr * ratio``, everything else (``A``, a trained head's weight)
    at ``lr``. Without a ratio: one group at ``lr``, as a plain optimizer over the parameters.
    Weight decay is left to the optimizer, the same for both groups (peft's groups take its own
    ``loraplus_weight_decay`` instead, 0 by default, like this suite's default).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if lora_plus_ratio is None:
        return [{"params": trainable, "lr": lr}]
    b_factors = {id(m.lora.B) for m in lora_modules(model)}
    if not b_factors:
        raise ValueError("train.lora_plus_ratio sets the learning rate of LoRA's B factors, and this model has no "
                         "LoRA layer (use it with methods lora or qlora)")
    faster = [p for p in trainable if id(p) in b_factors or p.ndim == 1]
    slower = [p for p in trainable if not (id(p) in b_factors or p.ndim == 1)]
    return [g for g in ({"params": slower, "lr": lr}, {"params": faster, "lr": lr * lora_plus_ratio}) if g["params"]]


@contextmanager
def adapters_replaced(model: nn.Module, replacement: Callable[[LoRAWrapper], nn.Module]) -> Iterator[None]:
    """Inside the block every LoRA layer of ``model`` is ``replacement(layer)``; afterwards it is back, unchanged.

    For measuring the model as it would be served otherwise: ``lambda layer: layer.base_layer`` is the base
    model, ``lambda layer: layer.merged_linear()`` the merged one (a dense copy for 4-bit layers).
    """
    names = [name for name, module in model.named_modules() if isinstance(module, LoRAWrapper)]
    originals = {name: model.get_submodule(name) for name in names}
    try:
        for name in names:
            _set_submodule(model, name, replacement(originals[name]))
        yield
    finally:
        for name in names:
            _set_submodule(model, name, originals[name])


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
    "PEFT_SEQ_CLS_HEAD_NAMES",
    "SCALING_RULES",
    "Architecture",
    "LORA_INITS",
    "LinearWithLoRA",
    "LoRAInit",
    "LoRALayer",
    "LoRAWrapper",
    "LoRASpec",
    "adapters_replaced",
    "apply_lora",
    "architecture_of",
    "count_parameters",
    "find_targets",
    "head_pattern",
    "linear_layer_names",
    "lora_modules",
    "make_lora",
    "merge_lora",
    "optimizer_groups",
    "peft_head_modules",
    "unmerge_lora",
]
