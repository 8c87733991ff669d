"""Hidden-feature distillation: forward hooks capture paired student and teacher layers'
outputs, and learned adapters map the student's (pruned, narrower) features onto the
teacher's for an MSE term."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.errors import PlanError, TrainingError
from autocompress.intake.outputs import first_tensor

__all__ = ["FeatureDistiller"]

_MAX_NAMES_SHOWN = 40


def _names_hint(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_SHOWN])
    more = len(names) - _MAX_NAMES_SHOWN
    return shown + (f" ... ({more} more)" if more > 0 else "")


def _make_adapter(student_shape: torch.Size, teacher_shape: torch.Size, name: str) -> nn.Module:
    """Map the student's feature width onto the teacher's (identity when they match).

    Pruning removes output channels, so a pruned layer's feature has fewer channels than the
    teacher's. A learned 1x1 conv (Linear for (N, F) features) projects it back; spatial
    sizes are reconciled separately by pooling.
    """
    if len(student_shape) != len(teacher_shape):
        raise PlanError(
            f"feature pair {name}: student output {tuple(student_shape)} and teacher output "
            f"{tuple(teacher_shape)} have different ranks; pair layers of the same kind"
        )
    c_s, c_t = student_shape[1], teacher_shape[1]
    if c_s == c_t:
        return nn.Identity()
    if len(student_shape) == 2:
        return nn.Linear(c_s, c_t)
    if len(student_shape) == 3:
        return nn.Conv1d(c_s, c_t, kernel_size=1)
    if len(student_shape) == 4:
        return nn.Conv2d(c_s, c_t, kernel_size=1)
    raise PlanError(
        f"feature pair {name}: {len(student_shape)}-D features {tuple(student_shape)} are not "
        "supported; pair layers with (N, F), (N, C, L) or (N, C, H, W) outputs"
    )


class FeatureDistiller:
    """Hidden-feature distillation over named (student_layer, teacher_layer) pairs.

    Forward hooks capture each paired layer's output; ``loss()`` returns the mean over pairs
    of MSE(adapter(pool(student_feature)), teacher_feature). Adapters are built from one
    probe forward of ``example_input`` and are trainable: give ``parameters()`` to the
    optimiser. Use as a context manager so hooks are removed afterwards::

        with FeatureDistiller(student, teacher, plan.feature_pairs, x) as fd:
            s, t = student(x), teacher(x)
            loss = fd.loss()

    A layer called several times in one forward (a shared ReLU) contributes its last call.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        pairs: Sequence[tuple[str, str]],
        example_input: torch.Tensor,
    ) -> None:
        self.pairs: tuple[tuple[str, str], ...] = tuple((str(s), str(t)) for s, t in pairs)
        if not self.pairs:
            raise PlanError("FeatureDistiller needs at least one (student, teacher) layer pair")
        self._student_feats: dict[str, torch.Tensor] = {}
        self._teacher_feats: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        student_modules = dict(student.named_modules())
        teacher_modules = dict(teacher.named_modules())
        try:
            for s_name, t_name in self.pairs:
                s_mod = _lookup(student_modules, s_name, "student")
                t_mod = _lookup(teacher_modules, t_name, "teacher")
                self._handles.append(
                    s_mod.register_forward_hook(self._capture(self._student_feats, s_name))
                )
                self._handles.append(
                    t_mod.register_forward_hook(self._capture(self._teacher_feats, t_name))
                )
            adapters = self._probe(student, teacher, example_input)
        except BaseException:
            self.close()
            raise
        self.adapters = nn.ModuleList(adapters)

    # -- hooks --------------------------------------------------------------------------

    @staticmethod
    def _capture(
        store: dict[str, torch.Tensor], name: str
    ) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = first_tensor(output)
            if tensor is not None:
                store[name] = tensor

        return hook

    def _probe(
        self, student: nn.Module, teacher: nn.Module, example_input: torch.Tensor
    ) -> list[nn.Module]:
        """One no-grad forward of both models in eval mode to learn the feature shapes."""
        modes = (student.training, teacher.training)
        student.eval()
        teacher.eval()
        try:
            with torch.no_grad():
                student(example_input)
                teacher(example_input)
        finally:
            student.train(modes[0])
            teacher.train(modes[1])
        adapters: list[nn.Module] = []
        for s_name, t_name in self.pairs:
            for side, store, name in (
                ("student", self._student_feats, s_name),
                ("teacher", self._teacher_feats, t_name),
            ):
                if name not in store:
                    raise PlanError(
                        f"{side} layer {name!r} produced no tensor output in a forward pass "
                        "(unused or non-tensor output); pick a layer on the forward path"
                    )
            s_shape = self._student_feats[s_name].shape
            t_shape = self._teacher_feats[t_name].shape
            adapters.append(_make_adapter(s_shape, t_shape, f"({s_name!r}, {t_name!r})"))
        self.clear()
        return adapters

    # -- public -------------------------------------------------------------------------

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.adapters.parameters()

    def to(self, device: torch.device | str) -> FeatureDistiller:
        self.adapters.to(device)
        return self

    def train(self, mode: bool = True) -> FeatureDistiller:
        self.adapters.train(mode)
        return self

    def clear(self) -> None:
        """Drop captured features (and the autograd graph they hold)."""
        self._student_feats.clear()
        self._teacher_feats.clear()

    def loss(self) -> torch.Tensor:
        """Mean feature MSE over the pairs captured by the last student and teacher forwards.

        Clears the captured features, so call once per step after both forwards.
        """
        terms: list[torch.Tensor] = []
        for (s_name, t_name), adapter in zip(self.pairs, self.adapters, strict=True):
            if s_name not in self._student_feats or t_name not in self._teacher_feats:
                missing = s_name if s_name not in self._student_feats else t_name
                self.clear()
                raise TrainingError(
                    f"no feature captured for layer {missing!r}; run both the student and "
                    "the teacher forward before FeatureDistiller.loss()"
                )
            s_feat = self._student_feats[s_name]
            t_feat = self._teacher_feats[t_name].detach()
            if s_feat.dim() >= 3 and s_feat.shape[2:] != t_feat.shape[2:]:
                # Pool before the 1x1 adapter: both are linear per position, so the order
                # does not change the result, and pooling first makes the adapter cheaper.
                s_feat = _adaptive_pool(s_feat, t_feat.shape[2:])
            terms.append(F.mse_loss(adapter(s_feat), t_feat))
        self.clear()
        return torch.stack(terms).mean()

    def close(self) -> None:
        """Remove every hook; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> FeatureDistiller:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _lookup(modules: dict[str, nn.Module], name: str, side: str) -> nn.Module:
    if name in modules:
        return modules[name]
    available = [n for n in modules if n]
    raise PlanError(
        f"{side} layer {name!r} is not in the {side} model; available layers: "
        f"{_names_hint(available)}"
    )


def _adaptive_pool(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if x.dim() == 3:
        return F.adaptive_avg_pool1d(x, tuple(size))
    if x.dim() == 4:
        return F.adaptive_avg_pool2d(x, tuple(size))
    return F.adaptive_avg_pool3d(x, tuple(size))
