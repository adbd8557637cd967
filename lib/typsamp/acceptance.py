"""Acceptance rate α against temperature on Gemma 3 270M, for real drafts (chapter 9).

Chapter 5 asked, on the book's character models, whether raising the temperature makes
speculative decoding reject more drafts; this module asks it of a real LLM. For every
draft in :data:`DRAFTS`, every method of the project's vocabulary
(:data:`typsamp.bench.METHODS`: ``rejection_sampled``, ``rejection_greedy``,
``match_sampled``, ``typical_greedy``) and every temperature, it decodes the same
test-split prompts (:mod:`typsamp.prompts`, every category) with
:func:`typsamp.generate.speculative` against the float32 target and records the measured
α with its standard error (:func:`typsamp.stats.row_alpha`: rows are independent
prompts with their own random streams, so the error bar is the spread between rows).

    python -m typsamp.acceptance [--drafts trimmed,distil,prompt_lookup]
        [--temperatures 0,0.3,0.7,1] [--per-category 2] [--prompt-tokens 64]
        [--new-tokens 24] [--gamma 4] [--seed 0] [--threads 1] [--out PATH]

writes ``notebooks/results/llm_acceptance.json`` (machine, versions, commit and dirty
flag from :mod:`typsamp.provenance`). It is a measurement of acceptance, not of speed:
no timing is recorded except the run's total wall time. Drafts may also be measured in
separate runs on the same settings, each written with ``--out
notebooks/results/llm_acceptance_<draft>.json``; chapter 9 reads every
``llm_acceptance*.json`` there and checks that their settings agree.

Drafts
------
``trimmed``
    the target in bfloat16 with the frequency-trimmed head
    (``typsamp.drafts.trimmed_draft()``; q = 0 outside the kept tokens).
``distil``
    the small trained draft (``typsamp.distil.load_draft()``).
``prompt_lookup``
    n-gram drafting from the row's own text (``typsamp.drafts.PromptLookup()``): no
    model, deterministic drafts (q = None, point masses), so only the rules that read
    token ids apply: ``rejection_greedy`` (rejection sampling of a point mass) and
    ``typical_greedy``. ``rejection_sampled`` needs q, and ``match_sampled`` on a point
    mass is ``rejection_greedy`` again (chapter 5), so neither is run.
``bf16``
    the target's own weights rounded to bfloat16 with the full head, built here
    (``gemma.load(dtype=torch.bfloat16)``): the nearest a draft gets to q = p.

Prompts
-------
``per_category`` test-split prompts of each of :data:`typsamp.prompts.CATEGORIES`, in
source order, each cut to its BOS token followed by its last ``prompt_tokens - 1``
tokens (long prompts are cut at the front, so every row continues real text where
its prompt ends, and the prefill stays small: the engine computes the whole
262,144-token head at every prompt position). Rows stop at ``new_tokens`` or at
Gemma's end token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from typsamp import bench, checks, generate, prompts, provenance, sampling, stats

__all__ = ["DRAFTS", "TEMPERATURES", "DETERMINISTIC_METHODS", "OUT", "methods_for", "run_prompts",
           "load_draft", "measure", "grid", "run", "main"]

#: Draft name -> what it is (see the module docstring).
DRAFTS = {
    "trimmed": "the target in bfloat16 with the frequency-trimmed head (typsamp.drafts.trimmed_draft)",
    "distil": "the small distilled draft (typsamp.distil.load_draft)",
    "prompt_lookup": "n-gram lookup in the row's own text (typsamp.drafts.PromptLookup), deterministic",
    "bf16": "the target's weights in bfloat16 with the full head (typsamp.gemma.load(dtype=bfloat16))",
}
DEFAULT_DRAFTS = ("trimmed", "distil", "prompt_lookup")
TEMPERATURES = (0.0, 0.3, 0.7, 1.0)
#: The methods that apply to a proposer whose drafts are deterministic (q = None).
DETERMINISTIC_METHODS = ("rejection_greedy", "typical_greedy")
OUT = provenance.ROOT / "notebooks" / "results" / "llm_acceptance.json"


def methods_for(proposer_or_model) -> tuple[str, ...]:
    """The :data:`typsamp.bench.METHODS` labels that apply: all four for a draft model,
    :data:`DETERMINISTIC_METHODS` for a proposer (anything with ``propose``)."""
    if hasattr(proposer_or_model, "propose"):
        return DETERMINISTIC_METHODS
    return tuple(bench.METHODS)


def _proposer(draft, method: str):
    """The proposer that runs ``method``: a :class:`generate.DraftModel` around a model
    (sampled or greedy drafts as the label says), or the proposer itself."""
    rule, greedy = bench.METHODS[method]
    if hasattr(draft, "propose"):
        if method not in DETERMINISTIC_METHODS:
            raise ValueError(f"`method` {method!r} needs a draft model; a proposer with deterministic "
                             f"drafts runs only {DETERMINISTIC_METHODS}")
        return draft
    return generate.DraftModel(draft, greedy=greedy)


def run_prompts(tokenizer, per_category: int = 2, prompt_tokens: int = 64,
                 categories=prompts.CATEGORIES) -> tuple[list[torch.Tensor], list[str]]:
    """The prompts of a run: :func:`typsamp.prompts.tokenized` of the test split (the
    first ``per_category`` prompts of each category, BOS + their last ``prompt_tokens -
    1`` tokens). Returns (list of 1-D int64 tensors, their ``category/id`` names)."""
    return prompts.tokenized(tokenizer, per_category, prompt_tokens, categories)


def load_draft(name: str):
    """The draft (a model with the engine's interface) or proposer called ``name``."""
    if name not in DRAFTS:
        raise ValueError(f"`draft` must be one of {', '.join(DRAFTS)}, got {name!r}")
    if name == "bf16":
        from typsamp import gemma
        return gemma.load(dtype=torch.bfloat16)
    if name == "trimmed":
        from typsamp import drafts
        return drafts.trimmed_draft()
    if name == "prompt_lookup":
        from typsamp import drafts
        return drafts.PromptLookup()
    from typsamp import distil
    return distil.load_draft()


def measure(target, draft, prompt_rows, method: str, temperature: float, *, gamma: int = 4,
            new_tokens: int = 24, seed: int = 0, eos_token_id=None) -> dict:
    """One cell: ``method`` with ``draft`` (model or proposer) at ``temperature`` over
    ``prompt_rows`` (a list of 1-D prompts, one row each, with per-row seeds
    ``seed * 1000 + row``). Returns α, its standard error, the counts and tokens/step."""
    if method not in bench.METHODS:
        raise ValueError(f"`method` must be one of {', '.join(bench.METHODS)}, got {method!r}")
    seed = checks.integer("seed", seed, low=0)
    rule, _ = bench.METHODS[method]
    warp = sampling.Warp(temperature=temperature)
    seeds = [seed * 1000 + i for i in range(len(prompt_rows))]
    out = generate.speculative(target, _proposer(draft, method), list(prompt_rows), new_tokens, gamma=gamma,
                               rule=rule, warp=warp, eos_token_id=eos_token_id, seed=seeds)
    r = stats.row_alpha(out.accepted_lengths, out.gamma)
    return {
        "method": method,
        "temperature": float(temperature),
        "alpha": r.alpha,
        "se": r.se,
        "accepted": int(r.accepted.sum()),
        "examined": int(r.examined.sum()),
        "rows": len(prompt_rows),
        "tokens": int(out.lengths.sum()),
        "steps": out.steps,
        "tokens_per_step": out.tokens_per_step,
        "row_alpha": [round(float(a), 6) for a in r.per_row],
    }


def grid(target, drafts: dict, prompt_rows, temperatures=TEMPERATURES, *, gamma: int = 4,
         new_tokens: int = 24, seed: int = 0, eos_token_id=None, progress: bool = False) -> list[dict]:
    """:func:`measure` for every draft in ``drafts`` (name -> model or proposer), every
    method that applies to it (:func:`methods_for`) and every temperature."""
    temperatures = [checks.real("temperatures[]", T, low=0.0) for T in temperatures]
    if not temperatures:
        raise ValueError("`temperatures` is empty")
    if not drafts:
        raise ValueError("`drafts` is empty")
    cells = [(name, method, T) for name, d in drafts.items() for method in methods_for(d) for T in temperatures]
    if progress:
        from tqdm.auto import tqdm
        cells = tqdm(cells, desc="alpha against T")
    rows = []
    for name, method, T in cells:
        row = measure(target, drafts[name], prompt_rows, method, T, gamma=gamma, new_tokens=new_tokens,
                      seed=seed, eos_token_id=eos_token_id)
        rows.append({"draft": name, **row})
    return rows


def run(draft_names=DEFAULT_DRAFTS, temperatures=TEMPERATURES, *, per_category: int = 2,
        prompt_tokens: int = 64, new_tokens: int = 24, gamma: int = 4, seed: int = 0,
        progress: bool = True) -> dict:
    """The whole measurement on Gemma 3 270M (float32 target), as the JSON records it."""
    from typsamp import gemma

    draft_names = list(draft_names)
    for name in draft_names:
        if name not in DRAFTS:
            raise ValueError(f"`drafts` must name drafts among {', '.join(DRAFTS)}, got {name!r}")
    where = provenance.machine("cpu")                 # at the start: the load before the run
    start = time.perf_counter()
    target = gemma.load(torch.float32)
    tokenizer = gemma.load_tokenizer()
    rows, names = run_prompts(tokenizer, per_category, prompt_tokens)
    drafts = {name: load_draft(name) for name in draft_names}
    results = grid(target, drafts, rows, temperatures, gamma=gamma, new_tokens=new_tokens, seed=seed,
                   eos_token_id=target.config.eos_token_id, progress=progress)
    command = (f"python -m typsamp.acceptance --drafts {','.join(draft_names)} --temperatures "
               f"{','.join(f'{T:g}' for T in temperatures)} --per-category {per_category} --prompt-tokens "
               f"{prompt_tokens} --new-tokens {new_tokens} --gamma {gamma} --seed {seed} "
               f"--threads {torch.get_num_threads()}")
    return {
        "benchmark": "acceptance rate alpha against temperature, Gemma 3 270M (float32 target)",
        "command": command,
        "method": (f"generate.speculative with each draft and method, gamma {gamma}, {new_tokens} new tokens "
                   f"per row (fewer at the end token), per-row seeds; {len(rows)} test-split prompts "
                   f"({per_category} per category, cut to BOS + their last {prompt_tokens - 1} tokens); "
                   "alpha = accepted / examined pooled over rows, se = stats.row_alpha's between-row "
                   "standard error"),
        "machine": where,
        "versions": provenance.versions(),
        "drafts": {name: DRAFTS[name] for name in draft_names},
        "settings": {"temperatures": [float(T) for T in temperatures], "gamma": gamma,
                     "new_tokens": new_tokens, "per_category": per_category,
                     "prompt_tokens": prompt_tokens, "seed": seed},
        "prompts": names,
        "prompt_lengths": [int(r.numel()) for r in rows],
        "wall_seconds": round(time.perf_counter() - start, 1),
        "results": results,
    }


def _list(text: str, kind, name: str):
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"`{name}` must be a comma-separated list, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m typsamp.acceptance", description=__doc__.split("\n")[0])
    parser.add_argument("--drafts", default=",".join(DEFAULT_DRAFTS),
                        help=f"comma-separated, among {', '.join(DRAFTS)}")
    parser.add_argument("--temperatures", default=",".join(f"{T:g}" for T in TEMPERATURES))
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(checks.integer("threads", args.threads, low=1))
    result = run(_list(args.drafts, str, "drafts"), _list(args.temperatures, float, "temperatures"),
                 per_category=args.per_category, prompt_tokens=args.prompt_tokens,
                 new_tokens=args.new_tokens, gamma=args.gamma, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"acceptance: {len(result['results'])} cells in {result['wall_seconds']} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
