"""CUDA checks: mixed precision, training, resume and decoding on a GPU (skipped without CUDA).

The CPU suite pins the semantics; these only check that the same code runs on a GPU and agrees
with the CPU where it should.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import memforge
from memforge.engine.chunked import FastWeightState
from memforge.training import TrainConfig, train
from memforge.training.checkpoint import load_checkpoint
from memforge.training.rundir import read_metrics
from tests.test_titans_compiled import split_logits_and_grads

pytestmark = pytest.mark.gpu

TINY_TITANS = ["titans.lmm_tiny", "titans.mac_tiny", "titans.mag_tiny", "titans.mal_tiny"]


def _fast_weight_states(state):
    """Every memory state inside a model state (layer states nest differently per integration)."""
    if isinstance(state, FastWeightState):
        yield state
    elif isinstance(state, (tuple, list)):
        for part in state:
            yield from _fast_weight_states(part)


def _tokens(spec, shape, seed=0) -> torch.Tensor:
    return torch.randint(0, spec.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TINY_TITANS)
def test_memory_stays_float32_under_bf16_autocast(name: str) -> None:
    spec = memforge.preset(name)
    model = memforge.build_model(spec).cuda()
    tokens = _tokens(spec, (2, 45)).cuda()
    reference = model(tokens).logits.float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(tokens)
    fast_states = list(_fast_weight_states(out.state))
    assert fast_states
    assert all(w.dtype == torch.float32 for fast in fast_states for w in fast.weights)
    logits = out.logits.float()
    assert torch.isfinite(logits).all()
    # bf16 projections and attention: close to float32, not equal.
    assert (logits - reference).abs().max() < 0.1 * reference.abs().max() + 0.05


@pytest.mark.parametrize("name", TINY_TITANS)
def test_cuda_decoding_matches_cpu(name: str) -> None:
    spec = memforge.preset(name)
    model = memforge.build_model(spec).eval()
    prompt = _tokens(spec, (2, 21))
    with torch.no_grad():
        on_cpu = model.generate(prompt, 12, temperature=0)
        on_gpu = model.cuda().generate(prompt.cuda(), 12, temperature=0).cpu()
    torch.testing.assert_close(on_gpu, on_cpu)


@pytest.mark.parametrize("name", ["titans.lmm_tiny", "titans.mac_tiny"])
def test_cuda_compiled_static_decoding_matches_eager_decoding(name: str) -> None:
    torch._dynamo.reset()
    spec = memforge.preset(name)
    model = memforge.build_model(spec).eval().cuda()
    prompt = _tokens(spec, (2, 21)).cuda()
    eager = model.generate(prompt, 40, temperature=0)
    compiled = model.generate(prompt, 40, temperature=0, compile=True)
    torch.testing.assert_close(compiled, eager)
    torch._dynamo.reset()


def test_cuda_training_with_autocast_learns_and_resumes(tmp_path: Path) -> None:
    settings = dict(model="titans.lmm_tiny", task="mqar", task_options={"seq_len": 24, "num_pairs": 3},
                    steps=40, batch_size=16, lr=1e-2, warmup_steps=4, eval_every=20, eval_batches=1,
                    device="cuda", progress=False)
    result = train(TrainConfig(out=tmp_path / "run", **settings))
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert next(result.model.parameters()).device.type == "cuda"
    # The checkpoint is device-independent: it loads on the CPU and resumes on the GPU.
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.step == 40
    assert all(t.device.type == "cpu" for t in checkpoint.weights.values())
    extended = train(TrainConfig(out=tmp_path / "run", resume=True, **{**settings, "steps": 50}))
    assert extended.step == 50


@pytest.mark.parametrize("name", ["titans.lmm_tiny", "titans.mac_tiny"])
def test_compiled_steps_on_cuda_match_eager(name: str) -> None:
    # Inductor makes Triton kernels here, not the CPU's C++: the same agreement must hold.
    spec = memforge.preset(name, retrieval="titans.after_write")
    torch.manual_seed(0)
    eager = memforge.build_model(spec).cuda()
    compiled_model = memforge.build_model(spec).cuda()
    compiled_model.load_state_dict(eager.state_dict())
    forward = memforge.compile_model(compiled_model)
    tokens = _tokens(spec, (2, 37)).cuda()
    for got, want in zip(split_logits_and_grads(forward, compiled_model, tokens),
                         split_logits_and_grads(eager, eager, tokens), strict=True):
        assert (got - want).norm() <= 1e-4 * want.norm() + 1e-6, (got - want).abs().max()
