"""Structured (channel) pruning: the coupled groups a model offers and a new model with
their channels removed. Part of the torch-pruning adapter, with ``prune_graph`` (which reads
the dependency graph into groups); torch_pruning is imported by these prune modules of
``transform`` only.

Structured pruning removes output channels for real: the pruned model has smaller Conv/Linear
weights, so it is smaller and faster in any runtime, not just sparser. The channels of one
coupled group (``prune_graph``) go together; attention query/key/value groups go in whole
heads (``prune_heads``).

Which channels go: the lowest-importance ones of the group (``prune_graph``). How many stay:
``channels * (1 - ratio)`` rounded to a multiple of ``round_to`` (CPU kernels gain nothing
from odd channel counts), never zero.

A group torch-pruning cannot prune (it raises, or the pruned model no longer runs or changes
its output shape) is left dense and reported with the reason, never a crash. Unstructured
(weight) pruning is ``sparsity``'s; BatchNorm re-estimation after pruning, ``batchnorm``'s.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from autocompress.errors import InputError, PlanError, one_line
from autocompress.model.groups import PruneGroup, kept_channels
from autocompress.model.guard import analysis_limits, limited
from autocompress.model.plan import CompressionPlan
from autocompress.transform.prune_graph import (
    WEIGHT_TYPES,
    CoupledGroup,
    build_graph,
    collect_groups,
    out_channels,
    scratch_copy,
)
from autocompress.transform.prune_heads import head_removal, set_head_count

log = logging.getLogger("autocompress")

# Ratio used to check, once per model, that every group really can be pruned.
_PROBE_RATIO = 0.5


@dataclass
class PruneReport:
    """What ``prune_with_report`` did, per requested group: ``channels`` before and ``kept``
    after (equal when rounding kept them all), or the reason in ``failed`` (left dense)."""

    channels: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": dict(self.channels),
            "kept": dict(self.kept),
            "failed": dict(self.failed),
        }


# -- public API -------------------------------------------------------------------------


def dependency_groups(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    min_channels: int = 8,
    probe: bool = True,
) -> list[PruneGroup]:
    """Coupled output-channel groups of ``model``, in model order; the caller's model is untouched.

    Unprunable groups are kept in the list with ``prunable=False`` and the reason: the
    classifier output, groups with fewer than ``min_channels`` channels, and (with ``probe``)
    groups that torch-pruning fails to prune at ratio 0.5 on a scratch copy.
    """
    work = scratch_copy(model)
    memory, seconds = analysis_limits()
    failed: dict[str, str] = {}
    try:
        # The first analysis of a model is the one that may explode (swin_t: 24 GB, killed
        # by the OOM killer): guarded, it ends as "no pruning" with the reason instead.
        with limited("torch-pruning's dependency analysis", memory_bytes=memory,
                     seconds=seconds):
            graph = build_graph(work, example_input)
            groups = collect_groups(work, graph, min_channels=min_channels)
            if probe:
                ratios = {g.name: _PROBE_RATIO for g in groups if g.excluded_reason is None}
                _, report = _prune_groups(
                    model, groups, ratios, example_input, round_to=1, traced=(work, graph)
                )
                failed = report.failed
    except Exception as exc:  # tracing can fail on exotic models: report, never crash
        reason = f"dependency tracing failed ({one_line(exc, typed=True)})"
        log.warning("structured pruning is off for this model: %s", reason)
        return [
            PruneGroup(name, [name], out_channels(m), False, reason)
            for name, m in work.named_modules()
            if isinstance(m, WEIGHT_TYPES)
        ]
    return [
        PruneGroup(
            name=g.name,
            members=list(g.members),
            channels=g.channels,
            prunable=g.excluded_reason is None and g.name not in failed,
            excluded_reason=g.excluded_reason or failed.get(g.name),
        )
        for g in groups
    ]


def prune(
    model: nn.Module,
    plan: CompressionPlan,
    example_input: torch.Tensor,
    *,
    round_to: int = 8,
) -> nn.Module:
    """A new model with channels removed per ``plan.prune``; the caller's model is untouched.

    Groups that torch-pruning fails on stay dense (a warning names them); use
    ``prune_with_report`` to get the reasons as data.
    """
    pruned, report = prune_with_report(model, plan, example_input, round_to=round_to)
    if report.failed:
        warnings.warn(
            "groups left dense: "
            + "; ".join(f"{name}: {why}" for name, why in report.failed.items()),
            stacklevel=2,
        )
    return pruned


def prune_with_report(
    model: nn.Module,
    plan: CompressionPlan,
    example_input: torch.Tensor,
    *,
    round_to: int = 8,
    min_channels: int = 8,
) -> tuple[nn.Module, PruneReport]:
    """Like ``prune`` but also returns a PruneReport (channels kept, groups left dense + why)."""
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise InputError(f"round_to {round_to!r} must be an integer >= 1 (try 8)")
    ratios = {name: r for name, r in plan.prune.items() if r > 0}
    if not ratios:
        return copy.deepcopy(model), PruneReport()
    work = scratch_copy(model)
    try:
        graph = build_graph(work, example_input)
    except Exception as exc:
        raise PlanError(
            f"prunable group {next(iter(ratios))!r} cannot be used: dependency tracing "
            f"failed ({one_line(exc, typed=True)}); leave plan.prune empty for this model"
        ) from None
    groups = collect_groups(work, graph, min_channels=min_channels)
    _check_names(ratios, groups)
    return _prune_groups(
        model, groups, ratios, example_input, round_to=round_to, traced=(work, graph)
    )


def _check_names(ratios: dict[str, float], groups: list[CoupledGroup]) -> None:
    allowed = sorted(g.name for g in groups if g.excluded_reason is None)
    by_name = {g.name: g for g in groups}
    member_of = {m: g.name for g in groups for m in g.members}
    for name in ratios:
        group = by_name.get(name)
        if group is not None and group.excluded_reason is None:
            continue
        if group is not None:
            why = f"cannot be used: {group.excluded_reason}"
        elif name in member_of:
            why = f"is coupled to group {member_of[name]!r}: prune it by that name"
        else:
            why = "does not exist in this model"
        raise PlanError(f"prunable group {name!r} {why}; allowed: {_shown(allowed)}")


# -- pruning ----------------------------------------------------------------------------


def _removal(group: CoupledGroup, ratio: float, round_to: int) -> list[int]:
    """Root-channel indices to remove: the lowest-importance positions, evenly per chunk."""
    if group.heads is not None and group.importance is not None:
        # whole heads: the count of heads kept, by the same rule as channels (>= 1)
        keep_heads = kept_channels(group.heads.count, ratio, round_to=1)
        return head_removal(group.importance, group.heads, keep_heads)
    keep = kept_channels(
        group.channels, ratio, round_to=round_to, channel_groups=group.channel_groups
    )
    if keep >= group.channels or group.importance is None:
        return []
    chunks = group.channel_groups
    size = group.channels // chunks
    # [chunks, size] -> one score per position inside a chunk, shared by every chunk.
    per_position = group.importance.view(chunks, size).sum(0)
    order = torch.argsort(per_position, descending=True, stable=True)
    drop = sorted(order[keep // chunks :].tolist())
    return [c * size + p for c in range(chunks) for p in drop]


def _prune_groups(
    model: nn.Module,
    groups: list[CoupledGroup],
    ratios: dict[str, float],
    example_input: torch.Tensor,
    *,
    round_to: int,
    traced: tuple[nn.Module, tp.DependencyGraph],
) -> tuple[nn.Module, PruneReport]:
    """Prune every group in ``ratios``; a group that fails is dropped and the copy rebuilt
    without it (a half-pruned copy cannot be trusted).

    ``traced`` is an untouched scratch copy of ``model`` with its graph, used for the first
    attempt. One forward pass checks the result; only when it fails are the groups re-applied
    one at a time with a check after each, to name the culprit.
    """
    by_name = {g.name: g for g in groups}
    removals = {name: _removal(by_name[name], r, round_to) for name, r in ratios.items()}
    report = PruneReport()
    for name in [name for name, idxs in removals.items() if not idxs]:
        # Rounding kept every channel (e.g. 8 channels at 0.3 with round_to=8).
        report.channels[name] = report.kept[name] = by_name[name].channels
        del removals[name]
    work, graph = traced
    with torch.no_grad():
        reference = _output_shape(work.eval(), example_input)
    check_each = False
    while removals:
        failure = _apply(work, graph, by_name, removals, example_input, reference, check_each)
        if failure is None:
            break
        name, why = failure
        if name is None and not check_each:  # the final check failed: find the culprit
            check_each = True
        elif name is None:  # failed as a whole yet every step passed: give up on all
            report.failed.update(dict.fromkeys(removals, why))
            removals = {}
        else:
            report.failed[name] = why
            del removals[name]
            check_each = False
        work = scratch_copy(model)
        graph = None
    for name, idxs in removals.items():
        report.channels[name] = by_name[name].channels
        report.kept[name] = by_name[name].channels - len(idxs)
    _restore_flags(model, work)
    return work, report


def _apply(
    work: nn.Module,
    graph: tp.DependencyGraph | None,
    by_name: dict[str, CoupledGroup],
    removals: dict[str, list[int]],
    example_input: torch.Tensor,
    reference: Any,
    check_each: bool,
) -> tuple[str | None, str] | None:
    """Apply ``removals`` to ``work`` in place. On failure return (group, reason), with
    group None when only the final forward check failed."""
    if graph is None:
        try:
            graph = build_graph(work, example_input)
        except Exception as exc:
            return None, f"dependency tracing failed ({one_line(exc, typed=True)})"
    modules = dict(work.named_modules())
    for name, idxs in removals.items():
        try:
            root = modules[by_name[name].root]
            handler = graph.get_pruner_of_module(root).prune_out_channels
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                group = graph.get_pruning_group(root, handler, idxs)
            if not graph.check_pruning_group(group):
                return name, "torch-pruning refused: a coupled layer would lose every channel"
            group.prune()
            heads = by_name[name].heads
            if heads is not None:  # the attention module reshapes by its head count
                set_head_count(modules, heads, len(idxs))
        except Exception as exc:
            return name, f"torch-pruning failed ({one_line(exc, typed=True)})"
        if check_each:
            why = _check_runs(work, example_input, reference)
            if why:
                return name, why
    if not check_each:
        why = _check_runs(work, example_input, reference)
        if why:
            return None, why
    return None


def _check_runs(model: nn.Module, example_input: torch.Tensor, reference: Any) -> str | None:
    """None if ``model`` still runs and gives the reference output shape, else why not."""
    try:
        with torch.no_grad():
            shape = _output_shape(model.eval(), example_input)
    except Exception as exc:
        return f"pruned model no longer runs ({one_line(exc, typed=True)})"
    if shape != reference:
        return f"pruning changed the output shape {reference} -> {shape}"
    return None


def _restore_flags(model: nn.Module, work: nn.Module) -> None:
    """Give ``work`` the caller's train/eval modes and requires_grad flags, by name (tracing
    switched the copy to eval and pruning made new Parameters; names survive pruning)."""
    modes = {n: m.training for n, m in model.named_modules()}
    for name, module in work.named_modules():
        module.training = modes.get(name, model.training)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, param in work.named_parameters():
        param.requires_grad_(grads.get(name, True))


def _output_shape(model: nn.Module, example_input: torch.Tensor) -> Any:
    out = model(example_input)
    return _shape_of(out)


def _shape_of(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (list, tuple)):
        return tuple(_shape_of(o) for o in out)
    if isinstance(out, dict):
        return tuple((k, _shape_of(v)) for k, v in sorted(out.items()))
    return None


def _shown(names: list[str]) -> str:
    return ", ".join(names[:12]) + (" ..." if len(names) > 12 else "") or "none"
