"""``memforge.nn.causal_depthwise_conv`` against ``F.conv1d`` (its definition) in float64:
values, both gradients and second derivatives, any taps, lengths and layouts."""

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


@pytest.mark.parametrize(("window", "weight"), [
    ((2, 2, 6), (6, 1, 4)),      # shorter than the taps: no new row
    ((2, 8, 5), (6, 1, 4)),      # channels differ
    ((2, 8, 6), (6, 2, 4)),      # not depthwise
    ((8, 6), (6, 1, 4)),         # no batch dimension
])
def test_bad_shapes_are_named(window, weight) -> None:
    with pytest.raises(ValueError, match=r"window \[B, K - 1 \+ T, C\]"):
        causal_depthwise_conv(torch.zeros(window), torch.zeros(weight))
