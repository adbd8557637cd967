"""Benchmarks behind the book's speed claims (``make bench``).

Speed is shown by measurements taken side by side in one run and committed as JSON with
the machine described, never by timed unit tests. Each sub-command writes one file
under ``notebooks/results/``, which the chapters load and cite.

    python -m typsamp.bench [decode] [--device cpu|cuda] [--threads N] [--tokens N] [--prompts N] [--no-peer]
    python -m typsamp.bench verify [--device cpu|cuda] [--threads N] [--out PATH] [--repeats N]
    python -m typsamp.bench generate [--device cpu|cuda] [--threads N] [--out PATH] [--tokens N]

``decode`` (the default, chapter 8): every rule (autoregressive; speculative sampling
and typical acceptance with each draft) for T in {0, 0.7, 1} and γ in {2, 4, 6}, with
tokens/s, speed-up, α, accepted length and Leviathan et al.'s predicted speed-up,
side by side with ``transformers``' assisted generation on the same weights; then
batched serving at B = 8 and 32.

``verify``: the batched, vectorised :func:`typsamp.speculative.verify` against the
loop-per-position :func:`typsamp.speculative.verify_reference`, for B in {1, 64},
γ in {4, 8}, V in {84, 32000, 128256} (a character vocabulary, Llama 2's, Llama 3's).

``generate``: the engine on the committed models at batch 1, T in {0, 1}, γ in {2, 4, 6}:
ms per token of :func:`typsamp.generate.autoregressive` and of
:func:`typsamp.generate.speculative` with each draft, the measured acceptance rate α and
cost ratio c, the speed-up Leviathan et al.'s formula predicts from them, and the ratio
measured / predicted, which shows how much the engine's own overhead costs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from typsamp import speculative

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "notebooks" / "results"

VERIFY_GRID = {"B": (1, 64), "gamma": (4, 8), "V": (84, 32_000, 128_256)}


def machine(device: str = "cpu") -> dict:
    """Describe where a measurement ran: CPU, core count, threads, GPU, versions, commit."""
    info = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # 1-minute load average when the run started: other work on the machine skews timings
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
        "machine": machine(device),
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


def bench_generate(device: str = "cpu", tokens: int = 160, prompts: int = 3, seed: int = 0) -> dict:
    """Autoregressive vs speculative decoding on the committed models, batch 1."""
    from typsamp import generate, model as gpt
    from typsamp.data import load_corpus

    corpus = load_corpus()
    target = gpt.load("target", device=device)
    drafts = {name: gpt.load(name, device=device) for name in GENERATE_GRID["draft"]}
    # Prompts: the opening 64 characters of held-out text at fixed offsets.
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(corpus.val_ids) - 64, (prompts,), generator=gen).tolist()
    prompt_list = [corpus.val_ids[s:s + 64][None].to(device) for s in starts]
    context = 64 + tokens // 2
    costs = {"target": forward_ms(target, context, 1, device)}
    costs.update({name: forward_ms(m, context, 1, device) for name, m in drafts.items()})
    verify_cost = {g: forward_ms(target, context, g + 1, device) for g in GENERATE_GRID["gamma"]}

    def ms_per_token(run) -> float:
        total_time = total_tokens = 0.0
        for prompt in prompt_list:
            out = run(prompt)
            total_time += out.wall_time
            total_tokens += out.tokens.numel()
        return 1e3 * total_time / total_tokens

    rows = []
    cells = [(T, None, None) for T in GENERATE_GRID["temperature"]]
    cells += list(itertools.product(GENERATE_GRID["temperature"], GENERATE_GRID["draft"], GENERATE_GRID["gamma"]))
    for T, name, gamma in tqdm(cells, desc=f"generate on {device}"):
        if name is None:
            generate.autoregressive(target, prompt_list[0], 8, temperature=T, seed=seed)   # warm-up
            ms = ms_per_token(lambda pr: generate.autoregressive(target, pr, tokens, temperature=T, seed=seed))
            rows.append({"temperature": T, "method": "autoregressive", "ms_per_token": round(ms, 4)})
            continue
        draft = drafts[name]
        stats = []

        def run(pr):
            out = generate.speculative(target, draft, pr, tokens, gamma=gamma, temperature=T, seed=seed)
            stats.append(out)
            return out

        generate.speculative(target, draft, prompt_list[0], 8, gamma=gamma, temperature=T, seed=seed)
        ms = ms_per_token(run)
        alpha = sum(o.accepted for o in stats) / sum(o.examined for o in stats)
        c = costs[name] / costs["target"]
        rows.append({
            "temperature": T, "method": "speculative", "draft": name, "gamma": gamma,
            "ms_per_token": round(ms, 4), "alpha": round(alpha, 4), "c": round(c, 4),
            "tokens_per_step": round(sum(o.tokens.numel() for o in stats) / sum(o.steps for o in stats), 4),
        })
    baseline = {r["temperature"]: r["ms_per_token"] for r in rows if r["method"] == "autoregressive"}
    for r in rows:
        if r["method"] == "speculative":
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
        "benchmark": "generate.autoregressive vs generate.speculative, batch 1",
        "command": f"python -m typsamp.bench generate --device {device} --tokens {tokens}",
        "method": (f"{prompts} prompts of 64 held-out characters, {tokens} new tokens each, one seed; "
                   "ms/token = total wall time / total tokens (prefill included); c = median time "
                   "of one cached one-token draft pass / one target pass at the mid-generation "
                   "context; predicted speed-up = Leviathan et al. Thm 3.8 from the measured alpha "
                   "and c, which assumes a gamma+1-token target pass costs one one-token pass; "
                   "speedup_predicted_measured_costs uses the measured verify_pass_ms instead"),
        "forward_ms": {k: round(v, 4) for k, v in costs.items()},
        "verify_pass_ms": {str(g): round(v, 4) for g, v in verify_cost.items()},
        "machine": machine(device),
        "results": rows,
    }


DECODE_GRID = {"temperature": (0.0, 0.7, 1.0), "gamma": (2, 4, 6), "draft": ("draft", "draft_small")}
BATCH_SIZES = (8, 32)


class _Calls:
    """Counts forward passes of a ``transformers`` model (its verification steps)."""

    def __init__(self, model):
        self.n = 0
        model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


def _peer_generate(target_hf, draft_hf, prompt, tokens: int, temperature: float, gamma: int | None,
                   seed: int) -> torch.Tensor:
    """``transformers``' generate(), with assisted generation when ``draft_hf`` is given.

    The assistant proposes a constant ``gamma`` tokens per step (no schedule, no
    confidence-based early stop); sampling applies the temperature only (top-k and
    top-p off, which ``transformers`` would otherwise default to top-k 50).
    """
    # transformers builds attention masks from the pad id (the assistant's generate()
    # does so even when an all-ones mask is passed), and a character vocabulary has no
    # spare id: id 0 is the newline. An id past the vocabulary never occurs in the text.
    kwargs = dict(max_new_tokens=tokens, top_k=0, top_p=1.0, pad_token_id=target_hf.config.vocab_size,
                  attention_mask=torch.ones_like(prompt))
    if temperature == 0:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=temperature)
    if draft_hf is not None:
        config = draft_hf.generation_config
        config.num_assistant_tokens = gamma
        config.num_assistant_tokens_schedule = "constant"
        config.assistant_confidence_threshold = 0.0
        kwargs["assistant_model"] = draft_hf
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = target_hf.generate(prompt, **kwargs)
    return out[:, prompt.shape[1]:]


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
    """Every decoding rule on the committed models, side by side with transformers' assisted generation.

    For T in DECODE_GRID and γ in DECODE_GRID, at batch 1: our autoregressive decoding,
    speculative sampling with each draft (sampled drafts, rejection sampling), typical
    acceptance with each draft (greedy drafts, Medusa's ε = 0.09, δ = 0.3), and
    ``transformers``' ``generate`` with and without ``assistant_model`` on the same
    weights converted to ``GPT2LMHeadModel``. Ours and the peer's runs alternate
    prompt by prompt, so both see the same machine state. Then batched serving: our
    speculative engine against our autoregressive at each batch size.

    ``grid`` overrides :data:`DECODE_GRID` (same keys) for a smaller run, such as the
    live check in chapter 8; ``progress=False`` hides the progress bars.
    """
    import functools

    import transformers

    from typsamp import generate, model as gpt, typical
    from typsamp.data import load_corpus

    transformers.logging.set_verbosity_error()
    corpus = load_corpus()
    target = gpt.load("target", device=device)
    grid = DECODE_GRID if grid is None else {**DECODE_GRID, **grid}
    drafts = {name: gpt.load(name, device=device) for name in grid["draft"]}
    target_hf = gpt.to_hf(target) if peer else None
    drafts_hf = {name: gpt.to_hf(m) for name, m in drafts.items()} if peer else {}
    calls = _Calls(target_hf) if peer else None
    P = 64
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(corpus.val_ids) - P, (max((prompts, *batch_sizes)),), generator=gen).tolist()
    all_prompts = torch.stack([corpus.val_ids[s:s + P] for s in starts]).to(device)
    prompt_list = [all_prompts[i:i + 1] for i in range(prompts)]
    context = P + tokens // 2
    costs = {"target": forward_ms(target, context, 1, device)}
    costs.update({name: forward_ms(m, context, 1, device) for name, m in drafts.items()})
    rules = {
        "rejection": dict(verify=generate.trusted_verify, draft_mode="sample"),
        "typical": dict(verify=functools.partial(typical.verify, validate=False), draft_mode="greedy"),
    }
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def ours(method, T, name=None, gamma=None, prompt=None, n=tokens):
        if method == "autoregressive":
            return generate.autoregressive(target, prompt, n, temperature=T, seed=seed)
        return generate.speculative(target, drafts[name], prompt, n, gamma=gamma, temperature=T,
                                    seed=seed, **rules[method])

    def theirs(T, name=None, gamma=None, prompt=None, n=tokens):
        sync()
        start = time.perf_counter()
        before = calls.n
        out = _peer_generate(target_hf, drafts_hf.get(name), prompt, n, T, gamma, seed)
        sync()
        return out, time.perf_counter() - start, calls.n - before

    cells = [(T, "autoregressive", None, None) for T in grid["temperature"]]
    cells += [(T, method, name, gamma) for T in grid["temperature"] for method in rules
              for name in grid["draft"] for gamma in grid["gamma"]]
    rows = []
    for T, method, name, gamma in tqdm(cells, desc=f"decode on {device}, batch 1", disable=not progress):
        ours(method, T, name, gamma, prompt_list[0], 8)                      # warm-up
        run_peer = peer and method in ("autoregressive", "rejection")
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
        n_tokens = sum(o.tokens.numel() for o in mine)
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
    batch_cells = [(B, T, method) for B in batch_sizes for T in (0.0, 1.0)
                   for method in ("autoregressive", "rejection", "typical")]
    for B, T, method in tqdm(batch_cells, desc=f"decode on {device}, batched", disable=not progress):
        prompt = all_prompts[:B]
        ours(method, T, "draft", 4, prompt, 8)
        out = ours(method, T, "draft", 4, prompt)
        row = {"batch": B, "temperature": T, "method": method, "draft": None if method == "autoregressive" else "draft",
               "gamma": None if method == "autoregressive" else 4,
               "tokens_per_s": round(out.tokens.numel() / out.wall_time, 1)}
        if method != "autoregressive":
            row["alpha"] = round(out.alpha, 4)
            row["tokens_per_step"] = round(out.tokens_per_step, 4)
        batched.append(row)
    base = {(r["batch"], r["temperature"]): r["tokens_per_s"] for r in batched if r["method"] == "autoregressive"}
    for r in batched:
        if r["method"] != "autoregressive":
            r["speedup_measured"] = round(r["tokens_per_s"] / base[(r["batch"], r["temperature"])], 4)

    return {
        "benchmark": "decoding rules on the committed models, ours against transformers' assisted generation",
        "command": f"python -m typsamp.bench decode --device {device} --tokens {tokens}",
        "method": (f"batch 1: {prompts} prompts of {P} held-out characters, {tokens} new tokens each, "
                   f"seed {seed}; tokens/s = total tokens / total wall time (prefill included); our run "
                   "and the peer's alternate prompt by prompt after one warm-up each. rejection = "
                   "sampled drafts + speculative.verify; typical = greedy drafts + typical.verify "
                   "(eps 0.09, delta 0.3); peer = transformers GPT2LMHeadModel.generate(assistant_model=...) "
                   "on the same weights, num_assistant_tokens = gamma, schedule 'constant', "
                   "assistant_confidence_threshold 0, top_k 0, top_p 1; peer steps = target forward "
                   "passes; alpha_implied solves (1 - a^(g+1))/(1 - a) = tokens per step. "
                   "c = one-token draft pass / one-token target pass at mid-generation context. "
                   "speedup_predicted = Leviathan et al. Thm 3.8 from measured alpha and c. "
                   f"batched: batch {list(batch_sizes)} prompts, draft 'draft', gamma 4, one run after a "
                   "warm-up; transformers' assisted generation supports batch 1 only"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "forward_ms": {k: round(v, 4) for k, v in costs.items()},
        "machine": machine(device),
        "results": rows,
        "batched": batched,
    }


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
    for p in (v, g, d):
        p.add_argument("--threads", type=int, default=None,
                       help="torch intra-op threads (default: torch's choice, one per core)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv or ["decode"])          # no sub-command: the decode benchmark
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU, and none is available")
    suffix = "" if args.device == "cpu" else "_" + args.device.replace(":", "")
    out = args.out or RESULTS / f"{args.command}_bench{suffix}.json"
    if args.command == "verify":
        result = bench_verify(args.device, args.repeats)
    elif args.command == "generate":
        result = bench_generate(args.device, args.tokens)
    else:
        result = bench_decode(args.device, args.tokens, args.prompts, peer=not args.no_peer)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["results"] + result.get("batched", []):
        print("  ".join(f"{k}={v}" for k, v in row.items() if k != "device"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
