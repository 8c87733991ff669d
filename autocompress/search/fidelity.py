"""How search trials are realised when the time limit is short for the model: by a
distillation fine-tune each, or by calibration only (pruned, BatchNorm statistics
re-estimated, quantized by ONNX Runtime's post-training calibration: seconds, where a
fine-tune of a real-size model costs tens of minutes on two cores), the best of them then
promoted to fine-tunes while the time limit lasts.

A 10-minute ``torchvision:resnet18`` search at 224x224 on 2 cores had not finished one
fine-tuned search trial after 17.7 minutes: its 150-step fine-tune alone costs more than the
whole limit. ``auto`` (the default) chooses calibration when not even one fine-tuned trial
(``MIN_FINETUNED_TRIALS``) fits the search's share of the time left, judged by the
first-trial estimate (the baselines' time plus the learning-rate probe's pace). At 3, a
15-minute ResNet-20 search on a loaded machine turned calibration-only, where its
fine-tunes are what reaches 8x within a point.
"""

from __future__ import annotations

from autocompress.config.settings import SearchSettings

MIN_FINETUNED_TRIALS = 1
CALIBRATION = "calibration"
FINETUNE = "finetune"


def choose(settings: SearchSettings, *, finetune_estimate: float | None,
           elapsed: float) -> str:
    """``finetune`` or ``calibration`` for this run's search trials."""
    chosen = settings.run.fidelity
    if chosen != "auto":
        return chosen
    limit = settings.run.time_limit
    if limit is None or finetune_estimate is None or settings.space.finetune_steps == 0:
        return FINETUNE
    search_share = limit * 60 * (1.0 - settings.promotion.share) - elapsed
    return CALIBRATION if search_share < MIN_FINETUNED_TRIALS * finetune_estimate else FINETUNE


def note(chosen: str, *, finetune_estimate: float | None, settings: SearchSettings) -> str:
    """One line for the run's log: what was chosen and why."""
    if chosen == FINETUNE:
        return ""
    why = ("--fidelity calibration" if settings.run.fidelity == CALIBRATION else
           f"a fine-tuned trial would take about {finetune_estimate or 0:.0f} s here: not one "
           f"fits the {settings.run.time_limit:g}-min limit")
    return (f"search trials are calibration-only ({why}): pruned, BatchNorm re-estimated and "
            "quantized by calibration, no fine-tune; the best are promoted to fine-tunes "
            "while time is left (their rows say [promoted])")


def ptq_method(settings: SearchSettings) -> str:
    """The calibration a calibration-only trial is quantized with (the space's first)."""
    methods = [m for m in settings.space.ptq_methods if m != "dynamic"]
    return methods[0] if methods else "minmax"
