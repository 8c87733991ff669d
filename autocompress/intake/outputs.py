"""What a model or module returned, reduced to one tensor.

Hooks see tensors, tuples, lists and dicts; whole models may also return named tuples
(torchvision's ``GoogLeNetOutputs``) or ``ModelOutput``-like objects (Hugging Face's
``SequenceClassifierOutput``, a dict subclass with attribute access).
"""

from __future__ import annotations

from typing import Any

import torch

PREDICTION_FIELD = "logits"  # what classifiers across torchvision and transformers call it


def _is_tensor(value: Any) -> bool:
    # torch.fx traces a forward with Proxy objects in place of tensors (BN folding and the
    # QAT output check trace the model): a Proxy stands for one tensor here.
    return isinstance(value, (torch.Tensor, torch.fx.Proxy))


def first_tensor(output: Any) -> torch.Tensor | None:
    """The output itself if it is a tensor, else the first tensor found depth-first in a
    tuple, list or dict (e.g. an LSTM's ``(output, (h, c))`` -> ``output``); None if none."""
    if _is_tensor(output):
        return output
    items = output.values() if isinstance(output, dict) else output
    if isinstance(output, (tuple, list, dict)):
        for item in items:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def prediction_of(output: Any, field: str | int | None = None) -> torch.Tensor | None:
    """The prediction tensor in a model's output; None when there is none.

    ``field`` names it (a dict key or attribute, e.g. ``"logits"``) or indexes it (a tuple
    position). Without one: the tensor itself; else a ``logits`` key or attribute (named
    tuples, dicts, ``ModelOutput``); else the first tensor depth-first.
    """
    if field is not None:
        try:
            if isinstance(field, int):
                picked = output[field]
            elif isinstance(output, dict):
                picked = output[field]
            else:
                picked = getattr(output, field)
        except (KeyError, IndexError, AttributeError, TypeError):
            return None
        return picked if _is_tensor(picked) else None
    if _is_tensor(output):
        return output
    named = output.get(PREDICTION_FIELD) if isinstance(output, dict) else getattr(
        output, PREDICTION_FIELD, None
    )
    if _is_tensor(named):
        return named
    return first_tensor(output)


def describe_output(output: Any) -> str:
    """A short description of what a model returned, for error messages."""
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, dict):
        return f"{type(output).__name__} with keys {', '.join(map(str, list(output)[:5]))}"
    fields = getattr(output, "_fields", None)
    if fields:
        return f"{type(output).__name__} with fields {', '.join(fields[:5])}"
    return type(output).__name__
