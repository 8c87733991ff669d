"""Where a pruned model's channels came from: for every parameter of ``prune(model, plan)``,
the original (unpruned) index of each position along its first two dimensions. Part of the
torch-pruning adapter (``prune``, ``prune_graph``).

Why: a trial that inherits a fine-tuned parent (``transform.inherit``) must copy each
surviving channel's trained weights into the child, and the child is pruned from the teacher,
not from the parent. Both are cut by the *teacher's* channel importance, so a child that
prunes every group at least as much as its parent keeps a subset of the parent's channels
(kept sets nest): knowing both models' origins maps one onto the other.

How: the same removals (computed from the teacher's importance, as ``prune`` does) are applied
to copies whose parameters hold their own index along dimension 0, then along dimension 1;
pruning only selects slices, so each surviving value still says where it came from. Channel
dimensions are the first two of every Conv/Linear/norm/attention tensor; later ones (kernel
positions) are never pruned and map to themselves.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from autocompress.model.plan import CompressionPlan
from autocompress.transform.prune import _prune_groups
from autocompress.transform.prune_graph import build_graph, collect_groups, scratch_copy

CHANNEL_DIMS = 2  # dimensions pruning may shrink: output and input channels

Origins = dict[str, tuple[torch.Tensor, ...]]  # name -> original index per channel dimension


def channel_origins(
    model: nn.Module, plan: CompressionPlan, example_input: torch.Tensor, *,
    round_to: int = 8, min_channels: int = 8,
) -> Origins:
    """For each floating parameter and buffer of ``prune(model, plan)``, the original index
    of every position along its first ``CHANNEL_DIMS`` dimensions (int64 vectors)."""
    ratios = {name: r for name, r in plan.prune.items() if r > 0}
    if not ratios:
        return {name: tuple(torch.arange(n) for n in t.shape[:CHANNEL_DIMS])
                for name, t in _tensors(model)}
    work = scratch_copy(model)
    groups = collect_groups(work, build_graph(work, example_input), min_channels=min_channels)
    per_dim: list[dict[str, torch.Tensor]] = []
    for dim in range(CHANNEL_DIMS):
        encoded = _encoded(model, dim)
        traced = scratch_copy(encoded)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # huge encoded values overflow: only shapes matter
            pruned, _ = _prune_groups(encoded, groups, ratios, example_input,
                                      round_to=round_to, traced=(traced,
                                                                 build_graph(traced,
                                                                             example_input)))
        per_dim.append({name: _index_along(t, dim) for name, t in _tensors(pruned)
                        if t.ndim > dim})
    return {name: tuple(per_dim[d][name] for d in range(min(t.ndim, CHANNEL_DIMS)))
            for name, t in _tensors(pruned)}


def shared_positions(child: torch.Tensor,
                     parent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For two origin vectors of one dimension: (positions in the child, matching positions
    in the parent) of the original indices both hold, in the child's order."""
    where = {int(v): i for i, v in enumerate(parent.tolist())}
    pairs = [(i, where[int(v)]) for i, v in enumerate(child.tolist()) if int(v) in where]
    if not pairs:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    mine, theirs = zip(*pairs, strict=True)
    return torch.tensor(mine), torch.tensor(theirs)


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    found = [*model.named_parameters(), *model.named_buffers()]
    return [(name, t) for name, t in found if t.is_floating_point() and t.ndim > 0]


@torch.no_grad()
def _encoded(model: nn.Module, dim: int) -> nn.Module:
    """A copy whose every floating tensor holds, at each position, its index along ``dim``."""
    copy_ = scratch_copy(model)
    for _, tensor in _tensors(copy_):
        if tensor.ndim <= dim:
            continue
        shape = [1] * tensor.ndim
        shape[dim] = tensor.shape[dim]
        index = torch.arange(tensor.shape[dim], dtype=tensor.dtype).view(shape)
        tensor.copy_(index.expand_as(tensor))
    return copy_


def _index_along(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """The index vector an encoded tensor carries along ``dim`` (first slice of the others)."""
    picked = tensor.detach()
    for other in reversed(range(tensor.ndim)):
        if other != dim:
            picked = picked.select(other, 0)
    return picked.round().to(torch.int64)


__all__ = ["CHANNEL_DIMS", "Origins", "channel_origins", "shared_positions"]
