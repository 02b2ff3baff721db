"""``memforge.nn.causal_depthwise_conv`` against ``F.conv1d`` (its definition) in float64:
values, both gradients and second derivatives, any taps, lengths and layouts; its no-grad path,
autocast and half precision; and the projection's cache holding only the rows it needs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from memforge.nn import causal_depthwise_conv


def _conv1d(window: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv1d(window.transpose(1, 2), weight, groups=weight.shape[0]).transpose(1, 2)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), steps=st.integers(1, 19),
       channels=st.integers(1, 9), taps=st.integers(1, 5), transposed=st.booleans())
def test_equals_the_depthwise_convolution_with_gradients(seed, batch, steps, channels, taps,
                                                         transposed) -> None:
    generator = torch.Generator().manual_seed(seed)
    window = torch.randn(batch, taps - 1 + steps, channels, generator=generator, dtype=torch.float64)
    if transposed:  # channels-first memory, as a cache transposed back into rows
        window = window.transpose(1, 2).contiguous().transpose(1, 2)
    weight = torch.randn(channels, 1, taps, generator=generator, dtype=torch.float64)
    leaves = (window.requires_grad_(), weight.requires_grad_())
    got, expected = causal_depthwise_conv(window, weight), _conv1d(window, weight)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(got.shape, generator=generator, dtype=torch.float64)
    for ours, theirs in zip(torch.autograd.grad(got, leaves, grad),
                            torch.autograd.grad(expected, leaves, grad), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_second_derivatives() -> None:
    generator = torch.Generator().manual_seed(0)
    window = torch.randn(2, 3 + 5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 1, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(causal_depthwise_conv, (window, weight))


def test_one_new_row_is_the_weighted_window() -> None:
    window, weight = torch.randn(3, 4, 6), torch.randn(6, 1, 4)
    torch.testing.assert_close(causal_depthwise_conv(window, weight),
                               (window * weight[:, 0].t()).sum(1, keepdim=True))


@pytest.mark.parametrize("steps", [1, 9])
def test_without_autograd_it_computes_the_same(steps) -> None:
    window, weight = torch.randn(2, 3 + steps, 5), torch.randn(5, 1, 4, requires_grad=True)
    with_graph = causal_depthwise_conv(window, weight)
    with torch.no_grad():
        torch.testing.assert_close(causal_depthwise_conv(window, weight), with_graph.detach())


def test_autocast_runs_in_its_dtype_as_the_convolution_does() -> None:
    window, weight = torch.randn(2, 3 + 7, 5), torch.randn(5, 1, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = causal_depthwise_conv(window, weight), _conv1d(window, weight)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_half_precision_gradients_are_summed_in_float32() -> None:
    generator = torch.Generator().manual_seed(0)
    window = torch.randn(2, 3 + 7, 5, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, 1, 4, generator=generator, dtype=torch.float64)
    grads = []
    for dtype in (torch.bfloat16, torch.float64):
        leaves = (window.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_())
        out = causal_depthwise_conv(*leaves)
        assert out.dtype == dtype
        grads.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    for low, exact in zip(*grads, strict=True):
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.double(), exact, rtol=1e-2, atol=1e-2)


def test_a_dtype_mismatch_is_named() -> None:
    with pytest.raises(ValueError, match="torch.float64 window and a torch.float32 weight"):
        causal_depthwise_conv(torch.zeros(1, 5, 3, dtype=torch.float64), torch.zeros(3, 1, 4))


@pytest.mark.parametrize(("window", "weight"), [
    ((2, 2, 6), (6, 1, 4)),      # shorter than the taps: no new row
    ((2, 8, 5), (6, 1, 4)),      # channels differ
    ((2, 8, 6), (6, 2, 4)),      # not depthwise
    ((8, 6), (6, 1, 4)),         # no batch dimension
])
def test_bad_shapes_are_named(window, weight) -> None:
    with pytest.raises(ValueError, match=r"window \[B, K - 1 \+ T, C\]"):
        causal_depthwise_conv(torch.zeros(window), torch.zeros(weight))


def test_the_projection_cache_holds_only_its_rows() -> None:
    from memforge.engine.projection import QKVProjection

    projection = QKVProjection(16, 2, 4, conv_kernel=4)
    with torch.no_grad():
        *_, cache = projection(torch.randn(2, 300, 16), None)
    assert cache.history.shape == (2, 3, 24)
    assert cache.history.untyped_storage().nbytes() == cache.history.numel() * 4
