"""The plain record of one coupled channel group: shared by ``inventory`` (which lists them)
and ``prune`` (which finds and prunes them), so neither depends on the other for it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PruneGroup:
    """Output channels that must be pruned together, named after its first Conv/Linear member.

    ``members`` are the Conv/Linear layers whose output channels the group removes (their
    consumers lose the matching input channels too); ``channels`` is the current count.
    """

    name: str
    members: list[str]
    channels: int
    prunable: bool
    excluded_reason: str | None


def kept_channels(
    channels: int, ratio: float, *, round_to: int = 8, channel_groups: int = 1
) -> int:
    """How many of ``channels`` survive ``ratio``: nearest allowed count to channels*(1-ratio).

    Allowed counts are multiples of ``channel_groups`` (grouped convs and attention heads lose
    channels evenly per group) and, where any exists, multiples of ``round_to``; keeping all
    channels is always allowed. Never 0. E.g. 64 channels at 0.3 -> 48 (not 45).
    """
    if ratio <= 0:
        return channels
    step = max(1, channel_groups)
    candidates = list(range(step, channels + 1, step))
    aligned = [c for c in candidates if c % round_to == 0]
    pool = sorted(set(aligned) | {channels}) if aligned else candidates
    target = channels * (1.0 - ratio)
    # Nearest to the target; ties keep more channels (the cheaper mistake).
    return min(pool, key=lambda c: (abs(c - target), -c))


__all__ = ["PruneGroup", "kept_channels"]
