"""autocompress: automatic compression of trained PyTorch models.

An Optuna search over per-layer bit widths, structured pruning ratios and distillation
settings, where every recorded number is measured on the exported ONNX file.

The public API is imported lazily, so ``import autocompress.dashboard`` (which must never
load torch) stays light:

    import autocompress as ac
    result = ac.run_search(ac.SearchConfig(budgets=("50ms",)))
    study = ac.load_study("demo"); study.pareto_front(); study.export(17, "out/")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # configuration and plans
    "SearchConfig": "autocompress.config.options",
    "Budget": "autocompress.config.budgets",
    "parse_budget": "autocompress.config.budgets",
    "CompressionPlan": "autocompress.model.plan",
    # the main job and its results
    "run_search": "autocompress.search.loop",
    "SearchResult": "autocompress.search.loop",
    "load_study": "autocompress.api",
    "rebuild": "autocompress.api",
    "TrialRecord": "autocompress.study.records",
    "evaluate_plan": "autocompress.search.evaluate",
    "refine_trial": "autocompress.search.refine",
    "measure_sensitivity": "autocompress.search.sensitivity",
    "Sensitivity": "autocompress.search.sensitivity",
    "pareto_front": "autocompress.results.pareto",
    # intake
    "load_task": "autocompress.intake",
    "load_model": "autocompress.intake",
    "load_data": "autocompress.intake",
    "Metric": "autocompress.intake.metric",
    # transforms, usable on their own
    "build_inventory": "autocompress.transform.survey",
    "prune_model": "autocompress.transform.prune",
    "apply_unstructured": "autocompress.transform.sparsity",
    "recalibrate_batchnorm": "autocompress.transform.batchnorm",
    "fold_batchnorm": "autocompress.transform.quantize",
    "prepare_qat": "autocompress.transform.quantize",
    "export_onnx": "autocompress.transform.quantize",
    "export_float_onnx": "autocompress.transform.quantize",
    "ptq_static": "autocompress.transform.quantize",
    "ptq_dynamic": "autocompress.transform.quantize",
    "compact_graph": "autocompress.transform.onnx_compact",
    "finetune": "autocompress.train.distill",
    "kd_loss": "autocompress.train.losses",
    "profile_model": "autocompress.runtime.torch_profile",
    "profile_onnx": "autocompress.runtime.onnx_profile",
    # errors
    "AutocompressError": "autocompress.errors",
    "InputError": "autocompress.errors",
    "PlanError": "autocompress.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


# Public names that differ from the defining module's name for them. A public name must never
# equal a submodule's name (``prune``, ``profile``...): ``from autocompress import prune`` must
# keep meaning the module.
_RENAMED = {"prune_model": "prune"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autocompress' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
