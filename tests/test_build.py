"""Models are built where they run: a random model is constructed on the meta device and materialized on the
run's device in its dtype (never an fp32 copy), tied weights stay tied, and QLoRA quantizes a model built on
the meta device one linear layer at a time, so the 16-bit model is never whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lora_bench.adapters import quant
from lora_bench.adapters.lora import count_parameters
from lora_bench.config import ModelConfig, RunConfig
from lora_bench.run.causal_lm import load_causal_lm
from lora_bench.run.methods import builds_layer_by_layer, prepare_model
from lora_bench.run.models import load_model, materialize, on_meta, random_model_config

# About 170 M parameters (Llama blocks of width 1024, 8 of them, a 32k vocabulary): 340 MB in bf16, 680 MB in fp32.
MID_SIZE = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
            "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 16,
            "max_position_embeddings": 512, "pad_token_id": 0}

PEAK_RSS = textwrap.dedent("""
    import json, resource, sys
    import torch
    from lora_bench.run.causal_lm import load_causal_lm
    from lora_bench.config import ModelConfig
    # A tiny model first, so the modules transformers imports lazily are not counted as the model.
    load_causal_lm(ModelConfig("random", "tiny-llama", "bfloat16"))

    def resident():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()

    before = resident()
    model = load_causal_lm(ModelConfig("random", sys.argv[1], "bfloat16")).model
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "grown": peak - before,
                      "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
""")


class AllocationsByDtype(TorchDispatchMode):
    """Bytes of every tensor that an operation creates on a real device (not meta), by dtype: what a build
    allocates, whatever the allocator later keeps resident."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        created = func.overloadpacket in CREATING_OPS
        for tensor in (out if isinstance(out, (tuple, list)) else [out]):
            if created and isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self.bytes[tensor.dtype] = self.bytes.get(tensor.dtype, 0) + tensor.numel() * tensor.element_size()
        return out


CREATING_OPS = {torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like,
                torch.ops.aten.zeros, torch.ops.aten.ones, torch.ops.aten.full, torch.ops.aten.randn,
                torch.ops.aten.rand, torch.ops.aten._to_copy, torch.ops.aten.clone, torch.ops.aten.arange,
                torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided, torch.ops.aten.new_zeros}


def test_a_bf16_random_model_is_built_without_an_fp32_copy(tmp_path):
    """Exact and load-independent: every tensor the build creates, by dtype. An fp32 build or an fp32 copy would
    create >= 4 bytes per parameter in float32; the bf16 build creates its 2 bytes per parameter in bf16."""
    config = tmp_path / "mid.json"
    config.write_text(json.dumps(MID_SIZE))
    with AllocationsByDtype() as allocations:
        model = load_causal_lm(ModelConfig("random", str(config), "bfloat16")).model
    n = sum(p.numel() for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and n > 150e6
    assert allocations.bytes.get(torch.bfloat16, 0) >= 2 * n  # the measurement sees the model itself
    # Small float32 buffers (rotary frequencies, norms' statistics) are fine; a copy of the weights is not.
    assert allocations.bytes.get(torch.float32, 0) < 0.05 * 4 * n, allocations.bytes


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ru_maxrss in KiB")
def test_the_peak_resident_memory_of_a_bf16_build_stays_near_two_bytes_per_parameter(tmp_path):
    """The same bound as the process sees it (peak RSS). Slow tier: the resident size before the build depends on
    what ran before in the machine and the process (2.00 N alone, up to 3.1 N measured on a loaded machine)."""
    config = tmp_path / "mid.json"
    config.write_text(json.dumps(MID_SIZE))
    # A fixed mmap threshold: glibc otherwise raises it after large frees, and then freed temporaries stay resident.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(config)], capture_output=True, text=True,
                            check=True, env=env)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    n = out["params"]
    assert out["dtypes"] == ["torch.bfloat16"] and n > 150e6
    # An fp32 build (4N) or an fp32 copy beside the bf16 model (6N) cannot fit under 3.5 N.
    assert out["grown"] < 3.5 * n, f"peak grew by {out['grown'] / n:.2f} bytes per parameter"


TINY = ["tiny-bert", "tiny-distilbert", "tiny-roberta", "tiny-electra", "tiny-deberta-v2", "tiny-albert",
        "tiny-mpnet", "tiny-llama"]


@pytest.mark.parametrize("name", TINY)
def test_materialized_model_is_whole_initialised_and_has_the_buffers_of_a_plain_build(name):
    from transformers import AutoModelForSequenceClassification

    model = load_model(ModelConfig("random", name, "float32"), 2).model
    assert not on_meta(model)
    _, hf_config = random_model_config(name, num_labels=2)
    plain = AutoModelForSequenceClassification.from_config(hf_config)
    # Position ids, rotary frequencies: computed buffers are equal to a normal construction's.
    plain_buffers = dict(plain.named_buffers())
    for key, buffer in model.named_buffers():
        assert torch.equal(buffer, plain_buffers[key]), key
    # Weights follow the model's own init: linear weights of std initializer_range, biases zero, norms one.
    for module_name, module in model.named_modules():
        if type(module) is nn.Linear:
            assert abs(module.weight.std().item() - hf_config.initializer_range) < 0.01, module_name
            if module.bias is not None:
                assert torch.count_nonzero(module.bias) == 0, module_name
        elif isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1), module_name
    embedding = model.get_input_embeddings()
    if embedding.padding_idx is not None:
        assert torch.count_nonzero(embedding.weight[embedding.padding_idx]) == 0


def test_tied_embeddings_stay_one_tensor(tmp_path):
    from lora_bench.run.causal_lm import load_causal_lm

    config = tmp_path / "tied.json"
    config.write_text(json.dumps({**json.loads((random_model_config("tiny-llama")[0]).read_text()),
                                  "tie_word_embeddings": True}))
    model = load_causal_lm(ModelConfig("random", str(config), "float32")).model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.get_input_embeddings().weight.abs().sum() > 0


def test_same_seed_same_weights():
    weights = []
    for _ in range(2):
        torch.manual_seed(7)
        weights.append(load_model(ModelConfig("random", "tiny-bert", "float32"), 2).model.state_dict())
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_deferred_model_stays_on_meta_until_materialized():
    model = load_model(ModelConfig("random", "tiny-llama", "bfloat16"), 2, defer=True).model
    assert all(p.is_meta for p in model.parameters())
    materialize(model, "cpu")
    assert not on_meta(model) and {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_qlora_quantizes_a_meta_model_one_linear_layer_at_a_time(monkeypatch):
    cfg = RunConfig.from_dict({"model": {"source": "random", "name": "tiny-llama", "dtype": "bfloat16"},
                               "method": {"name": "qlora", "quant": {"backend": "torch"},
                                          "lora": {"rank": 4, "alpha": 8}}})
    assert builds_layer_by_layer(cfg.method)
    model = load_model(cfg.model, 2, defer=True).model
    alive = []
    original = quant.LinearNF4.__init__

    def counting(self, linear, *args, **kwargs):
        # 16-bit linear layers of the base model that exist (not on meta) when one is being quantized.
        alive.append(sum(1 for name, m in model.named_modules()
                         if type(m) is nn.Linear and name != "score" and not m.weight.is_meta))
        original(self, linear, *args, **kwargs)

    monkeypatch.setattr(quant.LinearNF4, "__init__", counting)
    info = prepare_model(model, cfg.method, "cpu")
    # 2 blocks x 7 linear layers, each quantized as it is materialized; at most the one in hand exists in 16 bits
    # (it is replaced in the model right after, so the next count sees none left).
    assert len(alive) == 14 and max(alive) <= 1
    assert on_meta(model)  # embeddings, norms and the head are the caller's to materialize
    materialize(model, "cpu")
    assert not on_meta(model) and info["quant_backend"] == "torch"
    trainable = count_parameters(model)[0]
    ids = torch.randint(5, 100, (2, 8))
    assert trainable > 0 and torch.isfinite(model(input_ids=ids).logits.float()).all()


def test_a_qlora_run_from_a_meta_model_trains_and_records_setup_time(tmp_path):
    from lora_bench.run.train import run_training

    cfg = RunConfig.from_dict({
        "task": "instruct", "seed": 0, "model": {"source": "random", "name": "tiny-llama", "dtype": "bfloat16"},
        "data": {"source": "synthetic", "max_length": 32, "synthetic_examples": 12, "cache_dir": str(tmp_path)},
        "method": {"name": "qlora", "quant": {"backend": "torch"}, "lora": {"rank": 4, "alpha": 8}},
        "train": {"epochs": 1, "max_steps": 5, "batch_size": 2, "evaluate": False, "device": "cpu", "threads": 1,
                  "precision": "bf16", "progress": "never"}})
    result = run_training(cfg)
    assert result.timing["optimizer_steps"] == 5 and result.timing["setup_s"] > 0
    assert result.timing["warmup_steps"] == 3 and result.timing["timed_steps"] == 2
    assert len(result.method_info["quantized_frozen"]) == 10  # 14 linear layers, 4 of them carry LoRA (q, v)
    # Every token of a synthetic causal-LM sequence is a target (the loss predicts 31 of them from the rest).
    assert result.data_info["response_tokens"]["train"] == 12 * 32


@pytest.mark.gpu
def test_a_7b_shaped_model_is_built_on_the_gpu_in_seconds():
    import time

    start = time.perf_counter()
    from lora_bench.run.causal_lm import load_causal_lm

    model = load_causal_lm(ModelConfig("random", "llama-2-7b", "bfloat16"), device="cuda").model
    torch.cuda.synchronize()
    assert time.perf_counter() - start < 15
    assert next(model.parameters()).device.type == "cuda" and count_parameters(model)[1] > 6.5e9
