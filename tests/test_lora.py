"""From-scratch LoRA: peft as the oracle, and the invariants every LoRA implementation must keep."""

from __future__ import annotations

import copy

import pytest
import torch
from oracle_helpers import assert_same_forward_and_input_grad
from torch import nn

from lora_bench.adapters.lora import (
    LinearWithLoRA,
    LoRASpec,
    apply_lora,
    count_parameters,
    find_targets,
    merge_lora,
    unmerge_lora,
)
from lora_bench.config import ModelConfig
from lora_bench.run.models import load_model


class OneLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


# (our scaling rule, alpha we pass, peft's lora_alpha and use_rslora giving the same scale)
PEFT_EQUIVALENTS = [
    ("alpha/r", 8.0, 8.0, False),
    ("rslora", 8.0, 8.0, True),
    # peft has no plain-alpha rule; alpha/r with lora_alpha = alpha * r gives the same scale.
    ("alpha", 2.0, 2.0 * 4, False),
]


@pytest.mark.parametrize(("scaling", "alpha", "peft_alpha", "rslora"), PEFT_EQUIVALENTS)
def test_matches_peft_outputs_and_gradients(scaling, alpha, peft_alpha, rslora):
    # Only the oracle needs peft; the invariants below run without it.
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    ours = LinearWithLoRA(copy.deepcopy(base), rank=4, alpha=alpha, scaling=scaling)
    with torch.no_grad():
        ours.lora.B.normal_()  # non-zero B, or both sides would trivially agree
    config = peft.LoraConfig(r=4, lora_alpha=peft_alpha, use_rslora=rslora, target_modules=["proj"],
                             lora_dropout=0.0)
    reference = peft.get_peft_model(OneLinear(copy.deepcopy(base)), config)
    layer = reference.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora.A.T)
        layer.lora_B["default"].weight.copy_(ours.lora.B.T)
    assert layer.scaling["default"] == pytest.approx(ours.lora.scale)

    assert_same_forward_and_input_grad(ours, reference)
    torch.testing.assert_close(ours.lora.A.grad, layer.lora_A["default"].weight.grad.T)
    torch.testing.assert_close(ours.lora.B.grad, layer.lora_B["default"].weight.grad.T)


def _tiny(name="tiny-bert", num_labels=2):
    torch.manual_seed(0)
    return load_model(ModelConfig("random", name, "float32"), num_labels).model.eval()


def _inputs(vocab=128):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 10), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-distilbert", "tiny-llama"])
def test_outputs_unchanged_right_after_apply_lora(name):
    model = _tiny(name)
    inputs = _inputs()
    before = model(**inputs).logits
    apply_lora(model, LoRASpec(rank=4, alpha=8, targets=("query", "key", "value", "projection", "mlp")))
    torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)


def test_merge_unmerge_equal_logits_and_idempotent():
    model = _tiny()
    apply_lora(model, LoRASpec(rank=4, alpha=8, targets=("query", "value", "mlp")))
    for module in model.modules():
        if isinstance(module, LinearWithLoRA):
            nn.init.normal_(module.lora.B, std=0.05)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    inputs = _inputs()
    unmerged = model(**inputs).logits
    merge_lora(model)
    merge_lora(model)  # idempotent: a second merge must not add the update twice
    torch.testing.assert_close(model(**inputs).logits, unmerged, atol=1e-4, rtol=0)
    unmerge_lora(model)
    unmerge_lora(model)
    torch.testing.assert_close(model(**inputs).logits, unmerged, atol=1e-4, rtol=0)
    for name, param in model.named_parameters():
        if name in weights_before:
            torch.testing.assert_close(param, weights_before[name], atol=1e-5, rtol=0)


def test_merge_refuses_non_finite_weights():
    layer = LinearWithLoRA(nn.Linear(4, 4), rank=2, alpha=4)
    with torch.no_grad():
        layer.lora.B.fill_(float("inf"))
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.merge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, before)


def test_base_weights_unchanged_after_optimizer_step():
    model = _tiny()
    apply_lora(model, LoRASpec(rank=4, alpha=8))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(**_inputs(), labels=torch.tensor([0, 1, 1])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"frozen {name} changed"
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n in lora_before)


def test_layer_subset_and_kinds_resolve_per_architecture():
    bert = _tiny("tiny-bert")
    names = find_targets(bert, LoRASpec(targets=("query", "value"), layers=(1,)))
    assert names == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
    distil = _tiny("tiny-distilbert")
    assert find_targets(distil, LoRASpec(targets=("mlp",), layers=(0,))) == [
        "distilbert.transformer.layer.0.ffn.lin1", "distilbert.transformer.layer.0.ffn.lin2"]
    llama = _tiny("tiny-llama")
    assert find_targets(llama, LoRASpec(targets=("projection",))) == [
        "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    # BERT's attention output dense is "projection", not "mlp".
    mlp = find_targets(bert, LoRASpec(targets=("mlp",), layers=(0,)))
    assert mlp == ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"]


def test_lora_trainable_count_llama_query_value():
    llama = _tiny("tiny-llama")
    apply_lora(llama, LoRASpec(rank=4, alpha=8, targets=("query", "value")))
    # hidden 32, 4 heads of 8, 2 kv heads: q 32->32, v 32->16; 2 layers; A in x r + B r x out.
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert count_parameters(llama)[0] == expected


def test_unknown_architecture_lists_linear_layers():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder_proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="encoder_proj"):
        apply_lora(Custom(), LoRASpec())


def test_spec_rejects_unknown_target_and_scaling():
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoRASpec(targets=("queries",))
    with pytest.raises(ValueError, match="scaling"):
        LoRASpec(scaling="alpha*r")
