"""Symbolic checks (sympy) of the identities the book relies on.

Every function returns :class:`Claim` objects: an unevaluated left-hand side (a limit,
a derivative, a sum), the right-hand side the book states, and :meth:`Claim.holds`,
which lets sympy evaluate the left side and decide whether the two agree. The right
sides are written down independently of the computation, so a wrong statement fails.
Notebooks display the claims (they render as LaTeX) and assert ``holds()``; the tests
in ``tests/test_proofs.py`` assert the same.

Chapter 1 (temperature): :func:`softmax_with_temperature`, :func:`shift_invariance`,
:func:`identity_at_one`, :func:`greedy_limit`, :func:`uniform_limit`,
:func:`entropy_derivative`.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

__all__ = [
    "Claim",
    "softmax_with_temperature",
    "shift_invariance",
    "identity_at_one",
    "greedy_limit",
    "uniform_limit",
    "entropy_derivative",
]

T = sp.Symbol("T", positive=True)


@dataclass(frozen=True)
class Claim:
    """``lhs = rhs``, with ``lhs`` possibly unevaluated (``Limit``, ``Derivative``)."""

    name: str
    lhs: sp.Expr
    rhs: sp.Expr

    def holds(self) -> bool:
        """True when sympy proves ``lhs - rhs`` is identically zero."""
        difference = sp.simplify(self.lhs.doit() - self.rhs)
        return difference == 0

    def _repr_latex_(self) -> str:
        return f"$\\displaystyle {sp.latex(self.lhs)} = {sp.latex(self.rhs)}$"

    def __str__(self) -> str:
        return f"{self.name}: {self.lhs} = {self.rhs}"


def _logits(V: int) -> list[sp.Symbol]:
    if V < 2:
        raise ValueError(f"`V` must be >= 2, got {V}")
    return list(sp.symbols(f"z1:{V + 1}", real=True))


def softmax_with_temperature(z, temperature=T) -> list[sp.Expr]:
    """p_T(x) = exp(z_x / T) / sum_y exp(z_y / T), as sympy expressions."""
    weights = [sp.exp(zx / temperature) for zx in z]
    total = sp.Add(*weights)
    return [w / total for w in weights]


def shift_invariance(V: int = 3) -> list[Claim]:
    """softmax((z + c) / T) = softmax(z / T): only differences of logits matter."""
    z = _logits(V)
    c = sp.Symbol("c", real=True)
    shifted = softmax_with_temperature([zx + c for zx in z])
    plain = softmax_with_temperature(z)
    return [Claim(f"shift p_T(x{i + 1})", s, p) for i, (s, p) in enumerate(zip(shifted, plain))]


def identity_at_one(V: int = 3) -> list[Claim]:
    """At T = 1 the temperature-scaled distribution is the model's own softmax."""
    z = _logits(V)
    at_one = [p.subs(T, 1) for p in softmax_with_temperature(z)]
    total = sp.Add(*[sp.exp(zx) for zx in z])
    return [Claim(f"p_1(x{i + 1})", a, sp.exp(zx) / total) for i, (a, zx) in enumerate(zip(at_one, z))]


def _ordered_logits(V: int) -> tuple[list[sp.Expr], list[sp.Symbol]]:
    """Distinct logits z_1 > z_2 > ... > z_V, written with positive gaps and z_1 = 0.

    By :func:`shift_invariance` fixing z_1 = 0 loses nothing; the gaps g_k > 0 make the
    ordering explicit so sympy can take limits.
    """
    if V < 2:
        raise ValueError(f"`V` must be >= 2, got {V}")
    gaps = list(sp.symbols(f"g1:{V}", positive=True))
    z = [sp.Integer(0)]
    for g in gaps:
        z.append(z[-1] - g)
    return z, gaps


def _stable_softmax(z) -> list[sp.Expr]:
    # p_T(x) = 1 / sum_y exp((z_y - z_x) / T): the same function, written through
    # differences, which is the form in which the limits are transparent.
    return [1 / sp.Add(*[sp.exp((zy - zx) / T) for zy in z]) for zx in z]


def greedy_limit(V: int = 3) -> list[Claim]:
    """lim_{T -> 0+} p_T = one-hot on the largest logit (distinct logits)."""
    z, _ = _ordered_logits(V)
    expected = [sp.Integer(1)] + [sp.Integer(0)] * (V - 1)
    return [Claim(f"lim T->0+ p_T(x{i + 1})", sp.Limit(p, T, 0, "+"), e)
            for i, (p, e) in enumerate(zip(_stable_softmax(z), expected))]


def uniform_limit(V: int = 3) -> list[Claim]:
    """lim_{T -> oo} p_T = uniform 1/V, whatever the (finite) logits."""
    z, _ = _ordered_logits(V)
    return [Claim(f"lim T->oo p_T(x{i + 1})", sp.Limit(p, T, sp.oo), sp.Rational(1, V))
            for i, p in enumerate(_stable_softmax(z))]


def entropy_derivative(V: int = 3) -> Claim:
    """dH(p_T)/dT = Var_{p_T}(z) / T^3, so entropy never falls as T rises."""
    z = _logits(V)
    p = softmax_with_temperature(z)
    entropy = -sp.Add(*[px * sp.log(px) for px in p])
    mean = sp.Add(*[px * zx for px, zx in zip(p, z)])
    variance = sp.Add(*[px * (zx - mean) ** 2 for px, zx in zip(p, z)])
    return Claim("dH/dT", sp.Derivative(entropy, T), variance / T**3)
