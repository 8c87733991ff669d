"""Inheritance (trial/lineage.py, transform/inherit.py, transform/prune_lineage.py): a
fine-tune starts from the nearest trained trial whose kept channels contain the plan's."""

from __future__ import annotations

import itertools

import torch

from autocompress.intake import Task
from autocompress.model.plan import CompressionPlan
from autocompress.train import distill
from autocompress.train.losses import kd_loss
from autocompress.transform.prune_lineage import channel_origins
from autocompress.transform.student import build_student, torch_accuracy
from autocompress.trial.lineage import Lineage, distance

GROUPS = ("conv1", "block1.conv1", "down_conv", "block2.conv1")


def _plan(ratio: float, bits: int = 32, steps: int = 40) -> CompressionPlan:
    return CompressionPlan(prune=dict.fromkeys(GROUPS, ratio), finetune_steps=steps,
                           learning_rate=3e-3, kd_alpha=0.9)


def _prunable(task: Task) -> None:
    """The demo model's group names are what GROUPS says (a changed demo fails here, not
    deep inside pruning)."""
    from autocompress.transform.survey import build_inventory

    names = {g.name for g in build_inventory(task.model, task.data.example_input(1)).groups
             if g.prunable}
    assert set(GROUPS) <= names, names


def test_more_pruning_keeps_a_subset_of_the_channels_and_takes_their_trained_weights(
    demo_task: Task,
) -> None:
    _prunable(demo_task)
    example = demo_task.data.example_input(1)
    parent_plan, child_plan = _plan(0.25), _plan(0.5)
    parent = build_student(demo_task, parent_plan, 8)
    trained = {name: p.detach() + 1.0 for name, p in parent.named_parameters()}  # "trained"
    lineage = Lineage()
    lineage.add(1, parent_plan, _with(parent, trained), steps=40)
    lineage.measured(1, 0.95)
    entry = lineage.parent_for(child_plan, preferred=None, floor=0.5)
    assert entry is not None and entry.number == 1
    child = build_student(demo_task, child_plan, 8)
    before = {name: p.detach().clone() for name, p in child.named_parameters()}
    share = lineage.inherit(child, child_plan, entry, demo_task, 8, batches=[])
    assert share == 1.0
    # every child weight is a parent weight (+1 here), none the teacher's own
    origins_c = channel_origins(demo_task.model, child_plan, example)
    origins_p = channel_origins(demo_task.model, parent_plan, example)
    for name, p in child.named_parameters():
        assert torch.allclose(p.detach(), before[name] + 1.0, atol=1e-5), name
    for name, dims in origins_c.items():  # kept sets nest
        if name in origins_p:
            for mine, theirs in zip(dims, origins_p[name], strict=True):
                assert set(mine.tolist()) <= set(theirs.tolist()), name


def test_a_parent_that_pruned_more_is_not_inherited_from(demo_task: Task) -> None:
    lineage = Lineage()
    lineage.add(1, _plan(0.5), build_student(demo_task, _plan(0.5), 8), steps=40)
    lineage.measured(1, 0.95)
    assert distance(_plan(0.25), _plan(0.5)) is None
    assert lineage.parent_for(_plan(0.25), preferred=1, floor=0.5) is None
    # a retrain of the same plan trains on from the trial itself
    assert lineage.parent_for(_plan(0.5, steps=80), preferred=1, floor=0.5) is not None
    # below the early-stop floor: not a parent
    lineage.measured(1, 0.3)
    assert lineage.parent_for(_plan(0.5), preferred=1, floor=0.5) is None


def test_an_inherited_finetune_starts_above_the_teacher_started_one(demo_task: Task) -> None:
    """The same child plan and step count, from the trained parent vs from the teacher:
    the inherited one scores higher (top-1) and closer to the teacher (KD loss) on the
    validation split, at the start and after the same short fine-tune."""
    torch.manual_seed(0)
    data, teacher = demo_task.data, demo_task.model
    parent_plan, child_plan = _plan(0.5, steps=60), _plan(0.625, steps=10)
    bn = [x for x, _ in itertools.islice(data.batches("train", 64, shuffle=True, seed=1), 10)]
    parent = build_student(demo_task, parent_plan, 8, bn_batches=bn)
    distill.finetune(parent, teacher, data, parent_plan, batch_size=64, seed=0)
    lineage = Lineage()
    lineage.add(1, parent_plan, parent, steps=60)
    lineage.measured(1, 0.9)
    scratch = build_student(demo_task, child_plan, 8, bn_batches=bn)
    inherited = build_student(demo_task, child_plan, 8)
    entry = lineage.parent_for(child_plan, preferred=1, floor=0.5)
    assert entry is not None
    lineage.inherit(inherited, child_plan, entry, demo_task, 8, batches=bn[:4])
    start_i, start_s = _scores(inherited, demo_task), _scores(scratch, demo_task)
    assert start_i[0] >= start_s[0] and start_i[1] < start_s[1]
    for model in (scratch, inherited):
        distill.finetune(model, teacher, data, child_plan, batch_size=64, seed=0)
    accuracy_i, loss_i = _scores(inherited, demo_task)
    accuracy_s, loss_s = _scores(scratch, demo_task)
    assert accuracy_i >= accuracy_s and loss_i < loss_s


def _scores(model: torch.nn.Module, task: Task) -> tuple[float, float]:
    """(validation top-1, KD loss to the teacher at temperature 4)."""
    accuracy = torch_accuracy(model, task.data.batches("val", 256))
    with torch.no_grad():
        model.eval()
        losses = [float(kd_loss(model(x), task.model.eval()(x), 4.0))
                  for x, _ in task.data.batches("val", 256)]
    return accuracy, sum(losses) / len(losses)


def _with(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(values[name])
    return model


def test_a_cut_childs_channels_get_the_parents_output_statistics_back(
    demo_task: Task,
) -> None:
    from autocompress.transform.renormalize import _convs, _output_stats, match_channel_statistics

    example = demo_task.data.example_input(1)
    parent_plan, child_plan = _plan(0.25), _plan(0.5)
    parent = build_student(demo_task, parent_plan, 8)
    child = build_student(demo_task, child_plan, 8)
    mine = channel_origins(demo_task.model, child_plan, example)
    theirs = channel_origins(demo_task.model, parent_plan, example)
    from autocompress.transform.inherit import transplant

    transplant(child, mine, dict(parent.named_parameters()), theirs)
    batches = [x for x, _ in itertools.islice(demo_task.data.batches("train", 64), 3)]
    assert match_channel_statistics(child, parent, batches, mine, theirs) > 0
    want = _output_stats(parent, batches, _convs(parent))
    got = _output_stats(child, batches, _convs(child))
    for name in ("block1.conv2", "block2.conv2"):  # inputs cut: shifted before the fix
        where = {int(v): i for i, v in enumerate(theirs[f"{name}.weight"][0].tolist())}
        rows = [where[int(v)] for v in mine[f"{name}.weight"][0].tolist()]
        assert torch.allclose(got[name][0], want[name][0][rows], atol=1e-3)
        assert torch.allclose(got[name][1], want[name][1][rows], rtol=1e-3, atol=1e-4)
