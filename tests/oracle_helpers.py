"""Shared checks of our layers against an oracle layer (peft)."""

from __future__ import annotations

import torch


def assert_same_forward_and_input_grad(ours, reference, in_features: int = 16) -> None:
    """Our layer and its oracle give equal outputs and input gradients on one random batch (both get the same
    input and the same upstream gradient); parameter gradients are then compared by the caller."""
    x1 = torch.randn(5, 3, in_features, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    out_ours, out_ref = ours(x1), reference(x2)
    torch.testing.assert_close(out_ours, out_ref)
    grad = torch.randn_like(out_ours)
    out_ours.backward(grad)
    out_ref.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad)
