"""Shared by the statistical tests: Pearson's chi-square (typsamp.stats), and the exact law of a verdict.

Every verification rule emits its accepted drafts, then one extra token. Given, per
position n, the probability ``keep[n]`` [V] of drafting each token and keeping it, and
the law ``extra[n]`` [V] of the extra token emitted at n (already multiplied by the
chance of stopping there), :func:`verdict_law` assembles the exact law of the whole
verdict, indexed like :func:`encode`.
"""

from __future__ import annotations

import torch

from typsamp import stats

F64 = torch.float64


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper-tail p-value of Pearson's chi-square of ``counts`` against ``probs``.

    :func:`typsamp.stats.chi_square` (the library's one pooling rule: cells expected to
    hold fewer than 5 draws are pooled, a pool still below 5 joins the smallest cell; a
    draw where ``probs`` is 0 gives p = 0), after normalising ``probs`` in float64, so a
    law given only up to a constant factor can be tested. No draws at all: p = 1.
    """
    counts, probs = counts.flatten(), probs.double().flatten()
    if counts.sum() == 0:
        return 1.0
    return stats.chi_square(counts, probs / probs.sum()).p_value


def verdict_law(keep: torch.Tensor, extra: torch.Tensor, V: int) -> torch.Tensor:
    """Exact law of a verdict: ``keep`` [γ, V], ``extra`` [γ+1, V] -> [(V + 1)^(γ+1)].

    P(keep x_1..x_n, then y) = Π_i keep[i](x_i) · extra[n](y).
    """
    gamma = keep.shape[0]
    base = V + 1
    out = torch.zeros(base ** (gamma + 1), dtype=F64)
    digits = torch.arange(1, V + 1)
    prefix = torch.ones((), dtype=F64)              # P(the first n drafts are these, kept)
    code = torch.zeros((), dtype=torch.long)
    for n in range(gamma + 1):
        here = code[..., None] + digits * base**n
        out.index_add_(0, here.flatten(), (prefix[..., None] * extra[n]).flatten())
        if n < gamma:
            prefix, code = prefix[..., None] * keep[n], here
    return out


def encode(verdict, V: int) -> torch.Tensor:
    """One integer per row for the whole verdict: sum_j (tokens[j] + 1) (V + 1)^j."""
    tokens = verdict.tokens.cpu()
    return ((tokens + 1) * (V + 1) ** torch.arange(tokens.shape[1])).sum(1)


def with_value(t: torch.Tensor, index, value) -> torch.Tensor:
    """A copy of ``t`` with ``t[index] = value`` (for building bad inputs)."""
    t = t.clone()
    t[index] = value
    return t


def fit_pvalue(counts: torch.Tensor, probs: torch.Tensor, what: str = "") -> float:
    """Chi-square p-value of ``counts`` against ``probs``, after asserting that no draw
    fell where ``probs`` is 0 (the test a p-value cannot make)."""
    counts, probs = counts.flatten(), probs.flatten().double()
    assert counts.numel() == probs.numel()
    impossible = counts[probs <= 0].sum().item()
    assert impossible == 0, f"{what}: {impossible} draws fell on zero-probability outcomes"
    return chi_square_pvalue(counts[probs > 0], probs[probs > 0])
