"""Layer-level speed: one forward + backward of each way to adapt a linear layer, on CPU in fp32.

Why: the suite's step times mix the model, the data and the optimizer; this isolates what the LoRA
layer itself costs. Compared at each shape (tokens = batch x sequence, in, out):

- ``linear``: a plain ``nn.Linear`` with every parameter trainable (full finetuning's layer),
- ``lora``: our ``LinearWithLoRA`` (frozen base, r=8),
- ``peft_lora``: Hugging Face peft's ``lora.Linear`` built by ``get_peft_model`` (same r and alpha),
- ``qlora_nf4``: our ``LinearNF4WithLoRA``, which decodes its 4-bit weight on every forward.

The input requires grad, as it does for every layer but the first in a network, so the backward
includes the input gradient. Not part of the test run; run as
``pytest benchmarks/bench_layers.py --benchmark-json results/benchmarks/layers.json``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_bench.adapters.lora import LinearWithLoRA
from lora_bench.adapters.quant import LinearNF4WithLoRA

RANK, ALPHA = 8, 16

# (tokens, in_features, out_features): MiniLM-sized, BERT-base-sized and Llama-7B-sized projections.
SHAPES = [(512, 384, 384), (512, 768, 768), (256, 4096, 4096)]


class _Holder(nn.Module):
    """peft needs a named submodule to target; this holds the one linear layer as ``proj``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _peft_lora(linear: nn.Linear) -> nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"])
    model = peft.get_peft_model(_Holder(linear), config)
    # Time the peft layer itself, not PeftModel's forward plumbing.
    layer = model.base_model.model.proj
    assert isinstance(layer, peft.tuners.lora.layer.Linear)
    return layer


BUILDERS = {
    "linear": lambda linear: linear,
    "lora": lambda linear: LinearWithLoRA(linear, rank=RANK, alpha=ALPHA),
    "peft_lora": _peft_lora,
    "qlora_nf4": lambda linear: LinearNF4WithLoRA(linear, rank=RANK, alpha=ALPHA),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", list(BUILDERS))
def test_forward_backward(benchmark, method, shape):
    tokens, in_features, out_features = shape
    torch.manual_seed(0)
    layer = BUILDERS[method](nn.Linear(in_features, out_features))
    params = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(tokens, in_features, requires_grad=True)

    def step() -> None:
        # Dropping grads (rather than accumulating) keeps every round the same work.
        for p in params:
            p.grad = None
        x.grad = None
        layer(x).sum().backward()

    benchmark.group = f"fwd+bwd tokens={tokens} in={in_features} out={out_features}"
    benchmark.extra_info.update(
        method=method,
        tokens=tokens,
        in_features=in_features,
        out_features=out_features,
        trainable_parameters=sum(p.numel() for p in params),
        torch_threads=torch.get_num_threads(),
    )
    # A 4096x4096 step takes 0.1-0.2 s on 2 idle cores: fewer rounds there keep the whole file
    # near 20 s, while the millisecond-sized shapes get enough rounds for a stable median.
    rounds = 10 if in_features * out_features > 4_000_000 else 30
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=2, iterations=1)
