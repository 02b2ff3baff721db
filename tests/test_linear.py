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
from memforge.linear import MIN_IMAGES, MIN_MACS, MIN_ROWS, MIN_WIDTH, Linear, linear, uses_onednn

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


def _next_prime(n: int) -> int:
    while any(n % d == 0 for d in range(2, int(n**0.5) + 1)):
        n += 1
    return n


@needs_route
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(["flat", "batched", "three"]),
       images=st.sampled_from(["sixteen", "another count", "one"]),
       width_in=st.integers(MIN_WIDTH, 300), width_out=st.integers(MIN_WIDTH, 300),
       with_bias=st.booleans(), layout=st.sampled_from(["contiguous", "transposed", "padded"]))
def test_onednn_route_matches_f_linear_with_gradients(seed, shape, images, width_in, width_out,
                                                      with_bias, layout) -> None:
    """Near the fewest rows the route takes for the drawn widths: rows cut into 16 images, into
    another count, or left one image (10 times a prime over 64 has no divisor from 16 to 64); rows
    contiguous, transposed in memory, or padded."""
    least = max(MIN_ROWS, -(-MIN_MACS // (width_in * width_out)))
    rows = {"sixteen": 160 * -(-least // 160), "another count": 190 * (2 * -(-least // 380) + 1),
            "one": 10 * _next_prime(max(67, -(-least // 10)))}[images]
    lead = {"flat": (rows,), "batched": (1, rows), "three": (2, 5, rows // 10)}[shape]
    x, weight, bias = _tensors(seed, lead, width_in, width_out)
    if layout == "transposed":
        x = x.mT.contiguous().mT
    elif layout == "padded":  # rows that do not follow one another in memory
        x = torch.cat([x, torch.zeros(*lead, 7)], dim=-1)[..., :width_in]
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
    """Each condition on its own: every other one holds where one fails."""
    x, weight, _ = _tensors(0, (2, MIN_ROWS // 2), 256, 256)
    assert uses_onednn(x, weight)
    assert not uses_onednn(x.flatten(0, 1)[:-1], weight)           # one row short
    tall, _, _ = _tensors(1, (4096,), 128, 0)
    assert uses_onednn(tall, weight[:MIN_WIDTH, :128])
    assert not uses_onednn(tall, weight[: MIN_WIDTH - 1, :128])    # a narrow output (a gate)
    assert not uses_onednn(tall[:, : MIN_WIDTH - 1], weight[:, : MIN_WIDTH - 1])  # a narrow input
    boundary = MIN_MACS // MIN_WIDTH**2                            # rows at exactly MIN_MACS
    assert boundary * MIN_WIDTH**2 == MIN_MACS
    square, _, _ = _tensors(2, (boundary,), MIN_WIDTH, 0)
    assert uses_onednn(square, weight[:MIN_WIDTH, :MIN_WIDTH])
    assert not uses_onednn(square[1:], weight[:MIN_WIDTH, :MIN_WIDTH])  # too little work
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
    assert uses_onednn(x, ours.weight) == linear_module._ENABLED
    _assert_close_to_reference(ours(x), theirs(x))


@needs_route
def test_compiled_route_matches_eager() -> None:
    torch._dynamo.reset()
    x, weight, bias = _tensors(3, (2, MIN_ROWS), 128, 80)
    compiled = torch.compile(linear, fullgraph=True)
    _assert_close_to_reference(compiled(x, weight, bias), linear(x, weight, bias))
    torch._dynamo.reset()


@needs_route
@pytest.mark.parametrize("rows", [MIN_IMAGES * 32, 17 * 31])
def test_one_thread_runs_onednn_not_the_im2col_path(rows: int) -> None:
    """Rows cut into :data:`MIN_IMAGES` images (512) or more (527 = 17 x 31, into 17) reach
    oneDNN on one thread too, where PyTorch sends a 1 x 1 convolution of fewer images to its own
    im2col-and-sgemm path."""
    from torch.profiler import profile

    x, weight, bias = _tensors(4, (rows,), 128, 128)
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
