"""Read-only access to an Optuna study database, shaped for the dashboard.

Only Optuna's public API is used (``RDBStorage``, ``optuna.load_study``,
``optuna.get_all_study_summaries``, ``FrozenTrial`` fields, ``FileSystemArtifactStore``).
SQLite databases are opened with ``mode=ro`` so the dashboard cannot write even by accident
(Optuna's storage constructor would otherwise create tables in an empty file).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial

from autocompress.dashboard import _analysis as an
from autocompress.errors import StudyError, one_line
from autocompress.results.pareto import nondominated, superseded
from autocompress.study import attrs as trial_attrs
from autocompress.study import default_artifacts_dir, driver_url, masked_url
from autocompress.study.records import feasibility, retried_as, to_record, trial_constraints

_T = TypeVar("_T")
_SAFE_ARTIFACT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_METRIC_ATTRS = (
    "accuracy",
    "test_accuracy",
    "size_bytes",
    "zip_size_bytes",
    "latency_ms",
    "latency_spread_ms",
    "latency_vs_fp32",
    "fp32_latency_ms",
    "flops",
    "bops",
    "params",
)


class Missing(LookupError):
    """A study, trial or artifact the URL names does not exist; message says what does."""

    def __init__(self, message: str, existing: list[str]) -> None:
        super().__init__(message)
        self.message = message
        self.existing = existing


def _sqlite_file(storage_url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL, None for server databases."""
    if not storage_url.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url  # optuna's own dependency, no torch

    database = make_url(storage_url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        raise StudyError(
            f"storage {masked_url(storage_url)!r} is not a SQLite file; pass "
            "sqlite:///path/to/study.db"
        )
    return Path(database)


def open_storage(storage_url: str) -> optuna.storages.BaseStorage:
    """Open an existing study database read-only, or raise a one-line StudyError.

    Returns the same cached wrapper ``optuna.load_study(storage=URL)`` builds, but kept for
    the app's lifetime: finished trials never change, so each 2-second poll reads only new
    and running trials instead of the whole study (1000 trials: seconds -> milliseconds).
    """
    path = _sqlite_file(storage_url)
    url = storage_url
    if path is not None:
        if not path.is_file():
            raise StudyError(
                f"no study database at {path} (from {storage_url}); run `autocompress search` "
                "first or pass the --storage URL it used"
            )
        url = f"sqlite:///file:{quote(str(path.resolve()))}?mode=ro&uri=true"
    try:
        storage = optuna.storages.get_storage(
            optuna.storages.RDBStorage(driver_url(url), engine_kwargs=_engine_kwargs(url))
        )
        optuna.get_all_study_summaries(storage, include_best_trial=False)
    except Exception as exc:  # any driver/schema error: the user needs the one line
        if "read-only" in str(exc) or "readonly" in str(exc):
            # Opening read-only refused to create Optuna's tables: nothing was ever stored.
            raise StudyError(
                f"storage {masked_url(storage_url)} holds no Optuna study tables; run "
                "`autocompress search` with this --storage first"
            ) from None
        raise StudyError(
            f"cannot open study storage {masked_url(storage_url)}: {one_line(exc)}; check "
            "the URL and that it is an Optuna database"
        ) from None
    return storage


def _engine_kwargs(url: str) -> dict[str, Any]:
    """Fail fast on an unreachable server; on PostgreSQL make every transaction read-only."""
    if url.startswith("postgresql"):
        return {
            "connect_args": {
                "connect_timeout": 10,
                "options": "-c default_transaction_read_only=on",
            }
        }
    if url.startswith("mysql"):
        return {"connect_args": {"connect_timeout": 10}}
    return {}


def _retry(fn: Callable[[], _T]) -> _T:
    """SQLite readers can meet a writer's lock for a moment; try again before failing."""
    for attempt in range(3):
        try:
            return fn()
        except Missing:
            raise
        except Exception as exc:
            if "locked" not in str(exc) or attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _iso(value: _dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


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
        return _retry(
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
        return _retry(lambda: self._study(name))

    def _study(self, name: str) -> dict[str, Any]:
        study = self._load(name)
        attrs = dict(study.user_attrs)
        identity = an.maybe_json(attrs.get("identity"))
        identity = identity if isinstance(identity, dict) else {}
        directions = [d.name.lower() for d in study.directions]
        names = study.metric_names or [None] * len(directions)
        keys = [an.metric_key(n, i) for i, n in enumerate(names)]
        frozen = study.get_trials(deepcopy=False)
        retries = retried_as(frozen)
        trials = [self._row(t, keys, retries) for t in frozen]

        counts = {"total": len(trials)}
        for state in ("COMPLETE", "FAIL", "RUNNING", "PRUNED", "WAITING"):
            counts[state.lower()] = sum(t["state"] == state for t in trials)
        counts["feasible"] = sum(t["feasible"] is True for t in trials)
        counts["infeasible"] = sum(t["feasible"] is False for t in trials)
        counts["failed"] = counts.pop("fail")

        # Each plan counts once on the front, at its most-trained trial (pareto's rule).
        gone = superseded((t["parent_trial"], bool(t["feasible"])) for t in trials)
        feasible = [t for t in trials if t["feasible"] and t["number"] not in gone]
        for t in trials:
            t["superseded"] = t["number"] in gone
        full = {
            t["number"]: [t[k] for k in keys]
            for t in feasible
            if all(t[k] is not None for k in keys)
        }
        front = set(nondominated(full, [d == "maximize" for d in directions]))
        flat = {
            t["number"]: [t["accuracy"], t["size_bytes"]]
            for t in feasible
            if t["accuracy"] is not None and t["size_bytes"] is not None
        }
        front_2d = nondominated(flat, [True, False])
        front_2d.sort(key=lambda n: flat[n][1])
        for t in trials:
            t["on_front"] = t["number"] in front
        fp32_row = next((t for t in trials if t["baseline"] == "fp32"
                         and t["state"] == "COMPLETE" and t["accuracy"] is not None), None)
        for t in trials:  # the guide's rates, as show and the report compute them
            vs = an.compare_to_fp32(t, fp32_row)
            for rate in ("accuracy_drop_rate", "flop_reduction_rate", "bops_reduction_rate"):
                t[rate] = vs[rate]

        budgets = an.maybe_json(attrs.get("budgets")) or []
        candidates = [t for t in trials if an.is_compressed_candidate(t)]
        best = max(
            (t for t in candidates if t["accuracy"] is not None),
            key=lambda t: t["accuracy"],
            default=None,
        )
        smallest = min(
            (t for t in candidates if t["size_bytes"] is not None),
            key=lambda t: t["size_bytes"],
            default=None,
        )
        stamps = [t["datetime_complete"] or t["datetime_start"] for t in trials]
        signature = hashlib.sha1(
            json.dumps([(t["number"], t["state"], t["feasible"]) for t in trials]).encode()
        ).hexdigest()[:16]
        return {
            "name": study.study_name,
            "model_spec": attrs.get("model_spec") or identity.get("model_spec"),
            "data_spec": attrs.get("data_spec") or identity.get("data_spec"),
            "budgets": budgets if isinstance(budgets, list) else [],
            "objectives": an.maybe_json(attrs.get("objectives")) or keys,
            "metric_names": study.metric_names,
            "metric_keys": keys,
            "directions": directions,
            "created_by": attrs.get("created_by"),
            "data": an.maybe_json(attrs.get("data")),
            "learning_rate_probe": an.maybe_json(attrs.get("learning_rate_probe")),
            "sensitivity": an.maybe_json(attrs.get("sensitivity")),
            "counts": counts,
            "trials": trials,
            "front": sorted(front),
            "front_2d": front_2d,
            "progress": an.progress(trials),
            "baselines": {
                t["baseline"]: t["number"]
                for t in trials
                if t["baseline"] and t["state"] == "COMPLETE"
            },
            "best_accuracy": _pick(best, "accuracy"),
            "smallest_size": _pick(smallest, "size_bytes"),
            "last_activity": max((s for s in stamps if s), default=None),
            "signature": signature,
        }

    def _row(self, t: FrozenTrial, keys: list[str], retries: dict[int, int]) -> dict[str, Any]:
        """One trial as a table row: the search's own record of it (``to_record``: metrics
        measured on the artifact, feasibility, failure reason), shaped for the page."""
        rec = to_record(t, retries)
        a = rec.attrs
        state = rec.state
        row: dict[str, Any] = {"number": rec.number, "state": state}
        for name in _METRIC_ATTRS:
            row[name] = an.number_or_none(getattr(rec, name, a.get(name)))
        if t.values is not None:
            for i, key in enumerate(keys):
                # Rejected trials carry a floor accuracy as objective value, never a measurement.
                if row.get(key) is None and not (key == "accuracy" and rec.rejected):
                    row[key] = an.number_or_none(t.values[i]) if i < len(t.values) else None
        row["values"] = list(t.values) if t.values is not None else None
        row["feasible"] = feasibility(state, a, trial_constraints(t))
        row["baseline"] = rec.baseline
        row["warm_start"] = a.get(trial_attrs.WARM_START)
        row["guided"] = a.get(trial_attrs.GUIDED)
        parent = a.get(trial_attrs.PARENT)
        row["parent_trial"] = int(parent) if parent is not None else None
        row["plan_summary"] = a.get(trial_attrs.PLAN_SUMMARY)
        row["rejected"] = rec.rejected
        row["fail_reason"] = rec.fail_reason
        row["early_stopped"] = a.get(trial_attrs.EARLY_STOPPED)
        row["reason"] = rec.rejected or rec.fail_reason or a.get(trial_attrs.EARLY_STOPPED)
        row["has_artifact"] = bool(a.get(trial_attrs.ARTIFACT_ID))
        row["datetime_start"] = _iso(t.datetime_start)
        row["datetime_complete"] = _iso(t.datetime_complete)
        row["duration_s"] = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        return row

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
        return _retry(lambda: self._trial(name, number))

    def _trial(self, name: str, number: int) -> dict[str, Any]:
        summary = self._study(name)
        study = self._load(name)
        frozen = self._frozen(study, number)
        row = next(t for t in summary["trials"] if t["number"] == number)
        fp32_no = summary["baselines"].get("fp32")
        fp32 = next((t for t in summary["trials"] if t["number"] == fp32_no), None)
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
        shown = {"plan", "timing", "runtime", "constraints", *_METRIC_ATTRS}
        return {
            "study": name,
            "number": number,
            "trial": row,
            "metrics": {k: row[k] for k in _METRIC_ATTRS},
            "fp32": fp32,
            "comparison": an.compare_to_fp32(row, fp32),
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
        recorded = _retry(lambda: self._load(name)).user_attrs.get("artifacts_dir")
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
        study = _retry(lambda: self._load(name))
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


def _pick(trial: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    if trial is None:
        return None
    return {"value": trial[key], "number": trial["number"], "baseline": trial["baseline"]}
