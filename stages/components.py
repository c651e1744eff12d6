"""Connected components over named nodes (scipy's), for the two places that group videos: discover (identities a
video shows) and pairs (a fake with its source, a video with its group label). Each component is named by its
smallest node name, so names do not depend on the order the links come in."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def smallest_in_component(linked: Iterable[Sequence[str]]) -> dict[str, str]:
    """Every name of ``linked`` -> the smallest name of its component, where each sequence links all its names
    (a sequence of one name is a node without links)."""
    # here, not at the top: scipy.sparse costs ~0.2 s of the start-up of score-video, which imports discover
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    linked = [list(names) for names in linked]
    names = sorted({n for group in linked for n in group})
    if not names:
        return {}
    index = {n: i for i, n in enumerate(names)}
    pairs = np.array([(index[g[0]], index[n]) for g in linked for n in g[1:]], dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(names), len(names)))
    _, component = connected_components(graph, directed=False)
    first: dict[int, str] = {}
    for name, c in zip(names, component):  # names are sorted: the first seen is the smallest
        first.setdefault(int(c), name)
    return {name: first[int(c)] for name, c in zip(names, component)}
