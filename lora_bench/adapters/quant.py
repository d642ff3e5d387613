"""QLoRA's 4-bit NormalFloat (NF4) written from scratch in plain torch, and the 4-bit LoRA layer.

Why our own: bitsandbytes' 4-bit loading fails on CPU, and the suite must run (and be tested) on
machines without a GPU. So the QLoRA base layer here is pure torch and runs on any device; on a
CUDA machine with bitsandbytes installed, ``select_backend`` prefers bitsandbytes' fused kernels
(``QUANT_BACKENDS``, tried in order, first available wins), the way peft adds its 4-bit layers.

What is stored (Dettmers et al. 2023, "QLoRA", section 3):

- The weight is flattened and cut into blocks of ``block_size`` (64) consecutive values; each block
  is divided by its absolute maximum and every value replaced by the index of the nearest of the
  16 NF4 values (``NF4_CODEBOOK``), two 4-bit indices per byte, the first in the high nibble as in
  bitsandbytes. Cost: 4 bits + 32/64 bits of fp32 scale = 4.5 bits per weight.
- Double quantization: the fp32 block scales are themselves quantized. Their mean is subtracted
  (it is stored as one fp32 number) and the centred scales are cut into blocks of ``dq_block_size``
  (256), each stored as int8 with one fp32 absmax per block: 4 + 8/64 + 32/(64*256) = 4.127 bits
  per weight (ignoring the one mean and any padding). bitsandbytes uses its 8-bit "dynamic" code
  for this second level; we use symmetric linear int8 (round to nearest of 255 levels), which
  gives the simple error bound below.

Round-trip error bound (what ``tests/test_quant.py`` asserts). For an element ``w`` of a block
with absmax ``a``, let ``c`` be the chosen code (``|c| <= 1``) and ``a'`` the stored scale. The
code is chosen with the exact ``a``, so ``|w - c a| <= g/2 * a`` where ``g`` is the largest gap
between adjacent NF4 values (``g/2 = NF4_MAX_HALF_GAP ~ 0.152``, between -1 and -0.696). Hence

    |w - c a'| <= NF4_MAX_HALF_GAP * a + |a - a'|,

with ``a' = a`` without double quantization and ``|a - a'| <= s / 254`` with it, ``s`` being the
absmax of the centred scales in that scale's 256-block (rounding to the nearest of the int8
steps ``s/127``). The scale error is absolute, not relative: a block much smaller than its 256
neighbours loses relative precision, as in QLoRA itself. ``a'`` is clamped at zero, which can
only shrink the error since ``a >= 0``. Zero blocks decode to exact zeros (code 0.0 times any
scale), and a block's absmax element decodes exactly (code +-1) without double quantization.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lora_bench.adapters.lora import LoRASpec, LoRAWrapper

# The 16 NF4 values exactly as bitsandbytes ships them (functional.py) and QLoRA's appendix lists
# them: the source of truth. ``nf4_codebook_from_quantiles`` re-derives them.
NF4_CODEBOOK: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

NF4_ZERO_INDEX = NF4_CODEBOOK.index(0.0)

# Half the widest gap between adjacent codes: the worst-case rounding error in units of absmax.
NF4_MAX_HALF_GAP = max(b - a for a, b in itertools.pairwise(NF4_CODEBOOK)) / 2

# QLoRA's offset: midway between the outermost quantile probabilities of a symmetric 15-value and
# a 16-value grid, 1/2 * ((1 - 1/(2*15)) + (1 - 1/(2*16))) = 0.9677083. Using a finite
# probability keeps the outermost quantile finite (ppf(1) is infinite).
NF4_QUANTILE_OFFSET = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))

_INT8_LEVELS = 127


def nf4_codebook_from_quantiles(offset: float = NF4_QUANTILE_OFFSET) -> torch.Tensor:
    """Derive the NF4 values from standard-normal quantiles, as QLoRA (and bitsandbytes) do.

    An exact zero is wanted (padding and zero weights must stay zero) with 16 values in all, so the
    grid is asymmetric: 8 positive quantiles at probabilities ``linspace(offset, 0.5, 9)[:-1]``, 7
    negative ones at ``linspace(offset, 0.5, 8)[:-1]`` mirrored, plus 0; then everything is divided
    by the largest so the values span [-1, 1]. The probabilities are made in float32 like
    bitsandbytes' ``torch.linspace``; the result matches ``NF4_CODEBOOK`` to better than 1e-6.
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double())
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    return values / values.max()


@functools.cache
def _codebook(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)


@functools.cache
def _midpoints(device: torch.device) -> torch.Tensor:
    code = _codebook(device)
    return (code[1:] + code[:-1]) / 2


@functools.cache
def _byte_table(device: torch.device) -> torch.Tensor:
    """(256, 2): the two code values each packed byte stands for (high nibble first).

    Decoding whole bytes through one lookup is about 1.7x faster on CPU than unpacking nibbles and
    indexing the 16-entry code book twice.
    """
    code = _codebook(device)
    return torch.stack(torch.meshgrid(code, code, indexing="ij"), dim=-1).reshape(256, 2).contiguous()


@dataclass
class NF4Tensor:
    """A weight in NF4: packed codes plus (possibly double-quantized) block scales.

    Deliberately not a ``torch.Tensor`` subclass: it only stores, and ``dequantize`` gives back a
    dense tensor for ordinary torch ops.

    ``absmax`` is fp32 (one per block) without double quantization, int8 with it; then
    ``absmax_scale`` (fp32, one per ``dq_block_size`` scales) and ``absmax_mean`` (fp32 scalar)
    decode it. ``codes`` covers the weight padded with zeros to a whole number of blocks.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    absmax_mean: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    block_size: int = 64
    dq_block_size: int | None = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return self.absmax.numel()

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes, block scales and the double-quantization constants."""
        tensors = [self.codes, self.absmax, self.absmax_scale, self.absmax_mean]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    def block_absmax(self) -> torch.Tensor:
        """The fp32 scale of every block, as used for decoding (after double quantization)."""
        if not self.double_quant:
            return self.absmax.float()
        step = self.absmax_scale.float() / _INT8_LEVELS
        per_block = step.repeat_interleave(self.dq_block_size)[: self.n_blocks]
        # The true absmax is >= 0, so clamping can only reduce the error of a tiny block's scale.
        return (self.absmax.float() * per_block + self.absmax_mean.float()).clamp_min(0.0)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (in ``dtype``, default the original dtype)."""
        values = F.embedding(self.codes.int(), _byte_table(self.codes.device))
        values = values.view(self.n_blocks, self.block_size).mul_(self.block_absmax()[:, None])
        return values.view(-1)[: self.numel].view(self.shape).to(dtype or self.dtype)

    def to(self, device: torch.device | str) -> NF4Tensor:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return NF4Tensor(
            move(self.codes),
            move(self.absmax),
            move(self.absmax_scale),
            move(self.absmax_mean),
            self.shape,
            self.dtype,
            self.block_size,
            self.dq_block_size,
        )


def _nearest_codes(normalized: torch.Tensor) -> torch.Tensor:
    # Midpoints between adjacent codes split [-1, 1] into the nearest-code cells; a value exactly
    # on a midpoint goes to the lower code, as in bitsandbytes' `x > threshold` decision tree.
    return torch.bucketize(normalized, _midpoints(normalized.device)).to(torch.uint8)


def _quantize_scales(absmax: torch.Tensor, dq_block_size: int) -> tuple[torch.Tensor, ...]:
    """QLoRA's double quantization: centre the block scales, then blockwise int8 absmax."""
    mean = absmax.mean()
    centred = absmax - mean
    n_blocks = centred.numel()
    n_groups = -(-n_blocks // dq_block_size)
    groups = F.pad(centred, (0, n_groups * dq_block_size - n_blocks)).view(n_groups, dq_block_size)
    scale = groups.abs().amax(dim=1)
    # A constant group (all scales equal to the mean) centres to zeros: divide by 1, store zeros.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(groups / safe[:, None] * _INT8_LEVELS).clamp_(-_INT8_LEVELS, _INT8_LEVELS)
    return q.to(torch.int8).view(-1)[:n_blocks].contiguous(), scale, mean


def quantize_nf4(
    weight: torch.Tensor,
    block_size: int = 64,
    double_quant: bool = True,
    dq_block_size: int = 256,
) -> NF4Tensor:
    """Blockwise-absmax NF4 quantization of ``weight`` (see the module docstring for the format).

    Works on any device and float dtype (computed in fp32). Sizes that are not a multiple of
    ``block_size`` are zero-padded; zero blocks are stored as code 0.0 with scale 0.
    """
    if block_size < 2 or block_size % 2:
        raise ValueError(f"NF4 block_size must be even and >= 2 (two codes per byte), got {block_size}")
    if double_quant and dq_block_size < 1:
        raise ValueError(f"dq_block_size must be >= 1, got {dq_block_size}")
    if not weight.is_floating_point():
        raise TypeError(f"NF4 quantizes floating-point weights, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    flat = weight.detach().reshape(-1).float()
    if not torch.isfinite(flat).all():
        raise ValueError("refusing to quantize a weight containing NaN or Inf")
    n = flat.numel()
    n_blocks = -(-n // block_size)
    blocks = F.pad(flat, (0, n_blocks * block_size - n)).view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    idx = _nearest_codes(blocks / safe[:, None]).view(-1, 2)
    codes = (idx[:, 0] << 4) | idx[:, 1]
    if double_quant:
        qabsmax, scale, mean = _quantize_scales(absmax, dq_block_size)
        return NF4Tensor(codes, qabsmax, scale, mean, weight.shape, weight.dtype, block_size, dq_block_size)
    return NF4Tensor(codes, absmax, None, None, weight.shape, weight.dtype, block_size, None)


class _NF4Linear(torch.autograd.Function):
    """``F.linear`` with an NF4 weight that is decoded again in backward instead of saved.

    Plain ``F.linear(x, weight.dequantize())`` would keep every covered layer's dense weight alive
    from forward to backward, so peak memory would be no better than 16-bit LoRA. Re-decoding (as
    bitsandbytes' ``MatMul4Bit`` does) keeps only the 4-bit copy resident, for a second decode.
    """

    @staticmethod
    def forward(ctx, x, weight: NF4Tensor, bias, dtype):
        ctx.weight, ctx.dtype = weight, dtype
        return F.linear(x, weight.dequantize(dtype), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.weight.dequantize(ctx.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(dim=0)
        return grad_x, None, grad_bias, None


class LinearNF4(nn.Module):
    """A frozen NF4 copy of an ``nn.Linear``: QLoRA's base layer, also used for the linear layers
    that get no adapter (QLoRA stores every linear layer of the base model in 4 bits).

    The packed weight and its scales are buffers (so ``state_dict`` and ``.to()`` carry them and
    optimizers never see them); the original floating-point weight is not kept. Each forward
    decodes the weight to ``compute_dtype`` (default: the original weight's dtype), as bitsandbytes
    does outside its inference kernels, and backward decodes it again rather than keeping the
    dense copy.
    """

    def __init__(
        self,
        linear: nn.Linear,
        compute_dtype: torch.dtype | None = None,
        block_size: int = 64,
        double_quant: bool = True,
    ):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        q = quantize_nf4(weight, block_size=block_size, double_quant=double_quant)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight_dtype = weight.dtype
        self.compute_dtype = compute_dtype or weight.dtype
        self.block_size = block_size
        self.dq_block_size = q.dq_block_size
        self.register_buffer("qweight", q.codes)
        self.register_buffer("absmax", q.absmax)
        # None buffers stay out of state_dict, so a layer without double quantization has no keys
        # for them (and loading one layer's state into the other kind fails loudly).
        self.register_buffer("absmax_scale", q.absmax_scale)
        self.register_buffer("absmax_mean", q.absmax_mean)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def nf4(self) -> NF4Tensor:
        """The stored base weight as an ``NF4Tensor`` (views of the buffers, no copy)."""
        return NF4Tensor(
            self.qweight,
            self.absmax,
            self.absmax_scale,
            self.absmax_mean,
            torch.Size((self.out_features, self.in_features)),
            self.weight_dtype,
            self.block_size,
            self.dq_block_size,
        )

    @property
    def base_nbytes(self) -> int:
        """Bytes held by the frozen base: NF4 weight with all its scales, plus the bias."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.nf4.nbytes + bias

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.nf4.dequantize(dtype or self.compute_dtype)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _NF4Linear.apply(x.to(self.compute_dtype), self.nf4, bias, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x).to(x.dtype)

    def extra_repr(self) -> str:
        q = "nf4+dq" if self.absmax_scale is not None else "nf4"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {q}, "
            f"block_size={self.block_size}, compute_dtype={self.compute_dtype}"
        )


def _refuse_merge() -> None:
    raise NotImplementedError(
        "cannot merge LoRA into a 4-bit NF4 weight in place: the sum is not representable without "
        "re-quantizing, which would add a fresh rounding error to the trained update. Use "
        "merged_linear() for a dense nn.Linear (and quantize that again if a 4-bit model is wanted)."
    )


class LinearNF4WithLoRA(LoRAWrapper):
    """QLoRA's layer: a frozen ``LinearNF4`` as ``base_layer`` plus a trainable ``LoRALayer``;
    only the LoRA factors (and DoRA's magnitude) receive gradients.

    The adapter's output is added in the base layer's ``compute_dtype`` and the sum cast back to the input's
    dtype. DoRA works on the NF4 base (its norm reads the dequantized weight, as peft's does for
    bitsandbytes); PiSSA takes its factors from the dense weight and quantizes the residual, as the PiSSA
    paper and peft advise for QLoRA.
    """

    def __init__(
        self,
        linear: nn.Linear,
        spec: LoRASpec | None = None,
        *,
        compute_dtype: torch.dtype | None = None,
        block_size: int = 64,
        double_quant: bool = True,
        **fields,
    ):
        super().__init__(linear, spec, make_base=lambda dense: LinearNF4(dense, compute_dtype, block_size,
                                                                          double_quant), **fields)

    def dense_weight(self) -> torch.Tensor:
        return self.base_layer.dequantized_weight()

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.base_layer.dequantized_weight(dtype)

    @property
    def base_nbytes(self) -> int:
        return self.base_layer.base_nbytes

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        # In compute_dtype, so the update is added there; a base swapped for a dense copy (tests do) just runs.
        if isinstance(self.base_layer, LinearNF4):
            return self.base_layer.base_forward(x)
        return self.base_layer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).to(x.dtype)

    def merge(self) -> None:
        _refuse_merge()

    def unmerge(self) -> None:
        """Nothing to undo: an NF4 layer is never merged in place."""


def nf4_wrap(linear: nn.Linear, spec: LoRASpec) -> LinearNF4WithLoRA:
    """``wrap`` for ``apply_lora(model, spec, wrap=nf4_wrap)``: QLoRA with our NF4."""
    return LinearNF4WithLoRA(linear, spec)


class LinearBnb4bitWithLoRA(LoRAWrapper):
    """bitsandbytes' NF4 ``Linear4bit`` (double-quantized) as ``base_layer`` plus our ``LoRALayer``.

    Only built on CUDA with bitsandbytes installed (see ``QUANT_BACKENDS``); the weight is
    quantized by bitsandbytes when the layer is moved to the CUDA device.
    """

    def __init__(
        self,
        linear: nn.Linear,
        spec: LoRASpec | None = None,
        *,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str = "cuda",
        **fields,
    ):
        super().__init__(linear, spec, make_base=lambda dense: bnb_linear4bit(dense, device, compute_dtype),
                         device=device, **fields)

    def dense_weight(self) -> torch.Tensor:
        import bitsandbytes as bnb

        weight = self.base_layer.weight
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)

    def merge(self) -> None:
        _refuse_merge()

    def unmerge(self) -> None:
        """Nothing to undo: a 4-bit layer is never merged in place."""


Wrap = Callable[[nn.Linear, LoRASpec], nn.Module]


@dataclass(frozen=True)
class QuantBackend:
    """One way to build QLoRA layers: ``why_unavailable(device)`` is None when it can run there."""

    name: str
    why_unavailable: Callable[[torch.device], str | None]
    # Both factories take (device, block_size, double_quant); make_frozen builds the 4-bit layer for
    # a linear layer that gets no adapter.
    make_wrap: Callable[[torch.device, int, bool], Wrap]
    make_frozen: Callable[[torch.device, int, bool], Callable[[nn.Linear], nn.Module]]

    def is_available(self, device: torch.device | str) -> bool:
        return self.why_unavailable(torch.device(device)) is None


def _bitsandbytes_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"bitsandbytes' 4-bit layers need a CUDA device, got {device.type!r}"
    if not torch.cuda.is_available():
        return "CUDA is not available to this torch build or machine"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    try:
        import bitsandbytes  # noqa: F401
    # Its import probes CUDA libraries and can fail in many ways; any failure means "unavailable".
    except Exception as err:  # noqa: BLE001
        return f"import bitsandbytes failed: {type(err).__name__}: {err}"
    return None


def bnb_linear4bit(linear: nn.Linear, device: torch.device | str, compute_dtype: torch.dtype | None = None):
    """bitsandbytes' frozen NF4 ``Linear4bit`` (double-quantized) holding ``linear``'s weights."""
    import bitsandbytes as bnb

    base = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype or linear.weight.dtype,
        compress_statistics=True,
        quant_type="nf4",
    )
    # The documented bitsandbytes path: load the dense weights, then quantize by moving to CUDA.
    base.load_state_dict({k: v.detach().cpu() for k, v in linear.state_dict().items()})
    base = base.to(device)
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def _bnb_layout(block_size: int, double_quant: bool) -> None:
    if block_size != 64 or not double_quant:
        raise ValueError("the bitsandbytes backend is used with QLoRA's layout only: block_size 64, double_quant")


def _bitsandbytes_wrap(device: torch.device, block_size: int = 64, double_quant: bool = True) -> Wrap:
    _bnb_layout(block_size, double_quant)
    return lambda linear, spec: LinearBnb4bitWithLoRA(linear, spec, device=device)


def _bitsandbytes_frozen(device: torch.device, block_size: int = 64, double_quant: bool = True):
    _bnb_layout(block_size, double_quant)
    return lambda linear: bnb_linear4bit(linear, device)


def _torch_wrap(device: torch.device, block_size: int = 64, double_quant: bool = True) -> Wrap:
    return lambda linear, spec: LinearNF4WithLoRA(linear, spec, block_size=block_size, double_quant=double_quant)


def _torch_frozen(device: torch.device, block_size: int = 64, double_quant: bool = True):
    return lambda linear: LinearNF4(linear, block_size=block_size, double_quant=double_quant)


QUANT_BACKENDS: list[QuantBackend] = [
    QuantBackend("bitsandbytes", _bitsandbytes_unavailable, _bitsandbytes_wrap, _bitsandbytes_frozen),
    QuantBackend("torch", lambda device: None, _torch_wrap, _torch_frozen),
]


def select_backend(device: torch.device | str, force: str | None = None) -> QuantBackend:
    """The first backend of ``QUANT_BACKENDS`` available on ``device``, or the one named by ``force``."""
    device = torch.device(device)
    if force is not None:
        by_name = {b.name: b for b in QUANT_BACKENDS}
        if force not in by_name:
            raise ValueError(f"unknown quantization backend {force!r}; choose one of {list(by_name)}")
        reason = by_name[force].why_unavailable(device)
        if reason is not None:
            raise RuntimeError(f"quantization backend {force!r} is unavailable on {device}: {reason}")
        return by_name[force]
    for backend in QUANT_BACKENDS:
        if backend.is_available(device):
            return backend
    raise RuntimeError(f"no quantization backend available on {device}")  # unreachable: torch always is


def nf4_wrap_for(
    device: torch.device | str, force: str | None = None, block_size: int = 64, double_quant: bool = True
) -> Wrap:
    """The ``apply_lora`` wrap callable of the selected backend for ``device``."""
    device = torch.device(device)
    return select_backend(device, force).make_wrap(device, block_size, double_quant)


def quantize_remaining_linears(
    model: nn.Module,
    keep: Callable[[str], bool],
    device: torch.device | str,
    force: str | None = None,
    block_size: int = 64,
    double_quant: bool = True,
    prepare: Callable[[nn.Linear], nn.Linear] | None = None,
) -> list[str]:
    """Replace every plain ``nn.Linear`` not kept by ``keep(name)`` with a frozen 4-bit layer.

    QLoRA stores the whole base model in 4 bits, not only the layers that carry adapters; the
    classification head (which ``keep`` names) stays in 16/32 bits, as bitsandbytes' loaders do.
    ``prepare`` is applied to each layer just before it is quantized (materializing a layer built on the
    meta device, so only one 16-bit layer at a time exists).
    """
    device = torch.device(device)
    make = select_backend(device, force).make_frozen(device, block_size, double_quant)
    prepare = prepare or (lambda linear: linear)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not keep(n)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(prepare(getattr(parent, child))))
    return names


__all__ = [
    "NF4_CODEBOOK",
    "NF4_MAX_HALF_GAP",
    "NF4_QUANTILE_OFFSET",
    "QUANT_BACKENDS",
    "LinearBnb4bitWithLoRA",
    "LinearNF4",
    "LinearNF4WithLoRA",
    "NF4Tensor",
    "QuantBackend",
    "nf4_codebook_from_quantiles",
    "nf4_wrap",
    "nf4_wrap_for",
    "quantize_remaining_linears",
    "quantize_nf4",
    "select_backend",
]
