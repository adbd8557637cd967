"""The sympy claims behind chapter 1 hold, and a wrong claim is reported as wrong."""

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
