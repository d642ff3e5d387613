"""benchmarks/bench_layers.py (`make bench`) must keep building every layer it times: it is not part of the test
run, so a changed constructor would otherwise break it unseen (it did once: `LinearWithLoRA(linear, 8, 16)` after
the layers took a spec)."""

from __future__ import annotations

import copy
import subprocess
import sys

import torch
from benchmark_helpers import ROOT, load_benchmark
from torch import nn


def test_every_timed_layer_builds_starts_at_the_base_output_and_trains_only_its_adapter():
    bench = load_benchmark("bench_layers")
    for method, build in bench.BUILDERS.items():
        torch.manual_seed(0)
        linear = nn.Linear(64, 48)
        reference = copy.deepcopy(linear)
        layer = build(linear)
        x = torch.randn(5, 64, requires_grad=True)
        out = layer(x)
        if method == "qlora_nf4":  # the base is the 4-bit weight: the same layer on its decoded weight
            reference.weight.data = layer.dequantized_weight(torch.float32)
        # B starts at zero, so every adapted layer computes its base layer's output.
        assert torch.allclose(out, reference(x), atol=1e-5), method
        out.sum().backward()
        trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        expected = 64 * 48 + 48 if method == "linear" else bench.RANK * (64 + 48)
        assert trainable == expected, (method, trainable)
        assert x.grad is not None, method


def test_the_benchmark_file_runs_on_its_smallest_shape():
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_layers.py", "-m", "", "-q",
                           "-p", "no:cacheprovider", "--benchmark-disable", "-k", "512x384x384"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4 passed" in done.stdout, done.stdout[-2000:]
