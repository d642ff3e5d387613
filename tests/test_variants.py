"""The LoRA variants (DoRA, LoRA+, Kaiming and PiSSA init) against peft as the oracle, and their invariants."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from oracle_helpers import assert_same_forward_and_input_grad
from torch import nn

from lora_bench.adapters.lora import (
    LinearWithLoRA,
    LoRALayer,
    LoRASpec,
    apply_lora,
    count_parameters,
    lora_modules,
    merge_lora,
    optimizer_groups,
    unmerge_lora,
)
from lora_bench.adapters.quant import LinearNF4WithLoRA
from lora_bench.config import ModelConfig, RunConfig
from lora_bench.run.methods import prepare_model
from lora_bench.run.models import load_model

peft = pytest.importorskip("peft")


class OneLinear(nn.Module):
    def __init__(self, linear: nn.Linear, head: nn.Linear | None = None):
        super().__init__()
        self.proj = linear
        self.head = head

    def forward(self, x):
        x = self.proj(x)
        return self.head(x) if self.head is not None else x


def _peft_layer(base: nn.Linear, **config):
    reference = peft.get_peft_model(OneLinear(copy.deepcopy(base)),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0,
                                                    **config))
    return reference, reference.base_model.model.proj


def _tiny(name="tiny-bert"):
    torch.manual_seed(0)
    return load_model(ModelConfig("random", name, "float32"), 2).model.eval()


def _inputs():
    ids = torch.randint(5, 128, (3, 10), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _perturb(model: nn.Module) -> None:
    """Non-zero B and a magnitude away from the norm, or every check would pass trivially."""
    with torch.no_grad():
        for module in lora_modules(model):
            module.lora.B.normal_(std=0.05)
            if module.lora.dora:
                module.lora.magnitude.mul_(1 + 0.1 * torch.randn_like(module.lora.magnitude))


# --- DoRA ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_dora_matches_peft_outputs_and_gradients(training):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    ours = LinearWithLoRA(copy.deepcopy(base), rank=4, alpha=8, dora=True)
    reference, layer = _peft_layer(base, use_dora=True)
    # Both start with the magnitude at the row norms of W (B = 0).
    torch.testing.assert_close(ours.lora.magnitude, layer.lora_magnitude_vector["default"].weight)
    with torch.no_grad():
        ours.lora.B.normal_()
        ours.lora.magnitude.mul_(1 + 0.2 * torch.randn(12))
        layer.lora_A["default"].weight.copy_(ours.lora.A.T)
        layer.lora_B["default"].weight.copy_(ours.lora.B.T)
        layer.lora_magnitude_vector["default"].weight.copy_(ours.lora.magnitude)
    ours.train(training)
    reference.train(training)
    assert_same_forward_and_input_grad(ours, reference)
    torch.testing.assert_close(ours.lora.A.grad, layer.lora_A["default"].weight.grad.T)
    torch.testing.assert_close(ours.lora.B.grad, layer.lora_B["default"].weight.grad.T)
    torch.testing.assert_close(ours.lora.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad)


def test_dora_with_dropout_matches_peft_given_the_same_mask():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    ours = LinearWithLoRA(copy.deepcopy(base), rank=4, alpha=8, dropout=0.3, dora=True).train()
    reference = peft.get_peft_model(OneLinear(copy.deepcopy(base)), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.3, use_dora=True)).train()
    layer = reference.base_model.model.proj
    with torch.no_grad():
        ours.lora.B.normal_()
        layer.lora_A["default"].weight.copy_(ours.lora.A.T)
        layer.lora_B["default"].weight.copy_(ours.lora.B.T)
    x = torch.randn(6, 16)
    torch.manual_seed(5)
    out_ours = ours(x)
    torch.manual_seed(5)  # one dropout draw on each side: the same mask
    torch.testing.assert_close(out_ours, reference(x))


def test_dora_outputs_unchanged_right_after_wrapping_and_trainable_count():
    model = _tiny()
    inputs = _inputs()
    before = model(**inputs).logits
    plain = _tiny()
    apply_lora(plain, LoRASpec(rank=4, alpha=8, targets=("query", "value", "mlp")))
    names = apply_lora(model, LoRASpec(rank=4, alpha=8, targets=("query", "value", "mlp"), dora=True))
    torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=1e-6)
    # DoRA adds one magnitude per output feature of each covered layer, nothing else.
    extra = sum(model.get_submodule(name).out_features for name in names)
    assert count_parameters(model)[0] == count_parameters(plain)[0] + extra


def test_dora_trainable_count_equals_peft():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    ours = OneLinear(LinearWithLoRA(copy.deepcopy(base), rank=4, alpha=8, dora=True))
    reference, _ = _peft_layer(base, use_dora=True)
    assert count_parameters(ours)[0] == reference.get_nb_trainable_parameters()[0] == 4 * (16 + 12) + 12


def test_dora_merge_unmerge_equal_logits():
    model = _tiny()
    apply_lora(model, LoRASpec(rank=4, alpha=8, targets=("query", "value", "mlp"), dora=True))
    _perturb(model)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    inputs = _inputs()
    unmerged = model(**inputs).logits
    merge_lora(model)
    merge_lora(model)
    torch.testing.assert_close(model(**inputs).logits, unmerged, atol=1e-4, rtol=0)
    unmerge_lora(model)
    unmerge_lora(model)
    torch.testing.assert_close(model(**inputs).logits, unmerged, atol=1e-4, rtol=0)
    for name, param in model.named_parameters():
        if name in weights_before:
            torch.testing.assert_close(param, weights_before[name], atol=1e-5, rtol=0)


def test_dora_on_the_nf4_base():
    torch.manual_seed(0)
    linear = nn.Linear(96, 80)
    plain = LinearNF4WithLoRA(copy.deepcopy(linear), rank=4, alpha=8)
    torch.manual_seed(0)
    dora = LinearNF4WithLoRA(copy.deepcopy(linear), rank=4, alpha=8, dora=True)
    x = torch.randn(5, 96)
    torch.testing.assert_close(dora(x), plain(x), rtol=0, atol=1e-6)
    # Oracle: the 16-bit DoRA layer (checked against peft above) on the dequantized weight.
    dense = nn.Linear(96, 80)
    with torch.no_grad():
        dense.weight.copy_(dora.dequantized_weight(torch.float32))
        dense.bias.copy_(dora.bias)
    reference = LinearWithLoRA(dense, rank=4, alpha=8, dora=True)
    with torch.no_grad():
        dora.lora.B.normal_()
        dora.lora.magnitude.mul_(1.1)
        for name in ("A", "B", "magnitude"):
            getattr(reference.lora, name).copy_(getattr(dora.lora, name))
    torch.testing.assert_close(dora(x), reference(x))
    dora(x).square().sum().backward()
    assert all(getattr(dora.lora, n).grad.abs().sum() > 0 for n in ("A", "B", "magnitude"))
    assert {n for n, p in dora.named_parameters() if p.requires_grad} == {"lora.A", "lora.B", "lora.magnitude"}
    with pytest.raises(NotImplementedError, match="merged_linear"):
        dora.merge()
    torch.testing.assert_close(dora.merged_linear()(x), dora(x), atol=1e-5, rtol=1e-5)


def test_qlora_dora_run_config_prepares_the_model():
    cfg = RunConfig.from_dict({"model": {"source": "random", "name": "tiny-bert"},
                               "method": {"name": "qlora", "lora": {"dora": True, "init": "pissa"}}})
    torch.manual_seed(0)
    model = load_model(cfg.model, 2).model
    info = prepare_model(model, cfg.method, "cpu")
    wrapped = [model.get_submodule(name) for name in info["lora_modules"]]
    assert wrapped and all(isinstance(m, LinearNF4WithLoRA) and m.lora.dora for m in wrapped)


# --- initialisation ------------------------------------------------------------------------------


def test_kaiming_init_is_peft_default_draw():
    torch.manual_seed(0)
    base = nn.Linear(384, 12)
    _, layer = _peft_layer(base)
    torch.manual_seed(7)
    layer.reset_lora_parameters("default", True)  # peft's init_lora_weights=True: one kaiming draw of A
    torch.manual_seed(7)
    ours = LoRALayer(384, 12, rank=4, scale=2.0, init="kaiming")
    assert torch.equal(ours.A, layer.lora_A["default"].weight.T)
    assert torch.equal(ours.B, torch.zeros(4, 12))
    bound = 1 / math.sqrt(384)  # kaiming_uniform(a=sqrt(5)): gain sqrt(1/3) * sqrt(3 / fan_in)
    assert ours.A.abs().max() <= bound
    # About 12x smaller than the tutorial's randn/sqrt(r) on in = 384 at r = 8: std 1/sqrt(3 * 384) vs 1/sqrt(8).
    tutorial, kaiming = LoRALayer(384, 12, rank=8, scale=2.0), LoRALayer(384, 12, rank=8, scale=2.0, init="kaiming")
    assert 11 < tutorial.A.std() / kaiming.A.std() < 13


def test_tutorial_init_is_unchanged():
    torch.manual_seed(3)
    ours = LoRALayer(16, 12, rank=4, scale=2.0)
    torch.manual_seed(3)
    assert torch.equal(ours.A, torch.randn(16, 4) / math.sqrt(4))


@pytest.mark.parametrize("scaling", ["alpha/r", "rslora"])
def test_pissa_equals_peft(scaling):
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    ours = LinearWithLoRA(copy.deepcopy(base), rank=4, alpha=8, scaling=scaling, init="pissa")
    _, layer = _peft_layer(base, init_lora_weights="pissa", use_rslora=scaling == "rslora")
    torch.testing.assert_close(ours.lora.A, layer.lora_A["default"].weight.T)
    torch.testing.assert_close(ours.lora.B, layer.lora_B["default"].weight.T)
    torch.testing.assert_close(ours.base_layer.weight, layer.base_layer.weight)
    x = torch.randn(7, 24)
    torch.testing.assert_close(ours(x), base(x), atol=1e-4, rtol=0)


def test_pissa_outputs_unchanged_after_init():
    model = _tiny()
    inputs = _inputs()
    before = model(**inputs).logits
    apply_lora(model, LoRASpec(rank=4, alpha=8, targets=("query", "key", "value", "projection", "mlp"),
                               init="pissa"))
    torch.testing.assert_close(model(**inputs).logits, before, atol=1e-4, rtol=0)
    assert all(m.lora.B.abs().sum() > 0 for m in lora_modules(model))


def test_pissa_on_nf4_quantizes_the_residual():
    torch.manual_seed(0)
    linear = nn.Linear(96, 80)
    x = torch.randn(5, 96)
    expected = linear(x)
    plain = LinearNF4WithLoRA(copy.deepcopy(linear), rank=8, alpha=16)
    pissa = LinearNF4WithLoRA(copy.deepcopy(linear), rank=8, alpha=16, init="pissa")
    # The principal part is kept exactly in the adapter: less quantization error than quantizing all of W.
    assert (pissa(x) - expected).norm() < (plain(x) - expected).norm()


# --- LoRA+ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_lora_plus_groups_match_peft(dora):
    torch.manual_seed(0)
    base, head = nn.Linear(16, 12), nn.Linear(12, 3)
    ours = OneLinear(LinearWithLoRA(copy.deepcopy(base), rank=4, alpha=8, dora=dora), copy.deepcopy(head))
    reference = peft.get_peft_model(OneLinear(copy.deepcopy(base), copy.deepcopy(head)), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["proj"], modules_to_save=["head"], use_dora=dora))
    from peft.optimizers import create_loraplus_optimizer

    theirs = create_loraplus_optimizer(reference, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    their_lr = {}
    names = {id(p): n for n, p in reference.named_parameters()}
    for group in theirs.param_groups:
        for p in group["params"]:
            their_lr[names[id(p)]] = group["lr"]
    # Our parameter name -> peft's.
    to_peft = {"proj.lora.A": "lora_A.default.weight", "proj.lora.B": "lora_B.default.weight",
               "proj.lora.magnitude": "lora_magnitude_vector.default.weight",
               "head.weight": "head.modules_to_save.default.weight", "head.bias": "head.modules_to_save.default.bias"}
    ours_lr = {}
    our_names = {id(p): n for n, p in ours.named_parameters()}
    for group in torch.optim.AdamW(optimizer_groups(ours, 1e-3, 16.0)).param_groups:
        for p in group["params"]:
            ours_lr[our_names[id(p)]] = group["lr"]
    assert len(ours_lr) == len(their_lr) == (5 if dora else 4)
    for name, lr in ours_lr.items():
        peft_name = next(n for n in their_lr if n.endswith(to_peft[name]))
        assert lr == pytest.approx(their_lr[peft_name]), name
    assert ours_lr["proj.lora.B"] == pytest.approx(16e-3) and ours_lr["proj.lora.A"] == pytest.approx(1e-3)


def test_without_ratio_one_group_and_without_lora_a_named_error():
    model = OneLinear(LinearWithLoRA(nn.Linear(4, 4), rank=2, alpha=4))
    groups = optimizer_groups(model, 1e-3)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="no LoRA layer"):
        optimizer_groups(nn.Linear(4, 4), 1e-3, 4.0)


def test_new_keys_stay_out_of_resolved_configs_at_their_defaults():
    resolved = RunConfig.from_dict({}).to_dict()
    assert "init" not in resolved["method"]["lora"] and "dora" not in resolved["method"]["lora"]
    assert "lora_plus_ratio" not in resolved["train"]
    changed = RunConfig.from_dict({"method": {"lora": {"init": "kaiming", "dora": True}},
                                   "train": {"lora_plus_ratio": 16}}).to_dict()
    assert changed["method"]["lora"]["init"] == "kaiming" and changed["method"]["lora"]["dora"] is True
    assert changed["train"]["lora_plus_ratio"] == 16


# --- what an adapter costs to ship and serve -------------------------------------------------------


def test_adapter_bytes_is_the_safetensors_file_of_the_trainable_tensors(tmp_path):
    import json

    from safetensors.torch import save_file

    from lora_bench.adapters.serving import adapter_bytes

    model = _tiny()
    apply_lora(model, LoRASpec(rank=4, alpha=8, dora=True))
    trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, tmp_path / "adapter.safetensors")
    assert adapter_bytes(model) == (tmp_path / "adapter.safetensors").stat().st_size
    # 8-byte header length + JSON header + raw fp32 tensors: the raw part is 4 bytes per trainable number.
    raw = (tmp_path / "adapter.safetensors").read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert set(json.loads(raw[8:8 + header])) - {"__metadata__"} == set(trainable)
    assert len(raw) == 8 + header + 4 * count_parameters(model)[0]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_inference_latency_leaves_the_model_as_it_was(method):
    from lora_bench.adapters.serving import inference_latency

    cfg = RunConfig.from_dict({"model": {"source": "random", "name": "tiny-bert"},
                               "method": {"name": method, "lora": {"dora": True}}})
    torch.manual_seed(0)
    model = load_model(cfg.model, 2).model
    prepare_model(model, cfg.method, "cpu")
    _perturb(model)
    model.train()
    inputs = _inputs()
    before = model.eval()(**inputs).logits
    model.train()
    calls = []

    def forward(m, batch):
        calls.append(m(**batch).logits)

    batches = [inputs] * 4
    timing = inference_latency(model, forward, batches, torch.device("cpu"))
    assert model.training and len(calls) == 12 and timing["inference_timed_batches"] == 3
    assert all(timing[f"inference_{mode}_s"] > 0 for mode in ("unmerged", "merged", "base"))
    assert timing["inference_overhead"] == timing["inference_unmerged_s"] / timing["inference_merged_s"]
    torch.testing.assert_close(model.eval()(**inputs).logits, before, rtol=0, atol=0)
    # Unmerged and merged compute the same function; the base model does not (B != 0).
    unmerged, merged, base = calls[0], calls[1], calls[2]
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)
    assert not torch.allclose(base, unmerged, atol=1e-4)


def test_lora_runs_record_the_serving_costs(tiny_run):
    from lora_bench.analysis.tables import RUN_LEVEL
    from lora_bench.run.train import run_training

    tiny_run["train"].update(epochs=1, lora_plus_ratio=4.0)
    tiny_run["method"]["lora"]["dora"] = True
    result = run_training(RunConfig.from_dict(tiny_run))
    assert result.memory["adapter_bytes"] > 4 * result.params["trainable"]
    assert result.timing["inference_overhead"] > 0 and result.timing["inference_base_s"] > 0
    serving = {metric for metric, section, key in RUN_LEVEL if key in {**result.memory, **result.timing}}
    assert {"adapter_bytes", "inference_overhead", "inference_latency_unmerged"} <= serving
    tiny_run["method"] = {"name": "last_layers"}
    tiny_run["train"].pop("lora_plus_ratio")
    full = run_training(RunConfig.from_dict(tiny_run))
    assert "adapter_bytes" not in full.memory and "inference_overhead" not in full.timing


# --- the lora_variants family: stats and report ----------------------------------------------------


def test_lora_variants_family_costs_and_report_section(tmp_path):
    import sys
    from pathlib import Path

    import pandas as pd

    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic import FamilySpec, make_tables

    from lora_bench.analysis import stats
    from lora_bench.analysis.tables import METRIC_INFO
    from lora_bench.report import figures, render

    spec = FamilySpec("lora_variants", "lora_variants", ("lora", "dora", "lora_plus"))
    runs, metrics = make_tables([spec], n_seeds=3, n_epochs=1)
    planted = {"lora": (300_000, 1.10, 4.0e8), "dora": (306_000, 1.45, 4.1e8), "lora_plus": (300_000, 1.10, 4.0e8)}
    extra = []
    for run in runs.itertuples():
        adapter, overhead, state = planted[run.variant]
        jitter = 1 + 0.01 * (run.seed - 1)
        for metric, value in (("adapter_bytes", adapter), ("inference_overhead", overhead * jitter),
                              ("inference_latency_unmerged", 1e-3 * overhead * jitter),
                              ("inference_latency_merged", 1e-3 * jitter), ("state_bytes", state)):
            unit, higher = METRIC_INFO[metric]
            row = metrics[metrics["run_id"] == run.run_id].iloc[0]
            labels = row.drop(["metric", "split", "epoch", "stage", "value", "unit", "higher_is_better"]).to_dict()
            extra.append({**labels, "metric": metric, "split": "none", "epoch": 1, "stage": "final", "value": value,
                          "unit": unit, "higher_is_better": higher})
    metrics = pd.concat([metrics, pd.DataFrame(extra)], ignore_index=True)
    metrics["epoch"] = metrics["epoch"].astype("Int64")
    tables = tmp_path / "tables"
    tables.mkdir()
    runs.to_parquet(tables / "runs.parquet")
    metrics.to_parquet(tables / "metrics.parquet")
    stats.run_stats(tables / "metrics.parquet", tables / "runs.parquet", tables)
    cost = pd.read_parquet(tables / "cost_summary.parquet").set_index("variant")
    assert list(cost.index) == ["lora", "dora", "lora_plus"] and (cost["family_kind"] == "lora_variants").all()
    assert cost.loc["dora", "adapter_bytes_mean"] == 306_000 and cost.loc["dora", "memory_metric"] == "state_bytes"
    tests = pd.read_parquet(tables / "tests.parquet").set_index(["variant", "metric"])
    assert tests.loc[("dora", "adapter_bytes"), "ratio"] == pytest.approx(1.02) and tests.loc[("dora", "adapter_bytes"),
                                                                                               "exact"]
    assert tests.loc[("dora", "inference_overhead"), "ratio"] == pytest.approx(1.45 / 1.10)
    figures_dir = tmp_path / "figures"
    figures.make_all_figures(runs, metrics, figures_dir)
    text = render.build_report(tables, figures_dir, tmp_path / "paper")["markdown"].read_text(encoding="utf-8")
    section = text[text.index("## Family: lora\\_variants"):]
    assert "| Variant | n | Step time (ms, 95% CI) | Time vs lora |" in section
    assert "| dora | 3 |" in section and "1.02× (exact)" in section
    claim = next(line for line in section.splitlines() if line.startswith("- **dora** vs **lora**"))
    assert "test accuracy" in claim and "the time per training step" in claim and "the memory" in claim
    assert "an adapter file exactly 1.02× as large (299 KiB)" in claim
    assert "served unmerged it takes 1.45× the merged model's time per example (**lora**: 1.10×)" in claim
