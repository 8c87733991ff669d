"""Structured and unstructured pruning on real models (small inputs, random weights)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from fvcore.nn import FlopCountAnalysis
from torch import nn

from autocompress.errors import InputError, PlanError
from autocompress.intake.demo import build_demo_model
from autocompress.model.inventory import PruneGroup
from autocompress.model.plan import CompressionPlan
from autocompress.transform.batchnorm import recalibrate_batchnorm
from autocompress.transform.prune import (
    dependency_groups,
    kept_channels,
    prune,
    prune_with_report,
)
from autocompress.transform.prune_graph import CLASSIFIER_REASON
from autocompress.transform.sparsity import apply_unstructured
from tests.tiny_models import tiny_vit


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    analysis = FlopCountAnalysis(model.eval(), x)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return int(analysis.total())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics so that pruned-vs-reference comparisons mean something."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(torchvision.models.resnet18(num_classes=10))


@pytest.fixture(scope="module")
def x32() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def resnet18_groups(resnet18: nn.Module, x32: torch.Tensor) -> dict[str, PruneGroup]:
    return {g.name: g for g in dependency_groups(resnet18, x32, probe=False)}


# -- rounding -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "ratio", "groups", "expected"),
    [
        (64, 0.3, 1, 48),  # 44.8 -> nearest multiple of 8, not 45
        (64, 0.0, 1, 64),
        (64, 0.99, 1, 8),  # never below round_to
        (512, 0.3, 1, 360),
        (4, 0.9, 1, 1),  # fewer channels than round_to: plain rounding, never 0
        (12, 0.1, 1, 12),  # keeping everything is always allowed
        (12, 0.5, 1, 8),
        (160, 0.5, 10, 80),  # 10 channel groups: multiples of lcm(10, 8) = 40
    ],
)
def test_kept_channels_rounds_the_number_kept(
    channels: int, ratio: float, groups: int, expected: int
) -> None:
    assert kept_channels(channels, ratio, round_to=8, channel_groups=groups) == expected


def test_kept_channels_aligned_pool_prefers_multiples_of_round_to() -> None:
    # 30 channels in 3 chunks: 24 is the only count that is a multiple of both 3 and 8
    # (besides keeping all 30), so every ratio lands on 24 or 30.
    for ratio in (0.1, 0.3, 0.5, 0.9):
        assert kept_channels(30, ratio, round_to=8, channel_groups=3) in (24, 30)
    assert kept_channels(30, 0.5, round_to=1, channel_groups=3) == 15


# -- groups -------------------------------------------------------------------------------


def test_demo_residual_groups_couple_the_identity_adds() -> None:
    model = build_demo_model(1, 10).eval()
    groups = {g.name: g for g in dependency_groups(model, torch.randn(1, 1, 8, 8))}
    assert groups["conv1"].members == ["conv1", "block1.conv2"]
    assert groups["down_conv"].members == ["down_conv", "block2.conv2"]
    assert groups["block1.conv1"].members == ["block1.conv1"]
    assert groups["conv1"].channels == 32 and groups["conv1"].prunable
    assert not groups["fc"].prunable and groups["fc"].excluded_reason == CLASSIFIER_REASON


def test_resnet18_groups(resnet18_groups: dict[str, PruneGroup]) -> None:
    groups = resnet18_groups
    # Stem and every layer1 block output are tied together by the identity adds.
    assert groups["conv1"].members == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    # The downsample shortcut joins the stage's group; the group is named after its
    # first member in model order, not after the module torch-pruning started from.
    assert groups["layer2.0.conv2"].members == [
        "layer2.0.conv2",
        "layer2.0.downsample.0",
        "layer2.1.conv2",
    ]
    assert groups["layer4.1.conv1"].channels == 512
    assert [g.name for g in groups.values() if not g.prunable] == ["fc"]
    assert len(groups) == 13  # 4 stage groups + 8 inner block convs + fc


# -- structured pruning -------------------------------------------------------------------


def test_prune_resnet18_at_0_3(
    resnet18: nn.Module, x32: torch.Tensor, resnet18_groups: dict[str, PruneGroup]
) -> None:
    before = _state(resnet18)
    groups = [g.name for g in resnet18_groups.values() if g.prunable]
    plan = CompressionPlan(prune=dict.fromkeys(groups, 0.3))
    pruned, report = prune_with_report(resnet18, plan, x32)

    assert _same_state(resnet18, before), "the caller's model must be untouched"
    assert pruned is not resnet18
    assert report.failed == {}
    assert report.channels["conv1"] == 64 and report.kept["conv1"] == 48
    assert report.kept["layer4.0.conv1"] == 360  # 512 * 0.7 = 358.4 -> 360
    with torch.no_grad():
        out = pruned.eval()(x32)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert _params(pruned) < 0.6 * _params(resnet18)
    assert _flops(pruned, x32) < 0.6 * _flops(resnet18, x32)
    for name, module in pruned.named_modules():
        if isinstance(module, nn.Conv2d) and name != "conv1" and module.in_channels > 3:
            assert module.out_channels % 8 == 0, (name, module.out_channels)
            assert module.in_channels % 8 == 0, (name, module.in_channels)
    # Coupled layers were pruned together.
    assert pruned.conv1.out_channels == 48
    assert pruned.layer1[1].conv2.out_channels == 48
    assert pruned.layer2[0].downsample[0].out_channels == pruned.layer2[1].conv2.out_channels
    assert pruned.fc.out_features == 10


def test_prune_mobilenet_v3_small_at_0_3() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(torchvision.models.mobilenet_v3_small(num_classes=10))
    x = torch.randn(1, 3, 64, 64)
    before = _state(model)
    groups = {g.name: g for g in dependency_groups(model, x, probe=False)}
    # expand conv -> depthwise conv -> SE scale: one set of channels.
    assert groups["features.4.block.0.0"].members == [
        "features.4.block.0.0",
        "features.4.block.1.0",
        "features.4.block.2.fc2",
    ]
    assert groups["classifier.3"].excluded_reason == CLASSIFIER_REASON
    names = [name for name, g in groups.items() if g.prunable]
    assert "classifier.0" in names
    pruned = prune(model, CompressionPlan(prune=dict.fromkeys(names, 0.3)), x)
    assert _same_state(model, before)
    with torch.no_grad():
        assert pruned.eval()(x).shape == (1, 10)
    assert _params(pruned) < 0.75 * _params(model)
    assert _flops(pruned, x) < 0.8 * _flops(model, x)
    dw = pruned.features[4].block[1][0]  # depthwise: in, out and groups shrink together
    assert dw.in_channels == dw.out_channels == dw.groups == 64  # 96 * 0.7 = 67.2 -> 64


def test_pruning_removes_exactly_the_zeroed_channels(
    resnet18: nn.Module, x32: torch.Tensor
) -> None:
    """Zero 24 channels of the stem/layer1 group everywhere they are produced; pruning must
    pick exactly those (lowest L1) and leave the network's function unchanged."""
    model = copy.deepcopy(resnet18)
    dead = torch.arange(0, 64, 8).tolist() + torch.arange(3, 64, 4).tolist()
    dead = sorted(set(dead))[:24]
    producers = [
        ("conv1", "bn1"),
        ("layer1.0.conv2", "layer1.0.bn2"),
        ("layer1.1.conv2", "layer1.1.bn2"),
    ]
    modules = dict(model.named_modules())
    with torch.no_grad():
        for conv, bn in producers:
            modules[conv].weight[dead] = 0
            modules[bn].weight[dead] = 0
            modules[bn].bias[dead] = 0
        reference = model(x32)
    pruned, report = prune_with_report(
        model,
        CompressionPlan(prune={"conv1": 0.375}),
        x32,  # keep 40 of 64
    )
    assert report.kept == {"conv1": 40}
    with torch.no_grad():
        out = pruned.eval()(x32)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_l1_importance_keeps_the_largest_norm_channels() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 8, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    # Channel c gets L1 norm proportional to a shuffled rank: the 8 largest are known.
    rank = torch.randperm(16)
    with torch.no_grad():
        signs = torch.randn(16, 3, 3, 3).sign()
        model[0].weight.copy_(signs * (rank.float() + 1).view(16, 1, 1, 1))
    expected_keep = sorted(torch.argsort(rank, descending=True)[:8].tolist())
    original = model[0].weight.detach().clone()
    pruned = prune(model, CompressionPlan(prune={"0": 0.5}), torch.randn(1, 3, 8, 8))
    assert pruned[0].out_channels == 8 and pruned[2].in_channels == 8
    torch.testing.assert_close(pruned[0].weight, original[expected_keep])


def test_ratio_close_to_one_never_prunes_to_nothing() -> None:
    model = build_demo_model(1, 10).eval()
    x = torch.randn(1, 1, 8, 8)
    pruned, report = prune_with_report(
        model, CompressionPlan(prune={"conv1": 0.99, "block2.conv1": 0.999}), x
    )
    assert report.kept == {"conv1": 8, "block2.conv1": 8}
    assert pruned.conv1.out_channels == 8 and pruned.block1.conv2.out_channels == 8
    with torch.no_grad():
        assert pruned(x).shape == (1, 10)
    # A small ratio can round back to every channel: reported, nothing removed.
    pruned, report = prune_with_report(model, CompressionPlan(prune={"block1.conv1": 0.05}), x)
    assert report.kept == report.channels == {"block1.conv1": 32}
    assert pruned.block1.conv1.out_channels == 32
    # Without rounding the floor is one channel, never zero.
    pruned, report = prune_with_report(
        model, CompressionPlan(prune={"conv1": 0.999}), x, round_to=1
    )
    assert report.kept == {"conv1": 1}


def test_grouped_conv_loses_channels_evenly_per_group() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=4),
        nn.GroupNorm(4, 32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 5),
    ).eval()
    x = torch.randn(1, 3, 8, 8)
    pruned, report = prune_with_report(model, CompressionPlan(prune={"0": 0.5, "3": 0.5}), x)
    assert report.failed == {} and report.kept == {"0": 16, "3": 16}
    # The grouped conv reads its input in 4 chunks of 8: the same positions must go from
    # every chunk, or its per-group weights would be read against the wrong channels.
    kept = [
        i for i in range(32) if any(torch.equal(model[0].weight[i], w) for w in pruned[0].weight)
    ]
    positions = [{i % 8 for i in kept if i // 8 == chunk} for chunk in range(4)]
    assert len(kept) == 16 and all(p == positions[0] for p in positions)
    assert pruned[3].groups == 4 and pruned[3].weight.shape == (16, 4, 3, 3)
    assert pruned[4].num_channels == 16
    with torch.no_grad():
        assert pruned(x).shape == (1, 5)


def test_bad_plan_names_raise_plan_error_naming_them() -> None:
    model = build_demo_model(1, 10).eval()
    x = torch.randn(1, 1, 8, 8)
    allowed = r"allowed: block1\.conv1, block2\.conv1, conv1, down_conv$"
    with pytest.raises(PlanError, match=r"'layer9\.conv' does not exist in this model; " + allowed):
        prune(model, CompressionPlan(prune={"layer9.conv": 0.3}), x)
    with pytest.raises(PlanError, match=r"'fc' cannot be used: classifier output.*; " + allowed):
        prune(model, CompressionPlan(prune={"fc": 0.3}), x)
    with pytest.raises(PlanError, match=r"'block1\.conv2' is coupled to group 'conv1'"):
        prune(model, CompressionPlan(prune={"block1.conv2": 0.3}), x)
    with pytest.raises(InputError, match="round_to 0"):
        prune(model, CompressionPlan(prune={"conv1": 0.3}), x, round_to=0)


def test_empty_plan_returns_an_untouched_copy(resnet18: nn.Module, x32: torch.Tensor) -> None:
    pruned = prune(resnet18, CompressionPlan(prune={"conv1": 0.0}), x32)
    assert pruned is not resnet18
    assert _same_state(pruned, _state(resnet18))


def test_pruned_model_keeps_train_mode_and_frozen_flags() -> None:
    model = build_demo_model(1, 10).train()
    model.fc.weight.requires_grad_(False)
    pruned = prune(model, CompressionPlan(prune={"conv1": 0.5}), torch.randn(2, 1, 8, 8))
    assert pruned.training and pruned.block1.bn1.training
    assert not pruned.fc.weight.requires_grad and pruned.conv1.weight.requires_grad
    assert model.training  # tracing switched only the copy to eval


# -- architectures torch-pruning handles partly or not at all ------------------------------


def test_more_architectures_prune_or_report() -> None:
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_0(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    groups = dependency_groups(model, x, probe=False)
    names = [g.name for g in groups if g.prunable]
    assert [g.name for g in groups if not g.prunable] == ["classifier.1"]  # final conv
    pruned, report = prune_with_report(model, CompressionPlan(prune=dict.fromkeys(names, 0.3)), x)
    assert report.failed == {}
    with torch.no_grad():
        assert pruned(x).shape == (1, 10)
    assert _params(pruned) < 0.7 * _params(model)
    # The expand1x1/expand3x3 outputs are concatenated: the next squeeze conv's input
    # must equal the sum of the two pruned widths.
    fire = pruned.features[3]
    nxt = pruned.features[4]
    assert nxt.squeeze.in_channels == fire.expand1x1.out_channels + fire.expand3x3.out_channels


def test_vit_embedding_group_is_reported_not_crashed() -> None:
    torch.manual_seed(0)
    model = tiny_vit().eval()
    x = torch.randn(1, 3, 32, 32)
    groups = {g.name: g for g in dependency_groups(model, x)}
    # The residual stream width is hard-coded in VisionTransformer's reshape: probing finds it.
    assert not groups["conv_proj"].prunable
    assert "no longer runs" in groups["conv_proj"].excluded_reason
    assert groups["encoder.layers.encoder_layer_0.mlp.0"].prunable
    plan = CompressionPlan(prune={"conv_proj": 0.5, "encoder.layers.encoder_layer_0.mlp.0": 0.5})
    pruned, report = prune_with_report(model, plan, x)
    assert set(report.failed) == {"conv_proj"}
    assert report.kept == {"encoder.layers.encoder_layer_0.mlp.0": 32}
    assert pruned.conv_proj.out_channels == 32  # left dense
    assert pruned.encoder.layers.encoder_layer_0.mlp[0].out_features == 32
    with torch.no_grad():
        assert pruned(x).shape == (1, 10)
    with pytest.warns(UserWarning, match="groups left dense: conv_proj"):
        prune(model, plan, x)


def test_shufflenet_tracing_failure_is_reported_per_layer() -> None:
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    groups = dependency_groups(model, x)
    assert groups and not any(g.prunable for g in groups)
    assert all("dependency tracing failed" in g.excluded_reason for g in groups)
    with pytest.raises(PlanError, match=r"'conv1\.0' cannot be used: dependency tracing failed"):
        prune(model, CompressionPlan(prune={"conv1.0": 0.3}), x)


# -- unstructured ---------------------------------------------------------------------------


def test_apply_unstructured_zeroes_the_smallest_weights(resnet18: nn.Module) -> None:
    before = _state(resnet18)
    sparse = apply_unstructured(resnet18, {"layer1.0.conv1": 0.5, "fc": 0.25, "conv1": 0.0})
    assert _same_state(resnet18, before)
    w_old = resnet18.layer1[0].conv1.weight
    w_new = sparse.layer1[0].conv1.weight
    assert (w_new == 0).sum().item() == w_old.numel() // 2
    # The survivors are the largest magnitudes, unchanged.
    threshold = w_old.abs().flatten().kthvalue(w_old.numel() // 2).values
    kept = w_new != 0
    assert torch.equal(w_new[kept], w_old[kept]) and (w_old[kept].abs() >= threshold).all()
    assert (sparse.fc.weight == 0).sum().item() == round(0.25 * sparse.fc.weight.numel())
    assert torch.equal(sparse.conv1.weight, resnet18.conv1.weight)
    # Permanent: plain parameters, no masks, no pruning hooks left behind.
    names = {n for n, _ in sparse.named_parameters()}
    assert "layer1.0.conv1.weight" in names and not any("orig" in n for n in names)
    assert not any("mask" in n for n, _ in sparse.named_buffers())
    assert not sparse.layer1[0].conv1._forward_pre_hooks


def test_apply_unstructured_rejects_unknown_layers(resnet18: nn.Module) -> None:
    with pytest.raises(PlanError, match=r"'layer1\.0\.bn1' is not a Conv/Linear layer"):
        apply_unstructured(resnet18, {"layer1.0.bn1": 0.5})
    with pytest.raises(PlanError, match=r"'nope' does not exist.*allowed: .*conv1"):
        apply_unstructured(resnet18, {"nope": 0.5})
    with pytest.raises(PlanError, match="outside"):
        apply_unstructured(resnet18, {"conv1": 1.0})


# -- BatchNorm re-estimation after pruning ------------------------------------------------------


class _ConvBnDrop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, momentum=0.3)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.bn(self.conv(x)).mean(dim=(2, 3))))


def test_recalibrate_batchnorm_sets_the_statistics_of_the_data() -> None:
    torch.manual_seed(0)
    model = _ConvBnDrop().eval()
    batches = [torch.randn(8, 3, 6, 6) * 3 + 1 for _ in range(3)]
    used = recalibrate_batchnorm(model, iter([torch.randn(1, 3, 6, 6), *batches]), max_batches=2)
    assert used == 2  # the one-sample batch is skipped, the third batch is beyond the cap
    with torch.no_grad():
        acts = [model.conv(b) for b in batches[:2]]
    # Cumulative average of the two batches' statistics (not an EMA with momentum 0.3).
    mean = torch.stack([a.mean(dim=(0, 2, 3)) for a in acts]).mean(0)
    var = torch.stack([a.var(dim=(0, 2, 3), unbiased=True) for a in acts]).mean(0)
    assert torch.allclose(model.bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(model.bn.running_var, var, rtol=1e-4)
    assert model.bn.momentum == 0.3 and not model.training and not model.drop.training


def test_recalibrate_batchnorm_without_usable_data_changes_nothing() -> None:
    model = _ConvBnDrop().train()
    model.bn.running_mean.fill_(0.5)
    before = _state(model)
    assert recalibrate_batchnorm(model, iter([torch.randn(1, 3, 6, 6)])) == 0
    assert recalibrate_batchnorm(model, iter([])) == 0
    assert _same_state(model, before) and model.training

