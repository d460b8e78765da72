"""``invertnet train MODEL DATASET``: the memcnn and momentumnet experiments.

Run ``invertnet train --help`` for the options and the default recipes. The same
command runs as ``python -m invertnet.train MODEL DATASET``.
"""

from invertnet.train.cli import build_parser, main
from invertnet.train.config import RunConfig
from invertnet.train.data import available_datasets, load_dataset, make_rings
from invertnet.train.errors import NonFiniteLossError, TrainingError
from invertnet.train.loop import Summary, run_training

__all__ = [
    "NonFiniteLossError",
    "RunConfig",
    "Summary",
    "TrainingError",
    "available_datasets",
    "build_parser",
    "load_dataset",
    "main",
    "make_rings",
    "run_training",
]
