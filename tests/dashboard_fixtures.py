"""Study databases for the dashboard tests, written with Optuna directly.

The synthetic study follows the schema in BRIEF.md ("What the study database holds") trial by
trial: fp32 / int8-ptq baselines, feasible and over-budget search trials, a candidate
rejected at pre-check, a failed trial and a running one, with real files uploaded through
``optuna.artifacts.upload_artifact``.

Tests take a ``DashboardStudy`` (storage URL + study name + artifacts folder) and compute
what they expect from the storage itself (``expected_from_storage``), so the same browser
test runs on this synthetic study or on a study a real ``autocompress search`` wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import TrialState

from autocompress.model.plan import CompressionPlan

optuna.logging.set_verbosity(optuna.logging.WARNING)

STUDY = "demo-cnn"
SECOND_STUDY = "tiny-3obj"
LATENCY_BUDGET = {"kind": "latency", "value": 5.0, "text": "5ms"}
SIZE_BUDGET = {"kind": "size", "value": 150_000.0, "text": "150kB"}

# Inventory.to_dict(): a small CNN in model order (every named module, as build_inventory
# lists them). bn1/relu/pool are not weight layers; conv2 and conv3 share a prune group (a
# residual add couples their output channels); fc is not prunable.
INVENTORY: dict[str, Any] = {
    "layers": [
        {
            "name": "conv1",
            "type": "Conv2d",
            "params": 160,
            "flops": 92160,
            "output_shape": [1, 16, 8, 8],
            "quantizable": True,
            "excluded_reason": None,
        },
        {
            "name": "bn1",
            "type": "BatchNorm2d",
            "params": 32,
            "flops": 0,
            "output_shape": [1, 16, 8, 8],
            "quantizable": False,
            "excluded_reason": "BatchNorm2d is not a Conv/Linear layer",
        },
        {
            "name": "relu",
            "type": "ReLU",
            "params": 0,
            "flops": 0,
            "output_shape": [1, 16, 8, 8],
            "quantizable": False,
            "excluded_reason": "ReLU is not a Conv/Linear layer",
        },
        {
            "name": "conv2",
            "type": "Conv2d",
            "params": 4640,
            "flops": 294912,
            "output_shape": [1, 32, 8, 8],
            "quantizable": True,
            "excluded_reason": None,
        },
        {
            "name": "conv3",
            "type": "Conv2d",
            "params": 9248,
            "flops": 589824,
            "output_shape": [1, 32, 8, 8],
            "quantizable": True,
            "excluded_reason": None,
        },
        {
            "name": "pool",
            "type": "AdaptiveAvgPool2d",
            "params": 0,
            "flops": 2048,
            "output_shape": [1, 32, 1, 1],
            "quantizable": False,
            "excluded_reason": "AdaptiveAvgPool2d is not a Conv/Linear layer",
        },
        {
            "name": "fc",
            "type": "Linear",
            "params": 330,
            "flops": 320,
            "output_shape": [1, 10],
            "quantizable": True,
            "excluded_reason": None,
        },
    ],
    "groups": [
        {
            "name": "conv1",
            "members": ["conv1"],
            "channels": 16,
            "prunable": True,
            "excluded_reason": None,
        },
        {
            "name": "conv2",
            "members": ["conv2", "conv3"],
            "channels": 32,
            "prunable": True,
            "excluded_reason": None,
        },
        {
            "name": "fc",
            "members": ["fc"],
            "channels": 10,
            "prunable": False,
            "excluded_reason": "output layer: its channels are the classes",
        },
    ],
    "format_version": 1,
    "total_flops": 979264,
    "total_params": 14410,
    "uncounted_ops": {},
}
WEIGHT_LAYERS = ["conv1", "conv2", "conv3", "fc"]


@dataclass(frozen=True)
class DashboardStudy:
    """Where a study lives: enough for the dashboard and for computing expectations."""

    storage_url: str
    study_name: str
    artifacts_dir: Path


def _plan(bits: dict[str, int], prune: dict[str, float] | None = None) -> CompressionPlan:
    return CompressionPlan(bits=bits, prune=prune or {}, finetune_steps=120, kd_temperature=4.0)


def _runtime() -> str:
    return json.dumps(
        {
            "runtime": "onnxruntime",
            "version": "1.32.0",
            "session_options": {},
            "threads": 2,
            "batch_size": 1,
            "cpu": "AMD EPYC (test fixture)",
        }
    )


def _timing(build: float, precheck: float, finetune: float, export: float, measure: float) -> str:
    return json.dumps(
        {
            "build": build,
            "precheck": precheck,
            "finetune": finetune,
            "export": export,
            "measure": measure,
        }
    )


def _complete(
    study: optuna.Study,
    store: FileSystemArtifactStore,
    work: Path,
    *,
    accuracy: float | None,
    size: int,
    latency: float,
    fp32_latency: float,
    plan: CompressionPlan,
    budgets: list[dict[str, Any]],
    baseline: str | None = None,
    rejected: str | None = None,
    artifact: bytes | None = None,
    extra: dict[str, Any] | None = None,
) -> int:
    """One finished trial written the way trial/measurement.py writes it (attrs, constraint, file).

    Attributes go in through ``enqueue_trial(user_attrs=...)`` (one transaction instead of
    one per attribute: SQLite commits dominate the fixture's run time).
    """
    a: dict[str, Any] = {
        "plan": plan.to_json(),
        "plan_summary": plan.summary(),
        "size_bytes": size,
        "latency_ms": latency,
        "latency_spread_ms": latency * 0.04,
        "latency_vs_fp32": latency / fp32_latency,
        "fp32_latency_ms": fp32_latency,
        "runtime": _runtime(),
    }
    if baseline:
        a["baseline"] = baseline
    if rejected:
        a["rejected"] = rejected
        a["timing"] = _timing(0.2, 0.9, 0.0, 0.0, 0.0)
    else:
        a.update(
            {
                "accuracy": accuracy,
                "test_accuracy": None if accuracy is None else accuracy - 0.004,
                "zip_size_bytes": int(size * 0.92),
                "flops": 900_000,
                "params": 14_000,
                "timing": _timing(0.3, 1.1, 14.5, 0.8, 2.2),
            }
        )
    a.update(extra or {})
    constraints = {}
    for b in budgets:
        value = latency if b["kind"] == "latency" else size
        constraints[b["text"]] = value - b["value"]
    if not constraints:
        constraints = {"none": -1.0}
    a["constraints"] = json.dumps(constraints)
    a["feasible"] = all(v <= 0 for v in constraints.values())
    study.enqueue_trial({}, user_attrs=a)
    trial = study.ask()
    for key, value in constraints.items():
        trial.set_constraint(key, value)
    if artifact is not None:  # uploaded while RUNNING, as Optuna requires
        path = work / f"trial{trial.number}.onnx"
        path.write_bytes(artifact)
        artifact_id = upload_artifact(
            artifact_store=store, file_path=str(path), study_or_trial=trial
        )
        trial.set_user_attr("artifact_id", artifact_id)
        trial.set_user_attr("artifact_sha256", hashlib.sha256(artifact).hexdigest())
    values = [0.0 if accuracy is None else accuracy, float(size)]
    if len(study.directions) == 3:
        values.append(latency)
    study.tell(trial, values)
    return trial.number


def _study_attrs(
    study: optuna.Study, budgets: list[dict[str, Any]], objectives: list[str], model_spec: str
) -> None:
    with warnings.catch_warnings():  # set_metric_names is flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(
            [
                {"accuracy": "accuracy", "size": "size_bytes", "latency": "latency_ms"}[o]
                for o in objectives
            ]
        )
    attrs = {
        "model_spec": model_spec,
        "data_spec": "sklearn:digits",
        "budgets": json.dumps(budgets),
        "objectives": objectives,
        "inventory": INVENTORY,
        "data": {
            "spec": "sklearn:digits",
            "seed": 0,
            "sizes": {"train": 1257, "val": 270, "test": 270},
            "hash": "ab12cd34",
        },
        "search_space": json.dumps({"bits": [32, 8, 4], "prune": [0.0, 0.75]}),
        "created_by": "autocompress 0.1.0",
        "learning_rate_probe": {"chosen": 0.003, "start_accuracy": 0.99, "steps": 20,
                                "bits": 8, "scores": {"0.003": 0.99, "0.0001": 0.99}},
    }
    for key, value in attrs.items():
        study.set_user_attr(key, value)


def build_synthetic_study(root: Path) -> DashboardStudy:
    """Two studies in one SQLite file; the main one has every kind of trial the search writes."""
    root.mkdir(parents=True, exist_ok=True)
    db = root / "dash.db"
    url = f"sqlite:///{db}"
    artifacts = root / "dash-artifacts"  # the search's default folder for dash.db
    artifacts.mkdir(exist_ok=True)
    work = root / "work"
    work.mkdir(exist_ok=True)
    store = FileSystemArtifactStore(str(artifacts))

    storage = optuna.storages.RDBStorage(url)  # one engine for both studies: creation is slow
    study = optuna.create_study(
        study_name=STUDY, storage=storage, directions=["maximize", "minimize"]
    )
    budgets = [LATENCY_BUDGET]
    _study_attrs(study, budgets, ["accuracy", "size"], "demo")
    every = dict.fromkeys(WEIGHT_LAYERS, 8)
    common = {"work": work, "fp32_latency": 2.0, "budgets": budgets}

    _complete(
        study,
        store,
        **common,
        accuracy=0.975,
        size=400_000,
        latency=2.0,
        plan=_plan({}),
        baseline="fp32",
        artifact=os.urandom(4096),
    )
    _complete(
        study,
        store,
        **common,
        accuracy=0.968,
        size=110_000,
        latency=1.2,
        plan=_plan(every),
        baseline="int8-ptq",
        artifact=os.urandom(2048),
    )
    _complete(
        study,
        store,
        **common,
        accuracy=0.972,
        size=80_000,
        latency=1.1,
        plan=_plan({**every, "conv2": 4}, {"conv2": 0.5}),
        artifact=os.urandom(3000),
    )
    _complete(
        study,
        store,
        **common,
        accuracy=0.970,
        size=60_000,
        latency=6.5,
        plan=_plan(dict.fromkeys(WEIGHT_LAYERS, 4)),
        extra={"warm_start": "uniform-int4"},
    )  # over the 5 ms budget
    _complete(
        study,
        store,
        **common,
        accuracy=None,
        size=300_000,
        latency=9.1,
        plan=_plan({}, {"conv1": 0.25}),
        rejected="over budget at pre-check: latency 9.10 ms > 5ms",
    )
    study.enqueue_trial(
        {},
        user_attrs={
            "plan": _plan(every).to_json(),
            "timing": _timing(0.3, 1.0, 3.2, 0.0, 0.0),
            "fail_reason": "TrainingError: loss became NaN at step 40; lower the learning rate",
        },
    )
    study.tell(study.ask(), state=TrialState.FAIL)
    _complete(
        study,
        store,
        **common,
        accuracy=0.950,
        size=90_000,
        latency=1.0,
        plan=_plan(every, {"conv1": 0.25}),
    )  # dominated by trial 2
    _complete(
        study,
        store,
        **common,
        accuracy=0.940,
        size=40_000,
        latency=1.5,
        plan=_plan({**dict.fromkeys(WEIGHT_LAYERS, 4), "fc": 8}, {"conv2": 0.25}),
        artifact=os.urandom(1500),
    )
    study.enqueue_trial({}, user_attrs={"plan": _plan(every).to_json()})
    study.ask()  # a worker is still fine-tuning this one: left RUNNING

    tiny = optuna.create_study(
        study_name=SECOND_STUDY, storage=storage, directions=["maximize", "minimize", "minimize"]
    )
    _study_attrs(tiny, [SIZE_BUDGET], ["accuracy", "size", "latency"], "timm:resnet10t")
    tiny_common = {"work": work, "fp32_latency": 3.0, "budgets": [SIZE_BUDGET]}
    _complete(
        tiny,
        store,
        **tiny_common,
        accuracy=0.91,
        size=500_000,
        latency=3.0,
        plan=_plan({}),
        baseline="fp32",
    )
    _complete(
        tiny, store, **tiny_common, accuracy=0.90, size=120_000, latency=2.0, plan=_plan(every)
    )
    return DashboardStudy(url, STUDY, artifacts)


def expected_from_storage(source: DashboardStudy) -> dict[str, Any]:
    """What any correct dashboard must show for this study, read straight from Optuna."""
    study = optuna.load_study(study_name=source.study_name, storage=source.storage_url)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    with_artifact = [t for t in complete if t.user_attrs.get("artifact_id")]
    feasible = [t for t in complete if t.user_attrs.get("feasible")]
    return {
        "n_trials": len(trials),
        "n_complete": len(complete),
        "numbers": [t.number for t in trials],
        "artifact_trial": with_artifact[-1].number if with_artifact else None,
        "artifact_id": with_artifact[-1].user_attrs["artifact_id"] if with_artifact else None,
        "feasible_numbers": [t.number for t in feasible],
        "inventory": _maybe_json(study.user_attrs.get("inventory")),
    }


def _maybe_json(value: Any) -> Any:
    """The search stores dict attributes as JSON strings; hand-made studies may not."""
    return json.loads(value) if isinstance(value, str) else value


def weight_layers(inventory: dict[str, Any]) -> list[str]:
    """Layers a per-layer plan chart must show, in model order: Conv/Linear modules (the
    inventory also lists containers, norms and activations) and prune-group members."""
    members = {m for g in inventory.get("groups", []) for m in g.get("members", [])}
    kinds = ("Conv1d", "Conv2d", "Conv3d", "Linear")
    return [
        layer["name"]
        for layer in inventory["layers"]
        if layer["quantizable"] or layer["type"] in kinds or layer["name"] in members
    ]


def artifact_bytes(source: DashboardStudy, artifact_id: str) -> bytes:
    """The stored file, read through the artifact store (not through the dashboard)."""
    store = FileSystemArtifactStore(str(source.artifacts_dir))
    with store.open_reader(artifact_id) as reader:
        return reader.read()


ADD_TRIAL_SCRIPT = textwrap.dedent("""
    import json, sys
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, name = sys.argv[1], sys.argv[2]
    study = optuna.load_study(study_name=name, storage=url)
    values = [0.5, 12345.0, 0.9][: len(study.directions)]
    attrs = {"accuracy": 0.5, "size_bytes": 12345, "latency_ms": 0.9, "feasible": True,
             "constraints": json.dumps({"none": -1.0}), "plan_summary": "added by a worker"}
    study.add_trial(optuna.trial.create_trial(values=values, user_attrs=attrs))
    print(len(study.trials) - 1)
""")


def add_trial_in_subprocess(source: DashboardStudy) -> int:
    """Another process (a search worker) finishes a trial in the same storage."""
    out = subprocess.run(
        [sys.executable, "-c", ADD_TRIAL_SCRIPT, source.storage_url, source.study_name],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


# Builders of studies the browser tests run against: name -> builder(folder) -> DashboardStudy.
# A fixture that runs a short real `autocompress search` can register itself here (or the
# tests' `source` fixture can be parametrized over it); the tests only use storage_url,
# study_name and artifacts_dir, and read every expectation from the storage.
STUDY_SOURCES: dict[str, Callable[[Path], DashboardStudy]] = {
    "synthetic": build_synthetic_study,
}
