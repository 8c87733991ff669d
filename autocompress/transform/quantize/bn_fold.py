"""BatchNorm folding into the preceding convolution or linear layer."""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn

from autocompress.transform.quantize.qat import _FakeQuantMixin, _set_module, _trace
from autocompress.transform.quantize.scheme import warn_once

_FOLDABLE: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    nn.Conv1d: (nn.BatchNorm1d,),
    nn.Conv2d: (nn.BatchNorm2d,),
    nn.Conv3d: (nn.BatchNorm3d,),
    nn.Linear: (nn.BatchNorm1d,),
}


def _float_type(module: nn.Module) -> type[nn.Module]:
    return module._float_cls if isinstance(module, _FakeQuantMixin) else type(module)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy with each Conv->BatchNorm pair folded into the conv and the BN made Identity.

    Only pairs where the conv output feeds the BN alone and neither module is called twice
    are folded; names are unchanged (the BN stays as an ``nn.Identity`` under its name) so
    plan keys still match. Per-channel symmetric weight quantization commutes with the
    per-channel BN scale, so folding a fake-quant conv keeps its quantization grid.
    If the model cannot be traced by torch.fx, the copy is returned unfolded.
    """
    folded = copy.deepcopy(model)
    graph = _trace(folded)
    if graph is None:
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            warn_once(f"fold_batchnorm: BatchNorm left unfolded in {type(model).__name__}")
        return folded
    modules = dict(folded.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        bn = modules.get(str(node.target))
        source = node.args[0]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not isinstance(
            source, torch.fx.Node
        ):
            continue
        if source.op != "call_module" or len(source.users) != 1:
            continue
        conv = modules.get(str(source.target))
        if conv is None or type(bn) not in _FOLDABLE.get(_float_type(conv), ()):
            continue
        if calls[source.target] != 1 or calls[node.target] != 1 or bn.running_mean is None:
            continue
        pairs.append((str(source.target), str(node.target)))
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        was_training = conv.training
        fused = _fuse(conv.eval(), bn.eval())
        fused.train(was_training)
        _set_module(folded, conv_name, fused)
        identity = nn.Identity()
        identity.train(bn.training)
        _set_module(folded, bn_name, identity)
    return folded


def _fuse(layer: nn.Module, bn: nn.Module) -> nn.Module:
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    if issubclass(_float_type(layer), nn.Linear):
        return fuse_linear_bn_eval(layer, bn)
    return fuse_conv_bn_eval(layer, bn)
