"""The fp32 teacher: autocompress.zoo.resnet20 trained once on the fine-tune split, cached.

Trained on the ``train`` split of ``intake.load_data`` (the official train folder minus the
stratified validation split), so the teacher never sees the images candidates are selected
on (design rule 5); the official test folder stays apart. Recipe: SGD with Nesterov
momentum 0.9, weight decay 5e-4, batch 128, linear warm-up then cosine decay, random crop
(4-pixel zero padding) + horizontal flip applied on the preprocessed tensors.

The weights go to ``<cache>/resnet20-cifar10.pt`` (what studies/cifar10-resnet20.yaml reads)
with a JSON sidecar holding the recipe, the split hash and the accuracies, so a later run
can tell whether the cached teacher fits its split and its epoch budget.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

EPOCHS = {"quick": 5, "full": 30}
BATCH_SIZE = 128
PEAK_LR = 0.1
WEIGHT_DECAY = 5e-4
WARMUP_FRACTION = 0.03
PAD = 4
RECIPE = "sgd-nesterov-m0.9-wd5e-4-bs128-lr0.1-warmup3%-cosine-crop4-flip-v1"


def teacher_path(cache: Path) -> Path:
    return cache / "resnet20-cifar10.pt"


def _meta_path(cache: Path) -> Path:
    return cache / "resnet20-cifar10.json"


def read_meta(cache: Path) -> dict[str, Any] | None:
    path = _meta_path(cache)
    if not (path.is_file() and teacher_path(cache).is_file()):
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def usable(meta: dict[str, Any] | None, split_sha256: str, epochs: int) -> str | None:
    """None when the cached teacher can be reused, else why not."""
    if meta is None:
        return "no cached teacher"
    if meta.get("recipe") != RECIPE:
        return f"cached teacher was trained by another recipe ({meta.get('recipe')})"
    if meta.get("split_sha256") != split_sha256:
        return "cached teacher was trained on another train/val split (it may have seen val)"
    if int(meta.get("epochs", 0)) < epochs:
        return f"cached teacher has {meta.get('epochs')} epochs, this mode asks for {epochs}"
    return None


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, per sample, on (N, C, H, W)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # (N, H)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # (N, W)
    idx = torch.arange(n).view(n, 1, 1)
    # (N, H, W, C) gather of the crop windows, then back to NCHW
    out = padded.permute(0, 2, 3, 1)[idx, rows.view(n, h, 1), cols.view(n, 1, w)]
    out = out.permute(0, 3, 1, 2)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out.contiguous()


@torch.no_grad()
def accuracy(model: nn.Module, data: Any, split: str) -> float:
    model.eval()
    correct = total = 0
    for x, y in data.batches(split, 500):
        correct += int((model(x).argmax(1) == y).sum())
        total += int(y.numel())
    return correct / max(total, 1)


def train(
    data: Any,
    epochs: int,
    *,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, dict[str, Any]]:
    from autocompress.zoo import resnet20

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = resnet20(num_classes=data.num_classes)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0}],
        lr=PEAK_LR, momentum=0.9, nesterov=True,
    )
    steps_per_epoch = math.ceil(len(data.train) / BATCH_SIZE)
    total = epochs * steps_per_epoch
    warmup = max(1, int(WARMUP_FRACTION * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    started = time.perf_counter()
    history = []
    for epoch in range(epochs):
        model.train()
        seen = correct = 0
        loss_sum = 0.0
        t0 = time.perf_counter()
        for x, y in data.batches("train", BATCH_SIZE, shuffle=True, seed=seed * 1000 + epoch):
            if x.shape[0] < 2:
                continue
            x = augment(x, gen)
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += int(y.numel())
            correct += int((out.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * int(y.numel())
        val = accuracy(model, data, "val")
        history.append({
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "val_accuracy": val,
            "seconds": time.perf_counter() - t0,
            "load_1min": round(os.getloadavg()[0], 2),
        })
        log(f"  teacher epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.3f}, train "
            f"{correct / seen:.4f}, val {val:.4f}, {time.perf_counter() - t0:.0f} s, load "
            f"{os.getloadavg()[0]:.1f}")
    model.eval()
    meta = {
        "recipe": RECIPE,
        "epochs": epochs,
        "seed": seed,
        "batch_size": BATCH_SIZE,
        "peak_lr": PEAK_LR,
        "train_seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "history": history,
        "val_accuracy_torch": history[-1]["val_accuracy"] if history else accuracy(
            model, data, "val"
        ),
        "test_accuracy_torch": accuracy(model, data, "test"),
    }
    return model, meta


def save(model: nn.Module, meta: dict[str, Any], cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    path = teacher_path(cache)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    _meta_path(cache).write_text(json.dumps(meta, indent=2) + "\n")
    return path
