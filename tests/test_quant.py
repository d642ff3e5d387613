"""NF4 / QLoRA invariants: the code book, the round-trip error bound, storage cost, the 4-bit LoRA
layer's exactness and trainability, and the backend choice. CPU-only except the ``gpu`` tests,
which compare against bitsandbytes where CUDA and bitsandbytes exist.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_bench.adapters.lora import LoRASpec, apply_lora, count_parameters
from lora_bench.adapters.quant import (
    NF4_CODEBOOK,
    NF4_MAX_HALF_GAP,
    NF4_QUANTILE_OFFSET,
    QUANT_BACKENDS,
    LinearNF4WithLoRA,
    nf4_codebook_from_quantiles,
    nf4_wrap,
    nf4_wrap_for,
    quantize_nf4,
    select_backend,
)

CODE = torch.tensor(NF4_CODEBOOK)


def normal_weight(rows: int = 1024, cols: int = 1024, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.02


def block_absmax(weight: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Per-element absmax of its block (same shape as ``weight``), computed independently."""
    flat = weight.reshape(-1).float()
    pad = -flat.numel() % block_size
    blocks = F.pad(flat, (0, pad)).view(-1, block_size)
    per_block = blocks.abs().amax(dim=1)
    return per_block.repeat_interleave(block_size)[: flat.numel()].view(weight.shape)


def double_quant_scale_bound(
    weight: torch.Tensor, block_size: int = 64, dq_block_size: int = 256
) -> torch.Tensor:
    """Per-element bound on |absmax - decoded absmax|: half an int8 step, s / 254."""
    flat = weight.reshape(-1).float()
    absmax = F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size).abs().amax(dim=1)
    centred = absmax - absmax.mean()
    groups = F.pad(centred, (0, -centred.numel() % dq_block_size)).view(-1, dq_block_size)
    per_block = (groups.abs().amax(dim=1) / 254).repeat_interleave(dq_block_size)[: absmax.numel()]
    return per_block.repeat_interleave(block_size)[: flat.numel()].view(weight.shape)


# --- code book -----------------------------------------------------------------------------------


def test_codebook_table():
    assert len(NF4_CODEBOOK) == 16
    assert all(a < b for a, b in itertools.pairwise(NF4_CODEBOOK))
    assert NF4_CODEBOOK[0] == -1.0 and NF4_CODEBOOK[-1] == 1.0
    assert 0.0 in NF4_CODEBOOK
    # Asymmetric: 7 negative and 8 positive values.
    assert sum(v < 0 for v in NF4_CODEBOOK) == 7 and sum(v > 0 for v in NF4_CODEBOOK) == 8
    assert NF4_MAX_HALF_GAP == pytest.approx((1.0 - 0.6961928009986877) / 2)


def test_codebook_derived_from_normal_quantiles():
    assert NF4_QUANTILE_OFFSET == pytest.approx(0.9677083, abs=1e-7)
    derived = nf4_codebook_from_quantiles()
    assert derived.shape == (16,)
    torch.testing.assert_close(derived, CODE.double(), atol=1e-6, rtol=0)


# --- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_error_bound(double_quant):
    w = normal_weight()
    q = quantize_nf4(w, double_quant=double_quant)
    err = (q.dequantize() - w).abs()
    a = block_absmax(w)
    bound = NF4_MAX_HALF_GAP * a
    if double_quant:
        bound = bound + double_quant_scale_bound(w)
    # The slack covers fp32 rounding in the divide/multiply, nothing structural.
    assert (err <= bound * (1 + 1e-5) + 1e-9).all(), (err - bound).max()
    # Measured: mean |error| / std(w) = 0.0729 (double quant) and 0.0728 (without) for this weight.
    assert err.mean() / w.std() < 0.08


def test_codes_are_nearest_without_double_quant():
    w = normal_weight(128, 256)
    q = quantize_nf4(w, double_quant=False)
    a = block_absmax(w)
    best = ((w / a)[..., None] - CODE).abs().min(dim=-1).values * a
    torch.testing.assert_close((q.dequantize() - w).abs(), best, atol=1e-7, rtol=1e-5)


def test_block_absmax_element_round_trips_without_double_quant():
    w = normal_weight(64, 512)
    d = quantize_nf4(w, double_quant=False).dequantize()
    blocks, dblocks = w.view(-1, 64), d.view(-1, 64)
    arg = blocks.abs().argmax(dim=1, keepdim=True)
    assert torch.equal(dblocks.gather(1, arg), blocks.gather(1, arg))


@pytest.mark.parametrize("double_quant", [True, False])
def test_zero_blocks_round_trip_to_exact_zeros(double_quant):
    w = normal_weight(64, 256)
    w[3] = 0.0  # four whole blocks of 64
    w[10, :64] = 0.0
    d = quantize_nf4(w, double_quant=double_quant).dequantize()
    assert torch.isfinite(d).all()
    assert torch.equal(d[3], torch.zeros(256))
    assert torch.equal(d[10, :64], torch.zeros(64))
    zeros = quantize_nf4(torch.zeros(5, 70), double_quant=double_quant).dequantize()
    assert torch.equal(zeros, torch.zeros(5, 70))


@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, 100), (2, 3, 50), (65,)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_shapes_not_a_multiple_of_the_block(shape, double_quant):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    q = quantize_nf4(w, double_quant=double_quant)
    d = q.dequantize()
    assert d.shape == w.shape and d.dtype == w.dtype
    n_blocks = -(-w.numel() // 64)
    assert q.absmax.numel() == n_blocks and q.codes.numel() == n_blocks * 32
    bound = NF4_MAX_HALF_GAP * block_absmax(w)
    if double_quant:
        bound = bound + double_quant_scale_bound(w)
    assert ((d - w).abs() <= bound * (1 + 1e-5) + 1e-9).all()


def test_nibble_order_matches_bitsandbytes():
    # bitsandbytes packs element 2j in the high nibble and 2j+1 in the low one.
    w = torch.zeros(64)
    w[0], w[1] = 1.0, -1.0
    q = quantize_nf4(w, double_quant=False)
    assert q.codes[0].item() == (15 << 4) | 0
    assert q.codes[1].item() == (7 << 4) | 7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(dtype):
    w = normal_weight(32, 128).to(dtype)
    q = quantize_nf4(w)
    assert q.dequantize().dtype == dtype
    assert q.dequantize(torch.float32).dtype == torch.float32
    bound = NF4_MAX_HALF_GAP * block_absmax(w) + double_quant_scale_bound(w)
    err = (q.dequantize(torch.float32) - w.float()).abs()
    assert (err <= bound * (1 + 1e-5) + 1e-9).all()


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="even"):
        quantize_nf4(torch.randn(10), block_size=63)
    with pytest.raises(TypeError):
        quantize_nf4(torch.ones(4, dtype=torch.int64))


# --- storage -------------------------------------------------------------------------------------


def test_storage_cost():
    w = normal_weight()
    q = quantize_nf4(w)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == w.numel() // 2
    assert q.absmax.dtype == torch.int8
    assert 4.1 < q.bits_per_weight < 4.6
    assert q.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)  # 4.127
    plain = quantize_nf4(w, double_quant=False)
    assert plain.absmax.dtype == torch.float32
    assert plain.bits_per_weight == pytest.approx(4.5)
    assert q.nbytes == w.numel() // 2 + w.numel() // 64 + 4 * (w.numel() // (64 * 256)) + 4


# --- the 4-bit LoRA layer ------------------------------------------------------------------------


def make_layer(in_features=96, out_features=80, bias=True, seed=0, **kwargs) -> LinearNF4WithLoRA:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    return LinearNF4WithLoRA(linear, rank=4, alpha=8, **kwargs)


def test_layer_output_is_dequantized_linear_plus_lora():
    layer = make_layer()
    x = torch.randn(5, 7, 96)
    dense = F.linear(x, layer.dequantized_weight(), layer.bias)
    assert torch.equal(layer(x), dense)  # B = 0 at init: exactly the dequantized linear
    with torch.no_grad():
        layer.lora.B.normal_()
    out = layer(x)
    assert out.dtype == x.dtype
    assert torch.equal(out, F.linear(x, layer.dequantized_weight(), layer.bias) + layer.lora(x))
    assert not torch.equal(out, dense)


def test_layer_holds_no_dense_weight():
    layer = make_layer()
    trainable, total = count_parameters(layer)
    assert trainable == 4 * (96 + 80)
    assert total == trainable + 80  # plus the frozen bias
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora.A", "lora.B"}
    # The NF4 base is kept as base_layer, as peft keeps its 4-bit layer (one LoRA wrapper for every kind).
    assert {n for n, _ in layer.named_buffers()} == {f"base_layer.{n}" for n in ("qweight", "absmax", "absmax_scale",
                                                                                 "absmax_mean")}
    qweight = layer.base_layer.qweight
    assert qweight.dtype == torch.uint8 and qweight.numel() == 96 * 80 // 2
    assert layer.base_nbytes < (96 * 80 + 80) * 4 / 5
    assert layer.in_features == 96 and layer.out_features == 80


def test_gradients_reach_only_lora():
    layer = make_layer()
    with torch.no_grad():
        layer.lora.B.normal_()
    x = torch.randn(8, 96, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.lora.A.grad is not None and layer.lora.A.grad.abs().sum() > 0
    assert layer.lora.B.grad is not None and layer.lora.B.grad.abs().sum() > 0
    assert layer.bias.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0
    # The input gradient (weight decoded again in backward) matches autograd through F.linear.
    x_ref = x.detach().clone().requires_grad_(True)
    ref = F.linear(x_ref, layer.dequantized_weight(), layer.bias) + layer.lora(x_ref)
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_backward_keeps_no_dense_weight():
    layer = make_layer(in_features=128, out_features=192)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(torch.randn(4, 128, requires_grad=True)).sum()
    assert saved, "the LoRA branch should save its inputs"
    assert (192, 128) not in saved and (128, 192) not in saved, saved


def test_unfrozen_bias_gets_its_gradient():
    layer = make_layer()
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 3, 96)
    (layer(x) * torch.arange(80.0)).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.arange(80.0) * 6)


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip(double_quant):
    layer = make_layer(double_quant=double_quant)
    with torch.no_grad():
        layer.lora.B.normal_()
    fresh = make_layer(seed=123, double_quant=double_quant)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 96)
    assert torch.equal(fresh(x), layer(x))
    keys = set(layer.state_dict())
    assert ("base_layer.absmax_scale" in keys) == double_quant


def test_no_bias_and_compute_dtype():
    layer = make_layer(bias=False, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 96)
    out = layer(x)
    assert out.dtype == torch.float32
    expected = F.linear(x.bfloat16(), layer.dequantized_weight(torch.bfloat16)).float()
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)


def test_merge_refuses_and_merged_linear_matches():
    layer = make_layer()
    with torch.no_grad():
        layer.lora.B.normal_()
    with pytest.raises(NotImplementedError, match="merged_linear"):
        layer.merge()
    merged = layer.merged_linear()
    assert isinstance(merged, nn.Linear)
    x = torch.randn(6, 96)
    torch.testing.assert_close(merged(x), layer(x), atol=1e-5, rtol=1e-5)


def test_tiny_bert_trains_with_qlora_on_cpu():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(config)
    names = apply_lora(model, LoRASpec(rank=4, alpha=8, targets=("query", "value")), wrap=nf4_wrap)
    assert len(names) == 4
    assert all(isinstance(model.get_submodule(n), LinearNF4WithLoRA) for n in names)
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    trainable, _ = count_parameters(model)
    assert trainable == 4 * 4 * (32 + 32) + (32 * 2 + 2)

    input_ids = torch.randint(0, 100, (16, 12))
    labels = torch.randint(0, 2, (16,))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Seed 0 gives about 0.69 -> 0.4; the frozen 4-bit base must not block learning.
    assert losses[-1] < 0.8 * losses[0], losses


# --- backends ------------------------------------------------------------------------------------


def test_backend_selection_on_cpu():
    assert [b.name for b in QUANT_BACKENDS] == ["bitsandbytes", "torch"]
    assert select_backend("cpu").name == "torch"
    assert select_backend("cpu", force="torch").name == "torch"
    layer = nf4_wrap_for("cpu", block_size=32, double_quant=False)(nn.Linear(64, 8), LoRASpec(rank=2, alpha=4))
    assert isinstance(layer, LinearNF4WithLoRA) and layer.base_layer.block_size == 32
    assert layer.base_layer.absmax_scale is None
    with pytest.raises(RuntimeError, match="bitsandbytes.*unavailable on cpu.*CUDA"):
        select_backend("cpu", force="bitsandbytes")
    with pytest.raises(ValueError, match="unknown quantization backend"):
        select_backend("cpu", force="gptq")


# --- GPU: agreement with bitsandbytes ------------------------------------------------------------


def _require_cuda_bitsandbytes():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return pytest.importorskip("bitsandbytes")


@pytest.mark.gpu
def test_nf4_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    w = normal_weight(256, 512)
    cpu = quantize_nf4(w)
    gpu = quantize_nf4(w.cuda())
    assert (gpu.codes.cpu() == cpu.codes).float().mean() > 0.999
    torch.testing.assert_close(gpu.dequantize().cpu(), cpu.dequantize(), atol=1e-3, rtol=0)


@pytest.mark.gpu
def test_dequantization_agrees_with_bitsandbytes():
    bnb = _require_cuda_bitsandbytes()
    w = normal_weight().cuda()
    a = block_absmax(w)
    ours = quantize_nf4(w, double_quant=False)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    ref = bnb.functional.dequantize_4bit(packed, state).float()
    torch.testing.assert_close(state.absmax.float(), ours.absmax)
    # Same scales and nearest-code rule, so codes should differ only on float ties at midpoints.
    assert (ours.codes == packed.view(-1)).float().mean() > 0.999
    diff = (ours.dequantize() - ref).abs()
    assert (diff <= 1e-6 * a).float().mean() > 0.999
    assert (diff <= 2 * NF4_MAX_HALF_GAP * a + 1e-6).all()  # never more than one code step apart

    # Double quantization: bitsandbytes codes the scales with its 8-bit dynamic map, we with
    # linear int8, so decoded scales differ slightly: a CPU simulation of its map put the gap at
    # 1.2 % of a block's absmax at worst for this weight, and under 1 % for all but 0.002 %.
    packed2, state2 = bnb.functional.quantize_4bit(
        w, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    ref2 = bnb.functional.dequantize_4bit(packed2, state2).float()
    diff2 = (quantize_nf4(w).dequantize() - ref2).abs()
    assert (diff2 <= 0.02 * a + 1e-6).float().mean() > 0.999
    assert (diff2 <= (2 * NF4_MAX_HALF_GAP + 0.03) * a + 1e-6).all()


@pytest.mark.gpu
def test_bitsandbytes_backend_layer_agrees_with_ours():
    _require_cuda_bitsandbytes()
    assert select_backend("cuda").name == "bitsandbytes"
    torch.manual_seed(0)
    linear = nn.Linear(256, 128).cuda()
    spec = LoRASpec(rank=4, alpha=8)
    theirs = nf4_wrap_for("cuda")(linear, spec)
    ours = nf4_wrap(linear, spec)
    with torch.no_grad():
        ours.lora.B.normal_()
        theirs.lora.A.copy_(ours.lora.A)
        theirs.lora.B.copy_(ours.lora.B)
    x = torch.randn(16, 256, device="cuda")
    out_ours, out_theirs = ours(x), theirs(x)
    assert (out_ours - out_theirs).norm() / out_ours.norm() < 0.02
    trainable = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert trainable == {"lora.A", "lora.B"}
