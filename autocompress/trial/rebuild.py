"""Rebuild a trial's model from plain data: model spec, plan and saved state_dict.

``rebuild`` turns what a study records (nothing live) back into the model a trial
fine-tuned; ``export`` and the Python API both use it, so imports run one way
(api -> export -> rebuild, api -> rebuild). Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocompress.errors import PlanError
from autocompress.model.plan import CompressionPlan

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["rebuild", "rebuild_parts"]


@dataclass
class _ExampleData:
    """The one piece of ``DataSplits`` that ``build_student`` uses: an example input."""

    example: torch.Tensor

    def example_input(self, batch: int = 1) -> torch.Tensor:
        reps = -(-batch // self.example.shape[0])
        return self.example.repeat(reps, *([1] * (self.example.dim() - 1)))[:batch]


@dataclass
class _TaskShim:
    """Task-like object for ``transform.student.build_student`` (teacher + example input only)."""

    model: nn.Module
    data: _ExampleData


def _as_plan(plan: CompressionPlan | Mapping[str, Any] | str) -> CompressionPlan:
    if isinstance(plan, CompressionPlan):
        return plan
    if isinstance(plan, str):
        return CompressionPlan.from_json(plan)
    return CompressionPlan.from_dict(dict(plan))


def _first_in_channels(model: nn.Module) -> int:
    from torch import nn

    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return int(module.in_channels)
    raise PlanError("cannot tell the model's input channels (no Conv layer); pass input_shape")


def _example_for(
    model: nn.Module, input_size: int | None, input_shape: tuple[int, ...] | None
) -> torch.Tensor:
    import torch

    if input_shape is not None:
        from autocompress.intake.models import zeros_input

        return zeros_input(model, (1, *input_shape))
    if input_size is not None:
        return torch.zeros((1, _first_in_channels(model), input_size, input_size))
    raise PlanError(
        "rebuild needs the input size to trace the model for pruning; pass input_size=N "
        "(square images) or input_shape=(C, H, W)"
    )


def rebuild_parts(
    model_spec: str,
    weights: str | Path | None,
    plan: CompressionPlan | Mapping[str, Any] | str,
    *,
    num_classes: int | None = None,
    input_size: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    state_dict: Mapping[str, torch.Tensor] | str | Path | None = None,
    round_to: int = 8,
) -> tuple[nn.Module, nn.Module]:
    """(model, float structure): ``rebuild``'s result and the pruned, BN-folded float model
    it was made from (same layer names; what per-layer FLOPs/params are counted on)."""
    import torch

    from autocompress import intake
    from autocompress.transform import quantize
    from autocompress.transform.student import build_student

    plan = _as_plan(plan)
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
    teacher = intake.load_model(
        model_spec, weights, num_classes=num_classes, input_size=input_size, input_shape=shape
    )
    example = _example_for(teacher, input_size, shape)
    student = build_student(_TaskShim(teacher, _ExampleData(example)), plan, round_to)
    student.eval()
    if state_dict is None:
        return quantize.prepare_qat(student, plan).eval(), student
    if isinstance(state_dict, (str, Path)):
        state_dict = torch.load(str(state_dict), map_location="cpu", weights_only=True)
    state = dict(state_dict)
    # Baseline trials save the float student (no fake-quant buffers); search trials save the
    # QAT model. The keys tell which one this state_dict belongs to.
    if set(state) == set(student.state_dict()):
        _load_strict(student, state, plan)
        return student, student
    model = quantize.prepare_qat(student, plan)
    _load_strict(model, state, plan)
    float_model = quantize.strip_fake_quant(model)[0] if quantize.is_prepared(model) else model
    return model.eval(), float_model.eval()


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], plan: CompressionPlan) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [
            f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                ("wrong shape", wrong))
            if keys
        ]
        raise PlanError(
            f"state_dict does not fit the model rebuilt from plan {plan.summary()!r} "
            f"({'; '.join(parts)}); pass the state_dict saved by the same trial"
        )
    model.load_state_dict(state, strict=True)


def rebuild(
    model_spec: str,
    weights: str | Path | None,
    plan: CompressionPlan | Mapping[str, Any] | str,
    *,
    num_classes: int | None = None,
    input_size: int | None = None,
    state_dict: Mapping[str, torch.Tensor] | str | Path | None = None,
    input_shape: tuple[int, ...] | None = None,
    round_to: int = 8,
) -> nn.Module:
    """The model a trial fine-tuned, rebuilt from plain data, in eval mode.

    intake.load_model(spec, weights) -> transform.student.build_student (prune per plan with
    ``round_to``, BN fold) -> quantize.prepare_qat(plan) -> load ``state_dict`` (a dict or a
    ``torch.save`` file; a float state_dict of a baseline trial skips prepare_qat). Without a
    state_dict the QAT model carries the teacher's (pruned) weights. The pruned channel
    counts depend only on the plan and ``round_to``, so ``weights`` may be None when a
    state_dict is given. ``input_shape`` (C, H, W) or ``input_size`` traces the model.
    """
    return rebuild_parts(
        model_spec, weights, plan, num_classes=num_classes, input_size=input_size,
        input_shape=input_shape, state_dict=state_dict, round_to=round_to,
    )[0]
