"""A Task: the teacher and its data, loaded from specs and checked against each other."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.errors import DataSpecError, ModelSpecError, one_line
from autocompress.intake.data import DataSplits, as_sequences
from autocompress.intake.data_loading import load_data
from autocompress.intake.metric import TOP1, Metric
from autocompress.intake.models import _in_channels, check_model_input, load_model
from autocompress.intake.specs import DEMO_MODEL_SPEC, DIGITS_DATA_SPEC, default_cache_dir
from autocompress.intake.user_task import TASK_PREFIX, TaskSpecError, load_user_task


@dataclass(eq=False)  # tensors inside: == would be ambiguous
class Task:
    """What the search compresses: the teacher (eval mode, CPU) and the data it is scored on."""

    model: nn.Module
    data: DataSplits
    model_spec: str
    data_spec: str
    input_shape: tuple[int, ...]  # (C, H, W) images; (L,) or (L, F) inputs fed as they are
    num_classes: int
    weights: str | None = None
    metric: Metric = TOP1  # what the search maximises and export verifies
    loss: Callable[..., Any] | None = None  # the fine-tune's hard-target term (None: CE)


def load_task(
    model_spec: str | None,
    weights: str | None,
    data_spec: str | None,
    *,
    num_classes: int | None = None,
    input_size: int | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    task: str | None = None,
) -> Task:
    """Load model and data; with neither spec, the built-in demo CNN on digits.

    The demo teacher is trained on the train split of this seed's digits split at first
    use and cached; later calls load it. ``task`` (``file.py:factory``): the user's own
    model, data, metric and loss from one factory (see ``intake.user_task``).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if task is not None:
        return _load_user_task(task, model_spec, weights, data_spec, num_classes, input_size,
                               seed, cache, mean, std)
    if data_spec is None:
        data_spec = _demo_data_spec(model_spec)
    data = load_data(
        data_spec, input_size=input_size, seed=seed, cache_dir=cache, mean=mean, std=std,
        tokenizer=tokenizer_of(model_spec),
    )
    classes = _class_count(num_classes, data)
    if model_spec is None or (model_spec == DEMO_MODEL_SPEC and weights is None):
        model_spec = DEMO_MODEL_SPEC
        model = _demo_model(data, classes, cache, seed)
    else:
        model = load_model(model_spec, weights, num_classes=classes, input_shape=data.input_shape)
        # The zero-input check above fixed the shape; one real batch catches dtype surprises.
        check_model_input(model, data.example_input(2), model_spec)
    return Task(
        model=model.eval(),
        data=data,
        model_spec=model_spec,
        data_spec=data.spec,
        input_shape=data.input_shape,
        num_classes=classes,
        weights=str(weights) if weights is not None else None,
    )


def _demo_data_spec(model_spec: str | None) -> str:
    """Digits, the demo's data, when no data spec was given: only without a model spec."""
    if model_spec is not None and model_spec.strip().lower() == "demo":
        raise DataSpecError(
            "'demo' is not a model spec: for the built-in demo (a small CNN on digits), "
            "leave out --model and --data"
        )
    if model_spec is not None:
        raise DataSpecError(
            f"--model {model_spec} needs --data too (e.g. --data imagefolder:ROOT); "
            "without --model and --data the built-in demo runs"
        )
    return DIGITS_DATA_SPEC


def _class_count(num_classes: int | None, data: DataSplits) -> int:
    """``num_classes`` (checked against the data's classes), else the data's count."""
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ModelSpecError(f"--num-classes must be a positive integer, got {num_classes!r}")
    classes = num_classes if num_classes is not None else data.num_classes
    if classes < data.num_classes:
        raise ModelSpecError(
            f"--num-classes {classes} is less than the {data.num_classes} classes in "
            f"{data.spec!r}; drop --num-classes or match it to the data"
        )
    return classes


def _demo_model(data: DataSplits, classes: int, cache: Path, seed: int) -> nn.Module:
    """The built-in demo CNN, trained on this seed's digits at first use and cached."""
    if data.spec != DIGITS_DATA_SPEC:
        raise ModelSpecError(
            f"the built-in demo model is trained on digits only, not {data.spec!r}; "
            "pass --model (and --weights) for your own model"
        )
    if classes != data.num_classes:
        raise ModelSpecError(
            f"--num-classes {classes} does not fit the built-in demo, trained on "
            f"{data.num_classes} digit classes; drop --num-classes"
        )
    from autocompress.intake.demo import load_demo_model

    model: nn.Module = load_demo_model(data, cache_dir=cache, seed=seed)
    check_model_input(model, data.example_input(), DEMO_MODEL_SPEC)
    return model


def tokenizer_of(model_spec: str | None) -> str | None:
    """The folder whose tokenizer ``text:`` data uses by default: an ``hf:`` model's."""
    if model_spec is not None and model_spec.startswith("hf:"):
        return model_spec[len("hf:"):]
    return None


def _load_user_task(
    spec: str, model_spec: str | None, weights: str | None, data_spec: str | None,
    num_classes: int | None, input_size: int | None, seed: int, cache: Path,
    mean: Sequence[float] | None, std: Sequence[float] | None,
) -> Task:
    given = [flag for flag, value in (("--model", model_spec), ("--weights", weights),
                                      ("--data", data_spec), ("--num-classes", num_classes))
             if value is not None]
    if given:
        raise TaskSpecError(f"--task {spec} brings its own model and data; drop "
                            f"{', '.join(given)}")
    user = load_user_task(spec)
    stored = TASK_PREFIX + user.spec  # export and verify call the same factory again
    data = load_data(stored, input_size=input_size, seed=seed, cache_dir=cache, mean=mean,
                     std=std)
    # Targets other than class labels (values, masks) are scored by the task's metric on
    # whatever the model returns with the batch first.
    try:
        model = load_model(stored, None, input_shape=data.input_shape,
                           classes=data.has_classes)
    except ModelSpecError as as_images:
        # A 2-D float sample is a one-channel image or a sequence (steps, features): the
        # model decides. Export and verify load the task again and decide alike.
        # Only for a model the task built: a spec (torchvision:, zoo:) is built for images.
        sequences = None if (input_size, mean, std) != (None, None, None) or not isinstance(
            user.model, nn.Module) else as_sequences(data)
        if sequences is None:
            raise
        try:
            model = load_model(stored, None, input_shape=sequences.input_shape,
                               classes=data.has_classes)
        except ModelSpecError as as_steps:
            why = as_steps.__cause__ if as_steps.__cause__ is not None else as_steps
            raise ModelSpecError(f"{as_images}; fed as sequences {sequences.input_shape} it "
                                 f"fails too: {one_line(why, typed=True)}") from None
        data = sequences
    outputs = check_model_input(model, data.example_input(2), stored,
                                classes=data.has_classes)
    if user.metric.is_top1 and outputs < data.num_classes:
        raise ModelSpecError(f"task {spec!r}: the model outputs {outputs} classes but the data "
                             f"has {data.num_classes}; give the task a metric for other outputs")
    return Task(model=model.eval(), data=data, model_spec=stored, data_spec=stored,
                input_shape=data.input_shape, num_classes=outputs, metric=user.metric,
                loss=user.loss)


def load_for_profile(
    model_spec: str | None,
    weights: str | None,
    data_spec: str | None,
    *,
    num_classes: int | None = None,
    input_size: int | None = None,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> tuple[nn.Module, torch.Tensor]:
    """Model (eval mode) and one example input (batch 1) for ``autocompress profile``.

    Unlike a search, profiling needs no data: the input shape comes from ``input_shape``
    (C, H, W), else from the data when given, else from the model (first conv's channels,
    ``input_size`` or 224 square). No model and no data: the built-in demo.
    """
    if input_shape is not None:
        shape = tuple(input_shape)
        if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
            raise ModelSpecError(
                f"--input-shape must be C,H,W (three positive integers), got {shape}"
            )
    demo = model_spec in (None, DEMO_MODEL_SPEC) and weights is None
    if data_spec is not None or (demo and input_shape is None):
        task = load_task(
            model_spec if data_spec is not None else None,
            weights,
            data_spec,
            num_classes=num_classes,
            input_size=input_size,
            seed=seed,
            cache_dir=cache_dir,
        )
        if input_shape is not None and tuple(input_shape) != task.input_shape:
            raise ModelSpecError(
                f"--input-shape {tuple(input_shape)} differs from the data's {task.input_shape}; "
                "drop --input-shape or use --input-size to resize the data"
            )
        return task.model, task.data.example_input(1)
    if model_spec is None:
        model_spec = DEMO_MODEL_SPEC  # an untrained demo: the shape alone is being profiled
    if input_shape is not None:
        model = load_model(model_spec, weights, num_classes=num_classes, input_shape=shape)
    else:
        side = input_size or 224
        model = load_model(model_spec, weights, num_classes=num_classes, input_size=side)
        shape = (_in_channels(model), side, side)
    # Values do not change FLOPs or latency; a seeded random input avoids all-zero fast paths.
    example = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
    return model, example
