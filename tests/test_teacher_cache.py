"""The study's shared fine-tune stream (``TeacherCache``) and the fine-tune's time split, on
digits with a tiny CNN: cached teacher outputs are the teacher's, positions address one
stream, the memory cap holds, and a cached fine-tune equals the uncached one it mirrors."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from autocompress.errors import InputError
from autocompress.intake import DataSplits, load_data
from autocompress.model.plan import CompressionPlan
from autocompress.train.distill import finetune
from autocompress.train.teacher_cache import TIME_KEYS, TeacherCache, cycle_batches

BATCH = 64


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10),
    )


@pytest.fixture(scope="module")
def data() -> DataSplits:
    return load_data("digits", seed=0)


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    torch.manual_seed(0)
    return _net().eval()


def _plan(steps: int) -> CompressionPlan:
    return CompressionPlan(bits={}, finetune_steps=steps, learning_rate=1e-3)


def _stream(data: DataSplits, seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(itertools.islice(cycle_batches(data, BATCH, seed), n))


def test_positions_are_the_seeded_stream_across_epochs(data: DataSplits) -> None:
    cache = TeacherCache(data, BATCH, seed=5)
    expected = _stream(data, 5, 50)  # digits train: a few batches an epoch, so many epochs
    for p in (3, 0, 49, 20, 21, 7):  # ahead, behind, far ahead
        x, y = cache.batch(p)
        assert torch.equal(x, expected[p][0]) and torch.equal(y, expected[p][1])


def test_cached_teacher_outputs_equal_the_teachers(data: DataSplits, teacher: nn.Module) -> None:
    cache = TeacherCache(data, BATCH, seed=1)
    for p in (0, 4, 0, 4):
        x, _ = cache.batch(p)
        with torch.no_grad():
            direct = teacher(x)
        assert torch.equal(cache.teacher_outputs(p, teacher, "cpu"), direct)
    assert cache.stats()["misses"] == 2 and cache.stats()["hits"] == 2
    other = copy.deepcopy(teacher)  # another teacher: computed for it, not served stale
    with torch.no_grad():
        other[-1].weight.add_(1.0)
        expected = other(cache.batch(4)[0])
    assert torch.equal(cache.teacher_outputs(4, other, "cpu"), expected)


def test_the_memory_cap_holds_and_positions_past_it_stay_right(
    data: DataSplits, teacher: nn.Module,
) -> None:
    one = sum(t.element_size() * t.nelement() for t in _stream(data, 2, 1)[0])
    cache = TeacherCache(data, BATCH, seed=2, max_bytes=3 * one)
    expected = _stream(data, 2, 12)
    for p in range(12):
        cache.teacher_outputs(p, teacher, "cpu")
        assert cache.nbytes <= 3 * one
    assert 0 < cache.stats()["positions"] <= 3
    for p in (11, 9, 2):  # not stored: produced again, the same batches
        assert torch.equal(cache.batch(p)[0], expected[p][0])
    assert TeacherCache(data, BATCH, seed=2, max_bytes=0).batch(1)[1].equal(expected[1][1])


def _seen(student: nn.Module, teacher: nn.Module, data: DataSplits, cache: TeacherCache,
          start: int, steps: int = 3) -> list[torch.Tensor]:
    """The batches a cached fine-tune of ``steps`` steps from ``start`` fed the student."""
    seen: list[torch.Tensor] = []
    handle = student.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].clone()) if _m.training else None)
    try:
        finetune(student, teacher, data, _plan(steps), batch_size=BATCH, seed=9,
                 teacher_cache=cache, start=start)
    finally:
        handle.remove()
    return seen


def test_fine_tunes_share_the_stream_and_start_moves_it(
    data: DataSplits, teacher: nn.Module,
) -> None:
    cache = TeacherCache(data, BATCH, seed=4)
    first = _seen(_net(), teacher, data, cache, start=0)
    again = _seen(_net(), teacher, data, cache, start=0)
    later = _seen(_net(), teacher, data, cache, start=2)
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert torch.equal(later[0], first[2]) and not torch.equal(later[0], first[0])
    assert torch.equal(later[1], _stream(data, 4, 4)[3][0])


def test_a_cached_fine_tune_equals_the_uncached_one(data: DataSplits, teacher: nn.Module) -> None:
    """Cache seeded like the run: the same batches and teacher outputs, so the same model,
    whether the outputs are computed (first run) or read back (second)."""
    torch.manual_seed(1)
    start = _net()
    plain, first, second = (copy.deepcopy(start) for _ in range(3))
    ref = finetune(plain, teacher, data, _plan(6), batch_size=BATCH, seed=3)
    cache = TeacherCache(data, BATCH, seed=3)
    results = [finetune(m, teacher, data, _plan(6), batch_size=BATCH, seed=3,
                        teacher_cache=cache) for m in (first, second)]
    assert cache.stats()["hits"] == 6 and cache.stats()["misses"] == 6
    for model, result in zip((first, second), results, strict=True):
        assert result.final_loss == ref.final_loss
        for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values(),
                                strict=True):
            assert torch.equal(a, b), name


def test_seconds_split_the_fine_tune(data: DataSplits, teacher: nn.Module) -> None:
    cache = TeacherCache(data, BATCH, seed=0)
    for kwargs in ({}, {"teacher_cache": cache}):
        result = finetune(_net(), teacher, data, _plan(4), batch_size=BATCH,
                          evaluate=lambda _m: 0.5, eval_every=2, **kwargs)  # type: ignore[arg-type]
        assert set(result.seconds) >= set(TIME_KEYS)
        assert all(v >= 0 for v in result.seconds.values()) and result.seconds["step"] > 0
    assert set(finetune(_net(), teacher, data, _plan(0)).seconds) >= set(TIME_KEYS)


def test_start_and_the_caches_batch_size_are_checked(
    data: DataSplits, teacher: nn.Module,
) -> None:
    with pytest.raises(InputError, match="start"):
        finetune(_net(), teacher, data, _plan(2), batch_size=BATCH, start=-1)
    with pytest.raises(InputError, match="batch_size"):
        finetune(_net(), teacher, data, _plan(2), batch_size=32,
                 teacher_cache=TeacherCache(data, BATCH, seed=0))
