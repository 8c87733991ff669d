"""Inheritance: a trial's fine-tune starts from the nearest already fine-tuned trial when that
is closer to its plan than the teacher is, instead of starting over.

Which trials can be parents. Fine-tuned (QAT + KD) trials of this process whose trained
weights are still held (``Lineage`` keeps them in memory up to ``MAX_BYTES``, the least
recently used dropped first; trials of other workers or earlier runs start from the teacher).
A parent must prune no group more than the child (the child's kept channels are then a subset
of the parent's: ``transform.prune_lineage``), use no unstructured sparsity, and have measured
at least the early-stop floor. Other widths are free: the child's fake-quant re-quantizes the
trained float weights at its own widths.

Nearest. Distance is the prune ratio still to remove, summed over groups, plus ``BITS_STEP``
per layer at another width; the teacher's distance is the child's whole prune ratio sum plus
``BITS_STEP`` per quantized layer. The trial a proposal was derived from is preferred when it
qualifies; a retrain of a plan (a promotion) inherits from the trial itself and trains on.
High compression is thus reached along a lineage, a step at a time (gradual pruning), and each
trial records what it inherited from (``inherited_from``) and its lineage's total steps.
A child that cuts channels its parent kept gets each convolution's output statistics restored
to the parent's (``transform.renormalize``): on the digits demo, 50% -> 62.5% pruned, the
inherited child started at 0.31 validation accuracy without that and 0.82 with it (0.24 from
the teacher with BatchNorm re-estimated).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autocompress.errors import one_line
from autocompress.model.plan import CompressionPlan
from autocompress.study import attrs as trial_attrs
from autocompress.transform.inherit import transplant
from autocompress.transform.prune_lineage import Origins, channel_origins
from autocompress.transform.renormalize import match_channel_statistics
from autocompress.transform.student import build_student

if TYPE_CHECKING:
    from autocompress.intake import Task
    from autocompress.trial.context import SearchContext

log = logging.getLogger("autocompress")

MAX_BYTES = 1 << 30  # trained weights held for inheritance
BITS_STEP = 0.02  # distance of one layer at another width (a prune ratio of 0.02 in one group)


@dataclass
class Trained:
    """A fine-tuned trial's float weights (named as in its BN-folded student), with the
    plan they were trained for."""

    number: int
    plan: CompressionPlan
    params: dict[str, torch.Tensor]
    steps: int  # fine-tune steps along its lineage, its own included
    accuracy: float | None = None  # validation, measured on its exported file

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.params.values())


def can_inherit(plan: CompressionPlan) -> bool:
    """Whether a plan's fine-tune could start from a relative (a QAT plan without
    unstructured sparsity: its zeros are chosen on the teacher's magnitudes)."""
    return not plan.is_ptq and plan.finetune_steps > 0 and not plan.sparse


def distance(child: CompressionPlan, parent: CompressionPlan | None) -> float | None:
    """How far ``parent`` (None: the teacher) is from ``child``; None when its kept channels
    do not contain the child's."""
    groups = set(child.prune) | (set() if parent is None else set(parent.prune))
    pruned = 0.0
    for group in groups:
        left = child.ratio_for(group) - (0.0 if parent is None else parent.ratio_for(group))
        if left < -1e-9:
            return None
        pruned += left
    if parent is None:
        widths = sum(1 for bits in child.bits.values() if bits < 32)
    else:
        layers = set(child.bits) | set(parent.bits)
        widths = sum(1 for layer in layers if child.bits_for(layer) != parent.bits_for(layer))
    return pruned + BITS_STEP * widths


def nearest_parent(
    plan: CompressionPlan, candidates: Sequence[tuple[int, CompressionPlan, float | None]], *,
    preferred: int | None, floor: float,
) -> int | None:
    """Of ``candidates`` (number, plan, measured accuracy), the one ``plan``'s fine-tune
    starts from (module docstring): ``preferred`` when it qualifies, else the nearest (ties:
    the more accurate, then the first given); None when the teacher is as near. The rule the
    runner inherits by and the proposer predicts by."""
    if not can_inherit(plan):
        return None
    teacher = distance(plan, None) or 0.0  # never None: the teacher prunes nothing
    best: tuple[float, float, int] | None = None
    for number, parent, accuracy in candidates:
        if accuracy is None or accuracy < floor or not can_inherit(parent):
            continue
        far = distance(plan, parent)
        if far is None or far >= teacher:
            continue
        if number == preferred:
            return number
        if best is None or (far, -accuracy) < best[:2]:
            best = (far, -accuracy, number)
    return None if best is None else best[2]


class Lineage:
    """The trained weights this process holds for inheritance, and the channel origins of
    each pruned structure (computed once per structure)."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._trained: OrderedDict[int, Trained] = OrderedDict()
        self._origins: dict[str, Origins] = {}

    def __len__(self) -> int:
        return len(self._trained)

    def add(self, number: int, plan: CompressionPlan, model: nn.Module, steps: int) -> None:
        self.hold(number, plan, {name: p.detach().to("cpu", copy=True)
                                 for name, p in model.named_parameters()}, steps)

    def hold(self, number: int, plan: CompressionPlan, params: dict[str, torch.Tensor],
             steps: int) -> None:
        self._trained[number] = Trained(number, plan, params, steps)
        self._trained.move_to_end(number)
        while (len(self._trained) > 1
               and sum(t.nbytes for t in self._trained.values()) > self.max_bytes):
            self._trained.popitem(last=False)

    def measured(self, number: int, accuracy: float | None) -> None:
        if number in self._trained:
            self._trained[number].accuracy = accuracy

    def get(self, number: int) -> Trained | None:
        return self._trained.get(number)

    def parent_for(
        self, plan: CompressionPlan, *, preferred: int | None, floor: float
    ) -> Trained | None:
        """The nearest held trial that qualifies (module docstring), ``preferred`` first;
        None when the teacher is as near."""
        number = nearest_parent(plan, [(t.number, t.plan, t.accuracy)
                                       for t in self._trained.values()],
                                preferred=preferred, floor=floor)
        return None if number is None else self._used(self._trained[number])

    def _used(self, entry: Trained) -> Trained:
        self._trained.move_to_end(entry.number)
        return entry

    def origins(self, model: nn.Module, plan: CompressionPlan, example: torch.Tensor,
                round_to: int) -> Origins:
        # origins depend on the channels removed alone
        key = json.dumps(sorted((g, r) for g, r in plan.prune.items() if r > 0))
        if key not in self._origins:
            self._origins[key] = channel_origins(model, plan, example, round_to=round_to)
        return self._origins[key]

    def inherit(self, student: nn.Module, plan: CompressionPlan, parent: Trained,
                task: Task, round_to: int, batches: Sequence[torch.Tensor]) -> float:
        """Copy ``parent``'s trained weights into ``student`` (the child's folded structure,
        in place), then, when the child has lost channels the parent had, give each
        convolution's channels back the parent's output statistics on ``batches``
        (``transform.renormalize``: a folded model has no BatchNorm left to re-estimate).
        Returns the share of the child's weights copied."""
        example = task.data.example_input(1)
        mine = self.origins(task.model, plan, example, round_to)
        theirs = self.origins(task.model, parent.plan, example, round_to)
        share = transplant(student, mine, parent.params, theirs)
        if _cuts_more(plan, parent.plan) and batches:
            trained = build_student(task, parent.plan, round_to)
            with torch.no_grad():
                for name, p in trained.named_parameters():
                    if name in parent.params:
                        p.copy_(parent.params[name])
            match_channel_statistics(student, trained, batches, mine, theirs)
        return share


def load_stored(lineage: Lineage, study: Any, number: int, ctx: SearchContext,
                base: str | None = None) -> bool:
    """Hold trial ``number``'s trained weights from the artifact store (its ``student.pt``),
    so a retrain in another process or worker inherits it as one in the same process would.
    False (the teacher, as before) when the trial is not a finished fine-tune, compresses
    another base model than ``base`` (None: the teacher; a ``--student`` spec: that student,
    whose layer names the plan is keyed by), or its file cannot be read; why is logged."""
    if ctx.download is None:
        return False
    found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    attrs = found[0].user_attrs if found else {}
    stored_base = attrs.get(trial_attrs.BASE_MODEL)
    if (None if stored_base in (None, trial_attrs.TEACHER_BASE) else stored_base) != base:
        return False  # another architecture's weights never fit this one's structure
    artifact = attrs.get(trial_attrs.TORCH_ARTIFACT_ID)
    if not found or artifact is None or attrs.get(trial_attrs.TORCH_KIND) != "qat" or (
            attrs.get(trial_attrs.PLAN) is None):
        return False
    dest = ctx.workdir / f"inherit-{number}.pt"
    try:
        ctx.download(str(artifact), dest)
        state = torch.load(str(dest), map_location="cpu", weights_only=True)
    except Exception as exc:
        log.warning("trial %d's weights could not be read (%s); the retrain starts from the "
                    "teacher", number, one_line(exc, typed=True))
        return False
    plan = CompressionPlan.from_json(attrs[trial_attrs.PLAN])
    steps = attrs.get(trial_attrs.LINEAGE_STEPS, attrs.get(trial_attrs.FINETUNE_STEPS_RUN, 0))
    lineage.hold(number, plan, {k: v for k, v in state.items() if v.is_floating_point()},
                 int(steps or 0))
    lineage.measured(number, attrs.get(trial_attrs.ACCURACY))
    return True


def _cuts_more(child: CompressionPlan, parent: CompressionPlan) -> bool:
    return any(child.ratio_for(g) > parent.ratio_for(g) + 1e-9 for g in child.prune)

__all__ = ["BITS_STEP", "MAX_BYTES", "Lineage", "Trained", "can_inherit", "distance",
           "load_stored", "nearest_parent"]
