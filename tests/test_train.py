"""The training command end to end: CIFAR files on disk, resume, --fresh, errors, rings."""

from __future__ import annotations

import json
import math
import re
import runpy
import sys
from pathlib import Path

import cifar_on_disk as disk
import pytest
import torch

from invertnet.train import loop, main
from invertnet.train.checkpoint import load_checkpoint, save_atomically

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cifar10(tmp_path, monkeypatch):
    disk.skip_md5_check(monkeypatch)
    disk.write_cifar10(tmp_path / "data", per_batch=4, test=6)  # 20 training images
    return tmp_path / "data"


@pytest.fixture
def cifar100(tmp_path, monkeypatch):
    disk.skip_md5_check(monkeypatch)
    disk.write_cifar100(tmp_path / "data", train=8, test=4)
    return tmp_path / "data"


def _train(*args: object) -> int:
    return main([str(a) for a in args] + ["--no-progress", "--workers", "0"])


def _metrics(results: Path) -> list[dict]:
    return [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]


def test_revnet_trains_resumes_and_matches_an_uninterrupted_run(
    cifar10, tmp_path, capsys, monkeypatch
):
    common = ["revnet38", "cifar10", "--data-dir", cifar10, "--batch-size", 10, "--epochs", 2]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(*common, "--results-dir", straight) == 0
    out = capsys.readouterr().out
    assert "final test accuracy" in out and "peak memory" in out and "wall time" in out

    # Interrupt the second run at the start of its second epoch, as Ctrl-C would.
    real_epoch = loop._Run.train_epoch

    def interrupted(run):
        if run.epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(run)

    monkeypatch.setattr(loop._Run, "train_epoch", interrupted)
    assert _train(*common, "--results-dir", split) == 130
    first = load_checkpoint(split / "checkpoint.pt")
    assert (first["epoch"], first["step"], first["model"]) == (1, 2, "revnet38")
    monkeypatch.setattr(loop._Run, "train_epoch", real_epoch)
    assert _train(*common, "--results-dir", split) == 0
    assert "resuming from" in capsys.readouterr().out

    records = _metrics(split)
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["step"] for r in records] == [2, 4]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "samples_per_s", "lr"):
        assert all(key in r for r in records)
    assert records[0]["lr"] == 0.1
    # The default memcnn recipe divides the learning rate by 10 at 50% and 75% of training.
    assert records[1]["lr"] == pytest.approx(0.001)
    # Data order and augmentation depend only on (seed, epoch): resuming changes nothing.
    a = load_checkpoint(straight / "checkpoint.pt")["model_state"]
    b = load_checkpoint(split / "checkpoint.pt")["model_state"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    summary = json.loads((split / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 4
    assert summary["test_acc"] == records[-1]["test_acc"]


def test_momentum_resnet_trains_on_cifar100_by_iterations(cifar100, tmp_path):
    results = tmp_path / "m"
    args = ["mresnet18", "cifar100", "--data-dir", cifar100, "--batch-size", 4]
    assert _train(*args, "--iterations", 3, "--gamma", 0.8, "--results-dir", results) == 0
    state = load_checkpoint(results / "checkpoint.pt")
    # 8 images in batches of 4: two steps per epoch, the second epoch cut short at step 3.
    assert state["step"] == 3 and state["epoch"] == 2
    assert state["num_classes"] == 100
    assert state["model_kwargs"] == {"gamma": 0.8, "use_backprop": False}
    assert state["model_state"]["fc.weight"].shape == (100, 512)
    assert [r["step"] for r in _metrics(results)] == [2, 3]


def test_mixed_precision_runs_on_this_device(cifar10, tmp_path):
    results = tmp_path / "amp"
    args = ["revnet38", "cifar10", "--data-dir", cifar10, "--batch-size", 10, "--amp"]
    assert _train(*args, "--iterations", 2, "--results-dir", results) == 0
    record = _metrics(results)[0]
    assert record["step"] == 2 and math.isfinite(record["train_loss"])
    assert json.loads((results / "run.json").read_text())["amp"] is True


def test_fresh_discards_earlier_results(tmp_path):
    results = tmp_path / "rings"
    args = ["mresnet_rings", "rings", "--batch-size", 500, "--results-dir", results]
    assert _train(*args, "--epochs", 2) == 0
    (results / "notes.txt").write_text("the user's own file")
    # A --fresh run that fails its checks discards nothing.
    assert _train("revnet38", "rings", "--fresh", "--results-dir", results) == 1
    assert [r["epoch"] for r in _metrics(results)] == [1, 2]
    assert _train(*args, "--epochs", 1, "--fresh") == 0
    assert [r["epoch"] for r in _metrics(results)] == [1]
    assert load_checkpoint(results / "checkpoint.pt")["epoch"] == 1
    assert (results / "notes.txt").read_text() == "the user's own file"
    # Without --fresh the finished run is resumed, not repeated.
    assert _train(*args, "--epochs", 1) == 0
    assert [r["epoch"] for r in _metrics(results)] == [1]


def test_rings_reaches_95_percent_with_a_momentum_resnet(tmp_path):
    results = tmp_path / "rings"
    assert _train("mresnet_rings", "rings", "--seed", 0, "--results-dir", results) == 0
    summary = json.loads((results / "summary.json").read_text())
    assert summary["test_acc"] >= 95.0, summary


@pytest.mark.parametrize("mode", ["--use-backprop", "exact"])
def test_divergence_stops_with_the_step_and_keeps_the_checkpoint(mode, tmp_path, capsys):
    results = tmp_path / "rings"
    args = ["mresnet_rings", "rings", "--batch-size", 500, "--results-dir", results]
    args += [mode] if mode != "exact" else []
    assert _train(*args, "--epochs", 1) == 0
    before = (results / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert _train(*args, "--epochs", 3, "--lr", 1e30) == 1
    err = capsys.readouterr().err
    # Stored activations give a NaN loss; the exact mode may first refuse values beyond
    # its fixed-point range. Either way the error names the step.
    pattern = r"(the loss is (?:nan|inf|-inf)|training diverged) at step (\d+)"
    found = re.search(pattern, err)
    assert found, err
    if mode == "--use-backprop":
        assert found.group(1).startswith("the loss is")
    assert int(found.group(2)) > 8  # 4000 points / batch 500: after the first epoch's 8 steps
    assert "checkpoint.pt (after epoch 1)" in err and "unchanged" in err
    assert (results / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(results / "checkpoint.pt")["epoch"] == 1


def test_divergence_in_the_first_epoch_says_no_checkpoint_exists(tmp_path, capsys):
    results = tmp_path / "rings"
    args = ["mresnet_rings", "rings", "--use-backprop", "--lr", 1e30, "--results-dir", results]
    assert _train(*args, "--batch-size", 500, "--epochs", 1) == 1
    assert "No checkpoint was written yet" in capsys.readouterr().err
    assert not (results / "checkpoint.pt").exists()


def test_checkpoint_write_interrupted_midway_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_atomically({"format": 1, "epoch": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomically({"format": 1, "epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_checkpoint_of_a_different_model_is_refused(cifar10, tmp_path, capsys):
    results = tmp_path / "run"
    common = ["cifar10", "--data-dir", cifar10, "--batch-size", 10, "--results-dir", results]
    assert _train("resnet32", *common, "--iterations", 1) == 0
    before = (results / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert _train("revnet38", *common, "--iterations", 2) == 1
    err = capsys.readouterr().err
    assert "different run" in err and "'resnet32'" in err and "'revnet38'" in err
    assert "--fresh" in err
    assert (results / "checkpoint.pt").read_bytes() == before


def test_checkpoint_with_other_gamma_is_refused(tmp_path, capsys):
    results = tmp_path / "rings"
    args = ["mresnet_rings", "rings", "--batch-size", 500, "--epochs", 1, "--results-dir", results]
    assert _train(*args) == 0
    assert _train(*args, "--gamma", 0.5) == 1
    assert "'gamma': 0.9" in capsys.readouterr().err


def test_unreadable_checkpoint_is_reported(tmp_path, capsys):
    results = tmp_path / "rings"
    results.mkdir()
    (results / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert _train("mresnet_rings", "rings", "--epochs", 1, "--results-dir", results) == 1
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_unwritable_results_dir_is_reported(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert _train("mresnet_rings", "rings", "--results-dir", blocker / "results") == 1
    err = capsys.readouterr().err
    assert "not writable" in err and str(blocker / "results") in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["resnet50", "cifar10"], ["unknown model 'resnet50'", "revnet38", "mresnet152"]),
        (["revnet38", "mnist"], ["unknown dataset 'mnist'", "cifar10", "cifar100", "rings"]),
        (["revnet38", "rings"], ["takes image inputs", "mresnet_rings"]),
        (["revnet38", "cifar10", "--gamma", "0.5"], ["Momentum ResNets only"]),
    ],
)
def test_bad_names_and_options_are_reported(args, expected, tmp_path, capsys):
    assert _train(*args, "--results-dir", tmp_path / "r", "--data-dir", tmp_path) == 1
    err = capsys.readouterr().err
    for text in expected:
        assert text in err


def test_cuda_device_without_cuda_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _train("mresnet_rings", "rings", "--device", "cuda", "--results-dir", tmp_path) == 1
    err = capsys.readouterr().err
    assert "--device cuda" in err and "--device cpu" in err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_missing_cifar_names_the_expected_path(tmp_path, capsys):
    args = ["revnet38", "cifar10", "--data-dir", tmp_path / "none", "--no-download"]
    assert _train(*args, "--results-dir", tmp_path / "r") == 1
    assert str(tmp_path / "none" / "cifar-10-batches-py") in capsys.readouterr().err


def test_malformed_option_is_a_usage_error(capsys):
    assert main(["revnet38", "cifar10", "--gamma", "1.5"]) == 2
    assert "gamma must be in [0, 1)" in capsys.readouterr().err
    assert main(["revnet38", "cifar10", "--epochs", "2", "--iterations", "3"]) == 2


def test_help_documents_the_recipes(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "lr 0.1, weight decay 0.0002, batch 100, 80000 iterations" in text
    assert "lr / 10 after 50% and 75%" in text
    assert "lr 0.01, weight decay 0.0005, batch 128, 220 epochs" in text
    for name in ("revnet164", "mresnet18", "mresnet_rings", "cifar100", "rings"):
        assert name in text


def test_console_script_and_module_entry_points(monkeypatch, capsys):
    from invertnet.cli import main as invertnet_main

    assert invertnet_main(["train", "--help"]) == 0
    assert "usage: invertnet train" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["python -m invertnet.train", "nosuchmodel", "rings"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("invertnet.train", run_name="__main__", alter_sys=True)
    assert exit_.value.code == 1
    assert "unknown model 'nosuchmodel'" in capsys.readouterr().err


def test_revvit_trains_on_cifar10_with_the_vit_recipe(cifar10, tmp_path, capsys):
    results = tmp_path / "revvit"
    args = ["revvit", "cifar10", "--data-dir", cifar10, "--batch-size", 10, "--epochs", 4]
    assert _train(*args, "--results-dir", results) == 0
    state = load_checkpoint(results / "checkpoint.pt")
    assert state["model"] == "revvit" and state["step"] == 8
    # The recipe's AdamW: decoupled weight decay 0.05 at lr 1e-3.
    group = state["optimizer_state"]["param_groups"][0]
    assert group["weight_decay"] == 0.05
    assert "decoupled_weight_decay" not in group or group["decoupled_weight_decay"]
    records = _metrics(results)
    assert records[0]["lr"] == pytest.approx(1e-3)
    # 20 images seen four times: a working backward through the reversible blocks
    # makes the training loss fall.
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert "AdamW, lr 0.001, weight decay 0.05" in _help_text(capsys)


def _help_text(capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["--help"]) == 0
    return capsys.readouterr().out
