"""Which output channels are coupled: torch-pruning's dependency graph (DepGraph) of a model,
read into named groups with the chunks they must shrink evenly in and each channel's
importance. Part of the torch-pruning adapter, with ``prune`` (which applies the removals);
torch_pruning is imported by these prune modules of ``transform`` only.

Channels coupled by residual adds, concatenations, depthwise convs or attention heads must go
together; each coupled set is one *group*, named after its first Conv/Linear layer in
``model.named_modules()`` order. The group of a transformers-style attention's query/key/value
projections is pruned in whole heads (``prune_heads``).

Importance: L1 magnitude of each channel's output weights, summed over the group's
Conv/Linear members (each member normalised by its mean so a wide layer does not outvote a
narrow one).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from autocompress.transform.prune_heads import Heads, attention_heads

CLASSIFIER_REASON = "classifier output: its channels are the classes"
HEADS_REASON = ("query/key/value channels of multi-head attention whose heads cannot be "
                "pruned whole here (a single head, or channels that are not heads x head size)")
WEIGHT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class CoupledGroup:
    """One DepGraph group, described by names so it can be re-found in a fresh copy."""

    name: str  # leading Conv/Linear member in model order
    root: str  # the module torch-pruning grew the group from
    members: list[str]  # Conv/Linear layers whose output channels the group removes
    channels: int
    channel_groups: int  # channels are removed uniformly from this many equal chunks
    excluded_reason: str | None
    importance: torch.Tensor | None  # [channels], higher = keep
    heads: Heads | None = None  # pruned in whole heads (``prune_heads``)


def scratch_copy(model: nn.Module) -> nn.Module:
    """Deep copy with gradients enabled on every weight (DepGraph traces through autograd)."""
    work = copy.deepcopy(model)
    for p in work.parameters():
        p.requires_grad_(True)
    return work


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """DepGraph of ``model`` traced on ``example_input`` (the model's weights need grads)."""
    with torch.enable_grad(), warnings.catch_warnings():
        # Unknown ops are treated as element-wise by DepGraph; the probe catches the cases
        # where that guess is wrong, so the warnings are noise here.
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(model, example_input, verbose=False)


def collect_groups(
    model: nn.Module, graph: tp.DependencyGraph, *, min_channels: int
) -> list[CoupledGroup]:
    """Every group of ``graph`` in model order, with the reason it cannot be pruned (the
    classifier output, heads that cannot go whole, too few or unevenly split channels)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    result: list[CoupledGroup] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp_groups = list(graph.get_all_groups(root_module_types=WEIGHT_TYPES))
    for group in tp_groups:
        root_module = group[0].dep.target.module
        root = names[root_module]
        channels = graph.get_out_channels(root_module)
        members, touches_output = _members(group, graph, names)
        members = sorted(set(members), key=lambda n: order[n])
        reason: str | None = None
        chunks = _channel_groups(group, graph)
        heads = attention_heads(modules, members)
        if touches_output:
            reason = CLASSIFIER_REASON
        elif heads is not None and (heads.count < 2 or channels != heads.count * heads.size
                                    or any(type(modules[m]) is not nn.Linear for m in members)):
            reason = HEADS_REASON
        elif channels < min_channels:
            reason = f"too small ({channels} channels < {min_channels})"
        elif channels % chunks:
            reason = f"{channels} channels do not split into {chunks} equal channel groups"
        result.append(
            CoupledGroup(
                name=members[0] if members else root,
                root=root,
                members=members or [root],
                channels=channels,
                channel_groups=chunks,
                excluded_reason=reason,
                importance=_importance(group, graph, channels) if reason is None else None,
                heads=heads,
            )
        )
    result.sort(key=lambda g: order[g.name])
    return result


def _members(
    group: Any, graph: tp.DependencyGraph, names: dict[nn.Module, str]
) -> tuple[list[str], bool]:
    """The group's Conv/Linear layers that lose output channels, and whether it reaches the
    model's output."""
    members: list[str] = []
    touches_output = False
    for item in group:
        node, handler = item.dep.target, item.dep.handler
        is_out = graph.is_out_channel_pruning_fn(handler)
        if node.type == tp.ops.OPTYPE.OUTPUT or (is_out and not node.outputs):
            touches_output = True
        if isinstance(node.module, WEIGHT_TYPES) and is_out and node.module in names:
            members.append(names[node.module])
    return members, touches_output


def _channel_groups(group: Any, graph: tp.DependencyGraph) -> int:
    """Chunks the group's channels must shrink evenly in: grouped convs, GroupNorm, heads."""
    chunks = 1
    for item in group:
        module = item.dep.target.module
        if isinstance(module, nn.modules.conv._ConvNd):
            depthwise = module.groups == module.out_channels
            if module.groups > 1 and not depthwise:
                chunks = math.lcm(chunks, module.groups)
        elif isinstance(module, nn.GroupNorm):
            chunks = math.lcm(chunks, module.num_groups)
        elif isinstance(module, nn.MultiheadAttention):
            chunks = math.lcm(chunks, module.num_heads)
    return chunks


@torch.no_grad()
def _importance(group: Any, graph: tp.DependencyGraph, channels: int) -> torch.Tensor:
    """L1 norm of each channel's output weights, [channels], summed over the Conv/Linear members."""
    total = torch.zeros(channels, dtype=torch.float64)
    for item in group:
        module = item.dep.target.module
        if not isinstance(module, WEIGHT_TYPES):
            continue
        if not graph.is_out_channel_pruning_fn(item.dep.handler):
            continue
        root_idxs = item.root_idxs
        if root_idxs is None or any(r is None for r in root_idxs):
            continue
        weight = module.weight.detach()
        if getattr(module, "transposed", False):
            weight = weight.transpose(0, 1)  # ConvTranspose stores [in, out, ...]
        l1 = weight[list(item.idxs)].flatten(1).abs().sum(1).double()  # [len(idxs)]
        mean = l1.mean()
        if mean > 0:
            total.scatter_add_(0, torch.tensor(root_idxs, dtype=torch.long), l1 / mean)
    return total


def out_channels(module: nn.Module) -> int:
    """Output channels (features) of a Conv/Linear layer."""
    if isinstance(module, nn.Linear):
        return module.out_features
    return int(module.out_channels)
