"""Typical acceptance against an exact rule on Medusa's own system: heads, one tree (chapter 10).

Chapter 10 asks the notes' question on the system typical acceptance was made for: the
target's own Medusa heads (:mod:`typsamp.medusa`) propose a tree of deterministic
candidates (:mod:`typsamp.tree`), one target pass scores it, and a rule keeps a root path.
On the same heads, the same tree and the same prompts, this module decodes with

* ``typical``: :class:`typsamp.typical.TypicalAcceptance` as Medusa ships it (ε = 0.09,
  δ = 0.3, the extra token the argmax at the path's end, Medusa's ``entropy`` form);
* ``typical_sampled``: the same threshold, the extra token drawn from p_T (one of the
  book's sampled variants, chapter 6);
* ``exact``: :class:`typsamp.speculative.RejectionSampling` on the tree, recursive
  rejection over each node's deterministic children (its output law is p_T: proved in
  :mod:`typsamp.proofs`, tested by chi-square in ``tests/test_tree.py``);
* ``autoregressive``: plain sampling from p_T, the reference;

at each temperature, and records per cell the tokens per step, the mean accepted path
length, and the **exact** distance of the output from p_T along the method's own
trajectories. The distance needs no sampling: the law of every emitted token given the
text before it is known for each method.

* typical acceptance with greedy extra tokens is a deterministic decoder: given the
  prefix, each emitted token x has the law δ_x, so TV(δ_x, p_T) = 1 − p_T(x) and
  KL(δ_x ‖ p_T) = −log p_T(x);
* with sampled extra tokens, an accepted candidate has the law δ_x and an extra token
  the law p_T (distance 0), so the distance is the former's summed over accepted
  candidates only;
* the exact rule and autoregressive sampling emit p_T itself: distance 0 by the theorem
  (this module records 0 for them and says so; chapter 10 computes the law of one traced
  step from the tree and shows it equals p_T to rounding).

p_T is computed by one teacher-forced pass of the same target over prompt + generated
text (no cache), so it is the distribution the decoder was meant to follow; in bfloat16
the cached decoding passes and the teacher-forced one round differently, so at T = 0 the
token at a near-tie may differ: :func:`measure` counts those positions (``ties``).
Diversity: ``samples`` generations of one prompt per method (distinct-2 across them).

    python -m typsamp.tree_acceptance [--tree NAME] [--temperatures 0,0.5,0.7,1]
        [--per-category 2] [--prompt-tokens 64] [--new-tokens 32] [--samples 6]
        [--seed 0] [--threads 1] [--out PATH]

writes ``notebooks/results/tree_acceptance.json`` (machine, versions, commit). No timing
is recorded except the run's wall time: speed is :mod:`typsamp.bench`'s (``bench medusa``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from typsamp import checks, generate, prompts, provenance, sampling, speculative, stats, typical

__all__ = ["METHODS", "TEMPERATURES", "OUT", "DEFAULT_TREE", "named_tree", "rule_for", "position_laws",
           "measure", "same_as_autoregressive", "diversity", "run", "main"]

#: Method -> how it decodes (see the module docstring).
METHODS = {
    "typical": "TypicalAcceptance(0.09, 0.3, extra='greedy', entropy='medusa') on the tree: Medusa as shipped",
    "typical_sampled": "TypicalAcceptance(0.09, 0.3, extra='target') on the tree: extra token drawn from p_T",
    "exact": "RejectionSampling() on the tree: recursive rejection over deterministic children (exact)",
    "autoregressive": "generate.autoregressive: one token per pass from p_T",
}
TEMPERATURES = (0.0, 0.5, 0.7, 1.0)
OUT = provenance.ROOT / "notebooks" / "results" / "tree_acceptance.json"
#: The tree chapter 10 measures the rules on (a name of :func:`named_tree`).
DEFAULT_TREE = "small"


def named_tree(name: str):
    """A :class:`typsamp.tree.TreeSpec` by name: ``chain<n>`` (n candidates in a chain),
    ``full<w>x<d>`` (every node w children, depth d), ``small`` (:func:`typsamp.tree.small`),
    ``mc_sim_7b_63`` (Medusa's 63-node tree for Vicuna-7B) or ``mc<n>`` (its first n
    choices in Medusa's listed order, which lists every parent before its children)."""
    import re

    from typsamp import tree

    if not isinstance(name, str):
        raise checks.InputTypeError(f"a tree name must be a str, got {type(name).__name__}")
    if name == "small":
        return tree.small()
    if name == "mc_sim_7b_63":
        return tree.mc_sim_7b_63()
    if m := re.fullmatch(r"mc(\d+)", name):
        n = int(m.group(1))
        if not 1 <= n <= len(tree.MC_SIM_7B_63):
            raise ValueError(f"`{name}`: Medusa's tree has {len(tree.MC_SIM_7B_63)} nodes, so n must lie in "
                             f"[1, {len(tree.MC_SIM_7B_63)}]")
        return tree.TreeSpec.from_choices(tree.MC_SIM_7B_63[:n])
    if m := re.fullmatch(r"chain(\d+)", name):
        return tree.chain(int(m.group(1)))
    if m := re.fullmatch(r"full(\d+)x(\d+)", name):
        return tree.full(int(m.group(1)), int(m.group(2)))
    raise ValueError(f"unknown tree {name!r}: use small, mc_sim_7b_63, mc<n>, chain<n> or full<w>x<d>")


def rule_for(method: str):
    """The verification rule object of ``method`` (None for ``autoregressive``)."""
    if method == "typical":
        return typical.TypicalAcceptance(epsilon=0.09, delta=0.3, extra="greedy", entropy="medusa")
    if method == "typical_sampled":
        return typical.TypicalAcceptance(epsilon=0.09, delta=0.3, extra="target", entropy="medusa")
    if method == "exact":
        return speculative.RejectionSampling()
    if method == "autoregressive":
        return None
    raise ValueError(f"`method` must be one of {', '.join(METHODS)}, got {method!r}")


@torch.inference_mode()
def position_laws(target, prompt: torch.Tensor, tokens: torch.Tensor, T: float):
    """``(p_x, top)`` for the generated tokens x_1..x_L of one row, from one teacher-forced
    pass over ``prompt`` (1-D) + ``tokens`` (1-D, no padding): ``p_x`` float64 [L] is
    p_T(x_j | text before it) under the warp at temperature ``T`` (at T = 0, 1 where x_j
    is the argmax, else 0), ``top`` bool [L] whether x_j is the argmax of the logits
    (where a T = 0 decoder and the teacher-forced pass agree)."""
    return position_laws_at(target, prompt, tokens, (T,))[0]


def position_laws_at(target, prompt: torch.Tensor, tokens: torch.Tensor, temperatures) -> list:
    """:func:`position_laws` at each of ``temperatures``, from one teacher-forced pass. A
    target with ``head_logits`` (:class:`typsamp.gemma.Gemma`) applies its head to the
    generated positions only."""
    text = torch.cat([prompt, tokens])[None]
    start = prompt.numel() - 1
    target.clear_cache()
    with torch.inference_mode():
        if callable(getattr(target, "head_logits", None)):
            logits = target.head_logits(target(text, head=None)[0, start:-1]).float()
        else:
            logits = target(text)[0, start:-1].float()
    top = logits.argmax(-1) == tokens
    out = []
    for T in temperatures:
        if T > 0:
            p_x = sampling.Warp(temperature=T)(logits).double().gather(-1, tokens[:, None]).squeeze(-1)
        else:
            p_x = top.double()
        out.append((p_x, top))
    return out


def _distances(method: str, p_x: torch.Tensor, origin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position TV and KL(r ‖ p_T) of ``method``'s law r (see the module docstring);
    ``origin`` is :attr:`typsamp.generate.Generation.origin` of the row (1 = accepted
    candidate, 2 = extra token after a rejection, 3 = bonus token at a leaf)."""
    point_tv, point_kl = 1.0 - p_x, -torch.log(p_x.clamp(min=1e-300))
    zero = torch.zeros_like(p_x)
    if method == "typical":
        return point_tv, point_kl
    if method == "typical_sampled":
        accepted = origin == 1
        return torch.where(accepted, point_tv, zero), torch.where(accepted, point_kl, zero)
    return zero, zero                                   # exact, autoregressive: p_T itself


def _decode(target, proposer, rows, rule, T: float, new_tokens: int, seeds, eos_token_id):
    """Autoregressive decoding when ``rule`` is None, else speculative decoding with
    ``proposer`` and ``rule``, at temperature ``T``, one seed per row."""
    warp = sampling.Warp(temperature=T)
    if rule is None:
        return generate.autoregressive(target, rows, new_tokens, warp=warp, eos_token_id=eos_token_id, seed=seeds)
    return generate.speculative(target, proposer, rows, new_tokens, rule=rule, warp=warp,
                                eos_token_id=eos_token_id, seed=seeds)


def measure(target, proposer, prompt_rows: list[torch.Tensor], method: str, T: float, *,
            new_tokens: int = 32, seed: int = 0, eos_token_id=None):
    """One cell: ``method`` at temperature ``T`` over ``prompt_rows`` (per-row seeds
    ``seed * 1000 + row``) with ``proposer`` (a :class:`typsamp.medusa.MedusaProposer`).
    Returns tokens per step, the accepted-length histogram, mean TV and KL from p_T with standard
    errors between rows and the ties count at T = 0, as a dict; and the
    :class:`typsamp.generate.Generation`."""
    T = checks.real("T", T, low=0.0)
    rule = rule_for(method)
    rows = list(prompt_rows)
    out = _decode(target, proposer, rows, rule, T, new_tokens, [seed * 1000 + i for i in range(len(rows))],
                  eos_token_id)
    tv_rows, kl_rows, ties = [], [], 0
    for b, prompt in enumerate(rows):
        L = int(out.lengths[b])
        x = out.tokens[b, :L]
        p_x, top = position_laws(target, prompt, x, T)
        origin = out.origin[b, :L].long()
        tv, kl = _distances(method, p_x, origin)
        tv_rows.append(float(tv.mean()))
        kl_rows.append(float(kl.mean()))
        ties += int((~top).sum()) if T == 0 else 0
    tv_mean, tv_se = stats.mean_se(torch.tensor(tv_rows))
    kl_mean, kl_se = stats.mean_se(torch.tensor(kl_rows))
    cell = {"method": method, "temperature": float(T), "rows": len(rows), "tokens": int(out.lengths.sum()),
            "tv_from_target": tv_mean, "tv_se": tv_se, "kl_from_target": kl_mean, "kl_se": kl_se,
            "tv_rows": [round(v, 6) for v in tv_rows]}
    if rule is not None:
        a = out.accepted_lengths[out.accepted_lengths >= 0]
        cell.update(steps=out.steps, tokens_per_step=out.tokens_per_step,
                    mean_accepted=float(a.double().mean()) if a.numel() else math.nan,
                    accepted_histogram=torch.bincount(a, minlength=out.gamma + 1).tolist())
    if T == 0:
        cell["ties"] = ties
    return cell, out


@torch.inference_mode()
def same_as_autoregressive(target, prompt_rows: list[torch.Tensor], out, reference) -> dict:
    """Greedy tree decoding (``out``) against greedy autoregressive decoding
    (``reference``) of the same rows: how many rows are identical, and for each row that
    is not, the target's gap between its two largest logits at the first difference (one
    teacher-forced pass over the common prefix). Tree and one-token passes sum in
    different orders, so they may part only where that gap is within rounding."""
    gaps = []
    for b, prompt in enumerate(prompt_rows):
        a = out.tokens[b, :int(out.lengths[b])].tolist()
        r = reference.tokens[b, :int(reference.lengths[b])].tolist()
        if a == r:
            continue
        first = next((i for i in range(min(len(a), len(r))) if a[i] != r[i]), min(len(a), len(r)))
        target.clear_cache()
        logits = target(torch.cat([prompt, torch.tensor(r[:first], dtype=torch.long)])[None])[0, -1].float()
        top2 = logits.topk(2).values
        gaps.append({"row": b, "position": first, "gap": float(top2[0] - top2[1])})
    return {"rows": len(prompt_rows), "identical_rows": len(prompt_rows) - len(gaps), "differences": gaps}


def diversity(target, proposer, prompt: torch.Tensor, method: str, T: float, tokenizer, *, samples: int = 6,
              new_tokens: int = 32, seed: int = 0, eos_token_id=None) -> dict:
    """``samples`` generations of one prompt (seeds ``seed .. seed + samples - 1``): the
    share of distinct bigrams over all samples' bigrams (distinct-2 across samples), how
    many of the samples are distinct texts, and the first two texts."""
    out = _decode(target, proposer, [prompt] * samples, rule_for(method), T, new_tokens,
                  [seed + i for i in range(samples)], eos_token_id)
    seqs = [tuple(out.tokens[b, :int(out.lengths[b])].tolist()) for b in range(samples)]
    bigrams = [(s[i], s[i + 1]) for s in seqs for i in range(len(s) - 1)]
    return {"method": method, "temperature": float(T), "samples": samples,
            "distinct_2_across": len(set(bigrams)) / max(len(bigrams), 1),
            "distinct_texts": len(set(seqs)), "texts": [tokenizer.decode(list(s)) for s in seqs[:2]]}


def run(tree_name: str | None = None, temperatures=TEMPERATURES, *, per_category: int = 2,
        prompt_tokens: int = 64, new_tokens: int = 32, samples: int = 6, seed: int = 0,
        progress: bool = True) -> dict:
    """The whole measurement on Gemma 3 270M (bfloat16 target, the committed heads)."""
    from tqdm.auto import tqdm

    from typsamp import gemma, medusa

    where = provenance.machine("cpu")
    start = time.perf_counter()
    target = gemma.load(torch.bfloat16)
    tokenizer = gemma.load_tokenizer()
    heads = medusa.load_heads(torch.bfloat16)
    name = tree_name or DEFAULT_TREE
    spec = named_tree(name)
    proposer = medusa.MedusaProposer(heads, spec)
    rows, names = prompts.tokenized(tokenizer, per_category, prompt_tokens)
    eos = target.config.eos_token_id
    cells = [(m, T) for T in temperatures for m in METHODS]
    results, spread, outs = [], [], {}
    for method, T in tqdm(cells, desc="tree rules", disable=not progress):
        cell, outs[method, T] = measure(target, proposer, rows, method, T, new_tokens=new_tokens, seed=seed,
                                        eos_token_id=eos)
        results.append(cell)
        spread.append(diversity(target, proposer, rows[0], method, T, tokenizer, samples=samples,
                                new_tokens=new_tokens, seed=seed, eos_token_id=eos))
    greedy = {}
    if 0.0 in [float(T) for T in temperatures]:
        for method in METHODS:
            if method != "autoregressive":
                greedy[method] = same_as_autoregressive(target, rows, outs[method, 0.0], outs["autoregressive", 0.0])
    return {
        "benchmark": "typical acceptance against the exact tree rule on Medusa heads, Gemma 3 270M (bfloat16)",
        "command": (f"python -m typsamp.tree_acceptance --tree {name} --temperatures "
                    f"{','.join(f'{T:g}' for T in temperatures)} --per-category {per_category} "
                    f"--prompt-tokens {prompt_tokens} --new-tokens {new_tokens} --samples {samples} "
                    f"--seed {seed} --threads {torch.get_num_threads()}"),
        "methods": METHODS,
        "tree": {"name": name, "choices": [list(c) for c in spec.choices], "nodes": spec.n_nodes,
                 "depth": spec.max_depth},
        "heads": heads.record if hasattr(heads, "record") else None,
        "machine": where,
        "versions": provenance.versions(),
        "settings": {"temperatures": [float(T) for T in temperatures], "per_category": per_category,
                     "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "samples": samples,
                     "seed": seed},
        "prompts": names,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "results": results,
        "diversity": spread,
        "greedy_equals_autoregressive": greedy,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m typsamp.tree_acceptance", description=__doc__.split("\n")[0])
    parser.add_argument("--tree", default=None, help=f"a tree name of named_tree (default: {DEFAULT_TREE})")
    parser.add_argument("--temperatures", default=",".join(f"{T:g}" for T in TEMPERATURES))
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(checks.integer("threads", args.threads, low=1))
    temps = [float(t) for t in args.temperatures.split(",") if t.strip()]
    result = run(args.tree, temps, per_category=args.per_category, prompt_tokens=args.prompt_tokens,
                 new_tokens=args.new_tokens, samples=args.samples, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"tree_acceptance: {len(result['results'])} cells in {result['wall_seconds']} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
