"""typsamp.drafts: the trimmed head, prompt lookup, layer skipping, the kept token ids.

Mechanics run on a tiny Gemma 3 with random weights (vocabulary 97); the real 270M
model (``make install``) checks that greedy speculative decoding with the trimmed draft
gives the fp32 target's own greedy text. ``TYPSAMP_SKIP_GEMMA=1`` skips the real-model
tests, as in tests/test_gemma.py.
"""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

from typsamp import drafts, gemma, generate, sampling
import real_gemma
from tiny_gemma import TINY, random_gemma, tiny_without_cache  # noqa: F401 (autouse fixture)
from typsamp.speculative import ExactMatch, RejectionSampling



@pytest.fixture(scope="module")
def tiny():
    return random_gemma()


def _kept(seed=1, k=48):
    return torch.randperm(TINY.vocab_size, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper-tail p-value of Pearson's chi-square for ``counts`` against ``probs``; cells
    expected below 5 draws are pooled into one (the chi-square law needs it)."""
    n = counts.sum().double()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] == 0:
        if obs[-1] > 0:
            return 0.0
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


# ---------------------------------------------------------------------------------------
# TrimmedHead


def test_trimmed_head_logits_are_the_models_inside_and_minus_inf_outside(tiny):
    kept = _kept()
    draft = drafts.TrimmedHead(tiny, kept)
    tokens = torch.randint(0, TINY.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = tiny(tokens)
        trimmed = draft(tokens)
    assert trimmed.shape == (2, 7, TINY.vocab_size) and trimmed.dtype == torch.float32
    outside = torch.ones(TINY.vocab_size, dtype=torch.bool)
    outside[kept] = False
    assert torch.isneginf(trimmed[..., outside]).all()
    torch.testing.assert_close(trimmed[..., kept], full[..., kept], atol=1e-5, rtol=1e-5)


def test_trimmed_head_keeps_its_own_cache_beside_the_targets(tiny):
    draft = drafts.TrimmedHead(tiny, _kept())
    prompt = torch.tensor([[5, 9, 11, 3, 40, 2]])
    with torch.inference_mode():
        tiny.setup_cache(1, 16)
        target_cache = tiny.cache
        draft.setup_cache(1, 16)
        assert tiny.cache is target_cache and draft.cache is not target_cache
        step = draft(prompt, torch.zeros(1, dtype=torch.long), span=6)
        assert tiny.cache is target_cache and int(draft.cache.lengths) == 6 and int(target_cache.lengths) == 0
        tiny.clear_cache()
        draft.clear_cache()
        whole = draft(prompt)                            # no cache: plain causal attention
    torch.testing.assert_close(step, whole)


def test_trimmed_head_rejects_bad_kept_sets(tiny):
    with pytest.raises(ValueError, match="sorted"):
        drafts.TrimmedHead(tiny, torch.tensor([3, 2, 5]))
    with pytest.raises(ValueError, match="sorted"):
        drafts.TrimmedHead(tiny, torch.tensor([2, 2, 5]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        drafts.TrimmedHead(tiny, torch.tensor([0, 97]))
    with pytest.raises(ValueError, match="`kept`"):
        drafts.TrimmedHead(tiny, torch.tensor([[1, 2]]))
    with pytest.raises(TypeError, match="`model`"):
        drafts.TrimmedHead(object(), torch.tensor([1, 2]))


def test_trimmed_draft_loads_the_target_in_the_dtype_asked(tiny, monkeypatch):
    asked = []

    def fake_load(dtype, device):
        asked.append((dtype, device))
        return copy.deepcopy(tiny).to(dtype)

    monkeypatch.setattr(gemma, "load", fake_load)
    monkeypatch.setattr(drafts, "kept_tokens", lambda: _kept(2))
    draft = drafts.trimmed_draft()
    assert asked == [(torch.bfloat16, "cpu")]
    assert draft.rows.dtype == torch.bfloat16 and torch.equal(draft.kept, _kept(2))


def test_rejection_sampling_with_the_trimmed_draft_is_exact(tiny):
    # 4000 rows of one prompt, gamma 3, two new tokens at T = 1: the second token's law
    # mixes accepted drafts, residual draws outside the kept set and bonus tokens; both
    # tokens' marginals must be the target's own (chi-square, p > 1e-4 at fixed seeds).
    kept = _kept(4, 40)
    draft = drafts.TrimmedHead(tiny, kept)
    prompt = torch.tensor([[7, 31, 64]])
    rows = 4000
    with torch.inference_mode():
        out = generate.speculative(tiny, draft, prompt.expand(rows, -1).contiguous(), 2, gamma=3,
                                   rule=RejectionSampling(), seed=123)
        tiny.clear_cache()
        draft.clear_cache()
        p1 = torch.softmax(tiny(prompt)[0, -1], -1)
        following = torch.cat([prompt.expand(TINY.vocab_size, -1), torch.arange(TINY.vocab_size)[:, None]], 1)
        p2 = (p1[:, None] * torch.softmax(tiny(following)[:, -1], -1)).sum(0)
        q1 = torch.softmax(draft(prompt)[0, -1], -1)
    first = torch.bincount(out.tokens[:, 0], minlength=TINY.vocab_size)
    second = torch.bincount(out.tokens[:, 1], minlength=TINY.vocab_size)
    assert _chi_square_p(first, p1) > 1e-4 and _chi_square_p(second, p2) > 1e-4
    outside = torch.ones(TINY.vocab_size, dtype=torch.bool)
    outside[kept] = False
    assert first[outside].sum() > 0.1 * rows           # the residual does supply the untrimmed tokens
    assert _chi_square_p(first, q1) == 0.0              # the test can fail: the draft's law is not p
    assert 0.2 < out.alpha < 1.0


# ---------------------------------------------------------------------------------------
# PromptLookup


def _lookup_reference(row: list[int], ngram: int, min_ngram: int, gamma: int) -> list[int]:
    n = len(row)
    for m in range(ngram, min_ngram - 1, -1):
        if n < m + 1:
            continue
        suffix = row[n - m:]
        for j in range(n - 1 - m, -1, -1):              # latest first
            if row[j:j + m] == suffix:
                out, ext = [], list(row)
                for k in range(gamma):
                    ext.append(ext[j + m + k])
                    out.append(ext[-1])
                return out
    return [row[-1]] * gamma


@pytest.mark.parametrize("ngram,min_ngram,gamma", [(3, 1, 4), (2, 2, 5), (4, 1, 1), (1, 1, 3)])
def test_prompt_lookup_matches_a_plain_python_reference(ngram, min_ngram, gamma):
    rng = random.Random(ngram * 10 + gamma)
    B, L = 64, 30
    seq = torch.zeros(B, L + 5, dtype=torch.long)
    n = torch.zeros(B, dtype=torch.long)
    rows = []
    for b in range(B):
        length = rng.randint(1, L)
        row = [rng.randrange(4 if b % 2 else 12) for _ in range(length)]   # small alphabets: many matches
        rows.append(row)
        seq[b, :length] = torch.tensor(row)
        seq[b, length:] = 99                             # junk past the committed text is never read
        n[b] = length
    proposer = drafts.PromptLookup(ngram=ngram, min_ngram=min_ngram)
    proposer.start(seq[:, :1], n, max_new_tokens=4, gamma=gamma, warp=sampling.Warp())
    got, found = proposer.lookup(seq, n, int(n.max()))
    want = [_lookup_reference(row, ngram, min_ngram, gamma) for row in rows]
    assert got.tolist() == want
    assert 0 < int(found.sum()) < B


def test_prompt_lookup_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`ngram`"):
        drafts.PromptLookup(ngram=0)
    with pytest.raises(ValueError, match="`min_ngram`"):
        drafts.PromptLookup(ngram=2, min_ngram=3)


def test_greedy_speculative_with_prompt_lookup_equals_autoregressive(tiny):
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 6, (k,), generator=gen) for k in (3, 9, 14)]  # repetitive: lookups hit
    greedy = sampling.Warp(temperature=0.0)
    with torch.inference_mode():
        ar = generate.autoregressive(tiny, prompts, 20, warp=greedy)
        for rule in (RejectionSampling(), ExactMatch()):
            spec = generate.speculative(tiny, drafts.PromptLookup(3), prompts, 20, gamma=3, rule=rule,
                                        warp=greedy, seed=0)
            assert torch.equal(spec.tokens, ar.tokens)
            assert spec.draft_passes == 0 and spec.accepted > 0


# ---------------------------------------------------------------------------------------
# LayerSkip


def test_layer_skip_is_the_first_layers_with_shared_weights(tiny):
    tokens = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(8))
    reference = copy.deepcopy(tiny)
    for layer in reference.model.layers[2:]:
        layer.forward = lambda x, *args: x               # identity: the layers skipped
    skip = drafts.LayerSkip(tiny, layers=2)
    assert skip.config.n_layer == 2 and skip.config.global_layers == (1,)
    assert skip.model.embed_tokens.weight.data_ptr() == tiny.model.embed_tokens.weight.data_ptr()
    assert skip.model.layers[1].mlp.up_proj.weight.data_ptr() == tiny.model.layers[1].mlp.up_proj.weight.data_ptr()
    with torch.inference_mode():
        torch.testing.assert_close(skip(tokens), reference(tokens))
        full = drafts.LayerSkip(tiny, layers=TINY.n_layer)
        torch.testing.assert_close(full(tokens), tiny(tokens), atol=0, rtol=0)
        assert not torch.allclose(skip(tokens), tiny(tokens), atol=1e-2)
        out = generate.speculative(tiny, skip, tokens[:, :4], 6, gamma=2, seed=1)
        skip.clear_cache()
    assert out.lengths.tolist() == [6, 6]
    with pytest.raises(ValueError, match="`layers`"):
        drafts.LayerSkip(tiny, layers=5)


# ---------------------------------------------------------------------------------------
# The frequency run and the committed kept set


def test_sample_batch_gathers_each_ragged_rows_last_position(tiny):
    rows = [[2, 5, 7, 11, 13], [2, 40], [2, 8, 8, 9]]
    mass = torch.zeros(TINY.vocab_size, dtype=torch.float64)
    with torch.inference_mode():
        out = drafts._sample_batch(tiny, rows, 1, torch.Generator().manual_seed(0), mass)
        want = sum(torch.softmax(tiny(torch.tensor([r]))[0, -1].double(), -1) for r in rows)
    torch.testing.assert_close(mass, want)
    assert [len(s) for s in out] == [6, 3, 5] and all(s[:-1] == r for s, r in zip(out, rows))


class _CharTokenizer:
    """A stand-in for Gemma's tokenizer over the tiny vocabulary: BOS, then one id per character."""

    def __call__(self, text):
        class Encoding:
            input_ids = [2] + [3 + ord(ch) % (TINY.vocab_size - 3) for ch in text]
        return Encoding()


def test_the_frequency_cli_end_to_end_on_the_tiny_model(tiny, monkeypatch, tmp_path):
    monkeypatch.setattr(gemma, "load", lambda dtype: copy.deepcopy(tiny).to(dtype))
    monkeypatch.setattr(gemma, "load_tokenizer", lambda: _CharTokenizer())
    assert drafts.main(["frequencies", "--limit", "3", "--new-tokens", "4", "--prompt-tokens", "6",
                        "--test-new-tokens", "2", "--keep", "20", "--batch-size", "2",
                        "--out", str(tmp_path), "--generations", str(tmp_path)]) == 0
    kept = drafts.kept_tokens(tmp_path / drafts.KEPT_FILE.name)
    assert kept.shape == (20,) and bool((kept[1:] > kept[:-1]).all())
    record = json.loads((tmp_path / drafts.RECORD_FILE.name).read_text())
    runs = drafts.load_generations(drafts.generations_path(tmp_path))
    assert runs["split"].tolist() == [0, 0, 0, 1, 1, 1] and len(runs["prompts"]) == 6
    assert runs["prompt_lengths"].tolist() == [6] * 6 and runs["starts"][-1] == runs["tokens"].numel()
    generated = [runs["tokens"][a + 6:b].long() for a, b in zip(runs["starts"][:-1], runs["starts"][1:])]
    assert [g.numel() for g in generated][:3] == [4, 4, 4] or int(runs["tokens"].eq(1).sum()) > 0
    assert record["tokens_generated"] == {"train": sum(g.numel() for g in generated[:3]),
                                          "test": sum(g.numel() for g in generated[3:])}
    inside = torch.isin(torch.cat(generated[:3]), kept).double().mean()
    assert record["coverage"]["train_generations"] == round(float(inside), 5)
    assert record["settings"]["seed"] == drafts.SEED and record["settings"]["target_dtype"] == "bfloat16"


def test_committed_kept_tokens_and_record():
    kept = drafts.kept_tokens()
    assert kept.shape == (drafts.KEEP,) and kept.dtype == torch.long
    assert bool((kept[1:] > kept[:-1]).all()) and int(kept[0]) >= 0 and int(kept[-1]) < 262_144
    assert {1, 107} <= set(kept[:200].tolist())         # EOS and "\n" are kept
    record = json.loads(drafts.RECORD_FILE.read_text())
    assert record["settings"]["seed"] == drafts.SEED and record["settings"]["limit"] is None
    coverage = record["coverage"]
    assert coverage["train_generations"] > 0.9 and coverage["test_prompt_text"] > 0.85


# ---------------------------------------------------------------------------------------
# The real model (needs `make install`)


@pytest.fixture(scope="module")
def real():
    return real_gemma.load()


def test_greedy_speculative_with_the_trimmed_head_equals_greedy_autoregressive(real):
    model, tokenizer = real
    texts = ["The capital of France is", 'def add(a, b):\n    """Add two numbers."""\n',
             "Q: Tom has 3 apples and buys 5 more. How many apples does he have?\nA:"]
    prompts = [torch.tensor(tokenizer(t).input_ids) for t in texts]
    draft = drafts.TrimmedHead(model, drafts.kept_tokens())           # shares the fp32 weights
    greedy = sampling.Warp(temperature=0.0)
    new = 12
    with torch.inference_mode():
        ar = generate.autoregressive(model, prompts, new, warp=greedy)
        spec = generate.speculative(model, draft, prompts, new, gamma=4, rule=RejectionSampling(), warp=greedy)
        assert spec.accepted > 0
    real_gemma.assert_same_greedy(model, prompts, ar, spec)
