"""What a model is made of, by layer name: the menu the search chooses compression from.

An inventory lists every module of the model (``model.named_modules()`` order, root
excluded) with its parameters, FLOPs (fvcore, 1 multiply-add = 1 flop, inclusive of children)
and output shape, says which Conv/Linear layers may be quantized, and lists the coupled
channel groups structured pruning may shrink (found by ``transform.prune.dependency_groups``;
``transform.survey.build_inventory`` puts the two together). Everything
excluded carries a one-line reason, so a plan naming it fails with a message a user can act
on. The inventory is plain data: ``to_dict()`` is JSON and goes into the study database.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from autocompress.errors import InputError
from autocompress.intake.outputs import first_tensor
from autocompress.model import flops as flop_count
from autocompress.model.groups import PruneGroup

INVENTORY_FORMAT_VERSION = 1
# Recurrent layers get one width for all their weight matrices; a MultiheadAttention's width
# is its input projection's (its ``out_proj`` is a layer of its own).
SEQUENCE_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention)
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding, *SEQUENCE_TYPES)
# Types that carry weights but that our fake-quant/export path does not handle.
_WEIGHTED_UNSUPPORTED = (
    nn.modules.conv._ConvNd,
    nn.EmbeddingBag,
    nn.RNNBase,
)
_IN_PROJ = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass(frozen=True)
class LayerInfo:
    """One module. ``flops``/``params`` include its children; ``output_shape`` of its first call."""

    name: str
    type: str
    params: int
    flops: int
    output_shape: list[int] | None
    quantizable: bool
    excluded_reason: str | None


@dataclass(frozen=True)
class Inventory:
    layers: list[LayerInfo]
    groups: list[PruneGroup]
    total_flops: int = 0
    total_params: int = 0
    # aten ops fvcore saw but does not count (element-wise adds, activations...): op -> calls
    uncounted_ops: dict[str, int] = field(default_factory=dict)

    def layer(self, name: str) -> LayerInfo:
        for info in self.layers:
            if info.name == name:
                return info
        raise InputError(f"no layer named {name!r} in this model; see `autocompress profile`")

    def group(self, name: str) -> PruneGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise InputError(f"no prune group named {name!r}; allowed: {self.prunable_groups()}")

    def quantizable_layers(self) -> list[str]:
        """Names of the layers a plan may give a bit width, in model order."""
        return [info.name for info in self.layers if info.quantizable]

    def prunable_groups(self) -> list[str]:
        """Names of the groups a plan may give a prune ratio, in model order."""
        return [group.name for group in self.groups if group.prunable]

    def excluded_reason(self, name: str) -> str | None:
        """Why ``name`` cannot be compressed, or None (usable, or unknown).

        The layer's own reason comes first; for a usable layer, its prune group's reason
        (e.g. the classifier), or a pointer to the group its channels are coupled to.
        """
        info = next((i for i in self.layers if i.name == name), None)
        if info is not None and info.excluded_reason:
            return info.excluded_reason
        group = next((g for g in self.groups if g.name == name), None)
        if group is not None:
            return group.excluded_reason
        owner = next((g for g in self.groups if name in g.members), None)
        if owner is not None:
            return f"its output channels are coupled to group {owner.name!r}; use that name"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": INVENTORY_FORMAT_VERSION,
            "layers": [asdict(i) for i in self.layers],
            "groups": [asdict(g) for g in self.groups],
            "total_flops": self.total_flops,
            "total_params": self.total_params,
            "uncounted_ops": dict(self.uncounted_ops),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Inventory:
        try:
            layers = [
                LayerInfo(**{**d, "output_shape": _shape_or_none(d["output_shape"])})
                for d in data["layers"]
            ]
            groups = [PruneGroup(**{**g, "members": list(g["members"])}) for g in data["groups"]]
        except (KeyError, TypeError) as exc:
            raise InputError(
                f"inventory data is malformed ({exc}); rebuild it with build_inventory()"
            ) from None
        return cls(
            layers=layers,
            groups=groups,
            total_flops=int(data.get("total_flops", 0)),
            total_params=int(data.get("total_params", 0)),
            uncounted_ops={str(k): int(v) for k, v in data.get("uncounted_ops", {}).items()},
        )


_SEQUENCE_TYPE_NAMES = frozenset(t.__name__ for t in SEQUENCE_TYPES)


def as_searched_before(inventory: Inventory, stored_space: dict[str, Any] | None) -> Inventory:
    """The inventory a resumed study searches: its own when the study was made before
    LSTM/GRU/RNN and MultiheadAttention layers were quantizable and its stored layers are
    this inventory's less those (the sequence layers then stay float for that study, so it
    resumes in the space it was searched in); ``inventory`` unchanged otherwise (a new study,
    the same layers, or another change, which the resume check refuses)."""
    stored = stored_space.get("layers") if isinstance(stored_space, dict) else None
    now = inventory.quantizable_layers()
    if not isinstance(stored, list) or stored == now:
        return inventory
    types = {info.name: info.type for info in inventory.layers}
    added = {name for name in now if name not in stored}
    sequence = {name for name in added if types.get(name) in _SEQUENCE_TYPE_NAMES or (
        name.endswith(".out_proj")
        and types.get(name.rpartition(".")[0]) == nn.MultiheadAttention.__name__)}
    if not added or added != sequence or [n for n in now if n not in added] != stored:
        return inventory
    reason = ("kept float: this study was searched before LSTM/GRU/RNN and attention layers "
              "were quantizable; start a new --study to search them")
    layers = [dataclasses.replace(info, quantizable=False, excluded_reason=reason)
              if info.name in added else info for info in inventory.layers]
    return dataclasses.replace(inventory, layers=layers)


def inventory_with_groups(
    model: nn.Module,
    example_input: torch.Tensor,
    groups: list[PruneGroup],
    *,
    min_weights: int = 64,
) -> Inventory:
    """Inventory of ``model`` traced with ``example_input`` (the caller's model is untouched),
    with the channel groups the pruning adapter found (``transform.survey.build_inventory``
    passes them, so this layer never depends on torch-pruning).

    ``min_weights``: Conv/Linear layers with fewer weights stay float (per-channel scales
    would cost more than int8 saves).
    """
    work = copy.deepcopy(model).eval()
    shapes, called, cross = _output_shapes(work, example_input)
    # An attention's out_proj is never called as a module (its parent reads the weight) but
    # is quantized through its parent: it counts as called when the parent is.
    called |= {f"{name}.out_proj" for name, module in work.named_modules()
               if isinstance(module, nn.MultiheadAttention) and name in called}
    flops, total_flops, uncounted = _flops(work, example_input)
    layers = [
        _layer_info(name, module, flops.get(name, 0), shapes.get(name), name in called, min_weights)
        if name not in cross else _cross_attention_info(name, module, flops.get(name, 0),
                                                        shapes.get(name))
        for name, module in work.named_modules()
        if name
    ]
    return Inventory(
        layers=layers,
        groups=groups,
        total_flops=total_flops,
        total_params=sum(p.numel() for p in work.parameters()),
        uncounted_ops=uncounted,
    )


def _layer_info(
    name: str,
    module: nn.Module,
    flops: int,
    shape: list[int] | None,
    called: bool,
    min_weights: int,
) -> LayerInfo:
    kind = type(module).__name__
    params = sum(p.numel() for p in module.parameters())
    reason: str | None = None
    if isinstance(module, QUANTIZABLE_TYPES):
        weights = _weight_count(module)
        if isinstance(module, nn.LSTM) and module.proj_size > 0:
            reason = "an LSTM with proj_size is not quantized (set proj_size=0)"
        elif not called:
            reason = (
                f"{kind} is never called as a module (its parent uses the weight directly, "
                "e.g. MultiheadAttention.out_proj)"
            )
        elif weights < min_weights:
            reason = f"too small to pay for its scales ({weights} weights < {min_weights})"
    elif isinstance(module, _WEIGHTED_UNSUPPORTED):
        reason = (f"unsupported layer type {kind} (only Conv1d/Conv2d/Linear/Embedding, "
                  "LSTM/GRU/RNN and MultiheadAttention are quantized)")
    elif any(True for _ in module.children()):
        reason = f"a container ({kind}), not a Conv/Linear layer; name one of its layers"
    else:
        reason = f"{kind} is not a Conv/Linear layer"
    return LayerInfo(
        name=name,
        type=kind,
        params=params,
        flops=int(flops),
        output_shape=shape,
        quantizable=reason is None,
        excluded_reason=reason,
    )


def _cross_attention_info(name: str, module: nn.Module, flops: int,
                          shape: list[int] | None) -> LayerInfo:
    """A MultiheadAttention with a packed ``in_proj_weight`` called with key/value other than
    its query (a decoder's cross-attention): PyTorch slices the packed weight by the inputs'
    shapes at run time, so the exported graph has no weight initializer for its projections
    to quantize. Its ``out_proj`` is a plain Gemm and stays a layer of its own."""
    return LayerInfo(
        name=name, type=type(module).__name__,
        params=sum(p.numel() for p in module.parameters()), flops=int(flops),
        output_shape=shape, quantizable=False,
        excluded_reason=("cross-attention (key/value other than the query) with a packed "
                         "in_proj_weight: its ONNX export slices the weight at run time, so "
                         "there is no weight to quantize (its out_proj can be)"),
    )


def _weight_count(module: nn.Module) -> int:
    """Elements of the weights a width applies to: every weight matrix of a recurrent layer,
    the input projection of an attention, ``weight`` otherwise."""
    if isinstance(module, nn.RNNBase):
        return sum(p.numel() for n, p in module.named_parameters(recurse=False)
                   if n.startswith("weight"))
    if isinstance(module, nn.MultiheadAttention):
        return sum(p.numel() for n, p in module.named_parameters(recurse=False) if n in _IN_PROJ)
    return module.weight.numel()


@torch.no_grad()
def _output_shapes(
    model: nn.Module, example_input: torch.Tensor
) -> tuple[dict[str, list[int] | None], set[str], set[str]]:
    """Output shape of each module's first call, the set of modules called at all, and the
    packed-projection attentions called as cross-attention (``_cross_attention_info``)."""
    shapes: dict[str, list[int] | None] = {}
    cross: set[str] = set()

    def hook_for(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if name not in shapes:
                tensor = first_tensor(output)
                shapes[name] = None if tensor is None else list(tensor.shape)

        return hook

    def attention_hook_for(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            qkv = [*args[:3], *(kwargs.get(k) for k in ("query", "key", "value")[len(args):])]
            # the same test as F.multi_head_attention_forward's packed-projection path
            if not (qkv[0] is qkv[1] and qkv[1] is qkv[2]):
                cross.add(name)

        return hook

    modules = [(n, m) for n, m in model.named_modules() if n]
    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules]
    handles += [m.register_forward_pre_hook(attention_hook_for(n), with_kwargs=True)
                for n, m in modules
                if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None]
    try:
        model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return shapes, set(shapes), cross


def _flops(
    model: nn.Module, example_input: torch.Tensor
) -> tuple[dict[str, int], int, dict[str, int]]:
    """fvcore per-module FLOPs (inclusive), the total, and the ops it did not count."""
    counts = flop_count.count(model, example_input)
    return counts.by_module, counts.total, counts.uncounted


def _shape_or_none(shape: Any) -> list[int] | None:
    return None if shape is None else [int(s) for s in shape]
