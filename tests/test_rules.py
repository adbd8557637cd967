"""Tests for :mod:`typsamp.rules` and the rule objects built on it.

* the shared helpers (:func:`accepted_prefix`, :func:`emit`, :func:`normalised`) on
  known answers;
* the three rule objects: names, flags, validation, immutability, readable repr, and
  that the checked ``verify``, the unchecked ``kernel`` and the functional wrappers give
  the same verdict with the same seed;
* per-row seeds: with :class:`typsamp.sampling.RowSeeds` a row's verdict does not depend
  on its batch-mates, for every rule;
* the module graph: ``rules`` imports neither ``speculative`` nor ``typical``.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest
import torch

import typsamp
from typsamp import checks, rules, sampling, speculative, typical
from typsamp.rules import Rule, Verdict, accepted_prefix, emit, normalised
from typsamp.speculative import ExactMatch, RejectionSampling
from typsamp.typical import TypicalAcceptance

LIB = pathlib.Path(typsamp.__file__).parent


def random_step(B: int, gamma: int, V: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(2 * torch.randn(B, gamma + 1, V, generator=gen, dtype=torch.float64), -1).to(dtype)
    q = torch.softmax(2 * torch.randn(B, gamma, V, generator=gen, dtype=torch.float64), -1).to(dtype)
    x = torch.multinomial(q.double().reshape(-1, V), 1, generator=gen).view(B, gamma)
    return x, q, p


ALL_RULES = [RejectionSampling(), RejectionSampling(lenience=0.6), ExactMatch(),
             TypicalAcceptance(), TypicalAcceptance(extra="target"), TypicalAcceptance(extra="truncated"),
             TypicalAcceptance(entropy="medusa")]


# ---------------------------------------------------------------------------------------
# Shared helpers


def test_accepted_prefix_counts_leading_passes():
    ok = torch.tensor([[True, True, False, True], [False, True, True, True], [True] * 4, [False] * 4])
    assert torch.equal(accepted_prefix(ok), torch.tensor([2, 0, 4, 0]))
    assert accepted_prefix(ok).dtype == torch.int64
    assert accepted_prefix(torch.zeros(0, 3, dtype=torch.bool)).shape == (0,)


def test_emit_layout():
    x = torch.tensor([[5, 6, 7], [5, 6, 7], [5, 6, 7]])
    v = emit(x, torch.tensor([0, 2, 3]), torch.tensor([1, 2, 3]))
    assert isinstance(v, Verdict)
    assert torch.equal(v.tokens, torch.tensor([[1, -1, -1, -1], [5, 6, 2, -1], [5, 6, 7, 3]]))
    assert torch.equal(v.emitted, torch.tensor([1, 3, 4]))


def test_normalised_divides_by_the_row_sum_in_the_compute_dtype():
    row = torch.tensor([[0.50390625, 0.50390625], [0.0, 0.0]], dtype=torch.bfloat16)
    out = normalised(row, torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[0.5, 0.5], [0.0, 0.0]]))           # zero rows stay zero


def test_verdict_lives_in_rules_and_is_re_exported():
    assert speculative.Verdict is rules.Verdict
    assert typsamp.RejectionSampling is RejectionSampling
    assert typsamp.ExactMatch is ExactMatch
    assert typsamp.TypicalAcceptance is TypicalAcceptance


def test_rules_imports_neither_rule_module():
    """No import circle: rules.py imports only torch, checks (and the standard library)."""
    tree = ast.parse((LIB / "rules.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not {name for name in imported if "speculative" in name or "typical" in name}, imported


# ---------------------------------------------------------------------------------------
# The rule objects


def test_names_and_flags():
    assert (RejectionSampling.name, RejectionSampling.needs_draft_probs) == ("rejection", True)
    assert (ExactMatch.name, ExactMatch.needs_draft_probs) == ("match", False)
    assert (TypicalAcceptance.name, TypicalAcceptance.needs_draft_probs) == ("typical", False)
    for rule in ALL_RULES:
        assert isinstance(rule, Rule)
        assert rule.supports_tree is True                  # each verifies trees too (test_tree.py)
        assert rule.name in ("rejection", "match", "typical")


def test_defaults_repr_equality_and_immutability():
    assert repr(RejectionSampling()) == "RejectionSampling(lenience=1.0)"
    assert repr(ExactMatch()) == "ExactMatch()"
    assert repr(TypicalAcceptance()) == "TypicalAcceptance(epsilon=0.09, delta=0.3, extra='greedy', entropy='exact')"
    assert TypicalAcceptance() == TypicalAcceptance(0.09, 0.3, "greedy")
    assert RejectionSampling(1) == RejectionSampling() and hash(RejectionSampling(1)) == hash(RejectionSampling())
    assert isinstance(RejectionSampling(1).lenience, float)
    assert TypicalAcceptance(extra="target") != TypicalAcceptance()
    with pytest.raises(dataclasses.FrozenInstanceError):
        TypicalAcceptance().epsilon = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        RejectionSampling().lenience = 0.5


BAD_RULES = [
    (lambda: RejectionSampling(0.0), ValueError, "`lenience`"),
    (lambda: RejectionSampling(1.5), ValueError, "`lenience`"),
    (lambda: RejectionSampling(float("nan")), ValueError, "`lenience`"),
    (lambda: RejectionSampling("1"), TypeError, "`lenience`"),
    (lambda: RejectionSampling(True), TypeError, "`lenience`"),
    (lambda: TypicalAcceptance(epsilon=1.5), ValueError, "`epsilon`"),
    (lambda: TypicalAcceptance(delta=-0.1), ValueError, "`delta`"),
    (lambda: TypicalAcceptance(delta=None), TypeError, "`delta`"),
    (lambda: TypicalAcceptance(extra="medusa"), ValueError, "`extra`"),
    (lambda: TypicalAcceptance(extra=None), ValueError, "`extra`"),
    (lambda: TypicalAcceptance(entropy="shannon"), ValueError, "`entropy`"),
]


@pytest.mark.parametrize("make, error, match", BAD_RULES, ids=[str(i) for i in range(len(BAD_RULES))])
def test_bad_parameters_are_refused_on_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_base_rule_has_no_kernel():
    x, q, p = random_step(2, 2, 4, 0)
    with pytest.raises(NotImplementedError):
        Rule().verify(x, q, p)


@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
def test_verify_kernel_and_call_agree(rule):
    x, q, p = random_step(64, 3, 6, 1)
    draft_probs = q if rule.needs_draft_probs else None
    outs = []
    for how in ("verify", "kernel", "call", "unvalidated"):
        gen = torch.Generator().manual_seed(7)
        if how == "verify":
            v = rule.verify(x, draft_probs, p, gen)
        elif how == "kernel":
            v = rule.kernel(x, draft_probs, p, gen)
        elif how == "call":
            v = rule(x, draft_probs, p, gen)
        else:
            v = rule.verify(x, draft_probs, p, gen, validate=False)
        outs.append(v)
    for v in outs[1:]:
        assert torch.equal(v.tokens, outs[0].tokens) and torch.equal(v.accepted, outs[0].accepted)
    assert (outs[0].accepted > 0).any()


def test_functional_wrappers_are_the_rule_objects():
    x, q, p = random_step(64, 3, 6, 2)

    def same(a, b):
        return torch.equal(a.tokens, b.tokens) and torch.equal(a.accepted, b.accepted)

    def seeded():
        return torch.Generator().manual_seed(3)

    assert same(speculative.verify(x, q, p, seeded()), RejectionSampling().verify(x, q, p, seeded()))
    assert same(speculative.verify(x, q, p, seeded(), lenience=0.5), RejectionSampling(0.5).verify(x, q, p, seeded()))
    assert same(speculative.verify(x, None, p, seeded()), RejectionSampling().verify(x, None, p, seeded()))
    assert same(speculative.verify_match(x, p, seeded()), ExactMatch().verify(x, None, p, seeded()))
    assert same(speculative.verify_match(x, p, seeded(), draft_probs=q), ExactMatch().verify(x, q, p, seeded()))
    for extra in typical.EXTRA:
        assert same(typical.verify(x, p, 0.09, 0.3, seeded(), extra=extra),
                    TypicalAcceptance(extra=extra).verify(x, q, p, seeded()))
    # The functional typical.verify keeps its historical default, extra="target".
    assert same(typical.verify(x, p, generator=seeded()), TypicalAcceptance(extra="target").verify(x, None, p, seeded()))


@pytest.mark.parametrize("rule", [ExactMatch(), TypicalAcceptance()], ids=repr)
def test_rules_without_q_refuse_a_non_tensor_q_but_ignore_a_tensor(rule):
    x, q, p = random_step(8, 2, 5, 4)
    with pytest.raises(checks.InputTypeError, match="`draft_probs`"):
        rule.verify(x, [0.5], p)
    a = rule.verify(x, q[:, :, :2], p, torch.Generator().manual_seed(0))        # any tensor: ignored
    b = rule.verify(x, None, p, torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens)


def test_rejection_sampling_checks_q():
    x, q, p = random_step(8, 2, 5, 5)
    with pytest.raises(ValueError, match="`draft_probs`"):
        RejectionSampling().verify(x, q[:, :1], p)
    with pytest.raises(ValueError, match="`draft_probs`"):
        RejectionSampling().verify(x, q * 2, p)


@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
def test_row_seeds_make_a_row_independent_of_its_batch_mates(rule):
    x, q, p = random_step(5, 3, 6, 6)
    draft_probs = q if rule.needs_draft_probs else None
    seeds = [11, 12, 13, 14, 15]
    batch = rule.verify(x, draft_probs, p, sampling.RowSeeds(seeds))
    for b in range(5):
        alone = rule.verify(x[b:b + 1], None if draft_probs is None else draft_probs[b:b + 1], p[b:b + 1],
                            sampling.RowSeeds(seeds[b:b + 1]))
        assert torch.equal(alone.tokens[0], batch.tokens[b]) and alone.accepted[0] == batch.accepted[b]
    with pytest.raises(ValueError, match="row seeds"):
        rule.verify(x, draft_probs, p, sampling.RowSeeds(seeds[:4]))


def test_empty_batch_for_every_rule():
    x = torch.zeros(0, 3, dtype=torch.long)
    p = torch.full((0, 4, 5), 0.2)
    q = torch.full((0, 3, 5), 0.2)
    for rule in ALL_RULES:
        v = rule.verify(x, q if rule.needs_draft_probs else None, p)
        assert v.tokens.shape == (0, 4) and v.accepted.shape == (0,)


@pytest.mark.parametrize("rule", [RejectionSampling(), ExactMatch(), TypicalAcceptance(),
                                  TypicalAcceptance(extra="target", entropy="medusa")])
def test_verify_takes_a_tree_and_checks_it(rule):
    from typsamp import tree

    spec = tree.small()
    B, N, V = 16, spec.n_nodes, 6
    gen = torch.Generator().manual_seed(3)
    p = torch.softmax(2 * torch.randn(B, N + 1, V, generator=gen), -1)
    x = torch.randint(0, V, (B, N), generator=gen)
    checked = rule.verify(x, None, p, torch.Generator().manual_seed(9), parents=spec)
    raw = rule.kernel(x, None, p, torch.Generator().manual_seed(9), parents=spec.parents)
    called = rule(x, None, p, torch.Generator().manual_seed(9), parents=spec.parents)
    for v in (raw, called):
        assert torch.equal(v.tokens, checked.tokens) and torch.equal(v.accepted, checked.accepted)
        assert torch.equal(v.path, checked.path)
    assert checked.path.shape == (B, spec.max_depth) and (checked.accepted > 0).any()
    with pytest.raises(ValueError, match="a tree of 10 candidates needs `draft_tokens`"):
        rule.verify(x[:, :4], None, p, parents=spec)
    with pytest.raises(ValueError, match="sums to 2, not 1"):
        rule.verify(x, None, p * 2, parents=spec)


def test_a_chain_only_rule_refuses_a_tree():
    @dataclasses.dataclass(frozen=True)
    class ChainOnly(Rule):
        name = "chain_only"

        def kernel(self, draft_tokens, draft_probs, target_probs, generator):
            raise AssertionError("not reached")

    from typsamp import tree

    x, _, p = random_step(2, 10, 5, 0)
    with pytest.raises(ValueError, match="'chain_only' does not verify trees"):
        ChainOnly().verify(x, None, p, parents=tree.small())


def test_verify_checks_the_parents():
    x, _, p = random_step(2, 3, 5, 0)
    rule = TypicalAcceptance()
    with pytest.raises(ValueError, match=r"`parents\[1\]` = 1 must lie in \[-1, 1\)"):
        rule.verify(x, None, p, parents=torch.tensor([-1, 1, 0]))
    with pytest.raises(ValueError, match="`parents` must be int64 of shape"):
        rule.verify(x, None, p, parents=torch.tensor([-1.0, 0.0, 1.0]))
    with pytest.raises(TypeError, match="parents"):
        rule.verify(x, None, p, parents=[-1, 0, 1])
