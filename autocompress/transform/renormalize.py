"""Per-channel statistics restored after an inherited cut: the BatchNorm re-estimation a
BN-folded model can no longer do (REPAIR-style renormalisation).

A child that inherits its parent's trained, BatchNorm-folded weights and then loses more
channels sees each later layer's outputs shift (fewer inputs feed every sum), and no BatchNorm
is left to re-normalise them. So, layer by layer in model order, each convolution's output
channels are given back the mean and standard deviation the same channel had in the parent on
the same inputs: ``w <- w * s``, ``b <- (b - mean_child) * s + mean_parent`` with
``s = std_parent / std_child``. Layers are corrected one at a time, each measured after the
ones before it were fixed, on a few training batches; a channel the parent did not have (a
partial inheritance) or that is dead in the child is left as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autocompress.transform.prune_lineage import Origins, shared_positions

_EPS = 1e-6


@torch.no_grad()
def match_channel_statistics(
    child: nn.Module, parent: nn.Module, batches: Sequence[torch.Tensor],
    child_origins: Origins, parent_origins: Origins,
) -> int:
    """Rescale ``child``'s convolutions in place (module docstring); returns how many."""
    if not batches:
        return 0
    parent_stats = _output_stats(parent, batches, _convs(parent))
    fixed = 0
    for name, module in _convs(child).items():
        theirs = parent_stats.get(name)
        mine_o = child_origins.get(f"{name}.weight")
        theirs_o = parent_origins.get(f"{name}.weight")
        if theirs is None or mine_o is None or theirs_o is None or module.bias is None:
            continue  # a conv BatchNorm could not fold keeps no bias: its parameters stay
        mean_c, std_c = _output_stats(child, batches, {name: module})[name]
        mine, parents = shared_positions(mine_o[0], theirs_o[0])
        if len(mine) == 0:
            continue
        mean_p, std_p = theirs[0][parents], theirs[1][parents]
        live = std_c[mine] > _EPS
        scale = torch.where(live, std_p / std_c[mine].clamp_min(_EPS), torch.ones_like(std_p))
        shape = (-1,) + (1,) * (module.weight.ndim - 1)
        module.weight[mine] *= scale.view(shape).to(module.weight.dtype)
        module.bias[mine] = ((module.bias[mine] - mean_c[mine]) * scale + mean_p).to(
            module.bias.dtype)
        fixed += 1
    return fixed


def _convs(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.groups == 1}


def _output_stats(model: nn.Module, batches: Sequence[torch.Tensor],
                  modules: dict[str, nn.Module]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per output channel mean and standard deviation of each module's output."""
    sums: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in modules.items():
        def hook(_m: nn.Module, _i: object, out: torch.Tensor, name: str = name) -> None:
            flat = out.detach().transpose(0, 1).reshape(out.shape[1], -1).double()
            acc = sums.setdefault(name, [torch.zeros(out.shape[1], dtype=torch.float64),
                                         torch.zeros(out.shape[1], dtype=torch.float64),
                                         torch.zeros((), dtype=torch.float64)])
            acc[0] += flat.sum(1)
            acc[1] += (flat * flat).sum(1)
            acc[2] += flat.shape[1]
        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name, (total, squares, count) in sums.items():
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0.0)
        out[name] = (mean.float(), var.sqrt().float())
    return out


__all__ = ["match_channel_statistics"]
