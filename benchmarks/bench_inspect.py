"""Benchmark: a model that is not being inspected pays nothing for the inspection hooks.

``titans.neural_memory`` checks one attribute in ``forward`` (``self._memory_recorder is not
None``; docs/inspect.md, "Cost"). This times the forward of a ``titans.lmm`` model as shipped
(hooks present, not inspected) against the same model whose memory layers run a forward without
the check (a subclass with the hook-free copy of ``forward``, set on the same modules, so the
weights and everything else are shared), and, for scale, the model while it is inspected (in the
first ``--inspected-rounds`` rounds only: recording replays the memory token by token).

The cases take turns (one forward of each per round, the order alternating between rounds), so a
busy spell of the shared machine falls on all of them alike; the figures are the median over
rounds and the ratio hooks-present over hook-free (1.00 = no cost), also per round (the two
forwards of a round run back to back) with a 95% bootstrap interval of its median. Before timing,
all builds are checked to give bit-identical logits.

Usage: ``python benchmarks/bench_inspect.py [--rounds 40] [--batch 8] [--length 256]
[--threads 1] [--inspected-rounds 3]``. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import scipy.stats
import torch
from _common import cpu_name

import memforge
from memforge.engine.layer import MemoryLayerState, StaticDecodingMemoryLayer, _without_autocast
from memforge.inspect import recording


class HookFreeLayer(StaticDecodingMemoryLayer):
    """``FastWeightMemoryLayer.forward`` without the recorder check: the build the hooks are
    measured against (outputs are checked bit-identical before timing)."""

    def forward(self, x, state=None):
        self._check_input(x)
        batch = x.shape[0]
        if state is not None:
            state = self._check_state(state, batch)
        dtype = (state.fast.weights if state is not None else self.memory.initial_weights())[0].dtype
        inputs, projection_cache = self._rule_inputs(
            x, None if state is None else state.projection, dtype)
        fast = (self.executor.initial_state(self.rule, batch, inputs) if state is None
                else state.fast)
        with _without_autocast(x.device):
            read, new_fast = self.executor.scan(self.rule, fast, inputs)
        return self.output(read, x), MemoryLayerState(new_fast, projection_cache)


def machine() -> str:
    """The processor and cores (see ``_common.cpu_name``), and the threads torch uses."""
    return f"{cpu_name()}, torch threads {torch.get_num_threads()}"


def _set_layer_class(model: torch.nn.Module, cls: type) -> None:
    for module in model.modules():
        if isinstance(module, StaticDecodingMemoryLayer):
            module.__class__ = cls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--inspected-rounds", type=int, default=3,
                        help="rounds that also time the inspected model (slow: it replays)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = memforge.build_model(memforge.preset("titans.lmm")).eval()
    tokens = torch.randint(0, model.vocab_size, (args.batch, args.length))

    def forward_plain() -> torch.Tensor:
        _set_layer_class(model, StaticDecodingMemoryLayer)
        return model(tokens).logits

    def forward_hook_free() -> torch.Tensor:
        _set_layer_class(model, HookFreeLayer)
        return model(tokens).logits

    def forward_inspected() -> torch.Tensor:
        _set_layer_class(model, StaticDecodingMemoryLayer)
        with recording(model):
            return model(tokens).logits

    cases = {"hooks present, not inspected": forward_plain, "hook-free build": forward_hook_free,
             "inspected": forward_inspected}
    with torch.no_grad():
        reference = forward_hook_free()
        for name, run in cases.items():
            if not torch.equal(run(), reference):
                raise SystemExit(f"{name}: logits differ from the hook-free build's")
        times: dict[str, list[float]] = {name: [] for name in cases}
        order = list(cases)
        for round_index in range(args.rounds):
            for name in order if round_index % 2 == 0 else order[::-1]:
                if name == "inspected" and round_index >= args.inspected_rounds:
                    continue
                start = time.perf_counter()
                cases[name]()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["hooks present, not inspected"] / medians["hook-free build"]
    # Paired by round (the two ran back to back), so a busy spell cancels out of each ratio.
    paired = [a / b for a, b in zip(times["hooks present, not inspected"], times["hook-free build"],
                                    strict=True)]
    interval = scipy.stats.bootstrap((paired,), statistics.median, confidence_level=0.95,
                                     random_state=0).confidence_interval
    print(f"titans.lmm forward, batch {args.batch} x {args.length} tokens, {args.rounds} rounds; "
          f"{machine()}")
    for name, median in medians.items():
        spread = (max(times[name]) - min(times[name])) / median
        print(f"  {name:30s} {median * 1e3:9.2f} ms  (spread {spread:.0%})")
    print(f"  hooks present / hook-free:     {ratio:.3f} (ratio of medians); per round: median "
          f"{statistics.median(paired):.3f}, 95% CI {interval.low:.3f} to {interval.high:.3f}")
    print(json.dumps({"benchmark": "inspect", "cpu": machine(), "batch": args.batch,
                      "length": args.length, "rounds": args.rounds,
                      "median_ms": {k: round(v * 1e3, 3) for k, v in medians.items()},
                      "ratio_hooks_over_hook_free": round(ratio, 4),
                      "paired_ratio_median": round(statistics.median(paired), 4),
                      "paired_ratio_ci95": [round(interval.low, 4), round(interval.high, 4)]}))


if __name__ == "__main__":
    main()
