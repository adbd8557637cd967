"""The book's one plotting helper: a shared style, the bar chart of a distribution, and
the drawing of a tree of candidates (chapter 10).

Figures are saved on a white background with dark text, so they read the same on the
book's light and dark themes; every axis is labelled by the caller.
"""

from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt
import torch

__all__ = ["setup", "distribution", "tree"]

PALETTE = ["#1f6fb4", "#e4731b", "#2b9a48", "#c8302d", "#8456b8", "#8c564b", "#d260b0", "#6f6f6f"]


def setup() -> None:
    """Apply the book's matplotlib style (call once at the top of a notebook)."""
    mpl.rcParams.update({
        "figure.figsize": (7.0, 3.6),
        "figure.dpi": 100,
        "savefig.dpi": 110,
        "figure.facecolor": "white",
        "axes.facecolor": "white",
        "savefig.facecolor": "white",
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.prop_cycle": mpl.cycler(color=PALETTE),
        "font.size": 10.5,
        "legend.frameon": False,
    })


def distribution(ax: plt.Axes, probs: torch.Tensor, *, kept: torch.Tensor | None = None,
                 labels: list[str] | None = None, title: str | None = None,
                 ylabel: str = "probability") -> plt.Axes:
    """Bar chart of one distribution ``probs`` [V] over token index (or ``labels``).

    ``kept`` (bool [V]) greys out the bars a truncation rule removes.
    """
    p = probs.detach().double().cpu()
    x = torch.arange(p.numel())
    colors = PALETTE[0] if kept is None else [PALETTE[0] if k else "#c9c9c9" for k in kept.tolist()]
    ax.bar(x.numpy(), p.numpy(), color=colors, width=0.8)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("token" if labels is None else "")
    if labels is not None:
        ax.set_xticks(x.numpy(), labels)
    if title:
        ax.set_title(title)
    return ax


def tree(ax: plt.Axes, parents, labels: list[str] | None = None, *, root: str = "last token",
         highlight=(), title: str | None = None) -> plt.Axes:
    """Draw a tree of candidates from its ``parents`` (a sequence or int64 tensor [N]:
    ``parents[i]`` is the candidate node i follows, -1 the root), depth left to right.

    Leaves get one row each, in candidate order, and an inner node sits at the mean row
    of its children; ``labels`` (N strings) name the nodes (default: their indices),
    ``highlight`` (candidate indices, e.g. an accepted path) draws them and their edges
    in the accent colour."""
    up = [int(p) for p in (parents.tolist() if isinstance(parents, torch.Tensor) else parents)]
    N = len(up)
    if labels is not None and len(labels) != N:
        raise ValueError(f"`labels` must name the {N} nodes, got {len(labels)}")
    depth = [0] * (N + 1)                               # index 0: the root
    children = [[] for _ in range(N + 1)]
    for i, p in enumerate(up):
        if not -1 <= p < i:
            raise ValueError(f"`parents[{i}]` = {p} must lie in [-1, {i})")
        depth[i + 1] = depth[p + 1] + 1
        children[p + 1].append(i + 1)
    row = [0.0] * (N + 1)
    leaves = iter(range(N + 1))

    def place(node):                                    # leaves in depth-first order, parents centred
        if not children[node]:
            row[node] = float(next(leaves))
        else:
            for child in children[node]:
                place(child)
            row[node] = sum(row[c] for c in children[node]) / len(children[node])
    place(0)
    lit = {0} | {int(i) + 1 for i in highlight}
    for node in range(1, N + 1):
        parent = up[node - 1] + 1
        on = node in lit and parent in lit
        ax.plot([depth[parent], depth[node]], [row[parent], row[node]], color=PALETTE[1] if on else "#9a9a9a",
                lw=2.2 if on else 1.0, zorder=1)
    names = [root] + (labels if labels is not None else [str(i) for i in range(N)])
    for node in range(N + 1):
        ax.text(depth[node], row[node], names[node], ha="center", va="center", fontsize=8.5, zorder=2,
                bbox=dict(boxstyle="round,pad=0.25", fc="#fde6d3" if node in lit and node else "white",
                          ec=PALETTE[1] if node in lit and node else "#5a5a5a", lw=0.8))
    ax.set_xlim(-0.6, max(depth) + 0.6)
    ax.set_ylim(max(row) + 0.7, -0.7)
    ax.set_xticks(range(max(depth) + 1), ["root"] + [f"depth {d}" for d in range(1, max(depth) + 1)])
    ax.set_yticks([])
    ax.grid(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title)
    return ax
