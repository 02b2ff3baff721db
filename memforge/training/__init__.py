"""Training and evaluation jobs: ``train(TrainConfig) -> TrainResult`` and ``evaluate(EvalConfig)``.

::

    from memforge.training import EvalConfig, TrainConfig, evaluate, train
    result = train(TrainConfig(model="baseline.transformer_tiny", task="mqar", steps=200))
    result.metrics["accuracy"], result.run_dir
    report = evaluate(EvalConfig(source=result.run_dir, lengths=(256, 1024)))

The CLI (``memforge train``, ``memforge eval``; see :mod:`memforge.training.commands`) is a thin
layer over these functions.
"""

from memforge.training.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_weights
from memforge.training.config import DEFAULT_PRESET, DEFAULT_TASK, TrainConfig, TrainingError
from memforge.training.evaluate import EvalConfig, EvalReport, evaluate, report_table, write_report
from memforge.training.loop import TrainResult, batch_seed, train
from memforge.training.stopping import TrainingInterrupted

__all__ = [
    "DEFAULT_PRESET",
    "DEFAULT_TASK",
    "Checkpoint",
    "CheckpointError",
    "EvalConfig",
    "EvalReport",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "TrainingInterrupted",
    "batch_seed",
    "evaluate",
    "load_checkpoint",
    "load_weights",
    "report_table",
    "train",
    "write_report",
]
