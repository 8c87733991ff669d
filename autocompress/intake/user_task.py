"""A user's task: ``--task file.py:factory`` (or ``package.module:factory``).

The factory is called with no arguments and returns a dict (or an object with these
attributes):

- ``model``: the trained ``nn.Module`` (weights loaded), or a model spec string;
- ``data``: a data spec string (``imagefolder:ROOT``...), or ``{"train": ds, "test": ds}``
  (optionally ``"val"``) of datasets yielding ``(inputs, target)``: inputs an image tensor,
  a feature vector, token ids, or a tuple or dict of tensors the model takes positionally or
  by name (packed into one input, ``intake.sample_inputs``); the target an int label, or
  with the task's own metric any numeric target (``intake.sample_targets``);
- ``metric`` (optional): ``fn(outputs, targets) -> float`` over a whole split, numpy arrays;
  ``metric_name`` (default: the function's name) and ``higher_is_better`` (default True);
- ``loss`` (optional): ``fn(outputs, targets) -> scalar tensor``, the fine-tune's hard-target
  term in place of cross-entropy.

The study records ``task:<spec>`` as its model and data spec, so export and verification
call the same factory again (and score with the same metric).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from autocompress.errors import InputError, one_line
from autocompress.intake.data_sources import samples_of
from autocompress.intake.metric import TOP1, Metric
from autocompress.intake.sample_inputs import InputLayout, PackedInputs, layout_of
from autocompress.intake.specs import _is_factory_target, _resolve_factory

TASK_PREFIX = "task:"
KEYS = ("model", "data", "metric", "metric_name", "higher_is_better", "loss")


class TaskSpecError(InputError):
    """A task factory that cannot be used as given."""


@dataclass(frozen=True)
class UserTask:
    spec: str  # the factory spec, without the task: prefix
    model: nn.Module | str
    data: dict[str, Any] | str
    metric: Metric
    loss: Callable[..., Any] | None
    layout: InputLayout | None = None  # several input tensors per sample, packed into one

    def fresh_model(self) -> nn.Module | str:
        """The model (a copy: callers prune and fine-tune what they get) or its spec; behind
        one packed input when samples have several input tensors."""
        if not isinstance(self.model, nn.Module):
            return self.model
        model = copy.deepcopy(self.model)
        return model if self.layout is None else PackedInputs(model, self.layout).eval()


_LOADED: dict[str, UserTask] = {}  # one factory call per process: datasets can be costly


def is_task_spec(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(TASK_PREFIX)


def load_user_task(spec: str) -> UserTask:
    """Call the task factory (once per process) and check what it returned."""
    spec = spec[len(TASK_PREFIX):] if is_task_spec(spec) else spec
    spec = spec.strip()
    if spec in _LOADED:
        return _LOADED[spec]
    if not _is_factory_target(spec):
        raise TaskSpecError(f"--task {spec!r} is not file.py:factory or package.module:factory")
    factory = _resolve_factory(spec, TaskSpecError, "task")
    try:
        result = factory()
    except Exception as exc:  # user code: report, do not crash
        raise TaskSpecError(f"task factory {spec!r} raised {one_line(exc, typed=True)}; "
                            "fix the factory") from exc
    fields = _fields(result, spec)
    model, data = _model(fields, spec), _data(fields, spec)
    layout = _layout(data, spec)
    if layout is not None and not isinstance(model, nn.Module):
        raise TaskSpecError(f"task factory {spec!r} yields {layout.kind} inputs but names the "
                            f"model {model!r}; return the nn.Module that takes them")
    task = UserTask(spec, model, data, _metric(fields, spec),
                    _callable(fields.get("loss"), "loss", spec), layout)
    _LOADED[spec] = task
    return task


def _fields(result: Any, spec: str) -> dict[str, Any]:
    if isinstance(result, dict):
        fields = dict(result)
    else:
        fields = {k: getattr(result, k) for k in KEYS if hasattr(result, k)}
    unknown = sorted(k for k in fields if k not in KEYS) if isinstance(result, dict) else []
    if unknown:
        raise TaskSpecError(f"task factory {spec!r} returned unknown keys {unknown}; use "
                            f"{', '.join(KEYS)}")
    missing = [k for k in ("model", "data") if fields.get(k) is None]
    if missing:
        raise TaskSpecError(f"task factory {spec!r} returned {type(result).__name__} without "
                            f"{' and '.join(missing)}; return a dict with 'model' (an "
                            "nn.Module or a model spec) and 'data' (a data spec or datasets)")
    return fields


def _model(fields: dict[str, Any], spec: str) -> nn.Module | str:
    model = fields["model"]
    if isinstance(model, str) and not is_task_spec(model):
        return model
    if not isinstance(model, nn.Module):
        raise TaskSpecError(f"task factory {spec!r}: 'model' is {type(model).__name__}; "
                            "return an nn.Module (weights loaded) or a model spec string")
    return model.cpu().eval()


def _data(fields: dict[str, Any], spec: str) -> dict[str, Any] | str:
    data = fields["data"]
    if isinstance(data, str) and not is_task_spec(data):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        data = {"train": data[0], "test": data[1]}
    if not isinstance(data, dict) or "train" not in data or "test" not in data:
        raise TaskSpecError(f"task factory {spec!r}: 'data' is {type(data).__name__}; return "
                            "a data spec string or {'train': dataset, 'test': dataset} "
                            "(optionally 'val')")
    return data


def _layout(data: dict[str, Any] | str, spec: str) -> InputLayout | None:
    """How the first train sample's inputs are packed (None: one tensor, or a data spec)."""
    if isinstance(data, str):
        return None
    train = samples_of(data["train"])
    try:
        first = train[0] if hasattr(train, "__getitem__") else next(iter(train))
    except Exception as exc:  # user code: report, do not crash
        raise TaskSpecError(f"reading the first train sample of task {spec!r} failed: "
                            f"{one_line(exc, typed=True)}") from exc
    if not isinstance(first, (tuple, list)) or len(first) < 2:
        return None  # materializing the data says what is wrong, naming the sample
    return layout_of(first[0], f"train sample 0 of {spec!r}")


def _metric(fields: dict[str, Any], spec: str) -> Metric:
    fn = _callable(fields.get("metric"), "metric", spec)
    higher = fields.get("higher_is_better", True)
    if not isinstance(higher, bool):
        raise TaskSpecError(f"task factory {spec!r}: 'higher_is_better' is {higher!r}; "
                            "use True or False")
    if fn is None:
        if not higher or fields.get("metric_name") is not None:
            raise TaskSpecError(f"task factory {spec!r} names a metric but gives no 'metric' "
                                "function; add it or drop metric_name/higher_is_better")
        return TOP1
    name = fields.get("metric_name") or getattr(fn, "__name__", "metric")
    if not isinstance(name, str) or not name.isidentifier():
        raise TaskSpecError(f"task factory {spec!r}: metric name {name!r} must be a short "
                            "identifier such as 'mae'")
    return Metric(name=name, higher_is_better=higher, fn=fn)


def _callable(value: Any, key: str, spec: str) -> Callable[..., Any] | None:
    if value is not None and not callable(value):
        raise TaskSpecError(f"task factory {spec!r}: {key!r} is {type(value).__name__}, "
                            "not a function")
    return value


def metric_of(spec: str | None) -> Metric:
    """The metric a study's model spec is scored with: its task's, else top-1."""
    return load_user_task(spec).metric if is_task_spec(spec) else TOP1
