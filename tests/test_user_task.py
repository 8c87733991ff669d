"""A user's own task (issue 15, part 1): ``--task file.py:factory`` brings model, data,
metric and loss; the metric (mean absolute error here, lower is better) is what the search
maximises (recorded negated, labelled neg_mae) and what export verifies on the ONNX file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from search_fixture import run_short_search

from autocompress.cli import main
from autocompress.export import export_from_storage
from autocompress.intake import load_task
from autocompress.intake.metric import Metric, MetricError
from autocompress.intake.user_task import TaskSpecError, load_user_task
from autocompress.runtime import sessions

MAE_TASK = '''
import numpy as np
import torch.nn.functional as F

from autocompress.intake import load_task

LOSS_CALLS = []


def mae(outputs, targets):
    """Mean absolute error between the predicted and the true digit."""
    return float(np.abs(outputs.argmax(axis=1) - targets).mean())


def smoothed(outputs, targets):
    LOSS_CALLS.append(1)
    return F.cross_entropy(outputs, targets, label_smoothing=0.1)


def build():
    teacher = load_task(None, None, None).model  # the trained demo CNN on digits
    return {"model": teacher, "data": "digits", "metric": mae, "higher_is_better": False,
            "loss": smoothed}
'''


def _task_file(folder: Path, source: str = MAE_TASK, name: str = "mae_task.py") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(source)
    return f"{path}:build"


def test_metric_orientation_and_checks() -> None:
    mae = Metric("mae", higher_is_better=False, fn=lambda o, t: float(np.abs(o - t).mean()))
    out, tgt = np.array([1.0, 3.0]), np.array([0.0, 1.0])
    assert mae.value(out, tgt) == 1.5 and mae.score(out, tgt) == -1.5
    assert mae.label == "neg_mae"
    nan = Metric("bad", fn=lambda o, t: float("nan"))
    with pytest.raises(MetricError, match="metric 'bad' returned nan on 2 samples"):
        nan.score(out, tgt)
    with pytest.raises(MetricError, match="returned str, not a float"):
        Metric("s", fn=lambda o, t: "0.5").score(out, tgt)


def test_task_search_is_scored_and_verified_with_its_metric(tmp_path: Path) -> None:
    spec = _task_file(tmp_path)
    short = run_short_search(tmp_path, study="mae", task=spec, trials=2, guided=False,
                             budgets=())
    assert short.result.metric == "neg_mae"
    measured = [r for r in short.result.records if r.measured]
    assert measured and all((r.accuracy or 0) <= 0 for r in measured)  # negated errors
    loss = load_user_task(spec).loss
    assert loss is not None
    assert sys.modules[loss.__module__].LOSS_CALLS, "the task's loss was used in the fine-tune"
    best = max((r for r in measured if r.baseline is None), key=lambda r: r.accuracy or -9)
    result = export_from_storage(short.storage_url, "mae", out=tmp_path / "out",
                                 trial=best.number, verify=True)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verification"]["test_accuracy"] == pytest.approx(best.test_accuracy)
    # the figure is the metric itself, on the exported file, over the test split
    task = load_task(None, None, None, task=spec)
    logits, ys = [], []
    # with the session options the trial was measured with (the faster of QDQ kernels and
    # float fake-quant, picked by timing: their numerics differ)
    options = dict((best.json_attr("runtime") or {}).get("session_options") or {})
    session = sessions.make_session(tmp_path / "out" / "model.onnx", threads=1,
                                   session_options=options)
    name = session.get_inputs()[0].name
    for x, y in task.data.batches("test", 256):
        logits.append(session.run(None, {name: x.numpy()})[0])
        ys.append(y.numpy())
    mae = np.abs(np.concatenate(logits).argmax(axis=1) - np.concatenate(ys)).mean()
    assert best.test_accuracy == pytest.approx(-mae)
    assert result.trial == best.number
    # the summary names the task's metric, not accuracy (it said "test accuracy -0.53")
    assert f"verified: test neg_mae {-mae:.4f}" in result.summary()
    assert "test neg_mae" in result.summary().splitlines()[3]
    assert "accuracy" not in result.summary()
    chosen = export_from_storage(short.storage_url, "mae", out=tmp_path / "best", best=True,
                                 verify=False)
    assert chosen.rule.startswith("highest validation neg_mae within no budget")


def test_task_show_labels_the_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _task_file(tmp_path)
    short = run_short_search(tmp_path, study="label", task=spec, trials=1, guided=False,
                             budgets=(), warm_starts=False)
    capsys.readouterr()
    assert main(["show", "--study", "label", "--storage", short.storage_url]) == 0
    assert "neg_mae" in capsys.readouterr().out


BAD_TASKS = {
    "no model": ("def build():\n    return {'data': 'digits'}\n", "without model"),
    "wrong type": ("def build():\n    return [1, 2, 3]\n", "without model and data"),
    "model not a module": ("def build():\n    return {'model': 3, 'data': 'digits'}\n",
                           "'model' is int"),
    "metric not callable": ("def build():\n    return {'model': 'demo', 'data': 'digits', "
                            "'metric': 0.5}\n", "'metric' is float, not a function"),
    "unknown key": ("def build():\n    return {'model': 'demo', 'data': 'digits', "
                    "'metrics': 1}\n", "unknown keys \\['metrics'\\]"),
    "raises": ("def build():\n    raise RuntimeError('no GPU')\n", "raised RuntimeError: no GPU"),
}


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_bad_task_factories_are_one_line(case: str, tmp_path: Path) -> None:
    source, message = BAD_TASKS[case]
    spec = _task_file(tmp_path, source, f"bad_{case.replace(' ', '_')}.py")
    with pytest.raises(TaskSpecError, match=message):
        load_user_task(spec)


def test_nan_metric_on_the_teacher_is_exit_2_and_nothing_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    spec = _task_file(tmp_path, MAE_TASK.replace("return float(np.abs", "return float('nan') + "
                                                 "float(np.abs"), "nan_task.py")
    monkeypatch.chdir(tmp_path)
    code = main(["search", "--task", spec, "--trials", "1", "--study", "nan"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and "metric 'mae' returned nan" in err[-1]
    assert not (tmp_path / "studies").exists() or not list((tmp_path / "studies").iterdir())


def test_task_with_model_flag_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["search", "--task", "x.py:build", "--model", "torchvision:resnet18"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "drop model, weights and data" in err[0]


def test_nan_metric_during_a_trial_fails_that_trial_and_the_search_goes_on(
    tmp_path: Path,
) -> None:
    """The teacher scores fine (first call); every later score is NaN: each trial FAILs with
    the metric's one-line reason, and the run still reaches its trial count."""
    source = MAE_TASK.replace(
        "def mae(outputs, targets):\n",
        "SEEN = []\n\n\ndef mae(outputs, targets):\n"
        "    SEEN.append(1)\n    if len(SEEN) > 1:\n        return float('nan')\n",
    )
    spec = _task_file(tmp_path, source, "late_nan_task.py")
    short = run_short_search(tmp_path, study="late", task=spec, trials=2, guided=False,
                             budgets=(), baselines=False, warm_starts=False,
                             learning_rate=1e-3)
    searched = [r for r in short.result.records if r.baseline is None]
    assert len(searched) == 2
    assert all(r.state == "FAIL" and "metric 'mae' returned nan" in (r.fail_reason or "")
               for r in searched)
