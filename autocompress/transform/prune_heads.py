"""Whole attention heads as a prunable group (``transformers``-style self-attention).

torch-pruning's dependency graph already couples a layer's query, key and value projections
and the attention output projection's input columns into one group (the attention op is
element-wise to it). Removing arbitrary channels of that group breaks the reshape into
heads, so the group is pruned in whole heads instead: the heads with the least L1 weight
(the group's per-channel importance summed over each head's channels) go, every projection
loses the same heads, and the attention module's head count is updated to match. A plan's
ratio for such a group is the share of *heads* removed (at least one head stays).

Supported: modules with ``num_attention_heads`` and ``attention_head_size`` (BERT, RoBERTa,
MiniLM, ViT, ... in ``transformers``) whose forward reshapes with ``-1`` heads, which
``transformers`` 5 does. Other attention layouts keep their channels (the group says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Heads:
    """The attention module a group's projections belong to, and its head layout."""

    module: str  # name of the attention module (holds num_attention_heads)
    count: int
    size: int  # channels per head


def attention_heads(modules: dict[str, nn.Module], members: list[str]) -> Heads | None:
    """The head layout when ``members`` are projections of one transformers-style attention
    module (their parent has ``num_attention_heads`` and ``attention_head_size``)."""
    for name in members:
        parent_name = name.rpartition(".")[0]
        parent = modules.get(parent_name)
        count = getattr(parent, "num_attention_heads", None)
        size = getattr(parent, "attention_head_size", None)
        if isinstance(count, int) and isinstance(size, int) and count > 0 and size > 0:
            return Heads(parent_name, count, size)
    return None


def head_removal(importance: torch.Tensor, heads: Heads, keep: int) -> list[int]:
    """Channel indices of the least important heads, ``keep`` of them staying."""
    if keep >= heads.count:
        return []
    per_head = importance.view(heads.count, heads.size).sum(1)
    order = torch.argsort(per_head, descending=True, stable=True)
    dropped = sorted(order[keep:].tolist())
    return [h * heads.size + c for h in dropped for c in range(heads.size)]


def set_head_count(modules: dict[str, nn.Module], heads: Heads, removed_channels: int) -> None:
    """Tell the attention module how many heads its projections now hold."""
    module = modules[heads.module]
    count = heads.count - removed_channels // heads.size
    module.num_attention_heads = count
    if hasattr(module, "all_head_size"):
        module.all_head_size = count * heads.size


__all__ = ["Heads", "attention_heads", "head_removal", "set_head_count"]
