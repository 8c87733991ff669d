"""autocompress: automatic compression of trained PyTorch models.

An Optuna search over per-layer bit widths, structured pruning ratios and distillation
settings, where every recorded number is measured on the exported ONNX file.
"""

from __future__ import annotations

__version__ = "0.1.0"
