"""``memforge.linear``: the oneDNN route equals ``F.linear`` (values and gradients), and is taken
only where its rule says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from memforge import linear as linear_module
from memforge.linear import IMAGES, MIN_MACS, MIN_ROWS, MIN_WIDTH, Linear, linear, uses_onednn

needs_route = pytest.mark.skipif(not linear_module._ENABLED,
                                 reason="the oneDNN route is off here (not x86-64, or opted out)")


def _tensors(seed: int, lead: tuple[int, ...], width_in: int, width_out: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, width_in, generator=generator)
    weight = torch.randn(width_out, width_in, generator=generator) / width_in**0.5
    bias = torch.randn(width_out, generator=generator)
    return x, weight, bias


def _assert_close_to_reference(got: torch.Tensor, expected: torch.Tensor) -> None:
    # Float32 products of different kernels differ by rounding: relative to the tensor's scale.
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got / scale, expected / scale, rtol=0, atol=2e-5)


@needs_route
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(["flat", "batched", "three"]),
       whole_images=st.booleans(), width_in=st.integers(MIN_WIDTH, 300),
       width_out=st.integers(MIN_WIDTH, 300), with_bias=st.booleans(),
       transposed_input=st.booleans())
def test_onednn_route_matches_f_linear_with_gradients(seed, shape, whole_images, width_in,
                                                      width_out, with_bias, transposed_input
                                                      ) -> None:
    """Rows that divide into :data:`IMAGES` images and rows that do not, at the fewest rows the
    route takes for the drawn widths."""
    rows = max(MIN_ROWS, -(-MIN_MACS // (width_in * width_out)))
    rows = -(-rows // (10 * IMAGES)) * 10 * IMAGES + (0 if whole_images else 10)
    lead = {"flat": (rows,), "batched": (1, rows), "three": (2, 5, rows // 10)}[shape]
    x, weight, bias = _tensors(seed, lead, width_in, width_out)
    if transposed_input:  # a non-contiguous input of the same shape
        x = x.transpose(0, -2).contiguous().transpose(0, -2)
    bias = bias if with_bias else None
    assert uses_onednn(x, weight)
    leaves = [t.requires_grad_() for t in (x, weight, bias) if t is not None]
    got, expected = linear(x, weight, bias), F.linear(x, weight, bias)
    assert got.shape == expected.shape
    _assert_close_to_reference(got, expected)
    grad_output = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed + 1))
    for got_grad, expected_grad in zip(torch.autograd.grad(got, leaves, grad_output),
                                       torch.autograd.grad(expected, leaves, grad_output), strict=True):
        _assert_close_to_reference(got_grad, expected_grad)


@needs_route
def test_route_rule() -> None:
    x, weight, _ = _tensors(0, (2, MIN_ROWS // 2), 128, 128)
    assert MIN_ROWS * 128 * 128 >= MIN_MACS
    assert uses_onednn(x, weight)
    assert not uses_onednn(x[:, :-1], weight)                      # one row short
    assert not uses_onednn(x, weight[: MIN_WIDTH - 1])             # a narrow output (a gate)
    assert not uses_onednn(x[..., :64], weight[:64, :64])          # too little work
    assert not uses_onednn(x.double(), weight.double())            # float32 only
    assert not uses_onednn(x[0, 0], weight)                        # a single vector
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_onednn(x, weight)                          # autocast keeps F.linear


def test_off_route_is_f_linear_exactly() -> None:
    x, weight, bias = _tensors(1, (3, 7), 48, 40)
    assert not uses_onednn(x, weight)
    assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))


def test_linear_module_is_a_drop_in_for_nn_linear() -> None:
    torch.manual_seed(0)
    ours = Linear(64, 96)
    torch.manual_seed(0)
    theirs = nn.Linear(64, 96)
    assert isinstance(ours, nn.Linear)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                 theirs.state_dict().values(), strict=True))
    x, _, _ = _tensors(2, (4, MIN_ROWS), 64, 96)
    assert uses_onednn(x, ours.weight)
    _assert_close_to_reference(ours(x), theirs(x))


@needs_route
def test_compiled_route_matches_eager() -> None:
    torch._dynamo.reset()
    x, weight, bias = _tensors(3, (2, MIN_ROWS), 128, 80)
    compiled = torch.compile(linear, fullgraph=True)
    _assert_close_to_reference(compiled(x, weight, bias), linear(x, weight, bias))
    torch._dynamo.reset()


@needs_route
def test_one_thread_runs_onednn_not_the_im2col_path() -> None:
    """Rows that divide into :data:`IMAGES` images reach oneDNN on one thread too, where PyTorch
    sends a 1 x 1 convolution of fewer images to its own im2col-and-sgemm path."""
    from torch.profiler import profile

    x, weight, bias = _tensors(4, (IMAGES, MIN_ROWS // IMAGES), 128, 128)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with profile() as prof:
            linear(x.requires_grad_(), weight.requires_grad_(), bias).sum().backward()
    finally:
        torch.set_num_threads(threads)
    names = {event.name for event in prof.events()}
    assert "aten::mkldnn_convolution" in names
    assert not names & {"aten::thnn_conv2d", "aten::_slow_conv2d_forward",
                        "aten::_slow_conv2d_backward"}
