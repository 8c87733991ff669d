"""Read-only access to an Optuna study database, shaped for the dashboard: studies, one
trial's page and report, and its artifact.

Only Optuna's public API is used (``optuna.load_study``, ``optuna.get_all_study_summaries``,
``FrozenTrial`` fields, ``FileSystemArtifactStore``); the storage is opened read-only
(``_db``) and the study's rows and fronts are built by ``_summary``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial

from autocompress.dashboard import _analysis as an
from autocompress.dashboard._db import Missing, open_storage, retry
from autocompress.dashboard._summary import METRIC_ATTRS, study_summary
from autocompress.errors import StudyError
from autocompress.results.metrics import row_versus_fp32
from autocompress.results.pareto import fp32_row
from autocompress.study import attrs as trial_attrs
from autocompress.study import default_artifacts_dir, masked_url

_SAFE_ARTIFACT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


class StudyReader:
    """Everything the pages need, as JSON-ready dicts. Holds one storage for the app."""

    def __init__(self, storage_url: str, artifacts_dir: str | Path | None = None) -> None:
        self.storage_url = storage_url
        self.display_url = masked_url(storage_url)
        self.storage = open_storage(storage_url)
        # Kept as given: pathlib would turn s3://bucket/prefix into s3:/bucket/prefix.
        self.artifacts_dir = str(artifacts_dir) if artifacts_dir is not None else None

    # -- studies --------------------------------------------------------------------------

    def study_names(self) -> list[str]:
        return retry(
            lambda: sorted(
                s.study_name
                for s in optuna.get_all_study_summaries(self.storage, include_best_trial=False)
            )
        )

    def studies(self) -> list[dict[str, Any]]:
        rows = []
        for name in self.study_names():
            data = self.study(name)
            rows.append(
                {
                    key: data[key]
                    for key in (
                        "name",
                        "model_spec",
                        "data_spec",
                        "budgets",
                        "objectives",
                        "counts",
                        "best_accuracy",
                        "smallest_size",
                        "last_activity",
                        "signature",
                    )
                }
            )
        return rows

    def _load(self, name: str) -> optuna.Study:
        try:
            return optuna.load_study(study_name=name, storage=self.storage)
        except KeyError:
            names = self.study_names()
            raise Missing(
                f"study {name!r} does not exist in {self.display_url}; "
                f"studies: {', '.join(names) or 'none'}",
                names,
            ) from None

    def study(self, name: str) -> dict[str, Any]:
        return retry(lambda: self._study(name))

    def _study(self, name: str) -> dict[str, Any]:
        return study_summary(self._load(name))

    # -- one trial ------------------------------------------------------------------------

    def _frozen(self, study: optuna.Study, number: int) -> FrozenTrial:
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if t.number == number:
                return t
        existing = [t.number for t in trials]
        raise Missing(
            f"trial {number} does not exist in study {study.study_name!r}; "
            f"trials: {an.compact_ranges(existing)}",
            [str(n) for n in existing],
        )

    def trial(self, name: str, number: int) -> dict[str, Any]:
        return retry(lambda: self._trial(name, number))

    def _trial(self, name: str, number: int) -> dict[str, Any]:
        summary = self._study(name)
        study = self._load(name)
        frozen = self._frozen(study, number)
        row = next(t for t in summary["trials"] if t["number"] == number)
        fp32 = fp32_row(summary["trials"])  # the reference every row's rates use
        a = frozen.user_attrs
        plan = an.maybe_json(a.get(trial_attrs.PLAN))
        plan = plan if isinstance(plan, dict) else None
        inventory = an.maybe_json(study.user_attrs.get("inventory"))
        inventory = inventory if isinstance(inventory, dict) else None
        constraints = an.maybe_json(a.get(trial_attrs.CONSTRAINTS))
        numbers = [t["number"] for t in summary["trials"]]
        idx = numbers.index(number)
        reason = None
        if a.get(trial_attrs.REJECTED):
            reason = {"kind": "rejected", "text": a[trial_attrs.REJECTED]}
        elif row.get("fail_reason"):
            reason = {"kind": "failed", "text": row["fail_reason"]}
        elif a.get(trial_attrs.EARLY_STOPPED):
            reason = {"kind": "early-stopped", "text": a[trial_attrs.EARLY_STOPPED]}
        shown = {"plan", "timing", "runtime", "constraints", *METRIC_ATTRS}
        return {
            "study": name,
            "number": number,
            "trial": row,
            "metrics": {k: row[k] for k in METRIC_ATTRS},
            "fp32": fp32,
            "comparison": row_versus_fp32(row, fp32),
            "plan": plan,
            "plan_summary": a.get(trial_attrs.PLAN_SUMMARY),
            "layers": an.plan_layers(plan, inventory),
            "has_inventory": inventory is not None,
            "timing": an.timing_rows(a.get(trial_attrs.TIMING)),
            "runtime": an.maybe_json(a.get(trial_attrs.RUNTIME)),
            "constraints": constraints if isinstance(constraints, dict) else frozen.constraints,
            "budgets": summary["budgets"],
            "reason": reason,
            "artifact": self._artifact_info(name, frozen),
            "report_url": f"/api/report/{quote(name, safe='')}/{number}",
            "params": frozen.params,
            "other_attrs": {k: v for k, v in a.items() if k not in shown},
            "previous": numbers[idx - 1] if idx > 0 else None,
            "next": numbers[idx + 1] if idx + 1 < len(numbers) else None,
            "signature": f"{row['state']}:{row['feasible']}:{row['has_artifact']}",
        }

    def report(self, name: str, number: int) -> dict[str, Any]:
        """The trial's own record, for a user to keep beside the artifact."""
        d = self.trial(name, number)
        summary = self.study(name)
        return {
            "study": name,
            "trial": number,
            "state": d["trial"]["state"],
            "feasible": d["trial"]["feasible"],
            "on_front": d["trial"]["on_front"],
            "baseline": d["trial"]["baseline"],
            "model_spec": summary["model_spec"],
            "data_spec": summary["data_spec"],
            "budgets": summary["budgets"],
            "constraints": d["constraints"],
            "metrics": d["metrics"],
            "units": {"size": "bytes", "latency": "milliseconds", "accuracy": "fraction 0..1"},
            "baseline_comparison": {**d["comparison"], "fp32": d["fp32"]},
            "plan": d["plan"],
            "plan_summary": d["plan_summary"],
            "layers": d["layers"],
            "runtime": d["runtime"],
            "timing_seconds": {r["phase"]: r["seconds"] for r in d["timing"]},
            "reason": d["reason"],
            "artifact": d["artifact"],
            "storage": self.display_url,
        }

    # -- artifacts ------------------------------------------------------------------------

    def _artifacts_dir(self, name: str) -> str:
        """--artifacts; else the search's bucket when it used one; else the default folder."""
        if self.artifacts_dir is not None:
            return self.artifacts_dir
        recorded = retry(lambda: self._load(name)).user_attrs.get("artifacts_dir")
        if isinstance(recorded, str) and _is_s3(recorded):
            return recorded
        return str(default_artifacts_dir(self.storage_url, name))

    def _artifact_info(self, name: str, t: FrozenTrial) -> dict[str, Any] | None:
        artifact_id = t.user_attrs.get(trial_attrs.ARTIFACT_ID)
        if not isinstance(artifact_id, str) or not artifact_id:
            return None
        meta = an.maybe_json(t.system_attrs.get(f"artifacts:{artifact_id}"))
        meta = meta if isinstance(meta, dict) else {}
        filename = meta.get("filename") or f"{name}-trial{t.number}.onnx"
        return {
            "id": artifact_id,
            "filename": filename,
            "mimetype": meta.get("mimetype") or "application/octet-stream",
            "sha256": t.user_attrs.get(trial_attrs.ARTIFACT_SHA256),
            "url": f"/api/artifact/{quote(name, safe='')}/{t.number}",
        }

    def open_artifact(self, name: str, number: int) -> tuple[IO[bytes], dict[str, Any]]:
        """Open the artifact recorded on this trial. The id comes from the database only."""
        study = retry(lambda: self._load(name))
        t = self._frozen(study, number)
        info = self._artifact_info(name, t)
        if info is None:
            raise Missing(f"trial {number} of study {name!r} has no artifact", [])
        if not _SAFE_ARTIFACT_ID.match(info["id"]):
            raise Missing(f"trial {number} records an artifact id that is not servable", [])
        folder = self._artifacts_dir(name)
        try:
            return _store(folder).open_reader(info["id"]), info
        except (ArtifactNotFound, StudyError, ValueError, OSError):
            raise Missing(
                f"artifact {info['id']} of trial {number} is not in {folder}; start the "
                "dashboard with --artifacts pointing at the study's artifact folder",
                [],
            ) from None


def _is_s3(location: str) -> bool:
    return location.startswith("s3:/")


def _store(location: str) -> Any:
    """A folder, or an S3 bucket through the search's own adapter (imported only then: it
    brings Optuna's boto3 store and the search config along)."""
    if _is_s3(location):
        from autocompress.study import artifact_store

        return artifact_store(location)
    return FileSystemArtifactStore(location)
