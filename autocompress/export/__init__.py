"""Export: pick a trial, write its deployable files and a report, and verify what was written.

Files written to ``--out`` (all or nothing: a hidden temp folder beside it, renamed at the end):

- ``model.onnx``  the trial's artifact, byte-identical (sha256 checked against the study)
- ``model.pt2``   the fine-tuned PyTorch side as a ``torch.export`` program: loads with
                  ``torch.export.load`` alone, without autocompress installed
- ``plan.json``   the CompressionPlan (rebuild with ``autocompress.rebuild``)
- ``report.json`` / ``report.md``  the candidate against the fp32 baseline, per-layer table,
                  selection rule and runners-up, verification figures
- ``pareto.png``  the study's trials with the exported candidate marked

Verification (on by default) re-measures the written ONNX file: test-split accuracy must equal
the recorded figure (same file, same data), and its latency ratio against the fp32 baseline,
timed interleaved, must stay within 15% plus the measured noise of both figures of the recorded
ratio (``verify.latency_band``, never wider than a factor ``LATENCY_RATIO_FACTOR``), re-measured
longer before it fails -- absolute latencies drift by tens of percent on shared machines
(design rule 7), ratios much less.

The package by job: ``selection`` (which trial), ``files`` (folder, publishing, artifact
fetch), ``program`` (the PyTorch side as a torch.export program), ``verify`` (the written
file re-measured), ``report`` (JSON, Markdown, plot) and ``run`` (the orchestration).

Layer 8. May import: layers 1-7.
"""

from __future__ import annotations

from autocompress.export._results import (
    ACCURACY_TOLERANCE,
    AGREEMENT_FLOOR,
    FILES,
    LATENCY_RATIO_FACTOR,
    Choice,
    ExportError,
    ExportResult,
    VerificationError,
)
from autocompress.export.files import check_out
from autocompress.export.program import deployable_module, load_trial_model
from autocompress.export.report import layer_table
from autocompress.export.run import export_from_storage
from autocompress.export.selection import (
    choose,
    choose_from_study,
    fp32_record,
    parse_accuracy_drop,
)

__all__ = [
    "ACCURACY_TOLERANCE",
    "AGREEMENT_FLOOR",
    "FILES",
    "LATENCY_RATIO_FACTOR",
    "Choice",
    "ExportError",
    "ExportResult",
    "VerificationError",
    "check_out",
    "choose",
    "choose_from_study",
    "deployable_module",
    "export_from_storage",
    "fp32_record",
    "layer_table",
    "load_trial_model",
    "parse_accuracy_drop",
]
