"""Studies: creation and resume (refused when the model, data or space changed), samplers,
descriptive attributes, and reading an existing study back."""

from __future__ import annotations

import json
import socket
import time
import warnings
import zlib
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage

from autocompress.config.options import SearchConfig
from autocompress.errors import StudyError, one_line
from autocompress.study.resilient import ResilientStorage
from autocompress.study.storage import is_transient, open_storage, study_names
from autocompress.study.urls import masked_url
from autocompress.study.worker import WorkerStudy, fail_stale_trials


def make_sampler(
    name: str, seed: int | None, startup_trials: int = 10
) -> optuna.samplers.BaseSampler:
    """``startup_trials``: trials sampled at random before TPE or GP fit their model."""
    if name in ("tpe", "front"):  # front: the search queues its own proposals, TPE the rest
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=startup_trials
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=10)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials)
    raise StudyError(f"sampler {name!r} is unknown; use front, tpe, random, nsga2 or gp")


def directions(objectives: tuple[str, ...]) -> list[str]:
    return ["maximize" if o == "accuracy" else "minimize" for o in objectives]


METRIC_NAMES = {"accuracy": "accuracy", "size": "size_bytes", "latency": "latency_ms"}


def _worker_seed(seed: int, seed_offset: int) -> int:
    """Per-worker sampler seed. The host name is mixed in because containers often give every
    worker the same PID (1), and equal seeds make workers propose the same candidates."""
    if not seed_offset:
        return seed
    host = zlib.crc32(socket.gethostname().encode())
    return (seed + seed_offset + host) % (2**31 - 1)


def create_or_load_study(
    storage: BaseStorage,
    config: SearchConfig,
    identity: dict[str, Any],
    *,
    seed_offset: int = 0,
    space: dict[str, Any] | None = None,
) -> optuna.Study:
    """Create the study once (race-safe across workers) or resume it.

    ``identity`` holds what must match for a resume: model, data, objectives, space hash.
    A mismatch is refused, because a sampler fed trials from another space learns nonsense;
    with ``space`` (``space.space_description``) the refusal names the settings that changed.
    ``seed_offset`` (non-zero for server storages) gives each worker its own sampler seed.
    Trials of dead workers are failed (and queued once more) before the study is returned.
    """
    sampler = make_sampler(
        config.sampler, _worker_seed(config.seed, seed_offset), config.sampler_startup_trials()
    )
    _create_once(storage, config.study, directions(config.objectives))
    study = WorkerStudy(study_name=config.study, storage=storage, sampler=sampler)
    if isinstance(storage, ResilientStorage):
        study.resilient = storage

    stored = study.user_attrs
    if "identity" in stored:
        stored_space = json.loads(stored.get("search_space") or "null")
        _refuse_mismatch(config, json.loads(stored["identity"]), identity,
                         _space_changes(stored_space, space))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names([
                "zip_size_bytes" if o == "size" and config.size_metric == "zip"
                else METRIC_NAMES[o] for o in config.objectives
            ])
        study.set_user_attr("identity", json.dumps(identity, sort_keys=True))
    fail_stale_trials(study)
    return study


def _create_once(storage: BaseStorage, name: str, dirs: list[str]) -> None:
    """Create the study unless it exists, retried while workers race on the same name."""
    last: Exception | None = None
    for attempt in range(6):
        try:
            optuna.create_study(
                study_name=name,
                storage=storage,
                directions=dirs,
                load_if_exists=True,
            )
            return
        except ValueError as exc:  # directions differ from the stored study
            raise StudyError(
                f"study {name!r} exists with other objectives ({exc}); "
                "use --study NEW_NAME to start a new study"
            ) from None
        except StudyError:
            raise
        except Exception as exc:  # two workers inserting the same study name at once
            last = exc
            if not is_transient(exc):
                break
            time.sleep(0.3 * (attempt + 1))
    raise StudyError(f"cannot create study {name!r}: {one_line(last)}")


def stored_space(storage: BaseStorage, name: str) -> dict[str, Any] | None:
    """The search space description an existing study was made with (``search_space``), or
    None for a new study (or one made before descriptions were stored)."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:  # Optuna's answer for a study that does not exist
        return None
    raw = storage.get_study_user_attrs(study_id).get("search_space")
    try:
        found = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def set_study_info(study: optuna.Study, info: dict[str, Any]) -> None:
    """Descriptive attributes (inventory, data, budgets); first writer wins."""
    existing = study.user_attrs
    for key, value in info.items():
        if key not in existing:
            study.set_user_attr(key, value)


def _refuse_mismatch(config: SearchConfig, stored: dict[str, Any], now: dict[str, Any],
                     space_changes: list[str]) -> None:
    where = f"study {config.study!r} in {masked_url(config.storage_url())}"
    if stored.get("onnx_format", 1) != now.get("onnx_format", 1):
        # No setting brings the old layout back: the only way on is a new study.
        raise StudyError(
            f"{where} holds ONNX files in another layout (format {stored.get('onnx_format', 1)}"
            f", this autocompress writes {now.get('onnx_format', 1)}), so file sizes would not "
            "compare; use --study NEW_NAME (export and dashboard still read the old study)"
        )
    # One runtime per study: .onnx and .pte figures on one front would not compare. The
    # default target is not stored (studies made before targets resume).
    was, now_target = (stored.get("target") or "onnxruntime-cpu",
                       now.get("target") or "onnxruntime-cpu")
    if was != now_target:
        raise StudyError(f"{where} was measured on --target {was}, not {now_target}; pass "
                         f"--target {was} to resume it, or --study NEW_NAME to start a new study")
    # Budgets too: the trials' feasibility was judged against them, and export's --best
    # selects against the study's budgets.
    for key in ("model_spec", "weights_sha256", "data_spec", "objectives", "space_hash",
                "budgets"):
        if stored.get(key) != now.get(key):
            if key == "space_hash" and space_changes:
                changed = "; ".join(space_changes)
                raise StudyError(
                    f"{where} was searched in another space ({changed}); pass the original "
                    "settings to resume it, or --study NEW_NAME to start a new study"
                )
            raise StudyError(
                f"{where} was made with a different {key.replace('_', ' ')} "
                f"({stored.get(key)!r}, now {now.get(key)!r}); use --study NEW_NAME to start a "
                "new study, or the original settings to resume it"
            )


# What each part of the stored search space is set by, in the user's words.
_SPACE_SETTINGS = {
    "bits": "--bits",
    "activation_bits": "--activation-bits",
    "prune_max": "--prune-max",
    "prune_step": "--prune-step",
    "kd_temperature": "--kd-temperature-min/max",
    "kd_alpha": "--kd-alpha-min/max",
    "finetune_steps": "--finetune-steps",
    "layers": "the model's quantizable layers",
    "groups": "the prunable groups (--prune-max, the model)",
    "sparsity": "--sparsity-scope/max/step",
    "size_metric": "--size-metric",
    "feature_kd": "--feature-weight-max/--feature-layers",
    "ptq_methods": "--ptq-methods",
    "activation_scheme": "--activation-scheme",
}
# What an absent entry means (settings added later are stored only when not the default).
_SPACE_DEFAULTS = {"activation_scheme": "asymmetric", "size_metric": "file"}


def _space_changes(stored: dict[str, Any] | None, now: dict[str, Any] | None) -> list[str]:
    """'--bits was [8, 4], now [8]' for each setting of the search space that changed."""
    if not isinstance(stored, dict) or not isinstance(now, dict):
        return []
    out = []
    for key, setting in _SPACE_SETTINGS.items():
        default = _SPACE_DEFAULTS.get(key)
        before, after = stored.get(key, default), now.get(key, default)
        if before == after:
            continue
        if key in ("layers", "groups"):
            out.append(f"{setting} changed")
        else:  # settings added later are absent while unused
            out.append(f"{setting} was {_plain(before)}, now {_plain(after)}")
    return out


def _plain(value: Any) -> str:
    if value is None:
        return "off"
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def load_existing_study(storage_url: str, study_name: str) -> optuna.Study:
    storage = open_storage(storage_url, heartbeat=False, create=False)
    names = study_names(storage)
    if study_name not in names:
        raise StudyError(
            f"study {study_name!r} not found in {masked_url(storage_url)}; existing studies: "
            f"{', '.join(names) or 'none'} (autocompress list shows them)"
        )
    return optuna.load_study(study_name=study_name, storage=storage)


def study_summaries(storage_url: str) -> list[dict[str, Any]]:
    storage = open_storage(storage_url, heartbeat=False, create=False)
    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        identity = json.loads(summary.user_attrs.get("identity", "{}"))
        rows.append({
            "study": summary.study_name,
            "model": identity.get("model_spec", "?"),
            "data": identity.get("data_spec", "?"),
            "trials": len(states),
            "complete": states.count("COMPLETE"),
            "failed": states.count("FAIL"),
            "pruned": states.count("PRUNED"),
            "running": states.count("RUNNING"),
        })
    return rows


TrialPruned = optuna.TrialPruned
