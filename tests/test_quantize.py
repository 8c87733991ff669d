"""quantize.py on a real (tiny) CNN trained on sklearn digits, checked through ONNX Runtime."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from sklearn.datasets import load_digits
from torch import nn

from autocompress.errors import PlanError
from autocompress.model.plan import CompressionPlan
from autocompress.runtime import scoring, sessions
from autocompress.transform import quantize as q
from autocompress.transform.quantize import onnx_float


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            return y
        return -y


class SequenceHead(nn.Module):
    """Linear on a 3-D input: exported as MatMul with a transposed (renamed) weight."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 12)
        self.out = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, T=8, F=8]
        return self.out(F.relu(self.proj(x)).mean(dim=1))


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # [N,1,8,8]
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1300], perm[1300:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def _batches(x: torch.Tensor, size: int = 64) -> Iterator[torch.Tensor]:
    for i in range(0, len(x), size):
        yield x[i : i + size]


def _labelled(x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    return zip(_batches(x), _batches(y), strict=True)


@pytest.fixture(scope="module")
def trained(digits: dict[str, torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(80):
        idx = torch.randint(0, len(digits["x_train"]), (64,), generator=gen)
        loss = F.cross_entropy(model(digits["x_train"][idx]), digits["y_train"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _qat(model: nn.Module, plan: CompressionPlan, digits: dict, steps: int = 30) -> nn.Module:
    """Short real QAT so observers and weights have seen training."""
    prepared = q.prepare_qat(model, plan)
    prepared.train()
    opt = torch.optim.Adam(prepared.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        idx = torch.randint(0, len(digits["x_train"]), (64,), generator=gen)
        loss = F.cross_entropy(prepared(digits["x_train"][idx]), digits["y_train"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return prepared.eval()


def test_trained_model_is_meaningful(trained: nn.Module, digits: dict) -> None:
    assert _accuracy(trained, digits["x_test"], digits["y_test"]) > 0.85


def test_fold_batchnorm_keeps_outputs_and_names(trained: nn.Module, digits: dict) -> None:
    folded = q.fold_batchnorm(trained)
    x = digits["x_test"][:200]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), trained(x), atol=1e-4, rtol=0)
    assert [n for n, _ in folded.named_modules()] == [n for n, _ in trained.named_modules()]
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    assert isinstance(trained.bn1, nn.BatchNorm2d), "the input model must stay untouched"
    assert folded.conv1.weight.data_ptr() != trained.conv1.weight.data_ptr()


def test_fold_batchnorm_falls_back_when_untraceable(caplog: pytest.LogCaptureFixture) -> None:
    model = Untraceable().eval()
    with caplog.at_level(logging.WARNING, logger="autocompress.transform.quantize"):
        folded = q.fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    assert folded is not model
    assert any("unfolded" in rec.message for rec in caplog.records)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


def test_prepare_qat_keeps_names_and_passes_gradients(trained: nn.Module, digits: dict) -> None:
    plan = CompressionPlan(bits={"conv1": 8, "conv2": 4, "conv3": 32})
    prepared = q.prepare_qat(trained, plan)
    assert isinstance(prepared.conv1, q.QuantConv2d) and prepared.conv1.weight_bits == 8
    assert isinstance(prepared.conv2, q.QuantConv2d) and prepared.conv2.weight_bits == 4
    assert type(prepared.conv3) is nn.Conv2d and type(prepared.fc) is nn.Linear
    assert type(trained.conv1) is nn.Conv2d, "prepare_qat must not modify its input"
    float_params = {n for n, _ in trained.named_parameters()}
    assert {n for n, _ in prepared.named_parameters()} == float_params
    prepared.train()
    loss = F.cross_entropy(prepared(digits["x_train"][:64]), digits["y_train"][:64])
    loss.backward()
    for layer in (prepared.conv1, prepared.conv2):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    # The fake-quant weight really sits on the int4 grid: at most 15 levels per channel.
    qw = prepared.conv2.quantized_weight().detach()
    levels = qw / prepared.conv2.weight_scale().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)
    assert levels.abs().max() <= 7 + 1e-3
    # Observers are frozen in eval: running eval batches does not move the ranges.
    prepared.eval()
    before = prepared.conv1.activation_qparams()
    with torch.no_grad():
        prepared(digits["x_test"][:64] * 3)
    assert prepared.conv1.activation_qparams() == before


def test_prepare_qat_rejects_bad_layers(trained: nn.Module) -> None:
    with pytest.raises(PlanError, match="nosuch"):
        q.prepare_qat(trained, CompressionPlan(bits={"nosuch": 8}))
    with pytest.raises(PlanError, match="bn1"):
        q.prepare_qat(trained, CompressionPlan(bits={"bn1": 8}))


def test_int4_per_channel_beats_per_tensor(trained: nn.Module) -> None:
    # Realistic spread of channel magnitudes: scale the trained weights channel by channel.
    w = trained.conv2.weight.detach() * torch.logspace(-1, 0.5, 32).reshape(-1, 1, 1, 1)
    qmax = q.weight_qmax(4)
    per_channel = (q.fake_quant_weight(w, qmax) - w).pow(2).mean()
    per_tensor = (q.fake_quant_per_tensor_weight(w, qmax) - w).pow(2).mean()
    assert per_channel < 0.5 * per_tensor


def test_export_float_onnx_names_opset_and_dynamic_batch(
    trained: nn.Module, digits: dict, tmp_path: Path
) -> None:
    folded = q.fold_batchnorm(trained)
    path = q.export_float_onnx(folded, digits["x_test"][:1], tmp_path / "float.onnx")
    proto = onnx.load(str(path))
    names = {init.name for init in proto.graph.initializer}
    assert {"conv1.weight", "conv2.weight", "conv3.weight", "fc.weight"} <= names
    assert onnx_float._opset(proto) >= 21
    with torch.no_grad():
        expected = folded(digits["x_test"][:37]).argmax(1).numpy()
    got = scoring.predictions(path, [digits["x_test"][:37]])  # batch 37 != export batch 1
    np.testing.assert_array_equal(got, expected)
    assert q.onnx_weight_types(path) == dict.fromkeys(["conv1", "conv2", "conv3", "fc"], "FLOAT")


def test_export_mixed_plan_matches_fake_quant_model(
    trained: nn.Module, digits: dict, tmp_path: Path
) -> None:
    plan = CompressionPlan(bits={"conv1": 8, "conv2": 4, "conv3": 32, "fc": 8})
    prepared = _qat(q.fold_batchnorm(trained), plan, digits)
    calibration = list(_batches(digits["x_train"][:256]))
    info = q.export_onnx(prepared, digits["x_test"][:1], tmp_path / "mixed.onnx", plan, calibration)

    onnx.checker.check_model(str(info.path))
    assert info.opset >= 21 and info.size_bytes == info.path.stat().st_size
    assert info.weight_types == {"conv1": "INT8", "conv2": "INT4", "conv3": "FLOAT", "fc": "INT8"}
    assert q.onnx_weight_types(info.path) == info.weight_types
    proto = onnx.load(str(info.path))
    stored = {init.data_type for init in proto.graph.initializer}
    assert {onnx.TensorProto.INT4, onnx.TensorProto.INT8} <= stored
    assert info.int8_qmax == prepared.conv1.weight_qmax

    # One scale per output channel, equal to the fake-quant model's scales.
    scales = q.weight_scales(info.path)
    assert set(scales) == {"conv1", "conv2", "fc"}
    for layer in ("conv1", "conv2", "fc"):
        module = getattr(prepared, layer)
        assert scales[layer].shape == (module.weight.shape[0],)
        np.testing.assert_allclose(scales[layer], module.weight_scale().numpy(), rtol=1e-6)

    # ONNX Runtime (default, fully optimized session) agrees with the fake-quant model.
    x_test = digits["x_test"]
    with torch.no_grad():
        reference = prepared(x_test).argmax(1).numpy()
    onnx_pred = scoring.predictions(info.path, _batches(x_test))
    assert (onnx_pred == reference).mean() >= 0.99
    acc = scoring.onnx_accuracy(info.path, _labelled(x_test, digits["y_test"]))
    assert acc > 0.8


def test_weight_only_export_packs_integer_weights_and_keeps_activations_float(
    trained: nn.Module, digits: dict, tmp_path: Path
) -> None:
    """activation_bits 32: INT4/INT8 weights behind DequantizeLinear, no activation Q/DQ,
    INT4 packed two per byte, and the file computes what the fake-quant model computes."""
    plan = CompressionPlan(bits={"conv1": 8, "conv2": 4, "conv3": 4, "fc": 32},
                           activation_bits=32)
    prepared = _qat(q.fold_batchnorm(trained), plan, digits)
    assert prepared.conv1.weight_qmax == q.INT8_FULL_QMAX  # no integer kernel will run
    calibration = list(_batches(digits["x_train"][:64]))
    info = q.export_onnx(prepared, digits["x_test"][:1], tmp_path / "wo.onnx", plan, calibration)
    assert info.weight_types == {"conv1": "INT8", "conv2": "INT4", "conv3": "INT4", "fc": "FLOAT"}
    proto = onnx.load(str(info.path))
    assert "QuantizeLinear" not in {n.op_type for n in proto.graph.node}
    for init in proto.graph.initializer:
        if init.data_type == onnx.TensorProto.INT4:  # raw, two values per byte
            assert len(init.raw_data) == (int(np.prod(init.dims)) + 1) // 2
    scales = q.weight_scales(info.path)
    np.testing.assert_allclose(scales["conv2"], prepared.conv2.weight_scale().numpy(), rtol=1e-6)
    x_test = digits["x_test"]
    with torch.no_grad():
        reference = prepared(x_test).argmax(1).numpy()
    for options in ({}, sessions.DISABLE_QDQ_OPTION):
        onnx_pred = scoring.predictions(info.path, _batches(x_test), session_options=options)
        assert (onnx_pred == reference).mean() >= 0.995


def test_export_float_model_calibrates_with_ort(
    trained: nn.Module, digits: dict, tmp_path: Path
) -> None:
    plan = CompressionPlan(bits={"conv1": 8, "conv2": 8, "conv3": 8, "fc": 8})
    calibration = [(x, None) for x in _batches(digits["x_train"][:256])]  # (x, y) batches work
    info = q.export_onnx(trained, digits["x_test"][:1], tmp_path / "int8.onnx", plan, calibration)
    assert set(info.weight_types.values()) == {"INT8"}
    float_path = q.export_float_onnx(trained, digits["x_test"][:1], tmp_path / "fp32.onnx")
    assert info.size_bytes < 0.5 * float_path.stat().st_size
    batches = list(_labelled(digits["x_test"], digits["y_test"]))
    fp32_acc = scoring.onnx_accuracy(float_path, batches)
    assert scoring.onnx_accuracy(info.path, batches) >= fp32_acc - 0.03


def test_export_with_nothing_quantized_is_the_float_file(
    trained: nn.Module, digits: dict, tmp_path: Path
) -> None:
    info = q.export_onnx(
        trained, digits["x_test"][:1], tmp_path / "f.onnx", CompressionPlan(bits={"fc": 32}), []
    )
    assert set(info.weight_types.values()) == {"FLOAT"}
    ops = {node.op_type for node in onnx.load(str(info.path)).graph.node}
    assert "DequantizeLinear" not in ops and "BatchNormalization" not in ops


def test_export_rejects_layers_missing_from_model(
    trained: nn.Module, digits: dict, tmp_path: Path
) -> None:
    with pytest.raises(PlanError, match="bn1"):
        q.export_onnx(
            trained,
            digits["x_test"][:1],
            tmp_path / "x.onnx",
            CompressionPlan(bits={"bn1": 8}),
            [digits["x_train"][:8]],
        )


def test_matmul_weights_keep_layer_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SequenceHead().eval()
    x = torch.randn(4, 8, 8)
    path = q.export_float_onnx(model, x[:1], tmp_path / "seq.onnx")
    proto = onnx.load(str(path))
    by_name = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert "proj.weight" in by_name
    plan = CompressionPlan(bits={"proj": 8, "out": 4})
    prepared = q.calibrate(q.prepare_qat(model, plan), [x])
    info = q.export_onnx(prepared, x[:1], tmp_path / "seq_q.onnx", plan, [x])
    assert info.weight_types == {"proj": "INT8", "out": "INT4"}
    scales = q.weight_scales(info.path)
    assert scales["proj"].shape == (12,) and scales["out"].shape == (10,)
    with torch.no_grad():
        expected = prepared(x).numpy()
    session = sessions.make_session(info.path)
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=0.05)


def test_ptq_static_int8_and_int4(trained: nn.Module, digits: dict, tmp_path: Path) -> None:
    float_path = q.export_float_onnx(
        q.fold_batchnorm(trained), digits["x_test"][:1], tmp_path / "fp32.onnx"
    )
    calibration = list(_batches(digits["x_train"][:256]))
    int8 = q.ptq_static(float_path, tmp_path / "int8.onnx", calibration)
    int4 = q.ptq_static(float_path, tmp_path / "int4.onnx", calibration, weight_bits=4)
    assert set(q.onnx_weight_types(int8).values()) == {"INT8"}
    assert set(q.onnx_weight_types(int4).values()) == {"INT4"}
    fp32_size = float_path.stat().st_size
    assert int8.stat().st_size < 0.5 * fp32_size
    assert int4.stat().st_size < int8.stat().st_size
    batches = list(_labelled(digits["x_test"], digits["y_test"]))
    fp32_acc = scoring.onnx_accuracy(float_path, batches)
    assert scoring.onnx_accuracy(int8, batches) >= fp32_acc - 0.03
    assert scoring.onnx_accuracy(int4, batches) > 0.5  # runs and still classifies
    with pytest.raises(ValueError, match="weight_bits"):
        q.ptq_static(float_path, tmp_path / "bad.onnx", calibration, weight_bits=2)


def test_ptq_dynamic_on_linear_heavy_mlp(digits: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    opt = torch.optim.Adam(mlp.parameters(), lr=3e-3)
    for i in range(60):
        idx = slice((i * 64) % 1216, (i * 64) % 1216 + 64)
        loss = F.cross_entropy(mlp(digits["x_train"][idx]), digits["y_train"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    mlp.eval()
    float_path = q.export_float_onnx(mlp, digits["x_test"][:1], tmp_path / "mlp.onnx")
    dyn = q.ptq_dynamic(float_path, tmp_path / "mlp_dyn.onnx")
    assert dyn.stat().st_size < 0.4 * float_path.stat().st_size
    assert set(q.onnx_weight_types(dyn).values()) == {"INT8"}
    batches = list(_labelled(digits["x_test"], digits["y_test"]))
    assert scoring.onnx_accuracy(dyn, batches) >= scoring.onnx_accuracy(float_path, batches) - 0.03


def test_int8_range_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(q.INT8_RANGE_ENV, "full")
    assert q.weight_qmax(8) == 127
    monkeypatch.setenv(q.INT8_RANGE_ENV, "reduced")
    assert q.weight_qmax(8) == 63
    assert q.weight_qmax(4) == 7
    monkeypatch.setenv(q.INT8_RANGE_ENV, "sometimes")
    with pytest.raises(ValueError, match="sometimes"):
        q.weight_qmax(8)


def test_dynamic_realisation_per_layer(tmp_path: Path) -> None:
    """``ptq-dynamic``: planned 8-bit MatMul layers run MatMulInteger (activations quantized
    at run time), an int4 layer and a Gemm (no dynamic kernel) are weight-only, the rest
    stays float, and the file computes what the float model does."""
    from tests.tiny_models import tiny_vit

    torch.manual_seed(0)
    model = tiny_vit().eval()
    mlp = "encoder.layers.encoder_layer_0.mlp"
    bits = {f"{mlp}.0": 8, f"{mlp}.3": 4, "heads.head": 8}
    plan = CompressionPlan(bits=bits, activation_bits=8, realisation="ptq",
                           calibration=q.DYNAMIC)
    x = torch.randn(8, 3, 32, 32)
    info = q.export_onnx(model, x[:1], tmp_path / "dyn.onnx", plan, [x],
                         calibration_method=plan.calibration)
    ops = {node.op_type for node in onnx.load(str(info.path)).graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    assert {k: info.weight_types[k] for k in bits} == {f"{mlp}.0": "INT8", f"{mlp}.3": "INT4",
                                                       "heads.head": "INT8"}
    assert info.weight_types["encoder.layers.encoder_layer_1.mlp.0"] == "FLOAT"
    session = sessions.make_session(info.path)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    want = model(x).detach().numpy()
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max() + 1e-3
