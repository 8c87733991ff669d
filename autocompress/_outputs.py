"""What a module returned, reduced to one tensor (hooks see tensors, tuples, lists, dicts)."""

from __future__ import annotations

from typing import Any

import torch


def first_tensor(output: Any) -> torch.Tensor | None:
    """The output itself if it is a tensor, else the first tensor found depth-first in a
    tuple, list or dict (e.g. an LSTM's ``(output, (h, c))`` -> ``output``); None if none."""
    if isinstance(output, torch.Tensor):
        return output
    items = output.values() if isinstance(output, dict) else output
    if isinstance(output, (tuple, list, dict)):
        for item in items:
            found = first_tensor(item)
            if found is not None:
                return found
    return None
