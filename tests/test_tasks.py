"""Tests for memforge.tasks: determinism, shapes, task semantics, the text corpus and the registry."""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memforge.tasks import (
    IGNORE_INDEX,
    MQAR,
    TASKS,
    BabilongQA1,
    NeedleInHaystack,
    Task,
    TextCorpus,
    babilong,
    make_task,
    niah,
    parse_task_options,
    task_options,
)

FAST = settings(deadline=None, max_examples=20)
SYNTHETIC = [
    MQAR(seq_len=64, num_pairs=4),
    NeedleInHaystack(seq_len=64),
    NeedleInHaystack(variant="repeat", seq_len=64),
    NeedleInHaystack(variant="uuid", seq_len=96),
    BabilongQA1(seq_len=96),
]


@functools.cache
def stdlib_corpus() -> TextCorpus:
    """The default corpus, read once per test session."""
    return TextCorpus(seq_len=64)


def check_batch(task: Task, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> None:
    """Shapes, dtypes and token ranges every task must meet."""
    assert inputs.shape == targets.shape == (batch_size, task.seq_len)
    assert inputs.dtype == targets.dtype == torch.long
    assert int(inputs.min()) >= 0 and int(inputs.max()) < task.vocab_size
    scored = targets[targets != IGNORE_INDEX]
    assert scored.numel() > 0
    assert int(scored.min()) >= 0 and int(scored.max()) < task.vocab_size


# --- shared contract -------------------------------------------------------------------------


@pytest.mark.parametrize("task", SYNTHETIC, ids=lambda t: f"{t.name}-{getattr(t, 'variant', '')}")
def test_synthetic_task_contract(task: Task) -> None:
    assert isinstance(task, Task)
    json.dumps(task.describe())
    assert task.describe()["task"] == task.name
    batch = task.batch(8, seed=3)
    check_batch(task, *batch, batch_size=8)
    again = task.batch(8, seed=3)
    assert torch.equal(batch.inputs, again.inputs) and torch.equal(batch.targets, again.targets)
    for other in (task.batch(8, seed=4), task.batch(8, seed=3, split="validation")):
        assert not torch.equal(batch.inputs, other.inputs)
    assert not torch.equal(
        task.batch(8, seed=3, split="validation").inputs, task.batch(8, seed=3, split="test").inputs
    )


@FAST
@given(index=st.integers(0, len(SYNTHETIC) - 1), seed=st.integers(0, 2**40), size=st.integers(1, 6))
def test_determinism_property(index: int, seed: int, size: int) -> None:
    task = SYNTHETIC[index]
    first, second = task.batch(size, seed=seed), task.batch(size, seed=seed)
    assert torch.equal(first.inputs, second.inputs) and torch.equal(first.targets, second.targets)
    check_batch(task, *first, batch_size=size)
    # Train seed s+10 must not replay test seed s (Zoology's seed+10 scheme would).
    assert not torch.equal(
        task.batch(size, seed=seed + 10).inputs, task.batch(size, seed=seed, split="test").inputs
    )


def test_global_rng_untouched() -> None:
    state = torch.random.get_rng_state()
    for task in SYNTHETIC:
        task.batch(2, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda t: t.batch(0, seed=0), "batch_size=0"),
        (lambda t: t.batch(2, seed=0, split="dev"), "split='dev'"),
        (lambda t: t.batch(2, seed="0"), "seed='0'"),
    ],
)
def test_bad_batch_arguments(call, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        call(MQAR())


# --- MQAR ------------------------------------------------------------------------------------


@st.composite
def mqar_configs(draw: st.DrawFn) -> MQAR:
    num_pairs = draw(st.integers(1, 12))
    seq_len = 2 * draw(st.integers(2 * num_pairs, 2 * num_pairs + 40))
    vocab = draw(st.integers(2 * num_pairs + 2, 300))
    space = (seq_len - 2 * num_pairs) // 2
    distance = draw(st.integers(0, 2 * (space - num_pairs) + 2))
    return MQAR(
        vocab_size=vocab,
        seq_len=seq_len,
        num_pairs=num_pairs,
        power_a=draw(st.sampled_from([0.01, 0.5, 1.0])),
        random_non_queries=draw(st.booleans()),
        min_query_distance=distance,
    )


@FAST
@given(task=mqar_configs(), seed=st.integers(0, 2**32))
def test_mqar_labels_are_the_paired_values(task: MQAR, seed: int) -> None:
    inputs, targets = task.batch(4, seed=seed)
    check_batch(task, inputs, targets, batch_size=4)
    n, half = task.num_pairs, task.vocab_size // 2
    for row, labels in zip(inputs.tolist(), targets.tolist(), strict=True):
        keys, values = row[0 : 2 * n : 2], row[1 : 2 * n : 2]
        assert len(set(keys)) == n and all(1 <= k < half for k in keys)
        assert len(set(values)) == n and all(half <= v < task.vocab_size for v in values)
        scored = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
        assert len(scored) == n
        queried = set()
        for t in scored:
            assert t >= 2 * n and (t - 2 * n) % 2 == 0
            j = keys.index(row[t])
            assert labels[t] == values[j]
            assert t - 2 * j >= task.min_query_distance
            queried.add(j)
        assert queried == set(range(n))  # every key is queried exactly once
        if not task.random_non_queries:
            assert all(row[t] == 0 for t in range(2 * n, task.seq_len) if t not in scored)


def test_mqar_power_law_favours_short_gaps() -> None:
    task = MQAR(seq_len=256, num_pairs=8)
    _, targets = task.batch(256, seed=0)
    positions = (targets != IGNORE_INDEX).nonzero()[:, 1].float()
    middle = 16 + (256 - 16) / 2
    assert (positions < middle).float().mean() > 0.6  # uniform gaps would give ~0.5


def test_mqar_min_query_distance_beyond_a_window() -> None:
    task = MQAR(seq_len=256, num_pairs=8, min_query_distance=64)
    inputs, targets = task.batch(64, seed=1)
    keys = inputs[:, 0:16:2]
    for b, t in (targets != IGNORE_INDEX).nonzero().tolist():
        j = keys[b].tolist().index(int(inputs[b, t]))
        assert t - 2 * j >= 64


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"num_pairs": 40},
            r"mqar: num_pairs=40 needs 4\*num_pairs <= seq_len=128; lower num_pairs or raise seq_len",
        ),
        ({"seq_len": 127}, "seq_len=127 must be even"),
        ({"vocab_size": 16, "num_pairs": 8, "seq_len": 64}, r"num_pairs=8 needs num_pairs <= vocab_size//2"),
        ({"min_query_distance": 500}, r"min_query_distance=500 is impossible .* \(largest possible: 98\)"),
        ({"power_a": 0.0}, r"power_a=0.0 must be in \(0.0, inf\)"),
        ({"num_pairs": 0}, "num_pairs=0 must be >= 1"),
    ],
)
def test_mqar_config_errors(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MQAR(**options)


def test_mqar_type_errors() -> None:
    with pytest.raises(TypeError, match="num_pairs='8' must be an int"):
        MQAR(num_pairs="8")
    with pytest.raises(TypeError, match="random_non_queries='no' must be a bool"):
        MQAR(random_non_queries="no")


# --- S-NIAH ----------------------------------------------------------------------------------


@st.composite
def niah_configs(draw: st.DrawFn) -> NeedleInHaystack:
    key_len, value_len = draw(st.integers(1, 4)), draw(st.integers(1, 40))
    seq_len = 2 * (2 + key_len + value_len) + draw(st.integers(0, 300))
    depth = draw(st.none() | st.floats(0.0, 1.0))
    return NeedleInHaystack(
        variant=draw(st.sampled_from(niah.VARIANTS)),
        vocab_size=draw(st.integers(niah.FIRST_WORD + 2, 300)),
        seq_len=seq_len,
        depth=depth,
        key_len=key_len,
        value_len=value_len,
        pattern_len=draw(st.integers(1, 20)),
    )


@FAST
@given(task=niah_configs(), seed=st.integers(0, 2**32))
def test_niah_needle_and_answer(task: NeedleInHaystack, seed: int) -> None:
    inputs, targets = task.batch(3, seed=seed)
    check_batch(task, inputs, targets, batch_size=3)
    m, r, hay = task.key_len, task.value_len, task.haystack_len
    radix = 16 if task.variant == "uuid" else 10
    for row, labels in zip(inputs.tolist(), targets.tolist(), strict=True):
        assert row.count(niah.MARK) == 1
        p = row.index(niah.MARK)
        if task.depth is not None:
            assert abs(p - task.depth * hay) <= 0.5
        key, value = row[p + 1 : p + 1 + m], row[p + 2 + m : p + 2 + m + r]
        assert row[p + 1 + m] == niah.SEP
        assert all(niah.FIRST_DIGIT <= v < niah.FIRST_DIGIT + radix for v in value)
        q = hay + 2 + m + r  # QUERY follows the haystack and needle
        assert row[q] == niah.QUERY and row[q + 1 : q + 1 + m] == key and row[q + 1 + m] == niah.SEP
        scored = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
        assert scored == list(range(task.seq_len - r, task.seq_len))
        assert [labels[t] for t in scored] == value
        assert row[q + 2 + m :] == value[:-1]  # teacher forcing: targets are the shifted stream
        haystack = row[:p] + row[p + 2 + m + r : q]
        assert len(haystack) == hay and all(t >= niah.FIRST_WORD for t in haystack)


def test_niah_repeat_haystack_is_fixed_and_defaults() -> None:
    task = NeedleInHaystack(variant="repeat", seq_len=128, depth=1.0)
    a, b = task.batch(2, seed=0).inputs, task.batch(1, seed=9, split="test").inputs
    hay = task.haystack_len
    assert torch.equal(a[0, :hay], a[1, :hay]) and torch.equal(a[0, :hay], b[0, :hay])
    assert NeedleInHaystack().value_len == 7 and NeedleInHaystack(variant="uuid").value_len == 32


def test_niah_long_sequences_are_cheap() -> None:
    task = attrs.evolve(NeedleInHaystack(seq_len=512), seq_len=8 * 4096, depth=0.25)
    inputs, targets = task.batch(4, seed=0)
    assert inputs.shape == (4, 8 * 4096)
    assert ((targets != IGNORE_INDEX).sum(dim=1) == task.value_len).all()


def test_niah_config_errors() -> None:
    with pytest.raises(ValueError, match=r"seq_len=20 is too short .* at least 22"):
        NeedleInHaystack(seq_len=20)
    with pytest.raises(ValueError, match=r"depth=1.5 must be in \[0.0, 1.0\]"):
        NeedleInHaystack(depth=1.5)
    with pytest.raises(ValueError, match="variant='essay' must be one of"):
        NeedleInHaystack(variant="essay")


# --- BABILong qa1 ----------------------------------------------------------------------------


@st.composite
def qa1_configs(draw: st.DrawFn) -> BabilongQA1:
    min_facts = draw(st.integers(1, 6))
    max_facts = draw(st.integers(min_facts, 12))
    people, verbs, places = draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(2, 7))
    first_filler = babilong.FIRST_PERSON + people + verbs + places
    return BabilongQA1(
        vocab_size=draw(st.integers(first_filler + 1, 300)),
        seq_len=5 * max_facts + 4 + draw(st.integers(0, 300)),
        min_facts=min_facts,
        max_facts=max_facts,
        num_people=people,
        num_verbs=verbs,
        num_locations=places,
        sentence_len=draw(st.integers(2, 12)),
    )


@FAST
@given(task=qa1_configs(), seed=st.integers(0, 2**32))
def test_qa1_answer_is_last_location(task: BabilongQA1, seed: int) -> None:
    inputs, targets = task.batch(4, seed=seed)
    check_batch(task, inputs, targets, batch_size=4)
    first_verb = babilong.FIRST_PERSON + task.num_people
    first_place = first_verb + task.num_verbs
    for row, labels in zip(inputs.tolist(), targets.tolist(), strict=True):
        assert row[-4:-1] == [babilong.WHERE, babilong.IS, row[-2]] and row[-1] == babilong.QMARK
        person = row[-2]
        scored = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
        assert scored == [task.seq_len - 1]
        # People occur only as the first token of a fact, so facts are found by scanning for them.
        context = row[:-4]
        starts = [t for t, tok in enumerate(context) if babilong.FIRST_PERSON <= tok < first_verb]
        assert task.min_facts <= len(starts) <= task.max_facts
        facts = [context[t : t + 5] for t in starts]
        for fact in facts:
            assert first_verb <= fact[1] < first_place and fact[2] == babilong.TO
            assert first_place <= fact[3] < first_place + task.num_locations
            assert fact[4] == babilong.PERIOD
        assert all(t == 0 or context[t - 1] == babilong.PERIOD for t in starts)  # at sentence starts
        last = [fact[3] for fact in facts if fact[0] == person]
        assert last and labels[-1] == last[-1]


def test_qa1_config_errors() -> None:
    with pytest.raises(ValueError, match=r"seq_len=40 cannot hold max_facts=10 .* needs 5\*max_facts\+4=54"):
        BabilongQA1(seq_len=40)
    with pytest.raises(ValueError, match="min_facts=5 must be <= max_facts=3"):
        BabilongQA1(min_facts=5, max_facts=3)
    with pytest.raises(ValueError, match="vocab_size=20 leaves no filler words"):
        BabilongQA1(vocab_size=20)


# --- text corpus -----------------------------------------------------------------------------


def write_files(root: Path, count: int) -> list[Path]:
    """``count`` small distinct text files in nested folders under ``root``."""
    paths = []
    for i in range(count):
        path = root / f"dir{i % 3}" / f"file{i}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"file {i}: " + "the quick brown fox jumps over the lazy dog. " * (i + 2))
        paths.append(path)
    return paths


@settings(deadline=None, max_examples=15)
@given(count=st.integers(2, 12), fraction=st.floats(0.05, 0.95))
def test_text_split_by_file(count: int, fraction: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_files(Path(tmp), count)
        corpus = TextCorpus(paths=(tmp,), seq_len=8, validation_fraction=fraction)
        train, validation = corpus.split_files("train"), corpus.split_files("validation")
        assert train and validation and not set(train) & set(validation)
        assert sorted(train + validation) == sorted(f"dir{i % 3}/file{i}.txt" for i in range(count))
        # The split depends on relative paths only, not on where the folder lives.
        assert TextCorpus(paths=(tmp + os.sep,), validation_fraction=fraction).split_files("train") == train


def test_text_batches_are_windows_of_the_split(tmp_path: Path) -> None:
    write_files(tmp_path, 6)
    corpus = TextCorpus(paths=(str(tmp_path),), seq_len=16)
    for split in ("train", "validation"):
        blob = b"".join((tmp_path / rel).read_bytes() + b"\0" for rel in corpus.split_files(split))
        inputs, targets = corpus.batch(5, seed=2, split=split)
        check_batch(corpus, inputs, targets, batch_size=5)
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for x, y in zip(inputs.tolist(), targets.tolist(), strict=True):
            assert bytes(x + y[-1:]) in blob
    again = corpus.batch(5, seed=2)
    assert torch.equal(again.inputs, corpus.batch(5, seed=2).inputs)
    assert not torch.equal(again.inputs, corpus.batch(5, seed=3).inputs)


def test_text_eval_windows(tmp_path: Path) -> None:
    write_files(tmp_path, 8)
    corpus = TextCorpus(paths=(str(tmp_path),), seq_len=10, validation_fraction=0.5)
    data = b"".join((tmp_path / rel).read_bytes() + b"\0" for rel in corpus.split_files("validation"))
    batches = list(corpus.iter_eval_batches(4))
    rows = torch.cat([b.inputs for b in batches])
    assert all(b.inputs.shape[0] <= 4 for b in batches)
    assert rows.shape[0] == (len(data) - 1) // 10
    stream = torch.cat([torch.cat([b.inputs[:, :1], b.targets], dim=1) for b in batches])
    for i, row in enumerate(stream.tolist()):
        assert bytes(row) == data[i * 10 : i * 10 + 11]  # sequential, one shared byte
    assert len(list(corpus.iter_eval_batches(4, max_batches=1))) == 1
    assert torch.equal(next(corpus.iter_eval_batches(4)).inputs, batches[0].inputs)


def test_text_fingerprint(tmp_path: Path) -> None:
    files = write_files(tmp_path, 4)
    first = TextCorpus(paths=(str(tmp_path),)).describe()
    assert first["fingerprint"] == TextCorpus(paths=(str(tmp_path),)).describe()["fingerprint"]
    assert first["num_files"] == 4 and first["num_bytes"] == sum(len(p.read_bytes()) for p in files)
    json.dumps(first)
    files[0].write_text("changed")
    assert TextCorpus(paths=(str(tmp_path),)).fingerprint != first["fingerprint"]


def test_text_path_kinds(tmp_path: Path) -> None:
    files = write_files(tmp_path, 5)
    (tmp_path / "dir0" / "blob.bin").write_bytes(b"\0\1\2" * 10)
    by_folder = TextCorpus(paths=(str(tmp_path),))
    by_glob = TextCorpus(paths=(str(tmp_path / "**" / "*.txt"),))
    by_files = TextCorpus(paths=tuple(str(p) for p in files))
    assert by_folder.fingerprint == by_glob.fingerprint == by_files.fingerprint  # binary skipped
    assert make_task("text", paths=str(tmp_path)).paths == (str(tmp_path),)


def test_text_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "a.bin").write_bytes(b"\0" * 10)
    (tmp_path / "one.txt").write_text("hello world")
    cases = [
        ((str(tmp_path / "missing"),), "does not exist"),
        ((str(tmp_path / "empty"),), "has no text files"),
        ((str(tmp_path / "binary"),), "has no text files"),
        ((str(tmp_path / "nothing*.txt"),), "has no text files"),
        ((str(tmp_path / "binary" / "a.bin"),), "looks binary"),
        ((str(tmp_path / "one.txt"),), "needs at least 2"),
    ]
    for paths, match in cases:
        with pytest.raises(ValueError, match=match):
            TextCorpus(paths=paths).batch(1, seed=0)
    write_files(tmp_path / "ok", 3)
    corpus = TextCorpus(paths=(str(tmp_path / "ok"),), seq_len=10_000)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        corpus.batch(1, seed=0)
    with pytest.raises(ValueError, match="split='test' is not available"):
        corpus.batch(1, seed=0, split="test")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        corpus.iter_eval_batches(2)  # raised at the call, not at the first next()
    with pytest.raises(ValueError, match=r"validation_fraction=1.0 must be in \(0.0, 1.0\)"):
        TextCorpus(validation_fraction=1.0)


def test_stdlib_corpus() -> None:
    corpus = stdlib_corpus()
    info = corpus.describe()
    assert info["source"] == "stdlib" and info["num_files"] > 100
    assert info["train_files"] > info["validation_files"] > 0
    assert not any("site-packages" in f or f.startswith("test/") for f in corpus.split_files("train"))
    batch = corpus.batch(4, seed=0, split="validation")
    check_batch(corpus, *batch, batch_size=4)
    assert torch.equal(batch.inputs, corpus.batch(4, seed=0, split="validation").inputs)
    assert len(list(corpus.iter_eval_batches(8, max_batches=3))) == 3


# --- registry --------------------------------------------------------------------------------


def test_registry_names_and_errors() -> None:
    assert set(TASKS) == {"mqar", "s-niah", "babilong-qa1", "text"}
    for name, cls in TASKS.items():
        assert cls.name == name and isinstance(make_task(name), Task)
    assert make_task("mqar", num_pairs=4, seq_len=64) == MQAR(num_pairs=4, seq_len=64)
    with pytest.raises(
        ValueError, match=r"unknown task 'mqr'; did you mean 'mqar'\? known tasks: mqar, s-niah"
    ):
        make_task("mqr")
    with pytest.raises(ValueError, match=r"no option 'num_pair'; did you mean 'num_pairs'\? valid options"):
        make_task("mqar", num_pair=4)


def test_shared_option_names_have_one_type() -> None:
    seen: dict[str, object] = {}
    for name in TASKS:
        for option, kind in task_options(name).items():
            assert seen.setdefault(option, kind) == kind, option


def test_parse_task_options() -> None:
    parsed = parse_task_options(["num_pairs=8", "seq_len=256", "power_a=0.5", "random_non_queries=off"])
    assert parsed == {"num_pairs": 8, "seq_len": 256, "power_a": 0.5, "random_non_queries": False}
    assert make_task("mqar", **parsed).num_pairs == 8
    assert parse_task_options(["depth=none", "variant=uuid"], task="s-niah") == {
        "depth": None,
        "variant": "uuid",
    }
    assert parse_task_options(["depth=0.25"])["depth"] == 0.25
    assert parse_task_options(["paths=a.txt, b/"], task="text") == {"paths": ("a.txt", "b/")}
    assert parse_task_options(["paths="]) == {"paths": ()}
    errors = [
        (["num_pairs=eight"], "num_pairs='eight' is not an integer"),
        (["power_a=x"], "power_a='x' is not a number"),
        (["random_non_queries=maybe"], "is not a bool"),
        (["num_pairs"], "must look like name=value"),
        (["seq_len=1", "seq_len=2"], "given twice"),
        (["num_pairz=1"], "did you mean 'num_pairs'"),
    ]
    for items, match in errors:
        with pytest.raises(ValueError, match=match):
            parse_task_options(items)
    with pytest.raises(ValueError, match="task 's-niah' has no option 'num_pairs'"):
        parse_task_options(["num_pairs=3"], task="s-niah")
