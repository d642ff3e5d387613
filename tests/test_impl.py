"""``method.impl: ours | peft``: the same spec gives the same trainable parameters and, with the same adapter
weights, the same outputs in both implementations; the combinations peft cannot run are named config errors."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_bench.adapters.lora import ARCHITECTURES, LinearWithLoRA, count_parameters
from lora_bench.config import PEFT_METHODS, ConfigError, ModelConfig, RunConfig
from lora_bench.run.methods import IMPLEMENTATIONS, prepare_model
from lora_bench.run.models import load_model
from lora_bench.run.train import state_bytes

peft = pytest.importorskip("peft")

# A tiny random model of every architecture of the name map (as tests/test_head.py).
TINY = {"bert": "tiny-bert", "distilbert": "tiny-distilbert", "roberta": "tiny-roberta", "electra": "tiny-electra",
        "deberta-v2": "tiny-deberta-v2", "albert": "tiny-albert", "mpnet": "tiny-mpnet", "llama": "tiny-llama"}
ALL_LINEAR = ["query", "key", "value", "projection", "mlp"]


def _method(impl: str, targets=("query", "value"), **extra):
    return RunConfig.from_dict({"method": {"name": "lora", "impl": impl, **extra,
                                           "lora": {"rank": 4, "alpha": 8, "targets": list(targets)}}}).method


def _pair(arch: str):
    torch.manual_seed(0)
    model = load_model(ModelConfig("random", TINY[arch], "float32"), 2).model.eval()
    return model, copy.deepcopy(model)


def _copy_adapters(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Give our adapters non-zero B, then copy A and B (transposed: peft keeps nn.Linear layout) into peft's."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LinearWithLoRA):
                module.lora.B.copy_(torch.randn(module.lora.B.shape, generator=generator) * 0.1)
                layer = theirs.get_submodule(name)
                layer.lora_A["default"].weight.copy_(module.lora.A.T)
                layer.lora_B["default"].weight.copy_(module.lora.B.T)


def test_the_peft_registry_and_the_config_name_the_same_methods():
    assert set(IMPLEMENTATIONS["peft"]) == set(PEFT_METHODS)
    assert set(IMPLEMENTATIONS["peft"]) <= set(IMPLEMENTATIONS["ours"])


def test_every_architecture_of_the_name_map_is_tested():
    assert set(TINY) == set(ARCHITECTURES)


@pytest.mark.parametrize("targets", [("query", "value"), ALL_LINEAR], ids=["query+value", "all-linear"])
@pytest.mark.parametrize("arch", sorted(TINY))
def test_same_spec_same_trainable_parameters_in_both_impls(arch, targets):
    ours, theirs = _pair(arch)
    ours_info = prepare_model(ours, _method("ours", targets))
    peft_info = prepare_model(theirs, _method("peft", targets))
    assert count_parameters(ours)[0] == count_parameters(theirs)[0] > 0
    assert ours_info["lora_modules"] == peft_info["lora_modules"]
    assert ours_info["head_modules"] == peft_info["head_modules"]
    assert peft_info["impl"] == "peft" and peft_info["peft_version"] == peft.__version__


@pytest.mark.parametrize("arch", sorted(TINY))
def test_outputs_equal_after_copying_a_and_b(arch):
    ours, theirs = _pair(arch)
    prepare_model(ours, _method("ours", ALL_LINEAR))
    prepare_model(theirs, _method("peft", ALL_LINEAR))
    _copy_adapters(ours, theirs)
    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    expected = ours(**inputs).logits
    assert not torch.allclose(expected, _pair(arch)[0](**inputs).logits)  # the adapters do change the output
    torch.testing.assert_close(theirs(**inputs).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scaling", ["alpha/r", "rslora", "alpha"])
def test_every_scaling_rule_maps_onto_peft(scaling):
    ours, theirs = _pair("bert")
    prepare_model(ours, RunConfig.from_dict({"method": {"lora": {"rank": 4, "alpha": 8, "scaling": scaling}}}).method)
    prepare_model(theirs, RunConfig.from_dict(
        {"method": {"impl": "peft", "lora": {"rank": 4, "alpha": 8, "scaling": scaling}}}).method)
    _copy_adapters(ours, theirs)
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_causal_lm_same_counts_same_loss_same_base_bytes():
    from lora_bench.run.causal_lm import load_causal_lm
    from lora_bench.run.tasks.instruct import causal_method, response_logits

    torch.manual_seed(0)
    ours = load_causal_lm(ModelConfig("random", "tiny-llama", "float32")).model.eval()
    theirs = copy.deepcopy(ours)
    prepare_model(ours, causal_method(_method("ours", ALL_LINEAR)))
    prepare_model(theirs, causal_method(_method("peft", ALL_LINEAR)))
    assert count_parameters(ours) == count_parameters(theirs)
    _copy_adapters(ours, theirs)
    ids = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    logits, targets = response_logits(ours, ids, mask, ids)
    peft_logits, peft_targets = response_logits(theirs, ids, mask, ids)
    torch.testing.assert_close(peft_logits, logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(targets, peft_targets)
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad])
    peft_optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad])
    # The adapters are told apart from the base weights in both naming schemes.
    assert state_bytes(ours, optimizer)["base_weights"] == state_bytes(theirs, peft_optimizer)["base_weights"]


def test_impl_defaults_to_ours_and_is_left_out_of_resolved_configs_at_its_default():
    cfg = RunConfig.from_dict({})
    assert cfg.method.impl == "ours" and "impl" not in cfg.to_dict()["method"]
    assert RunConfig.from_dict({"method": {"impl": "peft"}}).to_dict()["method"]["impl"] == "peft"
    with pytest.raises(ConfigError, match="impl"):
        RunConfig.from_dict({"method": {"impl": "hf"}})


@pytest.mark.parametrize(
    ("method", "device", "message"),
    [
        ({"name": "qlora"}, "cpu", "qlora with impl peft needs bitsandbytes' 4-bit layers, which run on CUDA only"),
        ({"name": "qlora", "quant": {"backend": "torch"}}, "cuda", "quant.backend torch"),
        ({"name": "full"}, "cpu", "method.impl peft is for methods"),
        ({"name": "last_layers"}, "cpu", "method.impl peft is for methods"),
    ],
)
def test_what_peft_cannot_run_is_a_named_config_error(method, device, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        RunConfig.from_dict({"method": {**method, "impl": "peft"}, "train": {"device": device}}, source="x.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without a GPU")
def test_qlora_peft_on_a_machine_without_cuda_is_the_named_error_at_run_time():
    # train.device auto passes the config check; the method finds no CUDA and says so.
    model = load_model(ModelConfig("random", "tiny-llama", "float32"), 2).model
    with pytest.raises(ConfigError, match="impl peft needs bitsandbytes"):
        prepare_model(model, RunConfig.from_dict({"method": {"name": "qlora", "impl": "peft"}}).method, "cpu")


def test_a_head_peft_would_widen_is_a_named_error():
    # DistilBERT's output layer is "classifier"; peft's suffix match would also take "pre_classifier".
    model = load_model(ModelConfig("random", "tiny-distilbert", "float32"), 2).model
    with pytest.raises(ValueError, match="modules_to_save matched"):
        prepare_model(model, _method("peft", head="last_linear"))


@pytest.mark.gpu
@pytest.mark.parametrize("targets", [("query", "value"), ALL_LINEAR], ids=["query+value", "all-linear"])
def test_qlora_peft_and_ours_train_the_same_parameters_on_cuda(targets):
    pytest.importorskip("bitsandbytes")
    counts = {}
    for impl in ("ours", "peft"):
        torch.manual_seed(0)
        model = load_model(ModelConfig("random", "tiny-llama", "bfloat16"), 2, device="cuda").model
        method = RunConfig.from_dict({"method": {"name": "qlora", "impl": impl, "lora": {
            "rank": 4, "alpha": 8, "targets": list(targets)}}, "train": {"device": "cuda"}}).method
        info = prepare_model(model, method, "cuda")
        assert info["quant_backend"] == "bitsandbytes"
        counts[impl] = count_parameters(model)[0]
    assert counts["ours"] == counts["peft"]
