"""The training loop of ``invertnet train``."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from invertnet._optional import require
from invertnet.models import get_model, model_entry
from invertnet.train.checkpoint import FORMAT, check_identity, load_checkpoint, save_atomically
from invertnet.train.config import RunConfig
from invertnet.train.data import DATASETS, LoadedData, load_dataset
from invertnet.train.errors import NonFiniteLossError, TrainingError
from invertnet.train.recipes import learning_rate_at
from invertnet.train.results import ResultsDir

__all__ = ["Summary", "peak_memory_mb", "run_training"]

Echo = Callable[[str], None]


@dataclass(frozen=True)
class Summary:
    """How a run ended.

    Attributes
    ----------
    test_acc, test_loss : float
        On the test set after the last epoch (accuracy in percent).
    epochs, steps : int
        Completed epochs and optimisation steps.
    peak_memory_mb : float
        Peak CUDA memory allocated, or on CPU the process's peak resident set.
    memory_kind : str
        Which of the two ``peak_memory_mb`` is.
    wall_time_s : float
        Time of this invocation.
    train_time_s : float
        Training time summed over all invocations of the run (resumes included).
    """

    test_acc: float
    test_loss: float
    epochs: int
    steps: int
    peak_memory_mb: float
    memory_kind: str
    wall_time_s: float
    train_time_s: float


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory of this process on ``device`` in MiB, and what was measured."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA memory allocated"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "process peak resident set"
    except OSError:
        pass
    try:  # POSIX only: not on Windows
        import resource
    except ImportError:
        return float("nan"), "unavailable (no /proc/self/status or resource module)"
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, "process peak resident set"


def _epoch_seed(seed: int, epoch: int) -> int:
    # Each epoch's data order and augmentation depend only on (seed, epoch), so a
    # resumed run sees exactly the batches an uninterrupted one would.
    return (seed * 1_000_003 + epoch) % 2**63


def _build_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


class _Run:
    """State of one invocation; see :func:`run_training`."""

    def __init__(self, config: RunConfig, echo: Echo) -> None:
        self.config = config
        self.echo = echo
        self.device = torch.device(config.device)
        self.results = ResultsDir(config.results_dir)
        entry = model_entry(config.model)

        kind = DATASETS[config.dataset].input_kind
        if kind != entry.input_kind:
            raise TrainingError(
                f"model {config.model!r} takes {entry.input_kind} inputs but dataset "
                f"{config.dataset!r} has {kind}; "
                + (
                    "use mresnet_rings for rings"
                    if kind == "points"
                    else "use an image model (resnet*, revnet*, mresnet18...) for CIFAR"
                )
            )
        self.results.ensure_writable()
        self.data: LoadedData = load_dataset(
            config.dataset, config.data_dir, download=config.download, seed=config.seed
        )
        self.identity = {
            "model": config.model,
            "dataset": config.dataset,
            "num_classes": self.data.num_classes,
            "model_kwargs": dict(config.model_kwargs),
        }
        torch.manual_seed(config.seed)
        self.model = get_model(
            config.model, num_classes=self.data.num_classes, **config.model_kwargs
        ).to(self.device)
        self.optimizer = _build_optimizer(config, self.model)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=config.amp and self.device.type == "cuda"
        )
        self.criterion = nn.CrossEntropyLoss()

        self.steps_per_epoch = math.ceil(len(self.data.train) / config.batch_size)
        self.total_steps = (
            config.iterations
            if config.iterations is not None
            else config.epochs * self.steps_per_epoch
        )
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.epoch = 0
        self.step = 0
        self.train_time = 0.0
        self.last_eval: dict[str, float] = {}

    # -- checkpoints --------------------------------------------------------------
    def resume(self) -> None:
        path = self.results.checkpoint
        if self.config.fresh:
            self.results.discard()
            return
        if not path.exists():
            return
        state = load_checkpoint(path)
        check_identity(state, self.identity, path)
        try:
            self.model.load_state_dict(state["model_state"])
            self.optimizer.load_state_dict(state["optimizer_state"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise TrainingError(
                f"checkpoint {path} does not fit model {self.config.model!r} ({exc}); "
                "pass --fresh to discard it"
            ) from None
        if state.get("scaler_state") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler_state"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.train_time = float(state.get("train_time_s", 0.0))
        self.last_eval = dict(state.get("last_eval", {}))
        self.results.keep_metrics_up_to(self.epoch)
        self.echo(f"resuming from {path} after epoch {self.epoch} (step {self.step})")

    def save(self) -> None:
        state = {
            "format": FORMAT,
            **self.identity,
            "epoch": self.epoch,
            "step": self.step,
            "train_time_s": self.train_time,
            "last_eval": self.last_eval,
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scaler_state": self.scaler.state_dict(),
            "config": self.config.to_json(),
        }
        save_atomically(state, self.results.checkpoint)

    # -- data ---------------------------------------------------------------------
    def _loader(self, train: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(_epoch_seed(self.config.seed, self.epoch))
        return DataLoader(
            self.data.train if train else self.data.test,
            batch_size=self.config.batch_size,
            shuffle=train,
            generator=generator if train else None,
            num_workers=self.config.workers,
            pin_memory=self.device.type == "cuda",
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.config.amp:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- one epoch ------------------------------------------------------------------
    def _batches(self, loader: DataLoader, limit: int) -> Iterator[tuple[torch.Tensor, ...]]:
        for index, (x, y) in enumerate(loader):
            if index >= limit:
                return
            yield (
                x.to(self.device, non_blocking=True),
                y.to(self.device, non_blocking=True),
            )

    def train_epoch(self) -> dict[str, float]:
        config = self.config
        self.model.train()
        # Augmentation in the main process draws from the global generator.
        torch.manual_seed(_epoch_seed(config.seed, self.epoch))
        steps = min(self.steps_per_epoch, self.total_steps - self.step)
        loss_sum, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        tqdm = require("tqdm", "train", "invertnet train's progress bar").tqdm
        bar = tqdm(
            total=steps,
            desc=f"epoch {self.epoch + 1}/{self.num_epochs}",
            unit="batch",
            disable=not config.progress,
            leave=False,
            file=sys.stderr,
        )
        with bar:
            for batch, (x, y) in enumerate(self._batches(self._loader(True), steps)):
                lr = learning_rate_at(self.step, self.total_steps, config.lr, config.milestones)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                try:
                    logits, value = self._step(x, y)
                except OverflowError as exc:
                    # Momentum ResNets' exact memory-saving mode refuses values too large
                    # for its fixed-point state: the same divergence as a non-finite loss.
                    raise NonFiniteLossError(
                        f"training diverged at step {self.step + 1} (epoch {self.epoch + 1}, "
                        f"batch {batch + 1}): {exc}. {self._stopped_note()}"
                    ) from None
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"the loss is {value} at step {self.step + 1} (epoch {self.epoch + 1}, "
                        f"batch {batch + 1}); training stopped before applying it. "
                        f"{self._stopped_note()}"
                    )
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.step += 1
                loss_sum += value * y.numel()
                correct += int((logits.argmax(1) == y).sum())
                seen += y.numel()
                elapsed = time.perf_counter() - start
                bar.set_postfix(
                    loss=f"{loss_sum / seen:.4f}",
                    acc=f"{100 * correct / seen:.2f}%",
                    samples_s=f"{seen / max(elapsed, 1e-9):.0f}",
                    refresh=False,
                )
                bar.update(1)
        elapsed = time.perf_counter() - start
        self.train_time += elapsed
        return {
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": 100.0 * correct / max(seen, 1),
            "samples_per_s": seen / max(elapsed, 1e-9),
            "epoch_time_s": elapsed,
            "lr": learning_rate_at(self.step - 1, self.total_steps, config.lr, config.milestones),
        }

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Forward and backward of one batch; the optimiser step is left to the caller."""
        with self._autocast():
            logits = self.model(x)
            loss = self.criterion(logits.float(), y)
        value = loss.item()
        self.optimizer.zero_grad(set_to_none=True)
        if math.isfinite(value):
            self.scaler.scale(loss).backward()
        return logits, value

    def _stopped_note(self) -> str:
        if self.results.checkpoint.exists():
            return (
                f"The last good checkpoint, {self.results.checkpoint} (after epoch "
                f"{self.epoch}), is unchanged; a lower --lr usually helps"
            )
        return (
            "No checkpoint was written yet (this was the first epoch); a lower --lr usually helps"
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in self._batches(self._loader(False), len(self.data.test)):
            with self._autocast():
                logits = self.model(x)
            loss_sum += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            seen += y.numel()
        return {"test_loss": loss_sum / max(seen, 1), "test_acc": 100.0 * correct / max(seen, 1)}

    def run(self) -> Summary:
        started = time.perf_counter()
        self.resume()
        self.results.write_json(ResultsDir.RUN, self.config.to_json())
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        while self.step < self.total_steps:
            record = self.train_epoch()
            self.last_eval = self.evaluate()
            self.epoch += 1
            self.save()
            peak, _ = peak_memory_mb(self.device)
            self.results.append_metrics(
                {
                    "epoch": self.epoch,
                    "step": self.step,
                    **record,
                    **self.last_eval,
                    "peak_memory_mb": peak,
                }
            )
            self.echo(
                f"epoch {self.epoch}/{self.num_epochs}: train loss {record['train_loss']:.4f}"
                f" acc {record['train_acc']:.2f}% | test loss {self.last_eval['test_loss']:.4f}"
                f" acc {self.last_eval['test_acc']:.2f}% | {record['samples_per_s']:.0f}"
                " samples/s"
            )
        if not self.last_eval:
            self.last_eval = self.evaluate()
        peak, kind = peak_memory_mb(self.device)
        summary = Summary(
            test_acc=self.last_eval["test_acc"],
            test_loss=self.last_eval["test_loss"],
            epochs=self.epoch,
            steps=self.step,
            peak_memory_mb=peak,
            memory_kind=kind,
            wall_time_s=time.perf_counter() - started,
            train_time_s=self.train_time,
        )
        self.results.write_json(ResultsDir.SUMMARY, asdict(summary))
        return summary


def run_training(config: RunConfig, echo: Echo | None = None) -> Summary:
    """Train ``config.model`` on ``config.dataset``, resuming from a checkpoint if present.

    Parameters
    ----------
    config : RunConfig
        The resolved settings.
    echo : callable, optional
        Receives one line of progress per epoch (the command writes it to stdout).

    Returns
    -------
    Summary
        Final test accuracy, peak memory and times.

    Raises
    ------
    TrainingError
        For unusable settings, data, results directory or checkpoint, and
        (:class:`NonFiniteLossError`) when the loss stops being finite.
    """
    return _Run(config, echo or (lambda line: None)).run()
