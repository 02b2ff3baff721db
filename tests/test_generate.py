"""Generation as HF ``generate`` users expect it: top-p, a stop token, checked arguments, the
``labels=`` loss, and ``memforge generate`` on a byte-level text run."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import memforge
from memforge import decoding
from memforge.cli import main
from memforge.errors import InputError
from memforge.sampling import keep_top_p, sample_next
from memforge.training import TrainConfig, train

TINY = ["baseline.transformer_tiny", "titans.lmm_tiny", "titans.mac_tiny"]


def _model(name: str = "titans.lmm_tiny", seed: int = 0):
    torch.manual_seed(seed)
    return memforge.build_model(memforge.preset(name)).eval()


def _tokens(vocab: int, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- top-p -------------------------------------------------------------------------------------

@settings(max_examples=50)
@given(seed=st.integers(0, 2**16), top_p=st.floats(0.01, 1.0), vocab=st.integers(2, 40))
def test_top_p_keeps_the_smallest_most_likely_set_reaching_p(seed: int, top_p: float, vocab: int) -> None:
    logits = torch.randn(3, vocab, generator=_seeded(seed)) * 3
    kept = keep_top_p(logits, top_p).isfinite()
    probs = logits.softmax(-1)
    for row in range(3):
        order = probs[row].argsort(descending=True, stable=True)
        count = int(kept[row].sum())
        assert kept[row, order[:count]].all()  # a prefix of the ranking
        assert float(probs[row, order[:count]].sum()) >= top_p - 1e-6  # reaches p
        assert float(probs[row, order[:count - 1]].sum()) < top_p + 1e-6  # and is the smallest
    assert torch.equal(keep_top_p(logits, top_p)[kept], logits[kept])


@settings(max_examples=20)
@given(seed=st.integers(0, 2**16), top_p=st.floats(0.05, 0.95))
def test_sampled_tokens_lie_in_the_nucleus(seed: int, top_p: float) -> None:
    logits = torch.randn(64, 30, generator=_seeded(seed)) * 2
    drawn = sample_next(logits, temperature=1.0, top_p=top_p, generator=_seeded(seed + 1))
    assert keep_top_p(logits, top_p).gather(-1, drawn).isfinite().all()


@pytest.mark.parametrize("name", TINY)
def test_top_p_near_zero_is_greedy(name: str) -> None:
    model = _model(name)
    prompt = _tokens(model.vocab_size, (3, 6))
    greedy = model.generate(prompt, 8, temperature=0)
    for seed in range(3):
        sampled = model.generate(prompt, 8, temperature=1.3, top_p=1e-6, generator=_seeded(seed))
        assert torch.equal(sampled, greedy)


def test_top_p_one_is_plain_sampling() -> None:
    model = _model()
    prompt = _tokens(model.vocab_size, (3, 6))
    plain = model.generate(prompt, 10, temperature=0.9, generator=_seeded(4))
    nucleus = model.generate(prompt, 10, temperature=0.9, top_p=1.0, generator=_seeded(4))
    assert torch.equal(nucleus, plain)
    # and a real nucleus does change what is drawn somewhere
    narrow = model.generate(prompt, 10, temperature=0.9, top_p=0.3, generator=_seeded(4))
    assert not torch.equal(narrow, plain)


# -- stop token --------------------------------------------------------------------------------

def _stopped(unstopped: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """What stopping at ``stop`` must make of an unstopped generation (the docstring's rule)."""
    rows, ends = unstopped.clone(), []
    for row in rows:
        hits = (row[start:] == stop).nonzero()
        end = start + int(hits[0]) + 1 if len(hits) else len(row)
        row[end:] = stop
        ends.append(end)
    return rows[:, :max(ends)]


@pytest.mark.parametrize("name", TINY)
def test_each_sequence_stops_at_the_stop_token(name: str) -> None:
    model = _model(name)
    prompt = _tokens(model.vocab_size, (3, 5), seed=1)
    unstopped = model.generate(prompt, 12, temperature=0)
    for stop in (int(unstopped[0, 7]), int(unstopped[1, 5]), int(unstopped[2, -1])):
        got = model.generate(prompt, 12, temperature=0, stop_token=stop)
        assert torch.equal(got, _stopped(unstopped, 5, stop))


def test_generation_ends_when_every_sequence_has_stopped() -> None:
    model = _model()
    prompt = _tokens(model.vocab_size, (1, 4))
    unstopped = model.generate(prompt, 10, temperature=0)
    stop = int(unstopped[0, 6])
    got = model.generate(prompt, 10, temperature=0, stop_token=stop)
    assert got.shape[1] < unstopped.shape[1] and int(got[0, -1]) == stop


def test_sampling_with_a_stop_token_draws_as_without_until_it_stops() -> None:
    model = _model("titans.mac_tiny")
    prompt = _tokens(model.vocab_size, (2, 7))
    plain = model.generate(prompt, 15, temperature=1.0, top_k=20, generator=_seeded(3))
    stop = int(plain[0, 10])
    got = model.generate(prompt, 15, temperature=1.0, top_k=20, stop_token=stop, generator=_seeded(3))
    assert torch.equal(got, _stopped(plain, 7, stop))


def test_compiled_decoding_samples_and_stops_like_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile=True`` shares the sampling and stopping loop; the step is compiled with
    ``aot_eager`` here (Inductor's own agreement is ``test_static_decoding``'s, and costs more)."""
    monkeypatch.setattr(decoding, "compiled_decode_step", functools.cache(
        lambda: torch.compile(decoding.decode_step, dynamic=False, backend="aot_eager")))
    torch._dynamo.reset()
    model = _model("baseline.transformer_tiny")
    prompt = _tokens(model.vocab_size, (2, 6))
    settings_ = {"temperature": 0.8, "top_p": 0.9, "top_k": 30}
    eager = model.generate(prompt, 10, generator=_seeded(2), **settings_)
    stop = int(eager[1, 9])
    eager = model.generate(prompt, 10, stop_token=stop, generator=_seeded(2), **settings_)
    compiled = model.generate(prompt, 10, stop_token=stop, generator=_seeded(2), compile=True,
                              **settings_)
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()


# -- argument checks ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 0, got 2.5"),
        ({"max_new_tokens": math.nan}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0, got -1"),
        ({"max_new_tokens": "5"}, "max_new_tokens must be an integer"),
        ({"temperature": math.nan}, "temperature must be a finite number >= 0"),
        ({"temperature": math.inf}, "temperature must be a finite number"),
        ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
        ({"temperature": "hot"}, "temperature must be a finite number"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"top_k": 2.0}, "top_k must be an integer >= 1"),
        ({"top_k": math.nan}, "top_k must be an integer"),
        ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": math.nan}, r"top_p must be a number in \(0, 1\]"),
        ({"stop_token": 64}, r"stop_token must be a token id in \[0, 63\]"),
        ({"stop_token": -1}, r"stop_token must be a token id"),
        ({"stop_token": 3.0}, r"stop_token must be a token id"),
        ({"generator": 7}, "generator must be a torch.Generator"),
        ({"compile": "yes"}, "compile must be True or False"),
        ({"prompt": torch.zeros(0, 4, dtype=torch.long)}, "empty batch"),
        ({"prompt": torch.zeros(2, 0, dtype=torch.long)}, "no time steps"),
        ({"prompt": torch.zeros(2, 3)}, "must be integer ids"),
        ({"prompt": torch.zeros(3, dtype=torch.long)}, r"shape \[batch, time\]"),
        ({"prompt": [[1, 2]]}, "must be a torch.LongTensor"),
        ({"prompt": torch.full((1, 3), 64)}, "token id 64 is out of range"),
    ],
)
def test_bad_generate_arguments_get_one_line_errors(changes: dict, message: str) -> None:
    model = _model()
    arguments = {"prompt": torch.zeros(2, 3, dtype=torch.long), "max_new_tokens": 2, **changes}
    with pytest.raises(InputError, match=message) as info:
        model.generate(arguments.pop("prompt"), arguments.pop("max_new_tokens"), **arguments)
    assert "\n" not in str(info.value)


# -- labels= -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_labels_loss_is_the_shifted_cross_entropy(name: str) -> None:
    model = _model(name)
    tokens = _tokens(model.vocab_size, (2, 13))
    labels = tokens.clone()
    labels[0, :4] = -100
    labels[1, 9] = -100
    out = model(tokens, labels=labels)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, model.vocab_size), labels[:, 1:].reshape(-1),
                           ignore_index=-100)
    torch.testing.assert_close(out.loss, want, rtol=0, atol=0)
    assert out.loss.dtype == torch.float32 and model(tokens).loss is None
    out.loss.backward()
    assert model.head.weight.grad is not None


def test_labels_loss_under_float64_is_float32_of_the_same_value() -> None:
    model = memforge.build_model(memforge.preset("titans.lmm_tiny"), dtype=torch.float64)
    tokens = _tokens(model.vocab_size, (1, 9))
    out = model(tokens, labels=tokens)
    want = F.cross_entropy(out.logits[0, :-1], tokens[0, 1:])
    torch.testing.assert_close(out.loss, want.float())


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.zeros(2, 4), "labels must be integer token ids"),
        ([[1, 2]], "labels must be integer token ids"),
        (torch.zeros(2, 5, dtype=torch.long), r"labels must have the shape of tokens, \[2, 4\]"),
        (torch.full((2, 4), 64), "label 64 is out of range for vocab_size=64"),
        (torch.full((2, 4), -5), "label -5 is out of range"),
    ],
)
def test_bad_labels_get_one_line_errors(labels, message: str) -> None:
    model = _model()
    with pytest.raises(InputError, match=message):
        model(torch.zeros(2, 4, dtype=torch.long), labels=labels)


def test_a_single_token_has_no_label_to_predict() -> None:
    with pytest.raises(InputError, match="labels need at least 2 time steps"):
        _model()(torch.zeros(2, 1, dtype=torch.long), labels=torch.zeros(2, 1, dtype=torch.long))


# -- memforge generate -------------------------------------------------------------------------

def _tiny_run(out: Path, task: str, options: dict) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(model="baseline.transformer_tiny", overrides=("vocab_size=256",), task=task,
                          task_options=options, steps=2, batch_size=4, warmup_steps=1,
                          eval_every=2, eval_batches=1, device="cpu", out=out, progress=False))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("text")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (corpus / name).write_text(f"{name}: the quick brown fox jumps over the lazy dog. " * 20)
    return _tiny_run(root / "run", "text", {"paths": [str(corpus)], "seq_len": 32,
                                            "validation_fraction": 0.4})


def test_generate_prints_the_continuation(text_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = "the quick brown "
    assert main(["generate", str(text_run), "--prompt", prompt, "--max-new-tokens", "24", "--seed", "3",
                 "--temperature", "0.7", "--top-p", "0.9", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    model = memforge.load_model(text_run)
    tokens = torch.tensor([list(prompt.encode())])
    want = model.generate(tokens, 24, temperature=0.7, top_p=0.9, stop_token=0, generator=_seeded(3))
    continuation = bytes(want[0, tokens.shape[1]:].tolist()).split(b"\0")[0]
    assert printed == continuation.decode("utf-8", errors="replace") + "\n"


def test_generate_refuses_a_run_that_is_not_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _tiny_run(tmp_path / "run", "mqar", {"vocab_size": 256, "seq_len": 32, "num_pairs": 4})
    assert main(["generate", str(run), "--prompt", "hello"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("memforge: error: memforge generate continues text, but this run was "
                            "trained on task 'mqar'") and error.count("\n") == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "x", "--temperature", "nan"], "temperature must be a finite number"),
        (["--prompt", "x", "--top-p", "0"], r"top_p must be a number in \(0, 1\]"),
        (["--prompt", "x", "--max-new-tokens", "-3"], "max_new_tokens must be an integer >= 0"),
        (["--prompt", "x", "--seed", "-1"], r"--seed must lie in \[0, 2\*\*63\)"),
    ],
)
def test_generate_cli_errors_are_one_line(text_run: Path, capsys: pytest.CaptureFixture[str],
                                          arguments: list[str], message: str) -> None:
    assert main(["generate", str(text_run), "--device", "cpu", *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("memforge: error: ") and error.count("\n") == 1
    assert re.search(message, error)


def test_generate_cli_on_a_saved_model_says_why_not(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    saved = memforge.save_model(_model(), tmp_path / "saved")
    assert main(["generate", str(saved), "--prompt", "x"]) == 2
    assert "is not part of a training run" in capsys.readouterr().err


def test_generate_is_listed_among_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "generate" in capsys.readouterr().out
