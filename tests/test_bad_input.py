"""Bad input, table-driven: every mistake is one line naming the field and the fix, before any write.

Two tables. ``CLI`` cases run ``memforge.cli.main`` in this process (fast) from an empty working
folder and assert exit status 2, one ``memforge: error:`` line holding the expected text, no
traceback, and no file created or changed anywhere in that folder (no run directory, no spec).
``API`` cases call the library and assert the exception type and message. Resume-specific cases
live in ``tests/test_bad_input_resume.py``.

Placeholders in CLI arguments: ``{tmp}`` is the case's working folder (holding the files the case
lists), ``{run}`` a tiny finished training run shared by the module (checked unchanged too).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import pytest
import torch
from memforge_baselines import CausalAttentionConfig, SwiGLUConfig
from memforge_titans.configs import MLPMemoryConfig
from torch import nn

import memforge
from memforge.builder import build_model
from memforge.cli import main
from memforge.errors import InputError, PluginError, SpecError, UnknownNameError
from memforge.io import dumps_spec, load_spec, read_spec_dict, save_spec
from memforge.plugins import as_module, load_plugins
from memforge.saving import ModelFileError
from memforge.spec import apply_overrides, check_spec, from_dict, override, spec_id, to_dict
from memforge.training.config import TrainConfig, TrainingError, resolve_task
from memforge.training.evaluate import EvalConfig

LMM = "titans.lmm_tiny"
MAC = "titans.mac_tiny"
SWA = "baseline.swa_tiny"
TRANSFORMER = "baseline.transformer_tiny"

SPEC_TOML = dumps_spec(memforge.preset(LMM))
SPEC_JSON = dumps_spec(memforge.preset(LMM), "json")


class Cli(NamedTuple):
    """A command line that must fail with status 2 and one line holding ``message``.

    ``files`` are created in the case's folder first (text, bytes written as they are, or a
    ``Path``: a symbolic link to it);
    ``argparse``: the refusal comes from argparse itself (a usage line, then the error);
    ``env``: environment variables set for the call.
    """

    id: str
    argv: tuple[str, ...]
    message: str
    files: dict[str, str | bytes | Path] = {}
    argparse: bool = False
    env: dict[str, str] = {}


def show(overrides: str | list[str], message: str, preset: str = LMM, id: str | None = None) -> Cli:
    """``memforge show PRESET --set ...`` must fail with ``message``."""
    items = [overrides] if isinstance(overrides, str) else overrides
    argv = ("show", preset, *[part for item in items for part in ("--set", item)])
    return Cli(id or f"show-{preset}-{'-'.join(items)}", argv, message)


def spec_file(name: str, text: str | bytes, message: str, id: str) -> Cli:
    """``memforge show FILE`` of a file holding ``text`` must fail with ``message``."""
    return Cli(id, ("show", f"{{tmp}}/{name}"), message, {name: text})


TRAIN = ("train", "--steps", "2", "--batch-size", "4", "--eval-batches", "1", "--out", "{tmp}/out",
         "--no-progress", "--device", "cpu")


def train(*argv: str, message: str, id: str, files: dict[str, str | bytes | Path] | None = None,
          argparse: bool = False) -> Cli:
    """``memforge train`` (tiny defaults, ``--out`` in the case folder) with ``argv`` added; the
    tiny Transformer unless ``argv`` names a ``--spec`` or ``--preset``."""
    model = () if "--spec" in argv or "--preset" in argv else ("--preset", TRANSFORMER)
    return Cli(id, (*TRAIN, *model, *argv), message, files or {}, argparse)


#: The text task reads bytes: a model for it has 256 token ids.
BYTES = ("--task", "text", "--set", "vocab_size=256")


def evaluate(*argv: str, message: str, id: str, argparse: bool = False) -> Cli:
    """``memforge eval {run}`` with ``argv`` added."""
    return Cli(id, ("eval", "{run}", *argv), message, {}, argparse)


def toml_with(old: str, new: str) -> str:
    """The tiny LMM spec as TOML with one line replaced."""
    assert old in SPEC_TOML, old
    return SPEC_TOML.replace(old, new, 1)


CLI: list[Cli] = [
    # Top-level sizes: floats where ints are meant, absurd and empty values.
    show("dim=1e30", "'dim' must be an integer, got 1e+30 (float); write a whole number"),
    show("dim=64.0", "'dim' must be an integer, got 64.0 (float); write a whole number"),
    show("dim=0", "'dim' must be in [1, 65536], got 0"),
    show("dim=-32", "'dim' must be in [1, 65536], got -32"),
    show("dim=100000", "'dim' must be in [1, 65536], got 100000"),
    show("dim=true", "'dim' must be an integer, got True"),
    show('dim="64"', "'dim' must be an integer, got '64'"),
    show("dim=inf", "'dim' must be an integer, got inf"),
    show("vocab_size=1e12", "'vocab_size' must be an integer, got 1000000000000.0 (float)"),
    show("vocab_size=1000000000000", "'vocab_size' must be in [1, 16777216]"),
    show("vocab_size=0", "'vocab_size' must be in [1, 16777216], got 0"),
    show("num_layers=0", "'num_layers' must be in [1, 1024], got 0"),
    show("num_layers=100000", "'num_layers' must be in [1, 1024], got 100000"),
    show("num_layers=2.5", "'num_layers' must be an integer, got 2.5"),
    show("heads=0", "'heads' must be in [1, 1024], got 0"),
    show("heads=5", "'heads'=5 must divide 'dim'=32; pick heads among"),
    show("heads=2000", "'heads' must be in [1, 1024], got 2000"),
    show("heads=32", "needs an even head width for its rotary embedding, but dim=32 / heads=32 = 1; "
                     "use heads among", preset=MAC),
    show(["dim=4096", "vocab_size=16777216"], "the model would have 137B parameters, 137B of them "
         "in the embedding and head (vocab_size=16777216, dim=4096): more than the 10B memforge "
         "builds", preset=TRANSFORMER),
    show(["dim=65536"], "the model would have", preset=TRANSFORMER),
    # The memory network.
    show("memory.expansion=inf", "memory: 'expansion' must be a finite number, got inf"),
    show("memory.expansion=nan", "memory: 'expansion' must be a finite number, got nan"),
    show("memory.expansion=-inf", "memory: 'expansion' must be a finite number, got -inf"),
    show("memory.expansion=-1", "memory: 'expansion' must be > 0, got -1.0"),
    show("memory.expansion=0", "memory: 'expansion' must be > 0, got 0.0"),
    show("memory.expansion=1e9", "memory: 'expansion' must be <= 64, got 1000000000.0"),
    show("memory.expansion=0.01", "memory.expansion=0.01 gives titans.mlp a hidden width of 0 at "
                                  "head width 16 (dim / heads); use memory.expansion >= 0.0625"),
    show("memory.expansion=1" + "0" * 400, "'expansion' must be a finite number, got inf",
         id="show-expansion-int-beyond-float"),
    show('memory.expansion="big"', "'expansion' must be a number, got 'big'"),
    show("memory.depth=2.0", "memory: 'depth' must be an integer, got 2.0 (float); write a whole "
                             "number without a decimal point, e.g. depth=2"),
    show("memory.depth=0", "memory: 'depth' must be >= 1, got 0"),
    show("memory.depth=100", "memory: 'depth' must be <= 64, got 100"),
    show("memory.depth=two", "memory: 'depth' must be an integer, got 'two'"),
    show("memory.activation=tanh", "memory: 'activation' must be one of 'gelu', 'silu', 'relu'; "
                                   "got 'tanh'"),
    show("memory.activation=5", "memory: 'activation' must be a string, got 5"),
    show("memory.residual=2", "memory: 'residual' must be true or false, got 2"),
    show('memory.norm="yes"', "memory: 'norm' must be true or false, got 'yes'"),
    show("memory.dept=3", "unknown key memory.'dept'; did you mean 'depth'?"),
    show("memory.depth.x=3", "unknown key in override 'memory.depth.x'"),
    # Objective, optimizer and retention.
    show("objective.x=1", "unknown key objective.'x'"),
    show("objective=titans.momentum", "'titans.momentum' is an optimizer component, not "
                                      "an objective component"),
    show("optimizer.max_lr=inf", "optimizer: 'max_lr' must be a finite number, got inf"),
    show("optimizer.max_lr=nan", "optimizer: 'max_lr' must be a finite number, got nan"),
    show("optimizer.max_lr=0", "optimizer: 'max_lr' must be > 0, got 0.0"),
    show("optimizer.max_lr=2", "optimizer: 'max_lr' must be <= 1, got 2.0"),
    show("optimizer.max_lr=1e300", "optimizer: 'max_lr' must be <= 1, got 1e+300"),
    show("optimizer.lr_init=0.5", "optimizer: 'lr_init'=0.5 must be < 'max_lr'=0.01"),
    show("optimizer.lr_init=-0.1", "optimizer: 'lr_init' must be > 0, got -0.1"),
    show("optimizer.momentum_init=1", "optimizer: 'momentum_init' must be < 1, got 1.0"),
    show("optimizer.momentum_init=-0.1", "optimizer: 'momentum_init' must be > 0, got -0.1"),
    show(["optimizer=titans.sgd", "optimizer.momentum_init=0.5"],
         "unknown key optimizer.'momentum_init'"),
    show("optimizer=titans.momentun", "did you mean 'titans.momentum'"),
    show("retention.init=0", "retention: 'init' must be > 0, got 0.0"),
    show("retention.init=1.5", "retention: 'init' must be < 1, got 1.5"),
    show("retention.max_decay=2", "retention: 'max_decay' must be <= 1, got 2.0"),
    show("retention.init=nan", "retention: 'init' must be a finite number, got nan"),
    show(["retention=titans.constant_decay", "retention.alpha=2"],
         "retention: 'alpha' must be <= 1, got 2.0"),
    show(["retention=titans.constant_decay", "retention.alpha=-inf"],
         "retention: 'alpha' must be a finite number, got -inf"),
    # The kinds schema 3 replaced.
    show("surprise=titans.gradient", "override 'surprise': the kind 'surprise' was split into "
         "'objective' (the loss, objective=titans.l2) and 'optimizer' (step size and momentum) in "
         "spec schema 3; write optimizer=titans.sgd"),
    show("surprise.max_lr=0.05", "write optimizer.max_lr=0.05"),
    show("forgetting=titans.no_forgetting", "override 'forgetting': the kind 'forgetting' is "
         "called 'retention' since spec schema 3 (same components and settings); write "
         "retention=titans.no_forgetting"),
    show("layer.1.forgetting.init=0.1", "write layer.1.retention.init=0.1"),
    show("retrieval.x=1", "unknown key retrieval.'x'"),
    show("projection.conv_kernel=0", "projection: 'conv_kernel' must be >= 1, got 0"),
    show("projection.conv_kernel=1000000000", "projection: 'conv_kernel' must be <= 256"),
    show("projection.conv_kernel=3.5", "projection: 'conv_kernel' must be an integer, got 3.5"),
    # Memory layers and integrations.
    show("memory_layer.chunk_size=0", "memory_layer: 'chunk_size' must be >= 1, got 0"),
    show("memory_layer.chunk_size=1000000000000", "memory_layer: 'chunk_size' must be <= 4096"),
    show("memory_layer.chunk_size=8.5", "memory_layer: 'chunk_size' must be an integer, got 8.5"),
    show("integration.chunk_size=8", "unknown key integration.'chunk_size'"),
    show("memory_layer=titans.neural_memoy", "did you mean 'titans.neural_memory'"),
    show("layer.2.memory.depth=3", "[layer.2] does not exist: num_layers=2 has layers 0..1; fix "
                                   "the layer index or num_layers"),
    show("layer.0.attention=baseline.causal", "[layer.0.attention] 'baseline.causal' is set but "
         "layer 0's integration 'titans.lmm' does not use it; remove the [layer.0.attention] table"),
    show("layer.1.integration=titans.lmm", "layer 1: integration 'titans.lmm' needs a memory_layer "
         "component; add a [memory_layer] table", preset=TRANSFORMER),
    show("integration.persistent_tokens=-1", "integration: 'persistent_tokens' must be >= 0, got -1"),
    show("integration.persistent_tokens=100000", "integration: 'persistent_tokens' must be <= 4096"),
    show("integration.segment_len=17", "titans.mac's 'segment_len'=17 must be a multiple of "
         "titans.neural_memory's 'chunk_size'=8; choose memory_layer.chunk_size among [1, 17]", preset=MAC),
    show("integration.segment_len=1000000000001", "integration: 'segment_len' must be <= 65536",
         preset=MAC),
    show("integration.segment_len=0", "integration: 'segment_len' must be >= 1, got 0", preset=MAC),
    show("attention=baseline.sliding_window", "titans.mac attends inside each segment "
         "(integration.segment_len bounds the span), so it takes full attention", preset=MAC),
    show("integration=baseline.transformer", "integration 'baseline.transformer' uses no "
         "memory/objective/optimizer/retention/retrieval/projection/memory_layer component, but "
         "the spec "
         "sets [memory] 'titans.mlp'"),
    show("memory=titans.mlp", "integration 'baseline.transformer' uses no memory component, but "
         "the spec sets [memory] 'titans.mlp', whose settings would be ignored; remove that table "
         "(--set memory=none) or choose an integration that uses it", preset=TRANSFORMER),
    show("integration=titans.lmm", "integration 'titans.lmm' needs a memory_layer component",
         preset=TRANSFORMER),
    show("memory=none", "memory_layer 'titans.neural_memory' needs a memory component; add a "
                        "[memory] table"),
    show("attention=none", "every model needs its attention component; name one instead"),
    show("feedforward=none", "every model needs its feedforward component"),
    show("integration.impl=none", "every model needs its integration component"),
    show("memory=titans.momentum", "'titans.momentum' is an optimizer component, not a memory "
                                   "component"),
    show("memory=5", "memory.impl must be a component name in quotes, got 5"),
    show("memory=[1, 2]", "memory.impl must be a component name in quotes, got [1, 2]"),
    show("projection.conv_kernel=4", "the spec has no [projection] component; choose one first",
         preset=TRANSFORMER),
    # Attention and feed-forward.
    show("attention.rope_base=inf", "attention: 'rope_base' must be a finite number, got inf",
         preset=MAC),
    show("attention.rope_base=1e-30", "attention: 'rope_base' must be >= 1.0, got 1e-30", preset=SWA),
    show("attention.rope_base=0.5", "attention: 'rope_base' must be >= 1.0, got 0.5", preset=SWA),
    show("attention.rope_base=0", "attention: 'rope_base' must be >= 1.0, got 0.0", preset=MAC),
    show("attention.rope_base=1e20", "attention: 'rope_base' must be <= 1000000000000.0", preset=SWA),
    show("attention.rope_base=nan", "attention: 'rope_base' must be a finite number, got nan",
         preset=SWA),
    show("attention.window=0", "attention: 'window' must be >= 1, got 0", preset=SWA),
    show("attention.window=10000000", "attention: 'window' must be <= 1048576", preset=SWA),
    show("attention.persistent_tokens=-1", "attention: 'persistent_tokens' must be >= 0", preset=SWA),
    show("attention.persistent_tokens=1e3", "attention: 'persistent_tokens' must be an integer",
         preset=SWA),
    show("feedforward.multiplier=1e-9", "feedforward.multiplier=1e-09 gives baseline.swiglu a "
                                        "hidden width of 0 at dim=32", preset=SWA),
    show(["dim=8", "heads=1", "feedforward.multiplier=0.3"], "use feedforward.multiplier >= 1",
         preset=TRANSFORMER),
    show("feedforward.multiplier=0", "feedforward: 'multiplier' must be > 0, got 0.0", preset=SWA),
    show("feedforward.multiplier=inf", "feedforward: 'multiplier' must be a finite number",
         preset=SWA),
    show("feedforward.multiplier=1000", "feedforward: 'multiplier' must be <= 64", preset=SWA),
    show("feedforward.mult=2", "unknown key feedforward.'mult'; did you mean 'multiplier'?",
         preset=SWA),
    # memory_layers.
    show("memory_layers=[]", "'memory_layers' is empty, so integration 'titans.lmm' would be in "
                             "no block and its memory settings unused; list the blocks"),
    show("memory_layers=[7]", "'memory_layers' [7] out of range for num_layers=2; use indices 0..1"),
    show("memory_layers=[-1]", "'memory_layers' [-1] out of range"),
    show("memory_layers=[0.5]", "'memory_layers' must hold integers, got [0.5]"),
    show("memory_layers=abc", "'memory_layers' must be a list of layer indices, got 'abc'"),
    show("memory_layers=3", "'memory_layers' must be a list of layer indices, got 3"),
    show("memory_layers=[0]", "'memory_layers' is set but integration 'baseline.transformer' "
                              "carries no memory", preset=TRANSFORMER),
    show("memory_layers=[]", "'memory_layers' is set but integration 'baseline.transformer' "
                             "carries no memory", preset=TRANSFORMER, id="show-transformer-empty"),
    # Override syntax.
    show("memmory.depth=3", "did you mean 'memory'"),
    show("nonsense", "override 'nonsense' must look like 'key=value'"),
    show("=3", "override '=3' must look like 'key=value'"),
    show("dim.x=3", "override 'dim.x': 'dim' has no sub-keys"),
    show("schema_version=4", "spec has schema_version 4, but this memforge reads up to 3; upgrade"),
    show("schema_version=0", "'schema_version' must be a positive integer, got 0"),
    # Names and files.
    Cli("show-unknown-preset", ("show", "titans.lmn_tiny"), "did you mean 'titans.lmm_tiny'"),
    Cli("show-missing-file", ("show", "{tmp}/missing.toml"), "missing.toml: no such spec file"),
    Cli("show-yaml-file", ("show", "{tmp}/model.yaml"), "unknown spec format '.yaml'; use a .toml",
        {"model.yaml": "dim: 3\n"}),
    Cli("show-directory", ("show", "{tmp}/folder.toml"), "folder.toml: is a directory",
        {"folder.toml/inside.txt": "x"}),
    Cli("list-unknown-kind", ("list", "--kind", "memroy"), "did you mean 'memory'"),
    Cli("list-block-typo", ("list",), "cannot block 'titan': no plugin has that name; did you mean "
        "'titans'?", env={"MEMFORGE_BLOCK": "titan"}),
    Cli("show-block-essential", ("show", LMM), "plugin(s) ['baseline'] are essential and cannot be "
        "blocked", env={"MEMFORGE_BLOCK": "baseline"}),
    Cli("show-titans-blocked", ("show", LMM), "unknown preset 'titans.lmm_tiny'",
        env={"MEMFORGE_BLOCK": "titans"}),
    Cli("show-folder-without-suffix", ("show", "{tmp}/folder"), "unknown spec format '(no suffix)'",
        {"folder/inside.txt": "x"}),
    Cli("eval-missing-run", ("eval", "{tmp}/nowhere"), "{tmp}/nowhere does not exist; pass a run "
        "directory or a checkpoint directory"),
    Cli("eval-not-a-run", ("eval", "{tmp}/folder"), "holds no checkpoint", {"folder/a.txt": "x"}),
    spec_file("latin1.toml", SPEC_TOML.encode() + b"# caf\xe9\n", "not UTF-8 text (byte", "file-not-utf8"),
    spec_file("utf16.json", SPEC_JSON.encode("utf-16"), "not UTF-8 text", "file-utf16"),
    spec_file("broken.toml", "dim = = 3\n", "broken.toml: not valid TOML", "file-bad-toml"),
    spec_file("broken.json", "{\"dim\": }", "broken.json: not valid JSON", "file-bad-json"),
    spec_file("list.json", "[1, 2]", "must hold a table/object at the top level", "file-json-list"),
    spec_file("empty.toml", "", "spec is missing 'vocab_size', 'dim'", "file-empty"),
    spec_file("impl5.toml", toml_with('impl = "titans.mlp"', "impl = 5"),
              "memory.impl must be a component name in quotes, got 5", "file-impl-int"),
    spec_file("implfloat.toml", toml_with('impl = "titans.mlp"', "impl = 1.5"),
              "memory.impl must be a component name in quotes, got 1.5", "file-impl-float"),
    spec_file("implarray.toml", toml_with('impl = "titans.mlp"', 'impl = ["titans.mlp"]'),
              "memory.impl must be a component name in quotes", "file-impl-array"),
    spec_file("noimpl.toml", toml_with('impl = "titans.mlp"\n', ""),
              "[memory] has no 'impl' key; name a memory component", "file-no-impl"),
    spec_file("memint.toml", "memory = 5\n" + SPEC_TOML.split("[memory]")[0],
              "[memory] must be a table with an 'impl' key, got 5", "file-memory-int"),
    spec_file("typo.toml", toml_with("num_layers = 2", "num_layer = 2"),
              "unknown key 'num_layer'; did you mean 'num_layers'?", "file-top-typo"),
    spec_file("nodim.toml", toml_with("dim = 32\n", ""), "spec is missing 'dim'", "file-no-dim"),
    spec_file("future.toml", toml_with("schema_version = 3", "schema_version = 9"),
              "schema_version 9, but this memforge reads up to 3; upgrade memforge", "file-schema-9"),
    spec_file("schemastr.toml", toml_with("schema_version = 3", 'schema_version = "1"'),
              "'schema_version' must be a positive integer, got '1'", "file-schema-str"),
    spec_file("dim1e30.toml", toml_with("dim = 32", "dim = 1e30"),
              "'dim' must be an integer, got 1e+30 (float)", "file-dim-1e30"),
    spec_file("vocab.toml", toml_with("vocab_size = 64", "vocab_size = 1e12"),
              "'vocab_size' must be an integer, got 1000000000000.0", "file-vocab-1e12"),
    spec_file("expinf.toml", toml_with("expansion = 4.0", "expansion = inf"),
              "memory: 'expansion' must be a finite number, got inf", "file-expansion-inf"),
    spec_file("ropenan.toml", toml_with("rope_base = 10000.0", "rope_base = nan"),
              "attention: 'rope_base' must be a finite number, got nan", "file-rope-nan"),
    spec_file("emptylayers.toml", "memory_layers = []\n" + SPEC_TOML,
              "'memory_layers' is empty", "file-memory-layers-empty"),
    spec_file("dimstr.json", SPEC_JSON.replace('"dim": 32', '"dim": "32"'),
              "'dim' must be an integer, got '32'", "file-json-dim-str"),
    spec_file("depthnull.json", SPEC_JSON.replace('"depth": 2', '"depth": null'),
              "memory: 'depth' must be an integer, got None", "file-json-null"),
    spec_file("hugeint.json", SPEC_JSON.replace('"expansion": 4.0', '"expansion": 1' + "0" * 400),
              "memory: 'expansion' must be a finite number", "file-json-huge-int"),
    # Training settings: refused before the run directory exists.
    train("--lr", "inf", message="lr (--lr) must be a finite number in (0, 1], got inf", id="lr-inf"),
    train("--lr", "1e300", message="lr (--lr) must be a finite number in (0, 1], got 1e+300",
          id="lr-1e300"),
    train("--lr", "nan", message="lr (--lr) must be a finite number in (0, 1], got nan", id="lr-nan"),
    train("--lr", "0", message="lr (--lr) must be a finite number in (0, 1], got 0.0", id="lr-0"),
    train("--lr=-1e-3", message="lr (--lr) must be a finite number in (0, 1]", id="lr-negative"),
    train("--lr", "2", message="the usual peaks lie between 1e-4 and 1e-2", id="lr-2"),
    train("--lr", "fast", message="argument --lr: invalid float value: 'fast'", id="lr-word",
          argparse=True),
    train("--weight-decay", "nan", message="weight_decay (--weight-decay) must be a finite number "
          "in [0, inf), got nan", id="wd-nan"),
    train("--weight-decay", "-0.1", message="weight_decay (--weight-decay) must be a finite number",
          id="wd-negative"),
    train("--weight-decay", "inf", message="weight_decay (--weight-decay) must be a finite number",
          id="wd-inf"),
    train("--lr", "0.5", "--weight-decay", "3", message="weight_decay (--weight-decay) 3 times lr "
          "(--lr) 0.5 must be < 1", id="wd-times-lr"),
    train("--steps", "0", message="steps (--steps) must be >= 1, got 0", id="steps-0"),
    train("--steps", "-5", message="steps (--steps) must be >= 1, got -5", id="steps-negative"),
    train("--steps", "1e3", message="argument --steps: invalid int value: '1e3'", id="steps-float",
          argparse=True),
    train("--batch-size", "0", message="batch_size (--batch-size) must be in [1, 65536], got 0",
          id="batch-0"),
    train("--batch-size", "1000000000", message="batch_size (--batch-size) must be in [1, 65536]",
          id="batch-huge"),
    train("--warmup", "-1", message="warmup_steps (--warmup) must be >= 0, got -1", id="warmup-neg"),
    train("--eval-every", "0", message="eval_every (--eval-every) must be >= 1, got 0", id="eval-every-0"),
    train("--eval-batches", "0", message="eval_batches (--eval-batches) must be >= 1, got 0",
          id="train-eval-batches-0"),
    train("--checkpoint-every", "0", message="checkpoint_every (--checkpoint-every) must be >= 1",
          id="checkpoint-every-0"),
    train("--seed", "-1", message="seed (--seed) must be in [0, 9223372036854775807], got -1",
          id="seed-negative"),
    train("--seed", "100000000000000000000000", message="seed (--seed) must be in [0, "
          "9223372036854775807]", id="seed-huge"),
    train("--stop-after", "0", message="stop_after (--stop-after) must be >= 1, got 0", id="stop-after-0"),
    train("--preset", "titans.lmn", message="did you mean 'titans.lmm'", id="train-unknown-preset"),
    Cli("train-out-is-a-file", ("train", "--preset", TRANSFORMER, "--out", "{tmp}/file.txt"),
        "run directory {tmp}/file.txt is a file; pass another --out", {"file.txt": "x"}),
    train("--set", "dim=1e30", message="'dim' must be an integer, got 1e+30", id="train-dim-1e30"),
    train("--set", "memory=titans.mlp", message="uses no memory component", id="train-unused-memory"),
    train("--set", "feedforward.multiplier=1e-9", message="gives baseline.swiglu a hidden width of 0",
          id="train-multiplier"),
    train("--set", "attention.rope_base=1e-30", message="'rope_base' must be >= 1.0", id="train-rope"),
    train("--set", "heads=5", message="'heads'=5 must divide 'dim'=32", id="train-heads"),
    train("--set", "vocab_size=16777216", "--set", "dim=4096", message="the model would have 137B "
          "parameters", id="train-too-many-parameters"),
    train("--task", "nope", message="unknown task 'nope'", id="task-unknown"),
    train("--task", "mqar", "--task-option", "num_pairs=abc",
          message="option num_pairs='abc' is not an integer", id="task-option-not-int"),
    train("--task-option", "nonsense", message="task option 'nonsense' must look like name=value",
          id="task-option-syntax"),
    train("--task", "mqar", "--task-option", "num_pair=3", message="did you mean 'num_pairs'?",
          id="task-option-typo"),
    train("--task", "mqar", "--task-option", "seq_len=0", message="seq_len", id="task-seq-len-0"),
    train("--task", "mqar", "--task-option", "seq_len=1e3", message="option seq_len='1e3' is not "
          "an integer", id="task-seq-len-float"),
    # 6.4 TB of tokens: refused on any machine, so the test never allocates them.
    train("--task", "mqar", "--task-option", "seq_len=100000000000", message="1 batch of 4 "
          "sequences of 100000000000 tokens need", id="task-seq-len-huge"),
    train("--task", "mqar", "--task-option", "vocab_size=100000", message="uses token ids up to "
          "99999, out of range for the model's vocab_size=64", id="task-vocab-too-big"),
    train("--task", "s-niah", "--task-option", "depth=2", message="depth", id="niah-depth-2"),
    train("--task", "mqar", "--task-option", "power_a=1e300", message="mqar: power_a=1e+300 makes "
          "the gap weights a * g**(a - 1) leave float64's range", id="mqar-power-a-huge"),
    train("--task", "mqar", "--task-option", "power_a=1e-320", message="leave float64's range",
          id="mqar-power-a-tiny"),
    train(*BYTES, "--task-option", "paths={tmp}/missing", message="text: path "
          "'{tmp}/missing' does not exist", id="text-missing-path"),
    train(*BYTES, "--task-option", "paths={tmp}/corpus", message="text: cannot read "
          "'{tmp}/corpus/broken.txt'", id="text-unreadable-file",
          files={"corpus/a.txt": "some text\n" * 50, "corpus/b.txt": "more text\n" * 50,
                 "corpus/broken.txt": Path("/nonexistent/target")}),
    train(*BYTES, "--task-option", "paths={tmp}/data.bin", message="looks binary",
          id="text-binary-file", files={"data.bin": b"\0\1\2" * 100}),
    train(*BYTES, "--task-option", "validation_fraction=nan",
          message="validation_fraction=nan must be in (0.0, 1.0)", id="text-fraction-nan"),
    train(*BYTES, "--task-option", "paths={tmp}/one", message="splitting by file needs "
          "at least 2", id="text-one-file", files={"one/a.txt": "text\n" * 100}),
    train("--spec", "{tmp}/missing.toml", message="missing.toml: no such spec file",
          id="train-missing-spec"),
    train("--spec", "{tmp}/latin1.toml", message="not UTF-8 text", id="train-spec-not-utf8",
          files={"latin1.toml": SPEC_TOML.encode() + b"# \xff\n"}),
    train("--device", "tpu", message="argument --device: invalid choice: 'tpu'", id="device-tpu",
          argparse=True),
    # Evaluation: refused before anything is scored or written.
    evaluate("--lengths", "100m", message="length 104857600 needs at least", id="eval-100m"),
    evaluate("--lengths", "0", message="lengths (--lengths) must be positive integers, got [0]",
             id="eval-length-0"),
    evaluate("--lengths", "abc", message="length 'abc' is not a token count; use e.g. 512, 1k",
             id="eval-length-word"),
    evaluate("--lengths", "1k,,2k", message="length '' is not a token count", id="eval-length-empty"),
    evaluate("--lengths", "-5", message="length '-5' is not a token count", id="eval-length-negative"),
    evaluate("--lengths", "1e3", message="length '1e3' is not a token count", id="eval-length-exp"),
    evaluate("--task", "s-niah", "--depths", "2", message="depths must lie in [0, 1]",
             id="eval-depth-2"),
    evaluate("--task", "s-niah", "--depths", "nan", message="depths must lie in [0, 1]",
             id="eval-depth-nan"),
    evaluate("--task", "s-niah", "--depths", "a,b", message="depths 'a,b' must be numbers in [0, 1]",
             id="eval-depth-words"),
    evaluate("--depths", "0.5", message="task 'mqar' has no needle depth; --depths is for s-niah",
             id="eval-depth-without-needle"),
    evaluate("--batches", "0", message="batches (--batches) must be an integer >= 1, got 0",
             id="eval-batches-0"),
    evaluate("--batch-size", "0", message="batch_size (--batch-size) must be an integer >= 1",
             id="eval-batch-size-0"),
    evaluate("--batch-size", "1000000000", message="needs at least", id="eval-batch-size-huge"),
    evaluate("--piece-size", "0", message="piece_size (--piece-size) must be an integer >= 1",
             id="eval-piece-size-0"),
    evaluate("--task", "nope", message="unknown task 'nope'", id="eval-unknown-task"),
    evaluate("--task-option", "seq_len=abc", message="option seq_len='abc' is not an integer",
             id="eval-task-option"),
    evaluate("--task-option", "vocab_size=100000", message="out of range for the model's "
             "vocab_size=64", id="eval-task-vocab"),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny finished training run (2 steps) to evaluate."""
    from memforge.training import train as train_run

    out = tmp_path_factory.mktemp("finished") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_run(TrainConfig(model=TRANSFORMER, task="mqar", steps=2, batch_size=4, warmup_steps=0,
                              eval_every=2, eval_batches=1, device="cpu", out=out))
    finally:
        torch.set_num_threads(threads)
    return out


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its contents (links by their target)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            found[str(path)] = os.readlink(path).encode()
        elif path.is_file():
            found[str(path)] = path.read_bytes()
        else:
            found[str(path)] = b"<dir>"
    return found


def _fill(text: str, tmp: Path, run: Path | None) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{run}", str(run))


@pytest.mark.parametrize("case", CLI, ids=[case.id for case in CLI])
def test_cli_bad_input_is_one_line_and_writes_nothing(
    case: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    run = request.getfixturevalue("finished_run") if "{run}" in case.argv else None
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            path.symlink_to(content)  # a link to nothing: a file that cannot be read
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    monkeypatch.chdir(tmp_path)  # a default run directory (runs/...) would land here
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    before = _tree(tmp_path), _tree(run) if run else {}
    capsys.readouterr()
    try:
        status = main([_fill(arg, tmp_path, run) for arg in case.argv])
    except SystemExit as exc:  # argparse's own refusals
        status = exc.code
    err = capsys.readouterr().err
    message = _fill(case.message, tmp_path, run)
    assert status == 2, err
    assert message in err, err
    assert "Traceback" not in err
    if not case.argparse:
        assert err.startswith("memforge: error: ") and err.count("\n") == 1, err
    assert (_tree(tmp_path), _tree(run) if run else {}) == before, "a refused command wrote files"


# ---------------------------------------------------------------------------------------------
# The API.


class Api(NamedTuple):
    """A call that must raise ``error`` with ``message`` in its text (one line)."""

    id: str
    call: Callable[[Path], Any]
    error: type[BaseException]
    message: str


def _lmm() -> memforge.ModelSpec:
    return memforge.preset(LMM)


@attrs.frozen
class _NoConfig:
    """No settings."""


def _registry_with_factory(kind: str, factory: Callable[..., Any]):
    requires = ("attention", "feedforward") if kind == "integration" else ()
    component = memforge.ComponentSpec(kind=kind, name="odd.part", config_cls=_NoConfig,
                                       factory=factory, summary="returns the wrong thing",
                                       requires=requires)

    @memforge.hookimpl
    def memforge_register_components():
        return [component]

    return load_plugins(autoload=False, extra=[as_module(
        "odd", memforge_register_components=memforge_register_components)])


def _build_with(kind: str, factory: Callable[..., Any], base: str = TRANSFORMER) -> Any:
    registry = _registry_with_factory(kind, factory)
    spec = override(memforge.preset(base), [f"{kind}=odd.part"], registry)
    return build_model(spec, registry=registry)


def _read_only_folder(tmp: Path) -> Path:
    """A folder this process cannot create files in (procfs even refuses root)."""
    if os.geteuid() != 0:
        folder = tmp / "locked"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    return Path("/proc")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(memforge.preset(TRANSFORMER))


def _generate(**kwargs: Any) -> Any:
    arguments = {"prompt": torch.zeros(1, 2, dtype=torch.long), "max_new_tokens": 2, **kwargs}
    return _model().generate(**arguments)


def _write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


API: list[Api] = [
    # override / apply_overrides: wrong argument types.
    Api("override-str", lambda tmp: override(_lmm(), "memory.depth=3"), SpecError,
        "override needs a list of 'key=value' strings, got str 'memory.depth=3'"),
    Api("override-int-item", lambda tmp: override(_lmm(), [3]), SpecError,
        "override assignments must be 'key=value' strings, got int 3"),
    Api("override-none", lambda tmp: override(_lmm(), None), SpecError,
        "override needs a list of 'key=value' strings, got NoneType"),
    Api("override-dict", lambda tmp: override(_lmm(), {"memory.depth": 3}), SpecError,
        "for a dict of values use memforge.apply_overrides"),
    Api("override-spec-str", lambda tmp: override(LMM, ["dim=64"]), SpecError,
        "override needs a ModelSpec, got str; get one from memforge.preset(NAME)"),
    Api("override-spec-none", lambda tmp: override(None, []), SpecError,
        "override needs a ModelSpec, got NoneType"),
    Api("override-bytes", lambda tmp: override(_lmm(), b"dim=64"), SpecError,
        "override needs a list of 'key=value' strings, got bytes"),
    Api("apply-overrides-list", lambda tmp: apply_overrides(_lmm(), ["dim=3"]), SpecError,
        "apply_overrides needs a mapping of dotted paths to values, got list"),
    Api("apply-overrides-int-key", lambda tmp: apply_overrides(_lmm(), {3: 4}), SpecError,
        "override keys must be dotted paths such as 'memory.depth', got 3"),
    Api("apply-overrides-spec-dict", lambda tmp: apply_overrides({}, {}), SpecError,
        "apply_overrides needs a ModelSpec, got dict"),
    Api("apply-overrides-remove-required", lambda tmp: apply_overrides(_lmm(), {"attention": None}),
        SpecError, "every model needs its attention component"),
    Api("apply-overrides-nan", lambda tmp: apply_overrides(_lmm(), {"memory.expansion": math.nan}),
        SpecError, "memory: 'expansion' must be a finite number, got nan"),
    # preset / available.
    Api("preset-unknown", lambda tmp: memforge.preset("titans.lm"), UnknownNameError,
        "did you mean 'titans.lmm'"),
    Api("preset-dim-1e30", lambda tmp: memforge.preset(LMM, dim=1e30), SpecError,
        "'dim' must be an integer, got 1e+30 (float)"),
    Api("preset-depth-0", lambda tmp: memforge.preset(LMM, memory={"depth": 0}), SpecError,
        "memory: 'depth' must be >= 1, got 0"),
    Api("preset-rope-inf", lambda tmp: memforge.preset(SWA, **{"attention.rope_base": math.inf}),
        SpecError, "attention: 'rope_base' must be a finite number, got inf"),
    Api("preset-remove-attention", lambda tmp: memforge.preset(LMM, attention="none"), SpecError,
        "every model needs its attention component"),
    Api("available-unknown-kind", lambda tmp: memforge.available("memroy"), UnknownNameError,
        "did you mean 'memory'"),
    # save_spec / load_spec / dumps_spec: types and I/O.
    Api("save-spec-str", lambda tmp: save_spec("titans.lmm_tiny", tmp / "x.toml"), SpecError,
        "save_spec needs a ModelSpec, got str"),
    Api("save-spec-path-int", lambda tmp: save_spec(_lmm(), 5), SpecError,
        "save_spec needs a file path (str or pathlib.Path), got int 5"),
    Api("save-spec-path-none", lambda tmp: save_spec(_lmm(), None), SpecError,
        "save_spec needs a file path (str or pathlib.Path), got NoneType"),
    Api("save-spec-missing-folder", lambda tmp: save_spec(_lmm(), tmp / "absent" / "x.toml"),
        SpecError, "the folder {tmp}/absent does not exist; create it first"),
    Api("save-spec-parent-is-file",
        lambda tmp: save_spec(_lmm(), _write(tmp, "file", b"x") / "x.toml"), SpecError,
        "the folder {tmp}/file is not a folder"),
    Api("save-spec-target-is-folder",
        lambda tmp: save_spec(_lmm(), (tmp / "dir.toml").mkdir() or tmp / "dir.toml"), SpecError,
        "{tmp}/dir.toml: it is a directory"),
    Api("save-spec-read-only", lambda tmp: save_spec(_lmm(), _read_only_folder(tmp) / "x.toml"),
        SpecError, "; choose a writable location"),
    Api("save-spec-yaml", lambda tmp: save_spec(_lmm(), tmp / "x.yaml"), SpecError,
        "unknown spec format '.yaml'; use a .toml or .json file"),
    Api("save-spec-no-suffix", lambda tmp: save_spec(_lmm(), tmp / "model"), SpecError,
        "unknown spec format '(no suffix)'"),
    Api("load-spec-int", lambda tmp: load_spec(5), SpecError,
        "load_spec needs a file path (str or pathlib.Path), got int 5"),
    Api("load-spec-missing", lambda tmp: load_spec(tmp / "absent.toml"), SpecError,
        "absent.toml: no such spec file"),
    Api("load-spec-not-utf8", lambda tmp: load_spec(_write(tmp, "x.toml", b"dim = 3 # \xff\n")),
        SpecError, "x.toml: not UTF-8 text (byte 10: 0xff)"),
    Api("read-spec-dict-utf16", lambda tmp: read_spec_dict(_write(tmp, "x.json", "{}".encode("utf-16"))),
        SpecError, "not UTF-8 text"),
    Api("dumps-spec-yaml", lambda tmp: dumps_spec(_lmm(), "yaml"), SpecError,
        "unknown spec format 'yaml'; use 'toml' or 'json'"),
    Api("dumps-spec-str", lambda tmp: dumps_spec("spec"), SpecError,
        "dumps_spec needs a ModelSpec, got str"),
    Api("spec-id-dict", lambda tmp: spec_id(to_dict(_lmm())), SpecError,
        "spec_id needs a ModelSpec, got dict"),
    # from_dict / ModelSpec / check_spec.
    Api("from-dict-list", lambda tmp: from_dict([]), SpecError, "a spec must be a table/object, got list"),
    Api("from-dict-impl-int", lambda tmp: from_dict({**to_dict(_lmm()), "memory": {"impl": 5}}),
        SpecError, "memory.impl must be a component name in quotes, got 5"),
    Api("from-dict-impl-none", lambda tmp: from_dict({**to_dict(_lmm()), "memory": {"impl": None}}),
        SpecError, "memory.impl must be a component name in quotes, got None"),
    Api("from-dict-dim-str", lambda tmp: from_dict({**to_dict(_lmm()), "dim": "32"}), SpecError,
        "'dim' must be an integer, got '32'"),
    Api("model-spec-float-dim", lambda tmp: attrs.evolve(_lmm(), dim=32.0), SpecError,
        "'dim' must be an integer, got 32.0 (float); write a whole number"),
    Api("model-spec-str-choice", lambda tmp: attrs.evolve(_lmm(), integration="titans.lmm"), SpecError,
        "'integration' must be a ComponentChoice, got 'titans.lmm'"),
    Api("model-spec-layer-out-of-range", lambda tmp: attrs.evolve(
        _lmm(), layers={5: {"memory": _lmm().memory}}), SpecError,
        "[layer.5] does not exist: num_layers=2 has layers 0..1"),
    Api("model-spec-layer-unknown-kind", lambda tmp: attrs.evolve(
        _lmm(), layers={0: {"memroy": _lmm().memory}}), SpecError,
        "[layer.0] unknown kind 'memroy'; did you mean 'memory' or 'memory_layer'?"),
    Api("check-spec-unused-memory", lambda tmp: check_spec(attrs.evolve(
        memforge.preset(TRANSFORMER), memory=_lmm().memory)), SpecError,
        "integration 'baseline.transformer' uses no memory component"),
    # Config classes used directly.
    Api("config-expansion-inf", lambda tmp: MLPMemoryConfig(expansion=math.inf), ValueError,
        "'expansion' must be a finite number, got inf; the default is 4.0"),
    Api("config-depth-float", lambda tmp: MLPMemoryConfig(depth=2.0), TypeError,
        "'depth' must be an integer, got 2.0 (float); write a whole number"),
    Api("config-activation", lambda tmp: MLPMemoryConfig(activation="tanh"), ValueError,
        "'activation' must be one of 'gelu', 'silu', 'relu'; got 'tanh'"),
    Api("config-multiplier-nan", lambda tmp: SwiGLUConfig(multiplier=math.nan), ValueError,
        "'multiplier' must be a finite number, got nan"),
    Api("config-rope-half", lambda tmp: CausalAttentionConfig(rope_base=0.5), ValueError,
        "'rope_base' must be >= 1.0, got 0.5"),
    Api("config-rope-huge-int", lambda tmp: CausalAttentionConfig(rope_base=10**400), ValueError,
        "'rope_base' must be a finite number, got inf"),
    # build_model: sizes, types and factories that return the wrong thing.
    Api("build-model-str", lambda tmp: build_model(LMM), SpecError,
        "build_model needs a ModelSpec, got str; use memforge.preset(NAME)"),
    Api("build-model-device-word", lambda tmp: build_model(_lmm(), "tpu"), InputError,
        "build_model: device 'tpu' is not a torch device; use 'cpu', 'cuda' or a torch.device"),
    Api("build-model-device-int-list", lambda tmp: build_model(_lmm(), [0]), InputError,
        "build_model: device [0] is not a torch device"),
    Api("build-model-dtype-int", lambda tmp: build_model(_lmm(), dtype=torch.int64), InputError,
        "build_model: dtype must be a floating torch dtype such as torch.float32"),
    Api("build-model-dtype-str", lambda tmp: build_model(_lmm(), dtype="float32"), InputError,
        "build_model: dtype must be a floating torch dtype such as torch.float32 or torch.bfloat16, "
        "got 'float32'"),
    Api("build-model-too-many-parameters",
        lambda tmp: build_model(memforge.preset(TRANSFORMER, dim=4096, vocab_size=2**24)), SpecError,
        "the model would have 137B parameters, 137B of them in the embedding and head"),
    Api("build-model-cap", lambda tmp: build_model(_lmm(), max_parameters=1000), SpecError,
        "the model would have 40.8K parameters, 16.9K of them in the feedforward 'baseline.swiglu' "
        "(dim=32, num_layers=2; check its settings): more than the 1K memforge builds"),
    Api("build-model-memory-part", lambda tmp: build_model(memforge.preset(
        LMM, dim=8192, heads=1, vocab_size=64, memory={"expansion": 64.0, "depth": 4})), SpecError,
        "of them in the memory 'titans.mlp'"),
    Api("factory-identity-attention", lambda tmp: _build_with("attention", lambda c, ctx: nn.Identity()),
        SpecError, "attention 'odd.part' (layer 0): Identity failed on a well-formed input"),
    Api("factory-identity-memory", lambda tmp: _build_with("memory", lambda c, ctx: nn.Identity(), LMM),
        SpecError, "memory 'odd.part' (layer 0): Identity is not a memory component: it has no "
        "initial_weights()"),
    Api("factory-identity-objective",
        lambda tmp: _build_with("objective", lambda c, ctx: nn.Identity(), LMM), SpecError,
        "objective 'odd.part' (layer 0): Identity is not an objective component: it has no loss(), "
        "loss_grad()"),
    Api("factory-identity-optimizer",
        lambda tmp: _build_with("optimizer", lambda c, ctx: nn.Identity(), LMM), SpecError,
        "optimizer 'odd.part' (layer 0): Identity is not an optimizer component: forward(x) "
        "returned Tensor, expected StepGates(lr, momentum)"),
    Api("factory-identity-retention",
        lambda tmp: _build_with("retention", lambda c, ctx: nn.Identity(), LMM), SpecError,
        "retention 'odd.part' (layer 0): Identity is not a retention component: forward(x) has "
        "shape [1, 2, 32], expected [1, 2, 2]"),
    Api("factory-none-feedforward", lambda tmp: _build_with("feedforward", lambda c, ctx: None),
        SpecError, "feedforward 'odd.part' (layer 0): the factory returned NoneType, not a "
        "torch.nn.Module"),
    Api("factory-wide-feedforward",
        lambda tmp: _build_with("feedforward", lambda c, ctx: nn.Linear(ctx.dim, 2 * ctx.dim)),
        SpecError, "feedforward 'odd.part' (layer 0): Linear is not a feedforward component: "
        "forward(x) has shape [1, 2, 64], expected [1, 2, 32]"),
    Api("factory-identity-integration",
        lambda tmp: _build_with("integration", lambda c, ctx: nn.Identity()), SpecError,
        "integration 'odd.part' (layer 0): Identity failed on a well-formed input"),
    Api("component-kind-typo", lambda tmp: memforge.ComponentSpec(
        kind="memroy", name="x.y", config_cls=_NoConfig, factory=lambda c, ctx: None, summary="s"),
        PluginError, "did you mean 'memory'"),
    Api("component-requires-typo", lambda tmp: memforge.ComponentSpec(
        kind="integration", name="x.y", config_cls=_NoConfig, factory=lambda c, ctx: None,
        summary="s", requires=("attention", "memroy")), PluginError,
        "requires of 'x.y': unknown component kind 'memroy'"),
    Api("component-config-not-attrs", lambda tmp: memforge.ComponentSpec(
        kind="memory", name="x.y", config_cls=dict, factory=lambda c, ctx: None, summary="s"),
        PluginError, "config_cls of 'x.y' must be an attrs class (@attrs.frozen(kw_only=True))"),
    Api("component-factory-not-callable", lambda tmp: memforge.ComponentSpec(
        kind="memory", name="x.y", config_cls=_NoConfig, factory="make", summary="s"),
        PluginError, "factory of 'x.y' must be callable, got str"),
    Api("component-name-int", lambda tmp: memforge.ComponentSpec(
        kind="memory", name=5, config_cls=_NoConfig, factory=lambda c, ctx: None, summary="s"),
        PluginError, "a registered name must be a string '<plugin>.<name>', got 5"),
    Api("registry-component-int", lambda tmp: memforge.default_registry().component("memory", 5),
        UnknownNameError, "unknown memory component 5; available: atlas.poly_mlp, miras.mlp, "
        "titans.linear, titans.mlp, ttt.linear, ttt.mlp"),
    Api("preset-int", lambda tmp: memforge.preset(5), UnknownNameError, "unknown preset 5"),
    Api("configure-plugins-block-str", lambda tmp: memforge.configure_plugins(block="titans"),
        PluginError, "block must be a list, got str 'titans'; e.g. block=['titans']"),
    Api("configure-plugins-block-typo", lambda tmp: memforge.configure_plugins(block=["titan"]),
        PluginError, "cannot block 'titan': no plugin has that name; did you mean 'titans'?"),
    Api("configure-plugins-block-essential", lambda tmp: memforge.configure_plugins(block=["baseline"]),
        PluginError, "are essential and cannot be blocked"),
    # Training and evaluation settings.
    Api("train-config-lr-inf", lambda tmp: TrainConfig(lr=math.inf), TrainingError,
        "lr (--lr) must be a finite number in (0, 1], got inf"),
    Api("train-config-lr-1e300", lambda tmp: TrainConfig(lr=1e300), TrainingError,
        "lr (--lr) must be a finite number in (0, 1], got 1e+300"),
    Api("train-config-weight-decay-nan", lambda tmp: TrainConfig(weight_decay=math.nan),
        TrainingError, "weight_decay (--weight-decay) must be a finite number in [0, inf), got nan"),
    Api("train-config-betas-out-of-range", lambda tmp: TrainConfig(betas=(2, -1)), TrainingError,
        "betas must be two numbers in [0, 1) (AdamW's moment decay rates), got (2, -1)"),
    Api("train-config-betas-one", lambda tmp: TrainConfig(betas=(0.9, 1.0)), TrainingError,
        "betas must be two numbers in [0, 1)"),
    Api("train-config-betas-scalar", lambda tmp: TrainConfig(betas=0.9), TrainingError,
        "betas must be two numbers in [0, 1) (AdamW's moment decay rates), got 0.9"),
    Api("train-config-betas-nan", lambda tmp: TrainConfig(betas=(math.nan, 0.9)), TrainingError,
        "betas must be two numbers in [0, 1)"),
    Api("train-config-overrides-str", lambda tmp: TrainConfig(overrides="dim=64"), TrainingError,
        "overrides (--set) must be a list of 'key=value' strings, got 'dim=64'"),
    Api("train-config-task-int", lambda tmp: TrainConfig(task=5), TrainingError,
        "task (--task) must be a name, got int 5"),
    Api("train-config-task-options-str", lambda tmp: TrainConfig(task_options="x"), TrainingError,
        "task_options (--task-option) must be a mapping of option names to values, got str"),
    Api("train-config-grad-clip-inf", lambda tmp: TrainConfig(grad_clip=math.inf), TrainingError,
        "grad_clip must be a finite number in (0, inf), got inf"),
    Api("train-config-min-lr-nan", lambda tmp: TrainConfig(min_lr_ratio=math.nan), TrainingError,
        "min_lr_ratio must be a finite number in [0, 1], got nan"),
    Api("train-config-model-int", lambda tmp: TrainConfig(model=5), TrainingError,
        "model must be a preset name, a spec file path or a ModelSpec, got int"),
    Api("train-config-steps-float", lambda tmp: TrainConfig(steps=1.5), TrainingError,
        "steps (--steps) must be an integer >= 1, got 1.5"),
    Api("train-config-device", lambda tmp: TrainConfig(device="tpu"), TrainingError,
        "unknown device 'tpu'"),
    Api("train-config-keep-0", lambda tmp: TrainConfig(keep_checkpoints=0), TrainingError,
        "keep_checkpoints must be >= 1, got 0"),
    Api("eval-config-lengths-none", lambda tmp: EvalConfig(source=tmp, lengths=None), TrainingError,
        "lengths (--lengths) must be a list of token counts, got None"),
    Api("eval-config-lengths-str", lambda tmp: EvalConfig(source=tmp, lengths="1k"), TrainingError,
        "lengths (--lengths) must be a list of token counts, got '1k'"),
    Api("eval-config-depths-words", lambda tmp: EvalConfig(source=tmp, depths=("a",)), TrainingError,
        "depths must lie in [0, 1] (0: first, 1: right before the question), got ['a']"),
    Api("eval-config-depths-scalar", lambda tmp: EvalConfig(source=tmp, depths=0.5), TrainingError,
        "depths (--depths) must be a list of numbers in [0, 1], got 0.5"),
    Api("eval-config-task-options-str", lambda tmp: EvalConfig(source=tmp, task_options="x"),
        TrainingError, "task_options (--task-option) must be a mapping"),
    Api("resolve-task-negative-length",
        lambda tmp: resolve_task("mqar", {"seq_len": -1}, _lmm()), TrainingError, "seq_len=-1"),
    # generate(): arguments the usage engineer checks (memforge.sampling).
    Api("generate-temperature-nan", lambda tmp: _generate(temperature=math.nan), InputError,
        "temperature must be a finite number >= 0 (0: greedy), got nan"),
    Api("generate-max-new-float", lambda tmp: _generate(max_new_tokens=2.5), InputError,
        "max_new_tokens must be an integer >= 0, got 2.5"),
    Api("generate-top-p-zero", lambda tmp: _generate(top_p=0.0), InputError,
        "top_p must be a number in (0, 1], or None to keep every token; got 0.0"),
    Api("generate-stop-token", lambda tmp: _generate(stop_token=10**6), InputError,
        "stop_token must be a token id in [0, 63], or None; got 1000000"),
    Api("generate-max-new-huge", lambda tmp: _generate(max_new_tokens=2**40), InputError,
        f"max_new_tokens={2**40} after a prompt of 2 tokens is more than the 16777216 tokens a "
        f"generated sequence may hold; ask for at most 16777214"),
    Api("load-model-none", lambda tmp: memforge.load_model(None), ModelFileError,
        "load_model needs a path to a run, checkpoint or saved model, got NoneType"),
    Api("load-model-int", lambda tmp: memforge.load_model(5), ModelFileError,
        "load_model needs a path to a run, checkpoint or saved model, got int"),
    Api("save-model-none", lambda tmp: memforge.save_model(_model(), None), ModelFileError,
        "save_model needs the path of a directory to save into, got NoneType"),
]


@pytest.mark.parametrize("case", API, ids=[case.id for case in API])
def test_api_bad_input_raises_one_line(case: Api, tmp_path: Path) -> None:
    with pytest.raises(case.error) as info:
        case.call(tmp_path)
    text = str(info.value)
    assert case.message.replace("{tmp}", str(tmp_path)) in text
    assert "\n" not in text


def test_the_tables_are_large_and_distinct() -> None:
    """The issue asks for at least 150 distinct bad inputs, through the CLI and the API."""
    assert len({(case.argv, tuple(case.files.items()), tuple(case.env.items()))
                for case in CLI}) == len(CLI)
    assert len({case.id for case in CLI}) == len(CLI)
    assert len({case.id for case in API}) == len(API)
    assert len(CLI) + len(API) >= 150


def test_labels_that_are_all_ignored_give_a_nan_loss() -> None:
    """Documented in ``MemforgeModel.forward``: as in HF transformers, nothing to score is NaN."""
    tokens = torch.zeros(2, 5, dtype=torch.long)
    loss = _model()(tokens, labels=torch.full_like(tokens, -100)).loss
    assert loss is not None and torch.isnan(loss)
