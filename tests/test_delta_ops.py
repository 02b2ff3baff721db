"""The delta-rule ops (``memforge_delta.ops``) against the float64 token loop (docs/delta.md)."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from memforge_delta.ops import delta_rule, gated_delta_rule
from memforge_delta.reference import chunkwise_rowwise, token_loop
from torch import Tensor

from memforge import InputError
from memforge.engine.triangular import unit_lower_inverse

EXACT = {"atol": 1e-10, "rtol": 1e-10}
SAME = {"atol": 1e-12, "rtol": 1e-12}
CHUNKS = st.sampled_from([1, 7, 64]) | st.integers(2, 16)


class Inputs(NamedTuple):
    """One draw of the ops' arguments; ``g`` is ``None`` for DeltaNet."""

    q: Tensor
    k: Tensor
    v: Tensor
    beta: Tensor
    g: Tensor | None
    initial_state: Tensor | None

    def run(self, chunk_size: int) -> tuple[Tensor, Tensor]:
        """The WY kernel on these inputs."""
        if self.g is None:
            return delta_rule(self.q, self.k, self.v, self.beta, self.initial_state, chunk_size)
        return gated_delta_rule(self.q, self.k, self.v, self.beta, self.g, self.initial_state, chunk_size)

    def reference(self) -> tuple[Tensor, Tensor]:
        """The float64 token loop on these inputs."""
        return token_loop(*self)

    def tensors(self) -> list[Tensor]:
        """The inputs that are tensors (the ones that get gradients)."""
        return [t for t in self if t is not None]


def make_inputs(seed: int, batch: int = 2, heads: int = 2, tokens: int = 19, d_k: int = 4, d_v: int = 3,
                gated: bool = True, state: bool = True, dtype: torch.dtype = torch.float64,
                ) -> Inputs:
    """Unit keys and steps in ``[0, 2]`` (the regime where the rule is non-expansive)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return Inputs(
        q=randn(batch, heads, tokens, d_k),
        k=F.normalize(randn(batch, heads, tokens, d_k), dim=-1),
        v=randn(batch, heads, tokens, d_v),
        beta=2 * torch.rand(batch, heads, tokens, generator=gen, dtype=dtype),
        g=F.logsigmoid(randn(batch, heads, tokens) + 2) if gated else None,
        initial_state=randn(batch, heads, d_k, d_v) if state else None,
    )


@st.composite
def cases(draw: st.DrawFn, max_tokens: int = 70) -> tuple[Inputs, int]:
    """Random sizes (odd lengths and chunk boundaries included), gating, carried state, chunk size."""
    tokens = draw(st.integers(1, max_tokens))
    inputs = make_inputs(draw(st.integers(0, 2**31 - 1)), batch=draw(st.integers(1, 2)),
                         heads=draw(st.integers(1, 2)), tokens=tokens, d_k=draw(st.integers(1, 6)),
                         d_v=draw(st.integers(1, 6)), gated=draw(st.booleans()), state=draw(st.booleans()))
    return inputs, draw(CHUNKS)


def assert_pair_close(got: tuple[Tensor, Tensor], want: tuple[Tensor, Tensor], **tol: float) -> None:
    """Outputs and final states agree within ``tol``."""
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)


@given(cases())
def test_matches_token_loop(case: tuple[Inputs, int]) -> None:
    inputs, chunk = case
    assert_pair_close(inputs.run(chunk), inputs.reference(), **EXACT)


@given(cases())
def test_rowwise_chunkwise_reference_matches_token_loop(case: tuple[Inputs, int]) -> None:
    """The benchmark's comparator computes the same rule."""
    inputs, chunk = case
    assert_pair_close(chunkwise_rowwise(*inputs, chunk_size=chunk), inputs.reference(), **EXACT)


@given(st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_blocked_inverse_is_the_inverse(size: int, seed: int) -> None:
    """Any size (powers of two or not); only the strictly lower part is read."""
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.randn(2, size, size, generator=gen, dtype=torch.float64) / size**0.5
    identity = torch.eye(size, dtype=torch.float64)
    expected = torch.linalg.solve_triangular(identity + matrix.tril(-1), identity.expand(2, -1, -1),
                                             upper=False)
    torch.testing.assert_close(unit_lower_inverse(matrix), expected, **EXACT)


def _gradients(inputs: Inputs, outputs: tuple[Tensor, Tensor], cotangents: tuple[Tensor, Tensor]
               ) -> tuple[Tensor, ...]:
    scalar = (outputs[0] * cotangents[0]).sum() + (outputs[1] * cotangents[1]).sum()
    return torch.autograd.grad(scalar, inputs.tensors())


@given(cases(max_tokens=40))
def test_gradients_match_token_loop(case: tuple[Inputs, int]) -> None:
    """Gradients w.r.t. q, k, v, beta, g and the initial state, autograd through both."""
    inputs, chunk = case
    inputs = Inputs(*(None if t is None else t.requires_grad_() for t in inputs))
    want = inputs.reference()
    cotangents = (torch.randn_like(want[0]), torch.randn_like(want[1]))
    for got, expected in zip(_gradients(inputs, inputs.run(chunk), cotangents),
                             _gradients(inputs, want, cotangents), strict=True):
        torch.testing.assert_close(got, expected, **EXACT)


def test_chunk_size_one_is_the_token_recurrence() -> None:
    for gated in (False, True):
        inputs = make_inputs(1, tokens=23, gated=gated)
        assert_pair_close(inputs.run(1), inputs.reference(), **EXACT)


@given(cases(), st.data())
def test_split_anywhere_equals_whole(case: tuple[Inputs, int], data: st.DataObject) -> None:
    """Feeding the sequence in two calls, the state carried, equals one call (chunk grids differ)."""
    inputs, chunk = case
    split = data.draw(st.integers(0, inputs.q.shape[2]))
    second_chunk = data.draw(CHUNKS)
    head = Inputs(*(t[:, :, :split] for t in inputs[:4]),
                  None if inputs.g is None else inputs.g[:, :, :split], inputs.initial_state)
    first_out, state = head.run(chunk)
    tail = Inputs(*(t[:, :, split:] for t in inputs[:4]),
                  None if inputs.g is None else inputs.g[:, :, split:], state)
    second_out, final = tail.run(second_chunk)
    assert_pair_close((torch.cat((first_out, second_out), 2), final), inputs.run(chunk), **EXACT)


@given(cases(), st.data())
def test_causal(case: tuple[Inputs, int], data: st.DataObject) -> None:
    """Changing tokens after t (every input there) leaves the outputs up to t unchanged."""
    inputs, chunk = case
    tokens = inputs.q.shape[2]
    t = data.draw(st.integers(0, tokens - 1))
    other = make_inputs(data.draw(st.integers(0, 2**31 - 1)), *inputs.q.shape[:3], inputs.q.shape[3],
                        inputs.v.shape[3], gated=inputs.g is not None, state=False)

    def mix(a: Tensor | None, b: Tensor | None) -> Tensor | None:
        return None if a is None or b is None else torch.cat((a[:, :, :t + 1], b[:, :, t + 1:]), 2)

    changed = Inputs(*(mix(a, b) for a, b in zip(inputs[:5], other[:5], strict=True)), inputs.initial_state)
    seen = slice(0, t + 1)
    torch.testing.assert_close(changed.run(chunk)[0][:, :, seen], inputs.run(chunk)[0][:, :, seen], **SAME)


def test_batch_elements_are_independent() -> None:
    inputs = make_inputs(2, batch=3, tokens=29)
    outputs, state = inputs.run(7)
    for b in range(3):
        alone = Inputs(*(t[b:b + 1] for t in inputs))
        assert_pair_close(alone.run(7), (outputs[b:b + 1], state[b:b + 1]), **SAME)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_zero_log_decay_is_the_ungated_rule(chunk: int) -> None:
    inputs = make_inputs(3, tokens=37, gated=False)
    gated = Inputs(*inputs[:4], torch.zeros_like(inputs.beta), inputs.initial_state)
    assert_pair_close(gated.run(chunk), inputs.run(chunk), **SAME)


@pytest.mark.parametrize("gated", [False, True])
def test_zero_step_writes_nothing(gated: bool) -> None:
    """beta = 0: the state only decays, S_T = exp(sum g) S_0, and every read is of that."""
    inputs = make_inputs(4, tokens=21, gated=gated)
    inputs = inputs._replace(beta=torch.zeros_like(inputs.beta))
    outputs, state = inputs.run(7)
    assert inputs.initial_state is not None
    total = torch.zeros_like(inputs.beta) if inputs.g is None else inputs.g.cumsum(-1)
    decayed = total.exp()[..., None, None] * inputs.initial_state[:, :, None]  # [B, H, T, d_k, d_v]
    torch.testing.assert_close(state, decayed[:, :, -1], **SAME)
    torch.testing.assert_close(outputs, torch.einsum("bhtkv,bhtk->bhtv", decayed, inputs.q), **SAME)


@given(cases(max_tokens=40), st.integers(1, 9))
def test_padding_tokens_change_nothing(case: tuple[Inputs, int], extra: int) -> None:
    """Tokens with beta = 0 and g = 0 (any q, k, v) leave every earlier output and the state alone:
    the exactness argument for the kernel's internal padding, checked from outside."""
    inputs, chunk = case
    more = make_inputs(5, *inputs.q.shape[:2], extra, inputs.q.shape[3], inputs.v.shape[3], state=False)
    padded = Inputs(*(torch.cat((a, b), 2) for a, b in zip(inputs[:3], more[:3], strict=True)),
                    F.pad(inputs.beta, (0, extra)), None if inputs.g is None else F.pad(inputs.g, (0, extra)),
                    inputs.initial_state)
    outputs, state = padded.run(chunk)
    assert_pair_close((outputs[:, :, :inputs.q.shape[2]], state), inputs.run(chunk), **SAME)


@pytest.mark.parametrize("forget", [-1e4, float("-inf")])
def test_full_forgetting_is_exact_and_finite(forget: float) -> None:
    """A token with gamma = exp(g) = 0 restarts the memory; values and gradients stay finite."""
    inputs = make_inputs(6, tokens=30)
    assert inputs.g is not None
    g = inputs.g.clone()
    g[:, :, [0, 9, 10, 17]] = forget
    inputs = Inputs(*inputs[:4], g, inputs.initial_state)
    grads_in = Inputs(*(t.clone().requires_grad_() for t in inputs))
    outputs, state = grads_in.run(7)
    assert torch.isfinite(outputs).all() and torch.isfinite(state).all()
    assert_pair_close((outputs, state), inputs.reference(), **EXACT)
    cotangents = (torch.randn_like(outputs), torch.randn_like(state))
    got = _gradients(grads_in, (outputs, state), cotangents)
    want = _gradients(grads_in, grads_in.reference(), cotangents)
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **EXACT)
    # From token 17 on, the outputs are those of a fresh memory started there.
    fresh = Inputs(*(t[:, :, 17:] for t in inputs[:5]), None)
    torch.testing.assert_close(fresh.run(7)[0], outputs[:, :, 17:].detach(), **EXACT)


def test_float32_agrees_with_the_float64_loop() -> None:
    """1e-4 relative (largest error over largest value) at 512 tokens, chunk 64."""
    inputs = make_inputs(7, batch=1, heads=2, tokens=512, d_k=16, d_v=16)
    inputs = inputs._replace(beta=inputs.beta / 2)  # (0, 1), as sigmoid gives
    want = inputs.reference()
    got = Inputs(*(t.float() for t in inputs)).run(64)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 1e-4


def test_strided_inputs() -> None:
    """Views such as ``[B, T, H, d].transpose(1, 2)`` (how a layer's projections come) work as is."""
    inputs = make_inputs(11, tokens=17)
    strided = Inputs(*(t.transpose(1, 2).contiguous().transpose(1, 2) if t.dim() == 4 else t
                       for t in inputs))
    assert not strided.q.is_contiguous()
    assert_pair_close(strided.run(7), inputs.run(7), **SAME)


def test_half_precision_inputs_run_in_float32() -> None:
    inputs = Inputs(*(t.bfloat16() for t in make_inputs(8, tokens=12)))
    outputs, state = inputs.run(64)
    assert outputs.dtype == torch.bfloat16 and state.dtype == torch.float32
    want = Inputs(*(t.float() for t in inputs)).run(64)
    torch.testing.assert_close(outputs, want[0].bfloat16())


@pytest.mark.parametrize("state", [False, True])
def test_empty_sequence(state: bool) -> None:
    inputs = make_inputs(9, tokens=0, state=state)
    outputs, final = inputs.run(64)
    assert outputs.shape == (2, 2, 0, 3)
    expected = inputs.initial_state if inputs.initial_state is not None else torch.zeros(2, 2, 4, 3,
                                                                                           dtype=torch.float64)
    torch.testing.assert_close(final, expected)


def _bad(**changes: object) -> dict[str, object]:
    args = make_inputs(10, tokens=5)._asdict()
    args["chunk_size"] = 64
    args.update(changes)
    return args


BAD_INPUTS = {
    "rank": (_bad(q=torch.zeros(2, 5, 4)), r"q must be \[B, H, T, d_k\], got shape \[2, 5, 4\]"),
    "k shape": (_bad(k=torch.zeros(2, 2, 5, 3, dtype=torch.float64)), "q and k must have the same shape"),
    "v tokens": (_bad(v=torch.zeros(2, 2, 6, 3, dtype=torch.float64)), "v must be .* with the B, H, T of q"),
    "beta shape": (_bad(beta=torch.zeros(2, 2, 4, dtype=torch.float64)), r"beta must be \[B, H, T\]"),
    "g shape": (_bad(g=torch.zeros(1, 2, 5, dtype=torch.float64)), r"g must be \[B, H, T\]"),
    "beta range": (_bad(beta=torch.full((2, 2, 5), 2.5, dtype=torch.float64)), r"beta must lie in \[0, 2\]"),
    "beta negative": (_bad(beta=torch.full((2, 2, 5), -0.1, dtype=torch.float64)), r"beta must lie in"),
    "beta nan": (_bad(beta=torch.full((2, 2, 5), float("nan"), dtype=torch.float64)), r"beta must lie in"),
    "g positive": (_bad(g=torch.full((2, 2, 5), 0.1, dtype=torch.float64)), "g is a log-decay, must be <= 0"),
    "integer dtype": (_bad(v=torch.zeros(2, 2, 5, 3, dtype=torch.long)), "v must have a floating dtype"),
    "not a tensor": (_bad(q=[[1.0]]), "q must be a torch.Tensor, got list"),
    "chunk zero": (_bad(chunk_size=0), "chunk_size must be an integer >= 1, got 0"),
    "chunk float": (_bad(chunk_size=8.0), "chunk_size must be an integer >= 1, got 8.0"),
    "state shape": (_bad(initial_state=torch.zeros(2, 2, 3, 4, dtype=torch.float64)),
                    r"initial_state must be \[B, H, d_k, d_v\] = \[2, 2, 4, 3\], got \[2, 2, 3, 4\]"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_line(name: str) -> None:
    args, message = BAD_INPUTS[name]
    with pytest.raises(InputError, match=message) as info:
        gated_delta_rule(**args)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_ungated_op_names_itself() -> None:
    args = _bad(beta=torch.full((2, 2, 5), 3.0, dtype=torch.float64))
    del args["g"]
    with pytest.raises(InputError, match=r"^delta_rule: beta must lie in"):
        delta_rule(**args)  # type: ignore[arg-type]
