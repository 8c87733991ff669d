"""What an export returns and the errors it raises (plain data and one-line messages)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocompress.config.budgets import Budget, format_bytes
from autocompress.errors import AutocompressError
from autocompress.results import metrics
from autocompress.study.records import TrialRecord

log = logging.getLogger("autocompress")


REPORT_FORMAT_VERSION = 1


# Same file, same data, same runtime: the accuracy must match to float rounding of a mean.
ACCURACY_TOLERANCE = 1e-9


# The widest band export's latency check allows around the recorded ratio vs fp32,
# [recorded / F, recorded * F], however noisy the measurements (verify.latency_band).
LATENCY_RATIO_FACTOR = 2.0


# torch.export program vs ONNX file, top-1 on the first samples of the validation split.
AGREEMENT_FLOOR = 0.99
# For values (float targets) a sample agrees when every output is within this share of the
# standard deviation of the program's outputs.
VALUE_AGREEMENT = 0.1
# A sample whose top-1 differs still agrees when it is a near-tie that rounding may tip: the
# file and the program differ by at most NEAR_TIE of the program's logit spread on a median
# sample (they compute the same thing), and the program's logit for the file's class is
# within twice that median difference of its top logit. A 4-bit TransformerEncoder on digits
# flipped 2 of 139 validation samples at margins of 0.018 and 0.0008 (logits spread over ~12,
# a median difference of 0.067), which failed a rebuild that was right. A wrong rebuild
# differs by far more on a median sample, so none of its flips is excused.
NEAR_TIE = 0.02


AGREEMENT_SAMPLES = 1000


# A trial (autocompress/trial/) measures accuracy with batches of 256 and default session
# options; the re-measurement mirrors it so the two are the same computation.
EVAL_BATCH_SIZE = 256


FILES = ("model.onnx", "model.pt2", "plan.json", "report.json", "report.md", "pareto.png")


class ExportError(AutocompressError):
    """A trial that cannot be exported, or an output folder that cannot be written."""


class VerificationError(ExportError):
    """The written file does not reproduce the figures the study recorded for it."""


@dataclass(frozen=True)
class Choice:
    """The trial to export and why."""

    record: TrialRecord
    rule: str
    runners_up: list[TrialRecord] = field(default_factory=list)
    budgets: list[Budget] = field(default_factory=list)
    max_accuracy_drop: float | None = None
    reference_accuracy: float | None = None


@dataclass(frozen=True)
class ExportResult:
    study: str
    storage_url: str
    trial: int
    out: Path
    rule: str
    files: dict[str, dict[str, Any]]
    report: dict[str, Any]
    metric: str = "accuracy"  # the study's label for its accuracy objective

    @property
    def verification(self) -> dict[str, Any] | None:
        return self.report.get("verification")

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "storage": self.storage_url,
            "trial": self.trial,
            "out": str(self.out),
            "rule": self.rule,
            "runners_up": self.report["selection"]["runners_up"],
            "files": self.files,
            "candidate": self.report["candidate"],
            "fp32": self.report["fp32"],
            "verification": self.verification,
        }

    def summary(self) -> str:
        cand, fp32 = self.report["candidate"], self.report["fp32"]
        runners = ", ".join(str(r["trial"]) for r in self.report["selection"]["runners_up"])
        lines = [
            f"exported trial {self.trial} of study {self.study!r} "
            f"({cand.get('plan_summary') or 'no plan summary'}) to {self.out}",
            f"rule: {self.rule}" + (f" (runners-up: trials {runners})" if runners else ""),
            "files: " + ", ".join(
                f"{name} ({format_bytes(info['bytes'])})" for name, info in self.files.items()
            ),
            "vs fp32: " + _versus_line(cand, fp32, self.metric),
        ]
        ver = self.verification
        if ver is None:
            lines.append("verification: skipped (--no-verify)")
        else:
            lines.append(
                f"verified: test {self.metric} {ver['test_accuracy']:.4f} = recorded; latency "
                + _latency_check_text(ver["latency"])
                + f"; model.pt2 agrees with model.onnx on {ver['agreement']:.2%} of "
                f"{ver['agreement_samples']} val samples"
                + (f" ({ver['agreement_near_ties']:.2%} near-ties that rounding tips)"
                   if ver.get("agreement_near_ties") else "")
            )
        return "\n".join(lines)


def _versus_line(cand: dict[str, Any], fp32: dict[str, Any], metric: str = "accuracy") -> str:
    parts = []
    if cand.get("times_smaller"):
        parts.append(f"{cand['times_smaller']:.2f}x smaller")
    if cand.get("latency_vs_fp32"):
        parts.append(_speed_text(cand["latency_vs_fp32"]))
    if cand.get("accuracy_test") is not None:
        text = f"test {metric} {cand['accuracy_test']:.4f}"
        if fp32.get("accuracy_test") is not None:
            text += f" (fp32 {fp32['accuracy_test']:.4f})"
        parts.append(text)
    if cand.get("accuracy_drop_rate_val") is not None:
        parts.append(f"val {metric}-drop rate {cand['accuracy_drop_rate_val']:.2%}")
    if cand.get("flop_reduction_rate") is not None:
        parts.append(f"FLOP reduction {cand['flop_reduction_rate']:.1%}")
    return ", ".join(parts) or "no fp32 baseline in the study"


def _speed_text(ratio: float) -> str:
    """Latency ratio vs fp32 in words: 0.5 -> "2.00x faster", 1.4 -> "1.40x slower"."""
    return f"{metrics.times_faster(ratio):.2f}x faster" if ratio <= 1 else f"{ratio:.2f}x slower"


def _latency_check_text(lat: dict[str, Any]) -> str:
    if lat.get("skipped"):
        return f"not re-checked ({lat['skipped']})"
    recorded = lat.get("recorded_ratio")
    text = f"{lat['ratio']:.3f}x fp32"
    if recorded is not None:
        text += (f" (recorded {recorded:.3f}x, allowed {lat['allowed'][0]:.3f}-"
                 f"{lat['allowed'][1]:.3f}x)")
    return text
