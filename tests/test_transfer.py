"""Tests for :mod:`typsamp.transfer`: bytes per verification step, modelled time, measurement.

Byte counts are checked against hand-computed answers and against a Monte Carlo of the
lazy protocols (each step walked message by message); the time model against its
formula; input validation error by error. One small real measurement through
``torch.distributed`` (gloo on loopback) checks only that it returns sane numbers:
timings are never asserted beyond being positive and finite.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from typsamp import checks, speculative, transfer
from typsamp.transfer import LINKS, RULES, Link, Measurement, fit_link, payload, step_cost

I = transfer.ID_BYTES
LINK = Link("test link", bandwidth=1e9, latency=10e-6)


# ---------------------------------------------------------------------------------------
# Bytes


def test_known_answers_llama2_fp16_gamma4():
    V, gamma = 32_000, 4
    sampled = payload("rejection_sampled", V, gamma, torch.float16)
    assert sampled.up == gamma * I + gamma * V * 2 == 256_016
    assert sampled.down == 2 * I == 8
    assert sampled.bytes == 256_024 and sampled.messages == 2 and sampled.round_trips == 1
    for rule in ("rejection_greedy", "match_sampled", "typical_greedy"):
        ids = payload(rule, V, gamma, torch.float16)
        assert (ids.up, ids.down, ids.messages) == (16, 8, 2)


def test_known_answers_lazy_protocols():
    V, gamma, alpha = 128_256, 4, 0.5
    r = 1 - alpha ** gamma                      # 15/16
    two = payload("rejection_sampled_two_round", V, gamma, torch.float32, alpha=alpha)
    assert two.up == pytest.approx(gamma * (I + 4) + r * V * 4)
    assert two.down == 2 * I
    assert two.messages == pytest.approx(2 + 2 * r)
    back = payload("rejection_sampled_return_p", V, gamma, torch.float32, alpha=alpha)
    assert back.up == pytest.approx(gamma * (I + 4) + r * I)
    assert back.down == pytest.approx((2 - r) * I + r * V * 4)
    assert back.messages == 2
    assert back.bytes == pytest.approx(two.bytes)   # same bytes, one round trip fewer after a rejection


@pytest.mark.parametrize("dtype, d", [(torch.float16, 2), (torch.bfloat16, 2), (torch.float32, 4),
                                      (torch.float64, 8), (torch.float8_e4m3fn, 1), (1, 1), (2, 2), (4, 4), (8, 8)])
def test_value_bytes(dtype, d):
    assert transfer.value_bytes(dtype) == d
    assert payload("rejection_sampled", 10, 3, dtype).up == 3 * I + 3 * 10 * d


def test_id_bytes_parameter():
    assert payload("typical_greedy", 100, 5, id_bytes=8).bytes == 5 * 8 + 2 * 8


@pytest.mark.parametrize("rule", RULES)
def test_alpha_edges(rule):
    V, gamma, d = 1000, 3, 2
    never = payload(rule, V, gamma, d, alpha=1.0)      # nothing is ever rejected
    always = payload(rule, V, gamma, d, alpha=0.0)     # the first draft is always rejected
    if rule == "rejection_sampled_two_round":
        assert (never.bytes, never.messages) == (gamma * (I + d) + 2 * I, 2)
        assert (always.bytes, always.messages) == (gamma * (I + d) + V * d + 2 * I, 4)
    elif rule == "rejection_sampled_return_p":
        assert (never.up, never.down, never.messages) == (gamma * (I + d), 2 * I, 2)
        assert (always.up, always.down, always.messages) == (gamma * (I + d) + I, I + V * d, 2)
    else:                                              # traffic does not depend on alpha
        assert never == always == payload(rule, V, gamma, d)


@pytest.mark.parametrize("rule", RULES)
def test_bytes_grow_with_vocabulary_and_gamma(rule):
    for alpha in (0.0, 0.3, 0.8, 1.0):
        by_V = [payload(rule, V, 4, 2, alpha=alpha).bytes for V in (84, 32_000, 128_256, 151_936, 262_144)]
        by_gamma = [payload(rule, 32_000, g, 2, alpha=alpha).bytes for g in range(1, 9)]
        assert by_V == sorted(by_V) and by_gamma == sorted(by_gamma)
    assert payload(rule, 32_000, 4, 4, alpha=0.5).bytes >= payload(rule, 32_000, 4, 2, alpha=0.5).bytes


def test_ranking_of_protocols():
    # For gamma >= 1 the lazy protocols never move more than the plain one, and ids-only
    # rules move the least; strictly so once V > 1.
    for V in (2, 84, 262_144):
        for alpha in (0.0, 0.5, 0.99):
            plain = payload("rejection_sampled", V, 4, 4).bytes
            lazy = payload("rejection_sampled_two_round", V, 4, 4, alpha=alpha).bytes
            ids = payload("typical_greedy", V, 4, 4).bytes
            assert ids < lazy < plain


def _walk_protocol(rule, accepted, V, gamma, d, i=I):
    """Bytes and messages of one step, walked message by message (the oracle)."""
    rejected = accepted < gamma
    up = gamma * i + gamma * d                         # round one: ids and q_i(x_i)
    if rule == "rejection_sampled_two_round":
        if not rejected:
            return up, 2 * i, 2                        # count + bonus token
        # target: count (= request for q at the rejected position); draft: q (V values);
        # target: the resampled token
        return up + V * d, i + i, 4
    if not rejected:
        return up, 2 * i, 2
    # target: count + p at the rejected position; the draft's next message carries its token
    return up + i, i + V * d, 2


@pytest.mark.parametrize("rule", ["rejection_sampled_two_round", "rejection_sampled_return_p"])
@pytest.mark.parametrize("alpha", [0.3, 0.7, 0.9])
def test_lazy_protocols_match_monte_carlo(rule, alpha):
    V, gamma, d, n = 5_000, 4, 2, 20_000
    gen = torch.Generator().manual_seed(7)
    accept = torch.rand(n, gamma, generator=gen) < alpha            # i.i.d. acceptance
    accepted = accept.int().cumprod(dim=1).sum(dim=1)               # drafts before the first rejection
    walked = torch.tensor([_walk_protocol(rule, a, V, gamma, d) for a in accepted.tolist()],
                          dtype=torch.float64)                      # [n, 3]: up, down, messages
    expected = payload(rule, V, gamma, d, alpha=alpha)
    for column, value in zip(walked.T, (expected.up, expected.down, expected.messages)):
        mean, se = column.mean().item(), column.std().item() / math.sqrt(n)
        assert abs(mean - value) <= 5 * se + 1e-9, (mean, value, se)
    # and the rejection frequency itself
    assert abs((accepted < gamma).double().mean().item() - (1 - alpha ** gamma)) < 5 * math.sqrt(0.25 / n)


# ---------------------------------------------------------------------------------------
# Time


@pytest.mark.parametrize("rule", RULES)
def test_step_cost_is_the_formula(rule):
    V, gamma, alpha = 151_936, 4, 0.6
    cost = step_cost(rule, V, gamma, torch.bfloat16, alpha, LINK)
    load = payload(rule, V, gamma, torch.bfloat16, alpha=alpha)
    assert cost.payload == load and cost.bytes == load.bytes and cost.round_trips == load.messages / 2
    assert cost.seconds == pytest.approx(load.messages * LINK.latency + load.bytes / LINK.bandwidth)
    assert cost.tokens == pytest.approx((1 - alpha ** (gamma + 1)) / (1 - alpha))
    assert cost.tokens == pytest.approx(float(speculative.expected_tokens(alpha, gamma)))
    assert cost.seconds_per_token == pytest.approx(cost.seconds / cost.tokens)
    assert cost.bytes_per_token == pytest.approx(cost.bytes / cost.tokens)


def test_step_cost_alpha_edges():
    assert step_cost("typical_greedy", 100, 4, 2, 1.0, LINK).tokens == 5     # every draft plus the bonus
    assert step_cost("typical_greedy", 100, 4, 2, 0.0, LINK).tokens == 1     # the target's own token only


@pytest.mark.parametrize("rule", RULES)
def test_time_falls_with_bandwidth_and_rises_with_latency(rule):
    by_bandwidth = [step_cost(rule, 128_256, 4, 4, 0.7, Link("l", b, 5e-6)).seconds for b in (1e8, 1e9, 1e10, 1e11)]
    by_latency = [step_cost(rule, 128_256, 4, 4, 0.7, Link("l", 1e9, lat)).seconds for lat in (0, 1e-6, 1e-4)]
    assert by_bandwidth == sorted(by_bandwidth, reverse=True) and by_latency == sorted(by_latency)


def test_time_per_token():
    cost = step_cost("rejection_sampled", 32_000, 4, 2, 0.6, LINK)
    assert cost.time_per_token() == pytest.approx(cost.seconds_per_token)
    assert cost.time_per_token(5e-3) == pytest.approx((5e-3 + cost.seconds) / cost.tokens)
    with pytest.raises(ValueError, match="`compute` must lie in"):
        cost.time_per_token(-1.0)


def test_break_even():
    slow_link = Link("slow", 125e6, 50e-6)
    sampled = step_cost("rejection_sampled", 128_256, 4, 4, 0.68, slow_link)   # accepts more, moves more
    greedy = step_cost("rejection_greedy", 128_256, 4, 4, 0.48, slow_link)
    t = transfer.break_even(sampled, greedy)
    assert 0 < t < math.inf
    assert sampled.time_per_token(t) == pytest.approx(greedy.time_per_token(t))
    assert sampled.time_per_token(2 * t) < greedy.time_per_token(2 * t)
    assert sampled.time_per_token(t / 2) > greedy.time_per_token(t / 2)
    assert transfer.break_even(greedy, sampled) == math.inf            # fewer tokens per step: never
    typical = step_cost("typical_greedy", 128_256, 4, 4, 0.87, slow_link)     # more tokens, fewer bytes
    assert transfer.break_even(typical, sampled) == 0.0
    same = step_cost("typical_greedy", 128_256, 4, 4, 0.48, slow_link)
    assert transfer.break_even(same, greedy) == 0.0 and transfer.break_even(greedy, same) == 0.0
    dearer = step_cost("typical_greedy", 128_256, 4, 4, 0.48, Link("slower", 1e6, 1e-3))
    assert transfer.break_even(dearer, greedy) == math.inf
    with pytest.raises(TypeError, match="`b` must be a StepCost"):
        transfer.break_even(sampled, 1.0)


def test_links():
    names = [link.name for link in LINKS]
    assert len(set(names)) == len(names)
    by_name = {link.name: link for link in LINKS}
    assert by_name["PCIe 5.0 x16"].bandwidth == 2 * by_name["PCIe 4.0 x16"].bandwidth
    assert by_name["10 GbE"].bandwidth == 10e9 / 8 and by_name["1 GbE"].bandwidth == 1e9 / 8
    assert by_name["100 GbE"].bandwidth == 100e9 / 8
    assert LINK.seconds(1e6, 2) == pytest.approx(2 * 10e-6 + 1e-3)


# ---------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("call, error, words", [
    (lambda: payload("speculative", 10, 4), ValueError, "unknown rule"),
    (lambda: payload(3, 10, 4), TypeError, "`rule` must be a string"),
    (lambda: payload("typical_greedy", 0, 4), ValueError, "`V` must be >= 1"),
    (lambda: payload("typical_greedy", 10, 0), ValueError, "`gamma` must be >= 1"),
    (lambda: payload("typical_greedy", 10, 2.5), TypeError, "`gamma` must be an integer"),
    (lambda: payload("typical_greedy", 10, True), TypeError, "`gamma` must be an integer"),
    (lambda: payload("typical_greedy", "10", 4), TypeError, "`V` must be an integer"),
    (lambda: payload("typical_greedy", 10, 4, 3), ValueError, "must be 1, 2, 4 or 8"),
    (lambda: payload("typical_greedy", 10, 4, True), TypeError, "`dtype` must be an integer"),
    (lambda: payload("typical_greedy", 10, 4, torch.int32), TypeError, "floating dtype"),
    (lambda: payload("typical_greedy", 10, 4, id_bytes=0), ValueError, "`id_bytes` must be >= 1"),
    (lambda: payload("rejection_sampled_two_round", 10, 4), ValueError, "needs `alpha`"),
    (lambda: payload("rejection_sampled_return_p", 10, 4, alpha=1.5), ValueError, "`alpha` must lie in"),
    (lambda: payload("rejection_sampled_two_round", 10, 4, alpha=float("nan")), ValueError, "finite"),
    (lambda: payload("rejection_sampled_two_round", 10, 4, alpha="0.5"), TypeError, "real number"),
    (lambda: step_cost("typical_greedy", 10, 4, 2, -0.1, LINK), ValueError, "`alpha` must lie in"),
    (lambda: step_cost("typical_greedy", 10, 4, 2, True, LINK), TypeError, "real number"),
    (lambda: step_cost("typical_greedy", 10, 4, 2, 0.5, (1e9, 1e-6)), TypeError, "`link` must be a Link"),
    (lambda: Link("bad", -1e9, 1e-6), ValueError, "`bandwidth` must lie in"),
    (lambda: Link("bad", 0.0, 1e-6), ValueError, "`bandwidth` must lie in"),
    (lambda: Link("bad", 1e9, -1e-6), ValueError, "`latency` must lie in"),
    (lambda: Link("bad", "fast", 1e-6), TypeError, "real number"),
    (lambda: Link("bad", 1e9, float("inf")), ValueError, "finite"),
    (lambda: transfer.measure_loopback([]), ValueError, "non-empty sequence"),
    (lambda: transfer.measure_loopback("16"), ValueError, "non-empty sequence"),
    (lambda: transfer.measure_loopback([16, 0]), ValueError, "must be >= 1"),
    (lambda: transfer.measure_loopback([16], repeats=0), ValueError, "`repeats` must be >= 1"),
    (lambda: transfer.measure_loopback([16], timeout=0), ValueError, "`timeout` must lie in"),
    (lambda: transfer.measure_pcie([16], repeats=0), ValueError, "`repeats` must be >= 1"),
    (lambda: fit_link(((16, 1e-5),)), TypeError, "must be a Measurement"),
])
def test_validation(call, error, words):
    with pytest.raises(error, match=re.escape(words)):
        call()


def test_type_errors_are_value_errors_too():
    with pytest.raises(ValueError):
        payload("typical_greedy", 10, True)
    assert issubclass(checks.InputTypeError, TypeError)


# ---------------------------------------------------------------------------------------
# Fitting and measuring


def _synthetic(latency, bandwidth, messages, reply):
    # every size timed three times: the model's time, plus two exchanges that waited longer
    sizes = (16, 1024, 65_536, 1_000_000, 4_000_000)
    exact = [messages * latency + (n + reply) / bandwidth for n in sizes]
    samples = tuple((1.5 * t, t, 3.0 * t) for t in exact)
    return Measurement("synthetic", sizes, samples, messages=messages, reply_bytes=reply)


@pytest.mark.parametrize("messages, reply", [(2, 8), (1, 0)])
def test_fit_recovers_the_model(messages, reply):
    m = _synthetic(40e-6, 4e9, messages, reply)
    assert m.repeats == 3 and m.median == tuple(1.5 * t for t in m.fastest)
    link = fit_link(m, name="fit")
    assert link.name == "fit"
    assert link.latency == pytest.approx(40e-6, rel=1e-9)
    assert link.bandwidth == pytest.approx(4e9, rel=1e-9)
    slower = fit_link(m, statistic="median")        # every time 1.5x: latency 1.5x, bandwidth / 1.5
    assert slower.latency == pytest.approx(60e-6, rel=1e-9)
    assert slower.bandwidth == pytest.approx(4e9 / 1.5, rel=1e-9)


def _two(t_small, t_big, sizes=(16, 4_000_000)):
    return Measurement("two sizes", sizes, ((t_small,), (t_big,)), messages=2, reply_bytes=8)


def test_fit_rejects_what_it_cannot_describe():
    with pytest.raises(ValueError, match="two different sizes"):
        fit_link(_two(1e-5, 1e-5, sizes=(16, 16)))
    with pytest.raises(ValueError, match="does not fit"):
        fit_link(_two(1e-3, 1e-5))                   # faster when bigger
    with pytest.raises(ValueError, match="finite and positive"):
        fit_link(_two(float("nan"), 1e-5))
    with pytest.raises(ValueError, match="`statistic` must be"):
        fit_link(_two(1e-5, 1e-3), statistic="mean")


def test_loopback_measurement_returns_sane_times():
    sizes = (16, 262_144)
    # 20 repeats: on a busy machine a few exchanges wait for a CPU; the fastest of 20 did not
    m = transfer.measure_loopback(sizes, repeats=20, warmup=3, timeout=60)
    assert m.sizes == sizes and m.messages == 2 and m.reply_bytes == 2 * I and m.repeats == 20
    for summary in (m.fastest, m.median):
        assert len(summary) == 2 and all(math.isfinite(t) and 0 < t < 10 for t in summary)
    assert all(f <= med for f, med in zip(m.fastest, m.median))
    # a quarter-megabyte message is not faster than 16 bytes by an absurd margin
    assert m.fastest[1] > m.fastest[0] / 10


def test_pcie_measurement_on_cuda():
    m = transfer.measure_pcie((16, 1 << 20), repeats=3, warmup=1)
    if not torch.cuda.is_available():
        assert m is None
    else:
        assert all(math.isfinite(t) and t > 0 for t in m.fastest) and m.messages == 1 and m.repeats == 3


def test_protocol_names_follow_the_method_vocabulary():
    """Each protocol is a bench method label (rule name + how drafts are made), or such a
    label plus a suffix naming the variant; the old bare name "typical" is gone."""
    from typsamp import bench

    for rule in transfer.RULES:
        base = next((m for m in bench.METHODS if rule == m or rule.startswith(m + "_")), None)
        assert base is not None, rule
    assert set(bench.METHODS) <= set(transfer.RULES)
    with pytest.raises(ValueError, match="unknown rule 'typical'; choose one of .*typical_greedy"):
        payload("typical", 10, 4)
