"""Benchmarks behind the book's speed claims (``make bench``), and the GPU check (``make gpu-check``).

Speed is shown by measurements taken side by side in one run and committed as JSON with
the machine described, never by timed unit tests. Each sub-command writes one file
under ``notebooks/results/`` (``--out`` writes elsewhere), which the chapters load and
cite. Every file records where it ran: ``machine`` (:func:`typsamp.provenance.machine`:
CPU, threads, GPU, date, load average, commit and dirty flag) and ``versions``.

    python -m typsamp.bench [decode] [--device cpu|cuda] [--threads N] [--tokens N] [--prompts N] [--no-peer] [--out PATH]
    python -m typsamp.bench verify [--device cpu|cuda] [--threads N] [--out PATH] [--repeats N]
    python -m typsamp.bench generate [--device cpu|cuda] [--threads N] [--out PATH] [--tokens N] [--prompts N]
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

from typsamp import provenance, sampling, speculative, stats, typical

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
    for p in (v, g, d, c):
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
