"""memforge.inspect: what inspected memory layers record, that recording changes nothing, the trace
file and the ``memforge inspect`` command (docs/inspect.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import attrs
import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memforge
from memforge.cli import main
from memforge.engine.reference import chunk_start_reference
from memforge.errors import InputError
from memforge.inspect import TRACE_SCHEMA, recording, retrieval_checks, trace_json
from memforge.inspect.export import DERIVED_SERIES
from memforge.interfaces import INSPECT_SERIES, InspectsMemory
from memforge.plugins import load_plugins
from memforge.tasks import MQAR

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "plugin_example"))
import memforge_example_plugin  # noqa: E402  (the example package, from the source tree)

sys.path.pop(0)
EXAMPLE = load_plugins(autoload=False, extra=[memforge_example_plugin])


def _model(name: str, *, dtype: torch.dtype = torch.float64, chunk_size: int | None = None):
    """Preset ``name`` built with fixed weights (the example plugin's presets from its registry)."""
    torch.manual_seed(0)
    registry = EXAMPLE if name.startswith("example.") else None
    spec = (registry.preset(name).build() if registry else memforge.preset(name))
    if chunk_size is not None:
        choice = spec.memory_layer
        spec = attrs.evolve(spec, memory_layer=attrs.evolve(
            choice, config=attrs.evolve(choice.config, chunk_size=chunk_size)))
    return memforge.build_model(spec, registry=registry).to(dtype).eval()


def _layer_inputs(model, tokens):
    """Record the input ``x`` of every memory layer (a forward pre-hook, outside memforge)."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, InspectsMemory):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: seen.setdefault(name, args[0])))
    with recording(model) as trace:
        out = model(tokens)
    for h in handles:
        h.remove()
    return trace, seen, out


# -- Titans: recorded gates equal the ones the layer used ------------------------------------------
def test_titans_series_equal_what_the_layer_used_float64():
    model = _model("titans.lmm_tiny", chunk_size=4)
    tokens = torch.randint(0, model.vocab_size, (2, 11))
    trace, inputs, out = _layer_inputs(model, tokens)
    for layer in trace.layers:
        module, x = layer.layer, inputs[layer.name]
        gates, log_keep = module.optimizer(x), module.retention(x)
        # The same rules on the same normalised input: [B, T, H] -> [B, H, T], bit for bit.
        assert torch.equal(trace.series(layer, "step_size"), gates.lr.transpose(1, 2))
        assert torch.equal(trace.series(layer, "momentum"), gates.momentum.transpose(1, 2))
        # The share forgotten at the token, from the retention's log-decay: 1 - exp(log_keep).
        assert torch.equal(trace.series(layer, "decay"), -torch.expm1(log_keep).transpose(1, 2))

        # Surprise: autograd's gradient norm at the chunk-start weights of the float64 reference.
        rule_inputs, _ = module._rule_inputs(x, None, torch.float64)
        q, k, v, lr, eta, keep = rule_inputs[:6]
        initial = [w.repeat(2, 1, 1) for w in module.memory.initial_weights()]
        surprise, norms = [], []
        for t in range(11):
            start = t - t % 4
            weights = chunk_start_reference(
                module.memory, module.objective, "chunk_start", initial, q[:, :start], k[:, :start],
                v[:, :start], lr[:, :start], eta[:, :start], keep[:, :start], chunk_size=4).weights \
                if start else initial
            leaves = [w.detach().requires_grad_() for w in weights]
            loss = module.objective.loss(module.memory.forward(
                k[:, t:t + 1], lambda i, h, leaves=leaves: h @ leaves[i])[0], v[:, t:t + 1]).sum()
            grads = torch.autograd.grad(loss, leaves)
            surprise.append(sum(g.square().sum((-2, -1)) for g in grads).sqrt())
            after = chunk_start_reference(
                module.memory, module.objective, "chunk_start", initial, q[:, :t + 1], k[:, :t + 1],
                v[:, :t + 1], lr[:, :t + 1], eta[:, :t + 1], keep[:, :t + 1], chunk_size=4).weights
            norms.append(sum(w.square().sum((-2, -1)) for w in after).sqrt())
        expected = torch.stack(surprise, -1).unflatten(0, (2, module.heads)).detach()
        torch.testing.assert_close(trace.series(layer, "surprise"), expected, rtol=1e-10, atol=1e-12)
        expected = torch.stack(norms, -1).unflatten(0, (2, module.heads)).detach()
        torch.testing.assert_close(trace.series(layer, "state_norm"), expected, rtol=1e-10, atol=1e-12)

        # The heads' shares of the output sum to the layer's output.
        y, _ = module(x)
        torch.testing.assert_close(trace.series(layer, "read_output").sum(1), y.detach())
        torch.testing.assert_close(trace.series(layer, "read_norm"),
                                   trace.series(layer, "read_output").norm(dim=-1))
    # read_contribution: the head's share over the norm of its block's output.
    last = trace.layers[-1]
    torch.testing.assert_close(trace.series(last, "read_contribution"),
                               trace.series(last, "read_norm") / trace.block_output_norm(last.block)[:, None])
    assert set(trace.names(last)) == set(INSPECT_SERIES) | set(DERIVED_SERIES)


# -- a second family: the example plugin's gated linear attention ----------------------------------
def test_gla_series_equal_what_the_layer_used_float64():
    model = _model("example.gla_lmm_tiny", chunk_size=4)
    tokens = torch.randint(0, model.vocab_size, (2, 10))
    trace, inputs, out = _layer_inputs(model, tokens)
    assert trace.layers, "example.gla takes part through InspectsMemory"
    for layer in trace.layers:
        module, x = layer.layer, inputs[layer.name]
        _, k, v, g = module._inputs(x)
        assert torch.equal(trace.series(layer, "decay"), -torch.expm1(g))   # alpha = 1 - a_t
        torch.testing.assert_close(trace.series(layer, "read_output").sum(1), module(x)[0].detach())
        # ||S_t||: the float64 token-loop reference's state after each prefix.
        norms = [module.reference_forward(x[:, :t + 1])[1].flatten(2).norm(dim=-1) for t in range(10)]
        torch.testing.assert_close(trace.series(layer, "state_norm"), torch.stack(norms, -1).detach())


# -- recording changes no output bit ---------------------------------------------------------------
@settings(max_examples=6, deadline=None)
@given(preset=st.sampled_from(["titans.lmm_tiny", "titans.mac_tiny", "example.gla_mag_tiny"]),
       length=st.integers(1, 40), split=st.integers(0, 40))
def test_recording_changes_no_output_bit(preset: str, length: int, split: int):
    model = _model(preset, dtype=torch.float32)
    tokens = torch.randint(0, model.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
    cut = max(1, min(split, length - 1))
    with torch.no_grad():
        plain = model(tokens)
        plain_next = model(tokens[:, cut:], model(tokens[:, :cut]).state) if length > 1 else None
        with recording(model) as trace:
            seen = model(tokens)
            seen_next = model(tokens[:, cut:], model(tokens[:, :cut]).state) if length > 1 else None
    assert torch.equal(plain.logits, seen.logits)
    if plain_next is not None:
        assert torch.equal(plain_next.logits, seen_next.logits)
    assert trace.length == length * (2 if length > 1 else 1)
    # Leaving the block takes the recorders and hooks away again.
    for layer in trace.layers:
        assert layer.layer._memory_recorder is None
    assert all(not block._forward_hooks for block in model.blocks)


def test_a_model_without_an_inspectable_memory_is_refused():
    model = memforge.build_model(memforge.preset("baseline.transformer_tiny"))
    with pytest.raises(InputError, match="InspectsMemory"), recording(model):
        pass


# -- the retrieval criterion -----------------------------------------------------------------------
def test_decoding_the_last_hidden_states_gives_the_logits():
    """The decode is linear with the model's own norm scale: decoding h itself gives the logits,
    so the decoded branches (reads among them) sum to them."""
    model = _model("titans.lmm_tiny")
    tokens = torch.randint(0, model.vocab_size, (2, 20))
    with recording(model) as trace:
        logits = model(tokens).logits
    torch.testing.assert_close(trace.decode(trace.hidden), logits.detach())
    assert trace.decoded(trace.layers[0]).shape == (2, 2, 20, model.vocab_size)


@settings(max_examples=20, deadline=None)
@given(target=st.integers(0, 3), boost=st.floats(0.5, 10.0), seed=st.integers(0, 2**16))
def test_a_read_that_favours_the_target_retrieves(target: int, boost: float, seed: int):
    decoded = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    candidates = [10, 11, 12, 13]
    decoded[:, 5, candidates] = 0.0
    decoded[:, 5, candidates[target]] = boost           # every head ranks the target first
    rows = retrieval_checks(decoded, [{"position": 5, "target": candidates[target],
                                       "candidates": candidates}])
    assert rows[0]["retrieved"] and rows[0]["best"] == candidates[target]
    assert rows[0]["target_rank"] == 0 and rows[0]["head_retrieved"] == [True, True]
    assert rows[0]["chance"] == 0.25
    decoded[1, 5, candidates[target]] = -3 * boost      # one head against: the sum decides
    rows = retrieval_checks(decoded, [{"position": 5, "target": candidates[target],
                                       "candidates": candidates}])
    assert rows[0]["head_retrieved"] == [True, False] and not rows[0]["retrieved"]


# -- the trace file and the command ----------------------------------------------------------------
def test_trace_json_matches_its_schema():
    model = _model("titans.lmm_tiny", dtype=torch.float32)
    task = MQAR(vocab_size=model.vocab_size, seq_len=32, num_pairs=4)
    batch = task.batch(2, seed=0, split="test")
    from memforge.inspect.retrieval import mqar_queries

    queries = mqar_queries(batch.inputs[1], batch.targets[1], 4)
    with torch.no_grad(), recording(model) as trace:
        logits = model(batch.inputs).logits
    content = trace_json(trace, sample=1, tokens=batch.inputs[1], source="titans.lmm_tiny",
                         task=task.describe(), queries=queries, logits=logits[1], targets=batch.targets[1])
    jsonschema.validate(json.loads(json.dumps(content)), TRACE_SCHEMA)
    assert content["length"] == 32 and len(content["predictions"]) == 4
    layer = content["layers"][0]
    assert len(layer["series"]["surprise"]) == layer["heads"]
    assert all(len(head) == 32 for head in layer["series"]["surprise"])
    assert layer["retrieval"]["summary"]["queries"] == 4


def _check_outputs(out: Path) -> dict:
    content = json.loads((out / "trace.json").read_text())
    jsonschema.validate(content, TRACE_SCHEMA)
    for png in ("series.png", "summary.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return content


@pytest.mark.slow
@pytest.mark.parametrize("task", [["--task-option", "seq_len=32", "--task-option", "num_pairs=4"],
                                  ["--task", "s-niah", "--task-option", "seq_len=40"]])
def test_inspect_command_writes_the_trace_and_plots(tmp_path: Path, task: list[str]):
    out = tmp_path / "out"
    assert main(["inspect", "titans.lmm_tiny", *task, "--sample", "1", "--out", str(out)]) == 0
    content = _check_outputs(out)
    assert content["marks"]["queries"] and content["marks"]["evidence_spans"]
    assert all("retrieval" in layer for layer in content["layers"])


@pytest.mark.slow
def test_inspect_command_reads_a_text_file(tmp_path: Path):
    text = tmp_path / "note.txt"
    text.write_text("the memory reads this text, byte by byte.")
    out = tmp_path / "out"
    assert main(["inspect", "titans.lmm_tiny", "--set", "vocab_size=256", "--text", str(text),
                 "--out", str(out)]) == 0
    content = _check_outputs(out)
    assert content["length"] == len(text.read_bytes()) and not content["marks"]["queries"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--text", "missing.txt"], "no such file"),
    (["--set", "vocab_size=64", "--text", "README.md"], "vocab_size"),
    (["--task", "mqar", "--task-option", "num_pairz=4"], "num_pairs"),
    (["--sample", "-1"], "--sample"),
])
def test_inspect_command_refuses_bad_input_in_one_line(tmp_path: Path, capsys, argv, message):
    out = tmp_path / "out" / "nested"
    assert main(["inspect", "titans.lmm_tiny", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memforge: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_inspect_command_refuses_a_bad_out_before_building_the_model(tmp_path: Path, capsys,
                                                                     monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was built before --out was checked")

    monkeypatch.setattr(memforge.builder, "build_model", never)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for out in (a_file, Path("/proc/nope")):
        assert main(["inspect", "titans.lmm_tiny", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"memforge: error: --out {out}:") and err.count("\n") == 1


@pytest.mark.slow
def test_presets_of_one_family_get_their_own_default_folders(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for preset in ("titans.lmm_tiny", "titans.mag_tiny"):
        assert main(["inspect", preset, "--task-option", "seq_len=32",
                     "--task-option", "num_pairs=4"]) == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "inspect").iterdir()) == [
        "titans.lmm_tiny-mqar-0", "titans.mag_tiny-mqar-0"]
