"""The results directory of a run: checkpoint, per-epoch metrics, summary."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from invertnet.train.errors import TrainingError

__all__ = ["ResultsDir"]


class ResultsDir:
    """Files of one run under one directory.

    ``checkpoint.pt`` (the last completed epoch), ``metrics.jsonl`` (one JSON object
    per epoch), ``run.json`` (the settings of the latest invocation) and
    ``summary.json`` (written when training ends).

    Parameters
    ----------
    path : pathlib.Path
        The directory; created if missing.
    """

    CHECKPOINT = "checkpoint.pt"
    METRICS = "metrics.jsonl"
    RUN = "run.json"
    SUMMARY = "summary.json"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    def ensure_writable(self) -> None:
        """Create the directory and prove that files can be written in it.

        Raises
        ------
        TrainingError
            If the directory cannot be created or written.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as exc:
            raise TrainingError(
                f"results directory {self.path} is not writable ({exc.strerror or exc}); "
                "pass a writable --results-dir"
            ) from None

    def discard(self) -> None:
        """Remove earlier results (``--fresh``)."""
        # Only this command's own files: the directory may hold the user's others.
        for name in (self.CHECKPOINT, self.METRICS, self.RUN, self.SUMMARY):
            (self.path / name).unlink(missing_ok=True)

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        """Write ``name`` atomically as indented JSON."""
        target = self.path / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.path)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, target)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one epoch's record to ``metrics.jsonl``."""
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        """All records of ``metrics.jsonl`` (none if it does not exist)."""
        if not self.metrics.exists():
            return []
        with open(self.metrics) as f:
            return [json.loads(line) for line in f if line.strip()]

    def keep_metrics_up_to(self, epoch: int) -> None:
        """Drop records of epochs after ``epoch`` (written after the last checkpoint)."""
        records = [r for r in self.read_metrics() if r.get("epoch", 0) <= epoch]
        fd, tmp = tempfile.mkstemp(prefix=f".{self.METRICS}.", suffix=".tmp", dir=self.path)
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, self.metrics)
