"""Bad inputs that are found only once a run is under way: a width set without 32 (the fp32
baseline must still be measured), a CIFAR-10 download that cannot reach the network (nothing
half-downloaded is left), and a task whose own loss returns NaN or more than one number (the
run ends on the first trial that meets it, with one line, keeping what finished)."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import optuna
import pytest
import torch
from search_fixture import run_short_search

from autocompress.cli import main
from autocompress.errors import DataSpecError
from autocompress.intake import load_data
from autocompress.train.losses import TaskLossError, checked_task_loss

# -- --bits without 32 ------------------------------------------------------------------------


def test_bits_without_32_still_measure_the_fp32_baseline(tmp_path: Path) -> None:
    short = run_short_search(tmp_path, study="no32", bits=(8, 4), trials=1, finetune_steps=10,
                             learning_rate=1e-3, latency_repeats=1, budgets=(),
                             warm_starts=False, guided=False)
    baselines = {r.baseline: r for r in short.result.records if r.baseline}
    fp32 = baselines["fp32"]
    assert fp32.state == "COMPLETE" and fp32.measured, fp32.fail_reason
    assert set(fp32.plan["bits"].values()) == {32}  # the fp32 file, though 32 is not searched
    assert short.result.fp32 is not None and short.result.fp32.number == fp32.number
    assert baselines["int8-ptq"].state == "COMPLETE"
    searched = [r for r in short.result.records if r.baseline is None]
    assert searched and all(set(r.plan["bits"].values()) <= {8, 4} for r in searched)
    # the sampler sees the fp32 trial inside its space (the widest width searched), with
    # every param a search trial has: multivariate TPE keeps its common search space
    trials = optuna.load_study(study_name="no32", storage=short.storage_url).trials
    fp32_params = trials[fp32.number].params
    assert {v for k, v in fp32_params.items() if k.startswith("bits/")} == {8}
    assert set(fp32_params) == set(trials[searched[0].number].params)


# -- cifar10 without network --------------------------------------------------------------------


def _half_download(url: str, root: str, filename: str | None = None,
                   md5: str | None = None, **kwargs: object) -> None:
    """A download that wrote part of the archive and then lost the network."""
    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / (filename or "archive")).write_bytes(b"\x1f\x8b partial")
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "existing-folder"])
def test_cifar10_download_failure_says_how_to_use_a_local_copy_and_leaves_nothing(
    existing: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "download_url", _half_download)
    root = tmp_path / "data" / "cifar"
    if existing:
        root.mkdir(parents=True)
        (root / "notes.txt").write_text("mine")
    with pytest.raises(DataSpecError) as info:
        load_data(f"cifar10:{root}")
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("could not download CIFAR-10", "URLError", "cifar-10-batches-py",
                     "imagefolder:ROOT"):
        assert fragment in message, message
    if existing:  # the user's folder stays, with only what it held
        assert [p.name for p in root.iterdir()] == ["notes.txt"]
    else:  # every folder the download made is gone
        assert list(tmp_path.iterdir()) == []


def test_cifar10_folder_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cifar"
    path.write_text("x")
    with pytest.raises(DataSpecError, match="is a file"):
        load_data(f"cifar10:{path}")
    assert path.read_text() == "x"


# -- a task's own loss --------------------------------------------------------------------------


OUTPUTS, TARGETS = torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("loss, fragment", [
    (lambda o, t: o.sum() * float("nan"), "returned nan on finite outputs [4, 3]"),
    (lambda o, t: o.sum() + float("inf"), "returned inf"),
    (lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="none"),
     "returned a tensor of shape [4]"),
    (lambda o, t: 0.5, "returned float"),
    (lambda o, t: None, "returned NoneType"),
    (lambda o, t: o[:, 7].mean(), "raised IndexError"),
], ids=["nan", "inf", "per-sample", "float", "none", "raises"])
def test_a_task_loss_that_cannot_train_is_one_line(loss: object, fragment: str) -> None:
    with pytest.raises(TaskLossError) as info:
        checked_task_loss(loss, OUTPUTS, TARGETS)  # type: ignore[arg-type]
    assert "\n" not in str(info.value) and fragment in str(info.value)
    assert "fix `loss` in your --task factory" in str(info.value)


def test_a_good_task_loss_passes_and_a_diverged_one_is_left_to_the_fine_tune() -> None:
    value = checked_task_loss(lambda o, t: o.sum().reshape(1), OUTPUTS, TARGETS)
    assert value.shape == ()
    diverged = torch.full((4, 3), float("nan"))  # the outputs themselves: not the loss's fault
    assert torch.isnan(checked_task_loss(lambda o, t: o.sum(), diverged, TARGETS))


VECTOR_LOSS_TASK = """
import torch.nn.functional as F

from autocompress.intake import load_task


def per_sample(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")  # forgot the mean


def build():
    return {"model": load_task(None, None, None).model, "data": "digits", "loss": per_sample}
"""


def test_a_broken_task_loss_ends_the_run_on_its_first_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "vector_task.py").write_text(VECTOR_LOSS_TASK)
    monkeypatch.chdir(tmp_path)
    code = main(["search", "--task", "vector_task.py:build", "--trials", "3",
                 "--finetune-steps", "10", "--learning-rate", "1e-3", "--latency-repeats", "1",
                 "--no-warm-starts", "--no-guided", "--study", "v", "--storage",
                 "sqlite:///v.db"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err and "unexpected" not in err and "failed with" not in err, err
    assert lines[-1].startswith("error: the task's loss returned a tensor of shape [64]"), err
    assert "the run stopped" in lines[-1]
    trials = optuna.load_study(study_name="v", storage="sqlite:///v.db").trials
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0] is trials[-1]  # the first search trial ended it
    assert "returned a tensor of shape [64]" in failed[0].user_attrs["fail_reason"]
    kept = [t.user_attrs.get("baseline") for t in trials
            if t.state == optuna.trial.TrialState.COMPLETE]
    assert "fp32" in kept  # what finished before it stays in the study


def test_a_broken_task_loss_ends_the_learning_rate_probe_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --learning-rate the probe meets the broken loss first: it must say so, not
    score every rate as diverged and pick one."""
    (tmp_path / "vector_task.py").write_text(VECTOR_LOSS_TASK)
    monkeypatch.chdir(tmp_path)
    code = main(["search", "--task", "vector_task.py:build", "--trials", "3",
                 "--finetune-steps", "10", "--latency-repeats", "1", "--no-warm-starts",
                 "--no-guided", "--study", "p", "--storage", "sqlite:///p.db"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "unexpected" not in err, err
    assert "the task's loss returned a tensor of shape [64]" in err.strip().splitlines()[-1]
    # the probe stopped the run: no rate was chosen and no search trial was spent on it
    study = optuna.load_study(study_name="p", storage="sqlite:///p.db")
    assert "learning_rate_probe" not in study.user_attrs
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
