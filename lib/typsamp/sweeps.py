"""The generation sweeps behind chapters 5 and 6, run once and recorded as JSON.

Chapters 5 and 6 measure the decoding engine on the book's target and draft over grids
of temperatures, verification rules and thresholds: hundreds of generations, too many to
repeat every time the book is built. This module runs them (``make``-free, one command
per chapter) and writes small JSON files under ``notebooks/results/`` that the chapters
load and assert their claims against; ``tests/test_sweeps.py`` re-runs a few cells of
each sweep and checks that they reproduce the committed numbers, so the files are
verifiably this code's output.

    python -m typsamp.sweeps acceptance [--out PATH]   # chapter 5: temperature_acceptance.json
    python -m typsamp.sweeps typical [--out PATH]      # chapter 6: typical_generation.json
    python -m typsamp.sweeps simulation [--out PATH]   # chapter 6: typical_simulation.json
    python -m typsamp.sweeps distance [--out PATH]     # chapter 6: typical_distance.json

Every cell of a sweep is computed on its own from fixed inputs (seeded prompts, its own
seed), so any cell can be recomputed alone and must come out the same: :func:`run_cell`
for chapter 5 and :func:`typical_cell` for chapter 6 are what both the CLI and the test
call. One torch thread throughout (it also fixes the order of floating-point sums).
Each file records :func:`typsamp.provenance.machine` and the versions; the numbers are
statistics of generated text, not timings, so the load of the machine does not enter.

``acceptance`` (chapter 5): the target with each draft (``"target"``, a second copy of
the target's weights, the perfect draft; ``"draft"``, the real one-layer draft), the four
methods of :data:`RULES` at the temperatures :data:`TEMPERATURES`, 16 prompts x 128
characters, γ = 4: measured α with its between-row standard error, the counts, and
α_own, the rule's acceptance probability (:func:`acceptance`) averaged over the
positions the rule examined in the generated text, with its standard error; and the
held-out predictions (:func:`held_out_logits`, :func:`predicted`) and head/tail split
of TV (:func:`split_tv`) on the chapter's temperature grids.

``typical`` (chapter 6): typical acceptance against plain and rejection sampling on 16
prompts of 40 characters: greedy decoding against typical acceptance at T = 0 in float64
(three extra tokens), Medusa's ε sweep in generation, Medusa's rule across seeds and
temperatures (determinism), and the text of six decoding methods at four temperatures
(target NLL, distinct-1/2 per row, characters per step, row 0's text).

``simulation`` (chapter 6): the one-position laws of typical acceptance and of lenience
against simulation: 60,000 copies of each of four held-out contexts (:func:`contexts_06`)
per table, the counts of the emitted token (:func:`simulation_cell`); the chapter
computes the laws and the chi-square tests itself.

``distance`` (chapter 6): the exact distance (TV, KL) of typical acceptance's one-position
law from p_T, and its acceptance rate, on the same contexts over a grid of T and ε
(:func:`distance_cell`); no randomness, only many evaluations of the exact law.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from typsamp import data, generate, provenance, sampling, speculative, stats, typical
from typsamp import model as gpt

RESULTS = provenance.ROOT / "notebooks" / "results"
FILES = {"acceptance": "temperature_acceptance.json", "typical": "typical_generation.json",
         "simulation": "typical_simulation.json", "distance": "typical_distance.json"}

# ---------------------------------------------------------------------------------------
# Chapter 5: temperature against acceptance

B, P, N_NEW, GAMMA, SEED = 16, 48, 128, 4, 5
TEMPERATURES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
#: The held-out prediction grids of chapter 5's figures: 0, 0.05, ..., 1.5 and
#: 10 ** (k / 8) for k = -16 .. 24 (T = 0.01 ... 1000).
FINE = tuple(i / 20 for i in range(31))
WIDE = tuple(10 ** (k / 8) for k in range(-16, 25))
#: The head/tail table's temperatures, and the far grid of its figure.
SPLIT_T = (0.05, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
FAR = tuple(10 ** (k / 8) for k in range(-12, 17))

#: Medusa's own rule (chapter 6): deterministic candidates, argmax after a failure.
MEDUSA = typical.TypicalAcceptance(epsilon=0.09, delta=0.3, extra="greedy")
#: name: (greedy drafts?, verification rule), in the book's one vocabulary.
RULES = {
    "rejection_sampled": (False, speculative.RejectionSampling()),
    "rejection_greedy": (True, speculative.RejectionSampling()),
    "match_sampled": (False, speculative.ExactMatch()),
    "typical_greedy": (True, MEDUSA),
}


def _rule_name(rule) -> str:
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"`rule` must be one of {tuple(RULES)}, got {rule!r}")
    return rule


def acceptance(rule: str, p_logits: torch.Tensor, q_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Probability that one draft is accepted under ``rule`` at every position [...]:
    Σ min(p_T, q_T) (``rejection_sampled``), p_T(x̂) with x̂ = argmax q
    (``rejection_greedy``), Σ p_T q_T (``match_sampled``: y ~ p and x ~ q agree) and
    1[p_T(x̂) > τ(p_T)] (``typical_greedy``, Medusa's defaults). Chapter 5."""
    rule = _rule_name(rule)
    p, q = sampling.probs(p_logits, T), sampling.probs(q_logits, T)
    if rule == "rejection_sampled":
        return speculative.acceptance_rate(p, q)
    if rule == "rejection_greedy":
        return speculative.acceptance_rate(p, sampling.probs(q_logits, temperature=0))
    if rule == "match_sampled":
        return (p * q).sum(dim=-1)
    return typical.acceptance_rate(p, q_logits.argmax(dim=-1), MEDUSA.epsilon, MEDUSA.delta)


@functools.cache
def _models():
    target, draft = gpt.load("target"), gpt.load("draft")
    return {"target": target, "draft": draft, "target_copy": gpt.load("target")}


@functools.cache
def prompts_05() -> torch.Tensor:
    """Chapter 5's 16 prompts: 48 held-out characters at seeded offsets [16, 48]."""
    corpus = data.load_corpus()
    starts = torch.randint(0, len(corpus.val_ids) - P, (B,), generator=torch.Generator().manual_seed(3))
    return torch.stack([corpus.val_ids[s:s + P] for s in starts.tolist()])


@functools.cache
def held_out_logits() -> dict[str, torch.Tensor]:
    """Teacher-forced logits of the target and the draft on 64 seeded held-out windows
    of 256 characters (float32, [64, 256, V]): chapter 5's (and chapter 4's) held-out text."""
    corpus = data.load_corpus()
    m = _models()
    block = m["target"].config.block_size
    windows, _ = next(data.random_windows(corpus.val_ids, 64, block, torch.Generator().manual_seed(7)))
    return {name: stats.teacher_forced_logits(m[name], windows, batch_size=16) for name in ("target", "draft")}


def predicted(rule: str, T: float, draft_name: str) -> float:
    """Mean acceptance probability of ``rule`` over the held-out positions at ``T``, with
    the real draft (``"draft"``) or the target as its own draft (``"target"``)."""
    z = held_out_logits()
    if draft_name not in z:
        raise ValueError(f"`draft_name` must be 'target' or 'draft', got {draft_name!r}")
    return float(acceptance(rule, z["target"], z[draft_name], T).mean())


def split_tv(T: float) -> dict[str, float]:
    """Mean head and tail parts of TV(p_T, q_T) over held-out text (float64), with the
    share of each model's mass in the tail. The head is {argmax p, argmax q}."""
    z = held_out_logits()
    z_p, z_q = z["target"].double(), z["draft"].double()
    head_set = torch.zeros_like(z_p, dtype=torch.bool)
    head_set.scatter_(-1, z_p.argmax(-1, keepdim=True), True)
    head_set.scatter_(-1, z_q.argmax(-1, keepdim=True), True)
    p, q = sampling.probs(z_p, T), sampling.probs(z_q, T)
    gap = 0.5 * (p - q).abs()
    head, tail = (gap * head_set).sum(-1), (gap * ~head_set).sum(-1)
    if not torch.allclose(head + tail, stats.tv(p, q), atol=1e-12):
        raise AssertionError("head + tail must add up to stats.tv")
    return dict(head=float(head.mean()), tail=float(tail.mean()), tv=float((head + tail).mean()),
                p_tail=float((p * ~head_set).sum(-1).mean()), q_tail=float((q * ~head_set).sum(-1).mean()))


def run_cell(draft_name: str, rule: str, T: float) -> dict:
    """One generation of chapter 5: the target with ``draft_name`` (``"target"``: the
    copy of its weights; ``"draft"``) proposing, ``rule`` verifying, at temperature ``T``.

    Returns the measured α and its standard error between rows (:func:`stats.row_alpha`),
    accepted and examined counts, characters per step, and α_own: the rule's acceptance
    probability on the generated text at the examined positions (``tested`` is the
    share of those drafts kept, ``own`` the mean probability, ``own_se`` its standard
    error, :func:`stats.bernoulli_mean_se`)."""
    rule = _rule_name(rule)
    if draft_name not in ("target", "draft"):
        raise ValueError(f"`draft_name` must be 'target' or 'draft', got {draft_name!r}")
    m = _models()
    target, proposer_model = m["target"], m["target_copy" if draft_name == "target" else "draft"]
    greedy, verifier = RULES[rule]
    prompts = prompts_05()
    out = generate.speculative(target, generate.DraftModel(proposer_model, greedy=greedy), prompts, N_NEW,
                               gamma=GAMMA, rule=verifier, warp=sampling.Warp(temperature=T), seed=SEED)
    counts = stats.row_alpha(out.accepted_lengths, out.gamma)
    text = torch.cat([prompts, out.tokens], dim=1)
    p_logits = stats.teacher_forced_logits(target, text)
    q_logits = p_logits if draft_name == "target" else stats.teacher_forced_logits(proposer_model, text)
    beta = acceptance(rule, p_logits, q_logits, T).double().clamp(0, 1)   # float32 sums can pass 1
    outcomes, betas = [], []
    for row, (index, accepted) in enumerate(stats.tested_positions(out.accepted_lengths, GAMMA, P, N_NEW)):
        outcomes.append(accepted)
        betas.append(beta[row, index - 1])          # draft j is judged after text[:j]
    outcomes, betas = torch.cat(outcomes), torch.cat(betas)
    own, own_se = stats.bernoulli_mean_se(betas)
    return dict(draft=draft_name, rule=rule, T=T, alpha=counts.alpha, se=counts.se,
                engine_alpha=out.alpha, accepted=out.accepted, examined=out.examined,
                tested=float(outcomes.double().mean()), own=own, own_se=own_se,
                tokens_per_step=out.tokens_per_step)


def _grid(values) -> list[float]:
    return sorted(set(values))


def sweep_acceptance(progress: bool = True) -> dict:
    """Everything chapter 5 generates or predicts (see the module docstring)."""
    torch.set_num_threads(1)
    where = provenance.machine("cpu")
    cells = [(d, r, T) for d in ("target", "draft") for r in RULES for T in TEMPERATURES]
    runs = [run_cell(*cell) for cell in tqdm(cells, desc="chapter 5 runs", disable=not progress)]
    grid = _grid(FINE + WIDE + TEMPERATURES)
    pred = {d: {r: [predicted(r, T, d) for T in grid] for r in RULES} for d in ("target", "draft")}
    z = held_out_logits()
    # sum_x p q <= sum_x min(p, q) position by position: the largest excess at each T
    excess = [float((acceptance("match_sampled", z["target"], z["draft"], T)
                     - acceptance("rejection_sampled", z["target"], z["draft"], T)).max()) for T in FINE[1:]]
    split_grid = _grid(SPLIT_T + FAR + tuple(T for T in FINE if T > 0))
    split = [split_tv(T) for T in tqdm(split_grid, desc="head/tail split", disable=not progress)]
    return {
        "command": "python -m typsamp.sweeps acceptance",
        "settings": dict(rows=B, prompt=P, new_tokens=N_NEW, gamma=GAMMA, seed=SEED, prompt_seed=3,
                         held_out_windows=64, held_out_seed=7, temperatures=list(TEMPERATURES)),
        "runs": runs,
        "predicted": {"T": grid, **pred},
        "match_minus_rejection_max": {"T": list(FINE[1:]), "excess": excess},
        "split_tv": {"T": split_grid, **{k: [s[k] for s in split] for k in split[0]}},
        "machine": where,
        "versions": provenance.versions(),
    }


# ---------------------------------------------------------------------------------------
# Chapter 6: typical acceptance in generation

P_PROMPT, N_PROMPTS, TYP_GAMMA = 40, 16, 4
#: Medusa's defaults (MedusaModel.medusa_generate).
TYP_DEFAULTS = dict(epsilon=0.09, delta=0.3)
EPS_GRID = (0.01, 0.03, 0.09, 0.2, 0.3, 0.5)
TRADE_T, N_TRADE = (0.7, 1.0, 1.3), 120
DET_SEEDS, N_DET, DET_T = (0, 1, 2, 3), 120, (0.7, 1.0, 1.3)
N_GREEDY = 160
QUALITY_T, N_Q, Q_SEED = (0.5, 0.7, 1.0, 1.3), 200, 1
#: The six decoding methods of chapter 6's text comparison: (greedy drafts?, extra token)
#: for the typical ones, None for the two exact ones.
METHODS = ("autoregressive", "rejection_sampled", "typical_greedy (Medusa)", "typical_greedy, e = p",
           "typical_greedy, trunc.", "typical_sampled, e = p")
_TYPICAL = {"typical_greedy (Medusa)": (True, "greedy"), "typical_greedy, e = p": (True, "target"),
            "typical_greedy, trunc.": (True, "truncated"), "typical_sampled, e = p": (False, "target")}


def _typical_rule(extra: str = "greedy", **threshold) -> typical.TypicalAcceptance:
    return typical.TypicalAcceptance(**{**TYP_DEFAULTS, **threshold}, extra=extra)


@functools.cache
def _models64():
    return {"target": gpt.load("target", dtype=torch.float64), "draft": gpt.load("draft", dtype=torch.float64)}


@functools.cache
def _prompt_starts() -> tuple[int, ...]:
    corpus = data.load_corpus()
    starts = torch.randint(0, len(corpus.val_ids) - 400, (N_PROMPTS,), generator=torch.Generator().manual_seed(3))
    return tuple(starts.tolist())


def prompts_06() -> torch.Tensor:
    """Chapter 6's 16 prompts: 40 held-out characters at seeded offsets [16, 40]."""
    corpus = data.load_corpus()
    return torch.stack([corpus.val_ids[s:s + P_PROMPT] for s in _prompt_starts()])


def _texts(tokens: torch.Tensor) -> list[str]:
    tok = data.load_corpus().tokenizer
    return [tok.decode(row) for row in tokens]


def target_nll(prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per row: the float64 target's mean −log p_1(next character) of the continuation
    ``tokens`` given ``prompts`` (nats per character)."""
    text = torch.cat([prompts, tokens], dim=1)
    logits = stats.teacher_forced_logits(_models64()["target"], text)[:, prompts.shape[1] - 1:-1]
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, tokens[..., None]).squeeze(-1).mean(dim=1)


def text_measures(prompts: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Target NLL, distinct-1 and distinct-2 per row (lists), and row 0's text."""
    words = _texts(tokens)
    return {"nll": target_nll(prompts, tokens).tolist(), "d1": stats.distinct_n(words, 1).tolist(),
            "d2": stats.distinct_n(words, 2).tolist(), "row0": words[0]}


def _quality_run(method: str, T: float):
    m, prompts = _models(), prompts_06()
    warp = sampling.Warp(temperature=T)
    if method == "autoregressive":
        return generate.autoregressive(m["target"], prompts, N_Q, warp=warp, seed=Q_SEED)
    if method == "rejection_sampled":
        return generate.speculative(m["target"], generate.DraftModel(m["draft"], greedy=False), prompts, N_Q,
                                    gamma=TYP_GAMMA, rule=speculative.RejectionSampling(), warp=warp, seed=Q_SEED)
    greedy, extra = _TYPICAL[method]
    return generate.speculative(m["target"], generate.DraftModel(m["draft"], greedy=greedy), prompts, N_Q,
                                gamma=TYP_GAMMA, rule=_typical_rule(extra), warp=warp, seed=Q_SEED)


def typical_cell(kind: str, *key) -> dict:
    """One cell of chapter 6's sweep, recomputed alone:

    * ``("greedy", extra)``: T = 0 in float64 on prompts[:8], 160 characters; ``extra``
      is ``None`` for ``generate.autoregressive``, else typical acceptance with greedy
      drafts and that extra token: the texts and the target passes;
    * ``("trade", T, eps)``: Medusa's rule with δ = √ε (``eps="rejection"``: rejection
      sampling with sampled drafts), prompts[:8], 120 characters, seed 1: characters per step;
    * ``("det", extra, T, seed)``: greedy drafts, ``extra`` (``"greedy"`` or ``"target"``),
      prompts[:8], 120 characters; ``("det", "cold")``: greedy decoding: the texts;
    * ``("quality", method, T)``: one of :data:`METHODS` on all 16 prompts, 200 characters,
      seed 1 (``("quality", "play")`` the true continuations, ``("quality", "greedy")``
      greedy decoding): :func:`text_measures` and characters per step.
    """
    m, prompts = _models(), prompts_06()
    if kind == "greedy":
        (extra,) = key
        m64, warp = _models64(), sampling.Warp(temperature=0.0)
        if extra is None:
            out = generate.autoregressive(m64["target"], prompts[:8], N_GREEDY, warp=warp)
        else:
            out = generate.speculative(m64["target"], generate.DraftModel(m64["draft"], greedy=True), prompts[:8],
                                       N_GREEDY, gamma=TYP_GAMMA, rule=_typical_rule(extra), warp=warp)
        return dict(extra=extra, texts=_texts(out.tokens), target_passes=out.target_passes,
                    tokens_per_step=out.tokens_per_step)
    if kind == "trade":
        T, eps = key
        warp = sampling.Warp(temperature=T)
        if eps == "rejection":
            out = generate.speculative(m["target"], generate.DraftModel(m["draft"], greedy=False), prompts[:8],
                                       N_TRADE, gamma=TYP_GAMMA, rule=speculative.RejectionSampling(), warp=warp,
                                       seed=1)
        else:
            out = generate.speculative(m["target"], generate.DraftModel(m["draft"], greedy=True), prompts[:8],
                                       N_TRADE, gamma=TYP_GAMMA, rule=_typical_rule(epsilon=eps, delta=math.sqrt(eps)),
                                       warp=warp, seed=1)
        return dict(T=T, eps=eps, measured=out.tokens_per_step)
    if kind == "det":
        if key == ("cold",):
            out = generate.autoregressive(m["target"], prompts[:8], N_DET, warp=sampling.Warp(temperature=0.0))
            return dict(extra="cold", texts=_texts(out.tokens))
        extra, T, seed = key
        out = generate.speculative(m["target"], generate.DraftModel(m["draft"], greedy=True), prompts[:8], N_DET,
                                   gamma=TYP_GAMMA, rule=_typical_rule(extra), warp=sampling.Warp(temperature=T),
                                   seed=seed)
        return dict(extra=extra, T=T, seed=seed, texts=_texts(out.tokens))
    if kind == "quality":
        if key == ("play",):
            corpus = data.load_corpus()
            human = torch.stack([corpus.val_ids[s + P_PROMPT:s + P_PROMPT + N_Q] for s in _prompt_starts()])
            return dict(method="the play itself", **text_measures(prompts, human))
        if key == ("greedy",):
            out = generate.autoregressive(m["target"], prompts, N_Q, warp=sampling.Warp(temperature=0.0))
            return dict(method="greedy decoding", **text_measures(prompts, out.tokens))
        method, T = key
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
        out = _quality_run(method, T)
        return dict(method=method, T=T, **text_measures(prompts, out.tokens),
                    per_step=out.tokens_per_step if out.gamma else 1.0)
    raise ValueError(f"`kind` must be 'greedy', 'trade', 'det' or 'quality', got {kind!r}")


def typical_cells() -> list[tuple]:
    """Every cell of chapter 6's sweep, in the order the file stores them."""
    cells = [("greedy", None)] + [("greedy", x) for x in typical.EXTRA]
    cells += [("trade", T, e) for T in TRADE_T for e in (*EPS_GRID, "rejection")]
    cells += [("det", "cold")] + [("det", x, 1.0, s) for x in ("greedy", "target") for s in DET_SEEDS]
    cells += [("det", "greedy", T, 0) for T in DET_T if T != 1.0]
    cells += [("quality", "play"), ("quality", "greedy")]
    cells += [("quality", method, T) for T in QUALITY_T for method in METHODS]
    return cells


def sweep_typical(progress: bool = True) -> dict:
    """Everything chapter 6 generates (see the module docstring)."""
    torch.set_num_threads(1)
    where = provenance.machine("cpu")
    out: dict[str, list] = {"greedy": [], "trade": [], "det": [], "quality": []}
    for cell in tqdm(typical_cells(), desc="chapter 6 cells", disable=not progress):
        out[cell[0]].append(typical_cell(*cell))
    return {
        "command": "python -m typsamp.sweeps typical",
        "settings": dict(prompts=N_PROMPTS, prompt=P_PROMPT, prompt_seed=3, gamma=TYP_GAMMA, **TYP_DEFAULTS,
                         eps_grid=list(EPS_GRID), trade_T=list(TRADE_T), trade_tokens=N_TRADE,
                         det_seeds=list(DET_SEEDS), det_tokens=N_DET, greedy_tokens=N_GREEDY,
                         quality_T=list(QUALITY_T), quality_tokens=N_Q, quality_seed=Q_SEED),
        **out,
        "machine": where,
        "versions": provenance.versions(),
    }


# ---------------------------------------------------------------------------------------
# Chapter 6: the one-position laws against simulation

N_WINDOWS_06, N_CONTEXTS_06, N_MC, T_MC = 32, 4096, 60_000, 1.0
LENIENCE_MC = (0.5, 0.1)


@functools.cache
def contexts_06() -> dict[str, torch.Tensor]:
    """Chapter 6's held-out contexts: 4,096 positions drawn (seed 0) from 32 windows of
    256 characters (seed 7), the float64 target's and draft's logits there [4096, V],
    and the four high-entropy contexts (entropy above 1.8 nats at T = 1) of the
    simulations: the first two where the draft's greedy token passes Medusa's defaults,
    then the first two where it fails."""
    corpus = data.load_corpus()
    m64 = _models64()
    block, V = m64["target"].config.block_size, m64["target"].config.vocab_size
    windows, _ = next(data.random_windows(corpus.val_ids, N_WINDOWS_06, block, torch.Generator().manual_seed(7)))
    pick = torch.randperm(windows.numel(), generator=torch.Generator().manual_seed(0))[:N_CONTEXTS_06]
    z_target = stats.teacher_forced_logits(m64["target"], windows, batch_size=8).reshape(-1, V)[pick]
    z_draft = stats.teacher_forced_logits(m64["draft"], windows, batch_size=8).reshape(-1, V)[pick]
    p = sampling.probs(z_target, T_MC)
    high = sampling.entropy(p) > 1.8
    passes = typical.acceptance_rate(p, z_draft.argmax(-1), **TYP_DEFAULTS) == 1
    chosen = (high & passes).nonzero().flatten()[:2].tolist() + (high & ~passes).nonzero().flatten()[:2].tolist()
    return {"z_target": z_target, "z_draft": z_draft, "contexts": torch.tensor(chosen)}


def simulation_cells() -> list[tuple]:
    """Every simulated table of chapter 6, in the order the file stores them: typical
    acceptance (context, draft kind, extra token) and lenience (context, draft kind, l)."""
    contexts = contexts_06()["contexts"].tolist()
    cells = [("typical", c, mode, x) for c in contexts for mode in ("sampled", "greedy") for x in typical.EXTRA]
    return cells + [("lenient", c, mode, l) for c in contexts for mode in ("sampled", "greedy") for l in LENIENCE_MC]


def simulation_cell(kind: str, context: int, mode: str, param) -> dict:
    """One simulated table: the rule (typical acceptance at Medusa's defaults with extra
    token ``param``, or ``speculative.RejectionSampling(lenience=param)``) run with γ = 1
    on 60,000 copies of one held-out context at T = 1, drafts sampled from q_1 or the
    draft's greedy token; the counts of the first emitted token, and the share of drafts
    accepted. Each table has its own generator, seeded by its place in
    :func:`simulation_cells`."""
    cell = (kind, context, mode, param)
    cells = simulation_cells()
    if cell not in cells:
        raise ValueError(f"no simulated table {cell!r}; see simulation_cells()")
    gen = torch.Generator().manual_seed({"typical": 11, "lenient": 12}[kind] * 10_000 + cells.index(cell))
    ctx = contexts_06()
    p = sampling.probs(ctx["z_target"][context], T_MC)
    q = sampling.probs(ctx["z_draft"][context], T_MC)
    V = p.shape[-1]
    target_rows = p.expand(N_MC, 2, V)           # gamma = 1: the draft position, and one more
    if mode == "sampled":
        drafts = sampling.sample(q.expand(N_MC, V), gen)[:, None]
    else:
        drafts = ctx["z_draft"][context].argmax().expand(N_MC, 1).clone()
    if kind == "typical":
        verdict = _typical_rule(param).verify(drafts, None, target_rows, gen)
    else:
        draft_probs = q.expand(N_MC, 1, V) if mode == "sampled" else None
        verdict = speculative.RejectionSampling(lenience=param).verify(drafts, draft_probs, target_rows, gen)
    counts = torch.bincount(verdict.tokens[:, 0], minlength=V)
    return dict(kind=kind, context=context, mode=mode, param=param, counts=counts.tolist(),
                accepted=float(verdict.accepted.double().mean()))


def sweep_simulation(progress: bool = True) -> dict:
    """Chapter 6's simulated tables (see :func:`simulation_cell`)."""
    torch.set_num_threads(1)
    where = provenance.machine("cpu")
    tables = [simulation_cell(*cell) for cell in tqdm(simulation_cells(), desc="simulations",
                                                          disable=not progress)]
    return {
        "command": "python -m typsamp.sweeps simulation",
        "settings": dict(copies=N_MC, T=T_MC, **TYP_DEFAULTS, lenience=list(LENIENCE_MC),
                         contexts=contexts_06()["contexts"].tolist()),
        "tables": tables,
        "machine": where,
        "versions": provenance.versions(),
    }


# ---------------------------------------------------------------------------------------
# Chapter 6: the exact distance of typical acceptance's output from p_T

DIST_T = (0.25, 0.5, 0.7, 1.0, 1.3, 1.5)


def distance_cell(T: float, eps: float) -> dict:
    """Chapter 6's exact one-position distances at temperature ``T`` and ε = ``eps``
    (δ = √ε), averaged over the 4,096 held-out contexts of :func:`contexts_06` (float64):
    for sampled drafts (q_T) and greedy drafts (the draft's argmax) and each extra token,
    the mean TV(π, p_T) and KL(π ‖ p_T) of the emitted law π
    (:func:`typical.output_distribution`) and the acceptance rate; the smallest KL and
    whether all are finite; for greedy drafts with Medusa's extra token and e = p, the
    largest deviation of TV from its closed form; and η-sampling's TV at ε."""
    ctx = contexts_06()
    z_target, z_draft = ctx["z_target"], ctx["z_draft"]
    x_greedy = z_draft.argmax(dim=-1)
    p, q = sampling.probs(z_target, T), sampling.probs(z_draft, T)
    p_max = p.amax(-1)
    delta = math.sqrt(eps)
    rows = []
    for mode, law in (("sampled", q), ("greedy", x_greedy)):
        ok = typical.acceptance_rate(p, law, eps, delta)
        for extra in typical.EXTRA:
            pi = typical.output_distribution(p, law, eps, delta, extra=extra)
            kls, tvs = stats.kl(pi, p), stats.tv(pi, p)
            closed = None
            if mode == "greedy" and extra in ("greedy", "target"):   # pi: one-hot(x̂) if x̂ passes, else e
                p_x = p.gather(-1, law[:, None]).squeeze(-1)
                fail = 1 - p_max if extra == "greedy" else torch.zeros_like(p_max)
                closed = float((tvs - (ok * (1 - p_x) + (1 - ok) * fail)).abs().max())
            rows.append(dict(mode=mode, extra=extra, T=T, eps=eps, tv=float(tvs.mean()), kl=float(kls.mean()),
                             accept=float(ok.mean()), kl_min=float(kls.min()),
                             kl_finite=bool(torch.isfinite(kls).all()), closed_form_error=closed))
    eta = float(stats.tv(sampling.probs(z_target, T, eta=eps), p).mean())
    return dict(T=T, eps=eps, eta_tv=eta, rows=rows)


def sweep_distance(progress: bool = True) -> dict:
    """Chapter 6's distance grid (see :func:`distance_cell`) over :data:`DIST_T` x :data:`EPS_GRID`."""
    torch.set_num_threads(1)
    where = provenance.machine("cpu")
    cells = [(T, e) for T in DIST_T for e in EPS_GRID]
    grid = [distance_cell(*c) for c in tqdm(cells, desc="distances", disable=not progress)]
    return {
        "command": "python -m typsamp.sweeps distance",
        "settings": dict(T=list(DIST_T), eps=list(EPS_GRID), delta="sqrt(eps)",
                         contexts=N_CONTEXTS_06, windows=N_WINDOWS_06),
        "grid": grid,
        "machine": where,
        "versions": provenance.versions(),
    }


def load(name: str, path: str | Path | None = None) -> dict:
    """The committed result of sweep ``name`` (one of :data:`FILES`)."""
    if name not in FILES:
        raise ValueError(f"`name` must be one of {tuple(FILES)}, got {name!r}")
    return json.loads(Path(path or RESULTS / FILES[name]).read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m typsamp.sweeps", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", choices=tuple(FILES))
    parser.add_argument("--out", type=Path, default=None, help="output JSON (default: notebooks/results/<file>)")
    args = parser.parse_args(argv)
    result = {"acceptance": sweep_acceptance, "typical": sweep_typical, "simulation": sweep_simulation,
              "distance": sweep_distance}[args.sweep]()
    out = args.out or RESULTS / FILES[args.sweep]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
