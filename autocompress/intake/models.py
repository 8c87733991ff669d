"""Model intake: torchvision, timm, file or package factories, the demo; weights loaded safely."""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.errors import ModelSpecError, one_line
from autocompress.intake.outputs import describe_output, prediction_of
from autocompress.intake.specs import (
    _MODEL_FORMS,
    CHECKPOINT_KEYS,
    DEMO_MODEL_SPEC,
    _is_factory_target,
    _resolve_factory,
)
from autocompress.intake.user_task import is_task_spec, load_user_task


def load_model(
    spec: str,
    weights: str | Path | None = None,
    *,
    num_classes: int | None = None,
    input_size: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    classes: bool = True,
) -> nn.Module:
    """Build the model a spec names, load ``weights`` strictly, check it accepts the input.

    ``input_shape`` (C, H, W) or else ``input_size`` (channels read off the first conv) is
    checked with one forward pass; with neither, no forward check runs. ``classes``: the
    output must be (batch, classes) logits (else any tensor with the batch first, for tasks
    whose targets are not class labels). The model comes back on CPU in eval mode.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"empty model spec {spec!r}; use {_MODEL_FORMS}")
    spec = spec.strip()
    for label, value in (("--num-classes", num_classes), ("--input-size", input_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ModelSpecError(f"{label} must be a positive integer, got {value!r}")
    if is_task_spec(spec) and not load_user_task(spec).metric.is_top1:
        classes = False  # a task with its own metric may predict anything (intake.sample_targets)
    model = _build_model(spec, num_classes, input_shape)
    dropped = drop_training_heads(model)
    if weights is not None:
        load_weights(model, weights, ignore=dropped)
    model = model.cpu().eval()
    if input_shape is not None:
        shape: tuple[int, ...] | None = (1, *input_shape)
    elif input_size is not None:
        shape = (1, _in_channels(model), input_size, input_size)
    else:
        shape = None
    if shape is not None:
        _return_prediction_if_needed(model, zeros_input(model, shape), spec)
        outputs = check_model_input(model, zeros_input(model, shape), spec, classes=classes)
        if num_classes is not None and outputs != num_classes:
            raise ModelSpecError(
                f"model {spec!r} outputs {outputs} classes but {num_classes} are needed; make "
                "its factory accept num_classes= or pass --num-classes to match the model"
            )
    return model


def _build_model(
    spec: str, num_classes: int | None, input_shape: tuple[int, ...] | None
) -> nn.Module:
    prefix, sep, name = spec.partition(":")
    if is_task_spec(spec):
        model = load_user_task(spec).fresh_model()
        return model if isinstance(model, nn.Module) else _build_model(
            model, num_classes, input_shape)
    if spec == DEMO_MODEL_SPEC:
        from autocompress.intake.demo import build_demo_model

        channels = input_shape[0] if input_shape else 1
        return build_demo_model(channels, num_classes or 10)
    if sep and prefix == "torchvision":
        return _build_torchvision(name, num_classes, input_shape)
    if sep and prefix == "hf":
        from autocompress.intake.text import load_hf_model

        return load_hf_model(name, num_classes)
    if sep and prefix == "timm":
        return _build_timm(name, num_classes)
    if sep and _is_factory_target(spec):
        factory = _resolve_factory(spec, ModelSpecError, "model")
        model = _call_model_factory(factory, spec, num_classes)
        if not isinstance(model, nn.Module):
            raise ModelSpecError(
                f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module; "
                "return the model instance"
            )
        return model
    hint = ""
    from torchvision import models

    if spec in models.list_models(module=models):
        hint = f" (did you mean torchvision:{spec}?)"
    raise ModelSpecError(f"unknown model spec {spec!r}; use {_MODEL_FORMS}{hint}")


def _build_torchvision(
    name: str, num_classes: int | None, input_shape: tuple[int, ...] | None
) -> nn.Module:
    from torchvision import models

    names = models.list_models(module=models)  # classification models only
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = (
            f"; did you mean {', '.join('torchvision:' + c for c in close)}?"
            if close
            else ("; see torchvision.models.list_models(module=torchvision.models)")
        )
        raise ModelSpecError(f"unknown torchvision classification model {name!r}{hint}")
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if name.startswith("vit_") and input_shape is not None and len(input_shape) == 3 \
            and input_shape[1] == input_shape[2]:
        # ViTs fix their position embeddings to one image size (224 by default); build them
        # for the data's size, as fine-tuning at another resolution does.
        kwargs["image_size"] = input_shape[1]
    try:
        return models.get_model(name, **kwargs)
    except Exception as exc:
        raise ModelSpecError(
            f"torchvision model {name!r} could not be built: {one_line(exc, typed=True)}"
        ) from exc


def _build_timm(name: str, num_classes: int | None) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise ModelSpecError(
            f"timm is not installed; pip install timm (needed for timm:{name})"
        ) from exc
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ModelSpecError(f"unknown timm model {name!r}{hint}")
    kwargs: dict[str, Any] = {"pretrained": False}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return timm.create_model(name, **kwargs)
    except Exception as exc:
        raise ModelSpecError(
            f"timm model {name!r} could not be built: {one_line(exc, typed=True)}"
        ) from exc


def _call_model_factory(factory: Callable[..., Any], spec: str, num_classes: int | None) -> Any:
    """Call the factory, passing num_classes= only when it accepts that keyword."""
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        try:
            params = inspect.signature(factory).parameters.values()
        except (TypeError, ValueError):  # builtins and some C callables have no signature
            params = []
        if any(p.name == "num_classes" or p.kind is p.VAR_KEYWORD for p in params):
            kwargs["num_classes"] = num_classes
    try:
        return factory(**kwargs)
    except Exception as exc:  # user code: report, do not crash
        raise ModelSpecError(
            f"model factory {spec!r} raised {one_line(exc, typed=True)}; fix the factory "
            "(it is called with no arguments, or num_classes= when it accepts it)"
        ) from exc


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: a state_dict, or a checkpoint dict holding one.

    Loaded with ``weights_only=True``: a file that needs arbitrary unpickling is refused.
    A leading ``module.`` (DataParallel / DDP) prefix is stripped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelSpecError(f"weights file {path} does not exist; check --weights")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if "Weights only load failed" in text and found:
            raise ModelSpecError(
                f"weights file {path} holds a pickled {found.group(1)}, refused on purpose: "
                "unpickling it could run arbitrary code; re-save it with "
                "torch.save(model.state_dict(), path)"
            ) from exc
        raise ModelSpecError(
            f"weights file {path} is not a PyTorch checkpoint ({type(exc).__name__}); "
            "save one with torch.save(model.state_dict(), path)"
        ) from exc
    state = obj
    if isinstance(obj, dict) and not _is_tensor_dict(obj):
        state = next((obj[k] for k in CHECKPOINT_KEYS if isinstance(obj.get(k), dict)), None)
    if not isinstance(state, dict) or not _is_tensor_dict(state):
        held = f"a {type(obj).__name__}"
        if isinstance(obj, dict):
            held = (
                f"a dict with keys {', '.join(map(str, list(obj)[:5]))}" if obj else "an empty dict"
            )
        raise ModelSpecError(
            f"weights file {path} is not a checkpoint: it holds {held}; "
            f"expected a state_dict or a dict with one under {', '.join(CHECKPOINT_KEYS)}"
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _is_tensor_dict(obj: dict[Any, Any]) -> bool:
    return bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def load_weights(
    model: nn.Module, weights: str | Path, *, ignore: tuple[str, ...] = ()
) -> None:
    """Load a weights file into ``model`` strictly; any mismatch is a ModelSpecError.

    Only ``num_batches_tracked`` buffers may be absent (older checkpoints lack them and
    they do not change what the model computes). Keys under the module names in ``ignore``
    (training-only heads already removed) may be present or not.
    """
    state = read_state_dict(weights)
    if ignore:
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] not in ignore}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} file {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                more = f", +{len(items) - 3} more" if len(items) > 3 else ""
                problems.append(f"{len(items)} {label} ({'; '.join(items[:3])}{more})")
        raise ModelSpecError(
            f"weights {weights} do not fit the model: {', '.join(problems)}; check that --model "
            "and --num-classes match the checkpoint"
        )
    model.load_state_dict(state, strict=False)


def takes_token_ids(model: nn.Module) -> bool:
    """Whether the model's input is integer token ids: it says so (``input_dtype``), or the
    first module with weights is an embedding table."""
    declared = getattr(model, "input_dtype", None)
    if isinstance(declared, torch.dtype):
        return not declared.is_floating_point
    first = next((m for m in model.modules() if isinstance(getattr(m, "weight", None),
                                                            torch.Tensor)), None)
    return isinstance(first, nn.Embedding)


def zeros_input(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """An all-zero input of ``shape`` (batch included) of the dtype the model takes; zeros are
    valid token ids (padding) for text models."""
    return torch.zeros(shape, dtype=torch.int64 if takes_token_ids(model) else torch.float32)


def _in_channels(model: nn.Module) -> int:
    """Input channels of the first conv (3 when the model has none)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return int(module.in_channels)
    return 3


# Auxiliary classifiers that torchvision's GoogLeNet and Inception v3 run in training mode
# only: they are not deployed, and structured pruning traced in eval mode cannot see them
# (pruning the block they read from would break them). torchvision drops them the same way
# when it loads pretrained weights.
_TRAINING_HEADS = ("aux1", "aux2", "AuxLogits")


def drop_training_heads(model: nn.Module) -> tuple[str, ...]:
    """Remove a model's training-only auxiliary classifiers; returns their names."""
    if getattr(model, "aux_logits", False) is not True:
        return ()
    dropped = tuple(
        name for name in _TRAINING_HEADS if isinstance(getattr(model, name, None), nn.Module)
    )
    for name in dropped:
        setattr(model, name, None)
    model.aux_logits = False
    return dropped


def _run(model: nn.Module, example: torch.Tensor, spec: str) -> Any:
    model.eval()
    try:
        with torch.no_grad():
            return model(example)
    except Exception as exc:  # any failure means the shape is not accepted
        raise ModelSpecError(
            f"model {spec!r} rejects input of shape {tuple(example.shape)}: "
            f"{one_line(exc, typed=True)}; pass --input-size N to feed NxN images (or data "
            "with the channel count it expects)"
        ) from exc


def _return_prediction_if_needed(model: nn.Module, example: torch.Tensor, spec: str) -> None:
    """Make a model that returns a tuple, named tuple, dict or ``ModelOutput`` return its
    prediction tensor (``prediction_of``), in place, so that distillation, ONNX export and
    scoring see one logits tensor. Parameter and module names do not change: the model's
    class is swapped for a subclass whose ``forward`` picks the prediction."""
    out = _run(model, example, spec)
    if isinstance(out, torch.Tensor):
        return
    if prediction_of(out) is None:
        raise ModelSpecError(
            f"model {spec!r} returned {describe_output(out)} with no tensor in it; it must "
            "return logits of shape (batch, classes)"
        )
    base = type(model)

    # wraps: the signature stays the model's own, which torch.export matches inputs against
    @functools.wraps(base.forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        output = base.forward(self, *args, **kwargs)
        picked = prediction_of(output)
        return output if picked is None else picked

    model.__class__ = type(
        base.__name__,
        (base,),
        {"forward": forward, "__module__": base.__module__, "__qualname__": base.__qualname__},
    )


def check_model_input(model: nn.Module, example: torch.Tensor, spec: str, *,
                      classes: bool = True) -> int:
    """One eval-mode forward pass; returns the number of output classes (``classes``: logits
    (batch, classes) are required), else the size of the output's dimension 1 (any tensor
    with the batch first: values, per-pixel logits; 1 for (batch,) outputs)."""
    shape = tuple(example.shape)
    out = _run(model, example, spec)
    if not classes and isinstance(out, torch.Tensor) and out.ndim >= 1 \
            and out.shape[0] == shape[0]:
        return int(out.shape[1]) if out.ndim >= 2 else 1
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else describe_output(out)
        raise ModelSpecError(
            f"model {spec!r} returned {got} for input {shape}; it must return logits of "
            "shape (batch, classes): wrap it to return the logits tensor"
        )
    return int(out.shape[1])
