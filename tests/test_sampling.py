"""Tests for :mod:`typsamp.sampling`: temperature, truncation rules, entropy, sampling.

The truncation rules are checked token for token against the Hugging Face
``transformers`` warpers (the reference the module promises to match), then by
properties (hypothesis), by exact special cases and, for :func:`sample`, by a
chi-square goodness-of-fit test. Every random input has a fixed seed.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from typsamp import checks, stats
from typsamp.sampling import RowSeeds, Warp, entropy, probs, sample, sample_weights, uniform

NEG_INF = float("-inf")
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Float32 default tolerance of torch.testing.assert_close, used for every dtype.
F32_TOL = dict(rtol=1.3e-6, atol=1e-5)
PROPERTY = settings(deadline=None, max_examples=80, derandomize=True)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sampling computes (and returns) in for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_logits(shape, dtype, kind, seed):
    """Random logits: 'normal', integer-valued 'ties', or 'neginf' (some entries -inf)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "ties":
        z = torch.randint(-4, 5, shape, generator=gen).double()
    else:
        z = 2.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "neginf":
        masked = torch.rand(shape, generator=gen) < 0.4
        keep = torch.randint(shape[-1], (*shape[:-1], 1), generator=gen)
        masked.scatter_(-1, keep, False)  # every row keeps a finite entry
        z = z.masked_fill(masked, NEG_INF)
    return z.to(dtype)


def hf_reference(logits, temperature=1.0, top_k=None, top_p=None, min_p=None,
                 typical_p=None, epsilon_cutoff=None, eta=None):
    """The transformers warpers, in generate()'s order, then softmax.

    Runs on ``logits.float()`` (float64 stays float64), flattened to the 2-D batch the
    warpers require.
    """
    warpers = [TemperatureLogitsWarper(float(temperature))]
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    if min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=min_p))
    if typical_p is not None:
        warpers.append(TypicalLogitsWarper(mass=typical_p))
    if epsilon_cutoff is not None:
        warpers.append(EpsilonLogitsWarper(epsilon=epsilon_cutoff))
    if eta is not None:
        warpers.append(EtaLogitsWarper(epsilon=eta))
    scores = logits.to(compute_dtype(logits.dtype)).reshape(-1, logits.shape[-1])
    input_ids = torch.zeros((scores.shape[0], 1), dtype=torch.long)
    for warper in warpers:
        scores = warper(input_ids, scores)
    return torch.softmax(scores, dim=-1).reshape(logits.shape)


def assert_same_distribution(ours, ref):
    assert ours.dtype == ref.dtype
    assert ours.shape == ref.shape
    assert torch.equal(ours > 0, ref > 0), "supports differ"
    torch.testing.assert_close(ours, ref, **F32_TOL)


# ---------------------------------------------------------------------------------------
# Equality with the transformers warpers

SHAPES = [(1, 5), (4, 84), (3, 1000), (2, 3, 50)]
KINDS = ["normal", "ties", "neginf"]
CASES = (
    [(shape, torch.float32, kind) for shape in SHAPES for kind in KINDS]
    + [((4, 84), dtype, kind) for dtype in (torch.float16, torch.bfloat16, torch.float64)
       for kind in KINDS]
    + [((2, 3, 50), dtype, "neginf") for dtype in (torch.bfloat16, torch.float64)]
)
CASE_PARAMS = [
    pytest.param(shape, dtype, kind, 1000 + i,
                 id=f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{kind}")
    for i, (shape, dtype, kind) in enumerate(CASES)
]

RULES = {
    "temperature-only": {},
    "top_k=1": dict(top_k=1),
    "top_k=7": dict(top_k=7),
    "top_k>=V": dict(top_k=10**6),
    "top_p=0.3": dict(top_p=0.3),
    "top_p=0.9": dict(top_p=0.9),
    "top_p=1": dict(top_p=1.0),
    "min_p=0.05": dict(min_p=0.05),
    "min_p=0.4": dict(min_p=0.4),
    "typical_p=0.2": dict(typical_p=0.2),
    "typical_p=0.9": dict(typical_p=0.9),
    "epsilon_cutoff=3e-4": dict(epsilon_cutoff=3e-4),
    "epsilon_cutoff=0.05": dict(epsilon_cutoff=0.05),
    "eta=3e-4": dict(eta=3e-4),
    "eta=0.05": dict(eta=0.05),
    "chain-loose": dict(top_k=50, top_p=0.95, min_p=0.01, typical_p=0.95, epsilon_cutoff=1e-4, eta=1e-4),
    "chain-strict": dict(top_k=20, top_p=0.8, min_p=0.05, typical_p=0.7, epsilon_cutoff=1e-3, eta=3e-3),
}
# Rules that leave every token with positive probability in place; all others must
# actually cut something on a large vocabulary, or the equality test proves little.
NON_TRUNCATING = {"temperature-only", "top_k>=V", "top_p=1"}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
@pytest.mark.parametrize("shape, dtype, kind, seed", CASE_PARAMS)
def test_matches_transformers(shape, dtype, kind, seed, rule, temperature):
    logits = make_logits(shape, dtype, kind, seed)
    ours = probs(logits, temperature=temperature, **rule)
    assert_same_distribution(ours, hf_reference(logits, temperature, **rule))


@pytest.mark.parametrize("name", sorted(set(RULES) - NON_TRUNCATING))
def test_reference_rules_truncate(name):
    """Guard for the equality test: each truncating configuration does cut tokens."""
    logits = make_logits((3, 1000), torch.float32, "normal", seed=7)
    ref = hf_reference(logits, 1.0, **RULES[name])
    assert (ref > 0).sum() < logits.numel()
    assert (probs(logits, **RULES[name]) > 0).sum() < logits.numel()


@st.composite
def logits_tensors(draw, dtypes=tuple(DTYPES)):
    """Logits of 1 to 3 dims, with ties, -inf entries and at least one finite per row."""
    batch = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    vocab = draw(st.integers(1, 24))
    value = st.one_of(
        st.floats(-20, 20, allow_nan=False, width=32),
        st.integers(-3, 3).map(float),
        st.just(NEG_INF),
    )
    n_rows = math.prod(batch)
    rows = draw(st.lists(st.lists(value, min_size=vocab, max_size=vocab),
                         min_size=n_rows, max_size=n_rows))
    z = torch.tensor(rows, dtype=torch.float64)
    for row, keep in enumerate(draw(st.lists(st.integers(0, vocab - 1),
                                             min_size=n_rows, max_size=n_rows))):
        if torch.isinf(z[row]).all():
            z[row, keep] = 0.0
    return z.reshape(*batch, vocab).to(draw(st.sampled_from(dtypes)))


TEMPERATURES = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.05, 5.0))
RULE_PARAMS = {
    "top_k": st.integers(1, 30),
    "top_p": st.floats(0.01, 1.0),
    "min_p": st.floats(0.0, 1.0),
    "typical_p": st.floats(0.01, 0.99),
    "epsilon_cutoff": st.floats(1e-4, 0.99),
    "eta": st.floats(1e-4, 0.99),
}
RULE_SETS = st.fixed_dictionaries({}, optional=RULE_PARAMS)


@PROPERTY
@given(logits=logits_tensors(), temperature=st.floats(0.05, 5.0), rules=RULE_SETS)
def test_matches_transformers_property(logits, temperature, rules):
    ours = probs(logits, temperature=temperature, **rules)
    assert_same_distribution(ours, hf_reference(logits, temperature, **rules))


# ---------------------------------------------------------------------------------------
# Temperature: 0 is greedy, 1 is the model itself, small T tends to greedy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kind", [((4, 84), "ties"), ((2, 3, 50), "neginf"), ((7,), "normal")])
def test_temperature_zero_is_one_hot_argmax(shape, kind, dtype):
    logits = make_logits(shape, dtype, kind, seed=3)
    expected = torch.nn.functional.one_hot(logits.float().argmax(dim=-1), shape[-1])
    out = probs(logits, temperature=0)
    assert out.dtype == compute_dtype(dtype)
    assert torch.equal(out, expected.to(out.dtype))


def test_temperature_zero_ties_pick_lowest_index():
    logits = torch.tensor([[1.0, 3.0, 3.0], [5.0, 5.0, 5.0], [NEG_INF, 2.0, 2.0], [0.0, NEG_INF, 0.0]])
    out = probs(logits, temperature=0.0)
    assert torch.equal(out.argmax(dim=-1), torch.tensor([1, 0, 1, 0]))
    assert torch.equal(out.sum(dim=-1), torch.ones(4))
    assert torch.equal((out > 0).sum(dim=-1), torch.ones(4, dtype=torch.long))


def test_temperature_zero_ignores_truncation_but_validates_it():
    logits = make_logits((3, 40), torch.float32, "normal", seed=4)
    greedy = probs(logits, temperature=0)
    assert torch.equal(probs(logits, temperature=0, **RULES["chain-strict"]), greedy)
    with pytest.raises(ValueError, match="`top_p`"):
        probs(logits, temperature=0, top_p=1.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_temperature_one_is_softmax(kind, dtype):
    logits = make_logits((3, 2, 60), dtype, kind, seed=5)
    expected = torch.softmax(logits.to(compute_dtype(dtype)), dim=-1)
    torch.testing.assert_close(probs(logits), expected, **F32_TOL)
    torch.testing.assert_close(probs(logits, temperature=1), expected, **F32_TOL)


def test_small_temperature_approaches_argmax():
    logits = make_logits((5, 100), torch.float32, "normal", seed=6)
    temperatures = [2.0, 1.0, 0.5, 0.1, 0.03, 0.01]
    top = torch.stack([probs(logits, temperature=t).amax(dim=-1) for t in temperatures])
    assert (top.diff(dim=0) >= 0).all(), "max probability must grow as T falls"
    assert (top[0] < 0.9).all()
    # Distinct integer logits (gap >= 1): at T = 0.01 the rest weighs exp(-100) ~ 0.
    gen = torch.Generator().manual_seed(6)
    distinct = torch.stack([torch.randperm(100, generator=gen) for _ in range(5)]).float()
    torch.testing.assert_close(probs(distinct, temperature=0.01), probs(distinct, temperature=0))


@pytest.mark.parametrize("logits, temperature, dtype", [
    pytest.param([[1.0, 2.0, 0.5]], 1e-40, torch.float32, id="tiny-temperature"),
    pytest.param([[1.0, 2.0, 0.5]], 1e-46, torch.float32, id="temperature-rounds-to-0-in-f32"),
    pytest.param([[3e38, 0.0]], 0.5, torch.float32, id="huge-finite-logit"),
    pytest.param([[1.0, 2.0]], 1e-310, torch.float64, id="subnormal-f64-temperature"),
    pytest.param([[1.0, 2.0, 0.5], [0.0, -1.0, 4.0]], 1e-40, torch.float32, id="batch"),
])
def test_extreme_but_valid_inputs_do_not_give_nan(logits, temperature, dtype):
    """z / T overflowing must still give the T -> 0 limit: the argmax, never NaN."""
    logits = torch.tensor(logits, dtype=dtype)
    out = probs(logits, temperature=temperature)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, probs(logits, temperature=0))


def test_overflowing_temperature_splits_tied_maxima_evenly():
    # lim_{T->0+} softmax(z/T) puts equal mass on tied maxima (T = 0 itself is defined
    # as one-hot on the lowest index); -inf entries stay at 0.
    logits = torch.tensor([[1.0, 2.0, 2.0, float("-inf")]])
    out = probs(logits, temperature=1e-50)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5, 0.5, 0.0]]))


def test_overflow_rescue_leaves_other_rows_untouched():
    # Only the row that overflows is recomputed; the others equal plain z / T.
    logits = torch.tensor([[3e38, 0.0, 1.0], [0.5, 0.1, -0.2]])
    out = probs(logits, temperature=0.5)
    torch.testing.assert_close(out[1], torch.softmax(logits[1] / 0.5, dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(out[0], torch.tensor([1.0, 0.0, 0.0]))


# ---------------------------------------------------------------------------------------
# Properties of probs


@PROPERTY
@given(logits=logits_tensors(), temperature=TEMPERATURES, rules=RULE_SETS)
def test_probs_is_a_distribution_of_right_shape_and_dtype(logits, temperature, rules):
    out = probs(logits, temperature=temperature, **rules)
    assert out.shape == logits.shape
    assert out.dtype == compute_dtype(logits.dtype)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(dim=-1), torch.ones(logits.shape[:-1], dtype=out.dtype),
                               rtol=0, atol=1e-5)
    assert (out[logits == NEG_INF] == 0).all(), "a -inf logit must get probability 0"


# name -> True when a larger value is stricter (removes more)
STRICTER_WHEN_LARGER = {"top_k": False, "top_p": False, "typical_p": False,
                        "min_p": True, "epsilon_cutoff": True, "eta": True}


@pytest.mark.parametrize("name", STRICTER_WHEN_LARGER)
@PROPERTY
@given(data=st.data(), logits=logits_tensors(), temperature=st.floats(0.05, 5.0))
def test_support_shrinks_with_stricter_truncation(name, data, logits, temperature):
    a, b = data.draw(RULE_PARAMS[name]), data.draw(RULE_PARAMS[name])
    strict, loose = (max(a, b), min(a, b)) if STRICTER_WHEN_LARGER[name] else (min(a, b), max(a, b))
    kept_strict = probs(logits, temperature=temperature, **{name: strict}) > 0
    kept_loose = probs(logits, temperature=temperature, **{name: loose}) > 0
    assert not (kept_strict & ~kept_loose).any(), f"{name}={strict} keeps a token {name}={loose} drops"


# Every rule but typical_p keeps a most likely token (typical_p may not: see below).
ARGMAX_KEEPING = {k: v for k, v in RULE_PARAMS.items() if k != "typical_p"}


@PROPERTY
@given(logits=logits_tensors(), temperature=TEMPERATURES,
       rules=st.fixed_dictionaries({}, optional=ARGMAX_KEEPING))
def test_a_most_likely_token_is_always_kept(logits, temperature, rules):
    out = probs(logits, temperature=temperature, **rules)
    z = logits.to(out.dtype)
    is_max = z == z.amax(dim=-1, keepdim=True)
    assert ((out > 0) & is_max).any(dim=-1).all()
    unique = is_max.sum(dim=-1) == 1
    assert (out.gather(-1, z.argmax(dim=-1, keepdim=True)).squeeze(-1)[unique] > 0).all()


def test_typical_may_drop_the_argmax_like_transformers():
    """Locally typical sampling keeps tokens whose surprisal is near the entropy, which
    need not include the most likely one (Meister et al.; transformers does the same)."""
    p = torch.tensor([0.4] + [0.03] * 10 + [0.0001] * 3000)
    logits = p.log()[None]
    out = probs(logits, typical_p=0.2)
    assert_same_distribution(out, hf_reference(logits, typical_p=0.2))
    assert out[0, 0] == 0
    torch.testing.assert_close(out[0, 1:11], torch.full((10,), 0.1))


# p = (1/2, 1/4, 1/8, 1/8) exactly in float32; its entropy is H = 1.75 ln 2.
POW2 = torch.tensor([[3.0, 2.0, 1.0, 1.0]]) * math.log(2)
BOUNDARY_CASES = {
    # uniform over 4: the smallest head of mass >= top_p
    "top_p=0.5": (torch.zeros(1, 4), dict(top_p=0.5), [0, 0, 1, 1]),
    "top_p=0.75": (torch.zeros(1, 4), dict(top_p=0.75), [0, 1, 1, 1]),
    # p equal to the cutoff is kept
    "epsilon_cutoff=p": (POW2, dict(epsilon_cutoff=0.25), [1, 1, 0, 0]),
    "min_p*max=p": (POW2, dict(min_p=0.5), [1, 1, 0, 0]),
    "min_p=1": (torch.tensor([[0.0, 0.0, -1.0]]), dict(min_p=1.0), [1, 1, 0]),
    # token 1 (surprisal 2 ln 2) is the most typical and alone has mass 1/4 = typical_p
    "typical_p=mass": (POW2, dict(typical_p=0.25), [0, 1, 0, 0]),
}


@pytest.mark.parametrize("logits, rule, kept", BOUNDARY_CASES.values(), ids=BOUNDARY_CASES.keys())
def test_rules_at_their_exact_boundary(logits, rule, kept):
    """Mass reaching the threshold exactly is enough; p equal to a cutoff is kept."""
    out = probs(logits, **rule)
    assert (out > 0).long().tolist() == [kept]
    assert_same_distribution(out, hf_reference(logits, **rule))


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0]])
    assert torch.equal(probs(logits, top_k=2) > 0, torch.tensor([[True, False, True, True, False, True]]))


# ---------------------------------------------------------------------------------------
# entropy


@pytest.mark.parametrize("vocab, dtype", [(v, d) for v in (1, 2, 7, 1000) for d in (torch.float32, torch.float64)]
                         + [(v, d) for v in (1, 8, 1024) for d in (torch.float16, torch.bfloat16)])
def test_entropy_of_uniform_is_log_v(vocab, dtype):
    p = torch.full((3, vocab), 1.0 / vocab, dtype=dtype)
    h = entropy(p)
    assert h.shape == (3,) and h.dtype == compute_dtype(dtype)
    torch.testing.assert_close(h, torch.full((3,), math.log(vocab), dtype=h.dtype), **F32_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_of_one_hot_is_zero(dtype):
    p = torch.nn.functional.one_hot(torch.tensor([[0, 3], [2, 4]]), 5).to(dtype)
    h = entropy(p)
    assert h.shape == (2, 2)
    assert torch.equal(h, torch.zeros(2, 2, dtype=compute_dtype(dtype)))


def test_entropy_zeros_contribute_nothing():
    p = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25]])
    h = entropy(p)
    assert not torch.isnan(h).any()
    torch.testing.assert_close(h, torch.tensor([math.log(2), 0.0, math.log(4)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(9,), (4, 17), (2, 3, 50)])
def test_entropy_matches_formula_for_positive_probs(shape, dtype):
    p = torch.softmax(make_logits(shape, dtype, "normal", seed=8), dim=-1)
    assert (p > 0).all()
    h = entropy(p)
    assert h.shape == shape[:-1] and h.dtype == dtype
    torch.testing.assert_close(h, -(p * p.log()).sum(dim=-1), **F32_TOL)


def test_entropy_of_truncated_probs_matches_kept_tokens():
    logits = make_logits((4, 84), torch.float32, "normal", seed=9)
    p = probs(logits, top_k=10)
    kept = p[p > 0].reshape(4, 10)
    torch.testing.assert_close(entropy(p), -(kept * kept.log()).sum(dim=-1), **F32_TOL)


# ---------------------------------------------------------------------------------------
# sample


def chi_square_pvalue(counts, p):
    """:func:`typsamp.stats.chi_square`'s p-value against ``p`` normalised (so weights and
    16-bit probabilities are compared with what they really encode)."""
    p = p.double()
    return stats.chi_square(counts, p / p.sum()).p_value


P6 = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.2, 0.3])
N_DRAWS = 200_000
ALPHA = 1e-3  # the seeds are fixed, so each test below is deterministic


def test_chi_square_helper_has_power():
    """The goodness-of-fit check rejects a sampler off by 0.01 on one token."""
    gen = torch.Generator().manual_seed(10)
    draws = torch.multinomial(P6, N_DRAWS, replacement=True, generator=gen)
    counts = torch.bincount(draws, minlength=6)
    assert chi_square_pvalue(counts, P6) > ALPHA
    wrong = P6 + torch.tensor([0.01, -0.01, 0, 0, 0, 0])
    assert chi_square_pvalue(counts, wrong) < ALPHA


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_matches_distribution(dtype):
    p = P6.to(dtype)
    draws = sample(p.expand(N_DRAWS, 6), generator=torch.Generator().manual_seed(11))
    assert draws.dtype == torch.int64 and draws.shape == (N_DRAWS,)
    counts = torch.bincount(draws, minlength=6)
    assert chi_square_pvalue(counts, p) > ALPHA


def test_sample_rows_are_independent_and_follow_their_own_p():
    rows = torch.stack([P6, P6.flip(0), torch.full((6,), 1 / 6),
                        torch.tensor([0.0, 0.5, 0.0, 0.25, 0.0, 0.25])])
    draws = sample(rows.expand(50_000, 4, 6), generator=torch.Generator().manual_seed(12))
    assert draws.shape == (50_000, 4)
    for j, p in enumerate(rows):
        counts = torch.bincount(draws[:, j], minlength=6)
        assert (counts[p == 0] == 0).all()
        assert chi_square_pvalue(counts[p > 0], p[p > 0]) > ALPHA, f"row {j}"
    # Independence: the joint counts of two rows (within a batch entry, and across
    # consecutive batch entries) fit the product of their marginals.
    for first, second, p, q in [(draws[:, 0], draws[:, 1], rows[0], rows[1]),
                                (draws[:-1, 0], draws[1:, 0], rows[0], rows[0])]:
        joint = torch.bincount(6 * first + second, minlength=36)
        assert chi_square_pvalue(joint, torch.outer(p, q).flatten()) > ALPHA


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_never_returns_a_zero_probability_token(dtype):
    gen = torch.Generator().manual_seed(13)
    logits = 3 * torch.randn(200, generator=gen)
    logits[torch.randperm(200, generator=gen)[:180]] = NEG_INF  # 20 tokens stay
    p = torch.softmax(logits.double(), dim=-1).to(dtype)
    draws = sample(p.expand(20_000, 200), generator=gen)
    assert (p[draws] > 0).all()
    # ... and it is not just greedy: every token with p > 1e-3 shows up.
    assert set(draws.unique().tolist()) >= set(torch.nonzero(p.double() > 1e-3).flatten().tolist())


def test_sample_shapes():
    p = probs(make_logits((2, 3, 50), torch.float32, "neginf", seed=14))
    assert sample(p).shape == (2, 3)
    one = sample(p[0, 0])
    assert one.shape == () and one.dtype == torch.int64 and p[0, 0, one] > 0
    assert sample(torch.tensor([[0.0, 1.0, 0.0]])).tolist() == [1]


def test_sample_generator_reproduces_draws():
    p = probs(make_logits((1000, 30), torch.float32, "normal", seed=15))
    first = sample(p, generator=torch.Generator().manual_seed(16))
    again = sample(p, generator=torch.Generator().manual_seed(16))
    other = sample(p, generator=torch.Generator().manual_seed(17))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_sample_weights_need_not_sum_to_one():
    weights = torch.stack([37.5 * P6, 1e-3 * P6.flip(0), torch.tensor([0.0, 2.0, 0.0, 0.0, 0.0, 6.0])])
    draws = sample_weights(weights.expand(50_000, 3, 6), generator=torch.Generator().manual_seed(19))
    assert draws.dtype == torch.int64 and draws.shape == (50_000, 3)
    for j, w in enumerate(weights):
        counts = torch.bincount(draws[:, j], minlength=6)
        assert (counts[w == 0] == 0).all()
        assert chi_square_pvalue(counts[w > 0], w[w > 0]) > ALPHA, f"row {j}"


def test_sample_weights_zero_row_gives_index_zero():
    weights = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert sample_weights(weights, generator=torch.Generator().manual_seed(20)).tolist() == [0, 2]


# ---------------------------------------------------------------------------------------
# Validation: every error is a ValueError naming the argument

LOGITS = torch.zeros(2, 5)
BAD_ARGUMENTS = [
    ("temperature", -0.1, ValueError),
    ("temperature", float("nan"), ValueError),
    ("temperature", float("inf"), ValueError),
    ("temperature", True, checks.InputTypeError),
    ("temperature", "1.0", checks.InputTypeError),
    ("top_p", 0, ValueError),
    ("top_p", 1.5, ValueError),
    ("top_k", 0, ValueError),
    ("top_k", 2.5, checks.InputTypeError),
    ("top_k", True, checks.InputTypeError),
    ("min_p", -0.1, ValueError),
    ("min_p", 1.1, ValueError),
    ("eta", 0, ValueError),
    ("eta", 1, ValueError),
    ("typical_p", 0, ValueError),
    ("typical_p", 1, ValueError),
    ("epsilon_cutoff", 0, ValueError),
    ("epsilon_cutoff", 1, ValueError),
]


@pytest.mark.parametrize("name, value, error", BAD_ARGUMENTS,
                         ids=[f"{n}={v!r}" for n, v, _ in BAD_ARGUMENTS])
def test_probs_rejects_bad_arguments(name, value, error):
    with pytest.raises(error, match=f"`{name}`") as info:
        probs(LOGITS, **{name: value})
    assert isinstance(info.value, ValueError)


BAD_LOGITS = {
    "nan": (torch.tensor([[0.0, float("nan")]]), ValueError),
    "+inf": (torch.tensor([[0.0, float("inf")]]), ValueError),
    "all-neginf-row": (torch.tensor([[0.0, 1.0], [NEG_INF, NEG_INF]]), ValueError),
    "int-dtype": (torch.tensor([[1, 2, 3]]), checks.InputTypeError),
    "list": ([[0.0, 1.0]], checks.InputTypeError),
    "0-dim": (torch.tensor(1.0), ValueError),
    "empty-vocab": (torch.zeros(3, 0), ValueError),
}


@pytest.mark.parametrize("logits, error", BAD_LOGITS.values(), ids=BAD_LOGITS.keys())
def test_probs_rejects_bad_logits(logits, error):
    with pytest.raises(error, match="`logits`"):
        probs(logits)


BAD_PROBS = {
    "negative": torch.tensor([[1.2, -0.2]]),
    "sum-below-1": torch.tensor([[0.5, 0.4]]),
    "sum-above-1-one-row": torch.tensor([[0.5, 0.5], [0.6, 0.5]]),
    "nan": torch.tensor([[float("nan"), 1.0]]),
    "inf": torch.tensor([[float("inf"), 0.0]]),
    "int-dtype": torch.tensor([[0, 1]]),
    "list": [[0.5, 0.5]],
    "0-dim": torch.tensor(1.0),
    "empty-vocab": torch.zeros(3, 0),
}


@pytest.mark.parametrize("fn", [entropy, sample])
@pytest.mark.parametrize("p", BAD_PROBS.values(), ids=BAD_PROBS.keys())
def test_entropy_and_sample_reject_bad_probs(fn, p):
    with pytest.raises(ValueError, match="`probs`"):
        fn(p)


@pytest.mark.parametrize("generator", [42, "seed", torch.manual_seed])
def test_sample_rejects_bad_generator(generator):
    with pytest.raises(checks.InputTypeError, match="`generator`"):
        sample(torch.tensor([0.5, 0.5]), generator=generator)


def test_probs_accepts_16bit_rounding_of_its_own_output():
    """Probabilities stored in 16 bits sum to 1 only approximately; they must be accepted."""
    p = probs(make_logits((8, 1000), torch.float32, "normal", seed=18))
    for dtype in (torch.float16, torch.bfloat16):
        assert entropy(p.to(dtype)).shape == (8,)
        assert sample(p.to(dtype)).shape == (8,)


# ---------------------------------------------------------------------------------------
# Warp: one validated setting; its call is the kernel probs() runs


WARP_SETTINGS = [dict(), dict(temperature=0.0), dict(temperature=0.7, top_k=5),
                 dict(temperature=1.3, top_p=0.8, min_p=0.02), dict(typical_p=0.9),
                 dict(temperature=0.5, epsilon_cutoff=3e-3, eta=1e-3)]


@pytest.mark.parametrize("setting", WARP_SETTINGS)
def test_warp_call_equals_probs(setting):
    z = make_logits((4, 3, 40), torch.float32, "neginf", seed=21)
    assert torch.equal(Warp(**setting)(z), probs(z, **setting))


@pytest.mark.parametrize("name, value, error", BAD_ARGUMENTS)
def test_warp_validates_once_at_construction(name, value, error):
    with pytest.raises(error, match=name):
        Warp(**{name: value})


def test_warp_is_frozen_and_normalises_numbers():
    warp = Warp(temperature=1, top_p=1)
    assert isinstance(warp.temperature, float) and warp.temperature == 1.0
    with pytest.raises(AttributeError):
        warp.temperature = 2.0


def test_warp_keeps_argmax_only_without_locally_typical_sampling():
    assert Warp().keeps_argmax and Warp(top_k=1, eta=0.1).keeps_argmax
    assert not Warp(typical_p=0.5).keeps_argmax
    assert Warp(temperature=0.0, typical_p=0.5).keeps_argmax and Warp(temperature=0.0).greedy
    # keeps_argmax is a promise: where it holds, the argmax has positive probability;
    # where it does not, there are rows that drop it
    z = make_logits((500, 30), torch.float32, "normal", seed=22)
    for setting in WARP_SETTINGS:
        warp = Warp(**setting)
        if warp.keeps_argmax:
            assert bool((warp(z).gather(-1, z.argmax(-1, keepdim=True)) > 0).all()), setting
    p = Warp(typical_p=0.2)(z)
    assert not bool((p.gather(-1, z.argmax(-1, keepdim=True)) > 0).all())


def test_the_old_epsilon_keyword_is_gone():
    """epsilon-sampling is `epsilon_cutoff`: `epsilon` is Medusa's, in typical acceptance."""
    with pytest.raises(TypeError, match="epsilon"):
        probs(torch.zeros(3), epsilon=0.1)


# ---------------------------------------------------------------------------------------
# Empty batches and error messages


def test_entropy_and_sample_of_an_empty_batch():
    p = torch.full((0, 5), 0.2)
    assert entropy(p).shape == (0,)
    assert sample(p).shape == (0,) and sample(p).dtype == torch.int64
    assert probs(torch.zeros(0, 5)).shape == (0, 5)


def test_row_sum_error_reports_the_worst_rows_real_sum():
    with pytest.raises(ValueError, match=r"sums to 0\.2,"):
        sample(torch.tensor([[0.75, 0.75], [0.1, 0.1]]))
    with pytest.raises(ValueError, match=r"sums to 1\.5,"):
        sample(torch.tensor([[0.75, 0.75], [0.5, 0.5]]))


# ---------------------------------------------------------------------------------------
# RowSeeds: one counter-based stream per row


def splitmix_reference(seed: int, i: int) -> int:
    """SplitMix64 in plain Python integers (mod 2**64), the oracle for rng's int64 version."""
    m = (1 << 64) - 1

    def mix(x):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        return x ^ (x >> 31)

    key = mix(seed ^ 0x5EED5EED5EED5EED)
    return mix((key + i * 0x9E3779B97F4A7C15) & m)


def test_row_seeds_equal_the_plain_python_splitmix():
    seeds = [0, 1, 12345, 2 ** 63 - 1]
    got = uniform((4, 3), dtype=torch.float64, device="cpu", generator=RowSeeds(seeds))
    want = torch.tensor([[(splitmix_reference(s, i) >> 11) * 2.0 ** -53 for i in (1, 2, 3)] for s in seeds],
                        dtype=torch.float64)
    assert torch.equal(got, want)


def test_a_rows_stream_ignores_its_batch_mates_and_continues_across_calls():
    alone = RowSeeds([7])
    first = uniform((1, 5), dtype=torch.float32, device="cpu", generator=alone)
    second = uniform((1, 2, 2), dtype=torch.float32, device="cpu", generator=alone)
    crowd = RowSeeds([3, 7, 9])
    together = uniform((3, 9), dtype=torch.float32, device="cpu", generator=crowd)
    assert torch.equal(together[1], torch.cat([first[0], second[0].reshape(-1)]))
    assert not torch.equal(together[0], together[2])


def test_row_seeds_give_uniform_numbers():
    """Kolmogorov-Smirnov distance of 200k draws, against its 1e-4 critical value sqrt(ln(2e4)/(2n))."""
    n = 200_000
    u = uniform((2, n // 2), dtype=torch.float64, device="cpu", generator=RowSeeds([0, 1])).reshape(-1)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    u, _ = u.sort()
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float(torch.maximum(grid - u, u - (grid - 1 / n)).max())
    assert ks < math.sqrt(math.log(2 / 1e-4) / (2 * n))
    f32 = uniform((1, 10_000), dtype=torch.float32, device="cpu", generator=RowSeeds([5]))
    assert f32.dtype == torch.float32 and float(f32.max()) < 1


def test_sample_with_row_seeds_follows_p_and_is_reproducible():
    rows = N_DRAWS // 10
    draws = sample(P6.expand(rows, 6), generator=RowSeeds(list(range(rows))))
    assert chi_square_pvalue(torch.bincount(draws, minlength=6), P6) > ALPHA
    again = sample(P6.expand(rows, 6), generator=RowSeeds(list(range(rows))))
    assert torch.equal(draws, again)


@pytest.mark.parametrize("seeds, error", [
    ([], ValueError), ([-1], ValueError), ([2 ** 63], ValueError), ([True], TypeError),
    ([1.5], TypeError), ("12", TypeError), (torch.tensor([1.0]), TypeError),
])
def test_row_seeds_reject_bad_seeds(seeds, error):
    with pytest.raises(error, match="seeds"):
        RowSeeds(seeds)


def test_row_seeds_must_match_the_batch():
    with pytest.raises(ValueError, match="2 row seeds but the batch has 3 rows"):
        sample(torch.full((3, 4), 0.25), generator=RowSeeds([1, 2]))
    with pytest.raises(ValueError, match="RowSeeds for 2 rows"):
        uniform((3, 1), dtype=torch.float32, device="cpu", generator=RowSeeds([1, 2]))


def test_warp_skips_the_nan_rescue_only_where_the_temperature_survives_the_cast():
    # The 0/0 rescue is needed only when T rounds to 0 in the compute dtype; elsewhere the
    # result is plain softmax((z - max z) / T), bit for bit.
    from typsamp.sampling import Warp, _rounds_to_zero

    assert _rounds_to_zero(1e-46, torch.float32) and not _rounds_to_zero(1e-40, torch.float32)
    assert not _rounds_to_zero(1e-46, torch.float64) and not _rounds_to_zero(0.7, torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 1000, generator=g) * 5
    for T in (0.3, 0.7, 1.7):
        want = torch.softmax((z - z.amax(-1, keepdim=True)) / T, dim=-1)
        assert torch.equal(Warp(temperature=T)(z), want)
    out = Warp(temperature=1e-46)(torch.tensor([[1.0, 2.0, 0.5]]))
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 0.0]]))
    z0 = z.clone()
    Warp(temperature=0.5)(z)                      # the caller's logits are never written
    assert torch.equal(z, z0)
