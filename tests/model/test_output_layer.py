"""The fused output layer (train/output_layer.py) against autograd over the plain log-softmax."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from infopo_cli.train import output_layer


def plain(hidden, targets, layer, softcap):
    logits = layer(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [3, 64])
def test_values_and_gradients_match_autograd(softcap, bias, chunk):
    torch.manual_seed(0)
    layer = nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    weights = torch.randn(11)  # an uneven incoming gradient, as a loss gives
    got = output_layer.target_logps(hidden, targets, layer, softcap, chunk)
    (got * weights).sum().backward()
    ours = [hidden.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    hidden.grad = None
    layer.zero_grad()
    want = plain(hidden, targets, layer, softcap)
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(ours, [hidden.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_sixteen_bit_layer_rounds_logits_as_the_plain_path_does():
    """A frozen bf16 layer (the LoRA case): the same bf16 logits normalised in float32, the input gradient in bf16."""
    torch.manual_seed(1)
    layer = nn.Linear(32, 300, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(20, 32, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 300, (20,))
    got = output_layer.target_logps(hidden, targets, layer, None, 8)
    got.sum().backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    want = plain(hidden, targets, layer, None)
    want.sum().backward()
    assert got.dtype == torch.float32 and ours.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours.float(), hidden.grad.float(), atol=2e-2, rtol=2e-2)


def test_no_tokens_and_no_grad():
    layer = nn.Linear(4, 7)
    empty = output_layer.target_logps(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), layer, None, 3)
    assert empty.shape == (0,)
    with torch.no_grad():
        out = output_layer.target_logps(torch.randn(5, 4), torch.arange(5), layer, None, 2)
    assert out.shape == (5,) and (out < 0).all()


def test_only_plain_linear_layers_are_fused():
    class Wrapped(nn.Linear):
        pass

    assert output_layer.fusable(nn.Linear(2, 3)) and not output_layer.fusable(Wrapped(2, 3))


def test_a_cpu_call_reuses_the_vocab_wide_buffers_of_the_last():
    """On a CPU each fresh vocab-wide tensor faults in its pages: chunks and calls share two buffers, and a call with
    fewer positions than the last reads only its own rows of them."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    big, small = torch.randn(9, 16, dtype=torch.bfloat16), torch.randn(4, 16, dtype=torch.bfloat16)
    output_layer.target_logps(big, torch.randint(0, 50, (9,)), layer, None, 64)
    held = {role: buffer.data_ptr() for role, buffer in output_layer._held.items()}
    assert set(held) == {"product", "logits"}
    targets = torch.randint(0, 50, (4,))
    got = output_layer.target_logps(small, targets, layer, None, 64)
    assert {role: buffer.data_ptr() for role, buffer in output_layer._held.items()} == held
    torch.testing.assert_close(got, plain(small, targets, layer, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_calls_that_share_the_buffers_keep_their_own_values_and_gradients(softcap):
    """Two calls' forwards before either backward (a reference pass and a policy pass, a recomputed chunk), with a
    bias, in float32: each backward recomputes its own chunks into the shared buffers."""
    torch.manual_seed(1)
    layer = nn.Linear(16, 50)
    first, second = torch.randn(9, 16, requires_grad=True), torch.randn(5, 16, requires_grad=True)
    t1, t2 = torch.randint(0, 50, (9,)), torch.randint(0, 50, (5,))
    a = output_layer.target_logps(first, t1, layer, softcap, 4)
    b = output_layer.target_logps(second, t2, layer, softcap, 4)
    (b.sum() + 2 * a.sum()).backward()
    got = [first.grad.clone(), second.grad.clone()]
    first.grad = second.grad = None
    want_a, want_b = plain(first, t1, layer, softcap), plain(second, t2, layer, softcap)
    (want_b.sum() + 2 * want_a.sum()).backward()
    torch.testing.assert_close(a, want_a.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, want_b.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, [first.grad, second.grad], atol=1e-5, rtol=1e-5)


def test_a_backward_that_builds_a_graph_still_runs():
    """`create_graph=True` (a gradient penalty, a second-order method): products with `out=` are not differentiable,
    so that backward makes fresh tensors."""
    layer = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(6, 16, requires_grad=True)
    logps = output_layer.target_logps(hidden, torch.randint(0, 50, (6,)), layer, None, 4)
    (grad,) = torch.autograd.grad(logps.sum(), hidden, create_graph=True)
    assert grad.shape == hidden.shape and torch.isfinite(grad).all()
