"""The bad-input battery: over 150 distinct wrong inputs, each met with exit 2, one line that
starts with "error:", no traceback, and nothing created or changed in the working folder.

Each case runs the real CLI in-process from an empty folder holding only the files the case
needs (a model file, a broken YAML, a garbage database...). Cases that must load the model
before they can know (a factory that is missing, a data folder that is empty) are marked
``late``: their error may follow the run's progress notes, and it must still be the last
line."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from autocompress.cli import main

LONG = "s" * 300
MODEL_PY = "import torch\n\ndef make():\n    return torch.nn.Linear(64, 10)\n\n" \
           "def broken():\n    raise ValueError('cannot build')\n\n" \
           "def not_a_module():\n    return 42\n"

# (id, argv, late): "{tmp}" is the case's folder; files below exist there
SEARCH = ["search", "--trials", "1"]
MODEL = ["--model", "{tmp}/model.py:make"]
CASES: list[tuple[str, list[str], bool]] = [
    # -- search: numbers and ranges -------------------------------------------------------
    ("trials-text", [*SEARCH, "--trials", "abc"], False),
    ("trials-zero", [*SEARCH, "--trials", "0"], False),
    ("trials-negative", [*SEARCH, "--trials", "-3"], False),
    ("trials-float", [*SEARCH, "--trials", "2.5"], False),
    ("finetune-negative", [*SEARCH, "--finetune-steps", "-1"], False),
    ("lr-zero", [*SEARCH, "--learning-rate", "0"], False),
    ("lr-negative", [*SEARCH, "--learning-rate", "-1e-3"], False),
    ("lr-text", [*SEARCH, "--learning-rate", "fast"], False),
    ("lr-inf", [*SEARCH, "--learning-rate", "inf"], False),
    ("lr-nan", [*SEARCH, "--learning-rate", "nan"], False),
    ("batch-zero", [*SEARCH, "--batch-size", "0"], False),
    ("threads-zero", [*SEARCH, "--threads", "0"], False),
    ("train-threads-negative", [*SEARCH, "--train-threads", "-1"], False),
    ("latency-repeats-zero", [*SEARCH, "--latency-repeats", "0"], False),
    ("latency-batch-zero", [*SEARCH, "--latency-batch-size", "0"], False),
    ("seed-text", [*SEARCH, "--seed", "abc"], False),
    ("seed-negative", [*SEARCH, "--seed", "-1"], False),
    ("seed-over-2-64", [*SEARCH, "--seed", "18446744073709551616"], False),
    ("max-rejections-zero", [*SEARCH, "--max-rejections", "0"], False),
    ("max-rejections-negative", [*SEARCH, "--max-rejections", "-1"], False),
    ("time-limit-zero", [*SEARCH, "--time-limit", "0"], False),
    ("time-limit-negative", [*SEARCH, "--time-limit", "-5"], False),
    ("promote-share-over-one", [*SEARCH, "--promote-share", "1.5"], False),
    ("promote-share-negative", [*SEARCH, "--promote-share", "-0.1"], False),
    ("promote-factor-one", [*SEARCH, "--promote-factor", "1"], False),
    ("sensitivity-images-zero", [*SEARCH, "--sensitivity-images", "0"], False),
    ("round-to-zero", [*SEARCH, "--round-to", "0"], False),
    ("startup-trials-negative", [*SEARCH, "--startup-trials", "-1"], False),
    ("early-stop-negative", [*SEARCH, "--early-stop-drop", "-1"], False),
    # -- search: budgets ------------------------------------------------------------------
    ("budget-no-unit", [*SEARCH, "--budget", "50"], False),
    ("budget-bad-unit", [*SEARCH, "--budget", "50xs"], False),
    ("budget-negative", [*SEARCH, "--budget", "-5ms"], False),
    ("budget-negative-size", [*SEARCH, "--budget", "-1MB"], False),
    ("budget-zero", [*SEARCH, "--budget", "0ms"], False),
    ("budget-inf-ms", [*SEARCH, "--budget", "1e999ms"], False),
    ("budget-inf-mb", [*SEARCH, "--budget", "1e999MB"], False),
    ("budget-nan", [*SEARCH, "--budget", "nanms"], False),
    ("budget-empty", [*SEARCH, "--budget", ""], False),
    ("budget-text", [*SEARCH, "--budget", "fast"], False),
    ("budget-impossible-latency", [*SEARCH, "--budget", "1us"], True),
    ("budget-impossible-size", [*SEARCH, "--budget", "10B"], True),
    # -- search: space --------------------------------------------------------------------
    ("bits-three", [*SEARCH, "--bits", "3"], False),
    ("bits-text", [*SEARCH, "--bits", "8,abc"], False),
    ("bits-empty", [*SEARCH, "--bits", ""], False),
    ("bits-zero", [*SEARCH, "--bits", "0"], False),
    ("bits-repeated", [*SEARCH, "--bits", "8,8"], False),
    ("activation-bits-four", [*SEARCH, "--activation-bits", "4"], False),
    ("prune-max-over-one", [*SEARCH, "--prune-max", "1.5"], False),
    ("prune-max-negative", [*SEARCH, "--prune-max", "-0.1"], False),
    ("prune-step-zero", [*SEARCH, "--prune-step", "0"], False),
    ("prune-step-over-one", [*SEARCH, "--prune-step", "2"], False),
    ("sparsity-max-one", [*SEARCH, "--sparsity-max", "1"], False),
    ("sparsity-step-zero", [*SEARCH, "--sparsity-step", "0"], False),
    ("sparsity-scope-unknown", [*SEARCH, "--sparsity-scope", "everywhere"], False),
    ("size-metric-unknown", [*SEARCH, "--size-metric", "gzip"], False),
    ("feature-weight-negative", [*SEARCH, "--feature-weight-max", "-1"], False),
    ("feature-layers-missing", [*SEARCH, "--feature-weight-max", "1", "--feature-layers",
                                "block9"], True),
    ("ptq-method-unknown", [*SEARCH, "--ptq-methods", "minmax,magic"], False),
    ("ptq-method-twice", [*SEARCH, "--ptq-methods", "minmax,minmax"], False),
    ("kd-temperature-zero", [*SEARCH, "--kd-temperature-min", "0"], False),
    ("kd-temperature-swapped", [*SEARCH, "--kd-temperature-min", "5",
                                "--kd-temperature-max", "2"], False),
    ("kd-alpha-over-one", [*SEARCH, "--kd-alpha-min", "1.5"], False),
    ("kd-alpha-negative", [*SEARCH, "--kd-alpha-min", "-1"], False),
    ("sampler-unknown", [*SEARCH, "--sampler", "bogus"], False),
    ("objectives-unknown", [*SEARCH, "--objectives", "bogus,size"], False),
    ("objectives-empty", [*SEARCH, "--objectives", ""], False),
    ("device-unknown", [*SEARCH, "--device", "tpu"], False),
    # -- search: study names ----------------------------------------------------------------
    ("study-spaces", [*SEARCH, "--study", "bad name"], False),
    ("study-bang", [*SEARCH, "--study", "bad!"], False),
    ("study-too-long", [*SEARCH, "--study", LONG], False),
    ("study-empty", [*SEARCH, "--study", ""], False),
    ("study-path", [*SEARCH, "--study", "../x"], False),
    ("study-dot", [*SEARCH, "--study", "."], False),
    ("study-dotdot", [*SEARCH, "--study", ".."], False),
    ("study-hidden", [*SEARCH, "--study", ".hidden"], False),
    ("study-slash", [*SEARCH, "--study", "a/b"], False),
    # -- search: storage and artifacts ----------------------------------------------------
    ("storage-not-a-url", [*SEARCH, "--storage", "notaurl"], False),
    ("storage-unknown-scheme", [*SEARCH, "--storage", "ftp://host/db"], False),
    ("storage-under-a-file", [*SEARCH, "--storage", "sqlite:///{tmp}/file.txt/x.db"], False),
    ("storage-garbage-file", [*SEARCH, "--storage", "sqlite:///{tmp}/garbage.db"], False),
    ("storage-foreign-sqlite", [*SEARCH, "--storage", "sqlite:///{tmp}/other.db"], False),
    ("storage-empty", [*SEARCH, "--storage", ""], False),
    ("artifacts-under-a-file", [*SEARCH, "--artifacts", "{tmp}/file.txt/sub"], False),
    ("artifacts-a-file", [*SEARCH, "--artifacts", "{tmp}/file.txt"], False),
    ("artifacts-empty", [*SEARCH, "--artifacts", ""], False),
    # -- search: YAML configs ---------------------------------------------------------------
    ("config-missing", [*SEARCH, "--config", "{tmp}/missing.yaml"], False),
    ("config-a-folder", [*SEARCH, "--config", "{tmp}/folder"], False),
    ("config-bad-syntax", [*SEARCH, "--config", "{tmp}/syntax.yaml"], False),
    ("config-unknown-key", [*SEARCH, "--config", "{tmp}/unknown.yaml"], False),
    ("config-a-list", [*SEARCH, "--config", "{tmp}/list.yaml"], False),
    ("config-wrong-type", [*SEARCH, "--config", "{tmp}/wrongtype.yaml"], False),
    ("config-bad-value", [*SEARCH, "--config", "{tmp}/badvalue.yaml"], False),
    ("config-binary", [*SEARCH, "--config", "{tmp}/garbage.db"], False),
    ("config-not-utf8", [*SEARCH, "--config", "{tmp}/latin1.yaml"], False),
    # the file's trials: -3 is refused though --trials 1 overrides it
    ("config-bad-value-overridden", [*SEARCH, "--config", "{tmp}/negtrials.yaml"], False),
    # -- search: model, weights, data -----------------------------------------------------
    ("model-demo-word", [*SEARCH, "--model", "demo"], False),
    ("model-without-data", [*SEARCH, "--model", "{tmp}/model.py:make"], False),
    ("model-file-missing", [*SEARCH, "--model", "{tmp}/nope.py:make", "--data", "digits"],
     False),
    ("model-factory-missing", [*SEARCH, "--model", "{tmp}/model.py:nothere", "--data",
                               "digits"], False),
    ("model-factory-raises", [*SEARCH, "--model", "{tmp}/model.py:broken", "--data",
                              "digits"], False),
    ("model-factory-not-a-module", [*SEARCH, "--model", "{tmp}/model.py:not_a_module",
                                    "--data", "digits"], False),
    ("model-not-python", [*SEARCH, "--model", "{tmp}/file.txt:make", "--data", "digits"],
     False),
    ("model-no-factory", [*SEARCH, "--model", "{tmp}/model.py", "--data", "digits"], False),
    ("model-unknown-module", [*SEARCH, "--model", "no_such_module_xyz:make", "--data",
                              "digits"], False),
    ("model-unknown-torchvision", [*SEARCH, "--model", "torchvision:not_a_model", "--data",
                                   "digits"], False),
    ("weights-missing", [*SEARCH, "--model", "{tmp}/model.py:make", "--weights",
                         "{tmp}/nope.pt", "--data", "digits"], False),
    ("weights-garbage", [*SEARCH, "--model", "{tmp}/model.py:make", "--weights",
                         "{tmp}/garbage.db", "--data", "digits"], False),
    ("weights-without-model", [*SEARCH, "--weights", "{tmp}/garbage.db"], False),
    ("weights-a-folder", [*SEARCH, "--model", "{tmp}/model.py:make", "--weights",
                          "{tmp}/folder", "--data", "digits"], False),
    ("data-unknown-kind", [*SEARCH, "--model", "{tmp}/model.py:make", "--data",
                           "bogus:thing"], False),
    ("data-folder-missing", [*SEARCH, "--model", "{tmp}/model.py:make", "--data",
                             "imagefolder:{tmp}/nope"], False),
    ("data-folder-empty", [*SEARCH, "--model", "{tmp}/model.py:make", "--data",
                           "imagefolder:{tmp}/folder"], False),
    ("data-empty-spec", [*SEARCH, "--model", "{tmp}/model.py:make", "--data", ""], False),
    ("num-classes-zero", [*SEARCH, "--num-classes", "0"], False),
    # -- search: your own task, text models, normalisation ---------------------------------
    ("task-with-model", [*SEARCH, "--task", "{tmp}/task.py:build", "--model", "demo"], False),
    ("task-file-missing", [*SEARCH, "--task", "{tmp}/nope.py:build"], False),
    ("task-returns-list", [*SEARCH, "--task", "{tmp}/task.py:a_list"], False),
    ("task-metric-not-callable", [*SEARCH, "--task", "{tmp}/task.py:metric_number"], False),
    ("task-unknown-key", [*SEARCH, "--task", "{tmp}/task.py:unknown_key"], False),
    ("task-not-a-spec", [*SEARCH, "--task", "justaword"], False),
    ("mean-without-std", [*SEARCH, "--mean", "0.5"], False),
    ("std-zero", [*SEARCH, "--mean", "0.5", "--std", "0"], False),
    ("mean-text", [*SEARCH, "--mean", "dark"], False),
    ("hf-not-a-model-folder", [*SEARCH, "--model", "hf:{tmp}", "--data", "digits"], False),
    ("text-file-missing", [*SEARCH, "--model", "{tmp}/model.py:make", "--data",
                           "text:{tmp}/nope.csv?tokenizer={tmp}"], False),
    ("text-without-tokenizer", [*SEARCH, "--model", "{tmp}/model.py:make", "--data",
                                "text:{tmp}/reviews.csv"], False),
    ("text-unknown-option", [*SEARCH, "--model", "{tmp}/model.py:make", "--data",
                             "text:{tmp}/reviews.csv?maxlen=8"], False),
    ("text-no-such-column", [*SEARCH, "--model", "{tmp}/model.py:make", "--data",
                             "text:{tmp}/reviews.csv?text=body&tokenizer={tmp}"], False),
    ("text-tokenizer-missing", [*SEARCH, "--model", "{tmp}/model.py:make", "--data",
                                "text:{tmp}/reviews.csv?tokenizer={tmp}"], False),
    ("input-size-zero", [*SEARCH, "--input-size", "0"], False),
    ("input-size-negative", [*SEARCH, "--input-size", "-32"], False),
    ("num-classes-negative", [*SEARCH, "--num-classes", "-10"], False),
    ("num-classes-text", [*SEARCH, "--num-classes", "ten"], False),
    ("std-negative", [*SEARCH, "--mean", "0.5", "--std", "-0.2"], False),
    ("mean-std-lengths-differ", [*SEARCH, "--mean", "0.5,0.5,0.5", "--std", "0.2"], False),
    ("data-cifar10-no-root", [*SEARCH, *MODEL, "--data", "cifar10:"], False),
    ("data-cifar10-a-file", [*SEARCH, *MODEL, "--data", "cifar10:{tmp}/file.txt"], False),
    ("data-imagefolder-a-file", [*SEARCH, *MODEL, "--data", "imagefolder:{tmp}/file.txt"],
     False),
    ("model-hf-missing-folder", [*SEARCH, "--model", "hf:{tmp}/nope", "--data", "digits"],
     False),
    ("weights-text-file", [*SEARCH, *MODEL, "--weights", "{tmp}/file.txt", "--data",
                           "digits"], False),
    ("model-empty", [*SEARCH, "--model", "", "--data", "digits"], False),
    ("task-empty", [*SEARCH, "--task", ""], False),
    ("task-factory-missing", [*SEARCH, "--task", "{tmp}/task.py:nothere"], False),
    # -- search: more numbers, widths and budgets -------------------------------------------
    ("bits-sixteen", [*SEARCH, "--bits", "16"], False),
    ("bits-negative", [*SEARCH, "--bits=-8"], False),
    ("bits-spaces", [*SEARCH, "--bits", "8 4"], False),
    ("activation-bits-text", [*SEARCH, "--activation-bits", "int8"], False),
    ("prune-max-text", [*SEARCH, "--prune-max", "half"], False),
    ("kd-alpha-max-over-one", [*SEARCH, "--kd-alpha-max", "2"], False),
    ("kd-temperature-max-text", [*SEARCH, "--kd-temperature-max", "hot"], False),
    ("threads-negative", [*SEARCH, "--threads", "-2"], False),
    ("batch-size-negative", [*SEARCH, "--batch-size", "-64"], False),
    ("batch-size-text", [*SEARCH, "--batch-size", "big"], False),
    ("latency-repeats-text", [*SEARCH, "--latency-repeats", "lots"], False),
    ("target-unknown", [*SEARCH, "--target", "tpu"], False),
    ("promote-factor-zero", [*SEARCH, "--promote-factor", "0"], False),
    ("time-limit-text", [*SEARCH, "--time-limit", "10min"], False),
    ("early-stop-text", [*SEARCH, "--early-stop-drop", "soon"], False),
    ("startup-trials-text", [*SEARCH, "--startup-trials", "few"], False),
    ("sparsity-max-negative", [*SEARCH, "--sparsity-max", "-0.5"], False),
    ("sparsity-step-over-one", [*SEARCH, "--sparsity-step", "1.5"], False),
    ("budget-two-units", [*SEARCH, "--budget", "5msMB"], False),
    ("budget-ratio-zero", [*SEARCH, "--budget", "0x"], False),
    ("budget-ratio-negative", [*SEARCH, "--budget", "-0.5x"], False),
    ("config-a-number", [*SEARCH, "--config", "{tmp}/number.yaml"], False),
    ("storage-sqlite-no-path", [*SEARCH, "--storage", "sqlite://"], False),
    ("storage-blank", [*SEARCH, "--storage", "   "], False),
    ("storage-a-text-file", [*SEARCH, "--storage", "sqlite:///{tmp}/file.txt"], False),
    ("option-missing-value", [*SEARCH, "--trials"], False),
    # -- readers: show, list, sensitivity, profile ----------------------------------------
    ("show-storage-missing", ["show", "--storage", "sqlite:///{tmp}/nope.db"], False),
    ("show-storage-garbage", ["show", "--storage", "sqlite:///{tmp}/garbage.db"], False),
    ("show-storage-empty-file", ["show", "--storage", "sqlite:///{tmp}/empty.db"], False),
    ("show-storage-not-a-url", ["show", "--storage", "notaurl"], False),
    ("show-storage-foreign-sqlite", ["show", "--storage", "sqlite:///{tmp}/other.db"], False),
    ("show-storage-empty", ["show", "--storage", ""], False),
    ("show-storage-blank", ["show", "--storage", "   "], False),
    ("list-storage-not-a-url", ["list", "--storage", "notaurl"], False),
    ("list-storage-foreign-sqlite", ["list", "--storage", "sqlite:///{tmp}/other.db"], False),
    ("list-storage-unknown-scheme", ["list", "--storage", "ftp://host/db"], False),
    ("sensitivity-storage-empty", ["sensitivity", "--storage", ""], False),
    ("sensitivity-storage-garbage", ["sensitivity", "--storage", "sqlite:///{tmp}/garbage.db"],
     False),
    ("sensitivity-storage-not-a-url", ["sensitivity", "--storage", "notaurl"], False),
    ("sensitivity-top-text", ["sensitivity", "--top", "all"], False),
    ("list-storage-missing", ["list", "--storage", "sqlite:///{tmp}/nope.db"], False),
    ("list-storage-garbage", ["list", "--storage", "sqlite:///{tmp}/garbage.db"], False),
    ("list-storage-empty", ["list", "--storage", ""], False),
    ("sensitivity-storage-missing", ["sensitivity", "--storage", "sqlite:///{tmp}/nope.db"],
     False),
    ("sensitivity-top-zero", ["sensitivity", "--top", "0"], False),
    ("profile-model-missing", ["profile", "--model", "{tmp}/nope.py:make"], False),
    ("profile-input-shape-text", ["profile", "--input-shape", "abc"], False),
    ("profile-onnx-missing", ["profile", "--onnx", "{tmp}/nope.onnx"], False),
    ("profile-onnx-garbage", ["profile", "--onnx", "{tmp}/file.txt"], False),
    ("profile-onnx-with-model", ["profile", "--onnx", "{tmp}/file.txt", "--model", "demo"],
     False),
    ("profile-onnx-empty", ["profile", "--onnx", "{tmp}/empty.onnx"], False),
    ("profile-onnx-yaml", ["profile", "--onnx", "{tmp}/unknown.yaml"], False),
    ("profile-onnx-a-folder", ["profile", "--onnx", "{tmp}/folder"], False),
    ("profile-repeats-zero", ["profile", "--repeats", "0"], False),
    ("profile-repeats-text", ["profile", "--repeats", "many"], False),
    ("profile-format-unknown", ["profile", "--format", "xml"], False),
    ("profile-input-shape-zero", ["profile", "--input-shape", "0,8,8"], False),
    ("profile-input-shape-two", ["profile", "--input-shape", "8,8"], False),
    ("profile-weights-missing", ["profile", "--weights", "{tmp}/nope.pt", *MODEL], False),
    ("profile-data-unknown", ["profile", "--data", "bogus:x"], False),
    # -- export and refine -------------------------------------------------------------------
    ("export-no-out", ["export", "--best"], False),
    ("export-storage-missing", ["export", "--best", "--out", "{tmp}/o", "--storage",
                                "sqlite:///{tmp}/nope.db"], False),
    ("export-storage-garbage", ["export", "--best", "--out", "{tmp}/o", "--storage",
                                "sqlite:///{tmp}/garbage.db"], False),
    ("export-storage-empty", ["export", "--best", "--out", "{tmp}/o", "--storage", ""], False),
    ("export-trial-text", ["export", "--trial", "abc", "--out", "{tmp}/o"], False),
    ("export-format-unknown", ["export", "--best", "--format", "bogus", "--out", "{tmp}/o"],
     False),
    ("export-refine-epochs-zero", ["export", "--best", "--refine-epochs", "0", "--out",
                                   "{tmp}/o"], False),
    ("refine-trial-text", ["refine", "--trial", "abc", "--epochs", "1"], False),
    ("refine-epochs-zero", ["refine", "--trial", "1", "--epochs", "0", "--storage",
                            "sqlite:///{tmp}/nope.db"], False),
    ("refine-storage-missing", ["refine", "--trial", "1", "--epochs", "1", "--storage",
                                "sqlite:///{tmp}/nope.db"], False),
    ("refine-storage-empty", ["refine", "--trial", "1", "--epochs", "1", "--storage", ""],
     False),
    ("refine-storage-garbage", ["refine", "--trial", "1", "--epochs", "1", "--storage",
                                "sqlite:///{tmp}/garbage.db"], False),
    ("refine-epochs-negative", ["refine", "--trial", "1", "--epochs", "-1"], False),
    ("refine-epochs-text", ["refine", "--trial", "1", "--epochs", "one"], False),
    ("refine-no-trial", ["refine", "--epochs", "1"], False),
    ("refine-out-a-file", ["refine", "--trial", "1", "--epochs", "1", "--out",
                           "{tmp}/file.txt", "--storage", "sqlite:///{tmp}/nope.db"], False),
    ("export-storage-not-a-url", ["export", "--best", "--out", "{tmp}/o", "--storage",
                                  "notaurl"], False),
    ("export-storage-foreign-sqlite", ["export", "--best", "--out", "{tmp}/o", "--storage",
                                       "sqlite:///{tmp}/other.db"], False),
    ("export-best-and-trial", ["export", "--best", "--trial", "1", "--out", "{tmp}/o"], False),
    ("export-out-a-file", ["export", "--best", "--out", "{tmp}/file.txt"], False),
    ("export-out-empty", ["export", "--best", "--out", ""], False),
    ("export-no-choice", ["export", "--out", "{tmp}/o"], False),
    # -- dashboard ----------------------------------------------------------------------------
    ("dashboard-port-too-big", ["dashboard", "--port", "99999"], False),
    ("dashboard-port-text", ["dashboard", "--port", "abc"], False),
    ("dashboard-public-without-token", ["dashboard", "--host", "0.0.0.0"], False),
    ("dashboard-storage-missing", ["dashboard", "--storage", "sqlite:///{tmp}/nope.db"], False),
    ("dashboard-storage-empty", ["dashboard", "--storage", ""], False),
    ("dashboard-storage-garbage", ["dashboard", "--storage", "sqlite:///{tmp}/garbage.db"],
     False),
    ("dashboard-storage-not-a-url", ["dashboard", "--storage", "notaurl"], False),
    ("dashboard-port-negative", ["dashboard", "--port", "-1"], False),
    # -- the command line itself -------------------------------------------------------------
    ("command-unknown", ["bogus"], False),
    ("option-unknown", [*SEARCH, "--nope"], False),
    ("positional-extra", [*SEARCH, "extra"], False),
]

TASK_PY = ("def a_list():\n    return [1, 2]\n\n"
           "def metric_number():\n    return {'model': 'demo', 'data': 'digits', "
           "'metric': 0.5}\n\n"
           "def unknown_key():\n    return {'model': 'demo', 'data': 'digits', 'metrics': 1}\n")

FILES = {
    "model.py": MODEL_PY,
    "task.py": TASK_PY,
    "reviews.csv": "text,label\ngood film,fresh\nbad film,rotten\n",
    "file.txt": "not a folder\n",
    "empty.onnx": "",
    "number.yaml": "42\n",
    "garbage.db": "\x00\x01 this is not sqlite " * 20,
    "empty.db": "",
    "syntax.yaml": "trials: [1, 2\n",
    "unknown.yaml": "trials: 2\nno_such_setting: 1\n",
    "list.yaml": "- trials\n- 2\n",
    "wrongtype.yaml": "trials: many\n",
    "badvalue.yaml": "trials: 2\nbits: [3]\n",
    "negtrials.yaml": "trials: -3\n",
}


def _setup(folder: Path) -> None:
    for name, text in FILES.items():
        (folder / name).write_text(text)
    (folder / "folder").mkdir()
    (folder / "latin1.yaml").write_bytes("study: caf\xe9\n".encode("latin-1"))
    _foreign_database(folder / "other.db")


def _foreign_database(path: Path) -> None:
    """Another program's SQLite database: a search must never write its tables into it."""
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        connection.execute("INSERT INTO users (name) VALUES ('ada')")
    connection.close()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


def test_the_battery_has_over_150_distinct_inputs() -> None:
    assert len(CASES) >= 150
    assert len({case_id for case_id, _, _ in CASES}) == len(CASES)
    assert len({tuple(argv) for _, argv, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id, argv, late", CASES, ids=[case_id for case_id, _, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(
    case_id: str, argv: list[str], late: bool, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTOCOMPRESS_DASHBOARD_TOKEN", raising=False)
    _setup(tmp_path)
    before = _snapshot(tmp_path)
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert code == 2, err
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: "), err
    assert "unexpected" not in err, err  # its own message, not the catch-all
    if not late:
        assert len(lines) == 1, err
    assert _snapshot(tmp_path) == before  # nothing created, nothing changed


def _one_error_line(code: int, err: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "unexpected" not in err, err


def test_a_file_that_is_not_onnx_is_named_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, data in (("notes.txt", b"not a model\n"), ("empty.onnx", b""),
                       ("weights.pt", b"PK\x03\x04" + bytes(64))):
        (tmp_path / name).write_bytes(data)
        code = main(["profile", "--onnx", name])
        err = capsys.readouterr().err
        _one_error_line(code, err)
        assert f"'{name}' is not an ONNX model" in err, err
        assert "autocompress export or torch.onnx.export" in err, err


@pytest.mark.parametrize("command", [["show"], ["sensitivity"], ["refine", "--trial", "0",
                                                                 "--epochs", "1"]])
@pytest.mark.parametrize("storage", ["", "  "], ids=["empty", "blank"])
def test_an_empty_storage_is_refused_not_read_as_the_default(
    command: list[str], storage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Even where the default study file exists: --storage '' is a mistake, not "default"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies").mkdir()
    _foreign_database(tmp_path / "studies" / "demo.db")
    before = _snapshot(tmp_path)
    code = main([*command, "--storage", storage])
    err = capsys.readouterr().err
    _one_error_line(code, err)
    assert "storage is empty" in err, err
    assert _snapshot(tmp_path) == before


def test_load_study_refuses_an_empty_storage() -> None:
    from autocompress import load_study
    from autocompress.errors import StudyError

    with pytest.raises(StudyError, match="storage is empty"):
        load_study("demo", storage="")


def test_device_cuda_without_cuda_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main([*SEARCH, "--device", "cuda"])
    err = capsys.readouterr().err
    _one_error_line(code, err)
    assert "CUDA is not available" in err and "--device cpu" in err
    assert list(tmp_path.iterdir()) == []


def test_bits_without_32_pass_validation() -> None:
    from autocompress.config.files import build_config

    assert build_config(None, {"bits": (8, 4)}).bits == (8, 4)
    assert build_config(None, {"bits": (4,)}).bits == (4,)


def test_a_new_search_may_start_in_an_empty_file_or_database(tmp_path: Path) -> None:
    from autocompress.study.storage import open_storage, study_names

    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.db"
    sqlite3.connect(blank).execute("VACUUM").connection.close()  # SQLite, no tables yet
    for path in (empty, blank):
        assert study_names(open_storage(f"sqlite:///{path}", heartbeat=False)) == []


# -- refused resumes and refines change nothing on disk ---------------------------------------

TINY_MODEL_PY = (
    "import torch\n\n"
    "def make():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), "
    "torch.nn.ReLU(), torch.nn.Linear(32, 10))\n\n"
    "def other():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), "
    "torch.nn.ReLU(), torch.nn.Linear(16, 10))\n"
)
STORE = ["--study", "s", "--storage", "sqlite:///s.db"]
# a one-trial study of a small MLP on digits, in seconds (no baselines, no fine-tune)
TINY = ["search", *STORE, "--model", "model.py:make", "--data", "digits", "--trials", "1",
        "--finetune-steps", "0", "--learning-rate", "1e-3", "--latency-repeats", "1",
        "--no-baselines", "--no-warm-starts", "--no-guided", "--json"]
REFINE = ["refine", *STORE, "--epochs", "1", "--trial"]
REFUSED = {
    "resume-other-bits": [*TINY, "--bits", "8"],
    "resume-other-prune-max": [*TINY, "--prune-max", "0.5"],
    "resume-other-budget": [*TINY, "--budget", "1MB"],
    "resume-other-objectives": [*TINY, "--objectives", "accuracy,size,latency"],
    "resume-other-model": [*TINY, "--model", "model.py:other"],
    "refine-unknown-trial": [*REFINE, "99"],
    "refine-failed-trial": [*REFINE, "1"],
    "refine-stopped-early-trial": [*REFINE, "2"],
}


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trial 0 measured, trial 1 failed, trial 2 stopped early (pruned)."""
    import contextlib

    import optuna
    from optuna.trial import TrialState, create_trial

    folder = tmp_path_factory.mktemp("tiny-study")
    (folder / "model.py").write_text(TINY_MODEL_PY)
    with contextlib.chdir(folder):
        assert main(TINY) == 0
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{folder / 's.db'}")
    done = study.trials[0]
    for state in (TrialState.FAIL, TrialState.PRUNED):
        study.add_trial(create_trial(state=state, params=done.params,
                                     distributions=done.distributions))
    (folder / "s.db.lock").unlink()
    return folder


@pytest.mark.parametrize("argv", REFUSED.values(), ids=REFUSED.keys())
@pytest.mark.parametrize("lock", [None, "12345"], ids=["no-lock", "old-lock"])
def test_a_refused_resume_or_refine_changes_nothing_on_disk(
    argv: list[str], lock: str | None, tiny_study: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    folder = tmp_path / "study"
    shutil.copytree(tiny_study, folder)
    if lock is not None:  # another run's lock file: its content stays
        (folder / "s.db.lock").write_text(lock)
    monkeypatch.chdir(folder)
    before = _snapshot(folder)
    code = main(argv)
    _one_error_line(code, capsys.readouterr().err)
    assert _snapshot(folder) == before  # same names, same bytes: not even a .lock
