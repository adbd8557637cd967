"""The decoding engine: speculative decoding is autoregressive decoding, only faster.

Tiny random GPTs (no trained weights needed) make the invariants cheap to check:
greedy speculative output equals greedy autoregressive output token for token (in
float64, where near-ties cannot hide a bug), sampled speculative output has the
autoregressive distribution, batching changes nothing, and the statistics add up.
"""

from __future__ import annotations

import functools

import pytest
import torch

from typsamp import generate, speculative
from typsamp.model import GPT, GPTConfig, to_hf

V = 7


def tiny(seed: int, n_layer: int, n_embd: int, dtype=torch.float64, scale: float = 1.0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=96))
    with torch.no_grad():                       # sharper logits than GPT-2's init gives
        model.transformer.wte.weight.mul_(scale)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def pair():
    return tiny(0, 2, 32), tiny(1, 1, 16)


def prompts(B: int, P: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, P), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("P", [2, 3, 8])
@pytest.mark.parametrize("gamma", [1, 3, 6])
@pytest.mark.parametrize("mode", ["sample", "greedy"])
def test_greedy_speculative_equals_greedy_autoregressive(pair, P, gamma, mode):
    target, draft = pair
    prompt = prompts(4, P)
    reference = generate.autoregressive(target, prompt, 40, temperature=0)
    for d in (draft, target):                   # a weak draft and a perfect one
        out = generate.speculative(target, d, prompt, 40, gamma=gamma, temperature=0, draft_mode=mode)
        assert torch.equal(out.tokens, reference.tokens)
    assert out.alpha == 1.0                     # the target as its own greedy draft


def test_the_weak_draft_really_is_rejected_sometimes(pair):
    # Otherwise the greedy test above would not exercise rollback at all.
    target, draft = pair
    out = generate.speculative(target, draft, prompts(4, 3), 40, gamma=4, temperature=0)
    assert 0.05 < out.alpha < 0.95, out.alpha
    assert (out.accepted_lengths[out.accepted_lengths >= 0] < 4).any()


def test_batched_equals_one_by_one(pair):
    target, draft = pair
    prompt = prompts(5, 4, seed=3)
    batched = generate.speculative(target, draft, prompt, 30, gamma=3, temperature=0)
    for b in range(5):
        alone = generate.speculative(target, draft, prompt[b:b + 1], 30, gamma=3, temperature=0)
        assert torch.equal(alone.tokens[0], batched.tokens[b])
    ar = generate.autoregressive(target, prompt, 30, temperature=0)
    for b in range(5):
        assert torch.equal(generate.autoregressive(target, prompt[b:b + 1], 30, temperature=0).tokens[0],
                           ar.tokens[b])


def _chi2_two_sample(a: torch.Tensor, b: torch.Tensor, cells: int) -> float:
    """p-value of the chi-square test that two samples of codes in [0, cells) share a law."""
    ca = torch.bincount(a, minlength=cells).double()
    cb = torch.bincount(b, minlength=cells).double()
    keep = (ca + cb) > 0
    ca, cb = ca[keep], cb[keep]
    na, nb = ca.sum(), cb.sum()
    pooled = (ca + cb) / (na + nb)
    stat = ((ca - na * pooled) ** 2 / (na * pooled) + (cb - nb * pooled) ** 2 / (nb * pooled)).sum()
    dof = keep.sum().item() - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


# Several sampled-distribution checks at a family-wise level of 1e-4: each at 1e-4 / 12.
ALPHA = 1e-4 / 12


@pytest.mark.parametrize("mode", ["sample", "greedy"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_speculative_has_the_autoregressive_distribution(temperature, mode):
    # Unsharpened tiny models: spread-out distributions, so every token pair occurs.
    target, draft = tiny(0, 2, 32, dtype=torch.float32), tiny(1, 1, 16, dtype=torch.float32, scale=3.0)
    n = 20_000
    prompt = prompts(1, 3).expand(n, 3).contiguous()
    ar = generate.autoregressive(target, prompt, 3, temperature=temperature, seed=1).tokens
    sp = generate.speculative(target, draft, prompt, 3, gamma=2, temperature=temperature,
                              draft_mode=mode, seed=2)
    assert 0.0 < sp.alpha < 1.0
    tokens = sp.tokens
    # The joint law of the first two tokens (V^2 cells) and the marginal of the third.
    assert _chi2_two_sample(ar[:, 0] * V + ar[:, 1], tokens[:, 0] * V + tokens[:, 1], V * V) > ALPHA
    assert _chi2_two_sample(ar[:, 2], tokens[:, 2], V) > ALPHA


def test_the_chi2_check_detects_a_wrong_distribution():
    target, draft = tiny(0, 2, 32, dtype=torch.float32), tiny(1, 1, 16, dtype=torch.float32, scale=3.0)
    n = 20_000
    prompt = prompts(1, 3).expand(n, 3).contiguous()
    ar = generate.autoregressive(target, prompt, 2, temperature=1.0, seed=1).tokens
    always = functools.partial(_accept_all)
    wrong = generate.speculative(target, draft, prompt, 2, gamma=2, temperature=1.0, verify=always, seed=2)
    assert _chi2_two_sample(ar[:, 0] * V + ar[:, 1], wrong.tokens[:, 0] * V + wrong.tokens[:, 1], V * V) < ALPHA


def _accept_all(draft_tokens, draft_probs, target_probs, generator):
    """A broken rule that keeps every draft: its output follows the draft, not the target."""
    B, gamma = draft_tokens.shape
    accepted = torch.full((B,), gamma, dtype=torch.long)
    bonus = target_probs[:, -1].argmax(-1)
    return speculative.emit(draft_tokens, accepted, bonus)


def test_statistics_add_up(pair):
    target, draft = pair
    out = generate.speculative(target, draft, prompts(3, 4), 25, gamma=3, temperature=1.0, seed=0)
    lengths = out.accepted_lengths
    live = lengths >= 0
    assert out.accepted == int(lengths[live].sum())
    # alpha counts only the drafts the rule judged: accepted ones plus one rejection per
    # step that stopped early (the drafts after it are discarded unexamined)
    assert out.examined == out.accepted + int((live & (lengths < 3)).sum())
    assert out.alpha == out.accepted / out.examined and out.alpha >= out.accepted / out.drafted
    assert out.drafted == 3 * int(live.sum())
    assert out.steps == lengths.shape[0] and out.target_passes == out.steps + 1
    assert out.draft_passes == out.steps * 3 + 1         # γ passes a step, plus the prefill
    # every row got at least max_new_tokens tokens out of its live steps
    assert ((lengths + 1) * live).sum(0).min() >= 25
    assert out.tokens.shape == (3, 25) and out.wall_time > 0


def test_seed_makes_runs_reproducible(pair):
    target, draft = pair
    a = generate.speculative(target, draft, prompts(2, 4), 20, gamma=3, temperature=1.0, seed=7)
    b = generate.speculative(target, draft, prompts(2, 4), 20, gamma=3, temperature=1.0, seed=7)
    assert torch.equal(a.tokens, b.tokens)
    c = generate.autoregressive(target, prompts(2, 4), 20, temperature=1.0, seed=7)
    d = generate.autoregressive(target, prompts(2, 4), 20, temperature=1.0, seed=7)
    assert torch.equal(c.tokens, d.tokens)


def test_truncation_is_applied_to_both_models(pair):
    target, draft = pair
    out = generate.speculative(target, draft, prompts(2, 4), 20, gamma=3, temperature=1.0, top_k=1, seed=0)
    greedy = generate.autoregressive(target, prompts(2, 4), 20, temperature=0)
    assert torch.equal(out.tokens, greedy.tokens)         # top_k = 1 is greedy


def test_hf_adapter_drives_the_same_loop():
    target = tiny(0, 2, 32, dtype=torch.float32)
    draft = tiny(1, 1, 16, dtype=torch.float32)
    hf_target = generate.HFCausalLM(to_hf(target))
    prompt = prompts(1, 5)
    reference = generate.autoregressive(target, prompt, 30, temperature=0)
    out = generate.speculative(hf_target, draft, prompt, 30, gamma=3, temperature=0)
    assert torch.equal(out.tokens, reference.tokens)
    assert out.alpha < 1.0                                 # rejections crop the HF cache
    with pytest.raises(ValueError, match="batch_size 1"):
        generate.speculative(hf_target, draft, prompts(2, 5), 5, gamma=3, temperature=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=torch.zeros(2, 4)), "prompt"),
    (dict(prompt=torch.zeros(4, dtype=torch.long)), "prompt"),
    (dict(prompt=torch.zeros(2, 1, dtype=torch.long)), "prompt"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(gamma=0), "gamma"),
    (dict(draft_mode="beam"), "draft_mode"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=90), "block_size"),
    (dict(seed=-1), "seed"),
])
def test_bad_arguments_are_named(pair, kwargs, match):
    target, draft = pair
    args = dict(prompt=prompts(2, 4), max_new_tokens=5, gamma=3)
    args.update(kwargs)
    prompt = args.pop("prompt")
    max_new = args.pop("max_new_tokens")
    with pytest.raises(ValueError, match=match):
        generate.speculative(target, draft, prompt, max_new, **args)


def test_autoregressive_rejects_bad_arguments(pair):
    target, _ = pair
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate.autoregressive(target, prompts(1, 3), 0)
    with pytest.raises(ValueError, match="block_size"):
        generate.autoregressive(target, prompts(1, 3), 200)
