"""Benchmarks behind the book's speed claims (``make bench``), and the GPU check (``make gpu-check``).

Speed is shown by measurements taken side by side in one run and committed as JSON with
the machine described, never by timed unit tests. Each sub-command writes one file
under ``notebooks/results/`` (``--out`` writes elsewhere), which the chapters load and
cite. Every file records where it ran: ``machine`` (:func:`typsamp.provenance.machine`:
CPU, threads, GPU, date, load average, commit and dirty flag) and ``versions``.

    python -m typsamp.bench [decode] [--device cpu|cuda] [--threads N] [--tokens N] [--prompts N] [--no-peer] [--out PATH]
    python -m typsamp.bench verify [--device cpu|cuda] [--threads N] [--out PATH] [--repeats N]
    python -m typsamp.bench generate [--device cpu|cuda] [--threads N] [--out PATH] [--tokens N] [--prompts N]
    python -m typsamp.bench llm [--threads N] [--tokens N] [--prompts N] [--spec-dtype D] [--no-peer] [--out PATH]
    python -m typsamp.bench gpucheck [--out PATH] [--tokens N] [--prompts N] [--no-tests]

Methods are named with the project's one vocabulary (:data:`METHODS`):
``"autoregressive"``, and ``f"{rule.name}_{'sampled' | 'greedy'}"`` for a verification
rule and how the draft model makes its drafts: ``"rejection_sampled"`` (speculative
sampling), ``"rejection_greedy"``, ``"match_sampled"`` and ``"typical_greedy"`` (Medusa's
typical acceptance, ε = 0.09, δ = 0.3).

``decode`` (the default, chapter 8): every method for T in {0, 0.7, 1} and γ in
{2, 4, 6} with each draft, with tokens/s, speed-up, α, accepted length and Leviathan
et al.'s predicted speed-up, side by side with ``transformers``' assisted generation on
the same weights (:func:`typsamp.hf.peer_generate`); then batched serving at B = 8 and 32.

``verify``: the batched, vectorised :func:`typsamp.speculative.verify` against the
loop-per-position :func:`typsamp.speculative.verify_reference`, for B in {1, 64},
γ in {4, 8}, V in {84, 32000, 128256} (a character vocabulary, Llama 2's, Llama 3's).

``generate``: the engine on the committed models at batch 1, T in {0, 1}, γ in {2, 4, 6}:
ms per token of :func:`typsamp.generate.autoregressive` and of speculative sampling
(``rejection_sampled``) with each draft, the measured acceptance rate α and cost ratio c,
the speed-up Leviathan et al.'s formula predicts from them, and the ratio measured /
predicted, which shows how much the engine's own overhead costs.

``llm`` (chapter 9, :func:`bench_llm`): Gemma 3 270M on this machine. The read
bandwidth (:func:`read_bandwidth`, three kernels, the fastest kept) and the bytes one pass
reads (:func:`bytes_per_pass`) give the limit on autoregressive tokens/s; our
autoregressive decoding at batch 1 and 8 in float32 and bfloat16 beside ``transformers``'
``Gemma3ForCausalLM.generate`` on the same weights (:func:`hf_gemma`); the cost of a pass
over 1..16 positions against one (the c curve); speculative decoding with each draft of
:data:`LLM_DRAFTS` at T in {0, 0.7, 1} (exact rule, γ tuned) against our autoregressive
decoding and ``transformers``' assisted generation with the same draft (its head masked
to the kept tokens) or prompt lookup, with Leviathan et al.'s prediction; the issue's
goals judged from these numbers (``goals``). Writes ``notebooks/results/llm_bench.json``.

``gpucheck`` (``make gpu-check``, on a CUDA machine): exits at once with an error when
CUDA is absent (it never skips); otherwise runs the CUDA tests with skips counted as
failures, then every engine path on ``cuda`` against the same run on the CPU
(:func:`gpu_check`), and writes a report (default ``notebooks/results/gpu_check.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from typsamp import checks, provenance, sampling, speculative, stats, typical

ROOT = provenance.ROOT
RESULTS = ROOT / "notebooks" / "results"

VERIFY_GRID = {"B": (1, 64), "gamma": (4, 8), "V": (84, 32_000, 128_256)}


def method_label(rule, greedy: bool) -> str:
    """The project's name for ``rule`` judging drafts made greedily or by sampling:
    ``f"{rule.name}_{'greedy' if greedy else 'sampled'}"``."""
    if not isinstance(greedy, bool):
        raise TypeError(f"`greedy` must be a bool, got {type(greedy).__name__}")
    name = getattr(rule, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"`rule` must be a verification rule with a name, got {type(rule).__name__}")
    return f"{name}_{'greedy' if greedy else 'sampled'}"


def _methods() -> dict[str, tuple[object, bool]]:
    pairs = [(speculative.RejectionSampling(), False), (speculative.RejectionSampling(), True),
             (speculative.ExactMatch(), False), (typical.TypicalAcceptance(), True)]
    return {method_label(rule, greedy): (rule, greedy) for rule, greedy in pairs}


#: Every speculative method the benchmarks run: label -> (rule, greedy drafts).
#: With "autoregressive", these are the method names of every JSON file and chapter.
METHODS: dict[str, tuple[object, bool]] = _methods()


def run_method(method: str, target, draft, prompt, max_new_tokens: int, *, temperature: float,
               gamma: int | None = None, seed=0):
    """One decoding run of ``method`` (a :data:`METHODS` label or "autoregressive") with
    the warp ``Warp(temperature)``; returns the engine's ``Generation``."""
    from typsamp import generate

    warp = sampling.Warp(temperature=temperature)
    if method == "autoregressive":
        return generate.autoregressive(target, prompt, max_new_tokens, warp=warp, seed=seed)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose autoregressive or one of {', '.join(METHODS)}")
    rule, greedy = METHODS[method]
    return generate.speculative(target, generate.DraftModel(draft, greedy=greedy), prompt, max_new_tokens,
                                gamma=gamma, rule=rule, warp=warp, seed=seed)


def timed(fn: Callable[[], object], device: str, repeats: int, min_seconds: float = 0.2) -> float:
    """Median wall time of ``fn()`` in milliseconds, after one warm-up call.

    Runs at least ``repeats`` times and at least ``min_seconds`` in total (but no more
    than 1000 times), synchronising CUDA around each call so the time is the kernel's.
    """
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - start < min_seconds and len(samples) < 1000):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _verify_inputs(B: int, gamma: int, V: int, device: str, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.softmax(2.0 * torch.randn(B, gamma, V, generator=gen), dim=-1)
    # A target close to the draft, so acceptances and rejections both happen.
    p = torch.empty(B, gamma + 1, V)
    p[:, :gamma] = torch.softmax(q.log() + 0.7 * torch.randn(B, gamma, V, generator=gen), dim=-1)
    p[:, gamma] = torch.softmax(2.0 * torch.randn(B, V, generator=gen), dim=-1)
    x = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, gamma)
    return x.to(device), q.to(device), p.to(device)


def bench_verify(device: str = "cpu", repeats: int = 5) -> dict:
    """verify (validated and unvalidated) against verify_reference over VERIFY_GRID."""
    where = provenance.machine(device)                 # at the start: the load average before the run
    rows = []
    grid = list(itertools.product(VERIFY_GRID["B"], VERIFY_GRID["gamma"], VERIFY_GRID["V"]))
    for B, gamma, V in tqdm(grid, desc=f"verify on {device}"):
        x, q, p = _verify_inputs(B, gamma, V, device)
        gen = torch.Generator(device=device).manual_seed(1)
        fast = timed(lambda: speculative.verify(x, q, p, gen, validate=False), device, repeats)
        checked = timed(lambda: speculative.verify(x, q, p, gen), device, repeats)
        reference = timed(lambda: speculative.verify_reference(x, q, p, gen), device, max(3, repeats // 2),
                          min_seconds=0.0)
        rows.append({
            "device": device, "B": B, "gamma": gamma, "V": V,
            "verify_ms": round(fast, 4),
            "verify_validated_ms": round(checked, 4),
            "reference_ms": round(reference, 4),
            "speedup": round(reference / fast, 2),
        })
    return {
        "benchmark": "speculative.verify vs speculative.verify_reference",
        "command": f"python -m typsamp.bench verify --device {device}",
        "method": ("median wall time per call after one warm-up, same inputs and generator for "
                   "both; verify_ms uses validate=False (the serving path), verify_validated_ms "
                   "checks every input value first; inputs are softmaxes of random logits with "
                   "drafts sampled from q"),
        "machine": where,
        "versions": provenance.versions(),
        "results": rows,
    }


GENERATE_GRID = {"temperature": (0.0, 1.0), "gamma": (2, 4, 6), "draft": ("draft", "draft_small")}


def forward_ms(model, context: int, new: int, device: str, repeats: int = 20, batch: int = 1) -> float:
    """Median time of one cached forward pass of ``new`` tokens per row after ``context``, for ``batch`` rows."""
    model.setup_cache(batch, context + new)
    tokens = torch.zeros(batch, context, dtype=torch.long, device=device)
    step = torch.zeros(batch, new, dtype=torch.long, device=device)
    offset = torch.full((batch,), context, device=device)
    with torch.inference_mode():
        model(tokens, torch.zeros(batch, dtype=torch.long, device=device))

        def one():
            model(step, offset)

        return timed(one, device, repeats)


def _prompts(corpus, n: int, length: int, seed: int, device: str) -> torch.Tensor:
    """``n`` prompts [n, length]: held-out text at offsets drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(corpus.val_ids) - length, (n,), generator=gen).tolist()
    return torch.stack([corpus.val_ids[s:s + length] for s in starts]).to(device)


def bench_generate(device: str = "cpu", tokens: int = 160, prompts: int = 3, seed: int = 0) -> dict:
    """Autoregressive vs speculative sampling on the committed models, batch 1."""
    from typsamp import model as gpt
    from typsamp.data import load_corpus

    where = provenance.machine(device)                 # at the start: the load average before the run
    corpus = load_corpus()
    target = gpt.load("target", device=device)
    drafts = {name: gpt.load(name, device=device) for name in GENERATE_GRID["draft"]}
    # Prompts: the opening 64 characters of held-out text at fixed offsets.
    prompt_list = [row[None] for row in _prompts(corpus, prompts, 64, seed, device)]
    context = 64 + tokens // 2
    costs = {"target": forward_ms(target, context, 1, device)}
    costs.update({name: forward_ms(m, context, 1, device) for name, m in drafts.items()})
    verify_cost = {g: forward_ms(target, context, g + 1, device) for g in GENERATE_GRID["gamma"]}
    method = "rejection_sampled"

    def ms_per_token(run) -> float:
        total_time = total_tokens = 0.0
        for prompt in prompt_list:
            out = run(prompt)
            total_time += out.wall_time
            total_tokens += int(out.lengths.sum())
        return 1e3 * total_time / total_tokens

    rows = []
    cells = [(T, None, None) for T in GENERATE_GRID["temperature"]]
    cells += list(itertools.product(GENERATE_GRID["temperature"], GENERATE_GRID["draft"], GENERATE_GRID["gamma"]))
    for T, name, gamma in tqdm(cells, desc=f"generate on {device}"):
        if name is None:
            run_method("autoregressive", target, None, prompt_list[0], 8, temperature=T, seed=seed)   # warm-up
            ms = ms_per_token(lambda pr: run_method("autoregressive", target, None, pr, tokens, temperature=T,
                                                    seed=seed))
            rows.append({"temperature": T, "method": "autoregressive", "ms_per_token": round(ms, 4)})
            continue
        draft = drafts[name]
        outs = []

        def run(pr):
            out = run_method(method, target, draft, pr, tokens, temperature=T, gamma=gamma, seed=seed)
            outs.append(out)
            return out

        run_method(method, target, draft, prompt_list[0], 8, temperature=T, gamma=gamma, seed=seed)
        ms = ms_per_token(run)
        alpha = sum(o.accepted for o in outs) / sum(o.examined for o in outs)
        c = costs[name] / costs["target"]
        rows.append({
            "temperature": T, "method": method, "draft": name, "gamma": gamma,
            "ms_per_token": round(ms, 4), "alpha": round(alpha, 4), "c": round(c, 4),
            "tokens_per_step": round(sum(int(o.lengths.sum()) for o in outs) / sum(o.steps for o in outs), 4),
        })
    baseline = {r["temperature"]: r["ms_per_token"] for r in rows if r["method"] == "autoregressive"}
    for r in rows:
        if r["method"] != "autoregressive":
            r["speedup_measured"] = round(baseline[r["temperature"]] / r["ms_per_token"], 4)
            r["speedup_predicted"] = round(float(speculative.speedup(r["alpha"], r["gamma"], r["c"])), 4)
            r["measured_over_predicted"] = round(r["speedup_measured"] / r["speedup_predicted"], 4)
            # The same expected tokens per step, but with the measured cost of a (γ+1)-token
            # verification pass instead of assuming it equals a one-token pass: what is
            # left between this and the measurement is the engine's own overhead.
            tokens_step = float(speculative.expected_tokens(r["alpha"], r["gamma"]))
            step_ms = r["gamma"] * costs[r["draft"]] + verify_cost[r["gamma"]]
            r["speedup_predicted_measured_costs"] = round(tokens_step * costs["target"] / step_ms, 4)
            r["measured_over_predicted_measured_costs"] = round(
                r["speedup_measured"] / r["speedup_predicted_measured_costs"], 4)
    return {
        "benchmark": "generate.autoregressive vs generate.speculative (rejection_sampled), batch 1",
        "command": f"python -m typsamp.bench generate --device {device} --tokens {tokens} --prompts {prompts}",
        "method": (f"{prompts} prompts of 64 held-out characters, {tokens} new tokens each, one seed; "
                   "rejection_sampled = drafts sampled from q, speculative.RejectionSampling(); "
                   "ms/token = total wall time / total tokens (prefill included); c = median time "
                   "of one cached one-token draft pass / one target pass at the mid-generation "
                   "context; predicted speed-up = Leviathan et al. Thm 3.8 from the measured alpha "
                   "and c, which assumes a gamma+1-token target pass costs one one-token pass; "
                   "speedup_predicted_measured_costs uses the measured verify_pass_ms instead"),
        "forward_ms": {k: round(v, 4) for k, v in costs.items()},
        "verify_pass_ms": {str(g): round(v, 4) for g, v in verify_cost.items()},
        "machine": where,
        "versions": provenance.versions(),
        "results": rows,
    }


DECODE_GRID = {"temperature": (0.0, 0.7, 1.0), "gamma": (2, 4, 6), "draft": ("draft", "draft_small"),
               "method": tuple(METHODS)}
BATCH_SIZES = (8, 32)
#: Methods of the batched-serving part of ``decode``.
BATCHED_METHODS = ("autoregressive", "rejection_sampled", "typical_greedy")
#: The method transformers' assisted generation implements (sampled drafts, rejection sampling).
PEER_METHODS = ("autoregressive", "rejection_sampled")


def _alpha_from_tokens_per_step(tokens_per_step: float, gamma: int) -> float:
    """Solve (1 - α^{γ+1}) / (1 - α) = tokens per step for α (bisection; the left side rises with α)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(speculative.expected_tokens(mid, gamma)) < tokens_per_step:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def bench_decode(device: str = "cpu", tokens: int = 160, prompts: int = 4, seed: int = 0,
                 batch_sizes=BATCH_SIZES, peer: bool = True, grid: dict | None = None,
                 progress: bool = True) -> dict:
    """Every decoding method on the committed models, side by side with transformers' assisted generation.

    For T, γ, draft and method in :data:`DECODE_GRID`, at batch 1: our autoregressive
    decoding and every speculative method of :data:`METHODS` with each draft, and
    ``transformers``' ``generate`` with and without ``assistant_model`` on the same
    weights converted to ``GPT2LMHeadModel`` (:func:`typsamp.hf.peer_generate`), beside
    ``autoregressive`` and ``rejection_sampled``. Ours and the peer's runs alternate
    prompt by prompt, so both see the same machine state. Then batched serving: our
    speculative engine against our autoregressive at each batch size.

    ``grid`` overrides :data:`DECODE_GRID` (same keys) for a smaller run, such as the
    live check in chapter 8; ``progress=False`` hides the progress bars.
    """
    from typsamp import model as gpt
    from typsamp.data import load_corpus

    grid = DECODE_GRID if grid is None else {**DECODE_GRID, **grid}
    unknown = set(grid) - set(DECODE_GRID)
    if unknown:
        raise ValueError(f"`grid` has unknown keys {sorted(unknown)}; use {sorted(DECODE_GRID)}")
    for method in grid["method"]:
        if method not in METHODS:
            raise ValueError(f"`grid['method']`: unknown method {method!r}; choose from {', '.join(METHODS)}")
    where = provenance.machine(device)                 # at the start: the load average before the run
    corpus = load_corpus()
    target = gpt.load("target", device=device)
    drafts = {name: gpt.load(name, device=device) for name in grid["draft"]}
    if peer:
        from typsamp import hf

        hf.transformers.logging.set_verbosity_error()
        target_hf = hf.to_hf(target)
        drafts_hf = {name: hf.to_hf(m) for name, m in drafts.items()}
        calls = hf.ForwardCounter(target_hf)
    P = 64
    all_prompts = _prompts(corpus, max((prompts, *batch_sizes)), P, seed, device)
    prompt_list = [all_prompts[i:i + 1] for i in range(prompts)]
    context = P + tokens // 2
    costs = {"target": forward_ms(target, context, 1, device)}
    costs.update({name: forward_ms(m, context, 1, device) for name, m in drafts.items()})
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def ours(method, T, name=None, gamma=None, prompt=None, n=tokens):
        return run_method(method, target, drafts.get(name), prompt, n, temperature=T, gamma=gamma, seed=seed)

    def theirs(T, name=None, gamma=None, prompt=None, n=tokens):
        sync()
        start = time.perf_counter()
        before = calls.n
        out = hf.peer_generate(target_hf, drafts_hf.get(name), prompt, n, T, gamma, seed)
        sync()
        return out, time.perf_counter() - start, calls.n - before

    cells = [(T, "autoregressive", None, None) for T in grid["temperature"]]
    cells += [(T, method, name, gamma) for T in grid["temperature"] for method in grid["method"]
              for name in grid["draft"] for gamma in grid["gamma"]]
    rows = []
    for T, method, name, gamma in tqdm(cells, desc=f"decode on {device}, batch 1", disable=not progress):
        ours(method, T, name, gamma, prompt_list[0], 8)                      # warm-up
        run_peer = peer and method in PEER_METHODS
        if run_peer:
            theirs(T, name, gamma, prompt_list[0], 8)
        mine, peer_time, peer_tokens, peer_steps, peer_equal = [], 0.0, 0, 0, []
        for prompt in prompt_list:
            out = ours(method, T, name, gamma, prompt)
            mine.append(out)
            if run_peer:
                their_tokens, seconds, steps = theirs(T, name, gamma, prompt)
                peer_time += seconds
                peer_tokens += their_tokens.numel()
                peer_steps += steps
                peer_equal.append(bool(torch.equal(their_tokens.cpu(), out.tokens.cpu())))
        n_tokens = sum(int(o.lengths.sum()) for o in mine)
        seconds = sum(o.wall_time for o in mine)
        row = {"temperature": T, "method": method, "draft": name, "gamma": gamma,
               "tokens_per_s": round(n_tokens / seconds, 2), "ms_per_token": round(1e3 * seconds / n_tokens, 4)}
        if method != "autoregressive":
            steps = sum(o.steps for o in mine)
            alpha = sum(o.accepted for o in mine) / sum(o.examined for o in mine)
            c = costs[name] / costs["target"]
            row.update(steps=steps, examined=sum(o.examined for o in mine), alpha=round(alpha, 4), c=round(c, 4),
                       mean_accepted=round(sum(o.accepted for o in mine) / steps, 4),
                       tokens_per_step=round(n_tokens / steps, 4),
                       speedup_predicted=round(float(speculative.speedup(alpha, gamma, c)), 4))
        if run_peer:
            row["peer_tokens_per_s"] = round(peer_tokens / peer_time, 2)
            row["ours_over_peer"] = round(row["tokens_per_s"] / row["peer_tokens_per_s"], 3)
            if T == 0:
                row["peer_identical_tokens"] = all(peer_equal)
            if method != "autoregressive":
                row["peer_steps"] = peer_steps
                row["peer_tokens_per_step"] = round(peer_tokens / peer_steps, 4)
                row["peer_alpha_implied"] = round(_alpha_from_tokens_per_step(peer_tokens / peer_steps, gamma), 4)
                row["alpha_implied"] = round(_alpha_from_tokens_per_step(row["tokens_per_step"], gamma), 4)
        rows.append(row)
    baseline = {r["temperature"]: r["tokens_per_s"] for r in rows if r["method"] == "autoregressive"}
    for r in rows:
        if r["method"] != "autoregressive":
            r["speedup_measured"] = round(r["tokens_per_s"] / baseline[r["temperature"]], 4)
            r["measured_over_predicted"] = round(r["speedup_measured"] / r["speedup_predicted"], 4)

    batched = []
    batch_cells = [(B, T, method) for B in batch_sizes for T in (0.0, 1.0) for method in BATCHED_METHODS]
    for B, T, method in tqdm(batch_cells, desc=f"decode on {device}, batched", disable=not progress):
        prompt = all_prompts[:B]
        spec = method != "autoregressive"
        ours(method, T, "draft", 4, prompt, 8)
        out = ours(method, T, "draft", 4, prompt)
        row = {"batch": B, "temperature": T, "method": method, "draft": "draft" if spec else None,
               "gamma": 4 if spec else None,
               "tokens_per_s": round(int(out.lengths.sum()) / out.wall_time, 1)}
        if spec:
            row["alpha"] = round(out.alpha, 4)
            row["tokens_per_step"] = round(out.tokens_per_step, 4)
        batched.append(row)
    base = {(r["batch"], r["temperature"]): r["tokens_per_s"] for r in batched if r["method"] == "autoregressive"}
    for r in batched:
        if r["method"] != "autoregressive":
            r["speedup_measured"] = round(r["tokens_per_s"] / base[(r["batch"], r["temperature"])], 4)

    return {
        "benchmark": "decoding methods on the committed models, ours against transformers' assisted generation",
        "command": f"python -m typsamp.bench decode --device {device} --tokens {tokens} --prompts {prompts}"
                   + ("" if peer else " --no-peer"),
        "method": (f"batch 1: {prompts} prompts of {P} held-out characters, {tokens} new tokens each, "
                   f"seed {seed}; tokens/s = total tokens / total wall time (prefill included); our run "
                   "and the peer's alternate prompt by prompt after one warm-up each. Methods: "
                   "rejection_sampled = drafts sampled from q + speculative.RejectionSampling(); "
                   "rejection_greedy = greedy drafts + the same rule; match_sampled = sampled drafts + "
                   "speculative.ExactMatch(); typical_greedy = greedy drafts + typical.TypicalAcceptance() "
                   "(eps 0.09, delta 0.3); peer = transformers GPT2LMHeadModel.generate(assistant_model=...) "
                   "on the same weights, num_assistant_tokens = gamma, schedule 'constant', "
                   "assistant_confidence_threshold 0, top_k 0, top_p 1, beside autoregressive and "
                   "rejection_sampled; peer steps = target forward passes; alpha_implied solves "
                   "(1 - a^(g+1))/(1 - a) = tokens per step. "
                   "c = one-token draft pass / one-token target pass at mid-generation context. "
                   "speedup_predicted = Leviathan et al. Thm 3.8 from measured alpha and c. "
                   f"batched: batch {list(batch_sizes)} prompts, draft 'draft', gamma 4, one run after a "
                   "warm-up; transformers' assisted generation supports batch 1 only"),
        "versions": provenance.versions(),
        "forward_ms": {k: round(v, 4) for k, v in costs.items()},
        "machine": where,
        "results": rows,
        "batched": batched,
    }


# ---------------------------------------------------------------------------------------
# python -m typsamp.bench llm: Gemma 3 270M on this machine (chapter 9)

#: Settings of the full ``llm`` run (the coordinator's ``make bench``); tests pass smaller ones.
LLM_SETTINGS = {
    "tokens": 48,              # new tokens per timed run (the decode rate: see bench_llm's method)
    "short": 6,                # new tokens of the short run whose time is subtracted
    "prompts": 2,              # batch-1 prompts (test split, round robin over LLM_CATEGORIES)
    "prompt_tokens": 64,       # prompt length in tokens (BOS + the prompt's last tokens)
    "batch": 8,                # the batched autoregressive cells
    "batch_prompt_tokens": 32,
    "positions": 16,           # the pass-cost curve: 1 .. positions new tokens
    "temperatures": (0.0, 0.7, 1.0),
    "gammas": (2, 3, 4, 5, 6, 8),  # gamma is chosen among these from measured alpha and costs
    "first_gamma": 4,          # the gamma alpha is measured at first
    "gamma_tries": 2,          # most gammas measured per (draft, temperature)
    "bandwidth_mib": 512,
    "seed": 0,
}
#: Categories the bench's prompts come from, round robin (prompts.load(category, "test")).
LLM_CATEGORIES = ("code", "shakespeare", "gsm8k", "mmlu_cot")
#: Drafts the bench runs speculative decoding with (see bench_llm).
LLM_DRAFTS = ("trimmed", "distil", "prompt_lookup")
#: The longest n-gram prompt lookup matches, ours (``PromptLookup(ngram=...)``) and
#: transformers' (``max_matching_ngram_size``) alike, so the two draft the same way.
LOOKUP_NGRAM = 3
LLM_DRAFT_DESCRIPTIONS = {
    "trimmed": "the target in bfloat16 with its head trimmed to the kept tokens (typsamp.drafts.trimmed_draft)",
    "distil": "a 2-layer Gemma draft on the target's embedding, trimmed head, distilled (typsamp.distil.load_draft)",
}


def read_bandwidth(mib: int = 512, repeats: int = 5) -> dict:
    """The machine's read bandwidth in GB/s, from three kernels over a ``mib`` MiB matrix of
    640 columns (the shape of Gemma's matrices): float32 matrix-vector (``torch.mv``),
    float32 ``sum``, and bfloat16 matrix-vector. Each is the best (shortest) of ``repeats``
    timed calls after a warm-up, so caches never hold the matrix (it is far larger than any
    cache). ``gb_per_s`` is the fastest kernel's: the most this machine was seen to read."""
    mib = checks.integer("mib", mib, low=1)
    out, C = {}, 640
    for name, dtype, op in (("fp32_matvec", torch.float32, "mv"), ("fp32_sum", torch.float32, "sum"),
                            ("bf16_matvec", torch.bfloat16, "mv")):
        rows = mib * 2 ** 20 // (C * torch.tensor([], dtype=dtype).element_size())
        A = torch.randn(rows, C).to(dtype)
        v = torch.randn(C).to(dtype)
        fn = (lambda: torch.mv(A, v)) if op == "mv" else (lambda: A.sum())
        fn()
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = round(A.numel() * A.element_size() / best / 1e9, 2)
        del A
    kernel = max(out, key=out.get)
    return {"gb_per_s": out[kernel], "kernel": f"{kernel} (best of {repeats} after a warm-up, "
                                                f"{mib} MiB, {torch.get_num_threads()} threads)",
            "kernels": out, "bytes": mib * 2 ** 20}


def bytes_per_pass(model, context: int) -> int:
    """Bytes one batch-1, one-token cached pass of a :class:`typsamp.gemma.Gemma` reads:
    every parameter once (the tied embedding is the head's matrix; the one embedding row
    looked up is counted in it) and the keys and values it attends to after ``context``
    positions (local layers the last ``sliding_window``)."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    itemsize = model.model.embed_tokens.weight.element_size()
    keys = sum(context + 1 if i in c.global_layers else min(context + 1, c.sliding_window)
               for i in range(c.n_layer))
    return int(weights + keys * 2 * c.n_kv_head * c.head_dim * itemsize)


def pass_ms(model, context: int, new: int, batch: int = 1, repeats: int = 5) -> float:
    """Median time (ms) of one cached pass of ``new`` tokens per row after ``context``
    positions, ``batch`` rows; the prefill runs once and the timed passes rewrite the
    same slots (the cache is ``context + new`` long)."""
    model.setup_cache(batch, context + new)
    offsets = torch.full((batch,), context, dtype=torch.long)
    step = torch.zeros(batch, new, dtype=torch.long)
    with torch.inference_mode():
        model(torch.zeros(batch, context, dtype=torch.long), torch.zeros(batch, dtype=torch.long), span=context)
        return timed(lambda: model(step, offsets, span=context + new), "cpu", repeats, min_seconds=0.0)


def llm_prompts(tokenizer, count: int, length: int, categories=LLM_CATEGORIES) -> tuple[list[str], torch.Tensor]:
    """``count`` test prompts (round robin over ``categories``, in each the test split's
    order, skipping prompts shorter than ``length`` tokens) as int64 [count, length]: BOS
    and the prompt's last ``length - 1`` tokens, so every row continues its prompt."""
    from typsamp import prompts

    pools = {c: iter(prompts.load(c, "test")) for c in categories}
    names, rows = [], []
    while len(rows) < count:
        progress = False
        for category in categories:
            for p in pools[category]:
                ids = tokenizer(p.text)["input_ids"]
                if len(ids) >= length:
                    names.append(f"{category}/{p.id}")
                    rows.append([ids[0]] + ids[len(ids) - length + 1:])
                    progress = True
                    break
            if len(rows) == count:
                break
        if not progress:
            raise ValueError(f"fewer than {count} test prompts of {categories} have {length} tokens")
    return names, torch.tensor(rows, dtype=torch.long)


def hf_gemma(model, kept: torch.Tensor | None = None):
    """``transformers``' ``Gemma3ForCausalLM`` with the weights of ``model`` (a
    :class:`typsamp.gemma.Gemma`; same dtype, SDPA attention). With ``kept`` (int64 ids),
    its head is trimmed like the engine's drafts: logits over the whole vocabulary, -inf
    outside ``kept``, computed from those rows of the embedding only."""
    from typsamp import hf

    transformers = hf.transformers
    config = hf.gemma3_config(model.config)
    config._attn_implementation = "sdpa"
    weight = model.model.embed_tokens.weight
    peer = transformers.Gemma3ForCausalLM(config).to(dtype=weight.dtype)
    missing, unexpected = peer.load_state_dict(model.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"Gemma conversion mismatch: missing {missing}, unexpected {unexpected}")
    peer.tie_weights()
    if kept is not None:
        peer.lm_head = _KeptHead(weight, kept)
    return peer.eval()


class _KeptHead(torch.nn.Module):
    """A head over the rows ``kept`` of ``weight`` only, scattered into logits over the
    whole vocabulary with -inf elsewhere (what the engine's trimmed drafts return)."""

    def __init__(self, weight: torch.Tensor, kept: torch.Tensor):
        super().__init__()
        self.vocab_size = weight.shape[0]
        self.register_buffer("kept", kept.to(torch.long), persistent=False)
        self.register_buffer("rows", weight.detach()[kept].clone(), persistent=False)

    @property
    def weight(self):                 # transformers reads the head's size from its weight
        return self.rows

    def forward(self, h):
        out = h.new_full((*h.shape[:-1], self.vocab_size), -math.inf)
        out[..., self.kept] = torch.nn.functional.linear(h, self.rows)
        return out


def _hf_generate(peer, prompt: torch.Tensor, tokens: int, temperature: float, seed: int, *,
                 assistant=None, gamma: int | None = None, lookup: int | None = None) -> tuple[float, int, torch.Tensor]:
    """``peer.generate`` (``transformers``) of ``tokens`` new tokens: plain, assisted by
    ``assistant`` proposing a constant ``gamma`` tokens, or prompt lookup of ``gamma``
    tokens matching up to ``lookup``-grams. Temperature only (top-k, top-p off). Returns
    (seconds, new tokens, tokens [B, tokens])."""
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, top_k=0, top_p=1.0,
                  pad_token_id=peer.config.pad_token_id, attention_mask=torch.ones_like(prompt))
    if temperature == 0:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=temperature)
    if assistant is not None:
        config = assistant.generation_config
        config.num_assistant_tokens = gamma
        config.num_assistant_tokens_schedule = "constant"
        config.assistant_confidence_threshold = 0.0
        kwargs["assistant_model"] = assistant
    if lookup is not None:
        kwargs.update(prompt_lookup_num_tokens=gamma, max_matching_ngram_size=lookup)
    from typsamp import hf

    hf_logging = hf.transformers.logging
    # transformers' assisted generation warns, from inside its own code, that the
    # assistant's generate gets a generation config beside generation arguments, and that
    # a min-length processor is passed twice; neither is ours to change, and neither
    # changes the result, so its warnings are muted for the call.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            out = peer.generate(prompt, **kwargs)
        seconds = time.perf_counter() - start
    finally:
        hf_logging.set_verbosity(verbosity)
    new = out[:, prompt.shape[1]:]
    return seconds, new.numel(), new


def _draft_gemma(draft):
    """(the typsamp Gemma a draft runs, its kept ids) for building transformers' assistant."""
    from typsamp import gemma

    nets = [getattr(draft, name, None) for name in ("model", "body")]
    nets = [net for net in nets if isinstance(net, gemma.Gemma)]
    kept = getattr(draft, "kept", None)
    if not nets or not isinstance(kept, torch.Tensor):
        raise TypeError(f"draft {type(draft).__name__} exposes no Gemma (`.model` or `.body`) and `.kept` (ids)")
    return nets[0], kept


def load_llm_drafts(dtype: torch.dtype = torch.bfloat16, target=None) -> dict:
    """The drafts of :data:`LLM_DRAFTS`: name -> a draft model (engine interface, with
    ``.model`` and ``.kept``), a proposer factory (prompt lookup), or the reason (str) it
    is not available (its module or weights are missing). DISTIL's draft shares the
    embedding of ``target`` when it has the draft's dtype."""
    out = {}
    for name in LLM_DRAFTS:
        try:
            if name == "trimmed":
                from typsamp import drafts
                out[name] = drafts.trimmed_draft(dtype=dtype)
            elif name == "distil":
                from typsamp import distil
                same = target is not None and target.model.embed_tokens.weight.dtype == dtype
                out[name] = distil.load_draft(dtype=dtype, target=target if same else None)
            else:
                from typsamp import drafts
                out[name] = drafts.PromptLookup
        except Exception as error:                       # reported in the JSON, never hidden
            out[name] = f"{type(error).__name__}: {error}"
    return out


def _sig(x: float, digits: int = 5) -> float:
    """``x`` rounded to ``digits`` significant digits (the JSON's numbers)."""
    return float(f"{x:.{digits}g}")


def _best_gamma(alpha: float, c: float, ratios: dict[int, float], gammas) -> int:
    """The gamma in ``gammas`` that maximises expected tokens per unit of time, from the
    measured ``alpha``, draft cost ``c`` and verification pass ratios (gamma + 1 positions
    against 1): E[tokens](alpha, gamma) / (gamma c + ratio(gamma + 1))."""
    def value(g):
        return float(speculative.expected_tokens(min(alpha, 1.0), g)) / (g * c + ratios[g + 1])

    return max(gammas, key=value)


def bench_llm(targets: dict, tokenizer=None, *, drafts: dict | None = None, prompt_rows=None,
              batch_rows=None, prompt_names=None, settings: dict | None = None,
              spec_dtype: str = "bfloat16", peer: bool = True, progress: bool = True) -> dict:
    """Gemma 3 270M decoding on this machine: the bandwidth limit, our engine against
    ``transformers``, the pass-cost curve, speculative decoding with each draft.

    ``targets``: dtype name ("float32", "bfloat16") -> a :class:`typsamp.gemma.Gemma` or
    a zero-argument loader of one (loaded in turn and dropped after its part, to bound
    memory). ``drafts``: name -> a draft model (engine interface with ``.model`` and
    ``.kept``), a proposer class (prompt lookup: called as ``cls(ngram=LOOKUP_NGRAM)``), or a str
    saying why it is missing (default :func:`load_llm_drafts`). Speculative decoding runs
    on the ``spec_dtype`` target. Prompts: ``prompt_rows`` [P, L] and ``batch_rows``
    [batch, L'] (default :func:`llm_prompts` with ``tokenizer``). ``settings`` overrides
    :data:`LLM_SETTINGS`.
    """
    from typsamp import generate

    s = {**LLM_SETTINGS, **(settings or {})}
    unknown = set(s) - set(LLM_SETTINGS)
    if unknown:
        raise ValueError(f"`settings` has unknown keys {sorted(unknown)}; use {sorted(LLM_SETTINGS)}")
    if spec_dtype not in targets:
        raise ValueError(f"`spec_dtype` {spec_dtype!r} is not one of the targets {sorted(targets)}")
    clock = time.perf_counter()
    seconds = {}
    where = provenance.machine("cpu")                 # at the start: the load average before the run
    if prompt_rows is None:
        prompt_names, prompt_rows = llm_prompts(tokenizer, s["prompts"], s["prompt_tokens"])
        _, batch_rows = llm_prompts(tokenizer, s["batch"], s["batch_prompt_tokens"])
    prompt_list = [prompt_rows[i:i + 1] for i in range(prompt_rows.shape[0])]
    P = prompt_rows.shape[1]
    context = P + s["tokens"] // 2
    seed, tokens, short = s["seed"], s["tokens"], s["short"]
    if peer:
        from typsamp import hf

        hf.transformers.logging.set_verbosity_error()

    t = time.perf_counter()
    bandwidth = read_bandwidth(s["bandwidth_mib"])
    seconds["bandwidth"] = time.perf_counter() - t
    result = {"bandwidth": bandwidth, "bytes_per_pass": {}, "limit": {}, "pass_cost": {},
              "autoregressive": [], "speculative_target": spec_dtype, "drafts": {}, "speculative": []}
    ar_rate = {}                                        # (dtype, T) -> batch-1 tokens/s
    bar = tqdm(total=len(targets) + 1, desc="llm bench", disable=not progress)

    def ours_ar(model, rows, T):
        def run(n):
            out = generate.autoregressive(model, rows, n, warp=sampling.Warp(temperature=T), seed=seed)
            return out.wall_time, int(out.lengths.sum()), out
        return run

    def theirs(peer_model, rows, T, **kw):
        def run(n):
            return _hf_generate(peer_model, rows, n, T, seed, **kw)
        return run

    def over_prompts(make_run, rows_list):
        # A full-length warm-up first (inside _decode_rate): on the CPU, oneDNN builds (and
        # caches) a kernel for every new shape, and every decode step's span is a new
        # shape; a warm-up of a few tokens left those one-time costs inside the timed runs
        # (in bfloat16, rates that were off by orders of magnitude). Prompts share their
        # length, so one full-length run covers the shapes of all of them.
        return _decode_rate(make_run, rows_list, tokens, short)

    spec_model = None
    for dtype_name, target in targets.items():
        t = time.perf_counter()
        model = target() if callable(target) and not isinstance(target, torch.nn.Module) else target
        model.clear_cache()
        nbytes = bytes_per_pass(model, context)
        result["bytes_per_pass"][dtype_name] = nbytes
        limit_ms = 1e3 * nbytes / (bandwidth["gb_per_s"] * 1e9)
        result["limit"][dtype_name] = {"ms_per_token": _sig(limit_ms), "tokens_per_s": _sig(1e3 / limit_ms)}
        costs = [pass_ms(model, context, k) for k in range(1, s["positions"] + 1)]
        result["pass_cost"][dtype_name] = {"positions": list(range(1, s["positions"] + 1)),
                                           "ms": [_sig(x) for x in costs],
                                           "ratio": [_sig(x / costs[0]) for x in costs]}
        peer_model = hf_gemma(model) if peer else None
        temps = s["temperatures"] if dtype_name == spec_dtype else (0.0,)
        cells = [(1, T) for T in temps] + [(batch_rows.shape[0], 0.0)]
        for B, T in cells:
            rows_list = prompt_list if B == 1 else [batch_rows]
            generate.autoregressive(model, rows_list[0], 2, seed=seed)            # warm-up
            rate, outs = over_prompts(lambda rows: ours_ar(model, rows, T), rows_list)
            row = {"dtype": dtype_name, "batch": B, "temperature": T, "tokens_per_s": _sig(rate),
                   "ms_per_token": _sig(1e3 / rate)}
            if B == 1:
                ar_rate[(dtype_name, T)] = rate
                row["fraction_of_limit"] = _sig(limit_ms / (1e3 / rate))
            if peer and T == 0.0:
                _hf_generate(peer_model, rows_list[0], 2, T, seed)                  # warm-up
                peer_rate, peer_outs = over_prompts(lambda rows: theirs(peer_model, rows, T), rows_list)
                row["peer_tokens_per_s"] = _sig(peer_rate)
                row["ours_over_peer"] = _sig(rate / peer_rate)
                row["peer_identical_tokens"] = all(torch.equal(o.tokens, p) for o, p in zip(outs, peer_outs))
            result["autoregressive"].append(row)
        seconds[dtype_name] = time.perf_counter() - t
        bar.update()
        if dtype_name == spec_dtype:
            spec_model, spec_peer, spec_costs = model, peer_model, costs
        else:
            del model, peer_model

    # Speculative decoding on the spec_dtype target, each draft at each temperature.
    t = time.perf_counter()
    drafts = load_llm_drafts(target=spec_model) if drafts is None else drafts
    ratios = {k + 1: x / spec_costs[0] for k, x in enumerate(spec_costs)}
    gammas = [g for g in s["gammas"] if g + 1 <= s["positions"]]
    for name, draft in drafts.items():
        entry = {"available": not isinstance(draft, str)}
        result["drafts"][name] = entry
        if isinstance(draft, str):
            entry["why"] = draft
            continue
        lookup = isinstance(draft, type)
        if lookup:
            entry.update(description="prompt lookup (n-gram match of the row's own text, n = 3): no model",
                         pass_ms=0.0, c=0.0)
            c = 0.0
            assistant = None
        else:
            draft_ms = pass_ms(draft, context, 1)
            c = draft_ms / spec_costs[0]
            entry.update(description=LLM_DRAFT_DESCRIPTIONS.get(name, type(draft).__name__),
                         pass_ms=_sig(draft_ms), c=_sig(c))
            assistant = None
            if peer:
                try:
                    assistant = hf_gemma(*_draft_gemma(draft))
                except TypeError as error:
                    entry["peer_why"] = str(error)
        for T in s["temperatures"]:
            greedy = T == 0.0 or lookup
            method = method_label(speculative.RejectionSampling(), greedy)

            def spec(g):
                def make(rows):
                    def run(n):
                        proposer = draft(ngram=LOOKUP_NGRAM) if lookup else generate.DraftModel(draft, greedy=greedy)
                        out = generate.speculative(spec_model, proposer, rows, n, gamma=g,
                                                   rule=speculative.RejectionSampling(),
                                                   warp=sampling.Warp(temperature=T), seed=seed)
                        return out.wall_time, int(out.lengths.sum()), out
                    return run
                return make

            search, runs = {}, {}
            g = s["first_gamma"]
            spec(g)(prompt_list[0])(2)                                              # warm-up
            while g not in search and len(search) < s["gamma_tries"]:
                search[g], runs[g] = over_prompts(spec(g), prompt_list)
                alpha = sum(o.accepted for o in runs[g]) / max(sum(o.examined for o in runs[g]), 1)
                g = _best_gamma(alpha, c, ratios, gammas)
            g = max(search, key=search.get)
            outs = runs[g]
            rate = search[g]
            alpha = sum(o.accepted for o in outs) / max(sum(o.examined for o in outs), 1)
            steps = sum(o.steps for o in outs)
            n_tokens = sum(int(o.lengths.sum()) for o in outs)
            base = ar_rate[(spec_dtype, T)]
            predicted = float(speculative.speedup(alpha, g, c))
            predicted_costs = float(speculative.expected_tokens(alpha, g)) / (g * c + ratios[g + 1])
            row = {"draft": name, "temperature": T, "method": method, "gamma": g,
                   "gamma_search": {str(k): _sig(v) for k, v in sorted(search.items())},
                   "tokens_per_s": _sig(rate), "ms_per_token": _sig(1e3 / rate),
                   "alpha": _sig(alpha), "c": _sig(c), "tokens_per_step": _sig(n_tokens / steps),
                   "autoregressive_tokens_per_s": _sig(base), "speedup_measured": _sig(rate / base),
                   "speedup_predicted": _sig(predicted),
                   "speedup_predicted_measured_costs": _sig(predicted_costs),
                   "measured_over_predicted": _sig(rate / base / predicted)}
            if peer and (lookup or assistant is not None):
                kw = {"lookup": LOOKUP_NGRAM, "gamma": g} if lookup else {"assistant": assistant, "gamma": g}
                _hf_generate(spec_peer, prompt_list[0], 2, T, seed, **kw)           # warm-up
                peer_rate, _ = over_prompts(lambda rows: theirs(spec_peer, rows, T, **kw), prompt_list)
                row["peer_tokens_per_s"] = _sig(peer_rate)
                row["ours_over_peer"] = _sig(rate / peer_rate)
            result["speculative"].append(row)
        del assistant
    seconds["speculative"] = time.perf_counter() - t
    bar.update()
    bar.close()
    result["goals"] = _llm_goals(result, spec_dtype)
    seconds["total"] = time.perf_counter() - clock
    return {
        "benchmark": "Gemma 3 270M on the CPU: bandwidth limit, our engine against transformers, "
                     "pass cost over positions, speculative decoding with each draft",
        "command": f"python -m typsamp.bench llm --threads {torch.get_num_threads()}",
        "method": (
            f"prompts: {len(prompt_list)} test prompts (batch 1) and {batch_rows.shape[0]} (batch "
            f"{batch_rows.shape[0]}), BOS + the prompt's last tokens ({P} and {batch_rows.shape[1]} tokens), "
            f"round robin over {', '.join(LLM_CATEGORIES)}. tokens/s = decoding rate without the prefill: "
            f"(tokens of a {tokens}-token run - those of a {short}-token run) / (time difference), summed "
            "over prompts, after one full-length warm-up run (every decode shape built once); batch 8 counts every row's tokens. Limit = bytes_per_pass / "
            "bandwidth.gb_per_s (fastest read kernel). pass_cost: median of 5 cached passes of k new "
            f"tokens after {context} positions, batch 1; ratio = ms / ms at k = 1. c = the draft's "
            "one-token pass / the target's. Speculative rows: the exact rule speculative.RejectionSampling() "
            "on the speculative_target; drafts sampled from q at T > 0 (rejection_sampled), greedy at T = 0 "
            "and deterministic for prompt lookup (rejection_greedy); gamma: alpha measured at first_gamma, "
            "then gamma chosen among gammas maximising E[tokens](alpha, gamma) / (gamma c + "
            "ratio(gamma + 1)) and measured in turn (at most gamma_tries gammas), the fastest measured kept "
            "(gamma_search). speedup_predicted = Leviathan "
            "et al. Thm 3.8 from measured alpha, gamma, c. Peer: transformers Gemma3ForCausalLM (SDPA) "
            "on the same weights and dtype, generate() with top_k 0, top_p 1; assisted generation with "
            "the same draft as a Gemma3ForCausalLM whose head is the kept rows scattered into -inf "
            "(num_assistant_tokens = gamma, constant schedule, confidence threshold 0), prompt lookup "
            "with prompt_lookup_num_tokens = gamma, max_matching_ngram_size 3. peer_identical_tokens "
            "compares greedy tokens; in bfloat16 the two implementations round differently, so rows "
            "may part at near-ties."),
        "machine": where,
        "versions": provenance.versions(),
        "settings": {**{k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
                     "threads": torch.get_num_threads(), "prompts": prompt_names,
                     "prompt_count": len(prompt_list)},
        **result,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def _run_grid(flags: list[str], record: dict | None, threads: int | None) -> dict:
    """Chapter 11's grid (``python -m typsamp.llm_grid``) in a child process, at the γ
    that ``record`` (this run's chapter 9 part) found best; returns its JSON record. A
    child, not an import: :mod:`typsamp.llm_grid` builds on this module, and the grid
    starts with a fresh process's memory after chapter 9's models are gone."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "grid.json"
        command = [sys.executable, "-m", "typsamp.llm_grid", *flags, "--out", str(out),
                   "--threads", str(threads or torch.get_num_threads())]
        if record is not None:
            best = Path(tmp) / "best.json"
            best.write_text(json.dumps({"speculative": record["speculative"]}))
            command += ["--best-from", str(best)]
        subprocess.run(command, check=True)
        return json.loads(out.read_text())


def _decode_rate(make_run, rows_list, tokens: int, short: int | None, *, warm=None,
                 return_warmup: bool = False):
    """Summed decode rate over prompts, after one full-length warm-up run (see
    :func:`bench_llm`): with ``short`` tokens, total (long − short) tokens / total time
    difference of a long and a short run per prompt; with ``short=None``, one run per
    prompt, total tokens decoded after the prefill / total time after it (the Generation's
    ``decoded_tokens`` and ``wall_time − prefill_time``, which the engine records and
    transformers' generate does not). ``make_run(rows)`` returns ``run(n) -> (seconds,
    tokens, Generation)``. ``warm``: a callable that runs the warm-up instead (of the same
    shapes; its return value is kept), default ``make_run(rows_list[0])(tokens)``. Returns
    (tokens/s, the long runs' outputs), and the warm-up's result with ``return_warmup``."""
    dn = dt = 0.0
    outs = []
    warmed = make_run(rows_list[0])(tokens) if warm is None else warm()
    for rows in rows_list:
        run = make_run(rows)
        if short is None:
            _, _, out = run(tokens)
            if out.prefill_time is None or out.decoded_tokens is None:
                raise ValueError("the run keeps no prefill clock (transformers' generate does not): "
                                 "time it with a `short` run")
            if out.decoded_tokens < 1 or out.wall_time <= out.prefill_time:
                raise ValueError(f"the run decoded nothing after its prefill ({out.decoded_tokens} tokens in "
                                 f"{out.wall_time - out.prefill_time:.3g} s; did every row end at its first token?)")
            dn, dt = dn + out.decoded_tokens, dt + out.wall_time - out.prefill_time
        else:
            t_s, n_s, _ = run(short)
            t_l, n_l, out = run(tokens)
            dn, dt = dn + n_l - n_s, dt + t_l - t_s
        outs.append(out)
    rate = dn / max(dt, 1e-9)
    return (rate, outs, warmed) if return_warmup else (rate, outs)


#: Trees ``bench medusa`` times by default (names of :func:`typsamp.tree_acceptance.named_tree`).
BENCH_TREES = ("chain3", "small", "mc8", "mc16", "mc32", "mc_sim_7b_63")

#: Settings of ``python -m typsamp.bench medusa`` (chapter 10); tests pass smaller ones.
MEDUSA_SETTINGS = {
    "tokens": 48,
    "short": 6,
    "prompts": 2,
    "prompt_tokens": 64,
    "temperatures": (0.0, 0.5, 0.7, 1.0),
    "rules": ("typical", "exact"),
    "repeats": 5,
    "seed": 0,
}


def tree_pass_ms(model, spec, context: int, repeats: int = 5) -> float:
    """Median time (ms) of one batch-1 tree pass: the last committed token and the
    ``spec.n_nodes`` candidates of a :class:`typsamp.tree.TreeSpec` after ``context``
    cached positions, with the tree's positions and ancestor mask (as the engine scores)."""
    from typsamp import generate

    layout = generate.tree(spec.parents)
    T = spec.n_nodes + 1
    model.setup_cache(1, context + T)
    offsets = torch.full((1,), context, dtype=torch.long)
    step = torch.zeros(1, T, dtype=torch.long)
    with torch.inference_mode():
        model(torch.zeros(1, context, dtype=torch.long), torch.zeros(1, dtype=torch.long), span=context)
        return timed(lambda: model(step, offsets, span=context + T, depths=layout.depths,
                                   ancestors=layout.ancestors), "cpu", repeats, min_seconds=0.0)


def proposal_ms(proposer, target, context: int, repeats: int = 5) -> float:
    """Median time (ms) of one batch-1 ``proposer.propose`` after ``context`` committed
    tokens, for a proposer that reads the target's hidden states (Medusa's heads: the
    heads, their top-k and the candidates), fed the target's real prefill states."""
    prompt = torch.zeros(1, context, dtype=torch.long)
    lengths = torch.full((1,), context, dtype=torch.long)
    with torch.inference_mode():
        proposer.start(prompt, lengths, max_new_tokens=8, gamma=1, warp=sampling.Warp())
        target.setup_cache(1, context)
        _, hidden = target(prompt[:, :-1], torch.zeros(1, dtype=torch.long), span=context - 1, return_hidden=True)
        proposer.observe(hidden, lengths - 2)
        return timed(lambda: proposer.propose(prompt, lengths, context, None), "cpu", repeats, min_seconds=0.0)


def bench_medusa(target, heads, trees: dict, prompt_rows: torch.Tensor, *, settings: dict | None = None,
                 prompt_names=None, reference=None, progress: bool = True) -> dict:
    """Medusa's heads on Gemma 3 270M: autoregressive decoding against tree decoding with
    typical acceptance (Medusa's rule as shipped) and the exact tree rule (recursive
    rejection), for each tree in ``trees`` (name -> :class:`typsamp.tree.TreeSpec`) and each
    temperature, batch 1, on ``target`` (the model the heads read). Also the cost of a
    tree pass against a one-token pass, and of the heads' proposal, per tree.

    ``reference``: None, or another model of the same weights (the float32 target, when
    ``target`` is bfloat16) whose autoregressive rate is also measured at each temperature:
    the speed-ups are then also stated over the faster of the two autoregressive decoders
    (``speedup_over_best_autoregressive``), so a slow baseline cannot flatter them."""
    from typsamp import generate, medusa, tree_acceptance

    s = {**MEDUSA_SETTINGS, **(settings or {})}
    unknown = set(s) - set(MEDUSA_SETTINGS)
    if unknown:
        raise ValueError(f"`settings` has unknown keys {sorted(unknown)}; use {sorted(MEDUSA_SETTINGS)}")
    if not trees:
        raise ValueError("`trees` is empty")
    clock = time.perf_counter()
    where = provenance.machine("cpu")
    prompt_list = [prompt_rows[i:i + 1] for i in range(prompt_rows.shape[0])]
    P = prompt_rows.shape[1]
    context = P + s["tokens"] // 2
    seed, tokens, short = s["seed"], s["tokens"], s["short"]
    cells = len(s["temperatures"]) * (1 + len(trees) * len(s["rules"]))
    bar = tqdm(total=cells, desc="medusa bench", disable=not progress)
    one_ms = pass_ms(target, context, 1, repeats=s["repeats"])
    costs = {}
    for name, spec in trees.items():
        proposer = medusa.MedusaProposer(heads, spec)
        costs[name] = {"nodes": spec.n_nodes, "depth": spec.max_depth,
                       "pass_ms": _sig(tree_pass_ms(target, spec, context, s["repeats"])),
                       "heads_ms": _sig(proposal_ms(proposer, target, context, s["repeats"]))}
        costs[name]["pass_ratio"] = _sig(costs[name]["pass_ms"] / one_ms)
        costs[name]["heads_ratio"] = _sig(costs[name]["heads_ms"] / one_ms)
    ar, rows = {}, []
    def ar_runs(model, warp):
        def make(r):
            def run(n):
                out = generate.autoregressive(model, r, n, warp=warp, seed=seed)
                return out.wall_time, int(out.lengths.sum()), out
            return run
        return make

    for T in s["temperatures"]:
        warp = sampling.Warp(temperature=T)
        best = 0.0
        for model in (target,) if reference is None else (target, reference):
            rate, _ = _decode_rate(ar_runs(model, warp), prompt_list, tokens, short)
            row = {"method": "autoregressive", "temperature": T, "tokens_per_s": _sig(rate),
                   "ms_per_token": _sig(1e3 / rate), "dtype": str(model.model.embed_tokens.weight.dtype)}
            if model is target:
                ar[T] = rate
            else:
                row["reference"] = True
            rows.append(row)
            best = max(best, rate)
        bar.update()
        for name, spec in trees.items():
            for rule_name in s["rules"]:
                rule = tree_acceptance.rule_for(rule_name)

                def spec_run(r):
                    def run(n):
                        out = generate.speculative(target, medusa.MedusaProposer(heads, spec), r, n, rule=rule,
                                                   warp=warp, seed=seed)
                        return out.wall_time, int(out.lengths.sum()), out
                    return run
                rate, outs = _decode_rate(spec_run, prompt_list, tokens, short)
                steps = sum(o.steps for o in outs)
                per_step = sum(int(o.lengths.sum()) for o in outs) / max(steps, 1)
                c = costs[name]
                predicted = per_step / (c["pass_ratio"] + c["heads_ratio"])
                rows.append({"method": rule_name, "tree": name, "temperature": T, "tokens_per_s": _sig(rate),
                             "ms_per_token": _sig(1e3 / rate), "tokens_per_step": _sig(per_step),
                             "speedup_measured": _sig(rate / ar[T]), "speedup_predicted": _sig(predicted),
                             "measured_over_predicted": _sig(rate / ar[T] / predicted),
                             "speedup_over_best_autoregressive": _sig(rate / best)})
                bar.update()
    bar.close()
    goals = _medusa_goals(rows)
    return {
        "benchmark": "Medusa heads on Gemma 3 270M on the CPU: typical acceptance and the exact tree rule "
                     "against autoregressive decoding, per tree and temperature",
        "command": f"python -m typsamp.bench medusa --threads {torch.get_num_threads()}",
        "method": (f"batch 1, {len(prompt_list)} test prompts of {P} tokens (BOS + their last tokens), "
                   f"tokens/s = (tokens of a {tokens}-token run - those of a {short}-token run) / time difference, "
                   "summed over prompts, after a full-length warm-up; target "
                   f"{target.model.embed_tokens.weight.dtype}; typical = TypicalAcceptance(0.09, 0.3, "
                   "extra='greedy', entropy='medusa') (Medusa as shipped), exact = RejectionSampling() on the "
                   "tree (recursive rejection over deterministic children). pass_ms: median of "
                   f"{s['repeats']} tree passes (last token + nodes, tree mask) after {context} positions; "
                   "heads_ms: median time of one proposal (heads + top-k + candidates); ratios over a "
                   "one-token pass. speedup_predicted = tokens_per_step / (pass_ratio + heads_ratio)."),
        "machine": where,
        "versions": provenance.versions(),
        "settings": {**{k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
                     "threads": torch.get_num_threads(), "prompts": prompt_names},
        "one_token_pass_ms": _sig(one_ms),
        "target_dtype": str(target.model.embed_tokens.weight.dtype),
        "trees": {name: {**costs[name], "choices": [list(c) for c in spec.choices]} for name, spec in trees.items()},
        "heads": getattr(heads, "record", None),
        "results": rows,
        "goals": goals,
        "seconds": round(time.perf_counter() - clock, 1),
    }


def _medusa_goals(rows: list[dict]) -> dict:
    """Issue 13's speed goal: typical acceptance at T = 0.7 at least 2x autoregressive (best
    tree), and the exact rule's best speed-up beside it."""
    def best(method, T):
        cells = [r for r in rows if r["method"] == method and r["temperature"] == T]
        return max(cells, key=lambda r: r["speedup_measured"]) if cells else None
    out = {}
    typ, ex = best("typical", 0.7), best("exact", 0.7)
    if typ is not None:
        out["typical_t07_speedup"] = typ["speedup_measured"]
        out["typical_t07_tree"] = typ["tree"]
        out["typical_t07_at_least_2x"] = typ["speedup_measured"] >= 2.0
    if ex is not None:
        out["exact_t07_speedup"] = ex["speedup_measured"]
        out["exact_t07_tree"] = ex["tree"]
    return out


def _llm_goals(result: dict, spec_dtype: str) -> dict:
    """Issue 12's goals, each {met, value, detail}, computed from the measurements above."""
    goals = {}
    ar = [r for r in result["autoregressive"] if r["batch"] == 1]
    best = max(ar, key=lambda r: r["fraction_of_limit"], default=None)
    goals["ar_within_15pct_of_limit"] = {
        "met": best is not None and best["fraction_of_limit"] >= 1 / 1.15,
        "value": None if best is None else best["fraction_of_limit"],
        "detail": "no batch-1 row" if best is None else
        f"best batch-1 autoregressive: {best['dtype']} at T={best['temperature']}, "
        f"{best['fraction_of_limit']:.0%} of the bandwidth limit (within 15% means >= {1 / 1.15:.0%})"}
    peers = [r for r in result["autoregressive"] if "ours_over_peer" in r]
    goals["ar_faster_than_transformers"] = {
        "met": bool(peers) and all(r["ours_over_peer"] > 1 for r in peers),
        "value": min((r["ours_over_peer"] for r in peers), default=None),
        "detail": "min ours/transformers.generate over " + ", ".join(
            f"{r['dtype']} batch {r['batch']}: {r['ours_over_peer']:.2f}" for r in peers)}
    spec = result["speculative"]
    at07 = [r for r in spec if r["temperature"] == 0.7]
    top = max(at07, key=lambda r: r["speedup_measured"], default=None)
    goals["speculative_2x_at_T07"] = {
        "met": top is not None and top["speedup_measured"] >= 2.0,
        "value": None if top is None else top["speedup_measured"],
        "detail": "no draft ran" if top is None else
        f"best at T=0.7: {top['draft']} (gamma {top['gamma']}) {top['speedup_measured']:.2f}x our "
        f"{spec_dtype} autoregressive"}
    faster_all_t = sorted({r["draft"] for r in spec} - {r["draft"] for r in spec if r["speedup_measured"] <= 1})
    goals["speculative_faster_at_every_T"] = {
        "met": bool(faster_all_t), "value": faster_all_t,
        "detail": "drafts faster than autoregressive at every temperature measured"}
    goals["measured_over_predicted_ge_085"] = {
        "met": top is not None and top["measured_over_predicted"] >= 0.85,
        "value": None if top is None else top["measured_over_predicted"],
        "detail": "measured/predicted of the best T=0.7 row"}
    with_peer = [r for r in spec if "ours_over_peer" in r]
    goals["faster_than_assisted"] = {
        "met": bool(with_peer) and all(r["ours_over_peer"] > 1 for r in with_peer),
        "value": min((r["ours_over_peer"] for r in with_peer), default=None),
        "detail": "min ours/transformers over " + (", ".join(
            f"{r['draft']} T={r['temperature']}: {r['ours_over_peer']:.2f}" for r in with_peer) or "no row")}
    return goals


# ---------------------------------------------------------------------------------------
# make gpu-check

#: A greedy (T = 0) token that differs between two devices counts as a float32 near-tie,
#: not an error, when the target's two best logits there are closer than this.
TIE_MARGIN = 1e-3
#: Largest |α_cpu - α_cuda| / SE accepted at T > 0.
MAX_Z = 4.0


class NoCUDAError(SystemExit):
    """Raised by :func:`require_cuda` where no CUDA device is available (exit status 1, the message on stderr)."""


def require_cuda() -> None:
    """Fail loudly unless a CUDA device is available: ``make gpu-check`` never skips."""
    if not torch.cuda.is_available():
        raise NoCUDAError(
            "make gpu-check: no CUDA device is available (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, built for CUDA {torch.version.cuda}). The GPU check runs the CUDA "
            "tests, every engine path on cuda against the CPU, and the CUDA benchmarks; it must run on a "
            "CUDA machine and does not skip.")


def _cuda_tests(progress: bool = True) -> dict:
    """Every test whose name mentions cuda, with TYPSAMP_REQUIRE_CUDA=1: a skip is a failure."""
    tests = ROOT / "tests"
    if not tests.is_dir():
        return {"ok": False, "detail": f"no tests folder at {tests}: run the GPU check from a checkout"}
    command = [sys.executable, "-m", "pytest", str(tests), "-k", "cuda", "-p", "no:cacheprovider", "-q", "-rA"]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "TYPSAMP_REQUIRE_CUDA": "1"},
                            capture_output=True, text=True)
    if progress:
        print(result.stdout[-6000:], result.stderr[-2000:], sep="\n")
    lines = result.stdout.strip().splitlines()
    summary = lines[-1] if lines else result.stderr.strip()[-300:]
    if result.returncode == 5:
        return {"ok": False, "detail": "no CUDA tests were collected (pytest -k cuda found none)"}
    return {"ok": result.returncode == 0, "detail": summary, "command": " ".join(command[1:])}


def _margin(model, prefix: torch.Tensor) -> float:
    """The gap between the target's two best logits after ``prefix`` (1-D)."""
    top = stats.teacher_forced_logits(model, prefix[None].to(model.transformer.wte.weight.device))[0, -1]
    best = top.double().topk(2).values
    return float(best[0] - best[1])


def _same_greedy_tokens(a, b, prompts: list[torch.Tensor], model) -> tuple[bool, str]:
    """Whether two T = 0 runs emit the same tokens, forgiving a first difference at a
    float32 near-tie of the target (margin < TIE_MARGIN), after which rows may part."""
    ta, tb = a.tokens.cpu(), b.tokens.cpu()
    if torch.equal(ta, tb):
        return True, "identical tokens"
    notes, ok = [], True
    for row in (ta != tb).any(dim=1).nonzero().flatten().tolist():
        j = int((ta[row] != tb[row]).nonzero()[0])
        prefix = torch.cat([prompts[row].cpu(), ta[row, :j]])
        margin = _margin(model, prefix)
        tie = margin < TIE_MARGIN
        ok &= tie
        notes.append(f"row {row} parts at token {j} (target logit margin {margin:.2e}: "
                     f"{'a float32 near-tie' if tie else 'NOT a tie'})")
    return ok, "; ".join(notes)


def compare_devices(device: str = "cuda", reference: str = "cpu", tokens: int = 64, prompts: int = 8,
                    seed: int = 0, gamma: int = 4, progress: bool = True) -> list[dict]:
    """Every engine path on ``device`` against the same run on ``reference``, on the
    committed models in float32; one row per (case, method), each with ``ok`` and ``detail``.

    For each method (autoregressive and every :data:`METHODS` entry, γ = ``gamma``),
    ``prompts`` held-out prompts decode ``tokens`` tokens as one batch on both devices,
    with per-row seeds (the same random numbers on both, :class:`typsamp.sampling.RowSeeds`):

    * T = 0, equal prompts, and T = 0, ragged prompts with the newline as end token:
      the tokens must be identical (a first difference is forgiven only where the
      target's two best logits lie within :data:`TIE_MARGIN`), and every speculative
      method must emit exactly the autoregressive tokens on ``device`` too;
    * T = 1: α on both devices must agree within :data:`MAX_Z` standard errors
      (:func:`typsamp.stats.row_alpha`, rows as independent units), and for
      autoregressive decoding the token frequencies must pass a two-sample chi-square
      test at level 1e-3. The share of identical rows is reported.
    """
    from typsamp import generate, model as gpt
    from typsamp.data import load_corpus

    tokens = int(tokens)
    corpus = load_corpus()
    devices = (reference, device)
    models = {dev: (gpt.load("target", device=dev), gpt.load("draft", device=dev)) for dev in set(devices)}
    base = _prompts(corpus, prompts, 64, seed, "cpu")
    ragged = [base[b, :64 - 5 * (b % 4)] for b in range(prompts)]
    newline = int(corpus.tokenizer.encode("\n")[0])
    seeds = [seed + b for b in range(prompts)]
    cases = [("T=0", 0.0, False), ("T=0 ragged+eos", 0.0, True), ("T=1", 1.0, False)]
    greedy_on_device = {}                                # case -> the autoregressive run on `device`
    rows = []
    for (case, T, is_ragged), method in tqdm(list(itertools.product(cases, ("autoregressive", *METHODS))),
                                             desc=f"{device} against {reference}", disable=not progress):
        out = []
        for dev in devices:
            target, draft = models[dev]
            prompt = [r.to(dev) for r in ragged] if is_ragged else base.to(dev)
            warp = sampling.Warp(temperature=T)
            eos = newline if is_ragged else None
            if method == "autoregressive":
                out.append(generate.autoregressive(target, prompt, tokens, warp=warp, eos_token_id=eos, seed=seeds))
            else:
                rule, greedy = METHODS[method]
                out.append(generate.speculative(target, generate.DraftModel(draft, greedy=greedy), prompt, tokens,
                                                gamma=gamma, rule=rule, warp=warp, eos_token_id=eos, seed=seeds))
        ref, dut = out
        identical = (ref.tokens.cpu() == dut.tokens.cpu()).all(dim=1).double().mean().item()
        row = {"case": case, "method": method, "temperature": T, "identical_rows": round(identical, 4)}
        row_prompts = ragged if is_ragged else list(base)
        if T == 0:
            ok, detail = _same_greedy_tokens(ref, dut, row_prompts, models[reference][0])
            row.update(ok=ok, detail=detail)
            if method == "autoregressive":
                greedy_on_device[case] = dut
            else:
                same, why = _same_greedy_tokens(greedy_on_device[case], dut, row_prompts, models[device][0])
                row["equals_autoregressive"] = same
                if not same:
                    row["ok"] = False
                    row["detail"] += f"; on {device} it differs from autoregressive: {why}"
        elif method == "autoregressive":
            V = models[reference][0].config.vocab_size
            counts = [torch.bincount(o.tokens.cpu()[o.tokens.cpu() >= 0], minlength=V) for o in out]
            test = stats.chi_square_two_sample(*counts)
            row.update(ok=test.p_value > 1e-3, chi_square=round(test.statistic, 3), dof=test.dof,
                       p_value=test.p_value, detail=f"token frequencies: chi-square p = {test.p_value:.3g}")
        else:
            a, b = (stats.row_alpha(o.accepted_lengths, o.gamma) for o in out)
            se = math.hypot(a.se, b.se)
            z = 0.0 if a.alpha == b.alpha else (abs(a.alpha - b.alpha) / se if se > 0 else math.inf)
            row.update(ok=z <= MAX_Z, alpha_reference=round(a.alpha, 4), alpha_device=round(b.alpha, 4),
                       se=round(se, 4), z=round(z, 3),
                       detail=f"alpha {a.alpha:.4f} ({reference}) vs {b.alpha:.4f} ({device}), {z:.2f} SE apart")
        row["ok"] = bool(row["ok"])
        rows.append(row)
    return rows


def gpu_check(tokens: int = 64, prompts: int = 8, seed: int = 0, gamma: int = 4, run_tests: bool = True,
              progress: bool = True) -> dict:
    """``make gpu-check``: the CUDA tests (a skip counts as a failure), then
    :func:`compare_devices` of ``cuda`` against the CPU. Raises :class:`NoCUDAError`
    at once where CUDA is absent. Returns the report: ``ok``, ``failures``,
    ``cuda_tests``, ``comparisons``, and where it ran (``machine``, ``versions``)."""
    require_cuda()
    report = {"benchmark": "make gpu-check: CUDA tests and every engine path on cuda against the CPU",
              "command": f"python -m typsamp.bench gpucheck --tokens {tokens} --prompts {prompts}",
              "machine": provenance.machine("cuda"), "versions": provenance.versions(),
              "tie_margin": TIE_MARGIN, "max_z": MAX_Z, "failures": []}
    if run_tests:
        report["cuda_tests"] = tests = _cuda_tests(progress)
        if not tests["ok"]:
            report["failures"].append(f"CUDA tests: {tests['detail']}")
    report["comparisons"] = compare_devices("cuda", "cpu", tokens, prompts, seed, gamma, progress)
    report["failures"] += [f"{r['case']} {r['method']}: {r['detail']}" for r in report["comparisons"] if not r["ok"]]
    report["ok"] = not report["failures"]
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m typsamp.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    v = sub.add_parser("verify", help="speculative.verify against verify_reference")
    v.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    v.add_argument("--repeats", type=int, default=5, help="minimum timed calls per cell (default: 5)")
    v.add_argument("--out", type=Path, default=None,
                   help="output JSON (default: notebooks/results/verify_bench[_cuda].json)")
    g = sub.add_parser("generate", help="autoregressive vs speculative decoding on the committed models")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    g.add_argument("--tokens", type=int, default=160,
                   help="new tokens per prompt (default: 160; prompt + tokens + gamma + 1 must fit block_size 256)")
    g.add_argument("--out", type=Path, default=None,
                   help="output JSON (default: notebooks/results/generate_bench[_cuda].json)")
    d = sub.add_parser("decode", help="every rule, T and gamma, against transformers' assisted generation (default)")
    d.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    d.add_argument("--tokens", type=int, default=160, help="new tokens per prompt (default: 160)")
    d.add_argument("--prompts", type=int, default=4, help="batch-1 prompts per cell (default: 4)")
    d.add_argument("--no-peer", action="store_true", help="skip the transformers comparison")
    d.add_argument("--out", type=Path, default=None,
                   help="output JSON (default: notebooks/results/decode_bench[_cuda].json)")
    g.add_argument("--prompts", type=int, default=3, help="prompts (default: 3)")
    c = sub.add_parser("gpucheck", help="make gpu-check: CUDA tests and every engine path on cuda vs the CPU")
    c.add_argument("--tokens", type=int, default=64, help="new tokens per prompt (default: 64)")
    c.add_argument("--prompts", type=int, default=8, help="prompts, decoded as one batch (default: 8)")
    c.add_argument("--no-tests", action="store_true", help="skip running the CUDA tests first")
    c.add_argument("--out", type=Path, default=None, help="report JSON (default: notebooks/results/gpu_check.json)")
    m = sub.add_parser("llm", help="Gemma 3 270M: bandwidth limit, ours vs transformers, pass cost, drafts")
    m.add_argument("--tokens", type=int, default=LLM_SETTINGS["tokens"],
                   help=f"new tokens per timed run (default: {LLM_SETTINGS['tokens']})")
    m.add_argument("--prompts", type=int, default=LLM_SETTINGS["prompts"],
                   help=f"batch-1 test prompts (default: {LLM_SETTINGS['prompts']})")
    m.add_argument("--spec-dtype", default="bfloat16", choices=("float32", "bfloat16"),
                   help="the target of the speculative rows (default: bfloat16)")
    m.add_argument("--no-peer", action="store_true", help="skip the transformers comparisons")
    m.add_argument("--no-grid", action="store_true", help="skip chapter 11's grid (typsamp.llm_grid)")
    m.add_argument("--quick", action="store_true",
                   help="only the grid's --quick cells and pass@1 smoke run (minutes; default out "
                        "_build/llm_bench_quick.json)")
    m.add_argument("--out", type=Path, default=None, help="output JSON (default: notebooks/results/llm_bench.json)")
    e = sub.add_parser("medusa", help="Medusa heads: typical and the exact tree rule against autoregressive")
    e.add_argument("--tokens", type=int, default=MEDUSA_SETTINGS["tokens"],
                   help=f"new tokens per timed run (default: {MEDUSA_SETTINGS['tokens']})")
    e.add_argument("--prompts", type=int, default=MEDUSA_SETTINGS["prompts"],
                   help=f"batch-1 test prompts (default: {MEDUSA_SETTINGS['prompts']})")
    e.add_argument("--trees", default=None, help="comma-separated tree names of typsamp.tree (default: BENCH_TREES)")
    e.add_argument("--out", type=Path, default=None, help="output JSON (default: notebooks/results/medusa_bench.json)")
    for p in (v, g, d, c, m, e):
        p.add_argument("--threads", type=int, default=None,
                       help="torch intra-op threads (default: torch's choice, one per core)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv or ["decode"])          # no sub-command: the decode benchmark
    if args.command == "gpucheck":
        require_cuda()                                    # before anything else: never skip, never write
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.command == "gpucheck":
        report = gpu_check(args.tokens, args.prompts, run_tests=not args.no_tests)
        out = args.out or RESULTS / "gpu_check.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        for row in report["comparisons"]:
            print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['case']:<15} {row['method']:<18} {row['detail']}")
        print(f"wrote {out}")
        if report["failures"]:
            sys.exit("make gpu-check FAILED:\n  " + "\n  ".join(report["failures"]))
        print("make gpu-check: every check passed")
        return

    if args.command == "llm":
        from typsamp import gemma

        if args.quick:
            out = args.out or ROOT / "_build" / "llm_bench_quick.json"
            result = {"grid": _run_grid(["--quick"], None, args.threads)}
        else:
            targets = {"float32": lambda: gemma.load(dtype=torch.float32),
                       "bfloat16": lambda: gemma.load(dtype=torch.bfloat16)}
            result = bench_llm(targets, gemma.load_tokenizer(), spec_dtype=args.spec_dtype, peer=not args.no_peer,
                               settings={"tokens": args.tokens, "prompts": args.prompts})
            for key in ("bandwidth", "bytes_per_pass", "limit", "goals", "seconds"):
                print(key, json.dumps(result[key]))
            for row in result["autoregressive"] + result["speculative"]:
                print("  ".join(f"{k}={v}" for k, v in row.items() if k != "gamma_search"))
            if not args.no_grid:     # chapter 11: at the gammas this run found best
                result["grid"] = _run_grid([], result, args.threads)
            out = args.out or RESULTS / "llm_bench.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        if "grid" in result:
            g = result["grid"]
            print(f"grid: {len(g['cells'])} cells in {g['wall_seconds']:.0f} s")
        print(f"wrote {out}")
        return

    if args.command == "medusa":
        from typsamp import gemma, medusa, tree_acceptance

        names = args.trees.split(",") if args.trees else list(BENCH_TREES)
        target = gemma.load(dtype=torch.bfloat16)
        heads = medusa.load_heads(torch.bfloat16, target=target)
        prompt_names, rows = llm_prompts(gemma.load_tokenizer(), args.prompts, MEDUSA_SETTINGS["prompt_tokens"])
        result = bench_medusa(target, heads, {n: tree_acceptance.named_tree(n) for n in names}, rows,
                              prompt_names=prompt_names, reference=gemma.load(dtype=torch.float32),
                              settings={"tokens": args.tokens, "prompts": args.prompts})
        out = args.out or RESULTS / "medusa_bench.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print("trees", json.dumps(result["trees"]))
        for row in result["results"]:
            print("  ".join(f"{k}={v}" for k, v in row.items()))
        print("goals", json.dumps(result["goals"]))
        print(f"wrote {out}")
        return

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU, and none is available")
    suffix = "" if args.device == "cpu" else "_" + args.device.replace(":", "")
    out = args.out or RESULTS / f"{args.command}_bench{suffix}.json"
    if args.command == "verify":
        result = bench_verify(args.device, args.repeats)
    elif args.command == "generate":
        result = bench_generate(args.device, args.tokens, args.prompts)
    else:
        result = bench_decode(args.device, args.tokens, args.prompts, peer=not args.no_peer)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["results"] + result.get("batched", []):
        print("  ".join(f"{k}={v}" for k, v in row.items() if k != "device"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
