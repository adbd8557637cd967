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

Chapter 3 (speculative sampling): :func:`min_plus_positive_part`,
:func:`residual_mass`, :func:`one_position_exact`, :func:`one_position_by_region`,
:func:`speculative_step_distribution` with :func:`autoregressive_distribution`,
:func:`naive_match_rule`, :func:`expected_tokens_sum`, :func:`expected_tokens_limit`,
:func:`point_mass_draft`; the normaliser of the residual for every V,
:func:`residual_mass_general`, with :func:`one_position_general` (P(emit x) = p(x) with
the normaliser derived, not assumed) and :func:`alpha_one_case`; Leviathan et al.'s
lenience, :func:`lenient_min_scaling`, :func:`lenient_residual_mass_general` and
:func:`lenient_one_position_by_region`. :func:`residual_mass` and
:func:`one_position_by_region` take V and are checked for V = 2..6 in the tests.

Chapter 5 (temperature against acceptance): :func:`self_draft_rejection`,
:func:`greedy_draft_slope`, :func:`self_match_limits`.

Chapter 6 (typical acceptance): :func:`entropy_gap`, :func:`typical_one_position`.

Chapter 10 (trees of candidates): :func:`tree_step_exact` (recursive rejection over
deterministic children, :class:`typsamp.speculative.RejectionSampling` on a tree, has the
target's law; symbolic conditionals, :data:`TOY_TREES` with branching 2-3 and depth 2,
built by :func:`tree_conditionals` and :func:`tree_step_distribution`) and
:func:`sibling_telescoping` (the one-node identity behind it).
"""

from __future__ import annotations

import itertools
import random
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
    "min_plus_positive_part",
    "residual_mass",
    "one_position_exact",
    "one_position_by_region",
    "toy_tables",
    "speculative_step_distribution",
    "autoregressive_distribution",
    "speculative_step_exact",
    "naive_match_rule",
    "expected_tokens_sum",
    "expected_tokens_limit",
    "point_mass_draft",
    "residual_mass_general",
    "one_position_general",
    "alpha_one_case",
    "lenient_min_scaling",
    "lenient_residual_mass_general",
    "lenient_one_position_by_region",
    "self_draft_rejection",
    "greedy_draft_slope",
    "self_match_limits",
    "entropy_gap",
    "typical_one_position",
    "TOY_TREES",
    "tree_conditionals",
    "tree_step_distribution",
    "tree_step_exact",
    "sibling_telescoping",
]

T = sp.Symbol("T", positive=True)


@dataclass(frozen=True)
class Claim:
    """``lhs = rhs``, with ``lhs`` possibly unevaluated (``Limit``, ``Derivative``)."""

    name: str
    lhs: sp.Expr
    rhs: sp.Expr

    def holds(self) -> bool:
        """True when sympy proves ``lhs - rhs`` is identically zero.

        When plain simplification leaves ``Max``/``Min`` terms (inside a sum over a
        symbolic range, say), they are rewritten as ``Piecewise`` case distinctions and
        simplified again: an equivalent form, so no false claim can pass this way.
        """
        difference = sp.simplify(self.lhs.doit() - self.rhs)
        if isinstance(difference, sp.MatrixBase):
            return difference.is_zero_matrix is True
        if difference != 0 and difference.has(sp.Max, sp.Min):
            difference = sp.simplify(difference.rewrite(sp.Piecewise))
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


# ---------------------------------------------------------------------------------------
# Chapter 3: speculative sampling
#
# One position: the draft proposes x ~ q; it is kept with probability min(1, p(x)/q(x));
# otherwise a token is drawn from the residual (p - q)_+ / sum (p - q)_+. Then
#   P(emit x) = q(x) min(1, p(x)/q(x)) + P(reject) (p(x) - q(x))_+ / sum_y (p(y) - q(y))_+
#             = min(p(x), q(x))      + (1 - alpha)  (p(x) - q(x))_+ / (1 - alpha)
#             = p(x),
# using two facts: min(a, b) + (a - b)_+ = a, and sum_y (p - q)_+ = 1 - alpha when both
# sum to 1 (sum the first fact over y).


def _positive_part(e, evaluate: bool = True):
    return sp.Max(e, 0, evaluate=evaluate)


def _held(*terms):
    """A sum kept exactly as written, so the claim displays the statement, not its value."""
    return sp.Add(*terms, evaluate=False)


def min_plus_positive_part() -> list[Claim]:
    """min(a, b) + (a - b)_+ = a, in both cases a >= b and a < b."""
    a = sp.Symbol("a", real=True)
    d = sp.Symbol("d", nonnegative=True)
    e = sp.Symbol("e", positive=True)
    claims = []
    for case, b in (("a >= b", a - d), ("a < b", a + e)):
        lhs = _held(sp.Min(a, b, evaluate=False), _positive_part(a - b, evaluate=False))
        claims.append(Claim(f"min(a,b) + (a-b)+ = a when {case}", lhs, a))
    return claims


def _distribution(name: str, V: int) -> list[sp.Expr]:
    """A symbolic distribution on V tokens: V - 1 free positive entries, the last 1 - rest."""
    free = list(sp.symbols(f"{name}1:{V}", positive=True))
    return free + [1 - sp.Add(*free)]


def residual_mass(V: int = 3) -> Claim:
    """sum_y (p(y) - q(y))_+ = 1 - sum_y min(p(y), q(y)), from min + (.)_+ = identity.

    Summing min(p, q) + (p - q)_+ = p over y gives the claim with sum p = 1; stated here
    term by term (Max/Min unevaluated), which sympy proves via the same identity.
    """
    p = _distribution("p", V)
    q = _distribution("q", V)
    lhs = sp.Add(*[_positive_part(px - qx) for px, qx in zip(p, q)])
    rhs = 1 - sp.Add(*[sp.Min(px, qx) for px, qx in zip(p, q)])
    return Claim("sum (p-q)+ = 1 - alpha", lhs.rewrite(sp.Piecewise), rhs.rewrite(sp.Piecewise))


def one_position_exact() -> list[Claim]:
    """General V, argued in the two lemmas: P(emit x) = min(p, q) + (p - q)_+ = p(x).

    The claims here are only the final step, min(p(x), q(x)) + (1 - alpha) * r(x) / (1 - alpha)
    = p(x), with the normaliser of the residual *taken* to be 1 - alpha (alpha < 1);
    :func:`residual_mass_general` proves that for every V and :func:`one_position_general`
    repeats the step with the normaliser derived, not assumed.
    """
    px = sp.Symbol("p_x", nonnegative=True)
    alpha = sp.Symbol("alpha", nonnegative=True)
    d = sp.Symbol("d", nonnegative=True)
    e = sp.Symbol("e", positive=True)

    def emitted(qx):
        # min(p, q) + (1 - alpha) * (p - q)_+ / (1 - alpha); the denominator is the
        # residual mass, 1 - alpha by the lemma `residual_mass`.
        resample = sp.Mul(1 - alpha, _positive_part(px - qx, evaluate=False), sp.Pow(1 - alpha, -1),
                          evaluate=False)
        return _held(sp.Min(px, qx, evaluate=False), resample)

    return [
        Claim("P(emit x) = p(x) when p(x) >= q(x)", emitted(px - d), px),
        Claim("P(emit x) = p(x) when p(x) < q(x)", emitted(px + e), px),
    ]


def one_position_by_region(V: int = 3) -> list[tuple[tuple[bool, ...], list[Claim]]]:
    """Exhaustive check for symbolic p, q on V tokens, in every ordering region.

    A region fixes, for each token, whether p(x) >= q(x) or p(x) < q(x); inside it every
    min and (.)_+ is a plain expression. In the region where every p >= q, the claims
    are that the differences p - q, each >= 0, sum to exactly 0 (so p = q), and that
    with q = p the step emits min(p, p) = p(x) with no rejection (alpha = 1). The region
    where every p < q is empty because both sum to 1. Returns ``[(region, claims), ...]``.
    """
    if V < 2:
        raise ValueError(f"`V` must be >= 2, got {V}")
    p = _distribution("p", V)
    q = _distribution("q", V)
    out = []
    for region in itertools.product((True, False), repeat=V):
        if not any(region):
            continue                                         # sum p < sum q: impossible
        if all(region):
            claims = [Claim("sum (p - q) = 0 when every p >= q", sp.Add(*[px - qx for px, qx in zip(p, q)]), 0)]
            same = dict(zip(q[:-1], p[:-1]))
            alpha = sp.Add(*[sp.Min(px, qx) for px, qx in zip(p, q)]).subs(same)
            claims.append(Claim("alpha = 1 when q = p", alpha, 1))
            claims += [Claim(f"x{i + 1}: P(emit) = min(p, q) with q = p", sp.Min(px, qx).subs(same), px)
                       for i, (px, qx) in enumerate(zip(p, q))]
            out.append((region, claims))
            continue
        mins = [qx if ge else px for px, qx, ge in zip(p, q, region)]
        residual = [px - qx if ge else sp.Integer(0) for px, qx, ge in zip(p, q, region)]
        alpha = sp.Add(*mins)
        total = sp.Add(*residual)
        emitted = [m + (1 - alpha) * r / total for m, r in zip(mins, residual)]
        out.append((region, [Claim(f"x{i + 1}", e, px) for i, (e, px) in enumerate(zip(emitted, p))]))
    return out


# The residual's normaliser for every V (symbolic V), and the alpha = 1 case.

_V = sp.Symbol("V", integer=True, positive=True)
_Y = sp.Symbol("y", integer=True, positive=True)
_P = sp.IndexedBase("p", nonnegative=True)
_Q = sp.IndexedBase("q", nonnegative=True)


def _over_y(term) -> sp.Sum:
    """sum_{y=1}^{V} term, V symbolic."""
    return sp.Sum(term, (_Y, 1, _V))


def residual_mass_general() -> Claim:
    """Lemma 2 for every vocabulary size V (V a symbol, p and q indexed symbols):

        sum_y (p_y - q_y)_+ - (1 - alpha) = sum_y p_y - 1,   alpha = sum_y min(p_y, q_y),

    so for any p that sums to 1 the residual's normaliser is exactly 1 - alpha. Proved from
    lemma 1 term by term (sympy splits each Max and Min into its two cases).
    """
    lhs = _over_y(_positive_part(_P[_Y] - _Q[_Y])) - (1 - _over_y(sp.Min(_P[_Y], _Q[_Y])))
    return Claim("sum_y (p-q)+ - (1 - alpha) = sum_y p - 1, every V", lhs, _over_y(_P[_Y]) - 1)


def one_position_general() -> list[Claim]:
    """P(emit x) = p(x) for every V, with the residual's normaliser derived.

    P(emit x) = min(p(x), q(x)) + P(reject) (p(x) - q(x))_+ / R, where P(reject) = 1 - alpha
    and R = sum_y (p_y - q_y)_+ is the normaliser. :func:`residual_mass_general` gives
    R = (1 - alpha) + (S - 1) with S = sum_y p_y; here R is written that way and S = 1 (p
    is a distribution) is the only assumption. Both cases of lemma 1 (alpha < 1).
    """
    px = sp.Symbol("p_x", nonnegative=True)
    alpha = sp.Symbol("alpha", nonnegative=True)
    S = sp.Symbol("S", positive=True)                   # sum_y p_y
    d = sp.Symbol("d", nonnegative=True)
    e = sp.Symbol("e", positive=True)
    normaliser = (1 - alpha) + (S - 1)                  # R, by residual_mass_general

    def emitted(qx):
        resample = (1 - alpha) * _positive_part(px - qx) / normaliser
        return (sp.Min(px, qx) + resample).subs(S, 1)

    return [
        Claim("P(emit x) = p(x) when p(x) >= q(x), R from lemma 2", emitted(px - d), px),
        Claim("P(emit x) = p(x) when p(x) < q(x), R from lemma 2", emitted(px + e), px),
    ]


def alpha_one_case() -> list[Claim]:
    """alpha = 1: nothing is ever rejected, and P(emit x) = min(p(x), q(x)) = p(x).

    By :func:`residual_mass_general`, sum_y (p_y - q_y)_+ = S - alpha = 0 when S = 1 and
    alpha = 1; each term is non-negative (claim 2: (a)_+ = |(a)_+|), so each is 0, and
    claim 1 (lemma 1 rearranged) turns min(p(x), q(x)) into p(x) - 0. The residual's
    normaliser is never divided by, because P(reject) = 1 - alpha = 0.
    """
    a = sp.Symbol("a", real=True)
    b = sp.Symbol("b", real=True)
    total = (_over_y(_positive_part(_P[_Y] - _Q[_Y])) + _over_y(sp.Min(_P[_Y], _Q[_Y]))
             - _over_y(_P[_Y]))                          # = sum (p-q)+ - (S - alpha), = 0
    return [
        Claim("min(a, b) = a - (a - b)+", sp.Min(a, b), a - _positive_part(a - b)),
        Claim("(a)+ = |(a)+| (non-negative)", sp.Abs(_positive_part(a)), _positive_part(a)),
        Claim("sum (p-q)+ = S - alpha, every V", total, 0),
    ]


# Leviathan et al.'s lenience l in (0, 1] (Appendix A.5): accept x with min(1, p/(l q)),
# resample from norm((p - l q)_+).

LENIENCE = sp.Symbol("l", positive=True)


def lenient_min_scaling() -> list[Claim]:
    """l min(q, p / l) = min(l q, p) for l > 0, in both cases (so the lenient acceptance
    rate beta = sum min(q, p/l) has l beta = sum min(p, l q))."""
    p = sp.Symbol("p", nonnegative=True)
    d = sp.Symbol("d", nonnegative=True)
    e = sp.Symbol("e", positive=True)
    l = LENIENCE
    claims = []
    for case, q in (("l q <= p", (p - d) / l), ("l q > p", (p + e) / l)):
        claims.append(Claim(f"l min(q, p/l) = min(l q, p) when {case}", l * sp.Min(q, p / l), sp.Min(l * q, p)))
    return claims


def lenient_residual_mass_general() -> Claim:
    """For every V: sum_y (p_y - l q_y)_+ = S - l beta, beta = sum_y min(q_y, p_y / l).

    Lemma 2 with w = l q in place of q (min(p, l q) = l min(q, p/l) by
    :func:`lenient_min_scaling`; lemma 1 holds for any real w, so w_y stands for l q_y);
    with S = 1 the lenient residual's normaliser is 1 - l beta.
    """
    lq = sp.IndexedBase("w", nonnegative=True)[_Y]     # w_y = l q_y
    lhs = _over_y(_positive_part(_P[_Y] - lq)) + _over_y(sp.Min(_P[_Y], lq))
    return Claim("sum_y (p - w)+ + sum_y min(p, w) = sum_y p, w = l q, every V", lhs, _over_y(_P[_Y]))


def lenient_one_position_by_region(V: int = 3) -> list[tuple[tuple[bool, ...], list[Claim]]]:
    """The lenient one-position law, region by region, for symbolic p, q, l on V tokens.

    A region fixes, for each token, whether p(y) >= l q(y). Inside it the acceptance is
    min(q, p/l) (q where p >= l q, p/l elsewhere) and the residual (p - l q)_+ is plain.
    Claims: the residual's normaliser is 1 - l beta; the law
    r(y) = min(q, p/l) + (1 - beta) (p - l q)_+ / (1 - l beta) sums to 1; and at l = 1 it
    is p (the exact rule). The region with every p < l q is empty (sum p = 1 > l sum q
    would fail). Returns ``[(region, claims), ...]``.
    """
    if V < 2:
        raise ValueError(f"`V` must be >= 2, got {V}")
    p = _distribution("p", V)
    q = _distribution("q", V)
    l = LENIENCE
    out = []
    for region in itertools.product((True, False), repeat=V):
        if not any(region):
            continue
        kept = [qy if ge else py / l for py, qy, ge in zip(p, q, region)]
        residual = [py - l * qy if ge else sp.Integer(0) for py, qy, ge in zip(p, q, region)]
        beta = sp.Add(*kept)
        total = sp.Add(*residual)
        law = [k + (1 - beta) * r / (1 - l * beta) for k, r in zip(kept, residual)]
        claims = [Claim("normaliser = 1 - l beta", total, 1 - l * beta)]
        if not all(region):         # all p >= l q allows 1 - l beta = 0 (l = 1, p = q): no division then
            claims.append(Claim("sum_y r(y) = 1", sp.Add(*law), sp.Integer(1)))
            claims += [Claim(f"x{i + 1}: r = p at l = 1", r.subs(l, 1), py) for i, (r, py) in enumerate(zip(law, p))]
        out.append((region, claims))
    return out


# Several positions: exact distribution of one speculative step on a toy model.


def toy_tables(V: int = 3, gamma: int = 2, seed: int = 0):
    """Fixed toy conditional tables for a target p and a draft q, in exact rationals.

    Returns ``(p, q)``: dicts mapping a prefix (tuple of tokens, length 0..gamma for p,
    0..gamma-1 for q) to a list of V Fractions-as-sympy-Rationals summing to 1. The
    entries are small integers normalised, drawn from a seeded generator so the tables
    are arbitrary but fixed; every entry is positive.
    """
    rng = random.Random(seed)

    def row():
        w = [rng.randint(1, 9) for _ in range(V)]
        return [sp.Rational(x, sum(w)) for x in w]

    p = {pre: row() for n in range(gamma + 1) for pre in itertools.product(range(V), repeat=n)}
    q = {pre: row() for n in range(gamma) for pre in itertools.product(range(V), repeat=n)}
    return p, q


def _path_probability(p, seq: tuple[int, ...], start: int = 0) -> sp.Expr:
    """prod_{i >= start} p(seq_i | seq_<i): the target producing seq[start:] after seq[:start]."""
    return sp.Mul(*[p[seq[:i]][seq[i]] for i in range(start, len(seq))])


def autoregressive_distribution(p, V: int, length: int) -> dict[tuple[int, ...], sp.Expr]:
    """P(x_1..x_length) = prod_i p(x_i | x_<i), the target sampling on its own."""
    return {seq: _path_probability(p, seq) for seq in itertools.product(range(V), repeat=length)}


def speculative_step_distribution(p, q, V: int, gamma: int, accept=None) -> dict[tuple[int, ...], sp.Expr]:
    """Exact distribution of γ+1 tokens: one speculative step, then the target itself.

    The step emits 1..γ+1 tokens; to compare with sampling γ+1 tokens from the target,
    the shorter outputs are continued by the target sampling on its own (which is what
    the next steps amount to, in distribution). Enumerates every draft, accept/reject
    outcome and resample in exact rational arithmetic.

    ``accept(p_x, q_x)`` is the probability of keeping a draft x; the default is
    speculative sampling's min(1, p(x)/q(x)). Passing another rule (say, always 1)
    shows what goes wrong without it.
    """
    if accept is None:
        def accept(px, qx):
            return sp.Min(1, px / qx)

    out: dict[tuple[int, ...], sp.Expr] = {
        seq: sp.Integer(0) for seq in itertools.product(range(V), repeat=gamma + 1)
    }

    def walk(prefix, prob, i):
        if i == gamma:                                   # all accepted: bonus from p_{γ+1}
            for y in range(V):
                add(prefix + (y,), prob * p[prefix][y])
            return
        pi, qi = p[prefix], q[prefix]
        residual = [sp.Max(a - b, 0) for a, b in zip(pi, qi)]
        total = sp.Add(*residual)
        for x in range(V):
            keep = accept(pi[x], qi[x])
            walk(prefix + (x,), prob * qi[x] * keep, i + 1)          # draft x, accepted
            reject = prob * qi[x] * (1 - keep)
            if reject != 0:
                for y in range(V):                                    # rejected: resample
                    add(prefix + (y,), reject * residual[y] / total)

    def add(emitted, prob):
        # the step emitted `emitted`; the target itself continues to γ+1 tokens
        for tail in itertools.product(range(V), repeat=gamma + 1 - len(emitted)):
            seq = emitted + tail
            out[seq] += prob * _path_probability(p, seq, len(emitted))

    walk((), sp.Integer(1), 0)
    return out


def speculative_step_exact(V: int = 3, gamma: int = 2, seed: int = 0, accept=None) -> Claim:
    """One speculative step (then the target) has exactly the target's distribution."""
    p, q = toy_tables(V, gamma, seed)
    spec = speculative_step_distribution(p, q, V, gamma, accept)
    auto = autoregressive_distribution(p, V, gamma + 1)
    keys = sorted(auto)
    return Claim(
        f"speculative step = target, V={V}, gamma={gamma}",
        sp.Matrix([spec[k] for k in keys]),
        sp.Matrix([auto[k] for k in keys]),
    )


def naive_match_rule(V: int = 3) -> list[Claim]:
    """'Accept the draft if the target's own sample equals it' vs rejection sampling.

    Draft x ~ q and target sample y ~ p, independent: the naive rule accepts with
    probability sum_x p(x) q(x), which is sum p^2 < 1 when q = p (unless p is one-hot):
    1 - sum p^2 = sum_{x != y} p(x) p(y). Rejection sampling with q = p accepts with
    sum min(p, p) = 1.
    """
    p = _distribution("p", V)
    q = _distribution("q", V)
    x = list(range(V))
    del q                                                      # the claims take q = p
    # P(y = x) for independent draws x ~ q, y ~ p is sum_x q(x) p(x); with q = p:
    naive_self = _held(*[sp.Mul(pi, pi, evaluate=False) for pi in p])
    squares = sp.Add(*[pi**2 for pi in p])
    off_diagonal = sp.Add(*[p[i] * p[j] for i in x for j in x if i != j])
    return [
        Claim("naive acceptance with q = p", naive_self, squares),
        Claim("1 - sum p^2", 1 - squares, off_diagonal),
        Claim("rejection sampling with q = p", _held(*[sp.Min(pi, pi, evaluate=False) for pi in p]),
              sp.Integer(1)),
    ]


ALPHA = sp.Symbol("alpha", positive=True)
GAMMA = sp.Symbol("gamma", positive=True, integer=True)


def expected_tokens_sum() -> list[Claim]:
    """E[tokens per step] = sum_{k=0}^{γ} α^k = (1 - α^{γ+1}) / (1 - α).

    With i.i.d. acceptances of probability α, P(at least k drafts accepted) = α^k for
    k <= γ; tokens emitted = accepted + 1, and E[accepted + 1] = sum_{k=0}^{γ}
    P(accepted >= k). Also checked against the explicit distribution
    P(emit k + 1) = α^k (1 - α) for k < γ and α^γ for k = γ, for γ = 1..6.
    """
    k = sp.Symbol("k", integer=True, nonnegative=True)
    closed = (1 - ALPHA ** (GAMMA + 1)) / (1 - ALPHA)
    with_limit = sp.Piecewise((GAMMA + 1, sp.Eq(ALPHA, 1)), (closed, True))
    claims = [Claim("sum_{k=0}^{gamma} alpha^k", sp.Sum(ALPHA**k, (k, 0, GAMMA)), with_limit)]
    for g in range(1, 7):
        explicit = sp.Add(*[(j + 1) * ALPHA**j * (1 - ALPHA) for j in range(g)]) + (g + 1) * ALPHA**g
        claims.append(Claim(f"E[tokens], gamma={g}", explicit, closed.subs(GAMMA, g)))
    return claims


def expected_tokens_limit() -> Claim:
    """lim_{γ -> oo} (1 - α^{γ+1}) / (1 - α) = 1 / (1 - α) for 0 < α < 1."""
    a = sp.Symbol("alpha", positive=True)
    # 0 < alpha < 1 written as alpha = 1 / (1 + s), s > 0, so sympy knows alpha^gamma -> 0.
    s = sp.Symbol("s", positive=True)
    closed = ((1 - a ** (GAMMA + 1)) / (1 - a)).subs(a, 1 / (1 + s))
    return Claim("lim gamma->oo E[tokens]", sp.Limit(closed, GAMMA, sp.oo), (1 / (1 - a)).subs(a, 1 / (1 + s)))


def point_mass_draft(V: int = 3) -> list[Claim]:
    """A deterministic draft x̂ (q = one-hot): accepted with p(x̂); output still exactly p.

    P(emit x) = p(x̂) 1[x = x̂] + (1 - p(x̂)) p(x) 1[x != x̂] / (1 - p(x̂)) = p(x), which is
    the general formula with q = one-hot(x̂): min(p, q) = p(x̂) at x̂ and 0 elsewhere, and
    the residual (p - q)_+ is p with x̂ removed.
    """
    p = _distribution("p", V)
    hat = 0                       # the draft token x̂; q = one-hot(x̂)
    # Inside the simplex every p(x) <= 1, so min(p(x̂), 1) = p(x̂) and (p(x̂) - 1)_+ = 0.
    mins = [p[i] if i == hat else sp.Integer(0) for i in range(V)]
    residual = [sp.Integer(0) if i == hat else p[i] for i in range(V)]
    alpha = _held(*mins)
    total = _held(*residual)
    emitted = [_held(m, sp.Mul(1 - alpha, r, sp.Pow(total, -1), evaluate=False))
               for m, r in zip(mins, residual)]
    claims = [Claim("acceptance of x̂ = sum min(p, q)", alpha, p[hat])]
    claims += [Claim(f"P(emit x{i + 1})", e, p[i]) for i, e in enumerate(emitted)]
    return claims


# ---------------------------------------------------------------------------------------
# Chapter 5: temperature against acceptance, when the draft is the target itself


def self_draft_rejection(V: int = 3) -> Claim:
    """q = p = softmax(z / T): rejection sampling accepts with sum_x min(p_T, p_T) = 1, every T > 0."""
    p = softmax_with_temperature(_logits(V))
    return Claim("alpha(q = p) at temperature T", _held(*[sp.Min(px, px, evaluate=False) for px in p]),
                 sp.Integer(1))


def greedy_draft_slope(V: int = 3) -> Claim:
    """d p_T(x̂)/dT = -p_T(x̂) (z_x̂ - E_{p_T}[z]) / T^2 for the greedy draft x̂ = argmax z.

    z_x̂ is the largest logit, so z_x̂ >= E[z] and the slope is <= 0: the chance that a
    deterministic draft of the argmax is accepted, p_T(x̂), never rises with T.
    """
    z = _logits(V)
    p = softmax_with_temperature(z)
    mean = sp.Add(*[px * zx for px, zx in zip(p, z)])
    return Claim("d p_T(x1) / dT", sp.Derivative(p[0], T), -p[0] * (z[0] - mean) / T**2)


def self_match_limits(V: int = 3) -> list[Claim]:
    """The exact-match rule with q = p accepts sum_x p_T(x)^2: 1 as T -> 0+, 1/V as T -> oo."""
    z, _ = _ordered_logits(V)
    collision = sp.Add(*[px**2 for px in _stable_softmax(z)])
    return [Claim("lim T->0+ sum p_T^2", sp.Limit(collision, T, 0, "+"), sp.Integer(1)),
            Claim("lim T->oo sum p_T^2", sp.Limit(collision, T, sp.oo), sp.Rational(1, V))]


# ---------------------------------------------------------------------------------------
# Chapter 6: typical acceptance


def entropy_gap(V: int = 3) -> Claim:
    """H(p) + log max p = sum_x p(x) log(max p / p(x)), a sum of non-negative terms.

    So exp(-H) <= max p, and the threshold min(ε, δ exp(-H)) <= δ max p < max p for
    δ < 1: the target's most likely token always passes typical acceptance. (Token 1 is
    taken to be the most likely.)
    """
    p = _distribution("p", V)
    entropy = -sp.Add(*[px * sp.log(px) for px in p])
    lhs = _held(entropy, sp.log(p[0]))
    rhs = sp.Add(*[px * (sp.log(p[0]) - sp.log(px)) for px in p])
    return Claim("H + log p_max", lhs, rhs)


def typical_one_position(V: int = 3) -> list[tuple[tuple[bool, ...], list[Claim]]]:
    """The law of the token typical acceptance emits at one position, for every accepted set A.

    The process: draw x ~ q; if x ∈ A = {p > τ} emit x, else emit y ~ e. Enumerated
    case by case, P(emit y) must equal the closed form q(y) 1[y ∈ A] + (1 - q(A)) e(y)
    that :func:`typsamp.typical.output_distribution` computes. p, q, e symbolic.
    """
    q = _distribution("q", V)
    e = _distribution("e", V)
    out = []
    for A in itertools.product((False, True), repeat=V):
        # the process, one draft at a time
        process = [_held(*[sp.Mul(q[x], sp.Integer(int(x == y)) if A[x] else e[y], evaluate=False)
                           for x in range(V)]) for y in range(V)]
        q_A = sp.Add(*[q[x] for x in range(V) if A[x]])
        closed = [(q[y] if A[y] else 0) + (1 - q_A) * e[y] for y in range(V)]
        out.append((A, [Claim(f"A={A}: P(emit x{y + 1})", lhs, rhs)
                        for y, (lhs, rhs) in enumerate(zip(process, closed))]))
    return out


# ---------------------------------------------------------------------------------------
# Chapter 10: recursive rejection over a tree of deterministic candidates

#: The toy trees of :func:`tree_step_exact`: each maps a node (the tuple of tokens from the
#: root) to its children's tokens in candidate order; nodes not listed are leaves.
TOY_TREES = {
    "branching 2, V = 3": (3, {(): (0, 1), (0,): (1, 2), (1,): (0,)}),
    "branching 3, V = 3 (every token a child)": (3, {(): (2, 0, 1), (2,): (0, 1)}),
    "branching 3 then 2, V = 4": (4, {(): (1, 3, 0), (1,): (2, 0), (3,): (3,), (0,): (0, 1)}),
}


def tree_conditionals(V: int, depth: int) -> dict[tuple[int, ...], list[sp.Expr]]:
    """Symbolic target conditionals p(· | prefix) for every prefix of length 0..depth: a
    distribution of V - 1 free positive symbols (named after the prefix) and 1 - their sum."""
    out = {}
    for n in range(depth + 1):
        for prefix in itertools.product(range(V), repeat=n):
            tag = "".join(map(str, prefix)) or "r"
            free = list(sp.symbols(f"p{tag}_1:{V}", positive=True))
            out[prefix] = free + [1 - sp.Add(*free)]
    return out


def tree_step_distribution(p, children, V: int, depth: int, renormalise: bool = True
                           ) -> dict[tuple[int, ...], sp.Expr]:
    """Exact law of ``depth + 1`` tokens: one step of recursive rejection over the tree
    ``children`` (node -> its deterministic children's tokens), then the target itself.

    At node v the residual r starts as p(· | v); child c_j (in order) is kept with
    probability r(c_j) / Σ r (the walk descends into it), else r(c_j) is set to 0; when
    every child fails the token comes from r / Σ r; at a leaf it is the bonus token from
    p(· | v). Shorter outputs are continued by the target, as the next steps do in
    distribution. ``renormalise=False`` keeps c_j with p(c_j | v) instead of r(c_j) / Σ r:
    a wrong rule, to show that the claim can fail.
    """
    out = {seq: sp.Integer(0) for seq in itertools.product(range(V), repeat=depth + 1)}

    def add(emitted, prob):
        for tail in itertools.product(range(V), repeat=depth + 1 - len(emitted)):
            seq = emitted + tail
            out[seq] += prob * _path_probability(p, seq, len(emitted))

    def walk(node, prob):
        kids = children.get(node, ())
        if not kids:                                     # a leaf: the bonus token
            for y in range(V):
                add(node + (y,), prob * p[node][y])
            return
        residual = list(p[node])
        for c in kids:
            keep = residual[c] / sp.Add(*residual) if renormalise else p[node][c]
            walk(node + (c,), prob * keep)
            prob = prob * (1 - keep)
            residual[c] = sp.Integer(0)
        if prob != 0:                                    # every child rejected
            total = sp.Add(*residual)
            for y in range(V):
                add(node + (y,), prob * residual[y] / total)

    walk((), sp.Integer(1))
    return out


def tree_step_exact(name: str = "branching 2, V = 3", renormalise: bool = True) -> Claim:
    """Recursive rejection over a tree of deterministic children is exact: one step (then
    the target) has the target's law on the ``depth + 1`` tokens, for the symbolic
    conditionals of :func:`tree_conditionals` and the toy tree :data:`TOY_TREES` [name]."""
    V, children = TOY_TREES[name]
    depth = max(len(node) for node in children) + 1
    p = tree_conditionals(V, depth)
    step = tree_step_distribution(p, children, V, depth, renormalise)
    auto = autoregressive_distribution(p, V, depth + 1)
    keys = sorted(auto)
    return Claim(f"tree step = target, {name}", sp.Matrix([sp.together(step[k]) for k in keys]),
                 sp.Matrix([auto[k] for k in keys]))


def sibling_telescoping(k: int = 3) -> list[Claim]:
    """Why trying siblings in turn is exact at one node: child c_j is emitted with
    Π_{i<j} (1 - p_i / (1 - Σ_{l<i} p_l)) · p_j / (1 - Σ_{l<j} p_l) = p_j, since the
    product telescopes to 1 - Σ_{l<j} p_l (p_1..p_k the children's target probabilities,
    positive, summing below 1). The token left after all k fail has mass 1 - Σ p_l."""
    q = list(sp.symbols(f"c1:{k + 1}", positive=True))
    claims = []
    reach = sp.Integer(1)
    for j in range(k):
        mass = 1 - sp.Add(*q[:j])
        claims.append(Claim(f"P(keep child {j + 1})", sp.Mul(reach, q[j] / mass, evaluate=False), q[j]))
        reach = reach * (1 - q[j] / mass)
    claims.append(Claim("P(every child rejected)", reach, 1 - sp.Add(*q)))
    return claims
