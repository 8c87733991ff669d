"""KD losses, feature distillation and the bounded fine-tune loop on real digits data.

The teacher is a small plain CNN trained here in a few seconds; the student is that CNN
structurally pruned to 60% of its channels (kept by L1 norm, weights sliced), which drops
validation accuracy to near chance: a real repair job for the fine-tune.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autocompress.errors import InputError, PlanError, TrainingError
from autocompress.intake import DataSplits, load_data
from autocompress.model.plan import CompressionPlan
from autocompress.train.distill import FinetuneResult, finetune
from autocompress.train.features import FeatureDistiller
from autocompress.train.losses import kd_loss


class SmallCNN(nn.Module):
    """1x8x8 -> c1x8x8 -> c2x8x8 -> pool c2x4x4 -> c3x4x4 -> mean c3 -> 10 logits."""

    def __init__(self, c1: int = 16, c2: int = 32, c3: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(c3)
        self.head = nn.Linear(c3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def data() -> DataSplits:
    return load_data("digits", seed=0)


@pytest.fixture(scope="module")
def teacher(data: DataSplits) -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(8):
        for x, y in data.batches("train", 64, shuffle=True, seed=epoch):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    assert _accuracy(model, data) > 0.95
    return model


def _accuracy(model: nn.Module, data: DataSplits, split: str = "val") -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data.batches(split, 256):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    model.train(was_training)
    return correct / total


def _keep(weight: torch.Tensor, fraction: float) -> torch.Tensor:
    k = max(1, round(weight.shape[0] * fraction))
    return weight.abs().flatten(1).sum(1).argsort(descending=True)[:k].sort().values


def _pruned(teacher: nn.Module, keep: float = 0.6) -> SmallCNN:
    """Structured prune: keep the largest-L1 output channels of each conv, slice weights."""
    k1, k2, k3 = (_keep(getattr(teacher, f"conv{i}").weight, keep) for i in (1, 2, 3))
    student = SmallCNN(len(k1), len(k2), len(k3))
    with torch.no_grad():
        for i, out_idx, in_idx in ((1, k1, None), (2, k2, k1), (3, k3, k2)):
            src, dst = getattr(teacher, f"conv{i}"), getattr(student, f"conv{i}")
            w = src.weight[out_idx]
            dst.weight.copy_(w if in_idx is None else w[:, in_idx])
            dst.bias.copy_(src.bias[out_idx])
            src_bn, dst_bn = getattr(teacher, f"bn{i}"), getattr(student, f"bn{i}")
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(dst_bn, name).copy_(getattr(src_bn, name)[out_idx])
        student.head.weight.copy_(teacher.head.weight[:, k3])
        student.head.bias.copy_(teacher.head.bias)
    return student.eval()


# -- kd_loss ------------------------------------------------------------------------------


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise() -> None:
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    assert kd_loss(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    other = logits + torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    assert kd_loss(other, logits, 4.0).item() > 1e-3
    # Shifting every logit of a row by a constant leaves the softmax unchanged.
    assert kd_loss(logits + 3.0, logits, 2.0).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_kd_loss_is_batchmean_kl_of_softened_distributions_times_t_squared(
    temperature: float,
) -> None:
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(16, 10, generator=gen), torch.randn(16, 10, generator=gen) * 2
    p_t = torch.softmax(t / temperature, dim=1)
    p_s = torch.softmax(s / temperature, dim=1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()  # KL(teacher || student) per sample
    got = kd_loss(s, t, temperature)
    assert got.item() == pytest.approx(kl.item() * temperature**2, rel=1e-4)


def test_kd_loss_gradient_flows_to_student_only_and_rejects_bad_input() -> None:
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    kd_loss(s, t, 3.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    with pytest.raises(InputError, match="temperature 0"):
        kd_loss(s, t, 0)
    with pytest.raises(InputError, match="differ in shape"):
        kd_loss(s, torch.randn(4, 6), 2.0)


# -- FeatureDistiller ---------------------------------------------------------------------


def test_feature_distiller_trains_adapter_for_width_and_spatial_mismatch(
    teacher: nn.Module, data: DataSplits
) -> None:
    student = _pruned(teacher)  # conv2 has 19 channels; the teacher's has 32
    pairs = (("conv2", "conv2"), ("conv2", "conv3"))  # 2nd: 19x8x8 vs 32x4x4
    x = data.example_input(64)
    with FeatureDistiller(student, teacher, pairs, x) as fd:
        adapters = list(fd.adapters)
        assert all(isinstance(a, nn.Conv2d) for a in adapters)
        assert [(a.in_channels, a.out_channels) for a in adapters] == [(19, 32), (19, 32)]
        torch.manual_seed(0)
        opt = torch.optim.Adam(fd.parameters(), lr=1e-2)  # adapters only: student frozen
        losses = []
        for step in range(60):
            xb, _ = next(data.batches("train", 64, shuffle=True, seed=step))
            with torch.no_grad():
                student(xb)
                teacher(xb)
            loss = fd.loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0]
    # Leaving the context removed every hook from both models.
    for model in (student, teacher):
        assert all(not m._forward_hooks for m in model.modules())


def test_feature_distiller_identity_adapter_when_widths_match_and_linear_for_2d(
    teacher: nn.Module, data: DataSplits
) -> None:
    x = data.example_input(8)
    twin = copy.deepcopy(teacher)
    with FeatureDistiller(twin, teacher, [("head", "head"), ("conv1", "conv1")], x) as fd:
        assert all(isinstance(a, nn.Identity) for a in fd.adapters)
        assert list(fd.parameters()) == []
        twin(x)
        teacher(x)
        assert fd.loss().item() == pytest.approx(0.0, abs=1e-10)
    wide = SmallCNN()
    wide.head = nn.Sequential(nn.Linear(32, 20), nn.Linear(20, 10))
    with FeatureDistiller(wide, teacher, [("head.0", "head")], x) as fd:
        assert isinstance(fd.adapters[0], nn.Linear)
        assert (fd.adapters[0].in_features, fd.adapters[0].out_features) == (20, 10)
    with pytest.raises(PlanError, match="different ranks"):
        FeatureDistiller(wide, teacher, [("head.0", "conv3")], x)
    assert all(not m._forward_hooks for m in wide.modules())


def test_feature_distiller_unknown_layer_names_it_and_lists_available(
    teacher: nn.Module, data: DataSplits
) -> None:
    student = _pruned(teacher)
    with pytest.raises(PlanError) as info:
        FeatureDistiller(student, teacher, [("conv2", "layer9.conv")], data.example_input(2))
    message = str(info.value)
    assert "'layer9.conv'" in message and "teacher" in message
    assert "conv1" in message and "bn3" in message and "head" in message
    assert "\n" not in message
    # The hook already placed on the student's conv2 was removed on failure.
    assert all(not m._forward_hooks for m in student.modules())


# -- finetune -----------------------------------------------------------------------------


def test_kd_finetune_repairs_pruned_model(teacher: nn.Module, data: DataSplits) -> None:
    student = _pruned(teacher)
    before = _accuracy(student, data)
    teacher_state = copy.deepcopy(teacher.state_dict())
    plan = CompressionPlan(kd_temperature=4.0, kd_alpha=0.9, finetune_steps=150, learning_rate=3e-3)
    lines: list[str] = []
    result = finetune(
        student,
        teacher,
        data,
        plan,
        evaluate=lambda m: _accuracy(m, data),
        eval_every=50,
        log=lines.append,
    )
    after = _accuracy(student, data)
    assert before < 0.5  # pruning really damaged it
    assert after > before + 0.35 and after > 0.9, (before, after)
    assert isinstance(result, FinetuneResult)
    assert (result.steps, result.stopped_early) == (150, False)
    assert [step for step, _ in result.history] == [50, 100, 150]
    assert result.history[-1][1] == pytest.approx(after)
    assert math.isfinite(result.final_loss) and result.final_loss > 0
    assert len(lines) == 3 and "step 150/150" in lines[-1]
    # Teacher untouched and still in eval mode; student back in the mode it came in (eval).
    assert not teacher.training and not student.training
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key
    assert all(p.device.type == "cpu" for p in student.parameters())


def test_finetune_with_feature_pairs_is_deterministic_for_a_seed(
    teacher: nn.Module, data: DataSplits
) -> None:
    base = _pruned(teacher)
    plan = CompressionPlan(
        finetune_steps=25,
        learning_rate=2e-3,
        feature_pairs=(("conv2", "conv2"), ("conv3", "conv3")),
        feature_weight=0.5,
    )
    rng_before = torch.random.get_rng_state()
    runs = []
    for seed in (7, 7, 8):
        student = copy.deepcopy(base)
        result = finetune(student, teacher, data, plan, seed=seed, batch_size=32)
        runs.append((result.final_loss, student.state_dict()))
    # The caller's random stream is not consumed or reseeded.
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    (loss_a, state_a), (loss_b, state_b), (loss_c, state_c) = runs
    assert loss_a == loss_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert loss_a != loss_c
    assert not torch.equal(state_a["conv1.weight"], state_c["conv1.weight"])
    # No hooks survive the run.
    assert all(not m._forward_hooks for m in teacher.modules())


def test_finetune_raises_training_error_when_loss_diverges(
    teacher: nn.Module, data: DataSplits
) -> None:
    plan = CompressionPlan(finetune_steps=100, learning_rate=1e6)
    student = _pruned(teacher)
    with pytest.raises(
        TrainingError,
        match=r"loss became (nan|inf) at step \d+; lower the "
        r"learning rate \(now [0-9.e+]+\)",
    ):
        finetune(student, teacher, data, plan)
    assert not student.training and all(p.device.type == "cpu" for p in student.parameters())


class _InfAfter:
    """Digits batches, with an inf pixel in every batch from the n-th on."""

    def __init__(self, data: DataSplits, n: int) -> None:
        self.data, self.n = data, n

    def batches(
        self, split_name: str, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, (x, y) in enumerate(self.data.batches(split_name, batch_size, shuffle, seed)):
            if i + 1 >= self.n:
                x = x.clone()
                x[0, 0, 0, 0] = math.inf
            yield x, y


def test_finetune_reports_the_step_where_loss_became_non_finite(
    teacher: nn.Module, data: DataSplits
) -> None:
    plan = CompressionPlan(finetune_steps=10, learning_rate=1e-3)
    with pytest.raises(TrainingError, match=r"loss became nan at step 4; .*\(now 0\.000"):
        finetune(_pruned(teacher), teacher, _InfAfter(data, 4), plan)


def test_should_stop_ends_the_run_early_and_says_why(teacher: nn.Module, data: DataSplits) -> None:
    plan = CompressionPlan(finetune_steps=100, learning_rate=1e-3)
    seen: list[tuple[int, float]] = []

    def should_stop(step: int, metric: float) -> bool:
        seen.append((step, metric))
        return step >= 20

    result = finetune(
        _pruned(teacher),
        teacher,
        data,
        plan,
        evaluate=lambda m: _accuracy(m, data),
        eval_every=10,
        should_stop=should_stop,
    )
    assert result.stopped_early
    assert result.steps == 20
    assert "step 20/100" in result.reason and "should_stop" in result.reason
    assert [s for s, _ in result.history] == [10, 20]
    assert seen == result.history
    with pytest.raises(InputError, match="should_stop needs an evaluate"):
        finetune(_pruned(teacher), teacher, data, plan, should_stop=should_stop)


def test_evaluate_at_limits_the_evaluations(teacher: nn.Module, data: DataSplits) -> None:
    calls: list[int] = []
    result = finetune(
        _pruned(teacher),
        teacher,
        data,
        CompressionPlan(finetune_steps=12, learning_rate=1e-3),
        evaluate=lambda m: calls.append(1) or _accuracy(m, data),
        eval_every=1,
        evaluate_at={6, 9}.__contains__,
    )
    assert [s for s, _ in result.history] == [6, 9] and len(calls) == 2


def test_finetune_devices_and_zero_steps(teacher: nn.Module, data: DataSplits) -> None:
    student = _pruned(teacher)
    state = copy.deepcopy(student.state_dict())
    result = finetune(student, teacher, data, CompressionPlan(finetune_steps=0))
    assert result.steps == 0 and not result.stopped_early and math.isnan(result.final_loss)
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())
    plan = CompressionPlan(finetune_steps=3, learning_rate=1e-3)
    assert finetune(student, teacher, data, plan, device="auto").steps == 3
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            finetune(student, teacher, data, plan, device="cuda")
    with pytest.raises(InputError, match="'tpu'"):
        finetune(student, teacher, data, plan, device="tpu")
