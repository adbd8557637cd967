"""The book's one plotting helper: a shared style and the bar chart of a distribution.

Figures are saved on a white background with dark text, so they read the same on the
book's light and dark themes; every axis is labelled by the caller.
"""

from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt
import torch

__all__ = ["setup", "distribution"]

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
