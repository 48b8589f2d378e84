"""Connected components over an edge list: the union-find step of every dedup stage.

Generic over what the nodes are (unique captions, images, embeddings): nodes are ``0..n-1`` and
edges are index pairs. Implemented with ``scipy.sparse.csgraph.connected_components`` (C, linear
in nodes + edges), then relabelled so the result does not depend on edge order: every node's
label is the smallest node index in its component.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as _scipy_components


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Label of each of ``n`` nodes: the smallest node index of its component (int64).

    ``pairs`` is an (m, 2) integer array of undirected edges; self-loops and repeats are fine.
    A node on no edge is its own component.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= n):
        raise ValueError(f"edge endpoints must be in [0, {n})")
    if len(pairs) == 0:
        return np.arange(n, dtype=np.int64)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n)).tocsr()
    _, comp = _scipy_components(graph, directed=True, connection="weak")
    # Smallest member per component: the first occurrence of each component id (ids are 0..k-1).
    _, first = np.unique(comp, return_index=True)
    return first.astype(np.int64)[comp]


def component_sizes(labels: np.ndarray) -> np.ndarray:
    """Size of the component of each node, given labels from :func:`connected_components`."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.bincount(labels, minlength=int(labels.max()) + 1)[labels]
