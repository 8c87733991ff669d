"""Start a student from a fine-tuned relative instead of the teacher: copy each surviving
channel's trained weights from the parent into the child.

Both models are BatchNorm-folded float structures pruned from the same teacher, and
``prune_lineage.channel_origins`` says, for each of their parameters, which teacher channel
every position came from. A child that prunes no group less than its parent keeps a subset of
the parent's channels (the teacher's importance order decides both), so every child weight has
a trained value to take; other widths need nothing more (the child's fake-quant re-quantizes
the trained float weights at its own width). Positions the parent does not have (a child
that prunes some group less) keep the child's own teacher-derived values, and the share of
weights copied is returned so the caller can tell a full inheritance from a partial one.
"""

from __future__ import annotations

import torch
from torch import nn

from autocompress.transform.prune_lineage import Origins, shared_positions


@torch.no_grad()
def transplant(
    child: nn.Module,
    child_origins: Origins,
    parent_params: dict[str, torch.Tensor],
    parent_origins: Origins,
) -> float:
    """Copy the parent's trained values into ``child`` (in place) wherever both hold the same
    teacher position; returns the share of the child's weights copied (0..1)."""
    copied = total = 0
    for name, tensor in child.named_parameters():
        total += tensor.numel()
        source = parent_params.get(name)
        mine = _origins_for(name, child_origins)
        theirs = _origins_for(name, parent_origins)
        if source is None or mine is None or theirs is None or source.ndim != tensor.ndim:
            continue
        if source.shape[len(mine):] != tensor.shape[len(mine):]:
            continue  # a dimension pruning never touches differs: not the same layer
        picks = [shared_positions(a, b) for a, b in zip(mine, theirs, strict=True)]
        if any(len(p[0]) == 0 for p in picks):
            continue
        child_index = tuple(p[0] for p in picks)
        parent_index = tuple(p[1] for p in picks)
        tensor[torch.meshgrid(*child_index, indexing="ij")] = source[
            torch.meshgrid(*parent_index, indexing="ij")].to(tensor.dtype)
        copied += int(torch.tensor([len(p[0]) for p in picks]).prod()) * int(
            tensor[(0,) * len(picks)].numel())
    return copied / total if total else 0.0


def _origins_for(name: str, origins: Origins) -> tuple[torch.Tensor, ...] | None:
    """A parameter's origins; a bias that BatchNorm folding created (the teacher's conv had
    none) follows its weight's output channels."""
    found = origins.get(name)
    if found is None and name.endswith(".bias"):
        weight = origins.get(name[: -len("bias")] + "weight")
        return None if weight is None else weight[:1]
    return found


__all__ = ["transplant"]
