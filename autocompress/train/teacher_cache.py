"""The fine-tune's batch stream, and a study's shared copy of it with the teacher's outputs
computed once (``TeacherCache``).

Every fine-tune step needs a batch and the teacher's outputs on it. Without a cache each
fine-tune draws its own seeded stream (``cycle_batches``) and runs the teacher on every batch.
With one, the trials of a study read one stream, addressed by position (batch ``p`` of
``cycle_batches(data, batch_size, seed)`` with the study's seed), and the teacher's outputs on
a position are computed on its first read only. A fine-tune that continues a parent's training
reads on from the parent's step count and sees fresh batches.

Design (the simplest sound one):

* Positions are the true stream, never wrapped. Wrapping modulo the stored positions once the
  cap is reached would be simpler to serve, but on a real-size model it would train on a
  handful of batches over and over (ImageNet at 224x224 in batches of 64: 26 batches in
  1 GB), so positions past the cap are produced again on every read and not stored.
* Batches come from a live generator read forward; a position past it is reached by decoding
  the batches in between (each is stored while there is room, so a read ahead is paid once).
  A position behind the generator that is not stored restarts it at the start of that
  position's epoch (every epoch has the same number of batches, known once the first epoch
  has been read; before that, at position 0): the batches API has no random access.
* Teacher outputs are computed with the teacher in eval mode under no_grad on the fine-tune's
  device and stored on the CPU. They hold for one teacher object on one device: a read with
  another teacher or device gets outputs computed for it, not stored.
* Handed-out tensors are copies (``to(device, copy=True)``): a model that writes into its
  input cannot spoil the stored batch.
* One lock around the stream and the store: safe for the threads of one process (a teacher
  forward on a miss runs under it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from autocompress.errors import InputError, TrainingError

__all__ = ["DEFAULT_MAX_BYTES", "TIME_KEYS", "Batches", "Feed", "StepClock", "TeacherCache",
           "cycle_batches"]

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB of stored batches and teacher outputs
# The phases of a fine-tune ``FinetuneResult.seconds`` splits its time into.
TIME_KEYS = ("data", "teacher", "step", "evaluate")


class Batches(Protocol):
    """The part of intake.DataSplits the fine-tune needs."""

    def batches(
        self, split_name: str, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def _epoch(
    data: Batches, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for x, y in data.batches("train", batch_size, shuffle=True, seed=seed):
        # A batch of one breaks BatchNorm in train mode ("Expected more than 1 value per
        # channel"); it is only ever the ragged tail of an epoch, so skip it.
        if x.shape[0] >= 2:
            yield x, y


def cycle_batches(
    data: Batches, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless training batches: a fresh seeded shuffle each epoch (seed, seed+1, ...)."""
    epoch = 0
    while True:
        yielded = False
        for x, y in _epoch(data, batch_size, seed + epoch):
            yielded = True
            yield x, y
        if not yielded:
            raise TrainingError(
                "the training split yielded no batch of 2 or more samples; "
                "use more training data or a smaller batch size"
            )
        epoch += 1


def _nbytes(t: torch.Tensor) -> int:
    return t.element_size() * t.nelement()


@dataclass
class _Entry:
    x: torch.Tensor
    y: torch.Tensor
    outputs: torch.Tensor | None = None


class TeacherCache:
    """A study's fine-tune batch stream by position, with the teacher's outputs on each
    position computed once; batches and outputs are kept while they fit in ``max_bytes``."""

    def __init__(self, data: Batches, batch_size: int, seed: int, *,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size {batch_size} must be >= 1 (try 64)")
        if max_bytes < 0:
            raise InputError(f"max_bytes {max_bytes} must be >= 0")
        self.data, self.batch_size, self.seed, self.max_bytes = data, batch_size, seed, max_bytes
        self._entries: dict[int, _Entry] = {}
        self._nbytes = 0
        self._lock = threading.Lock()
        self._gen: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._gen_pos = 0  # the position the live generator yields next
        self._gen_epoch = 0
        self._gen_index = 0  # of _gen_pos within its epoch
        self._per_epoch: int | None = None  # batches per epoch, once one epoch was read
        self._owner: tuple[int, str] | None = None  # (id(teacher), device) outputs are for
        self._teacher: nn.Module | None = None  # held so id() stays that teacher's
        self.hits = 0  # teacher outputs served from the store
        self.misses = 0  # teacher forwards run

    @property
    def nbytes(self) -> int:
        """Bytes of stored batches and teacher outputs."""
        return self._nbytes

    def stats(self) -> dict[str, int]:
        """Plain figures for a record: stored positions, bytes, output hits and misses."""
        return {"positions": len(self._entries), "bytes": self._nbytes,
                "hits": self.hits, "misses": self.misses}

    def batch(self, position: int, device: str | torch.device = "cpu",
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) batch at ``position`` of the stream, as copies on ``device``."""
        with self._lock:
            entry = self._get(position)
        return entry.x.to(device, copy=True), entry.y.to(device, copy=True)

    def teacher_outputs(self, position: int, teacher: nn.Module,
                        device: str | torch.device,
                        x: torch.Tensor | None = None) -> torch.Tensor:
        """``teacher``'s outputs on the batch at ``position``, on ``device`` (where the
        teacher must be, in eval mode): stored ones when they were computed for this teacher
        on this device, else computed now (and stored while there is room). ``x``: that
        batch, when the caller holds it: a position past the cap is then not decoded again
        (re-reading it would restart the stream at its epoch's start)."""
        dev = torch.device(device)
        with self._lock:
            if x is not None and position not in self._entries:
                self.misses += 1
                return _forward(teacher, x, dev)
            entry = self._get(position)
            owner = (id(teacher), str(dev))
            if self._owner is None:
                self._owner, self._teacher = owner, teacher
            if owner == self._owner and entry.outputs is not None:
                self.hits += 1
                return entry.outputs.to(dev, copy=True)
            out = _forward(teacher, entry.x, dev)
            self.misses += 1
            if (owner == self._owner and isinstance(out, torch.Tensor)
                    and position in self._entries and self._fits(out)):
                entry.outputs = out.detach().to("cpu", copy=True)
                self._nbytes += _nbytes(entry.outputs)
        return out

    def _fits(self, *tensors: torch.Tensor) -> bool:
        return self._nbytes + sum(_nbytes(t) for t in tensors) <= self.max_bytes

    def _get(self, position: int) -> _Entry:
        if position < 0:
            raise InputError(f"stream position {position} must be >= 0")
        entry = self._entries.get(position)
        if entry is not None:
            return entry
        if self._gen is None or position < self._gen_pos:
            self._restart(position)
        while True:
            x, y = self._next()
            pos = self._gen_pos - 1
            entry = _Entry(x, y)
            if pos not in self._entries and self._fits(x, y):
                self._entries[pos] = entry
                self._nbytes += _nbytes(x) + _nbytes(y)
            if pos == position:
                return entry

    def _restart(self, position: int) -> None:
        """Start the generator at the epoch that holds ``position`` (at 0 while the epoch
        length is unknown)."""
        epoch = 0 if self._per_epoch is None else position // self._per_epoch
        self._gen_epoch, self._gen_index = epoch, 0
        self._gen_pos = 0 if self._per_epoch is None else epoch * self._per_epoch
        self._gen = _epoch(self.data, self.batch_size, self.seed + epoch)

    def _next(self) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(2):
            if self._gen is None:
                break
            batch = next(self._gen, None)
            if batch is not None:
                self._gen_pos += 1
                self._gen_index += 1
                return batch
            if self._gen_index == 0:
                break
            self._per_epoch = self._gen_index  # same split, same size: every epoch alike
            self._gen_epoch += 1
            self._gen_index = 0
            self._gen = _epoch(self.data, self.batch_size, self.seed + self._gen_epoch)
        raise TrainingError(
            "the training split yielded no batch of 2 or more samples; "
            "use more training data or a smaller batch size"
        )


def _forward(teacher: nn.Module, x: torch.Tensor, dev: torch.device) -> Any:
    with torch.no_grad():
        return teacher(x.to(dev, copy=True))


class StepClock:
    """Seconds per fine-tune phase (``TIME_KEYS``); on CUDA each phase waits for the device,
    so its kernels count where they were launched."""

    def __init__(self, dev: torch.device) -> None:
        self.seconds = dict.fromkeys(TIME_KEYS, 0.0)
        self._sync = dev.type == "cuda"

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start


class Feed:
    """A fine-tune's batches and the teacher's outputs on them, timed by ``clock``: its own
    stream (an iterator, e.g. ``cycle_batches``) and a teacher forward per batch, or a
    ``TeacherCache`` read from position ``start`` (step 1 reads ``start``)."""

    def __init__(self, teacher: nn.Module, dev: torch.device, clock: StepClock,
                 source: TeacherCache | Iterator[tuple[torch.Tensor, torch.Tensor]],
                 start: int = 0) -> None:
        self.teacher, self.dev, self.clock = teacher, dev, clock
        self.source, self.start = source, start

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self.clock.phase("data"):
            if isinstance(self.source, TeacherCache):
                return self.source.batch(self.start + step - 1, self.dev)
            x, y = next(self.source)
            return x.to(self.dev, non_blocking=True), y.to(self.dev, non_blocking=True)

    def teacher_outputs(self, step: int, x: torch.Tensor, *, cached: bool) -> torch.Tensor:
        """The teacher's outputs on step ``step``'s batch ``x``: from the cache when there is
        one and ``cached`` (False: the teacher must run, e.g. for its hidden features)."""
        with self.clock.phase("teacher"):
            if isinstance(self.source, TeacherCache) and cached:
                return self.source.teacher_outputs(self.start + step - 1, self.teacher,
                                                   self.dev, x)
            with torch.no_grad():
                return self.teacher(x)
