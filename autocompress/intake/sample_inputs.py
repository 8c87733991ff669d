"""What a task's model reads: one tensor, or a tuple or dict of tensors packed into one.

Every stage after intake (fine-tune, pruning, quantization, ONNX export, timing, scoring)
feeds a model ONE batched tensor, and every exported file has one input. A sample's inputs
may be:

- one tensor: an image (C, H, W) (or (H, W), read as one channel), a feature vector (F,),
  or token ids (L,) (integers; (1, L) as a tokenizer returns for one text is read as (L,));
- a tuple or list of tensors, passed to the model positionally: ``model(a, b)``;
- a dict of tensors, passed by name: ``model(input_ids=..., attention_mask=...)``, as
  Hugging Face models take them (a tokenizer's output for one text, ``(1, L)`` integer
  tensors, is read as ``(L,)`` per field, as a single input is).

Several tensors are flattened and concatenated per sample into one vector (``pack``):
int64 when every field holds integers (token ids, masks, bools), float32 when every field
holds floats. :class:`PackedInputs` wraps the user's model so that it takes that vector,
cuts it back into the fields (each its own shape and dtype) and calls the model with them,
so the exported ONNX file takes the packed vector too: a deployment packs its inputs the
same way (the layout is in the export report, ``InputLayout.describe``). Fields mixing
integers and floats are refused in one line (a float32 pack would round large ids).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
import torch
from torch import nn

from autocompress.errors import DataSpecError

TENSOR, TUPLE, DICT = "tensor", "tuple", "dict"


@dataclass(frozen=True)
class InputField:
    name: str  # the dict key, or "0", "1"... for a tuple's positions
    shape: tuple[int, ...]  # one sample's, without the batch
    dtype: str  # torch dtype name, e.g. "int64", "bool", "float32"

    @property
    def size(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class InputLayout:
    """How a sample's several input tensors are packed into one (see the module docstring)."""

    kind: str  # TUPLE or DICT
    fields: tuple[InputField, ...]

    @property
    def integer(self) -> bool:
        return all(not _is_float_name(f.dtype) for f in self.fields)

    @property
    def packed_dtype(self) -> torch.dtype:
        return torch.int64 if self.integer else torch.float32

    @property
    def packed_size(self) -> int:
        return sum(f.size for f in self.fields)

    def describe(self) -> str:
        """One line for reports: what the packed input holds, in order."""
        call = "model(**fields)" if self.kind == DICT else "model(*fields)"
        parts = ", ".join(f"{f.name} {list(f.shape)} {f.dtype}" for f in self.fields)
        return (f"one {_dtype_name(self.packed_dtype)} input of "
                f"{self.packed_size} values per sample: {parts}, each flattened and "
                f"concatenated in this order ({call})")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "fields": [
            {"name": f.name, "shape": list(f.shape), "dtype": f.dtype} for f in self.fields]}


def _is_float_name(dtype: str) -> bool:
    return getattr(torch, dtype).is_floating_point


def layout_of(inputs: Any, where: str) -> InputLayout | None:
    """The layout of one sample's inputs; None for a single tensor (fed as it is)."""
    if isinstance(inputs, Mapping):
        if not inputs:
            raise DataSpecError(f"{where} has an empty dict of inputs; yield at least one "
                                "tensor")
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise DataSpecError(f"{where} has input keys {bad!r}; dict inputs need string "
                                "keys (the model's argument names)")
        named = [(k, _field(v, where, f"input {k!r}")) for k, v in inputs.items()]
        kind = DICT
    elif isinstance(inputs, (tuple, list)):
        if not inputs:
            raise DataSpecError(f"{where} has an empty tuple of inputs; yield at least one "
                                "tensor")
        named = [(str(i), _field(v, where, f"input {i}")) for i, v in enumerate(inputs)]
        kind = TUPLE
    else:
        return None
    fields = tuple(InputField(name, tuple(int(d) for d in t.shape), _dtype_name(t.dtype))
                   for name, t in named)
    floats = [f.name for f in fields if _is_float_name(f.dtype)]
    if floats and len(floats) < len(fields):
        ints = [f.name for f in fields if f.name not in floats]
        raise DataSpecError(
            f"{where} mixes integer inputs ({', '.join(ints)}) with float inputs "
            f"({', '.join(floats)}); one model input cannot hold both exactly: yield all "
            "integer or all float tensors (e.g. cast a mask to the float inputs' dtype)")
    return InputLayout(kind, fields)


def pack(inputs: Any, layout: InputLayout, where: str) -> torch.Tensor:
    """One sample's inputs, checked against ``layout``, as one flat vector."""
    if layout.kind == DICT:
        if not isinstance(inputs, Mapping) or list(inputs) != [f.name for f in layout.fields]:
            got = list(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise DataSpecError(
                f"{where} has inputs {got}; every sample must yield a dict with the keys "
                f"{[f.name for f in layout.fields]} in that order, as the first train sample")
        values = [inputs[f.name] for f in layout.fields]
    else:
        if not isinstance(inputs, (tuple, list)) or len(inputs) != len(layout.fields):
            got = (f"{len(inputs)} inputs" if isinstance(inputs, (tuple, list))
                   else type(inputs).__name__)
            raise DataSpecError(f"{where} has {got}; every sample must yield "
                                f"{len(layout.fields)} input tensors, as the first train "
                                "sample")
        values = list(inputs)
    parts = []
    for field, value in zip(layout.fields, values, strict=True):
        t = _field(value, where, f"input {field.name!r}")
        if tuple(t.shape) != field.shape or t.is_floating_point() != _is_float_name(
                field.dtype):
            raise DataSpecError(
                f"{where} has input {field.name!r} {tuple(t.shape)} {t.dtype}; the first train "
                f"sample's is {field.shape} {field.dtype}: yield one shape and kind per input")
        parts.append(t.reshape(-1).to(layout.packed_dtype))
    return torch.cat(parts)


def _field(value: Any, where: str, what: str) -> torch.Tensor:
    """One field of several inputs, read by the same (1, L) rule as a single input."""
    return _one_text(_tensor(value, where, what))


def _is_ids(t: torch.Tensor) -> bool:
    """Integer (or boolean) values that are not an image's uint8 pixels: ids, masks."""
    return not t.is_floating_point() and t.dtype != torch.uint8


def _one_text(t: torch.Tensor) -> torch.Tensor:
    """Ids of shape (1, L), as a tokenizer returns for one text
    (``tokenizer(text, return_tensors="pt")``), as (L,), so that a batch is (N, L)."""
    return t[0] if _is_ids(t) and t.ndim == 2 and t.shape[0] == 1 else t


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _tensor(value: Any, where: str, what: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
            raise DataSpecError(f"{where}: {what} is a {value.dtype} array; inputs must be "
                                "numeric tensors")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor) or value.is_complex():
        raise DataSpecError(f"{where}: {what} is {type(value).__name__}; inputs must be "
                            "tensors or numpy arrays (apply ToTensor to images)")
    if value.ndim == 0:
        return value.reshape(1)
    return value


class PackedInputs(nn.Module):
    """The user's model behind one packed input (see the module docstring): (N, packed) ->
    whatever the model returns."""

    def __init__(self, model: nn.Module, layout: InputLayout) -> None:
        super().__init__()
        self.model = model
        self.layout = layout
        self.input_dtype = layout.packed_dtype  # intake.models.zeros_input reads this

    def forward(self, packed: torch.Tensor) -> Any:
        fields = unpack(packed, self.layout)
        if self.layout.kind == DICT:
            return self.model(**fields)
        return self.model(*fields.values())


def inputs_record(model: nn.Module, input_shape: Sequence[int],
                  dtype: torch.dtype) -> dict[str, Any]:
    """What the exported file takes, for the export report: its one input's shape and
    ``dtype``, and for packed inputs the layout a deployment must pack them in."""
    record: dict[str, Any] = {"shape": ["N", *(int(d) for d in input_shape)],
                              "dtype": _dtype_name(dtype)}
    if isinstance(model, PackedInputs):
        record["packed"] = model.layout.describe()
        record["layout"] = model.layout.to_dict()
    return record


def unpack(packed: torch.Tensor, layout: InputLayout) -> dict[str, torch.Tensor]:
    """(N, packed) -> each field (N, *shape) in its own dtype, in order."""
    out: dict[str, torch.Tensor] = {}
    start = 0
    for field in layout.fields:
        part = packed[:, start:start + field.size].reshape(-1, *field.shape)
        out[field.name] = part.to(getattr(torch, field.dtype))
        start += field.size
    return out


def single_input(value: Any, where: str) -> torch.Tensor:
    """One sample's single input tensor as stored: images (C, H, W) ((H, W) gets a channel;
    uint8 kept, anything else float32, as before), feature vectors (F,) float32, token ids
    (L,) int64 (integer (1, L) read as (L,))."""
    t = _one_text(_tensor(value, where, "input"))
    integer = _is_ids(t)
    if t.ndim == 1:  # token ids stay integers; a feature vector is float
        return t.to(torch.int64 if integer else torch.float32)
    if t.ndim == 2:  # a one-channel image
        t = t.unsqueeze(0)
    if t.ndim != 3:
        raise DataSpecError(
            f"{where} has input {tuple(t.shape)} {t.dtype}; yield an image (C, H, W), a "
            "feature vector (F,), token ids (L,), or a tuple or dict of tensors")
    return t if t.dtype == torch.uint8 else t.to(torch.float32)


def stack_inputs(inputs: Sequence[torch.Tensor], where: str) -> torch.Tensor:
    shapes = {(tuple(t.shape), t.dtype) for t in inputs}
    if len(shapes) > 1:
        raise DataSpecError(
            f"{where} has inputs of {len(shapes)} shapes or dtypes (e.g. "
            f"{sorted(str(s) for s in shapes)[:2]}); yield one shape and dtype (resize images, "
            "pad token ids to one length)")
    return torch.stack(list(inputs)).contiguous()


__all__ = ["DICT", "TENSOR", "TUPLE", "InputField", "InputLayout", "PackedInputs",
           "inputs_record", "layout_of", "pack", "single_input", "stack_inputs", "unpack"]
