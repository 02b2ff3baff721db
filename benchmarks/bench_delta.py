"""Benchmark: the WY delta-rule kernel against the token loop and the papers' chunkwise form.

Configuration (issue #13): Gated DeltaNet, dim 256 in 4 heads (d_k = d_v = 64), chunk 64, batch
2, 4096 tokens, float32; l2-normalised q and k, beta = sigmoid(x), g = logsigmoid(x + 3). Each
case is forward + backward (the gradient of a fixed random projection of the outputs and the final
state w.r.t. q, k, v, beta and g):

* ``wy``: ``memforge_delta.ops.gated_delta_rule`` (the WY kernel);
* ``rowwise``: ``memforge_delta.reference.chunkwise_rowwise``, the chunkwise algorithm as the
  papers write it (forward substitution row by row in each chunk), same dtype;
* ``token loop``: ``memforge_delta.reference.token_loop`` in the same dtype. It costs the same per
  token at every length, so it runs on ``--loop-tokens`` tokens and its time is scaled to
  ``--tokens`` (the output says so).

The cases take turns inside each repeat, so a busy machine slows them alike; each reports the
median of ``--repeats`` timings and the spread ``(max - min) / median``. Agreement: the kernel in
float64 against the float64 token loop (largest absolute difference; target 1e-10), and in float32
against the same loop (largest difference over the largest value; target 1e-4), outputs and final
state, at ``--tokens`` tokens.

``--solvers`` times only the chunk systems' solve, forward+backward: ``torch.linalg.solve_triangular``
(LAPACK's batched ``trsm``), the blocked inverse the kernel uses, and row-by-row substitution.

Usage: ``OMP_NUM_THREADS=2 python benchmarks/bench_delta.py [--repeats 5] [--threads 2]
[--tokens 4096] [--loop-tokens 512] [--solvers]``. Prints a table and one JSON line; report the
ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import cpu_name, timed
from memforge_delta.ops import gated_delta_rule
from memforge_delta.reference import chunkwise_rowwise, token_loop
from torch import Tensor

from memforge.engine.triangular import unit_lower_inverse

DIM, HEADS, CHUNK, BATCH = 256, 4, 64, 2
TARGETS = {"vs_token_loop": 10.0, "vs_rowwise": 1.5, "float64_abs": 1e-10, "float32_rel": 1e-4}

Op = Callable[..., tuple[Tensor, Tensor]]


def make_inputs(tokens: int, dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    """q, k, v, beta, g at the benchmark configuration (GDN-style: unit q and k, sigmoid beta)."""
    gen = torch.Generator().manual_seed(seed)
    head = DIM // HEADS

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = F.normalize(randn(BATCH, HEADS, tokens, head), dim=-1)
    k = F.normalize(randn(BATCH, HEADS, tokens, head), dim=-1)
    v = randn(BATCH, HEADS, tokens, head)
    beta = torch.sigmoid(randn(BATCH, HEADS, tokens))
    g = F.logsigmoid(randn(BATCH, HEADS, tokens) + 3)
    return [x.to(dtype) for x in (q, k, v, beta, g)]


def train_step(op: Op, inputs: list[Tensor]) -> Callable[[], None]:
    """One forward + backward of ``op`` on fresh leaves, against fixed random cotangents."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    with torch.no_grad():
        out, state = op(*leaves)
    gen = torch.Generator().manual_seed(1)
    out_cot = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    state_cot = torch.randn(state.shape, generator=gen, dtype=state.dtype)

    def step() -> None:
        out, state = op(*leaves)
        ((out * out_cot).sum() + (state * state_cot).sum()).backward()
        for leaf in leaves:
            leaf.grad = None

    return step


def solver_times(repeats: int) -> dict[str, list[float]]:
    """Forward+backward of the benchmark's chunk systems (``[B*H, T/C, C, C]``, ``d_k + d_v``
    right-hand sides) through LAPACK's ``trsm``, the blocked inverse and row-by-row substitution."""
    q, k, v, beta, g = make_inputs(4096, torch.float32)
    heads = BATCH * HEADS
    k = k.reshape(heads, -1, CHUNK, k.shape[-1])
    system = (beta.reshape(heads, -1, CHUNK, 1) * (k @ k.transpose(-1, -2))).tril(-1)
    rhs = torch.cat((v.reshape(heads, -1, CHUNK, v.shape[-1]), k), -1)
    identity = torch.eye(CHUNK)

    def rowwise(lower: Tensor) -> Tensor:
        inverse = -lower
        for i in range(1, CHUNK):
            inverse[..., i, :i] = inverse[..., i, :i].clone() + (
                inverse[..., i, :, None].clone() * inverse[..., :, :i].clone()).sum(-2)
        return inverse + identity

    methods: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "solve_triangular": lambda a, b: torch.linalg.solve_triangular(a, b, upper=False, unitriangular=True),
        "blocked inverse": lambda a, b: unit_lower_inverse(a) @ b,
        "row by row": lambda a, b: rowwise(a) @ b,
    }

    def step(method: Callable[[Tensor, Tensor], Tensor]) -> Callable[[], None]:
        a, b = system.clone().requires_grad_(), rhs.clone().requires_grad_()
        return lambda: method(a, b).square().sum().backward()

    return timed({name: step(method) for name, method in methods.items()}, repeats)


def agreement(tokens: int) -> dict[str, float]:
    """The kernel against the float64 token loop: float64 absolute, float32 relative."""
    inputs = make_inputs(tokens, torch.float64)
    with torch.no_grad():
        want = token_loop(*inputs)
        exact = gated_delta_rule(*inputs, chunk_size=CHUNK)
        single = gated_delta_rule(*(x.float() for x in inputs), chunk_size=CHUNK)
    result = {}
    for i, name in enumerate(("outputs", "state")):
        result[f"float64_abs_{name}"] = (exact[i] - want[i]).abs().max().item()
        result[f"float32_rel_{name}"] = ((single[i].double() - want[i]).abs().max()
                                         / want[i].abs().max()).item()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--loop-tokens", type=int, default=512,
                        help="tokens for the token loop, whose time is scaled to --tokens")
    parser.add_argument("--solvers", action="store_true",
                        help="only time the chunk systems' solve: trsm, blocked inverse, row by row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.solvers:
        print(f"CPU: {cpu_name()}, {args.threads} threads; forward+backward of the 4096-token "
              f"chunk systems, ms (median, min of {args.repeats})")
        for name, ts in solver_times(args.repeats).items():
            print(f"{name:<18}{statistics.median(ts) * 1e3:>9.1f}{min(ts) * 1e3:>9.1f}")
        return
    if not 0 < args.loop_tokens <= args.tokens:
        parser.error("--loop-tokens must lie in [1, --tokens]")

    inputs = make_inputs(args.tokens, torch.float32)
    loop_inputs = make_inputs(args.loop_tokens, torch.float32)
    scale = args.tokens / args.loop_tokens
    times = timed({
        "wy": train_step(lambda *x: gated_delta_rule(*x, chunk_size=CHUNK), inputs),
        "rowwise": train_step(lambda *x: chunkwise_rowwise(*x, chunk_size=CHUNK), inputs),
        "token loop": train_step(lambda *x: token_loop(*x, dtype=torch.float32), loop_inputs),
    }, args.repeats)
    times["token loop"] = [t * scale for t in times["token loop"]]
    median = {name: statistics.median(ts) for name, ts in times.items()}
    spread = {name: (max(ts) - min(ts)) / median[name] for name, ts in times.items()}
    speedup = {"vs_token_loop": median["token loop"] / median["wy"],
               "vs_rowwise": median["rowwise"] / median["wy"]}
    agree = agreement(args.tokens)

    print(f"CPU: {cpu_name()}, {args.threads} threads, torch {torch.__version__}")
    print(f"Gated DeltaNet forward+backward, {args.tokens} tokens, batch {BATCH}, {HEADS} heads of "
          f"{DIM // HEADS}, chunk {CHUNK}, float32, median of {args.repeats}")
    print(f"(token loop timed on {args.loop_tokens} tokens and scaled x{scale:g} to {args.tokens})")
    print(f"{'case':<12}{'ms':>10}{'tokens/s':>12}{'spread':>9}{'WY speed-up':>13}")
    for name in ("wy", "rowwise", "token loop"):
        ratio = median[name] / median["wy"]
        print(f"{name:<12}{median[name] * 1e3:>10.1f}{BATCH * args.tokens / median[name]:>12.0f}"
              f"{spread[name]:>9.0%}{ratio:>12.2f}x")
    print(f"agreement with the float64 token loop at {args.tokens} tokens: float64 max |diff| "
          f"{agree['float64_abs_outputs']:.1e} (outputs), {agree['float64_abs_state']:.1e} (state); "
          f"float32 relative {agree['float32_rel_outputs']:.1e} (outputs), "
          f"{agree['float32_rel_state']:.1e} (state)")
    met = {
        "vs_token_loop": speedup["vs_token_loop"] >= TARGETS["vs_token_loop"],
        "vs_rowwise": speedup["vs_rowwise"] >= TARGETS["vs_rowwise"],
        "float64": max(agree["float64_abs_outputs"], agree["float64_abs_state"]) <= TARGETS["float64_abs"],
        "float32": max(agree["float32_rel_outputs"], agree["float32_rel_state"]) <= TARGETS["float32_rel"],
    }
    print("targets: " + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in met.items()))
    print(json.dumps({
        "bench": "delta", "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
        "tokens": args.tokens, "loop_tokens": args.loop_tokens, "batch": BATCH, "heads": HEADS,
        "head_dim": DIM // HEADS, "chunk": CHUNK, "repeats": args.repeats,
        "median_ms": {k: round(v * 1e3, 2) for k, v in median.items()},
        "spread": {k: round(v, 3) for k, v in spread.items()},
        "speedup": {k: round(v, 2) for k, v in speedup.items()},
        "agreement": agree, "targets": TARGETS, "targets_met": met,
    }))


if __name__ == "__main__":
    main()
