"""Tests for :mod:`typsamp.speculative`: verification of draft tokens, and the theory.

The central claim is distributional: one verification step emits tokens distributed
exactly as the target sampling them itself. It is checked by Monte Carlo, with the
n samples in the batch dimension (verify is batched), against probabilities computed
exactly in the test:

* the whole :class:`Verdict` (accepted count, accepted drafts, extra token) against its
  closed form: P(accept x_1..x_n, then emit y) = prod_i min(p_i, q_i)(x_i) * r_{n+1}(y)
  with r = (p - q)_+ after a rejection and r = p_{gamma+1} for the bonus;
* the token at every position a row reaches, against p at that position;
* one step on context-dependent toy tables, continued by the target, against the
  target's own distribution of gamma + 1 tokens (the theorem itself).

Every statistical check is deterministic (fixed seeds, hypothesis derandomised) and
rejects at a per-check level ALPHA obtained by Bonferroni from a family-wise level over
the whole file; a module fixture asserts that the file stays within its check budget.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from laws import chi_square_pvalue, encode, fit_pvalue, verdict_law, with_value as _with
from typsamp import checks, proofs, speculative, stats
from typsamp.speculative import Verdict, verify, verify_reference

F64 = torch.float64
PROPERTY = settings(deadline=None, max_examples=25, derandomize=True)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# ---------------------------------------------------------------------------------------
# Statistics
#
# Each check (a chi-square goodness of fit, or a mean within a normal tolerance) has a
# false-alarm probability ALPHA. The file runs at most MAX_CHECKS of them, so by
# Bonferroni the chance that correct code fails anywhere in this file, for a random
# choice of seeds, is at most FAMILY_ALPHA. Z is the matching two-sided normal quantile
# (about 5.2 standard errors) used for means.

FAMILY_ALPHA = 1e-4
MAX_CHECKS = 600
ALPHA = FAMILY_ALPHA / MAX_CHECKS
Z = torch.special.ndtri(torch.tensor(1 - ALPHA / 2, dtype=F64)).item()
N = 100_000  # draws per statistical check unless a test says otherwise
CHECKS = {"count": 0}


@pytest.fixture(autouse=True, scope="module")
def bonferroni_budget(request):
    yield
    if request.session.testsfailed:
        return  # a failure was found (hypothesis may then shrink, running extra checks)
    assert CHECKS["count"] <= MAX_CHECKS, (
        f"{CHECKS['count']} statistical checks ran but ALPHA was set for {MAX_CHECKS}: raise MAX_CHECKS"
    )



def toy_tensors(V: int, gamma: int, seed: int):
    """``proofs.toy_tables`` as float64 tensors: P[i] [V]*i + [V] holds p(. | prefix of length i), Q likewise."""
    p_table, q_table = proofs.toy_tables(V, gamma, seed)

    def tensor(table, length):
        t = torch.empty([V] * length + [V], dtype=F64)
        for prefix in itertools.product(range(V), repeat=length):
            t[prefix] = torch.tensor([float(r) for r in table[prefix]], dtype=F64)
        return t

    return [tensor(p_table, i) for i in range(gamma + 1)], [tensor(q_table, i) for i in range(gamma)]


def assert_fits(counts: torch.Tensor, probs: torch.Tensor, what: str = "") -> None:
    """Counts follow probs: never a draw where probs is 0, and chi-square p > ALPHA."""
    CHECKS["count"] += 1
    pvalue = fit_pvalue(counts, probs, what)
    assert pvalue > ALPHA, f"{what}: chi-square p-value {pvalue:.3g} <= {ALPHA:.3g}"


def assert_same_distribution(first: torch.Tensor, second: torch.Tensor, what: str = "") -> None:
    """Two samples of codes come from one distribution: chi-square test of homogeneity
    (:func:`typsamp.stats.chi_square_two_sample`, the library's one pooling rule)."""
    CHECKS["count"] += 1
    size = int(max(first.max(), second.max())) + 1
    pvalue = stats.chi_square_two_sample(torch.bincount(first, minlength=size),
                                         torch.bincount(second, minlength=size)).p_value
    assert pvalue > ALPHA, f"{what}: homogeneity p-value {pvalue:.3g} <= {ALPHA:.3g}"


def assert_mean(values: torch.Tensor, mean: float, sd: float, what: str = "") -> None:
    """The sample mean of n draws lies within Z standard errors sd / sqrt(n) of ``mean``."""
    CHECKS["count"] += 1
    n = values.numel()
    observed = values.double().mean().item()
    tolerance = Z * sd / math.sqrt(n) + 1e-12
    assert abs(observed - mean) < tolerance, f"{what}: mean {observed:.6g}, expected {mean:.6g} +- {tolerance:.3g}"


# ---------------------------------------------------------------------------------------
# Exact distributions, computed independently of the library


def exact_verdict_probs(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor | None = None) -> torch.Tensor:
    """The exact distribution of one row's :class:`Verdict`, indexed by :func:`encode`.

    ``p`` [γ+1, V] and ``q`` [γ, V] are one row's target and draft distributions; each row
    is first divided by its sum (16-bit rows sum to 1 only within rounding, and the rule
    follows the normalised target): the draft x_i is drawn from q_i, kept with probability
    min(1, p_i(x_i) / q_i(x_i)) (1 where q_i(x_i) = 0 < p_i(x_i)), and after a rejection a
    token is drawn from (p_i - q_i)_+ normalised (p_i where that is all zero); the bonus is
    drawn from p_{γ+1}. With ``drafts`` [γ] given, the drafts are fixed instead of drawn
    (the distribution is conditional on them).
    """
    p, q = p.double(), q.double()
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    gamma, V = q.shape
    ratio = torch.where(q > 0, (p[:gamma] / q).clamp(max=1), (p[:gamma] > 0).double())
    if drafts is None:
        keep = q / q.sum(-1, keepdim=True) * ratio            # P(draft x and keep it) [γ, V]
    else:
        keep = torch.zeros(gamma, V, dtype=F64).scatter(1, drafts[:, None], ratio.gather(1, drafts[:, None]))
    residual = (p[:gamma] - q).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:gamma])
    reject = (1 - keep.sum(-1, keepdim=True)).clamp(min=0)
    extra = torch.cat([reject * residual / residual.sum(-1, keepdim=True), (p[gamma] / p[gamma].sum())[None]])
    return verdict_law(keep, extra, V)


def accepted_probs(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P(accepted = n), n = 0..γ, for normalised p, q: prod_{i<n} α_i * (1 - α_{n+1})."""
    alpha = torch.minimum(p[:-1].double(), q.double()).sum(-1)
    reach = torch.cat([torch.ones(1, dtype=F64), alpha.cumprod(0)])    # P(accepted >= n)
    return reach - torch.cat([reach[1:], torch.zeros(1, dtype=F64)])


def random_probs(shape, generator, zeros: float = 0.0, dtype=F64) -> torch.Tensor:
    """Random distributions over the last dim; a fraction ``zeros`` of entries set to 0."""
    w = torch.rand(shape, generator=generator, dtype=F64) ** 3
    if zeros:
        w = w * (torch.rand(shape, generator=generator, dtype=F64) >= zeros)
        w.view(-1, shape[-1])[:, 0] += (w.view(-1, shape[-1]).sum(-1) == 0).double()  # no empty row
    return (w / w.sum(-1, keepdim=True)).to(dtype)


def draw_drafts(q: torch.Tensor, n: int, generator) -> torch.Tensor:
    """n rows of drafts, x_i ~ q_i: q is one row [γ, V] or a batch [n, γ, V]."""
    if q.dim() == 2:
        q = q.expand(n, *q.shape)
    V = q.shape[-1]
    return torch.multinomial(q.reshape(-1, V).double(), 1, generator=generator).view(n, -1)


def run(p, q, n, seed, dtype=torch.float32, fn=verify, **kwargs):
    """Draw n rows of drafts from q (one row's [γ, V]) and verify them against p [γ+1, V]."""
    gen = torch.Generator().manual_seed(seed)
    drafts = draw_drafts(q, n, gen)
    return drafts, fn(drafts, q.to(dtype).expand(n, *q.shape), p.to(dtype).expand(n, *p.shape), gen, **kwargs)


def check_layout(verdict: Verdict, drafts: torch.Tensor, V: int) -> None:
    """Accepted drafts, then one token in [0, V), then -1; accepted in 0..γ; int64."""
    B, gamma = drafts.shape
    tokens, accepted = verdict.tokens, verdict.accepted
    assert tokens.shape == (B, gamma + 1) and accepted.shape == (B,)
    assert tokens.dtype == torch.int64 and accepted.dtype == torch.int64
    assert ((accepted >= 0) & (accepted <= gamma)).all()
    assert torch.equal(verdict.emitted, accepted + 1)
    position = torch.arange(gamma + 1, device=tokens.device)
    n = accepted[:, None]
    padded = torch.cat([drafts, drafts.new_full((B, 1), -1)], 1)
    assert torch.equal(torch.where(position < n, tokens, -1), torch.where(position < n, padded, -1))
    extra = tokens.gather(1, n).squeeze(1)
    assert ((extra >= 0) & (extra < V)).all()
    assert (tokens[position > n] == -1).all()


def check_reached_positions(verdict: Verdict, p: torch.Tensor, what: str = "", positions=None) -> None:
    """Rows that reach position j (the first j drafts accepted) emit a token ~ p_j there."""
    V = p.shape[-1]
    for j in positions if positions is not None else range(p.shape[0]):
        reached = verdict.accepted >= j
        counts = torch.bincount(verdict.tokens[reached, j].cpu(), minlength=V)
        assert_fits(counts, p[j], f"{what} position {j}")


# ---------------------------------------------------------------------------------------
# The test machinery itself


def test_exact_oracle_matches_the_closed_form():
    """The oracle equals prod min(p_i, q_i)(x_i) * (p - q)_+(y), written out by hand."""
    gen = torch.Generator().manual_seed(1)
    V, gamma = 3, 2
    p, q = random_probs((gamma + 1, V), gen, zeros=0.2), random_probs((gamma, V), gen, zeros=0.2)
    oracle = exact_verdict_probs(p, q)
    by_hand = torch.zeros_like(oracle)
    m, r = torch.minimum(p[:gamma], q), (p[:gamma] - q).clamp(min=0)
    for n in range(gamma + 1):
        for seq in itertools.product(range(V), repeat=n + 1):
            prob = math.prod(m[i, x].item() for i, x in enumerate(seq[:-1]))
            prob *= (r[n] if n < gamma else p[gamma])[seq[-1]].item()
            by_hand[sum((x + 1) * (V + 1) ** j for j, x in enumerate(seq))] += prob
    torch.testing.assert_close(oracle, by_hand, rtol=1e-12, atol=1e-15)
    assert abs(oracle.sum().item() - 1) < 1e-12


def test_checks_have_power():
    """The checks reject plausible wrong rules at these sample sizes."""
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], dtype=F64)
    q = torch.tensor([[0.2, 0.3, 0.5]], dtype=F64)
    assert chi_square_pvalue(torch.tensor([5050, 4950]), torch.tensor([0.5, 0.5])) > ALPHA
    # Wrong draft probabilities passed in (drafts come from q, verify is told q'):
    gen = torch.Generator().manual_seed(2)
    drafts = draw_drafts(q, N, gen)
    wrong_q = torch.tensor([[0.3, 0.3, 0.4]], dtype=F64)
    v = verify(drafts, wrong_q.float().expand(N, 1, 3), p.float().expand(N, 2, 3), gen)
    assert chi_square_pvalue(torch.bincount(v.tokens[:, 0], minlength=3), p[0]) < ALPHA
    # Resampling from p instead of the residual after a rejection:
    v = verify(drafts, q.float().expand(N, 1, 3), p.float().expand(N, 2, 3), gen)
    first = torch.where(v.accepted > 0, v.tokens[:, 0], torch.multinomial(p[0], N, True, generator=gen))
    assert chi_square_pvalue(torch.bincount(first, minlength=3), p[0]) < ALPHA
    # A mean off by 1% of its value (acceptance 0.71 instead of 0.70):
    draws = (torch.rand(N, generator=gen, dtype=F64) < 0.71).double()
    with pytest.raises(AssertionError):
        assert_mean(draws, 0.70, math.sqrt(0.7 * 0.3))
    assert_mean(draws, 0.71, math.sqrt(0.71 * 0.29))


# ---------------------------------------------------------------------------------------
# Distribution of one step


@st.composite
def step_inputs(draw, max_v=5, max_gamma=3):
    """(p [γ+1, V], q [γ, V], iid): integer weights 0..6 normalised, zeros included.

    With ``iid`` every position shares one p and one q (p_{γ+1} included)."""
    V = draw(st.integers(2, max_v))
    gamma = draw(st.integers(1, max_gamma))
    iid = draw(st.booleans())
    n_p, n_q = (1, 1) if iid else (gamma + 1, gamma)

    def rows(n):
        w = torch.tensor(draw(st.lists(st.lists(st.integers(0, 6), min_size=V, max_size=V),
                                       min_size=n, max_size=n)), dtype=F64)
        hot = draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n))
        w[range(n), hot] += 1                          # at least one positive entry per row
        return w

    p, q = rows(n_p), rows(n_q)
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    if iid:
        p, q = p.expand(gamma + 1, V), q.expand(gamma, V)
    return p, q, iid


@settings(PROPERTY, max_examples=40)
@given(step_inputs())
def test_verdict_distribution_is_exact(inputs):
    """Random (p, q): the whole verdict, the accepted count and each reached position."""
    p, q, iid = inputs
    gamma, V = q.shape
    n = 50_000
    _, v = run(p, q, n, seed=3)
    assert_fits(torch.bincount(encode(v, V), minlength=(V + 1) ** (gamma + 1)), exact_verdict_probs(p, q),
                "verdict")
    # Accepted count: P(accepted = n) from α_i = sum min(p_i, q_i), and its mean.
    law = accepted_probs(p, q)
    assert_fits(torch.bincount(v.accepted, minlength=gamma + 1), law, "accepted")
    k = torch.arange(gamma + 1, dtype=F64)
    mean = (k * law).sum().item()
    assert_mean(v.accepted, mean, math.sqrt(((k - mean) ** 2 * law).sum().item()), "mean accepted")
    if iid:  # P(accepted >= k) = α^k, and E[accepted] = E[tokens] - 1 from the theory helper
        alpha = speculative.acceptance_rate(p[0], q[0]).item()
        torch.testing.assert_close(law.flip(0).cumsum(0).flip(0), alpha ** k, rtol=1e-9, atol=1e-12)
        assert abs(mean - (speculative.expected_tokens(alpha, gamma).item() - 1)) < 1e-9
    # The token at each position a row reaches is distributed as p there: the theorem.
    check_reached_positions(v, p, "reached")


@pytest.mark.parametrize("seed", [4, 5])
def test_closed_form_for_gamma_2(seed):
    """γ = 2, one p and q at every position: P(acc = n) = α^n (1 - α) for n < γ and α^γ;
    extra token after a rejection ~ norm((p - q)_+); bonus ~ p_{γ+1}; kept drafts ~ norm(min(p, q))."""
    gen = torch.Generator().manual_seed(seed)
    V, gamma = 4, 2
    p1, q1, bonus = random_probs(V, gen), random_probs(V, gen), random_probs(V, gen)
    p = torch.stack([p1, p1, bonus])
    q = torch.stack([q1, q1])
    _, v = run(p, q, N, seed)
    alpha = torch.minimum(p1, q1).sum().item()
    assert abs(alpha - (1 - 0.5 * (p1 - q1).abs().sum().item())) < 1e-12
    law = torch.tensor([1 - alpha, alpha * (1 - alpha), alpha**2], dtype=F64)
    assert_fits(torch.bincount(v.accepted, minlength=3), law, "accepted")
    residual = (p1 - q1).clamp(min=0)
    extra = v.tokens.gather(1, v.accepted[:, None]).squeeze(1)
    for n in range(gamma):
        assert_fits(torch.bincount(extra[v.accepted == n], minlength=V), residual / residual.sum(), f"extra | n={n}")
    assert_fits(torch.bincount(extra[v.accepted == gamma], minlength=V), bonus, "bonus")
    kept = torch.minimum(p1, q1) / alpha
    assert_fits(torch.bincount(v.tokens[v.accepted >= 1, 0], minlength=V), kept, "kept draft")


@pytest.mark.parametrize("V, gamma, seed", [(3, 2, 0), (2, 3, 1), (4, 2, 1)])
def test_step_then_target_equals_target_on_toy_tables(V, gamma, seed):
    """The theorem itself, with context: p and q depend on the prefix (the proofs' tables).

    Drafts are drawn from q(. | prefix), the target's rows are looked up for the drafted
    prefix, one step is verified, and the emitted tokens are continued by the target
    sampling on its own up to γ + 1 tokens. The result must be distributed exactly as the
    target sampling γ + 1 tokens (``proofs.autoregressive_distribution``).
    """
    P, Q = toy_tensors(V, gamma, seed)
    gen = torch.Generator().manual_seed(6 + seed)
    n = N
    drafts = torch.empty(n, gamma, dtype=torch.long)
    for i in range(gamma):
        rows = Q[i][tuple(drafts[:, :i].T)].expand(n, V)
        drafts[:, i] = torch.multinomial(rows, 1, generator=gen).squeeze(1)
    target = torch.stack([P[i][tuple(drafts[:, :i].T)].expand(n, V) for i in range(gamma + 1)], 1)
    draft = torch.stack([Q[i][tuple(drafts[:, :i].T)].expand(n, V) for i in range(gamma)], 1)
    v = verify(drafts, draft.float(), target.float(), gen)
    check_layout(v, drafts, V)
    seq = v.tokens.clone()
    for j in range(gamma + 1):  # continue with the target where the step stopped
        rows = P[j][tuple(seq[:, :j].T)].expand(n, V)
        seq[:, j] = torch.where(seq[:, j] < 0, torch.multinomial(rows, 1, generator=gen).squeeze(1), seq[:, j])
    codes = (seq * V ** torch.arange(gamma + 1)).sum(1)
    auto = proofs.autoregressive_distribution(proofs.toy_tables(V, gamma, seed)[0], V, gamma + 1)
    digits = (torch.arange(V ** (gamma + 1))[:, None] // V ** torch.arange(gamma + 1)) % V  # code -> sequence
    expected = torch.tensor([float(auto[tuple(d.tolist())]) for d in digits], dtype=F64)
    assert_fits(torch.bincount(codes, minlength=V ** (gamma + 1)), expected, "step then target")


def test_rows_are_independent_and_follow_their_own_p_q():
    """Rows with different (p, q), interleaved in one batch, each match their own law."""
    gen = torch.Generator().manual_seed(7)
    R, V, gamma, n = 4, 3, 2, 40_000
    p = random_probs((R, gamma + 1, V), gen, zeros=0.2)
    q = random_probs((R, gamma, V), gen, zeros=0.2)
    q[3] = p[3, :gamma]                                   # one group with p = q
    drafts = draw_drafts(q.repeat(n, 1, 1), n * R, gen)
    v = verify(drafts, q.float().repeat(n, 1, 1), p.float().repeat(n, 1, 1), gen)
    codes = encode(v, V).view(n, R)
    for r in range(R):
        assert_fits(torch.bincount(codes[:, r], minlength=(V + 1) ** (gamma + 1)), exact_verdict_probs(p[r], q[r]),
                    f"group {r}")
    assert (v.accepted.view(n, R)[:, 3] == gamma).all()
    # Independence: the first tokens of neighbouring rows (different groups, and the same
    # group in consecutive blocks) fit the product of their marginals, which are p_1.
    first = v.tokens[:, 0].view(n, R)
    for a, b, pa, pb in [(first[:, 0], first[:, 1], p[0, 0], p[1, 0]), (first[:-1, 2], first[1:, 2], p[2, 0], p[2, 0])]:
        assert_fits(torch.bincount(V * a + b, minlength=V * V), torch.outer(pa, pb), "joint first tokens")


@pytest.mark.parametrize("draft_probs", ["given", None])
def test_verify_matches_reference_in_distribution(draft_probs):
    """verify and the plain verify_reference: both fit the exact law, and each other."""
    gen = torch.Generator().manual_seed(8)
    V, gamma, n = 3, 2, 20_000                        # the reference loops in Python: keep n small
    p, q = random_probs((gamma + 1, V), gen, zeros=0.2), random_probs((gamma, V), gen)
    if draft_probs is None:                           # fixed drafts, point-mass q
        drafts = torch.tensor([1, 2])
        exact = exact_verdict_probs(p, torch.eye(V, dtype=F64)[drafts], drafts)
        codes = []
        for fn, seed in [(verify, 9), (verify_reference, 10)]:
            g = torch.Generator().manual_seed(seed)
            v = fn(drafts.expand(n, gamma), None, p.float().expand(n, gamma + 1, V), g)
            check_layout(v, drafts.expand(n, gamma), V)
            codes.append(encode(v, V))
    else:
        exact = exact_verdict_probs(p, q)
        codes = [encode(run(p, q, n, seed, fn=fn)[1], V) for fn, seed in [(verify, 9), (verify_reference, 10)]]
    for c, name in zip(codes, ["verify", "verify_reference"]):
        assert_fits(torch.bincount(c, minlength=exact.numel()), exact, name)
    assert_same_distribution(codes[0], codes[1], "verify vs verify_reference")


# ---------------------------------------------------------------------------------------
# Deterministic drafts (draft_probs=None)


def test_point_mass_drafts():
    """q_i = one-hot(x_i): keep x_i with probability p_i(x_i); after a rejection the token is
    never x_i and is p_i with x_i removed, renormalised; every reached position emits ~ p_i."""
    gen = torch.Generator().manual_seed(11)
    V, gamma = 5, 3
    p = random_probs((gamma + 1, V), gen)
    drafts = p[:gamma].argsort(-1)[:, [-1, 0, 2]].diagonal()        # a likely, an unlikely, a middle one
    p[2, 0] = 0.0
    p[2] /= p[2].sum()                                                   # and a zero entry somewhere
    v = verify(drafts.expand(N, gamma), None, p.float().expand(N, gamma + 1, V), gen)
    check_layout(v, drafts.expand(N, gamma), V)
    exact = exact_verdict_probs(p, torch.eye(V, dtype=F64)[drafts], drafts)
    assert_fits(torch.bincount(encode(v, V), minlength=exact.numel()), exact, "verdict")
    reach = torch.cat([torch.ones(1, dtype=F64), p[range(gamma), drafts].cumprod(0)])
    law = reach - torch.cat([reach[1:], torch.zeros(1, dtype=F64)])    # P(acc = n) = prod p_i(x_i) (1 - p_n(x_n))
    assert_fits(torch.bincount(v.accepted, minlength=gamma + 1), law, "accepted")
    extra = v.tokens.gather(1, v.accepted[:, None]).squeeze(1)
    for i in range(gamma):
        resampled = extra[v.accepted == i]
        assert (resampled != drafts[i]).all()
        without = p[i].clone()
        without[drafts[i]] = 0
        assert_fits(torch.bincount(resampled, minlength=V), without / without.sum(), f"resampled at {i}")
    check_reached_positions(v, p, "point mass")


def test_point_mass_drafts_chosen_per_row_still_give_p():
    """Whatever fixed draft each row brings (here uniform, unrelated to p), the first
    emitted token is ~ p_1."""
    gen = torch.Generator().manual_seed(12)
    V = 6
    p = random_probs((2, V), gen, zeros=0.3)
    drafts = torch.randint(V, (N, 1), generator=gen)
    v = verify(drafts, None, p.float().expand(N, 2, V), gen)
    assert_fits(torch.bincount(v.tokens[:, 0], minlength=V), p[0], "first token")
    accepted = v.accepted.double()
    for x in range(V):  # acceptance rate of draft x is p_1(x)
        rows = drafts[:, 0] == x
        assert_mean(accepted[rows], p[0, x].item(), math.sqrt(p[0, x].item() * (1 - p[0, x].item())), f"x={x}")


# ---------------------------------------------------------------------------------------
# Edge cases


def test_p_equals_q_always_accepts():
    gen = torch.Generator().manual_seed(13)
    V, gamma, n = 7, 4, 50_000
    p = random_probs((gamma + 1, V), gen, zeros=0.3)
    drafts, v = run(p, p[:gamma], n, seed=14)
    assert (v.accepted == gamma).all()
    assert torch.equal(v.tokens[:, :gamma], drafts)
    assert_fits(torch.bincount(v.tokens[:, gamma], minlength=V), p[gamma], "bonus")
    # The same holds for point-mass drafts with a one-hot target on them.
    hot = torch.nn.functional.one_hot(drafts[:, :gamma], V).float()
    v = verify(drafts, None, torch.cat([hot, p[gamma].float().expand(n, 1, V)], 1), gen)
    assert (v.accepted == gamma).all() and torch.equal(v.tokens[:, :gamma], drafts)


def test_q_zero_where_p_positive():
    """Sampled drafts never fall where q = 0; a given draft there (p > 0) is always kept."""
    gen = torch.Generator().manual_seed(15)
    p = torch.tensor([[0.4, 0.3, 0.3], [0.2, 0.5, 0.3]], dtype=F64)
    q = torch.tensor([[0.0, 0.5, 0.5]], dtype=F64)
    drafts, v = run(p, q, N, seed=16)
    assert (drafts != 0).all()
    assert_fits(torch.bincount(v.tokens[:, 0], minlength=3), p[0], "first token")
    given_ = torch.zeros(N, 1, dtype=torch.long)
    v = verify(given_, q.float().expand(N, 1, 3), p.float().expand(N, 2, 3), gen)
    assert (v.accepted == 1).all() and (v.tokens[:, 0] == 0).all()


def test_p_zero_where_q_positive_always_rejects():
    gen = torch.Generator().manual_seed(17)
    p = torch.tensor([[0.0, 0.6, 0.4], [0.2, 0.5, 0.3]], dtype=F64)
    q = torch.tensor([[0.5, 0.25, 0.25]], dtype=F64)
    drafts = torch.zeros(N, 1, dtype=torch.long)
    v = verify(drafts, q.float().expand(N, 1, 3), p.float().expand(N, 2, 3), gen)
    assert (v.accepted == 0).all() and (v.tokens[:, 0] != 0).all() and (v.tokens[:, 1] == -1).all()
    residual = (p[0] - q[0]).clamp(min=0)
    assert_fits(torch.bincount(v.tokens[:, 0], minlength=3), residual / residual.sum(), "residual")


@pytest.mark.parametrize("seed", [18, 19, 20])
def test_one_hot_p_and_q_are_deterministic(seed):
    gen = torch.Generator().manual_seed(seed)
    eye = torch.eye(5)
    # q = p = one-hot: every draft kept, bonus is the one-hot token of p_{γ+1}.
    drafts = torch.tensor([[1, 3, 0], [4, 4, 2]])
    bonus = torch.tensor([2, 0])
    p = torch.cat([eye[drafts], eye[bonus][:, None]], 1)
    for dp in (eye[drafts], None):
        v = verify(drafts, dp, p, gen)
        assert v.tokens.tolist() == [[1, 3, 0, 2], [4, 4, 2, 0]] and v.accepted.tolist() == [3, 3]
    # p one-hot elsewhere at the second position: rejected there, the extra token is p's.
    p[0, 1] = eye[2]
    p[1, 1] = eye[0]
    for dp in (eye[drafts], None):
        v = verify(drafts, dp, p, gen)
        assert v.tokens.tolist() == [[1, 2, -1, -1], [4, 0, -1, -1]] and v.accepted.tolist() == [1, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_inputs(dtype):
    """16-bit inputs work, compute in float32 (same draws as the float32 upcast of the
    same values), and follow the law of the values they hold."""
    gen = torch.Generator().manual_seed(21)
    V, gamma = 4, 2
    p = random_probs((gamma + 1, V), gen, zeros=0.2).to(dtype)
    q = random_probs((gamma, V), gen, zeros=0.2).to(dtype)
    drafts, v = run(p, q, N, seed=22, dtype=dtype)
    # (validate=False: the 16-bit rows may sum to 1 +- 2e-2, beyond float32's tolerance)
    _, upcast = run(p.float(), q.float(), N, seed=22, validate=False)
    assert torch.equal(v.tokens, upcast.tokens) and torch.equal(v.accepted, upcast.accepted)
    check_layout(v, drafts, V)
    exact = exact_verdict_probs(p, q)
    assert_fits(torch.bincount(encode(v, V), minlength=exact.numel()), exact, f"{dtype}")
    # And the first token is ~ p (normalised: 16-bit rows sum to 1 only up to rounding, a
    # bias of order 1e-3 that these n draws cannot resolve).
    check_reached_positions(v, p.double() / p.double().sum(-1, keepdim=True), f"{dtype}", positions=[0])


@pytest.mark.parametrize("gamma", [1, 16])
def test_short_and_long_drafts(gamma):
    """γ = 1 and γ = 16, one p and q everywhere: P(acc >= k) = α^k, extra and bonus laws."""
    gen = torch.Generator().manual_seed(23)
    V = 5
    p1 = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1], dtype=F64)
    q1 = torch.tensor([0.25, 0.3, 0.1, 0.25, 0.1], dtype=F64)      # α = 0.85
    bonus = random_probs(V, gen)
    p = torch.cat([p1.expand(gamma, V), bonus[None]])
    q = q1.expand(gamma, V)
    drafts, v = run(p, q, N, seed=24)
    check_layout(v, drafts, V)
    alpha = torch.minimum(p1, q1).sum().item()
    k = torch.arange(gamma + 1, dtype=F64)
    law = torch.where(k < gamma, alpha**k * (1 - alpha), alpha**k)
    assert_fits(torch.bincount(v.accepted, minlength=gamma + 1), law, "accepted")
    mean = (k * law).sum().item()
    assert abs(mean + 1 - speculative.expected_tokens(alpha, gamma).item()) < 1e-9
    assert_mean(v.accepted, mean, math.sqrt(((k - mean) ** 2 * law).sum().item()), "mean accepted")
    extra = v.tokens.gather(1, v.accepted[:, None]).squeeze(1)
    residual = (p1 - q1).clamp(min=0)
    assert_fits(torch.bincount(extra[v.accepted < gamma], minlength=V), residual / residual.sum(), "extra")
    assert_fits(torch.bincount(extra[v.accepted == gamma], minlength=V), bonus, "bonus")
    check_reached_positions(v, p, f"gamma={gamma}", positions=sorted({0, gamma // 2, gamma}))


def test_two_token_vocabulary():
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], dtype=F64)
    q = torch.tensor([[0.1, 0.9], [0.6, 0.4]], dtype=F64)
    _, v = run(p, q, N, seed=26)
    assert_fits(torch.bincount(encode(v, 2), minlength=27), exact_verdict_probs(p, q), "V=2")


def test_llama3_sized_vocabulary():
    """V = 128256 (small B): token ids at the top of the range survive, supports hold."""
    gen = torch.Generator().manual_seed(27)
    V, B, gamma = 128_256, 4, 2
    support = torch.rand(B, gamma + 1, V, generator=gen) < 0.01
    support[..., V - 1] = True
    p = torch.rand(B, gamma + 1, V, generator=gen) * support
    p /= p.sum(-1, keepdim=True)
    q = torch.softmax(torch.randn(B, gamma, V, generator=gen), -1)
    drafts = draw_drafts(q, B, gen)
    for _ in range(5):
        v = verify(drafts, q, p, gen)
        check_layout(v, drafts, V)
        extra = v.tokens.gather(1, v.accepted[:, None]).squeeze(1)
        rows = torch.arange(B)
        at = v.accepted.clamp(max=gamma - 1)
        allowed = torch.where((v.accepted < gamma)[:, None], p[rows, v.accepted] > q[rows, at], p[rows, v.accepted] > 0)
        assert allowed[rows, extra].all()
    # The last id, deterministically: draft 0 where p is one-hot on V - 1.
    hot = torch.zeros(B, gamma + 1, V)
    hot[..., V - 1] = 1
    v = verify(torch.zeros(B, gamma, dtype=torch.long), None, hot, gen)
    assert v.tokens[:, 0].tolist() == [V - 1] * B and (v.accepted == 0).all()


def test_degenerate_residual_never_gives_invalid_tokens():
    """Where p_i = q_i exactly, the residual is all zero; a rejection there has probability
    0, and no row may come back with NaN-derived or -1 extra tokens. A draft given outside
    the common support (p = q = 0 there) is rejected and the extra token falls back to p."""
    gen = torch.Generator().manual_seed(28)
    V, gamma, n = 6, 3, 50_000
    p = random_probs((gamma + 1, V), gen, zeros=0.4)
    p[:, 5] = 0
    p /= p.sum(-1, keepdim=True)
    q = p[:gamma].clone()
    q[2] = random_probs(V, gen)                               # only position 3 differs
    drafts, v = run(p, q, n, seed=29)
    check_layout(v, drafts, V)
    assert (v.accepted >= 2).all()
    outside = drafts.clone()
    outside[:, 0] = 5
    v = verify(outside, q.float().expand(n, gamma, V), p.float().expand(n, gamma + 1, V), gen)
    check_layout(v, outside, V)
    assert (v.accepted == 0).all()
    assert_fits(torch.bincount(v.tokens[:, 0], minlength=V), p[0], "fallback to p")


def test_verdict_layout():
    gen = torch.Generator().manual_seed(30)
    for B, gamma, V in [(1, 1, 2), (500, 3, 10), (300, 8, 50), (0, 2, 4)]:
        p = random_probs((B, gamma + 1, V), gen, zeros=0.3, dtype=torch.float32)
        q = random_probs((B, gamma, V), gen, zeros=0.3, dtype=torch.float32)
        drafts = draw_drafts(q, B, gen) if B else torch.zeros(0, gamma, dtype=torch.long)
        for dp in (q, None):
            v = verify(drafts, dp, p, gen)
            assert isinstance(v, Verdict)
            check_layout(v, drafts, V)
        if B >= 300:
            assert 0 < v.accepted.float().mean() < gamma  # both outcomes happen at this size


def test_seeded_generator_is_deterministic_and_validate_false_is_identical():
    gen = torch.Generator().manual_seed(31)
    B, gamma, V = 1000, 3, 8
    p = random_probs((B, gamma + 1, V), gen, dtype=torch.float32)
    q = random_probs((B, gamma, V), gen, dtype=torch.float32)
    drafts = draw_drafts(q, B, gen)
    for dp in (q, None):
        def go(seed, **kw):
            return verify(drafts, dp, p, torch.Generator().manual_seed(seed), **kw)
        first, again, other, fast = go(1), go(1), go(2), go(1, validate=False)
        for v in (again, fast):
            assert torch.equal(first.tokens, v.tokens) and torch.equal(first.accepted, v.accepted)
        assert not torch.equal(first.tokens, other.tokens)
        torch.manual_seed(5)                                   # the global generator, too
        a = verify(drafts, dp, p)
        torch.manual_seed(5)
        assert torch.equal(a.tokens, verify(drafts, dp, p).tokens)


# ---------------------------------------------------------------------------------------
# Validation: every error is a ValueError naming the argument

X = torch.tensor([[0, 1, 2], [3, 4, 0]])
QP = torch.full((2, 3, 5), 0.2)
TP = torch.full((2, 4, 5), 0.2)


BAD_STEPS = {
    "draft_tokens float": ((X.float(), QP, TP), checks.InputTypeError, "`draft_tokens`.*int64"),
    "draft_tokens int32": ((X.int(), QP, TP), checks.InputTypeError, "`draft_tokens`.*int64"),
    "draft_tokens list": ((X.tolist(), QP, TP), checks.InputTypeError, "`draft_tokens`"),
    "draft_tokens 1-D": ((X[0], QP[0], TP[0]), ValueError, "`draft_tokens`.*shape"),
    "draft_tokens 3-D": ((X[..., None], QP, TP), ValueError, "`draft_tokens`.*shape"),
    "gamma 0": ((X[:, :0], QP[:, :0], TP[:, :1]), ValueError, "`draft_tokens`.*gamma >= 1"),
    "target_probs gamma": ((X, QP, TP[:, :3]), ValueError, "`target_probs`.*shape"),
    "target_probs batch": ((X, QP, TP[:1]), ValueError, "`target_probs`.*shape"),
    "target_probs 2-D": ((X, QP, TP[:, 0]), ValueError, "`target_probs`.*shape"),
    "target_probs int": ((X, QP, TP.long()), checks.InputTypeError, "`target_probs`.*floating"),
    "target_probs empty vocab": ((X, QP[..., :0], TP[..., :0]), ValueError, "`target_probs`"),
    "draft_probs gamma": ((X, QP[:, :2], TP), ValueError, "`draft_probs`.*shape"),
    "draft_probs batch": ((X, QP[:1], TP), ValueError, "`draft_probs`.*shape"),
    "draft_probs int": ((X, QP.long(), TP), checks.InputTypeError, "`draft_probs`.*floating"),
    "vocabularies differ": ((X, torch.full((2, 3, 4), 0.25), TP), ValueError, "vocabularies differ.*`draft_probs`"),
    "target_probs NaN": ((X, QP, _with(TP, (1, 3, 0), float("nan"))), ValueError, "`target_probs`.*NaN"),
    "draft_probs NaN": ((X, _with(QP, (0, 0, 4), float("nan")), TP), ValueError, "`draft_probs`.*NaN"),
    "target_probs negative": ((X, QP, _with(_with(TP, (0, 1, 0), -0.2), (0, 1, 1), 0.6)), ValueError,
                              "`target_probs`.*negative"),
    "draft_probs negative": ((X, _with(_with(QP, (1, 2, 0), -0.2), (1, 2, 1), 0.6), TP), ValueError,
                             "`draft_probs`.*negative"),
    "target_probs sum": ((X, QP, _with(TP, (0, 3, 0), 0.1)), ValueError, "`target_probs`.*not 1"),
    "draft_probs sum": ((X, _with(QP, (1, 0, 2), 0.3), TP), ValueError, "`draft_probs`.*not 1"),
    "token id too large": ((_with(X, (1, 2), 5), QP, TP), ValueError, "`draft_tokens`.*token ids"),
    "token id negative": ((_with(X, (0, 0), -1), QP, TP), ValueError, "`draft_tokens`.*token ids"),
}


# Each case with draft_probs given, and (unless it is about draft_probs) with None.
BAD_STEP_CASES = [
    pytest.param(x, q if dp else None, p, error, match, id=f"{name}-{'draft_probs' if dp else 'point_mass'}")
    for name, ((x, q, p), error, match) in BAD_STEPS.items()
    for dp in (True, False)
    if dp or "draft_probs" not in match
]


@pytest.mark.parametrize("fn", [verify, verify_reference], ids=["verify", "verify_reference"])
@pytest.mark.parametrize("x, q, p, error, match", BAD_STEP_CASES)
def test_bad_inputs_are_rejected(fn, x, q, p, error, match):
    with pytest.raises(error, match=match) as info:
        fn(x, q, p)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("generator", [42, "seed", torch.manual_seed, torch.Generator().manual_seed(0).get_state()])
def test_bad_generator_is_rejected(generator):
    with pytest.raises(checks.InputTypeError, match="`generator`"):
        verify(X, QP, TP, generator)


def test_validate_false_still_checks_shapes_but_not_values():
    with pytest.raises(ValueError, match="`target_probs`"):
        verify(X, QP, TP[:, :3], validate=False)
    # Values are the caller's responsibility with validate=False: no host sync, no error.
    v = verify(X, QP, TP * 0.9, validate=False)
    assert v.tokens.shape == (2, 4)


def test_tensors_on_different_devices_are_rejected():
    """Checked on the meta device (shapes only, no data), so it runs without a GPU."""
    meta = X.to("meta")
    with pytest.raises(ValueError, match="one device"):
        verify(meta, QP, TP)
    with pytest.raises(ValueError, match="one device"):
        verify(X, QP.to("meta"), TP)
    with pytest.raises(ValueError, match="`generator`"):
        verify(meta, QP.to("meta"), TP.to("meta"), torch.Generator())


# ---------------------------------------------------------------------------------------
# torch.compile
#
# fullgraph=True turns any graph break into an error, so this proves verify(validate=False)
# has no host synchronisation (.item(), data-dependent Python control flow): what lets it
# run inside a compiled decode loop or a CUDA graph. Compiling takes seconds on CPU, so
# one small shape per case; the inputs make the result deterministic to check it.


@pytest.mark.parametrize("point_mass", [False, True], ids=["draft_probs", "point_mass"])
def test_verify_compiles_without_graph_breaks(point_mass):
    torch._dynamo.reset()
    eye = torch.eye(4)
    drafts = torch.tensor([[1, 3], [2, 2], [0, 1]])
    q = eye[drafts]
    if point_mass:
        compiled = torch.compile(lambda x, p: speculative.verify(x, None, p, validate=False), fullgraph=True)
        call = compiled
    else:
        compiled = torch.compile(lambda x, q, p: speculative.verify(x, q, p, validate=False), fullgraph=True)
        call = lambda x, p: compiled(x, q, p)  # noqa: E731
    keep = torch.cat([eye[drafts], eye[[3, 0, 2]][:, None]], 1)       # p = q: all kept, then the bonus
    v = call(drafts, keep)
    assert v.tokens.tolist() == [[1, 3, 3], [2, 2, 0], [0, 1, 2]] and v.accepted.tolist() == [2, 2, 2]
    reject = keep.clone()
    reject[:, 0] = eye[[0, 3, 1]]                                      # p(x_1) = 0: rejected, p's token
    v = call(drafts, reject)
    assert v.tokens.tolist() == [[0, -1, -1], [3, -1, -1], [1, -1, -1]] and v.accepted.tolist() == [0, 0, 0]
    mixed = torch.full((3, 3, 4), 0.25)                                # random, but a valid verdict
    v = call(drafts, mixed)
    check_layout(v, drafts, 4)


# ---------------------------------------------------------------------------------------
# CUDA


@needs_cuda
@pytest.mark.parametrize("draft_probs", ["given", None])
def test_cuda_matches_the_cpu_law(draft_probs):
    cpu = torch.Generator().manual_seed(32)
    V, gamma = 4, 2
    p, q = random_probs((gamma + 1, V), cpu, zeros=0.2), random_probs((gamma, V), cpu)
    gen = torch.Generator(device="cuda").manual_seed(33)
    if draft_probs is None:
        drafts = torch.tensor([0, 3])
        exact = exact_verdict_probs(p, torch.eye(V, dtype=F64)[drafts], drafts)
        dp = None
        x = drafts.expand(N, gamma)
    else:
        exact = exact_verdict_probs(p, q)
        x = draw_drafts(q, N, cpu)
        dp = q.float().expand(N, gamma, V).cuda()
    v = verify(x.cuda(), dp, p.float().expand(N, gamma + 1, V).cuda(), gen)
    assert v.tokens.device.type == "cuda" and v.accepted.device.type == "cuda"
    check_layout(v, x.cuda(), V)
    assert_fits(torch.bincount(encode(v, V), minlength=exact.numel()), exact, "cuda")


@needs_cuda
def test_cuda_mixed_devices_are_rejected():
    with pytest.raises(ValueError, match="one device"):
        verify(X.cuda(), QP, TP)
    with pytest.raises(ValueError, match="one device"):
        verify(X, QP, TP.cuda())
    with pytest.raises(ValueError, match="`generator`"):
        verify(X.cuda(), QP.cuda(), TP.cuda(), torch.Generator())
    with pytest.raises(ValueError, match="`generator`"):
        verify(X, QP, TP, torch.Generator(device="cuda"))


# ---------------------------------------------------------------------------------------
# Theory: acceptance rate, expected tokens, speed-up, best γ


@PROPERTY
@given(step_inputs(max_v=8, max_gamma=1))
def test_acceptance_rate_is_one_minus_total_variation(inputs):
    p, q, _ = inputs
    alpha = speculative.acceptance_rate(p, q[:1].expand_as(p))
    assert alpha.shape == (p.shape[0],) and alpha.dtype == F64
    tv = 0.5 * (p - q[0]).abs().sum(-1)
    torch.testing.assert_close(alpha, 1 - tv, rtol=0, atol=1e-12)
    assert speculative.acceptance_rate(p[0], p[0]).item() == pytest.approx(1, abs=1e-12)


def test_acceptance_rate_special_cases_and_errors():
    assert speculative.acceptance_rate(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == 0
    half = speculative.acceptance_rate(torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.0, 0.5, 0.5]))
    assert half.dtype == torch.float32 and half.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="`p`"):
        speculative.acceptance_rate(torch.tensor([0.5, 0.6]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="`q`"):
        speculative.acceptance_rate(torch.tensor([0.5, 0.5]), torch.tensor([1.5, -0.5]))
    with pytest.raises(ValueError, match="vocabularies"):
        speculative.acceptance_rate(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.25, 0.25]))


def test_expected_tokens_closed_form_and_limit():
    for gamma in range(0, 7):
        assert speculative.expected_tokens(1.0, gamma).item() == gamma + 1
        for alpha in (0.0, 0.1, 0.5, 0.9, 0.999):
            assert speculative.expected_tokens(alpha, gamma).item() == pytest.approx(
                sum(alpha**k for k in range(gamma + 1)), rel=1e-12)
    # Continuous at α = 1, and broadcasting over tensors of α and γ, in float64.
    assert speculative.expected_tokens(1 - 1e-9, 5).item() == pytest.approx(6, rel=1e-6)
    grid = speculative.expected_tokens(torch.tensor([[0.5], [1.0]]), torch.tensor([1, 2, 3]))
    assert grid.dtype == F64
    torch.testing.assert_close(grid, torch.tensor([[1.5, 1.75, 1.875], [2.0, 3.0, 4.0]], dtype=F64))


@pytest.mark.parametrize("alpha, gamma", [(0.3, 4), (0.8, 4), (0.95, 10)])
def test_expected_tokens_matches_monte_carlo(alpha, gamma):
    """i.i.d. Bernoulli(α) acceptances: tokens = 1 + number of leading successes."""
    gen = torch.Generator().manual_seed(34)
    ok = torch.rand(200_000, gamma, generator=gen, dtype=F64) < alpha
    tokens = ok.long().cumprod(1).sum(1) + 1
    k = torch.arange(gamma + 1, dtype=F64)
    law = torch.where(k < gamma, alpha**k * (1 - alpha), alpha**k)
    mean = speculative.expected_tokens(alpha, gamma).item()
    assert mean == pytest.approx(((k + 1) * law).sum().item(), rel=1e-12)
    assert_mean(tokens, mean, math.sqrt((((k + 1 - mean) ** 2) * law).sum().item()), "tokens")


def test_speedup_formula():
    for alpha, gamma, c in [(0.8, 4, 0.05), (0.5, 1, 0.5), (0.0, 3, 0.1), (1.0, 5, 0.2), (0.9, 7, 0.0)]:
        closed = (gamma + 1 if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)) / (gamma * c + 1)
        assert speculative.speedup(alpha, gamma, c).item() == pytest.approx(closed, rel=1e-12)
    s = speculative.speedup(0.7, torch.arange(1, 5), 0.1)
    assert s.shape == (4,) and s.dtype == F64


def _brute_force_gamma(alpha, c, max_gamma=128):
    def value(g):
        tokens = g + 1 if alpha == 1 else (1 - alpha ** (g + 1)) / (1 - alpha)
        return tokens / (g * c + 1)
    values = [value(g) for g in range(1, max_gamma + 1)]
    return values.index(max(values)) + 1, value


@pytest.mark.parametrize("alpha, c", [(0.6, 0.1), (0.8, 0.05), (0.9, 0.02), (0.7, 0.3), (0.5, 1.0),
                                      (0.99, 0.001), (0.999, 0.0005), (0.3, 0.01)])
def test_optimal_gamma_is_the_brute_force_argmax(alpha, c):
    best, _ = _brute_force_gamma(alpha, c)
    assert speculative.optimal_gamma(alpha, c) == best
    if alpha >= 0.99:
        assert best > 20  # good drafts and cheap draft passes call for long drafts


@PROPERTY
@given(st.floats(0, 1), st.floats(0, 2), st.integers(1, 64))
def test_optimal_gamma_maximises_speedup(alpha, c, max_gamma):
    g = speculative.optimal_gamma(alpha, c, max_gamma)
    assert 1 <= g <= max_gamma
    best, value = _brute_force_gamma(alpha, c, max_gamma)
    assert value(g) >= value(best) * (1 - 1e-12)


def test_optimal_gamma_edges():
    assert speculative.optimal_gamma(0.0, 0.1) == 1        # nothing is ever accepted
    assert speculative.optimal_gamma(0.0, 0.0) == 1        # all γ tie: the smallest
    assert speculative.optimal_gamma(1.0, 0.0, max_gamma=40) == 40
    assert speculative.optimal_gamma(1.0, 0.5, max_gamma=40) == 40
    assert speculative.optimal_gamma(0.5, 10.0) == 1


BAD_THEORY = [
    (lambda: speculative.expected_tokens(1.5, 3), "`alpha`"),
    (lambda: speculative.expected_tokens(-0.1, 3), "`alpha`"),
    (lambda: speculative.expected_tokens(float("nan"), 3), "`alpha`"),
    (lambda: speculative.expected_tokens(0.5, -1), "`gamma`"),
    (lambda: speculative.expected_tokens(0.5, 2.0), "`gamma`"),
    (lambda: speculative.expected_tokens(0.5, True), "`gamma`"),
    (lambda: speculative.speedup(0.5, 3, -0.1), "`c`"),
    (lambda: speculative.speedup(0.5, 3, float("nan")), "`c`"),
    (lambda: speculative.speedup(1.1, 3, 0.1), "`alpha`"),
    (lambda: speculative.speedup(0.5, 1.5, 0.1), "`gamma`"),
    (lambda: speculative.optimal_gamma(1.2, 0.1), "`alpha`"),
    (lambda: speculative.optimal_gamma(-0.2, 0.1), "`alpha`"),
    (lambda: speculative.optimal_gamma(0.5, -1.0), "`c`"),
    (lambda: speculative.optimal_gamma(0.5, 0.1, max_gamma=0), "`max_gamma`"),
    (lambda: speculative.optimal_gamma(0.5, 0.1, max_gamma=2.5), "`max_gamma`"),
]


@pytest.mark.parametrize("call, match", BAD_THEORY, ids=[m + str(i) for i, (_, m) in enumerate(BAD_THEORY)])
def test_theory_rejects_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------
# verify_match: keep drafts while the target's own sample equals them


def test_verify_match_first_token_is_p_whatever_the_drafts():
    """y_1 ~ p_1 is emitted at position 1 whether x_1 is kept (x_1 = y_1) or not."""
    gen = torch.Generator().manual_seed(40)
    V, gamma = 6, 3
    p = random_probs((gamma + 1, V), gen, zeros=0.3)
    for drafts in (torch.randint(V, (N, gamma), generator=gen),                 # unrelated to p
                   draw_drafts(p[:gamma], N, gen)):                              # from p itself
        v = speculative.verify_match(drafts, p.float().expand(N, gamma + 1, V), gen)
        check_layout(v, drafts, V)
        assert_fits(torch.bincount(v.tokens[:, 0], minlength=V), p[0], "first token")


@pytest.mark.parametrize("V, gamma, seed", [(3, 2, 0), (2, 3, 1)])
def test_verify_match_step_then_target_equals_target_on_toy_tables(V, gamma, seed):
    """The exactness theorem for the exact-match rule, as for verify above: drafts from the
    toy q tables, one verify_match step, then the target alone up to γ + 1 tokens."""
    P, Q = toy_tensors(V, gamma, seed)
    gen = torch.Generator().manual_seed(41 + seed)
    n = N
    drafts = torch.empty(n, gamma, dtype=torch.long)
    for i in range(gamma):
        drafts[:, i] = torch.multinomial(Q[i][tuple(drafts[:, :i].T)].expand(n, V), 1, generator=gen).squeeze(1)
    target = torch.stack([P[i][tuple(drafts[:, :i].T)].expand(n, V) for i in range(gamma + 1)], 1)
    v = speculative.verify_match(drafts, target.float(), gen)
    check_layout(v, drafts, V)
    assert (v.accepted > 0).any() and (v.accepted < gamma).any()
    seq = v.tokens.clone()
    for j in range(gamma + 1):
        rows = P[j][tuple(seq[:, :j].T)].expand(n, V)
        seq[:, j] = torch.where(seq[:, j] < 0, torch.multinomial(rows, 1, generator=gen).squeeze(1), seq[:, j])
    codes = (seq * V ** torch.arange(gamma + 1)).sum(1)
    auto = proofs.autoregressive_distribution(proofs.toy_tables(V, gamma, seed)[0], V, gamma + 1)
    digits = (torch.arange(V ** (gamma + 1))[:, None] // V ** torch.arange(gamma + 1)) % V
    expected = torch.tensor([float(auto[tuple(d.tolist())]) for d in digits], dtype=F64)
    assert_fits(torch.bincount(codes, minlength=V ** (gamma + 1)), expected, "match step then target")


def test_verify_match_accepts_sum_p_q():
    """x ~ q, one p and q at every position: P(accepted >= k) = β^k with β = Σ p q, which is
    below speculative sampling's Σ min(p, q) (chapter 5); the extra token given n is p's own
    sample conditioned on differing from x (not from the draft law)."""
    V, gamma = 4, 3
    p1 = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64)
    q1 = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    bonus = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=F64)
    p = torch.cat([p1.expand(gamma, V), bonus[None]])
    drafts, v = run(p, q1.expand(gamma, V), N, seed=43, fn=lambda x, q, p, g: speculative.verify_match(
        x, p, g, draft_probs=q))
    beta = (p1 * q1).sum().item()
    assert beta < speculative.acceptance_rate(p1, q1).item()
    k = torch.arange(gamma + 1, dtype=F64)
    law = torch.where(k < gamma, beta**k * (1 - beta), beta**k)
    assert_fits(torch.bincount(v.accepted, minlength=gamma + 1), law, "accepted")
    assert_mean((v.accepted >= 1).double(), beta, math.sqrt(beta * (1 - beta)), "acceptance")
    # After a mismatch at a draft x, the token is y ~ p given y != x.
    rejected = v.accepted < gamma
    at = v.accepted.clamp(max=gamma - 1)
    x = drafts.gather(1, at[:, None]).squeeze(1)
    extra = v.tokens.gather(1, v.accepted[:, None]).squeeze(1)
    assert (extra[rejected] != x[rejected]).all()
    for token in range(V):
        rows = rejected & (x == token)
        without = p1.clone()
        without[token] = 0
        assert_fits(torch.bincount(extra[rows], minlength=V), without / without.sum(), f"extra | x={token}")
    assert_fits(torch.bincount(extra[~rejected], minlength=V), bonus, "bonus")


def test_verify_match_one_hot_target_on_the_drafts_keeps_all():
    gen = torch.Generator().manual_seed(44)
    eye = torch.eye(5)
    drafts = torch.tensor([[1, 3, 0], [4, 4, 2]])
    p = torch.cat([eye[drafts], eye[[2, 0]][:, None]], 1)
    v = speculative.verify_match(drafts, p, gen)
    assert v.tokens.tolist() == [[1, 3, 0, 2], [4, 4, 2, 0]] and v.accepted.tolist() == [3, 3]
    p[0, 1] = eye[2]                                 # one-hot elsewhere: stop there, emit p's token
    p[1, 0] = eye[0]
    v = speculative.verify_match(drafts, p, gen)
    assert v.tokens.tolist() == [[1, 2, -1, -1], [0, -1, -1, -1]] and v.accepted.tolist() == [1, 0]
    # A uniform target keeps a draft with probability 1/V only.
    n = 20_000
    u = speculative.verify_match(torch.zeros(n, 1, dtype=torch.long), torch.full((n, 2, 5), 0.2), gen)
    assert_mean(u.accepted.double(), 0.2, 0.4, "uniform")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_verify_match_dtypes_seeds_draft_probs_and_validate(dtype):
    gen = torch.Generator().manual_seed(45)
    B, gamma, V = 3000, 3, 6
    p = random_probs((B, gamma + 1, V), gen, zeros=0.2).to(dtype)
    q = random_probs((B, gamma, V), gen, dtype=torch.float32)
    drafts = draw_drafts(p[:, :gamma].double(), B, gen)

    def go(seed, **kwargs):
        return speculative.verify_match(drafts, p, torch.Generator().manual_seed(seed), **kwargs)

    first = go(1)
    check_layout(first, drafts, V)
    assert (first.accepted == 0).any() and (first.accepted == gamma).any()
    same = [go(1), go(1, draft_probs=q), go(1, validate=False), go(1, draft_probs=torch.zeros(2))]
    if dtype != F64:                                  # 16-bit computes as its float32 upcast
        same.append(speculative.verify_match(drafts, p.float(), torch.Generator().manual_seed(1), validate=False))
    for v in same:
        assert torch.equal(v.tokens, first.tokens) and torch.equal(v.accepted, first.accepted)
    assert not torch.equal(go(2).tokens, first.tokens)


BAD_MATCH_CASES = [
    pytest.param(x, p, error, match, id=name)
    for name, ((x, _, p), error, match) in BAD_STEPS.items()
    if "draft_probs" not in match and "vocabularies" not in match
]


@pytest.mark.parametrize("x, p, error, match", BAD_MATCH_CASES)
def test_verify_match_rejects_bad_inputs(x, p, error, match):
    with pytest.raises(error, match=match) as info:
        speculative.verify_match(x, p)
    assert isinstance(info.value, ValueError)


def test_verify_match_rejects_bad_draft_probs_and_generator():
    with pytest.raises(checks.InputTypeError, match="`draft_probs` must be a tensor or None"):
        speculative.verify_match(X, TP, draft_probs=QP.tolist())
    with pytest.raises(checks.InputTypeError, match="`generator`"):
        speculative.verify_match(X, TP, 7)
    with pytest.raises(ValueError, match="one device"):
        speculative.verify_match(X.to("meta"), TP)
    with pytest.raises(ValueError, match="`target_probs`.*shape"):
        speculative.verify_match(X, TP[:, :3], validate=False)
    assert speculative.verify_match(X, TP * 0.9, validate=False).tokens.shape == (2, 4)


# ---------------------------------------------------------------------------------------
# Leviathan et al.'s lenience (Appendix A.5)


def lenient_law(p: torch.Tensor, q: torch.Tensor, lenience: float, drafts: torch.Tensor | None = None):
    """The exact law of one row's lenient verdict, written out case by case: x ~ q is kept
    with probability a(x) = min(1, p(x) / (l q(x))); after a rejection a token is drawn from
    (p - l q)_+ normalised; the bonus from p_{γ+1}. With ``drafts``, fixed drafts."""
    p, q = p.double(), q.double()
    gamma, V = q.shape
    a = torch.where(q > 0, (p[:gamma] / (lenience * q)).clamp(max=1), torch.ones_like(q))
    if drafts is None:
        keep = q * a
    else:
        one_hot = torch.nn.functional.one_hot(drafts, V).double()
        keep = one_hot * torch.where(one_hot > 0, (p[:gamma] / lenience).clamp(max=1), 0)
        q = one_hot
    residual = (p[:gamma] - lenience * q).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:gamma])
    reject = (1 - keep.sum(-1, keepdim=True)).clamp(min=0)
    extra = torch.cat([reject * residual / residual.sum(-1, keepdim=True), p[gamma][None]])
    return verdict_law(keep, extra, V)


def test_lenient_output_distribution_closed_form():
    gen = torch.Generator().manual_seed(81)
    p = random_probs((200, 6), gen, zeros=0.2)
    q = random_probs((200, 6), gen, zeros=0.2)
    torch.testing.assert_close(speculative.lenient_output_distribution(p, q, 1.0), p, rtol=0, atol=1e-12)
    for l in (0.05, 0.3, 0.7, 0.99):
        r = speculative.lenient_output_distribution(p, q, l)
        assert r.dtype == F64 and r.shape == p.shape
        torch.testing.assert_close(r.sum(-1), torch.ones(200, dtype=F64), rtol=0, atol=1e-12)
        for b in range(0, 200, 20):                        # the one-position case of lenient_law
            law = lenient_law(torch.stack([p[b], p[b]]), q[b][None], l)
            first = law.view(7, 7)[:, 1:].sum(0)           # first token (digit 0), whatever follows
            torch.testing.assert_close(r[b], first, rtol=0, atol=1e-12)
    # Lower lenience keeps more drafts: the acceptance rate sum_x min(q, p / l) only grows.
    rates = [torch.minimum(q, p / l).sum(-1) for l in (1.0, 0.7, 0.3)]
    assert (rates[1] >= rates[0] - 1e-12).all() and (rates[2] >= rates[1] - 1e-12).all()
    assert (rates[2] > rates[0] + 1e-3).any()
    with pytest.raises(ValueError, match="`lenience`"):
        speculative.lenient_output_distribution(p, q, 0.0)
    with pytest.raises(ValueError, match="broadcast"):
        speculative.lenient_output_distribution(p[:3], q[:2], 0.5)


@pytest.mark.parametrize("lenience", [0.3, 0.75])
@pytest.mark.parametrize("point_mass", [False, True])
def test_lenient_verdict_follows_its_exact_law(lenience, point_mass):
    """Chi-square of whole verdicts (γ = 2, V = 4) against the case-by-case law, for the
    vectorised rule and, with fewer draws, the plain reference; and the first emitted
    token against lenient_output_distribution, which is not p."""
    gen = torch.Generator().manual_seed(82)
    V, gamma, n = 4, 2, N
    p = random_probs((gamma + 1, V), gen, zeros=0.15)
    q = random_probs((gamma, V), gen, zeros=0.15)
    if point_mass:
        drafts = torch.tensor([int(q[0].argmax()), int(q[1].argmax())])
        law = lenient_law(p, q, lenience, drafts)
        v = verify(drafts.expand(n, gamma), None, p.float().expand(n, gamma + 1, V), gen, lenience=lenience)
    else:
        law = lenient_law(p, q, lenience)
        drafts, v = run(p, q, n, seed=83, lenience=lenience)
        r = speculative.lenient_output_distribution(p[0], q[0], lenience)
        assert_fits(torch.bincount(v.tokens[:, 0], minlength=V), r, "first token ~ lenient law")
        assert (r - p[0]).abs().sum() > 0.05                      # the output is not p
    assert_fits(torch.bincount(encode(v, V), minlength=law.numel()), law, "lenient verdict")
    m = 6000
    x = drafts[:m] if not point_mass else drafts.expand(m, gamma)
    slow = speculative.verify_reference(x, None if point_mass else q.expand(m, gamma, V), p.expand(m, gamma + 1, V),
                                        gen, lenience=lenience)
    assert_fits(torch.bincount(encode(slow, V), minlength=law.numel()), law, "lenient reference")


def test_lenience_accepts_more_and_is_exact_at_one():
    gen = torch.Generator().manual_seed(84)
    V, gamma = 6, 3
    p = random_probs((gamma + 1, V), gen)
    q = random_probs((gamma, V), gen)
    _, exact = run(p, q, 20_000, seed=85)
    _, one = run(p, q, 20_000, seed=85, lenience=1.0)
    assert torch.equal(exact.tokens, one.tokens)
    _, loose = run(p, q, 20_000, seed=85, lenience=0.5)
    assert loose.accepted.double().mean() > exact.accepted.double().mean() + 0.05


# ---------------------------------------------------------------------------------------
# Bad input (issue 10)


def test_16bit_rows_summing_near_one_follow_the_normalised_target():
    """bf16 [0.72, 0.30] sums to 1.0195, inside the 16-bit tolerance, and encodes
    p = [0.7050, 0.2950]. Used as it is, a rejection-sampling step would emit token 0 with
    probability 0.6992 (q = [0.2, 0.8]); normalised, exactly 0.7050. 400k draws resolve
    the difference (about 12 standard errors)."""
    gen = torch.Generator().manual_seed(86)
    n = 400_000
    p_row = torch.tensor([0.72, 0.30], dtype=torch.bfloat16)
    assert abs(p_row.double().sum().item() - 1) > 0.015
    p = p_row.expand(n, 2, 2)
    target = (p_row.double() / p_row.double().sum())
    q = torch.tensor([0.2, 0.8]).expand(n, 1, 2)
    x = torch.multinomial(q[0], n, replacement=True, generator=gen).view(n, 1)
    for how, v in (("rejection", verify(x, q, p, gen)),
                   ("point mass", verify(torch.ones(n, 1, dtype=torch.long), None, p, gen)),
                   ("match", speculative.verify_match(x, p, gen))):
        assert_fits(torch.bincount(v.tokens[:, 0], minlength=2), target, f"{how}: bf16 first token")
    # The plain reference normalises too: the same draws as on the normalised float64 rows.
    m = 2000
    a = speculative.verify_reference(x[:m], q[:m], p[:m], torch.Generator().manual_seed(1))
    b = speculative.verify_reference(x[:m], q[:m].double(), target.expand(m, 2, 2), torch.Generator().manual_seed(1))
    assert torch.equal(a.tokens, b.tokens)
    assert speculative.acceptance_rate(p_row, torch.tensor([0.2, 0.8])).item() == pytest.approx(
        0.2 + target[1].item(), abs=1e-6)


def test_acceptance_rate_empty_batches_and_shapes():
    assert speculative.acceptance_rate(torch.zeros(0, 5), torch.zeros(0, 5)).shape == (0,)
    assert speculative.acceptance_rate(torch.zeros(0, 5), torch.full((5,), 0.2)).shape == (0,)
    p = torch.full((3, 5), 0.2)
    assert speculative.acceptance_rate(p, torch.full((1, 5), 0.2)).shape == (3,)
    with pytest.raises(ValueError, match="broadcast"):
        speculative.acceptance_rate(p, torch.full((2, 5), 0.2))


TYPE_ERRORS = [
    (lambda: speculative.expected_tokens(True, 3), "`alpha`"),
    (lambda: speculative.expected_tokens("0.5", 3), "`alpha`"),
    (lambda: speculative.expected_tokens(None, 3), "`alpha`"),
    (lambda: speculative.expected_tokens(0.5, None), "`gamma`"),
    (lambda: speculative.expected_tokens(0.5, "3"), "`gamma`"),
    (lambda: speculative.expected_tokens(torch.tensor([True]), 3), "`alpha`"),
    (lambda: speculative.speedup(0.5, 3, "0.1"), "`c`"),
    (lambda: speculative.speedup(0.5, 3, None), "`c`"),
    (lambda: speculative.speedup(0.5, 3, True), "`c`"),
    (lambda: speculative.optimal_gamma("0.5", 0.1), "`alpha`"),
    (lambda: speculative.optimal_gamma(0.5, None), "`c`"),
]


@pytest.mark.parametrize("call, match", TYPE_ERRORS, ids=[m + str(i) for i, (_, m) in enumerate(TYPE_ERRORS)])
def test_theory_refuses_wrong_types_with_a_type_error(call, match):
    with pytest.raises(TypeError, match=match):
        call()


VALUE_ERRORS = [
    (lambda: speculative.expected_tokens(0.5, 10**30), "`gamma`"),
    (lambda: speculative.expected_tokens(0.5, [10**30]), "`gamma`"),
    (lambda: speculative.expected_tokens(0.5, torch.tensor(10**7)), "`gamma`"),
    (lambda: speculative.expected_tokens(0.5, speculative.MAX_GAMMA + 1), "`gamma`"),
    (lambda: speculative.speedup(0.5, 10**20, 0.1), "`gamma`"),
    (lambda: speculative.speedup(0.5, 0, float("inf")), "`c`"),
    (lambda: speculative.speedup(0.5, 3, -float("inf")), "`c`"),
    (lambda: speculative.speedup(float("inf"), 3, 0.1), "`alpha`"),
    (lambda: speculative.expected_tokens(torch.tensor([0.5, 0.6]), torch.tensor([1, 2, 3])), "broadcast"),
    (lambda: speculative.optimal_gamma(0.5, 0.1, max_gamma=10**12), "`max_gamma`"),
    (lambda: speculative.optimal_gamma(0.5, float("inf")), "`c`"),
]


@pytest.mark.parametrize("call, match", VALUE_ERRORS, ids=[m + str(i) for i, (_, m) in enumerate(VALUE_ERRORS)])
def test_theory_refuses_huge_or_infinite_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_theory_at_the_bounds():
    g = speculative.MAX_GAMMA
    assert speculative.expected_tokens(1.0, g).item() == g + 1
    assert speculative.expected_tokens(0.5, g).item() == pytest.approx(2.0)
    assert speculative.optimal_gamma(1.0, 0.0, max_gamma=g) == g          # a million evaluations, at once
    assert speculative.speedup(0.5, 0, 1e300).item() == 1.0                # γ = 0: no draft pass is paid
    assert speculative.expected_tokens(0.3, 1).item() == 1.3               # float64 all the way
