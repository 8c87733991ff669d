"""The names of what a trial and a study record (Optuna user attributes): one list, so the
writer (the trial runner, ``autocompress/trial/``) and the readers (``study.records``,
``show``, ``export``, the report and the dashboard) cannot drift apart. Values are plain
JSON; figures are measured on the trial's exported file (design rule 1)."""

from __future__ import annotations

# -- a trial: what it was ------------------------------------------------------------------
PLAN = "plan"  # CompressionPlan.to_json()
PLAN_SUMMARY = "plan_summary"
BASELINE = "baseline"  # "fp32" | "int8-ptq" | "int8-dynamic" for the baseline trials
WARM_START = "warm_start"  # e.g. "uniform-int8", "budget-int4"
GUIDED = "guided"  # e.g. "guided-8x", "guided-1.5x-faster"
PARENT = "parent_trial"  # a promotion or refine: the trial whose plan it retrains
FINETUNE_STEPS = "finetune_steps"  # queued with its own step count (promotion, refine)
PROMOTION_RUNG = "promotion_rung"
REFINE_EPOCHS = "refine_epochs"
REFINE_REQUEST = "refine_request"
# where a retrain's (a refine's or a promotion's) fine-tune starts: "teacher" (BatchNorm live
# first) or "parent" (its weights); search/refine.py refine_start
REFINE_START = "refine_start"
# the search's own proposals (search/proposals.py): the kind of move and the trial it was
# derived from ("shrink", "repair", "blend"), and what its prediction was
PROPOSAL = "proposal"
PROPOSED_FROM = "proposed_from"
PREDICTED_ACCURACY = "predicted_accuracy"
# inheritance (trial/lineage.py): the fine-tuned trial this one started from instead of the
# teacher, the share of its weights copied, and the fine-tune steps along the whole lineage
# --student (search/students.py): the base model a trial compresses ("teacher" when absent:
# plans keyed by the teacher's layer names), and on the student's distillation trial what
# it was distilled from, for how many epochs, with which layer pairing and recipe; on the
# student's own warm starts the plan's name ("uniform-int8")
BASE_MODEL = "base_model"
TEACHER_BASE = "teacher"
STUDENT_DISTILLED = "student_distilled"  # the student's spec, on its distillation trial only
STUDENT_OF = "student_of"  # "teacher": the link to the model it was distilled from
STUDENT_EPOCHS = "student_epochs"  # whole epochs run
STUDENT_PAIRING = "student_pairing"  # JSON [[student layer, teacher layer], ...]
STUDENT_RECIPE = "student_recipe"  # JSON: epochs planned, learning rate, T, alpha, ...
STUDENT_INVENTORY = "student_inventory"  # JSON Inventory of the student (export's "before")
STUDENT_WEIGHTS_ID = "student_weights_id"  # the distilled (unfolded) weights: the base
STUDENT_START = "student_start"
INHERITED_FROM = "inherited_from"
INHERITED_SHARE = "inherited_share"
LINEAGE_STEPS = "lineage_steps"

# -- a trial: what was measured on its file --------------------------------------------------
ACCURACY = "accuracy"  # validation split
TEST_ACCURACY = "test_accuracy"
SIZE = "size_bytes"
ZIP_SIZE = "zip_size_bytes"
SIZE_METRIC = "size_metric"  # "file" | "zip": which of the two the size objective counts
LATENCY = "latency_ms"  # median, absolute
LATENCY_SPREAD = "latency_spread_ms"  # IQR
LATENCY_P10 = "latency_p10_ms"
LATENCY_P90 = "latency_p90_ms"
LATENCY_VS_FP32 = "latency_vs_fp32"  # interleaved ratio
LATENCY_ESTIMATE = "latency_estimate_ms"  # ratio x the study's fp32 reference: budgets
# how many final measurements of this structure (this one included) the estimate's ratio is
# the median of (runtime/latency_reference.py: pooled_ratio)
LATENCY_POOLED = "latency_pooled_measurements"
FP32_LATENCY = "fp32_latency_ms"
FP32_REFERENCE = "fp32_reference_ms"
FLOPS = "flops"  # fvcore, of the float structure (precision does not change them)
BOPS = "bops"  # bit-operations: MACs x weight bits x activation bits (results/metrics.py)
PARAMS = "params"
WEIGHT_TYPES = "weight_types"
RUNTIME = "runtime"  # ONNX Runtime version, session options, threads, batch size, CPU
TIMING = "timing"  # seconds per phase
FINETUNE_SECONDS = "finetune_seconds"  # the fine-tune's by kind of work (data, teacher, ...)
FINETUNE_STEPS_RUN = "finetune_steps_run"
# how the trial's candidate was made: baseline | calibration (no fine-tune) | fine-tune
FIDELITY = "fidelity"
RECOVERY_STEPS = "recovery_steps"  # of those, trained with BatchNorm live (train/tuning.py)
RECOVERY_SECONDS = "recovery_seconds"  # the fine-tune's seconds in those steps

# -- a trial: budgets, rejection, failure -----------------------------------------------------
CONSTRAINTS = "constraints"
FEASIBLE = "feasible"
REJECTED = "rejected"  # why the pre-check (or the latency model) rejected it
REJECTED_BY_MODEL = "rejected_by_model"
PRECHECK_LATENCY_ESTIMATE = "precheck_latency_estimate_ms"
LATENCY_PREDICTED_VS_FP32 = "latency_predicted_vs_fp32"
EARLY_STOPPED = "early_stopped"
FAIL_REASON = "fail_reason"

# -- a trial: its files ------------------------------------------------------------------------
ARTIFACT_ID = "artifact_id"
ARTIFACT_SHA256 = "artifact_sha256"
TORCH_ARTIFACT_ID = "torch_artifact_id"
TORCH_ARTIFACT_SHA256 = "torch_artifact_sha256"
TORCH_KIND = "torch_kind"  # "qat" | "float"
