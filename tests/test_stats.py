"""Tests of typsamp.stats: known answers, calibration under the null, power, edge cases
and every validation error. Seeds are fixed, so every statistical check is deterministic;
tolerances come from the sample size."""

from __future__ import annotations

import math

import pytest
import torch

from typsamp import checks, speculative, stats
from typsamp.model import GPT, GPTConfig

F64 = torch.float64


def chi2_sf_dof3(x: float) -> float:
    """P(χ²_3 ≥ x) in closed form: erfc(√(x/2)) + √(2x/π) e^{-x/2}."""
    return math.erfc(math.sqrt(x / 2)) + math.sqrt(2 * x / math.pi) * math.exp(-x / 2)


# ---------------------------------------------------------------------------------------
# chi_square


def test_chi_square_known_answer_dof_2():
    # expected 20 each: (10² + 10² + 0) / 20 = 10, and P(χ²_2 ≥ x) = e^{-x/2}
    result = stats.chi_square(torch.tensor([30, 10, 20]), torch.full((3,), 1 / 3, dtype=F64))
    assert isinstance(result, stats.ChiSquare)
    stat, dof, p = result
    assert dof == 2 and stat == pytest.approx(10.0, rel=1e-12)
    assert p == pytest.approx(math.exp(-5), rel=1e-10)


def test_chi_square_known_answer_dof_3():
    stat, dof, p = stats.chi_square(torch.tensor([10, 20, 30, 40]), torch.full((4,), 0.25))
    assert (stat, dof) == (pytest.approx(20.0, rel=1e-6), 3)
    assert p == pytest.approx(chi2_sf_dof3(20.0), rel=1e-8)


def test_chi_square_pools_small_cells_into_one():
    # n = 80: expected 32, 32, 4, 4, 4, 4 -> the four small cells pool into one of 16
    probs = torch.tensor([0.4, 0.4, 0.05, 0.05, 0.05, 0.05], dtype=F64)
    counts = torch.tensor([30, 34, 1, 7, 5, 3])
    stat, dof, _ = stats.chi_square(counts, probs)
    assert dof == 2
    assert stat == pytest.approx((30 - 32) ** 2 / 32 + (34 - 32) ** 2 / 32 + (16 - 16) ** 2 / 16)


def test_chi_square_keeps_a_cell_expected_to_hold_exactly_5():
    probs = torch.tensor([0.45, 0.45, 0.05, 0.05], dtype=F64)
    assert stats.chi_square(torch.tensor([40, 50, 6, 4]), probs).dof == 3     # e = 45, 45, 5, 5


def test_chi_square_folds_a_small_pool_into_the_smallest_cell():
    # n = 100: expected 50, 49, 0.5, 0.5; the pool (1.0) is too small, so it joins the 49
    probs = torch.tensor([0.5, 0.49, 0.005, 0.005], dtype=F64)
    counts = torch.tensor([40, 58, 2, 0])
    stat, dof, _ = stats.chi_square(counts, probs)
    assert dof == 1
    assert stat == pytest.approx((40 - 50) ** 2 / 50 + (60 - 50) ** 2 / 50)


def test_chi_square_every_cell_small_leaves_nothing_to_test():
    assert stats.chi_square(torch.tensor([1, 2, 0]), torch.full((3,), 1 / 3)) == (0.0, 0, 1.0)


def test_chi_square_one_cell_of_all_the_mass():
    assert stats.chi_square(torch.tensor([7, 0]), torch.tensor([1.0, 0.0])) == (0.0, 0, 1.0)


def test_chi_square_a_draw_of_probability_zero_refutes_the_law():
    stat, dof, p = stats.chi_square(torch.tensor([50, 49, 1]), torch.tensor([0.5, 0.5, 0.0]))
    assert stat == math.inf and p == 0.0 and dof == 1


def test_chi_square_flattens_a_joint_table():
    probs = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=F64)
    counts = torch.tensor([[12, 18], [33, 37]])
    assert stats.chi_square(counts, probs) == stats.chi_square(counts.flatten(), probs.flatten())


def test_chi_square_normalises_16_bit_probabilities():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4]).half()       # sums to 1 only up to rounding
    assert p.double().sum() != 1
    counts = torch.tensor([120, 190, 310, 380])
    exact = p.double() / p.double().sum()
    assert stats.chi_square(counts, p) == stats.chi_square(counts, exact)


P6 = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.2, 0.3], dtype=F64)


def test_chi_square_has_power():
    """A sampler off by 0.01 on one token is rejected from 200,000 draws; the right law is not."""
    gen = torch.Generator().manual_seed(10)
    counts = torch.bincount(torch.multinomial(P6, 200_000, replacement=True, generator=gen), minlength=6)
    assert stats.chi_square(counts, P6).p_value > 1e-3
    wrong = P6 + torch.tensor([0.01, -0.01, 0, 0, 0, 0], dtype=F64)
    assert stats.chi_square(counts, wrong).p_value < 1e-3


def test_chi_square_p_values_are_calibrated():
    """Under the null the p-value is (nearly) uniform: of 400 tests at level 0.1, the number
    rejecting is Binomial(400, 0.1) (mean 40, sd 6), so it lies in [40 - 4·6, 40 + 4·6]."""
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(12, generator=gen, dtype=F64), dim=0)
    draws = torch.multinomial(probs, 400 * 500, replacement=True, generator=gen).view(400, 500)
    p_values = torch.tensor([stats.chi_square(torch.bincount(row, minlength=12), probs).p_value for row in draws])
    rejected = int((p_values < 0.1).sum())
    assert 16 <= rejected <= 64, rejected
    assert 0.4 < float(p_values.mean()) < 0.6


def test_chi_square_validation():
    probs = torch.full((3,), 1 / 3)
    with pytest.raises(ValueError, match="`counts` has 2 cells but `probs` has 3"):
        stats.chi_square(torch.tensor([1, 2]), probs)
    with pytest.raises(ValueError, match="`counts`.*non-negative"):
        stats.chi_square(torch.tensor([1, -2, 3]), probs)
    with pytest.raises(ValueError, match="`counts`.*whole numbers"):
        stats.chi_square(torch.tensor([1.0, 2.5, 3.0]), probs)
    with pytest.raises(ValueError, match="no draws"):
        stats.chi_square(torch.zeros(3), probs)
    with pytest.raises(ValueError, match="`probs`.*sums to 0.9"):
        stats.chi_square(torch.tensor([1, 2, 3]), torch.tensor([0.3, 0.3, 0.3]))
    with pytest.raises(ValueError, match="`probs`.*negative"):
        stats.chi_square(torch.tensor([1, 2, 3]), torch.tensor([0.5, 0.6, -0.1]))
    with pytest.raises(TypeError, match="`probs`.*floating"):
        stats.chi_square(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 0]))
    with pytest.raises(TypeError, match="`counts` must be a torch.Tensor"):
        stats.chi_square([1, 2, 3], probs)
    with pytest.raises(TypeError, match="`counts`.*integer or real"):
        stats.chi_square(torch.tensor([True, False, True]), probs)


def test_chi_square_two_sample_known_answer():
    # pooled law (1/2, 1/2); expected 20 in each of 4 cells: 4 · 10² / 20 = 20, dof 1
    stat, dof, p = stats.chi_square_two_sample(torch.tensor([30, 10]), torch.tensor([10, 30]))
    assert dof == 1 and stat == pytest.approx(20.0)
    assert p == pytest.approx(math.erfc(math.sqrt(10)), rel=1e-8)
    assert stats.chi_square_two_sample(torch.tensor([5, 9, 0]), torch.tensor([5, 9, 0])).statistic == 0.0


def test_chi_square_two_sample_power_and_null():
    gen = torch.Generator().manual_seed(4)
    a = torch.bincount(torch.multinomial(P6, 50_000, True, generator=gen), minlength=6)
    b = torch.bincount(torch.multinomial(P6, 30_000, True, generator=gen), minlength=6)
    assert stats.chi_square_two_sample(a, b).p_value > 1e-3
    shifted = P6 + torch.tensor([0.02, -0.02, 0, 0, 0, 0], dtype=F64)
    c = torch.bincount(torch.multinomial(shifted, 30_000, True, generator=gen), minlength=6)
    assert stats.chi_square_two_sample(a, c).p_value < 1e-3


def test_chi_square_two_sample_pools_by_the_smaller_sample():
    # b is small: its expected counts in the last two cells are 4.75 < 5, so they pool (into 9.5)
    a, b = torch.tensor([400, 400, 100, 100]), torch.tensor([20, 20, 2, 2])   # 4.75 expected
    assert stats.chi_square_two_sample(a, b).dof == 2


def test_chi_square_two_sample_validation():
    with pytest.raises(ValueError, match="`counts_a` has 2 cells but `counts_b` has 3"):
        stats.chi_square_two_sample(torch.tensor([1, 2]), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="at least one draw"):
        stats.chi_square_two_sample(torch.tensor([0, 0]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="`counts_b`.*non-negative"):
        stats.chi_square_two_sample(torch.tensor([1, 2]), torch.tensor([1, -2]))


# ---------------------------------------------------------------------------------------
# tv, kl


def test_tv_known_answers():
    assert float(stats.tv(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == 1.0
    p = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    assert float(stats.tv(p, p)) == 0.0
    q = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    assert float(stats.tv(p, q)) == pytest.approx(0.3)
    assert float(stats.tv(p, q)) == float(stats.tv(q, p))


def test_tv_and_kl_broadcast_over_rows():
    a = torch.softmax(torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(0), dtype=F64), -1)
    b = torch.softmax(torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=F64), -1)
    out = stats.tv(a, b)
    assert out.shape == (4, 5) and out.dtype == F64
    assert torch.allclose(out[2, 3], 0.5 * (a[2, 3] - b[3]).abs().sum())
    assert stats.kl(a, b).shape == (4, 5)
    assert stats.tv(a.float(), b.float()).dtype == torch.float32


def test_kl_known_answers():
    a = torch.tensor([0.5, 0.5], dtype=F64)
    b = torch.tensor([0.25, 0.75], dtype=F64)
    assert float(stats.kl(a, b)) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    assert float(stats.kl(a, a)) == 0.0
    # 0 log 0 = 0, and infinite where a > 0 = b
    assert float(stats.kl(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))) == pytest.approx(math.log(2))
    assert float(stats.kl(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))) == math.inf


def test_tv_kl_validation():
    p = torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="`a`.*sums to"):
        stats.tv(torch.tensor([0.5, 0.6]), p)
    with pytest.raises(ValueError, match="`b`.*negative"):
        stats.kl(p, torch.tensor([1.5, -0.5]))
    with pytest.raises(ValueError, match="vocabulary"):
        stats.tv(p, torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="do not broadcast"):
        stats.kl(torch.full((2, 2), 0.5), torch.full((3, 2), 0.5))
    with pytest.raises(TypeError, match="`a` must be a torch.Tensor"):
        stats.tv([0.5, 0.5], p)


# ---------------------------------------------------------------------------------------
# accepted_length_law


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("gamma", [1, 4, 7])
def test_accepted_length_law_is_leviathans(alpha, gamma):
    law = stats.accepted_length_law(alpha, gamma)
    assert law.shape == (gamma + 1,) and law.dtype == F64
    assert float(law.sum()) == pytest.approx(1.0, abs=1e-12)
    mean = float((torch.arange(gamma + 1) * law).sum())
    # E[accepted] = E[tokens per step] - 1 = (1 - α^{γ+1}) / (1 - α) - 1 (γ at α = 1)
    tokens_per_step = gamma + 1 if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    assert mean == pytest.approx(tokens_per_step - 1, abs=1e-12)
    assert mean == pytest.approx(float(speculative.expected_tokens(alpha, gamma)) - 1, rel=1e-6)
    assert float(law[0]) == pytest.approx(1 - alpha if gamma > 0 else 1.0)
    assert float(law[-1]) == pytest.approx(alpha ** gamma)


def test_accepted_length_law_matches_a_simulation():
    alpha, gamma, n = 0.7, 4, 100_000
    gen = torch.Generator().manual_seed(2)
    ok = torch.rand(n, gamma, generator=gen) < alpha
    accepted = ok.long().cumprod(dim=1).sum(dim=1)
    counts = torch.bincount(accepted, minlength=gamma + 1)
    assert stats.chi_square(counts, stats.accepted_length_law(alpha, gamma)).p_value > 1e-3
    assert stats.chi_square(counts, stats.accepted_length_law(0.68, gamma)).p_value < 1e-3


def test_accepted_length_law_validation():
    with pytest.raises(ValueError, match="`alpha`"):
        stats.accepted_length_law(1.5, 3)
    with pytest.raises(ValueError, match="`gamma` must be >= 1"):
        stats.accepted_length_law(0.5, 0)
    with pytest.raises(TypeError, match="`gamma` must be an integer"):
        stats.accepted_length_law(0.5, "3")
    with pytest.raises(TypeError, match="`alpha` must be a real number"):
        stats.accepted_length_law(True, 3)
    with pytest.raises(ValueError, match="`gamma` must be at most"):
        stats.accepted_length_law(0.5, 10 ** 12)


# ---------------------------------------------------------------------------------------
# teacher_forced_logits


def tiny_gpt(seed: int = 0, V: int = 11) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=16, block_size=32)).double().eval()


def tokens(B: int, L: int, V: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def test_teacher_forced_logits_are_the_next_token_predictions():
    model, text = tiny_gpt(), tokens(3, 9)
    out = stats.teacher_forced_logits(model, text)
    assert out.shape == (3, 9, 11) and out.dtype == F64
    with torch.inference_mode():
        for j in range(9):                      # the last position of each prefix, alone
            torch.testing.assert_close(out[:, j], model(text[:, :j + 1])[:, -1], rtol=1e-10, atol=1e-10)


def test_teacher_forced_logits_equal_cached_decoding_and_keep_the_cache():
    model, text = tiny_gpt(1), tokens(2, 7, seed=1)
    cache = model.setup_cache(2, 16)
    out = stats.teacher_forced_logits(model, text)
    assert model.cache is cache                   # put back after the pass
    with torch.inference_mode():
        step = [model(text[:, j:j + 1]) for j in range(7)]   # one token at a time, through the cache
    torch.testing.assert_close(out, torch.cat(step, dim=1), rtol=1e-10, atol=1e-10)


def test_teacher_forced_logits_in_chunks_equal_one_pass():
    model, text = tiny_gpt(2), tokens(5, 6, seed=2)
    torch.testing.assert_close(stats.teacher_forced_logits(model, text, batch_size=2),
                               stats.teacher_forced_logits(model, text), rtol=1e-12, atol=1e-12)


class EngineInterface:
    """A model of the engine's interface only (setup_cache + offsets), over a GPT."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def setup_cache(self, batch_size, max_len):
        self.calls.append(("setup_cache", batch_size, max_len))
        self.cache = self.inner.setup_cache(batch_size, max_len)
        return self.cache

    def __call__(self, tokens, offsets, span=None):
        self.calls.append(("call", tuple(tokens.shape), offsets.tolist(), span))
        return self.inner(tokens, offsets, span=span)


class Output:
    def __init__(self, logits):
        self.logits = logits


def test_teacher_forced_logits_with_the_engine_interface_and_plain_callables():
    model, text = tiny_gpt(3), tokens(2, 5, seed=3)
    reference = stats.teacher_forced_logits(model, text)
    engine = EngineInterface(model)
    torch.testing.assert_close(stats.teacher_forced_logits(engine, text), reference, rtol=1e-10, atol=1e-10)
    assert engine.calls == [("setup_cache", 2, 5), ("call", (2, 5), [0, 0], 5)]
    model.clear_cache()
    plain = lambda t: model(t)                                   # noqa: E731
    torch.testing.assert_close(stats.teacher_forced_logits(plain, text), reference)
    hf_like = lambda t: Output(model(t))                         # noqa: E731
    torch.testing.assert_close(stats.teacher_forced_logits(hf_like, text), reference)


def test_teacher_forced_logits_validation():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="`tokens` must be int64 of shape"):
        stats.teacher_forced_logits(model, tokens(2, 3).double())
    with pytest.raises(ValueError, match="`tokens` must be int64 of shape"):
        stats.teacher_forced_logits(model, tokens(2, 3)[0])
    with pytest.raises(ValueError, match="at least one row"):
        stats.teacher_forced_logits(model, torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="`batch_size` must be >= 1"):
        stats.teacher_forced_logits(model, tokens(2, 3), batch_size=0)
    with pytest.raises(ValueError, match=r"`model` must return logits of shape \[2, 3, V\]"):
        stats.teacher_forced_logits(lambda t: t.double(), tokens(2, 3))
    with pytest.raises(TypeError, match="`model` must be callable"):
        stats.teacher_forced_logits("target", tokens(2, 3))


# ---------------------------------------------------------------------------------------
# token_origin, tested_positions


def origin_by_hand(accepted_lengths, gamma, N):
    """An independent, step-by-step reading of accepted_lengths (the chapters' old loop)."""
    rows = []
    for lengths in accepted_lengths.T.tolist():
        row = []
        for a in lengths:
            if a < 0:
                break
            row += [1] * a + [2 if a < gamma else 3]
        rows.append((row + [-1] * N)[:N])
    return torch.tensor(rows, dtype=torch.int8)


def test_token_origin_known_answer():
    lengths = torch.tensor([[3, 1], [0, 2], [2, -1]])
    out = stats.token_origin(lengths, 3, 7)
    assert out.dtype == torch.int8
    assert out.tolist() == [[1, 1, 1, 3, 2, 1, 1], [1, 2, 1, 1, 2, -1, -1]]
    cut = stats.token_origin(lengths, 3, 7, lengths=torch.tensor([5, 3]))
    assert cut.tolist() == [[1, 1, 1, 3, 2, -1, -1], [1, 2, 1, -1, -1, -1, -1]]


def random_lengths(steps, B, gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, gamma + 1, (steps, B), generator=gen)
    stop = torch.randint(1, steps + 1, (B,), generator=gen)
    return torch.where(torch.arange(steps)[:, None] < stop, lengths, -1)


@pytest.mark.parametrize("seed", range(5))
def test_token_origin_equals_the_step_by_step_reading(seed):
    gamma, N = 1 + seed % 4, 30
    lengths = random_lengths(25, 6, gamma, seed)
    assert torch.equal(stats.token_origin(lengths, gamma, N), origin_by_hand(lengths, gamma, N))


def test_tested_positions_follow_the_origin():
    lengths = torch.tensor([[3, 1], [0, 2], [2, -1]])
    rows = stats.tested_positions(lengths, 3, 10, 7)
    (i0, a0), (i1, a1) = rows
    assert i0.tolist() == [10, 11, 12, 14, 15, 16] and a0.tolist() == [1, 1, 1, 0, 1, 1]
    assert i1.tolist() == [10, 11, 12, 13, 14] and a1.tolist() == [1, 0, 1, 1, 0]
    assert a0.dtype == F64
    ragged = stats.tested_positions(lengths, 3, [4, 9], 7)
    assert ragged[0][0].tolist() == [4, 5, 6, 8, 9, 10] and ragged[1][0].tolist() == [9, 10, 11, 12, 13]
    # tests counted here are exactly the examined drafts, when nothing is cut at the end
    r, rows = stats.row_alpha(lengths, 3), stats.tested_positions(lengths, 3, 10, 8)   # 8: all of row 0
    assert [int(a.sum()) for _, a in rows] == r.accepted.tolist()
    assert [len(i) for i, _ in rows] == r.examined.tolist()


def test_origin_validation():
    with pytest.raises(ValueError, match=r"must lie in \[-1, gamma = 2\]"):
        stats.token_origin(torch.tensor([[3]]), 2, 5)
    with pytest.raises(ValueError, match=r"must lie in \[-1"):
        stats.token_origin(torch.tensor([[-2]]), 2, 5)
    with pytest.raises(ValueError, match="resumes after -1"):
        stats.token_origin(torch.tensor([[-1], [1]]), 2, 5)
    with pytest.raises(ValueError, match="integer tensor"):
        stats.token_origin(torch.tensor([[1.0]]), 2, 5)
    with pytest.raises(ValueError, match="integer tensor"):
        stats.token_origin(torch.tensor([1, 2]), 2, 5)
    with pytest.raises(ValueError, match="`max_new_tokens` must be >= 1"):
        stats.token_origin(torch.tensor([[1]]), 2, 0)
    with pytest.raises(ValueError, match="`lengths` must be 1 integers"):
        stats.token_origin(torch.tensor([[1]]), 2, 5, lengths=[1, 2])
    with pytest.raises(ValueError, match="`lengths` must lie in"):
        stats.token_origin(torch.tensor([[1]]), 2, 5, lengths=[6])
    with pytest.raises(ValueError, match="`prompt_length` gives 1 lengths for 2 rows"):
        stats.tested_positions(torch.tensor([[1, 1]]), 2, [3], 5)
    with pytest.raises(ValueError, match="`prompt_length` must be >= 0"):
        stats.tested_positions(torch.tensor([[1, 1]]), 2, -1, 5)


# ---------------------------------------------------------------------------------------
# row_alpha, bernoulli_mean_se, proportion_z


def test_row_alpha_known_answer():
    # row 0: accepted 2 + 1 = 3, examined 3 + 1 (the step that stopped at 1 < 2) = 4
    # row 1: accepted 0 + 1 = 1, examined 1 + 2 = 3; pooled alpha 4/7
    r = stats.row_alpha(torch.tensor([[2, 0], [1, 1]]), 2)
    assert r.accepted.tolist() == [3, 1] and r.examined.tolist() == [4, 3]
    assert r.alpha == pytest.approx(4 / 7)
    a = 4 / 7
    se = math.sqrt(((3 - a * 4) ** 2 + (1 - a * 3) ** 2) / 2) / 3.5
    assert r.se == pytest.approx(se)
    assert r.per_row.tolist() == pytest.approx([3 / 4, 1 / 3])
    assert r.per_row_se.tolist() == pytest.approx([math.sqrt(0.75 * 0.25 / 4), math.sqrt(2 / 9 / 3)])


def test_row_alpha_edge_cases():
    one_row = stats.row_alpha(torch.tensor([[2], [0]]), 2)
    assert one_row.alpha == pytest.approx(2 / 3) and math.isnan(one_row.se)
    nothing = stats.row_alpha(torch.zeros(0, 3, dtype=torch.long), 4)      # no steps yet
    assert math.isnan(nothing.alpha) and math.isnan(nothing.se)
    assert torch.isnan(nothing.per_row).all()
    done = stats.row_alpha(torch.tensor([[1, -1], [1, -1]]), 2)           # row 1 never ran
    assert done.examined.tolist() == [4, 0] and torch.isnan(done.per_row[1])


def chains(B, steps, gamma, alpha, seed):
    """accepted_lengths of B independent rows whose every test passes with probability alpha."""
    gen = torch.Generator().manual_seed(seed)
    ok = torch.rand(steps, B, gamma, generator=gen) < alpha
    return ok.long().cumprod(dim=2).sum(dim=2)


def test_row_alpha_is_unbiased_and_its_error_is_calibrated():
    """Over 300 replications of 16 rows, the estimates centre on alpha and their spread is
    the mean reported standard error (within 15%: the spread of 300 values is itself
    known to about 1/sqrt(2·300) = 4%)."""
    alpha, gamma = 0.6, 4
    runs = [stats.row_alpha(chains(16, 20, gamma, alpha, seed), gamma) for seed in range(300)]
    estimates = torch.tensor([r.alpha for r in runs], dtype=F64)
    ses = torch.tensor([r.se for r in runs], dtype=F64)
    spread = float(estimates.std())
    assert abs(float(estimates.mean()) - alpha) < 4 * spread / math.sqrt(300)
    assert 0.85 < float(ses.mean()) / spread < 1.15


def test_row_alpha_equals_the_engines_count():
    from typsamp import generate

    target, draft = tiny_gpt(0), tiny_gpt(1)
    out = generate.speculative(target, draft, tokens(3, 4), 12, gamma=3, seed=0)
    r = stats.row_alpha(out.accepted_lengths, out.gamma)
    assert int(r.accepted.sum()) == out.accepted and int(r.examined.sum()) == out.examined
    assert r.alpha == pytest.approx(out.alpha, rel=1e-12)


def test_row_alpha_validation():
    with pytest.raises(ValueError, match="`gamma` must be >= 1"):
        stats.row_alpha(torch.tensor([[1]]), 0)
    with pytest.raises(ValueError, match=r"\[-1, gamma = 1\]"):
        stats.row_alpha(torch.tensor([[2]]), 1)
    with pytest.raises(TypeError, match="`accepted_lengths` must be a torch.Tensor"):
        stats.row_alpha([[1]], 1)


def test_bernoulli_mean_se():
    assert stats.bernoulli_mean_se(torch.full((4,), 0.5)) == (0.5, pytest.approx(0.25))
    mean, se = stats.bernoulli_mean_se(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    assert (mean, se) == (0.75, 0.0)
    # the error it reports is the spread of the share of successes
    gen = torch.Generator().manual_seed(5)
    p = torch.rand(200, generator=gen, dtype=F64)
    shares = (torch.rand(2000, 200, generator=gen, dtype=F64) < p).double().mean(dim=1)
    assert float(shares.std()) == pytest.approx(stats.bernoulli_mean_se(p)[1], rel=0.1)
    with pytest.raises(ValueError, match=r"`probs` must hold probabilities in \[0, 1\]"):
        stats.bernoulli_mean_se(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="`probs` is empty"):
        stats.bernoulli_mean_se(torch.zeros(0))
    with pytest.raises(TypeError, match="`probs`.*floating"):
        stats.bernoulli_mean_se(torch.tensor([0, 1]))


def test_proportion_z():
    se = math.sqrt(0.5 * 0.5 / 100 + 0.6 * 0.4 / 200)
    assert stats.proportion_z(0.5, 100, 0.6, 200) == pytest.approx(0.1 / se)
    assert stats.proportion_z(0.3, 10, 0.3, 50) == 0.0
    assert stats.proportion_z(1.0, 10, 1.0, 50) == 0.0
    assert stats.proportion_z(0.0, 10, 1.0, 50) == math.inf
    with pytest.raises(ValueError, match="`p2`"):
        stats.proportion_z(0.5, 10, 1.2, 10)
    with pytest.raises(ValueError, match="`n1`"):
        stats.proportion_z(0.5, 0, 0.5, 10)


# ---------------------------------------------------------------------------------------
# mean_se, distinct_n


def test_mean_se():
    mean, se = stats.mean_se(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert stats.mean_se([1, 2, 3, 4]) == (mean, se)
    m, s = stats.mean_se([7.0])
    assert m == 7.0 and math.isnan(s)
    with pytest.raises(ValueError, match="`values` is empty"):
        stats.mean_se([])
    with pytest.raises(ValueError, match="`values` must be finite"):
        stats.mean_se(torch.tensor([1.0, math.nan]))
    with pytest.raises(TypeError, match="`values`"):
        stats.mean_se("1 2 3")
    with pytest.raises(TypeError, match=r"`values\[\]` must be a real number"):
        stats.mean_se([1, None])


def test_distinct_n():
    out = stats.distinct_n(["a b a b", "to be or not to be", "solo"], 1)
    assert out.dtype == F64 and out.tolist() == pytest.approx([0.5, 4 / 6, 1.0])
    two = stats.distinct_n(["a b a b", "solo"], 2)
    assert two[0] == pytest.approx(2 / 3) and math.isnan(two[1])
    # token rows: padding (-1) dropped; a [B, L] tensor is its rows
    rows = torch.tensor([[1, 2, 1, 2, -1], [3, 3, 3, 3, 3]])
    assert stats.distinct_n(rows, 2).tolist() == pytest.approx([2 / 3, 1 / 4])
    assert stats.distinct_n([[1, 2, 3]], 3).tolist() == [1.0]


def test_distinct_n_validation():
    with pytest.raises(TypeError, match="not one string"):
        stats.distinct_n("a b c", 1)
    with pytest.raises(ValueError, match="`n` must be >= 1"):
        stats.distinct_n(["a"], 0)
    with pytest.raises(TypeError, match=r"`texts\[1\]`"):
        stats.distinct_n(["a", 3], 1)
    with pytest.raises(ValueError, match=r"`texts\[0\]` must be a 1-D integer tensor"):
        stats.distinct_n([torch.tensor([0.5, 1.5])], 1)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        stats.distinct_n(torch.tensor([1, 2, 3]), 1)


def test_the_module_depends_only_on_torch_and_checks():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(stats))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "math", "numbers", "dataclasses", "typing", "torch", "typsamp"}
    assert checks is stats.checks
