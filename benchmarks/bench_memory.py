"""Benchmark: the Titans memory layer, memforge against titans-pytorch, side by side in one run.

Configuration (issue #3): dim 256, 4 heads of 64, 2-layer MLP memory with expansion 4 (residual +
layer norm around it, the peer's default), chunk 64, batch 2, float32, 2 threads. memforge runs
without the q/k/v convolution here because the peer has none (equal configurations).

Cases, each timed ``--repeats`` times (median and spread = (max - min) / median):

* forward+backward tokens/s at 1024 and 4096 tokens (and 16384 for memforge with ``--long``);
* no-grad forward tokens/s at 4096;
* single-token decode tokens/s after a 64-token prompt;
* peak memory of one forward+backward (resident set growth, measured in a fresh subprocess);
* matmul FLOPs per token of forward+backward (counted by ``torch.utils.flop_counter``), the
  machine's measured fp32 matmul rate (a 1024^3 product), and the fraction of it each train case
  reaches.

The peer runs in two settings: ``batch_size=64`` (weights refreshed every chunk: the paper's
semantics, which memforge computes exactly) and its default ``batch_size=None`` (every surprise
taken at the initial weights). Its default maximum step size (1.0) diverges to NaN at 4096 tokens
in the paper setting, so the peer runs with ``max_lr=1e-2`` throughout (stated in the output).

``--keep-freed-memory`` makes glibc keep freed memory in the benchmark's processes, as
``memforge train`` and ``eval`` do (``memforge.training.allocator``): both libraries then run
without the page faults of re-mapping blocks over 32 MB every step.

``--compile`` adds memforge through ``memforge.compile_model`` (each whole chunk one
``torch.compile``-d graph, the projections around the scan compiled too); compilation happens in
the untimed warm-up, and the FLOPs are the eager ones (compiling changes no matmul).

Usage: ``python benchmarks/bench_memory.py [--repeats 5] [--long] [--quick] [--compile]
[--keep-freed-memory] [--device cuda]`` (``--profile``: only the op-level profile of memforge's
forward+backward).
Needs the ``bench`` extra (``pip install -e ".[bench]"``). Prints a table and one JSON line; report
ratios. On CUDA every timing ends with a device synchronisation and the peak is the allocator's
peak (``torch.cuda.max_memory_allocated``) above what was allocated before the step.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

DIM, HEADS, CHUNK, BATCH = 256, 4, 64, 2
PEER_MAX_LR = 1e-2


def memforge_layer(read: str) -> torch.nn.Module:
    """memforge's memory layer at the benchmark configuration, reading with ``read``."""
    import memforge
    from memforge.builder import _context
    from memforge.plugins import default_registry

    spec = memforge.preset(
        "titans.lmm", dim=DIM, heads=HEADS, retrieval=read, projection="titans.plain_qkv",
        memory={"depth": 2, "expansion": 4.0, "residual": True, "norm": True},
        memory_layer={"chunk_size": CHUNK},
    )
    return _context(spec, default_registry(), 0).build("memory_layer")


def peer_layer(paper: bool) -> torch.nn.Module:
    """titans-pytorch's NeuralMemory at the same configuration."""
    from titans_pytorch import NeuralMemory

    return NeuralMemory(
        dim=DIM, chunk_size=CHUNK, batch_size=CHUNK if paper else None, dim_head=DIM // HEADS,
        heads=HEADS, default_step_transform_max_lr=PEER_MAX_LR,
        default_model_kwargs=dict(depth=2, expansion_factor=4.0),
    )


#: The suffix of a memforge implementation run through ``memforge.compile_model``.
COMPILED = "+compiled"


def build(impl: str):
    """``memforge-chunk-start``, ``memforge-exact``, ``peer-paper`` or ``peer-default``; a memforge
    name may end in ``+compiled`` (the layer through ``memforge.compile_model``)."""
    import memforge

    torch.manual_seed(0)
    base = impl.removesuffix(COMPILED)
    layer = {
        "memforge-chunk-start": lambda: memforge_layer("titans.chunk_start"),
        "memforge-exact": lambda: memforge_layer("titans.after_write"),
        "peer-paper": lambda: peer_layer(True),
        "peer-default": lambda: peer_layer(False),
    }[base]().to(DEVICE)
    return memforge.compile_model(layer) if impl.endswith(COMPILED) else layer


def call(layer: torch.nn.Module, x: torch.Tensor, state=None):
    """One call of either implementation: ``(output, state)``."""
    return layer(x, state=state)


#: Where the benchmark runs (``--device``); inputs are made on the CPU generator and moved there.
DEVICE = torch.device("cpu")
#: Whether glibc keeps freed memory in this process (``--keep-freed-memory``), passed to children.
KEEP_FREED_MEMORY = False


def inputs(steps: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, steps, DIM, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def synchronize() -> None:
    """Wait for queued device work, so a timer measures it (a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def time_train(layer, steps: int) -> float:
    x = inputs(steps).requires_grad_()
    start = time.perf_counter()
    out, _ = call(layer, x)
    out.float().square().mean().backward()
    synchronize()
    return time.perf_counter() - start


def time_forward(layer, steps: int) -> float:
    x = inputs(steps)
    with torch.no_grad():
        synchronize()
        start = time.perf_counter()
        call(layer, x)
        synchronize()
        return time.perf_counter() - start


def time_decode(layer, steps: int = 64, prompt: int = 64) -> float:
    x = inputs(prompt + steps)
    with torch.no_grad():
        _, state = call(layer, x[:, :prompt])
        synchronize()
        start = time.perf_counter()
        for t in range(prompt, prompt + steps):
            _, state = call(layer, x[:, t : t + 1], state)
        synchronize()
        return time.perf_counter() - start


def measure_peak(impl: str, steps: int, threads: int) -> float:
    """GiB of memory growth during one forward+backward: the CUDA allocator's peak on a GPU, else
    the resident-set growth in a fresh process."""
    if DEVICE.type == "cuda":
        layer = build(impl)
        time_train(layer, 64)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        before = torch.cuda.memory_allocated(DEVICE)
        time_train(layer, steps)
        return (torch.cuda.max_memory_allocated(DEVICE) - before) / 2**30
    command = [sys.executable, os.path.abspath(__file__), "--peak-child", impl, str(steps),
               "--threads", str(threads)] + (["--keep-freed-memory"] if KEEP_FREED_MEMORY else [])
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_child(impl: str, steps: int) -> None:
    """Run in the fresh process of :func:`measure_peak`: print the resident-set growth in GiB."""
    layer = build(impl)
    time_train(layer, 64)  # allocator and lazy initialisation out of the way
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak (VmHWM) to the current resident set
    resident = _status_bytes("VmRSS")
    time_train(layer, steps)
    print((_status_bytes("VmHWM") - resident) / 2**30)


def flops_per_token(impl: str, steps: int = 1024) -> float:
    """Matmul FLOPs of one forward+backward per token, as ``torch.utils.flop_counter`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    layer = build(impl)
    x = inputs(steps).requires_grad_()
    with FlopCounterMode(display=False) as counter:
        out, _ = call(layer, x)
        out.float().square().mean().backward()
    return counter.get_total_flops() / (BATCH * steps)


def matmul_rate(size: int = 1024, repeats: int = 5) -> float:
    """The machine's fp32 matmul rate in FLOP/s: the median of ``repeats`` ``size^3`` products,
    the better of PyTorch's own matmul and :func:`memforge.linear.linear` (oneDNN on x86 CPUs,
    faster than PyTorch's MKL call on AMD processors), so the fraction is of what this machine does."""
    from memforge.linear import linear

    a, b = (torch.randn(size, size, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i in (1, 2))
    rates = []
    for product in (torch.mm, linear):
        product(a, b)  # warm-up
        times = []
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            product(a, b)
            synchronize()
            times.append(time.perf_counter() - start)
        rates.append(2 * size**3 / statistics.median(times))
    return max(rates)


def profile(impl: str, steps: int) -> None:
    """Print the ops that take the most time in one forward+backward (after a warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    layer = build(impl)
    time_train(layer, steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        time_train(layer, steps)
    key = "self_cuda_time_total" if DEVICE.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def summarise(times: list[float], tokens: int) -> dict:
    rates = [tokens / t for t in times]
    median = statistics.median(rates)
    return {"tokens_per_s": median, "spread": (max(rates) - min(rates)) / median, "runs": len(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--long", action="store_true", help="also memforge at 16384 tokens")
    parser.add_argument("--quick", action="store_true", help="1 repeat, no memory (smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory, as memforge train/eval do (both libraries)")
    parser.add_argument("--compile", action="store_true",
                        help="also memforge through memforge.compile_model (compiled chunk steps)")
    parser.add_argument("--profile", action="store_true",
                        help="only print where memforge's forward+backward at 1024 tokens spends its time")
    parser.add_argument("--peak-child", nargs=2, metavar=("IMPL", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE, KEEP_FREED_MEMORY
    if args.keep_freed_memory:
        from memforge.training.allocator import keep_freed_memory

        KEEP_FREED_MEMORY = keep_freed_memory()
    DEVICE = torch.device(args.device)
    if args.peak_child:
        peak_child(args.peak_child[0], int(args.peak_child[1]))
        return
    if args.profile:
        profile("memforge-chunk-start", 1024)
        return
    repeats = 1 if args.quick else args.repeats
    impls = ["memforge-chunk-start", "memforge-exact", "peer-paper", "peer-default"]
    if args.compile:
        impls[2:2] = ["memforge-chunk-start" + COMPILED, "memforge-exact" + COMPILED]
    layers = {impl: build(impl) for impl in impls}
    cases: list[tuple[str, int, Callable]] = [
        ("train", 1024, time_train), ("train", 4096, time_train), ("forward", 4096, time_forward),
        ("decode", 64, time_decode),
    ]
    if args.long:
        cases.append(("train", 16384, time_train))
    results: dict[str, dict] = {}
    for case, steps, timer in cases:
        chosen = [i for i in impls if not (steps > 4096 and i.startswith("peer"))]
        for impl in chosen:  # warm-up, then interleave implementations to spread machine noise
            timer(layers[impl], steps)  # the same length: a compiled layer compiles for it here
        times: dict[str, list[float]] = {impl: [] for impl in chosen}
        for _ in range(repeats):
            for impl in chosen:
                times[impl].append(timer(layers[impl], steps))
        for impl in chosen:
            results[f"{impl}/{case}@{steps}"] = summarise(times[impl], BATCH * steps)
    if not args.quick:
        for impl in impls:
            for steps in (1024, 4096):
                results[f"{impl}/peak_gib@{steps}"] = {"gib": measure_peak(impl, steps, args.threads)}

    def rate(key: str) -> float:
        return results[key]["tokens_per_s"]

    machine_rate = matmul_rate()
    efficiency = {"matmul_gflops": machine_rate / 1e9}
    for impl in impls:
        # Compiling changes no matmul, and the counter does not see inside compiled graphs.
        flops = efficiency[impl.removesuffix(COMPILED)]["mflops_per_token"] * 1e6 if (
            impl.endswith(COMPILED)) else flops_per_token(impl)
        efficiency[impl] = {"mflops_per_token": flops / 1e6}
        for steps in (1024, 4096):
            efficiency[impl][f"fraction_of_matmul_rate@{steps}"] = (
                flops * rate(f"{impl}/train@{steps}") / machine_rate)

    ratios = {
        "chunk_start_vs_peer_paper_train@1024": rate("memforge-chunk-start/train@1024")
        / rate("peer-paper/train@1024"),
        "chunk_start_vs_peer_paper_train@4096": rate("memforge-chunk-start/train@4096")
        / rate("peer-paper/train@4096"),
        "chunk_start_vs_peer_default_train@1024": rate("memforge-chunk-start/train@1024")
        / rate("peer-default/train@1024"),
        "chunk_start_vs_peer_default_train@4096": rate("memforge-chunk-start/train@4096")
        / rate("peer-default/train@4096"),
        "chunk_start_flatness_4096_vs_1024": rate("memforge-chunk-start/train@4096")
        / rate("memforge-chunk-start/train@1024"),
        "exact_vs_peer_paper_train@1024": rate("memforge-exact/train@1024") / rate("peer-paper/train@1024"),
        "chunk_start_vs_peer_default_forward@4096": rate("memforge-chunk-start/forward@4096")
        / rate("peer-default/forward@4096"),
        "chunk_start_vs_peer_default_decode": rate("memforge-chunk-start/decode@64")
        / rate("peer-default/decode@64"),
    }
    if args.compile:
        for read in ("chunk_start", "exact"):
            compiled = f"memforge-{read.replace('_', '-')}{COMPILED}"
            for peer, steps in (("paper", 1024), ("paper", 4096), ("default", 1024), ("default", 4096)):
                ratios[f"compiled_{read}_vs_peer_{peer}_train@{steps}"] = (
                    rate(f"{compiled}/train@{steps}") / rate(f"peer-{peer}/train@{steps}"))
            ratios[f"compiled_{read}_vs_peer_default_forward@4096"] = (
                rate(f"{compiled}/forward@4096") / rate("peer-default/forward@4096"))
        ratios["compiled_chunk_start_flatness_4096_vs_1024"] = (
            rate(f"memforge-chunk-start{COMPILED}/train@4096")
            / rate(f"memforge-chunk-start{COMPILED}/train@1024"))
    if args.long:
        ratios["chunk_start_flatness_16384_vs_1024"] = rate("memforge-chunk-start/train@16384") / rate(
            "memforge-chunk-start/train@1024"
        )
    if not args.quick:
        peak = {impl: results[f"{impl}/peak_gib@4096"]["gib"] for impl in impls}
        ratios["chunk_start_vs_peer_default_peak@4096"] = peak["memforge-chunk-start"] / peak["peer-default"]
    print_table(results, ratios, efficiency)
    versions = {name: importlib.metadata.version(name) for name in ("memforge", "titans-pytorch", "torch")}
    print(json.dumps({"bench": "memory", "versions": versions, "device": device_name(),
                      "keep_freed_memory": KEEP_FREED_MEMORY,
                      "threads": args.threads,
                      "peer_max_lr": PEER_MAX_LR, "repeats": repeats, "results": results,
                      "ratios": ratios, "efficiency": efficiency}))


def device_name() -> str:
    """What ran the benchmark: the GPU's name, or ``cpu``."""
    return torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"


def print_table(results: dict, ratios: dict, efficiency: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"memory layer on {device_name()}: dim {DIM}, {HEADS} heads, chunk {CHUNK}, "
                  f"batch {BATCH}, fp32 (peer max_lr={PEER_MAX_LR})")
    for column in ("case", "tokens/s (median)", "spread", "peak GiB"):
        table.add_column(column)
    for key, value in results.items():
        if "tokens_per_s" in value:
            table.add_row(key, f"{value['tokens_per_s']:,.0f}", f"{value['spread']:.0%}", "")
        else:
            table.add_row(key, "", "", f"{value['gib']:.2f}")
    ratio_table = Table(title="ratios (memforge / titans-pytorch unless noted)")
    ratio_table.add_column("ratio")
    ratio_table.add_column("value")
    for key, value in ratios.items():
        ratio_table.add_row(key, f"{value:.2f}x")
    flop_table = Table(title=f"matmul FLOPs (machine: {efficiency['matmul_gflops']:.0f} GFLOP/s fp32)")
    for column in ("implementation", "MFLOP/token (fwd+bwd)", "share of matmul rate @1024", "@4096"):
        flop_table.add_column(column)
    for impl, entry in efficiency.items():
        if isinstance(entry, dict):
            flop_table.add_row(impl, f"{entry['mflops_per_token']:.2f}",
                               f"{entry['fraction_of_matmul_rate@1024']:.1%}",
                               f"{entry['fraction_of_matmul_rate@4096']:.1%}")
    console = Console()
    console.print(table)
    console.print(ratio_table)
    console.print(flop_table)


if __name__ == "__main__":
    main()
