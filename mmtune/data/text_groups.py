"""Query-document pairs from groups of texts that say the same thing: the captions of one image, the
paraphrases of one question. Each text is a query once, and its positive is another text of its group,
drawn with a seed (a cyclic shift of the group's seeded order, so each text is also a positive once).

An aligned captions set (`mmtune data align --text_lists explode`: one row per caption, grouped by
image) thus trains a text embedding model with `QueryDocData(positive_from="group")`, no script.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Optional, Sequence


def pairs_from_groups(texts: Sequence[str], groups: Sequence[Optional[str]], seed: int) -> tuple[list[tuple[int, int]], list[int]]:
    """(query position, positive position) pairs within each group, and the positions of texts
    alone in their group (no positive to draw; the caller counts them as skipped).

    Texts without a group are alone. Within a group the order is a seeded shuffle (seeded by the
    group's key as well, so adding a group elsewhere changes nothing here), and the positive of the
    k-th text is the (k+1)-th: a query is never its own positive."""
    members: dict[str, list[int]] = defaultdict(list)
    alone = []
    for i, g in enumerate(groups):
        if g in (None, ""):
            alone.append(i)
        else:
            members[str(g)].append(i)
    pairs = []
    for key in sorted(members):
        items = members[key]
        if len(items) < 2:
            alone += items
            continue
        order = list(items)
        random.Random(f"{seed}\0{key}").shuffle(order)
        pairs += [(order[k], order[(k + 1) % len(order)]) for k in range(len(order))]
    pairs.sort()
    return pairs, sorted(alone)
