"""What both conversion directions and both model families share: one row of a key table (an HF
tensor <-> the ernie_jax param it fills) and the config-value helper for list-or-scalar fields."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Entry:
    """HF tensor `key` <-> param at `path`[index]; layout: 'copy' | 'T' (transpose) | 'row' ([1,E] <-> [E]).
    `part` >= 0: the param is row `part` of the HF tensor (the VL bias [2, E] feeds two routers)."""

    key: str
    path: tuple[str, ...]
    index: tuple[int, ...]
    layout: str
    part: int = -1


def first_of(v, default, pick=None):
    """A config.json value that may be a list (one per modality): its first, or `pick` of the list."""
    if v is None:
        return default
    if isinstance(v, (list, tuple)):
        return (pick or (lambda x: x[0]))(v)
    return v
