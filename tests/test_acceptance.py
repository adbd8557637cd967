"""typsamp.acceptance: the α-against-T grid of chapter 9, on a tiny random Gemma.

The real run (``python -m typsamp.acceptance``) takes minutes; here a tiny Gemma 3 with
random weights is the target, and drafts with known acceptance check that the grid
measures what it says: the target drafting for itself with sampled drafts is never
rejected, greedy self-drafts at T = 0 are always accepted, and at T = 1 greedy drafts
and the match rule lose acceptance that sampled drafts keep.
"""

from __future__ import annotations

import json
import pytest
import torch

from typsamp import acceptance, bench, gemma
from tiny_gemma import random_gemma

TINY = gemma.GemmaConfig(vocab_size=61, n_layer=2, hidden=32, ffn=48, n_head=4, n_kv_head=2, head_dim=8,
                         sliding_window=8, global_every=2, context_length=128)


def _tiny(seed: int, scale: float = 0.3) -> gemma.Gemma:
    return random_gemma(TINY, seed, scale)


@pytest.fixture(scope="module")
def target():
    return _tiny(0, scale=0.12)


def _prompts(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (int(length),), generator=gen)
            for length in torch.randint(3, 9, (n,), generator=gen)]


def test_a_sampled_self_draft_is_never_rejected(target):
    rows = acceptance.grid(target, {"self": target}, _prompts(4), (0.0, 0.7, 1.0), gamma=3, new_tokens=8)
    sampled = [r for r in rows if r["method"] == "rejection_sampled"]
    assert [r["temperature"] for r in sampled] == [0.0, 0.7, 1.0]
    for r in sampled:
        # q = p up to float32 rounding between a one-token and a four-token pass
        assert r["examined"] > 0 and r["alpha"] > 0.99, r
    greedy0 = next(r for r in rows if r["method"] == "rejection_greedy" and r["temperature"] == 0.0)
    assert greedy0["alpha"] == 1.0
    assert {r["method"] for r in rows} == set(bench.METHODS)


def test_at_t1_only_the_sampled_self_draft_keeps_every_draft(target):
    """With q = p at T = 1: greedy drafts are kept with probability max p < 1 and the
    match rule with probability sum p^2 <= max p, so both fall below the sampled rule's 1
    (chapter 5's table of limits); the gaps here are many standard errors wide."""
    rows = acceptance.grid(target, {"self": target}, _prompts(8, seed=2), (1.0,), gamma=2, new_tokens=12,
                           seed=3)
    alpha = {r["method"]: r for r in rows}
    assert alpha["rejection_sampled"]["alpha"] > 0.99
    for method in ("rejection_greedy", "match_sampled"):
        r = alpha[method]
        assert r["alpha"] + 5 * max(r["se"], 0.02) < 0.99, r
    assert alpha["match_sampled"]["alpha"] < alpha["rejection_greedy"]["alpha"] + 0.15


def test_cells_report_counts_that_add_up(target):
    prompts = _prompts(4, seed=4)
    other = _tiny(5)
    rows = acceptance.grid(target, {"other": other}, prompts, (0.7,), gamma=3, new_tokens=6)
    assert len(rows) == len(bench.METHODS)
    for r in rows:
        assert r["draft"] == "other" and r["rows"] == 4 and r["tokens"] == 24
        assert r["alpha"] == pytest.approx(r["accepted"] / r["examined"])
        assert len(r["row_alpha"]) == 4 and r["se"] >= 0
        assert 1.0 <= r["tokens_per_step"] <= 4.0
    again = acceptance.grid(target, {"other": other}, prompts, (0.7,), gamma=3, new_tokens=6)
    assert again == rows                                     # seeded: a rerun is identical


class _Lookup:
    """A stand-in deterministic proposer: proposes the row's last token γ times."""

    vocab_size = TINY.vocab_size

    def __init__(self):
        self.passes = 0

    def width(self, gamma):
        return gamma

    def start(self, prompt, prompt_lengths, *, max_new_tokens, gamma, warp):
        self.gamma = gamma
        self.parents = torch.arange(-1, gamma - 1)

    def propose(self, seq, n, top, generator):
        from typsamp import generate
        last = seq.gather(1, (n - 1)[:, None]).expand(-1, self.gamma)
        return generate.Proposal(tokens=last.contiguous(), parents=self.parents)

    def commit(self, n):
        pass


def test_a_proposer_runs_only_the_deterministic_methods(target):
    lookup = _Lookup()
    assert acceptance.methods_for(lookup) == acceptance.DETERMINISTIC_METHODS
    assert acceptance.methods_for(target) == tuple(bench.METHODS)
    rows = acceptance.grid(target, {"lookup": lookup}, _prompts(3), (0.0, 1.0), gamma=2, new_tokens=6)
    assert [(r["method"], r["temperature"]) for r in rows] == [
        ("rejection_greedy", 0.0), ("rejection_greedy", 1.0), ("typical_greedy", 0.0), ("typical_greedy", 1.0)]
    with pytest.raises(ValueError, match="needs a draft model"):
        acceptance.measure(target, lookup, _prompts(2), "rejection_sampled", 1.0)


def test_bad_arguments_are_named(target):
    with pytest.raises(ValueError, match="method"):
        acceptance.measure(target, target, _prompts(2), "nonsense", 1.0)
    with pytest.raises(ValueError, match="temperatures"):
        acceptance.grid(target, {"self": target}, _prompts(2), ())
    with pytest.raises(ValueError, match="temperature"):
        acceptance.grid(target, {"self": target}, _prompts(2), (-1.0,))
    with pytest.raises(ValueError, match="drafts"):
        acceptance.grid(target, {}, _prompts(2))
    with pytest.raises(ValueError, match="draft"):
        acceptance.load_draft("nonsense")
    with pytest.raises(ValueError, match="drafts"):
        acceptance.run(["nonsense"])
    with pytest.raises(ValueError, match="per_category"):
        acceptance.run_prompts(None, per_category=0)


def test_prompts_are_cut_to_bos_and_their_tail():
    class Tok:                                        # a tokenizer stub: BOS, then one id per word
        def __call__(self, text, return_tensors):
            ids = [2] + [3 + len(w) for w in text.split()]

            class Out:
                input_ids = torch.tensor([ids])
            return Out()

    rows, names = acceptance.run_prompts(Tok(), per_category=1, prompt_tokens=5)
    assert len(rows) == len(names) == len(acceptance.prompts.CATEGORIES)
    for row in rows:
        assert row[0] == 2 and row.numel() <= 5 and row.dtype == torch.long


def test_the_committed_results_name_their_grid():
    paths = sorted(acceptance.OUT.parent.glob("llm_acceptance*.json"))
    if not paths:
        pytest.skip(f"no {acceptance.OUT.parent}/llm_acceptance*.json yet (python -m typsamp.acceptance)")
    settings = None
    for path in paths:
        result = json.loads(path.read_text())
        assert "commit" in result["machine"] and "dirty" in result["machine"]
        settings = settings or result["settings"]
        assert result["settings"] == settings, path.name          # one grid across the files
        temps = result["settings"]["temperatures"]
        for name in result["drafts"]:
            cells = [r for r in result["results"] if r["draft"] == name]
            methods = {r["method"] for r in cells}
            assert methods <= set(bench.METHODS) and len(cells) == len(methods) * len(temps)
            for r in cells:
                assert 0.0 <= r["alpha"] <= 1.0 and r["examined"] > 0
