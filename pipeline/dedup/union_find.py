"""Connected components over an edge list: the union-find step of every dedup stage.

Generic over what the nodes are (unique captions, images, embeddings): nodes are ``0..n-1`` and
edges are index pairs. Implemented with ``scipy.sparse.csgraph.connected_components`` (C, linear
in nodes + edges), then relabelled so the result does not depend on edge order: every node's
label is the smallest node index in its component.

For edge lists too large for one process, :func:`component_stars`, :func:`large_star` and
:func:`small_star` are the per-partition steps of a distributed computation over any int64 node ids
(the caption dedup's partitioned path runs them as Ray tasks over shuffle files).
"""

from __future__ import annotations

from dataclasses import dataclass

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


# ----------------------------------------------------------------------------------------------
# Distributed connected components: local star forests, then large-star / small-star rounds.
#
# Kiveris, Lattanzi, Mirrokni, Rastogi, Vassilvitskii, "Connected Components in MapReduce and
# Beyond" (SoCC 2014). Each step below is what one partition computes over the edges routed to it;
# the caller routes records between partitions (by node owner) and repeats until every partition
# reports its nodes settled. Node ids are arbitrary int64 values (no 0..n-1 numbering, no int32
# limit): only nodes on edges take part.
# ----------------------------------------------------------------------------------------------


def _distinct_edges(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (u, v) records without self-loops, sorted by (u, v)."""
    u = np.asarray(u, dtype=np.int64)
    v = np.asarray(v, dtype=np.int64)
    keep = u != v
    u, v = u[keep], v[keep]
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    if len(u):
        new = np.r_[True, (u[1:] != u[:-1]) | (v[1:] != v[:-1])]
        u, v = u[new], v[new]
    return u, v


def _groups(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and size of each run of equal values in sorted ``u``."""
    if len(u) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    return starts, np.diff(np.r_[starts, len(u)])


def component_stars(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each component of an edge list as a star: (node, smallest node of its component), node != root.

    The stars connect exactly what ``pairs`` connects, with at most one edge per node; nodes are any
    int64 ids. Used to shrink one partition's edges before the distributed rounds.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nodes, local = np.unique(pairs, return_inverse=True)
    labels = connected_components(len(nodes), local.reshape(-1, 2))
    leaf = labels != np.arange(len(nodes))
    return nodes[leaf], nodes[labels[leaf]]


@dataclass(frozen=True)
class LargeStar:
    """One partition's large-star step (see :func:`large_star`)."""

    labels: tuple[np.ndarray, np.ndarray]  # (node, smallest of node and its neighbours), owned nodes
    edges: tuple[np.ndarray, np.ndarray]  # (v, m) with m < v: the new edges, for the small-star step
    unsettled: int  # owned nodes that are neither a star's centre nor a leaf of one


def large_star(u: np.ndarray, v: np.ndarray) -> LargeStar:
    """Large-star over the adjacency records (u, v) of the nodes u a partition owns.

    Every undirected edge must reach the owners of both ends, as (a, b) and as (b, a). For each owned
    node u with neighbours N(u), m(u) = min(N(u) + {u}), and every neighbour v > u is linked to m(u)
    instead of u. ``unsettled`` counts nodes that are neither a centre (all neighbours larger) nor a
    leaf (exactly one neighbour, smaller): when no partition has one, the edges are stars centred on
    their component's smallest node, and ``labels`` are the final labels.
    """
    u, v = _distinct_edges(u, v)
    starts, sizes = _groups(u)
    if len(starts) == 0:
        empty = np.zeros(0, np.int64)
        return LargeStar((empty, empty), (empty, empty), 0)
    nodes = u[starts]
    smallest = np.minimum.reduceat(v, starts)  # v is sorted within each node's run: its first value
    m = np.minimum(nodes, smallest)
    centre = smallest > nodes
    leaf = (sizes == 1) & (smallest < nodes)
    m_of = np.repeat(m, sizes)
    up = v > u
    return LargeStar((nodes, m), (v[up], m_of[up]), int((~centre & ~leaf).sum()))


def small_star(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Small-star over records (u, v), v < u, of the nodes u a partition owns: every edge reaches the
    owner of its larger end only. Each owned u and its smaller neighbours are linked to the smallest
    of them. Returns the new undirected edges (x, m), x != m.
    """
    u, v = _distinct_edges(u, v)
    if np.any(v > u):
        raise ValueError("small_star takes each edge at its larger end: (u, v) with v < u")
    starts, sizes = _groups(u)
    if len(starts) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    m = v[starts]  # smallest neighbour of each node (sorted runs)
    m_of = np.repeat(m, sizes)
    others = v != m_of
    x = np.concatenate([u[starts], v[others]])
    return _distinct_edges(x, np.concatenate([m, m_of[others]]))
