"""The built model: input checks (and that value checks never sync a device), state passing,
state_dict, dtype, compile, generation."""

import pytest
import torch

import memforge
from memforge.checks import checks_values, device_value_checks
from memforge.errors import InputError

TINY = ["baseline.transformer_tiny", "titans.lmm_tiny"]


def _tokens(spec, shape, seed=0):
    return torch.randint(0, spec.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TINY)
def test_state_dict_round_trip(name):
    spec = memforge.preset(name)
    model, other = memforge.build_model(spec), memforge.build_model(spec)
    other.load_state_dict(model.state_dict())
    tokens = _tokens(spec, (2, 21))
    torch.testing.assert_close(model(tokens).logits, other(tokens).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", TINY)
def test_float64_build(name):
    spec = memforge.preset(name)
    model = memforge.build_model(spec, dtype=torch.float64)
    assert model(_tokens(spec, (1, 9))).logits.dtype == torch.float64


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (torch.zeros(2, 3, 4, dtype=torch.long), r"shape \[batch, time\]"),
        (torch.zeros(2, 3), "integer ids"),
        (torch.full((1, 4), 64), "token id 64 is out of range for vocab_size=64"),
        (torch.full((1, 4), -1), "token id -1 is out of range"),
        ([[1, 2]], "must be a torch.LongTensor"),
        (torch.zeros(1, 0, dtype=torch.long), "no time steps"),
    ],
)
def test_bad_tokens_get_clear_errors(tokens, message):
    model = memforge.build_model(memforge.preset("titans.lmm_tiny"))
    with pytest.raises(InputError, match=message):
        model(tokens)


def test_state_from_other_batch_or_model_is_refused():
    spec = memforge.preset("titans.lmm_tiny")
    model = memforge.build_model(spec)
    state = model(_tokens(spec, (2, 5))).state
    with pytest.raises(InputError, match="belongs to 2 sequences but tokens has batch 3"):
        model(_tokens(spec, (3, 5)), state)
    deeper = memforge.build_model(memforge.override(spec, ["num_layers=3"]))
    with pytest.raises(InputError, match="state has 2 layer states but the model has 3 blocks"):
        deeper(_tokens(spec, (2, 5)), state)
    with pytest.raises(InputError, match="must be the ModelState"):
        model(_tokens(spec, (2, 5)), "state")


def test_non_finite_hidden_states_are_refused():
    spec = memforge.preset("titans.lmm_tiny")
    model = memforge.build_model(spec)
    with torch.no_grad():
        model.embedding.weight[3] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        model(torch.full((1, 4), 3))


@pytest.mark.parametrize("name", TINY)
def test_generate_continues_the_prompt(name):
    spec = memforge.preset(name)
    model = memforge.build_model(spec)
    prompt = _tokens(spec, (2, 7))
    out = model.generate(prompt, 5, temperature=0)
    assert out.shape == (2, 12) and torch.equal(out[:, :7], prompt)
    # greedy decoding picks the full forward's argmax at every new position
    logits = model(out[:, :-1]).logits
    assert torch.equal(logits[:, 6:].argmax(-1), out[:, 7:])
    sampled = model.generate(prompt, 3, temperature=1.0, top_k=5,
                             generator=torch.Generator().manual_seed(1))
    assert sampled.shape == (2, 10)


def test_compiled_model_matches_eager():
    spec = memforge.preset("titans.lmm_tiny")
    model = memforge.build_model(spec)
    tokens = _tokens(spec, (2, 19))
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    torch.testing.assert_close(compiled(tokens).logits, model(tokens).logits)


@pytest.mark.gpu
@pytest.mark.parametrize("name", TINY)
def test_cuda_matches_cpu(name):
    spec = memforge.preset(name)
    model = memforge.build_model(spec)
    tokens = _tokens(spec, (2, 37))
    expected = model(tokens).logits
    got = model.to("cuda")(tokens.cuda()).logits.cpu()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_tokens_on_another_device_than_the_model_are_refused():
    model = memforge.build_model(memforge.preset("baseline.transformer_tiny")).to("meta")
    with pytest.raises(InputError, match="tokens are on cpu but the model is on meta"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_value_checks_run_on_cpu_tensors_and_elsewhere_only_when_asked():
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    assert checks_values(cpu) and not checks_values(meta)
    with device_value_checks():
        assert checks_values(meta)
        with device_value_checks(False):
            assert not checks_values(meta)
        assert checks_values(meta)
    assert not checks_values(meta)


def test_forward_off_the_cpu_reads_no_values():
    """A meta tensor has no values: reading one raises, so a forward on meta proves no check does."""
    model = memforge.build_model(memforge.preset("baseline.transformer_tiny")).to("meta")
    tokens = torch.zeros(2, 9, dtype=torch.long, device="meta")
    out = model(tokens, labels=tokens)
    assert out.logits.shape == (2, 9, model.vocab_size) and out.loss.shape == ()
    with device_value_checks(), pytest.raises((RuntimeError, NotImplementedError)):
        model(tokens)
    # The memory layer's finiteness check is gated the same way.
    memory = memforge.build_model(memforge.preset("titans.lmm_tiny")).blocks[0].memory
    hidden = torch.zeros(1, 3, memory.dim, device="meta")
    memory._check_input(hidden)
    with device_value_checks(), pytest.raises((RuntimeError, NotImplementedError)):
        memory._check_input(hidden)


@pytest.mark.gpu
@pytest.mark.parametrize("name", TINY)
def test_cuda_forward_never_synchronises(name):
    """``torch.cuda.set_sync_debug_mode("error")`` raises at any host-device synchronisation."""
    spec = memforge.preset(name)
    model = memforge.build_model(spec).cuda()
    tokens = _tokens(spec, (2, 37)).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(tokens, labels=tokens)
        out = model(tokens[:, :5], out.state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.logits.shape == (2, 5, spec.vocab_size)
