"""The decoding engine: speculative decoding is autoregressive decoding, only faster.

Tiny random GPTs (no trained weights needed) make the invariants cheap to check:
greedy speculative output equals greedy autoregressive output token for token (in
float64, where near-ties cannot hide a bug), sampled speculative output has the
autoregressive distribution, batching changes nothing (ragged prompts and per-row
seeds included), end tokens stop rows, trees of candidates are scored and committed
exactly, bad input fails before any work, and the statistics add up.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from typsamp import generate, speculative, stats
from typsamp.generate import DraftModel, Proposal
from typsamp.model import GPT, GPTConfig
from typsamp.rules import Rule, emit
from typsamp.sampling import Warp
from typsamp.speculative import ExactMatch, RejectionSampling

V = 7
GREEDY = Warp(temperature=0)


def tiny(seed: int, n_layer: int, n_embd: int, dtype=torch.float64, scale: float = 1.0,
         block_size: int = 96) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=block_size))
    with torch.no_grad():                       # sharper logits than GPT-2's init gives
        model.transformer.wte.weight.mul_(scale)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def pair():
    return tiny(0, 2, 32), tiny(1, 1, 16)


def prompts(B: int, P: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, P), generator=torch.Generator().manual_seed(seed))


def ragged(sizes, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g) for n in sizes]


def proposer(model, mode: str) -> DraftModel:
    return DraftModel(model, greedy=mode == "greedy")


# --- exactness at T = 0 --------------------------------------------------------------------


@pytest.mark.parametrize("P", [1, 2, 3, 8])
@pytest.mark.parametrize("gamma", [1, 3, 6])
@pytest.mark.parametrize("mode", ["sample", "greedy"])
def test_greedy_speculative_equals_greedy_autoregressive(pair, P, gamma, mode):
    target, draft = pair
    prompt = prompts(4, P)
    reference = generate.autoregressive(target, prompt, 40, warp=GREEDY)
    for d in (draft, target):                   # a weak draft and a perfect one
        out = generate.speculative(target, proposer(d, mode), prompt, 40, gamma=gamma, warp=GREEDY)
        assert torch.equal(out.tokens, reference.tokens)
    assert out.alpha == 1.0                     # the target as its own greedy draft


def test_a_bare_draft_model_is_wrapped_by_the_rule(pair):
    target, draft = pair
    prompt = prompts(3, 4)
    reference = generate.autoregressive(target, prompt, 30, warp=GREEDY)
    for rule in (RejectionSampling(), ExactMatch()):
        out = generate.speculative(target, draft, prompt, 30, gamma=3, rule=rule, warp=GREEDY)
        assert torch.equal(out.tokens, reference.tokens)
    # rejection reads q: sampled drafts (q passed); exact match does not: greedy drafts
    seen = []

    @dataclass(frozen=True)
    class Spy(RejectionSampling):
        def kernel(self, draft_tokens, draft_probs, target_probs, generator):
            seen.append(draft_probs is None)
            return super().kernel(draft_tokens, draft_probs, target_probs, generator)

    generate.speculative(target, draft, prompt, 5, gamma=2, rule=Spy(), warp=Warp(temperature=1.0), seed=0)
    assert seen and not any(seen)

    @dataclass(frozen=True)
    class MatchSpy(ExactMatch):
        def kernel(self, draft_tokens, draft_probs, target_probs, generator):
            seen.append(draft_probs is None)
            return super().kernel(draft_tokens, draft_probs, target_probs, generator)

    seen.clear()
    generate.speculative(target, draft, prompt, 5, gamma=2, rule=MatchSpy(), warp=Warp(temperature=1.0), seed=0)
    assert seen and all(seen)


def test_the_weak_draft_really_is_rejected_sometimes(pair):
    # Otherwise the greedy test above would not exercise rollback at all.
    target, draft = pair
    out = generate.speculative(target, draft, prompts(4, 3), 40, gamma=4, warp=GREEDY)
    assert 0.05 < out.alpha < 0.95, out.alpha
    assert (out.accepted_lengths[out.accepted_lengths >= 0] < 4).any()


def test_batched_equals_one_by_one(pair):
    target, draft = pair
    prompt = prompts(5, 4, seed=3)
    batched = generate.speculative(target, draft, prompt, 30, gamma=3, warp=GREEDY)
    for b in range(5):
        alone = generate.speculative(target, draft, prompt[b:b + 1], 30, gamma=3, warp=GREEDY)
        assert torch.equal(alone.tokens[0], batched.tokens[b])
    ar = generate.autoregressive(target, prompt, 30, warp=GREEDY)
    for b in range(5):
        assert torch.equal(generate.autoregressive(target, prompt[b:b + 1], 30, warp=GREEDY).tokens[0],
                           ar.tokens[b])


def test_ragged_prompts_decode_each_row_as_if_alone(pair):
    target, draft = pair
    rows = ragged([3, 1, 7, 2, 5], seed=4)
    ar = generate.autoregressive(target, rows, 30, warp=GREEDY)
    sp = generate.speculative(target, draft, rows, 30, gamma=3, warp=GREEDY)
    assert torch.equal(sp.tokens, ar.tokens)
    for b, row in enumerate(rows):
        alone = generate.autoregressive(target, row[None], 30, warp=GREEDY)
        assert torch.equal(alone.tokens[0], ar.tokens[b]), b
    # a list of rows of equal length is the tensor prompt
    same = ragged([4, 4, 4], seed=5)
    assert torch.equal(generate.speculative(target, draft, same, 20, gamma=2, warp=GREEDY).tokens,
                       generate.speculative(target, draft, torch.stack(same), 20, gamma=2, warp=GREEDY).tokens)


def test_greedy_drafts_follow_the_warped_argmax():
    # Greedy drafts are q's argmax; the engine takes the logits' argmax instead only when
    # the warp keeps it (every warp but locally typical sampling).
    draft = tiny(1, 1, 16, scale=3.0)
    prompt = prompts(64, 3, seed=6)
    for warp in (Warp(temperature=0.7, top_k=3), Warp(temperature=1.0, typical_p=0.3)):
        d = DraftModel(draft, greedy=True)
        lengths = torch.full((64,), 3)
        d.start(prompt, lengths, max_new_tokens=4, gamma=1, warp=warp)
        with torch.inference_mode():
            x = d.propose(prompt, lengths, 3, None).tokens[:, 0]
        draft.clear_cache()
        with torch.no_grad():
            logits = draft(prompt)[:, -1]
        assert torch.equal(x, warp(logits).argmax(-1))
        if warp.typical_p is not None:          # the case that needs the warp really occurs
            assert (x != logits.argmax(-1)).any()


# --- exactness in law at T > 0 ----------------------------------------------------------------


def _two_sample_p(a: torch.Tensor, b: torch.Tensor, cells: int) -> float:
    """p-value of the chi-square test that two samples of codes in [0, cells) share a law."""
    return stats.chi_square_two_sample(torch.bincount(a, minlength=cells),
                                       torch.bincount(b, minlength=cells)).p_value


# Several sampled-distribution checks at a family-wise level of 1e-4: each at 1e-4 / 16.
ALPHA = 1e-4 / 16


def law_pair():
    # Unsharpened tiny models: spread-out distributions, so every token pair occurs.
    return tiny(0, 2, 32, dtype=torch.float32), tiny(1, 1, 16, dtype=torch.float32, scale=3.0)


@pytest.mark.parametrize("mode", ["sample", "greedy"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_speculative_has_the_autoregressive_distribution(temperature, mode):
    target, draft = law_pair()
    n = 20_000
    prompt = prompts(1, 3).expand(n, 3).contiguous()
    warp = Warp(temperature=temperature)
    ar = generate.autoregressive(target, prompt, 3, warp=warp, seed=1).tokens
    sp = generate.speculative(target, proposer(draft, mode), prompt, 3, gamma=2, warp=warp, seed=2)
    assert 0.0 < sp.alpha < 1.0
    tokens = sp.tokens
    # The joint law of the first two tokens (V^2 cells) and the marginal of the third.
    assert _two_sample_p(ar[:, 0] * V + ar[:, 1], tokens[:, 0] * V + tokens[:, 1], V * V) > ALPHA
    assert _two_sample_p(ar[:, 2], tokens[:, 2], V) > ALPHA


def test_ragged_batches_keep_each_rows_law():
    # Rows with a one-token prompt and rows with a five-token prompt decoded together,
    # per-row seeds: each group follows the law of its prompt decoded alone.
    target, draft = law_pair()
    n = 10_000
    short, long = ragged([1, 5], seed=7)
    rows = [short, long] * n
    warp = Warp(temperature=1.0)
    sp = generate.speculative(target, draft, rows, 2, gamma=2, warp=warp, seed=list(range(2 * n)))
    assert 0.0 < sp.alpha < 1.0
    for group, prompt in ((0, short), (1, long)):
        alone = generate.autoregressive(target, prompt[None].expand(n, -1).contiguous(), 2, warp=warp,
                                        seed=3 + group).tokens
        mine = sp.tokens[group::2]
        assert _two_sample_p(alone[:, 0] * V + alone[:, 1], mine[:, 0] * V + mine[:, 1], V * V) > ALPHA


def test_ragged_autoregressive_keeps_each_rows_law():
    target, _ = law_pair()
    n = 10_000
    short, long = ragged([1, 5], seed=7)
    warp = Warp(temperature=1.0)
    batched = generate.autoregressive(target, [short, long] * n, 2, warp=warp, seed=5).tokens
    for group, prompt in ((0, short), (1, long)):
        alone = generate.autoregressive(target, prompt[None].expand(n, -1).contiguous(), 2, warp=warp,
                                        seed=6 + group).tokens
        mine = batched[group::2]
        assert _two_sample_p(alone[:, 0] * V + alone[:, 1], mine[:, 0] * V + mine[:, 1], V * V) > ALPHA


@dataclass(frozen=True)
class AcceptAll(Rule):
    """A broken rule that keeps every draft: its output follows the draft, not the target."""

    name = "accept_all"
    needs_draft_probs = True

    def kernel(self, draft_tokens, draft_probs, target_probs, generator):
        B, gamma = draft_tokens.shape
        accepted = torch.full((B,), gamma, dtype=torch.long)
        return emit(draft_tokens, accepted, target_probs[:, -1].argmax(-1))


def test_the_chi2_check_detects_a_wrong_distribution():
    target, draft = law_pair()
    n = 20_000
    prompt = prompts(1, 3).expand(n, 3).contiguous()
    warp = Warp(temperature=1.0)
    ar = generate.autoregressive(target, prompt, 2, warp=warp, seed=1).tokens
    wrong = generate.speculative(target, draft, prompt, 2, gamma=2, warp=warp, rule=AcceptAll(), seed=2)
    assert _two_sample_p(ar[:, 0] * V + ar[:, 1], wrong.tokens[:, 0] * V + wrong.tokens[:, 1], V * V) < ALPHA


# --- per-row seeds -------------------------------------------------------------------------


def test_a_rows_output_does_not_depend_on_its_batch_mates(pair):
    target, draft = pair
    warp = Warp(temperature=1.0)
    mine = prompts(1, 4, seed=8)
    others = [prompts(3, 4, seed=9), prompts(2, 4, seed=10)]
    for run in (lambda p, s: generate.speculative(target, draft, p, 25, gamma=3, warp=warp, seed=s),
                lambda p, s: generate.autoregressive(target, p, 25, warp=warp, seed=s)):
        alone = run(mine, [11]).tokens[0]
        first = run(torch.cat([mine, others[0]]), [11, 1, 2, 3]).tokens[0]
        last = run(torch.cat([others[1], mine]), [5, 6, 11]).tokens[-1]
        assert torch.equal(alone, first) and torch.equal(alone, last)
        assert not torch.equal(alone, run(mine, [12]).tokens[0])     # the seed matters
    # the same holds beside a row that stops early at an end token
    mate = generate.speculative(target, draft, others[0][:1], 25, gamma=3, warp=warp, seed=[1])
    with_eos = generate.speculative(target, draft, torch.cat([others[0][:1], mine]), 25, gamma=3, warp=warp,
                                    seed=[1, 11], eos_token_id=int(mate.tokens[0, 2]))
    assert with_eos.lengths[0] <= 3
    plain = generate.speculative(target, draft, mine, 25, gamma=3, warp=warp, seed=[11])
    n = int(with_eos.lengths[1])
    assert torch.equal(with_eos.tokens[1, :n], plain.tokens[0, :n])


def test_seed_makes_runs_reproducible(pair):
    target, draft = pair
    warp = Warp(temperature=1.0)
    a = generate.speculative(target, draft, prompts(2, 4), 20, gamma=3, warp=warp, seed=7)
    b = generate.speculative(target, draft, prompts(2, 4), 20, gamma=3, warp=warp, seed=7)
    assert torch.equal(a.tokens, b.tokens)
    c = generate.autoregressive(target, prompts(2, 4), 20, warp=warp, seed=7)
    d = generate.autoregressive(target, prompts(2, 4), 20, warp=warp, seed=7)
    assert torch.equal(c.tokens, d.tokens)
    e = generate.speculative(target, draft, prompts(2, 4), 20, gamma=3, warp=warp, seed=[7, 8])
    f = generate.speculative(target, draft, prompts(2, 4), 20, gamma=3, warp=warp, seed=[7, 8])
    assert torch.equal(e.tokens, f.tokens)


def test_truncation_is_applied_to_both_models(pair):
    target, draft = pair
    out = generate.speculative(target, draft, prompts(2, 4), 20, gamma=3, warp=Warp(temperature=1.0, top_k=1),
                               seed=0)
    greedy = generate.autoregressive(target, prompts(2, 4), 20, warp=GREEDY)
    assert torch.equal(out.tokens, greedy.tokens)         # top_k = 1 is greedy


# --- end tokens ------------------------------------------------------------------------------


def _cut_at_end(tokens: torch.Tensor, ends: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: each row cut after its first end token, -1 after; and the lengths."""
    out, lengths = tokens.clone(), []
    for b, row in enumerate(tokens.tolist()):
        hits = [i for i, t in enumerate(row) if t in ends]
        n = hits[0] + 1 if hits else len(row)
        out[b, n:] = -1
        lengths.append(n)
    return out, torch.tensor(lengths)


@pytest.mark.parametrize("ends", [{3}, {2, 5}])
def test_end_tokens_stop_each_row_and_the_batch_goes_on(pair, ends):
    target, draft = pair
    prompt = prompts(6, 3, seed=12)
    warp = Warp(temperature=1.0)
    seeds = list(range(20, 26))
    eos = next(iter(ends)) if len(ends) == 1 else ends
    for run in (lambda e: generate.speculative(target, draft, prompt, 30, gamma=3, warp=warp, seed=seeds,
                                               eos_token_id=e),
                lambda e: generate.autoregressive(target, prompt, 30, warp=warp, seed=seeds, eos_token_id=e)):
        free, stopped = run(None), run(eos)
        expected, lengths = _cut_at_end(free.tokens, ends)
        assert torch.equal(stopped.tokens, expected)
        assert torch.equal(stopped.lengths.cpu(), lengths)
        assert (lengths < 30).any() and lengths.max() > lengths.min()     # rows end at different times
        assert ((stopped.origin == -1) == (stopped.tokens == -1)).all()


def test_end_tokens_stop_early_and_park_rows(pair):
    target, draft = pair
    prompt = prompts(4, 3, seed=13)
    free = generate.speculative(target, draft, prompt, 40, gamma=3, warp=GREEDY)
    end = int(free.tokens[0, 5])                          # row 0 meets it at step <= 6
    out = generate.speculative(target, draft, prompt, 40, gamma=3, warp=GREEDY, eos_token_id=end)
    expected, lengths = _cut_at_end(free.tokens, {end})
    assert torch.equal(out.tokens, expected) and torch.equal(out.lengths, lengths)
    # a row that ended is done: its accepted_lengths are -1 from the step after
    steps_of_row0 = int((out.accepted_lengths[:, 0] >= 0).sum())
    assert steps_of_row0 < int((free.accepted_lengths[:, 0] >= 0).sum())
    # every row ends at once: the loop stops early
    if (lengths < 40).all():
        assert out.steps < free.steps
    ar = generate.autoregressive(target, prompt[:1], 40, warp=GREEDY, eos_token_id=end)
    assert ar.steps == int(ar.lengths[0]) < 40
    assert torch.equal(ar.tokens[0], expected[0])


# --- the block size -------------------------------------------------------------------------


def test_block_size_is_used_to_the_last_position():
    target = tiny(0, 2, 32, block_size=24)
    draft = tiny(1, 1, 16, block_size=23)                 # the draft writes one position less
    prompt = prompts(2, 4, seed=14)
    gamma = 3
    # autoregressive: the prompt and every new token but the last are fed: P + m - 1 positions
    ar = generate.autoregressive(target, prompt, 24 - 4 + 1, warp=GREEDY)
    with pytest.raises(ValueError, match="block_size 24"):
        generate.autoregressive(target, prompt, 24 - 4 + 2, warp=GREEDY)
    # speculative: P + m + gamma - 1 positions for the target, one less for the draft
    m = 24 - 4 - gamma + 1
    out = generate.speculative(target, draft, prompt, m, gamma=gamma, warp=GREEDY)
    assert torch.equal(out.tokens, ar.tokens[:, :m])
    with pytest.raises(ValueError, match="`target` model's block_size 24"):
        generate.speculative(target, draft, prompt, m + 1, gamma=gamma, warp=GREEDY)
    small = tiny(1, 1, 16, block_size=22)
    with pytest.raises(ValueError, match="`draft` model's block_size 22"):
        generate.speculative(target, small, prompt, m, gamma=gamma, warp=GREEDY)
    # a one-token prompt at the boundary, with ragged rows beside it
    rows = [prompt[0, :1], prompt[1]]
    out = generate.speculative(target, draft, rows, m, gamma=gamma, warp=GREEDY)
    assert torch.equal(out.tokens[1], ar.tokens[1, :m])


# --- statistics -------------------------------------------------------------------------------


def test_statistics_add_up(pair):
    target, draft = pair
    out = generate.speculative(target, draft, prompts(3, 4), 25, gamma=3, warp=Warp(temperature=1.0), seed=0)
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
    assert out.lengths.tolist() == [25, 25, 25]


class _Clock:
    """A fake time.perf_counter: it moves only when a model call advances it."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


class _Timed:
    """A model whose first call (the prefill) takes ``first`` fake seconds and every later
    call ``later``: where the engine's prefill clock stops becomes exact."""

    def __init__(self, model, clock: _Clock, first: float, later: float):
        self.model, self.clock, self.first, self.later, self.calls = model, clock, first, later, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        self.clock.now += self.first if self.calls == 0 else self.later
        self.calls += 1
        return self.model(*args, **kwargs)


def test_the_prefill_is_timed_apart_and_the_decoded_tokens_counted(pair, monkeypatch):
    target, draft = pair
    clock = _Clock()
    monkeypatch.setattr(generate, "time", clock)
    slow = _Timed(target, clock, first=3.0, later=0.5)
    out = generate.speculative(slow, draft, prompts(3, 4), 12, gamma=3, warp=Warp(temperature=1.0), seed=0)
    # the prefill (the first target call) is all of prefill_time; each step's pass after it
    assert out.prefill_time == 3.0 and out.target_passes == slow.calls == out.steps + 1
    assert out.wall_time - out.prefill_time == pytest.approx(0.5 * out.steps)
    # every committed token counts, the last step's tokens past max_new_tokens included
    live = out.accepted_lengths >= 0
    assert out.decoded_tokens == int(((out.accepted_lengths + 1) * live).sum()) >= 3 * 12
    assert out.decode_rate == pytest.approx(out.decoded_tokens / (0.5 * out.steps))
    # autoregressive: the prefill's logits give each row's first token; the rest are decoded
    slow = _Timed(target, clock, first=3.0, later=0.5)
    ar = generate.autoregressive(slow, ragged([4, 2, 5]), 6, warp=Warp(temperature=1.0), seed=[1, 2, 3])
    assert ar.prefill_time == 3.0 and ar.wall_time - ar.prefill_time == pytest.approx(0.5 * 5)
    assert ar.decoded_tokens == 3 * 5 and ar.decode_rate == pytest.approx(15 / 2.5)
    # rows that end early: their kept tokens (the end token included) but the first
    ends = generate.autoregressive(target, prompts(2, 3), 8, warp=GREEDY, eos_token_id=set(range(V)))
    assert ends.lengths.tolist() == [1, 1] and ends.decoded_tokens == 0 and ends.decode_rate is None
    eos = int(generate.autoregressive(target, prompts(4, 3, seed=5), 8, warp=GREEDY).tokens[0, 2])
    some = generate.autoregressive(target, prompts(4, 3, seed=5), 8, warp=GREEDY, eos_token_id=eos)
    assert some.decoded_tokens == int(some.lengths.sum()) - 4 and some.lengths.min() < 8
    spec = generate.speculative(target, draft, prompts(4, 3, seed=5), 8, gamma=3, warp=GREEDY, eos_token_id=eos)
    assert torch.equal(spec.tokens, some.tokens) and spec.decoded_tokens >= int(spec.lengths.sum())
    # a one-token prompt: speculative decoding has no target prefill pass, only the start
    slow = _Timed(target, clock, first=0.5, later=0.5)
    one = generate.speculative(slow, draft, prompts(2, 1), 6, gamma=2, warp=GREEDY)
    assert one.prefill_time == 0.0 and one.wall_time == pytest.approx(0.5 * one.steps)
    # a Generation made elsewhere keeps no clock
    assert generate.Generation(tokens=torch.zeros(1, 2, dtype=torch.long)).decode_rate is None


def test_per_row_alpha_and_token_origin(pair):
    target, draft = pair
    out = generate.speculative(target, draft, prompts(4, 4, seed=15), 30, gamma=3, warp=Warp(temperature=1.0),
                               seed=1, eos_token_id=2)
    a = out.accepted_lengths
    live = a >= 0
    accepted = torch.where(live, a, 0).sum(0).double()
    examined = accepted + (live & (a < 3)).sum(0)
    assert torch.allclose(out.row_alpha, accepted / examined)
    expected_se = (out.row_alpha * (1 - out.row_alpha) / examined).sqrt()
    assert torch.allclose(out.row_alpha_se, expected_se)
    assert torch.equal(out.row_alpha, stats.row_alpha(a, 3).per_row)
    # origin: the library's reference decoding of accepted_lengths, cut at each row's end
    origin = stats.token_origin(a, 3, 30, out.lengths)
    assert torch.equal(out.origin, origin)
    assert out.origin.dtype == torch.int8 and set(out.origin.unique().tolist()) <= {-1, 1, 2, 3}
    # a perfect greedy draft: every step accepts all γ, then the bonus
    perfect = generate.speculative(target, target, prompts(1, 4), 8, gamma=3, warp=GREEDY)
    assert perfect.origin.tolist() == [[1, 1, 1, 3, 1, 1, 1, 3]]
    ar = generate.autoregressive(target, prompts(2, 4), 6, warp=GREEDY)
    assert ar.origin.tolist() == [[0] * 6] * 2 and torch.isnan(ar.row_alpha).all()


# --- trees of candidates ----------------------------------------------------------------------

#: A forest of 9 candidates after the last committed token (depth 4).
TREE = torch.tensor([-1, -1, 0, 0, 1, 2, 2, 4, 5])


class TreeOracle:
    """A test proposer: a fixed tree of random tokens in which one root path, chosen at
    random each step, carries the target's greedy continuation up to a random depth."""

    def __init__(self, model, parents=TREE, seed=0):
        self.model = copy.deepcopy(model)
        self.model.clear_cache()
        self.parents = parents
        self.vocab_size = model.config.vocab_size
        self.g = torch.Generator().manual_seed(seed)
        up = parents.tolist() if parents is not None else list(range(-1, N - 1))
        children = {i for i in up if i >= 0}
        self.paths = []
        for leaf in (i for i in range(len(up)) if i not in children):
            path = [leaf]
            while up[path[-1]] >= 0:
                path.append(up[path[-1]])
            self.paths.append(path[::-1])
        self.passes = 0

    def width(self, gamma):
        return len(self.parents)

    def start(self, prompt, prompt_lengths, *, max_new_tokens, gamma, warp):
        pass

    def propose(self, seq, n, top, generator):
        B, N = seq.shape[0], len(self.parents)
        with torch.inference_mode(False), torch.no_grad():
            tokens = torch.randint(0, V, (B, N), generator=self.g)
            for b in range(B):
                path = self.paths[int(torch.randint(len(self.paths), (), generator=self.g))]
                cut = int(torch.randint(len(path) + 1, (), generator=self.g))
                text = seq[b, :int(n[b])].clone()
                for node in path[:cut]:
                    x = self.model(text[None])[0, -1].argmax()
                    tokens[b, node] = x
                    text = torch.cat([text, x[None]])
        return Proposal(tokens=tokens, parents=self.parents)

    def commit(self, n):
        pass


@dataclass
class TreeVerdict:
    tokens: torch.Tensor
    accepted: torch.Tensor
    path: torch.Tensor


@dataclass(frozen=True)
class GreedyTree(Rule):
    """A test rule for T = 0: the longest root path whose every node is the target's
    argmax after its parent (lowest index on ties), then the argmax after the path."""

    name = "greedy_tree"
    supports_tree = True

    def kernel(self, draft_tokens, draft_probs, target_probs, generator, parents=None):
        B, N = draft_tokens.shape
        up = parents.tolist() if parents is not None else list(range(-1, N - 1))
        depth = [0] * N
        for i, p in enumerate(up):
            depth[i] = 1 if p < 0 else depth[p] + 1
        D = max(depth)
        best = target_probs.argmax(-1)                    # [B, N + 1]
        tokens = torch.full((B, D + 1), -1)
        accepted = torch.zeros(B, dtype=torch.long)
        paths = torch.full((B, D), -1)
        for b in range(B):
            ok = [False] * N
            for i, p in enumerate(up):
                ok[i] = (p < 0 or ok[p]) and int(draft_tokens[b, i]) == int(best[b, p + 1])
            end = max((i for i in range(N) if ok[i]), key=lambda i: (depth[i], -i), default=-1)
            path = []
            while end >= 0:
                path.append(end)
                end = up[end]
            path = path[::-1]
            accepted[b] = len(path)
            for k, node in enumerate(path):
                tokens[b, k] = draft_tokens[b, node]
                paths[b, k] = node
            tokens[b, len(path)] = best[b, path[-1] + 1 if path else 0]
        return TreeVerdict(tokens, accepted, paths)


def test_greedy_tree_decoding_equals_greedy_autoregressive(pair):
    target, _ = pair
    rows = ragged([4, 1, 6], seed=16)
    reference = generate.autoregressive(target, rows, 30, warp=GREEDY)
    out = generate.speculative(target, TreeOracle(target), rows, 30, rule=GreedyTree(), warp=GREEDY)
    assert torch.equal(out.tokens, reference.tokens)
    a = out.accepted_lengths[out.accepted_lengths >= 0]
    assert out.gamma == 4 and a.min() == 0 and a.max() == 4 and len(a.unique()) >= 4
    assert {1, 2, 3} <= set(out.origin.unique().tolist())
    assert out.drafted == 9 * int((out.accepted_lengths >= 0).sum())


def _cache_after(model, rows, tokens, lengths) -> list[torch.Tensor]:
    """Per row, the keys and values of feeding its text as one chain: the prompt and all
    new tokens but the last two (what the target's cache holds when a full row ends: it
    is parked at P + max_new_tokens - 1 committed tokens, its cache one short of that)."""
    fresh = copy.deepcopy(model)
    out = []
    for b, row in enumerate(rows):
        text = torch.cat([row, tokens[b, :int(lengths[b]) - 2]])[None]
        fresh.setup_cache(1, text.shape[1])
        with torch.no_grad():
            fresh(text)
        out.append(fresh.cache.kv[:, :, 0].clone())
    return out


@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_the_committed_cache_is_the_cache_of_the_text(pair, kind):
    # After the last commit the target's cache holds exactly the keys and values of the
    # committed text: compaction (trees) and rollback (chains) leave nothing else behind.
    target, draft = pair
    target = copy.deepcopy(target)
    rows = ragged([4, 1, 6], seed=17)
    if kind == "tree":
        out = generate.speculative(target, TreeOracle(target), rows, 25, rule=GreedyTree(), warp=GREEDY)
        assert (out.accepted_lengths >= 2).any()
    else:
        out = generate.speculative(target, draft, rows, 25, gamma=3, warp=GREEDY)
    assert (out.lengths == 25).all()
    for b, expected in enumerate(_cache_after(target, rows, out.tokens, out.lengths)):
        n = expected.shape[-2]
        assert int(target.cache.lengths[b]) == n
        assert (target.cache.kv[:, :, b, :, :n] - expected).abs().max() <= 1e-10, b


class Strict:
    """A model wrapper asserting the engine's cache bookkeeping, which the models skip
    when the loop passes ``span``: no pass leaves a gap (``offsets <= cache.lengths``:
    a row continues its cached text or overwrites its end, never skips a position)."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    @property
    def cache(self):
        return self.model.cache

    def setup_cache(self, *args):
        return self.model.setup_cache(*args)

    def __call__(self, tokens, offsets, **kwargs):
        assert (offsets <= self.model.cache.lengths).all(), (offsets, self.model.cache.lengths)
        return self.model(tokens, offsets, **kwargs)


def test_no_pass_skips_a_cached_position(pair):
    target, draft = Strict(pair[0]), Strict(pair[1])
    rows = ragged([3, 1, 7, 2], seed=18)
    warp = Warp(temperature=1.0)
    generate.autoregressive(target, rows, 20, warp=warp, seed=0, eos_token_id=3)
    generate.speculative(target, draft, rows, 20, gamma=3, warp=warp, seed=0, eos_token_id=3)
    generate.speculative(target, draft, [rows[1]] * 2, 1, gamma=1, warp=warp, seed=0)
    generate.speculative(target, TreeOracle(pair[0]), rows, 20, rule=GreedyTree(), warp=GREEDY)


@dataclass(frozen=True)
class ChainOnly(GreedyTree):
    name = "chain_only"
    supports_tree = False


def test_a_tree_needs_a_rule_that_verifies_trees(pair):
    target, _ = pair
    with pytest.raises(ValueError, match="tree of 9 candidates.*'chain_only' does not verify trees"):
        generate.speculative(target, TreeOracle(target), prompts(2, 3), 10, rule=ChainOnly(), warp=GREEDY)


# --- the hidden-state hook (proposers that read the target's states: Medusa's heads) ----------


class HiddenProbe(TreeOracle):
    """A tree proposer that reads the target's hidden states and checks, at every step, that
    the state it was handed for each row is the target's final-normed state at position
    n - 2 of the committed text (the one whose distribution gave the newest token)."""

    needs_hidden = True

    def __init__(self, model, parents=TREE, seed=0):
        super().__init__(model, parents, seed)
        self.state = None
        self.calls = self.checked = 0

    def observe(self, hidden, end):
        assert hidden.dim() == 3 and end.shape == (hidden.shape[0],) and end.dtype == torch.long
        rows = torch.arange(hidden.shape[0])
        self.state = torch.where((end >= 0)[:, None], hidden[rows, end.clamp(min=0)], float("nan"))
        self.calls += 1

    def start(self, prompt, prompt_lengths, *, max_new_tokens, gamma, warp):
        # a row parked at its last position (done, riding along) computes nothing that is read
        self.parked = prompt_lengths + max_new_tokens - 1

    def propose(self, seq, n, top, generator):
        if self.state is not None:
            for b in range(seq.shape[0]):
                if int(n[b]) >= int(self.parked[b]):
                    continue
                if int(n[b]) < 2:
                    assert torch.isnan(self.state[b]).all()
                    continue
                with torch.inference_mode(False), torch.no_grad():
                    h = self.model(seq[b, :int(n[b]) - 1][None], head=None)[0, -1]
                assert (self.state[b] - h).abs().max() <= 1e-4, (b, int(n[b]))
                self.checked += 1
        return super().propose(seq, n, top, generator)


@pytest.fixture(scope="module")
def tiny_gemma_target():
    from tests.tiny_gemma import random_gemma
    return random_gemma(seed=3, scale=0.5)


@pytest.mark.parametrize("tree_shape", ["tree", "chain"])
def test_a_proposer_that_needs_hidden_states_gets_the_right_ones(tiny_gemma_target, tree_shape):
    target = tiny_gemma_target
    parents = TREE if tree_shape == "tree" else torch.arange(-1, 3)
    probe = HiddenProbe(target, parents)
    rows = [torch.tensor(r) for r in ([5, 9, 2, 7], [11], [3, 8, 1, 4, 6, 2])]
    out = generate.speculative(target, probe, rows, 12, rule=GreedyTree(), warp=GREEDY)
    reference = generate.autoregressive(target, rows, 12, warp=GREEDY)
    assert torch.equal(out.tokens, reference.tokens)
    assert probe.calls == out.steps + 1                  # after the prefill and every verify
    assert probe.checked >= 2 * out.steps                # rows with n >= 2 at every step
    assert (out.accepted_lengths >= 1).any()


def test_a_proposer_that_needs_hidden_states_needs_a_target_that_returns_them(pair):
    target, _ = pair                                     # the book's GPT returns no hidden states
    with pytest.raises(ValueError, match="reads the target's hidden states.*GPT does not return them"):
        generate.speculative(target, HiddenProbe(target), prompts(2, 3), 5, rule=GreedyTree(), warp=GREEDY)


def test_tree_layout_from_parents():
    layout = generate.tree(TREE)
    assert not layout.chain and layout.depth == 4
    assert layout.depths.tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert layout.ancestors[9].nonzero().flatten().tolist() == [0, 1, 3, 6, 9]
    assert layout.leaf.nonzero().flatten().tolist() == [4, 7, 8, 9]
    chain = generate.tree(torch.arange(-1, 4))
    assert chain.chain and chain.depth == 5 and torch.equal(chain.ancestors, torch.ones(6, 6, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match=r"`parents\[1\]` = 1"):
        generate.tree(torch.tensor([-1, 1]))
    with pytest.raises(ValueError, match="`parents` must be int64"):
        generate.tree(torch.zeros(0, dtype=torch.long))


# --- models that fail ------------------------------------------------------------------------


class Poisoned:
    """A model that returns ``value`` in its logits from forward pass ``at`` on."""

    def __init__(self, model, at: int, value: float, where=slice(None)):
        self.model, self.at, self.value, self.where = model, at, value, where
        self.config, self.calls = model.config, 0

    @property
    def cache(self):
        return self.model.cache

    def setup_cache(self, *args):
        self.calls = 0
        return self.model.setup_cache(*args)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        logits = self.model(*args, **kwargs)
        if self.calls > self.at:
            logits = logits.clone()
            logits[..., self.where] = self.value
        return logits


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_name_the_model_and_the_step(pair, value):
    target, draft = pair
    prompt = prompts(2, 4)
    # target: the prefill is pass 1, step s is pass s + 1
    with pytest.raises(ValueError, match="the target model returned NaN or infinite logits at step 3"):
        generate.speculative(Poisoned(target, 3, value), draft, prompt, 30, gamma=2, warp=Warp(temperature=0.7),
                             seed=0)
    # draft: the prefill is pass 1, each step makes gamma = 2 passes: pass 6 is in step 3
    for warp in (GREEDY, Warp(temperature=0.7), Warp(temperature=1.0, typical_p=0.5)):
        for mode in ("sample", "greedy"):
            with pytest.raises(ValueError, match="the draft model returned NaN or infinite logits at step 3"):
                generate.speculative(target, proposer(Poisoned(draft, 5, value), mode), prompt, 30, gamma=2,
                                     warp=warp, seed=0)
    with pytest.raises(ValueError, match="the target model returned NaN or infinite logits at step 4"):
        generate.autoregressive(Poisoned(target, 4, value), prompt, 30, warp=GREEDY)
    with pytest.raises(ValueError, match="the target model returned NaN or infinite logits at step 2"):
        generate.autoregressive(Poisoned(target, 2, value), prompt, 30, warp=GREEDY, eos_token_id=6)
    with pytest.raises(ValueError, match="at step 0"):
        generate.autoregressive(Poisoned(target, 0, value), prompt, 30, warp=GREEDY)


def test_masked_tokens_are_not_an_error(pair):
    # -inf on some tokens is how a model masks them (a trimmed head): legal logits
    target, draft = pair
    masked_target, masked_draft = Poisoned(target, 0, float("-inf"), 0), Poisoned(draft, 0, float("-inf"), [0, 1])
    reference = generate.autoregressive(masked_target, prompts(2, 4), 20, warp=GREEDY)
    assert not (reference.tokens == 0).any()
    out = generate.speculative(masked_target, masked_draft, prompts(2, 4), 20, gamma=3, warp=GREEDY)
    assert torch.equal(out.tokens, reference.tokens)


# --- the transformers adapter -------------------------------------------------------------------


def test_hf_adapter_drives_the_same_loop():
    pytest.importorskip("transformers")
    from typsamp.hf import HFCausalLM, to_hf

    target = tiny(0, 2, 32, dtype=torch.float32)
    draft = tiny(1, 1, 16, dtype=torch.float32)
    hf_target = HFCausalLM(to_hf(target))
    prompt = prompts(1, 5)
    reference = generate.autoregressive(target, prompt, 30, warp=GREEDY)
    out = generate.speculative(hf_target, draft, prompt, 30, gamma=3, warp=GREEDY)
    assert torch.equal(out.tokens, reference.tokens)
    assert out.alpha < 1.0                                 # rejections crop the HF cache
    one = generate.speculative(hf_target, draft, prompt[:, :1], 10, gamma=3, warp=GREEDY)
    assert torch.equal(one.tokens, generate.autoregressive(target, prompt[:, :1], 10, warp=GREEDY).tokens)
    with pytest.raises(ValueError, match="batch_size 1"):
        generate.speculative(hf_target, draft, prompts(2, 5), 5, gamma=3, warp=GREEDY)


# --- bad input: a clear error, before any work -----------------------------------------------------


class Counting:
    """A model wrapper that counts cache set-ups and forward passes."""

    def __init__(self, model):
        self.model, self.config, self.work = model, model.config, 0

    @property
    def cache(self):
        return self.model.cache

    def setup_cache(self, *args):
        self.work += 1
        return self.model.setup_cache(*args)

    def __call__(self, *args, **kwargs):
        self.work += 1
        return self.model(*args, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=torch.zeros(2, 4)), "prompt"),
    (dict(prompt=torch.zeros(4, dtype=torch.long)), "prompt"),
    (dict(prompt=torch.zeros(2, 0, dtype=torch.long)), "prompt"),
    (dict(prompt=torch.zeros(0, 3, dtype=torch.long)), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[torch.zeros(3, dtype=torch.long), torch.zeros(0, dtype=torch.long)]), r"prompt\[1\]"),
    (dict(prompt="abc"), "prompt"),
    (dict(prompt=torch.tensor([[1, 2, 7]])), "outside the vocabulary"),
    (dict(prompt=torch.tensor([[1, -1, 3]])), "outside the vocabulary"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(gamma=0), "gamma"),
    (dict(gamma=10 ** 30), "`gamma`"),
    (dict(gamma=200), "block_size"),
    (dict(rule=None), "rule"),
    (dict(rule=speculative.verify), "rule"),
    (dict(rule="rejection"), "rule"),
    (dict(warp=dict(temperature=0.5)), "warp"),
    (dict(max_new_tokens=91), "block_size"),
    (dict(seed=-1), "seed"),
    (dict(seed=2 ** 64), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(seed=[1]), "seed"),
    (dict(seed=[1, 2 ** 63]), r"seed\[1\]"),
    (dict(seed=[1, -2]), r"seed\[1\]"),
    (dict(eos_token_id=7), "eos_token_id"),
    (dict(eos_token_id=set()), "eos_token_id"),
    (dict(eos_token_id={1, -1}), "eos_token_id"),
    (dict(eos_token_id="x"), "eos_token_id"),
])
def test_bad_arguments_are_named_before_any_work(pair, kwargs, match):
    target, draft = Counting(pair[0]), Counting(pair[1])
    args = dict(prompt=prompts(2, 4), max_new_tokens=5, gamma=3)
    args.update(kwargs)
    prompt = args.pop("prompt")
    max_new = args.pop("max_new_tokens")
    with pytest.raises(ValueError, match=match):
        generate.speculative(target, draft, prompt, max_new, **args)
    assert target.work == 0 and draft.work == 0


def test_mismatched_vocabularies_fail_up_front(pair):
    target = Counting(pair[0])
    other = Counting(GPT(GPTConfig(vocab_size=V + 1, n_layer=1, n_head=2, n_embd=16, block_size=96)).double().eval())
    for mode in ("sample", "greedy"):
        with pytest.raises(ValueError, match="vocabularies differ: the draft has 8 tokens, the target 7"):
            generate.speculative(target, proposer(other, mode), prompts(1, 3), 5, warp=GREEDY)
    with pytest.raises(ValueError, match="vocabularies differ"):
        generate.speculative(target, other, prompts(1, 3), 5, warp=GREEDY)
    assert target.work == 0 and other.work == 0
    with pytest.raises(ValueError, match="proposer_or_draft"):
        generate.speculative(target, "draft", prompts(1, 3), 5)


def test_autoregressive_rejects_bad_arguments(pair):
    target = Counting(pair[0])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate.autoregressive(target, prompts(1, 3), 0)
    with pytest.raises(ValueError, match="block_size"):
        generate.autoregressive(target, prompts(1, 3), 200)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate.autoregressive(target, torch.tensor([[0, 9]]), 3)
    with pytest.raises(ValueError, match="warp"):
        generate.autoregressive(target, prompts(1, 3), 3, warp=0.7)
    with pytest.raises(ValueError, match="seed"):
        generate.autoregressive(target, prompts(2, 3), 3, seed=[1, 2, 3])
    with pytest.raises(ValueError, match="eos_token_id"):
        generate.autoregressive(target, prompts(2, 3), 3, eos_token_id=V)
    assert target.work == 0
