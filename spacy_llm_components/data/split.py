"""A seeded dev split: stratified by a key, keeping groups (an article's paragraphs) together."""

import math
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
    """(train indices, dev indices), both sorted.

    About `dev_fraction` of the groups go to dev (at least one when there are
    two or more), shared among strata in proportion to their size (largest
    remainders get the rounding), and no stratum gives all its groups to dev,
    so every label stays in train (unless every stratum has one group only). Items of one group stay on one side.
    """
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
    order = sorted(by_stratum, key=repr)
    n_groups = len(members)
    target = min(max(round(n_groups * dev_fraction), 1), n_groups - 1) if n_groups >= 2 else 0
    quota = {s: len(by_stratum[s]) * dev_fraction for s in order}
    take = {s: min(math.floor(quota[s]), len(by_stratum[s]) - 1) for s in order}
    for s in sorted(order, key=lambda s: -(quota[s] - math.floor(quota[s]))):  # stable: ties keep `order`
        if sum(take.values()) >= target:
            break
        if take[s] < len(by_stratum[s]) - 1:
            take[s] += 1
    if target and not any(take.values()):  # only singleton strata: one of them has to give its item
        take[max(order, key=lambda s: len(by_stratum[s]))] = 1
    rng = random.Random(seed)
    dev: List[int] = []
    for s in order:
        gs = by_stratum[s]
        rng.shuffle(gs)
        for g in gs[: take[s]]:
            dev.extend(members[g])
    dev_set = set(dev)
    return [i for i in range(n) if i not in dev_set], sorted(dev)
