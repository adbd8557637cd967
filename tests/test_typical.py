"""Tests for :mod:`typsamp.typical`: Medusa's typical acceptance (chapters 5 and 6).

The rule is deterministic given the drafts (accept x_i while p_i(x_i) > τ_i =
min(ε, δ exp(−H(p_i)))), and random only in the one extra token. So:

* the deterministic part is compared exactly with a plain loop written here, position
  by position, on random batches; with the same seed the extra token is too;
* the law of a whole :class:`~typsamp.speculative.Verdict` (drafts x ~ q) is computed
  exactly here, independently of the library, and checked by Monte Carlo (chi-square),
  as are :func:`typical.output_distribution` and :func:`typical.acceptance_rate`;
* known answers: a uniform target keeps every draft, a one-hot target keeps only its
  argmax and emits it, ε = δ = 0 keeps every draft p allows;
* it plugs into :func:`typsamp.generate.speculative`, where at T = 0 it reproduces
  greedy decoding of the target.

Statistical checks follow tests/test_speculative.py: fixed seeds, and each check at a
level ALPHA obtained by Bonferroni from a family-wise 1e-4 over this file.
"""

from __future__ import annotations

import functools
import math

import pytest
import sympy as sp
import torch

from laws import chi_square_pvalue, encode, fit_pvalue, verdict_law, with_value as _with
from typsamp import checks, generate, proofs, sampling, typical
from typsamp.model import GPT, GPTConfig
from typsamp.speculative import Verdict

F64 = torch.float64

# ---------------------------------------------------------------------------------------
# Statistics (as in tests/test_speculative.py, with this file's own budget)

FAMILY_ALPHA = 1e-4
MAX_CHECKS = 200
ALPHA = FAMILY_ALPHA / MAX_CHECKS
Z = torch.special.ndtri(torch.tensor(1 - ALPHA / 2, dtype=F64)).item()   # about 5 SE
N = 50_000  # draws per statistical check unless a test says otherwise
CHECKS = {"count": 0}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Every tensor here is small; on a shared 2-core machine a second intra-op thread only
    adds OpenMP barrier stalls (the tiny-model decoding below ran 100x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def bonferroni_budget(request):
    yield
    if request.session.testsfailed:
        return
    assert CHECKS["count"] <= MAX_CHECKS, (
        f"{CHECKS['count']} statistical checks ran but ALPHA was set for {MAX_CHECKS}: raise MAX_CHECKS"
    )


def assert_fits(counts: torch.Tensor, probs: torch.Tensor, what: str = "") -> None:
    """Counts follow probs: never a draw where probs is 0, and chi-square p > ALPHA."""
    CHECKS["count"] += 1
    pvalue = fit_pvalue(counts, probs, what)
    assert pvalue > ALPHA, f"{what}: chi-square p-value {pvalue:.3g} <= {ALPHA:.3g}"


def assert_frequency(hits: torch.Tensor, prob: float, what: str = "") -> None:
    """The frequency of ``hits`` (booleans) lies within Z binomial standard errors of ``prob``."""
    CHECKS["count"] += 1
    n = hits.numel()
    observed = hits.double().mean().item()
    tolerance = Z * math.sqrt(prob * (1 - prob) / n) + 1e-12
    assert abs(observed - prob) < tolerance, f"{what}: frequency {observed:.6g}, expected {prob:.6g} +- {tolerance:.3g}"


# ---------------------------------------------------------------------------------------
# The rule, written independently of the library


def tau_direct(p: torch.Tensor, epsilon: float, delta: float) -> torch.Tensor:
    """τ = min(ε, δ exp(−H)) with H = −Σ p log p (0 log 0 = 0), in float64, rows [..., V]."""
    p = p.double()
    neg_entropy = torch.xlogy(p, p).sum(-1)
    return torch.clamp(delta * torch.exp(neg_entropy), max=epsilon)


def extra_law(p: torch.Tensor, tau: torch.Tensor, extra: str) -> torch.Tensor:
    """The extra token's distribution e, normalised: one-hot on argmax p (lowest index among
    ties), p, or p on {p >= τ} (p if that is empty)."""
    p = p.double()
    if extra == "greedy":
        return torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).double()
    if extra == "truncated":
        kept = p * (p >= tau[..., None])
        p = torch.where(kept.sum(-1, keepdim=True) > 0, kept, p)
    return p / p.sum(-1, keepdim=True)


def loop_verify(drafts, p, epsilon, delta, extra, generator):
    """Typical acceptance one row and one position at a time, as the paper states it.

    The extra token is drawn with :func:`typsamp.sampling.sample_weights` (one uniform per
    row) from the weights the loop chose, so with an equally seeded generator the whole
    verdict must equal the library's.
    """
    B, gamma = drafts.shape
    V = p.shape[-1]
    tokens = torch.full((B, gamma + 1), -1, dtype=torch.long)
    accepted = torch.zeros(B, dtype=torch.long)
    weights = torch.zeros(B, V, dtype=F64)
    for b in range(B):
        n = 0
        while n < gamma:
            row = p[b, n].double().tolist()
            x = int(drafts[b, n])
            entropy = -sum(v * math.log(v) for v in row if v > 0)
            tau = min(epsilon, delta * math.exp(-entropy))
            if not row[x] > tau:
                break
            tokens[b, n] = x
            n += 1
        accepted[b] = n
        row = p[b, n].double().tolist()
        entropy = -sum(v * math.log(v) for v in row if v > 0)
        tau = min(epsilon, delta * math.exp(-entropy))
        kept = [v if v >= tau else 0.0 for v in row]
        if extra == "greedy":                                  # Medusa's: the first largest p
            kept = [1.0 if i == row.index(max(row)) else 0.0 for i in range(V)]
        weights[b] = torch.tensor(kept if extra in ("truncated", "greedy") and sum(kept) > 0 else row, dtype=F64)
    if extra == "greedy":
        tokens[torch.arange(B), accepted] = weights.argmax(-1)
        return Verdict(tokens=tokens, accepted=accepted)
    tokens[torch.arange(B), accepted] = sampling.sample_weights(weights, generator)
    return Verdict(tokens=tokens, accepted=accepted)


def exact_verdict_probs(p, q, epsilon, delta, extra, drafts=None) -> torch.Tensor:
    """The exact law of one row's :class:`Verdict`, indexed by :func:`encode`.

    ``p`` [γ+1, V], ``q`` [γ, V]: the draft x_i ~ q_i is kept when p_i(x_i) > τ_i; at the
    first failure (or at γ+1) one token ~ e is emitted. P(keep x_1..x_n, then y) =
    Π_i q_i(x_i) 1[x_i ∈ A_i] · (1 − q_{n+1}(A_{n+1})) e_{n+1}(y) for n < γ, and
    Π_i q_i(x_i) 1[x_i ∈ A_i] · e_{γ+1}(y) for n = γ. With ``drafts`` [γ] the drafts are
    fixed instead (q_i = one-hot).
    """
    p = p.double()
    gamma, V = q.shape
    if drafts is not None:
        q = torch.nn.functional.one_hot(drafts, V).double()
    tau = tau_direct(p, epsilon, delta)
    keep = q.double() * (p[:gamma] > tau[:gamma, None])           # P(draft x and keep it)
    e = extra_law(p, tau, extra)
    reject = (1 - keep.sum(-1, keepdim=True)).clamp(min=0)
    last = torch.cat([reject * e[:gamma], e[gamma][None]])        # the extra token, at n
    return verdict_law(keep, last, V)


def random_probs(shape, generator, zeros: float = 0.0, dtype=F64) -> torch.Tensor:
    """Random distributions over the last dim; a fraction ``zeros`` of entries set to 0."""
    w = torch.rand(shape, generator=generator, dtype=F64) ** 3
    if zeros:
        w = w * (torch.rand(shape, generator=generator, dtype=F64) >= zeros)
        w.view(-1, shape[-1])[:, 0] += (w.view(-1, shape[-1]).sum(-1) == 0).double()
    return (w / w.sum(-1, keepdim=True)).to(dtype)


def mixed_probs(B, positions, V, generator, dtype=F64) -> torch.Tensor:
    """Rows from flat to nearly one-hot (softmax of logits at random scales), some with zeros."""
    scale = 4 * torch.rand(B, 1, 1, generator=generator, dtype=F64)
    z = scale * torch.randn(B, positions, V, generator=generator, dtype=F64)
    holes = (torch.rand(B, positions, V, generator=generator) < 0.2) & (torch.rand(B, 1, 1, generator=generator) < 0.5)
    holes &= z < z.amax(-1, keepdim=True)                          # never the argmax
    p = torch.softmax(z.masked_fill(holes, float("-inf")), -1)
    return p.to(dtype)


def draw(q: torch.Tensor, n: int, generator) -> torch.Tensor:
    """n rows of drafts x_i ~ q_i for one row of draft distributions q [γ, V]."""
    V = q.shape[-1]
    return torch.multinomial(q.double().expand(n, *q.shape).reshape(-1, V), 1, generator=generator).view(n, -1)


def check_layout(v: Verdict, drafts: torch.Tensor, V: int) -> None:
    """Accepted drafts, then one token in [0, V), then -1 padding; int64."""
    B, gamma = drafts.shape
    assert v.tokens.shape == (B, gamma + 1) and v.accepted.shape == (B,)
    assert v.tokens.dtype == torch.int64 and v.accepted.dtype == torch.int64
    assert ((v.accepted >= 0) & (v.accepted <= gamma)).all()
    position = torch.arange(gamma + 1)
    n = v.accepted[:, None]
    padded = torch.cat([drafts, drafts.new_full((B, 1), -1)], 1)
    assert torch.equal(torch.where(position < n, v.tokens, -1), torch.where(position < n, padded, -1))
    extra = v.tokens.gather(1, n).squeeze(1)
    assert ((extra >= 0) & (extra < V)).all()
    assert (v.tokens[position > n] == -1).all()


EXTRAS = ["greedy", "target", "truncated"]


# ---------------------------------------------------------------------------------------
# The test machinery itself


def test_oracle_agrees_with_the_one_position_law():
    """The verdict oracle sums to 1; its first-token marginal is the library's r, and
    P(accepted >= 1) is its q(A): two independent computations of the same numbers."""
    gen = torch.Generator().manual_seed(0)
    V, gamma = 4, 2
    p, q = random_probs((gamma + 1, V), gen, zeros=0.25), random_probs((gamma, V), gen)
    for extra in EXTRAS:
        for eps, delta in [(0.09, 0.3), (0.35, 2.0), (0.0, 0.0)]:
            law = exact_verdict_probs(p, q, eps, delta, extra)
            assert abs(law.sum().item() - 1) < 1e-12
            codes = torch.arange(law.numel())
            first = codes % (V + 1) - 1
            marginal = torch.zeros(V, dtype=F64).index_add_(0, first[law > 0], law[law > 0])
            r = typical.output_distribution(p[0], q[0], eps, delta, extra=extra)
            torch.testing.assert_close(marginal, r, rtol=0, atol=1e-12)
            second = (codes // (V + 1)) % (V + 1) - 1                # a token at position 2 <=> kept x_1
            kept = law[second >= 0].sum().item()
            assert kept == pytest.approx(typical.acceptance_rate(p[0], q[0], eps, delta).item(), abs=1e-12)


def test_checks_have_power():
    """A rule off by the tie (>= instead of >) or drawing the extra token from p_{n+1}
    is rejected at these sample sizes."""
    gen = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=F64)
    eps, delta = 0.3, 3.0                                            # τ_1 = 0.3 = p_1(1): a tie
    law = exact_verdict_probs(p, p[:1], eps, delta, "target")
    drafts = draw(p[:1], N, gen)
    wrong_keep = drafts[:, 0] <= 1                                   # p >= τ keeps token 1 too
    extra = torch.multinomial(p[0], N, True, generator=gen)
    tokens = torch.stack([torch.where(wrong_keep, drafts[:, 0], extra),
                          torch.where(wrong_keep, torch.multinomial(p[1], N, True, generator=gen), -1)], 1)
    wrong = encode(Verdict(tokens=tokens, accepted=wrong_keep.long()), 3)
    assert chi_square_pvalue(torch.bincount(wrong, minlength=law.numel())[law > 0], law[law > 0]) < ALPHA
    v = typical.verify(drafts, p.float().expand(N, 2, 3), eps, delta, gen)
    shifted = torch.where(v.accepted == 0, torch.multinomial(p[1], N, True, generator=gen), v.tokens[:, 0])
    r = typical.output_distribution(p[0], p[0], eps, delta)
    assert chi_square_pvalue(torch.bincount(shifted, minlength=3), r) < ALPHA
    assert_fits(torch.bincount(v.tokens[:, 0], minlength=3), r, "the right rule")


# ---------------------------------------------------------------------------------------
# The rule, exactly: against the plain loop


@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("eps, delta", [(0.09, 0.3), (0.0, 0.5), (0.2, 1.5)])
@pytest.mark.parametrize("gamma, V", [(1, 2), (1, 1000), (8, 2), (8, 1000), (3, 7)])
def test_verify_equals_the_plain_loop(gamma, V, eps, delta, extra):
    gen = torch.Generator().manual_seed(2 + gamma + V)
    B = 48
    for dtype in (F64, torch.float32):
        p = mixed_probs(B, gamma + 1, V, gen, dtype)
        # Drafts: from p itself, its argmax, or uniform: accepted, rejected, both.
        from_p = torch.multinomial(p[:, :gamma].double().reshape(-1, V), 1, generator=gen).view(B, gamma)
        argmax = p[:, :gamma].argmax(-1)
        uniform = torch.randint(V, (B, gamma), generator=gen)
        pick = torch.randint(3, (B, gamma), generator=gen)
        drafts = torch.where(pick == 0, from_p, torch.where(pick == 1, argmax, uniform))
        v = typical.verify(drafts, p, eps, delta, torch.Generator().manual_seed(7), extra=extra)
        ref = loop_verify(drafts, p, eps, delta, extra, torch.Generator().manual_seed(7))
        check_layout(v, drafts, V)
        assert torch.equal(v.accepted, ref.accepted), dtype
        assert torch.equal(v.tokens, ref.tokens), dtype
        assert torch.equal(v.emitted, v.accepted + 1)
        if min(eps, delta) > 0 and V > 2:                            # not vacuous: both outcomes
            assert (v.accepted == 0).any() and (v.accepted > 0).any()


def test_empty_batch():
    for fn in (typical.verify, functools.partial(typical.verify, extra="truncated")):
        v = fn(torch.zeros(0, 3, dtype=torch.long), torch.full((0, 4, 5), 0.2))
        assert v.tokens.shape == (0, 4) and v.accepted.shape == (0,)


# ---------------------------------------------------------------------------------------
# The law of a verdict, by simulation

# (ε, δ) regimes on V = 4: A large with a tail the truncation removes, A small
# (τ = ε = 0.45), A = support of p (τ = 0), and A empty (τ = 1; "truncated" falls back to p).
REGIMES = {"medusa": (0.09, 0.3), "strict": (0.45, 2.0), "zero": (0.0, 0.0), "none": (1.0, 10.0)}
P_TABLE = torch.tensor([[0.40, 0.30, 0.25, 0.05], [0.55, 0.25, 0.0, 0.20], [0.1, 0.2, 0.3, 0.4]], dtype=F64)
Q_TABLE = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]], dtype=F64)


@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("regime", REGIMES)
def test_verdict_distribution_is_exact(regime, extra):
    """Drafts x ~ q, γ = 2: the whole verdict, the accepted count, the extra token given
    the count, the first emitted token (= output_distribution) and q(A) (= acceptance_rate)."""
    eps, delta = REGIMES[regime]
    gen = torch.Generator().manual_seed(3)
    V, gamma = 4, 2
    p, q = P_TABLE, Q_TABLE
    tau = tau_direct(p, eps, delta)
    A = p > tau[:, None]
    size = A[:gamma].sum(-1)
    if regime == "medusa":                                           # the inputs do what they say
        assert (size >= 2).all() and ((p > 0) & (p < tau[:, None])).any()
    elif regime == "strict":
        assert (size <= 1).all() and (size == 0).any() and (size == 1).any()
    elif regime == "zero":
        assert torch.equal(A, p > 0) and not A.all()
    else:
        assert not A.any() and not (p >= tau[:, None]).any()
    drafts = draw(q, N, gen)
    v = typical.verify(drafts, p.float().expand(N, gamma + 1, V), eps, delta, gen,
                       draft_probs=q.float().expand(N, gamma, V), extra=extra)
    check_layout(v, drafts, V)
    law = exact_verdict_probs(p, q, eps, delta, extra)
    assert_fits(torch.bincount(encode(v, V), minlength=law.numel()), law, "verdict")
    # P(accepted >= k) = Π_{i<k} q_i(A_i)
    rate = (q * A[:gamma]).sum(-1)
    reach = torch.cat([torch.ones(1, dtype=F64), rate.cumprod(0)])
    counts = reach - torch.cat([reach[1:], torch.zeros(1, dtype=F64)])
    assert_fits(torch.bincount(v.accepted, minlength=gamma + 1), counts, "accepted")
    e = extra_law(p, tau, extra)
    extra_token = v.tokens.gather(1, v.accepted[:, None]).squeeze(1)
    for n in range(gamma + 1):
        rows = v.accepted == n
        if counts[n] == 0:
            assert not rows.any()
            continue
        assert_fits(torch.bincount(extra_token[rows], minlength=V), e[n], f"extra | accepted = {n}")
        if extra == "truncated":                                     # never below the threshold
            assert (p[n, extra_token[rows]] >= tau[n]).all() or not (p[n] >= tau[n]).any()
    r = typical.output_distribution(p[0], q[0], eps, delta, extra=extra)
    assert_fits(torch.bincount(v.tokens[:, 0], minlength=V), r, "first emitted token")
    alpha = typical.acceptance_rate(p[0], q[0], eps, delta).item()
    assert alpha == pytest.approx(rate[0].item(), abs=1e-12)
    assert_frequency(v.accepted >= 1, alpha, "acceptance")


@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("eps, delta", [(0.09, 0.3), (0.3, 0.9)])
def test_output_distribution_matches_simulation(eps, delta, extra):
    """Six random (p, q) on V = 10, flat to sharp, in one batch (γ = 1): the first emitted
    token of each group ~ output_distribution, its acceptance frequency ~ acceptance_rate."""
    gen = torch.Generator().manual_seed(4)
    R, V, n = 6, 10, 20_000
    p = torch.softmax(torch.linspace(0.3, 3, R, dtype=F64)[:, None, None]
                      * torch.randn(R, 2, V, generator=gen, dtype=F64), -1)
    q = random_probs((R, 1, V), gen)
    drafts = torch.multinomial(q[:, 0].repeat(n, 1), 1, generator=gen)
    v = typical.verify(drafts, p.float().repeat(n, 1, 1), eps, delta, gen, extra=extra)
    first = v.tokens[:, 0].view(n, R)
    r = typical.output_distribution(p[:, 0], q[:, 0], eps, delta, extra=extra)
    alpha = typical.acceptance_rate(p[:, 0], q[:, 0], eps, delta)
    assert r.shape == (R, V) and alpha.shape == (R,) and r.dtype == F64
    torch.testing.assert_close(r.sum(-1), torch.ones(R, dtype=F64), rtol=0, atol=1e-12)
    assert alpha.min() < 0.9 and alpha.max() > 0.3                 # far from all-or-nothing
    for g in range(R):
        assert_fits(torch.bincount(first[:, g], minlength=V), r[g], f"group {g}")
        assert_frequency(v.accepted.view(n, R)[:, g] == 1, alpha[g].item(), f"acceptance, group {g}")


@pytest.mark.parametrize("extra", EXTRAS)
def test_token_id_drafts(extra):
    """Deterministic drafts: every draft token x in turn. The decision is deterministic
    (acceptance_rate is 1 or 0 and every row agrees), the first token ~ output_distribution."""
    gen = torch.Generator().manual_seed(5)
    V, n = 5, 10_000
    p = torch.tensor([[0.5, 0.3, 0.12, 0.05, 0.03], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=F64)
    eps, delta = 0.09, 0.3
    drafts = torch.arange(V).repeat(n)[:, None]
    v = typical.verify(drafts, p.float().expand(n * V, 2, V), eps, delta, gen, extra=extra)
    tau = tau_direct(p[0], eps, delta).item()
    assert [x for x in range(V) if not p[0, x] > tau] == [3, 4]   # τ = 0.3 exp(-H) = 0.089
    for x in range(V):
        rows = drafts[:, 0] == x
        rate = typical.acceptance_rate(p[0], torch.tensor(x), eps, delta)
        assert rate.shape == () and rate.item() == float(p[0, x] > tau)
        assert (v.accepted[rows] == int(rate.item())).all()
        r = typical.output_distribution(p[0], torch.tensor(x), eps, delta, extra=extra)
        if rate.item() == 1:
            assert torch.equal(r, torch.nn.functional.one_hot(torch.tensor(x), V).double())
        assert_fits(torch.bincount(v.tokens[rows, 0], minlength=V), r, f"draft {x}")


def test_output_distribution_batches_and_dtypes():
    """Token-id drafts [...] and q [..., V] broadcast row by row; float32 for 16/32-bit input."""
    gen = torch.Generator().manual_seed(6)
    p = random_probs((3, 4, 6), gen, zeros=0.2)
    q = random_probs((3, 4, 6), gen)
    ids = torch.randint(6, (3, 4), generator=gen)
    for extra in EXTRAS:
        for draft in (q, ids):
            r = typical.output_distribution(p, draft, extra=extra)
            assert r.shape == (3, 4, 6) and r.dtype == F64
            torch.testing.assert_close(r.sum(-1), torch.ones(3, 4, dtype=F64), rtol=0, atol=1e-12)
            for b in range(3):
                for i in range(4):
                    alone = typical.output_distribution(p[b, i], draft[b, i], extra=extra)
                    torch.testing.assert_close(r[b, i], alone, rtol=0, atol=1e-15)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            r = typical.output_distribution(p.to(dtype), q.to(dtype), extra=extra)
            assert r.dtype == torch.float32
            torch.testing.assert_close(r.sum(-1), torch.ones(3, 4), rtol=0, atol=1e-5)
            assert typical.acceptance_rate(p.to(dtype), ids).dtype == torch.float32


# ---------------------------------------------------------------------------------------
# Known answers


@pytest.mark.parametrize("extra", EXTRAS)
def test_uniform_target_accepts_everything(extra):
    """p uniform: H = log V, τ = min(ε, δ / V) < 1/V for δ < 1, so every draft passes."""
    gen = torch.Generator().manual_seed(8)
    V, gamma, n = 5, 4, 20_000
    p = torch.full((n, gamma + 1, V), 1 / V)
    drafts = torch.randint(V, (n, gamma), generator=gen)
    for eps, delta in [(0.09, 0.3), (1.0, 0.99), (0.0, 0.0)]:
        v = typical.verify(drafts, p, eps, delta, gen, extra=extra)
        assert (v.accepted == gamma).all() and torch.equal(v.tokens[:, :gamma], drafts)
        q = random_probs((3, V), gen)
        torch.testing.assert_close(typical.output_distribution(p[:3, 0].double(), q, eps, delta, extra=extra), q)
        assert (typical.acceptance_rate(p[:3, 0], q.float(), eps, delta) > 1 - 1e-6).all()
    bonus_law = extra_law(p[0, gamma], tau_direct(p[0, gamma], eps, delta), extra)   # uniform, or one-hot
    assert_fits(torch.bincount(v.tokens[:, gamma], minlength=V), bonus_law, "bonus")


@pytest.mark.parametrize("extra", EXTRAS)
def test_one_hot_target_keeps_only_its_argmax(extra):
    """p one-hot: every non-argmax draft is rejected and the argmax emitted, deterministically."""
    gen = torch.Generator().manual_seed(9)
    B, gamma, V = 500, 3, 6
    hot = torch.randint(V, (B, gamma + 1), generator=gen)
    p = torch.nn.functional.one_hot(hot, V).float()
    drafts = torch.where(torch.rand(B, gamma, generator=gen) < 0.7, hot[:, :gamma],
                         torch.randint(V, (B, gamma), generator=gen))
    match = (drafts == hot[:, :gamma]).long().cumprod(1)
    kept = torch.arange(gamma + 1) < match.sum(1, keepdim=True)
    expected = torch.where(kept, torch.cat([drafts, hot[:, -1:]], 1), -1)
    expected[torch.arange(B), match.sum(1)] = hot[torch.arange(B), match.sum(1)]
    for eps, delta in [(0.09, 0.3), (1.0, 0.99), (0.0, 0.0), (0.5, 5.0)]:
        v = typical.verify(drafts, p, eps, delta, gen, extra=extra)
        assert torch.equal(v.accepted, match.sum(1))
        assert torch.equal(v.tokens, expected)
        for x in range(V):                                     # output_distribution: the argmax
            r = typical.output_distribution(p[0, 0], torch.tensor(x), eps, delta, extra=extra)
            assert torch.equal(r, p[0, 0])
    assert (match.sum(1) == 0).any() and (match.sum(1) == gamma).any()


@pytest.mark.parametrize("extra", EXTRAS)
def test_zero_threshold_accepts_everything_p_allows(extra):
    """ε = δ = 0: τ = 0, A = {p > 0}; with full-support p every draft passes and r = q."""
    gen = torch.Generator().manual_seed(10)
    B, gamma, V = 2000, 5, 8
    p = mixed_probs(B, gamma + 1, V, gen, torch.float32)
    full = p.clamp(min=1e-6)
    full /= full.sum(-1, keepdim=True)
    drafts = torch.randint(V, (B, gamma), generator=gen)
    v = typical.verify(drafts, full, 0.0, 0.0, gen, extra=extra)
    assert (v.accepted == gamma).all() and torch.equal(v.tokens[:, :gamma], drafts)
    q = random_probs((B, V), gen)
    torch.testing.assert_close(typical.output_distribution(full[:, 0].double(), q, 0, 0, extra=extra), q)
    # Where p = 0 the draft still fails (p(x) > 0 is false), and the extra token has p > 0.
    v = typical.verify(drafts, p, 0.0, 0.0, gen, extra=extra)
    zero = p[:, :gamma].gather(-1, drafts[..., None]).squeeze(-1) == 0
    assert zero.any()
    assert torch.equal(v.accepted, (~zero).long().cumprod(1).sum(1))
    extra_token = v.tokens.gather(1, v.accepted[:, None])
    assert (p[torch.arange(B), v.accepted].gather(1, extra_token) > 0).all()


@pytest.mark.parametrize("eps, delta", [(0.0, 0.3), (0.09, 0.3), (0.5, 0.9), (1.0, 0.999), (1.0, 0.0)])
def test_argmax_always_passes_when_delta_below_one(eps, delta):
    """exp(−H) <= max p (proofs.entropy_gap), so τ <= δ max p < max p: the argmax passes."""
    gen = torch.Generator().manual_seed(11)
    B, gamma, V = 2000, 2, 50
    for dtype in (torch.float32, F64, torch.bfloat16):
        if dtype == torch.bfloat16 and delta > 0.9:
            continue        # 16-bit rows sum to 1 only within 1%: exp(-H) may then exceed max p by ~1%
        p = mixed_probs(B, gamma + 1, V, gen)
        p[:100] = torch.softmax(40 * torch.randn(100, gamma + 1, V, generator=gen, dtype=F64), -1)   # near one-hot
        p = p.to(dtype)
        drafts = p[:, :gamma].argmax(-1)
        v = typical.verify(drafts, p, eps, delta, gen, validate=dtype != torch.bfloat16)
        assert (v.accepted == gamma).all(), dtype
        assert (typical.threshold(p, eps, delta) < p.float().amax(-1)).all()


@pytest.mark.parametrize("V", [2, 4])
def test_nothing_clears_the_threshold_uniform(V):
    """δ = ε = 1 on a uniform p (V a power of 2, so τ = exp(−log V) = 1/V exactly): p = τ is
    not > τ, so every draft fails, and "truncated" keeps p >= τ: everything."""
    gen = torch.Generator().manual_seed(12)
    n = 20_000
    p = torch.full((V,), 1 / V)
    assert typical.threshold(p, 1.0, 1.0).item() == 1 / V
    drafts = torch.randint(V, (n, 2), generator=gen)
    for extra in EXTRAS:
        v = typical.verify(drafts, p.expand(n, 3, V), 1.0, 1.0, gen, extra=extra)
        assert (v.accepted == 0).all() and (v.tokens[:, 1:] == -1).all()
        law = extra_law(p, tau_direct(p, 1.0, 1.0), extra)        # p, or one-hot on token 0 for "greedy"
        assert_fits(torch.bincount(v.tokens[:, 0], minlength=V), law, f"{extra}: uniform extra token")
        assert torch.equal(typical.output_distribution(p.double(), torch.tensor(0), 1.0, 1.0, extra=extra), law)
    assert typical.acceptance_rate(p, p, 1.0, 1.0).item() == 0


def test_nothing_clears_the_threshold_falls_back_to_p():
    """δ > 1 can put τ above max p: no draft passes and "truncated" falls back to p.
    And the tie p(x) = τ: rejected, but kept by the truncation (p >= τ)."""
    gen = torch.Generator().manual_seed(13)
    n = 30_000
    p = torch.tensor([0.5, 0.3, 0.2])
    drafts = torch.randint(3, (n, 1), generator=gen)
    for extra in EXTRAS:                                       # τ = min(0.6, 10 exp(−H)) = 0.6
        v = typical.verify(drafts, p.expand(n, 2, 3), 0.6, 10.0, gen, extra=extra)
        assert (v.accepted == 0).all()
        law = extra_law(p, tau_direct(p, 0.6, 10.0), extra)        # p, or one-hot on token 0 for "greedy"
        assert_fits(torch.bincount(v.tokens[:, 0], minlength=3), law, f"{extra}: fallback")
    # τ = 0.5 = p(0): token 0 fails the strict test; the truncated extra keeps only it.
    assert typical.threshold(p, 0.5, 10.0).item() == 0.5
    v = typical.verify(drafts, p.expand(n, 2, 3), 0.5, 10.0, gen, extra="truncated")
    assert (v.accepted == 0).all() and (v.tokens[:, 0] == 0).all()
    r = typical.output_distribution(p, torch.tensor([0.6, 0.2, 0.2]), 0.5, 10.0, extra="truncated")
    assert torch.equal(r, torch.tensor([1.0, 0.0, 0.0]))
    assert typical.acceptance_rate(p, torch.tensor(0), 0.5, 10.0).item() == 0
    assert typical.acceptance_rate(p, torch.tensor(0), 0.5 - 1e-6, 10.0).item() == 1
    v = typical.verify(drafts, p.expand(n, 2, 3), 0.5, 10.0, gen)
    assert_fits(torch.bincount(v.tokens[:, 0], minlength=3), p, "tie, target extra")


@pytest.mark.parametrize("gamma", [1, 6])
def test_truncated_extra_never_falls_below_the_threshold(gamma):
    """V = 1000, random rows: the extra token (after a rejection, or the bonus) has p >= τ."""
    gen = torch.Generator().manual_seed(14)
    B, V = 1000, 1000
    p = mixed_probs(B, gamma + 1, V, gen, torch.float32)
    drafts = torch.multinomial(p[:, :gamma].reshape(-1, V), 1, generator=gen).view(B, gamma)
    v = typical.verify(drafts, p, 0.09, 0.3, gen, extra="truncated")
    rows = torch.arange(B)
    tau = typical.threshold(p[rows, v.accepted])
    extra_token = v.tokens[rows, v.accepted]
    assert (p[rows, v.accepted, extra_token] >= tau).all()
    assert ((v.accepted < gamma).any() and (v.accepted == gamma).any())
    # With extra="target" some extra tokens do fall below it (the truncation does something).
    v = typical.verify(drafts, p, 0.09, 0.3, gen)
    assert (p[rows, v.accepted, v.tokens[rows, v.accepted]] < typical.threshold(p[rows, v.accepted])).any()


# ---------------------------------------------------------------------------------------
# threshold


def test_threshold_is_the_direct_formula():
    gen = torch.Generator().manual_seed(15)
    p = mixed_probs(64, 3, 30, gen)
    for eps, delta in [(0.09, 0.3), (0.0, 0.3), (1.0, 0.0), (0.2, 5.0), (1.0, 1.0)]:
        direct = tau_direct(p, eps, delta)
        tau = typical.threshold(p, eps, delta)
        assert tau.shape == (64, 3) and tau.dtype == F64
        torch.testing.assert_close(tau, direct, rtol=1e-12, atol=0)
        tau32 = typical.threshold(p.float(), eps, delta)
        assert tau32.dtype == torch.float32
        torch.testing.assert_close(tau32.double(), direct, rtol=1e-5, atol=1e-7)
        assert typical.threshold(p.half(), eps, delta).dtype == torch.float32
    # Defaults are Medusa's: ε = 0.09, δ = 0.3.
    torch.testing.assert_close(typical.threshold(p), tau_direct(p, 0.09, 0.3), rtol=1e-12, atol=0)


def test_threshold_with_delta_sqrt_epsilon_is_eta_sampling():
    """With δ = √ε the threshold is η-sampling's cutoff (Hewitt et al.): sampling.probs with
    eta = 0.09 keeps exactly the tokens with p >= threshold(p, 0.09, 0.3), ties aside."""
    gen = torch.Generator().manual_seed(16)
    B, V = 400, 60
    logits = torch.rand(B, 1, generator=gen, dtype=F64) * 6 * torch.randn(B, V, generator=gen, dtype=F64)
    logits[torch.rand(B, V, generator=gen) < 0.1] = float("-inf")
    logits[:, 0] = logits[:, 0].clamp(min=0)                   # a finite entry per row
    p = torch.softmax(logits, -1)
    tau = typical.threshold(p, 0.09, 0.3)
    kept = sampling.probs(logits, eta=0.09) > 0
    clear = (p - tau[:, None]).abs() > 1e-9 * tau[:, None]
    assert clear.float().mean() > 0.99
    assert torch.equal(kept[clear], (p >= tau[:, None])[clear])
    assert kept.sum() < (p > 0).sum()                         # the cutoff removes something
    assert (tau < 0.09).any() and (tau == 0.09).any()         # both branches of the min


# ---------------------------------------------------------------------------------------
# dtypes, seeds, draft_probs, validate


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_inputs_compute_as_their_float32_upcast(dtype):
    gen = torch.Generator().manual_seed(17)
    B, gamma, V = 5000, 3, 12
    p = mixed_probs(B, gamma + 1, V, gen).to(dtype)
    drafts = torch.multinomial(p[:, :gamma].double().reshape(-1, V), 1, generator=gen).view(B, gamma)
    for extra in EXTRAS:
        v = typical.verify(drafts, p, 0.09, 0.3, torch.Generator().manual_seed(1), extra=extra)
        up = typical.verify(drafts, p.float(), 0.09, 0.3, torch.Generator().manual_seed(1), extra=extra,
                            validate=False)
        check_layout(v, drafts, V)
        assert torch.equal(v.tokens, up.tokens) and torch.equal(v.accepted, up.accepted)
        assert (v.accepted < gamma).any() and (v.accepted > 0).any()


def test_float64_computes_in_float64():
    """p(x) above τ = ε by 1e-13: float64 input resolves it and accepts; the same row in
    float32 (where p(x) and ε round to one number) is a tie and rejects."""
    p = torch.tensor([0.6, 0.25, 0.15], dtype=F64)
    eps = 0.6 - 1e-13
    assert typical.threshold(p, eps, 10.0).item() == eps
    drafts = torch.tensor([[0]])
    assert typical.verify(drafts, p.expand(1, 2, 3), eps, 10.0).accepted.item() == 1
    assert typical.verify(drafts, p.float().expand(1, 2, 3), eps, 10.0).accepted.item() == 0
    assert typical.acceptance_rate(p, torch.tensor(0), eps, 10.0).item() == 1


def test_seeds_draft_probs_and_validate_change_nothing():
    gen = torch.Generator().manual_seed(18)
    B, gamma, V = 1000, 3, 9
    p = mixed_probs(B, gamma + 1, V, gen, torch.float32)
    q = random_probs((B, gamma, V), gen, dtype=torch.float32)
    drafts = torch.randint(V, (B, gamma), generator=gen)
    for extra in EXTRAS:
        def go(seed, **kwargs):
            return typical.verify(drafts, p, 0.2, 0.5, torch.Generator().manual_seed(seed), extra=extra, **kwargs)
        first = go(1)
        for v in (go(1), go(1, draft_probs=q), go(1, validate=False), go(1, draft_probs=q, validate=False),
                  go(1, draft_probs=torch.zeros(3))):          # ignored: not even its shape is read
            assert torch.equal(v.tokens, first.tokens) and torch.equal(v.accepted, first.accepted)
        other = go(2)
        assert torch.equal(other.accepted, first.accepted)        # the decision is not random
        if extra == "greedy":                                      # Medusa's extra token is not random
            assert torch.equal(other.tokens, first.tokens)
        else:
            assert not torch.equal(other.tokens, first.tokens)    # the sampled extra token is
        torch.manual_seed(3)
        a = typical.verify(drafts, p, extra=extra)
        torch.manual_seed(3)
        assert torch.equal(a.tokens, typical.verify(drafts, p, extra=extra).tokens)


@pytest.mark.parametrize("extra", EXTRAS)
def test_verify_compiles_without_graph_breaks(extra):
    """fullgraph=True: no host synchronisation with validate=False (see test_speculative)."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, p: typical.verify(x, p, 0.5, 3.0, extra=extra, validate=False),
                             fullgraph=True)
    eye = torch.eye(4)
    drafts = torch.tensor([[1, 3], [2, 2], [0, 1]])
    p = torch.cat([eye[drafts], eye[[3, 0, 2]][:, None]], 1)      # one-hot on the drafts: all kept
    v = compiled(drafts, p)
    assert v.tokens.tolist() == [[1, 3, 3], [2, 2, 0], [0, 1, 2]] and v.accepted.tolist() == [2, 2, 2]
    p[:, 1] = torch.tensor([0.7, 0.3, 0.0, 0.0])                  # τ = 0.5: x_2 fails
    v = compiled(drafts, p)
    assert v.accepted.tolist() == [1, 1, 1] and (v.tokens[:, 2] == -1).all()
    assert (v.tokens[:, 1] == 0).all() if extra == "truncated" else v.tokens[:, 1].lt(2).all()
    check_layout(v, drafts, 4)


# ---------------------------------------------------------------------------------------
# In the decoding engine

GPT_V = 7


def tiny(seed: int, n_layer: int, n_embd: int, scale: float = 1.0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=GPT_V, n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=64))
    with torch.no_grad():   # sharper logits than GPT-2's init: at T = 0.7 some tokens fall below τ
        model.transformer.wte.weight.mul_(scale)
    return model.to(F64).eval()


@pytest.fixture(scope="module")
def pair():
    return tiny(0, 2, 32, scale=3.0), tiny(1, 1, 16)


def prompts(B: int, P: int) -> torch.Tensor:
    return torch.randint(0, GPT_V, (B, P), generator=torch.Generator().manual_seed(0))


RULES = {extra: typical.TypicalAcceptance(extra=extra) for extra in ("greedy", "target", "truncated")}


def proposer(model, mode: str):
    return generate.DraftModel(model, greedy=mode == "greedy")


@pytest.mark.parametrize("mode", ["sample", "greedy"])
@pytest.mark.parametrize("rule", RULES)
def test_greedy_generation_equals_greedy_autoregressive(pair, rule, mode):
    """T = 0: p is one-hot, only the argmax passes and the extra token is the argmax."""
    target, draft = pair
    prompt = prompts(4, 3)
    greedy = sampling.Warp(temperature=0)
    reference = generate.autoregressive(target, prompt, 40, warp=greedy)
    out = generate.speculative(target, proposer(draft, mode), prompt, 40, gamma=3, rule=RULES[rule], warp=greedy)
    assert torch.equal(out.tokens, reference.tokens)
    assert 0 < out.alpha < 1                                       # the weak draft is rejected sometimes
    out = generate.speculative(target, proposer(target, mode), prompt, 40, gamma=3, rule=RULES[rule], warp=greedy)
    assert torch.equal(out.tokens, reference.tokens) and out.alpha == 1.0


@pytest.mark.parametrize("mode", ["sample", "greedy"])
@pytest.mark.parametrize("rule", RULES)
def test_sampled_generation_statistics_add_up(pair, rule, mode):
    target, draft = pair
    gamma, new = 3, 40
    warm = sampling.Warp(temperature=0.7)
    out = generate.speculative(target, proposer(draft, mode), prompts(4, 3), new, gamma=gamma, rule=RULES[rule],
                               warp=warm, seed=0)
    assert out.tokens.shape == (4, new) and out.tokens.dtype == torch.long
    assert ((out.tokens >= 0) & (out.tokens < GPT_V)).all()
    lengths = out.accepted_lengths
    live = lengths >= 0
    assert ((lengths >= -1) & (lengths <= gamma)).all()
    assert out.accepted == int(lengths[live].sum()) <= out.drafted == gamma * int(live.sum())
    assert out.examined == out.accepted + int((live & (lengths < gamma)).sum())
    assert 0 < out.alpha < 1
    assert ((lengths + 1) * live).sum(0).min() >= new
    assert out.target_passes == out.steps + 1
    # The target as its own greedy draft proposes its argmax, which always passes (δ < 1).
    if mode == "greedy":
        self_draft = generate.speculative(target, proposer(target, "greedy"), prompts(4, 3), new, gamma=gamma,
                                          rule=RULES[rule], warp=warm, seed=0)
        assert self_draft.alpha == 1.0


def test_medusa_greedy_extra_is_deterministic_at_every_temperature(pair):
    """With greedy drafts and Medusa's own extra token, nothing in a step is random: the
    output is a deterministic function of the prompt at T > 0 (issue 11), whatever the seed."""
    target, draft = pair
    warm = sampling.Warp(temperature=0.9)
    runs = [generate.speculative(target, proposer(draft, "greedy"), prompts(4, 3), 30, gamma=3,
                                 rule=RULES["greedy"], warp=warm, seed=seed).tokens for seed in (0, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    sampled = [generate.speculative(target, proposer(draft, "greedy"), prompts(4, 3), 30, gamma=3,
                                    rule=RULES["target"], warp=warm, seed=seed).tokens for seed in (0, 1)]
    assert not torch.equal(sampled[0], sampled[1])                 # the sampled extra token is random


# ---------------------------------------------------------------------------------------
# The symbolic derivation against the code


@pytest.mark.parametrize("extra", EXTRAS)
def test_typical_one_position_closed_form_is_output_distribution(extra):
    """proofs.typical_one_position's closed form, evaluated at numbers, is output_distribution."""
    gen = torch.Generator().manual_seed(19)
    V = 3
    for _ in range(4):
        p, q = random_probs((V,), gen, zeros=0.2), random_probs((V,), gen)
        for eps, delta in [(0.09, 0.3), (0.3, 1.0), (0.0, 0.0)]:
            tau = tau_direct(p, eps, delta)
            A = tuple(bool(a) for a in p > tau)
            e = extra_law(p, tau, extra)
            claims = dict(proofs.typical_one_position(V))[A]
            values = {sp.Symbol(f"q{i + 1}", positive=True): float(q[i]) for i in range(V - 1)}
            values.update({sp.Symbol(f"e{i + 1}", positive=True): float(e[i]) for i in range(V - 1)})
            closed = torch.tensor([float(c.rhs.subs(values)) for c in claims], dtype=F64)
            r = typical.output_distribution(p, q, eps, delta, extra=extra)
            torch.testing.assert_close(r, closed, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Validation

X = torch.tensor([[0, 1, 2], [3, 4, 0]])
P = torch.full((2, 4, 5), 0.2)


BAD_VERIFY = {
    "epsilon negative": (dict(epsilon=-0.1), ValueError, r"`epsilon` must lie in \[0, 1\]"),
    "epsilon above 1": (dict(epsilon=1.5), ValueError, r"`epsilon` must lie in \[0, 1\]"),
    "epsilon NaN": (dict(epsilon=float("nan")), ValueError, "`epsilon` must be finite"),
    "epsilon bool": (dict(epsilon=True), checks.InputTypeError, "`epsilon` must be a real number"),
    "epsilon string": (dict(epsilon="0.1"), checks.InputTypeError, "`epsilon` must be a real number"),
    "delta negative": (dict(delta=-0.3), ValueError, r"`delta` must lie in \[0, inf\]"),
    "delta inf": (dict(delta=float("inf")), ValueError, "`delta` must be finite"),
    "delta bool": (dict(delta=False), checks.InputTypeError, "`delta` must be a real number"),
    "extra bogus": (dict(extra="bogus"), ValueError, "`extra` must be one of"),
    "extra None": (dict(extra=None), ValueError, "`extra` must be one of"),
    "draft_tokens float": (dict(draft_tokens=X.float()), checks.InputTypeError, "`draft_tokens`.*int64"),
    "draft_tokens int32": (dict(draft_tokens=X.int()), checks.InputTypeError, "`draft_tokens`.*int64"),
    "draft_tokens list": (dict(draft_tokens=X.tolist()), checks.InputTypeError, "`draft_tokens`"),
    "draft_tokens 1-D": (dict(draft_tokens=X[0]), ValueError, "`draft_tokens`.*shape"),
    "gamma 0": (dict(draft_tokens=X[:, :0], target_probs=P[:, :1]), ValueError, "gamma >= 1"),
    "target_probs gamma": (dict(target_probs=P[:, :3]), ValueError, "`target_probs`.*shape"),
    "target_probs batch": (dict(target_probs=P[:1]), ValueError, "`target_probs`.*shape"),
    "target_probs 2-D": (dict(target_probs=P[:, 0]), ValueError, "`target_probs`.*shape"),
    "target_probs int": (dict(target_probs=P.long()), checks.InputTypeError, "`target_probs`.*floating"),
    "target_probs sum": (dict(target_probs=_with(P, (1, 2, 0), 0.5)), ValueError, "`target_probs`.*not 1"),
    "target_probs negative": (dict(target_probs=_with(_with(P, (0, 0, 0), -0.2), (0, 0, 1), 0.6)), ValueError,
                              "`target_probs`.*negative"),
    "target_probs NaN": (dict(target_probs=_with(P, (0, 3, 4), float("nan"))), ValueError, "`target_probs`.*NaN"),
    "token id too large": (dict(draft_tokens=_with(X, (1, 2), 5)), ValueError, "`draft_tokens`.*token ids"),
    "token id negative": (dict(draft_tokens=_with(X, (0, 0), -1)), ValueError, "`draft_tokens`.*token ids"),
    "draft_probs list": (dict(draft_probs=[[0.2] * 5]), checks.InputTypeError, "`draft_probs` must be a tensor"),
    "generator int": (dict(generator=0), checks.InputTypeError, "`generator`"),
    "one device": (dict(draft_tokens=X.to("meta")), ValueError, "one device"),
}


@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("kwargs, error, match", BAD_VERIFY.values(), ids=BAD_VERIFY.keys())
def test_verify_rejects_bad_inputs(kwargs, error, match, extra):
    args = dict(draft_tokens=X, target_probs=P, extra=extra)
    args.update(kwargs)
    with pytest.raises(error, match=match) as info:
        typical.verify(**args)
    assert isinstance(info.value, ValueError)


def test_validate_false_checks_shapes_but_not_values():
    with pytest.raises(ValueError, match="`target_probs`.*shape"):
        typical.verify(X, P[:, :3], validate=False)
    with pytest.raises(ValueError, match="`epsilon`"):
        typical.verify(X, P, epsilon=2.0, validate=False)
    v = typical.verify(X, P * 0.9, validate=False)
    assert v.tokens.shape == (2, 4)


p5 = torch.full((2, 5), 0.2)
BAD_LAW = {
    "p not summing": (dict(p=_with(p5, (0, 0), 0.5)), ValueError, "`p`.*not 1"),
    "p int": (dict(p=p5.long()), checks.InputTypeError, "`p`.*floating"),
    "p list": (dict(p=p5.tolist()), checks.InputTypeError, "`p`"),
    "draft list": (dict(draft=[0, 1]), checks.InputTypeError, "`draft` must be a tensor"),
    "draft int32": (dict(draft=torch.tensor([0, 1], dtype=torch.int32)), checks.InputTypeError, "`draft`.*int64"),
    "draft bool": (dict(draft=torch.tensor([True, False])), checks.InputTypeError, "`draft`"),
    "draft ids shape": (dict(draft=torch.tensor([0, 1, 2])), ValueError, "token-id `draft` must have shape"),
    "draft ids 2-D": (dict(draft=torch.tensor([[0], [1]])), ValueError, "token-id `draft` must have shape"),
    "draft id too large": (dict(draft=torch.tensor([0, 5])), ValueError, r"`draft` token ids must lie in \[0, 5\)"),
    "draft id negative": (dict(draft=torch.tensor([-1, 0])), ValueError, "`draft` token ids"),
    "draft probs shape": (dict(draft=torch.full((2, 4), 0.25)), ValueError,
                          "`draft` probabilities must have the shape"),
    "draft probs sum": (dict(draft=_with(p5, (1, 1), 0.9)), ValueError, "`draft`.*not 1"),
    "draft probs negative": (dict(draft=_with(_with(p5, (1, 1), -0.1), (1, 2), 0.5)), ValueError,
                             "`draft`.*negative"),
    "draft on meta": (dict(draft=torch.tensor([0, 1], device="meta")), ValueError, "`draft` is on meta"),
    "epsilon": (dict(epsilon=-1.0), ValueError, "`epsilon`"),
    "delta": (dict(delta=float("nan")), ValueError, "`delta`"),
}


@pytest.mark.parametrize("fn", [typical.output_distribution, typical.acceptance_rate],
                         ids=["output_distribution", "acceptance_rate"])
@pytest.mark.parametrize("kwargs, error, match", BAD_LAW.values(), ids=BAD_LAW.keys())
def test_laws_reject_bad_inputs(fn, kwargs, error, match):
    args = dict(p=p5, draft=torch.tensor([0, 1]))
    args.update(kwargs)
    with pytest.raises(error, match=match) as info:
        fn(**args)
    assert isinstance(info.value, ValueError)


def test_threshold_and_output_distribution_reject_bad_arguments():
    with pytest.raises(ValueError, match="`probs`.*not 1"):
        typical.threshold(torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="`epsilon`"):
        typical.threshold(p5, epsilon=1.01)
    with pytest.raises(checks.InputTypeError, match="`delta`"):
        typical.threshold(p5, delta=None)
    with pytest.raises(ValueError, match="`extra` must be one of"):
        typical.output_distribution(p5, torch.tensor([0, 1]), extra="p")
    assert typical.EXTRA == ("greedy", "target", "truncated")


# ---------------------------------------------------------------------------------------
# Medusa's rule as shipped (issue 11)


def medusa_step(logits: torch.Tensor, candidate: torch.Tensor, temperature: float,
                posterior_threshold: float = 0.09, posterior_alpha: float = 0.3):
    """Medusa's decision for one chain candidate, as its code makes it (written here from
    the semantics of ``evaluate_posterior``'s fast typical branch and ``generate_candidates``
    in FasterDecoding/Medusa, medusa/model/utils.py @ 2b89814, not from the library).

    ``logits`` [γ+1, V] are the base model's logits at the candidate's positions (row i
    judges candidate token i + 1; the last row follows the whole candidate); ``candidate``
    [γ] are the head tokens after the greedy first token. Returns ``(accept_length,
    next_first_token)``: Medusa keeps candidate[:accept_length], and its next step starts
    with argmax of the logits at position accept_length.
    """
    probs = torch.softmax(logits.float()[None, :-1] / temperature, dim=-1)          # [1, γ, V]
    cand_p = probs.gather(-1, candidate[None, :, None]).squeeze(-1)                # [1, γ]
    H = -(probs * torch.log(probs + 1e-5)).sum(-1)
    thr = torch.minimum(torch.full_like(H, posterior_threshold), torch.exp(-H) * posterior_alpha)
    mask = cand_p > thr
    accept_length = int(mask.long().cumprod(dim=1).sum(dim=1)[0])
    next_first = int(torch.argmax(logits[accept_length]))                          # generate_candidates, T = 0
    return accept_length, next_first


def medusa_cases(n: int, seed: int):
    """Random steps: logits at random scales and temperatures, candidates that are the
    target's k-th most likely token (k = 0..3, as Medusa's top-k heads propose)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        V = int(torch.randint(3, 60, (), generator=gen))
        gamma = int(torch.randint(1, 6, (), generator=gen))
        scale = float(torch.rand((), generator=gen)) * 6
        T = 0.2 + 1.3 * float(torch.rand((), generator=gen))
        logits = (scale * torch.randn(gamma + 1, V, generator=gen)).float()
        rank = torch.randint(0, min(4, V), (gamma,), generator=gen)
        rank = torch.where(torch.rand(gamma, generator=gen) < 0.6, 0, rank)
        order = logits[:-1].argsort(dim=-1, descending=True)
        candidate = order.gather(1, rank[:, None]).squeeze(1)
        yield logits, candidate, T


def test_medusa_entropy_reproduces_medusas_decision_exactly():
    """TypicalAcceptance(extra="greedy", entropy="medusa") makes Medusa's decision: the same
    accepted length and, as the extra token, the next step's greedy first token."""
    lengths, in_gap = [], 0
    for i, (logits, candidate, T) in enumerate(medusa_cases(600, 31)):
        p = torch.softmax(logits / T, dim=-1)
        epsilon, delta = 0.09, 0.3
        if i % 2:
            # Put the first candidate between the exact threshold and Medusa's (ε = 1, δ
            # chosen): only Medusa's own entropy form decides these as Medusa does.
            row = p[0].double()
            exact_H = torch.special.entr(row).sum()
            medusa_H = -(row * torch.log(row + 1e-5)).sum()
            epsilon, delta = 1.0, (row[candidate[0]] * torch.exp((exact_H + medusa_H) / 2)).item()
            in_gap += 1
        accept_length, first = medusa_step(logits, candidate, T, epsilon, delta)
        rule = typical.TypicalAcceptance(epsilon, delta, extra="greedy", entropy="medusa")
        v = rule.verify(candidate[None], None, p[None])
        assert int(v.accepted) == accept_length, i
        assert int(v.tokens[0, accept_length]) == first
        assert torch.equal(v.tokens[0, :accept_length], candidate[:accept_length])
        lengths.append(accept_length)
        if i % 2:   # and there the exact form (the default) accepts the first candidate
            assert accept_length == 0
            assert int(typical.TypicalAcceptance(epsilon, delta).verify(candidate[None], None, p[None]).accepted) >= 1
    gammas = torch.tensor(lengths)
    assert (gammas == 0).any() and (gammas >= 2).any()          # both outcomes are exercised


def test_exact_entropy_agrees_with_medusa_outside_the_gap_between_thresholds():
    """The default (exact entropy) decides as Medusa's code except where p(x) lies between
    the exact threshold and Medusa's (−Σ p log(p + 1e-5) is smaller, so its τ is larger)."""
    rule = typical.TypicalAcceptance()
    assert rule.extra == "greedy" and rule.entropy == "exact"
    same = differ = 0
    for logits, candidate, T in medusa_cases(1500, 32):
        p = torch.softmax(logits / T, dim=-1)
        accept_length, first = medusa_step(logits, candidate, T)
        v = rule.verify(candidate[None], None, p[None])
        if int(v.accepted) == accept_length:
            same += 1
            assert int(v.tokens[0, accept_length]) == first
            continue
        differ += 1
        n = min(int(v.accepted), accept_length)                 # the first position judged differently
        assert int(v.accepted) > accept_length                  # only Medusa's larger τ can reject more
        row = p[n].double()
        x = candidate[n]
        tau_exact = typical.threshold(row, 0.09, 0.3).item()
        tau_medusa = typical.threshold(row, 0.09, 0.3, entropy="medusa").item()
        assert tau_exact * (1 - 1e-6) <= row[x].item() <= tau_medusa * (1 + 1e-6)
    assert differ <= 0.01 * (same + differ), (same, differ)


def test_medusa_entropy_form_is_smaller_than_the_exact_entropy():
    gen = torch.Generator().manual_seed(33)
    p = mixed_probs(200, 1, 40, gen).squeeze(1)
    exact = typical.threshold(p, 1.0, 0.3)
    medusa = typical.threshold(p, 1.0, 0.3, entropy="medusa")
    assert (medusa >= exact).all() and (medusa > exact).any()
    H = -(p * torch.log(p + 1e-5)).sum(-1)
    torch.testing.assert_close(medusa, 0.3 * torch.exp(-H), rtol=1e-12, atol=0)


@pytest.mark.parametrize("extra", EXTRAS)
def test_greedy_extra_is_the_argmax_at_the_first_failure(extra):
    """Known answer: row 0 fails at position 1, row 1 passes all (bonus at γ+1)."""
    p = torch.tensor([[[0.7, 0.2, 0.1], [0.05, 0.35, 0.6], [0.5, 0.4, 0.1]],
                      [[0.7, 0.2, 0.1], [0.05, 0.35, 0.6], [0.2, 0.2, 0.6]]])
    x = torch.tensor([[0, 0], [0, 2]])
    v = typical.verify(x, p, 0.09, 0.3, torch.Generator().manual_seed(0), extra=extra)
    assert torch.equal(v.accepted, torch.tensor([1, 2]))
    if extra == "greedy":
        assert torch.equal(v.tokens, torch.tensor([[0, 2, -1], [0, 2, 2]]))     # argmax p_2, argmax p_3
        r = typical.output_distribution(p[0, 1], torch.tensor(0), extra="greedy")
        assert torch.equal(r, torch.tensor([0.0, 0.0, 1.0]))


# ---------------------------------------------------------------------------------------
# Bad input and edge cases (issue 10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_uniform_target_at_delta_one_never_passes(dtype):
    """The tie p(x) = δ exp(−H) = 1/V at δ = 1: a tie fails, for every V and dtype (without the
    rounding margin of the tie rule, about half of all V would pass in float32)."""
    for V in list(range(2, 65)) + [1000, 50257, 262144]:
        p = torch.full((1, 3, V), 1.0 / V, dtype=dtype)
        x = torch.zeros(1, 2, dtype=torch.long)
        for extra in EXTRAS:
            v = typical.verify(x, p, 1.0, 1.0, torch.Generator().manual_seed(0), extra=extra, validate=False)
            assert int(v.accepted) == 0, (V, dtype, extra)
        row = p[0, 0]
        assert typical.acceptance_rate(row, row, 1.0, 1.0).item() == 0, (V, dtype)
        assert typical.acceptance_rate(row, torch.tensor(V - 1), 1.0, 1.0).item() == 0, (V, dtype)


def test_tie_margin_changes_no_decision_beyond_rounding():
    """Drafts 1e-4 above (below) δ exp(−H), relatively, pass (fail): the margin only absorbs rounding."""
    gen = torch.Generator().manual_seed(34)
    p = mixed_probs(500, 1, 30, gen, torch.float32).squeeze(1)
    x = torch.randint(30, (500,), generator=gen)
    p_x = p.gather(1, x[:, None]).squeeze(1).double()
    H = torch.special.entr(p.double()).sum(-1)
    keep = p_x > 1e-3
    for factor, expected in ((1 + 1e-4, 1.0), (1 - 1e-4, 0.0)):
        for i in torch.nonzero(keep).flatten()[:100].tolist():
            delta = (p_x[i] * torch.exp(H[i]) / factor).item()         # δ exp(−H) = p(x) / factor
            assert typical.acceptance_rate(p[i], x[i], 1.0, delta).item() == expected


def test_16bit_rows_are_normalised_before_the_test():
    """bf16 [0.50390625, 0.50390625] sums to 1.0078 (within the 16-bit tolerance) and encodes
    [0.5, 0.5]: with ε = 0.5 neither token passes (0.5 is not > 0.5), although the raw
    entries exceed 0.5."""
    row = torch.tensor([0.50390625, 0.50390625], dtype=torch.bfloat16)
    p = row.expand(4, 2, 2)
    x = torch.tensor([[0], [1], [0], [1]])
    for extra in EXTRAS:
        v = typical.verify(x, p, 0.5, 10.0, torch.Generator().manual_seed(0), extra=extra)
        assert (v.accepted == 0).all()
    assert typical.acceptance_rate(row, torch.tensor(0), 0.5, 10.0).item() == 0
    assert typical.threshold(row, 1.0, 1.0).item() == pytest.approx(0.5, rel=1e-6)   # H of the normalised row
    torch.testing.assert_close(typical.output_distribution(row, torch.tensor(0), 0.5, 10.0),
                               torch.tensor([0.5, 0.5]), rtol=0, atol=1e-7)


def test_empty_batches_in_the_laws():
    p = torch.zeros(0, 5)
    assert typical.threshold(p).shape == (0,)
    assert typical.acceptance_rate(p, torch.zeros(0, dtype=torch.long)).shape == (0,)
    assert typical.acceptance_rate(p, torch.zeros(0, 5)).shape == (0,)
    for extra in EXTRAS:
        assert typical.output_distribution(p, torch.zeros(0, dtype=torch.long), extra=extra).shape == (0, 5)
    assert typical.output_distribution(torch.zeros(2, 0, 5), torch.zeros(2, 0, 5)).shape == (2, 0, 5)
    v = typical.TypicalAcceptance().verify(torch.zeros(0, 2, dtype=torch.long), None, torch.zeros(0, 3, 5))
    assert v.tokens.shape == (0, 3)


def test_entropy_option_is_validated():
    p5 = torch.full((5,), 0.2)
    for fn in (typical.threshold, functools.partial(typical.acceptance_rate, draft=torch.tensor(0)),
               functools.partial(typical.output_distribution, draft=torch.tensor(0))):
        with pytest.raises(ValueError, match="`entropy`"):
            fn(p5, entropy="nats")
    with pytest.raises(ValueError, match="`entropy`"):
        typical.verify(torch.zeros(1, 1, dtype=torch.long), p5.expand(1, 2, 5), entropy=None)
