"""A seeded dev split: stratified by a key, keeping groups (an article's paragraphs) together."""

import random
from collections import defaultdict
from typing import Hashable, List, Optional, Sequence, Tuple


def split_indices(
    n: int,
    dev_fraction: float,
    seed: int,
    strata: Optional[Sequence[Hashable]] = None,
    groups: Optional[Sequence[Hashable]] = None,
) -> Tuple[List[int], List[int]]:
    """(train indices, dev indices), both sorted. Each stratum gives about `dev_fraction` of its
    items (at least one when it has two or more) to dev; items of one group stay on one side."""
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev fraction must lie in (0, 1), got {dev_fraction}")
    groups = list(groups) if groups is not None else list(range(n))
    strata = list(strata) if strata is not None else [0] * n
    members = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    by_stratum = defaultdict(list)  # a group's stratum is that of its first item
    for g, items in members.items():
        by_stratum[strata[items[0]]].append(g)
    rng = random.Random(seed)
    dev: List[int] = []
    for stratum in sorted(by_stratum, key=repr):
        gs = by_stratum[stratum]
        rng.shuffle(gs)
        k = round(len(gs) * dev_fraction)
        if len(gs) >= 2:
            k = min(max(k, 1), len(gs) - 1)
        for g in gs[:k]:
            dev.extend(members[g])
    dev_set = set(dev)
    return [i for i in range(n) if i not in dev_set], sorted(dev)
