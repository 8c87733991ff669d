"""``build_inventory``: what a model offers the search, with the channel groups torch-pruning
finds (the plain records live in ``model.inventory``; the analysis that needs torch-pruning
lives with the pruning, so the model layer never imports it)."""

from __future__ import annotations

import torch
from torch import nn

from autocompress.model.inventory import Inventory, inventory_with_groups
from autocompress.transform.prune import dependency_groups


def build_inventory(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    min_channels: int = 8,
    min_weights: int = 64,
) -> Inventory:
    """Inventory of ``model`` traced with ``example_input`` (the caller's model is untouched).

    ``min_channels``: smaller prune groups are excluded. ``min_weights``: Conv/Linear layers
    with fewer weights stay float (per-channel scales would cost more than int8 saves).
    """
    groups = dependency_groups(model, example_input, min_channels=min_channels)
    return inventory_with_groups(model, example_input, groups, min_weights=min_weights)
