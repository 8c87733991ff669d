"""Activation scheme as a choice: asymmetric uint8 (ORT's default) or symmetric int8 with zero
point 0, fake-quantized in the fine-tune, written in the file, searched and recorded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import optuna
import pytest
import torch
from onnx import numpy_helper
from search_fixture import run_short_search
from torch import nn

from autocompress.config.options import SearchConfig
from autocompress.config.settings import SearchSettings
from autocompress.errors import ConfigError, PlanError
from autocompress.export.program import deployable_module
from autocompress.model import space
from autocompress.model.inventory import inventory_with_groups
from autocompress.model.plan import CompressionPlan
from autocompress.search import measured
from autocompress.study.studies import _space_changes
from autocompress.transform import quantize
from autocompress.transform.quantize.onnx_inspect import activation_types
from autocompress.trial.context import precheck_key


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10)).eval()


def _activation_zero_points(path: Path) -> list[np.ndarray]:
    """Zero points of the QuantizeLinear nodes that quantize computed tensors."""
    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[2]]) for n in proto.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits]


@pytest.mark.parametrize(("scheme", "dtype"), [("asymmetric", np.uint8), ("symmetric", np.int8)])
def test_the_scheme_is_written_in_the_file(tmp_path: Path, scheme: str, dtype: type) -> None:
    model = _mlp()
    x = torch.randn(128, 16)
    plan = CompressionPlan(bits={"0": 8, "2": 8, "4": 8}, activation_scheme=scheme)
    qat = quantize.calibrate(quantize.prepare_qat(model, plan), [x])
    with torch.no_grad():
        simulated = qat(x).numpy()
    info = quantize.export_onnx(qat, x[:1], tmp_path / f"{scheme}.onnx", plan, [x])
    zero_points = _activation_zero_points(info.path)
    assert zero_points and all(z.dtype == dtype for z in zero_points)
    if scheme == "symmetric":
        assert all(int(z) == 0 for z in zero_points)
    expected = "INT8" if scheme == "symmetric" else "UINT8"
    assert info.activation_types == [expected] == activation_types(info.path)
    out = ort.InferenceSession(str(info.path)).run(None, {"input": x.numpy()})[0]
    # the file computes what the fine-tune simulated (same ranges, same integer grid)
    assert np.abs(out - simulated).max() < 0.02 * np.abs(simulated).max()


def test_symmetric_fake_quant_uses_zero_point_0() -> None:
    model = _mlp()
    plan = CompressionPlan(bits={"0": 8}, activation_scheme="symmetric")
    qat = quantize.calibrate(quantize.prepare_qat(model, plan), [torch.randn(64, 16) + 3])
    scale, zero_point = qat[0].activation_qparams()
    assert zero_point == 0 and scale > 0


def test_plans_keep_their_json_and_reject_unknown_schemes() -> None:
    plan = CompressionPlan(bits={"fc": 8})
    assert "activation_scheme" not in plan.to_dict()  # recorded plans' JSON is unchanged
    symmetric = CompressionPlan(bits={"fc": 8}, activation_scheme="symmetric")
    assert CompressionPlan.from_json(symmetric.to_json()) == symmetric
    assert "a-int8" in symmetric.summary()
    with pytest.raises(PlanError, match="activation_scheme 'signed' is unknown"):
        CompressionPlan(activation_scheme="signed")
    with pytest.raises(ConfigError, match="activation_scheme 'int8' is unknown"):
        SearchConfig(activation_scheme="int8")


def test_the_sampler_chooses_the_scheme_when_searched() -> None:
    model = _mlp()
    inventory = inventory_with_groups(model, torch.randn(1, 16), [])
    searched = SearchSettings.from_config(SearchConfig(activation_scheme="search")).space
    trial = optuna.create_study().ask({space.ACTIVATION_SCHEME_PARAM:
                                       optuna.distributions.CategoricalDistribution(
                                           ["asymmetric", "symmetric"])})
    plan = space.suggest_plan(trial, inventory, searched)
    assert plan.activation_scheme == trial.params[space.ACTIVATION_SCHEME_PARAM]
    params = space.plan_to_params(plan, inventory, searched)
    assert space.params_to_plan(params, inventory, searched) == plan
    # a study's description changes only when the option is used (old studies resume)
    default = SearchSettings.from_config(SearchConfig()).space
    assert "activation_scheme" not in space.space_description(inventory, default)
    assert space.space_description(inventory, searched)["activation_scheme"] == "search"
    fixed = SearchSettings.from_config(SearchConfig(activation_scheme="symmetric")).space
    assert space.uniform_plan(inventory, fixed, bits=8).activation_scheme == "symmetric"


def test_a_symmetric_search_records_its_scheme_on_the_trial(tmp_path: Path) -> None:
    short = run_short_search(tmp_path, study="sym", trials=1, finetune_steps=10, guided=False,
                             budgets=(), activation_scheme="symmetric", activation_bits=(8,),
                             bits=(32, 8), prune_max=0.0)
    searched = [r for r in short.result.records
                if r.baseline is None and r.state == "COMPLETE"]
    assert searched, [(r.plan_summary, r.fail_reason) for r in short.result.records]
    quantized = [r for r in searched if any(b < 32 for b in r.plan["bits"].values())]
    assert quantized and all(r.plan["activation_scheme"] == "symmetric" for r in quantized)
    # the measured files (artifacts are stored by id, no extension): the searched trial's
    # int8 activations (the int8-ptq baseline stays ORT's uint8 recipe)
    found = [_activation_types_or_none(f) for f in Path(short.artifacts_dir).rglob("*")
             if f.is_file()]
    assert ["INT8"] in found, found


def _activation_types_or_none(path: Path) -> list[str] | None:
    try:
        return activation_types(path)
    except Exception:  # not an ONNX file (a state_dict, a plot): onnx raises several types
        return None


def test_the_program_module_clamps_activations_to_the_scheme_range() -> None:
    # model.pt2 is made from deployable_module: symmetric int8 activations must keep their
    # negative values there too (zero point 0, range [-128, 127], not uint8's [0, 255])
    model = _mlp()
    x = torch.randn(64, 16)
    plan = CompressionPlan(bits={"0": 8, "2": 8, "4": 8}, activation_scheme="symmetric")
    qat = quantize.calibrate(quantize.prepare_qat(model, plan), [x]).eval()
    with torch.no_grad():
        simulated, program = qat(x), deployable_module(qat)(x)
    assert float((simulated - program).abs().max()) < 1e-5
    assert qat[0].activation_int_range() == (-128, 127)


def _key_before_schemes(plan: CompressionPlan) -> str:
    """trial/context.py's pre-check key as written before activation schemes existed."""
    body = json.dumps({"bits": plan.bits, "prune": plan.prune, "acts": plan.activation_bits,
                       "made": "qdq"}, sort_keys=True)
    return "search:" + hashlib.sha256(body.encode()).hexdigest()[:16]


def test_latency_keys_tell_the_schemes_apart_and_keep_old_keys() -> None:
    asymmetric = CompressionPlan(bits={"fc": 8})
    symmetric = CompressionPlan(bits={"fc": 8}, activation_scheme="symmetric")
    # another file, other kernels: pre-check verdicts and pooled ratios must not be shared
    assert precheck_key(asymmetric, None) != precheck_key(symmetric, None)
    assert measured.structure_key(asymmetric) != measured.structure_key(symmetric)
    # the default's keys are what resumed studies stored
    assert precheck_key(asymmetric, None) == _key_before_schemes(asymmetric)
    assert measured.structure_key(asymmetric) == "[('fc', 8)]|[]|8|qat|0.0"


def test_resuming_with_another_scheme_names_the_option() -> None:
    inventory = inventory_with_groups(_mlp(), torch.randn(1, 16), [])
    stored = space.space_description(inventory, SearchSettings.from_config(SearchConfig()).space)
    now = space.space_description(inventory, SearchSettings.from_config(
        SearchConfig(activation_scheme="symmetric")).space)
    assert _space_changes(stored, now) == [
        "--activation-scheme was asymmetric, now symmetric"]
