"""typsamp.bench llm: the Gemma benchmark's code on a tiny random Gemma, reduced settings.

No timing is asserted (speed is shown by the committed JSON of ``make bench``): these
tests check that the benchmark runs end to end, that its JSON has the layout chapter 9
reads, and that every derived number (ratios, limits, speed-ups, goals) is computed from
the measured numbers in the same file. A tiny Gemma 3 with random weights stands in for
the 270M model; the transformers peer is built from the same weights, so at T = 0 it
must emit our tokens exactly.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from typsamp import bench, gemma, speculative
from tiny_gemma import random_gemma

pytest.importorskip("transformers")

TINY = gemma.GemmaConfig(vocab_size=97, n_layer=4, hidden=32, ffn=48, n_head=4, n_kv_head=2, head_dim=8,
                         sliding_window=4, global_every=2, context_length=128)
SETTINGS = {"tokens": 8, "short": 2, "prompts": 2, "prompt_tokens": 6, "batch": 3, "batch_prompt_tokens": 5,
            "positions": 5, "temperatures": (0.0, 0.7), "gammas": (2, 3, 4), "first_gamma": 2, "gamma_tries": 3,
            "bandwidth_mib": 4, "seed": 0}


def _tiny(dtype=torch.float32) -> gemma.Gemma:
    return random_gemma(TINY).to(dtype)


class Trimmed:
    """A draft in the engine's interface: the tiny model itself with a head over ``kept``."""

    def __init__(self, model: gemma.Gemma, kept: torch.Tensor):
        self.model, self.kept, self.vocab_size = model, kept, model.config.vocab_size
        self.rows = model.model.embed_tokens.weight[kept]

    @property
    def cache(self):
        return self.model.cache

    def setup_cache(self, batch_size, max_len=2048):
        return self.model.setup_cache(batch_size, max_len)

    def __call__(self, tokens, offsets=None, span=None):
        small = self.model(tokens, offsets, span=span, head=self.rows)
        out = small.new_full((*small.shape[:-1], self.vocab_size), -math.inf)
        return out.index_copy_(-1, self.kept, small)


class Lookup:
    """A deterministic proposer: repeats the last committed token (q = None)."""

    def __init__(self, ngram=3):
        self.vocab_size, self.passes = None, 0

    def width(self, gamma):
        return gamma

    def start(self, prompt, prompt_lengths, *, max_new_tokens, gamma, warp):
        self.gamma = gamma
        self.parents = torch.arange(-1, gamma - 1)

    def propose(self, seq, n, top, generator):
        from typsamp import generate

        last = seq.gather(1, (n - 1)[:, None])
        return generate.Proposal(tokens=last.expand(-1, self.gamma).contiguous(), parents=self.parents, q=None)

    def commit(self, n):
        pass


@pytest.fixture(scope="module")
def result():
    target = _tiny()
    kept = torch.arange(0, TINY.vocab_size, 2)            # every other token: 49 kept
    drafts = {"trimmed": Trimmed(_tiny(torch.bfloat16), kept), "distil": "ImportError: not built here",
              "prompt_lookup": Lookup}
    gen = torch.Generator().manual_seed(1)
    rows = torch.randint(3, TINY.vocab_size, (2, SETTINGS["prompt_tokens"]), generator=gen)
    batch = torch.randint(3, TINY.vocab_size, (3, SETTINGS["batch_prompt_tokens"]), generator=gen)
    out = bench.bench_llm({"float32": target, "bfloat16": lambda: _tiny(torch.bfloat16)}, drafts=drafts,
                          prompt_rows=rows, batch_rows=batch, prompt_names=["a/0", "b/1"], settings=SETTINGS,
                          spec_dtype="float32", progress=False)
    return json.loads(json.dumps(out))                     # what the file will hold


def test_layout_is_the_one_posted_for_chapter_9(result):
    for key in ("benchmark", "command", "method", "machine", "versions", "settings", "bandwidth",
                "bytes_per_pass", "limit", "pass_cost", "autoregressive", "speculative_target", "drafts",
                "speculative", "goals", "seconds"):
        assert key in result, key
    assert set(result["bandwidth"]["kernels"]) == {"fp32_matvec", "fp32_sum", "bf16_matvec"}
    assert set(result["bytes_per_pass"]) == set(result["limit"]) == set(result["pass_cost"]) == {"float32",
                                                                                                 "bfloat16"}
    assert set(result["drafts"]) == {"trimmed", "distil", "prompt_lookup"}
    assert result["drafts"]["distil"] == {"available": False, "why": "ImportError: not built here"}
    assert set(result["goals"]) == {"ar_within_15pct_of_limit", "ar_faster_than_transformers",
                                    "speculative_2x_at_T07", "speculative_faster_at_every_T",
                                    "measured_over_predicted_ge_085", "faster_than_assisted"}
    for goal in result["goals"].values():
        assert set(goal) == {"met", "value", "detail"} and isinstance(goal["met"], bool)
    cells = {(r["dtype"], r["batch"], r["temperature"]) for r in result["autoregressive"]}
    assert cells == {("float32", 1, 0.0), ("float32", 1, 0.7), ("float32", 3, 0.0), ("bfloat16", 1, 0.0),
                     ("bfloat16", 3, 0.0)}
    spec = {(r["draft"], r["temperature"]) for r in result["speculative"]}
    assert spec == {(d, T) for d in ("trimmed", "prompt_lookup") for T in (0.0, 0.7)}


def test_derived_numbers_come_from_the_measured_ones(result):
    bw = result["bandwidth"]
    assert bw["gb_per_s"] == max(bw["kernels"].values())
    for dtype, nbytes in result["bytes_per_pass"].items():
        limit = result["limit"][dtype]
        assert limit["ms_per_token"] == pytest.approx(1e3 * nbytes / (bw["gb_per_s"] * 1e9), rel=1e-3)
        assert limit["tokens_per_s"] == pytest.approx(1e3 / limit["ms_per_token"], rel=1e-3)
        curve = result["pass_cost"][dtype]
        assert curve["positions"] == list(range(1, SETTINGS["positions"] + 1))
        for ms, ratio in zip(curve["ms"], curve["ratio"]):
            assert ratio == pytest.approx(ms / curve["ms"][0], rel=1e-2, abs=1e-3)
    ar = {(r["dtype"], r["batch"], r["temperature"]): r for r in result["autoregressive"]}
    for (dtype, B, T), r in ar.items():
        assert r["ms_per_token"] == pytest.approx(1e3 / r["tokens_per_s"], rel=1e-3)
        if B == 1:
            assert r["fraction_of_limit"] == pytest.approx(result["limit"][dtype]["ms_per_token"] / r["ms_per_token"],
                                                           rel=1e-2)
        if T == 0.0:
            assert r["ours_over_peer"] == pytest.approx(r["tokens_per_s"] / r["peer_tokens_per_s"], rel=1e-2)
            assert r["peer_identical_tokens"] is True        # same weights, greedy: the same tokens
    dtype = result["speculative_target"]
    for r in result["speculative"]:
        base = ar[(dtype, 1, r["temperature"])]["tokens_per_s"]
        assert r["autoregressive_tokens_per_s"] == pytest.approx(base, rel=1e-3)
        assert r["speedup_measured"] == pytest.approx(r["tokens_per_s"] / base, rel=1e-2)
        assert r["speedup_predicted"] == pytest.approx(float(speculative.speedup(r["alpha"], r["gamma"], r["c"])),
                                                       rel=1e-2)
        assert r["measured_over_predicted"] == pytest.approx(r["speedup_measured"] / r["speedup_predicted"],
                                                             rel=2e-2)
        assert str(r["gamma"]) in r["gamma_search"] and r["gamma"] in SETTINGS["gammas"]
        assert r["tokens_per_s"] == pytest.approx(max(r["gamma_search"].values()), rel=1e-3)
        assert 0.0 <= r["alpha"] <= 1.0
        assert 1.0 <= r["tokens_per_step"] <= r["gamma"] + 1
        assert r["method"] == ("rejection_greedy" if r["temperature"] == 0 or r["draft"] == "prompt_lookup"
                               else "rejection_sampled")
        assert "peer_tokens_per_s" in r                    # assisted generation / prompt lookup ran
        assert r["ours_over_peer"] == pytest.approx(r["tokens_per_s"] / r["peer_tokens_per_s"], rel=1e-2)
    trimmed = result["drafts"]["trimmed"]
    assert trimmed["c"] == pytest.approx(trimmed["pass_ms"] / result["pass_cost"][dtype]["ms"][0], rel=1e-2)
    best = max(r["speedup_measured"] for r in result["speculative"] if r["temperature"] == 0.7)
    assert result["goals"]["speculative_2x_at_T07"]["value"] == best
    assert result["goals"]["speculative_2x_at_T07"]["met"] == (best >= 2.0)


def test_bytes_per_pass_counts_every_weight_once_and_the_keys_read():
    model = _tiny()
    weights = sum(p.numel() * 4 for p in model.parameters())
    # context 10: global layers (1, 3) read 11 keys, local ones (window 4) read 4
    kv = (11 + 11 + 4 + 4) * 2 * TINY.n_kv_head * TINY.head_dim * 4
    assert bench.bytes_per_pass(model, 10) == weights + kv


def test_kept_head_masks_outside_the_kept_tokens_and_matches_the_draft():
    model = _tiny()
    kept = torch.tensor([1, 5, 7, 40, 96])
    peer = bench.hf_gemma(model, kept)
    tokens = torch.randint(0, TINY.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    draft = Trimmed(copy.deepcopy(model), kept)
    draft.setup_cache(1, 16)
    with torch.inference_mode():
        theirs = peer(tokens).logits
        ours = draft(tokens, torch.zeros(1, dtype=torch.long), span=9)
    outside = torch.ones(TINY.vocab_size, dtype=torch.bool)
    outside[kept] = False
    assert torch.isinf(theirs[..., outside]).all() and (theirs[..., outside] < 0).all()
    assert (theirs[..., kept] - ours[..., kept]).abs().max().item() < 1e-4


def test_unknown_settings_and_spec_dtype_are_refused():
    with pytest.raises(ValueError, match="settings"):
        bench.bench_llm({"float32": _tiny()}, settings={"tokenz": 3})
    with pytest.raises(ValueError, match="spec_dtype"):
        bench.bench_llm({"float32": _tiny()}, spec_dtype="bfloat16")


def test_packed_float32_head_equals_the_plain_product_and_follows_weight_changes():
    """gemma's float32 multi-row head (oneDNN, matrix packed once) against (W @ h.T).T."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(300, 32, generator=gen)
    h = torch.randn(5, 32, generator=gen)
    with torch.inference_mode():
        plain = (weight @ h.T).T
        assert (gemma._head(h, weight, pack=True) - plain).abs().max().item() < 1e-4
        weight.mul_(-2.0)                                # in place: the packed copy must be rebuilt
        again = gemma._head(h, weight, pack=True)
    assert (again + 2.0 * plain).abs().max().item() < 1e-4
    model = _tiny()
    tokens = torch.randint(0, TINY.vocab_size, (1, 7), generator=gen)
    with torch.inference_mode():
        ours = model(tokens)
        plain = model(tokens, head=None) @ model.model.embed_tokens.weight.T
    assert (ours - plain).abs().max().item() < 1e-4


def test_decode_rate_from_the_engines_clock_or_a_short_run():
    from typsamp.generate import Generation
    calls = []

    def make(rows):
        def run(n):
            calls.append((rows[0], n))
            wall, prefill = {"a": (2.0, 0.5), "b": (3.0, 1.0)}[rows[0]]
            g = Generation(tokens=torch.zeros(1, n, dtype=torch.long), wall_time=wall * n / 10,
                           prefill_time=prefill, decoded_tokens=n - 1)
            return g.wall_time, n, g
        return run
    # the engine's clock: one run per prompt after the warm-up, no short run
    rate, outs = bench._decode_rate(make, [["a"], ["b"]], 10, None)
    assert calls == [("a", 10), ("a", 10), ("b", 10)] and len(outs) == 2
    assert rate == pytest.approx((9 + 9) / ((2.0 - 0.5) + (3.0 - 1.0)))
    # a short run: (long − short) tokens over the time difference
    calls.clear()
    rate, _ = bench._decode_rate(make, [["a"], ["b"]], 10, 5)
    assert calls == [("a", 10), ("a", 5), ("a", 10), ("b", 5), ("b", 10)]
    assert rate == pytest.approx((5 + 5) / ((2.0 - 1.0) + (3.0 - 1.5)))

    # a Generation without the clock (transformers' peers build such) is refused, not divided by
    def unclocked(rows):
        def run(n):
            g = Generation(tokens=torch.zeros(1, n, dtype=torch.long), wall_time=1.0)
            return 1.0, n, g
        return run
    with pytest.raises(ValueError, match="keeps no prefill clock"):
        bench._decode_rate(unclocked, [["a"]], 10, None)

    # a clocked run that decoded nothing after its prefill (every row ended at once)
    def ended(rows):
        def run(n):
            g = Generation(tokens=torch.zeros(1, n, dtype=torch.long), wall_time=1.0, prefill_time=1.0,
                           decoded_tokens=0)
            return 1.0, 1, g
        return run
    with pytest.raises(ValueError, match="decoded nothing after its prefill"):
        bench._decode_rate(ended, [["a"]], 10, None)
