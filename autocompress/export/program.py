"""The PyTorch side of an export: rebuild a trial's model and write it as a torch.export program."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autocompress import intake
from autocompress import study as study_mod
from autocompress.errors import one_line
from autocompress.export._results import ExportError, VerificationError
from autocompress.export.files import _artifacts_dir, _fetch
from autocompress.export.selection import _exportable, base_context
from autocompress.intake.task import tokenizer_of
from autocompress.model.inventory import Inventory
from autocompress.model.plan import CompressionPlan
from autocompress.study.records import TrialRecord
from autocompress.transform import quantize
from autocompress.trial import rebuild as rebuilder


def _affine_fake_quant(scale: float, zero_point: int, qmin: int, qmax: int) -> Any:
    """Per-tensor fake-quant to the integer range [qmin, qmax] (uint8 [0, 255] with a zero
    point, or int8 [-128, 127] with zero point 0) written with plain aten ops: the same
    arithmetic as ``torch.fake_quantize_per_tensor_affine`` (x * (1/scale), round half to
    even, clamp), which has no fake-tensor kernel and so cannot be captured by
    ``torch.export``."""
    inv = float(np.float32(1.0) / np.float32(scale))
    sc = float(np.float32(scale))

    def apply(x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x * inv) + zero_point, qmin, qmax)
        return (q - zero_point) * sc

    return apply


def deployable_module(model: nn.Module) -> nn.Module:
    """A plain float copy of a rebuilt model that ``torch.export`` can capture.

    The QAT modules decide at run time whether their observers have seen data
    (``bool(buffer)``), which export cannot trace. Their eval-mode behaviour is frozen
    instead: weights replaced by their fake-quantized values (recurrent and attention
    weights too), activation fake-quant as hooks with constant scales in the layer's integer
    range. Layer and parameter names stay the same.
    """
    if not quantize.is_prepared(model):
        return model.eval()
    # Read what each fake-quant layer learned through its public methods, so the frozen copy
    # follows quantize.py's modules whatever strip_fake_quant returns beside the float model.
    quant_layers = {
        name: m for name, m in model.named_modules() if hasattr(m, "quantized_weight")
    }
    # LSTM/GRU/RNN and MultiheadAttention: several weights each, no activation fake-quant
    sequence_layers = {
        name: m for name, m in model.named_modules() if hasattr(m, "quantized_parameters")
    }
    frozen = quantize.strip_fake_quant(model)[0]
    modules = dict(frozen.named_modules())
    with torch.no_grad():
        for name, qmod in quant_layers.items():
            modules[name].weight.copy_(qmod.quantized_weight())
        for name, qmod in sequence_layers.items():
            for param, value in qmod.quantized_parameters().items():
                modules[name].get_parameter(param).copy_(value)
    for name, qmod in quant_layers.items():
        if int(qmod.activation_bits) >= quantize.WEIGHT_ONLY:
            continue  # weight-only: float activations, nothing to simulate
        _freeze_activations(modules[name], qmod)
    return frozen.eval()


def _freeze_activations(module: nn.Module, qmod: Any) -> None:
    """Hooks on ``module`` doing what ``qmod``'s input and output fake-quant do in eval."""
    qmin, qmax = qmod.activation_int_range()
    in_params = qmod.activation_qparams()
    out_params = qmod.output_qparams() if hasattr(qmod, "output_qparams") else None
    if in_params is not None:
        fq_in = _affine_fake_quant(*in_params, qmin, qmax)
        module.register_forward_pre_hook(lambda _m, args, fq=fq_in: (fq(args[0]), *args[1:]))
    if out_params is not None:
        fq_out = _affine_fake_quant(*out_params, qmin, qmax)
        module.register_forward_hook(lambda _m, _a, out, fq=fq_out: fq(out))


def _export_program(model: nn.Module, example: torch.Tensor, path: Path) -> float:
    """Write ``model.pt2`` (batch dimension dynamic); returns max |logit difference| between
    the program and the rebuilt model on ``example``."""
    program_module = deployable_module(model)
    example = (example[:2] if example.shape[0] >= 2
               else example.repeat(2, *[1] * (example.ndim - 1)))
    try:
        program = torch.export.export(
            program_module, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},)
        )
        torch.export.save(program, str(path))
    except Exception as exc:
        raise ExportError(
            f"torch.export could not capture the rebuilt model ({type(exc).__name__}: "
            f"{one_line(exc)}); export with the ONNX file only is not supported yet"
        ) from None
    with torch.no_grad():
        ref = model.eval()(example)
        got = program.module()(example)
    return float((ref - got).abs().max())


@dataclass
class _Context:
    """What the study recorded about its model and data, parsed once."""

    info: study_mod.StudyInfo
    config: dict[str, Any]
    model_spec: str
    input_shape: tuple[int, ...]
    num_classes: int | None
    round_to: int
    inventory: Inventory | None

    @classmethod
    def from_info(cls, info: study_mod.StudyInfo) -> _Context:
        config = info.json_attr("config", {}) or {}
        shape = info.attrs.get("input_shape") or (info.json_attr("data", {}) or {}).get(
            "input_shape"
        )
        if not shape:
            raise ExportError(
                f"study {info.name!r} has no recorded input shape; it was not written by "
                "autocompress search (or by an older version): re-run the search"
            )
        inventory_data = info.json_attr("inventory")
        return cls(
            info=info,
            config=config,
            model_spec=str(info.attrs.get("model_spec") or config.get("model") or "demo"),
            input_shape=tuple(int(d) for d in shape),
            num_classes=info.attrs.get("num_classes"),
            round_to=int(config.get("round_to", 8)),
            inventory=Inventory.from_dict(inventory_data) if inventory_data else None,
        )

    def load_checked_data(self) -> intake.DataSplits:
        """The study's data, refused if it no longer splits the way the search saw it."""
        recorded = self.info.json_attr("data", {}) or {}
        spec = str(self.info.attrs.get("data_spec") or recorded.get("spec") or "digits")
        data = intake.load_data(
            spec, input_size=self.config.get("input_size"), seed=int(self.config.get("seed", 0)),
            mean=self.config.get("mean"), std=self.config.get("std"),
            tokenizer=tokenizer_of(self.model_spec),
        )
        sequences = intake.as_sequences(data)
        if sequences is not None and recorded.get("input_shape") == list(
                sequences.input_shape):  # the search's model took the samples as sequences
            data = sequences
        now = data.describe()
        for key in ("split_sha256", "sizes", "mean", "std", "input_shape"):
            if key in recorded and recorded[key] != now[key]:
                raise VerificationError(
                    f"data {spec!r} changed since the search ({key} {_short(now[key])} != "
                    f"recorded {_short(recorded[key])}): verification needs the same splits; "
                    "restore the data or pass --no-verify"
                )
        return data


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:16] + "..." if len(text) > 19 else text


def load_trial_model(
    storage_url: str,
    study_name: str,
    trial: int,
    *,
    artifacts_dir: str | Path | None = None,
) -> nn.Module:
    """The fine-tuned PyTorch model of a trial, from the study alone (checksum-checked)."""
    study = study_mod.load_existing_study(storage_url, study_name)
    info = study_mod.study_info(study, storage_url)
    recs = study_mod.records(study)
    record = _exportable(recs, trial, study_name)
    ctx = base_context(_Context.from_info(info), record, recs)  # a --student's: its spec
    store = study_mod.artifact_store(_artifacts_dir(info, storage_url, artifacts_dir))
    with tempfile.TemporaryDirectory(prefix="autocompress-rebuild-") as scratch:
        state_path = Path(scratch) / "state.pt"
        _fetch(store, record, "torch_artifact_id", "torch_artifact_sha256", state_path,
               "PyTorch artifact")
        return _rebuild(ctx, record, state_path)[0]


def _rebuild(ctx: _Context, record: TrialRecord, state_path: Path) -> tuple[nn.Module, nn.Module]:
    # The weights file is not needed: the state_dict replaces every weight, and the pruned
    # channel counts follow from the plan and round_to alone.
    return rebuilder.rebuild_parts(
        ctx.model_spec,
        None,
        CompressionPlan.from_dict(record.plan),
        num_classes=ctx.num_classes,
        input_shape=ctx.input_shape,
        state_dict=state_path,
        round_to=ctx.round_to,
    )
