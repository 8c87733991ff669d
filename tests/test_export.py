"""autocompress export: selection, written files, verification and bad input.

Real behaviour comes from one short real search on the digits demo (run once per session,
shared with test_api.py); the selection rule and the bad-input paths use a hand-made study
whose attributes follow BRIEF.md, so each case is exact and fast.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import TrialState, create_trial
from search_fixture import ShortStudy

from autocompress import cli, export, intake
from autocompress.config.budgets import Budget
from autocompress.export import ExportError, VerificationError
from autocompress.model.plan import CompressionPlan
from autocompress.runtime import scoring
from autocompress.study import load_existing_study, records
from autocompress.study.records import TrialRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)

# -- the shared real study (conftest.py: short_study, one search per test session) ----------

def qat_trial(study: ShortStudy) -> TrialRecord:
    """The most accurate measured search (non-baseline) trial: a fine-tuned QAT candidate."""
    recs = [r for r in records(load_existing_study(study.storage_url, study.study))
            if r.measured and r.baseline is None]
    assert recs, "the short search measured no search trial"
    return max(recs, key=lambda r: (r.accuracy, -r.number))


def fp32_trial(study: ShortStudy) -> TrialRecord:
    recs = records(load_existing_study(study.storage_url, study.study))
    return next(r for r in recs if r.baseline == "fp32")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@dataclass(frozen=True)
class Exported:
    out: Path
    record: TrialRecord
    report: dict[str, Any]


@pytest.fixture(scope="module")
def exported(
    short_study: ShortStudy, tmp_path_factory: pytest.TempPathFactory
) -> Exported:
    """The QAT trial exported through the CLI with verification on."""
    record = qat_trial(short_study)
    out = tmp_path_factory.mktemp("export") / "out"
    code = cli.main([
        "export", "--study", short_study.study, "--storage", short_study.storage_url,
        "--trial", str(record.number), "--out", str(out),
    ])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    return Exported(out, record, report)


def copy_db(study: ShortStudy, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "copy.db"
    shutil.copyfile(study.db_path, db)
    return f"sqlite:///{db}"


def set_trial_attr(url: str, number: int, key: str, value: Any) -> None:
    with sqlite3.connect(url[len("sqlite:///"):]) as con:
        (trial_id,) = con.execute("SELECT trial_id FROM trials WHERE number = ?",
                                  (number,)).fetchone()
        changed = con.execute(
            "UPDATE trial_user_attributes SET value_json = ? WHERE trial_id = ? AND key = ?",
            (json.dumps(value), trial_id, key),
        ).rowcount
    assert changed == 1


def set_study_attr(url: str, key: str, value: Any) -> None:
    with sqlite3.connect(url[len("sqlite:///"):]) as con:
        changed = con.execute(
            "UPDATE study_user_attributes SET value_json = ? WHERE key = ?",
            (json.dumps(value), key),
        ).rowcount
    assert changed == 1


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial" in p.name)


# -- export of a real trial --------------------------------------------------------------------


def test_export_writes_every_file_byte_identical_onnx(
    exported: Exported, short_study: ShortStudy
) -> None:
    out, record = exported.out, exported.record
    assert sorted(p.name for p in out.iterdir()) == sorted(export.FILES)
    onnx_file = out / "model.onnx"
    stored = short_study.artifacts_dir / record.attrs["artifact_id"]
    assert onnx_file.read_bytes() == stored.read_bytes()
    assert sha256(onnx_file) == record.attrs["artifact_sha256"]
    assert CompressionPlan.from_json((out / "plan.json").read_text()) == \
        CompressionPlan.from_dict(record.plan)
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not leftovers(out.parent)


def test_report_has_the_practitioners_metrics(
    exported: Exported, short_study: ShortStudy
) -> None:
    report, record = exported.report, exported.record
    fp32 = fp32_trial(short_study)
    cand = report["candidate"]
    assert report["trial"] == record.number
    assert cand["size_bytes"] == record.size_bytes
    assert cand["times_smaller"] == pytest.approx(fp32.size_bytes / record.size_bytes)
    assert cand["accuracy_val"] == record.accuracy
    assert cand["accuracy_test"] == record.test_accuracy
    assert cand["accuracy_drop_rate_val"] == pytest.approx(
        (fp32.accuracy - record.accuracy) / fp32.accuracy)
    assert cand["accuracy_drop_rate_test"] == pytest.approx(
        (fp32.test_accuracy - record.test_accuracy) / fp32.test_accuracy)
    assert cand["flop_reduction_rate"] == pytest.approx((fp32.flops - record.flops) / fp32.flops)
    assert cand["latency_ms"] == record.latency_ms
    assert cand["latency_spread_ms"] == record.latency_spread_ms
    rt = cand["runtime"]
    for key in ("runtime", "version", "session_options", "threads", "batch_size", "cpu"):
        assert key in rt
    assert report["fp32"]["trial"] == fp32.number
    assert report["fp32"]["accuracy_test"] == fp32.test_accuracy

    # Per layer: bits and prune ratios come from the plan, "after" from the rebuilt model.
    plan = CompressionPlan.from_dict(record.plan)
    layers = {row["layer"]: row for row in report["layers"]}
    assert set(plan.bits) <= set(layers)
    weight_types = record.json_attr("weight_types")
    for name, row in layers.items():
        assert row["bits"] == plan.bits_for(name)
        assert row["weights_in_file"] == weight_types.get(name)
        assert row["params_after"] is not None and row["flops_after"] is not None
        assert row["flops_after"] <= row["flops_before"]
    pruned = [row for row in layers.values() if row["prune_ratio"] > 0]
    if pruned:  # a pruned group's layers lose FLOPs
        assert any(row["flops_after"] < row["flops_before"] for row in pruned)
    # The deployed structure's Conv/Linear params are all of the model's params.
    assert sum(row["params_after"] for row in layers.values()) == record.params

    md = (exported.out / "report.md").read_text()
    for text in ("accuracy-drop rate", "FLOP-reduction rate", "held-out test", "Per layer",
                 "session options", "Verification", f"trial {record.number}"):
        assert text in md


def test_verification_figures_are_in_the_report(exported: Exported) -> None:
    ver = exported.report["verification"]
    assert ver["sha256"] == exported.record.attrs["artifact_sha256"]
    assert abs(ver["test_accuracy"] - exported.record.test_accuracy) <= 1e-9
    assert ver["agreement"] >= 0.99
    lat = ver["latency"]
    assert lat["allowed"][0] <= lat["ratio"] <= lat["allowed"][1]
    assert lat["recorded_ratio"] == exported.record.latency_vs_fp32
    assert "measured spread of both figures" in lat["tolerance"]
    assert lat["allowed"][1] / lat["recorded_ratio"] <= export.LATENCY_RATIO_FACTOR + 1e-9


def test_pt2_loads_without_autocompress_and_agrees_with_onnx(
    exported: Exported, tmp_path: Path
) -> None:
    data = intake.load_data("digits", seed=0)
    x = torch.cat([xb for xb, _ in data.batches("val", 256)])
    torch.save(x, tmp_path / "x.pt")
    # Any attempt to import autocompress in the child fails: the program must not need it.
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "autocompress":
                    raise ImportError("autocompress is blocked in this process")
                return None
        sys.meta_path.insert(0, Block())
        import torch
        program = torch.export.load({str(exported.out / "model.pt2")!r}).module()
        x = torch.load({str(tmp_path / "x.pt")!r})
        with torch.no_grad():
            torch.save(program(x).argmax(dim=1), {str(tmp_path / "pred.pt")!r})
        assert not any(m.split(".")[0] == "autocompress" for m in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    torch_pred = torch.load(tmp_path / "pred.pt").numpy()
    onnx_pred = scoring.predictions(exported.out / "model.onnx", [x], threads=1)
    assert len(torch_pred) == len(data.val)
    assert (torch_pred == onnx_pred).mean() >= 0.99


def test_cli_best_summary_names_rule_and_runners_up(
    short_study: ShortStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "best"
    code, stdout, _ = run_cli(["export", "--study", short_study.study, "--storage",
                               short_study.storage_url, "--best", "--out", str(out),
                               "--no-verify"], capsys)
    assert code == 0
    recs = records(load_existing_study(short_study.storage_url, short_study.study))
    pool = [r for r in recs if r.measured and r.feasible and r.latency_ms <= 50]
    expected = min(pool, key=lambda r: (-r.accuracy, r.size_bytes, r.number))
    assert f"exported trial {expected.number} " in stdout
    assert "rule: highest validation accuracy within 50ms" in stdout
    assert "ties to the smaller file" in stdout
    assert "verification: skipped" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["trial"] == expected.number and report["verification"] is None
    runners = [r["trial"] for r in report["selection"]["runners_up"]]
    assert expected.number not in runners and len(runners) == min(3, len(pool) - 1)


def test_force_writes_into_a_non_empty_folder_and_keeps_other_files(
    short_study: ShortStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.onnx").write_text("stale")
    base = ["export", "--study", short_study.study, "--storage", short_study.storage_url,
            "--trial", str(fp32_trial(short_study).number), "--out", str(out), "--no-verify"]
    code, _, err = run_cli(base, capsys)
    assert code == 2 and "not empty" in one_error_line(err)
    assert (out / "model.onnx").read_text() == "stale"
    code, stdout, _ = run_cli([*base, "--force", "--json"], capsys)
    assert code == 0
    result = json.loads(stdout)
    assert result["trial"] == fp32_trial(short_study).number
    assert sorted(result["files"]) == sorted(export.FILES)
    assert result["files"]["model.onnx"]["sha256"] == sha256(out / "model.onnx")
    assert (out / "notes.txt").read_text() == "mine"
    assert sha256(out / "model.onnx") == fp32_trial(short_study).attrs["artifact_sha256"]
    assert not leftovers(tmp_path)


# -- verification catches tampering ------------------------------------------------------------


def test_tampered_artifact_fails_its_checksum(
    short_study: ShortStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = qat_trial(short_study)
    store = tmp_path / "store"
    shutil.copytree(short_study.artifacts_dir, store)
    victim = store / record.attrs["artifact_id"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    out = tmp_path / "out"
    code, _, err = run_cli(["export", "--study", short_study.study, "--storage",
                            short_study.storage_url, "--artifacts", str(store), "--trial",
                            str(record.number), "--out", str(out)], capsys)
    assert code == 2
    assert "fails its checksum" in one_error_line(err)
    assert not out.exists() and not leftovers(tmp_path)


def test_tampered_test_accuracy_fails_verification(
    short_study: ShortStudy, tmp_path: Path
) -> None:
    record = qat_trial(short_study)
    url = copy_db(short_study, tmp_path / "db")
    set_trial_attr(url, record.number, "test_accuracy", record.test_accuracy - 0.01)
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match=r"test accuracy of the written model\.onnx"):
        export.export_from_storage(url, short_study.study, out=out, trial=record.number)
    assert not out.exists() and not leftovers(tmp_path)


def test_latency_ratio_far_from_the_record_fails_verification(
    short_study: ShortStudy, tmp_path: Path
) -> None:
    record = qat_trial(short_study)
    url = copy_db(short_study, tmp_path / "db")
    set_trial_attr(url, record.number, "latency_vs_fp32", 40.0)
    with pytest.raises(VerificationError, match=r"latency .* recorded 40\.000x"):
        export.export_from_storage(url, short_study.study, out=tmp_path / "out",
                                   trial=record.number)
    assert not (tmp_path / "out").exists()


def test_changed_data_fails_verification(short_study: ShortStudy, tmp_path: Path) -> None:
    url = copy_db(short_study, tmp_path / "db")
    study = load_existing_study(url, short_study.study)
    described = json.loads(study.user_attrs["data"])
    described["split_sha256"] = "0" * 64
    set_study_attr(url, "data", json.dumps(described))
    with pytest.raises(VerificationError, match="data 'digits' changed since the search"):
        export.export_from_storage(url, short_study.study, out=tmp_path / "out",
                                   trial=fp32_trial(short_study).number)


# -- a hand-made study: selection rule and bad input -------------------------------------------

LATENCY_5MS = {"kind": "latency", "value": 5.0, "text": "5ms"}


def _attrs(number: int, accuracy: float, size: int, latency: float, *,
           feasible: bool = True, baseline: str | None = None) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "accuracy": accuracy,
        "test_accuracy": accuracy - 0.01,
        "size_bytes": size,
        "latency_ms": latency,
        "latency_vs_fp32": latency / 2.0,
        "feasible": feasible,
        "plan": CompressionPlan().to_json(),
        "plan_summary": f"plan {number}",
        "artifact_id": f"artifact-{number}",
        "artifact_sha256": hashlib.sha256(f"onnx {number}".encode()).hexdigest(),
        "torch_artifact_id": f"torch-{number}",
        "torch_artifact_sha256": "0" * 64,
    }
    if baseline:
        attrs["baseline"] = baseline
    return attrs


@dataclass(frozen=True)
class HandMade:
    url: str
    name: str
    store: Path


def hand_made(folder: Path, trials: list[dict[str, Any] | None],
              budgets: list[dict[str, Any]] | None = None) -> HandMade:
    """A study with the attributes a search writes; ``None`` adds a FAIL trial."""
    folder.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{folder / 'hand.db'}"
    store = folder / "artifacts"
    store.mkdir()
    study = optuna.create_study(study_name="hand", storage=url,
                                directions=["maximize", "minimize"])
    study_attrs = {
        "model_spec": "demo", "data_spec": "digits",
        "budgets": json.dumps([LATENCY_5MS] if budgets is None else budgets),
        "objectives": ["accuracy", "size"], "input_shape": [1, 8, 8], "num_classes": 10,
        "config": json.dumps({"seed": 0, "round_to": 8}), "artifacts_dir": str(store),
        "identity": json.dumps({"objectives": ["accuracy", "size"]}),
    }
    for key, value in study_attrs.items():
        study.set_user_attr(key, value)
    for attrs in trials:
        if attrs is None:
            study.add_trial(create_trial(state=TrialState.FAIL,
                                         user_attrs={"fail_reason": "TrainingError: NaN loss"}))
        else:
            study.add_trial(create_trial(values=[attrs["accuracy"], attrs["size_bytes"]],
                                         user_attrs=attrs))
    files = FileSystemArtifactStore(str(store))
    files.write("artifact-1", io.BytesIO(b"onnx 1"))  # matches its recorded sha256
    files.write("artifact-2", io.BytesIO(b"tampered"))  # does not
    return HandMade(url, "hand", store)


@pytest.fixture
def hand(tmp_path: Path) -> HandMade:
    return hand_made(tmp_path / "hand", [
        _attrs(0, 0.95, 400_000, 6.0, feasible=False, baseline="fp32"),
        _attrs(1, 0.95, 100_000, 1.0),
        _attrs(2, 0.95, 80_000, 3.0),
        _attrs(3, 0.97, 90_000, 5.5, feasible=False),
        _attrs(4, 0.90, 30_000, 0.5),
        None,
    ])


def _records(h: HandMade) -> list[TrialRecord]:
    return records(load_existing_study(h.url, h.name))


def test_best_is_most_accurate_within_budgets_ties_to_smaller_file(hand: HandMade) -> None:
    recs = _records(hand)
    choice = export.choose(recs, [Budget.from_dict(LATENCY_5MS)], best=True,
                           reference_accuracy=0.95)
    # trial 3 is more accurate but over the 5 ms budget; 1 and 2 tie, 2 is smaller.
    assert choice.record.number == 2
    assert "within 5ms" in choice.rule and "ties to the smaller file" in choice.rule
    assert [r.number for r in choice.runners_up] == [1, 4]


def test_given_budgets_tighten_the_studys(hand: HandMade) -> None:
    recs = _records(hand)
    choice = export.choose(recs, [Budget.from_dict(LATENCY_5MS)], best=True,
                           budgets=("2ms", "200KB"))
    assert choice.record.number == 1  # trial 2 takes 3 ms
    assert "5ms, 2ms, 200KB" in choice.rule
    # Looser given budgets do not loosen the study's.
    loose = export.choose(recs, [Budget.from_dict(LATENCY_5MS)], best=True, budgets=("1s",))
    assert loose.record.number == 2


def test_max_accuracy_drop_is_relative_to_fp32(hand: HandMade) -> None:
    recs = [r for r in _records(hand) if r.number in (0, 4)]  # fp32 0.95, candidate 0.90
    budgets = [Budget.from_dict(LATENCY_5MS)]
    # drop of trial 4: (0.95 - 0.90) / 0.95 = 5.26 %
    ok = export.choose(recs, budgets, best=True, max_accuracy_drop="6%",
                       reference_accuracy=0.95)
    assert ok.record.number == 4 and "at most 6.00% accuracy drop" in ok.rule
    assert export.choose(recs, budgets, best=True, max_accuracy_drop="0.06",
                         reference_accuracy=0.95).record.number == 4
    with pytest.raises(ExportError, match=r"trial 4: accuracy drop 5\.26%"):
        export.choose(recs, budgets, best=True, max_accuracy_drop="5%",
                      reference_accuracy=0.95)


@pytest.mark.parametrize("text", ["abc", "150%", "1", "-1%"])
def test_bad_accuracy_drop_is_refused(text: str) -> None:
    with pytest.raises(ExportError, match="max accuracy drop"):
        export.parse_accuracy_drop(text)


def test_no_feasible_trial_lists_the_three_closest(
    hand: HandMade, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["export", "--study", hand.name, "--storage", hand.url, "--best",
                            "--budget", "0.25ms", "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    line = one_error_line(err)
    assert "no trial of study 'hand' meets 5ms, 0.25ms" in line
    # Closest to 0.25 ms: trial 4 (0.5 ms, +100%), trial 1 (1 ms), trial 2 (3 ms).
    closest = line.split("closest:")[1]
    assert closest.index("trial 4:") < closest.index("trial 1:") < closest.index("trial 2:")
    assert "latency 0.5 ms vs budget 0.25ms (+100%)" in closest
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--trial", "99"], "trial 99 does not exist in study 'hand' (trials 0-5)"),
    (["--trial", "5"], "trial 5 did not complete (state FAIL: TrainingError: NaN loss)"),
    (["--trial", "1", "--budget", "2ms"], "--budget and --max-accuracy-drop choose among"),
    (["--best", "--budget", "fast"], "budget 'fast' is not a latency or size"),
    (["--best", "--max-accuracy-drop", "lots"], "max accuracy drop 'lots'"),
])
def test_bad_trial_choice_exits_2_with_one_line(
    hand: HandMade, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    args: list[str], message: str,
) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(["export", "--study", hand.name, "--storage", hand.url, *args,
                            "--out", str(out)], capsys)
    assert code == 2
    assert message in one_error_line(err)
    assert not out.exists()


def test_non_empty_output_folder_is_refused(
    hand: HandMade, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run_cli(["export", "--study", hand.name, "--storage", hand.url, "--trial",
                            "1", "--out", str(out)], capsys)
    assert code == 2
    assert "exists and is not empty" in one_error_line(err)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_missing_and_corrupt_artifacts_leave_nothing(hand: HandMade, tmp_path: Path) -> None:
    parent = tmp_path / "exports"
    parent.mkdir()
    with pytest.raises(ExportError, match="artifact-4 of trial 4 is missing from the artifact"):
        export.export_from_storage(hand.url, hand.name, out=parent / "a", trial=4)
    with pytest.raises(ExportError, match="artifact-2 of trial 2 fails its checksum"):
        export.export_from_storage(hand.url, hand.name, out=parent / "b", trial=2)
    # Trial 1's ONNX file is fine; its PyTorch artifact was never stored.
    with pytest.raises(ExportError, match="PyTorch artifact torch-1 of trial 1 is missing"):
        export.export_from_storage(hand.url, hand.name, out=parent / "c", trial=1)
    assert list(parent.iterdir()) == []
    with pytest.raises(ExportError, match=r"artifact folder .* does not exist"):
        export.export_from_storage(hand.url, hand.name, out=parent / "d", trial=1,
                                   artifacts_dir=tmp_path / "nowhere")


def test_missing_study_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["export", "--study", "nope", "--storage",
                            f"sqlite:///{tmp_path / 'none.db'}", "--best", "--out",
                            str(tmp_path / "out")], capsys)
    assert code == 2
    assert "does not exist" in one_error_line(err)


def test_agreement_excuses_near_ties_but_not_flips() -> None:
    """A top-1 flip at a near-tie of the program's logits is rounding (a 4-bit
    TransformerEncoder flipped 2 of 139 samples at margins of 0.018 and 0.0008 with logits
    spread over ~12, and its right rebuild failed verification); a flip by a clear margin
    still counts against the file, per sample and per pixel, and a file that differs from
    the program on a typical sample gets no excuses at all."""
    import numpy as np

    from autocompress.export.verify import _agreement_of

    program = np.array([[4.0, 3.99, -8.0], [4.0, 1.0, -8.0], [0.0, 5.0, -7.0]])
    file = np.array([[3.9, 4.0, -8.0], [1.0, 4.0, -8.0], [0.0, 5.0, -7.0]])
    # row 0: near-tie flip (0.01 apart; the median sample differs by 0.1 of a 12 spread),
    # row 1: a 3-logit flip, row 2: the same
    assert _agreement_of(file, program, values=False) == pytest.approx((2 / 3, 1 / 3))
    pixels_program = program.T.reshape(1, 3, 3, 1)  # (N, C, H, W): classes on axis 1
    pixels_file = file.T.reshape(1, 3, 3, 1)
    assert _agreement_of(pixels_file, pixels_program, values=False) == pytest.approx(
        (2 / 3, 1 / 3))
    binary = np.array([[2.0, 1.99], [-3.0, 3.0], [1.0, -1.0]])  # two classes, a near-tie
    binary_file = np.array([[1.97, 1.99], [-3.0, 3.01], [1.0, -1.01]])
    assert _agreement_of(binary_file, binary, values=False) == pytest.approx((1.0, 1 / 3))
    # a program stuck on flat logits, or a file far from the program: exact matches only
    assert _agreement_of(file, np.zeros((3, 3)), values=False) == pytest.approx((0.0, 0.0))
    wrong = program + np.array([[0.0, 3.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    assert _agreement_of(wrong, program, values=False) == pytest.approx((2 / 3, 0.0))


def test_latency_band_catches_a_wrong_figure_on_a_quiet_machine() -> None:
    """A flat factor of 2 let a recorded 0.448x pass a file that re-measured far from it; on
    a quiet measurement (relative IQRs of a few percent) the band is about +-20%, so a figure
    90% off fails and one within the measured spread passes."""
    from autocompress.export.verify import latency_band

    quiet = [0.02, 0.03]
    (low, high), tolerance, noise = latency_band(0.448, quiet, [0.02, 0.03, 0.01])
    assert tolerance < 0.25 and noise == pytest.approx((2 * 0.02**2 + 2 * 0.03**2
                                                        + 0.01**2) ** 0.5)
    assert not low <= 0.448 * 1.9 <= high  # 90% off
    assert not low <= 0.448 / 1.3 <= high  # 30% off the other way
    assert low <= 0.525 <= high  # the hidden run's re-measurement, 17% off: noise
    assert low <= 0.448 * 1.1 <= high


def test_latency_band_widens_with_measured_noise_and_is_capped() -> None:
    from autocompress.export.verify import latency_band

    quiet, _, _ = latency_band(1.0, [0.02], [0.02])
    noisy, tolerance, noise = latency_band(1.0, [0.02], [0.4, 0.3, 0.2])
    assert noisy[0] < quiet[0] and noisy[1] > quiet[1]
    assert noise > 0.5 and tolerance == pytest.approx(0.15 + noise)
    assert noisy[0] <= 1.5 <= noisy[1]  # 50% off passes when the measurement is that noisy
    # however noisy, never wider than the old flat factor; no spread at all: the floor
    (low, high), _, _ = latency_band(1.0, [5.0], [5.0])
    assert (low, high) == pytest.approx((1 / export.LATENCY_RATIO_FACTOR,
                                         export.LATENCY_RATIO_FACTOR))
    (low, high), tolerance, _ = latency_band(1.0, [0.0, float("nan")], [])
    assert tolerance == pytest.approx(0.15) and (low, high) == pytest.approx((1 / 1.15, 1.15))


def test_latency_check_re_measures_longer_before_failing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A first re-measurement outside the band is retried with more rounds and runs; the
    report lists both attempts and the band of the one that passed."""
    from types import SimpleNamespace

    from autocompress.export import verify
    from autocompress.runtime import timing
    from autocompress.runtime.measure import LatencyStats

    calls: list[tuple[int, int]] = []
    stats = LatencyStats(1.0, 0.02, 0.98, 1.03, 30)

    def fake(*args: Any, rounds: int, repeats: int, **kwargs: Any) -> Any:
        calls.append((rounds, repeats))
        ratio = 0.9 if len(calls) == 1 else 0.52
        return timing.InterleavedLatency(stats, stats, ratio, rounds, 0.01)

    monkeypatch.setattr(timing, "time_interleaved", fake)
    record = TrialRecord(number=3, state="COMPLETE", attrs={}, latency_ms=0.5,
                         latency_spread_ms=0.01, latency_vs_fp32=0.5)
    fp32 = TrialRecord(number=0, state="COMPLETE", attrs={}, latency_ms=1.0,
                       latency_spread_ms=0.02)
    ctx = SimpleNamespace(config={"latency_repeats": 30}, input_shape=(1, 8, 8))
    lat = verify._verify_latency(tmp_path / "m.onnx", ctx, record, fp32,  # type: ignore[arg-type]
                                 tmp_path / "f.onnx", 1)
    assert calls == [(3, 10), (6, 20)] and lat["attempts"] == [0.9, 0.52]
    assert lat["allowed"][0] <= 0.52 <= lat["allowed"][1] < 0.9
    record = TrialRecord(number=3, state="COMPLETE", attrs={}, latency_ms=0.5,
                         latency_spread_ms=0.01, latency_vs_fp32=0.2)
    with pytest.raises(VerificationError, match=r"2 times.*recorded 0\.200x"):
        verify._verify_latency(tmp_path / "m.onnx", ctx, record, fp32,  # type: ignore[arg-type]
                               tmp_path / "f.onnx", 1)
