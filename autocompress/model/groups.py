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


__all__ = ["PruneGroup"]
