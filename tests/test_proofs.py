"""The sympy claims behind chapter 1 hold, and a wrong claim is reported as wrong."""

import itertools

import pytest
import sympy as sp

from typsamp import proofs

CLAIM_FAMILIES = [proofs.shift_invariance, proofs.identity_at_one, proofs.greedy_limit, proofs.uniform_limit]


@pytest.mark.parametrize("V", [2, 3, 4])
@pytest.mark.parametrize("family", CLAIM_FAMILIES, ids=lambda f: f.__name__)
def test_temperature_claims_hold(family, V):
    claims = family(V)
    assert len(claims) == V
    for claim in claims:
        assert claim.holds(), str(claim)


@pytest.mark.parametrize("V", [2, 3])
def test_entropy_derivative_holds(V):
    assert proofs.entropy_derivative(V).holds()


def test_wrong_claims_fail():
    # The checks are not vacuous: perturbing each stated right-hand side breaks them.
    good = proofs.greedy_limit(3)[0]
    assert not proofs.Claim("wrong limit", good.lhs, sp.Rational(1, 2)).holds()
    d = proofs.entropy_derivative(3)
    assert not proofs.Claim("wrong power", d.lhs, d.rhs * proofs.T).holds()
    u = proofs.uniform_limit(4)[1]
    assert not proofs.Claim("wrong uniform", u.lhs, sp.Rational(1, 3)).holds()


def test_greedy_limit_picks_the_largest_logit_only():
    claims = proofs.greedy_limit(4)
    assert [c.rhs for c in claims] == [1, 0, 0, 0]


def test_claim_renders_as_latex():
    latex = proofs.greedy_limit(3)[0]._repr_latex_()
    assert latex.startswith("$") and "\\lim" in latex


@pytest.mark.parametrize("V", [0, 1])
def test_too_small_vocabulary_is_rejected(V):
    with pytest.raises(ValueError, match="V"):
        proofs.greedy_limit(V)


# ---------------------------------------------------------------------------------------
# Chapter 3: speculative sampling


def test_min_plus_positive_part_holds():
    claims = proofs.min_plus_positive_part()
    assert len(claims) == 2
    for claim in claims:
        assert claim.holds(), str(claim)


@pytest.mark.parametrize("V", [2, 3, 4])
def test_one_position_claims_hold(V):
    assert proofs.residual_mass(V).holds()
    for claim in proofs.one_position_exact() + proofs.naive_match_rule(V) + proofs.point_mass_draft(V):
        assert claim.holds(), str(claim)


@pytest.mark.parametrize("V", [2, 3, 4])
def test_one_position_by_region_holds(V):
    regions = proofs.one_position_by_region(V)
    # Every sign pattern of p - q except "all p < q" (impossible when both sum to 1).
    assert sorted(region for region, _ in regions) == sorted(
        r for r in itertools.product((True, False), repeat=V) if any(r))
    for region, claims in regions:
        assert len(claims) == (V + 2 if all(region) else V)  # p = q region: two extra claims
        for claim in claims:
            assert claim.holds(), f"{region}: {claim}"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("V, gamma", [(3, 2), (2, 3), (4, 2)])
def test_speculative_step_exact_holds(V, gamma, seed):
    claim = proofs.speculative_step_exact(V, gamma, seed)
    assert claim.lhs.shape == (V ** (gamma + 1), 1)
    assert sp.simplify(sum(claim.lhs)) == 1          # a distribution over the V^(γ+1) sequences
    assert claim.holds()


def test_toy_tables_are_fixed_distinct_distributions():
    p, q = proofs.toy_tables(3, 2, seed=0)
    assert len(p) == 1 + 3 + 9 and len(q) == 1 + 3
    for row in [*p.values(), *q.values()]:
        assert sum(row) == 1 and all(x > 0 for x in row)
    assert proofs.toy_tables(3, 2, seed=0) == (p, q)
    assert proofs.toy_tables(3, 2, seed=1)[0] != p


def test_expected_tokens_claims_hold():
    claims = proofs.expected_tokens_sum()
    assert len(claims) == 7
    for claim in claims:
        assert claim.holds(), str(claim)
    assert proofs.expected_tokens_limit().holds()


@pytest.mark.parametrize("accept", [
    lambda p, q: 1,                                  # keep every draft: the output is q, not p
    lambda p, q: p,                                  # keep with probability p(x)
    lambda p, q: sp.Min(1, q / p),                   # the ratio upside down
], ids=["always", "p", "q/p"])
def test_speculative_step_with_a_wrong_acceptance_rule_fails(accept):
    claim = proofs.speculative_step_exact(3, 2, seed=0, accept=accept)
    assert sp.simplify(sum(claim.lhs)) == 1          # still a distribution, just the wrong one
    assert not claim.holds()


def test_wrong_chapter3_claims_fail():
    # Perturbed right-hand sides: the checks are not vacuous.
    residual = proofs.residual_mass(3)
    assert not proofs.Claim("residual = alpha", residual.lhs, 1 - residual.rhs).holds()
    step = proofs.speculative_step_exact(3, 2, seed=0)
    nudged = step.rhs.copy()
    nudged[0], nudged[1] = nudged[0] + sp.Rational(1, 1000), nudged[1] - sp.Rational(1, 1000)
    assert not proofs.Claim("nudged target", step.lhs, nudged).holds()
    closed = proofs.expected_tokens_sum()[3]                  # gamma = 3
    wrong = (1 - proofs.ALPHA**3) / (1 - proofs.ALPHA)        # off by one in the exponent
    assert not proofs.Claim("wrong closed form", closed.lhs, wrong).holds()
    limit = proofs.expected_tokens_limit()
    assert not proofs.Claim("wrong limit", limit.lhs, limit.rhs**2).holds()
    point = proofs.point_mass_draft(3)[0]                     # acceptance of x̂ is p(x̂), not 1
    assert not proofs.Claim("point mass always kept", point.lhs, sp.Integer(1)).holds()
    for claim in proofs.one_position_by_region(3)[1][1]:
        assert not proofs.Claim("region, doubled", claim.lhs, 2 * claim.rhs).holds()


def test_resampling_from_p_instead_of_the_residual_is_wrong():
    """The same one-position formula with r = p instead of (p - q)_+ is false: symbolically
    in the region p1 >= q1, p2 < q2 (V = 2), and at a concrete point of it."""
    p1, q1 = sp.symbols("p1 q1", positive=True)
    p, q = [p1, 1 - p1], [q1, 1 - q1]
    mins = [q1, 1 - p1]                                       # the region p1 >= q1
    alpha = sum(mins)

    def emitted(residual):
        return [m + (1 - alpha) * r / sum(residual) for m, r in zip(mins, residual)]

    right = emitted([p1 - q1, sp.Integer(0)])
    wrong = emitted(p)
    for x in range(2):
        assert proofs.Claim("residual (p-q)+", right[x], p[x]).holds()
        assert not proofs.Claim("residual p", wrong[x], p[x]).holds()
    point = {p1: sp.Rational(3, 5), q1: sp.Rational(1, 5)}
    assert [e.subs(point) for e in right] == [sp.Rational(3, 5), sp.Rational(2, 5)]
    assert wrong[0].subs(point) != sp.Rational(3, 5)


def test_chapter3_claims_render_as_latex():
    assert proofs.speculative_step_exact(2, 1)._repr_latex_().startswith("$")
    assert "\\sum" in proofs.expected_tokens_sum()[0]._repr_latex_()


# ---------------------------------------------------------------------------------------
# Chapters 5 and 6: temperature against acceptance, typical acceptance


@pytest.mark.parametrize("V", [2, 3, 4])
def test_chapter5_claims_hold(V):
    assert proofs.self_draft_rejection(V).holds()
    assert proofs.greedy_draft_slope(V).holds()
    limits = proofs.self_match_limits(V)
    assert len(limits) == 2 and [c.rhs for c in limits] == [1, sp.Rational(1, V)]
    for claim in limits:
        assert claim.holds(), str(claim)


@pytest.mark.parametrize("V", [2, 3, 4])
def test_chapter6_claims_hold(V):
    assert proofs.entropy_gap(V).holds()
    cases = proofs.typical_one_position(V)
    # Every accepted set A, the empty one and the whole vocabulary included, V claims each.
    assert sorted(A for A, _ in cases) == sorted(itertools.product((False, True), repeat=V))
    for A, claims in cases:
        assert len(claims) == V
        for claim in claims:
            assert claim.holds(), f"{A}: {claim}"
        assert sp.simplify(sum(c.rhs for c in claims)) == 1            # the law sums to 1


def test_wrong_chapter5_claims_fail():
    rejection = proofs.self_draft_rejection(3)
    p = proofs.softmax_with_temperature(proofs._logits(3))
    collision = sum(px**2 for px in p)                                   # the exact-match rule's rate
    assert not proofs.Claim("self draft accepted with sum p^2", rejection.lhs, collision).holds()
    slope = proofs.greedy_draft_slope(3)
    assert not proofs.Claim("slope, wrong sign", slope.lhs, -slope.rhs).holds()
    assert not proofs.Claim("slope, T^3", slope.lhs, slope.rhs / proofs.T).holds()
    z1 = proofs._logits(3)[0]
    assert not proofs.Claim("slope without the mean", slope.lhs, -p[0] * z1 / proofs.T**2).holds()
    cold, hot = proofs.self_match_limits(3)
    assert not proofs.Claim("limit 2/V", hot.lhs, sp.Rational(2, 3)).holds()
    assert not proofs.Claim("cold limit 1/V", cold.lhs, sp.Rational(1, 3)).holds()
    assert not proofs.Claim("hot limit 1", hot.lhs, sp.Integer(1)).holds()


def test_wrong_chapter6_claims_fail():
    gap = proofs.entropy_gap(3)
    terms = sp.Add.make_args(gap.rhs)
    assert len(terms) == 2                        # p1's own term, p1 log(p1 / p1), is 0
    assert not proofs.Claim("entropy gap, a term dropped", gap.lhs, terms[0]).holds()
    assert not proofs.Claim("entropy gap, sign", gap.lhs, -gap.rhs).holds()
    for A, claims in proofs.typical_one_position(3):
        q = [sp.Symbol(f"q{i}", positive=True) for i in (1, 2)]
        q.append(1 - q[0] - q[1])
        e = [sp.Symbol(f"e{i}", positive=True) for i in (1, 2)]
        e.append(1 - e[0] - e[1])
        q_A = sum(q[x] for x in range(3) if A[x])
        for y, claim in enumerate(claims):
            kept = q[y] if A[y] else 0
            no_factor = kept + e[y]                                    # (1 - q(A)) dropped
            no_kept = (1 - q_A) * e[y]                                 # q(y) 1[y in A] dropped
            p_for_e = kept + (1 - q_A) * q[y]                          # extra token from q, not e
            if any(A):
                assert not proofs.Claim("no (1 - q(A))", claim.lhs, no_factor).holds(), (A, y)
                if A[y]:
                    assert not proofs.Claim("no kept term", claim.lhs, no_kept).holds(), (A, y)
            else:
                assert proofs.Claim("A empty: (1 - q(A)) = 1", claim.lhs, no_factor).holds()
            if not all(A):
                assert not proofs.Claim("extra from q", claim.lhs, p_for_e).holds(), (A, y)


# ---------------------------------------------------------------------------------------
# Chapter 3, issue 11: the residual's normaliser for every V, the alpha = 1 case, V = 2..6


@pytest.mark.parametrize("V", [5, 6])
def test_lemma_2_and_the_regions_hold_up_to_six_tokens(V):
    assert proofs.residual_mass(V).holds()
    for region, claims in proofs.one_position_by_region(V):
        for claim in claims:
            assert claim.holds(), f"{region}: {claim}"


def test_residual_normaliser_for_every_vocabulary_size():
    claim = proofs.residual_mass_general()
    assert claim.lhs.has(sp.Sum) and claim.lhs.free_symbols >= {sp.Symbol("V", integer=True, positive=True)}
    assert claim.holds()
    # Not vacuous: the normaliser is not 1 (it is 1 - alpha), nor alpha.
    alpha = sp.Sum(sp.Min(proofs._P[proofs._Y], proofs._Q[proofs._Y]), (proofs._Y, 1, proofs._V))
    assert not proofs.Claim("normaliser = 1", claim.lhs - alpha, claim.rhs).holds()
    assert not proofs.Claim("normaliser = alpha", claim.lhs + 1 - 2 * alpha, claim.rhs).holds()


def test_one_position_with_the_normaliser_derived():
    claims = proofs.one_position_general()
    assert len(claims) == 2
    for claim in claims:
        assert claim.holds(), str(claim)
        assert not claim.lhs.has(sp.Symbol("S", positive=True))     # S = sum p = 1 substituted
        assert not proofs.Claim("normaliser 1", claim.lhs.subs(sp.Symbol("alpha", nonnegative=True), 0),
                                claim.rhs + 1).holds()


def test_alpha_one_case():
    claims = proofs.alpha_one_case()
    assert len(claims) == 3
    for claim in claims:
        assert claim.holds(), str(claim)
    a, b = sp.Symbol("a", real=True), sp.Symbol("b", real=True)
    assert not proofs.Claim("min = a + (a-b)+", sp.Min(a, b), a + sp.Max(a - b, 0)).holds()
    assert not proofs.Claim("(a)+ = |a|", sp.Abs(sp.Max(a, 0)), sp.Abs(a)).holds()


def test_lenient_claims_hold_and_are_not_vacuous():
    for claim in proofs.lenient_min_scaling() + [proofs.lenient_residual_mass_general()]:
        assert claim.holds(), str(claim)
    scaling = proofs.lenient_min_scaling()[0]
    assert not proofs.Claim("l min(q, p/l) = min(q, p)", scaling.lhs, scaling.rhs / proofs.LENIENCE).holds()
    for V in (2, 3):
        regions = proofs.lenient_one_position_by_region(V)
        assert len(regions) == 2 ** V - 1
        for region, claims in regions:
            for claim in claims:
                assert claim.holds(), f"{region}: {claim}"
            assert claims[0].name == "normaliser = 1 - l beta"
            assert not proofs.Claim("normaliser = 1 - beta", claims[0].lhs,
                                    claims[0].rhs.subs(proofs.LENIENCE, 1)).holds()
            if not all(region):
                assert [c.name for c in claims[1:]] == ["sum_y r(y) = 1"] + [f"x{i + 1}: r = p at l = 1"
                                                                             for i in range(V)]
    with pytest.raises(ValueError, match="V"):
        proofs.lenient_one_position_by_region(1)


# --- chapter 10: recursive rejection over a tree -------------------------------------------


@pytest.mark.parametrize("name", sorted(proofs.TOY_TREES))
def test_recursive_rejection_on_a_tree_is_exact(name):
    V, children = proofs.TOY_TREES[name]
    claim = proofs.tree_step_exact(name)
    depth = max(len(node) for node in children) + 1
    assert depth == 2 and max(len(kids) for kids in children.values()) in (2, 3)
    assert claim.lhs.shape == (V ** (depth + 1), 1)
    assert sp.simplify(sum(claim.lhs)) == 1            # a distribution over the V^(D+1) sequences
    assert claim.lhs.free_symbols                       # symbolic conditionals, not numbers
    assert claim.holds()


@pytest.mark.parametrize("name", sorted(proofs.TOY_TREES))
def test_trying_children_without_renormalising_is_not_exact(name):
    claim = proofs.tree_step_exact(name, renormalise=False)
    assert not claim.holds()


def test_sibling_telescoping_holds_and_a_wrong_mass_fails():
    claims = proofs.sibling_telescoping(3)
    assert len(claims) == 4 and all(c.holds() for c in claims)
    last = claims[-1]
    assert not proofs.Claim("wrong leftover", last.lhs, last.rhs + sp.Rational(1, 10)).holds()


def test_tree_conditionals_are_distributions():
    p = proofs.tree_conditionals(3, 2)
    assert len(p) == 1 + 3 + 9 and all(sp.simplify(sum(row)) == 1 for row in p.values())
    symbols = set().union(*(x.free_symbols for row in p.values() for x in row))
    assert len(symbols) == 13 * 2                       # V - 1 free entries per prefix, none shared
