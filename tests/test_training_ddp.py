"""Two CPU processes (gloo) train one run with DistributedDataParallel.

Each process runs in its own working directory with the default (relative) run directory, so a
file written by rank 1 would show up in its directory: only rank 0's may hold anything.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from memforge.training import TrainConfig, train
from memforge.training.rundir import read_metrics

pytestmark = pytest.mark.slow

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)  # two processes share the two cores
    workdir = Path(root, f"rank{rank}")
    os.chdir(workdir)
    result = train(TrainConfig(model="baseline.transformer_tiny", task="mqar",
                               task_options={"seq_len": 32, "num_pairs": 4}, steps=3, batch_size=8,
                               warmup_steps=1, eval_every=3, eval_batches=1, device="cpu"))
    # Outside the run directory, for the test to compare across ranks.
    torch.save(result.model.state_dict(), Path(root, f"params{rank}.pt"))
    torch.save({"step": result.step, "train_loss": result.train_loss}, Path(root, f"result{rank}.pt"))


def test_two_processes_keep_identical_parameters_and_only_rank_0_writes(tmp_path: Path) -> None:
    for rank in range(WORLD_SIZE):
        (tmp_path / f"rank{rank}").mkdir()
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    params = [torch.load(tmp_path / f"params{rank}.pt") for rank in range(WORLD_SIZE)]
    assert params[0].keys() == params[1].keys()
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), name
    results = [torch.load(tmp_path / f"result{rank}.pt") for rank in range(WORLD_SIZE)]
    assert results[0] == results[1]  # the logged loss is the mean over both processes

    assert list((tmp_path / "rank1").iterdir()) == []
    (run_dir,) = (tmp_path / "rank0" / "runs").iterdir()
    assert run_dir.name.startswith("baseline.transformer_tiny-") and run_dir.name.endswith("-mqar")
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000003"
    assert '"world_size": 2' in (run_dir / "run.json").read_text()
