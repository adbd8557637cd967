"""Trees of candidates: Medusa's sparse "choices", and what a verification rule needs (chapter 10).

Medusa's heads each propose their top-k tokens for one position ahead; a *tree* says which
combinations of those top-k entries become candidates. Medusa writes a tree as its
*choices*: a list of index paths, one per node, such as ``[(0,), (1,), (0, 0), (0, 1)]``:
``(0, 1)`` is the node whose first token is head 1's best guess and whose second token is
head 2's second-best guess. A node's *depth* is the length of its path, its *rank* the
last entry (the top-k index at that depth), and its parent the path without its last
entry. Every proper prefix of a path must itself be a node.

In this engine the tree hangs below the last committed token (Medusa's "root", the base
model's own greedy token, is the previous step's extra token), so the nodes are Medusa's
choices without the root, and node i's candidate token is the top-``rank[i]`` guess of head
``depth[i]``: :meth:`TreeSpec.candidates`.

**What Medusa's code does** (read in ``FasterDecoding/Medusa``, ``medusa/model/utils.py``
at commit 2b8981448074423a09aec01f4c79a0c0c47f5317, the commit :mod:`typsamp.typical`
cites): ``generate_medusa_buffers`` sorts the choices by ``(len(path), path)``, shortest
first and lexicographically within a depth; the sorted position + 1 is a node's index in
the tree pass (index 0 is the root). It then builds the *retrieve indices*: walking the
sorted list from its end, it skips any path already lying on a retrieved path and retrieves
every other one with all its prefixes. Since a node's descendants are longer and so come
later in the sorted list, the retrieved paths are exactly the leaves, in decreasing sorted
position; each is padded with -2 to the longest (then shifted by 1, so the padding reads
index -1, an appended token 0 and the last node's logits). :class:`TreeSpec` keeps the
same sort (``choices``, candidate index = sorted position) and the same leaf order
(``paths``, padded with -1). ``evaluate_posterior`` chooses among those paths; its tie
rule, "the first best path in retrieve order", is :attr:`Topology.retrieve`.

Named trees: :func:`chain` (a single path, the chain case), :func:`full` (every
combination up to a width and depth), :func:`small` (10 nodes, depth 4, sized for two CPU
cores), and :func:`mc_sim_7b_63`, the 63-node tree Medusa ships under that name
(in ``medusa/model/medusa_choices.py`` at commit
11af0aa503437b40d45f5a47c001c43699b7ae52; the list of index paths is data and is
reproduced as :data:`MC_SIM_7B_63`).

:func:`topology` turns any ``parents`` tensor (the engine's form of a tree: ``parents[i]``
the candidate node i follows, -1 for the root) into the tables the tree rules index on the
device: children in candidate order, depths, root paths and the retrieve order. It reads
``parents`` back to the host once and caches the result per tensor object, so a
proposer that hands the same ``parents`` every step costs one synchronisation in total.
:func:`check_step` and :func:`path_verdict` are the shape checks and the verdict assembly
the tree kernels of :mod:`typsamp.speculative` and :mod:`typsamp.typical` share.

:func:`target_law` is the law of what the target itself emits walking down one row's tree
(draw y from p at the node, move to the child carrying y, else stop): every exact tree
rule's verdict has it, :func:`typsamp.speculative.tree_rejection_law` computes recursive
rejection's own law, and chapter 10 compares the two.
"""

from __future__ import annotations

import numbers
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch

from typsamp import checks
from typsamp.rules import Verdict, emit

__all__ = ["TreeSpec", "Topology", "topology", "chain", "full", "small", "mc_sim_7b_63",
           "MC_SIM_7B_63", "SMALL", "check_step", "path_verdict", "target_law", "law_inputs"]

#: Medusa's 63-node tree ``mc_sim_7b_63`` in ``medusa/model/medusa_choices.py``
#: of FasterDecoding/Medusa at commit 11af0aa503437b40d45f5a47c001c43699b7ae52, as listed
#: there (unsorted; :meth:`TreeSpec.from_choices` sorts it as Medusa does).
MC_SIM_7B_63 = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4),
    (2, 0), (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8),
    (0, 0, 2), (3, 0), (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0),
    (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0),
    (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2),
    (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0),
    (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0),
)

#: A 10-node tree of depth 4 for two CPU cores: three first guesses, the best one
#: extended furthest (the shape Medusa's trees have: most nodes under rank-0 guesses).
SMALL = (
    (0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 0, 0, 0),
)


def _choices(choices) -> tuple[tuple[int, ...], ...]:
    """Check Medusa-format choices; return them as tuples, sorted as Medusa sorts them."""
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
        raise checks.InputTypeError(
            f"`choices` must be a sequence of index paths such as [(0,), (1,), (0, 0)], got {type(choices).__name__}")
    if len(choices) == 0:
        raise ValueError("`choices` must hold at least one node")
    paths = []
    for i, path in enumerate(choices):
        if isinstance(path, (str, bytes)) or not isinstance(path, Sequence):
            raise checks.InputTypeError(f"`choices[{i}]` must be a sequence of ints, got {type(path).__name__}")
        if len(path) == 0:
            raise ValueError(f"`choices[{i}]` is empty: every node has a depth of at least 1 (the root is implicit)")
        for j, k in enumerate(path):
            if isinstance(k, bool) or not isinstance(k, numbers.Integral):
                raise checks.InputTypeError(f"`choices[{i}][{j}]` must be an int, got {type(k).__name__}")
            if k < 0:
                raise ValueError(f"`choices[{i}][{j}]` = {k} must be a top-k index >= 0")
        paths.append(tuple(int(k) for k in path))
    seen = set()
    for path in paths:
        if path in seen:
            raise ValueError(f"`choices` lists the node {path} twice")
        seen.add(path)
    for path in paths:
        if len(path) > 1 and path[:-1] not in seen:
            raise ValueError(f"the node {path} has no parent: {path[:-1]} is not in `choices` "
                             "(every prefix of a path must be a node)")
    return tuple(sorted(paths, key=lambda path: (len(path), path)))


@dataclass(frozen=True, eq=False)
class TreeSpec:
    """A tree of candidates in Medusa's sparse format, built once into index tensors.

    Build it with :meth:`from_choices`. Candidate i is ``choices[i]``, in Medusa's sorted
    order (by depth, then lexicographically), so parents come before their children.

    Attributes:
        choices: tuple of tuples, the sorted index paths.
        parents: int64 [N], the candidate each node follows (-1: a child of the root).
        depth: int64 [N], 1 for a child of the root.
        rank: int64 [N], the top-k index at the node's depth (the path's last entry).
        n_nodes: N.
        max_depth: D, the longest path.
        top_k: tuple of D ints, per depth the largest rank + 1 (the top-k each head needs).
        paths: int64 [L, D], the root paths of the L leaves as candidate indices, -1
            padding, in Medusa's retrieve order (decreasing sorted position).
    """

    choices: tuple
    parents: torch.Tensor
    depth: torch.Tensor
    rank: torch.Tensor
    n_nodes: int
    max_depth: int
    top_k: tuple
    paths: torch.Tensor

    @classmethod
    def from_choices(cls, choices, device: torch.device | str | None = None) -> "TreeSpec":
        """The tree of Medusa-format ``choices`` (a sequence of index paths, any order).

        Raises ``ValueError`` for an empty tree, an empty or duplicate path, a negative
        index or a path whose prefix is missing; ``TypeError`` for non-int entries.
        """
        ordered = _choices(choices)
        index = {path: i for i, path in enumerate(ordered)}
        parents = [index[path[:-1]] if len(path) > 1 else -1 for path in ordered]
        depth = [len(path) for path in ordered]
        rank = [path[-1] for path in ordered]
        D = max(depth)
        top_k = tuple(max(r for r, d in zip(rank, depth) if d == level) + 1 for level in range(1, D + 1))
        inner = set(p for p in parents if p >= 0)
        leaves = [i for i in reversed(range(len(ordered))) if i not in inner]
        paths = [[index[path[:k]] for k in range(1, len(path) + 1)] for path in (ordered[i] for i in leaves)]
        paths = [row + [-1] * (D - len(row)) for row in paths]
        return cls(choices=ordered,
                   parents=torch.tensor(parents, dtype=torch.long, device=device),
                   depth=torch.tensor(depth, dtype=torch.long, device=device),
                   rank=torch.tensor(rank, dtype=torch.long, device=device),
                   n_nodes=len(ordered), max_depth=D, top_k=top_k,
                   paths=torch.tensor(paths, dtype=torch.long, device=device))

    def to(self, device: torch.device | str) -> "TreeSpec":
        """The same tree with its tensors on ``device`` (as ``Tensor.to``: the same tensors when already there)."""
        return TreeSpec(choices=self.choices, parents=self.parents.to(device), depth=self.depth.to(device),
                        rank=self.rank.to(device), n_nodes=self.n_nodes, max_depth=self.max_depth,
                        top_k=self.top_k, paths=self.paths.to(device))

    def candidates(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """int64 [B, N]: node i gets ``topk_ids[:, depth[i] - 1, rank[i]]``.

        ``topk_ids`` int64 [B, K, k] holds, per row, each of K >= D heads' top-k token ids
        (k >= max(top_k)), best first. Shapes are checked, values are not (no host read).
        """
        checks.tensor("topk_ids", topk_ids)
        if topk_ids.dtype != torch.long or topk_ids.dim() != 3:
            raise ValueError(f"`topk_ids` must be int64 of shape [B, K, k], got {topk_ids.dtype} "
                             f"of shape {tuple(topk_ids.shape)}")
        _, K, k = topk_ids.shape
        if K < self.max_depth or k < max(self.top_k):
            raise ValueError(f"`topk_ids` has {K} heads of top-{k}; this tree needs at least "
                             f"{self.max_depth} heads of top-{max(self.top_k)}")
        if topk_ids.device != self.parents.device:
            raise ValueError(f"`topk_ids` is on {topk_ids.device} but the tree on {self.parents.device} "
                             "(use TreeSpec.to)")
        return topk_ids[:, self.depth - 1, self.rank]

    def __repr__(self) -> str:
        return f"TreeSpec(n_nodes={self.n_nodes}, max_depth={self.max_depth}, top_k={self.top_k})"


def chain(n: int) -> TreeSpec:
    """The chain of n nodes, each head's best guess: choices (0,), (0, 0), ... (parents i - 1)."""
    n = checks.integer("n", n, low=1)
    return TreeSpec.from_choices([(0,) * d for d in range(1, n + 1)])


def full(width: int, depth: int) -> TreeSpec:
    """Every path of ranks < ``width`` up to ``depth``: width + width² + ... + width^depth nodes."""
    width = checks.integer("width", width, low=1)
    depth = checks.integer("depth", depth, low=1)
    nodes = [()]
    out = []
    for _ in range(depth):
        nodes = [path + (k,) for path in nodes for k in range(width)]
        out += nodes
    if len(out) > 4096:
        raise ValueError(f"full({width}, {depth}) has {len(out)} nodes; at most 4096 are allowed")
    return TreeSpec.from_choices(out)


def small() -> TreeSpec:
    """The 10-node tree :data:`SMALL` (depth 4, top-k (3, 2, 2, 1))."""
    return TreeSpec.from_choices(SMALL)


def mc_sim_7b_63() -> TreeSpec:
    """Medusa's 63-node tree :data:`MC_SIM_7B_63` (depth 4, top-k (10, 10, 10, 2))."""
    return TreeSpec.from_choices(MC_SIM_7B_63)


# ---------------------------------------------------------------------------------------
# What the tree rules index on the device


@dataclass(frozen=True, eq=False)
class Topology:
    """Tables derived once from a ``parents`` tensor (see :func:`topology`).

    Row 0 of the [N + 1, ...] tables is the root (the last committed token), row 1 + i
    candidate i, as in the target's scores p [B, N + 1, V].

    Attributes:
        parents: int64 [N], the tensor given.
        chain: True when ``parents[i] = i - 1`` for every i.
        children: int64 [N + 1, W], row 1 + v the children of node v (row 0: the
            root's) in increasing candidate index, -1 padding; W the widest node's count
            (at least 1).
        depth: int64 [N + 1], row 1 + v the depth of node v (1 for a child of the
            root), row 0 the root's 0: how many candidates a verdict ending at v accepts.
        root_paths: int64 [N + 1, D], row 1 + v the candidates from the root down to v
            (v included), -1 padding; row 0 is all -1.
        retrieve: int64 [N], the position, in Medusa's retrieve order (leaves by
            decreasing candidate index), of the first leaf whose path holds node i. A
            smaller value comes first; for a :class:`TreeSpec` this is exactly the order
            of ``paths``, which is Medusa's.
        max_depth: D.
        width: W.
        inner: int64 [I], the rows (of the [N + 1, ...] tables, root 0 included) that have
            children, increasing: the only rows whose distribution a candidate is scored
            against (the others are leaves).
        up_inner: int64 [N], candidate i's parent row as an index into ``inner``
            (``inner[up_inner[i]] = parents[i] + 1``).
    """

    parents: torch.Tensor
    chain: bool
    children: torch.Tensor
    depth: torch.Tensor
    root_paths: torch.Tensor
    retrieve: torch.Tensor
    max_depth: int
    width: int
    inner: torch.Tensor
    up_inner: torch.Tensor


def _build(parents: torch.Tensor) -> Topology:
    checks.tensor("parents", parents)
    if parents.dtype != torch.long or parents.dim() != 1 or parents.numel() < 1:
        raise ValueError(f"`parents` must be int64 of shape [N] with N >= 1, got {parents.dtype} "
                         f"of shape {tuple(parents.shape)}")
    up = parents.tolist()
    N = len(up)
    for i, p in enumerate(up):
        if not -1 <= p < i:
            raise ValueError(f"`parents[{i}]` = {p} must lie in [-1, {i}): a parent comes before its child")
    kids: list[list[int]] = [[] for _ in range(N + 1)]
    depth = [0] * N
    rootpath: list[list[int]] = [[] for _ in range(N + 1)]
    for i, p in enumerate(up):
        kids[p + 1].append(i)
        depth[i] = 1 if p < 0 else depth[p] + 1
        rootpath[i + 1] = rootpath[p + 1] + [i]
    D = max(depth)
    W = max(1, max(len(k) for k in kids))
    # Medusa's retrieve order: leaves by decreasing index; a node ranks with its first leaf.
    retrieve = [N] * N
    leaves = [i for i in reversed(range(N)) if not kids[i + 1]]
    for order, leaf in enumerate(leaves):
        for node in rootpath[leaf + 1]:
            retrieve[node] = min(retrieve[node], order)
    device = parents.device

    def table(rows, width):
        return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long, device=device)

    inner = [row for row in range(N + 1) if kids[row]]
    where = {row: k for k, row in enumerate(inner)}

    return Topology(parents=parents, chain=up == list(range(-1, N - 1)), children=table(kids, W),
                    depth=torch.tensor([0] + depth, dtype=torch.long, device=device),
                    root_paths=table(rootpath, D), retrieve=torch.tensor(retrieve, dtype=torch.long, device=device),
                    max_depth=D, width=W, inner=torch.tensor(inner, dtype=torch.long, device=device),
                    up_inner=torch.tensor([where[p + 1] for p in up], dtype=torch.long, device=device))


# id(parents) -> (weak reference to parents, its Topology); a few entries suffice (a
# decoder uses one or two trees), the oldest go first.
_CACHE: dict[int, tuple[weakref.ref, Topology]] = {}
_CACHE_SIZE = 16


def topology(parents) -> Topology:
    """The :class:`Topology` of ``parents`` (int64 [N], ``-1 <= parents[i] < i``), or of a
    :class:`TreeSpec`'s ``parents``.

    Checked and built on first sight of a tensor object (one host read), then served from
    a cache keyed on the object itself (held by a weak reference, so a new tensor that
    reuses a dead one's id is never confused with it). Do not modify ``parents`` in place
    after passing it.
    """
    if isinstance(parents, TreeSpec):
        parents = parents.parents
    hit = _CACHE.get(id(parents))
    if hit is not None and hit[0]() is parents:
        return hit[1]
    built = _build(parents)
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[id(parents)] = (weakref.ref(parents), built)
    return built


def check_step(draft_tokens: torch.Tensor, target_probs: torch.Tensor, parents) -> Topology:
    """The shape checks of one tree step (no host read after the first sight of
    ``parents``): ``draft_tokens`` [B, N], ``target_probs`` [B, N + 1, V], ``parents`` [N].
    Returns the :class:`Topology`."""
    topo = topology(parents)
    N = topo.parents.numel()
    if draft_tokens.dim() != 2 or draft_tokens.shape[1] != N:
        raise ValueError(f"a tree of {N} candidates needs `draft_tokens` of shape [B, {N}], "
                         f"got {tuple(draft_tokens.shape)}")
    B = draft_tokens.shape[0]
    if target_probs.dim() != 3 or tuple(target_probs.shape[:2]) != (B, N + 1):
        raise ValueError(f"a tree of {N} candidates needs `target_probs` of shape [B, N + 1, V] = "
                         f"[{B}, {N + 1}, V], got {tuple(target_probs.shape)}")
    if topo.parents.device != draft_tokens.device:
        raise ValueError(f"`parents` is on {topo.parents.device} but `draft_tokens` on {draft_tokens.device}")
    return topo


def path_verdict(topo: Topology, draft_tokens: torch.Tensor, end: torch.Tensor,
                 extra: torch.Tensor) -> Verdict:
    """The verdict of a tree step that accepted the root path ending at node ``end`` [B]
    (-1: none accepted) and adds ``extra`` [B]: ``tokens`` [B, D + 1] (the path's tokens,
    the extra token, -1 padding), ``accepted`` [B] (the path's length), ``path`` [B, D]."""
    path = topo.root_paths[end + 1]                                          # [B, D]
    accepted = topo.depth[end + 1]
    out = emit(draft_tokens.gather(1, path.clamp(min=0)), accepted, extra)
    return Verdict(tokens=out.tokens, accepted=out.accepted, path=path)


def law_inputs(draft_tokens, target_probs, parents):
    """The checked inputs of the one-row law functions (:func:`target_law`,
    :func:`typsamp.speculative.tree_rejection_law`): the tokens as a list, the rows of p
    normalised in float64 as lists, and each node's children (row 0 the root's) as lists."""
    checks.tensor("draft_tokens", draft_tokens)
    checks.tensor("target_probs", target_probs, floating=True)
    if draft_tokens.dtype != torch.long or draft_tokens.dim() != 1:
        raise ValueError(f"`draft_tokens` must be int64 of shape [N] (one row), got {draft_tokens.dtype} "
                         f"of shape {tuple(draft_tokens.shape)}")
    topo = topology(parents)
    N = topo.parents.numel()
    if draft_tokens.numel() != N or target_probs.dim() != 2 or target_probs.shape[0] != N + 1:
        raise ValueError(f"a tree of {N} candidates needs `draft_tokens` [{N}] and `target_probs` [{N + 1}, V], "
                         f"got {tuple(draft_tokens.shape)} and {tuple(target_probs.shape)}")
    checks.probs("target_probs", target_probs)
    V = target_probs.shape[1]
    x = draft_tokens.tolist()
    if min(x) < 0 or max(x) >= V:
        raise ValueError(f"`draft_tokens` must be token ids in [0, {V})")
    p = target_probs.double().cpu()
    p = (p / p.sum(dim=1, keepdim=True)).tolist()
    kids = [[c for c in row if c >= 0] for row in topo.children.tolist()]
    return x, p, kids


def target_law(draft_tokens: torch.Tensor, target_probs: torch.Tensor, parents) -> dict[tuple[int, ...], float]:
    """The law of what the target itself emits on one row's tree: the law every exact tree
    rule's verdict must have.

    The target walks down from the root: at node v it draws y ~ p_v (``target_probs[1 + v]``,
    row 0 the root's); if a child of v carries y (the first such child, in candidate order)
    it moves there and draws again, otherwise it stops. The emitted tokens are its draws
    (the last one leaves the tree, or is drawn at a leaf). Returns {tokens: probability}
    over every outcome of positive probability, in float64 (at most (N + 1) V outcomes).

    Args: ``draft_tokens`` int64 [N], ``target_probs`` [N + 1, V] (rows normalised first),
    ``parents`` int64 [N] or a :class:`TreeSpec`.
    """
    x, p, kids = law_inputs(draft_tokens, target_probs, parents)
    law: dict[tuple[int, ...], float] = {}
    stack = [(-1, (), 1.0)]
    while stack:
        v, prefix, prob = stack.pop()
        follow = {}
        for c in kids[v + 1]:
            follow.setdefault(x[c], c)
        for y, py in enumerate(p[v + 1]):
            if py <= 0:
                continue
            if y in follow:
                stack.append((follow[y], prefix + (y,), prob * py))
            else:
                law[prefix + (y,)] = prob * py
    return law
